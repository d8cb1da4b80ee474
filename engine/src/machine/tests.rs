//! The state machine's tests: one snapshot per scenario of `scenarios.rs`, invariants checked in
//! code over every scenario, and a seeded random walk over several definitions that checks the
//! same invariants (and a few more) after every event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sagaflow_protocol::backoff::{ExactDelays, RetryDelays};
use sagaflow_protocol::{
    Direction, RetryPolicy, SagaSpec, StepError, StepKind, StepSpec, Timestamp, idempotency_key,
};
use serde_json::{Value, json};

use super::scenarios::{self, SAGA_ID, START, Scenario, Trace};
use super::*;

// ----- invariants -----

/// Follows one saga event by event and asserts the machine's invariants.
struct Checker<'a> {
    spec: &'a SagaSpec,
    /// Names the run in failure messages (scenario name, or spec and seed).
    ctx: String,
    /// A `saga_completed` or `saga_compensated` record was seen.
    terminal_seen: bool,
    /// The latest attempt number dispatched per step and direction.
    last_attempt: HashMap<(usize, Direction), u32>,
    /// Attempts that got their outcome (a reply applied, or a timeout).
    resolved: BTreeSet<(usize, Direction, u32)>,
    /// Attempts that timed out: whether they applied is unknown.
    timed_out: BTreeSet<(usize, Direction, u32)>,
    /// The event being observed is an operator's action.
    by_operator: bool,
    /// Steps whose forward action completed (succeeded or skipped), in order.
    forward_done: Vec<usize>,
    /// Steps compensated (succeeded or skipped), in order.
    compensated: Vec<usize>,
    /// Compensatable steps that had completed when compensation began.
    must_compensate: Vec<usize>,
    pivot_passed: bool,
    compensation_started: bool,
    completed: bool,
}

impl<'a> Checker<'a> {
    fn new(spec: &'a SagaSpec, ctx: impl Into<String>) -> Self {
        Checker {
            spec,
            ctx: ctx.into(),
            terminal_seen: false,
            last_attempt: HashMap::new(),
            resolved: BTreeSet::new(),
            timed_out: BTreeSet::new(),
            by_operator: false,
            forward_done: Vec::new(),
            compensated: Vec::new(),
            must_compensate: Vec::new(),
            pivot_passed: false,
            compensation_started: false,
            completed: false,
        }
    }

    fn kind(&self, step: usize) -> StepKind {
        self.spec.steps[step].kind
    }

