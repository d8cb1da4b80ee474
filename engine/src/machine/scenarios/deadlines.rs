//! The saga's overall deadline (on [`order_spec_with_deadline`]) passing mid-attempt or
//! mid-backoff. Before the pivot it compensates; with the pivot in flight it can only stick.

use serde_json::json;

use super::{
    AUTHORIZE, CAPTURE, RESERVE, SHIP, SagaStatus, Scenario, busy, compensated, failed, ok,
    operator, order_spec_with_deadline, scenario, skip, succeed_through, timer, with,
};
use crate::machine::OperatorAction;

pub(super) fn deadline_before_pivot_compensates() -> Scenario {
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

pub(super) fn deadline_during_backoff() -> Scenario {
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

pub(super) fn deadline_while_pivot_in_flight() -> Scenario {
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

pub(super) fn deadline_then_operator_resumes_pivot() -> Scenario {
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
