//! The embedded runtime end to end on real SQLite files and real PostgreSQL databases.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rstest_reuse::apply;
use sagaflow_engine::EngineError;
use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_engine::store::Store;
use sagaflow_sdk::{RetryPolicy, Saga, Step, Timestamp};
use sagaflow_tests::{Backend, TestDb};
use serde_json::json;

use crate::support::{Flaky, ReadsCount, backends, fast_policy, kinds, launch, settle, status};

fn typed_saga(one_output: serde_json::Value) -> (Saga, Flaky) {
    let one = Flaky::new(0, one_output);
    let saga = Saga::builder("typed", 1)
        .step(Step::compensatable("one", one.clone()).retry(fast_policy(3)))
        .step(Step::pivot("two", ReadsCount).retry(fast_policy(3)))
        .build()
        .expect("valid saga");
    (saga, one)
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_start_input_is_refused_before_anything_is_written(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (saga, _) = typed_saga(json!({"n": 1}));
    let engine = launch(&db.url, vec![saga]).await;

    let unknown = engine
        .start("no_such_saga", json!({}), None)
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, EngineError::UnknownDefinition { .. }),
        "{unknown}"
    );
    assert!(
        unknown.to_string().contains("typed@1"),
        "lists what exists: {unknown}"
    );

    let wrong_version = engine
        .start_version("typed", Some(7), json!({}), None)
        .await
        .unwrap_err();
    assert!(
        wrong_version.to_string().contains("version 7"),
        "{wrong_version}"
    );

    let bad = engine
        .start("typed", json!({"sku": "A", "quantity": "three"}), None)
        .await
        .unwrap_err();
    let message = bad.to_string();
    assert!(matches!(bad, EngineError::InvalidInput { .. }), "{message}");
    assert!(
        message.contains("quantity") && message.contains("Order"),
        "says what and where: {message}"
    );

    let huge = json!({"sku": "x".repeat(300 * 1024), "quantity": 1});
    let too_large = engine.start("typed", huge, None).await.unwrap_err();
    assert!(
        matches!(too_large, EngineError::TooLarge { .. }),
        "{too_large}"
    );

    let counts = engine.store().status_counts().await.unwrap();
    assert!(
        counts.is_empty(),
        "{backend:?}: nothing written, found {counts:?}"
    );
    engine.shutdown().await;
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_does_not_deserialize_fails_the_reader_and_compensates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (saga, one) = typed_saga(json!({"n": "not a number"}));
    let engine = launch(&db.url, vec![saga]).await;
    let id = engine
        .start("typed", json!({"sku": "A", "quantity": 1}), None)
        .await
        .unwrap();
    settle(&engine).await;
    assert_eq!(status(engine.store(), id).await, SagaStatus::Compensated);
    assert_eq!(one.compensations.load(Ordering::SeqCst), 1);
    let history = engine.store().history(id).await.unwrap();
    let failure = history
        .iter()
        .find(|h| h.kind == RecordKind::AttemptFailed)
        .expect("the reading step failed");
    let error = failure.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("output of step `one`") && error.contains("Counted"),
        "{error}"
    );
    assert_eq!(failure.attempt, Some(1), "a permanent error is not retried");
    engine.shutdown().await;
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_survives_an_engine_stop_and_fires_at_its_recorded_time(backend: Backend) {
    let db = TestDb::new(backend).await;
    let policy = RetryPolicy::builder()
        .initial_interval(Duration::from_millis(1_500))
        .max_interval(Duration::from_millis(1_500))
        .max_attempts(3)
        .jitter(0.0)
        .build()
        .unwrap();
    let make = |failures| {
        let wobbly = Flaky::new(failures, json!("ok"));
        let saga = Saga::builder("timer", 1)
            .step(Step::pivot("wobbly", wobbly.clone()).retry(policy.clone()))
            .build()
            .unwrap();
        (saga, wobbly)
    };
    let (saga, _) = make(1);
    let engine = launch(&db.url, vec![saga]).await;
    let id = engine.start("timer", json!({}), None).await.unwrap();
    let scheduled_at = loop {
        let history = engine.store().history(id).await.unwrap();
        if let Some(entry) = history
            .iter()
            .find(|h| h.kind == RecordKind::RetryScheduled)
        {
            break Timestamp(entry.detail["at"].as_i64().expect("retry time recorded"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The engine goes away during the backoff, with the retry only in the database.
    engine.shutdown().await;
    let stopped_at = Timestamp::now();
    assert!(
        stopped_at < scheduled_at,
        "stopped before the retry was due"
    );

    let (saga, second_life) = make(0);
    let engine = launch(&db.url, vec![saga]).await;
    settle(&engine).await;
    assert_eq!(status(engine.store(), id).await, SagaStatus::Completed);
    assert_eq!(
        second_life.calls.load(Ordering::SeqCst),
        1,
        "the retry ran once, after restart"
    );
    let history = engine.store().history(id).await.unwrap();
    let retry = history
        .iter()
        .find(|h| h.kind == RecordKind::AttemptDispatched && h.attempt == Some(2))
        .expect("attempt 2 dispatched");
    assert!(
        retry.at >= scheduled_at,
        "{backend:?}: retry at {:?}, scheduled {:?}",
        retry.at,
        scheduled_at
    );
    assert_eq!(
        kinds(&history),
        vec![
            "saga_started",
            "attempt_dispatched wobbly/forward#1",
            "attempt_failed wobbly/forward#1",
            "retry_scheduled wobbly/forward#2",
            "retry_timer_fired wobbly/forward#2",
            "attempt_dispatched wobbly/forward#2",
            "attempt_succeeded wobbly/forward#2",
            "saga_completed",
        ]
    );
    engine.shutdown().await;
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_with_the_same_key_returns_the_same_saga(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (saga, one) = typed_saga(json!({"n": 1}));
    let engine = launch(&db.url, vec![saga]).await;
    let input = json!({"sku": "A", "quantity": 1});
    let first = engine
        .start("typed", input.clone(), Some("order-1".into()))
        .await
        .unwrap();
    let again = engine
        .start("typed", input.clone(), Some("order-1".into()))
        .await
        .unwrap();
    assert_eq!(first, again);
    settle(&engine).await;
    assert_eq!(one.calls.load(Ordering::SeqCst), 1);
    engine.shutdown().await;

    // And across a restart.
    let store = Store::connect(&db.url).await.unwrap();
    let (saga, _) = typed_saga(json!({"n": 1}));
    let engine =
        sagaflow_engine::runtime::Engine::launch(store, vec![saga], crate::support::options())
            .await
            .unwrap();
    let after_restart = engine
        .start("typed", input, Some("order-1".into()))
        .await
        .unwrap();
    assert_eq!(first, after_restart);
    engine.shutdown().await;
}
