//! What can happen to a saga: the machine's inputs.

use sagaflow_protocol::{Direction, StepError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One thing that happened to a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// The saga was started: dispatch the first step.
    Start,
    /// A worker answered an attempt. The machine decides whether it is current, a duplicate,
    /// or late.
    Reply(Reply),
    /// A durable timer fell due (an attempt timeout, a retry, the deadline). The machine checks
    /// which, against `now`; a wake with nothing due changes nothing.
    TimerFired,
    /// An operator acted on the saga.
    Operator(OperatorCommand),
    /// A message about this saga was refused (malformed, unknown schema version, too large):
    /// recorded in the history, nothing else changes.
    Rejected {
        /// Where it came from (a subject, a worker).
        source: String,
        /// Why it was refused.
        reason: String,
    },
}

/// A worker's answer to one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The step index.
    pub step: usize,
    /// Forward or compensation.
    pub direction: Direction,
    /// Which attempt it answers.
    pub attempt: u32,
    /// The output (`null` for a compensation) or the classified error.
    pub result: Result<Value, StepError>,
    /// Who answered, for the history.
    pub worker: String,
}

/// An operator's action, with who and why for the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorCommand {
    /// Who acts.
    pub actor: String,
    /// Why, in their words.
    pub reason: String,
    /// What they do.
    pub action: OperatorAction,
}

/// What an operator can do to a saga.
///
/// Its name ([`OperatorAction::name`]: `resume`, `retry`, `skip`, `cancel`) is what the history
/// records as the operator action's `action` and what the CLI calls it.
#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr, strum::VariantNames,
)]
#[serde(rename_all = "snake_case", tag = "action")]
#[strum(serialize_all = "snake_case")]
pub enum OperatorAction {
    /// A stuck saga tries its failed step or compensation again now, with a fresh retry budget.
    Resume,
    /// Skip the remaining backoff and retry the current step now.
    #[strum(serialize = "retry")]
    RetryNow,
    /// Declare the current step done by hand: forward with `output` (already validated against
    /// the step's type by the shell), or its compensation.
    #[strum(serialize = "skip")]
    SkipStep {
        /// The step's name.
        step: String,
        /// The output later steps will read (forward only).
        output: Option<Value>,
    },
    /// Stop moving forward and compensate what completed.
    Cancel,
}

impl OperatorAction {
    /// The action's name, as the history records it and the CLI calls it.
    pub fn name(&self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_are_what_the_history_records() {
        let names: Vec<&str> = [
            OperatorAction::Resume,
            OperatorAction::RetryNow,
            OperatorAction::SkipStep {
                step: "a".into(),
                output: None,
            },
            OperatorAction::Cancel,
        ]
        .iter()
        .map(OperatorAction::name)
        .collect();
        assert_eq!(names, ["resume", "retry", "skip", "cancel"]);
        assert_eq!(
            <OperatorAction as strum::VariantNames>::VARIANTS,
            ["resume", "retry", "skip", "cancel"]
        );
    }
}
