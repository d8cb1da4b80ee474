//! Operator actions and refusals.

use super::*;

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
