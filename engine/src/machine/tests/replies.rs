//! Duplicate, late and misaddressed replies: recorded and ignored.

use super::*;

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
fn a_stale_epoch_refusal_is_ignored_and_the_attempt_stays_in_flight() {
    let trace = trace_of("stale_epoch_refusal_keeps_the_attempt_in_flight");
    let reasons = ignored_reasons(&trace);
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.iter().all(|r| r.starts_with("stale epoch")));
    // Only capture_payment's refusal counts as a failure; the refused attempts were answered
    // later, by attempt 1 again, without a retry.
    assert_eq!(count(&trace, RecordKind::AttemptFailed), 1);
    assert_eq!(count(&trace, RecordKind::RetryScheduled), 0);
    assert_eq!(trace.final_state.status, SagaStatus::Compensated);
}

#[test]
fn every_ignored_reply_of_the_corpus_has_the_cause_its_reason_names() {
    let mut causes = std::collections::BTreeMap::new();
    for scenario in scenarios::all() {
        for reason in ignored_reasons(&scenarios::run(&scenario)) {
            let cause = ReplyIgnoredCause::of_reason(&reason);
            let expected = if reason.starts_with("duplicate") {
                ReplyIgnoredCause::Duplicate
            } else if reason.starts_with("late") {
                ReplyIgnoredCause::Late
            } else if reason.starts_with("stale epoch") {
                ReplyIgnoredCause::StaleEpoch
            } else if reason.starts_with("the saga is already") {
                ReplyIgnoredCause::Finished
            } else {
                ReplyIgnoredCause::Other
            };
            assert_eq!(cause, expected, "{reason}");
            *causes.entry(cause.as_str()).or_insert(0) += 1;
        }
    }
    // The corpus shows every cause, so a reason reworded without its cause fails here.
    assert_eq!(
        causes.keys().copied().collect::<Vec<_>>(),
        vec!["duplicate", "finished", "late", "other", "stale_epoch"]
    );
}
