//! Messages that cannot be carried: a step output over the output limit, and step commands
//! that outgrew one NATS message. Each ends the saga cleanly (compensated, or stuck with a
//! reason) instead of looping, and the engine keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_engine::ops;
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::Store;
use sagaflow_sdk::protocol::names::{MAX_MESSAGE_BYTES, MAX_OUTPUT_BYTES};
use sagaflow_sdk::worker::ResultStore;

use crate::support::spawn_worker;
use sagaflow_sdk::{
    Compensate, Direction, RetryPolicy, Saga, Step, StepContext, StepError, StepHandler,
};
use sagaflow_tests::{Backend, NatsServer, TestDb};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use uuid::Uuid;

/// Returns `bytes` bytes of JSON string; counts its compensations.
#[derive(Clone)]
struct Bulky {
    bytes: usize,
    compensations: Arc<AtomicU32>,
}

impl Bulky {
    fn new(bytes: usize) -> Self {
        Bulky {
            bytes,
            compensations: Arc::default(),
        }
    }
}

impl StepHandler for Bulky {
    type Input = Value;
    type Output = String;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<String, StepError> {
        // The JSON string adds two quotes.
        Ok("x".repeat(self.bytes - 2))
    }
}

impl Compensate for Bulky {
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _input: Value,
        _output: Option<String>,
    ) -> Result<(), StepError> {
        self.compensations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn quick(attempts: u32) -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(50))
        .max_interval(Duration::from_millis(100))
        .max_attempts(attempts)
        .build()
        .expect("a valid policy")
}

async fn settle(engine: &Engine, id: Uuid) -> SagaStatus {
    for _ in 0..600 {
        let saga = engine.store().load(id).await.expect("load").expect("saga");
        if !saga.state.status.is_active() {
            return saga.state.status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("saga {id} did not settle within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_commands_too_large_to_carry_end_cleanly() {
    let nats = NatsServer::start();
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url).await.expect("open the store");

    // One step whose output is over the limit: retried, then compensated like a step that may
    // have taken effect.
    let oversized = Bulky::new(MAX_OUTPUT_BYTES + 1);
    let too_big_output = Saga::builder("oversized_output", 1)
        .step(
            Step::compensatable("fetch", oversized.clone())
                .retry(quick(2))
                .timeout(Duration::from_secs(5)),
        )
        .step(Step::pivot("finish", Bulky::new(10)))
        .build()
        .expect("valid saga");

    // Outputs under the limit each, that together outgrow one message: the command for the
    // fifth step (and its compensation) cannot be published.
    let part = MAX_OUTPUT_BYTES - 1024;
    let input_bytes = 200 * 1024;
    assert!(
        part * 4 + input_bytes > MAX_MESSAGE_BYTES as usize,
        "the premise of this case"
    );
    let parts: Vec<Bulky> = (0..4).map(|_| Bulky::new(part)).collect();
    let mut builder = Saga::builder("outgrown", 1);
    for (i, bulky) in parts.iter().enumerate() {
        builder = builder.step(
            Step::compensatable(format!("part_{i}"), bulky.clone())
                .retry(quick(2))
                .compensation_retry(quick(2))
                .timeout(Duration::from_secs(1)),
        );
    }
    let outgrown = builder
        .step(
            Step::compensatable("commit", Bulky::new(10))
                .retry(quick(2))
                .compensation_retry(quick(2))
                .timeout(Duration::from_secs(1)),
        )
        .build()
        .expect("valid saga");
    let fits = Saga::builder("small", 1)
        .step(Step::pivot("only", Bulky::new(10)))
        .build()
        .expect("valid saga");

    let engine = Engine::launch_distributed(
        store.clone(),
        &nats.url,
        vec![
            too_big_output.spec().clone(),
            outgrown.spec().clone(),
            fits.spec().clone(),
        ],
        EngineOptions::default(),
    )
    .await
    .expect("launch the engine");
    let results = ResultStore::open(&db.url).await.expect("worker results");
    let (stop_worker, worker) =
        spawn_worker(&nats.url, results, vec![too_big_output, outgrown, fits]).await;

    let first = engine
        .start("oversized_output", json!({}), None)
        .await
        .expect("start");
    assert_eq!(settle(&engine, first).await, SagaStatus::Compensated);
    assert_eq!(oversized.compensations.load(Ordering::SeqCst), 1);
    let history = ops::history(&store, first).await.expect("history");
    let too_large: Vec<_> = history
        .entries
        .iter()
        .filter(|e| {
            e.kind == RecordKind::AttemptFailed
                && e.error
                    .as_deref()
                    .is_some_and(|error| error.contains("over the 262144 byte limit"))
        })
        .collect();
    assert_eq!(
        too_large.len(),
        2,
        "both attempts refused the output: {:#?}",
        history.entries
    );

    let input = json!({"blob": "y".repeat(input_bytes)});
    let second = engine.start("outgrown", input, None).await.expect("start");
    assert_eq!(settle(&engine, second).await, SagaStatus::Stuck);
    let detail = ops::show(&store, second).await.expect("show");
    // Its command never went out, so `commit` timed out; so did its compensation, which
    // promises nothing either way: the saga waits for an operator.
    let stuck = detail.stuck.expect("a stuck saga says why");
    assert_eq!(
        (stuck.step.as_str(), stuck.direction),
        ("commit", Direction::Compensate),
        "{}",
        stuck.reason
    );
    assert!(stuck.reason.contains("no reply"), "{}", stuck.reason);
    // The oversized commands were never sent and are not waiting to be: no sweep loop.
    let unsent = store
        .connection()
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT COUNT(*) FROM outbox",
        ))
        .await
        .expect("count")
        .expect("a row")
        .try_get_by_index::<i64>(0)
        .expect("a count");
    assert_eq!(unsent, 0);
    for bulky in &parts {
        assert_eq!(bulky.compensations.load(Ordering::SeqCst), 0);
    }

    // The engine and the worker still serve.
    let third = engine.start("small", json!({}), None).await.expect("start");
    assert_eq!(settle(&engine, third).await, SagaStatus::Completed);

    let _ = stop_worker.send(());
    let _ = worker.await;
    engine.shutdown().await;
}
