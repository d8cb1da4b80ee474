//! Events the machine refuses: a second start and operator actions that do not fit the saga's
//! status. A refusal stays in the trace with its message and leaves the state unchanged.

use serde_json::json;

use super::compensation::pivot_declined;
use super::{
    SHIP, SagaStatus, Scenario, ok, operator, order_spec, scenario, skip, succeed_through, with,
};
use crate::machine::{Event, OperatorAction};

pub(super) fn refused_second_start() -> Scenario {
    scenario(
        "refused_second_start",
        "A second start is refused; the saga goes on.",
        order_spec(),
        vec![(0, Event::Start), (5, Event::Start)],
        SagaStatus::Running,
    )
}

pub(super) fn refused_resume_of_completed() -> Scenario {
    scenario(
        "refused_resume_of_completed",
        "Resuming a completed saga is refused.",
        order_spec(),
        with(
            succeed_through(4),
            vec![(100, operator(OperatorAction::Resume, "just in case"))],
        ),
        SagaStatus::Completed,
    )
}

pub(super) fn refused_resume_of_running() -> Scenario {
    scenario(
        "refused_resume_of_running",
        "Resuming a running saga is refused: resume is for stuck sagas.",
        order_spec(),
        vec![
            (0, Event::Start),
            (5, operator(OperatorAction::Resume, "it looks slow")),
        ],
        SagaStatus::Running,
    )
}

pub(super) fn refused_cancel_after_pivot() -> Scenario {
    scenario(
        "refused_cancel_after_pivot",
        "Cancelling once the pivot succeeded is refused; the saga goes on and completes.",
        order_spec(),
        with(
            succeed_through(3),
            vec![
                (
                    35,
                    operator(OperatorAction::Cancel, "the customer changed their mind"),
                ),
                (40, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

pub(super) fn refused_cancel_while_compensating() -> Scenario {
    scenario(
        "refused_cancel_while_compensating",
        "Cancelling a saga that is already compensating is refused.",
        order_spec(),
        with(
            pivot_declined(),
            vec![(35, operator(OperatorAction::Cancel, "stop everything"))],
        ),
        SagaStatus::Compensating,
    )
}

pub(super) fn refused_skip_of_unknown_step() -> Scenario {
    scenario(
        "refused_skip_of_unknown_step",
        "Skipping a step the saga does not have is refused, naming the steps it has.",
        order_spec(),
        vec![
            (0, Event::Start),
            (
                5,
                operator(
                    skip("charge_card", Some(json!({}))),
                    "typo in the step name",
                ),
            ),
        ],
        SagaStatus::Running,
    )
}

pub(super) fn refused_skip_of_step_not_current() -> Scenario {
    scenario(
        "refused_skip_of_step_not_current",
        "Skipping a step other than the one in progress is refused.",
        order_spec(),
        vec![
            (0, Event::Start),
            (
                5,
                operator(
                    skip("capture_payment", Some(json!({ "capture_id": "cap-x" }))),
                    "skip ahead",
                ),
            ),
        ],
        SagaStatus::Running,
    )
}

pub(super) fn refused_skip_forward_without_output() -> Scenario {
    scenario(
        "refused_skip_forward_without_output",
        "Skipping a forward step without the output later steps read is refused.",
        order_spec(),
        vec![
            (0, Event::Start),
            (5, operator(skip("reserve_stock", None), "reserved by hand")),
        ],
        SagaStatus::Running,
    )
}

pub(super) fn refused_retry_now_without_backoff() -> Scenario {
    scenario(
        "refused_retry_now_without_backoff",
        "Retry-now while an attempt is in flight (no retry waiting) is refused.",
        order_spec(),
        vec![
            (0, Event::Start),
            (5, operator(OperatorAction::RetryNow, "hurry up")),
        ],
        SagaStatus::Running,
    )
}
