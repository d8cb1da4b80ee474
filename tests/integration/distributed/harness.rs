//! The harness of the distributed fault tests: the child processes, the cluster of engine,
//! workers, broker and databases, the checks of a run's history, and the copiers that
//! deliver commands and replies twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_engine::store::{HistoryEntry, Store};
use sagaflow_sdk::Direction;
use sagaflow_sdk::protocol::{EngineAnswer, PROTOCOL_VERSION, StartRequest, names};
use sagaflow_sdk::protocol::{NatsSecurity, WhileUnreachable};
use sagaflow_tests::metrics::{Scrape, free_metrics_addr, scrape};
use sagaflow_tests::{Backend, CLUSTER_SIZE, NatsCluster, NatsServer, TestDb};
use sagaflow_workflows::{
    DEMO_STOCK, Faults, Inventory, OrderMix, PLACE_ORDER, PlaceOrder, SagaOutcomes,
    check_invariants, generate_orders, install,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, QueryResult, Statement};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::{build_binary, check_compensations};

/// Sagas per fault test (at least).
pub(super) const ORDERS: usize = 300;
/// The share of orders paid with a declined card (they compensate).
pub(super) const DECLINE_RATIO: f64 = 0.15;
/// The workers' injected failures: transient before the effect, and after it (a lost reply).
pub(super) const TRANSIENT: &str = "0.05";
pub(super) const LOST_REPLY: &str = "0.02";
/// How long a process gets to come up.
pub(super) const READY_PATIENCE: Duration = Duration::from_secs(60);
/// How long one start may keep being retried.
pub(super) const START_PATIENCE: Duration = Duration::from_secs(120);
/// How long the sagas get to end once the faults are over.
pub(super) const SETTLE_PATIENCE: Duration = Duration::from_secs(120);
/// The children's log filter: our crates at info, the rest (sqlx's per-query lines) at warn.
pub(super) const CHILD_LOG: &str =
    "warn,sagaflow_engine=info,sagaflow_sdk=info,sagaflow_workflows=info";

/// One test at a time: each runs five processes on a 2-core machine.
pub(super) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(super) struct Binaries {
    pub(super) engine: PathBuf,
    pub(super) worker: PathBuf,
}