    fn observe(
        &mut self,
        before: &SagaState,
        event: &Event,
        now: Timestamp,
        result: &Result<Transition, MachineError>,
    ) {
        let ctx = self.ctx.clone();
        let t = match result {
            Err(error) => {
                // Only a second start and operator actions can be refused.
                match event {
                    Event::Start => assert_ne!(before.status, SagaStatus::Created, "{ctx}"),
                    Event::Operator(_) => {}
                    other => panic!("{ctx}: {other:?} refused: {error}"),
                }
                return;
            }
            Ok(t) => t,
        };
        let ctx = format!("{ctx}: after {event:?} at {}", now.0 - START.0);
        check_state(self.spec, &t.state, &ctx);

        // Per event kind.
        match event {
            Event::Start => assert_eq!(t.history[0].kind, RecordKind::SagaStarted, "{ctx}"),
            Event::Reply(reply) => {
                let first = t.history.first().map(|r| r.kind);
                match first {
                    Some(RecordKind::ReplyIgnored) => {
                        assert_eq!(t.history.len(), 1, "{ctx}: an ignored reply changed more");
                        assert!(t.commands.is_empty(), "{ctx}: an ignored reply commanded");
                        assert_eq!(
                            &t.state, before,
                            "{ctx}: an ignored reply changed the state"
                        );
                    }
                    Some(RecordKind::AttemptSucceeded | RecordKind::AttemptFailed) => {
                        let awaited = matches!(
                            before.activity,
                            Activity::InFlight { step, direction, attempt, .. }
                                if step == reply.step
                                    && direction == reply.direction
                                    && attempt == reply.attempt
                        );
                        assert!(awaited, "{ctx}: applied a reply that was not awaited");
                    }
                    other => panic!("{ctx}: a reply produced {other:?} first"),
                }
            }
            Event::TimerFired => {
                let due = matches!(
                    before.status,
                    SagaStatus::Running | SagaStatus::Compensating
                ) && before.wake_at().is_some_and(|w| w <= now);
                if due {
                    assert!(!t.history.is_empty(), "{ctx}: a due wake did nothing");
                } else {
                    assert_eq!(&t.state, before, "{ctx}: an early wake changed the state");
                    assert!(t.history.is_empty(), "{ctx}: an early wake recorded");
                    assert!(t.commands.is_empty(), "{ctx}: an early wake commanded");
                }
            }
            Event::Operator(command) => {
                let first = &t.history[0];
                assert_eq!(first.kind, RecordKind::OperatorAction, "{ctx}");
                assert_eq!(first.actor, Actor::Operator(command.actor.clone()), "{ctx}");
            }
            Event::Rejected { .. } => {
                assert_eq!(t.history.len(), 1, "{ctx}: a rejection records one line");
                assert_eq!(t.history[0].kind, RecordKind::MessageRejected, "{ctx}");
                assert!(t.commands.is_empty(), "{ctx}: a rejection commanded");
                assert_eq!(&t.state, before, "{ctx}: a rejection changed the state");
            }
        }

        // A wake is scheduled exactly when the wake time moved to a new instant.
        let (wake_before, wake_after) = (before.wake_at(), t.state.wake_at());
        let wakes: Vec<Timestamp> = t
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::ScheduleWake { at } => Some(*at),
                _ => None,
            })
            .collect();
        match wake_after.filter(|_| wake_after != wake_before) {
            Some(at) => assert_eq!(wakes, vec![at], "{ctx}: wake commands"),
            None => assert!(wakes.is_empty(), "{ctx}: wake commands {wakes:?}"),
        }

        // Dispatch commands match the dispatch records, with stable idempotency keys.
        let dispatched: Vec<(String, Direction, u32)> = t
            .history
            .iter()
            .filter(|r| r.kind == RecordKind::AttemptDispatched)
            .map(|r| {
                (
                    r.step.clone().unwrap(),
                    r.direction.unwrap(),
                    r.attempt.unwrap(),
                )
            })
            .collect();
        let commanded: Vec<(String, Direction, u32)> = t
            .commands
            .iter()
            .filter_map(|c| match c {
                Command::Dispatch(d) => {
                    assert_eq!(self.spec.steps[d.step].name, d.step_name, "{ctx}");
                    assert_eq!(
                        d.idempotency_key,
                        idempotency_key(SAGA_ID, &d.step_name, d.direction),
                        "{ctx}"
                    );
                    assert_eq!(
                        d.forward_key,
                        idempotency_key(SAGA_ID, &d.step_name, Direction::Forward),
                        "{ctx}"
                    );
                    Some((d.step_name.clone(), d.direction, d.attempt))
                }
                _ => None,
            })
            .collect();
        assert_eq!(dispatched, commanded, "{ctx}: dispatch commands vs records");
        let finishes = t
            .commands
            .iter()
            .filter(|c| matches!(c, Command::Finish { .. }))
            .count();
        let terminal_records = t
            .history
            .iter()
            .filter(|r| {
                matches!(
                    r.kind,
                    RecordKind::SagaCompleted | RecordKind::SagaCompensated
                )
            })
            .count();
        assert_eq!(finishes, terminal_records, "{ctx}: finish commands");

        self.by_operator = matches!(event, Event::Operator(_));
        for record in &t.history {
            self.record(record, &ctx);
        }

        // The state agrees with the history so far.
        for (i, step) in t.state.steps.iter().enumerate() {
            for direction in [Direction::Forward, Direction::Compensate] {
                let made = self.last_attempt.get(&(i, direction)).copied().unwrap_or(0);
                assert_eq!(
                    step.attempts(direction).made,
                    made,
                    "{ctx}: attempts of step {i} {direction}"
                );
            }
        }
        assert_eq!(t.state.past_pivot, self.pivot_passed, "{ctx}: past_pivot");
        if t.state.status == SagaStatus::Compensated {
            for step in &self.must_compensate {
                assert!(
                    self.compensated.contains(step),
                    "{ctx}: step {step} completed before compensation began but was never \
                     compensated"
                );
            }
        }
    }

    fn record(&mut self, r: &Record, ctx: &str) {
        let ctx = format!("{ctx}: record {r:?}");
        if self.terminal_seen {
            assert_eq!(
                r.kind,
                RecordKind::ReplyIgnored,
                "{ctx}: a record after the terminal one"
            );
        }
        let step = r.step.as_deref().and_then(|n| self.spec.step_index(n));
        let key = || (step.unwrap(), r.direction.unwrap());
        match r.kind {
            RecordKind::AttemptDispatched => {
                let (s, d) = key();
                let last = self.last_attempt.get(&(s, d)).copied().unwrap_or(0);
                assert_eq!(r.attempt, Some(last + 1), "{ctx}: attempt numbers");
                self.last_attempt.insert((s, d), last + 1);
                match d {
                    Direction::Forward => {
                        assert!(
                            !self.compensation_started,
                            "{ctx}: forward while compensating"
                        );
                    }
                    Direction::Compensate => {
                        assert_eq!(self.kind(s), StepKind::Compensatable, "{ctx}");
                        assert!(self.compensation_started, "{ctx}: undo before compensation");
                        assert!(!self.pivot_passed, "{ctx}: compensation past the pivot");
                    }
                }
            }
            RecordKind::RetryScheduled | RecordKind::RetryTimerFired => {
                let (s, d) = key();
                let last = self.last_attempt.get(&(s, d)).copied().unwrap_or(0);
                assert_eq!(r.attempt, Some(last + 1), "{ctx}: next attempt number");
            }
            RecordKind::AttemptSucceeded
            | RecordKind::AttemptFailed
            | RecordKind::AttemptTimedOut => {
                let (s, d) = key();
                let attempt = r.attempt.unwrap();
                assert_eq!(
                    self.last_attempt.get(&(s, d)),
                    Some(&attempt),
                    "{ctx}: outcome of an attempt that is not the latest"
                );
                assert!(
                    self.resolved.insert((s, d, attempt)),
                    "{ctx}: an attempt's outcome applied twice"
                );
                if r.kind == RecordKind::AttemptTimedOut {
                    self.timed_out.insert((s, d, attempt));
                }
                if r.kind == RecordKind::AttemptSucceeded {
                    match d {
                        Direction::Forward => self.forward_completed(s, &ctx),
                        Direction::Compensate => self.step_compensated(s, &ctx),
                    }
                }
            }
            RecordKind::MessageRejected => {}
            RecordKind::OperatorAction => {
                if r.detail["action"] == "skip" {
                    let s = step.unwrap();
                    match r.detail["direction"].as_str() {
                        Some("forward") => self.forward_completed(s, &ctx),
                        Some("compensate") => self.step_compensated(s, &ctx),
                        other => panic!("{ctx}: skip direction {other:?}"),
                    }
                }
            }
            RecordKind::CompensationStarted => {
                assert!(!self.pivot_passed, "{ctx}: compensation past the pivot");
                assert!(
                    !self.compensation_started,
                    "{ctx}: compensation began twice"
                );
                assert!(!self.completed, "{ctx}: compensation of a completed saga");
                // The engine never compensates on its own while the pivot may have applied
                // (an operator's cancel may, knowing it did not).
                if !self.by_operator {
                    assert!(
                        !self.pivot_maybe_applied(),
                        "{ctx}: compensation while the pivot's outcome is unknown"
                    );
                }
                self.compensation_started = true;
                self.must_compensate = self
                    .forward_done
                    .iter()
                    .copied()
                    .filter(|&s| self.kind(s) == StepKind::Compensatable)
                    .collect();
                // The plan: latest first, every completed compensatable step in it.
                let planned: Vec<usize> = r.detail["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| self.spec.step_index(n.as_str().unwrap()).unwrap())
                    .collect();
                assert!(
                    planned.windows(2).all(|w| w[0] > w[1]),
                    "{ctx}: plan not in reverse order"
                );
                for s in &self.must_compensate {
                    assert!(planned.contains(s), "{ctx}: step {s} left out of the plan");
                }
                for &s in &planned {
                    assert_eq!(self.kind(s), StepKind::Compensatable, "{ctx}");
                    assert!(
                        self.last_attempt.contains_key(&(s, Direction::Forward)),
                        "{ctx}: planned to undo step {s}, which never ran"
                    );
                }
                assert!(r.error.is_some(), "{ctx}: compensation without a reason");
            }
            RecordKind::SagaCompleted => {
                assert!(
                    !self.compensation_started,
                    "{ctx}: completed and compensated"
                );
                assert_eq!(
                    self.forward_done,
                    (0..self.spec.steps.len()).collect::<Vec<_>>(),
                    "{ctx}: completed without every step"
                );
                self.completed = true;
                self.terminal_seen = true;
            }
            RecordKind::SagaCompensated => {
                assert!(
                    self.compensation_started,
                    "{ctx}: compensated without starting"
                );
                for s in &self.must_compensate {
                    assert!(
                        self.compensated.contains(s),
                        "{ctx}: step {s} not compensated"
                    );
                }
                self.terminal_seen = true;
            }
            RecordKind::DeadlineExceeded => {
                assert!(!self.pivot_passed, "{ctx}: deadline past the pivot");
            }
            RecordKind::SagaStuck => assert!(r.error.is_some(), "{ctx}: stuck without reason"),
            RecordKind::SagaStarted | RecordKind::ReplyIgnored => {}
        }
    }

    /// Whether the pivot's latest attempt may have applied: it is unanswered (in flight or
    /// abandoned) or timed out.
    fn pivot_maybe_applied(&self) -> bool {
        let Some(pivot) = self
            .spec
            .steps
            .iter()
            .position(|s| s.kind == StepKind::Pivot)
        else {
            return false;
        };
        match self.last_attempt.get(&(pivot, Direction::Forward)) {
            Some(&last) => {
                let attempt = (pivot, Direction::Forward, last);
                !self.resolved.contains(&attempt) || self.timed_out.contains(&attempt)
            }
            None => false,
        }
    }

    fn forward_completed(&mut self, step: usize, ctx: &str) {
        assert!(
            self.forward_done.last().is_none_or(|&last| last < step),
            "{ctx}: forward completions out of order: {:?} then {step}",
            self.forward_done
        );
        assert!(
            !self.compensation_started,
            "{ctx}: forward completion while compensating"
        );
        self.forward_done.push(step);
        if self.kind(step) == StepKind::Pivot {
            self.pivot_passed = true;
        }
    }

    fn step_compensated(&mut self, step: usize, ctx: &str) {
        assert_eq!(self.kind(step), StepKind::Compensatable, "{ctx}");
        assert!(
            !self.compensated.contains(&step),
            "{ctx}: step {step} compensated twice"
        );
        // Reverse order of the forward completions: each undo is of an earlier step.
        assert!(
            self.compensated.last().is_none_or(|&last| step < last),
            "{ctx}: compensations out of order: {:?} then {step}",
            self.compensated
        );
        self.compensated.push(step);
    }
}

