//! Shared by the integration tests: small sagas whose handlers the tests steer, building the
//! binaries, and checks over saga histories.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::{HistoryEntry, Store};
use sagaflow_sdk::Direction;
use sagaflow_sdk::{Compensate, RetryPolicy, Saga, StepContext, StepError, StepHandler};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A step that fails (retryably) its first `failures` calls, then returns `output`.
#[derive(Clone)]
pub struct Flaky {
    pub failures: u32,
    pub calls: Arc<AtomicU32>,
    pub compensations: Arc<AtomicU32>,
    pub output: Value,
}

impl Flaky {
    pub fn new(failures: u32, output: Value) -> Self {
        Flaky {
            failures,
            calls: Arc::default(),
            compensations: Arc::default(),
            output,
        }
    }
}

impl StepHandler for Flaky {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call <= self.failures {
            return Err(StepError::retryable("busy", format!("call {call} refused")));
        }
        Ok(self.output.clone())
    }
}

impl Compensate for Flaky {
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _input: Value,
        _output: Option<Value>,
    ) -> Result<(), StepError> {
        self.compensations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The typed input the `typed` saga's steps read.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Order {
    pub sku: String,
    pub quantity: u32,
}

/// Reads the output of step `one` as a `Counted`.
pub struct ReadsCount;

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Counted {
    pub n: u32,
}

impl StepHandler for ReadsCount {
    type Input = Order;
    type Output = Counted;

    async fn execute(&self, ctx: &StepContext, _input: Order) -> Result<Counted, StepError> {
        let previous: Counted = ctx.output("one")?;
        Ok(Counted { n: previous.n + 1 })
    }
}

pub fn fast_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(10))
        .max_interval(Duration::from_millis(50))
        .max_attempts(max_attempts)
        .jitter(0.0)
        .build()
        .expect("valid policy")
}

/// Options for tests: quick timer polls.
pub fn options() -> EngineOptions {
    EngineOptions {
        worker_concurrency: 16,
        timer_poll_interval: Duration::from_millis(20),
        secret_keys: Some(sagaflow_tests::test_secret_keys()),
        ..EngineOptions::default()
    }
}

pub async fn launch(url: &str, sagas: Vec<Saga>) -> Engine {
    let store = Store::connect(url).await.expect("open the store");
    Engine::launch(store, sagas, options())
        .await
        .expect("launch the engine")
}

pub async fn settle(engine: &Engine) {
    let counts = engine
        .wait_until_settled(Duration::from_secs(60))
        .await
        .expect("read status counts");
    let active = counts.active();
    assert_eq!(active, 0, "sagas still active after 60 s: {counts:?}");
}

pub async fn status(store: &Store, id: Uuid) -> SagaStatus {
    store
        .load(id)
        .await
        .expect("load")
        .expect("saga exists")
        .state
        .status
}

pub fn kinds(history: &[HistoryEntry]) -> Vec<String> {
    history
        .iter()
        .map(|h| match (&h.step, &h.direction, h.attempt) {
            (Some(step), Some(dir), Some(attempt)) => format!("{} {step}/{dir}#{attempt}", h.kind),
            (Some(step), _, _) => format!("{} {step}", h.kind),
            _ => h.kind.to_string(),
        })
        .collect()
}

/// Builds `bin` of `package` (quietly; a no-op when it is up to date) and returns its path in
/// the target folder this test binary runs from.
///
/// It builds every target of the workspace, as `cargo test --workspace` does: the same
/// selection resolves the same features, so what the test run compiled is reused. Building
/// only `-p package --bin bin` resolves fewer features (no dev-dependencies), which recompiled
/// a third of the dependency tree, twice over, in every test run that started a binary.
pub fn build_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--workspace", "--all-targets"])
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "building the workspace (for the {bin} binary of {package}) failed"
    );
    let deps = std::env::current_exe().expect("test binary path");
    // target/debug/deps/integration-HASH -> target/debug/BIN
    deps.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(bin))
        .expect("target folder")
}

/// Each step that completed forward is compensated exactly once, latest first.
pub fn check_compensations(history: &[HistoryEntry], id: Uuid) {
    let succeeded = |direction: &str| -> Vec<String> {
        history
            .iter()
            .filter(|h| {
                h.kind == RecordKind::AttemptSucceeded
                    && h.direction.map(Direction::as_str) == Some(direction)
            })
            .filter_map(|h| h.step.clone())
            .collect()
    };
    let forward = succeeded("forward");
    let compensations = succeeded("compensate");
    let mut per_step: BTreeMap<&str, usize> = BTreeMap::new();
    for step in &compensations {
        *per_step.entry(step).or_default() += 1;
    }
    assert!(
        per_step.values().all(|&n| n == 1),
        "saga {id}: a compensation ran twice: {compensations:?}"
    );
    let planned: Vec<String> = history
        .iter()
        .find(|h| h.kind == RecordKind::CompensationStarted)
        .and_then(|h| serde_json::from_value(h.detail["steps"].clone()).ok())
        .unwrap_or_default();
    assert_eq!(
        compensations, planned,
        "saga {id}: compensations ran as planned"
    );
    let completed_in_reverse: Vec<String> = forward.iter().rev().cloned().collect();
    let undone_known: Vec<String> = compensations
        .iter()
        .filter(|s| forward.contains(s))
        .cloned()
        .collect();
    assert_eq!(
        undone_known, completed_in_reverse,
        "saga {id}: every completed step compensated, in reverse order"
    );
    assert_eq!(
        history
            .iter()
            .filter(|h| h.kind == RecordKind::SagaCompensated)
            .count(),
        1,
        "saga {id}: one terminal record"
    );
    let last = history.last().map(|h| h.kind.as_str());
    assert!(
        history
            .iter()
            .skip_while(|h| h.kind != RecordKind::SagaCompensated)
            .skip(1)
            .all(|h| h.kind == RecordKind::ReplyIgnored),
        "saga {id}: nothing but ignored replies after the end, last was {last:?}"
    );
}

/// A worker `w1` serving `sagas` over the broker at `nats_url`, running in a task until the
/// returned sender is used (or dropped).
pub async fn spawn_worker(
    nats_url: &str,
    results: sagaflow_sdk::worker::ResultStore,
    sagas: Vec<Saga>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), sagaflow_sdk::worker::WorkerError>>,
) {
    let worker = sagaflow_sdk::worker::Worker::connect(
        nats_url,
        results,
        sagas,
        sagaflow_sdk::worker::WorkerOptions {
            id: "w1".into(),
            secret_keys: Some(sagaflow_tests::test_secret_keys()),
            ..sagaflow_sdk::worker::WorkerOptions::default()
        },
    )
    .await
    .expect("connect the worker");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// One test case per database backend, named for it (`NAME::case_1_sqlite`,
/// `NAME::case_2_postgres`): put `#[apply(backends)]` above `#[tokio::test]` on a test that
/// takes `backend: Backend`. Each case gets its own database from `TestDb`, so they run in
/// parallel.
#[rstest_reuse::template]
#[rstest::rstest]
#[case::sqlite(sagaflow_tests::Backend::Sqlite)]
#[case::postgres(sagaflow_tests::Backend::Postgres)]
pub fn backends(#[case] backend: sagaflow_tests::Backend) {}
