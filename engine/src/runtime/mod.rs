//! The runtime: the shell around the state machine.
//!
//! Embedded, the engine and the step handlers share one process over the in-process transport;
//! distributed, workers are separate processes reached over NATS JetStream. The same state
//! machine, store, outbox and history serve both: only the transport differs.

mod catalog;
pub(crate) mod commands;
mod driver;
mod gauges;
mod leases;
mod nats;
mod relay;
mod timers;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow_protocol::{SagaSpec, SecretKeys};
use sagaflow_sdk::Saga;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use uuid::Uuid;

pub use catalog::Catalog;
pub use transport::{HandledReply, InProcess, Outbound, Transport, run_attempt};

use crate::EngineError;
use crate::machine::{OperatorCommand, SagaStatus};
use crate::store::{Fence, Store};
pub use driver::{COMMITS_IN_FLIGHT, Settled};
use driver::{Driver, Inbound, Pipeline};
use leases::LeaseKeeper;
pub use leases::{LeaseSettings, Ownership, new_node};

/// How many settle notifications a slow receiver may lag behind.
const SETTLED_BUFFER: usize = 16_384;

/// The largest saga input accepted, in bytes of JSON.
pub const MAX_INPUT_BYTES: usize = 256 * 1024;

/// How many sagas are in each status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusCounts(pub HashMap<SagaStatus, i64>);

impl StatusCounts {
    /// Sagas in `status`.
    pub fn get(&self, status: SagaStatus) -> i64 {
        self.0.get(&status).copied().unwrap_or(0)
    }

    /// Sagas that still move by themselves (created, running, compensating).
    pub fn active(&self) -> i64 {
        self.0
            .iter()
            .filter(|(s, _)| s.is_active())
            .map(|(_, n)| n)
            .sum()
    }
}

/// Tuning for an embedded engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How many step attempts run at once in this process.
    pub worker_concurrency: usize,
    /// The longest the timer poller sleeps between looks at the store.
    pub timer_poll_interval: Duration,
    /// How long this node's partition leases last and how often it renews them.
    pub leases: LeaseSettings,
    /// The host name this node registers under (`sagaflow nodes` shows it); the system's when
    /// `None`.
    pub host: Option<String>,
    /// This node's identity, when the caller made it beforehand ([`this_node`]) to name the
    /// node elsewhere too (its metrics); a new one from `host` when `None`.
    pub node: Option<crate::store::NodeInfo>,
    /// On how many NATS servers the command and reply streams are kept (distributed mode
    /// only): 1 on a single server; 3 on a three-server JetStream cluster, so that a stream
    /// survives losing one server. A stream that exists with another count is changed to this
    /// one, so give every engine and worker on a broker the same count.
    pub stream_replicas: usize,
    /// How often the gauges read from the database and the broker (unfinished sagas by
    /// status, the stuck backlog, the outbox, consumer lag) are refreshed, when a process
    /// exports metrics; `None` (the default) reads nothing. Counters and histograms need no
    /// setting: they cost nothing until a recorder is installed.
    pub gauges_every: Option<Duration>,
    /// Credentials and TLS for the NATS connection (distributed mode only); none by default.
    pub nats: sagaflow_protocol::NatsSecurity,
    /// The keys of secret fields, for the embedded mode, where the handlers run here: a start
    /// seals its secret members, and the handlers see them opened. Required when a saga run
    /// here declares secret fields. A distributed engine needs none: it never opens a secret.
    pub secret_keys: Option<Arc<SecretKeys>>,
    /// How many batches of transitions may be committing at once: with 2, while one commits,
    /// the next is decided and committed beside it (docs/architecture.md §7.2). The default, 1,
    /// commits each batch before deciding the next.
    pub commits_in_flight: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            worker_concurrency: 64,
            timer_poll_interval: Duration::from_millis(50),
            leases: LeaseSettings::default(),
            host: None,
            node: None,
            stream_replicas: 1,
            gauges_every: None,
            nats: sagaflow_protocol::NatsSecurity::default(),
            secret_keys: None,
            commits_in_flight: driver::COMMITS_IN_FLIGHT,
        }
    }
}