/// Invariants of a single state.
fn check_state(spec: &SagaSpec, state: &SagaState, ctx: &str) {
    let status = state.status;
    match status {
        SagaStatus::Running | SagaStatus::Compensating => assert_ne!(
            state.activity,
            Activity::Idle,
            "{ctx}: {status:?} but waits for nothing"
        ),
        _ => assert_eq!(state.activity, Activity::Idle, "{ctx}: {status:?} but busy"),
    }
    assert_eq!(
        state.stuck.is_some(),
        status == SagaStatus::Stuck,
        "{ctx}: stuck reason vs status"
    );
    if status.is_terminal() {
        assert_eq!(state.wake_at(), None, "{ctx}: a terminal saga wakes");
        for (i, step) in state.steps.iter().enumerate() {
            assert!(
                !matches!(step.status, StepStatus::Running | StepStatus::Compensating),
                "{ctx}: {status:?} saga with step {i} still {:?}",
                step.status
            );
        }
        assert!(state.compensation_queue.is_empty(), "{ctx}: queue left");
    }
    if status == SagaStatus::Completed {
        assert!(
            state
                .steps
                .iter()
                .all(|s| matches!(s.status, StepStatus::Succeeded | StepStatus::Skipped)),
            "{ctx}: completed with unfinished steps"
        );
    }
    if status == SagaStatus::Compensated {
        for (i, step) in state.steps.iter().enumerate() {
            if spec.steps[i].kind == StepKind::Compensatable {
                assert!(
                    !matches!(step.status, StepStatus::Succeeded | StepStatus::Skipped),
                    "{ctx}: compensated saga left step {i} {:?}",
                    step.status
                );
            }
        }
    }
    if state.past_pivot {
        assert!(
            !matches!(status, SagaStatus::Compensating | SagaStatus::Compensated),
            "{ctx}: compensating past the pivot"
        );
    }
    for &s in &state.compensation_queue {
        assert_eq!(spec.steps[s].kind, StepKind::Compensatable, "{ctx}: queue");
    }
    match state.activity {
        Activity::InFlight {
            step,
            direction,
            attempt,
            ..
        } => {
            assert_eq!(state.steps[step].attempts(direction).made, attempt, "{ctx}");
            assert_eq!(state.steps[step].status, step_status(direction), "{ctx}");
        }
        Activity::BackingOff {
            step,
            direction,
            attempt,
            ..
        } => {
            assert_eq!(
                state.steps[step].attempts(direction).made + 1,
                attempt,
                "{ctx}"
            );
            assert_eq!(state.steps[step].status, step_status(direction), "{ctx}");
        }
        Activity::Idle => {}
    }
}

