//! Metrics of the step side: what a worker (or the embedded engine's in-process pool) counts
//! and times, through the `metrics` crate's facade.
//!
//! Nothing is exported unless the process installs a recorder:
//! [`crate::process::serve_metrics`] installs the Prometheus exporter behind `/metrics`. The
//! facade's macros are re-exported here, so a participant can count its own events without
//! depending on the `metrics` crate itself, as the demo inventory counts its reservations:
//!
//! ```
//! sagaflow_sdk::metrics::counter!("shop_reservations_total", "event" => "created").increment(1);
//! ```
//!
//! `docs/metrics.md` lists every series.

use std::time::Duration;

pub use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::protocol::{Direction, ErrorClass, SagaSpec, StepKind, StepOutcome};

/// From a command's dispatch (its publication to the broker, or its hand-off to the in-process
/// pool) to the start of its handler, in seconds (histogram; `saga`, `step`, `direction`).
pub const STEP_QUEUE: &str = "sagaflow_step_queue_seconds";
/// How long step handlers ran, in seconds (histogram; `saga`, `step`, `direction`).
pub const HANDLER_DURATION: &str = "sagaflow_worker_handler_duration_seconds";
/// Commands a worker answered (counter; `saga`, `step`, `direction`, `outcome`: succeeded,
/// failed_retryable, failed_permanent, duplicate, stale_epoch).
pub const WORKER_COMMANDS: &str = "sagaflow_worker_commands_total";
/// Commands answered from the worker's record of an earlier run with the same idempotency
/// key, without running the handler (counter; `saga`, `step`, `direction`).
pub const DUPLICATE_COMMANDS: &str = "sagaflow_worker_duplicate_commands_total";
/// Messages on a worker's subjects that were not commands it could run: not JSON, an unknown
/// version or saga (counter; `reason`).
pub const REJECTED_MESSAGES: &str = "sagaflow_worker_rejected_messages_total";
/// Messages of a JetStream consumer not yet delivered (gauge; `stream`, `consumer`).
pub const CONSUMER_PENDING: &str = "sagaflow_consumer_pending_messages";
/// Messages of a JetStream consumer delivered and not yet acknowledged (gauge; `stream`,
/// `consumer`).
pub const CONSUMER_ACK_PENDING: &str = "sagaflow_consumer_ack_pending_messages";

/// How a command ended at a worker, as [`WORKER_COMMANDS`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The handler succeeded.
    Succeeded,
    /// The handler failed with a retryable error.
    FailedRetryable,
    /// The handler failed with a permanent error.
    FailedPermanent,
    /// Answered from the record of an earlier run with the same idempotency key.
    Duplicate,
    /// Refused: sent under a superseded epoch of its partition.
    StaleEpoch,
}

impl CommandOutcome {
    /// How a handler's outcome is counted.
    pub fn of(outcome: &StepOutcome) -> Self {
        match outcome {
            StepOutcome::Succeeded { .. } => CommandOutcome::Succeeded,
            StepOutcome::Failed { error } if error.class == ErrorClass::Permanent => {
                CommandOutcome::FailedPermanent
            }
            StepOutcome::Failed { .. } => CommandOutcome::FailedRetryable,
        }
    }

    /// Every outcome.
    pub const ALL: [CommandOutcome; 5] = [
        CommandOutcome::Succeeded,
        CommandOutcome::FailedRetryable,
        CommandOutcome::FailedPermanent,
        CommandOutcome::Duplicate,
        CommandOutcome::StaleEpoch,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOutcome::Succeeded => "succeeded",
            CommandOutcome::FailedRetryable => "failed_retryable",
            CommandOutcome::FailedPermanent => "failed_permanent",
            CommandOutcome::Duplicate => "duplicate",
            CommandOutcome::StaleEpoch => "stale_epoch",
        }
    }
}

/// A series' type, for [`describe_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution over buckets.
    Histogram,
}

/// One series to describe: its name, type, unit and help text.
pub type Series = (&'static str, Kind, Unit, &'static str);

/// Gives each of `series` its description and unit (the `# HELP` line of `/metrics`).
pub fn describe_all(series: &[Series]) {
    for &(name, kind, unit, help) in series {
        match kind {
            Kind::Counter => describe_counter!(name, unit, help),
            Kind::Gauge => describe_gauge!(name, unit, help),
            Kind::Histogram => describe_histogram!(name, unit, help),
        }
    }
}

/// The step side's series.
const SERIES: [Series; 7] = [
    (
        STEP_QUEUE,
        Kind::Histogram,
        Unit::Seconds,
        "From a command's dispatch to the start of its handler.",
    ),
    (
        HANDLER_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "How long step handlers ran.",
    ),
    (
        WORKER_COMMANDS,
        Kind::Counter,
        Unit::Count,
        "Commands a worker answered, by outcome.",
    ),
    (
        DUPLICATE_COMMANDS,
        Kind::Counter,
        Unit::Count,
        "Commands answered from the worker's record without running the handler.",
    ),
    (
        REJECTED_MESSAGES,
        Kind::Counter,
        Unit::Count,
        "Messages on a worker's subjects that were not commands it could run.",
    ),
    (
        CONSUMER_PENDING,
        Kind::Gauge,
        Unit::Count,
        "Messages of a JetStream consumer not yet delivered.",
    ),
    (
        CONSUMER_ACK_PENDING,
        Kind::Gauge,
        Unit::Count,
        "Messages of a JetStream consumer delivered and not yet acknowledged.",
    ),
];

