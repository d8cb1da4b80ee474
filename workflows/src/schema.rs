//! The demo services' tables, created idempotently.
//!
//! Portable SQL only: `TEXT` and `BIGINT` columns (times are milliseconds since the epoch, as
//! [`Timestamp`](sagaflow_sdk::Timestamp)), `CREATE ... IF NOT EXISTS`, and partial unique
//! indexes, which SQLite and PostgreSQL both support.

use sea_orm::{DatabaseConnection, DbBackend};

use crate::DemoError;
use crate::bookings::Resource;
use crate::db;

const STATEMENTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS demo_stock (
        sku TEXT PRIMARY KEY,
        total BIGINT NOT NULL CHECK (total >= 0),
        reserved BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= total)
    )",
    "CREATE TABLE IF NOT EXISTS demo_reservations (
        reservation_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        sku TEXT NOT NULL,
        quantity BIGINT NOT NULL CHECK (quantity >= 0),
        state TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS demo_reservations_by_sku
        ON demo_reservations (sku, state, expires_at)",
    "CREATE INDEX IF NOT EXISTS demo_reservations_by_order ON demo_reservations (order_id)",
    // The highest fencing epoch inventory has seen per saga partition: it refuses reservations
    // and releases sent under a lower one.
    "CREATE TABLE IF NOT EXISTS demo_inventory_epochs (
        partition_id BIGINT PRIMARY KEY,
        epoch BIGINT NOT NULL CHECK (epoch >= 0)
    )",
    "CREATE TABLE IF NOT EXISTS demo_authorizations (
        authorization_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        customer TEXT NOT NULL,
        amount_cents BIGINT NOT NULL,
        card_last4 TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )",
    "CREATE UNIQUE INDEX IF NOT EXISTS demo_authorizations_one_live_per_order
        ON demo_authorizations (order_id) WHERE state = 'authorized'",
    "CREATE TABLE IF NOT EXISTS demo_orders (
        order_id TEXT PRIMARY KEY,
        confirm_key TEXT NOT NULL UNIQUE,
        customer TEXT NOT NULL,
        sku TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        amount_cents BIGINT NOT NULL,
        reservation_key TEXT NOT NULL,
        authorization_key TEXT NOT NULL,
        confirmed_at BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS demo_shipments (
        shipment_key TEXT PRIMARY KEY,
        order_id TEXT NOT NULL UNIQUE,
        sku TEXT NOT NULL,
        quantity BIGINT NOT NULL,
        requested_at BIGINT NOT NULL
    )",
];

fn booking_statements(resource: Resource) -> [String; 2] {
    let table = resource.table();
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                booking_key TEXT PRIMARY KEY,
                trip_id TEXT NOT NULL,
                traveller TEXT NOT NULL,
                item TEXT NOT NULL,
                state TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )"
        ),
        format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {table}_one_live_per_trip
                ON {table} (trip_id) WHERE state = 'booked'"
        ),
    ]
}

/// Creates the demo services' tables (all prefixed `demo_`) if they do not exist yet.
///
/// Safe to call on every start, from several processes at once: on PostgreSQL the statements
/// run in one transaction under an advisory lock; SQLite serializes writers anyway.
pub async fn install(db: &DatabaseConnection) -> Result<(), DemoError> {
    let action = "creating the demo tables";
    let txn = db::begin_write(db, action).await?;
    if db.get_database_backend() == DbBackend::Postgres {
        // Concurrent CREATE TABLE IF NOT EXISTS can still collide in PostgreSQL's catalog.
        db::query_one(
            &txn,
            action,
            "SELECT pg_advisory_xact_lock(7036815063)",
            vec![],
        )
        .await?;
    }
    let bookings = Resource::ALL.into_iter().flat_map(booking_statements);
    for sql in STATEMENTS.iter().map(|s| s.to_string()).chain(bookings) {
        db::execute(&txn, action, &sql, vec![]).await?;
    }
    db::commit(txn, action).await
}
