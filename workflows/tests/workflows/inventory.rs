//! The inventory service on real SQLite files and real PostgreSQL.

use std::time::Duration;

use std::collections::BTreeMap;

use sagaflow_sdk::{Direction, ErrorClass, StepRequest, Timestamp};
use sagaflow_workflows::{
    DemoError, Faults, Fencing, Inventory, OrderLine, OrderServices, PlaceOrder, ReleaseOutcome,
    ReservationState, SagaOutcomes, check_invariants, place_order_saga, seed_stock,
};
use sea_orm::DatabaseConnection;
use uuid::Uuid;

const T0: Timestamp = Timestamp(1_700_000_000_000);
/// Where the requests of the tests that are not about fencing come from.
const F: Fencing = Fencing {
    partition: 0,
    epoch: 1,
};

fn line(order: &str, sku: &str, quantity: u32) -> OrderLine {
    OrderLine {
        order_id: order.into(),
        sku: sku.into(),
        quantity,
    }
}

async fn assert_invariants(db: &DatabaseConnection) {
    let report = check_invariants(db, &SagaOutcomes::default())
        .await
        .expect("check");
    assert!(report.is_ok(), "{report}");
}

async fn same_key_reserves_once(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let inventory = Inventory::new(db.clone(), Faults::none());
    let first = inventory
        .reserve("k1", &line("o1", "A", 4), F, T0)
        .await
        .unwrap();
    let again = inventory
        .reserve(
            "k1",
            &line("o1", "A", 4),
            F,
            T0.plus(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(first.state, ReservationState::Held);
    assert_eq!(first.expires_at, T0.plus(inventory.hold_for()));
    assert_eq!(inventory.available("A", T0).await.unwrap(), 6);
    assert_eq!(inventory.stock("A").await.unwrap().unwrap().reserved, 4);
    assert_invariants(&db).await;
}

async fn unknown_sku_and_zero_quantity_are_permanent(db: DatabaseConnection) {
    let inventory = Inventory::new(db.clone(), Faults::none());
    let err = inventory
        .reserve("k", &line("o", "NOPE", 1), F, T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unknown_sku");
    assert!(!err.is_retryable());
    seed_stock(&db, &[("A", 1)]).await.unwrap();
    let err = inventory
        .reserve("k", &line("o", "A", 0), F, T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_quantity");
}

async fn atp_never_negative_under_concurrency(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let inventory = Inventory::new(db.clone(), Faults::none());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let inventory = inventory.clone();
            tokio::spawn(async move {
                // Every key twice, so repeats race with first attempts too.
                let key = format!("k{}", i % 10);
                inventory
                    .reserve(&key, &line(&format!("o{}", i % 10), "A", 3), F, T0)
                    .await
            })
        })
        .collect();
    let mut granted = std::collections::BTreeSet::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => {
                granted.insert(r.reservation_key);
            }
            Err(DemoError::OutOfStock { available, .. }) => assert!(available >= 0),
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(granted.len(), 3, "10 units fit three reservations of 3");
    assert_eq!(inventory.available("A", T0).await.unwrap(), 1);
    assert_eq!(inventory.stock("A").await.unwrap().unwrap().reserved, 9);
    assert_invariants(&db).await;
}

async fn expired_reservations_are_released(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 5), ("B", 5)]).await.unwrap();
    let inventory =
        Inventory::new(db.clone(), Faults::none()).with_hold_for(Duration::from_secs(60));
    inventory
        .reserve("a1", &line("o1", "A", 5), F, T0)
        .await
        .unwrap();
    inventory
        .reserve("b1", &line("o2", "B", 2), F, T0)
        .await
        .unwrap();
    let later = T0.plus(Duration::from_secs(61));

    // Past expiry, a held reservation no longer counts against available-to-promise...
    assert_eq!(inventory.available("A", T0).await.unwrap(), 0);
    assert_eq!(inventory.available("A", later).await.unwrap(), 5);
    // ...and a new reservation expires it on the spot.
    inventory
        .reserve("a2", &line("o3", "A", 4), F, later)
        .await
        .unwrap();
    let a1 = inventory.reservation("a1").await.unwrap().unwrap();
    assert_eq!(a1.state, ReservationState::Expired);

    // The periodic sweep releases the rest.
    assert_eq!(inventory.release_expired(later).await.unwrap(), 1);
    assert_eq!(inventory.release_expired(later).await.unwrap(), 0);
    let b1 = inventory.reservation("b1").await.unwrap().unwrap();
    assert_eq!(b1.state, ReservationState::Expired);
    assert_eq!(inventory.stock("B").await.unwrap().unwrap().reserved, 0);

    // Releasing or committing an expired reservation: fine / refused.
    let released = inventory
        .release("b1", &line("o2", "B", 2), F, later)
        .await
        .unwrap();
    assert_eq!(released, ReleaseOutcome::AlreadyReleased);
    let err = inventory.commit("b1", "o2", later).await.unwrap_err();
    assert_eq!(err.code(), "reservation_not_held");
    // Committing one past expiry that the sweep has not reached yet is refused too.
    let err = inventory
        .commit("a2", "o3", later.plus(Duration::from_secs(61)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "reservation_not_held");
    assert_eq!(inventory.stock("A").await.unwrap().unwrap().reserved, 0);
    assert_invariants(&db).await;
}

