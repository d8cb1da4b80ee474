//! The engine's metrics: what it counts, times and gauges, through the [`metrics`] facade.
//!
//! Nothing here exports anything: a binary that wants `/metrics` installs a recorder (the
//! `sagaflow` CLI's `--metrics-addr` installs the Prometheus exporter of
//! `sagaflow_sdk::process::serve_metrics`); without one every call below is a no-op that
//! costs an atomic load. `docs/metrics.md` lists every series with its meaning and labels,
//! and the metrics snapshot test fails when a name, type or label changes.
//!
//! Most series are derived from what a commit made durable ([`committed`]): the history
//! records of one saga's transition are the facts (a saga completed, an attempt failed
//! permanently, a retry was scheduled), so the counters agree with the history table. No
//! label names a saga instance, an idempotency key or anything else without bound: labels are
//! saga names, step names, directions, outcomes and causes.

use std::time::Duration;

use ::metrics::{Unit, counter, gauge, histogram};
use sagaflow_protocol::{Direction, ErrorClass, SagaSpec, Timestamp};
use sagaflow_sdk::metrics::{Kind, Series, describe_all};
use serde_json::Value;

use crate::machine::{Record, RecordKind, ReplyIgnoredCause, SagaStatus};

/// Sagas started (counter; label `saga`).
pub const SAGAS_STARTED: &str = "sagaflow_sagas_started_total";
/// Sagas whose every step succeeded (counter; label `saga`).
pub const SAGAS_COMPLETED: &str = "sagaflow_sagas_completed_total";
/// Sagas rolled back: every completed compensatable step compensated (counter; `saga`).
pub const SAGAS_COMPENSATED: &str = "sagaflow_sagas_compensated_total";
/// Times a saga became stuck, waiting for an operator (counter; `saga`).
pub const SAGAS_STUCK: &str = "sagaflow_sagas_stuck_total";
/// Unfinished sagas of this node's partitions by status (gauge; `status`: created, running,
/// compensating, stuck).
pub const SAGAS: &str = "sagaflow_sagas";
/// Compensations begun (counter; `saga`, `failed_step`: the step whose failure began it, or
/// `none` for a deadline or an operator's cancel).
pub const COMPENSATIONS_STARTED: &str = "sagaflow_compensations_started_total";
/// Step attempts ended (counter; `saga`, `step`, `direction`, `outcome`: succeeded,
/// failed_retryable, failed_permanent, timed_out).
pub const STEP_ATTEMPTS: &str = "sagaflow_step_attempts_total";
/// From an attempt's dispatch to its reply's commit, in seconds (histogram; `saga`, `step`,
/// `direction`).
pub const STEP_ATTEMPT_DURATION: &str = "sagaflow_step_attempt_duration_seconds";
/// Retries scheduled on a durable timer (counter; `saga`, `step`, `direction`).
pub const RETRIES_SCHEDULED: &str = "sagaflow_retries_scheduled_total";
/// How late a durable timer was handled: handling time minus due time, in seconds (histogram;
/// `timer`: retry, timeout).
pub const TIMER_LAG: &str = "sagaflow_timer_lag_seconds";
/// Replies recorded but not applied (counter; `saga`, `cause`: duplicate, late, stale_epoch,
/// finished, other).
pub const REPLIES_IGNORED: &str = "sagaflow_replies_ignored_total";
/// Writes refused because another writer got there first (counter; `cause`: version, epoch).
pub const STALE_WRITES: &str = "sagaflow_stale_writes_total";
/// Sagas written per commit (histogram).
pub const COMMIT_BATCH_SIZE: &str = "sagaflow_commit_batch_size";
/// How long one batch commit took, in seconds (histogram).
pub const COMMIT_DURATION: &str = "sagaflow_commit_duration_seconds";
/// Commands in the outbox not yet known to be published (gauge; the whole database).
pub const OUTBOX_BACKLOG: &str = "sagaflow_outbox_backlog";
/// Age of the oldest command in the outbox, in seconds; 0 when it is empty (gauge).
pub const OUTBOX_OLDEST_AGE: &str = "sagaflow_outbox_oldest_age_seconds";
/// Step commands this engine committed that the broker has not accepted yet, kept by its relay
/// to be sent again (gauge; this process).
pub const UNPUBLISHED_COMMANDS: &str = "sagaflow_unpublished_commands";
/// Stuck sagas of this node's partitions (gauge).
pub const STUCK_SAGAS: &str = "sagaflow_stuck_sagas";
/// How long the longest-stuck saga of this node's partitions has waited, in seconds; 0 when
/// none is stuck (gauge).
pub const STUCK_OLDEST_AGE: &str = "sagaflow_stuck_oldest_age_seconds";
/// Partition leases taken, free or lapsed (counter).
pub const LEASE_ACQUISITIONS: &str = "sagaflow_lease_acquisitions_total";
/// Partition leases taken from another node whose lease lapsed (counter).
pub const LEASE_TAKEOVERS: &str = "sagaflow_lease_takeovers_total";
/// Partition leases given back: to balance, or on stopping (counter).
pub const LEASE_HANDOVERS: &str = "sagaflow_lease_handovers_total";
/// Partition leases found lost at a renewal (taken by another node after this one's lapsed)
/// (counter).
pub const LEASE_LOSSES: &str = "sagaflow_lease_losses_total";
/// Lease renewal rounds (counter; `outcome`: ok, failed).
pub const LEASE_RENEWALS: &str = "sagaflow_lease_renewals_total";
/// How long one renewal of this node's leases took, in seconds (histogram).
pub const LEASE_RENEWAL_DURATION: &str = "sagaflow_lease_renewal_seconds";
/// Partitions this node holds now (gauge).
pub const PARTITIONS_OWNED: &str = "sagaflow_partitions_owned";

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleCause {
    /// The saga's version moved: another writer (an operator, another engine) wrote first.
    Version,
    /// The partition's lease or epoch is no longer this node's.
    Epoch,
}