/// Gives the step-side series their descriptions and units. Call once after installing a
/// recorder ([`crate::process::serve_metrics`] does).
pub fn describe() {
    describe_all(&SERIES);
    for reason in RejectReason::ALL {
        counter!(REJECTED_MESSAGES, "reason" => reason.as_str()).absolute(0);
    }
}

/// Records `took` in histogram `name` of `saga`'s `step` in `direction`.
fn step_histogram(
    name: &'static str,
    saga: &str,
    step: &str,
    direction: Direction,
    took: Duration,
) {
    histogram!(
        name,
        "saga" => saga.to_string(),
        "step" => step.to_string(),
        "direction" => direction.as_str()
    )
    .record(took.as_secs_f64());
}

/// A command of `saga`'s `step` waited `waited` between its dispatch and its handler's start.
pub fn queued(saga: &str, step: &str, direction: Direction, waited: Duration) {
    step_histogram(STEP_QUEUE, saga, step, direction, waited);
}

/// A handler of `saga`'s `step` ran for `took`.
pub fn handled(saga: &str, step: &str, direction: Direction, took: Duration) {
    step_histogram(HANDLER_DURATION, saga, step, direction, took);
}

/// The counter of commands of `saga`'s `step` answered with `outcome`.
fn commands_counter(
    saga: &str,
    step: &str,
    direction: Direction,
    outcome: CommandOutcome,
) -> ::metrics::Counter {
    counter!(
        WORKER_COMMANDS,
        "saga" => saga.to_string(),
        "step" => step.to_string(),
        "direction" => direction.as_str(),
        "outcome" => outcome.as_str()
    )
}

/// The counter of duplicate commands of `saga`'s `step`.
fn duplicates_counter(saga: &str, step: &str, direction: Direction) -> ::metrics::Counter {
    counter!(
        DUPLICATE_COMMANDS,
        "saga" => saga.to_string(),
        "step" => step.to_string(),
        "direction" => direction.as_str()
    )
}

/// A worker answered a command of `saga`'s `step` so.
pub fn answered(saga: &str, step: &str, direction: Direction, outcome: CommandOutcome) {
    commands_counter(saga, step, direction, outcome).increment(1);
    if outcome == CommandOutcome::Duplicate {
        duplicates_counter(saga, step, direction).increment(1);
    }
}

/// Why a message on a worker's subjects was not run, as [`REJECTED_MESSAGES`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not a command of the protocol (not JSON, or missing fields).
    MalformedCommand,
    /// A protocol version this worker does not speak.
    UnsupportedVersion,
    /// A saga (or version) this worker does not serve.
    UnknownSaga,
}

impl RejectReason {
    /// Every reason.
    pub const ALL: [RejectReason; 3] = [
        RejectReason::MalformedCommand,
        RejectReason::UnsupportedVersion,
        RejectReason::UnknownSaga,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MalformedCommand => "malformed_command",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::UnknownSaga => "unknown_saga",
        }
    }
}

/// A message that was not a command the worker could run.
pub fn rejected(reason: RejectReason) {
    counter!(REJECTED_MESSAGES, "reason" => reason.as_str()).increment(1);
}

/// The lag of JetStream consumer `consumer` of `stream`: `pending` messages not yet delivered
/// and `ack_pending` delivered but not acknowledged.
pub fn consumer_lag(stream: &str, consumer: &str, pending: u64, ack_pending: u64) {
    gauge!(
        CONSUMER_PENDING,
        "stream" => stream.to_string(),
        "consumer" => consumer.to_string()
    )
    .set(pending as f64);
    gauge!(
        CONSUMER_ACK_PENDING,
        "stream" => stream.to_string(),
        "consumer" => consumer.to_string()
    )
    .set(ack_pending as f64);
}

/// The directions a step of `spec` runs in: forward, and compensate for a compensatable one.
pub fn step_directions(spec: &SagaSpec) -> impl Iterator<Item = (&str, Direction)> {
    spec.steps.iter().flat_map(|step| {
        let compensatable = step.kind == StepKind::Compensatable;
        [Direction::Forward, Direction::Compensate]
            .into_iter()
            .filter(move |d| *d == Direction::Forward || compensatable)
            .map(move |d| (step.name.as_str(), d))
    })
}

/// Starts the series of `spec`'s steps at zero, so that rates over them exist before the first
/// event.
pub fn describe_saga_steps(spec: &SagaSpec) {
    let saga = spec.name.as_str();
    for (step, direction) in step_directions(spec) {
        for outcome in CommandOutcome::ALL {
            commands_counter(saga, step, direction, outcome).absolute(0);
        }
        duplicates_counter(saga, step, direction).absolute(0);
    }
}
