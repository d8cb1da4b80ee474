//! Named, scripted scenarios of the saga model, and a runner that turns one into a [`Trace`].
//!
//! A [`Scenario`] is plain data: a definition, a start input and a script of events at fixed
//! offsets from the start. [`run`] applies the script to the pure state machine with
//! [`ExactDelays`] (no jitter), so every trace is reproducible. The machine's own tests snapshot
//! each trace; the store-level tests replay the same scripts through the real database store and
//! compare what it persisted with [`Trace::history`] and [`Trace::final_state`].
//!
//! Conventions of every scenario:
//! - the saga id is [`SAGA_ID`] and it is created at [`START`]; an offset `at_ms` in a script is
//!   the instant `START + at_ms`;
//! - the first event is [`Event::Start`] at offset 0;
//! - a timer the machine asked for is written as [`Event::TimerFired`] at the instant it falls
//!   due (retry delays are exact: `100 ms * 2^(n-1)`, capped at 1 s, see [`forward_policy`]);
//! - replies come from worker [`WORKER`], operator actions from [`OPERATOR`];
//! - an event the machine refuses stays in the trace with the refusal's message, and the state
//!   is unchanged.
//!
//! The shared definitions, script helpers and the runner live here; the scenarios themselves
//! are grouped by theme, one submodule each, and [`all`] gathers them.

mod compensation;
mod deadlines;
mod forward_failures;
mod happy_path;
mod operator_actions;
mod refusals;
mod retriable_step;
mod stray_messages;
mod timeouts;

use std::time::Duration;

use sagaflow_protocol::backoff::ExactDelays;
use sagaflow_protocol::{
    Direction, RetryPolicy, SagaSpec, StepError, StepKind, StepSpec, Timestamp,
};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    Activity, Command, Event, Inputs, OperatorAction, OperatorCommand, Record, Reply, SagaState,
    SagaStatus, decide,
};

/// The instant every scenario's saga is created at (2023-11-14T22:13:20Z).
pub const START: Timestamp = Timestamp(1_700_000_000_000);

/// The saga id every scenario uses.
pub const SAGA_ID: Uuid = Uuid::from_u128(1);

/// The worker id on every scripted reply.
pub const WORKER: &str = "worker-1";

/// The operator name on every scripted operator action.
pub const OPERATOR: &str = "alice";

/// Every step's attempt timeout in the scenario definitions.
pub const STEP_TIMEOUT_MS: i64 = 1_000;

/// The overall deadline of [`order_spec_with_deadline`].
pub const DEADLINE_MS: i64 = 2_000;

/// The step indices of [`order_spec`].
pub const RESERVE: usize = 0;
/// `authorize_payment`, compensatable.
pub const AUTHORIZE: usize = 1;
/// `capture_payment`, the pivot.
pub const CAPTURE: usize = 2;
/// `ship_order`, retriable.
pub const SHIP: usize = 3;

/// One scripted story of a saga.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// A unique snake_case name; also the snapshot's name.
    pub name: &'static str,
    /// What the scenario shows, in one or two sentences.
    pub description: String,
    /// The definition the saga is pinned to.
    pub spec: SagaSpec,
    /// The saga's start input.
    pub input: Value,
    /// Events in order, each at an offset in milliseconds from [`START`].
    pub script: Vec<(i64, Event)>,
    /// The saga's status once the whole script is applied.
    pub expected_status: SagaStatus,
}

impl Scenario {
    /// The instant of an offset in the script.
    pub fn at(offset_ms: i64) -> Timestamp {
        Timestamp(START.0 + offset_ms)
    }

    /// The saga as it is before the script's first event: created, not started.
    pub fn initial_state(&self) -> SagaState {
        SagaState::new(SAGA_ID, &self.spec, self.input.clone(), START)
    }
}

/// What happened when a scenario was run.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// The scenario's name.
    pub scenario: &'static str,
    /// The scenario's description.
    pub description: String,
    /// One entry per scripted event, in order.
    pub entries: Vec<TraceEntry>,
    /// The saga after the last event.
    #[serde(skip)]
    pub final_state: SagaState,
    /// Every history record of every applied event, in order: what a store must have persisted.
    #[serde(skip)]
    pub history: Vec<Record>,
}