impl StaleCause {
    fn as_str(self) -> &'static str {
        match self {
            StaleCause::Version => "version",
            StaleCause::Epoch => "epoch",
        }
    }
}

/// A durable timer's kind, for [`TIMER_LAG`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    Retry,
    Timeout,
}

impl TimerKind {
    fn as_str(self) -> &'static str {
        match self {
            TimerKind::Retry => "retry",
            TimerKind::Timeout => "timeout",
        }
    }
}

/// Every engine series with its type, unit and help text.
const SERIES: [Series; 26] = [
    (SAGAS_STARTED, Kind::Counter, Unit::Count, "Sagas started."),
    (
        SAGAS_COMPLETED,
        Kind::Counter,
        Unit::Count,
        "Sagas whose every step succeeded.",
    ),
    (
        SAGAS_COMPENSATED,
        Kind::Counter,
        Unit::Count,
        "Sagas rolled back: every completed compensatable step was compensated.",
    ),
    (
        SAGAS_STUCK,
        Kind::Counter,
        Unit::Count,
        "Times a saga became stuck, waiting for an operator.",
    ),
    (
        SAGAS,
        Kind::Gauge,
        Unit::Count,
        "Unfinished sagas of this node's partitions, by status.",
    ),
    (
        COMPENSATIONS_STARTED,
        Kind::Counter,
        Unit::Count,
        "Compensations begun, by saga and the step whose failure began them.",
    ),
    (
        STEP_ATTEMPTS,
        Kind::Counter,
        Unit::Count,
        "Step attempts ended, by outcome.",
    ),
    (
        STEP_ATTEMPT_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "From an attempt's dispatch to the commit of its reply.",
    ),
    (
        RETRIES_SCHEDULED,
        Kind::Counter,
        Unit::Count,
        "Retries scheduled on a durable timer.",
    ),
    (
        TIMER_LAG,
        Kind::Histogram,
        Unit::Seconds,
        "How late a durable timer was handled (handling time minus due time).",
    ),
    (
        REPLIES_IGNORED,
        Kind::Counter,
        Unit::Count,
        "Replies recorded but not applied (duplicate, late, stale epoch, saga finished).",
    ),
    (
        STALE_WRITES,
        Kind::Counter,
        Unit::Count,
        "Writes refused because another writer got there first, by cause.",
    ),
    (
        COMMIT_BATCH_SIZE,
        Kind::Histogram,
        Unit::Count,
        "Sagas written per commit.",
    ),
    (
        COMMIT_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "How long one batch commit took.",
    ),
    (
        OUTBOX_BACKLOG,
        Kind::Gauge,
        Unit::Count,
        "Commands in the outbox not yet known to be published (whole database).",
    ),
    (
        OUTBOX_OLDEST_AGE,
        Kind::Gauge,
        Unit::Seconds,
        "Age of the oldest command in the outbox; 0 when it is empty.",
    ),
    (
        UNPUBLISHED_COMMANDS,
        Kind::Gauge,
        Unit::Count,
        "Step commands this engine committed that the broker has not accepted yet.",
    ),
    (
        STUCK_SAGAS,
        Kind::Gauge,
        Unit::Count,
        "Stuck sagas of this node's partitions.",
    ),
    (
        STUCK_OLDEST_AGE,
        Kind::Gauge,
        Unit::Seconds,
        "How long the longest-stuck saga of this node's partitions has waited; 0 when none.",
    ),
    (
        LEASE_ACQUISITIONS,
        Kind::Counter,
        Unit::Count,
        "Partition leases taken.",
    ),
    (
        LEASE_TAKEOVERS,
        Kind::Counter,
        Unit::Count,
        "Partition leases taken from another node whose lease lapsed.",
    ),
    (
        LEASE_HANDOVERS,
        Kind::Counter,
        Unit::Count,
        "Partition leases given back.",
    ),
    (
        LEASE_LOSSES,
        Kind::Counter,
        Unit::Count,
        "Partition leases found lost at a renewal.",
    ),
    (
        LEASE_RENEWALS,
        Kind::Counter,
        Unit::Count,
        "Lease renewal rounds, by outcome.",
    ),
    (
        LEASE_RENEWAL_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "How long one renewal of this node's leases took.",
    ),
    (
        PARTITIONS_OWNED,
        Kind::Gauge,
        Unit::Count,
        "Partitions this node holds now.",
    ),
];

