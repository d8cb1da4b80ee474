//! The inventory service on real SQLite files and real PostgreSQL.

use std::time::Duration;

use sagaflow_sdk::Timestamp;
use sagaflow_workflows::{
    DemoError, Faults, Inventory, OrderLine, ReleaseOutcome, ReservationState, SagaOutcomes,
    check_invariants, seed_stock,
};
use sea_orm::DatabaseConnection;

const T0: Timestamp = Timestamp(1_700_000_000_000);

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
        .reserve("k1", &line("o1", "A", 4), T0)
        .await
        .unwrap();
    let again = inventory
        .reserve("k1", &line("o1", "A", 4), T0.plus(Duration::from_secs(1)))
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
        .reserve("k", &line("o", "NOPE", 1), T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unknown_sku");
    assert!(!err.is_retryable());
    seed_stock(&db, &[("A", 1)]).await.unwrap();
    let err = inventory
        .reserve("k", &line("o", "A", 0), T0)
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
                    .reserve(&key, &line(&format!("o{}", i % 10), "A", 3), T0)
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
        .reserve("a1", &line("o1", "A", 5), T0)
        .await
        .unwrap();
    inventory
        .reserve("b1", &line("o2", "B", 2), T0)
        .await
        .unwrap();
    let later = T0.plus(Duration::from_secs(61));

    // Past expiry, a held reservation no longer counts against available-to-promise...
    assert_eq!(inventory.available("A", T0).await.unwrap(), 0);
    assert_eq!(inventory.available("A", later).await.unwrap(), 5);
    // ...and a new reservation expires it on the spot.
    inventory
        .reserve("a2", &line("o3", "A", 4), later)
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
        .release("b1", &line("o2", "B", 2), later)
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
    inventory.reserve("k1", &l, T0).await.unwrap();
    assert_eq!(
        inventory.release("k1", &l, T0).await.unwrap(),
        ReleaseOutcome::Released
    );
    assert_eq!(
        inventory.release("k1", &l, T0).await.unwrap(),
        ReleaseOutcome::AlreadyReleased
    );
    assert_eq!(inventory.available("A", T0).await.unwrap(), 5);

    // Compensating before the forward call ever landed leaves a tombstone: the late forward
    // call gets the released reservation back and takes no stock.
    assert_eq!(
        inventory
            .release("k2", &line("o2", "A", 3), T0)
            .await
            .unwrap(),
        ReleaseOutcome::NotFound
    );
    let late = inventory
        .reserve("k2", &line("o2", "A", 3), T0)
        .await
        .unwrap();
    assert_eq!(late.state, ReservationState::Released);
    assert_eq!(inventory.available("A", T0).await.unwrap(), 5);

    // A committed reservation is not released behind a confirmed order's back.
    inventory
        .reserve("k3", &line("o3", "A", 1), T0)
        .await
        .unwrap();
    inventory.commit("k3", "o3", T0).await.unwrap();
    inventory.commit("k3", "o3", T0).await.unwrap();
    let err = inventory
        .release("k3", &line("o3", "A", 1), T0)
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
        .reserve("k1", &line("o1", "A", 2), T0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DemoError::OutOfStock { available: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("restock"), "{err}");
    inventory.restock("A", 1).await.unwrap();
    inventory
        .reserve("k1", &line("o1", "A", 2), T0)
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
                match inventory.reserve(&key, &l, now).await {
                    Ok(_) | Err(DemoError::OutOfStock { .. }) => {}
                    Err(other) => panic!("reserve: {other}"),
                }
                match i % 4 {
                    0 => {
                        inventory.release(&key, &l, now).await.unwrap();
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

on_both_backends!(
    concurrent_reserve_release_commit_and_sweep_stay_consistent,
    same_key_reserves_once,
    unknown_sku_and_zero_quantity_are_permanent,
    atp_never_negative_under_concurrency,
    expired_reservations_are_released,
    release_is_idempotent_and_tombstones_unknown_keys,
    restock_adds_to_stock,
);