/// A running engine, embedded (handlers in this process) or distributed (workers over NATS).
/// Stop it with [`Engine::shutdown`].
pub struct Engine {
    store: Store,
    starter: Starter,
    inbox: mpsc::UnboundedSender<Inbound>,
    /// Tasks that bring in new work: stopped first on shutdown.
    intake: Vec<JoinHandle<()>>,
    /// The driver: drains what was taken in, then ends.
    driver: JoinHandle<()>,
    /// Tasks that end once the driver has: the relay, the in-process pool.
    rest: Vec<JoinHandle<()>>,
    settled: tokio::sync::broadcast::Sender<Settled>,
    /// The lease keeper: stopped last, after the driver, when it hands the partitions over.
    leases: JoinHandle<()>,
    stop_leases: watch::Sender<bool>,
    ownership: watch::Receiver<Ownership>,
    /// On SQLite, the lock that keeps a second engine off the database file while this one runs.
    _engine_lock: Option<std::fs::File>,
}

/// Starts sagas: shared by the library API and the NATS start subject.
#[derive(Clone)]
pub(crate) struct Starter {
    store: Store,
    catalog: Arc<Catalog>,
    inbox: mpsc::UnboundedSender<Inbound>,
    ownership: watch::Receiver<Ownership>,
    /// How long a start waits for this node to hold a partition (it is starting or taking
    /// over) before it is refused.
    partition_wait: Duration,
    /// The keys that seal the secret members of a start, where the handlers run here.
    secret_keys: Option<Arc<SecretKeys>>,
}

impl Starter {
    pub(crate) async fn start(
        &self,
        name: &str,
        version: Option<u32>,
        input: Value,
        start_key: Option<String>,
    ) -> Result<Uuid, EngineError> {
        let spec = match self.catalog.spec(name, version) {
            Ok(spec) => spec,
            Err(_) => {
                // A worker may have announced it to another engine sharing the database.
                for spec in self.store.definitions().await? {
                    self.catalog.add_spec(spec);
                }
                self.catalog.spec(name, version)?
            }
        };
        // Where the handlers run in this process, their types check the input (for every step)
        // before anything is written, and the secret members are sealed here. Elsewhere the
        // secret members must arrive sealed, and the first step's input schema, as its worker
        // registered it, checks the rest; the later steps' inputs are left to their workers,
        // which answer a misfit with a permanent `bad_data` error (and the saga compensates).
        let handlers = self.catalog.handlers(name, spec.version)?;
        let input = match &handlers {
            Some(saga) => self.seal_here(saga, &spec, input)?,
            None => {
                check_sealed(&spec, &input)?;
                input
            }
        };
        let size = sagaflow_protocol::json_len(&input);
        if size > MAX_INPUT_BYTES {
            return Err(EngineError::TooLarge {
                what: format!("the input for saga `{name}`"),
                size,
                limit: MAX_INPUT_BYTES,
            });
        }
        if handlers.is_none()
            && let Some(schema) = self.catalog.first_input_schema(name, spec.version)?
            && let Some(violation) = schema.violation(&input)
        {
            return Err(EngineError::InputSchema {
                saga: name.to_string(),
                step: spec
                    .steps
                    .first()
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                problem: violation.problem,
                path: violation.path,
            });
        }
        let mut ownership = self.ownership.clone();
        let _ = tokio::time::timeout(
            self.partition_wait,
            ownership.wait_for(|o| !o.partitions(tokio::time::Instant::now()).is_empty()),
        )
        .await;
        let (respond, response) = oneshot::channel();
        self.inbox
            .send(Inbound::Start {
                spec,
                input,
                start_key,
                respond,
            })
            .map_err(|_| EngineError::Stopped)?;
        response.await.map_err(|_| EngineError::Stopped)?
    }

    /// `input`, checked against the step types of `saga` (run here) and with its secret
    /// members sealed. Envelopes it holds already are opened for the check and sealed anew.
    fn seal_here(
        &self,
        saga: &Saga,
        spec: &SagaSpec,
        mut input: Value,
    ) -> Result<Value, EngineError> {
        let keys = self.secret_keys.as_deref();
        if spec.secret_input.is_empty() && !sagaflow_protocol::sealed::has_sealed_member(&input) {
            saga.validate_input(&input)
                .map_err(|source| EngineError::InvalidInput {
                    saga: spec.name.clone(),
                    source,
                })?;
            return Ok(input);
        }
        let Some(keys) = keys else {
            return Err(EngineError::SecretKeysMissing {
                saga: spec.name.clone(),
                fields: saga.secret_fields().join(", "),
            });
        };
        keys.open_fields(&mut input).map_err(EngineError::Secret)?;
        saga.validate_input(&input)
            .map_err(|source| EngineError::InvalidInput {
                saga: spec.name.clone(),
                source,
            })?;
        keys.seal_fields(&mut input, &spec.secret_input)
            .map_err(EngineError::Secret)?;
        Ok(input)
    }
}