/// Gives every series its description and unit, and starts the series without a saga label
/// at zero, so a scrape shows them before the first event (an alert on a rate needs the
/// series to exist). Call once after installing a recorder.
pub fn describe() {
    describe_all(&SERIES);
    for cause in [StaleCause::Version, StaleCause::Epoch] {
        counter!(STALE_WRITES, "cause" => cause.as_str()).absolute(0);
    }
    for name in [
        LEASE_ACQUISITIONS,
        LEASE_TAKEOVERS,
        LEASE_HANDOVERS,
        LEASE_LOSSES,
    ] {
        counter!(name).absolute(0);
    }
    for outcome in ["ok", "failed"] {
        counter!(LEASE_RENEWALS, "outcome" => outcome).absolute(0);
    }
    for status in UNFINISHED {
        gauge!(SAGAS, "status" => status.as_str()).set(0.0);
    }
    for name in [
        OUTBOX_BACKLOG,
        OUTBOX_OLDEST_AGE,
        UNPUBLISHED_COMMANDS,
        STUCK_SAGAS,
        STUCK_OLDEST_AGE,
    ] {
        gauge!(name).set(0.0);
    }
}

/// The statuses [`SAGAS`] reports: those a saga can stay in for a while. Finished sagas are
/// counted by [`SAGAS_COMPLETED`] and [`SAGAS_COMPENSATED`] instead: a gauge of them would
/// have to count a table that only grows.
pub const UNFINISHED: [SagaStatus; 4] = [
    SagaStatus::Created,
    SagaStatus::Running,
    SagaStatus::Compensating,
    SagaStatus::Stuck,
];

/// Starts the saga-labelled series of `spec` at zero, so that a rate over them exists before
/// the first event (an alert on "compensations above normal" needs the series).
pub fn describe_saga(spec: &SagaSpec) {
    let saga = spec.name.as_str();
    for name in [
        SAGAS_STARTED,
        SAGAS_COMPLETED,
        SAGAS_COMPENSATED,
        SAGAS_STUCK,
    ] {
        counter!(name, "saga" => saga.to_string()).absolute(0);
    }
    for cause in ReplyIgnoredCause::ALL {
        counter!(REPLIES_IGNORED, "saga" => saga.to_string(), "cause" => cause.as_str())
            .absolute(0);
    }
    let failed_steps = spec.steps.iter().map(|s| s.name.as_str()).chain(["none"]);
    for failed_step in failed_steps {
        counter!(
            COMPENSATIONS_STARTED,
            "saga" => saga.to_string(),
            "failed_step" => failed_step.to_string()
        )
        .absolute(0);
    }
    for (step, direction) in sagaflow_sdk::metrics::step_directions(spec) {
        counter!(
            RETRIES_SCHEDULED,
            "saga" => saga.to_string(),
            "step" => step.to_string(),
            "direction" => direction.as_str()
        )
        .absolute(0);
        for outcome in AttemptOutcome::ALL {
            counter!(
                STEP_ATTEMPTS,
                "saga" => saga.to_string(),
                "step" => step.to_string(),
                "direction" => direction.as_str(),
                "outcome" => outcome.as_str()
            )
            .absolute(0);
        }
    }
}

/// How an attempt ended, as [`STEP_ATTEMPTS`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptOutcome {
    Succeeded,
    FailedRetryable,
    FailedPermanent,
    TimedOut,
}

impl AttemptOutcome {
    const ALL: [AttemptOutcome; 4] = [
        AttemptOutcome::Succeeded,
        AttemptOutcome::FailedRetryable,
        AttemptOutcome::FailedPermanent,
        AttemptOutcome::TimedOut,
    ];

    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::FailedRetryable => "failed_retryable",
            AttemptOutcome::FailedPermanent => "failed_permanent",
            AttemptOutcome::TimedOut => "timed_out",
        }
    }
}

