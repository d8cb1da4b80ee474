//! One OpenTelemetry trace per saga, across the engine and every worker.
//!
//! A saga's trace id is its saga id, and its root span id the id's last 8 bytes
//! ([`TraceParent::of_saga`]): any process, on any node, at any time, can put a span into the
//! saga's trace without a lookup. Messages carry the sender's span in W3C `traceparent`
//! headers (`docs/protocol.md` section 6), so a worker's handling is the child of the engine's
//! publish, and the engine's handling of the reply the child of the worker's.
//!
//! Spans are `tracing` spans. They reach an OpenTelemetry exporter only where the process set
//! one up ([`crate::process::init_telemetry`] with `OTEL_EXPORTER_OTLP_ENDPOINT` set);
//! otherwise every helper here returns at once and no header is written.

use std::cell::Cell;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use sagaflow_protocol::{Direction, ErrorClass, StepOutcome, TraceContext, TraceParent};
use tracing::{Span, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// Whether this process exports spans (set once by the telemetry set-up).
static EXPORTING: AtomicBool = AtomicBool::new(false);
/// Which sagas are traced: those whose id's 62 random low bits (the id's last 8 bytes without
/// the UUID variant's two bits) fall below this; every saga by default.
static SAMPLED_BELOW: AtomicU64 = AtomicU64::new(u64::MAX);
/// The low bits of a saga id that are random in every UUID of the RFC 9562 variant.
const RANDOM_LOW_BITS: u64 = u64::MAX >> 2;

thread_local! {
    /// The ids the next span built on this thread must have: a saga's root span is built with
    /// the ids every other span of the saga already names as its trace and root.
    pub(crate) static NEXT_ROOT_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Whether this process exports spans: an OpenTelemetry exporter is set up.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

#[cfg(feature = "process")]
pub(crate) fn set_exporting(ratio: f64) {
    let below = if ratio >= 1.0 {
        u64::MAX
    } else {
        // The cast saturates; a ratio of 0 (or NaN) traces nothing.
        (ratio.max(0.0) * (RANDOM_LOW_BITS as f64 + 1.0)) as u64
    };
    SAMPLED_BELOW.store(below, Ordering::Relaxed);
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether saga `saga_id`'s spans are recorded here: spans are exported and the saga is in the
/// sampled share (`OTEL_TRACES_SAMPLER=traceidratio` with `OTEL_TRACES_SAMPLER_ARG`). The
/// decision is the saga id's, so every process with the same ratio takes the same one; a
/// message's `traceparent` flags, where it has one, decide instead.
pub fn traced(saga_id: Uuid) -> bool {
    if !exporting() {
        return false;
    }
    let below = SAMPLED_BELOW.load(Ordering::Relaxed);
    below == u64::MAX || {
        let root = TraceParent::root_span_id(saga_id);
        (u64::from_be_bytes(root) & RANDOM_LOW_BITS) < below
    }
}

/// Puts `span` into the trace of saga `saga_id`: under the span that sent the message being
/// handled (`sender`, read from its headers), or else under the saga's root span. Call it
/// before the span is entered; it does nothing for a span no exporter records.
pub fn join_saga_trace(span: &Span, saga_id: Uuid, sender: Option<&TraceContext>) {
    if !exporting() || span.is_disabled() {
        return;
    }
    let root;
    let (parent, state) = match sender {
        Some((parent, state)) => (parent, state.as_deref()),
        None => {
            root = TraceParent::of_saga(saga_id);
            (&root, None)
        }
    };
    let context = Context::new().with_remote_span_context(span_context(parent, state));
    // Refused only for a span already started or not recorded: nothing to correct then.
    let _ = span.set_parent(context);
}

/// Puts `span` under `cause` (a span of this process) when that one is recorded, else under
/// the root of saga `saga_id`'s trace.
pub fn follow(span: &Span, cause: &Span, saga_id: Uuid) {
    if !exporting() || span.is_disabled() {
        return;
    }
    if cause.is_disabled() {
        join_saga_trace(span, saga_id, None);
    } else {
        let _ = span.set_parent(cause.context());
    }
}

/// The trace context naming `span`, for the headers of the message sent within it; `None`
/// when nothing records the span (then no header is written).
pub fn trace_parent(span: &Span) -> Option<TraceContext> {
    if !exporting() || span.is_disabled() {
        return None;
    }
    let context = span.context();
    let otel_span = context.span();
    let current = otel_span.span_context();
    if !current.is_valid() {
        return None;
    }
    let parent = TraceParent {
        trace_id: current.trace_id().to_bytes(),
        parent_id: current.span_id().to_bytes(),
        flags: current.trace_flags().to_u8(),
    };
    let state = current.trace_state().header();
    Some((parent, (!state.is_empty()).then_some(state)))
}

/// Records on `span` (declared with an empty `sagaflow.outcome` field) how a step's attempt
/// ended: `succeeded`, `failed_retryable` or `failed_permanent`; a permanent failure also
/// marks the span as an error, with the error's code and message.
pub fn record_outcome(span: &Span, outcome: &StepOutcome) {
    if span.is_disabled() {
        return;
    }
    span.record(
        "sagaflow.outcome",
        crate::metrics::CommandOutcome::of(outcome).as_str(),
    );
    if let StepOutcome::Failed { error } = outcome
        && error.class == ErrorClass::Permanent
        && exporting()
    {
        span.set_status(Status::error(format!("{}: {}", error.code, error.message)));
    }
}

/// The attempt a message is about, as its spans name it.
#[derive(Debug, Clone, Copy)]
pub struct MessageAbout<'a> {
    /// The saga.
    pub saga_id: Uuid,
    /// The saga's definition name (empty where the message does not say).
    pub saga: &'a str,
    /// The step.
    pub step: &'a str,
    /// Forward or compensate.
    pub direction: Direction,
    /// The attempt.
    pub attempt: u32,
    /// The engine node or worker handling or sending the message.
    pub node: &'a str,
}

/// The span of handling a received message (OpenTelemetry messaging `process`, kind consumer),
/// in the saga's trace under the span that sent it (`sender`, from the message's headers), or
/// under the saga's root when the message names none. It has an empty `sagaflow.outcome`
/// field ([`record_outcome`]).
pub fn processing_span(
    subject: &str,
    message_id: Option<&str>,
    sender: Option<&TraceContext>,
    about: &MessageAbout<'_>,
) -> Span {
    let recorded = match sender {
        Some((parent, _)) => exporting() && parent.is_sampled(),
        None => traced(about.saga_id),
    };
    if !recorded {
        return Span::none();
    }
    let name = format!("process {subject}");
    let span = info_span!(
        parent: None,
        "process",
        otel.name = name.as_str(),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
        sagaflow.saga_id = %about.saga_id,
        sagaflow.saga = about.saga,
        sagaflow.step = about.step,
        sagaflow.direction = %about.direction,
        sagaflow.attempt = about.attempt,
        sagaflow.node = about.node,
        sagaflow.outcome = tracing::field::Empty,
    );
    join_saga_trace(&span, about.saga_id, sender);
    span
}

/// The span of publishing a message about saga `saga_id` (OpenTelemetry messaging `send`, kind
/// producer) under `cause`, or under the saga's root when `cause` is not recorded, with the
/// trace context to put in the message's headers (`None` when nothing records the span). It
/// has an empty `sagaflow.epoch` field.
///
/// Its only attributes are the message's: the saga, step, attempt and node are those of the
/// span it is under (the transition that dispatched a command, the handling that answers
/// it), and a send happens for every message of every saga, so each attribute repeated here
/// would be paid for many times over.
pub fn sending_span(
    subject: &str,
    message_id: &str,
    saga_id: Uuid,
    cause: &Span,
) -> (Span, Option<TraceContext>) {
    if cause.is_disabled() && !traced(saga_id) {
        return (Span::none(), unsampled(saga_id));
    }
    let name = format!("send {subject}");
    let span = info_span!(
        parent: None,
        "send",
        otel.name = name.as_str(),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
        sagaflow.epoch = tracing::field::Empty,
    );
    follow(&span, cause, saga_id);
    let context = trace_parent(&span);
    (span, context)
}

/// The trace context of a message about saga `saga_id` sent without a recorded span: the
/// saga's root with the `sampled` flag off, so that the receiver records nothing either; `None`
/// where spans are not exported at all (no header is written then).
pub fn unsampled(saga_id: Uuid) -> Option<TraceContext> {
    exporting().then(|| {
        let mut root = TraceParent::of_saga(saga_id);
        root.flags = 0;
        (root, None)
    })
}

/// The remote span context `parent` names.
fn span_context(parent: &TraceParent, state: Option<&str>) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        state
            .and_then(|state| TraceState::from_str(state).ok())
            .unwrap_or_default(),
    )
}