async fn release_is_idempotent_and_tombstones_unknown_keys(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 5)]).await.unwrap();
    let inventory = Inventory::new(db.clone(), Faults::none());
    let l = line("o1", "A", 2);
    inventory.reserve("k1", &l, F, T0).await.unwrap();
    assert_eq!(
        inventory.release("k1", &l, F, T0).await.unwrap(),
        ReleaseOutcome::Released
    );
    assert_eq!(
        inventory.release("k1", &l, F, T0).await.unwrap(),
        ReleaseOutcome::AlreadyReleased
    );
    assert_eq!(inventory.available("A", T0).await.unwrap(), 5);

    // Compensating before the forward call ever landed leaves a tombstone: the late forward
    // call gets the released reservation back and takes no stock.
    assert_eq!(
        inventory
            .release("k2", &line("o2", "A", 3), F, T0)
            .await
            .unwrap(),
        ReleaseOutcome::NotFound
    );
    let late = inventory
        .reserve("k2", &line("o2", "A", 3), F, T0)
        .await
        .unwrap();
    assert_eq!(late.state, ReservationState::Released);
    assert_eq!(inventory.available("A", T0).await.unwrap(), 5);

    // A committed reservation is not released behind a confirmed order's back.
    inventory
        .reserve("k3", &line("o3", "A", 1), F, T0)
        .await
        .unwrap();
    inventory.commit("k3", "o3", T0).await.unwrap();
    inventory.commit("k3", "o3", T0).await.unwrap();
    let err = inventory
        .release("k3", &line("o3", "A", 1), F, T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "reservation_committed");
    assert!(!err.is_retryable());
    let err = inventory.commit("k3", "other-order", T0).await.unwrap_err();
    assert_eq!(err.code(), "reservation_not_held");
}

async fn restock_adds_to_stock(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 1)]).await.unwrap();
    let inventory = Inventory::new(db.clone(), Faults::none());
    let err = inventory
        .reserve("k1", &line("o1", "A", 2), F, T0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DemoError::OutOfStock { available: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("restock"), "{err}");
    inventory.restock("A", 1).await.unwrap();
    inventory
        .reserve("k1", &line("o1", "A", 2), F, T0)
        .await
        .unwrap();
    assert_eq!(inventory.available("A", T0).await.unwrap(), 0);
}

