//! The broker as a three-server JetStream cluster: the streams are kept on every server when
//! asked for three replicas, and every saga completes when the server leading the command
//! stream is killed in the middle of a run and comes back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::Store;
use sagaflow_sdk::protocol::{
    ProtocolError, durable_consumer, ensure_streams, names, server_addrs,
};
use sagaflow_sdk::worker::{ResultStore, Worker, WorkerOptions};
use sagaflow_sdk::{Saga, Step, StepContext, StepError, StepHandler};
use sagaflow_tests::{Backend, CLUSTER_SIZE, NatsCluster, NatsServer, TestDb};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::options;

async fn jetstream_on(urls: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server_addrs(urls).expect("the cluster's URLs"))
        .await
        .expect("connect to the cluster");
    jetstream::new(client)
}

/// A stream's replica count as configured, and how many followers its cluster section lists
/// (waiting up to 15 s for `followers` of them, as JetStream adds them after a change).
async fn replicas(js: &jetstream::Context, stream: &str, followers: usize) -> (usize, usize) {
    let mut last = (0, 0);
    for _ in 0..150 {
        let info = js
            .get_stream(stream)
            .await
            .expect("the stream")
            .get_info()
            .await
            .expect("its info");
        let listed = info.cluster.map_or(0, |c| c.replicas.len());
        last = (info.config.num_replicas, listed);
        if listed == followers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// How many followers consumer `name` of `stream` has (waiting up to 15 s for `followers`).
async fn consumer_followers(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    followers: usize,
) -> usize {
    let mut listed = 0;
    for _ in 0..150 {
        let mut consumer = js
            .get_stream(stream)
            .await
            .expect("the stream")
            .get_consumer::<jetstream::consumer::pull::Config>(name)
            .await
            .expect("the consumer");
        let info = consumer.info().await.expect("its info");
        listed = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
        if listed == followers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    listed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_are_kept_on_every_server_of_a_cluster() {
    let began = Instant::now();
    let cluster = NatsCluster::start();
    let js = jetstream_on(&cluster.urls()).await;
    let followers = CLUSTER_SIZE - 1;

    // Created with one replica (as before clusters), with a worker's consumer on it.
    ensure_streams(&js, 1)
        .await
        .expect("streams with 1 replica");
    assert_eq!(replicas(&js, names::COMMAND_STREAM, 0).await, (1, 0));
    let early = durable_consumer(
        &js,
        names::COMMAND_STREAM,
        "early",
        "sagaflow.cmd.early.>",
        Duration::from_secs(30),
        5,
    )
    .await
    .expect("a consumer on the one-replica stream");
    drop(early);

    // Asked for three: both streams are changed, and keep the rest of their configuration.
    ensure_streams(&js, CLUSTER_SIZE)
        .await
        .expect("streams with 3 replicas");
    for stream in [names::COMMAND_STREAM, names::REPLY_STREAM] {
        assert_eq!(
            replicas(&js, stream, followers).await,
            (CLUSTER_SIZE, followers),
            "{stream}\n{}",
            cluster.log_tails(20)
        );
        let config = js
            .get_stream(stream)
            .await
            .expect("the stream")
            .get_info()
            .await
            .expect("its info")
            .config;
        assert_eq!(
            config.retention,
            jetstream::stream::RetentionPolicy::WorkQueue
        );
        assert_eq!(config.max_message_size, names::MAX_MESSAGE_BYTES);
        assert_eq!(
            config.duplicate_window,
            sagaflow_sdk::protocol::DUPLICATE_WINDOW
        );
    }
    // A consumer made before the change follows its stream; one made after inherits the count.
    assert_eq!(
        consumer_followers(&js, names::COMMAND_STREAM, "early", followers).await,
        followers,
        "the consumer made on the one-replica stream was not moved to three servers"
    );
    durable_consumer(
        &js,
        names::COMMAND_STREAM,
        "late",
        "sagaflow.cmd.late.>",
        Duration::from_secs(30),
        5,
    )
    .await
    .expect("a consumer on the three-replica stream");
    assert_eq!(
        consumer_followers(&js, names::COMMAND_STREAM, "late", followers).await,
        followers
    );

    // Asking again changes nothing, nor does asking for fewer (a process started with the
    // default of 1 must not strip the streams of their copies); a count JetStream does not have
    // is refused with advice.
    ensure_streams(&js, CLUSTER_SIZE).await.expect("idempotent");
    ensure_streams(&js, 1).await.expect("fewer asked for");
    for stream in [names::COMMAND_STREAM, names::REPLY_STREAM] {
        assert_eq!(
            replicas(&js, stream, followers).await,
            (CLUSTER_SIZE, followers),
            "{stream} lost replicas when a process asked for one"
        );
    }
    for wrong in [0, 6] {
        let error = ensure_streams(&js, wrong).await.expect_err("out of range");
        assert!(matches!(error, ProtocolError::InvalidReplicas(n) if n == wrong));
        assert!(error.to_string().contains("give 1 to 5"), "{error}");
    }
    eprintln!("cluster streams test took {:?}", began.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_single_server_are_refused_with_advice() {
    let nats = NatsServer::start();
    let js = jetstream_on(&nats.url).await;
    // A new stream with three replicas: nats-server refuses it outside a cluster.
    let message = ensure_streams(&js, 3)
        .await
        .expect_err("one server cannot keep three replicas")
        .to_string();
    assert!(message.contains("with 3 replicas"), "{message}");
    assert!(message.contains("on a single server use 1"), "{message}");

    // A stream made with one replica: nats-server 2.9 would accept the change to three (and
    // keep one); refused here before it is asked.
    ensure_streams(&js, 1).await.expect("one replica");
    let error = ensure_streams(&js, 3)
        .await
        .expect_err("one server cannot keep three replicas");
    assert!(
        matches!(error, ProtocolError::NotClustered { requested: 3 }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("not part of a cluster"), "{message}");
    assert!(message.contains("--stream-replicas 1"), "{message}");
    assert_eq!(replicas(&js, names::COMMAND_STREAM, 0).await, (1, 0));
}

/// A step that notes when it ran, for the gaps in dispatch.
#[derive(Clone)]
struct Stamped {
    runs: Arc<Mutex<Vec<Instant>>>,
}

impl StepHandler for Stamped {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        self.runs.lock().expect("the stamps").push(Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(json!("done"))
    }
}

const SAGAS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saga_completes_when_the_command_stream_leader_is_killed() {
    let began = Instant::now();
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls();
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url).await.expect("open the store");
    let runs = Arc::new(Mutex::new(Vec::new()));
    let step = Stamped { runs: runs.clone() };
    // A step whose command or reply the crash loses is tried again after its timeout.
    let saga = Saga::builder("clustered", 1)
        .step(Step::pivot("one", step.clone()).timeout(Duration::from_secs(8)))
        .step(Step::retriable("two", step.clone()).timeout(Duration::from_secs(8)))
        .step(Step::retriable("three", step).timeout(Duration::from_secs(8)))
        .build()
        .expect("a valid saga");
    let engine = Arc::new(
        Engine::launch_distributed(
            store.clone(),
            &urls,
            vec![saga.spec().clone()],
            EngineOptions {
                stream_replicas: CLUSTER_SIZE,
                ..options()
            },
        )
        .await
        .expect("launch the engine"),
    );
    let worker = Worker::connect(
        &urls,
        ResultStore::open(&db.url).await.expect("worker results"),
        vec![saga],
        WorkerOptions {
            id: "w1".into(),
            // A command whose ack the crash lost comes again soon.
            ack_wait: Duration::from_secs(5),
            stream_replicas: CLUSTER_SIZE,
            secret_keys: Some(sagaflow_tests::test_secret_keys()),
            ..WorkerOptions::default()
        },
    )
    .await
    .expect("connect the worker");
    let (stop_worker, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let leader = tokio::task::block_in_place(|| cluster.stream_leader(names::COMMAND_STREAM))
        .expect("the command stream has a leader");
    eprintln!(
        "cluster up, engine and worker connected after {:?}; n{leader} leads {}",
        began.elapsed(),
        names::COMMAND_STREAM
    );

    // Sagas start at a steady pace, through the crash and after it.
    let starter = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..SAGAS {
                ids.push(
                    engine
                        .start("clustered", json!({ "n": i }), Some(format!("saga-{i}")))
                        .await
                        .expect("start"),
                );
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            ids
        })
    };

    // A third of the way in, the command stream's leader dies.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.kill(leader));
    let mut new_leader = None;
    while new_leader.is_none() && killed_at.elapsed() < Duration::from_secs(20) {
        new_leader = tokio::task::block_in_place(|| cluster.stream_leader(names::COMMAND_STREAM))
            .filter(|&l| l != leader);
        if new_leader.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let elected_after = killed_at.elapsed();
    let new_leader = new_leader.unwrap_or_else(|| {
        panic!(
            "no other server took over {} within 20 s\n{}",
            names::COMMAND_STREAM,
            cluster.log_tails(30)
        )
    });
    eprintln!(
        "n{new_leader} leads {} {elected_after:?} after n{leader} was killed",
        names::COMMAND_STREAM
    );
    // It stays down for a while, then comes back with its store.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| cluster.restart(leader));
    let restarted_after = killed_at.elapsed();

    let ids: Vec<Uuid> = starter.await.expect("the starts");
    let counts = engine
        .wait_until_settled(Duration::from_secs(40))
        .await
        .expect("read status counts");
    let mut unfinished = Vec::new();
    for &id in &ids {
        let status = store
            .load(id)
            .await
            .expect("load")
            .expect("the saga")
            .state
            .status;
        if status != SagaStatus::Completed {
            unfinished.push((id, status));
        }
    }
    assert!(
        unfinished.is_empty(),
        "{} of {SAGAS} sagas did not complete ({counts:?}): {unfinished:?}\n{}",
        unfinished.len(),
        cluster.log_tails(30)
    );

    // How long no step was dispatched: the longest gap between two step runs from the kill on,
    // and the wait for the first run after it.
    let mut stamps = runs.lock().expect("the stamps").clone();
    stamps.sort();
    let after_kill: Vec<Instant> = stamps.iter().copied().filter(|&t| t >= killed_at).collect();
    let first_after_kill = after_kill.first().map(|&t| t - killed_at);
    let longest_gap = std::iter::once(killed_at)
        .chain(after_kill.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{SAGAS} sagas completed ({} step runs, {} from the kill on); new leader after \
         {elected_after:?}, killed server back after {restarted_after:?}; first step run after \
         the kill: {first_after_kill:?}; dispatch stalled at most {longest_gap:?}; test took {:?}",
        stamps.len(),
        after_kill.len(),
        began.elapsed()
    );
    assert!(stamps.len() >= 3 * SAGAS, "every step ran");

    let _ = stop_worker.send(());
    worker
        .await
        .expect("the worker task")
        .expect("the worker ends cleanly");
    match Arc::try_unwrap(engine) {
        Ok(engine) => engine.shutdown_within(Duration::from_secs(5)).await,
        Err(_) => panic!("the engine is still shared"),
    }
}
