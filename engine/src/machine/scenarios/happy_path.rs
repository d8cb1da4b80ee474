//! The saga with nothing going wrong: the baseline every other theme departs from.

use super::{SagaStatus, Scenario, order_spec, scenario, succeed_through};

pub(super) fn happy_path() -> Scenario {
    scenario(
        "happy_path",
        "Every step succeeds on its first attempt: compensatable, compensatable, pivot, retriable.",
        order_spec(),
        succeed_through(4),
        SagaStatus::Completed,
    )
}
