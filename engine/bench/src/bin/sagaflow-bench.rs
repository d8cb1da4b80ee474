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
//!   publishing the command). That subscription makes the broker deliver every command and
//!   reply once more; `--no-wire-watch` leaves it (and this figure) out.
//!
//! The load generator, the engine and the workers share this process (and the machine, with
//! PostgreSQL and NATS).
//!
//! On a shared host whose throughput varies from run to run, the CPU a saga costs varies much
//! less, so each run also reports the machine's CPU time over the load (from `/proc/stat`: user,
//! nice, system, irq and softirq; not idle, I/O wait or time stolen by the host) per saga and per
//! step, how busy the machine was, and each process's share of that time (from
//! `/proc/[pid]/stat`), grouped: this process (`bench`), the `--engines` nodes, PostgreSQL,
//! nats-server, other `sagaflow-bench` processes (a `--worker-only` worker), and the rest
//! (`other`: the machine's time not in the groups, hence noisy).
//!
//! `--steps` and `--sagas` take comma-separated lists: the benchmark then runs once per value
//! (the cross product when both are lists, steps outer), one run after another in this process
//! and on the same database, each with a saga name of its own and its engine (or nodes) and
//! worker launched for it. Each run prints its report (its JSON line last); a sweep adds a
//! summary line per run and, at the end, the CPU per step of each `--steps` value and the
//! sagas/s of each `--sagas` value relative to the first. `--preset long` is
//! `--sagas 10000,100000`: does the rate hold over ten times as many sagas?
//!
//! ```text
//! cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \
//!     --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --steps 3,10 --sagas 10000
//! cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \
//!     --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --preset long
//! ```
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

/// Named sets of runs (`--preset`).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Preset {
    /// `--sagas 10000,100000`: the rate of 10,000 sagas against that of 100,000.
    Long,
}

impl Preset {
    /// The `--sagas` values the preset stands for.
    fn sagas(self) -> Vec<usize> {
        match self {
            Preset::Long => vec![10_000, 100_000],
        }
    }
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
        --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --engines 3 --sagas 10000
  The CPU a step costs with 3 and with 10 steps per saga, one run after the other:
    cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \\
        --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --steps 3,10 --sagas 10000
  The rate of 10,000 sagas and of 100,000 (--preset long is --sagas 10000,100000):
    cargo run --release -p sagaflow-bench --bin sagaflow-bench -- --mode distributed \\
        --database-url postgres://postgres@127.0.0.1:5432/sagaflow_bench --preset long";

/// Measure sagas/s, steps/s, saga latency and per-step overhead.
#[derive(Debug, Parser)]
#[command(name = "sagaflow-bench", version, about, after_long_help = EXAMPLES)]
struct Args {
    #[arg(long, value_enum, default_value = "embedded")]
    mode: Mode,
    /// Sagas to run. A comma-separated list (10000,100000) runs once per value, one run after
    /// the other on the same database, and compares their sagas/s.
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        default_value = "10000"
    )]
    sagas: Vec<usize>,
    /// No-op steps per saga. A comma-separated list (3,10) runs once per value, one run after
    /// the other on the same database, and compares their CPU per step; with a list of
    /// `--sagas` too, every pair runs, steps outer.
    #[arg(
        long,
        value_name = "K[,K...]",
        value_delimiter = ',',
        default_value = "3"
    )]
    steps: Vec<usize>,
    /// A named set of runs in place of `--sagas`: `long` is `--sagas 10000,100000`, to see
    /// whether the rate of 10,000 sagas holds over 100,000.
    #[arg(long, value_enum, conflicts_with = "sagas")]
    preset: Option<Preset>,
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
    /// Print only the JSON line (one per run); a sweep's summaries go to stderr.
    #[arg(long)]
    json: bool,
    /// Serve this process's metrics at http://ADDR/metrics while it runs (engine, worker and
    /// load in one process), with the gauges read every 5 s as `sagaflow serve` does: to
    /// measure what metrics cost, against a run without.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How many batches the engine may have committing at once (`EngineOptions::
    /// commits_in_flight`): 1 commits each batch before deciding the next, the path without a
    /// pipeline, to compare with the default in one build.
    #[arg(long, value_name = "N", default_value_t = sagaflow_engine::runtime::COMMITS_IN_FLIGHT)]
    commits_in_flight: usize,
    /// Distributed mode with the engine in this process: do not watch the broker's messages,
    /// and so leave out the reply-to-dispatch gap. The watcher's subscription to every command
    /// and reply makes nats-server deliver each once more, a cost no deployment pays; with
    /// `--engines` the watcher is what sees a saga end, so it always runs there.
    #[arg(long, conflicts_with = "engines")]
    no_wire_watch: bool,
}

/// How often the gauges are read when `--metrics-addr` is given (`sagaflow serve`'s default).
const GAUGES_EVERY: Duration = Duration::from_secs(5);

impl Args {
    /// The gauges' interval for engines and workers: only when metrics are served.
    fn gauges_every(&self) -> Option<Duration> {
        self.metrics_addr.map(|_| GAUGES_EVERY)
    }