fn step_status(direction: Direction) -> StepStatus {
    match direction {
        Direction::Forward => StepStatus::Running,
        Direction::Compensate => StepStatus::Compensating,
    }
}

// ----- scenarios -----

#[test]
fn scenario_names_are_unique_and_every_snapshot_has_its_scenario() {
    let all = scenarios::all();
    let names: BTreeSet<&str> = all.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), all.len(), "duplicate scenario names");
    for s in &all {
        assert_eq!(s.script.first(), Some(&(0, Event::Start)), "{}", s.name);
        assert!(
            s.script.windows(2).all(|w| w[0].0 <= w[1].0),
            "{}: script not in time order",
            s.name
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/machine/snapshots");
    let prefix = "sagaflow_engine__machine__tests__";
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries {
            let file = entry.unwrap().file_name().into_string().unwrap();
            if let Some(name) = file
                .strip_prefix(prefix)
                .and_then(|f| f.strip_suffix(".snap"))
            {
                assert!(names.contains(name), "orphan snapshot {file}");
            }
        }
    }
}

#[test]
fn scenario_traces_match_their_snapshots() {
    for scenario in scenarios::all() {
        let trace = scenarios::run(&scenario);
        insta::with_settings!({
            description => scenario.description.clone(),
            omit_expression => true,
        }, {
            insta::assert_yaml_snapshot!(scenario.name, trace);
        });
    }
}

