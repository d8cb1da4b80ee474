//! What every Sagaflow process does the same way: log to stderr, serve `/metrics` when asked,
//! and stop on SIGTERM or Ctrl-C. The `sagaflow` binary, the benchmarks and worker binaries
//! all use these, so they log, export and stop alike.

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
/// warnings and errors).
///
/// Call it once, first thing in `main`; a second call does nothing.
pub fn init_logging() {
    init_logging_as(LogFormat::Human);
}

/// Logs `tracing` events to stderr in `format`, filtered by `RUST_LOG` (default: warnings and
/// errors). Call it once, first thing in `main`; a second call does nothing.
pub fn init_logging_as(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call finds a subscriber in place: keeping the first is what callers want.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
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
