//! `sagaflow-bench`: throughput and latency of the engine, embedded or distributed.
//!
//! Starts N sagas of K no-op steps, keeping C in flight, and reports sagas/s, steps/s, p50/p99
//! saga latency (start to settled), p50/p99 per-step overhead and the process's peak memory, as
//! a table and as JSON. The per-step overhead is reported over two windows:
//!
//! - `step_overhead`: from one step's handler returning to the next step's handler starting.
//!   In the distributed mode this holds every hop of a step: the worker recording the result,
//!   the reply through JetStream, the engine's commit, the command through JetStream, the
//!   worker's idempotency lookup.
//! - `reply_to_dispatch` (distributed mode): from one step's reply passing through the broker to
//!   the next step's command passing through it, seen by a plain subscription beside the
//!   JetStream consumers: the engine's share (taking the reply, committing the transition,
//!   publishing the command).
//!
//! The load generator, the engine and the workers share this process (and the machine, with
//! PostgreSQL and NATS).
//!
//! ```text
//! cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode embedded --sagas 20000
//! cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \
//!     --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --sagas 20000
//! ```
//!
//! To measure the engine's memory apart from the worker's, run the worker in a process of its
//! own (`--worker-only`) and the engine without one (`--worker-elsewhere`), with the same
//! `--saga-name`.
//!
//! With `--engines N` (distributed mode), the engine runs as N nodes sharing the database,
//! each a child process of the benchmark (the same executable, with an internal flag); the
//! load generator and the worker stay in this process. The benchmark waits until the nodes
//! have shared the partitions out, then starts every saga with a request on the start subject,
//! as a client would, so that the nodes' queue group spreads the starts (a saga started
//! through an engine's own API would stay on that node). The settle notification does not
//! leave a node's process, so in this mode a saga's latency runs from its start request to
//! its last step's reply passing the broker, without the engine's final commit; the elapsed
//! time (hence sagas/s) runs until the database shows every saga completed. The report adds
//! each node's share of the history records; the memory figures are this process's (load and
//! worker), not the nodes'.
//!
//! ```text
//! cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \
//!     --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --engines 3 --sagas 10000
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::{Store, StoreOptions};
use sagaflow_sdk::protocol::{AnswerCode, EngineAnswer, PROTOCOL_VERSION, StartRequest, names};
use sagaflow_sdk::worker::{ResultStore, Worker, WorkerOptions};
use sagaflow_sdk::{
    Compensate, Direction, RetryPolicy, Saga, Step, StepContext, StepError, StepHandler,
};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Engine and handlers in one process, in-process transport.
    Embedded,
    /// Engine and a worker talking over NATS JetStream.
    Distributed,
}

/// How to run each kind of benchmark, at the end of `--help`.
const EXAMPLES: &str = "\
Examples:
  One engine and its handlers in this process, on SQLite:
    cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode embedded --sagas 20000
  One engine and a worker in this process, over NATS:
    cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \\
        --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --sagas 20000
  Three engine nodes (child processes) sharing the database, the worker in this process:
    cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \\
        --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --engines 3 --sagas 10000";

