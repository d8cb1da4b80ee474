//! What every Sagaflow process does the same way: log to stderr, serve `/metrics` when asked,
//! and stop on SIGTERM or Ctrl-C. The `sagaflow` binary, the benchmarks and worker binaries
//! all use these, so they log, export and stop alike.

use opentelemetry_otlp::WithExportConfig;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event (the default).
    #[default]
    Human,
    /// One JSON object per line, with the event's fields and those of the spans it happened
    /// in (`saga`, `step`, `node`, ...), for log collectors.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}`: use human or json")),
        }
    }
}

/// Logs `tracing` events to stderr in the human format, filtered by `RUST_LOG` (default:
/// warnings and errors), and exports no spans. For tools that never trace; a service calls
/// [`init_telemetry`].
///
/// Call it once, first thing in `main`; a second call does nothing.
pub fn init_logging() {
    let _ = tracing_subscriber::registry()
        .with(log_filter())
        .with(log_layer(LogFormat::Human))
        .try_init();
}

/// What a process keeps while it exports spans: dropping it sends the spans still buffered
/// (waiting for at most the exporter's timeout), so hold it until `main` returns.
#[must_use = "dropping the telemetry guard stops exporting spans"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (`OTEL_EXPORTER_OTLP_ENDPOINT` was set).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: spans still buffered were not all exported: {error}");
        }
    }
}

/// Sets up what this process reports, once, first thing in `main`:
///
/// - logs: `tracing` events on stderr in `format`, filtered by `RUST_LOG` (default: warnings
///   and errors);
/// - traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
///   set, the spans of Sagaflow and of the step handlers are exported over OTLP/HTTP
///   (protobuf, or JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`) as service `service`
///   (`OTEL_SERVICE_NAME` overrides it). Unset, nothing is recorded and nothing costs.
///
/// A second call sets nothing up and exports nothing.
pub fn init_telemetry(service: &str, format: LogFormat) -> Result<Telemetry, crate::SdkError> {
    if otlp_endpoint().is_none() {
        let _ = tracing_subscriber::registry()
            .with(log_filter())
            .with(log_layer(format))
            .try_init();
        return Ok(Telemetry { provider: None });
    }
    let failed = |detail: String| crate::SdkError::Telemetry { detail };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(otlp_protocol().map_err(failed)?)
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|name| name.is_empty()) {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(SagaRootIds::default())
        // Sagaflow samples by saga id itself (`sampled_ratio`), before any span exists; the
        // SDK's own `traceidratio` reads the low bits of the trace id, which in a saga id
        // hold the UUID variant, and would drop them all.
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_resource(resource.build())
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "sagaflow");
    // One filter in front of both layers, not one per layer: with per-layer filters, a worker
    // on PostgreSQL whose RUST_LOG also enabled its spans lost most of them from the export
    // (per-layer filters keep state between a callsite's check and its span).
    let filter = SpansAndLogs {
        logs: log_filter(),
        spans: exported_spans(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        // The log lines only: formatting the fields of every exported span for nothing cost
        // more than exporting it.
        .with(log_layer(format).with_filter(log_filter()))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // Each of these is an attribute more on every span, for every saga.
                .with_location(false)
                .with_threads(false)
                .with_tracked_inactivity(false)
                // Spans are placed with explicit parents (`telemetry`), never the current
                // OpenTelemetry context.
                .with_context_activation(false),
        )
        .try_init();
    if installed.is_err() {
        // Another subscriber was set first: its spans are not ours to export.
        let _ = provider.shutdown();
        return Ok(Telemetry { provider: None });
    }
    opentelemetry::global::set_tracer_provider(provider.clone());
    crate::telemetry::set_exporting(sampled_ratio().map_err(failed)?);
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// `RUST_LOG`, or warnings and errors.
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
}

/// The log lines on stderr.
fn log_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Human => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

/// The filter of a process that exports spans: the spans [`exported_spans`] names, and the
/// events (and spans) `RUST_LOG` asks for.
struct SpansAndLogs {
    logs: tracing_subscriber::EnvFilter,
    spans: tracing_subscriber::filter::Targets,
}

impl SpansAndLogs {
    fn exports(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_span() && self.spans.would_enable(metadata.target(), metadata.level())
    }
}

impl<S> Layer<S> for SpansAndLogs
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.exports(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            Layer::<S>::register_callsite(&self.logs, metadata)
        }
    }

    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.exports(metadata) || Layer::<S>::enabled(&self.logs, metadata, cx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        let logs = Layer::<S>::max_level_hint(&self.logs)?;
        Some(logs.max(tracing::level_filters::LevelFilter::INFO))
    }

    // `RUST_LOG` may filter by span (`[span{field=value}]`): the log filter follows spans.
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        Layer::<S>::on_new_span(&self.logs, attrs, id, cx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        Layer::<S>::on_record(&self.logs, id, values, cx);
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        Layer::<S>::on_enter(&self.logs, id, cx);
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        Layer::<S>::on_exit(&self.logs, id, cx);
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        Layer::<S>::on_close(&self.logs, id, cx);
    }
}