    /// The `--sagas` values to run, `--preset`'s if given.
    fn sagas_values(&self) -> Vec<usize> {
        self.preset
            .map_or_else(|| self.sagas.clone(), Preset::sagas)
    }

    /// The single `--steps` value of an engine node or a worker, which serve one definition.
    fn single_steps(&self, role: &str) -> anyhow::Result<usize> {
        match self.steps.as_slice() {
            [steps] => Ok(*steps),
            _ => bail!(
                "{role} serves one saga definition: give it a single --steps value, not {:?}",
                self.steps
            ),
        }
    }

    /// Refuses options that cannot work together, before anything starts.
    fn validate(&self) -> anyhow::Result<()> {
        let sagas = self.sagas_values();
        if self.steps.contains(&0) || sagas.contains(&0) || self.in_flight == 0 {
            bail!("--sagas, --steps and --in-flight must be at least 1");
        }
        if self.steps.is_empty() || sagas.is_empty() {
            bail!("--sagas and --steps need at least one value");
        }
        if matches!(self.mode, Mode::Embedded) && (self.worker_only || self.worker_elsewhere) {
            bail!("--worker-only and --worker-elsewhere are for the distributed mode");
        }
        match (self.engines, self.mode) {
            (Some(0), _) => bail!("--engines must be at least 1"),
            (Some(_), Mode::Embedded) => bail!("--engines is for the distributed mode"),
            _ => {}
        }
        if self.worker_only {
            self.single_steps("--worker-only")?;
        }
        // One name stands for one definition (name and version 1): two step counts under it
        // would clash. With nodes, a run's completions are counted by name, so a second run
        // under the first one's name would count the first one's too.
        let runs = self.steps.len() * sagas.len();
        if self.saga_name.is_some() && runs > 1 && (self.steps.len() > 1 || self.engines.is_some())
        {
            bail!(
                "--saga-name gives every run of a sweep the same saga: that works for a list of \
                 --sagas with one engine in this process only, not with a list of --steps or \
                 with --engines (leave --saga-name out: each run then has a name of its own)"
            );
        }
        Ok(())
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
    /// This process's peak resident memory; in a sweep, from the start of the run on.
    peak_memory_mib: f64,
    /// Resident memory when a tenth of the sagas had started, and at the end: the difference
    /// is what finished sagas left behind (the load generator keeps 4 bytes per saga and per
    /// step for its percentiles).
    memory_at_tenth_mib: f64,
    memory_at_end_mib: f64,
    /// Sagas this run completed, as the database shows them.
    completed: usize,
    /// Engine nodes run as child processes (`--engines`); null for the engine in this process.
    engines: Option<usize>,
    /// With `--engines`: each node's share of this run's history records, by node name.
    node_shares: Option<BTreeMap<String, f64>>,
    /// The machine's CPU time over the load (user, nice, system, irq and softirq of
    /// `/proc/stat`: not idle, I/O wait or time stolen by the host), in milliseconds per
    /// completed saga: what a saga costs, steadier than the rate on a shared host. Null where
    /// `/proc` cannot be read.
    cpu_ms_per_saga: Option<f64>,
    /// The same per completed step.
    cpu_ms_per_step: Option<f64>,
    /// How busy the machine was over the load: its busy time over all of its time (guest time
    /// aside, already counted as user time), in percent.
    machine_busy_percent: Option<f64>,
    /// Each group of processes' CPU time over the load, in milliseconds per completed saga, by
    /// group (see `CpuGroup`; `other` is the machine's busy time not in the groups).
    process_cpu_ms_per_saga: Option<BTreeMap<String, f64>>,
    /// Each group's share of the machine's busy time over the load, as a fraction.
    process_share: Option<BTreeMap<String, f64>>,
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

/// Resets the process's peak resident memory (`VmHWM`) to its resident memory now, so that
/// each run of a sweep reports a peak of its own rather than the highest so far. Best effort
/// (Linux 4.0 and later): the first run's peak is left as it was anyway.
fn reset_peak_memory() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("warning: the peak memory of this run includes the runs before it: {e}");
    }
}

// CPU time, from `/proc`: the machine's over the load, and each group of processes' share of
// it. The times are in clock ticks (`USER_HZ`), the unit of both `/proc/stat` and
// `/proc/[pid]/stat`.

/// The machine's CPU time since boot, in clock ticks, from the `cpu ` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MachineTicks {
    /// user + nice + system + irq + softirq: the time the machine worked. Idle and I/O wait are
    /// time it did not; steal is time the host gave another guest.
    busy: u64,
    /// Every field but guest and guest_nice, which user and nice already count.
    total: u64,
}

/// Parses the `cpu ` line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal
/// guest guest_nice` (older kernels stop after softirq or steal).
fn parse_machine_ticks(line: &str) -> Option<MachineTicks> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values = fields
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let [user, nice, system, idle, iowait, irq, softirq, rest @ ..] = values.as_slice() else {
        return None;
    };
    let steal = rest.first().copied().unwrap_or(0);
    let busy = user + nice + system + irq + softirq;
    Some(MachineTicks {
        busy,
        total: busy + idle + iowait + steal,
    })
}

