//! Attempts that get no reply within their timeout, and wakes with nothing due. A timeout leaves
//! it unknown whether the step applied, which decides what is compensated and when the saga
//! sticks instead.

use super::{
    AUTHORIZE, CAPTURE, RESERVE, SHIP, SagaStatus, Scenario, busy, compensated, failed, ok,
    order_spec, scenario, succeed_through, timer, with,
};
use crate::machine::Event;

pub(super) fn attempt_timeout_then_retry() -> Scenario {
    scenario(
        "attempt_timeout_then_retry",
        "reserve_stock's first attempt gets no reply within its 1 s timeout: the timer records \
         the timeout, the retry timer dispatches attempt 2, which succeeds.",
        order_spec(),
        vec![
            (0, Event::Start),
            (1_000, timer()),
            (1_100, timer()),
            (1_110, ok(RESERVE, 2)),
            (1_120, ok(AUTHORIZE, 1)),
            (1_130, ok(CAPTURE, 1)),
            (1_140, ok(SHIP, 1)),
        ],
        SagaStatus::Completed,
    )
}

/// After `prefix`, the step dispatched at `dispatched_at` times out on its 3 attempts: timers at
/// +1000 (timeout), +1100 (retry), +2100 (timeout), +2300 (retry), +3300 (last timeout).
fn times_out_three_times(prefix: Vec<(i64, Event)>, dispatched_at: i64) -> Vec<(i64, Event)> {
    let t = dispatched_at;
    with(
        prefix,
        vec![
            (t + 1_000, timer()),
            (t + 1_100, timer()),
            (t + 2_100, timer()),
            (t + 2_300, timer()),
            (t + 3_300, timer()),
        ],
    )
}

pub(super) fn timeout_on_last_attempt_compensates_the_step() -> Scenario {
    scenario(
        "timeout_on_last_attempt_compensates_the_step",
        "authorize_payment times out on all 3 attempts: whether it applied is unknown, so it is \
         compensated too (first, without an output, its compensation carrying the forward key), \
         then reserve_stock.",
        order_spec(),
        with(
            times_out_three_times(succeed_through(1), 10),
            vec![
                (3_320, compensated(AUTHORIZE, 1)),
                (3_330, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

/// The pivot (dispatched at 20) times out on its 3 attempts: stuck at 3320.
pub(super) fn pivot_unknown() -> Vec<(i64, Event)> {
    times_out_three_times(succeed_through(2), 20)
}

pub(super) fn pivot_outcome_unknown_stuck() -> Scenario {
    scenario(
        "pivot_outcome_unknown_stuck",
        "capture_payment (the pivot) times out on all 3 attempts: whether it applied is unknown, \
         so the saga is stuck (not compensated) until an operator skips or cancels it.",
        order_spec(),
        pivot_unknown(),
        SagaStatus::Stuck,
    )
}

pub(super) fn timeout_then_retryable_failures_compensates_the_step() -> Scenario {
    scenario(
        "timeout_then_retryable_failures_compensates_the_step",
        "authorize_payment's attempt 1 times out, attempts 2 and 3 fail with retryable errors and \
         the policy runs out. Attempt 1 may have applied and no answer settled it, so \
         authorize_payment is compensated too (without an output), then reserve_stock.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (1_010, timer()),
                (1_110, timer()),
                (1_120, failed(AUTHORIZE, 2, busy())),
                (1_320, timer()),
                (1_330, failed(AUTHORIZE, 3, busy())),
                (1_340, compensated(AUTHORIZE, 1)),
                (1_350, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

pub(super) fn early_timer_changes_nothing() -> Scenario {
    scenario(
        "early_timer_changes_nothing",
        "Wakes with nothing due (before an attempt's timeout, before a retry, and a repeated \
         wake) record nothing, emit nothing and change nothing.",
        order_spec(),
        vec![
            (0, Event::Start),
            (500, timer()),
            (510, ok(RESERVE, 1)),
            (520, failed(AUTHORIZE, 1, busy())),
            (600, timer()),
            (620, timer()),
            (620, timer()),
            (630, ok(AUTHORIZE, 2)),
            (640, ok(CAPTURE, 1)),
            (650, ok(SHIP, 1)),
        ],
        SagaStatus::Completed,
    )
}
