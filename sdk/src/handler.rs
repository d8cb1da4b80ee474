//! What a workflow author implements: typed step handlers.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

use sagaflow_protocol::{Direction, StepCommand, StepError, Timestamp};

use crate::SdkError;

impl From<SdkError> for StepError {
    /// Data that does not fit its type will not fit on a retry either: permanent.
    fn from(error: SdkError) -> Self {
        StepError::permanent("bad_data", error.to_string())
    }
}

/// Everything a handler may want to know about the attempt it serves.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The saga instance.
    pub saga_id: Uuid,
    /// The saga's name.
    pub saga_name: String,
    /// This step's name.
    pub step: String,
    /// Forward action or compensation.
    pub direction: Direction,
    /// The attempt number, from 1; it keeps counting across operator resumes.
    pub attempt: u32,
    /// Stable across every retry and redelivery of this step in this direction: pass it to the
    /// resource behind the step so the side effect happens at most once.
    pub idempotency_key: String,
    /// The key the forward action used. In a compensation it names what to undo, even when the
    /// forward outcome is unknown (its last attempt timed out).
    pub forward_key: String,
    /// When this attempt counts as timed out, if the step has a timeout.
    pub deadline: Option<Timestamp>,
    /// Outputs of the steps that completed before this one, by step name.
    pub outputs: Arc<BTreeMap<String, Value>>,
    /// The saga's partition: the unit of ownership among engine nodes.
    pub partition: u32,
    /// The fencing epoch under which the engine node owning `partition` sent this attempt. It
    /// only grows: a resource that keeps the highest epoch it has seen per partition can refuse
    /// a request carrying a lower one, which comes from a node that lost the partition (the
    /// worker itself already refuses those it knows to be stale, but a resource shared by
    /// several workers sees more).
    pub epoch: u64,
}

impl StepContext {
    /// The output of an earlier step, as its type.
    ///
    /// An earlier output that does not deserialize is a permanent error: retrying cannot fix it.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let value = self.outputs.get(step).ok_or_else(|| {
            StepError::permanent(
                "missing_output",
                format!(
                    "step `{}` asked for the output of `{step}`, which has not completed",
                    self.step
                ),
            )
        })?;
        Ok(crate::json::from_value(
            value.clone(),
            &format!("output of step `{step}`"),
            &self.step,
        )?)
    }

    /// The key the idempotency key of `direction` would have for this step.
    pub fn key_for(saga_id: Uuid, step: &str, direction: Direction) -> String {
        sagaflow_protocol::idempotency_key(saga_id, step, direction)
    }

    /// The handler's view of `command`.
    pub fn for_command(command: &StepCommand) -> StepContext {
        StepContext {
            saga_id: command.saga_id,
            saga_name: command.saga.clone(),
            step: command.step.clone(),
            direction: command.direction,
            attempt: command.attempt,
            idempotency_key: command.idempotency_key.clone(),
            forward_key: command.forward_key.clone(),
            deadline: command.deadline,
            outputs: Arc::new(command.outputs.clone()),
            partition: command.partition,
            epoch: command.epoch,
        }
    }
}

/// A step's forward action.
///
/// `Input` is read from the saga's input (so a step can take only the fields it needs), `Output`
/// is recorded in the saga and handed to later steps and to this step's compensation. Both
/// describe themselves as JSON Schema ([`JsonSchema`], usually derived), which the definition
/// carries to the engine: it checks a start's input against the first step's `Input` schema and
/// an output an operator gives by hand against the step's `Output` schema.
pub trait StepHandler: Send + Sync + 'static {
    /// What the step reads from the saga input.
    type Input: DeserializeOwned + JsonSchema + Send + 'static;
    /// What the step produces.
    type Output: Serialize + DeserializeOwned + JsonSchema + Send + 'static;

    /// Performs the step. Must be idempotent on `ctx.idempotency_key`.
    fn execute(
        &self,
        ctx: &StepContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, StepError>> + Send;
}

/// A step that can be undone.
pub trait Compensate: StepHandler {
    /// Undoes the step. `output` is `None` when the forward outcome is unknown (its last attempt
    /// timed out): undo whatever `ctx.forward_key` did, if anything. Must be idempotent on
    /// `ctx.idempotency_key`.
    fn compensate(
        &self,
        ctx: &StepContext,
        input: Self::Input,
        output: Option<Self::Output>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}
