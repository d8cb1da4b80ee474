//! Fencing passed on, end to end (`docs/protocol.md` rule 9.7): after a saga's partition
//! changed hands, a step command of the superseded epoch is replayed into the broker. The SDK
//! worker, which has seen the new epoch, refuses it without running the handler; a worker that
//! has not (a fresh idempotency store) runs the handler, and the demo inventory, which has seen
//! the new epoch, refuses it itself. Either way nothing is reserved, the reply says
//! `stale_epoch`, and the refusal is in the saga's history.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use sagaflow_engine::machine::RecordKind;
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::Store;
use sagaflow_sdk::protocol::{StepCommand, StepOutcome, StepReply, codes, names};
use sagaflow_sdk::worker::{ResultStore, Worker, WorkerError, WorkerOptions};
use sagaflow_sdk::{Direction, Saga, SagaSpec, Timestamp};
use sagaflow_tests::{Backend, NatsServer, TestDb};
use sagaflow_workflows::{
    DEMO_STOCK, Faults, Inventory, OrderMix, OrderServices, PLACE_ORDER, PlaceOrder,
    generate_orders, install, place_order_saga, seed_stock_once,
};
use sea_orm::{Database, DatabaseConnection};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::options;

const RESERVE: &str = "reserve_inventory";
const PATIENCE: Duration = Duration::from_secs(30);

/// Every message seen on a core subscription to `subject`, decoded as `T`.
fn capture<T: serde::de::DeserializeOwned + Send + 'static>(
    mut subscription: async_nats::Subscriber,
) -> Arc<Mutex<Vec<T>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            if let Ok(decoded) = serde_json::from_slice::<T>(&message.payload) {
                sink.lock().expect("the captured messages").push(decoded);
            }
        }
    });
    seen
}

/// An engine node of its own name, driving every partition it can take.
async fn launch_node(store: &Store, url: &str, spec: &SagaSpec, name: &str) -> Engine {
    Engine::launch_distributed(
        store.clone(),
        url,
        vec![spec.clone()],
        EngineOptions {
            host: Some(name.into()),
            ..options()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("launch engine node {name}: {e}"))
}

struct RunningWorker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), WorkerError>>,
}

