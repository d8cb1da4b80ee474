//! Fewer index entries and checks per transition, each measured on the distributed benchmark.
//!
//! Every transition rewrites its saga's row (a new row version, so an entry in every index of
//! `sagas`) and appends attempts, history and outbox rows. Removed here:
//! - `idx_sagas_created_at`: `idx_sagas_created_id` starts with the same column.
//! - PostgreSQL: `idx_history_actor_at`: `idx_history_actor_prefix_at` (PostgreSQL only) has
//!   the same columns, and its pattern operator class answers equality as well as prefixes.
//! - `idx_sagas_name_version`: no query looks sagas up by version alone; `list --version`
//!   checks the version on rows an index of name or time finds, and definitions are never
//!   deleted (which is what the foreign key from `sagas` would need it for).
//! - PostgreSQL: the foreign keys from `step_attempts`, `saga_history` and `outbox` to `sagas`.
//!   Each inserted row cost a lookup of its saga (a trigger per row, about a tenth of the
//!   database's time per batch); the engine only writes those rows in the statement that writes
//!   the saga, and retention deletes them explicitly with their saga. SQLite keeps its foreign
//!   keys: removing one there rebuilds the table, and its cost per row is small.
//!
//! Together these took the distributed benchmark from about 1,170 to about 1,310 sagas/s.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (name, how to create it again) of the indexes dropped on both databases.
const DROPPED_INDEXES: [(&str, &str); 2] = [
    (
        "idx_sagas_created_at",
        "CREATE INDEX IF NOT EXISTS idx_sagas_created_at ON sagas (created_at)",
    ),
    (
        "idx_sagas_name_version",
        "CREATE INDEX IF NOT EXISTS idx_sagas_name_version ON sagas (name, definition_version)",
    ),
];

/// SQLite reads actor prefixes through this index; PostgreSQL has the pattern index.
const DROPPED_ON_POSTGRES: (&str, &str) = (
    "idx_history_actor_at",
    "CREATE INDEX IF NOT EXISTS idx_history_actor_at ON saga_history (actor, at)",
);

/// (table, constraint) of the foreign keys dropped on PostgreSQL.
const DROPPED_FOREIGN_KEYS: [(&str, &str); 3] = [
    ("step_attempts", "step_attempts_saga_id_fkey"),
    ("saga_history", "saga_history_saga_id_fkey"),
    ("outbox", "outbox_saga_id_fkey"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (name, _) in DROPPED_INDEXES {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
                .await?;
        }
        if manager.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {}", DROPPED_ON_POSTGRES.0))
                .await?;
            for (table, constraint) in DROPPED_FOREIGN_KEYS {
                db.execute_unprepared(&format!(
                    "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {constraint}"
                ))
                .await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (_, create) in DROPPED_INDEXES {
            db.execute_unprepared(create).await?;
        }
        if manager.get_database_backend() == DbBackend::Postgres {
            db.execute_unprepared(DROPPED_ON_POSTGRES.1).await?;
            for (table, constraint) in DROPPED_FOREIGN_KEYS {
                db.execute_unprepared(&format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {constraint} FOREIGN KEY (saga_id) \
                     REFERENCES sagas (id) ON DELETE CASCADE"
                ))
                .await?;
            }
        }
        Ok(())
    }
}
