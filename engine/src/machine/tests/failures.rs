//! How failures end: compensations in reverse order, why stuck sagas are stuck, and unknown
//! outcomes.

use super::*;

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