/// Measure sagas/s, steps/s, saga latency and per-step overhead.
#[derive(Debug, Parser)]
#[command(name = "sagaflow-bench", version, about, after_long_help = EXAMPLES)]
struct Args {
    #[arg(long, value_enum, default_value = "embedded")]
    mode: Mode,
    /// Sagas to run.
    #[arg(long, default_value_t = 10_000)]
    sagas: usize,
    /// No-op steps per saga.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Sagas in flight at once.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// The engine's database; embedded defaults to a fresh SQLite file in the temp folder.
    #[arg(long)]
    database_url: Option<String>,
    /// NATS with JetStream, for the distributed mode.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The benchmark saga's name (default: a fresh one per run, which keeps runs on a reused
    /// database apart). Give the same name to `--worker-only` and `--worker-elsewhere`.
    #[arg(long)]
    saga_name: Option<String>,
    /// Distributed mode: serve the steps only (no engine, no load), until interrupted.
    #[arg(long, conflicts_with = "worker_elsewhere")]
    worker_only: bool,
    /// Distributed mode: run the engine and the load without a worker (one runs elsewhere with
    /// `--worker-only`). Step overheads are then measured by that worker, not reported here.
    #[arg(long)]
    worker_elsewhere: bool,
    /// Distributed mode: run the engine as N nodes sharing the database, each a child process,
    /// instead of one engine in this process. Sagas are then started by request on the start
    /// subject, which spreads them over the nodes, and a saga's latency runs from its start
    /// request to its last step's reply passing the broker (the engine's final commit not
    /// included): the settle notification does not leave a node's process. The elapsed time
    /// runs until the database shows every saga completed. The report adds each node's share
    /// of the history records; its memory figures are this process's (load and worker).
    #[arg(long, value_name = "N", conflicts_with = "worker_only")]
    engines: Option<usize>,
    /// Internal, for `--engines`: serve as one engine node named `--node-name` until SIGTERM
    /// or until the parent process is gone.
    #[arg(long, hide = true)]
    serve_engine: bool,
    /// Internal, for `--serve-engine`: the node's name, the prefix of its id in the history.
    #[arg(long, hide = true)]
    node_name: Option<String>,
    /// The partition count a new database is created with (default: the engine's, 16); a
    /// database that has one keeps it. One partition shows what a single node pays for the
    /// partitions themselves (one reply consumer instead of sixteen).
    #[arg(long, value_name = "N")]
    partitions: Option<u32>,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
    /// Serve this process's metrics at http://ADDR/metrics while it runs (engine, worker and
    /// load in one process), with the gauges read every 5 s as `sagaflow serve` does: to
    /// measure what metrics cost, against a run without.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// How often the gauges are read when `--metrics-addr` is given (`sagaflow serve`'s default).
const GAUGES_EVERY: Duration = Duration::from_secs(5);

impl Args {
    /// The gauges' interval for engines and workers: only when metrics are served.
    fn gauges_every(&self) -> Option<Duration> {
        self.metrics_addr.map(|_| GAUGES_EVERY)
    }
}

/// Opens the engine's store, creating a new database with `--partitions` if given.
async fn engine_store(args: &Args, url: &str) -> anyhow::Result<Store> {
    let options = StoreOptions {
        partitions: args.partitions,
    };
    Ok(Store::connect_with(url, &options).await?)
}

/// Gaps between two moments of each saga in flight: one moment opens a gap, the saga's next
/// moment of the other kind closes it. The open gaps are kept per saga until they close or the
/// saga settles, so memory stays small; closed gaps take 4 bytes each (microseconds).
#[derive(Default)]
struct Gaps {
    open: Mutex<HashMap<Uuid, Instant>>,
    closed: Mutex<Vec<u32>>,
}

impl Gaps {
    fn open(&self, saga_id: Uuid, at: Instant) {
        if let Ok(mut open) = self.open.lock() {
            open.insert(saga_id, at);
        }
    }

    /// Closes the saga's open gap, if it has one.
    fn close(&self, saga_id: Uuid, at: Instant) {
        let opened = self.open.lock().ok().and_then(|mut o| o.remove(&saga_id));
        if let (Some(opened), Ok(mut closed)) = (opened, self.closed.lock()) {
            closed.push(micros(at - opened));
        }
    }

    fn forget(&self, saga_id: Uuid) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&saga_id);
        }
    }

    /// The closed gaps so far, in microseconds, smallest first.
    fn sorted(&self) -> Vec<u32> {
        let mut closed = self.closed.lock().map(|c| c.clone()).unwrap_or_default();
        closed.sort();
        closed
    }
}

/// Tells `waiters` that a saga has settled when the forward reply of its last step passes the
/// wire: the end of a saga the benchmark can see from outside the engine's process. The bench
/// saga's steps never fail, so that reply is the saga's last message.
struct SettleOnLastReply {
    last_step: String,
    waiters: Arc<Waiters>,
}

/// Times the engine's share of each step from the wire into `gaps`: a plain NATS subscription
/// to the benchmark saga's commands and replies, keyed by the saga id that leads every
/// `Nats-Msg-Id`. A reply opens a gap, the saga's next command closes it. With `settle`, the
/// end of each saga is told too.
async fn watch_wire(
    gaps: Arc<Gaps>,
    nats_url: &str,
    saga_name: &str,
    settle: Option<SettleOnLastReply>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = async_nats::connect(sagaflow_sdk::protocol::server_addrs(nats_url)?).await?;
    // One subscription for both subjects keeps them in the order the broker sent them.
    let mut messages = client.subscribe("sagaflow.>").await?;
    // Every step's command subject starts with the one for an empty step name.
    // Replies go to `sagaflow.reply.{partition}.{saga}`: the saga's name is the last token.
    let (commands, reply_prefix, reply_suffix) = (
        names::command_subject(saga_name, ""),
        "sagaflow.reply.",
        format!(".{saga_name}"),
    );
    let reply_id_prefix = "reply:";
    Ok(tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            let now = Instant::now();
            let subject = message.subject.as_str();
            let is_reply = subject.starts_with(reply_prefix) && subject.ends_with(&reply_suffix);
            if !is_reply && !subject.starts_with(&commands) {
                continue;
            }
            let Some(id) = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            else {
                continue;
            };
            // A command's id is `{saga_id}:{step}:{direction}:{attempt}@{epoch}`; a reply's is
            // the command's, prefixed.
            let id = id.as_str();
            let id = id.strip_prefix(reply_id_prefix).unwrap_or(id);
            let mut fields = id.split(':');
            let Some(saga_id) = fields.next().and_then(|s| s.parse::<Uuid>().ok()) else {
                continue;
            };
            if is_reply {
                gaps.open(saga_id, now);
                if let Some(settle) = &settle
                    && fields.next() == Some(settle.last_step.as_str())
                    && fields.next() == Some(Direction::Forward.as_str())
                {
                    settle.waiters.settled(saga_id);
                }
            } else {
                gaps.close(saga_id, now);
            }
        }
        drop(client);
    }))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A step that does nothing but time the gap since the saga's previous step returned.