#[test]
fn scenarios_end_as_expected_and_are_reproducible() {
    for scenario in scenarios::all() {
        let trace = scenarios::run(&scenario);
        assert_eq!(
            trace.final_state.status, scenario.expected_status,
            "{}",
            scenario.name
        );
        let again = scenarios::run(&scenario);
        assert_eq!(
            serde_json::to_value(&trace).unwrap(),
            serde_json::to_value(&again).unwrap()
        );
        assert_eq!(trace.final_state, again.final_state);
        let flattened: Vec<Record> = trace
            .entries
            .iter()
            .flat_map(|e| e.history.clone())
            .collect();
        assert_eq!(flattened, trace.history, "{}", scenario.name);
        assert_eq!(trace.entries.len(), scenario.script.len());
    }
}

#[test]
fn scenarios_keep_the_invariants() {
    for scenario in scenarios::all() {
        let spec = &scenario.spec;
        let mut state = scenario.initial_state();
        let mut checker = Checker::new(spec, scenario.name);
        for (at_ms, event) in &scenario.script {
            let now = Scenario::at(*at_ms);
            let before = state.clone();
            let result = decide(
                &before,
                spec,
                event.clone(),
                Inputs {
                    now,
                    delays: &mut ExactDelays,
                },
            );
            checker.observe(&before, event, now, &result);
            if let Ok(t) = result {
                state = t.state;
            }
        }
        assert_eq!(state, scenarios::run(&scenario).final_state);
    }
}

fn trace_of(name: &str) -> Trace {
    let scenario = scenarios::all()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name}"));
    scenarios::run(&scenario)
}

/// Names of the steps compensated (by a worker or an operator's skip), in order.
fn compensation_order(trace: &Trace) -> Vec<String> {
    trace
        .history
        .iter()
        .filter(|r| {
            (r.kind == RecordKind::AttemptSucceeded && r.direction == Some(Direction::Compensate))
                || (r.kind == RecordKind::OperatorAction
                    && r.detail["action"] == "skip"
                    && r.detail["direction"] == "compensate")
        })
        .map(|r| r.step.clone().unwrap())
        .collect()
}

fn ignored_reasons(trace: &Trace) -> Vec<String> {
    trace
        .history
        .iter()
        .filter(|r| r.kind == RecordKind::ReplyIgnored)
        .map(|r| r.detail["reason"].as_str().unwrap().to_string())
        .collect()
}

fn stuck_reason(trace: &Trace) -> String {
    trace.final_state.stuck.as_ref().unwrap().reason.clone()
}

fn count(trace: &Trace, kind: RecordKind) -> usize {
    trace.history.iter().filter(|r| r.kind == kind).count()
}

#[test]
fn compensations_run_in_reverse_order_of_completion() {
    let expected: &[(&str, &[&str])] = &[
        ("happy_path", &[]),
        ("permanent_failure_at_step_0", &[]),
        ("permanent_failure_at_step_1", &["reserve_stock"]),
        (
            "permanent_failure_at_step_2_pivot",
            &["authorize_payment", "reserve_stock"],
        ),
        ("permanent_failure_at_step_3_after_pivot", &[]),
        (
            "attempts_exhausted_compensates",
            &["authorize_payment", "reserve_stock"],
        ),
        (
            "non_retryable_code_compensates",
            &["authorize_payment", "reserve_stock"],
        ),
        (
            "compensation_retried_then_succeeded",
            &["authorize_payment", "reserve_stock"],
        ),
        ("compensation_exhausted_stuck", &[]),
        (
            "timeout_on_last_attempt_compensates_the_step",
            &["authorize_payment", "reserve_stock"],
        ),
        ("pivot_outcome_unknown_stuck", &[]),
        (
            "deadline_before_pivot_compensates",
            &["authorize_payment", "reserve_stock"],
        ),
        (
            "deadline_during_backoff",
            &["authorize_payment", "reserve_stock"],
        ),
        ("retriable_step_retried_until_success", &[]),
        ("retriable_step_fails_permanently_stuck", &[]),
        (
            "operator_resume_stuck_compensation",
            &["authorize_payment", "reserve_stock"],
        ),
        (
            "operator_skip_stuck_compensation",
            &["authorize_payment", "reserve_stock"],
        ),
        (
            "operator_cancel_running",
            &["authorize_payment", "reserve_stock"],
        ),
        (
            "operator_cancel_stuck_pivot",
            &["authorize_payment", "reserve_stock"],
        ),
    ];
    for (name, order) in expected {
        assert_eq!(compensation_order(&trace_of(name)), *order, "{name}");
    }
}