/// Counts what one saga's committed transition recorded; `now` is the time the transition was
/// decided at (what timer lags are measured against).
pub fn committed(saga: &str, records: &[Record], now: Timestamp) {
    // The step whose failure a compensation answers is named by the last step record before
    // it in the same transition (an attempt failed or timed out); a deadline or a cancel has
    // none.
    let mut last_step: Option<&str> = None;
    for record in records {
        match record.kind {
            RecordKind::SagaStarted => {
                counter!(SAGAS_STARTED, "saga" => saga.to_string()).increment(1)
            }
            RecordKind::SagaCompleted => {
                counter!(SAGAS_COMPLETED, "saga" => saga.to_string()).increment(1)
            }
            RecordKind::SagaCompensated => {
                counter!(SAGAS_COMPENSATED, "saga" => saga.to_string()).increment(1)
            }
            RecordKind::SagaStuck => counter!(SAGAS_STUCK, "saga" => saga.to_string()).increment(1),
            RecordKind::CompensationStarted => counter!(
                COMPENSATIONS_STARTED,
                "saga" => saga.to_string(),
                "failed_step" => last_step.unwrap_or("none").to_string()
            )
            .increment(1),
            RecordKind::AttemptSucceeded => attempt_ended(saga, record, AttemptOutcome::Succeeded),
            RecordKind::AttemptFailed => {
                let permanent = record.detail.get("class").and_then(Value::as_str)
                    == Some(class_name(ErrorClass::Permanent));
                let outcome = if permanent {
                    AttemptOutcome::FailedPermanent
                } else {
                    AttemptOutcome::FailedRetryable
                };
                attempt_ended(saga, record, outcome);
            }
            RecordKind::AttemptTimedOut => {
                attempt_ended(saga, record, AttemptOutcome::TimedOut);
                timer_lag(TimerKind::Timeout, record.detail.get("deadline"), now);
            }
            RecordKind::RetryScheduled => counter!(
                RETRIES_SCHEDULED,
                "saga" => saga.to_string(),
                "step" => record.step.clone().unwrap_or_default(),
                "direction" => direction_of(record)
            )
            .increment(1),
            RecordKind::RetryTimerFired => {
                timer_lag(TimerKind::Retry, record.detail.get("at"), now);
            }
            RecordKind::ReplyIgnored => {
                let cause = record
                    .detail
                    .get("reason")
                    .and_then(Value::as_str)
                    .map_or(ReplyIgnoredCause::Other, ReplyIgnoredCause::of_reason);
                counter!(
                    REPLIES_IGNORED,
                    "saga" => saga.to_string(),
                    "cause" => cause.as_str()
                )
                .increment(1);
            }
            RecordKind::AttemptDispatched
            | RecordKind::DeadlineExceeded
            | RecordKind::OperatorAction
            | RecordKind::MessageRejected => {}
        }
        if matches!(
            record.kind,
            RecordKind::AttemptFailed | RecordKind::AttemptTimedOut
        ) {
            last_step = record.step.as_deref();
        }
    }
}

/// The serialized name of an error class, as the machine writes it in a failure's detail.
fn class_name(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Retryable => "retryable",
        ErrorClass::Permanent => "permanent",
    }
}

fn direction_of(record: &Record) -> &'static str {
    record.direction.map_or("", Direction::as_str)
}

fn attempt_ended(saga: &str, record: &Record, outcome: AttemptOutcome) {
    counter!(
        STEP_ATTEMPTS,
        "saga" => saga.to_string(),
        "step" => record.step.clone().unwrap_or_default(),
        "direction" => direction_of(record),
        "outcome" => outcome.as_str()
    )
    .increment(1);
}

fn timer_lag(kind: TimerKind, due: Option<&Value>, now: Timestamp) {
    if let Some(due) = due.and_then(Value::as_i64) {
        let lag_ms = (now.as_millis() - due).max(0);
        histogram!(TIMER_LAG, "timer" => kind.as_str()).record(lag_ms as f64 / 1000.0);
    }
}

/// An attempt answered `took` after its dispatch was committed.
pub fn attempt_duration(saga: &str, step: &str, direction: Direction, took: Duration) {
    histogram!(
        STEP_ATTEMPT_DURATION,
        "saga" => saga.to_string(),
        "step" => step.to_string(),
        "direction" => direction.as_str()
    )
    .record(took.as_secs_f64());
}

/// A write refused for `cause`.
pub fn stale_write(cause: StaleCause) {
    counter!(STALE_WRITES, "cause" => cause.as_str()).increment(1);
}

/// How many committed step commands the relay holds because the broker did not accept them.
pub fn unpublished(commands: usize) {
    gauge!(UNPUBLISHED_COMMANDS).set(commands as f64);
}

/// A batch of `sagas` writes committed (or failed) in `took`.
pub fn commit(sagas: usize, took: Duration) {
    histogram!(COMMIT_BATCH_SIZE).record(sagas as f64);
    histogram!(COMMIT_DURATION).record(took.as_secs_f64());
}