/// The effect of one scripted event.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    /// Offset from [`START`] in milliseconds.
    pub at_ms: i64,
    /// The event applied.
    pub event: Event,
    /// Set when the machine refused the event (the state is then unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Commands for the shell.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<Command>,
    /// History records appended.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Record>,
    /// The saga after the event.
    pub state: StateSummary,
}

/// A compact view of a [`SagaState`] for traces.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateSummary {
    /// The saga's status.
    pub status: SagaStatus,
    /// What it waits for, as one line.
    pub activity: String,
    /// One line per step: `name: status (fwd N, comp M)`, attempts dispatched per direction.
    pub steps: Vec<String>,
    /// Names of the steps that recorded an output (completed or skipped forward).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Steps still to compensate, next first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compensation_queue: Vec<String>,
    /// Whether the pivot succeeded.
    pub past_pivot: bool,
    /// When the saga wakes by itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<Timestamp>,
    /// Why it is stuck.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck: Option<String>,
}

/// Summarizes `state` (named by `spec`'s step names).
pub fn summarize(state: &SagaState, spec: &SagaSpec) -> StateSummary {
    let name = |i: usize| spec.steps.get(i).map_or("?", |s| s.name.as_str());
    let activity = match &state.activity {
        Activity::Idle => "idle".to_string(),
        Activity::InFlight {
            step,
            direction,
            attempt,
            deadline,
        } => {
            let until = deadline.map_or_else(String::new, |d| format!(" until {}", d.0));
            format!("in flight: {} {direction} #{attempt}{until}", name(*step))
        }
        Activity::BackingOff {
            step,
            direction,
            attempt,
            at,
        } => format!(
            "backing off: {} {direction} #{attempt} at {}",
            name(*step),
            at.0
        ),
    };
    let steps = state
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let status = serde_json::to_value(s.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!(
                "{}: {status} (fwd {}, comp {})",
                name(i),
                s.forward.made,
                s.compensation.made
            )
        })
        .collect();
    StateSummary {
        status: state.status,
        activity,
        steps,
        outputs: state.outputs.keys().cloned().collect(),
        compensation_queue: state
            .compensation_queue
            .iter()
            .map(|&i| name(i).to_string())
            .collect(),
        past_pivot: state.past_pivot,
        wake_at: state.wake_at(),
        stuck: state
            .stuck
            .as_ref()
            .map(|s| format!("at {} ({}): {}", name(s.step), s.direction, s.reason)),
    }
}

/// Applies a scenario's script to the state machine, from [`Scenario::initial_state`].
pub fn run(scenario: &Scenario) -> Trace {
    let mut state = scenario.initial_state();
    let mut entries = Vec::with_capacity(scenario.script.len());
    let mut history = Vec::new();
    for (at_ms, event) in &scenario.script {
        let inputs = Inputs {
            now: Scenario::at(*at_ms),
            delays: &mut ExactDelays,
        };
        let entry = match decide(&state, &scenario.spec, event.clone(), inputs) {
            Ok(transition) => {
                state = transition.state;
                history.extend(transition.history.iter().cloned());
                TraceEntry {
                    at_ms: *at_ms,
                    event: event.clone(),
                    refused: None,
                    commands: transition.commands,
                    history: transition.history,
                    state: summarize(&state, &scenario.spec),
                }
            }
            Err(error) => TraceEntry {
                at_ms: *at_ms,
                event: event.clone(),
                refused: Some(error.to_string()),
                commands: Vec::new(),
                history: Vec::new(),
                state: summarize(&state, &scenario.spec),
            },
        };
        entries.push(entry);
    }
    Trace {
        scenario: scenario.name,
        description: scenario.description.clone(),
        entries,
        final_state: state,
        history,
    }
}

// ----- definitions -----

/// Forward retries of the scenario steps: 3 attempts, 100 ms doubling up to 1 s, no jitter;
/// `invalid_request` is never retried.
pub fn forward_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(100))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(1_000))
        .max_attempts(3)
        .jitter(0.0)
        .non_retryable("invalid_request")
        .build()
        // Infallible: constant fields that satisfy every rule `build` checks.
        .expect("valid policy")
}

