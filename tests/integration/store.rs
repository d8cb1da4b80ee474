//! The store's conditional writes: a stale writer is refused, re-reads, and applies nothing
//! twice.

use rstest_reuse::apply;
use sagaflow_engine::machine::{Event, Inputs, Reply, SagaState, decide};
use sagaflow_engine::store::{SagaWrite, Store, WriteOutcome};
use sagaflow_protocol::backoff::ExactDelays;
use sagaflow_sdk::{Direction, Saga, Step, Timestamp};
use sagaflow_tests::{Backend, TestDb};
use serde_json::json;
use uuid::Uuid;

use crate::support::{Flaky, backends, kinds};

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_is_refused_and_rereads(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let saga = Saga::builder("pair", 1)
        .step(Step::compensatable("a", Flaky::new(0, json!(1))))
        .step(Step::pivot("b", Flaky::new(0, json!(2))))
        .build()
        .unwrap();
    let spec = saga.spec().clone();
    store.register_definition(&spec).await.unwrap();
    let now = Timestamp::now();
    let apply = |state: &SagaState, event: Event| {
        decide(
            state,
            &spec,
            event,
            Inputs {
                now,
                delays: &mut ExactDelays,
            },
        )
        .unwrap()
    };

    let mut created = Vec::new();
    for _ in 0..2 {
        let fresh = SagaState::new(Uuid::now_v7(), &spec, json!({}), now);
        let started = apply(&fresh, Event::Start);
        let outcome = store
            .commit(&[SagaWrite {
                spec: &spec,
                base: None,
                state: &started.state,
                records: &started.history,
                start_key: None,
                dispatches: &[],
                now,
            }])
            .await
            .unwrap();
        assert!(matches!(
            outcome[..],
            [WriteOutcome::Committed { row_version: 1, .. }]
        ));
        created.push(started.state.saga_id);
    }
    let (contested, bystander) = (created[0], created[1]);

    // Two writers read the same version of the saga.
    let writer_a = store.load(contested).await.unwrap().unwrap();
    let writer_b = store.load(contested).await.unwrap().unwrap();
    let reply = Event::Reply(Reply {
        step: 0,
        direction: Direction::Forward,
        attempt: 1,
        result: Ok(json!(1)),
        worker: "w1".into(),
    });
    let by_a = apply(&writer_a.state, reply.clone());
    let won = store
        .commit(&[SagaWrite {
            spec: &spec,
            base: Some(&writer_a),
            state: &by_a.state,
            records: &by_a.history,
            start_key: None,
            dispatches: &[],
            now,
        }])
        .await
        .unwrap();
    assert!(matches!(
        won[..],
        [WriteOutcome::Committed { row_version: 2, .. }]
    ));

    // Writer B is stale; in the same commit, another saga's write still goes through.
    let by_b = apply(&writer_b.state, reply.clone());
    let bystander_read = store.load(bystander).await.unwrap().unwrap();
    let bystander_next = apply(&bystander_read.state, reply.clone());
    let lost = store
        .commit(&[
            SagaWrite {
                spec: &spec,
                base: Some(&writer_b),
                state: &by_b.state,
                records: &by_b.history,
                start_key: None,
                dispatches: &[],
                now,
            },
            SagaWrite {
                spec: &spec,
                base: Some(&bystander_read),
                state: &bystander_next.state,
                records: &bystander_next.history,
                start_key: None,
                dispatches: &[],
                now,
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        lost[0],
        WriteOutcome::Stale,
        "{backend:?}: the stale writer is refused"
    );
    assert!(matches!(
        lost[1],
        WriteOutcome::Committed { row_version: 2, .. }
    ));

    // B re-reads and re-applies: the reply is now a duplicate, recorded and not applied.
    let reread = store.load(contested).await.unwrap().unwrap();
    assert_eq!(reread.row_version, 2);
    let again = apply(&reread.state, reply);
    store
        .commit(&[SagaWrite {
            spec: &spec,
            base: Some(&reread),
            state: &again.state,
            records: &again.history,
            start_key: None,
            dispatches: &[],
            now,
        }])
        .await
        .unwrap();
    let history = store.history(contested).await.unwrap();
    assert_eq!(
        kinds(&history),
        vec![
            "saga_started",
            "attempt_dispatched a/forward#1",
            "attempt_succeeded a/forward#1",
            "attempt_dispatched b/forward#1",
            "reply_ignored a/forward#1",
        ],
        "{backend:?}"
    );
    let seqs: Vec<i64> = history.iter().map(|h| h.seq).collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5],
        "history sequence has no gaps or repeats"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_that_breaks_the_saga_model_is_refused_and_not_stored() {
    let db = TestDb::new(sagaflow_tests::Backend::Sqlite).await;
    let store = Store::connect(&db.url).await.unwrap();
    let valid = Saga::builder("pair", 1)
        .step(Step::pivot("b", Flaky::new(0, json!(2))))
        .build()
        .unwrap()
        .spec()
        .clone();
    let mut no_steps = valid.clone();
    no_steps.steps.clear();
    let mut dotted = valid.clone();
    dotted.name = "bad.name".into();
    let mut pivot_twice = valid.clone();
    pivot_twice.steps.push(valid.steps[0].clone());
    pivot_twice.steps[1].name = "c".into();
    for (spec, says) in [
        (no_steps, "at least one step"),
        (dotted, "letters, digits"),
        (pivot_twice, "second pivot"),
    ] {
        let error = store.register_definition(&spec).await.unwrap_err();
        assert!(error.to_string().contains(says), "{error}");
    }
    assert!(
        store.definitions().await.unwrap().is_empty(),
        "nothing stored"
    );
}
