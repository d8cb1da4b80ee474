//! The saga state machine: a pure function from (state, event, now) to (new state, commands,
//! history records).
//!
//! Nothing here does I/O or reads a clock. The shell hands in `now` and a source of retry delays
//! (where the jitter comes from), then commits the new state with its history in one transaction
//! and carries out the commands afterwards. Because the function is pure, every scenario of the
//! saga model is tested as a trace (see `tests.rs`), and the store runs the same function.
//!
//! The semantics, in short:
//! - steps run in order; a retryable failure is retried by the step's policy, at a durable time;
//! - a permanent failure (or a policy run out) before the pivot compensates every completed
//!   compensatable step in reverse order, plus the failing step when its outcome is unknown
//!   (its last attempt timed out or failed with a retryable error);
//! - a failure after the pivot, a compensation that runs out of attempts, or a pivot whose
//!   outcome is unknown make the saga *stuck*, with the reason, until an operator acts;
//! - replies that do not answer the attempt in flight are recorded and ignored.
//!
//! ## Transitions
//!
//! What [`decide`] does with each event in each status (`docs/architecture.md` has the same
//! table with the rest of the map). A refused event changes nothing and records nothing; the
//! shell reports the refusal to whoever sent it.
//!
//! | Status before | Event | Condition | Status after | Recorded / commanded |
//! | --- | --- | --- | --- | --- |
//! | any | any | the definition is not the pinned name, version and step count | unchanged | refused: `WrongDefinition` |
//! | any | `Rejected` | | unchanged | `message_rejected` |
//! | `created` | `Start` | | `running` | `saga_started`, `attempt_dispatched` of step 0 |
//! | not `created` | `Start` | | unchanged | refused: `AlreadyStarted` |
//! | `created` | `Reply` | | unchanged | `reply_ignored` (never dispatched, or no such step) |
//! | `created` | `TimerFired` | | unchanged | nothing |
//! | `created` | `Cancel` | | `compensated` | `operator_action`, `compensation_started` (empty plan), `saga_compensated` |
//! | `created` | `Resume`, `RetryNow`, `SkipStep` | | unchanged | refused |
//! | `running` | `Reply`, awaited | forward success, more steps | `running` | `attempt_succeeded`, next step's `attempt_dispatched`; a pivot's success sets `past_pivot` |
//! | `running` | `Reply`, awaited | forward success, last step | `completed` | `attempt_succeeded`, `saga_completed` |
//! | `running` | `Reply`, awaited | retryable failure, code retried, budget left | `running` (backing off) | `attempt_failed`, `retry_scheduled` with `at` |
//! | `running` | `Reply`, awaited | final failure of a compensatable step | `compensating` (or `compensated` if nothing to undo) | `attempt_failed`, compensation begins; the failing step is undone first when the error was retryable |
//! | `running` | `Reply`, awaited | final failure of the pivot, permanent error | `compensating` (or `compensated`) | `attempt_failed`, compensation begins; the pivot is not undone |
//! | `running` | `Reply`, awaited | final failure of the pivot, retryable error | `stuck` | `attempt_failed`, `saga_stuck` (outcome unknown) |
//! | `running` | `Reply`, awaited | final failure of a retriable step | `stuck` | `attempt_failed`, `saga_stuck` |
//! | `running` | `Reply`, not awaited | | unchanged | `reply_ignored` with the reason |
//! | `running`, `compensating` | `Reply`, awaited | a `stale_epoch` refusal | unchanged, the attempt still in flight | `reply_ignored` (the shell sends the attempt again under its epoch) |
//! | `running` | `TimerFired` | saga deadline due, not past the pivot, current step is the attempted pivot | `stuck` | `deadline_exceeded`, `saga_stuck`; a pivot attempt in flight is abandoned |
//! | `running` | `TimerFired` | saga deadline due, not past the pivot, otherwise | `compensating` (or `compensated`) | `deadline_exceeded`, compensation begins; the current step is marked failed and undone too if it is compensatable and was attempted |
//! | `running` | `TimerFired` | attempt deadline due | as a retryable `timeout` failure (rows above) | `attempt_timed_out`, then as for a failed reply |
//! | `running` | `TimerFired` | backoff due | `running` | `retry_timer_fired`, `attempt_dispatched` |
//! | `running` | `TimerFired` | nothing due | unchanged | nothing |
//! | `running` | `RetryNow` | backing off | `running` | `operator_action`, `attempt_dispatched` now |
//! | `running` | `RetryNow` | not backing off | unchanged | refused |
//! | `running` | `SkipStep` | the current step, with an output | `running` (or `completed` after the last step) | `operator_action`; step `skipped`, output recorded, an in-flight attempt abandoned; next step dispatched |
//! | `running` | `SkipStep` | another or unknown step, or no output | unchanged | refused |
//! | `running` | `Cancel` | not past the pivot | `compensating` (or `compensated`) | `operator_action`, compensation begins; current step handled as for the deadline |
//! | `running` | `Cancel` | past the pivot | unchanged | refused |
//! | `running` | `Resume` | | unchanged | refused (not stuck) |
//! | `compensating` | `Reply`, awaited | success, more to undo | `compensating` | `attempt_succeeded`, next undo dispatched |
//! | `compensating` | `Reply`, awaited | success, last undo | `compensated` | `attempt_succeeded`, `saga_compensated` |
//! | `compensating` | `Reply`, awaited | retryable failure, code retried, budget left | `compensating` (backing off) | `attempt_failed`, `retry_scheduled` |
//! | `compensating` | `Reply`, awaited | final failure | `stuck` | `attempt_failed`, `saga_stuck` |
//! | `compensating` | `Reply`, not awaited | | unchanged | `reply_ignored` |
//! | `compensating` | `TimerFired` | attempt deadline due | as a retryable `timeout` failure | `attempt_timed_out`, then as for a failed reply |
//! | `compensating` | `TimerFired` | backoff due | `compensating` | `retry_timer_fired`, `attempt_dispatched` |
//! | `compensating` | `TimerFired` | nothing due (the saga deadline is not armed) | unchanged | nothing |
//! | `compensating` | `RetryNow` | backing off | `compensating` | `operator_action`, `attempt_dispatched` |
//! | `compensating` | `SkipStep` | the step being compensated | `compensating` (or `compensated`) | `operator_action`; step `compensated`; next undo dispatched |
//! | `compensating` | `Resume`, `Cancel`, other `SkipStep`, `RetryNow` not backing off | | unchanged | refused |
//! | `stuck` | `Reply` | | unchanged | `reply_ignored` (nothing is in flight) |
//! | `stuck` | `TimerFired` | | unchanged | nothing |
//! | `stuck` | `Resume` | stuck going forward | `running` | `operator_action`, new round with a fresh budget, next attempt number |
//! | `stuck` | `Resume` | stuck compensating | `compensating` | `operator_action`, new round, next attempt number |
//! | `stuck` | `SkipStep` | the stuck forward step, with an output | `running` (or `completed`) | `operator_action`, step `skipped`, next step dispatched |
//! | `stuck` | `SkipStep` | the stuck compensation | `compensating` (or `compensated`) | `operator_action`, step `compensated`, next undo dispatched |
//! | `stuck` | `Cancel` | stuck going forward, not past the pivot (a stuck pivot) | `compensating` (or `compensated`) | `operator_action` with `pivot_outcome_unknown: true`, compensation begins; the pivot is marked failed and not undone |
//! | `stuck` | `Cancel` | stuck compensating, or past the pivot | unchanged | refused |
//! | `stuck` | `RetryNow`, other `SkipStep` | | unchanged | refused |
//! | `completed`, `compensated` | `Reply` | | unchanged | `reply_ignored` ("the saga is already ...") |
//! | `completed`, `compensated` | `TimerFired` | | unchanged | nothing |
//! | `completed`, `compensated` | any operator action | | unchanged | refused ("it is already ...") |