async fn concurrent_reserve_release_commit_and_sweep_stay_consistent(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 20), ("B", 20)]).await.unwrap();
    let inventory =
        Inventory::new(db.clone(), Faults::none()).with_hold_for(Duration::from_secs(5));
    let tasks: Vec<_> = (0..60u64)
        .map(|i| {
            let inventory = inventory.clone();
            tokio::spawn(async move {
                let sku = if i % 2 == 0 { "A" } else { "B" };
                let l = line(&format!("o{i}"), sku, 1 + (i % 3) as u32);
                let key = format!("k{i}");
                // Time moves on across tasks, so earlier holds expire under later ones.
                let now = T0.plus(Duration::from_secs(i / 4));
                match inventory.reserve(&key, &l, F, now).await {
                    Ok(_) | Err(DemoError::OutOfStock { .. }) => {}
                    Err(other) => panic!("reserve: {other}"),
                }
                match i % 4 {
                    0 => {
                        inventory.release(&key, &l, F, now).await.unwrap();
                    }
                    1 => {
                        let _ = inventory.commit(&key, &l.order_id, now).await;
                    }
                    2 => {
                        inventory.release_expired(now).await.unwrap();
                    }
                    _ => {}
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for sku in ["A", "B"] {
        assert!(inventory.available(sku, T0).await.unwrap() >= 0);
    }
    // Stock is conserved; the committed reservations have no orders here, which the full
    // check rightly reports.
    let report = check_invariants(&db, &SagaOutcomes::default())
        .await
        .unwrap();
    let committed = report.reservations.get("committed").copied().unwrap_or(0);
    assert!(committed > 0, "{report}");
    assert_eq!(report.violations.len(), committed, "{report}");
    assert!(
        report
            .violations
            .iter()
            .all(|v| v.contains("is committed but no confirmed order uses it")),
        "{report}"
    );
}

fn at(partition: u32, epoch: u64) -> Fencing {
    Fencing { partition, epoch }
}

fn assert_stale(err: DemoError, partition: u32, epoch: u64, highest: u64) {
    match err {
        DemoError::StaleEpoch {
            partition: p,
            epoch: e,
            highest: h,
        } if (p, e, h) == (partition, epoch, highest) => {}
        other => panic!("expected a stale epoch {epoch} < {highest} in {partition}: {other}"),
    }
}

async fn stale_epochs_are_refused_per_partition(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let inventory = Inventory::new(db.clone(), Faults::none());
    inventory
        .reserve("k5", &line("o5", "A", 2), at(3, 5), T0)
        .await
        .unwrap();
    let stock = inventory.stock("A").await.unwrap().unwrap();
    assert_eq!(stock.reserved, 2);

    // Epoch 4 after epoch 5 in the same partition, for another key: refused, nothing taken.
    let err = inventory
        .reserve("k4", &line("o4", "A", 3), at(3, 4), T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "stale_epoch");
    assert!(!err.is_retryable());
    assert!(
        err.to_string()
            .contains("the engine node that sent this request lost ownership of the partition"),
        "{err}"
    );
    assert_stale(err, 3, 4, 5);
    assert_eq!(inventory.stock("A").await.unwrap().unwrap(), stock);
    assert_eq!(inventory.reservation("k4").await.unwrap(), None);
    // Nor is a stale request answered with a reservation its key already holds.
    let err = inventory
        .reserve("k5", &line("o5", "A", 2), at(3, 4), T0)
        .await
        .unwrap_err();
    assert_stale(err, 3, 4, 5);

    // A stale release releases nothing and leaves no tombstone.
    let err = inventory
        .release("k5", &line("o5", "A", 2), at(3, 4), T0)
        .await
        .unwrap_err();
    assert_stale(err, 3, 4, 5);
    let err = inventory
        .release("k9", &line("o9", "A", 1), at(3, 4), T0)
        .await
        .unwrap_err();
    assert_stale(err, 3, 4, 5);
    let k5 = inventory.reservation("k5").await.unwrap().unwrap();
    assert_eq!(k5.state, ReservationState::Held);
    assert_eq!(inventory.reservation("k9").await.unwrap(), None);
    assert_eq!(inventory.stock("A").await.unwrap().unwrap(), stock);

    // Every partition has its epochs: a low one elsewhere is served.
    inventory
        .reserve("p7", &line("o7", "A", 1), at(7, 1), T0)
        .await
        .unwrap();
    inventory
        .reserve("p0", &line("o0", "A", 1), at(0, 0), T0)
        .await
        .unwrap();

    // Epoch 6 is accepted, and from then on 5 is stale in partition 3.
    let k4 = inventory
        .reserve("k4", &line("o4", "A", 3), at(3, 6), T0)
        .await
        .unwrap();
    assert_eq!(k4.state, ReservationState::Held);
    assert_eq!(inventory.stock("A").await.unwrap().unwrap().reserved, 7);
    let err = inventory
        .release("k5", &line("o5", "A", 2), at(3, 5), T0)
        .await
        .unwrap_err();
    assert_stale(err, 3, 5, 6);
    assert_eq!(
        inventory
            .release("k5", &line("o5", "A", 2), at(3, 6), T0)
            .await
            .unwrap(),
        ReleaseOutcome::Released
    );
    assert_eq!(inventory.stock("A").await.unwrap().unwrap().reserved, 5);
    assert_eq!(inventory.available("A", T0).await.unwrap(), 5);
    assert_invariants(&db).await;
}

async fn reserve_inventory_step_refuses_a_stale_epoch_permanently(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let services = OrderServices::new(&db, &Faults::none());
    let saga = place_order_saga(&services).unwrap();
    let order = |id: &str| PlaceOrder {
        order_id: id.into(),
        customer: "ada".into(),
        sku: "A".into(),
        quantity: 2,
        amount_cents: 3998,
        card: sagaflow_sdk::Secret::new(sagaflow_workflows::GOOD_CARD.into()),
    };
    let run = |direction: Direction, epoch: u64, input: &PlaceOrder| {
        let saga_id = Uuid::now_v7();
        let mut ctx = crate::common::context(
            &saga,
            saga_id,
            "reserve_inventory",
            direction,
            1,
            &BTreeMap::new(),
        );
        ctx.partition = 2;
        ctx.epoch = epoch;
        saga.run(StepRequest {
            step: 0,
            ctx,
            input: input.to_json(),
            output: None,
        })
    };
    run(Direction::Forward, 5, &order("s1")).await.unwrap();
    for direction in [Direction::Forward, Direction::Compensate] {
        let error = run(direction, 4, &order("s2")).await.unwrap_err();
        assert_eq!(error.class, ErrorClass::Permanent, "{error:?}");
        assert_eq!(error.code, "stale_epoch", "{error:?}");
        assert!(error.message.contains("lost ownership"), "{error:?}");
    }
    // Only the reservation of epoch 5 took stock; the stale compensation left no tombstone.
    assert_eq!(
        services
            .inventory
            .stock("A")
            .await
            .unwrap()
            .unwrap()
            .reserved,
        2
    );
    let report = check_invariants(&db, &SagaOutcomes::default())
        .await
        .unwrap();
    assert_eq!(
        report.reservations.get("held").copied(),
        Some(1),
        "{report}"
    );
    assert_eq!(
        report.reservations.get("released").copied(),
        None,
        "{report}"
    );
}

on_both_backends!(
    stale_epochs_are_refused_per_partition,
    reserve_inventory_step_refuses_a_stale_epoch_permanently,
    concurrent_reserve_release_commit_and_sweep_stay_consistent,
    same_key_reserves_once,
    unknown_sku_and_zero_quantity_are_permanent,
    atp_never_negative_under_concurrency,
    expired_reservations_are_released,
    release_is_idempotent_and_tombstones_unknown_keys,
    restock_adds_to_stock,
);