#[derive(Clone)]
struct NoOp {
    step_gaps: Arc<Gaps>,
}

impl StepHandler for NoOp {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        self.step_gaps.close(ctx.saga_id, Instant::now());
        self.step_gaps.open(ctx.saga_id, Instant::now());
        Ok(Value::Null)
    }
}

impl Compensate for NoOp {
    async fn compensate(
        &self,
        _: &StepContext,
        _: Value,
        _: Option<Value>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

fn bench_saga(name: &str, steps: usize, step_gaps: &Arc<Gaps>) -> anyhow::Result<Saga> {
    let policy = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(50))
        .max_attempts(5)
        .build()?;
    let mut builder = Saga::builder(name, 1);
    for i in 0..steps {
        let handler = NoOp {
            step_gaps: step_gaps.clone(),
        };
        builder = builder.step(
            Step::compensatable(step_name(i), handler)
                .retry(policy.clone())
                .timeout(Duration::from_secs(30)),
        );
    }
    Ok(builder.build()?)
}

/// The name of the bench saga's step at `index` (from 0).
fn step_name(index: usize) -> String {
    format!("step{index}")
}

#[derive(Debug, Serialize)]
struct Report {
    mode: Mode,
    sagas: usize,
    steps_per_saga: usize,
    in_flight: usize,
    seconds: f64,
    sagas_per_second: f64,
    steps_per_second: f64,
    saga_latency_ms_p50: f64,
    saga_latency_ms_p99: f64,
    step_overhead_ms_p50: f64,
    step_overhead_ms_p99: f64,
    /// Distributed mode only (null otherwise): the engine's share of a step, as the broker
    /// sees it.
    reply_to_dispatch_ms_p50: Option<f64>,
    reply_to_dispatch_ms_p99: Option<f64>,
    peak_memory_mib: f64,
    /// Resident memory when a tenth of the sagas had started, and at the end: the difference
    /// is what finished sagas left behind (the load generator keeps 4 bytes per saga and per
    /// step for its percentiles).
    memory_at_tenth_mib: f64,
    memory_at_end_mib: f64,
    /// Sagas completed in the database: all of them in it, or with `--engines` this run's.
    completed: usize,
    /// Engine nodes run as child processes (`--engines`); null for the engine in this process.
    engines: Option<usize>,
    /// With `--engines`: each node's share of this run's history records, by node name.
    node_shares: Option<BTreeMap<String, f64>>,
}

/// Who waits for which saga, and the sagas that settled before anyone waited.
type WaitState = (HashMap<Uuid, oneshot::Sender<()>>, HashMap<Uuid, ()>);

/// Waits for sagas to settle; tolerant of a saga settling before anyone waits for it.
#[derive(Default)]
struct Waiters {
    inner: Mutex<WaitState>,
}

impl Waiters {
    fn settled(&self, id: Uuid) {
        if let Ok(mut inner) = self.inner.lock() {
            match inner.0.remove(&id) {
                Some(waiter) => {
                    let _ = waiter.send(());
                }
                None => {
                    inner.1.insert(id, ());
                }
            }
        }
    }

    fn wait(&self, id: Uuid) -> Option<oneshot::Receiver<()>> {
        let mut inner = self.inner.lock().ok()?;
        if inner.1.remove(&id).is_some() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        inner.0.insert(id, tx);
        Some(rx)
    }
}

/// Milliseconds at percentile `p` of sorted microseconds.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index.min(sorted.len() - 1)]) / 1_000.0
}

/// The benchmark's worker: as many attempts at once as sagas in flight, its idempotency records
/// in the same PostgreSQL database as the engine's.
async fn bench_worker(args: &Args, url: &str, saga: Saga) -> anyhow::Result<Worker> {
    let results = ResultStore::open(url).await?;
    let options = WorkerOptions {
        id: "bench-worker".into(),
        concurrency: args.in_flight.max(1),
        gauges_every: args.gauges_every(),
        ..WorkerOptions::default()
    };
    Ok(Worker::connect(&args.nats_url, results, vec![saga], options).await?)
}