/// Which spans are exported: every span at INFO or above, Sagaflow's and the step handlers',
/// but not those of the database driver, the HTTP stack or the exporter itself (whose spans
/// would be exported by the export they describe).
fn exported_spans() -> tracing_subscriber::filter::Targets {
    use tracing::level_filters::LevelFilter;
    tracing_subscriber::filter::Targets::new()
        .with_default(LevelFilter::INFO)
        .with_targets([
            ("sqlx", LevelFilter::WARN),
            ("sea_orm", LevelFilter::WARN),
            ("async_nats", LevelFilter::WARN),
            ("hyper", LevelFilter::OFF),
            ("hyper_util", LevelFilter::OFF),
            ("h2", LevelFilter::OFF),
            ("reqwest", LevelFilter::OFF),
            ("opentelemetry", LevelFilter::OFF),
            ("opentelemetry_sdk", LevelFilter::OFF),
            ("opentelemetry_otlp", LevelFilter::OFF),
            ("opentelemetry_http", LevelFilter::OFF),
        ])
}

/// The share of sagas traced, from `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`: every
/// saga unless `traceidratio` (or `parentbased_traceidratio`) names a ratio. The decision is
/// taken on the saga id, so that every engine and worker with the same ratio traces the same
/// sagas, and nothing at all is recorded for the others.
fn sampled_ratio() -> Result<f64, String> {
    let sampler = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
    match sampler.trim() {
        "" | "always_on" | "parentbased_always_on" => Ok(1.0),
        "always_off" | "parentbased_always_off" => Ok(0.0),
        "traceidratio" | "parentbased_traceidratio" => {
            let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|_| "1.0".into());
            arg.trim()
                .parse::<f64>()
                .ok()
                .filter(|ratio| (0.0..=1.0).contains(ratio))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG `{arg}` is not a ratio between 0 and 1")
                })
        }
        other => Err(format!(
            "OTEL_TRACES_SAMPLER `{other}` is not supported: use always_on, always_off or \
             traceidratio (with OTEL_TRACES_SAMPLER_ARG)"
        )),
    }
}

/// Where spans go, if anywhere: the standard OpenTelemetry variables, traces' own first.
fn otlp_endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .find(|value| !value.trim().is_empty())
}

/// The OTLP protocol the variables ask for; protobuf over HTTP by default, as the
/// specification says.
fn otlp_protocol() -> Result<opentelemetry_otlp::Protocol, String> {
    let asked = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .filter_map(|name| std::env::var(name).ok())
    .find(|value| !value.trim().is_empty());
    match asked.as_deref().map(str::trim) {
        None | Some("http/protobuf") => Ok(opentelemetry_otlp::Protocol::HttpBinary),
        Some("http/json") => Ok(opentelemetry_otlp::Protocol::HttpJson),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL `{other}` is not supported: use http/protobuf or http/json"
        )),
    }
}

/// Random ids, except for a saga's root span, whose ids come from its saga id
/// ([`crate::telemetry::record_finished_saga`]).
#[derive(Debug, Default)]
struct SagaRootIds {
    random: opentelemetry_sdk::trace::RandomIdGenerator,
}

impl opentelemetry_sdk::trace::IdGenerator for SagaRootIds {
    fn new_trace_id(&self) -> opentelemetry::trace::TraceId {
        crate::telemetry::NEXT_ROOT_IDS
            .with(|ids| ids.get())
            .map_or_else(|| self.random.new_trace_id(), |(trace, _)| trace)
    }

    fn new_span_id(&self) -> opentelemetry::trace::SpanId {
        crate::telemetry::NEXT_ROOT_IDS
            .with(|ids| ids.get())
            .map_or_else(|| self.random.new_span_id(), |(_, span)| span)
    }
}

/// Resolves when the process is asked to stop: SIGTERM (what `kill` and service managers send)
/// or Ctrl-C. Hand it to [`crate::worker::Worker::run`] or await it before shutting an engine
/// down.
///
/// Where the SIGTERM handler cannot be installed, only Ctrl-C stops the process: that is said
/// in a warning, and the process keeps serving rather than failing.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(error) => eprintln!("warning: cannot handle SIGTERM ({error}); stop with Ctrl-C"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Histogram buckets, in seconds, for every `_seconds` series: from half a millisecond (a step
/// of an embedded saga) to a minute (a retry's backoff).
const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Buckets for counts per batch (`sagaflow_commit_batch_size`).
const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Serves every metric of this process in the Prometheus text format at
/// `http://{addr}/metrics`, labelled with `node` = `node` when given (an engine node's or a
/// worker's id), and describes the step-side series. Call it once, inside the tokio runtime,
/// before the engine or worker starts; every metric recorded before it is lost.
pub fn serve_metrics(
    addr: std::net::SocketAddr,
    node: Option<&str>,
) -> Result<(), crate::SdkError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let failed = |detail: String| crate::SdkError::Metrics { addr, detail };
    let mut builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &SIZE_BUCKETS))
        .map_err(|e| failed(e.to_string()))?;
    if let Some(node) = node {
        builder = builder.add_global_label("node", node);
    }
    builder.install().map_err(|e| failed(e.to_string()))?;
    crate::metrics::describe();
    Ok(())
}