mod event;
mod operator;
mod output;
#[cfg(any(test, feature = "scenarios"))]
pub mod scenarios;
mod state;
#[cfg(test)]
mod tests;

use sagaflow_protocol::backoff::RetryDelays;
use sagaflow_protocol::{Direction, SagaSpec, StepError, StepKind, Timestamp};
use serde_json::{Value, json};
use thiserror::Error;

pub use event::{Event, OperatorAction, OperatorCommand, Reply};
pub use output::{Actor, Command, Dispatch, Record, RecordKind, ReplyIgnoredCause, Transition};
use output::{DUPLICATE_REPLY, FINISHED_SAGA_REPLY, LATE_REPLY, STALE_EPOCH_REPLY};
pub use state::{
    Activity, AttemptOutcome, Attempts, SagaState, SagaStatus, StepState, StepStatus, Stuck,
};

/// What the shell supplies besides the state and the event.
pub struct Inputs<'a> {
    /// The current time.
    pub now: Timestamp,
    /// Where retry delays (and their jitter) come from.
    pub delays: &'a mut dyn RetryDelays,
}

/// An event the machine refuses. The state is unchanged.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MachineError {
    /// `Start` for a saga that already started.
    #[error("saga {0} has already started; a start is applied once")]
    AlreadyStarted(uuid::Uuid),

    /// The definition handed in is not the one the saga is pinned to.
    #[error(
        "saga {saga_id} is pinned to `{pinned}` with {pinned_steps} steps, but was given \
         definition `{given}` with {given_steps}; load the pinned definition version"
    )]
    WrongDefinition {
        /// The saga.
        saga_id: uuid::Uuid,
        /// name@version in the state.
        pinned: String,
        /// Steps in the state.
        pinned_steps: usize,
        /// name@version given.
        given: String,
        /// Steps given.
        given_steps: usize,
    },

    /// An operator action that the saga's state does not allow.
    #[error("cannot {action} saga {saga_id}: {why}")]
    Refused {
        /// The saga.
        saga_id: uuid::Uuid,
        /// The action refused.
        action: &'static str,
        /// Why, and what would be allowed.
        why: String,
    },
}

