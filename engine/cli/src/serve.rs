//! `sagaflow serve`: the engine in distributed mode.

use std::time::Duration;

use anyhow::Context;
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::Store;

/// Options of `sagaflow serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where sagas live: postgres://USER@HOST/DB (or sqlite://FILE for a single engine).
    #[arg(long, env = "SAGAFLOW_DATABASE_URL")]
    database_url: String,
    /// The NATS server, with JetStream enabled.
    #[arg(
        long,
        env = "SAGAFLOW_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// How long a SIGTERM waits for the transitions in progress before exiting anyway.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_secs: u64,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let store = Store::connect(&args.database_url).await?;
    let engine =
        Engine::launch_distributed(store, &args.nats_url, Vec::new(), EngineOptions::default())
            .await
            .context("starting the engine")?;
    eprintln!(
        "sagaflow engine serving on {} (start sagas with `sagaflow start` or a request on sagaflow.start)",
        args.nats_url
    );
    sagaflow_sdk::process::termination().await;
    eprintln!("stopping: no new work; finishing the transitions in progress");
    engine
        .shutdown_within(Duration::from_secs(args.shutdown_grace_secs))
        .await;
    eprintln!("stopped");
    Ok(())
}