/// Compensation retries: 3 attempts, 100 ms doubling up to 1 s, no jitter.
pub fn compensation_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(100))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(1_000))
        .max_attempts(3)
        .jitter(0.0)
        .build()
        // Infallible: constant fields that satisfy every rule `build` checks.
        .expect("valid policy")
}

/// Retries of the retriable step: without end, 100 ms doubling up to 1 s, no jitter.
pub fn unlimited_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(100))
        .multiplier(2.0)
        .max_interval(Duration::from_millis(1_000))
        .unlimited_attempts()
        .jitter(0.0)
        .non_retryable("invalid_request")
        .build()
        // Infallible: constant fields that satisfy every rule `build` checks.
        .expect("valid policy")
}

fn step(name: &str, kind: StepKind, retry: RetryPolicy) -> StepSpec {
    StepSpec {
        name: name.to_string(),
        kind,
        retry,
        compensation_retry: compensation_policy(),
        timeout: Some(Duration::from_millis(STEP_TIMEOUT_MS as u64)),
        // The machine never reads the step types.
        input_schema: None,
        output_schema: None,
        secret_output: Vec::new(),
    }
}

/// `place_order` v1: `reserve_stock` and `authorize_payment` (compensatable), `capture_payment`
/// (the pivot), `ship_order` (retriable, unlimited retries). Every attempt times out after 1 s.
pub fn order_spec() -> SagaSpec {
    SagaSpec {
        name: "place_order".into(),
        version: 1,
        steps: vec![
            step("reserve_stock", StepKind::Compensatable, forward_policy()),
            step(
                "authorize_payment",
                StepKind::Compensatable,
                forward_policy(),
            ),
            step("capture_payment", StepKind::Pivot, forward_policy()),
            step("ship_order", StepKind::Retriable, unlimited_policy()),
        ],
        deadline: None,
        secret_input: Vec::new(),
    }
}

/// [`order_spec`] with a 2 s deadline, as `place_order_with_deadline` v1.
pub fn order_spec_with_deadline() -> SagaSpec {
    SagaSpec {
        name: "place_order_with_deadline".into(),
        deadline: Some(Duration::from_millis(DEADLINE_MS as u64)),
        ..order_spec()
    }
}

/// The input every scenario starts with.
pub fn order_input() -> Value {
    json!({ "order_id": "order-1", "sku": "sku-42", "quantity": 2, "amount_cents": 4_200 })
}

// ----- script helpers -----

/// The output the scripted worker returns for a step of [`order_spec`].
pub fn output(step: usize) -> Value {
    match step {
        RESERVE => json!({ "reservation_id": "res-1" }),
        AUTHORIZE => json!({ "authorization_id": "auth-1" }),
        CAPTURE => json!({ "capture_id": "cap-1" }),
        SHIP => json!({ "tracking_number": "trk-1" }),
        _ => json!({ "step": step }),
    }
}

fn reply(
    step: usize,
    direction: Direction,
    attempt: u32,
    result: Result<Value, StepError>,
) -> Event {
    Event::Reply(Reply {
        step,
        direction,
        attempt,
        result,
        worker: WORKER.into(),
    })
}

/// A forward attempt succeeded with the step's usual [`output`].
pub fn ok(step: usize, attempt: u32) -> Event {
    reply(step, Direction::Forward, attempt, Ok(output(step)))
}

/// A forward attempt failed.
pub fn failed(step: usize, attempt: u32, error: StepError) -> Event {
    reply(step, Direction::Forward, attempt, Err(error))
}

/// A compensation attempt succeeded.
pub fn compensated(step: usize, attempt: u32) -> Event {
    reply(step, Direction::Compensate, attempt, Ok(Value::Null))
}

/// A compensation attempt failed.
pub fn compensation_failed(step: usize, attempt: u32, error: StepError) -> Event {
    reply(step, Direction::Compensate, attempt, Err(error))
}

/// A durable timer fell due.
pub fn timer() -> Event {
    Event::TimerFired
}

/// An operator action by [`OPERATOR`].
pub fn operator(action: OperatorAction, reason: &str) -> Event {
    Event::Operator(OperatorCommand {
        actor: OPERATOR.into(),
        reason: reason.into(),
        action,
    })
}