/// Applies `event` to `state` under definition `spec`.
pub fn decide(
    state: &SagaState,
    spec: &SagaSpec,
    event: Event,
    inputs: Inputs<'_>,
) -> Result<Transition, MachineError> {
    if state.name != spec.name
        || state.version != spec.version
        || state.steps.len() != spec.steps.len()
    {
        return Err(MachineError::WrongDefinition {
            saga_id: state.saga_id,
            pinned: format!("{}@{}", state.name, state.version),
            pinned_steps: state.steps.len(),
            given: format!("{}@{}", spec.name, spec.version),
            given_steps: spec.steps.len(),
        });
    }
    let wake_before = state.wake_at();
    let mut machine = Machine {
        state: state.clone(),
        spec,
        now: inputs.now,
        delays: inputs.delays,
        commands: Vec::new(),
        history: Vec::new(),
    };
    match event {
        Event::Start => machine.start()?,
        Event::Reply(reply) => machine.on_reply(reply),
        Event::TimerFired => machine.on_timer(),
        Event::Operator(command) => machine.on_operator(command)?,
        Event::Rejected { source, reason } => machine.history.push(Record::saga(
            RecordKind::MessageRejected,
            Actor::Engine,
            json!({ "source": source, "reason": reason }),
        )),
    }
    let wake_after = machine.state.wake_at();
    if let Some(at) = wake_after.filter(|_| wake_after != wake_before) {
        machine.commands.push(Command::ScheduleWake { at });
    }
    Ok(Transition {
        state: machine.state,
        commands: machine.commands,
        history: machine.history,
    })
}

struct Machine<'a, 'd> {
    state: SagaState,
    spec: &'a SagaSpec,
    now: Timestamp,
    delays: &'d mut dyn RetryDelays,
    commands: Vec<Command>,
    history: Vec<Record>,
}

impl Machine<'_, '_> {
    fn step_name(&self, step: usize) -> &str {
        &self.spec.steps[step].name
    }