/// The process's peak resident memory.
fn peak_memory_mib() -> f64 {
    memory_mib("VmHWM:")
}

/// The process's resident memory now.
fn resident_memory_mib() -> f64 {
    memory_mib("VmRSS:")
}

fn memory_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What a node prints on its stdout once its engine is running.
const NODE_READY_LINE: &str = "sagaflow-bench engine node ready";
/// How long the nodes get to launch their engines (they migrate and register first, and share
/// two cores with everything else on a small machine).
const NODE_READY_PATIENCE: Duration = Duration::from_secs(60);
/// How long the nodes get to share the partitions out.
const LEASE_PATIENCE: Duration = Duration::from_secs(30);
/// How long one start may keep being retried.
const START_PATIENCE: Duration = Duration::from_secs(60);
/// How long the sagas get to be completed in the database once the load is over.
const COMPLETION_PATIENCE: Duration = Duration::from_secs(60);
/// How long a node's engine gets to finish what it took in when asked to stop.
const NODE_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a node gets to exit after SIGTERM before it is killed: its engine's grace, and
/// time to hand its partitions over.
const NODE_STOP_PATIENCE: Duration = Duration::from_secs(20);
/// How often the benchmark looks again: at the database while it waits for it, at the start
/// subject after a refusal, at a node's process while it exits.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Where the load's sagas run.
#[derive(Clone)]
enum Engines {
    /// One engine in this process: sagas started through its API, their end told by its
    /// settle notifications.
    InProcess(Arc<Engine>),
    /// Engine nodes in child processes (`--engines`): sagas started over NATS, their end seen
    /// on the wire.
    Nodes(Arc<EngineNodes>),
}

impl Engines {
    async fn start(&self, saga_name: &str) -> anyhow::Result<Uuid> {
        match self {
            Engines::InProcess(engine) => Ok(engine.start(saga_name, json!({}), None).await?),
            Engines::Nodes(nodes) => nodes.start(saga_name).await,
        }
    }

    /// Stops the engine, or every node, once the load no longer holds a handle on it.
    async fn shutdown(self) -> anyhow::Result<()> {
        match self {
            Engines::InProcess(engine) => {
                if let Ok(engine) = Arc::try_unwrap(engine) {
                    engine.shutdown().await;
                }
            }
            Engines::Nodes(nodes) => {
                if let Ok(nodes) = Arc::try_unwrap(nodes) {
                    nodes.stop().await?;
                }
            }
        }
        Ok(())
    }
}

/// The engine nodes of `--engines`, each a child process running this executable with
/// `--serve-engine`. Dropping it kills (SIGKILL) the nodes still running, so that a benchmark
/// that fails leaves none behind.
struct EngineNodes {
    children: Vec<Child>,
    /// The database the nodes share: where the benchmark sees their leases and the sagas' ends.
    store: Store,
    /// Where sagas are started.
    nats: async_nats::Client,
}

impl EngineNodes {
    /// Starts `count` nodes serving saga `saga_name`, and returns once each has launched its
    /// engine and the nodes hold a fair share of the partitions each.
    async fn launch(args: &Args, count: usize, url: &str, saga_name: &str) -> anyhow::Result<Self> {
        // Connecting migrates the database before the nodes start, so they need not.
        let store = engine_store(args, url).await?;
        if store.backend() != DbBackend::Postgres {
            bail!("--engines needs a PostgreSQL database: the nodes share it");
        }
        let nats =
            async_nats::connect(sagaflow_sdk::protocol::server_addrs(&args.nats_url)?).await?;
        let mut nodes = EngineNodes {
            children: Vec::with_capacity(count),
            store,
            nats,
        };
        let program = std::env::current_exe().context("finding this benchmark's executable")?;
        let steps = args.steps.to_string();
        let mut readiness = Vec::with_capacity(count);
        let launched = Instant::now();
        for index in 0..count {
            let node_name = node_name(index);
            let mut child = Command::new(&program)
                .args(["--serve-engine", "--node-name", &node_name])
                .args(["--database-url", url, "--nats-url", &args.nats_url])
                .args(["--saga-name", saga_name, "--steps", &steps])
                // The node stops when this end of its stdin closes: when this process exits,
                // however it exits.
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting engine node {node_name}"))?;
            let stdout = child.stdout.take();
            nodes.children.push(child);
            let stdout = stdout.context("the engine node's stdout")?;
            readiness.push(tokio::task::spawn_blocking(move || {
                announces_readiness(stdout)
            }));
        }
        for (index, ready) in readiness.into_iter().enumerate() {
            let ready = tokio::time::timeout(NODE_READY_PATIENCE, ready)
                .await
                .with_context(|| {
                    format!(
                        "engine node {} not ready in {NODE_READY_PATIENCE:?}",
                        node_name(index)
                    )
                })??;
            if !ready {
                bail!(
                    "engine node {} exited before it was ready",
                    node_name(index)
                );
            }
        }
        let shares = nodes.wait_for_fair_leases(count).await?;
        eprintln!(
            "{count} engine node(s) ready and holding the {} partitions ({}) after {:.2} s",
            nodes.store.partitions(),
            shares
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("/"),
            launched.elapsed().as_secs_f64()
        );
        Ok(nodes)
    }

