//! `sagaflow`: the Sagaflow command line.

mod act;
mod audit;
mod common;
mod demo;
mod history;
mod list;
mod nodes;
mod retention;
mod serve;
mod show;
mod start;
mod stuck;
mod table;

use clap::{Parser, Subcommand};

/// Sagaflow: saga orchestration with compensation.
#[derive(Debug, Parser)]
#[command(name = "sagaflow", version, about, long_about = None)]
struct Args {
    /// How log lines on stderr are written: human (default) or json (one object a line, with
    /// the fields of the spans an event happened in). RUST_LOG filters them as usual.
    #[arg(
        long,
        global = true,
        env = "SAGAFLOW_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: sagaflow_sdk::process::LogFormat,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run a few hundred order sagas (and some trip bookings) embedded, with injected declines
    /// and transient failures, then print a summary, one compensated saga's history and an
    /// invariant check over the demo services. Safe to run again on the same database: starts
    /// are idempotent, so an interrupted run picks up where it stopped.
    Demo(demo::DemoArgs),
    /// Find sagas: filter by status, definition name and version, current step, created or
    /// updated time, error text and start key; oldest first, a page at a time.
    List(list::ListArgs),
    /// The sagas that need an operator: stuck ones, and running or compensating ones that have
    /// made no progress for longer than a threshold, each with the reason.
    Stuck(stuck::StuckArgs),
    /// One saga in detail: status, pinned definition version, each step with its attempts,
    /// last error, output and idempotency keys, what it does now and when it wakes next.
    Show(show::ShowArgs),
    /// One saga's complete history as a timeline: every transition, attempt, error, timer and
    /// operator action, in order, with time and actor.
    History(history::HistoryArgs),
    /// Query the history of every saga: by saga, definition name, record kind, step,
    /// direction, actor and time; export as JSON lines.
    Audit(audit::AuditArgs),
    /// Remove whole finished (completed or compensated) sagas older than a cutoff, with their
    /// history and attempts, and say how many; --dry-run only counts.
    Retention(retention::RetentionArgs),
    /// Run the engine in distributed mode: step commands and replies over NATS JetStream,
    /// workers in their own processes. SIGTERM stops it gracefully.
    Serve(serve::ServeArgs),
    /// The engine nodes sharing the database: each one's state, the partitions it holds with
    /// their fencing epochs, lease expiry and last renewal, and the partitions nobody holds.
    Nodes(nodes::NodesArgs),
    /// Start a saga through a running engine (over NATS) and print its id. Idempotent with
    /// --key.
    Start(start::StartArgs),
    /// Resume a stuck saga: its failed step or compensation is tried again now, with a fresh
    /// retry budget. With --all, every stuck saga a filter matches (a dry run unless
    /// --execute). Requires --reason; recorded with the actor in the history.
    Resume(act::ResumeArgs),
    /// Retry the current step now instead of waiting out its backoff. Requires --reason.
    RetryStep(act::RetryStepArgs),
    /// Declare the current step done by hand: a forward action with the output later steps
    /// read (--output, checked against the step's type), or a stuck compensation. Requires
    /// --reason.
    SkipStep(act::SkipStepArgs),
    /// Cancel a saga moving forward before its pivot: it compensates what it completed. With
    /// --all, every saga a filter matches (a dry run unless --execute). Requires --reason.
    Cancel(act::CancelArgs),
    /// Print a new random key for secret fields as a key file line (`ID:BASE64`): put it
    /// first in the key file of the workers and clients to rotate, keeping the old lines.
    Keygen(KeygenArgs),
}

/// Options of `sagaflow keygen`.
#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// The key's id (letters, digits, `-`, `_`, `.`); envelopes name it. The current UTC time
    /// by default (k20261207-043000).
    #[arg(long)]
    id: Option<String>,
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    // `2026-12-07T04:30:00.000Z` -> `k20261207-043000`.
    let id = args.id.unwrap_or_else(|| {
        let now = sagaflow_engine::ops::time::format_time(sagaflow_sdk::Timestamp::now());
        let digits: String = now.chars().take(19).filter(char::is_ascii_digit).collect();
        format!("k{}-{}", &digits[..8], &digits[8..])
    });
    common::print_text(sagaflow_sdk::protocol::SecretKeys::generate_line(&id)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match run().await {
        // The reader of our output went away (`sagaflow stuck --json | head`): nothing more
        // can be said to it, and it is no failure of ours.
        Err(error) if common::is_broken_pipe(&error) => std::process::exit(0),
        result => result,
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // Held to the end: dropping it sends the spans still buffered.
    let _telemetry = sagaflow_sdk::process::init_telemetry("sagaflow", args.log_format)?;
    match args.command {
        Commands::Demo(demo) => demo::run(demo).await,
        Commands::List(args) => list::run(args).await,
        Commands::Stuck(args) => stuck::run(args).await,
        Commands::Show(args) => show::run(args).await,
        Commands::History(args) => history::run(args).await,
        Commands::Audit(args) => audit::run(args).await,
        Commands::Retention(args) => retention::run(args).await,
        Commands::Serve(args) => serve::run(args).await,
        Commands::Nodes(args) => nodes::run(args).await,
        Commands::Start(args) => start::run(args).await,
        Commands::Resume(args) => act::resume(args).await,
        Commands::RetryStep(args) => act::retry_step(args).await,
        Commands::SkipStep(args) => act::skip_step(args).await,
        Commands::Cancel(args) => act::cancel(args).await,
        Commands::Keygen(args) => keygen(args),
    }
}