    fn start(&mut self) -> Result<(), MachineError> {
        if self.state.status != SagaStatus::Created {
            return Err(MachineError::AlreadyStarted(self.state.saga_id));
        }
        self.state.status = SagaStatus::Running;
        self.history.push(Record::saga(
            RecordKind::SagaStarted,
            Actor::Engine,
            json!({ "input": self.state.input, "deadline": self.state.deadline }),
        ));
        if self.spec.steps.is_empty() {
            // Definitions are validated to have steps; a saga of none has nothing to do.
            self.finish(SagaStatus::Completed);
        } else {
            self.begin_round(0, Direction::Forward);
        }
        Ok(())
    }

    /// Starts a fresh retry budget for a step in one direction and dispatches its first attempt.
    fn begin_round(&mut self, step: usize, direction: Direction) {
        let attempts = self.state.steps[step].attempts_mut(direction);
        attempts.round_start = attempts.made;
        self.dispatch(step, direction);
    }

    fn dispatch(&mut self, step: usize, direction: Direction) {
        let step_state = &mut self.state.steps[step];
        step_state.status = match direction {
            Direction::Forward => StepStatus::Running,
            Direction::Compensate => StepStatus::Compensating,
        };
        let attempts = step_state.attempts_mut(direction);
        attempts.made += 1;
        attempts.last_outcome = None;
        let attempt = attempts.made;
        let deadline = self.spec.steps[step].timeout.map(|t| self.now.plus(t));
        self.state.activity = Activity::InFlight {
            step,
            direction,
            attempt,
            deadline,
        };
        let name = self.step_name(step).to_string();
        let idempotency_key =
            sagaflow_protocol::idempotency_key(self.state.saga_id, &name, direction);
        let forward_key =
            sagaflow_protocol::idempotency_key(self.state.saga_id, &name, Direction::Forward);
        self.history.push(
            Record::attempt(
                RecordKind::AttemptDispatched,
                &name,
                direction,
                attempt,
                Actor::Engine,
            )
            .with_detail(json!({ "idempotency_key": idempotency_key, "deadline": deadline })),
        );
        self.commands.push(Command::Dispatch(Dispatch {
            step,
            step_name: name,
            direction,
            attempt,
            idempotency_key,
            forward_key,
            deadline,
        }));
    }

    fn on_reply(&mut self, reply: Reply) {
        let awaited = matches!(
            self.state.activity,
            Activity::InFlight { step, direction, attempt, .. }
                if step == reply.step && direction == reply.direction && attempt == reply.attempt
        );
        if !awaited {
            let why = self.why_not_awaited(&reply);
            self.ignore_reply(reply, why);
            return;
        }
        if reply
            .result
            .as_ref()
            .is_err_and(|e| e.code == sagaflow_protocol::codes::STALE_EPOCH)
        {
            // The worker ran nothing: the command came from the partition's previous owner.
            // The attempt stays in flight; the shell sends it again under the current epoch.
            let why = format!(
                "{STALE_EPOCH_REPLY} the worker refused a command sent under a superseded \
                 ownership of the saga's partition, without running it; the attempt is sent \
                 again under the current epoch"
            );
            self.ignore_reply(reply, why);
            return;
        }
        let Reply {
            step,
            direction,
            attempt,
            result,
            worker,
        } = reply;
        self.state.steps[step].attempts_mut(direction).last_outcome = Some(AttemptOutcome::Replied);
        self.state.activity = Activity::Idle;
        let name = self.step_name(step).to_string();
        let record = Record::attempt(
            RecordKind::AttemptSucceeded,
            &name,
            direction,
            attempt,
            Actor::Worker(worker.clone()),
        );
        match result {
            Ok(output) => {
                let detail = match direction {
                    Direction::Forward => json!({ "output": output }),
                    Direction::Compensate => Value::Null,
                };
                self.history.push(record.with_detail(detail));
                match direction {
                    Direction::Forward => self.forward_succeeded(step, output),
                    Direction::Compensate => self.compensation_succeeded(step),
                }
            }
            Err(error) => {
                self.history.push(
                    Record {
                        kind: RecordKind::AttemptFailed,
                        ..record
                    }
                    .with_detail(json!({ "class": error.class, "code": error.code }))
                    .with_error(error.message.clone()),
                );
                self.attempt_failed(step, direction, error);
            }
        }
    }