/// Refuses a start whose secret members are in clear or not well-formed envelopes: a
/// distributed engine stores and forwards secrets, and never sees one in clear twice.
fn check_sealed(spec: &SagaSpec, input: &Value) -> Result<(), EngineError> {
    for field in &spec.secret_input {
        let Some(member) = input.get(field) else {
            continue;
        };
        let problem = match sagaflow_protocol::Envelope::of(member) {
            Some(Ok(_)) => continue,
            Some(Err(problem)) => problem,
            None => "arrived in clear".to_string(),
        };
        return Err(EngineError::SecretInClear {
            saga: spec.name.clone(),
            field: field.clone(),
            problem,
        });
    }
    Ok(())
}

impl Engine {
    /// Launches an embedded engine: `sagas` run in this process over the in-process transport.
    ///
    /// Registers the definitions in the store, re-sends the attempts that were in flight when
    /// the engine last stopped (the in-process transport lost them with the process), and
    /// starts the driver, the timer poller, the outbox relay and the worker pool.
    pub async fn launch(
        store: Store,
        sagas: Vec<Saga>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        if options.secret_keys.is_none()
            && let Some(saga) = sagas.iter().find(|saga| saga.declares_secrets())
        {
            return Err(EngineError::SecretKeysMissing {
                saga: saga.spec().name.clone(),
                fields: saga.secret_fields().join(", "),
            });
        }
        let catalog = Arc::new(Catalog::new(sagas));
        for spec in catalog.specs() {
            store.register_definition(&spec).await?;
        }
        let catalog_for_gauges = catalog.clone();
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let (replies_tx, mut replies_rx) = mpsc::unbounded_channel::<HandledReply>();
        let (transport, pool) = InProcess::spawn(
            catalog.clone(),
            options.worker_concurrency,
            options.secret_keys.clone(),
            replies_tx,
        );
        let forward_inbox = inbox.clone();
        let forward_replies = tokio::spawn(async move {
            while let Some((reply, span)) = replies_rx.recv().await {
                if forward_inbox
                    .send(Inbound::Reply(reply, None, span))
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut engine = Self::assemble(
            store,
            catalog,
            Arc::new(transport),
            inbox,
            inbox_rx,
            Recovery::ResendInFlight,
            &options,
        )
        .await?;
        engine.intake.push(forward_replies);
        engine.rest.push(pool);
        engine.watch_gauges(catalog_for_gauges, None, &options);
        Ok(engine)
    }

    /// Launches a distributed engine: step commands go to workers over NATS JetStream at
    /// `nats_url` (one URL, or several separated by commas for a cluster), replies come back
    /// the same way, and sagas can be started by any NATS client on the start subject. `specs`
    /// are registered up front; workers announce more.
    pub async fn launch_distributed(
        store: Store,
        nats_url: &str,
        specs: Vec<SagaSpec>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let catalog = Arc::new(Catalog::default());
        for spec in store
            .definitions()
            .await?
            .into_iter()
            .chain(specs.iter().cloned())
        {
            catalog.add_spec(spec);
        }
        for spec in &specs {
            store.register_definition(spec).await?;
            nats::warn_untimed_steps(spec);
        }
        let broker =
            nats::Broker::connect(nats_url, &options.nats, options.stream_replicas).await?;
        // Named before it starts, so that its spans name it from the first one.
        let node = options
            .node
            .clone()
            .unwrap_or_else(|| this_node(options.host.clone()));
        let options = EngineOptions {
            node: Some(node.clone()),
            ..options
        };
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let transport = Arc::new(broker.transport());
        let mut engine = Self::assemble(
            store.clone(),
            catalog.clone(),
            transport,
            inbox.clone(),
            inbox_rx,
            Recovery::OnTakeUp,
            &options,
        )
        .await?;
        engine.intake.push(
            broker
                .consume_replies(inbox.clone(), engine.ownership.clone(), &node.id)
                .await?,
        );
        engine
            .intake
            .push(broker.serve_starts(engine.starter.clone()).await?);
        engine.watch_gauges(catalog.clone(), Some(broker.jetstream()), &options);
        engine
            .intake
            .push(broker.serve_registrations(store, catalog).await?);
        Ok(engine)
    }

    async fn assemble(
        store: Store,
        catalog: Arc<Catalog>,
        transport: Arc<dyn Transport>,
        inbox: mpsc::UnboundedSender<Inbound>,
        inbox_rx: mpsc::UnboundedReceiver<Inbound>,
        recovery: Recovery,
        options: &EngineOptions,
    ) -> Result<Self, EngineError> {
        options.leases.validated()?;
        let engine_lock = store.lock_for_one_engine()?;
        if engine_lock.is_some() {
            // The lock proves no other engine runs on this file: leases an earlier run left
            // behind (it was killed) are its own and can be taken at once.
            store.clear_leases().await?;
        }
        let node = options
            .node
            .clone()
            .unwrap_or_else(|| this_node(options.host.clone()));
        let (mut keeper, lease_handle) = LeaseKeeper::new(store.clone(), node, options.leases);
        // Take a share before serving anything: a node with no partition can start no saga.
        // The share may not be free at once: a node restarted after a crash waits for its old
        // leases to lapse, and a node joining waits for the others to hand over.
        let waited = tokio::time::Instant::now();
        loop {
            if let Err(error) = keeper.round(false).await {
                warn!(%error, "cannot take partition leases yet; retrying");
            }
            let holds = lease_handle
                .ownership
                .borrow()
                .is_valid(tokio::time::Instant::now())
                && !lease_handle.ownership.borrow().fence.epochs.is_empty();
            if holds || waited.elapsed() > options.leases.lease * 2 {
                break;
            }
            tokio::time::sleep(options.leases.renew_every / 2).await;
        }
        let (stop_leases, stop_leases_rx) = watch::channel(false);
        let ownership = lease_handle.ownership.clone();
        let leases_task = tokio::spawn(keeper.run(stop_leases_rx));
        let (relay_tx, relay_rx) = mpsc::unbounded_channel();
        let pending_wakes = Arc::new(Mutex::new(Default::default()));
        let timers_changed = Arc::new(Notify::new());
        let planned_wake = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (settled, _) = tokio::sync::broadcast::channel(SETTLED_BUFFER);
        let mut driver = Driver {
            store: store.clone(),
            catalog: catalog.clone(),
            relay: relay_tx,
            planned_wake: planned_wake.clone(),
            inbox: inbox_rx,
            requeue: inbox.clone(),
            pending_wakes: pending_wakes.clone(),
            timers_changed: timers_changed.clone(),
            cache: HashMap::new(),
            settled: settled.clone(),
            ownership: ownership.clone(),
            refence: lease_handle.refence.clone(),
            seen_fence: Fence::default(),
            dispatched: HashMap::new(),
            pipeline: Pipeline::new(options.commits_in_flight),
        };
        if recovery == Recovery::ResendInFlight {
            let resent = driver.recover().await?;
            if resent > 0 {
                info!(
                    resent,
                    "re-sent attempts that were in flight when the engine stopped"
                );
            }
        }
        let relay_task = tokio::spawn(relay::run(store.clone(), transport, relay_rx));
        let driver_task = tokio::spawn(driver.run());
        let timer_poller = tokio::spawn(timers::run(
            store.clone(),
            inbox.clone(),
            pending_wakes,
            timers_changed,
            planned_wake,
            options.timer_poll_interval,
            ownership.clone(),
        ));
        Ok(Engine {
            store: store.clone(),
            starter: Starter {
                store,
                catalog,
                inbox: inbox.clone(),
                ownership: ownership.clone(),
                partition_wait: options.leases.lease * 2,
                secret_keys: options.secret_keys.clone(),
            },
            inbox,
            intake: vec![timer_poller],
            driver: driver_task,
            rest: vec![relay_task],
            settled,
            leases: leases_task,
            stop_leases,
            ownership,
            _engine_lock: engine_lock,
        })
    }

    /// Refreshes the gauges while the engine takes work in, if `options` asks for them.
    fn watch_gauges(
        &mut self,
        catalog: Arc<Catalog>,
        broker: Option<async_nats::jetstream::Context>,
        options: &EngineOptions,
    ) {
        if let Some(every) = options.gauges_every {
            self.intake.push(tokio::spawn(gauges::run(
                self.store.clone(),
                catalog,
                self.ownership.clone(),
                broker,
                every,
            )));
        }
    }

    /// Notifications of sagas this engine saw settle (completed, compensated, stuck), sent after
    /// the transition is committed. A receiver that falls behind by more than a few thousand
    /// loses the oldest; the store is the record.
    pub fn settled(&self) -> tokio::sync::broadcast::Receiver<Settled> {
        self.settled.subscribe()
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Starts saga `name` (its latest registered version) with `input`, and returns its id.
    ///
    /// With a `start_key`, starting is idempotent: the same key returns the saga it started the
    /// first time. Input that does not fit a step's type (when the handlers run here), an
    /// unknown saga and an oversized input are refused before anything is written.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before the start is handed to the driver starts nothing. Dropped
    /// after that, the saga may still start (and run) without the caller learning its id: give
    /// a `start_key`, and starting again with it returns the same saga instead of a second one.
    pub async fn start(
        &self,
        name: &str,
        input: Value,
        start_key: Option<String>,
    ) -> Result<Uuid, EngineError> {
        self.starter.start(name, None, input, start_key).await
    }

    /// Like [`Engine::start`], pinned to a definition version.
    pub async fn start_version(
        &self,
        name: &str,
        version: Option<u32>,
        input: Value,
        start_key: Option<String>,
    ) -> Result<Uuid, EngineError> {
        self.starter.start(name, version, input, start_key).await
    }

    /// Applies an operator's command to a saga, recorded with who and why.
    ///
    /// # Cancel safety
    ///
    /// The command is handed to the driver when the future is first polled, before its first
    /// wait. Dropping the future after that does not withdraw it: it is applied (or refused)
    /// and recorded all the same, and only the answer is lost; read the saga's history to see
    /// which. Dropped before its first poll, nothing is sent.
    pub async fn operate(
        &self,
        saga_id: Uuid,
        command: OperatorCommand,
    ) -> Result<(), EngineError> {
        let (respond, response) = oneshot::channel();
        self.inbox
            .send(Inbound::Operator {
                saga_id,
                command,
                respond,
            })
            .map_err(|_| EngineError::Stopped)?;
        response.await.map_err(|_| EngineError::Stopped)?
    }

    /// Waits until no saga is created, running or compensating (each is completed, compensated
    /// or stuck), polling the store; gives up after `timeout` and returns the counts by status.
    pub async fn wait_until_settled(&self, timeout: Duration) -> Result<StatusCounts, EngineError> {
        let give_up = tokio::time::Instant::now() + timeout;
        loop {
            let counts = StatusCounts(
                self.store
                    .status_counts()
                    .await?
                    .into_iter()
                    .filter_map(|(status, n)| SagaStatus::parse(&status).map(|s| (s, n)))
                    .collect(),
            );
            if counts.active() == 0 || tokio::time::Instant::now() >= give_up {
                return Ok(counts);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops gracefully: takes no new work (replies, starts, timers), lets the driver finish
    /// the transitions it has taken in and the relay publish what they emitted, then ends.
    /// Gives up after `grace` and aborts what is left; anything unfinished is recovered from the
    /// store on the next launch.
    ///
    /// # Cancel safety
    ///
    /// Intake stops when the future is first polled. Dropping it after that leaves the driver,
    /// the relay and the workers to finish on their own in the background, as they would have
    /// within `grace`; nothing is lost either way, since what is not finished is recovered from
    /// the store on the next launch.
    pub async fn shutdown_within(self, grace: Duration) {
        for task in &self.intake {
            task.abort();
        }
        // Everything queued before this marker is processed; then the driver ends, which
        // closes the relay's channel, and the relay ends once it has published the rest.
        let _ = self.inbox.send(Inbound::Shutdown);
        drop(self.inbox);
        drop(self.starter);
        let driver = self.driver;
        let rest = self.rest;
        let leases = self.leases;
        let stop_leases = self.stop_leases;
        let finished = tokio::time::timeout(grace, async move {
            let _ = driver.await;
            for task in rest {
                let _ = task.await;
            }
            // Nothing more is written: hand the partitions over so other nodes take them now.
            let _ = stop_leases.send(true);
            let _ = leases.await;
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown did not finish in time; the rest is recovered on the next start"
            );
        }
    }

    /// What this node may drive now: its partitions, the epochs it holds them under, and
    /// until when without a renewal.
    pub fn ownership(&self) -> Ownership {
        self.ownership.borrow().clone()
    }

    /// [`Engine::shutdown_within`] ten seconds.
    pub async fn shutdown(self) {
        self.shutdown_within(Duration::from_secs(10)).await;
    }
}

/// What a starting engine re-sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Every attempt in flight, before serving: the in-process transport lost them with the
    /// process.
    ResendInFlight,
    /// Every attempt in flight of each partition as the node takes it (`Driver::take_up`, the
    /// first time at start): the broker kept most of them and drops the copies, and the
    /// commands this node (or the partition's last owner) committed but never published are
    /// not lost.
    OnTakeUp,
}

/// A new identity for an engine node running on `host` (this machine's host name when
/// `None`): unique per process run (`HOST-PID-RANDOM`).
pub fn this_node(host: Option<String>) -> crate::store::NodeInfo {
    new_node(&host.unwrap_or_else(host_name))
}

/// This machine's host name, for the node id; `localhost` when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
