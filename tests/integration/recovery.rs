//! Outages of the infrastructure: a worker keeps serving across a broker restart (and a broker
//! that lost its consumer), an operator acting during a database outage is told it is the
//! database, and register requests over the size limits are refused whole.

use std::time::Duration;

use async_nats::jetstream;
use sagaflow_engine::machine::{OperatorAction, OperatorCommand, SagaStatus};
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::Store;
use sagaflow_sdk::protocol::{EngineAnswer, PROTOCOL_VERSION, RegisterRequest, names};
use sagaflow_sdk::worker::ResultStore;
use sagaflow_sdk::{Saga, Step, StepContext, StepError, StepHandler, StepKind};
use sagaflow_tests::{Backend, NatsServer, TestDb};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Flaky, options, spawn_worker};

/// Waits up to 60 s for saga `id` to stop moving and returns its status.
async fn settled(store: &Store, id: Uuid) -> SagaStatus {
    for _ in 0..1_200 {
        let saga = store.load(id).await.expect("load").expect("the saga");
        if !saga.state.status.is_active() {
            return saga.state.status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("saga {id} did not settle within 60 s");
}

fn one_step(name: &str) -> Saga {
    Saga::builder(name, 1)
        .step(Step::pivot("only", Flaky::new(0, json!("done"))).timeout(Duration::from_secs(30)))
        .build()
        .expect("a valid saga")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_its_saga_again_after_the_broker_restarts() {
    let mut nats = NatsServer::start();
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url).await.expect("open the store");
    let saga = one_step("resilient");
    let engine = Engine::launch_distributed(
        store.clone(),
        &nats.url,
        vec![saga.spec().clone()],
        EngineOptions::default(),
    )
    .await
    .expect("launch the engine");
    let results = ResultStore::open(&db.url).await.expect("worker results");
    let (stop_worker, worker) = spawn_worker(&nats.url, results, vec![saga]).await;

    let before = engine
        .start("resilient", json!({}), None)
        .await
        .expect("start");
    assert_eq!(settled(&store, before).await, SagaStatus::Completed);

    // The broker goes away for a while (the worker's pulls fail meanwhile) and comes back with
    // its store.
    nats.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();
    let after = engine
        .start("resilient", json!({}), None)
        .await
        .expect("start");
    assert_eq!(
        settled(&store, after).await,
        SagaStatus::Completed,
        "the saga started after the restart was not served\n{}",
        nats.log_tail(20)
    );

    // A broker that comes back without the consumers (its store lost, or an operator removed
    // them): the worker and the engine open theirs again, and the waiting messages are served.
    let js = jetstream::new(
        async_nats::connect(&nats.url)
            .await
            .expect("connect to nats"),
    );
    js.get_stream(names::COMMAND_STREAM)
        .await
        .expect("the command stream")
        .delete_consumer(&names::worker_consumer("resilient"))
        .await
        .expect("delete the worker's consumer");
    let replies = js
        .get_stream(names::REPLY_STREAM)
        .await
        .expect("the reply stream");
    // The one engine owns every partition, so it reads (and made) every partition's consumer.
    for partition in 0..store.partitions() {
        replies
            .delete_consumer(&names::engine_consumer(partition))
            .await
            .expect("delete a partition's reply consumer");
    }
    let orphaned = engine
        .start("resilient", json!({}), None)
        .await
        .expect("start");
    assert_eq!(
        settled(&store, orphaned).await,
        SagaStatus::Completed,
        "the worker or the engine did not open its consumer again"
    );

    let _ = stop_worker.send(());
    worker
        .await
        .expect("the worker task")
        .expect("the worker ends cleanly");
    engine.shutdown().await;
}

/// Never answers: keeps its saga running, and so in the engine's cache.
#[derive(Clone)]
struct Hangs;

impl StepHandler for Hangs {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_acting_during_a_database_outage_is_told_it_is_the_database() {
    let db = TestDb::new(Backend::Postgres).await;
    let name = db
        .url
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_string();
    let server = db.url.trim_end_matches(&format!("/{name}")).to_string();
    let store = Store::connect(&db.url).await.expect("open the store");
    let saga = Saga::builder("waits", 1)
        .step(Step::pivot("forever", Hangs).timeout(Duration::from_secs(3_600)))
        .build()
        .expect("a valid saga");
    let engine = Engine::launch(store.clone(), vec![saga], options())
        .await
        .expect("launch the engine");
    let id = engine.start("waits", json!({}), None).await.expect("start");
    // Running, its step in flight: the engine holds it in memory, so acting on it needs only
    // the commit.
    for _ in 0..200 {
        if store.load(id).await.expect("load").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The outage: every connection to the database is cut and no new one is allowed.
    let admin = Database::connect(format!("{server}/postgres"))
        .await
        .expect("an admin connection");
    admin
        .execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        .await
        .expect("refuse new connections");
    admin
        .execute_unprepared(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .expect("cut the engine's connections");

    let outcome = engine
        .operate(
            id,
            OperatorCommand {
                actor: "operator:test".into(),
                reason: "the database is down".into(),
                action: OperatorAction::Cancel,
            },
        )
        .await;

    // Restored before asserting, so the test's database can be dropped whatever happens.
    admin
        .execute_unprepared(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        .await
        .expect("allow connections again");
    let _ = admin.close().await;

    let error = outcome.expect_err("nothing can be committed during the outage");
    let message = error.to_string();
    assert!(
        !message.contains("another writer"),
        "a database outage reported as a conflict: {message}"
    );
    assert!(message.contains("database"), "{message}");
    assert!(
        matches!(error, sagaflow_engine::EngineError::Database { .. }),
        "{error:?}"
    );
    engine.shutdown_within(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_request_with_a_definition_over_the_limit_is_refused_whole() {
    let nats = NatsServer::start();
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url).await.expect("open the store");
    let engine =
        Engine::launch_distributed(store.clone(), &nats.url, vec![], EngineOptions::default())
            .await
            .expect("launch the engine");
    let client = async_nats::connect(&nats.url)
        .await
        .expect("connect to nats");

    let small = one_step("fits").spec().clone();
    let mut big = one_step("bloated").spec().clone();
    // A definition just over the limit, inside a request well under one message: retriable
    // steps after the pivot, one after another, until it is.
    let mut template = big.steps[0].clone();
    template.kind = StepKind::Retriable;
    let mut size = 0;
    for i in 0.. {
        size = serde_json::to_vec(&big).expect("encode").len();
        if size > names::MAX_DEFINITION_BYTES {
            break;
        }
        let mut step = template.clone();
        step.name = format!("extra_{i}");
        big.steps.push(step);
    }
    assert!(big.validate().is_ok(), "only its size is wrong");
    let step_size = serde_json::to_vec(&template).expect("encode").len() + 1;
    assert!(
        size <= names::MAX_DEFINITION_BYTES + step_size,
        "the premise of this case: just over the limit"
    );
    let request = RegisterRequest {
        v: PROTOCOL_VERSION,
        // The small one first: a refusal after registering it would be too late.
        sagas: vec![small.clone(), big],
    };
    let payload = serde_json::to_vec(&request).expect("encode");
    assert!(payload.len() < names::MAX_MESSAGE_BYTES as usize);
    let answer = client
        .request(names::REGISTER_SUBJECT, payload.into())
        .await
        .expect("an answer");
    match serde_json::from_slice::<EngineAnswer>(&answer.payload).expect("an engine answer") {
        EngineAnswer::Error { code, message, .. } => {
            assert_eq!(code, "too_large", "{message}");
            assert!(message.contains("bloated"), "{message}");
            assert!(message.contains("262144"), "{message}");
        }
        other => panic!("an oversized definition was accepted: {other:?}"),
    }
    let registered = store.definitions().await.expect("read definitions");
    assert!(
        registered.is_empty(),
        "part of a refused request was registered: {registered:?}"
    );

    // The same request without the oversized definition is served.
    let fine = serde_json::to_vec(&RegisterRequest {
        v: PROTOCOL_VERSION,
        sagas: vec![small],
    })
    .expect("encode");
    let answer = client
        .request(names::REGISTER_SUBJECT, fine.into())
        .await
        .expect("an answer");
    assert!(matches!(
        serde_json::from_slice::<EngineAnswer>(&answer.payload).expect("an engine answer"),
        EngineAnswer::Ok { .. }
    ));
    assert_eq!(
        store.definitions().await.expect("read definitions").len(),
        1
    );
    engine.shutdown().await;
}
