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

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::Store;
use sagaflow_sdk::protocol::names;
use sagaflow_sdk::worker::{ResultStore, Worker, WorkerOptions};
use sagaflow_sdk::{Compensate, RetryPolicy, Saga, Step, StepContext, StepError, StepHandler};
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

/// Measure sagas/s, steps/s, saga latency and per-step overhead.
#[derive(Debug, Parser)]
#[command(name = "sagaflow-bench", version, about)]
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
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
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

/// Times the engine's share of each step from the wire into `gaps`: a plain NATS subscription
/// to the benchmark saga's commands and replies, keyed by the saga id that leads every
/// `Nats-Msg-Id`. A reply opens a gap, the saga's next command closes it.
async fn watch_wire(
    gaps: Arc<Gaps>,
    nats_url: &str,
    saga_name: &str,
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
            // A command's id leads with its saga's id; a reply's is the command's, prefixed.
            let id = id.as_str();
            let id = id.strip_prefix(reply_id_prefix).unwrap_or(id);
            let Some(saga_id) = id.split(':').next().and_then(|s| s.parse::<Uuid>().ok()) else {
                continue;
            };
            if is_reply {
                gaps.open(saga_id, now);
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
            Step::compensatable(format!("step{i}"), handler)
                .retry(policy.clone())
                .timeout(Duration::from_secs(30)),
        );
    }
    Ok(builder.build()?)
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
    completed: usize,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sagaflow_sdk::process::init_logging();
    let args = Args::parse();
    if args.steps == 0 || args.sagas == 0 || args.in_flight == 0 {
        bail!("--sagas, --steps and --in-flight must be at least 1");
    }
    if matches!(args.mode, Mode::Embedded) && (args.worker_only || args.worker_elsewhere) {
        bail!("--worker-only and --worker-elsewhere are for the distributed mode");
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
    let (engine, worker_task) = match args.mode {
        Mode::Embedded => {
            let url = args
                .database_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", temp.display()));
            let store = Store::connect(&url).await?;
            let options = EngineOptions {
                worker_concurrency: args.in_flight.max(1),
                ..EngineOptions::default()
            };
            (Engine::launch(store, vec![saga], options).await?, None)
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
            let store = Store::connect(&url).await?;
            let spec = saga.spec().clone();
            let engine = Engine::launch_distributed(
                store,
                &args.nats_url,
                vec![spec],
                EngineOptions::default(),
            )
            .await?;
            if args.worker_elsewhere {
                (engine, None)
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
                (engine, Some((stop, task)))
            }
        }
    };

    // From a step's reply to the next step's command, as the broker passes them on.
    let wire_gaps = Arc::new(Gaps::default());
    let wire_task = match args.mode {
        Mode::Distributed => Some(watch_wire(wire_gaps.clone(), &args.nats_url, &name).await?),
        Mode::Embedded => None,
    };
    let waiters = Arc::new(Waiters::default());
    let mut settled = engine.settled();
    let listener = {
        let waiters = waiters.clone();
        tokio::spawn(async move {
            loop {
                match settled.recv().await {
                    Ok(s) => waiters.settled(s.saga_id),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("warning: missed {n} settle notifications");
                    }
                    Err(_) => break,
                }
            }
        })
    };

    let engine = Arc::new(engine);
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u32>::with_capacity(args.sagas)));
    let at_tenth = Arc::new(Mutex::new(None::<f64>));
    let began = Instant::now();
    let mut generators = Vec::new();
    for _ in 0..args.in_flight {
        let (engine, next, latencies, waiters, name, step_gaps, wire_gaps, at_tenth) = (
            engine.clone(),
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
                let id = engine.start(&name, json!({}), None).await?;
                if let Some(wait) = waiters.wait(id) {
                    let _ = tokio::time::timeout(Duration::from_secs(120), wait).await;
                }
                if let Ok(mut l) = latencies.lock() {
                    l.push(micros(started.elapsed()));
                }
                step_gaps.forget(id);
                wire_gaps.forget(id);
            }
            Ok::<_, sagaflow_engine::EngineError>(())
        }));
    }
    for generator in generators {
        generator.await??;
    }
    let seconds = began.elapsed().as_secs_f64();
    let peak = peak_memory_mib();
    let at_end = resident_memory_mib();
    let at_tenth = at_tenth.lock().ok().and_then(|at| *at).unwrap_or(0.0);
    listener.abort();

    let counts = engine.store().status_counts().await?;
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
        completed: counts.get("completed").copied().unwrap_or(0) as usize,
    };
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.shutdown().await;
    }
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
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
