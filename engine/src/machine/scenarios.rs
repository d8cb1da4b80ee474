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
    let mut all = vec![happy_path()];
    all.extend(permanent_failure_at_each_step());
    all.extend([
        retry_then_success(),
        attempts_exhausted_compensates(),
        non_retryable_code_compensates(),
        permanent_error_after_a_retry(),
        attempt_timeout_then_retry(),
        compensation_retried_then_succeeded(),
        compensation_exhausted_stuck(),
        retriable_step_retried_until_success(),
        retriable_step_fails_permanently_stuck(),
        duplicate_reply_ignored(),
        late_reply_for_earlier_attempt(),
        timeout_on_last_attempt_compensates_the_step(),
        pivot_outcome_unknown_stuck(),
        deadline_before_pivot_compensates(),
        deadline_during_backoff(),
        deadline_while_pivot_in_flight(),
        deadline_then_operator_resumes_pivot(),
        timeout_then_retryable_failures_compensates_the_step(),
        early_timer_changes_nothing(),
        rejected_message_is_recorded(),
        reply_for_finished_saga(),
        reply_for_unknown_step_or_attempt(),
        operator_resume_stuck_compensation(),
        operator_resume_stuck_retriable_step(),
        operator_retry_now_during_backoff(),
        operator_skip_stuck_forward_step(),
        operator_skip_stuck_pivot(),
        operator_skip_stuck_compensation(),
        operator_cancel_running(),
        operator_cancel_stuck_pivot(),
        refused_second_start(),
        refused_resume_of_completed(),
        refused_resume_of_running(),
        refused_cancel_after_pivot(),
        refused_cancel_while_compensating(),
        refused_skip_of_unknown_step(),
        refused_skip_of_step_not_current(),
        refused_skip_forward_without_output(),
        refused_retry_now_without_backoff(),
    ]);
    all
}

fn happy_path() -> Scenario {
    scenario(
        "happy_path",
        "Every step succeeds on its first attempt: compensatable, compensatable, pivot, retriable.",
        order_spec(),
        succeed_through(4),
        SagaStatus::Completed,
    )
}

/// One scenario per step position: the step fails permanently on its first attempt.
fn permanent_failure_at_each_step() -> Vec<Scenario> {
    const NAMES: [&str; 4] = [
        "permanent_failure_at_step_0",
        "permanent_failure_at_step_1",
        "permanent_failure_at_step_2_pivot",
        "permanent_failure_at_step_3_after_pivot",
    ];
    (0..4)
        .map(|position| {
            let mut script = succeed_through(position);
            let mut t = 10 * (position as i64 + 1);
            script.push((t, failed(position, 1, declined())));
            // Completed compensatable steps are undone latest first (the pivot and the
            // retriable step never are).
            let undone = if position <= CAPTURE { position } else { 0 };
            for undo in (0..undone).rev() {
                t += 10;
                script.push((t, compensated(undo, 1)));
            }
            let (description, expected) = match position {
                0 => (
                    "The first step fails permanently: nothing completed, so nothing is \
                     compensated and the saga is compensated at once.",
                    SagaStatus::Compensated,
                ),
                1 => (
                    "The second step fails permanently: the first is compensated.",
                    SagaStatus::Compensated,
                ),
                2 => (
                    "The pivot fails permanently (its outcome is known: it did not apply): both \
                     compensatable steps are compensated in reverse order, the pivot is not.",
                    SagaStatus::Compensated,
                ),
                _ => (
                    "The retriable step after the pivot fails permanently: the saga is stuck \
                     with the reason and nothing is ever compensated.",
                    SagaStatus::Stuck,
                ),
            };
            scenario(NAMES[position], description, order_spec(), script, expected)
        })
        .collect()
}

