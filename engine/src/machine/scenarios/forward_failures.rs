//! A forward step fails and the retry policy answers: retry, give up and compensate what may
//! have applied, or (past the pivot) stop stuck. The policy's verdict depends on the error's
//! class, its code and the attempts left, so each of those gets a scenario.

use super::{
    AUTHORIZE, CAPTURE, RESERVE, SHIP, SagaStatus, Scenario, busy, compensated, declined, failed,
    invalid_request, ok, order_spec, scenario, succeed_through, timer, with,
};

/// One scenario per step position: the step fails permanently on its first attempt.
pub(super) fn permanent_failure_at_each_step() -> Vec<Scenario> {
    const NAMES: [&str; 4] = [
        "permanent_failure_at_step_0",
        "permanent_failure_at_step_1",
        "permanent_failure_at_step_2_pivot",
        "permanent_failure_at_step_3_after_pivot",
    ];
    (0..4)
        .map(|position| {
            let mut script = succeed_through(position);
            let mut t = 10 * (position as i64 + 1);
            script.push((t, failed(position, 1, declined())));
            // Completed compensatable steps are undone latest first (the pivot and the
            // retriable step never are).
            let undone = if position <= CAPTURE { position } else { 0 };
            for undo in (0..undone).rev() {
                t += 10;
                script.push((t, compensated(undo, 1)));
            }
            let (description, expected) = match position {
                0 => (
                    "The first step fails permanently: nothing completed, so nothing is \
                     compensated and the saga is compensated at once.",
                    SagaStatus::Compensated,
                ),
                1 => (
                    "The second step fails permanently: the first is compensated.",
                    SagaStatus::Compensated,
                ),
                2 => (
                    "The pivot fails permanently (its outcome is known: it did not apply): both \
                     compensatable steps are compensated in reverse order, the pivot is not.",
                    SagaStatus::Compensated,
                ),
                _ => (
                    "The retriable step after the pivot fails permanently: the saga is stuck \
                     with the reason and nothing is ever compensated.",
                    SagaStatus::Stuck,
                ),
            };
            scenario(NAMES[position], description, order_spec(), script, expected)
        })
        .collect()
}

pub(super) fn retry_then_success() -> Scenario {
    scenario(
        "retry_then_success",
        "authorize_payment fails with a retryable error, is retried 100 ms later and succeeds; \
         the saga completes.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, ok(AUTHORIZE, 2)),
                (140, ok(CAPTURE, 1)),
                (150, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

pub(super) fn attempts_exhausted_compensates() -> Scenario {
    scenario(
        "attempts_exhausted_compensates",
        "authorize_payment fails with a retryable error on all 3 attempts (retries after 100 then \
         200 ms); the policy runs out. A retryable error does not promise that nothing was \
         applied, so authorize_payment is compensated (without an output), then reserve_stock.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, failed(AUTHORIZE, 2, busy())),
                (330, timer()),
                (340, failed(AUTHORIZE, 3, busy())),
                (350, compensated(AUTHORIZE, 1)),
                (360, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

pub(super) fn non_retryable_code_compensates() -> Scenario {
    scenario(
        "non_retryable_code_compensates",
        "authorize_payment fails with a retryable-class error whose code (`invalid_request`) the \
         policy lists as non-retryable: no retry. The handler did not call it permanent, so it \
         may have applied: authorize_payment is compensated, then reserve_stock.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, invalid_request())),
                (30, compensated(AUTHORIZE, 1)),
                (40, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

pub(super) fn permanent_error_after_a_retry() -> Scenario {
    scenario(
        "permanent_error_after_a_retry",
        "authorize_payment fails retryably, then permanently on attempt 2 with budget left: no \
         third attempt, reserve_stock is compensated.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, failed(AUTHORIZE, 2, declined())),
                (140, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}
