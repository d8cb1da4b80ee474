//! The saga's state as the machine sees it: plain data, serialized into the store.

use std::collections::BTreeMap;

use sagaflow_protocol::{Direction, StepError, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Where a saga is in its life. Its snake_case name is what the store, the CLI and JSON use.
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
    strum::EnumString,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SagaStatus {
    /// Recorded, first step not dispatched yet.
    Created,
    /// Moving forward.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded. Terminal.
    Completed,
    /// Rolled back: every completed compensatable step was compensated. Terminal.
    Compensated,
    /// Cannot make progress without an operator (a compensation or a post-pivot step failed for
    /// good); `SagaState::stuck` says why.
    Stuck,
}

impl SagaStatus {
    /// The statuses in which a saga still moves by itself ([`SagaStatus::is_active`]).
    pub const ACTIVE: [SagaStatus; 3] = [
        SagaStatus::Created,
        SagaStatus::Running,
        SagaStatus::Compensating,
    ];

    /// Completed and compensated sagas never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }

    /// Created, running or compensating: the saga still moves by itself.
    pub fn is_active(self) -> bool {
        SagaStatus::ACTIVE.contains(&self)
    }

    /// The lower-case name used in the store and the CLI.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Parses [`SagaStatus::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// The forward action is being attempted (in flight or waiting to retry).
    Running,
    /// The forward action succeeded; its output is recorded.
    Succeeded,
    /// The forward action failed for good.
    Failed,
    /// An operator declared it done by hand.
    Skipped,
    /// Its compensation is being attempted.
    Compensating,
    /// Its compensation succeeded (or an operator declared it done).
    Compensated,
}

/// How the latest attempt of one step in one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// Its reply arrived and was applied.
    Replied,
    /// Its timeout passed first: whatever it did is unknown.
    TimedOut,
    /// The saga moved on without it (deadline, cancel, operator skip).
    Abandoned,
}

/// Attempt counting for one step in one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
// The stored progress document leaves out the counts of directions never attempted
// (`store::codecs`): a missing one reads as nothing made.
#[serde(default)]
pub struct Attempts {
    /// Attempts dispatched so far; attempt numbers never repeat, even across operator resumes.
    pub made: u32,
    /// `made` when the current round began: the retry policy counts only this round's attempts,
    /// so an operator's resume gets a fresh budget.
    pub round_start: u32,
    /// How the latest attempt ended, if it has.
    pub last_outcome: Option<AttemptOutcome>,
}

impl Attempts {
    /// Attempts made in the current round.
    pub fn in_round(&self) -> u32 {
        self.made - self.round_start
    }
}

/// One step's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// Where the step is.
    pub status: StepStatus,
    /// Forward attempts (missing in a stored document: none yet).
    #[serde(default)]
    pub forward: Attempts,
    /// Compensation attempts (missing in a stored document: none yet).
    #[serde(default)]
    pub compensation: Attempts,
    /// The latest error of either direction.
    #[serde(default)]
    pub last_error: Option<StepError>,
}

impl StepState {
    fn pending() -> Self {
        StepState {
            status: StepStatus::Pending,
            forward: Attempts::default(),
            compensation: Attempts::default(),
            last_error: None,
        }
    }

    /// The counters of one direction.
    pub fn attempts(&self, direction: Direction) -> &Attempts {
        match direction {
            Direction::Forward => &self.forward,
            Direction::Compensate => &self.compensation,
        }
    }

    pub(crate) fn attempts_mut(&mut self, direction: Direction) -> &mut Attempts {
        match direction {
            Direction::Forward => &mut self.forward,
            Direction::Compensate => &mut self.compensation,
        }
    }
}

/// What the saga is waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Activity {
    /// Nothing: the saga is finished, stuck, or not started.
    Idle,
    /// An attempt was dispatched and its reply is awaited until `deadline`.
    InFlight {
        /// The step.
        step: usize,
        /// Forward or compensation.
        direction: Direction,
        /// The attempt number.
        attempt: u32,
        /// When it times out, if the step has a timeout.
        deadline: Option<Timestamp>,
    },
    /// A failed attempt will be followed by `attempt` at `at`.
    BackingOff {
        /// The step.
        step: usize,
        /// Forward or compensation.
        direction: Direction,
        /// The attempt number that will be dispatched.
        attempt: u32,
        /// When.
        at: Timestamp,
    },
}

/// Why a saga is stuck, and where an operator's resume picks up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stuck {
    /// The step that cannot proceed.
    pub step: usize,
    /// In which direction.
    pub direction: Direction,
    /// What happened, for the operator.
    pub reason: String,
}

/// Everything the state machine knows about one saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// The instance id.
    pub saga_id: Uuid,
    /// The definition's name.
    pub name: String,
    /// The definition version this instance is pinned to.
    pub version: u32,
    /// Where the saga is.
    pub status: SagaStatus,
    /// The start input, as given.
    pub input: Value,
    /// Outputs of completed steps, by step name.
    pub outputs: BTreeMap<String, Value>,
    /// One entry per step of the definition.
    pub steps: Vec<StepState>,
    /// What it waits for.
    pub activity: Activity,
    /// Steps still to compensate, next first.
    pub compensation_queue: Vec<usize>,
    /// Whether the pivot succeeded: from then on the saga only moves forward.
    pub past_pivot: bool,
    /// When the saga gives up moving forward, if its definition has a deadline.
    pub deadline: Option<Timestamp>,
    /// Why compensation began.
    pub failure: Option<String>,
    /// Set while the saga is stuck.
    pub stuck: Option<Stuck>,
    /// When it was created.
    pub created_at: Timestamp,
}

impl SagaState {
    /// A saga that has been recorded but not started.
    pub fn new(
        saga_id: Uuid,
        spec: &sagaflow_protocol::SagaSpec,
        input: Value,
        created_at: Timestamp,
    ) -> Self {
        SagaState {
            saga_id,
            name: spec.name.clone(),
            version: spec.version,
            status: SagaStatus::Created,
            input,
            outputs: BTreeMap::new(),
            steps: spec.steps.iter().map(|_| StepState::pending()).collect(),
            activity: Activity::Idle,
            compensation_queue: Vec::new(),
            past_pivot: false,
            deadline: spec.deadline.map(|d| created_at.plus(d)),
            failure: None,
            stuck: None,
            created_at,
        }
    }

    /// The earliest moment the saga has something to do by itself: an attempt timing out, a
    /// retry falling due, or its deadline. The store persists it; the timer poller wakes the saga
    /// then.
    pub fn wake_at(&self) -> Option<Timestamp> {
        let activity = match &self.activity {
            Activity::InFlight { deadline, .. } => *deadline,
            Activity::BackingOff { at, .. } => Some(*at),
            Activity::Idle => None,
        };
        let deadline = self.deadline_armed().then_some(self.deadline).flatten();
        match (activity, deadline) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        }
    }

    /// The deadline only matters while the saga still moves forward before its pivot.
    pub(crate) fn deadline_armed(&self) -> bool {
        self.status == SagaStatus::Running && !self.past_pivot
    }

    /// The step the saga is working on or stuck at, if any.
    pub fn current_step(&self) -> Option<(usize, Direction)> {
        match &self.activity {
            Activity::InFlight {
                step, direction, ..
            }
            | Activity::BackingOff {
                step, direction, ..
            } => Some((*step, *direction)),
            Activity::Idle => self.stuck.as_ref().map(|s| (s.step, s.direction)),
        }
    }
}