#[test]
fn stuck_sagas_say_why() {
    let reason = stuck_reason(&trace_of("compensation_exhausted_stuck"));
    assert!(
        reason.contains("compensation of step `authorize_payment` gave up after 3 attempts"),
        "{reason}"
    );
    let reason = stuck_reason(&trace_of("permanent_failure_at_step_3_after_pivot"));
    assert!(
        reason.contains("past the pivot") && reason.contains("failed permanently"),
        "{reason}"
    );
    let reason = stuck_reason(&trace_of("pivot_outcome_unknown_stuck"));
    assert!(
        reason.contains("pivot `capture_payment`") && reason.contains("unknown"),
        "{reason}"
    );
    let trace = trace_of("deadline_while_pivot_in_flight");
    let stuck = trace
        .history
        .iter()
        .find(|r| r.kind == RecordKind::SagaStuck)
        .unwrap();
    assert!(
        stuck
            .error
            .as_deref()
            .unwrap()
            .contains("deadline passed while the outcome of pivot"),
        "{stuck:?}"
    );
    assert_eq!(count(&trace, RecordKind::CompensationStarted), 0);
    let trace = trace_of("retriable_step_fails_permanently_stuck");
    assert_eq!(count(&trace, RecordKind::CompensationStarted), 0);
}

#[test]
fn duplicate_and_late_replies_are_recorded_and_ignored() {
    let trace = trace_of("duplicate_reply_ignored");
    let reasons = ignored_reasons(&trace);
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons.iter().all(|r| r.starts_with("duplicate")),
        "{reasons:?}"
    );
    // One retry scheduled for authorize_payment, not two.
    assert_eq!(count(&trace, RecordKind::RetryScheduled), 1);

    let trace = trace_of("late_reply_for_earlier_attempt");
    assert_eq!(
        ignored_reasons(&trace),
        vec![
            "late: this attempt had already timed out",
            "late: attempt 1 was superseded by attempt 2",
        ]
    );
    assert_eq!(
        trace.final_state.outputs["reserve_stock"],
        json!({ "reservation_id": "res-1" })
    );

    let trace = trace_of("reply_for_finished_saga");
    let reasons = ignored_reasons(&trace);
    assert_eq!(reasons, vec!["the saga is already completed"; 2]);

    let trace = trace_of("reply_for_unknown_step_or_attempt");
    assert_eq!(
        ignored_reasons(&trace),
        vec![
            "the saga has no step number 9",
            "attempt 2 was never dispatched",
            "attempt 1 was never dispatched",
            "attempt 1 was never dispatched",
        ]
    );
}

