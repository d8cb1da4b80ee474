//! Undoing completed steps after the pivot failed: compensations retried, and compensations
//! that run out of attempts and leave the saga stuck. The stuck opening is shared with the
//! operator scenarios that get such a saga going again.

use super::{
    AUTHORIZE, CAPTURE, RESERVE, SagaStatus, Scenario, busy, compensated, compensation_failed,
    declined, failed, order_spec, scenario, succeed_through, timer, with,
};
use crate::machine::Event;

/// Start, reserve and authorize succeed, capture fails permanently: compensation of
/// authorize_payment (attempt 1) is dispatched at 30.
pub(super) fn pivot_declined() -> Vec<(i64, Event)> {
    with(
        succeed_through(2),
        vec![(30, failed(CAPTURE, 1, declined()))],
    )
}

pub(super) fn compensation_retried_then_succeeded() -> Scenario {
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
pub(super) fn compensation_stuck() -> Vec<(i64, Event)> {
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

pub(super) fn compensation_exhausted_stuck() -> Scenario {
    scenario(
        "compensation_exhausted_stuck",
        "authorize_payment's compensation fails on all 3 attempts: the saga is stuck with the \
         reason, reserve_stock still waits to be compensated, and a later wake changes nothing.",
        order_spec(),
        with(compensation_stuck(), vec![(5_000, timer())]),
        SagaStatus::Stuck,
    )
}
