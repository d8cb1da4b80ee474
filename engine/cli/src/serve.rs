//! `sagaflow serve`: the engine in distributed mode.

use std::time::Duration;

use anyhow::Context;
use sagaflow_engine::runtime::{Engine, EngineOptions, LeaseSettings, this_node};
use sagaflow_engine::store::{Store, StoreOptions};
use sagaflow_sdk::nats::NatsArgs;
use sagaflow_sdk::protocol::redact_nats_servers;

use crate::common::duration;

/// Options of `sagaflow serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where sagas live: postgres://USER@HOST/DB (or sqlite://FILE for a single engine).
    #[arg(long, env = "SAGAFLOW_DATABASE_URL")]
    database_url: String,
    /// The NATS server, with JetStream enabled; for a cluster, several of its servers
    /// separated by commas (nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222):
    /// the engine connects to one and reconnects to another when that one goes away.
    #[arg(
        long,
        env = "SAGAFLOW_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    #[command(flatten)]
    nats: NatsArgs,
    /// How long a SIGTERM waits for the transitions in progress before exiting anyway.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// How long this node's partition leases last (by the database's clock) after each
    /// renewal. A node that dies has its partitions taken over within about this long.
    #[arg(long, default_value = "5s", value_parser = duration)]
    lease: Duration,
    /// How often this node renews its leases and rebalances the partitions; it stops writing
    /// this long before a lease it could not renew would lapse. At most half of --lease.
    #[arg(long, default_value = "1s", value_parser = duration)]
    renew_every: Duration,
    /// How many partitions a new database spreads sagas over (fixed once the database exists;
    /// several engine nodes share them). Default: 16.
    #[arg(long, env = "SAGAFLOW_PARTITIONS")]
    partitions: Option<u32>,
    /// What this node is called in `sagaflow nodes`, `show` and every history record it
    /// writes: its id is NAME-PID-RANDOM. Default: the host name.
    #[arg(long, env = "SAGAFLOW_NODE_NAME")]
    node_name: Option<String>,
    /// On how many NATS servers the command and reply streams are kept: 1 on a single server;
    /// 3 on a three-server JetStream cluster, so that a stream survives losing one server.
    /// Existing streams with fewer are raised to this count (never lowered); give every engine
    /// and worker on the broker the same one (the demo worker's --stream-replicas).
    #[arg(long, env = "SAGAFLOW_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464), labelled with
    /// this node's id; docs/metrics.md lists the series. Off unless given.
    #[arg(long, env = "SAGAFLOW_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How often the gauges read from the database and the broker (unfinished sagas, stuck
    /// backlog, outbox, consumer lag) are refreshed while metrics are served.
    #[arg(long, default_value = "5s", value_parser = duration)]
    gauges_every: Duration,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let nats = args.nats.security()?;
    let node = this_node(args.node_name.clone());
    if let Some(addr) = args.metrics_addr {
        sagaflow_sdk::process::serve_metrics(addr, Some(&node.id))?;
        eprintln!("metrics at http://{addr}/metrics");
    }
    let store = Store::connect_with(
        &args.database_url,
        &StoreOptions {
            partitions: args.partitions,
        },
    )
    .await?;
    let options = EngineOptions {
        leases: LeaseSettings {
            lease: args.lease,
            renew_every: args.renew_every,
        },
        host: args.node_name,
        node: Some(node),
        stream_replicas: args.stream_replicas,
        gauges_every: args.metrics_addr.map(|_| args.gauges_every),
        nats,
        ..EngineOptions::default()
    };
    let partitions = store.partitions();
    let engine = Engine::launch_distributed(store, &args.nats_url, Vec::new(), options)
        .await
        .context("starting the engine")?;
    let ownership = engine.ownership();
    eprintln!(
        "engine node {} holds {} of the database's {partitions} partitions",
        ownership.fence.node,
        ownership.fence.epochs.len(),
    );
    eprintln!(
        "sagaflow engine serving on {} (start sagas with `sagaflow start` or a request on sagaflow.start)",
        redact_nats_servers(&args.nats_url)
    );
    sagaflow_sdk::process::termination().await;
    eprintln!("stopping: no new work; finishing the transitions in progress");
    engine
        .shutdown_within(Duration::from_secs(args.shutdown_grace_secs))
        .await;
    eprintln!("stopped");
    Ok(())
}