#[test]
fn an_unknown_outcome_is_compensated_without_an_output() {
    let trace = trace_of("timeout_on_last_attempt_compensates_the_step");
    let state = &trace.final_state;
    assert!(!state.outputs.contains_key("authorize_payment"));
    assert_eq!(
        state.steps[scenarios::AUTHORIZE].status,
        StepStatus::Compensated
    );
    let undo = trace
        .entries
        .iter()
        .flat_map(|e| &e.commands)
        .find_map(|c| match c {
            Command::Dispatch(d) if d.direction == Direction::Compensate => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(undo.step_name, "authorize_payment");
    assert_eq!(
        undo.forward_key,
        idempotency_key(SAGA_ID, "authorize_payment", Direction::Forward)
    );
}

#[test]
fn operator_resume_gets_a_fresh_budget_and_attempt_numbers_keep_counting() {
    let trace = trace_of("operator_resume_stuck_compensation");
    let undo_attempts: Vec<u32> = trace
        .history
        .iter()
        .filter(|r| {
            r.kind == RecordKind::AttemptDispatched
                && r.step.as_deref() == Some("authorize_payment")
                && r.direction == Some(Direction::Compensate)
        })
        .map(|r| r.attempt.unwrap())
        .collect();
    assert_eq!(undo_attempts, vec![1, 2, 3, 4, 5]);
    // Attempt 4 failed: the retry came after the first-retry delay (fresh round), not stuck.
    let retry = trace
        .history
        .iter()
        .rfind(|r| r.kind == RecordKind::RetryScheduled)
        .unwrap();
    assert_eq!(retry.detail["delay_ms"], 100);
    let op = trace
        .history
        .iter()
        .find(|r| r.kind == RecordKind::OperatorAction)
        .unwrap();
    assert_eq!(op.actor, Actor::Operator(scenarios::OPERATOR.into()));
    assert_eq!(op.detail["reason"], "the payment provider is back");
}

#[test]
fn refusals_leave_the_state_unchanged() {
    let cases = [
        ("refused_second_start", "already started"),
        ("refused_resume_of_completed", "already completed"),
        ("refused_resume_of_running", "not stuck"),
        ("refused_cancel_after_pivot", "past its pivot"),
        (
            "refused_cancel_while_compensating",
            "only a saga moving forward",
        ),
        ("refused_skip_of_unknown_step", "has no step `charge_card`"),
        (
            "refused_skip_of_step_not_current",
            "not the step in progress",
        ),
        ("refused_skip_forward_without_output", "needs the output"),
        ("refused_retry_now_without_backoff", "no retry is waiting"),
    ];
    for (name, why) in cases {
        let trace = trace_of(name);
        let refused: Vec<(usize, &str)> = trace
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.refused.as_deref().map(|r| (i, r)))
            .collect();
        assert_eq!(refused.len(), 1, "{name}: {refused:?}");
        let (i, message) = refused[0];
        assert!(message.contains(why), "{name}: {message}");
        assert_eq!(trace.entries[i].state, trace.entries[i - 1].state, "{name}");
    }
}

#[test]
fn wrong_definition_is_refused() {
    let spec = scenarios::order_spec();
    let state = SagaState::new(SAGA_ID, &spec, json!({}), START);
    let other = SagaSpec { version: 2, ..spec };
    let err = decide(
        &state,
        &other,
        Event::Start,
        Inputs {
            now: START,
            delays: &mut ExactDelays,
        },
    )
    .unwrap_err();
    assert!(matches!(err, MachineError::WrongDefinition { .. }), "{err}");
}

// ----- random walks -----

/// Retry delays drawn from a seeded RNG: sometimes zero, sometimes exact, sometimes anything up
/// to the cap.
struct SeededDelays(StdRng);

impl RetryDelays for SeededDelays {
    fn retry_delay(&mut self, policy: &RetryPolicy, attempts_made: u32) -> Duration {
        match self.0.gen_range(0..4) {
            0 => Duration::ZERO,
            1 => ExactDelays.retry_delay(policy, attempts_made),
            _ => Duration::from_millis(
                self.0
                    .gen_range(0..=policy.max_interval().as_millis() as u64),
            ),
        }
    }
}

fn policy(attempts: Option<u32>) -> RetryPolicy {
    let builder = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(50))
        .max_interval(Duration::from_millis(400))
        .non_retryable("invalid_request");
    match attempts {
        Some(n) => builder.max_attempts(n),
        None => builder.unlimited_attempts(),
    }
    .build()
    .unwrap()
}

fn random_step(
    name: &str,
    kind: StepKind,
    attempts: Option<u32>,
    timeout: Option<u64>,
) -> StepSpec {
    StepSpec {
        name: name.into(),
        kind,
        retry: policy(attempts),
        compensation_retry: policy(Some(2)),
        timeout: timeout.map(Duration::from_millis),
        // The machine never reads the step types.
        input_schema: None,
        output_schema: None,
    }
}

fn random_specs() -> Vec<SagaSpec> {
    vec![
        scenarios::order_spec(),
        scenarios::order_spec_with_deadline(),
        SagaSpec {
            name: "no_pivot".into(),
            version: 1,
            steps: vec![
                random_step("a", StepKind::Compensatable, Some(2), Some(300)),
                random_step("b", StepKind::Compensatable, Some(1), None),
                random_step("c", StepKind::Compensatable, Some(3), Some(200)),
            ],
            deadline: Some(Duration::from_millis(1_500)),
        },
        SagaSpec {
            name: "pivot_first".into(),
            version: 3,
            steps: vec![
                random_step("go", StepKind::Pivot, Some(1), Some(300)),
                random_step("then", StepKind::Retriable, Some(3), Some(300)),
                random_step("finally", StepKind::Retriable, None, None),
            ],
            deadline: Some(Duration::from_millis(500)),
        },
        SagaSpec {
            name: "single".into(),
            version: 1,
            steps: vec![random_step(
                "only",
                StepKind::Compensatable,
                Some(2),
                Some(100),
            )],
            deadline: None,
        },
    ]
}

