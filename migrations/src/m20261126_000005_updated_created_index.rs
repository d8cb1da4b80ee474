//! `list --updated-since` first finds the earliest creation time among the sagas updated in the
//! range, then walks the listing order from there. An index on `(updated_at, created_at)`
//! answers that from the index alone; it replaces `(updated_at, id)`, which nothing else read.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS idx_sagas_updated_id")
            .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS idx_sagas_updated_created ON sagas (updated_at, created_at)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared("DROP INDEX IF EXISTS idx_sagas_updated_created")
            .await?;
        db.execute_unprepared(
            "CREATE INDEX IF NOT EXISTS idx_sagas_updated_id ON sagas (updated_at, id)",
        )
        .await?;
        Ok(())
    }
}
