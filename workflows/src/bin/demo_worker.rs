//! `sagaflow-demo-worker`: the demo services of the example workflows as a step worker, serving
//! `place_order` and `book_trip` over NATS JetStream.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sagaflow_sdk::Timestamp;
use sagaflow_sdk::keys::SecretKeyArgs;
use sagaflow_sdk::nats::NatsArgs;
use sagaflow_sdk::protocol::{redact_database_url, redact_nats_servers};
use sagaflow_sdk::worker::{ResultStore, Worker, WorkerOptions};
use sagaflow_workflows::{
    DEMO_STOCK, FaultPlan, Faults, Inventory, OrderServices, TripServices, book_trip_saga, install,
    place_order_saga, seed_stock_once,
};
use sea_orm::Database;

/// Serve the demo workflows' steps over NATS.
#[derive(Debug, Parser)]
#[command(name = "sagaflow-demo-worker", version, about)]
struct Args {
    /// The NATS server, with JetStream enabled; for a cluster, several of its servers
    /// separated by commas (nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222):
    /// the worker connects to one and reconnects to another when that one goes away.
    #[arg(
        long,
        env = "SAGAFLOW_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats: NatsArgs,
    /// The keys that open the order's card number (a secret field) and seal secret outputs.
    #[command(flatten)]
    keys: SecretKeyArgs,
    /// Where the demo services keep their tables and this worker its idempotency records.
    #[arg(long, env = "SAGAFLOW_WORKER_DATABASE_URL")]
    database_url: String,
    /// Serve only this saga (place_order or book_trip; repeat for both, the default): a worker
    /// whose NATS user may only touch one saga's subjects (docs/security.md) serves that one.
    #[arg(long = "saga", value_name = "NAME")]
    sagas: Vec<String>,
    /// Names this worker in the saga histories.
    #[arg(long, default_value_t = format!("demo-{}", std::process::id()))]
    id: String,
    /// Attempts run at once per saga.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Chance that a service call fails transiently before applying its effect.
    #[arg(long, default_value_t = 0.0)]
    transient: f64,
    /// Chance that a service applies its effect and then fails (a lost reply).
    #[arg(long, default_value_t = 0.0)]
    lost_reply: f64,
    /// Seed of the injected failures.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Seconds JetStream waits for an ack before redelivering a command.
    #[arg(long, default_value_t = 30)]
    ack_wait_secs: u64,
    /// On how many NATS servers the command and reply streams are kept: 1 on a single server;
    /// 3 on a three-server JetStream cluster, so that a stream survives losing one server.
    /// Existing streams with fewer are raised to this count (never lowered): give it the
    /// engine's --stream-replicas.
    #[arg(long, env = "SAGAFLOW_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9465), labelled with
    /// this worker's id: its commands, handler times, queue times, its consumers' lag and the
    /// demo inventory's reservations. Off unless given.
    #[arg(long, env = "SAGAFLOW_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How log lines on stderr are written: human (default) or json (one object a line).
    #[arg(long, env = "SAGAFLOW_LOG_FORMAT", default_value = "human")]
    log_format: sagaflow_sdk::process::LogFormat,
}

/// How often the command consumers' lag is read while metrics are served.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let nats = args.nats.security()?;
    let secret_keys = args.keys.keys()?;
    // Held to the end: dropping it sends the spans still buffered.
    let _telemetry =
        sagaflow_sdk::process::init_telemetry("sagaflow-demo-worker", args.log_format)?;
    if let Some(addr) = args.metrics_addr {
        sagaflow_sdk::process::serve_metrics(addr, Some(&args.id))?;
        sagaflow_workflows::describe_metrics();
    }
    let url = sagaflow_sdk::database_url(&args.database_url);
    let db = Database::connect(&url)
        .await
        .with_context(|| format!("cannot open {}", redact_database_url(&args.database_url)))?;
    install(&db)
        .await
        .context("installing the demo services' tables")?;
    seed_stock_once(&db, &DEMO_STOCK).await?;
    let faults = Faults::new(
        FaultPlan::uniform(args.transient, args.lost_reply)?,
        args.seed,
    );
    let mut sagas = vec![
        place_order_saga(&OrderServices::new(&db, &faults))?,
        book_trip_saga(&TripServices::new(&db, &faults))?,
    ];
    if !args.sagas.is_empty() {
        if let Some(unknown) = args
            .sagas
            .iter()
            .find(|name| !sagas.iter().any(|s| &s.spec().name == *name))
        {
            anyhow::bail!("--saga {unknown}: this worker serves place_order and book_trip");
        }
        sagas.retain(|s| args.sagas.contains(&s.spec().name));
    }
    let serving: Vec<String> = sagas.iter().map(|s| s.spec().name.clone()).collect();
    let results = ResultStore::with_connection(db.clone()).await?;
    let options = WorkerOptions {
        id: args.id.clone(),
        concurrency: args.concurrency,
        ack_wait: Duration::from_secs(args.ack_wait_secs),
        stream_replicas: args.stream_replicas,
        gauges_every: args.metrics_addr.map(|_| GAUGES_EVERY),
        nats,
        secret_keys,
        ..WorkerOptions::default()
    };
    let worker = Worker::connect(&args.nats_url, results, sagas, options).await?;

    // The inventory service releases reservations whose hold expired.
    let inventory = Inventory::new(db.clone(), Faults::none());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(error) = inventory.release_expired(Timestamp::now()).await {
                tracing::warn!(%error, "releasing expired reservations failed");
            }
        }
    });

    eprintln!(
        "{} serving {} on {}",
        args.id,
        serving.join(" and "),
        redact_nats_servers(&args.nats_url)
    );
    worker.run(sagaflow_sdk::process::termination()).await?;
    eprintln!("{} stopped", args.id);
    Ok(())
}