    fn why_not_awaited(&self, reply: &Reply) -> String {
        if self.state.status.is_terminal() {
            return format!("{FINISHED_SAGA_REPLY} {}", self.state.status.as_str());
        }
        let Some(step) = self.state.steps.get(reply.step) else {
            return format!("the saga has no step number {}", reply.step);
        };
        let attempts = step.attempts(reply.direction);
        if reply.attempt == 0 || reply.attempt > attempts.made {
            return format!("attempt {} was never dispatched", reply.attempt);
        }
        if reply.attempt < attempts.made {
            return format!(
                "{LATE_REPLY} attempt {} was superseded by attempt {}",
                reply.attempt, attempts.made
            );
        }
        match attempts.last_outcome {
            Some(AttemptOutcome::Replied) => {
                format!("{DUPLICATE_REPLY} this attempt was already answered")
            }
            Some(AttemptOutcome::TimedOut) => {
                format!("{LATE_REPLY} this attempt had already timed out")
            }
            Some(AttemptOutcome::Abandoned) => {
                format!("{LATE_REPLY} the saga had moved on from this attempt")
            }
            None => "the saga is not waiting for this attempt".into(),
        }
    }

    fn ignore_reply(&mut self, reply: Reply, why: String) {
        let step = self
            .spec
            .steps
            .get(reply.step)
            .map_or_else(|| format!("#{}", reply.step), |s| s.name.clone());
        let outcome = match &reply.result {
            Ok(_) => json!("succeeded"),
            Err(e) => json!({ "class": e.class, "code": e.code }),
        };
        self.history.push(
            Record::attempt(
                RecordKind::ReplyIgnored,
                &step,
                reply.direction,
                reply.attempt,
                Actor::Worker(reply.worker),
            )
            .with_detail(json!({ "reason": why, "reply": outcome })),
        );
    }

    fn forward_succeeded(&mut self, step: usize, output: Value) {
        self.state.steps[step].status = StepStatus::Succeeded;
        let name = self.step_name(step).to_string();
        self.state.outputs.insert(name, output);
        self.advance_after(step);
    }

    /// Moves past a forward step that is done (succeeded, or skipped by an operator).
    fn advance_after(&mut self, step: usize) {
        if self.spec.steps[step].kind == StepKind::Pivot {
            self.state.past_pivot = true;
        }
        let next = step + 1;
        if next < self.spec.steps.len() {
            self.begin_round(next, Direction::Forward);
        } else {
            self.finish(SagaStatus::Completed);
        }
    }

    fn compensation_succeeded(&mut self, step: usize) {
        self.state.steps[step].status = StepStatus::Compensated;
        self.state.compensation_queue.retain(|&s| s != step);
        self.continue_compensation();
    }

