//! PostgreSQL: a row source for the engine's batch statements that the planner sizes right.
//!
//! The engine passes a batch's rows as one JSON array. Read with `json_to_recordset`, the
//! planner assumes 100 rows, and while `sagas` and `step_attempts` are small it judges a scan of
//! the whole table cheaper than a hundred index lookups, a choice cached plans keep as the
//! tables grow: a fresh database ran at two thirds of its later speed. `sagaflow_json_rows`
//! declares 10 rows (PL/pgSQL, so it is not inlined and the estimate holds), which makes the
//! lookups by primary key the plan from the first batch on. SQLite plans without row estimates
//! and does not need it.
//!
//! Later the batch writer's connections were set to plan only index lookups, whatever the
//! estimate, and the engine went back to `json_to_recordset` (one JSON parse per batch instead
//! of two). The function stays for engines of the versions that call it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE OR REPLACE FUNCTION sagaflow_json_rows(rows json) RETURNS SETOF json \
                 LANGUAGE plpgsql STABLE ROWS 10 AS $$ \
                 BEGIN RETURN QUERY SELECT json_array_elements(rows); END $$",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared("DROP FUNCTION IF EXISTS sagaflow_json_rows(json)")
            .await?;
        Ok(())
    }
}