/// What one line of `/proc/[pid]/stat` tells of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcessTicks {
    /// The executable's name, at most 15 bytes (`postgres`, `nats-server`, `sagaflow-bench`).
    comm: String,
    /// When the process started, in clock ticks since boot: tells a process that took a pid
    /// from the one that had it.
    started: u64,
    /// Its CPU time, user and system (utime + stime, every thread's), in clock ticks.
    cpu: u64,
}

/// Parses `/proc/[pid]/stat`: `pid (comm) state ppid ...`, utime and stime being fields 14 and
/// 15 and starttime field 22. `comm` may hold spaces and parentheses, so the fields are read
/// after the line's last `)`.
fn parse_process_stat(line: &str) -> Option<ProcessTicks> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    // The first field after the `)` is field 3 (state).
    let after = line
        .get(close + 1..)?
        .split_whitespace()
        .collect::<Vec<_>>();
    let field = |number: usize| after.get(number - 3)?.parse::<u64>().ok();
    Some(ProcessTicks {
        comm,
        started: field(22)?,
        cpu: field(14)? + field(15)?,
    })
}

/// The groups of processes whose CPU time the report shows apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuGroup {
    /// This process: the load generator, and the engine and the worker when they run in it.
    Bench,
    /// The engine nodes of `--engines`, child processes of this one.
    EngineNodes,
    /// Every PostgreSQL process: the server and its backends, one per connection.
    Postgres,
    /// The NATS server.
    NatsServer,
    /// Other `sagaflow-bench` processes: a `--worker-only` worker (or another benchmark).
    OtherBench,
}

impl CpuGroup {
    /// In the order the report lists them.
    const ALL: [CpuGroup; 5] = [
        CpuGroup::Bench,
        CpuGroup::EngineNodes,
        CpuGroup::Postgres,
        CpuGroup::NatsServer,
        CpuGroup::OtherBench,
    ];

    /// Its key in the report.
    fn name(self) -> &'static str {
        match self {
            CpuGroup::Bench => "bench",
            CpuGroup::EngineNodes => "engine_nodes",
            CpuGroup::Postgres => "postgres",
            CpuGroup::NatsServer => "nats_server",
            CpuGroup::OtherBench => "other_bench",
        }
    }

    /// The group of process `pid` named `comm`, if it is in one; `own_pid` is this process,
    /// `node_pids` the engine nodes (named `sagaflow-bench` too).
    fn of(pid: u32, comm: &str, own_pid: u32, node_pids: &[u32]) -> Option<CpuGroup> {
        if pid == own_pid {
            Some(CpuGroup::Bench)
        } else if node_pids.contains(&pid) {
            Some(CpuGroup::EngineNodes)
        } else if comm.starts_with("postgres") {
            Some(CpuGroup::Postgres)
        } else if comm == "nats-server" {
            Some(CpuGroup::NatsServer)
        } else if comm == "sagaflow-bench" {
            Some(CpuGroup::OtherBench)
        } else {
            None
        }
    }
}

/// The key of `other` in the report: the machine's busy time not in a `CpuGroup`.
const OTHER_CPU: &str = "other";

/// The machine's CPU time and every process's, at one moment.
struct CpuSnapshot {
    machine: MachineTicks,
    /// By pid and start time, so that a pid taken by a new process is a new key.
    processes: HashMap<(u32, u64), ProcessTicks>,
}

impl CpuSnapshot {
    /// Reads `/proc/stat` and every `/proc/[pid]/stat` (a few hundred small reads, a few
    /// milliseconds: done inline). A process that ends while it is read is left out.
    fn take() -> anyhow::Result<CpuSnapshot> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let machine = stat
            .lines()
            .find_map(parse_machine_ticks)
            .context("no `cpu` line in /proc/stat")?;
        let mut processes = HashMap::new();
        for entry in std::fs::read_dir("/proc").context("listing /proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(line) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let Some(process) = parse_process_stat(&line) {
                processes.insert((pid, process.started), process);
            }
        }
        Ok(CpuSnapshot { machine, processes })
    }

    /// A snapshot, or `None` (and a warning) where `/proc` cannot be read.
    fn take_or_warn() -> Option<CpuSnapshot> {
        CpuSnapshot::take()
            .map_err(|e| eprintln!("warning: no CPU figures: {e:#}"))
            .ok()
    }
}