impl RunningWorker {
    async fn start(url: &str, results: ResultStore, saga: Saga, id: &str) -> RunningWorker {
        let worker = Worker::connect(
            url,
            results,
            vec![saga],
            WorkerOptions {
                id: id.into(),
                secret_keys: Some(sagaflow_tests::test_secret_keys()),
                ..WorkerOptions::default()
            },
        )
        .await
        .expect("connect the worker");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        RunningWorker { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the worker task")
            .expect("the worker stops cleanly");
    }
}

async fn start_and_settle(engine: &Engine, orders: &[PlaceOrder]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for order in orders {
        ids.push(
            engine
                .start(
                    PLACE_ORDER,
                    sagaflow_tests::sealed(order.to_json()),
                    Some(order.order_id.clone()),
                )
                .await
                .expect("start an order"),
        );
    }
    let counts = engine
        .wait_until_settled(PATIENCE)
        .await
        .expect("count the sagas");
    assert_eq!(counts.active(), 0, "sagas still active: {counts:?}");
    ids
}

/// The forward `reserve_inventory` commands seen in `partition`.
fn reserve_commands(seen: &Mutex<Vec<StepCommand>>, partition: u32) -> Vec<StepCommand> {
    seen.lock()
        .expect("the captured commands")
        .iter()
        .filter(|c| c.step == RESERVE && c.direction == Direction::Forward)
        .filter(|c| c.partition == partition)
        .cloned()
        .collect()
}

/// `old` as if its node had sent another attempt just before it lost the partition: a new
/// command id and idempotency key (so nothing recorded answers it), the old epoch.
fn forged_from(old: &StepCommand, tag: &str) -> StepCommand {
    StepCommand {
        command_id: format!("{}-{tag}", old.command_id),
        idempotency_key: format!("{}-{tag}", old.idempotency_key),
        ..old.clone()
    }
}

/// Publishes `command` to the worker's command stream and waits for the worker's reply.
async fn replay(
    js: &jetstream::Context,
    replies: &Mutex<Vec<StepReply>>,
    command: &StepCommand,
) -> StepReply {
    js.send_publish(
        names::command_subject(&command.saga, &command.step),
        jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(command).expect("encode").into())
            .message_id(names::command_message_id(
                &command.command_id,
                command.epoch,
            )),
    )
    .await
    .expect("publish the replayed command")
    .await
    .expect("the command stream stored it");
    let give_up = Instant::now() + PATIENCE;
    loop {
        if let Some(reply) = replies
            .lock()
            .expect("the captured replies")
            .iter()
            .find(|r| r.command_id == command.command_id)
        {
            return reply.clone();
        }
        assert!(
            Instant::now() < give_up,
            "no reply to the replayed command {}",
            command.command_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `reply_ignored` records of `saga` for a `stale_epoch` refusal, waiting (up to 30 s) for
/// `expected` of them.
async fn stale_refusals_in_history(store: &Store, saga: Uuid, expected: usize) -> usize {
    let give_up = Instant::now() + PATIENCE;
    loop {
        let refusals = store
            .history(saga)
            .await
            .expect("read the history")
            .iter()
            .filter(|r| r.kind == RecordKind::ReplyIgnored)
            .filter(|r| r.detail["reply"]["code"] == codes::STALE_EPOCH)
            .count();
        if refusals >= expected || Instant::now() >= give_up {
            return refusals;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tags of the two forged commands' keys.
const TO_THE_WORKER: &str = "replayed-to-the-worker";
const TO_THE_INVENTORY: &str = "replayed-to-the-inventory";

/// Replays a command forged from `old` (key tagged `tag`) and checks that `refuser` answered
/// it with a `stale_epoch` refusal whose message holds `says`.
async fn replay_refused(
    js: &jetstream::Context,
    replies: &Mutex<Vec<StepReply>>,
    old: &StepCommand,
    tag: &str,
    refuser: &str,
    says: &str,
) {
    let reply = replay(js, replies, &forged_from(old, tag)).await;
    let StepOutcome::Failed { error } = &reply.outcome else {
        panic!("the command replayed to {refuser} was not refused: {reply:?}");
    };
    println!(
        "stale_epoch: {refuser} answered {}: {}",
        error.code, error.message
    );
    assert_eq!(error.code, codes::STALE_EPOCH);
    assert!(
        error.message.contains(says),
        "not {refuser}'s refusal: {}",
        error.message
    );
}

async fn units_available(demo: &DatabaseConnection) -> Vec<i64> {
    let inventory = Inventory::new(demo.clone(), Faults::none());
    let mut available = Vec::new();
    for (sku, _) in DEMO_STOCK {
        available.push(
            inventory
                .available(sku, Timestamp::now())
                .await
                .expect("stock"),
        );
    }
    available
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_of_a_superseded_epoch_is_refused_by_the_worker_and_by_the_inventory() {
    let nats = NatsServer::start();
    let url = nats.url();
    let engine_db = TestDb::new(Backend::Postgres).await;
    let demo_db = TestDb::new(Backend::Postgres).await;
    let fresh_results_db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&engine_db.url)
        .await
        .expect("open the store");
    let demo = Database::connect(&demo_db.url)
        .await
        .expect("open the demo database");
    install(&demo).await.expect("the demo tables");
    seed_stock_once(&demo, &DEMO_STOCK).await.expect("stock");
    let services = OrderServices::new(&demo, &Faults::none());
    let saga = || place_order_saga(&services).expect("the place_order saga");
    let spec = saga().spec().clone();

    let client = async_nats::connect(&url).await.expect("connect to NATS");
    let js = jetstream::new(client.clone());
    let commands = capture::<StepCommand>(
        client
            .subscribe("sagaflow.cmd.>")
            .await
            .expect("watch the commands"),
    );
    let replies = capture::<StepReply>(
        client
            .subscribe("sagaflow.reply.>")
            .await
            .expect("watch the replies"),
    );
    client.flush().await.expect("subscriptions in place");

    let worker = RunningWorker::start(
        &url,
        ResultStore::with_connection(demo.clone())
            .await
            .expect("the worker's idempotency store"),
        saga(),
        "w-shared",
    )
    .await;
    let orders = generate_orders(&OrderMix {
        prefix: "stale-epoch".into(),
        count: 400,
        decline_ratio: 0.0,
        seed: 9,
        ..OrderMix::default()
    });

    // Node a drives one order; its reservation command is what gets replayed later.
    let node_a = launch_node(&store, &url, &spec, "node-a").await;
    let first = start_and_settle(&node_a, &orders[..1]).await[0];
    let partition = store.partition_of(first);
    let old = reserve_commands(&commands, partition)
        .into_iter()
        .find(|c| c.saga_id == first)
        .expect("node a's reservation command");
    node_a.shutdown_within(Duration::from_secs(10)).await;

    // Node b takes every partition under new epochs, and drives orders until one of them
    // reserves in the same partition: the worker and the inventory then know the new epoch.
    let node_b = launch_node(&store, &url, &spec, "node-b").await;
    let mut next = 1;
    let newer = loop {
        if let Some(newer) = reserve_commands(&commands, partition)
            .into_iter()
            .find(|c| c.epoch > old.epoch)
        {
            break newer;
        }
        assert!(
            next < orders.len(),
            "no order of node b fell in partition {partition}"
        );
        start_and_settle(&node_b, &orders[next..next + 20]).await;
        next += 20;
    };
    println!(
        "stale_epoch: partition {partition} went from epoch {} (node a) to {} (node b)",
        old.epoch, newer.epoch
    );
    let available = units_available(&demo).await;

    // To the worker: it has seen the newer epoch, so it refuses without running the handler.
    replay_refused(
        &js,
        &replies,
        &old,
        TO_THE_WORKER,
        "the worker",
        "nothing was run",
    )
    .await;
    assert_eq!(stale_refusals_in_history(&store, first, 1).await, 1);
    worker.stop().await;

    // To the inventory: a worker that never saw the newer epoch runs the handler, and the
    // inventory, which has, refuses the reservation itself.
    let unaware = RunningWorker::start(
        &url,
        ResultStore::open(&fresh_results_db.url)
            .await
            .expect("a fresh idempotency store"),
        saga(),
        "w-unaware",
    )
    .await;
    replay_refused(
        &js,
        &replies,
        &old,
        TO_THE_INVENTORY,
        "the inventory",
        "already seen by inventory",
    )
    .await;
    assert_eq!(stale_refusals_in_history(&store, first, 2).await, 2);
    unaware.stop().await;

    // Nothing was reserved under either forged key, and the stock is as it was.
    let inventory = Inventory::new(demo.clone(), Faults::none());
    for tag in [TO_THE_WORKER, TO_THE_INVENTORY] {
        let key = format!("{}-{tag}", old.idempotency_key);
        assert!(
            inventory
                .reservation(&key)
                .await
                .expect("read reservations")
                .is_none(),
            "a reservation was made for {key}"
        );
    }
    assert_eq!(units_available(&demo).await, available);
    node_b.shutdown_within(Duration::from_secs(10)).await;
}
