//! The retriable step past the pivot: it is retried without an attempt limit and never
//! compensated, so a permanent failure there leaves the saga stuck rather than undone.

use super::{
    SHIP, SagaStatus, Scenario, busy, declined, failed, ok, order_spec, scenario, succeed_through,
    timer, with,
};
use crate::machine::Event;

pub(super) fn retriable_step_retried_until_success() -> Scenario {
    scenario(
        "retriable_step_retried_until_success",
        "After the pivot, ship_order fails retryably 5 times (delays 100, 200, 400, 800, then \
         capped at 1000 ms; its policy has no attempt limit) and succeeds on attempt 6. Nothing \
         is compensated.",
        order_spec(),
        with(
            succeed_through(3),
            vec![
                (40, failed(SHIP, 1, busy())),
                (140, timer()),
                (150, failed(SHIP, 2, busy())),
                (350, timer()),
                (360, failed(SHIP, 3, busy())),
                (760, timer()),
                (770, failed(SHIP, 4, busy())),
                (1_570, timer()),
                (1_580, failed(SHIP, 5, busy())),
                (2_580, timer()),
                (2_590, ok(SHIP, 6)),
            ],
        ),
        SagaStatus::Completed,
    )
}

/// Past the pivot, ship_order fails retryably once, then permanently: stuck at 150.
pub(super) fn retriable_stuck() -> Vec<(i64, Event)> {
    with(
        succeed_through(3),
        vec![
            (40, failed(SHIP, 1, busy())),
            (140, timer()),
            (150, failed(SHIP, 2, declined())),
        ],
    )
}

pub(super) fn retriable_step_fails_permanently_stuck() -> Scenario {
    scenario(
        "retriable_step_fails_permanently_stuck",
        "After the pivot, ship_order fails retryably, then permanently: the saga is stuck, \
         never compensated; a later wake changes nothing.",
        order_spec(),
        with(retriable_stuck(), vec![(2_000, timer())]),
        SagaStatus::Stuck,
    )
}
