//! Both sagas driven through `Saga::run` (the typed path an engine uses) on real SQLite files
//! and real PostgreSQL, with invariant checks afterwards.

use std::time::Duration;

use sagaflow_sdk::{Secret, StepKind, Timestamp};
use sagaflow_workflows::{
    BookTrip, DECLINED_CARD, FaultPlan, FaultPoint, Faults, GOOD_CARD, OrderMix, OrderServices,
    PlaceOrder, ReservationState, SagaOutcomes, Service, TripServices, book_trip_saga,
    check_invariants, generate_orders, is_declined, place_order_saga, seed_stock,
};
use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::common::{Outcome, run_saga};

fn order(id: &str, quantity: u32, card: &str) -> PlaceOrder {
    PlaceOrder {
        order_id: id.into(),
        customer: "ada".into(),
        sku: "A".into(),
        quantity,
        amount_cents: 1999 * i64::from(quantity),
        card: Secret::new(card.into()),
    }
}

fn trip(id: &str, hotel: &str, car: &str) -> BookTrip {
    BookTrip {
        trip_id: id.into(),
        traveller: "grace".into(),
        flight: "SF101".into(),
        hotel: hotel.into(),
        car: car.into(),
    }
}

fn outcomes(completed: &[&str], compensated: &[&str]) -> SagaOutcomes {
    SagaOutcomes {
        completed_orders: completed.iter().map(|s| s.to_string()).collect(),
        compensated_orders: compensated.iter().map(|s| s.to_string()).collect(),
        ..SagaOutcomes::default()
    }
}

async fn sql(db: &DatabaseConnection, statement: &str) {
    db.execute_unprepared(statement).await.unwrap();
}

#[test]
fn definitions_follow_the_saga_model() {
    // Handlers are never called here, so a lazily connected database is enough.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut options = sea_orm::ConnectOptions::new("sqlite::memory:");
        options.connect_lazy(true);
        let db = sea_orm::Database::connect(options).await.unwrap();
        let saga = place_order_saga(&OrderServices::new(&db, &Faults::none())).unwrap();
        let spec = saga.spec();
        assert_eq!((spec.name.as_str(), spec.version), ("place_order", 2));
        assert_eq!(spec.secret_input, ["card"], "the card number is secret");
        let kinds: Vec<_> = spec
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("reserve_inventory", StepKind::Compensatable),
                ("authorize_payment", StepKind::Compensatable),
                ("confirm_order", StepKind::Pivot),
                ("request_shipment", StepKind::Retriable),
            ]
        );
        assert_eq!(spec.steps[0].compensation_retry.max_attempts(), Some(8));
        assert_eq!(spec.steps[3].retry.max_attempts(), None);
        saga.validate_input(&order("o1", 1, GOOD_CARD).to_json())
            .unwrap();
        let err = saga
            .validate_input(&serde_json::json!({"order_id": "o1", "sku": "A"}))
            .unwrap_err();
        assert!(err.to_string().contains("quantity"), "{err}");

        let trip_saga = book_trip_saga(&TripServices::new(&db, &Faults::none())).unwrap();
        assert_eq!(trip_saga.spec().name, "book_trip");
        assert!(
            trip_saga
                .spec()
                .steps
                .iter()
                .all(|s| s.kind == StepKind::Compensatable)
        );
        trip_saga
            .validate_input(&trip("t1", "Inn", "van").to_json())
            .unwrap();
    });
}

async fn order_completes(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let services = OrderServices::new(&db, &Faults::none());
    let saga = place_order_saga(&services).unwrap();
    let outcome = run_saga(&saga, &order("o1", 3, GOOD_CARD).to_json()).await;
    let Outcome::Completed(outputs) = outcome else {
        panic!("expected completion, got {outcome:?}");
    };
    assert_eq!(outputs.len(), 4);
    let key = outputs["reserve_inventory"]["reservation_key"]
        .as_str()
        .unwrap();
    let reservation = services.inventory.reservation(key).await.unwrap().unwrap();
    assert_eq!(reservation.state, ReservationState::Committed);
    let confirmed = services.orders.order("o1").await.unwrap().unwrap();
    assert_eq!(confirmed.details.reservation_key, key);
    assert!(services.shipping.shipment("o1").await.unwrap().is_some());
    assert_eq!(
        services
            .inventory
            .available("A", Timestamp::now())
            .await
            .unwrap(),
        7
    );
    let report = check_invariants(&db, &outcomes(&["o1"], &[]))
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
}

