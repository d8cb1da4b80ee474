//! The machine's invariants, asserted by [`Checker`] event by event and by `check_state` on
//! every state.

use super::*;

/// Follows one saga event by event and asserts the machine's invariants.
pub(super) struct Checker<'a> {
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
    pub(super) fn new(spec: &'a SagaSpec, ctx: impl Into<String>) -> Self {
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

    pub(super) fn observe(
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
