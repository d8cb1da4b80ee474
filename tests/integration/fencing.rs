//! Writes fenced by partition leases on PostgreSQL: a node's write is kept only while it holds
//! the saga's partition under the epoch it writes with, by the database's clock; every history
//! row names the node and epoch; the partition count is fixed when the database is made; the
//! lease table's operations take only what is free and never lower an epoch.

use sagaflow_engine::EngineError;
use sagaflow_engine::machine::{Event, Inputs, Reply, SagaState, Transition, decide};
use sagaflow_engine::ops::{self, NodeState};
use sagaflow_engine::store::{
    DEFAULT_PARTITIONS, Fence, NodeInfo, SagaWrite, Store, StoreOptions, WriteOutcome, history,
    lease,
};
use sagaflow_protocol::backoff::ExactDelays;
use sagaflow_sdk::{Direction, Saga, SagaSpec, Step, Timestamp};
use sagaflow_tests::{Backend, TestDb};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::json;
use uuid::Uuid;

use rstest_reuse::apply;

use crate::support::{Flaky, backends};

/// Sets partition `partition`'s lease: `owner` under `epoch`, for `ms` more milliseconds of the
/// database's clock (negative: lapsed that long ago).
async fn set_lease(store: &Store, partition: u32, owner: &str, epoch: u64, ms: i64) {
    store
        .connection()
        .execute_unprepared(&format!(
            "UPDATE partition_leases SET owner = '{owner}', epoch = {epoch}, \
             expires_at = CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS bigint) + {ms} \
             WHERE partition_id = {partition}"
        ))
        .await
        .expect("set a lease");
}

fn fence(node: &str, partition: u32, epoch: u64) -> Fence {
    Fence {
        node: node.into(),
        epochs: [(partition, epoch)].into(),
    }
}

/// The transition that starts saga `id` of `spec` at `now`.
fn started(spec: &SagaSpec, id: Uuid, now: Timestamp) -> Transition {
    decide(
        &SagaState::new(id, spec, json!({}), now),
        spec,
        Event::Start,
        Inputs {
            now,
            delays: &mut ExactDelays,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_kept_only_under_the_current_epoch_of_a_live_lease() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url).await.unwrap();
    assert_eq!(store.partitions(), DEFAULT_PARTITIONS);
    let saga = Saga::builder("fenced", 1)
        .step(Step::compensatable("a", Flaky::new(0, json!(1))))
        .step(Step::pivot("b", Flaky::new(0, json!(2))))
        .build()
        .unwrap();
    let spec = saga.spec().clone();
    store.register_definition(&spec).await.unwrap();
    let now = Timestamp::now();
    let start = |id: Uuid| started(&spec, id, now);
    let id = Uuid::now_v7();
    let partition = store.partition_of(id);
    let started = start(id);
    let write = || SagaWrite {
        spec: &spec,
        base: None,
        state: &started.state,
        records: &started.history,
        start_key: None,
        dispatches: &[],
        now,
    };

    // No node holds the partition yet: refused, nothing written.
    let outcome = store
        .commit_fenced(&[write()], &fence("n1", partition, 1))
        .await;
    assert_eq!(outcome.unwrap(), [WriteOutcome::Fenced]);
    assert!(store.load(id).await.unwrap().is_none());

    // A fence that does not name the partition is refused without asking the database.
    set_lease(&store, partition, "n1", 1, 60_000).await;
    let other = (partition + 1) % store.partitions();
    let outcome = store
        .commit_fenced(&[write()], &fence("n1", other, 1))
        .await;
    assert_eq!(outcome.unwrap(), [WriteOutcome::Fenced]);

    // n1 holds it under epoch 1: written, and every history row says so.
    let outcome = store
        .commit_fenced(&[write()], &fence("n1", partition, 1))
        .await;
    assert!(matches!(
        outcome.unwrap()[..],
        [WriteOutcome::Committed { row_version: 1, .. }]
    ));
    let rows = history::Entity::find()
        .filter(history::Column::SagaId.eq(id.to_string()))
        .order_by_asc(history::Column::Seq)
        .all(store.connection())
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        assert_eq!(
            (row.node.as_deref(), row.epoch),
            (Some("n1"), Some(1)),
            "{row:?}"
        );
    }

    // n2 takes the partition over (epoch 2): n1's next write, under epoch 1, is refused and
    // changes nothing; n2's, under epoch 2, is kept.
    set_lease(&store, partition, "n2", 2, 60_000).await;
    let stored = store.load(id).await.unwrap().unwrap();
    let wake = decide(
        &stored.state,
        &spec,
        Event::Reply(Reply {
            step: 0,
            direction: Direction::Forward,
            attempt: 1,
            result: Ok(json!(1)),
            worker: "w1".into(),
        }),
        Inputs {
            now,
            delays: &mut ExactDelays,
        },
    )
    .unwrap();
    assert!(!wake.history.is_empty(), "the reply moves the saga on");
    let next = || SagaWrite {
        spec: &spec,
        base: Some(&stored),
        state: &wake.state,
        records: &wake.history,
        start_key: None,
        dispatches: &[],
        now,
    };
    let outcome = store
        .commit_fenced(&[next()], &fence("n1", partition, 1))
        .await;
    assert_eq!(outcome.unwrap(), [WriteOutcome::Fenced]);
    assert_eq!(store.load(id).await.unwrap().unwrap().row_version, 1);

    // A lease that lapsed by the database's clock is no lease, whatever the node believes.
    set_lease(&store, partition, "n2", 2, -1).await;
    let outcome = store
        .commit_fenced(&[next()], &fence("n2", partition, 2))
        .await;
    assert_eq!(outcome.unwrap(), [WriteOutcome::Fenced]);

    set_lease(&store, partition, "n2", 2, 60_000).await;
    let outcome = store
        .commit_fenced(&[next()], &fence("n2", partition, 2))
        .await;
    assert!(matches!(
        outcome.unwrap()[..],
        [WriteOutcome::Committed { row_version: 2, .. }]
    ));
}

