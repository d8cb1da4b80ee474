//! What every Sagaflow process does the same way: log to stderr, and stop on SIGTERM or
//! Ctrl-C. The `sagaflow` binary, the benchmarks and worker binaries all use these, so they log
//! and stop alike.

/// Logs `tracing` events to stderr, filtered by `RUST_LOG` (default: warnings and errors).
///
/// Call it once, first thing in `main`; a second call does nothing.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second call finds a subscriber in place: keeping the first is what callers want.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
