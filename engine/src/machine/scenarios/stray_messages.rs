//! Messages that must not move the saga: duplicate and late replies, replies naming steps or
//! attempts that were never dispatched, replies after the end, and malformed messages. Each is
//! recorded (or dropped, for a wake) and the saga carries on as if it had not come.

use sagaflow_protocol::Direction;
use serde_json::json;

use super::{
    AUTHORIZE, CAPTURE, RESERVE, SHIP, SagaStatus, Scenario, busy, compensated,
    compensation_failed, declined, failed, ok, order_spec, reply, scenario, succeed_through, timer,
    with,
};
use crate::machine::Event;

pub(super) fn duplicate_reply_ignored() -> Scenario {
    scenario(
        "duplicate_reply_ignored",
        "reserve_stock's success is delivered twice and authorize_payment's failure is delivered \
         twice: each second copy is recorded as ignored (duplicate) and applied nowhere (one \
         dispatch of authorize_payment, one retry scheduled).",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (15, ok(RESERVE, 1)),
                (20, failed(AUTHORIZE, 1, busy())),
                (25, failed(AUTHORIZE, 1, busy())),
                (120, timer()),
                (130, ok(AUTHORIZE, 2)),
                (140, ok(CAPTURE, 1)),
                (150, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}

pub(super) fn late_reply_for_earlier_attempt() -> Scenario {
    let late = |at| {
        (
            at,
            reply(
                RESERVE,
                Direction::Forward,
                1,
                Ok(json!({ "reservation_id": "res-from-attempt-1" })),
            ),
        )
    };
    scenario(
        "late_reply_for_earlier_attempt",
        "reserve_stock's attempt 1 times out; its reply arrives during the backoff (ignored: \
         already timed out) and again after attempt 2 was dispatched (ignored: superseded). \
         Attempt 2's reply applies, and its output is the one recorded.",
        order_spec(),
        vec![
            (0, Event::Start),
            (1_000, timer()),
            late(1_050),
            (1_100, timer()),
            late(1_150),
            (1_160, ok(RESERVE, 2)),
            (1_170, ok(AUTHORIZE, 1)),
            (1_180, ok(CAPTURE, 1)),
            (1_190, ok(SHIP, 1)),
        ],
        SagaStatus::Completed,
    )
}

pub(super) fn stale_epoch_refusal_keeps_the_attempt_in_flight() -> Scenario {
    let stale = || {
        sagaflow_protocol::StepError::permanent(
            sagaflow_protocol::codes::STALE_EPOCH,
            "partition 3: epoch 4 was superseded by epoch 5",
        )
    };
    scenario(
        "stale_epoch_refusal_keeps_the_attempt_in_flight",
        "The worker refuses authorize_payment's attempt 1 as sent under a superseded epoch (the \
         partition changed owner): recorded as ignored, not as a failure; the attempt stays in \
         flight, and its answer under the new owner's epoch applies. The same for a \
         compensation's attempt.",
        order_spec(),
        with(
            succeed_through(1),
            vec![
                (20, failed(AUTHORIZE, 1, stale())),
                (30, ok(AUTHORIZE, 1)),
                (40, failed(CAPTURE, 1, declined())),
                (50, compensation_failed(AUTHORIZE, 1, stale())),
                (60, compensated(AUTHORIZE, 1)),
                (70, compensated(RESERVE, 1)),
            ],
        ),
        SagaStatus::Compensated,
    )
}

pub(super) fn rejected_message_is_recorded() -> Scenario {
    scenario(
        "rejected_message_is_recorded",
        "A malformed reply naming this saga arrives: it is recorded as message_rejected and \
         changes nothing; the saga goes on and completes.",
        order_spec(),
        with(
            vec![
                (0, Event::Start),
                (
                    5,
                    Event::Rejected {
                        source: "sagaflow.reply.place_order".into(),
                        reason: "malformed reply: missing field `attempt`".into(),
                    },
                ),
            ],
            succeed_through(4).into_iter().skip(1).collect(),
        ),
        SagaStatus::Completed,
    )
}

pub(super) fn reply_for_finished_saga() -> Scenario {
    scenario(
        "reply_for_finished_saga",
        "After the saga completed: a redelivered success, a stray failure and a wake are \
         recorded as ignored (the replies) or change nothing (the wake).",
        order_spec(),
        with(
            succeed_through(4),
            vec![
                (100, ok(SHIP, 1)),
                (110, failed(RESERVE, 1, busy())),
                (120, timer()),
            ],
        ),
        SagaStatus::Completed,
    )
}

pub(super) fn reply_for_unknown_step_or_attempt() -> Scenario {
    scenario(
        "reply_for_unknown_step_or_attempt",
        "Replies naming a step number the saga does not have, an attempt never dispatched, and a \
         compensation never dispatched are recorded as ignored; the real reply then applies.",
        order_spec(),
        with(
            vec![
                (0, Event::Start),
                (5, ok(9, 1)),
                (6, ok(RESERVE, 2)),
                (7, compensated(RESERVE, 1)),
                (8, ok(AUTHORIZE, 1)),
            ],
            vec![
                (10, ok(RESERVE, 1)),
                (20, ok(AUTHORIZE, 1)),
                (30, ok(CAPTURE, 1)),
                (40, ok(SHIP, 1)),
            ],
        ),
        SagaStatus::Completed,
    )
}