/// Two nodes starting a saga with one start key at the same moment: the second insert is
/// kept out by the key (not failed with the rest of its batch), and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_key_taken_by_another_node_keeps_out_only_that_saga() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url).await.unwrap();
    let saga = Saga::builder("keyed", 1)
        .step(Step::pivot("a", Flaky::new(0, json!(1))))
        .build()
        .unwrap();
    let spec = saga.spec().clone();
    store.register_definition(&spec).await.unwrap();
    let now = Timestamp::now();
    let start = |id: Uuid| started(&spec, id, now);
    for partition in 0..store.partitions() {
        set_lease(&store, partition, "n1", 1, 60_000).await;
    }
    let all = Fence {
        node: "n1".into(),
        epochs: (0..store.partitions()).map(|p| (p, 1)).collect(),
    };
    let (first, second, unkeyed) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (a, b, c) = (start(first), start(second), start(unkeyed));
    fn write<'a>(
        spec: &'a SagaSpec,
        t: &'a Transition,
        key: Option<&'a str>,
        now: Timestamp,
    ) -> SagaWrite<'a> {
        SagaWrite {
            spec,
            base: None,
            state: &t.state,
            records: &t.history,
            start_key: key,
            dispatches: &[],
            now,
        }
    }
    let outcome = store
        .commit_fenced(&[write(&spec, &a, Some("order-1"), now)], &all)
        .await
        .unwrap();
    assert!(matches!(outcome[..], [WriteOutcome::Committed { .. }]));

    let outcome = store
        .commit_fenced(
            &[
                write(&spec, &b, Some("order-1"), now),
                write(&spec, &c, None, now),
            ],
            &all,
        )
        .await
        .unwrap();
    assert!(
        matches!(
            outcome[..],
            [WriteOutcome::StartKeyTaken, WriteOutcome::Committed { .. }]
        ),
        "{outcome:?}"
    );
    assert!(store.load(second).await.unwrap().is_none());
    assert!(store.load(unkeyed).await.unwrap().is_some());
    let none_of_it = history::Entity::find()
        .filter(history::Column::SagaId.eq(second.to_string()))
        .all(store.connection())
        .await
        .unwrap();
    assert!(none_of_it.is_empty(), "{none_of_it:?}");
    assert_eq!(
        store
            .find_start_keys(&["order-1"])
            .await
            .unwrap()
            .get("order-1"),
        Some(&first)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_is_fixed_when_the_database_is_made() {
    let db = TestDb::new(Backend::Postgres).await;
    let made = Store::connect_with(
        &db.url,
        &StoreOptions {
            partitions: Some(6),
        },
    )
    .await
    .unwrap();
    assert_eq!(made.partitions(), 6);
    let leases = lease::Entity::find().all(made.connection()).await.unwrap();
    assert_eq!(
        leases.iter().map(|l| l.partition_id).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "one free lease row per partition"
    );
    assert!(leases.iter().all(|l| l.owner.is_none() && l.epoch == 0));
    // Opened again without a count, it keeps its own; with another count, it refuses.
    assert_eq!(Store::connect(&db.url).await.unwrap().partitions(), 6);
    let refused = Store::connect_with(
        &db.url,
        &StoreOptions {
            partitions: Some(8),
        },
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert!(
        matches!(
            refused,
            EngineError::PartitionCountFixed {
                recorded: 6,
                wanted: 8
            }
        ),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("created with 6 partitions"),
        "{refused}"
    );
}

/// Workers and resources remember the highest epoch per partition and outlive the engine's
/// database: one recreated from nothing must still send under higher epochs than the old one
/// did, or they would refuse every command it sends as superseded.
#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_database_takes_epochs_above_those_of_the_old_one(backend: Backend) {
    const LEASE: i64 = 60_000;
    let old_db = TestDb::new(backend).await;
    let old = Store::connect(&old_db.url).await.unwrap();
    // The old database's partition 0 changed hands many times.
    let mut held = old.acquire_partitions("n1", &[0], LEASE).await.unwrap();
    for _ in 0..20 {
        held = old.refence_partitions("n1", &held, LEASE).await.unwrap();
    }
    let old_epoch = held[0].1;
    drop(old);
    drop(old_db);
    tokio::time::sleep(std::time::Duration::from_millis(25)).await;

    let new_db = TestDb::new(backend).await;
    let new = Store::connect(&new_db.url).await.unwrap();
    let taken = new.acquire_partitions("n1", &[0], LEASE).await.unwrap();
    assert!(
        taken[0].1 > old_epoch,
        "the new database's first epoch {} must outrank the old one's last, {old_epoch}",
        taken[0].1
    );
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_taken_only_when_free_and_their_epochs_only_grow(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let node = |id: &str| NodeInfo {
        id: id.into(),
        host: "test".into(),
        pid: 1,
    };
    const LEASE: i64 = 60_000;
    store.heartbeat(&node("n1"), LEASE).await.unwrap();
    store.heartbeat(&node("n2"), LEASE).await.unwrap();

    // Epochs come from the database's clock (or one more than the last, if greater), so they
    // outrank those of any earlier database; on one machine its clock is ours.
    let clock_before = Timestamp::now().as_millis() as u64 - 60_000;

    // Free partitions are taken, all under new epochs; a held one is not taken again.
    let n1 = store
        .acquire_partitions("n1", &[0, 1, 2], LEASE)
        .await
        .unwrap();
    assert_eq!(n1.iter().map(|l| l.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(n1.iter().all(|l| l.1 > clock_before), "{n1:?}");
    let (e0, e1, e2) = (n1[0].1, n1[1].1, n1[2].1);
    let n2 = store
        .acquire_partitions("n2", &[1, 2, 3], LEASE)
        .await
        .unwrap();
    assert_eq!(n2.len(), 1);
    let (p3, e3) = n2[0];
    assert!(p3 == 3 && e3 > clock_before, "{n2:?}");

    // Renewal keeps what is held under the epoch named, and nothing else.
    let renewed = store
        .renew_partitions("n1", &[(0, e0), (1, e1), (3, e3)], LEASE)
        .await
        .unwrap();
    assert_eq!(renewed, [(0, e0), (1, e1)]);
    assert!(
        store
            .renew_partitions("n1", &[(0, e0 - 1)], LEASE)
            .await
            .unwrap()
            .is_empty()
    );

    // A released partition goes to the next taker under a higher epoch; the old holder's
    // renewal then finds it lost.
    store.release_partitions("n1", &[(1, e1)]).await.unwrap();
    let taken = store.acquire_partitions("n2", &[1], LEASE).await.unwrap();
    let e1_taken = taken[0].1;
    assert!(
        taken[0].0 == 1 && e1_taken > e1,
        "{taken:?} after epoch {e1}"
    );
    assert!(
        store
            .renew_partitions("n1", &[(1, e1)], LEASE)
            .await
            .unwrap()
            .is_empty()
    );

    // After an unknown outcome the holder takes a new epoch for what it holds.
    let refenced = store
        .refence_partitions("n2", &[(1, e1_taken)], LEASE)
        .await
        .unwrap();
    let e1_refenced = refenced[0].1;
    assert!(
        refenced[0].0 == 1 && e1_refenced > e1_taken,
        "{refenced:?} after epoch {e1_taken}"
    );

    // A lease that lapsed by the database's clock is free for anyone, under a new epoch.
    let short = store.acquire_partitions("n1", &[5], 1).await.unwrap();
    let e5 = short[0].1;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        store
            .renew_partitions("n1", &[(5, e5)], LEASE)
            .await
            .unwrap()
            .is_empty()
    );
    let retaken = store.acquire_partitions("n2", &[5], LEASE).await.unwrap();
    let e5_retaken = retaken[0].1;
    assert!(
        retaken[0].0 == 5 && e5_retaken > e5,
        "{retaken:?} after epoch {e5}"
    );

    let cluster = store.cluster().await.unwrap();
    let owners: Vec<(u32, Option<&str>, u64, bool)> = cluster
        .leases
        .iter()
        .take(6)
        .map(|l| (l.partition, l.owner.as_deref(), l.epoch, l.live))
        .collect();
    assert_eq!(
        owners,
        [
            (0, Some("n1"), e0, true),
            (1, Some("n2"), e1_refenced, true),
            (2, Some("n1"), e2, true),
            (3, Some("n2"), e3, true),
            (4, None, 0, false),
            (5, Some("n2"), e5_retaken, true),
        ]
    );
    let nodes: Vec<(&str, bool, bool)> = cluster
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.live, n.stopping))
        .collect();
    assert_eq!(nodes, [("n1", true, false), ("n2", true, false)]);
    // `sagaflow nodes` reads the same: each node with the live leases it holds.
    let view = ops::nodes(&store).await.unwrap();
    type Held<'a> = (&'a str, NodeState, Vec<(u32, u64)>);
    let held: Vec<Held<'_>> = view
        .nodes
        .iter()
        .map(|n| {
            let leases = n.leases.iter().map(|l| (l.partition, l.epoch)).collect();
            (n.id.as_str(), n.state, leases)
        })
        .collect();
    assert_eq!(
        held,
        [
            ("n1", NodeState::Live, vec![(0, e0), (2, e2)]),
            (
                "n2",
                NodeState::Live,
                vec![(1, e1_refenced), (3, e3), (5, e5_retaken)]
            ),
        ]
    );
    assert_eq!(
        view.unowned,
        (4..16).filter(|p| *p != 5).collect::<Vec<u32>>()
    );
    let table = ops::render::nodes_table(&view);
    let n2_leases = format!("1@{e1_refenced} 3@{e3} 5@{e5_retaken}");
    assert!(table.contains(&n2_leases), "{table}");

    store.mark_stopping("n1").await.unwrap();
    store.forget_node("n2", LEASE).await.unwrap();
    let cluster = store.cluster().await.unwrap();
    let nodes: Vec<(&str, bool)> = cluster
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.stopping))
        .collect();
    assert_eq!(nodes, [("n1", true)]);
}
