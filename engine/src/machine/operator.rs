//! Operator actions: resume, retry now, skip a step, cancel. Each is refused with a reason when
//! the saga's state does not allow it, and recorded with the operator and their reason.

use sagaflow_protocol::{Direction, StepKind};
use serde_json::{Value, json};

use super::{
    Activity, Actor, AttemptOutcome, Machine, MachineError, OperatorAction, OperatorCommand,
    Record, RecordKind, SagaStatus, StepStatus,
};

impl Machine<'_, '_> {
    pub(super) fn on_operator(&mut self, command: OperatorCommand) -> Result<(), MachineError> {
        let OperatorCommand {
            actor,
            reason,
            action,
        } = command;
        let refuse = |action: &'static str, why: String| MachineError::Refused {
            saga_id: self.state.saga_id,
            action,
            why,
        };
        let status = self.state.status;
        let action_name = action.name();
        if status.is_terminal() {
            return Err(refuse(
                action_name,
                format!("it is already {}", status.as_str()),
            ));
        }
        let record = |step: Option<String>, extra: Value| {
            let mut detail = json!({ "action": action_name, "reason": reason });
            if let (Some(map), Value::Object(more)) = (detail.as_object_mut(), extra) {
                map.extend(more);
            }
            Record {
                step,
                ..Record::saga(
                    RecordKind::OperatorAction,
                    Actor::Operator(actor.clone()),
                    detail,
                )
            }
        };
        match action {
            OperatorAction::Resume => {
                let Some(stuck) = self.state.stuck.take() else {
                    return Err(refuse(
                        "resume",
                        format!(
                            "it is {}, not stuck; resume is for stuck sagas",
                            status.as_str()
                        ),
                    ));
                };
                self.history.push(record(
                    Some(self.step_name(stuck.step).to_string()),
                    json!({ "was_stuck_because": stuck.reason }),
                ));
                self.state.status = match stuck.direction {
                    Direction::Forward => SagaStatus::Running,
                    Direction::Compensate => SagaStatus::Compensating,
                };
                self.begin_round(stuck.step, stuck.direction);
            }
            OperatorAction::RetryNow => {
                let Activity::BackingOff {
                    step, direction, ..
                } = self.state.activity
                else {
                    return Err(refuse(
                        "retry",
                        "no retry is waiting: the saga is not backing off after a failed attempt"
                            .into(),
                    ));
                };
                self.history
                    .push(record(Some(self.step_name(step).to_string()), Value::Null));
                self.dispatch(step, direction);
            }
            OperatorAction::SkipStep { step, output } => {
                let Some(index) = self.spec.step_index(&step) else {
                    return Err(refuse(
                        "skip a step of",
                        format!(
                            "it has no step `{step}`; its steps are: {}",
                            self.spec.step_names()
                        ),
                    ));
                };
                let Some((current, direction)) = self.state.current_step() else {
                    return Err(refuse("skip a step of", "no step is in progress".into()));
                };
                if current != index {
                    return Err(refuse(
                        "skip a step of",
                        format!(
                            "`{step}` is not the step in progress; `{}` is ({direction})",
                            self.step_name(current)
                        ),
                    ));
                }
                if direction == Direction::Forward && output.is_none() {
                    return Err(refuse(
                        "skip a step of",
                        format!(
                            "skipping the forward action of `{step}` needs the output later steps will read"
                        ),
                    ));
                }
                self.history.push(record(
                    Some(step.clone()),
                    json!({ "direction": direction, "output": output }),
                ));
                self.leave_current_attempt();
                self.state.stuck = None;
                match direction {
                    Direction::Forward => {
                        self.state.status = SagaStatus::Running;
                        self.state.steps[index].status = StepStatus::Skipped;
                        self.state
                            .outputs
                            .insert(step, output.unwrap_or(Value::Null));
                        self.advance_after(index);
                    }
                    Direction::Compensate => {
                        self.state.steps[index].status = StepStatus::Compensated;
                        self.state.compensation_queue.retain(|&s| s != index);
                        self.continue_compensation();
                    }
                }
            }
            OperatorAction::Cancel => {
                let forward = match status {
                    SagaStatus::Created | SagaStatus::Running => true,
                    SagaStatus::Stuck => {
                        self.state.stuck.as_ref().map(|s| s.direction) == Some(Direction::Forward)
                    }
                    _ => false,
                };
                if !forward {
                    return Err(refuse(
                        "cancel",
                        format!(
                            "it is {}; only a saga moving forward can be cancelled",
                            status.as_str()
                        ),
                    ));
                }
                if self.state.past_pivot {
                    return Err(refuse(
                        "cancel",
                        "it is past its pivot, so it can no longer be compensated; resume or skip the \
                         stuck step instead"
                            .into(),
                    ));
                }
                let pivot_stuck = self
                    .state
                    .stuck
                    .as_ref()
                    .is_some_and(|s| self.spec.steps[s.step].kind == StepKind::Pivot);
                self.history.push(record(
                    None,
                    json!({ "pivot_outcome_unknown": pivot_stuck }),
                ));
                // `stuck` stays set until compensation begins, so the stuck step is still the
                // current one and is marked failed (and undone if it may have applied).
                self.abandon_forward_step(format!("cancelled by operator {actor}: {reason}"));
            }
        }
        Ok(())
    }

    /// Forgets the attempt in flight: its reply, if it ever comes, is late.
    fn leave_current_attempt(&mut self) {
        if let Activity::InFlight {
            step, direction, ..
        } = self.state.activity
        {
            let attempts = self.state.steps[step].attempts_mut(direction);
            attempts.last_outcome = Some(AttemptOutcome::Abandoned);
        }
        self.state.activity = Activity::Idle;
    }
}
