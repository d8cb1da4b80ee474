//! `sagaflow`: the Sagaflow command line.

mod cli;

use clap::{Parser, Subcommand};

/// Sagaflow: saga orchestration with compensation.
#[derive(Debug, Parser)]
#[command(name = "sagaflow", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run a few hundred order sagas (and some trip bookings) embedded, with injected declines
    /// and transient failures, then print a summary, one compensated saga's history and an
    /// invariant check over the demo services. Safe to run again on the same database: starts
    /// are idempotent, so an interrupted run picks up where it stopped.
    Demo(cli::demo::DemoArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match args.command {
        Commands::Demo(demo) => cli::demo::run(demo).await,
    }
}