    fn attempt_failed(&mut self, step: usize, direction: Direction, error: StepError) {
        let step_spec = &self.spec.steps[step];
        let policy = match direction {
            Direction::Forward => &step_spec.retry,
            Direction::Compensate => &step_spec.compensation_retry,
        };
        let attempts = self.state.steps[step].attempts(direction);
        let (in_round, made) = (attempts.in_round(), attempts.made);
        let retryable = error.is_retryable() && policy.retries_code(&error.code);
        // Only a permanent error promises that nothing was applied under the step's key (an
        // idempotent handler reports an earlier effect instead of failing). A retryable error
        // or a timeout promises nothing: an earlier attempt may have applied and its reply been
        // lost, and this one may have failed before reaching the resource.
        let outcome_unknown = error.is_retryable();
        self.state.steps[step].last_error = Some(error.clone());
        if retryable && policy.allows_attempt_after(in_round) {
            let delay = self.delays.retry_delay(policy, in_round);
            let at = self.now.plus(delay);
            let next_attempt = made + 1;
            self.state.activity = Activity::BackingOff {
                step,
                direction,
                attempt: next_attempt,
                at,
            };
            let name = self.step_name(step).to_string();
            self.history.push(
                Record::attempt(
                    RecordKind::RetryScheduled,
                    &name,
                    direction,
                    next_attempt,
                    Actor::Engine,
                )
                .with_detail(json!({ "at": at, "delay_ms": delay.as_millis() as u64 })),
            );
            return;
        }
        let name = step_spec.name.clone();
        let why = if retryable {
            format!("gave up after {in_round} attempts: {error}")
        } else {
            format!("failed permanently: {error}")
        };
        match (direction, step_spec.kind) {
            (Direction::Compensate, _) => {
                self.become_stuck(
                    step,
                    direction,
                    format!("compensation of step `{name}` {why}"),
                );
            }
            (Direction::Forward, StepKind::Retriable) => self.become_stuck(
                step,
                direction,
                format!("step `{name}` is past the pivot and cannot be compensated; it {why}"),
            ),
            (Direction::Forward, StepKind::Pivot) if outcome_unknown => self.become_stuck(
                step,
                direction,
                format!(
                    "pivot `{name}` {why}; whether it applied is unknown: skip it if it did, \
                     cancel the saga if it did not, or resume to try again"
                ),
            ),
            (Direction::Forward, kind) => {
                self.state.steps[step].status = StepStatus::Failed;
                let undo_failed_step = outcome_unknown && kind == StepKind::Compensatable;
                self.begin_compensation(
                    format!("step `{name}` {why}"),
                    undo_failed_step.then_some(step),
                );
            }
        }
    }

    fn become_stuck(&mut self, step: usize, direction: Direction, reason: String) {
        self.state.status = SagaStatus::Stuck;
        self.state.activity = Activity::Idle;
        let name = self.step_name(step).to_string();
        self.history.push(
            Record {
                step: Some(name),
                direction: Some(direction),
                ..Record::saga(RecordKind::SagaStuck, Actor::Engine, Value::Null)
            }
            .with_error(reason.clone()),
        );
        self.state.stuck = Some(Stuck {
            step,
            direction,
            reason,
        });
    }

    /// Turns the saga around: every completed compensatable step (plus `also_undo`, a step
    /// whose outcome is unknown) is compensated, latest first.
    fn begin_compensation(&mut self, reason: String, also_undo: Option<usize>) {
        self.state.status = SagaStatus::Compensating;
        self.state.activity = Activity::Idle;
        self.state.stuck = None;
        let mut queue: Vec<usize> = (0..self.spec.steps.len())
            .rev()
            .filter(|&i| {
                self.spec.steps[i].kind == StepKind::Compensatable
                    && matches!(
                        self.state.steps[i].status,
                        StepStatus::Succeeded | StepStatus::Skipped
                    )
            })
            .collect();
        if let Some(step) = also_undo {
            // The failing step comes after every completed one, so it is undone first.
            queue.insert(0, step);
        }
        let names: Vec<&str> = queue
            .iter()
            .map(|&i| self.spec.steps[i].name.as_str())
            .collect();
        self.history.push(
            Record::saga(
                RecordKind::CompensationStarted,
                Actor::Engine,
                json!({ "steps": names }),
            )
            .with_error(reason.clone()),
        );
        self.state.failure = Some(reason);
        self.state.compensation_queue = queue;
        self.continue_compensation();
    }

    fn continue_compensation(&mut self) {
        self.state.status = SagaStatus::Compensating;
        match self.state.compensation_queue.first() {
            Some(&next) => self.begin_round(next, Direction::Compensate),
            None => self.finish(SagaStatus::Compensated),
        }
    }

    fn finish(&mut self, status: SagaStatus) {
        self.state.status = status;
        self.state.activity = Activity::Idle;
        let kind = match status {
            SagaStatus::Completed => RecordKind::SagaCompleted,
            _ => RecordKind::SagaCompensated,
        };
        self.history
            .push(Record::saga(kind, Actor::Engine, Value::Null));
        self.commands.push(Command::Finish { status });
    }