    /// Waits until every partition has a live owner and each of the `count` nodes holds its
    /// fair share (the counts differ by one at most), which is where the nodes stop moving
    /// partitions; returns each owner's partition count.
    async fn wait_for_fair_leases(&self, count: usize) -> anyhow::Result<Vec<usize>> {
        let sql = "SELECT owner, COUNT(*) AS partitions FROM partition_leases \
                   WHERE owner IS NOT NULL \
                   AND expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint \
                   GROUP BY owner";
        let give_up = Instant::now() + LEASE_PATIENCE;
        loop {
            let mut held = Vec::new();
            for row in self.query(sql, Vec::new()).await? {
                held.push(usize::try_from(row.try_get::<i64>("", "partitions")?)?);
            }
            held.sort_unstable();
            let all_held = held.iter().sum::<usize>() == self.store.partitions() as usize;
            let fair = held
                .first()
                .zip(held.last())
                .is_some_and(|(few, many)| many - few <= 1);
            if all_held && fair && held.len() == count {
                return Ok(held);
            }
            if Instant::now() >= give_up {
                bail!(
                    "the engine nodes did not share the partitions out in {LEASE_PATIENCE:?}: \
                     partitions held per live owner {held:?}"
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Starts a saga by request on the start subject, as a client would, so that the nodes'
    /// queue group spreads the starts. Retries the refusals of a node that cannot start it
    /// yet (it has not heard of the saga, holds no partition, or is stopping) and requests
    /// nobody answered in time.
    async fn start(&self, saga_name: &str) -> anyhow::Result<Uuid> {
        let request = serde_json::to_vec(&StartRequest {
            v: PROTOCOL_VERSION,
            saga: saga_name.to_string(),
            version: None,
            input: json!({}),
            key: None,
        })?;
        let give_up = Instant::now() + START_PATIENCE;
        loop {
            let failure = match self
                .nats
                .request(names::START_SUBJECT, request.clone().into())
                .await
            {
                Ok(answer) => match serde_json::from_slice::<EngineAnswer>(&answer.payload)? {
                    EngineAnswer::Ok {
                        saga_id: Some(id), ..
                    } => return Ok(id),
                    EngineAnswer::Error {
                        code:
                            code @ (AnswerCode::UnknownSaga
                            | AnswerCode::Stopping
                            | AnswerCode::Internal),
                        message,
                        ..
                    } => format!("{code}: {message}"),
                    other => bail!("starting `{saga_name}`: {other:?}"),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= give_up {
                bail!(
                    "no engine node started `{saga_name}` in {START_PATIENCE:?}; last: {failure}"
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Waits until the database shows all `sagas` of `saga_name` completed (or the patience is
    /// over), and returns how many are.
    async fn wait_until_completed(&self, saga_name: &str, sagas: usize) -> anyhow::Result<usize> {
        let sql = "SELECT COUNT(*) AS completed FROM sagas WHERE name = $1 AND status = $2";
        let values = vec![saga_name.into(), SagaStatus::Completed.as_str().into()];
        let give_up = Instant::now() + COMPLETION_PATIENCE;
        loop {
            let completed = match self.query(sql, values.clone()).await?.first() {
                Some(row) => usize::try_from(row.try_get::<i64>("", "completed")?)?,
                None => 0,
            };
            if completed >= sagas {
                return Ok(completed);
            }
            if Instant::now() >= give_up {
                eprintln!(
                    "warning: {completed} of {sagas} sagas completed in {COMPLETION_PATIENCE:?}"
                );
                return Ok(completed);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Each node's share of the history records of saga `saga_name`, by node name (the prefix
    /// of the node id the records carry).
    async fn node_shares(&self, saga_name: &str) -> anyhow::Result<BTreeMap<String, f64>> {
        let sql = "SELECT split_part(h.node, '-', 1) AS node, COUNT(*) AS records \
                   FROM saga_history h JOIN sagas s ON s.id = h.saga_id \
                   WHERE s.name = $1 AND h.node IS NOT NULL GROUP BY 1";
        let mut records = BTreeMap::new();
        for row in self.query(sql, vec![saga_name.into()]).await? {
            records.insert(
                row.try_get::<String>("", "node")?,
                row.try_get::<i64>("", "records")?,
            );
        }
        let total = records.values().sum::<i64>().max(1) as f64;
        Ok(records
            .into_iter()
            .map(|(node, n)| (node, n as f64 / total))
            .collect())
    }

    async fn query(
        &self,
        sql: &str,
        values: Vec<sea_orm::Value>,
    ) -> anyhow::Result<Vec<QueryResult>> {
        let statement = Statement::from_sql_and_values(DbBackend::Postgres, sql, values);
        Ok(self.store.connection().query_all_raw(statement).await?)
    }

    /// Asks every node to stop (SIGTERM, as a service manager would) and waits for them; the
    /// ones still running after the patience are killed when `self` is dropped.
    async fn stop(mut self) -> anyhow::Result<()> {
        for child in &self.children {
            let pid = child.id().to_string();
            let status = Command::new("kill")
                .args(["-s", "TERM", &pid])
                .status()
                .context("running kill")?;
            if !status.success() {
                eprintln!("warning: `kill -s TERM {pid}` failed: {status}");
            }
        }
        let give_up = Instant::now() + NODE_STOP_PATIENCE;
        for (index, child) in self.children.iter_mut().enumerate() {
            loop {
                match child.try_wait()? {
                    Some(status) if status.success() => break,
                    Some(status) => {
                        eprintln!(
                            "warning: engine node {} exited with {status}",
                            node_name(index)
                        );
                        break;
                    }
                    None if Instant::now() >= give_up => {
                        eprintln!(
                            "warning: engine node {} still running {NODE_STOP_PATIENCE:?} after \
                             SIGTERM; killing it",
                            node_name(index)
                        );
                        break;
                    }
                    None => tokio::time::sleep(POLL_EVERY).await,
                }
            }
        }
        Ok(())
    }
}

impl Drop for EngineNodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The name of node `index`: without a `-`, so that it is the prefix before the first `-` of
/// the node id the engine records (`benche0-PID-RANDOM`).
fn node_name(index: usize) -> String {
    format!("benche{index}")
}

/// Whether a node says it is ready on its `stdout` before that ends.
fn announces_readiness(stdout: ChildStdout) -> bool {
    BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line == NODE_READY_LINE)
}

/// `--serve-engine`: one engine node of `--engines`, serving the bench saga until SIGTERM or
/// until the parent process is gone.
async fn serve_engine(args: &Args) -> anyhow::Result<()> {
    let node_name = args
        .node_name
        .clone()
        .context("--serve-engine needs --node-name")?;
    let url = args
        .database_url
        .as_deref()
        .context("--serve-engine needs --database-url")?;
    let saga_name = args
        .saga_name
        .as_deref()
        .context("--serve-engine needs --saga-name")?;
    // The handlers run in the parent's worker: the node needs only the definition.
    let saga = bench_saga(saga_name, args.steps, &Arc::default())?;
    let store = engine_store(args, url).await?;
    let options = EngineOptions {
        host: Some(node_name),
        ..EngineOptions::default()
    };
    let engine =
        Engine::launch_distributed(store, &args.nats_url, vec![saga.spec().clone()], options)
            .await?;
    writeln!(std::io::stdout(), "{NODE_READY_LINE}")?;
    tokio::select! {
        () = sagaflow_sdk::process::termination() => {}
        () = parent_gone() => {}
    }
    engine.shutdown_within(NODE_SHUTDOWN_GRACE).await;
    Ok(())
}

/// Resolves when this process's stdin ends: a node's parent holds the other end until it
/// exits, so a node outlives no parent, even one killed outright.
async fn parent_gone() {
    let (gone, on_gone) = oneshot::channel::<()>();
    // A thread of its own rather than `spawn_blocking`: the runtime would wait for a blocking
    // task still reading at exit.
    let reader = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            drop(gone);
        });
    match reader {
        Ok(_) => {
            let _ = on_gone.await;
        }
        Err(e) => {
            eprintln!("warning: not watching for the parent's exit: {e}");
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Held to the end: dropping it sends the spans still buffered.
    let _telemetry = sagaflow_sdk::process::init_telemetry(
        "sagaflow-bench",
        sagaflow_sdk::process::LogFormat::Human,
    )?;
    let args = Args::parse();
    if let Some(addr) = args.metrics_addr {
        sagaflow_sdk::process::serve_metrics(addr, Some("bench"))?;
    }
    if args.serve_engine {
        return serve_engine(&args).await;
    }
    if args.steps == 0 || args.sagas == 0 || args.in_flight == 0 {
        bail!("--sagas, --steps and --in-flight must be at least 1");
    }
    if matches!(args.mode, Mode::Embedded) && (args.worker_only || args.worker_elsewhere) {
        bail!("--worker-only and --worker-elsewhere are for the distributed mode");
    }
    match (args.engines, args.mode) {
        (Some(0), _) => bail!("--engines must be at least 1"),
        (Some(_), Mode::Embedded) => bail!("--engines is for the distributed mode"),
        _ => {}
    }
    // From one step's handler returning to the next one's starting.
    let step_gaps = Arc::new(Gaps::default());
    // A fresh saga name per run keeps runs on a reused database apart.
    let name = args
        .saga_name
        .clone()
        .unwrap_or_else(|| format!("bench_{}", Uuid::now_v7().simple()));
    let saga = bench_saga(&name, args.steps, &step_gaps)?;
    let temp = std::env::temp_dir().join(format!("{name}.db"));
    let (engines, worker_task) = match args.mode {
        Mode::Embedded => {
            let url = args
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", temp.display()));
            let store = engine_store(&args, &url).await?;
            let options = EngineOptions {
                worker_concurrency: args.in_flight.max(1),
                gauges_every: args.gauges_every(),
                ..EngineOptions::default()
            };
            let engine = Engine::launch(store, vec![saga], options).await?;
            (Engines::InProcess(Arc::new(engine)), None)
        }
        Mode::Distributed => {
            let url = args
                .database_url
                .clone()
                .context("--database-url is required in distributed mode (PostgreSQL)")?;
            if args.worker_only {
                let worker = bench_worker(&args, &url, saga).await?;
                eprintln!("serving `{name}` until interrupted");
                worker.run(sagaflow_sdk::process::termination()).await?;
                // The steps' overheads were seen here, not by the engine's process.
                let overheads = step_gaps.sorted();
                println!(
                    "{}",
                    serde_json::json!({
                        "steps_measured": overheads.len(),
                        "step_overhead_ms_p50": percentile(&overheads, 0.50),
                        "step_overhead_ms_p99": percentile(&overheads, 0.99),
                        "worker_peak_memory_mib": peak_memory_mib(),
                    })
                );
                return Ok(());
            }
            let engines = match args.engines {
                None => {
                    let store = engine_store(&args, &url).await?;
                    let spec = saga.spec().clone();
                    let options = EngineOptions {
                        gauges_every: args.gauges_every(),
                        ..EngineOptions::default()
                    };
                    let engine =
                        Engine::launch_distributed(store, &args.nats_url, vec![spec], options)
                            .await?;
                    Engines::InProcess(Arc::new(engine))
                }
                Some(count) => {
                    let nodes = EngineNodes::launch(&args, count, &url, &name).await?;
                    Engines::Nodes(Arc::new(nodes))
                }
            };
            if args.worker_elsewhere {
                (engines, None)
            } else {
                let worker = bench_worker(&args, &url, saga).await?;
                let (stop, stopped) = oneshot::channel::<()>();
                let task = tokio::spawn(async move {
                    let _ = worker
                        .run(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
                (engines, Some((stop, task)))
            }
        }
    };

    // From a step's reply to the next step's command, as the broker passes them on.
    let wire_gaps = Arc::new(Gaps::default());
    let waiters = Arc::new(Waiters::default());
    // The nodes' settle notifications stay in their processes: the end of a saga is seen on
    // the wire instead, so its latency leaves out the engine's final commit.
    let settle_on_last_reply = match &engines {
        Engines::Nodes(_) => Some(SettleOnLastReply {
            last_step: step_name(args.steps - 1),
            waiters: waiters.clone(),
        }),
        Engines::InProcess(_) => None,
    };
    let wire_task = match args.mode {
        Mode::Distributed => Some(
            watch_wire(
                wire_gaps.clone(),
                &args.nats_url,
                &name,
                settle_on_last_reply,
            )
            .await?,
        ),
        Mode::Embedded => None,
    };
    let listener = match &engines {
        Engines::InProcess(engine) => {
            let mut settled = engine.settled();
            let waiters = waiters.clone();
            Some(tokio::spawn(async move {
                loop {
                    match settled.recv().await {
                        Ok(s) => waiters.settled(s.saga_id),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            eprintln!("warning: missed {n} settle notifications");
                        }
                        Err(_) => break,
                    }
                }
            }))
        }
        Engines::Nodes(_) => None,
    };

    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::with_capacity(args.sagas)));
    let at_tenth = Arc::new(Mutex::new(None::<f64>));
    let began = Instant::now();
    let mut generators = Vec::new();
    for _ in 0..args.in_flight {
        let (engines, next, latencies, waiters, name, step_gaps, wire_gaps, at_tenth) = (
            engines.clone(),
            next.clone(),
            latencies.clone(),
            waiters.clone(),
            name.clone(),
            step_gaps.clone(),
            wire_gaps.clone(),
            at_tenth.clone(),
        );
        let total = args.sagas;
        generators.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                if n == total / 10
                    && let Ok(mut at) = at_tenth.lock()
                {
                    *at = Some(resident_memory_mib());
                }
                let started = Instant::now();
                let id = engines.start(&name).await?;
                if let Some(wait) = waiters.wait(id) {
                    let _ = tokio::time::timeout(Duration::from_secs(120), wait).await;
                }
                if let Ok(mut l) = latencies.lock() {
                    l.push(micros(started.elapsed()));
                }
                step_gaps.forget(id);
                wire_gaps.forget(id);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for generator in generators {
        generator.await??;
    }
    // Throughput counts finished sagas: with nodes, the last reply seen on the wire comes
    // before the engine's final commit.
    let completed_by_nodes = match &engines {
        Engines::Nodes(nodes) => Some(nodes.wait_until_completed(&name, args.sagas).await?),
        Engines::InProcess(_) => None,
    };
    let seconds = began.elapsed().as_secs_f64();
    let peak = peak_memory_mib();
    let at_end = resident_memory_mib();
    let at_tenth = at_tenth.lock().ok().and_then(|at| *at).unwrap_or(0.0);
    if let Some(listener) = listener {
        listener.abort();
    }

    let (completed, node_shares) = match &engines {
        Engines::InProcess(engine) => {
            let counts = engine.store().status_counts().await?;
            (counts.get("completed").copied().unwrap_or(0) as usize, None)
        }
        Engines::Nodes(nodes) => (
            completed_by_nodes.unwrap_or(0),
            Some(nodes.node_shares(&name).await?),
        ),
    };
    let mut latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    latencies.sort();
    let overheads = step_gaps.sorted();
    let gaps = wire_task.map(|task| {
        task.abort();
        wire_gaps.sorted()
    });
    let report = Report {
        mode: args.mode,
        sagas: args.sagas,
        steps_per_saga: args.steps,
        in_flight: args.in_flight,
        seconds,
        sagas_per_second: args.sagas as f64 / seconds,
        steps_per_second: (args.sagas * args.steps) as f64 / seconds,
        saga_latency_ms_p50: percentile(&latencies, 0.50),
        saga_latency_ms_p99: percentile(&latencies, 0.99),
        step_overhead_ms_p50: percentile(&overheads, 0.50),
        step_overhead_ms_p99: percentile(&overheads, 0.99),
        reply_to_dispatch_ms_p50: gaps.as_deref().map(|g| percentile(g, 0.50)),
        reply_to_dispatch_ms_p99: gaps.as_deref().map(|g| percentile(g, 0.99)),
        peak_memory_mib: peak,
        memory_at_tenth_mib: at_tenth,
        memory_at_end_mib: at_end,
        completed,
        engines: args.engines,
        node_shares,
    };
    engines.shutdown().await?;
    if let Some((stop, task)) = worker_task {
        let _ = stop.send(());
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&temp);
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", temp.display()));
    }
    if !args.json {
        println!("mode                  {:?}", report.mode);
        println!(
            "sagas x steps         {} x {} ({} in flight)",
            report.sagas, report.steps_per_saga, report.in_flight
        );
        println!("elapsed               {:.2} s", report.seconds);
        println!("sagas/s               {:.0}", report.sagas_per_second);
        println!("steps/s               {:.0}", report.steps_per_second);
        println!(
            "saga latency p50/p99  {:.2} / {:.2} ms",
            report.saga_latency_ms_p50, report.saga_latency_ms_p99
        );
        println!(
            "step overhead p50/p99 {:.2} / {:.2} ms",
            report.step_overhead_ms_p50, report.step_overhead_ms_p99
        );
        if let (Some(p50), Some(p99)) = (
            report.reply_to_dispatch_ms_p50,
            report.reply_to_dispatch_ms_p99,
        ) {
            println!("reply to dispatch     {p50:.2} / {p99:.2} ms (p50/p99)");
        }
        println!("peak memory           {:.1} MiB", report.peak_memory_mib);
        println!(
            "resident at 10%/end   {:.1} / {:.1} MiB",
            report.memory_at_tenth_mib, report.memory_at_end_mib
        );
        println!("completed             {}", report.completed);
        if let Some(engines) = report.engines {
            println!("engine nodes          {engines} (child processes)");
        }
        if let Some(shares) = &report.node_shares {
            let shares = shares
                .iter()
                .map(|(node, share)| format!("{node} {:.1}%", share * 100.0))
                .collect::<Vec<_>>()
                .join(", ");
            println!("history records       {shares}");
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
