//! Operator actions that are accepted: resume, retry now, skip and cancel, mostly on sagas left
//! stuck by the other themes' stories, whose openings they reuse.

use serde_json::json;

use super::compensation::compensation_stuck;
use super::retriable_step::retriable_stuck;
use super::timeouts::pivot_unknown;
use super::{
    AUTHORIZE, CAPTURE, RESERVE, SHIP, SagaStatus, Scenario, busy, compensated,
    compensation_failed, failed, ok, operator, order_spec, scenario, skip, succeed_through, timer,
    with,
};
use crate::machine::OperatorAction;

pub(super) fn operator_resume_stuck_compensation() -> Scenario {
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

pub(super) fn operator_resume_stuck_retriable_step() -> Scenario {
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

pub(super) fn operator_retry_now_during_backoff() -> Scenario {
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

pub(super) fn operator_skip_stuck_forward_step() -> Scenario {
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

pub(super) fn operator_skip_stuck_pivot() -> Scenario {
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

pub(super) fn operator_skip_stuck_compensation() -> Scenario {
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

pub(super) fn operator_cancel_running() -> Scenario {
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

pub(super) fn operator_cancel_stuck_pivot() -> Scenario {
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