async fn declined_card_releases_inventory(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let services = OrderServices::new(&db, &Faults::none());
    let saga = place_order_saga(&services).unwrap();
    let outcome = run_saga(&saga, &order("o1", 4, DECLINED_CARD).to_json()).await;
    assert!(
        matches!(&outcome, Outcome::Compensated { step, .. } if step == "authorize_payment"),
        "{outcome:?}"
    );
    assert_eq!(outcome.failed_code(), Some("card_declined"));
    assert_eq!(
        services
            .inventory
            .available("A", Timestamp::now())
            .await
            .unwrap(),
        10
    );
    assert!(services.orders.order("o1").await.unwrap().is_none());

    let outcome = run_saga(&saga, &order("o2", 11, GOOD_CARD).to_json()).await;
    assert_eq!(outcome.failed_code(), Some("out_of_stock"), "{outcome:?}");

    let report = check_invariants(&db, &outcomes(&[], &["o1", "o2"]))
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.reservations.get("released"), Some(&1));
}

async fn expired_hold_fails_the_pivot_and_compensates(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    // A hold of zero expires at once, so confirm_order finds it expired.
    let services = OrderServices::new(&db, &Faults::none()).with_hold_for(Duration::ZERO);
    let saga = place_order_saga(&services).unwrap();
    let outcome = run_saga(&saga, &order("o1", 2, GOOD_CARD).to_json()).await;
    assert!(
        matches!(&outcome, Outcome::Compensated { step, .. } if step == "confirm_order"),
        "{outcome:?}"
    );
    assert_eq!(outcome.failed_code(), Some("reservation_not_held"));
    let report = check_invariants(&db, &outcomes(&[], &["o1"]))
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.reservations.get("expired"), Some(&1));
    assert_eq!(report.authorizations.get("voided"), Some(&1));
}

async fn lost_replies_are_absorbed_by_idempotency(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let faults = Faults::none();
    for service in [
        Service::Inventory,
        Service::Payment,
        Service::Orders,
        Service::Shipping,
    ] {
        faults.fail_next(service, FaultPoint::BeforeEffect, 1);
        faults.fail_next(service, FaultPoint::AfterEffect, 2);
    }
    let services = OrderServices::new(&db, &faults);
    let saga = place_order_saga(&services).unwrap();
    let outcome = run_saga(&saga, &order("o1", 3, GOOD_CARD).to_json()).await;
    assert!(matches!(outcome, Outcome::Completed(_)), "{outcome:?}");
    assert_eq!(faults.injected_total(), 12);
    // Three lost replies per service, yet every effect happened once.
    assert_eq!(
        services
            .inventory
            .stock("A")
            .await
            .unwrap()
            .unwrap()
            .reserved,
        3
    );
    let report = check_invariants(&db, &outcomes(&["o1"], &[]))
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.reservations.values().sum::<usize>(), 1);
    assert_eq!(report.authorizations.values().sum::<usize>(), 1);
    assert_eq!((report.orders_confirmed, report.shipments), (1, 1));

    // Lost replies on the compensations of a declined order.
    faults.fail_next(Service::Inventory, FaultPoint::AfterEffect, 3);
    let outcome = run_saga(&saga, &order("o2", 3, DECLINED_CARD).to_json()).await;
    assert_eq!(outcome.failed_code(), Some("card_declined"), "{outcome:?}");
    assert_eq!(
        services
            .inventory
            .stock("A")
            .await
            .unwrap()
            .unwrap()
            .reserved,
        3
    );
    let report = check_invariants(&db, &outcomes(&["o1"], &["o2"]))
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
}

async fn many_orders_under_random_faults(db: DatabaseConnection) {
    seed_stock(&db, &[("SKU-1", 12), ("SKU-2", 12), ("SKU-3", 12)])
        .await
        .unwrap();
    let faults = Faults::new(FaultPlan::uniform(0.1, 0.1).unwrap(), 7);
    let services = OrderServices::new(&db, &faults);
    let saga = place_order_saga(&services).unwrap();
    let orders = generate_orders(&OrderMix {
        count: 30,
        decline_ratio: 0.3,
        ..OrderMix::default()
    });
    let tasks: Vec<_> = orders
        .iter()
        .map(|o| {
            let saga = saga.clone();
            let input = o.to_json();
            tokio::spawn(async move { run_saga(&saga, &input).await })
        })
        .collect();
    let mut seen = SagaOutcomes::default();
    for (o, task) in orders.iter().zip(tasks) {
        match task.await.unwrap() {
            Outcome::Completed(_) => {
                assert!(
                    !is_declined(o.card.expose()),
                    "{} completed with a declined card",
                    o.order_id
                );
                seen.completed_orders.push(o.order_id.clone());
            }
            Outcome::Compensated { error, .. } => {
                if is_declined(o.card.expose()) {
                    assert!(
                        ["card_declined", "out_of_stock", "injected_fault"]
                            .contains(&error.code.as_str()),
                        "{error}"
                    );
                }
                seen.compensated_orders.push(o.order_id.clone());
            }
            stuck @ Outcome::Stuck { .. } => panic!("{} got stuck: {stuck:?}", o.order_id),
        }
    }
    assert!(faults.injected_total() > 0);
    assert!(!seen.completed_orders.is_empty());
    assert!(seen.compensated_orders.len() >= 9, "{seen:?}");
    let report = check_invariants(&db, &seen).await.unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.orders_confirmed, seen.completed_orders.len());
}