/// A saga that finished, for its root span.
#[derive(Debug, Clone, Copy)]
pub struct FinishedSaga<'a> {
    /// The saga.
    pub saga_id: Uuid,
    /// Its definition's name.
    pub saga: &'a str,
    /// Its definition's version.
    pub version: u32,
    /// How it ended (`completed`, `compensated`).
    pub status: &'a str,
    /// When it was started.
    pub started: SystemTime,
    /// The engine node that committed its end.
    pub node: &'a str,
}

/// Records the root span of a finished saga's trace, from its start to now, with the ids every
/// other span of the saga names ([`TraceParent::of_saga`]). Recorded once, by the node that
/// commits the end; a saga that never ends (stuck, waiting for an operator) has its spans
/// under a root that is not recorded until it does.
pub fn record_finished_saga(finished: FinishedSaga<'_>) {
    if !traced(finished.saga_id) {
        return;
    }
    let root = TraceParent::of_saga(finished.saga_id);
    let tracer = opentelemetry::global::tracer("sagaflow");
    let builder = SpanBuilder::from_name(format!("saga {}", finished.saga))
        .with_kind(SpanKind::Internal)
        .with_start_time(finished.started)
        .with_attributes([
            KeyValue::new("sagaflow.saga_id", finished.saga_id.to_string()),
            KeyValue::new("sagaflow.saga", finished.saga.to_string()),
            KeyValue::new("sagaflow.version", i64::from(finished.version)),
            KeyValue::new("sagaflow.status", finished.status.to_string()),
            KeyValue::new("sagaflow.node", finished.node.to_string()),
        ]);
    NEXT_ROOT_IDS.with(|ids| {
        ids.set(Some((
            TraceId::from_bytes(root.trace_id),
            SpanId::from_bytes(root.parent_id),
        )))
    });
    let mut span = tracer.build_with_context(builder, &Context::new());
    NEXT_ROOT_IDS.with(|ids| ids.set(None));
    opentelemetry::trace::Span::set_status(&mut span, Status::Ok);
    opentelemetry::trace::Span::end(&mut span);
}