fn random_result(rng: &mut StdRng, direction: Direction) -> Result<Value, StepError> {
    match rng.gen_range(0..10) {
        0..=4 => Ok(match direction {
            Direction::Forward => json!({ "n": rng.gen_range(0..1000) }),
            Direction::Compensate => Value::Null,
        }),
        5..=6 => Err(StepError::retryable("busy", "try later")),
        7 => Err(StepError::retryable("invalid_request", "malformed")),
        _ => Err(StepError::permanent("declined", "no")),
    }
}

fn random_event(
    rng: &mut StdRng,
    spec: &SagaSpec,
    state: &SagaState,
    now: &mut i64,
    sent: &[Reply],
) -> Event {
    let reply = |step, direction, attempt, result| {
        Event::Reply(Reply {
            step,
            direction,
            attempt,
            result,
            worker: "w".into(),
        })
    };
    let roll = rng.gen_range(0..100);
    if roll < 40 {
        if let Activity::InFlight {
            step,
            direction,
            attempt,
            ..
        } = state.activity
        {
            *now += rng.gen_range(0..50);
            return reply(step, direction, attempt, random_result(rng, direction));
        }
    } else if roll < 50 && !sent.is_empty() {
        *now += rng.gen_range(0..50);
        return Event::Reply(sent[rng.gen_range(0..sent.len())].clone());
    } else if roll < 60 {
        *now += rng.gen_range(0..50);
        let step = rng.gen_range(0..=spec.steps.len());
        let direction = if rng.gen_bool(0.5) {
            Direction::Forward
        } else {
            Direction::Compensate
        };
        let made = state
            .steps
            .get(step)
            .map_or(1, |s| s.attempts(direction).made);
        let attempt = rng.gen_range(0..=made + 1);
        return reply(step, direction, attempt, random_result(rng, direction));
    } else if roll < 72 {
        let actor = "op".to_string();
        let action = match rng.gen_range(0..4) {
            0 => OperatorAction::Resume,
            1 => OperatorAction::RetryNow,
            2 => OperatorAction::Cancel,
            _ => {
                let step = match state.current_step() {
                    Some((current, _)) if rng.gen_bool(0.7) => spec.steps[current].name.clone(),
                    _ if rng.gen_bool(0.2) => "nope".into(),
                    _ => spec.steps[rng.gen_range(0..spec.steps.len())].name.clone(),
                };
                let output = rng.gen_bool(0.7).then(|| json!({ "manual": true }));
                OperatorAction::SkipStep { step, output }
            }
        };
        *now += rng.gen_range(0..50);
        return Event::Operator(OperatorCommand {
            actor,
            reason: "random".into(),
            action,
        });
    } else if roll < 74 {
        return Event::Start;
    }
    // A timer: usually when it is due, sometimes early or late.
    match state.wake_at() {
        Some(wake) if rng.gen_bool(0.75) => {
            *now = (*now).max(wake.0 + rng.gen_range(0..3));
        }
        _ => *now += rng.gen_range(0..1_500),
    }
    Event::TimerFired
}

fn random_walk(spec: &SagaSpec, seed: u64) -> SagaStatus {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut delays = SeededDelays(StdRng::seed_from_u64(seed ^ 0x5eed_5eed_5eed_5eed));
    let mut state = SagaState::new(SAGA_ID, spec, json!({ "seed": seed }), START);
    let mut now = START.0;
    let mut checker = Checker::new(spec, format!("spec {} seed {seed}", spec.name));
    let mut sent = Vec::new();
    let length = rng.gen_range(1..160);
    for i in 0..length {
        let event = if i == 0 {
            Event::Start
        } else {
            random_event(&mut rng, spec, &state, &mut now, &sent)
        };
        if let Event::Reply(reply) = &event {
            sent.push(reply.clone());
        }
        let before = state.clone();
        let result = catch_unwind(AssertUnwindSafe(|| {
            decide(
                &before,
                spec,
                event.clone(),
                Inputs {
                    now: Timestamp(now),
                    delays: &mut delays,
                },
            )
        }))
        .unwrap_or_else(|_| {
            panic!(
                "the machine panicked: spec {} seed {seed} event {i} {event:?} on {before:?}",
                spec.name
            )
        });
        checker.observe(&before, &event, Timestamp(now), &result);
        if let Ok(t) = result {
            state = t.state;
        }
    }
    state.status
}

#[test]
fn random_event_sequences_keep_the_invariants() {
    for spec in random_specs() {
        let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
        for seed in 0..3_000 {
            *ends.entry(random_walk(&spec, seed).as_str()).or_default() += 1;
        }
        // The walks reach every kind of end, so the invariants were checked on each.
        for status in ["completed", "compensated", "stuck"] {
            assert!(
                ends.get(status).copied().unwrap_or(0) > 0,
                "spec {}: no walk ended {status}: {ends:?}",
                spec.name
            );
        }
    }
}