async fn trips_book_everything_or_nothing(db: DatabaseConnection) {
    let faults = Faults::none();
    faults.fail_next(Service::Hotels, FaultPoint::AfterEffect, 1);
    faults.fail_next(Service::Flights, FaultPoint::AfterEffect, 2);
    let services = TripServices::new(&db, &faults);
    let saga = book_trip_saga(&services).unwrap();
    let ok = run_saga(&saga, &trip("t1", "Harbour Inn", "van").to_json()).await;
    assert!(matches!(ok, Outcome::Completed(_)), "{ok:?}");
    let no_rooms = run_saga(&saga, &trip("t2", "SoldOut Lodge", "van").to_json()).await;
    assert_eq!(no_rooms.failed_code(), Some("no_rooms"), "{no_rooms:?}");
    let no_cars = run_saga(&saga, &trip("t3", "Harbour Inn", "van SOLDOUT").to_json()).await;
    assert_eq!(no_cars.failed_code(), Some("no_cars"), "{no_cars:?}");
    let seen = SagaOutcomes {
        completed_trips: vec!["t1".into()],
        compensated_trips: vec!["t2".into(), "t3".into()],
        ..SagaOutcomes::default()
    };
    let report = check_invariants(&db, &seen).await.unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.bookings.get("flight/booked"), Some(&1));
    assert_eq!(report.bookings.get("flight/cancelled"), Some(&2));
    assert_eq!(report.bookings.get("hotel/cancelled"), Some(&1));

    // Claiming the wrong outcome is caught.
    let wrong = SagaOutcomes {
        completed_trips: vec!["t2".into()],
        compensated_trips: vec!["t1".into()],
        ..SagaOutcomes::default()
    };
    let report = check_invariants(&db, &wrong).await.unwrap();
    assert_eq!(report.violations.len(), 6, "{report}");
}

async fn invariant_check_catches_planted_violations(db: DatabaseConnection) {
    seed_stock(&db, &[("A", 10)]).await.unwrap();
    let services = OrderServices::new(&db, &Faults::none());
    let saga = place_order_saga(&services).unwrap();
    assert!(matches!(
        run_saga(&saga, &order("good", 2, GOOD_CARD).to_json()).await,
        Outcome::Completed(_)
    ));
    let declined = run_saga(&saga, &order("bad", 2, DECLINED_CARD).to_json()).await;
    assert_eq!(declined.failed_code(), Some("card_declined"));
    let seen = outcomes(&["good"], &["bad"]);
    assert!(check_invariants(&db, &seen).await.unwrap().is_ok());

    // The completed order loses its money, the compensated one gets its stock back on hold,
    // and the counter drifts from the ledger.
    sql(
        &db,
        "UPDATE demo_authorizations SET state = 'voided' WHERE order_id = 'good'",
    )
    .await;
    sql(
        &db,
        "UPDATE demo_reservations SET state = 'held' WHERE order_id = 'bad'",
    )
    .await;
    sql(&db, "UPDATE demo_stock SET reserved = 1 WHERE sku = 'A'").await;
    let report = check_invariants(&db, &seen).await.unwrap();
    assert!(!report.is_ok());
    let text = report.to_string();
    for expected in [
        "confirmed order `good` has no live authorization",
        "compensated order `bad` still has reservation",
        "sku `A`: reserved counter is 1 but its held and committed reservations add up to 4",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert_eq!(report.violations.len(), 3, "{text}");

    // A compensated order that still holds money, and an order charged twice (possible only
    // without the partial unique index).
    sql(
        &db,
        "INSERT INTO demo_authorizations VALUES ('late', 'bad', 'ada', 1, '4242', 'authorized', 0, 0)",
    )
    .await;
    sql(&db, "DROP INDEX demo_authorizations_one_live_per_order").await;
    sql(
        &db,
        "UPDATE demo_authorizations SET state = 'authorized' WHERE order_id = 'good'",
    )
    .await;
    sql(
        &db,
        "INSERT INTO demo_authorizations VALUES ('dup', 'good', 'ada', 1, '4242', 'authorized', 0, 0)",
    )
    .await;
    let report = check_invariants(&db, &seen).await.unwrap();
    let text = report.to_string();
    for expected in [
        "compensated order `bad` still has a live authorization",
        "order `good` is charged 2 times",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

on_both_backends!(
    order_completes,
    declined_card_releases_inventory,
    expired_hold_fails_the_pivot_and_compensates,
    lost_replies_are_absorbed_by_idempotency,
    many_orders_under_random_faults,
    trips_book_everything_or_nothing,
    invariant_check_catches_planted_violations,
);
