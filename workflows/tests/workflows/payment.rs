//! The payment service on real SQLite files and real PostgreSQL.

use sagaflow_sdk::{Secret, Timestamp};
use sagaflow_workflows::{
    AuthorizationState, Charge, DECLINED_CARD, DemoError, Faults, GOOD_CARD, Payment, SagaOutcomes,
    VoidOutcome, check_invariants,
};
use sea_orm::{ConnectionTrait, DatabaseConnection};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn charge(order: &str, card: &str) -> Charge {
    Charge {
        order_id: order.into(),
        customer: "ada".into(),
        amount_cents: 1999,
        card: Secret::new(card.into()),
    }
}

async fn rows(db: &DatabaseConnection, key: &str) -> i64 {
    let stmt = sea_orm::Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM demo_authorizations WHERE authorization_key = $1",
        [key.into()],
    );
    let row = db.query_one_raw(stmt).await.unwrap().unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

async fn one_authorization_per_key(db: DatabaseConnection) {
    let payment = Payment::new(db.clone(), Faults::none());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let payment = payment.clone();
            tokio::spawn(async move { payment.authorize("k1", &charge("o1", GOOD_CARD), T0).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap().unwrap());
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
    assert_eq!(results[0].state, AuthorizationState::Authorized);
    assert_eq!(results[0].card_last4, "4242");
    assert_eq!(rows(&db, "k1").await, 1);

    // Another key for the same order would charge it twice: refused.
    let err = payment
        .authorize("k2", &charge("o1", GOOD_CARD), T0)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DemoError::AlreadyCharged { existing_key, .. } if existing_key == "k1"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(rows(&db, "k2").await, 0);

    let report = check_invariants(&db, &SagaOutcomes::default())
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.authorizations.get("authorized"), Some(&1));
}

async fn declines_are_permanent_and_leave_no_row(db: DatabaseConnection) {
    let payment = Payment::new(db.clone(), Faults::none());
    let err = payment
        .authorize("k1", &charge("o1", DECLINED_CARD), T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "card_declined");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("0002"), "{err}");
    // Spaces or no separators: the same card.
    let err = payment
        .authorize("k1", &charge("o1", "4000 0000 0000 0002"), T0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "card_declined");
    assert_eq!(rows(&db, "k1").await, 0);
    let err = payment
        .authorize(
            "k1",
            &Charge {
                amount_cents: 0,
                ..charge("o1", GOOD_CARD)
            },
            T0,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_amount");
}

async fn void_is_idempotent(db: DatabaseConnection) {
    let payment = Payment::new(db.clone(), Faults::none());
    payment
        .authorize("k1", &charge("o1", GOOD_CARD), T0)
        .await
        .unwrap();
    assert_eq!(
        payment.void("k1", "o1", T0).await.unwrap(),
        VoidOutcome::Voided
    );
    assert_eq!(
        payment.void("k1", "o1", T0).await.unwrap(),
        VoidOutcome::AlreadyVoided
    );
    let stored = payment.authorization("k1").await.unwrap().unwrap();
    assert_eq!(stored.state, AuthorizationState::Voided);
    // Once voided, the order may be charged again under a new key.
    payment
        .authorize("k2", &charge("o1", GOOD_CARD), T0)
        .await
        .unwrap();

    // Voiding before the authorization landed leaves a tombstone: the late authorization with
    // that key returns the voided row and holds no money.
    assert_eq!(
        payment.void("k3", "o3", T0).await.unwrap(),
        VoidOutcome::NotFound
    );
    let late = payment
        .authorize("k3", &charge("o3", GOOD_CARD), T0)
        .await
        .unwrap();
    assert_eq!(late.state, AuthorizationState::Voided);
    assert_eq!(rows(&db, "k3").await, 1);

    let report = check_invariants(&db, &SagaOutcomes::default())
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
}

on_both_backends!(
    one_authorization_per_key,
    declines_are_permanent_and_leave_no_row,
    void_is_idempotent,
);