/// The CPU time spent between two snapshots, in clock ticks.
#[derive(Debug, PartialEq)]
struct CpuUsage {
    machine_busy: u64,
    machine_total: u64,
    /// Each `CpuGroup`'s time in its order, then `other`: the machine's busy time not in the
    /// groups. `other` is noisy, even below zero at times: the machine's time and a process's
    /// are not sampled alike.
    groups: Vec<(&'static str, i64)>,
}

impl CpuUsage {
    /// The time spent from `start` to `end`. A process that started in between counts from
    /// zero (PostgreSQL's backends for new connections); one that ended in between loses all of
    /// its time, its last snapshot included, and that time shows in `other`.
    fn between(
        start: &CpuSnapshot,
        end: &CpuSnapshot,
        own_pid: u32,
        node_pids: &[u32],
    ) -> CpuUsage {
        let mut by_group = [0_i64; CpuGroup::ALL.len()];
        for (key, process) in &end.processes {
            let Some(group) = CpuGroup::of(key.0, &process.comm, own_pid, node_pids) else {
                continue;
            };
            let before = start.processes.get(key).map_or(0, |p| p.cpu);
            let spent = i64::try_from(process.cpu.saturating_sub(before)).unwrap_or(i64::MAX);
            if let Some(index) = CpuGroup::ALL.iter().position(|g| *g == group) {
                by_group[index] = by_group[index].saturating_add(spent);
            }
        }
        let machine_busy = end.machine.busy.saturating_sub(start.machine.busy);
        let in_groups = by_group.iter().sum::<i64>();
        let other = i64::try_from(machine_busy)
            .unwrap_or(i64::MAX)
            .saturating_sub(in_groups);
        let mut groups = CpuGroup::ALL
            .iter()
            .zip(by_group)
            .map(|(group, ticks)| (group.name(), ticks))
            .collect::<Vec<_>>();
        groups.push((OTHER_CPU, other));
        CpuUsage {
            machine_busy,
            machine_total: end.machine.total.saturating_sub(start.machine.total),
            groups,
        }
    }
}

/// The figures of `Report` on CPU, from the usage over the load.
struct CpuFigures {
    ms_per_saga: f64,
    ms_per_step: f64,
    machine_busy_percent: f64,
    process_ms_per_saga: BTreeMap<String, f64>,
    process_share: BTreeMap<String, f64>,
}

impl CpuFigures {
    /// Per saga and per step of the `completed` sagas of `steps` steps (at least one, so that
    /// a run that completed nothing still reports a figure); `ticks_per_second` is the unit.
    fn new(usage: &CpuUsage, completed: usize, steps: usize, ticks_per_second: f64) -> Self {
        let ms = |ticks: f64| ticks * 1_000.0 / ticks_per_second;
        let sagas = completed.max(1) as f64;
        let busy = usage.machine_busy as f64;
        let machine_ms_per_saga = ms(busy) / sagas;
        CpuFigures {
            ms_per_saga: machine_ms_per_saga,
            ms_per_step: machine_ms_per_saga / steps.max(1) as f64,
            machine_busy_percent: busy * 100.0 / (usage.machine_total.max(1) as f64),
            process_ms_per_saga: usage
                .groups
                .iter()
                .map(|(name, ticks)| (name.to_string(), ms(*ticks as f64) / sagas))
                .collect(),
            process_share: usage
                .groups
                .iter()
                .map(|(name, ticks)| (name.to_string(), *ticks as f64 / busy.max(1.0)))
                .collect(),
        }
    }
}

/// Clock ticks per second, the unit of the CPU times in `/proc`: `USER_HZ`, 100 on nearly
/// every Linux.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: `sysconf` takes a plain integer and reads a value of the C library; it touches
    // no memory of ours.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
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
    /// Starts `count` nodes serving saga `saga_name` of `steps` steps, and returns once each
    /// has launched its engine and the nodes hold a fair share of the partitions each.
    async fn launch(
        args: &Args,
        count: usize,
        steps: usize,
        url: &str,
        saga_name: &str,
    ) -> anyhow::Result<Self> {
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
        // This run's value only, of a `--steps` sweep: a node serves one definition.
        let steps = steps.to_string();
        let mut readiness = Vec::with_capacity(count);
        let launched = Instant::now();
        for index in 0..count {
            let node_name = node_name(index);
            let mut child = Command::new(&program)
                .args(["--serve-engine", "--node-name", &node_name])
                .args(["--database-url", url, "--nats-url", &args.nats_url])
                .args(["--saga-name", saga_name, "--steps", &steps])
                .args(["--commits-in-flight", &args.commits_in_flight.to_string()])
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

    /// The nodes' process ids, whose CPU time the report shows apart.
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
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
    let saga = bench_saga(
        saga_name,
        args.single_steps("--serve-engine")?,
        &Arc::default(),
    )?;
    let store = engine_store(args, url).await?;
    let options = EngineOptions {
        host: Some(node_name),
        commits_in_flight: args.commits_in_flight,
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
    args.validate()?;
    if args.worker_only {
        return serve_worker_only(&args).await;
    }
    let sagas_values = args.sagas_values();
    let runs = args.steps.len() * sagas_values.len();
    let mut figures = Vec::with_capacity(runs);
    for &steps in &args.steps {
        for &sagas in &sagas_values {
            if !figures.is_empty() {
                reset_peak_memory();
            }
            let report = run_once(&args, steps, sagas).await?;
            print_report(&report, args.json)?;
            let run = RunFigures::of(&report);
            if runs > 1 {
                say(
                    args.json,
                    &format!("run {}/{runs}: {}", figures.len() + 1, run.summary()),
                );
            }
            figures.push(run);
        }
    }
    if runs > 1 {
        for line in comparison(&figures, &args.steps, &sagas_values) {
            say(args.json, &line);
        }
    }
    Ok(())
}

/// Prints a line of a sweep's summary: with the report's table on stdout, or on stderr with
/// `--json`, which keeps stdout to the JSON lines.
fn say(json_only: bool, line: &str) {
    if json_only {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// `--worker-only`: serves the bench saga's steps until interrupted, then prints the step
/// overheads this process saw.
async fn serve_worker_only(args: &Args) -> anyhow::Result<()> {
    let url = args
        .database_url
        .clone()
        .context("--database-url is required in distributed mode (PostgreSQL)")?;
    let step_gaps = Arc::new(Gaps::default());
    let name = args
        .saga_name
        .clone()
        .unwrap_or_else(|| format!("bench_{}", Uuid::now_v7().simple()));
    let saga = bench_saga(&name, args.single_steps("--worker-only")?, &step_gaps)?;
    let worker = bench_worker(args, &url, saga).await?;
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
    Ok(())
}

/// Sagas completed in the engine's database, every saga's: the count before a run's load is
/// taken from the one after it.
async fn completed_in(engine: &Engine) -> anyhow::Result<usize> {
    let counts = engine.store().status_counts().await?;
    Ok(usize::try_from(
        counts.get("completed").copied().unwrap_or(0),
    )?)
}

/// One run of a sweep: `sagas` sagas of `steps` steps under a saga name of its own (or
/// `--saga-name`), with an engine (or nodes) and a worker launched for it and stopped after.
async fn run_once(args: &Args, steps: usize, sagas: usize) -> anyhow::Result<Report> {
    // From one step's handler returning to the next one's starting.
    let step_gaps = Arc::new(Gaps::default());
    // A fresh saga name per run keeps runs on a reused database apart.
    let name = args
        .saga_name
        .clone()
        .unwrap_or_else(|| format!("bench_{}", Uuid::now_v7().simple()));
    let saga = bench_saga(&name, steps, &step_gaps)?;
    let temp = std::env::temp_dir().join(format!("{name}.db"));
    let (engines, worker_task) = match args.mode {
        Mode::Embedded => {
            let url = args
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", temp.display()));
            let store = engine_store(args, &url).await?;
            let options = EngineOptions {
                worker_concurrency: args.in_flight.max(1),
                gauges_every: args.gauges_every(),
                commits_in_flight: args.commits_in_flight,
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
            let engines = match args.engines {
                None => {
                    let store = engine_store(args, &url).await?;
                    let spec = saga.spec().clone();
                    let options = EngineOptions {
                        gauges_every: args.gauges_every(),
                        commits_in_flight: args.commits_in_flight,
                        ..EngineOptions::default()
                    };
                    let engine =
                        Engine::launch_distributed(store, &args.nats_url, vec![spec], options)
                            .await?;
                    Engines::InProcess(Arc::new(engine))
                }
                Some(count) => {
                    let nodes = EngineNodes::launch(args, count, steps, &url, &name).await?;
                    Engines::Nodes(Arc::new(nodes))
                }
            };
            if args.worker_elsewhere {
                (engines, None)
            } else {
                let worker = bench_worker(args, &url, saga).await?;
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
            last_step: step_name(steps - 1),
            waiters: waiters.clone(),
        }),
        Engines::InProcess(_) => None,
    };
    let wire_task = match args.mode {
        Mode::Distributed if !args.no_wire_watch => Some(
            watch_wire(
                wire_gaps.clone(),
                &args.nats_url,
                &name,
                settle_on_last_reply,
            )
            .await?,
        ),
        Mode::Distributed | Mode::Embedded => None,
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
    // The engine in this process counts every saga of its database, earlier runs' included:
    // this run's are the difference. The nodes' count is this run's saga name's.
    let completed_before = match &engines {
        Engines::InProcess(engine) => completed_in(engine).await?,
        Engines::Nodes(_) => 0,
    };
    let node_pids = match &engines {
        Engines::Nodes(nodes) => nodes.pids(),
        Engines::InProcess(_) => Vec::new(),
    };

    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::with_capacity(sagas)));
    let at_tenth = Arc::new(Mutex::new(None::<f64>));
    let cpu_at_start = CpuSnapshot::take_or_warn();
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
        let total = sagas;
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
        Engines::Nodes(nodes) => Some(nodes.wait_until_completed(&name, sagas).await?),
        Engines::InProcess(_) => None,
    };
    let seconds = began.elapsed().as_secs_f64();
    // Before anything stops: the engine's and the worker's shutdowns are not the load's.
    let cpu_at_end = CpuSnapshot::take_or_warn();
    let peak = peak_memory_mib();
    let at_end = resident_memory_mib();
    let at_tenth = at_tenth.lock().ok().and_then(|at| *at).unwrap_or(0.0);
    if let Some(listener) = listener {
        listener.abort();
    }

    let (completed, node_shares) = match &engines {
        Engines::InProcess(engine) => (
            completed_in(engine).await?.saturating_sub(completed_before),
            None,
        ),
        Engines::Nodes(nodes) => (
            completed_by_nodes.unwrap_or(0),
            Some(nodes.node_shares(&name).await?),
        ),
    };
    let cpu = cpu_at_start.zip(cpu_at_end).map(|(start, end)| {
        let usage = CpuUsage::between(&start, &end, std::process::id(), &node_pids);
        CpuFigures::new(&usage, completed, steps, clock_ticks_per_second())
    });
    let mut latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    latencies.sort();
    let overheads = step_gaps.sorted();
    let gaps = wire_task.map(|task| {
        task.abort();
        wire_gaps.sorted()
    });
    let report = Report {
        mode: args.mode,
        sagas,
        steps_per_saga: steps,
        in_flight: args.in_flight,
        seconds,
        sagas_per_second: sagas as f64 / seconds,
        steps_per_second: (sagas * steps) as f64 / seconds,
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
        cpu_ms_per_saga: cpu.as_ref().map(|c| c.ms_per_saga),
        cpu_ms_per_step: cpu.as_ref().map(|c| c.ms_per_step),
        machine_busy_percent: cpu.as_ref().map(|c| c.machine_busy_percent),
        process_cpu_ms_per_saga: cpu.as_ref().map(|c| c.process_ms_per_saga.clone()),
        process_share: cpu.map(|c| c.process_share),
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
    Ok(report)
}

/// Prints a run's report: the table (unless `json_only`), then the JSON line, always last.
fn print_report(report: &Report, json_only: bool) -> anyhow::Result<()> {
    if !json_only {
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
        if let (Some(per_saga), Some(per_step), Some(busy)) = (
            report.cpu_ms_per_saga,
            report.cpu_ms_per_step,
            report.machine_busy_percent,
        ) {
            println!(
                "machine CPU           {per_saga:.3} ms/saga, {per_step:.3} ms/step \
                 (machine {busy:.0}% busy)"
            );
        }
        if let (Some(per_saga), Some(shares)) =
            (&report.process_cpu_ms_per_saga, &report.process_share)
        {
            // In the groups' order, `other` last, rather than the JSON maps' alphabetical one.
            let names = CpuGroup::ALL.iter().map(|g| g.name()).chain([OTHER_CPU]);
            for name in names {
                let ms = per_saga.get(name).copied().unwrap_or(0.0);
                let share = shares.get(name).copied().unwrap_or(0.0);
                println!(
                    "  {name:<19} {ms:.3} ms/saga ({:.1}% of busy)",
                    share * 100.0
                );
            }
        }
    }
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

/// What a sweep compares of one run.
#[derive(Debug, Clone, PartialEq)]
struct RunFigures {
    steps: usize,
    sagas: usize,
    sagas_per_second: f64,
    cpu_ms_per_saga: Option<f64>,
    cpu_ms_per_step: Option<f64>,
    machine_busy_percent: Option<f64>,
}

impl RunFigures {
    fn of(report: &Report) -> Self {
        RunFigures {
            steps: report.steps_per_saga,
            sagas: report.sagas,
            sagas_per_second: report.sagas_per_second,
            cpu_ms_per_saga: report.cpu_ms_per_saga,
            cpu_ms_per_step: report.cpu_ms_per_step,
            machine_busy_percent: report.machine_busy_percent,
        }
    }

    /// The run on one line, for a sweep.
    fn summary(&self) -> String {
        let cpu = match (
            self.cpu_ms_per_saga,
            self.cpu_ms_per_step,
            self.machine_busy_percent,
        ) {
            (Some(saga), Some(step), Some(busy)) => {
                format!(", CPU {saga:.3} ms/saga, {step:.3} ms/step (machine {busy:.0}% busy)")
            }
            _ => String::new(),
        };
        format!(
            "{} steps x {} sagas: {:.0} sagas/s{cpu}",
            self.steps, self.sagas, self.sagas_per_second
        )
    }
}

/// The end of a sweep: every run, with the CPU per step relative to the run of the first
/// `--steps` value (same `--sagas`) when there are several, and the sagas/s relative to the run
/// of the first `--sagas` value (same `--steps`) when there are several.
fn comparison(runs: &[RunFigures], steps_values: &[usize], sagas_values: &[usize]) -> Vec<String> {
    let find =
        |steps: usize, sagas: usize| runs.iter().find(|r| r.steps == steps && r.sagas == sagas);
    let ratio = |value: Option<f64>, base: Option<f64>| match (value, base) {
        (Some(value), Some(base)) if base > 0.0 => format!("{:.2}x", value / base),
        _ => "-".to_string(),
    };
    let (steps_sweep, sagas_sweep) = (steps_values.len() > 1, sagas_values.len() > 1);
    let mut lines = vec!["comparison, each relative to the first value of its sweep:".to_string()];
    lines.push(format!(
        "{:>6} {:>8} {:>9}{} {:>12}{}",
        "steps",
        "sagas",
        "sagas/s",
        if sagas_sweep { "  vs first sagas" } else { "" },
        "CPU ms/step",
        if steps_sweep { "  vs first steps" } else { "" },
    ));
    for run in runs {
        let mut line = format!(
            "{:>6} {:>8} {:>9.0}",
            run.steps, run.sagas, run.sagas_per_second
        );
        if sagas_sweep {
            let base = sagas_values
                .first()
                .and_then(|&first| find(run.steps, first))
                .map(|r| r.sagas_per_second);
            line.push_str(&format!(" {:>15}", ratio(Some(run.sagas_per_second), base)));
        }
        let per_step = run
            .cpu_ms_per_step
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}"));
        line.push_str(&format!(" {per_step:>12}"));
        if steps_sweep {
            let base = steps_values
                .first()
                .and_then(|&first| find(first, run.sagas))
                .and_then(|r| r.cpu_ms_per_step);
            line.push_str(&format!(" {:>15}", ratio(run.cpu_ms_per_step, base)));
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_leave_out_idle_iowait_steal_and_guest() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  46232 7 8009 17693 1002 3 239 1396 50 5";
        assert_eq!(
            parse_machine_ticks(line),
            Some(MachineTicks {
                busy: 46232 + 7 + 8009 + 3 + 239,
                total: 46232 + 7 + 8009 + 17693 + 1002 + 3 + 239 + 1396,
            })
        );
    }

    #[test]
    fn machine_ticks_of_an_older_kernel_without_steal() {
        assert_eq!(
            parse_machine_ticks("cpu 10 0 5 100 1 2 3"),
            Some(MachineTicks {
                busy: 20,
                total: 121
            })
        );
    }

    #[test]
    fn machine_ticks_only_from_the_whole_machines_line() {
        assert_eq!(parse_machine_ticks("cpu0 10 0 5 100 1 2 3 0 0 0"), None);
        assert_eq!(parse_machine_ticks("intr 123 4 5"), None);
        assert_eq!(parse_machine_ticks("cpu 10 0 5"), None);
        assert_eq!(parse_machine_ticks("cpu 10 x 5 100 1 2 3"), None);
    }

    /// A `/proc/[pid]/stat` line with `comm`, utime, stime and starttime put in.
    fn stat_line(pid: u32, comm: &str, utime: u64, stime: u64, started: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1200 0 0 0 {utime} {stime} 4 2 20 0 8 0 \
             {started} 123456789 4321 18446744073709551615 1 1 0 0 0 0 0 4096 17920 0 0 0 17 1 \
             0 0 0 0 0"
        )
    }

    #[test]
    fn process_stat_is_read_after_the_last_parenthesis() {
        let line = stat_line(4242, "tokio (x) y) z", 1500, 250, 987654);
        assert_eq!(
            parse_process_stat(&line),
            Some(ProcessTicks {
                comm: "tokio (x) y) z".into(),
                started: 987654,
                cpu: 1750,
            })
        );
    }

    #[test]
    fn process_stat_of_a_real_line() {
        let line = "9111 (cat) R 9071 9071 7756 0 -1 4194304 98 0 0 0 3 4 0 0 20 0 1 0 37259 \
                    3133440 360 18446744073709551615 94869745926144 94869745946025 \
                    140730885992512 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_process_stat(line),
            Some(ProcessTicks {
                comm: "cat".into(),
                started: 37259,
                cpu: 7,
            })
        );
    }

    #[test]
    fn process_stat_cut_short_is_refused() {
        assert_eq!(parse_process_stat("12 (postgres) S 1 12 12"), None);
        assert_eq!(parse_process_stat("12 postgres S 1 12 12"), None);
    }

    #[test]
    fn processes_are_grouped_by_pid_then_name() {
        let (own, nodes) = (100, [200, 201]);
        let group = |pid, comm| CpuGroup::of(pid, comm, own, &nodes);
        assert_eq!(group(100, "sagaflow-bench"), Some(CpuGroup::Bench));
        assert_eq!(group(201, "sagaflow-bench"), Some(CpuGroup::EngineNodes));
        assert_eq!(group(300, "sagaflow-bench"), Some(CpuGroup::OtherBench));
        assert_eq!(group(301, "postgres"), Some(CpuGroup::Postgres));
        assert_eq!(group(302, "postgres: walwr"), Some(CpuGroup::Postgres));
        assert_eq!(group(303, "nats-server"), Some(CpuGroup::NatsServer));
        assert_eq!(group(304, "cargo"), None);
    }

    fn snapshot(busy: u64, total: u64, processes: &[(u32, &str, u64, u64)]) -> CpuSnapshot {
        CpuSnapshot {
            machine: MachineTicks { busy, total },
            processes: processes
                .iter()
                .map(|&(pid, comm, started, cpu)| {
                    let process = ProcessTicks {
                        comm: comm.into(),
                        started,
                        cpu,
                    };
                    ((pid, started), process)
                })
                .collect(),
        }
    }

    #[test]
    fn usage_counts_new_processes_from_zero_and_loses_ended_ones() {
        let start = snapshot(
            1_000,
            5_000,
            &[
                (100, "sagaflow-bench", 1, 40),
                (300, "postgres", 2, 500),
                (301, "postgres", 3, 70),
                (400, "nats-server", 4, 90),
                (500, "cargo", 5, 10),
            ],
        );
        let end = snapshot(
            1_600,
            5_800,
            &[
                (100, "sagaflow-bench", 1, 240),
                (300, "postgres", 2, 600),
                // 301 ended, 302 is a new backend.
                (302, "postgres", 30, 25),
                (400, "nats-server", 4, 150),
                (500, "cargo", 5, 60),
            ],
        );
        let usage = CpuUsage::between(&start, &end, 100, &[]);
        assert_eq!(usage.machine_busy, 600);
        assert_eq!(usage.machine_total, 800);
        assert_eq!(
            usage.groups,
            vec![
                ("bench", 200),
                ("engine_nodes", 0),
                ("postgres", 125),
                ("nats_server", 60),
                ("other_bench", 0),
                ("other", 215),
            ]
        );
    }

    #[test]
    fn a_reused_pid_is_a_new_process() {
        let start = snapshot(0, 0, &[(300, "postgres", 2, 500)]);
        let end = snapshot(100, 100, &[(300, "postgres", 9, 30)]);
        let usage = CpuUsage::between(&start, &end, 1, &[]);
        assert_eq!(usage.groups[2], ("postgres", 30));
    }

    #[test]
    fn figures_per_saga_per_step_and_shares() {
        let usage = CpuUsage {
            machine_busy: 400,
            machine_total: 1_000,
            groups: vec![("bench", 300), ("other", 100)],
        };
        let figures = CpuFigures::new(&usage, 1_000, 4, 100.0);
        // 400 ticks of 10 ms over 1,000 sagas of 4 steps.
        assert!((figures.ms_per_saga - 4.0).abs() < 1e-9);
        assert!((figures.ms_per_step - 1.0).abs() < 1e-9);
        assert!((figures.machine_busy_percent - 40.0).abs() < 1e-9);
        assert!((figures.process_ms_per_saga["bench"] - 3.0).abs() < 1e-9);
        assert!((figures.process_share["other"] - 0.25).abs() < 1e-9);
    }

    fn run(steps: usize, sagas: usize, rate: f64, per_step: f64) -> RunFigures {
        RunFigures {
            steps,
            sagas,
            sagas_per_second: rate,
            cpu_ms_per_saga: Some(per_step * steps as f64),
            cpu_ms_per_step: Some(per_step),
            machine_busy_percent: Some(90.0),
        }
    }

    #[test]
    fn comparison_is_relative_to_the_first_value_of_each_sweep() {
        let runs = [
            run(3, 100, 400.0, 1.0),
            run(3, 1_000, 200.0, 1.5),
            run(10, 100, 100.0, 0.5),
            run(10, 1_000, 50.0, 0.6),
        ];
        let lines = comparison(&runs, &[3, 10], &[100, 1_000]);
        assert_eq!(lines.len(), 6);
        assert!(lines[1].contains("vs first sagas") && lines[1].contains("vs first steps"));
        // sagas/s against 3 x 100, CPU per step against 3 x 100.
        assert!(
            lines[2].ends_with("1.00x        1.000           1.00x"),
            "{}",
            lines[2]
        );
        // sagas/s against 3 x 100, CPU per step against 3 x 1000.
        assert!(lines[3].contains(" 0.50x") && lines[3].ends_with(" 1.00x"));
        // sagas/s against 10 x 100, CPU per step against 3 x 100.
        assert!(lines[4].contains(" 1.00x") && lines[4].ends_with(" 0.50x"));
        assert!(lines[5].contains(" 0.50x") && lines[5].ends_with(" 0.40x"));
    }

    #[test]
    fn comparison_of_a_steps_sweep_alone() {
        let runs = [run(3, 100, 400.0, 1.0), run(10, 100, 100.0, 0.5)];
        let lines = comparison(&runs, &[3, 10], &[100]);
        assert!(!lines[1].contains("vs first sagas"));
        assert!(lines[3].ends_with(" 0.50x"));
    }

    #[test]
    fn lists_and_preset_parse() {
        let args = Args::try_parse_from(["sagaflow-bench", "--steps", "3,10", "--sagas", "5"])
            .expect("parses");
        assert_eq!(args.steps, vec![3, 10]);
        assert_eq!(args.sagas_values(), vec![5]);
        let args = Args::try_parse_from(["sagaflow-bench", "--preset", "long"]).expect("parses");
        assert_eq!(args.sagas_values(), vec![10_000, 100_000]);
        assert_eq!(args.steps, vec![3]);
        assert!(
            Args::try_parse_from(["sagaflow-bench", "--preset", "long", "--sagas", "5"]).is_err()
        );
    }

    #[test]
    fn a_worker_or_a_named_saga_refuses_a_list_of_steps() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sagaflow-bench", "--mode", "distributed"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).expect("parses")
        };
        assert!(
            parse(&["--worker-only", "--steps", "3,10"])
                .validate()
                .is_err()
        );
        assert!(
            parse(&["--worker-only", "--steps", "10"])
                .validate()
                .is_ok()
        );
        assert!(
            parse(&["--saga-name", "x", "--steps", "3,10"])
                .validate()
                .is_err()
        );
        assert!(
            parse(&["--saga-name", "x", "--sagas", "5,6", "--engines", "2"])
                .validate()
                .is_err()
        );
        assert!(
            parse(&["--saga-name", "x", "--sagas", "5,6"])
                .validate()
                .is_ok()
        );
        assert!(parse(&["--steps", "3,0"]).validate().is_err());
        let node = parse(&["--serve-engine", "--steps", "3,10"]);
        assert!(node.single_steps("--serve-engine").is_err());
    }
}
