//! The outbox holds only commands not yet published: the relay deletes a command once the
//! broker has taken it, instead of marking it sent and purging it an hour later.
//!
//! Marking a command sent wrote a new version of its row (the changed column sits in an index
//! predicate, so every index of the table took a new entry) and left the old one for a vacuum;
//! a delete only marks the row. The table stays about as small as what is in flight, so the
//! sweep's index on `created_at` and the engine's lookups stay small too. Sent commands were
//! never read (the history records every dispatch), so nothing is lost.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// In order: rows of sent commands go, then both indexes before the column (SQLite refuses to
/// drop a column an index uses; only retention looks commands up by saga, in a table this
/// small), then the sweep's index.
const UP: [&str; 5] = [
    "DELETE FROM outbox WHERE sent_at IS NOT NULL",
    "DROP INDEX IF EXISTS idx_outbox_unsent_created",
    "DROP INDEX IF EXISTS idx_outbox_saga",
    "ALTER TABLE outbox DROP COLUMN sent_at",
    "CREATE INDEX IF NOT EXISTS idx_outbox_created ON outbox (created_at)",
];

const DOWN: [&str; 4] = [
    "DROP INDEX IF EXISTS idx_outbox_created",
    "ALTER TABLE outbox ADD COLUMN sent_at BIGINT",
    "CREATE INDEX IF NOT EXISTS idx_outbox_unsent_created ON outbox (created_at) \
     WHERE sent_at IS NULL",
    "CREATE INDEX IF NOT EXISTS idx_outbox_saga ON outbox (saga_id)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        execute_all(manager, &UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        execute_all(manager, &DOWN).await
    }
}

async fn execute_all(manager: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    for statement in statements {
        manager
            .get_connection()
            .execute_unprepared(statement)
            .await?;
    }
    Ok(())
}
