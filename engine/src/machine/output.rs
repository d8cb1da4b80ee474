//! What the machine decides: the new state, commands for the shell, and history records.

use sagaflow_protocol::{Direction, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::state::{SagaState, SagaStatus};

/// The result of applying one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    /// The saga after the event.
    pub state: SagaState,
    /// Side effects for the shell to carry out after the state is committed.
    pub commands: Vec<Command>,
    /// What to append to the saga's history, in order, in the same commit as the state.
    pub history: Vec<Record>,
}

/// A side effect the shell carries out.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum Command {
    /// Send an attempt to a worker.
    Dispatch(Dispatch),
    /// Wake the saga at `at` (persisted as the saga's wake-up time).
    ScheduleWake {
        /// When.
        at: Timestamp,
    },
    /// The saga reached a terminal status.
    Finish {
        /// Completed or compensated.
        status: SagaStatus,
    },
}

/// One attempt to send to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    /// The step index.
    pub step: usize,
    /// The step name.
    pub step_name: String,
    /// Forward or compensation.
    pub direction: Direction,
    /// The attempt number.
    pub attempt: u32,
    /// Stable across retries and redeliveries of this step in this direction.
    pub idempotency_key: String,
    /// The forward action's key (equal to `idempotency_key` going forward).
    pub forward_key: String,
    /// When the attempt times out.
    pub deadline: Option<Timestamp>,
}

/// Who caused a history record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "name")]
pub enum Actor {
    /// The engine itself (dispatches, timers, decisions).
    Engine,
    /// A step worker, by its id.
    Worker(String),
    /// An operator, by name.
    Operator(String),
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Engine => f.write_str("engine"),
            Actor::Worker(id) => write!(f, "worker:{id}"),
            Actor::Operator(name) => write!(f, "operator:{name}"),
        }
    }
}

/// What kind of thing a history record tells. Its snake_case name is what the history table,
/// the CLI and JSON use.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
    strum::EnumString,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum RecordKind {
    /// The saga started.
    SagaStarted,
    /// An attempt was sent.
    AttemptDispatched,
    /// An attempt succeeded.
    AttemptSucceeded,
    /// An attempt failed.
    AttemptFailed,
    /// An attempt's timeout passed before its reply.
    AttemptTimedOut,
    /// A retry was scheduled.
    RetryScheduled,
    /// A retry timer fell due.
    RetryTimerFired,
    /// A reply was recorded but not applied (duplicate, late, or for a finished saga).
    ReplyIgnored,
    /// The saga's deadline passed before the pivot.
    DeadlineExceeded,
    /// Compensation began.
    CompensationStarted,
    /// The saga became stuck.
    SagaStuck,
    /// An operator acted.
    OperatorAction,
    /// A message about the saga was refused.
    MessageRejected,
    /// Every step succeeded.
    SagaCompleted,
    /// Every completed compensatable step was compensated.
    SagaCompensated,
}

impl RecordKind {
    /// The snake_case name stored in the history table.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why a reply was recorded as [`RecordKind::ReplyIgnored`] instead of applied: the kind of the
/// reason the machine writes in the record's `reason` (its text begins with the cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyIgnoredCause {
    /// The attempt was already answered.
    Duplicate,
    /// The attempt had been superseded, had timed out, or the saga had moved on.
    Late,
    /// A worker refused a command of a superseded epoch without running it.
    StaleEpoch,
    /// The saga had already completed or been compensated.
    Finished,
    /// Anything else: an attempt never dispatched, a step the saga does not have.
    Other,
}

impl ReplyIgnoredCause {
    /// Every cause.
    pub const ALL: [ReplyIgnoredCause; 5] = [
        ReplyIgnoredCause::Duplicate,
        ReplyIgnoredCause::Late,
        ReplyIgnoredCause::StaleEpoch,
        ReplyIgnoredCause::Finished,
        ReplyIgnoredCause::Other,
    ];

    /// The cause of an ignored reply, from the reason the machine recorded.
    pub fn of_reason(reason: &str) -> Self {
        if reason.starts_with(DUPLICATE_REPLY) {
            ReplyIgnoredCause::Duplicate
        } else if reason.starts_with(LATE_REPLY) {
            ReplyIgnoredCause::Late
        } else if reason.starts_with(STALE_EPOCH_REPLY) {
            ReplyIgnoredCause::StaleEpoch
        } else if reason.starts_with(FINISHED_SAGA_REPLY) {
            ReplyIgnoredCause::Finished
        } else {
            ReplyIgnoredCause::Other
        }
    }

    /// The snake_case name (a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyIgnoredCause::Duplicate => "duplicate",
            ReplyIgnoredCause::Late => "late",
            ReplyIgnoredCause::StaleEpoch => "stale_epoch",
            ReplyIgnoredCause::Finished => "finished",
            ReplyIgnoredCause::Other => "other",
        }
    }
}

/// How the reasons of ignored replies begin, one per [`ReplyIgnoredCause`].
pub(crate) const DUPLICATE_REPLY: &str = "duplicate:";
pub(crate) const LATE_REPLY: &str = "late:";
pub(crate) const STALE_EPOCH_REPLY: &str = "stale epoch:";
pub(crate) const FINISHED_SAGA_REPLY: &str = "the saga is already";

/// One history entry, before the shell stamps it with a sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// What it tells.
    pub kind: RecordKind,
    /// The step it concerns, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The direction, for step records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// The attempt number, for attempt records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Details: an output, a retry time, an ignored reply's reason.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
    /// The error, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who caused it.
    pub actor: Actor,
}

impl Record {
    pub(crate) fn saga(kind: RecordKind, actor: Actor, detail: Value) -> Self {
        Record {
            kind,
            step: None,
            direction: None,
            attempt: None,
            detail,
            error: None,
            actor,
        }
    }

    pub(crate) fn attempt(
        kind: RecordKind,
        step: &str,
        direction: Direction,
        attempt: u32,
        actor: Actor,
    ) -> Self {
        Record {
            kind,
            step: Some(step.to_string()),
            direction: Some(direction),
            attempt: Some(attempt),
            detail: Value::Null,
            error: None,
            actor,
        }
    }

    pub(crate) fn with_detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }

    pub(crate) fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }
}