fn retry_then_success() -> Scenario {
    scenario(
        "retry_then_success",
        "authorize_payment fails with a retryable error, is retried 100 ms later and succeeds; \
         the saga completes.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, ok(AUTHORIZE, 2)),
                (140, ok(CAPTURE, 1)),
                (150, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn attempts_exhausted_compensates() -> Scenario {
    scenario(
        "attempts_exhausted_compensates",
        "authorize_payment fails with a retryable error on all 3 attempts (retries after 100 then \
         200 ms); the policy runs out. A retryable error does not promise that nothing was \
         applied, so authorize_payment is compensated (without an output), then reserve_stock.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, failed(AUTHORIZE, 2, busy())),
                (330, timer()),
                (340, failed(AUTHORIZE, 3, busy())),
                (350, compensated(AUTHORIZE, 1)),
                (360, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn non_retryable_code_compensates() -> Scenario {
    scenario(
        "non_retryable_code_compensates",
        "authorize_payment fails with a retryable-class error whose code (`invalid_request`) the \
         policy lists as non-retryable: no retry. The handler did not call it permanent, so it \
         may have applied: authorize_payment is compensated, then reserve_stock.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, invalid_request())),
                (30, compensated(AUTHORIZE, 1)),
                (40, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn permanent_error_after_a_retry() -> Scenario {
    scenario(
        "permanent_error_after_a_retry",
        "authorize_payment fails retryably, then permanently on attempt 2 with budget left: no \
         third attempt, reserve_stock is compensated.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, failed(AUTHORIZE, 2, declined())),
                (140, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn attempt_timeout_then_retry() -> Scenario {
    scenario(
        "attempt_timeout_then_retry",
        "reserve_stock's first attempt gets no reply within its 1 s timeout: the timer records \
         the timeout, the retry timer dispatches attempt 2, which succeeds.",
        order_spec(),
        vec![
            (0, Event::Start),
            (1_000, timer()),
            (1_100, timer()),
            (1_110, ok(RESERVE, 2)),
            (1_120, ok(AUTHORIZE, 1)),
            (1_130, ok(CAPTURE, 1)),
            (1_140, ok(SHIP, 1)),
        ],
        SagaStatus::Completed,
    )
}

/// Start, reserve and authorize succeed, capture fails permanently: compensation of
/// authorize_payment (attempt 1) is dispatched at 30.
fn pivot_declined() -> Vec<(i64, Event)> {
    with(
        succeed_through(2),
        vec![(30, failed(CAPTURE, 1, declined()))],
    )
}

fn compensation_retried_then_succeeded() -> Scenario {
    scenario(
        "compensation_retried_then_succeeded",
        "The pivot fails permanently; authorize_payment's compensation fails once, is retried \
         and succeeds; then reserve_stock is compensated.",
        order_spec(),
        with(
            pivot_declined(),
            vec![
                (40, compensation_failed(AUTHORIZE, 1, busy())),
                (140, timer()),
                (150, compensated(AUTHORIZE, 2)),
                (160, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

/// The pivot fails permanently and authorize_payment's compensation fails 3 times: stuck at 360.
fn compensation_stuck() -> Vec<(i64, Event)> {
    with(
        pivot_declined(),
        vec![
            (40, compensation_failed(AUTHORIZE, 1, busy())),
            (140, timer()),
            (150, compensation_failed(AUTHORIZE, 2, busy())),
            (350, timer()),
            (360, compensation_failed(AUTHORIZE, 3, busy())),
        ],
    )
}

fn compensation_exhausted_stuck() -> Scenario {
    scenario(
        "compensation_exhausted_stuck",
        "authorize_payment's compensation fails on all 3 attempts: the saga is stuck with the \
         reason, reserve_stock still waits to be compensated, and a later wake changes nothing.",
        order_spec(),
        with(compensation_stuck(), vec![(5_000, timer())]),
        SagaStatus::Stuck,
    )
}

fn retriable_step_retried_until_success() -> Scenario {
    scenario(
        "retriable_step_retried_until_success",
        "After the pivot, ship_order fails retryably 5 times (delays 100, 200, 400, 800, then \
         capped at 1000 ms; its policy has no attempt limit) and succeeds on attempt 6. Nothing \
         is compensated.",
        order_spec(),
        with(
            succeed_through(3),
            vec![
                (40, failed(SHIP, 1, busy())),
                (140, timer()),
                (150, failed(SHIP, 2, busy())),
                (350, timer()),
                (360, failed(SHIP, 3, busy())),
                (760, timer()),
                (770, failed(SHIP, 4, busy())),
                (1_570, timer()),
                (1_580, failed(SHIP, 5, busy())),
                (2_580, timer()),
                (2_590, ok(SHIP, 6)),
            ],
        ),
        SagaStatus::Completed,
    )
}

/// Past the pivot, ship_order fails retryably once, then permanently: stuck at 150.
fn retriable_stuck() -> Vec<(i64, Event)> {
    with(
        succeed_through(3),
        vec![
            (40, failed(SHIP, 1, busy())),
            (140, timer()),
            (150, failed(SHIP, 2, declined())),
        ],
    )
}

fn retriable_step_fails_permanently_stuck() -> Scenario {
    scenario(
        "retriable_step_fails_permanently_stuck",
        "After the pivot, ship_order fails retryably, then permanently: the saga is stuck, \
         never compensated; a later wake changes nothing.",
        order_spec(),
        with(retriable_stuck(), vec![(2_000, timer())]),
        SagaStatus::Stuck,
    )
}

fn duplicate_reply_ignored() -> Scenario {
    scenario(
        "duplicate_reply_ignored",
        "reserve_stock's success is delivered twice and authorize_payment's failure is delivered \
         twice: each second copy is recorded as ignored (duplicate) and applied nowhere (one \
         dispatch of authorize_payment, one retry scheduled).",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (15, ok(RESERVE, 1)),
                (20, failed(AUTHORIZE, 1, busy())),
                (25, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, ok(AUTHORIZE, 2)),
                (140, ok(CAPTURE, 1)),
                (150, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn late_reply_for_earlier_attempt() -> Scenario {
    let late = |at| {
        (
            at,
            reply(
                RESERVE,
                Direction::Forward,
                1,
                Ok(json!({ "reservation_id": "res-from-attempt-1" })),
            ),
        )
    };
    scenario(
        "late_reply_for_earlier_attempt",
        "reserve_stock's attempt 1 times out; its reply arrives during the backoff (ignored: \
         already timed out) and again after attempt 2 was dispatched (ignored: superseded). \
         Attempt 2's reply applies, and its output is the one recorded.",
        order_spec(),
        vec![
            (0, Event::Start),
            (1_000, timer()),
            late(1_050),
            (1_100, timer()),
            late(1_150),
            (1_160, ok(RESERVE, 2)),
            (1_170, ok(AUTHORIZE, 1)),
            (1_180, ok(CAPTURE, 1)),
            (1_190, ok(SHIP, 1)),
        ],
        SagaStatus::Completed,
    )
}

/// After reserve_stock, step `step` (dispatched at 10) times out on its 3 attempts: timers at
/// 1010 (timeout), 1110 (retry), 2110 (timeout), 2310 (retry), 3310 (last timeout).
fn times_out_three_times(prefix: Vec<(i64, Event)>, dispatched_at: i64) -> Vec<(i64, Event)> {
    let t = dispatched_at;
    with(
        prefix,
        vec![
            (t + 1_000, timer()),
            (t + 1_100, timer()),
            (t + 2_100, timer()),
            (t + 2_300, timer()),
            (t + 3_300, timer()),
        ],
    )
}

fn timeout_on_last_attempt_compensates_the_step() -> Scenario {
    scenario(
        "timeout_on_last_attempt_compensates_the_step",
        "authorize_payment times out on all 3 attempts: whether it applied is unknown, so it is \
         compensated too (first, without an output, its compensation carrying the forward key), \
         then reserve_stock.",
        order_spec(),
        with(
            times_out_three_times(succeed_through(1), 10),
            vec![
                (3_320, compensated(AUTHORIZE, 1)),
                (3_330, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

/// The pivot (dispatched at 20) times out on its 3 attempts: stuck at 3320.
fn pivot_unknown() -> Vec<(i64, Event)> {
    times_out_three_times(succeed_through(2), 20)
}

fn pivot_outcome_unknown_stuck() -> Scenario {
    scenario(
        "pivot_outcome_unknown_stuck",
        "capture_payment (the pivot) times out on all 3 attempts: whether it applied is unknown, \
         so the saga is stuck (not compensated) until an operator skips or cancels it.",
        order_spec(),
        pivot_unknown(),
        SagaStatus::Stuck,
    )
}

fn deadline_before_pivot_compensates() -> Scenario {
    scenario(
        "deadline_before_pivot_compensates",
        "With a 2 s deadline: authorize_payment times out once and its attempt 2 is in flight \
         when the deadline passes. The attempt is abandoned and, having maybe applied, \
         compensated first; its late reply is ignored; then reserve_stock is compensated.",
        order_spec_with_deadline(),
        with(
            succeed_through(1),
            vec![
                (1_010, timer()),
                (1_110, timer()),
                (2_000, timer()),
                (2_050, ok(AUTHORIZE, 2)),
                (2_060, compensated(AUTHORIZE, 1)),
                (2_070, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn deadline_during_backoff() -> Scenario {
    scenario(
        "deadline_during_backoff",
        "With a 2 s deadline: authorize_payment fails retryably and its retry falls due at the \
         deadline itself. The deadline wins; the retryable failure did not settle whether \
         authorize_payment applied, so it is compensated, then reserve_stock.",
        order_spec_with_deadline(),
        with(
            succeed_through(1),
            vec![
                (1_900, failed(AUTHORIZE, 1, busy())),
                (2_000, timer()),
                (2_010, compensated(AUTHORIZE, 1)),
                (2_020, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn deadline_while_pivot_in_flight() -> Scenario {
    scenario(
        "deadline_while_pivot_in_flight",
        "With a 2 s deadline: the pivot times out once and its attempt 2 is in flight when the \
         deadline passes. The pivot may have applied, so nothing is compensated: the saga is \
         stuck. The attempt's late success is recorded and ignored; an operator who sees it \
         skips the pivot with its output and the saga ships.",
        order_spec_with_deadline(),
        with(
            succeed_through(2),
            vec![
                (1_020, timer()),
                (1_120, timer()),
                (2_000, timer()),
                (2_050, ok(CAPTURE, 2)),
                (
                    3_000,
                    operator(
                        skip("capture_payment", Some(json!({ "capture_id": "cap-1" }))),
                        "attempt 2 captured, see its ignored reply",
                    ),
                ),
                (3_010, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn deadline_then_operator_resumes_pivot() -> Scenario {
    scenario(
        "deadline_then_operator_resumes_pivot",
        "As deadline_while_pivot_in_flight, but the operator resumes the stuck pivot instead of \
         skipping it. The deadline has fired once and stays disarmed: a timer right after the \
         resume changes nothing, attempt 3 succeeds and the saga ships.",
        order_spec_with_deadline(),
        with(
            succeed_through(2),
            vec![
                (1_020, timer()),
                (1_120, timer()),
                (2_000, timer()),
                (
                    3_000,
                    operator(
                        OperatorAction::Resume,
                        "payment provider confirms no capture yet",
                    ),
                ),
                (3_005, timer()),
                (3_010, ok(CAPTURE, 3)),
                (3_020, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn timeout_then_retryable_failures_compensates_the_step() -> Scenario {
    scenario(
        "timeout_then_retryable_failures_compensates_the_step",
        "authorize_payment's attempt 1 times out, attempts 2 and 3 fail with retryable errors and \
         the policy runs out. Attempt 1 may have applied and no answer settled it, so \
         authorize_payment is compensated too (without an output), then reserve_stock.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (1_010, timer()),
                (1_110, timer()),
                (1_120, failed(AUTHORIZE, 2, busy())),
                (1_320, timer()),
                (1_330, failed(AUTHORIZE, 3, busy())),
                (1_340, compensated(AUTHORIZE, 1)),
                (1_350, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn rejected_message_is_recorded() -> Scenario {
    scenario(
        "rejected_message_is_recorded",
        "A malformed reply naming this saga arrives: it is recorded as message_rejected and \
         changes nothing; the saga goes on and completes.",
        order_spec(),
        with(
            vec![
                (0, Event::Start),
                (
                    5,
                    Event::Rejected {
                        source: "sagaflow.reply.place_order".into(),
                        reason: "malformed reply: missing field `attempt`".into(),
                    },
                ),
            ],
            succeed_through(4).into_iter().skip(1).collect(),
        ),
        SagaStatus::Completed,
    )
}

fn early_timer_changes_nothing() -> Scenario {
    scenario(
        "early_timer_changes_nothing",
        "Wakes with nothing due (before an attempt's timeout, before a retry, and a repeated \
         wake) record nothing, emit nothing and change nothing.",
        order_spec(),
        vec![
            (0, Event::Start),
            (500, timer()),
            (510, ok(RESERVE, 1)),
            (520, failed(AUTHORIZE, 1, busy())),
            (600, timer()),
            (620, timer()),
            (620, timer()),
            (630, ok(AUTHORIZE, 2)),
            (640, ok(CAPTURE, 1)),
            (650, ok(SHIP, 1)),
        ],
        SagaStatus::Completed,
    )
}

fn reply_for_finished_saga() -> Scenario {
    scenario(
        "reply_for_finished_saga",
        "After the saga completed: a redelivered success, a stray failure and a wake are \
         recorded as ignored (the replies) or change nothing (the wake).",
        order_spec(),
        with(
            succeed_through(4),
            vec![
                (100, ok(SHIP, 1)),
                (110, failed(RESERVE, 1, busy())),
                (120, timer()),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn reply_for_unknown_step_or_attempt() -> Scenario {
    scenario(
        "reply_for_unknown_step_or_attempt",
        "Replies naming a step number the saga does not have, an attempt never dispatched, and a \
         compensation never dispatched are recorded as ignored; the real reply then applies.",
        order_spec(),
        with(
            vec![
                (0, Event::Start),
                (5, ok(9, 1)),
                (6, ok(RESERVE, 2)),
                (7, compensated(RESERVE, 1)),
                (8, ok(AUTHORIZE, 1)),
            ],
            vec![
                (10, ok(RESERVE, 1)),
                (20, ok(AUTHORIZE, 1)),
                (30, ok(CAPTURE, 1)),
                (40, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn operator_resume_stuck_compensation() -> Scenario {
    scenario(
        "operator_resume_stuck_compensation",
        "The compensation of authorize_payment is stuck after 3 attempts; an operator resumes \
         it: a fresh budget (attempt 4 fails and is retried after the first-retry delay), \
         attempt numbers keep counting, attempt 5 succeeds, then reserve_stock is compensated.",
        order_spec(),
        with(
            compensation_stuck(),
            vec![
                (
                    5_000,
                    operator(OperatorAction::Resume, "the payment provider is back"),
                ),
                (5_010, compensation_failed(AUTHORIZE, 4, busy())),
                (5_110, timer()),
                (5_120, compensated(AUTHORIZE, 5)),
                (5_130, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn operator_resume_stuck_retriable_step() -> Scenario {
    scenario(
        "operator_resume_stuck_retriable_step",
        "ship_order is stuck after a permanent failure; an operator resumes it and attempt 3 \
         succeeds.",
        order_spec(),
        with(
            retriable_stuck(),
            vec![
                (
                    5_000,
                    operator(OperatorAction::Resume, "the address was corrected"),
                ),
                (5_010, ok(SHIP, 3)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn operator_retry_now_during_backoff() -> Scenario {
    scenario(
        "operator_retry_now_during_backoff",
        "authorize_payment fails and waits 100 ms to retry; an operator retries now (attempt 2 \
         dispatched at once); the original retry timer later finds nothing due.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (50, operator(OperatorAction::RetryNow, "the outage is over")),
                (60, ok(AUTHORIZE, 2)),
                (120, timer()),
                (130, ok(CAPTURE, 1)),
                (140, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn operator_skip_stuck_forward_step() -> Scenario {
    scenario(
        "operator_skip_stuck_forward_step",
        "ship_order is stuck after a permanent failure; an operator shipped by hand and skips \
         it with its output: the saga completes.",
        order_spec(),
        with(
            retriable_stuck(),
            vec![(
                5_000,
                operator(
                    skip(
                        "ship_order",
                        Some(json!({ "tracking_number": "trk-manual" })),
                    ),
                    "shipped by hand from the back office",
                ),
            )],
        ),
        SagaStatus::Completed,
    )
}

fn operator_skip_stuck_pivot() -> Scenario {
    scenario(
        "operator_skip_stuck_pivot",
        "The pivot's outcome is unknown (stuck); an operator checked that the capture applied \
         and skips it with its output: the saga is past its pivot and ships.",
        order_spec(),
        with(
            pivot_unknown(),
            vec![
                (
                    4_000,
                    operator(
                        skip(
                            "capture_payment",
                            Some(json!({ "capture_id": "cap-manual" })),
                        ),
                        "the provider shows the capture",
                    ),
                ),
                (4_010, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn operator_skip_stuck_compensation() -> Scenario {
    scenario(
        "operator_skip_stuck_compensation",
        "The compensation of authorize_payment is stuck; an operator voided the authorization \
         by hand and skips the compensation: reserve_stock is compensated next.",
        order_spec(),
        with(
            compensation_stuck(),
            vec![
                (
                    5_000,
                    operator(
                        skip("authorize_payment", None),
                        "voided in the provider console",
                    ),
                ),
                (5_010, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn operator_cancel_running() -> Scenario {
    scenario(
        "operator_cancel_running",
        "An operator cancels while authorize_payment is in flight: that attempt is abandoned \
         and, having maybe applied, compensated first; its late reply is ignored; then \
         reserve_stock is compensated.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (
                    50,
                    operator(OperatorAction::Cancel, "the customer called to cancel"),
                ),
                (60, ok(AUTHORIZE, 1)),
                (70, compensated(AUTHORIZE, 1)),
                (80, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn operator_cancel_stuck_pivot() -> Scenario {
    scenario(
        "operator_cancel_stuck_pivot",
        "The pivot's outcome is unknown (stuck); an operator checked that the capture did not \
         apply and cancels: the pivot is marked failed (not compensated) and both compensatable \
         steps are compensated.",
        order_spec(),
        with(
            pivot_unknown(),
            vec![
                (
                    4_000,
                    operator(OperatorAction::Cancel, "the provider has no such capture"),
                ),
                (4_010, compensated(AUTHORIZE, 1)),
                (4_020, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

fn refused_second_start() -> Scenario {
    scenario(
        "refused_second_start",
        "A second start is refused; the saga goes on.",
        order_spec(),
        vec![(0, Event::Start), (5, Event::Start)],
        SagaStatus::Running,
    )
}

fn refused_resume_of_completed() -> Scenario {
    scenario(
        "refused_resume_of_completed",
        "Resuming a completed saga is refused.",
        order_spec(),
        with(
            succeed_through(4),
            vec![(100, operator(OperatorAction::Resume, "just in case"))],
        ),
        SagaStatus::Completed,
    )
}

fn refused_resume_of_running() -> Scenario {
    scenario(
        "refused_resume_of_running",
        "Resuming a running saga is refused: resume is for stuck sagas.",
        order_spec(),
        vec![
            (0, Event::Start),
            (5, operator(OperatorAction::Resume, "it looks slow")),
        ],
        SagaStatus::Running,
    )
}

fn refused_cancel_after_pivot() -> Scenario {
    scenario(
        "refused_cancel_after_pivot",
        "Cancelling once the pivot succeeded is refused; the saga goes on and completes.",
        order_spec(),
        with(
            succeed_through(3),
            vec![
                (
                    35,
                    operator(OperatorAction::Cancel, "the customer changed their mind"),
                ),
                (40, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

fn refused_cancel_while_compensating() -> Scenario {
    scenario(
        "refused_cancel_while_compensating",
        "Cancelling a saga that is already compensating is refused.",
        order_spec(),
        with(
            pivot_declined(),
            vec![(35, operator(OperatorAction::Cancel, "stop everything"))],
        ),
        SagaStatus::Compensating,
    )
}

fn refused_skip_of_unknown_step() -> Scenario {
    scenario(
        "refused_skip_of_unknown_step",
        "Skipping a step the saga does not have is refused, naming the steps it has.",
        order_spec(),
        vec![
            (0, Event::Start),
            (
                5,
                operator(
                    skip("charge_card", Some(json!({}))),
                    "typo in the step name",
                ),
            ),
        ],
        SagaStatus::Running,
    )
}

fn refused_skip_of_step_not_current() -> Scenario {
    scenario(
        "refused_skip_of_step_not_current",
        "Skipping a step other than the one in progress is refused.",
        order_spec(),
        vec![
            (0, Event::Start),
            (
                5,
                operator(
                    skip("capture_payment", Some(json!({ "capture_id": "cap-x" }))),
                    "skip ahead",
                ),
            ),
        ],
        SagaStatus::Running,
    )
}

fn refused_skip_forward_without_output() -> Scenario {
    scenario(
        "refused_skip_forward_without_output",
        "Skipping a forward step without the output later steps read is refused.",
        order_spec(),
        vec![
            (0, Event::Start),
            (5, operator(skip("reserve_stock", None), "reserved by hand")),
        ],
        SagaStatus::Running,
    )
}

fn refused_retry_now_without_backoff() -> Scenario {
    scenario(
        "refused_retry_now_without_backoff",
        "Retry-now while an attempt is in flight (no retry waiting) is refused.",
        order_spec(),
        vec![
            (0, Event::Start),
            (5, operator(OperatorAction::RetryNow, "hurry up")),
        ],
        SagaStatus::Running,
    )
}
