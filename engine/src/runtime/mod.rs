//! The embedded runtime: the engine and the step handlers in one process, over the in-process
//! transport, on SQLite or PostgreSQL. The same state machine, store and history as the
//! distributed mode; only the transport differs.

mod catalog;
mod driver;
mod relay;
mod scheduler;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow_sdk::Saga;
use sagaflow_sdk::protocol::StepReply;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::info;
use uuid::Uuid;

pub use catalog::Catalog;
pub use transport::{InProcess, Transport, run_attempt};

use crate::EngineError;
use crate::machine::{OperatorCommand, SagaStatus};
use crate::store::Store;
use driver::{Driver, Inbound};

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            worker_concurrency: 64,
            timer_poll_interval: Duration::from_millis(50),
        }
    }
}

/// A running embedded engine. Cheap to share by reference; stop it with [`Engine::shutdown`].
pub struct Engine {
    store: Store,
    catalog: Arc<Catalog>,
    inbox: mpsc::UnboundedSender<Inbound>,
    tasks: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Registers `sagas` in the store, re-sends the attempts that were in flight when the
    /// engine last stopped, and starts the driver, the timer poller and the worker pool.
    pub async fn launch(
        store: Store,
        sagas: Vec<Saga>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let catalog = Arc::new(Catalog::new(sagas));
        for spec in catalog.specs() {
            store.register_definition(spec).await?;
        }
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let (replies_tx, mut replies_rx) = mpsc::unbounded_channel::<StepReply>();
        let (relay_tx, relay_rx) = mpsc::unbounded_channel();
        let (transport, pool) =
            InProcess::spawn(catalog.clone(), options.worker_concurrency, replies_tx);
        let forward_inbox = inbox.clone();
        let forward_replies = tokio::spawn(async move {
            while let Some(reply) = replies_rx.recv().await {
                if forward_inbox.send(Inbound::Reply(reply)).is_err() {
                    break;
                }
            }
        });
        let pending_wakes = Arc::new(Mutex::new(Default::default()));
        let timers_changed = Arc::new(Notify::new());
        let mut driver = Driver {
            store: store.clone(),
            catalog: catalog.clone(),
            relay: relay_tx,
            inbox: inbox_rx,
            requeue: inbox.clone(),
            pending_wakes: pending_wakes.clone(),
            timers_changed: timers_changed.clone(),
            cache: HashMap::new(),
        };
        let resent = driver.recover().await?;
        if resent > 0 {
            info!(
                resent,
                "re-sent attempts that were in flight when the engine stopped"
            );
        }
        let relay_task = tokio::spawn(relay::run(store.clone(), Arc::new(transport), relay_rx));
        let driver_task = tokio::spawn(driver.run());
        let scheduler_task = tokio::spawn(scheduler::run(
            store.clone(),
            inbox.clone(),
            pending_wakes,
            timers_changed,
            options.timer_poll_interval,
        ));
        Ok(Engine {
            store,
            catalog,
            inbox,
            tasks: vec![
                driver_task,
                relay_task,
                scheduler_task,
                pool,
                forward_replies,
            ],
        })
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Starts saga `name` (its latest registered version) with `input`, and returns its id.
    ///
    /// With a `start_key`, starting is idempotent: the same key returns the saga it started the
    /// first time. Input that does not fit a step's type, an unknown saga and an oversized input
    /// are refused before anything is written.
    pub async fn start(
        &self,
        name: &str,
        input: Value,
        start_key: Option<String>,
    ) -> Result<Uuid, EngineError> {
        self.start_version(name, None, input, start_key).await
    }

    /// Like [`Engine::start`], pinned to a definition version.
    pub async fn start_version(
        &self,
        name: &str,
        version: Option<u32>,
        input: Value,
        start_key: Option<String>,
    ) -> Result<Uuid, EngineError> {
        let saga = self.catalog.get(name, version)?;
        let size = input.to_string().len();
        if size > MAX_INPUT_BYTES {
            return Err(EngineError::TooLarge {
                what: format!("the input for saga `{name}`"),
                size,
                limit: MAX_INPUT_BYTES,
            });
        }
        saga.validate_input(&input)
            .map_err(|source| EngineError::InvalidInput {
                saga: name.to_string(),
                source,
            })?;
        let (respond, response) = oneshot::channel();
        self.inbox
            .send(Inbound::Start {
                spec: Arc::new(saga.spec().clone()),
                input,
                start_key,
                respond,
            })
            .map_err(|_| EngineError::Stopped)?;
        response.await.map_err(|_| EngineError::Stopped)?
    }

    /// Applies an operator's command to a saga, recorded with who and why.
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

    /// Stops taking work and ends the engine's tasks. Anything in flight is recovered from the
    /// store on the next launch.
    pub async fn shutdown(self) {
        drop(self.inbox);
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
