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
//! - `cluster_settings`, `partition_leases`, `engine_nodes` (`m20261202_000001_partitions`):
//!   how many partitions sagas are spread over, which node holds each partition's lease under
//!   which fencing epoch, and the nodes themselves; each saga row names its partition and each
//!   history row the node and epoch that wrote it.
//!
//! The indexes, and why each exists, are in the migration (and `docs/architecture.md` §7.1).
//! The two databases differ on purpose in two places: PostgreSQL has no foreign keys from
//! `step_attempts`, `saga_history` and `outbox` to `sagas`, and it serves actor prefixes with
//! `idx_history_actor_prefix_at` (`varchar_pattern_ops`) where SQLite has `idx_history_actor_at`.
//!
//! ## Databases from before the squash
//!
//! The schema was first built up by eight unreleased migrations (`m20261126_000001_core_tables`
//! to `m20261126_000008_outbox_holds_unsent_only`), since squashed into
//! `m20261201_000001_schema`, which creates the same tables and indexes directly (without the
//! unused `sagaflow_json_rows` function 000006 created on PostgreSQL). A database made before
//! the squash must be recreated: drop it (or delete the SQLite file) and let the engine create
//! the schema afresh. [`Migrator::up`] on such a database fails with a message that says so,
//! and changes nothing.

pub use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{EntityTrait, QueryOrder};
use sea_orm_migration::seaql_migrations;

mod m20261201_000001_schema;
mod m20261202_000001_partitions;

/// How the names of the migrations squashed into `m20261201_000001_schema` begin.
const SQUASHED_PREFIX: &str = "m20261126_";

/// Applies the schema: `Migrator::up(&db, None).await`.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261201_000001_schema::Migration),
            Box::new(m20261202_000001_partitions::Migration),
        ]
    }

    /// The applied migrations, as sea-orm-migration reads them (every operation of the
    /// migrator starts here), refusing a database made before the squash.
    ///
    /// sea-orm-migration would refuse it too, as applied migrations whose files are missing;
    /// this says what to do about it.
    async fn get_migration_models<C>(db: &C) -> Result<Vec<seaql_migrations::Model>, DbErr>
    where
        C: ConnectionTrait,
    {
        Self::install(db).await?;
        let applied = seaql_migrations::Entity::find()
            .order_by_asc(seaql_migrations::Column::Version)
            .all(db)
            .await?;
        let mut squashed = applied
            .iter()
            .map(|model| model.version.as_str())
            .filter(|version| version.starts_with(SQUASHED_PREFIX));
        if let Some(first) = squashed.next() {
            return Err(DbErr::Custom(format!(
                "this database was created by Sagaflow's unreleased schema migrations from \
                 before they were squashed into one (it records {first} and {} more); it \
                 cannot be migrated: recreate it (drop the PostgreSQL database or delete the \
                 SQLite file) and the engine creates the current schema",
                squashed.count()
            )));
        }
        Ok(applied)
    }
}