/// Skip `step` (by name) with an optional output.
pub fn skip(step: &str, output: Option<Value>) -> OperatorAction {
    OperatorAction::SkipStep {
        step: step.into(),
        output,
    }
}

/// A transient failure: retried by the policy.
pub fn busy() -> StepError {
    StepError::retryable("busy", "the service answered 503")
}

/// A permanent failure.
pub fn declined() -> StepError {
    StepError::permanent("declined", "the request was refused for good")
}

/// A failure its handler calls retryable but whose code the policy never retries.
pub fn invalid_request() -> StepError {
    StepError::retryable("invalid_request", "the request was rejected as malformed")
}

/// Start at 0, then steps `0..n` succeed on their first attempt at 10, 20, ... ms.
fn succeed_through(n: usize) -> Vec<(i64, Event)> {
    let mut script = vec![(0, Event::Start)];
    for k in 0..n {
        script.push((10 * (k as i64 + 1), ok(k, 1)));
    }
    script
}

fn scenario(
    name: &'static str,
    description: &str,
    spec: SagaSpec,
    script: Vec<(i64, Event)>,
    expected_status: SagaStatus,
) -> Scenario {
    Scenario {
        name,
        description: description.to_string(),
        spec,
        input: order_input(),
        script,
        expected_status,
    }
}

fn with(mut script: Vec<(i64, Event)>, more: Vec<(i64, Event)>) -> Vec<(i64, Event)> {
    script.extend(more);
    script
}

// ----- the scenarios -----

/// Every scenario, in a stable order, names unique.
pub fn all() -> Vec<Scenario> {
    // Not grouped by theme: the store-level replay gives each scenario a saga id from its
    // position here, so the order is kept as it was and new scenarios go at the end.
    let mut all = vec![happy_path::happy_path()];
    all.extend(forward_failures::permanent_failure_at_each_step());
    all.extend([
        forward_failures::retry_then_success(),
        forward_failures::attempts_exhausted_compensates(),
        forward_failures::non_retryable_code_compensates(),
        forward_failures::permanent_error_after_a_retry(),
        timeouts::attempt_timeout_then_retry(),
        compensation::compensation_retried_then_succeeded(),
        compensation::compensation_exhausted_stuck(),
        retriable_step::retriable_step_retried_until_success(),
        retriable_step::retriable_step_fails_permanently_stuck(),
        stray_messages::duplicate_reply_ignored(),
        stray_messages::late_reply_for_earlier_attempt(),
        timeouts::timeout_on_last_attempt_compensates_the_step(),
        timeouts::pivot_outcome_unknown_stuck(),
        deadlines::deadline_before_pivot_compensates(),
        deadlines::deadline_during_backoff(),
        deadlines::deadline_while_pivot_in_flight(),
        deadlines::deadline_then_operator_resumes_pivot(),
        timeouts::timeout_then_retryable_failures_compensates_the_step(),
        timeouts::early_timer_changes_nothing(),
        stray_messages::rejected_message_is_recorded(),
        stray_messages::stale_epoch_refusal_keeps_the_attempt_in_flight(),
        stray_messages::reply_for_finished_saga(),
        stray_messages::reply_for_unknown_step_or_attempt(),
        operator_actions::operator_resume_stuck_compensation(),
        operator_actions::operator_resume_stuck_retriable_step(),
        operator_actions::operator_retry_now_during_backoff(),
        operator_actions::operator_skip_stuck_forward_step(),
        operator_actions::operator_skip_stuck_pivot(),
        operator_actions::operator_skip_stuck_compensation(),
        operator_actions::operator_cancel_running(),
        operator_actions::operator_cancel_stuck_pivot(),
        refusals::refused_second_start(),
        refusals::refused_resume_of_completed(),
        refusals::refused_resume_of_running(),
        refusals::refused_cancel_after_pivot(),
        refusals::refused_cancel_while_compensating(),
        refusals::refused_skip_of_unknown_step(),
        refusals::refused_skip_of_step_not_current(),
        refusals::refused_skip_forward_without_output(),
        refusals::refused_retry_now_without_backoff(),
    ]);
    all
}