    fn on_timer(&mut self) {
        if !matches!(
            self.state.status,
            SagaStatus::Running | SagaStatus::Compensating
        ) {
            return;
        }
        if let Some(deadline) = self
            .state
            .deadline
            .filter(|&d| self.state.deadline_armed() && d <= self.now)
        {
            self.history.push(Record::saga(
                RecordKind::DeadlineExceeded,
                Actor::Engine,
                json!({ "deadline": deadline }),
            ));
            // The deadline fires once: an operator who resumes afterwards decides anew.
            self.state.deadline = None;
            if let Some(pivot) = self.pivot_outcome_unknown() {
                // Compensating the earlier steps now would leave the pivot's effect behind if it
                // applied after all: only an operator can tell.
                if matches!(self.state.activity, Activity::InFlight { .. }) {
                    self.state.steps[pivot].forward.last_outcome = Some(AttemptOutcome::Abandoned);
                }
                let name = self.step_name(pivot).to_string();
                self.become_stuck(
                    pivot,
                    Direction::Forward,
                    format!(
                        "the saga's deadline passed while the outcome of pivot `{name}` was \
                         unknown: skip it if it applied, cancel the saga if it did not"
                    ),
                );
                return;
            }
            self.abandon_forward_step("the saga's deadline passed before its pivot".into());
            return;
        }
        match self.state.activity.clone() {
            Activity::InFlight {
                step,
                direction,
                attempt,
                deadline: Some(deadline),
            } if deadline <= self.now => {
                let attempts = self.state.steps[step].attempts_mut(direction);
                attempts.last_outcome = Some(AttemptOutcome::TimedOut);
                self.state.activity = Activity::Idle;
                let name = self.step_name(step).to_string();
                self.history.push(
                    Record::attempt(
                        RecordKind::AttemptTimedOut,
                        &name,
                        direction,
                        attempt,
                        Actor::Engine,
                    )
                    .with_detail(json!({ "deadline": deadline })),
                );
                let timeout = self.spec.steps[step].timeout.unwrap_or_default();
                let error = StepError::retryable("timeout", format!("no reply within {timeout:?}"));
                self.attempt_failed(step, direction, error);
            }
            Activity::BackingOff {
                step,
                direction,
                attempt,
                at,
            } if at <= self.now => {
                let name = self.step_name(step).to_string();
                self.history.push(
                    Record::attempt(
                        RecordKind::RetryTimerFired,
                        &name,
                        direction,
                        attempt,
                        Actor::Engine,
                    )
                    .with_detail(json!({ "at": at })),
                );
                self.dispatch(step, direction);
            }
            // Nothing is due yet: an early or repeated wake changes nothing.
            _ => {}
        }
    }

    /// The pivot, when it is the forward step in progress and has been attempted: without a
    /// permanent answer, any of its attempts may have applied.
    fn pivot_outcome_unknown(&self) -> Option<usize> {
        let Some((step, Direction::Forward)) = self.state.current_step() else {
            return None;
        };
        // The pivot is in progress, so no attempt got a permanent answer: any may have applied.
        let attempted = self.state.steps[step].forward.made > 0;
        (self.spec.steps[step].kind == StepKind::Pivot && attempted).then_some(step)
    }

    /// Stops the forward step in progress (deadline or cancel) and compensates. The step itself
    /// is undone too when it is compensatable and was attempted: with no permanent answer yet,
    /// any attempt may have applied.
    fn abandon_forward_step(&mut self, reason: String) {
        let mut also_undo = None;
        if let Some((step, Direction::Forward)) = self.state.current_step() {
            let attempts = self.state.steps[step].attempts_mut(Direction::Forward);
            let in_flight = matches!(self.state.activity, Activity::InFlight { .. });
            if in_flight {
                attempts.last_outcome = Some(AttemptOutcome::Abandoned);
            }
            // Still in progress: no attempt got a permanent answer, so any may have applied.
            let maybe_applied = attempts.made > 0;
            self.state.steps[step].status = StepStatus::Failed;
            if maybe_applied && self.spec.steps[step].kind == StepKind::Compensatable {
                also_undo = Some(step);
            }
        }
        self.begin_compensation(reason, also_undo);
    }
}