pub(super) fn binaries() -> &'static Binaries {
    static BUILT: OnceLock<Binaries> = OnceLock::new();
    BUILT.get_or_init(|| Binaries {
        engine: build_binary("sagaflow-cli", "sagaflow"),
        worker: build_binary("sagaflow-workflows", "sagaflow-demo-worker"),
    })
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub(super) struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub(super) fn spawn(name: &str, command: &mut Command, log: &Path) -> Proc {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log file");
        let err = out.try_clone().expect("clone the log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll a child process")
    }

    /// Sends `signal` (STOP, CONT, TERM) to this child, which must still be running (not
    /// reaped, so its pid cannot have been reused).
    pub(super) fn signal(&mut self, signal: &str) {
        assert!(
            self.exited().is_none(),
            "{} exited before it could get SIG{signal}",
            self.name
        );
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {} failed", self.name);
    }

    /// SIGKILLs it (it must still be running) and reaps it.
    pub(super) fn kill(mut self) {
        assert!(
            self.exited().is_none(),
            "{} exited before it could be killed",
            self.name
        );
        self.child.kill().expect("SIGKILL a child");
        self.child.wait().expect("reap a child");
    }

    /// Waits for it to exit by itself, up to `patience`.
    pub(super) async fn wait_exit(&mut self, patience: Duration) -> Option<ExitStatus> {
        let give_up = Instant::now() + patience;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= give_up {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

pub(super) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(super) async fn rows(db: &DatabaseConnection, sql: &str) -> Vec<QueryResult> {
    db.query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap_or_else(|e| panic!("query `{sql}`: {e}"))
}

pub(super) async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    rows(db, sql).await[0]
        .try_get_by_index::<i64>(0)
        .expect("a count")
}

/// What the history of a run shows, besides the checks that must hold.
#[derive(Debug, Default)]
pub(super) struct Findings {
    counts: BTreeMap<String, i64>,
    /// `reply_ignored` records by reason (`duplicate`, `late`, or the whole reason).
    pub(super) ignored: BTreeMap<String, usize>,
    /// Attempts that timed out.
    pub(super) timed_out: usize,
    /// Timed-out attempts followed by the next attempt, with the same idempotency key.
    pub(super) redispatched: usize,
}

/// The test's own broker: one nats-server, or a three-server JetStream cluster with every
/// stream kept on all three.
pub(super) enum Broker {
    Single(NatsServer),
    Clustered(NatsCluster),
}

impl Broker {
    /// What `--nats-url` takes: the server's URL, or every server's, comma-separated.
    pub(super) fn urls(&self) -> String {
        match self {
            Broker::Single(server) => server.url(),
            Broker::Clustered(cluster) => cluster.urls(),
        }
    }

    /// The `--stream-replicas` the engines and workers are given.
    fn stream_replicas(&self) -> usize {
        match self {
            Broker::Single(_) => 1,
            Broker::Clustered(_) => CLUSTER_SIZE,
        }
    }

    /// The one server of a single-server broker, for the tests that stop or purge it.
    pub(super) fn single(&mut self) -> &mut NatsServer {
        match self {
            Broker::Single(server) => server,
            Broker::Clustered(_) => panic!("this test's broker is a cluster, not one server"),
        }
    }

    /// The cluster of a clustered broker, for the tests that kill its servers.
    pub(super) fn cluster(&mut self) -> &mut NatsCluster {
        match self {
            Broker::Clustered(cluster) => cluster,
            Broker::Single(_) => panic!("this test's broker is one server, not a cluster"),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        match self {
            Broker::Single(server) => server.log_tail(lines),
            Broker::Clustered(cluster) => cluster.log_tails(lines),
        }
    }
}

/// One test's processes and databases.
pub(super) struct Cluster {
    name: &'static str,
    /// Engine nodes: `engine` (node 0), `engine1`, `engine2`, ... in the logs; each is started
    /// with `--node-name e{i}`, so the history names it `e{i}-PID-RANDOM`.
    pub(super) engines: Vec<Option<Proc>>,
    pub(super) workers: Vec<Option<Proc>>,
    engine_lives: Vec<usize>,
    /// `--lease` and `--renew-every` of every engine.
    lease: (&'static str, &'static str),
    worker_lives: Vec<usize>,
    /// Where each engine node and worker serves `/metrics` (kept across restarts).
    engine_metrics: Vec<SocketAddr>,
    worker_metrics: Vec<SocketAddr>,
    ack_wait_secs: u64,
    started_at: Instant,
    pub(super) store: Store,
    demo: DatabaseConnection,
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) nats: Broker,
    engine_db: TestDb,
    worker_db: TestDb,
    logs: tempfile::TempDir,
    /// What every engine and worker is started with besides the harness's own settings.
    options: ChildOptions,
}

/// How the engines and workers of a run are started.
#[derive(Debug, Clone)]
pub(super) struct ChildOptions {
    /// `--transient` and `--lost-reply` of the workers.
    pub(super) worker_faults: (&'static str, &'static str),
    /// Environment variables of every engine and worker.
    pub(super) env: Vec<(String, String)>,
    /// Flags of every engine after the harness's own (credentials, TLS).
    pub(super) engine_args: Vec<String>,
    /// Flags of every worker after the harness's own (credentials, TLS, the sagas it serves).
    pub(super) worker_args: Vec<String>,
    /// How the harness's own client connects.
    pub(super) client: NatsSecurity,
}

impl Default for ChildOptions {
    fn default() -> Self {
        ChildOptions {
            worker_faults: (TRANSIENT, LOST_REPLY),
            env: Vec::new(),
            engine_args: Vec::new(),
            worker_args: Vec::new(),
            client: NatsSecurity::default(),
        }
    }
}

impl Cluster {
    /// A private nats-server, two fresh databases, the engine and `workers` workers, all up
    /// and the workers' saga definitions registered with the engine.
    pub(super) async fn new(name: &'static str, workers: usize, ack_wait_secs: u64) -> Cluster {
        // A restarted engine waits for the leases of the one killed before it to lapse; short
        // leases keep the many restarts of these tests inside their load windows.
        Cluster::with_engines(name, 1, ("1s", "250ms"), workers, ack_wait_secs).await
    }

    /// As [`Cluster::new`], with `engines` engine nodes sharing the database, each with
    /// `lease` (`--lease`, `--renew-every`).
    pub(super) async fn with_engines(
        name: &'static str,
        engines: usize,
        lease: (&'static str, &'static str),
        workers: usize,
        ack_wait_secs: u64,
    ) -> Cluster {
        Cluster::assemble(
            name,
            engines,
            lease,
            workers,
            ack_wait_secs,
            Broker::Single(NatsServer::start()),
            ChildOptions::default(),
        )
        .await
    }

    /// One engine and one worker whose spans are exported to `otlp_endpoint`, the worker
    /// injecting no faults (every step's path is the plain one).
    pub(super) async fn traced(name: &'static str, otlp_endpoint: &str) -> Cluster {
        let options = ChildOptions {
            env: vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                otlp_endpoint.to_string(),
            )],
            ..ChildOptions::default()
        };
        Cluster::secured(name, NatsServer::start(), options).await
    }

    /// One engine and one worker, injecting no faults (every step's path is the plain one), on
    /// `server` (one the test configured with TLS or authentication, or a plain one), started
    /// with `options` (whose faults are ignored).
    pub(super) async fn secured(
        name: &'static str,
        server: NatsServer,
        options: ChildOptions,
    ) -> Cluster {
        let options = ChildOptions {
            worker_faults: ("0", "0"),
            ..options
        };
        let broker = Broker::Single(server);
        Cluster::assemble(name, 1, ("1s", "250ms"), 1, 10, broker, options).await
    }

    /// As [`Cluster::with_engines`] on a three-server JetStream cluster, the engines and
    /// workers given every server's URL and `--stream-replicas 3`.
    pub(super) async fn on_nats_cluster(
        name: &'static str,
        engines: usize,
        lease: (&'static str, &'static str),
        workers: usize,
        ack_wait_secs: u64,
    ) -> Cluster {
        let broker = Broker::Clustered(tokio::task::block_in_place(NatsCluster::start));
        let options = ChildOptions::default();
        Cluster::assemble(
            name,
            engines,
            lease,
            workers,
            ack_wait_secs,
            broker,
            options,
        )
        .await
    }

    async fn assemble(
        name: &'static str,
        engines: usize,
        lease: (&'static str, &'static str),
        workers: usize,
        ack_wait_secs: u64,
        nats: Broker,
        options: ChildOptions,
    ) -> Cluster {
        let started_at = Instant::now();
        binaries();
        let built = started_at.elapsed();
        let engine_db = TestDb::new(Backend::Postgres).await;
        let worker_db = TestDb::new(Backend::Postgres).await;
        // Migrated here, before the engine starts, so the two never race to migrate.
        let store = Store::connect(&engine_db.url)
            .await
            .expect("open the engine database");
        let demo = Database::connect(&worker_db.url)
            .await
            .expect("open the worker database");
        install(&demo).await.expect("create the demo tables");
        let client = sagaflow_protocol::connect_with(
            &nats.urls(),
            &options.client,
            "sagaflow-fault-test",
            WhileUnreachable::Wait,
            |o| o.request_timeout(Some(Duration::from_secs(3))),
        )
        .await
        .expect("connect to the test's nats-server");
        let js = jetstream::new(client.clone());
        let mut cluster = Cluster {
            name,
            engines: (0..engines).map(|_| None).collect(),
            workers: (0..workers).map(|_| None).collect(),
            engine_lives: vec![0; engines],
            lease,
            worker_lives: vec![0; workers],
            engine_metrics: (0..engines).map(|_| free_metrics_addr()).collect(),
            worker_metrics: (0..workers).map(|_| free_metrics_addr()).collect(),
            ack_wait_secs,
            started_at,
            store,
            demo,
            client,
            js,
            nats,
            engine_db,
            worker_db,
            logs: tempfile::tempdir().expect("a folder for the logs"),
            options,
        };
        for e in 0..engines {
            cluster.start_node(e);
        }
        for i in 0..workers {
            cluster.start_worker(i);
        }
        for e in 0..engines {
            cluster.node_ready(e).await;
        }
        for i in 0..workers {
            cluster.worker_ready(i).await;
        }
        let give_up = Instant::now() + READY_PATIENCE;
        while !cluster
            .store
            .definitions()
            .await
            .expect("read the definitions")
            .iter()
            .any(|d| d.name == PLACE_ORDER)
        {
            assert!(
                Instant::now() < give_up,
                "{name}: no worker registered {PLACE_ORDER}\n{}",
                cluster.tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "{name}: binaries ready after {built:.1?}, processes up after {:.1?}",
            started_at.elapsed()
        );
        cluster
    }

    /// The engine database's URL.
    pub(super) fn engine_db_url(&self) -> &str {
        &self.engine_db.url
    }

    /// The test's nats-server (of a single-server broker).
    pub(super) fn nats_server(&mut self) -> &mut NatsServer {
        self.nats.single()
    }

    /// Prints how far the test got, and when.
    pub(super) fn phase(&self, what: &str) {
        println!("{}: {what} at {:.1?}", self.name, self.started_at.elapsed());
    }

    pub(super) fn log(&self, who: &str) -> PathBuf {
        self.logs.path().join(format!("{who}.log"))
    }

    pub(super) fn start_engine(&mut self) {
        self.start_node(0);
    }

    /// The log name of engine node `e`.
    pub(super) fn node_log_name(e: usize) -> String {
        if e == 0 {
            "engine".into()
        } else {
            format!("engine{e}")
        }
    }

    pub(super) fn start_node(&mut self, e: usize) {
        assert!(self.engines[e].is_none(), "engine {e} is running already");
        self.engine_lives[e] += 1;
        let mut command = Command::new(&binaries().engine);
        command
            .args(["serve", "--database-url", &self.engine_db.url])
            .args(["--nats-url", &self.nats.urls()])
            .args([
                "--stream-replicas",
                &self.nats.stream_replicas().to_string(),
            ])
            .args(["--lease", self.lease.0, "--renew-every", self.lease.1])
            .args(["--node-name", &format!("e{e}")])
            .args(["--metrics-addr", &self.engine_metrics[e].to_string()])
            .args(["--gauges-every", "500ms"])
            .args(&self.options.engine_args)
            .env("RUST_LOG", CHILD_LOG)
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .envs(self.options.env.iter().cloned());
        let who = Self::node_log_name(e);
        self.engines[e] = Some(Proc::spawn(
            &format!("engine node e{e}"),
            &mut command,
            &self.log(&who),
        ));
    }

    pub(super) fn start_worker(&mut self, i: usize) {
        assert!(self.workers[i].is_none(), "worker {i} is running already");
        self.worker_lives[i] += 1;
        let id = format!("w{i}");
        // Another seed per life, so a restarted worker does not replay the same faults.
        let seed = (i * 1_000 + self.worker_lives[i]).to_string();
        let mut command = Command::new(&binaries().worker);
        command
            .args(["--database-url", &self.worker_db.url])
            .args(["--nats-url", &self.nats.urls()])
            .args([
                "--stream-replicas",
                &self.nats.stream_replicas().to_string(),
            ])
            .args(["--id", &id, "--seed", &seed])
            .args(["--transient", self.options.worker_faults.0])
            .args(["--lost-reply", self.options.worker_faults.1])
            .args(["--ack-wait-secs", &self.ack_wait_secs.to_string()])
            .args(["--metrics-addr", &self.worker_metrics[i].to_string()])
            .args(&self.options.worker_args)
            .env("SAGAFLOW_SECRET_KEYS", sagaflow_tests::TEST_SECRET_KEYS)
            .env("RUST_LOG", CHILD_LOG)
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .envs(self.options.env.iter().cloned());
        self.workers[i] = Some(Proc::spawn(
            &format!("worker {id}"),
            &mut command,
            &self.log(&id),
        ));
    }

    /// How many idempotency records the workers keep.
    pub(super) async fn worker_results(&self) -> i64 {
        count(&self.demo, "SELECT COUNT(*) FROM worker_results").await
    }

    /// What engine node `e` serves at `/metrics` now.
    pub(super) fn scrape_node(&self, e: usize) -> Scrape {
        scrape(self.engine_metrics[e])
    }

    /// What worker `i` serves at `/metrics` now.
    pub(super) fn scrape_worker(&self, i: usize) -> Scrape {
        scrape(self.worker_metrics[i])
    }

    /// Waits until `log` holds `needle` `times` times (once per life of the process).
    pub(super) async fn wait_for_line(&self, who: &str, needle: &str, times: usize) {
        let give_up = Instant::now() + READY_PATIENCE;
        loop {
            let text = std::fs::read_to_string(self.log(who)).unwrap_or_default();
            if text.matches(needle).count() >= times {
                return;
            }
            assert!(
                Instant::now() < give_up,
                "{}: {who} did not come up in {READY_PATIENCE:?}\n{}",
                self.name,
                self.tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) async fn engine_ready(&self) {
        self.node_ready(0).await;
    }

    pub(super) async fn node_ready(&self, e: usize) {
        self.wait_for_line(
            &Self::node_log_name(e),
            "sagaflow engine serving on",
            self.engine_lives[e],
        )
        .await;
    }

    pub(super) async fn worker_ready(&self, i: usize) {
        self.wait_for_line(
            &format!("w{i}"),
            "serving place_order",
            self.worker_lives[i],
        )
        .await;
    }

    pub(super) fn kill_engine(&mut self) {
        self.kill_node(0);
    }

    pub(super) fn kill_node(&mut self, e: usize) {
        self.engines[e]
            .take()
            .expect("the engine node is running")
            .kill();
    }

    pub(super) fn kill_worker(&mut self, i: usize) {
        self.workers[i]
            .take()
            .expect("the worker is running")
            .kill();
    }

    pub(super) fn engine(&mut self) -> &mut Proc {
        self.node(0)
    }

    pub(super) fn node(&mut self, e: usize) -> &mut Proc {
        self.engines[e]
            .as_mut()
            .expect("the engine node is running")
    }

    pub(super) fn worker(&mut self, i: usize) -> &mut Proc {
        self.workers[i].as_mut().expect("the worker is running")
    }

    /// The run's orders: `count` of them, 15% with a declined card.
    pub(super) fn orders(&self, count: usize, seed: u64) -> Vec<PlaceOrder> {
        generate_orders(&OrderMix {
            prefix: self.name.to_string(),
            count,
            decline_ratio: DECLINE_RATIO,
            seed,
            ..OrderMix::default()
        })
    }

    /// Starts one saga per order over NATS (start key = order id), spread evenly over `over`
    /// (so the faults meet sagas in flight) until [`Starts::finish`] hurries the rest; each
    /// start is retried until an engine answers.
    pub(super) fn spawn_starts(&self, orders: Vec<PlaceOrder>, over: Duration) -> Starts {
        let client = self.client.clone();
        let (hurry, hurried) = watch::channel(false);
        let task = tokio::spawn(async move {
            let begin = tokio::time::Instant::now();
            let n = orders.len().max(1) as f64;
            futures::stream::iter(orders.into_iter().enumerate())
                .map(|(i, order)| {
                    let client = client.clone();
                    let mut hurried = hurried.clone();
                    async move {
                        tokio::select! {
                            _ = tokio::time::sleep_until(begin + over.mul_f64(i as f64 / n)) => {}
                            _ = hurried.wait_for(|h| *h) => {}
                        }
                        let id = start_saga(&client, &order.order_id, order.to_json()).await;
                        (order.order_id, id)
                    }
                })
                .buffer_unordered(64)
                .collect()
                .await
        });
        Starts {
            name: self.name,
            hurry,
            task,
        }
    }

    /// Adds `times` the demo's stock of every SKU, for runs with more orders than it covers
    /// (the fresh sagas after the faults must still find stock).
    pub(super) async fn restock(&self, times: u32) {
        let inventory = Inventory::new(self.demo.clone(), Faults::none());
        for (sku, units) in DEMO_STOCK {
            inventory
                .restock(sku, units * times)
                .await
                .expect("restock the demo inventory");
        }
    }

    /// Attempts dispatched and not answered yet.
    pub(super) async fn in_flight(&self) -> i64 {
        count(
            self.store.connection(),
            "SELECT COUNT(*) FROM step_attempts WHERE status = 'dispatched'",
        )
        .await
    }

    /// Waits (up to ten seconds) until at least `min` attempts are in flight; returns how many.
    pub(super) async fn wait_in_flight(&self, min: i64) -> i64 {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.in_flight().await;
            if n >= min {
                return n;
            }
            assert!(
                Instant::now() < give_up,
                "{}: not {min} attempts in flight within 10 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits (up to ten seconds) until some attempt has been in flight for `age`; returns how
    /// many have.
    pub(super) async fn wait_unanswered_for(&self, age: Duration) -> i64 {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("a clock after 1970")
                .as_millis();
            let before = now_ms - age.as_millis();
            let n = count(
                self.store.connection(),
                &format!(
                    "SELECT COUNT(*) FROM step_attempts \
                     WHERE status = 'dispatched' AND dispatched_at < {before}"
                ),
            )
            .await;
            if n > 0 {
                return n;
            }
            assert!(
                Instant::now() < give_up,
                "{}: no attempt stayed unanswered for {age:?} within 10 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Attempts that ended three seconds or more after their dispatch.
    pub(super) async fn slow_attempts(&self) -> i64 {
        count(
            self.store.connection(),
            "SELECT COUNT(*) FROM step_attempts \
             WHERE finished_at IS NOT NULL AND finished_at - dispatched_at >= 3000",
        )
        .await
    }

    pub(super) async fn ignored_with(&self, reason_prefix: &str) -> i64 {
        count(
            self.store.connection(),
            &format!(
                "SELECT COUNT(*) FROM saga_history WHERE kind = 'reply_ignored' \
                 AND payload LIKE '%\"reason\":\"{reason_prefix}%'"
            ),
        )
        .await
    }

    /// Waits until `expected` sagas exist and none is created, running or compensating.
    pub(super) async fn wait_settled(&self, expected: usize) -> BTreeMap<String, i64> {
        let give_up = Instant::now() + SETTLE_PATIENCE;
        loop {
            let counts = self.store.status_counts().await.expect("count sagas");
            let total: i64 = counts.values().sum();
            let active: i64 = ["created", "running", "compensating"]
                .iter()
                .filter_map(|s| counts.get(*s))
                .sum();
            if total >= expected as i64 && active == 0 {
                return counts;
            }
            assert!(
                Instant::now() < give_up,
                "{}: sagas still active {SETTLE_PATIENCE:?} after the faults ended: {counts:?} \
                 ({} attempts in flight)\n{}",
                self.name,
                self.in_flight().await,
                self.tails()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every check that must hold after any fault; returns what the histories show.
    pub(super) async fn verify(&self, started: &BTreeMap<String, Uuid>) -> Findings {
        let name = self.name;
        let mut findings = Findings {
            counts: self.wait_settled(started.len()).await,
            ..Findings::default()
        };
        self.phase("settled");
        let mut sagas: HashMap<Uuid, (String, String)> = HashMap::new();
        for row in rows(
            self.store.connection(),
            "SELECT id, start_key, status FROM sagas",
        )
        .await
        {
            let id: String = row.try_get("", "id").expect("id");
            let key: Option<String> = row.try_get("", "start_key").expect("start_key");
            let status: String = row.try_get("", "status").expect("status");
            let id = Uuid::parse_str(&id).expect("a saga id");
            sagas.insert(id, (key.expect("every saga has a start key"), status));
        }
        assert_eq!(
            sagas.len(),
            started.len(),
            "{name}: one saga per start key, and no other"
        );
        for (key, id) in started {
            assert_eq!(
                sagas.get(id).map(|(k, _)| k.as_str()),
                Some(key.as_str()),
                "{name}: saga {id} was answered for start key {key}"
            );
        }

        let recorded: HashMap<String, Value> = rows(
            &self.demo,
            "SELECT idempotency_key, outcome FROM worker_results",
        )
        .await
        .iter()
        .map(|row| {
            let key: String = row.try_get("", "idempotency_key").expect("key");
            let outcome: String = row.try_get("", "outcome").expect("outcome");
            (
                key,
                serde_json::from_str(&outcome).expect("a recorded outcome"),
            )
        })
        .collect();

        let mut outcomes = SagaOutcomes::default();
        for (id, (order_id, status)) in &sagas {
            let history = self.store.history(*id).await.expect("read a history");
            check_history(name, *id, &history, &recorded, &mut findings);
            match status.as_str() {
                "completed" => {
                    assert!(
                        !history
                            .iter()
                            .any(|h| h.direction == Some(Direction::Compensate)),
                        "{name}: completed saga {id} ran a compensation"
                    );
                    outcomes.completed_orders.push(order_id.clone());
                }
                "compensated" => {
                    check_compensations(&history, *id);
                    outcomes.compensated_orders.push(order_id.clone());
                }
                "stuck" => {
                    let stuck = self
                        .store
                        .load(*id)
                        .await
                        .expect("load a saga")
                        .expect("the saga exists")
                        .state
                        .stuck;
                    assert!(
                        stuck.is_some_and(|s| !s.reason.is_empty()),
                        "{name}: stuck saga {id} without a reason"
                    );
                }
                other => panic!("{name}: saga {id} ended {other}"),
            }
        }
        assert!(
            !outcomes.completed_orders.is_empty() && !outcomes.compensated_orders.is_empty(),
            "{name}: a run has completed sagas and (declined cards) compensated ones: {:?}",
            findings.counts
        );

        let report = check_invariants(&self.demo, &outcomes)
            .await
            .expect("read the demo tables");
        assert!(report.is_ok(), "{name}: {report}");
        for (what, sql) in [
            (
                "reservations of one order",
                "SELECT order_id FROM demo_reservations GROUP BY order_id HAVING COUNT(*) > 1",
            ),
            (
                "authorizations of one order",
                "SELECT order_id FROM demo_authorizations GROUP BY order_id HAVING COUNT(*) > 1",
            ),
            (
                "shipments of one order",
                "SELECT order_id FROM demo_shipments GROUP BY order_id HAVING COUNT(*) > 1",
            ),
            (
                "confirmations of one order",
                "SELECT order_id FROM demo_orders GROUP BY order_id HAVING COUNT(*) > 1",
            ),
            (
                "recorded outcomes of one idempotency key",
                "SELECT idempotency_key AS order_id FROM worker_results \
                 GROUP BY idempotency_key HAVING COUNT(*) > 1",
            ),
        ] {
            let twice: Vec<String> = rows(&self.demo, sql)
                .await
                .iter()
                .map(|r| r.try_get("", "order_id").expect("order_id"))
                .collect();
            assert!(twice.is_empty(), "{name}: several {what}: {twice:?}");
        }
        findings
    }

    /// Checks that the engine and every worker still run, then starts a few fresh sagas (good
    /// cards) and waits for each to complete.
    pub(super) async fn serves_new_sagas(&mut self) {
        let name = self.name;
        for e in 0..self.engines.len() {
            assert!(
                self.node(e).exited().is_none(),
                "{name}: engine node e{e} exited\n{}",
                self.tails()
            );
        }
        for i in 0..self.workers.len() {
            assert!(
                self.worker(i).exited().is_none(),
                "{name}: worker w{i} exited\n{}",
                self.tails()
            );
        }
        let fresh = generate_orders(&OrderMix {
            prefix: format!("{}-fresh", self.name),
            count: 8,
            decline_ratio: 0.0,
            seed: 99,
            ..OrderMix::default()
        });
        let mut ids = Vec::new();
        for order in &fresh {
            ids.push(start_saga(&self.client, &order.order_id, order.to_json()).await);
        }
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut served = std::collections::BTreeSet::new();
        for id in ids {
            loop {
                let status = self
                    .store
                    .load(id)
                    .await
                    .expect("load a saga")
                    .expect("the fresh saga exists")
                    .state
                    .status;
                if status == SagaStatus::Completed {
                    break;
                }
                assert!(
                    status.is_active() && Instant::now() < give_up,
                    "{}: fresh saga {id} is {} after the faults\n{}",
                    self.name,
                    status.as_str(),
                    self.tails()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for h in self.store.history(id).await.expect("read a history") {
                if h.kind == RecordKind::AttemptSucceeded {
                    served.insert(h.actor);
                }
            }
        }
        println!("{name}: fresh sagas served by {served:?}");
    }

    pub(super) fn report(&self, findings: &Findings) {
        println!(
            "{}: done in {:.1?}: {:?}; ignored replies {:?}; {} attempts timed out, {} re-dispatched",
            self.name,
            self.started_at.elapsed(),
            findings.counts,
            findings.ignored,
            findings.timed_out,
            findings.redispatched
        );
        // What the children complained about, for whoever reads the output.
        for who in self.children() {
            let text = std::fs::read_to_string(self.log(&who)).unwrap_or_default();
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            let mut examples: BTreeMap<&str, &str> = BTreeMap::new();
            for line in text.lines() {
                for level in ["WARN", "ERROR"] {
                    if line.contains(level) {
                        *kinds.entry(level).or_default() += 1;
                        examples.entry(level).or_insert(line);
                    }
                }
            }
            if !kinds.is_empty() {
                println!("{}: {who} logged {kinds:?}, e.g. {examples:?}", self.name);
            }
        }
    }

    /// Sets environment variable `key` of the engines and workers started from now on.
    pub(super) fn set_child_env(&mut self, key: &str, value: &str) {
        self.options.env.retain(|(k, _)| k != key);
        self.options.env.push((key.to_string(), value.to_string()));
    }

    /// Every log line every child wrote so far, each log's name first.
    pub(super) fn all_logs(&self) -> String {
        let mut out = String::new();
        for who in self.children() {
            let text = std::fs::read_to_string(self.log(&who)).unwrap_or_default();
            out.push_str(&format!("--- {who} ---\n{text}\n"));
        }
        out
    }

    /// The demo services' database, which the workers write.
    pub(super) fn demo_db(&self) -> &DatabaseConnection {
        &self.demo
    }

    pub(super) fn children(&self) -> Vec<String> {
        let mut who: Vec<String> = (0..self.engines.len()).map(Self::node_log_name).collect();
        who.extend((0..self.workers.len()).map(|i| format!("w{i}")));
        who
    }

    pub(super) fn tails(&self) -> String {
        let mut out = String::new();
        for who in self.children() {
            out.push_str(&format!(
                "--- {who} (last 40 lines) ---\n{}\n",
                tail(&self.log(&who), 40)
            ));
        }
        out.push_str(&format!(
            "--- nats-server (last 10 lines) ---\n{}\n",
            self.nats.log_tail(10)
        ));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}: the children's logs:\n{}", self.name, self.tails());
        }
    }
}

/// Checks one saga's history: each step succeeded at most once per direction, with the outcome
/// the worker recorded for its idempotency key, every attempt of a step carried the same key,
/// and at most one terminal record.
pub(super) fn check_history(
    name: &str,
    id: Uuid,
    history: &[HistoryEntry],
    recorded: &HashMap<String, Value>,
    findings: &mut Findings,
) {
    let mut keys: BTreeMap<(String, String), HashSet<String>> = BTreeMap::new();
    let mut dispatched: HashSet<(String, String, u32)> = HashSet::new();
    for h in history {
        if h.kind == RecordKind::AttemptDispatched
            && let (Some(step), Some(direction), Some(attempt)) = (&h.step, &h.direction, h.attempt)
        {
            let key = h.detail["idempotency_key"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: saga {id}: a dispatch without a key"))
                .to_string();
            keys.entry((step.clone(), direction.to_string()))
                .or_default()
                .insert(key);
            dispatched.insert((step.clone(), direction.to_string(), attempt));
        }
    }
    for ((step, direction), set) in &keys {
        assert_eq!(
            set.len(),
            1,
            "{name}: saga {id}: {step}/{direction} dispatched with several keys: {set:?}"
        );
    }
    let mut succeeded: BTreeMap<(String, String), usize> = BTreeMap::new();
    for h in history {
        let (Some(step), Some(direction)) = (&h.step, &h.direction) else {
            continue;
        };
        let slot = (step.clone(), direction.to_string());
        match h.kind.as_str() {
            "attempt_succeeded" => {
                *succeeded.entry(slot.clone()).or_default() += 1;
                let key = keys[&slot].iter().next().expect("a key");
                let outcome = recorded.get(key).unwrap_or_else(|| {
                    panic!("{name}: saga {id}: {step}/{direction} succeeded, but the worker recorded nothing for {key}")
                });
                assert_eq!(
                    outcome["status"], "succeeded",
                    "{name}: saga {id}: {step}/{direction}: the engine applied a success, the worker recorded {outcome}"
                );
                if *direction == Direction::Forward {
                    assert_eq!(
                        outcome["output"], h.detail["output"],
                        "{name}: saga {id}: {step}: the engine applied another output than the one recorded for {key}"
                    );
                }
            }
            "reply_ignored" => {
                let reason = h.detail["reason"].as_str().unwrap_or("").to_string();
                let class = match reason.split_once(':') {
                    Some((class @ ("duplicate" | "late"), _)) => class.to_string(),
                    _ => reason,
                };
                *findings.ignored.entry(class).or_default() += 1;
            }
            "attempt_timed_out" => {
                findings.timed_out += 1;
                if let Some(attempt) = h.attempt
                    && dispatched.contains(&(step.clone(), direction.to_string(), attempt + 1))
                {
                    findings.redispatched += 1;
                }
            }
            _ => {}
        }
    }
    for ((step, direction), n) in succeeded {
        assert_eq!(
            n, 1,
            "{name}: saga {id}: {step}/{direction} succeeded {n} times"
        );
    }
    let terminal = history
        .iter()
        .filter(|h| h.kind == RecordKind::SagaCompleted || h.kind == RecordKind::SagaCompensated)
        .count();
    assert!(terminal <= 1, "{name}: saga {id} ended {terminal} times");
}

/// Starts a `place_order` saga on the start subject, retrying (same key) until an engine
/// answers with its id: the answer is lost when the engine dies or the broker restarts, and an
/// engine refuses while it stops or before a worker has told it the saga.
pub(super) async fn start_saga(client: &async_nats::Client, key: &str, input: Value) -> Uuid {
    start_saga_of(client, PLACE_ORDER, key, input).await
}

/// As [`start_saga`], for a saga named `saga`.
pub(super) async fn start_saga_of(
    client: &async_nats::Client,
    saga: &str,
    key: &str,
    input: Value,
) -> Uuid {
    start_sealed_with(
        client,
        saga,
        key,
        input,
        &sagaflow_tests::test_secret_keys(),
    )
    .await
}

/// As [`start_saga_of`], its secret members sealed with `keys`.
pub(super) async fn start_sealed_with(
    client: &async_nats::Client,
    saga: &str,
    key: &str,
    mut input: Value,
    keys: &sagaflow_protocol::SecretKeys,
) -> Uuid {
    keys.seal_fields(
        &mut input,
        &sagaflow_tests::SECRET_MEMBERS.map(String::from),
    )
    .expect("seal the secret members");
    let request = StartRequest {
        v: PROTOCOL_VERSION,
        saga: saga.to_string(),
        version: None,
        input,
        key: Some(key.to_string()),
    };
    let payload = serde_json::to_vec(&request).expect("encode a start request");
    let give_up = Instant::now() + START_PATIENCE;
    loop {
        let last = match client
            .request(names::START_SUBJECT, payload.clone().into())
            .await
        {
            Ok(answer) => match serde_json::from_slice::<EngineAnswer>(&answer.payload) {
                Ok(EngineAnswer::Ok {
                    saga_id: Some(id), ..
                }) => return id,
                Ok(EngineAnswer::Error { code, message, .. }) => {
                    assert!(
                        ["unknown_saga", "stopping", "internal"].contains(&code.as_str()),
                        "start {key} refused: {code}: {message}"
                    );
                    format!("{code}: {message}")
                }
                other => format!("{other:?}"),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < give_up,
            "no engine started {key} in {START_PATIENCE:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sagas being started.
pub(super) struct Starts {
    name: &'static str,
    hurry: watch::Sender<bool>,
    task: JoinHandle<BTreeMap<String, Uuid>>,
}

impl Starts {
    /// Starts the orders not started yet at once, and returns each start key's saga id.
    pub(super) async fn finish(self) -> BTreeMap<String, Uuid> {
        let _ = self.hurry.send(true);
        match self.task.await {
            Ok(started) => started,
            Err(e) => panic!("{}: starting the sagas failed: {e}", self.name),
        }
    }
}

pub(super) async fn settle_and_verify(
    cluster: &mut Cluster,
    started: &BTreeMap<String, Uuid>,
) -> Findings {
    cluster.phase("all sagas started");
    let findings = cluster.verify(started).await;
    cluster.phase("verified");
    cluster.serves_new_sagas().await;
    cluster.report(&findings);
    findings
}

pub(super) fn rng() -> (u64, StdRng) {
    let seed: u64 = rand::random();
    (seed, StdRng::seed_from_u64(seed))
}

/// Watches the commands the engine publishes and, every 250 ms until `stop`, republishes
/// copies of eight of those seen so far, picked at random (new and long-answered ones alike),
/// under new message ids (so JetStream does not drop them as duplicates); returns how many.
pub(super) async fn duplicate_commands(
    client: async_nats::Client,
    js: jetstream::Context,
    mut stop: watch::Receiver<bool>,
) -> usize {
    let mut commands = client
        .subscribe("sagaflow.cmd.>")
        .await
        .expect("watch the commands");
    let mut rng = StdRng::seed_from_u64(7);
    let mut seen: Vec<async_nats::Message> = Vec::new();
    let mut copies = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            message = commands.next() => {
                let Some(message) = message else { return copies };
                if !is_test_copy(&message) {
                    seen.push(message);
                }
            }
            _ = tick.tick() => {
                for _ in 0..seen.len().min(8) {
                    let original = &seen[rng.gen_range(0..seen.len())];
                    publish_copy(&js, original).await;
                    copies += 1;
                }
            }
            _ = stop.changed() => return copies,
        }
    }
}

/// Publishes a copy of `original` on its subject, under a new message id (so JetStream does
/// not drop it as a duplicate).
pub(super) async fn publish_copy(js: &jetstream::Context, original: &async_nats::Message) {
    let ack = js
        .send_publish(
            original.subject.clone(),
            jetstream::message::PublishMessage::build()
                .payload(original.payload.clone())
                .message_id(format!("test-copy-{}", Uuid::new_v4())),
        )
        .await
        .expect("publish a copy");
    ack.await.expect("JetStream stores the copy");
}

/// Whether a test copier published `message`.
pub(super) fn is_test_copy(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .is_some_and(|id| id.as_str().starts_with("test-copy-"))
}

/// Watches the replies workers publish and republishes a copy of every third one under a new
/// message id (the stream holds it after the original, so the engine applies the original
/// first, usually while the saga still runs); returns how many.
pub(super) async fn duplicate_replies(
    client: async_nats::Client,
    js: jetstream::Context,
    mut stop: watch::Receiver<bool>,
) -> usize {
    let mut replies = client
        .subscribe("sagaflow.reply.>")
        .await
        .expect("watch the replies");
    let mut seen = 0;
    let mut copies = Vec::new();
    loop {
        let message = tokio::select! {
            message = replies.next() => match message {
                Some(message) => message,
                None => break,
            },
            _ = stop.changed() => break,
        };
        if is_test_copy(&message) {
            continue;
        }
        seen += 1;
        if seen % 3 != 0 {
            continue;
        }
        let js = js.clone();
        copies.push(tokio::spawn(
            async move { publish_copy(&js, &message).await },
        ));
    }
    let n = copies.len();
    for copy in copies {
        copy.await.expect("a reply copy was published");
    }
    n
}

pub(super) async fn purge_commands(js: &jetstream::Context) -> u64 {
    let stream = js
        .get_stream(names::COMMAND_STREAM)
        .await
        .expect("the command stream");
    let purged = stream.purge().await.expect("purge the command stream");
    assert!(purged.success, "the purge failed");
    purged.purged
}
