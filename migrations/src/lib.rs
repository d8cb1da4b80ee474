//! # Sagaflow schema
//!
//! One schema for SQLite and PostgreSQL, as sea-orm migrations. Times are `BIGINT`
//! milliseconds since the Unix epoch and JSON documents are `TEXT`, so both databases store and
//! compare them the same way.
//!
//! Tables:
//! - `saga_definitions`: every registered (name, version) with its spec; instances pin one.
//! - `sagas`: one row per instance, written only conditionally on `row_version`.
//! - `step_attempts`: one row per dispatched attempt of a step in one direction.
//! - `saga_history`: the append-only audit trail, `(saga_id, seq)` ordered.
//! - `outbox`: step commands committed with their transition, until a relay has published them
//!   (then deleted).

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_core_tables;
mod m20261126_000002_outbox;
mod m20261126_000003_audit_indexes;
mod m20261126_000004_outbox_unsent_partial;
mod m20261126_000005_updated_created_index;
mod m20261126_000006_json_rows_function;
mod m20261126_000007_lighter_transition_writes;
mod m20261126_000008_outbox_holds_unsent_only;

/// Applies the schema: `Migrator::up(&db, None).await`.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_core_tables::Migration),
            Box::new(m20261126_000002_outbox::Migration),
            Box::new(m20261126_000003_audit_indexes::Migration),
            Box::new(m20261126_000004_outbox_unsent_partial::Migration),
            Box::new(m20261126_000005_updated_created_index::Migration),
            Box::new(m20261126_000006_json_rows_function::Migration),
            Box::new(m20261126_000007_lighter_transition_writes::Migration),
            Box::new(m20261126_000008_outbox_holds_unsent_only::Migration),
        ]
    }
}
