//! The worker-side idempotency table: the outcome of every idempotency key that succeeded.
//!
//! Why a table (through sea-orm) and not NATS key-value: the record must outlive anything the
//! broker may lose (a purged stream, a restarted server), because its job is exactly to stop a
//! re-delivered or re-dispatched command from applying its effect twice. A database row gives an
//! atomic insert-if-absent, survives broker restarts, and can sit next to the data the handlers
//! change. (The NATS server this project targets, 2.9, also lacks per-key TTLs, and its
//! key-value API does not work with the client version in use.)

use sea_orm::entity::prelude::*;
use sea_orm::{
    ActiveValue::Set, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    DbErr, Schema, TransactionTrait,
};

use super::WorkerError;
use crate::Timestamp;
use crate::protocol::StepOutcome;

/// The PostgreSQL advisory lock key that serializes creating `worker_results`.
const CREATE_LOCK: i64 = 7_036_815_064;

/// `worker_results`: one row per idempotency key that succeeded.
pub mod entity {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "worker_results")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub idempotency_key: String,
        pub command_id: String,
        #[sea_orm(column_type = "Text")]
        pub outcome: String,
        pub recorded_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Final outcomes by idempotency key.
#[derive(Debug, Clone)]
pub struct ResultStore {
    db: DatabaseConnection,
}

impl ResultStore {
    /// Opens the database at `url` (a SQLite file is created if missing) and creates the table.
    pub async fn open(url: &str) -> Result<Self, WorkerError> {
        let url = crate::database_url(url);
        let mut options = ConnectOptions::new(url.clone());
        options.sqlx_logging(false);
        if url.starts_with("sqlite:") {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            // WAL: one fsync per commit instead of several; FULL: a record survives power loss.
            options.max_connections(4).map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(std::time::Duration::from_secs(30))
            });
        }
        let db = Database::connect(options)
            .await
            .map_err(|e| WorkerError::Database(format!("cannot open `{url}`: {e}")))?;
        Self::with_connection(db).await
    }

    /// Uses an open connection (for workers that keep their data in the same database).
    pub async fn with_connection(db: DatabaseConnection) -> Result<Self, WorkerError> {
        let backend = db.get_database_backend();
        let mut create = Schema::new(backend).create_table_from_entity(entity::Entity);
        create.if_not_exists();
        let failed = |e: DbErr| WorkerError::Database(format!("cannot create worker_results: {e}"));
        if backend == DbBackend::Postgres {
            // Workers of a fleet start together, and concurrent CREATE TABLE IF NOT EXISTS can
            // still collide in PostgreSQL's catalog (a unique violation on pg_type): serialize
            // them with a transaction-scoped advisory lock.
            let txn = db.begin().await.map_err(failed)?;
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({CREATE_LOCK})"))
                .await
                .map_err(failed)?;
            txn.execute(&create).await.map_err(failed)?;
            txn.commit().await.map_err(failed)?;
        } else {
            db.execute(&create).await.map_err(failed)?;
        }
        Ok(ResultStore { db })
    }

    /// The recorded outcome for `key`, if it succeeded.
    pub async fn lookup(&self, key: &str) -> Result<Option<StepOutcome>, WorkerError> {
        let row = entity::Entity::find_by_id(key.to_string())
            .one(&self.db)
            .await
            .map_err(|e| WorkerError::Database(format!("cannot read worker_results: {e}")))?;
        row.map(|r| {
            serde_json::from_str(&r.outcome)
                .map_err(|e| WorkerError::Database(format!("corrupt outcome for `{key}`: {e}")))
        })
        .transpose()
    }

    /// Records `outcome` for `key` unless one is there already, and returns the one that stands
    /// (the earlier one, when two deliveries raced).
    pub async fn record(
        &self,
        key: &str,
        command_id: &str,
        outcome: &StepOutcome,
    ) -> Result<StepOutcome, WorkerError> {
        let text = serde_json::to_string(outcome)
            .map_err(|e| WorkerError::Database(format!("cannot serialize an outcome: {e}")))?;
        let inserted = entity::Entity::insert(entity::ActiveModel {
            idempotency_key: Set(key.to_string()),
            command_id: Set(command_id.to_string()),
            outcome: Set(text),
            recorded_at: Set(Timestamp::now().as_millis()),
        })
        .on_conflict_do_nothing()
        .exec_without_returning(&self.db)
        .await
        .map_err(|e| WorkerError::Database(format!("cannot write worker_results: {e}")))?;
        if matches!(inserted, sea_orm::TryInsertResult::Inserted(1)) {
            return Ok(outcome.clone());
        }
        Ok(self.lookup(key).await?.unwrap_or_else(|| outcome.clone()))
    }

    /// How many keys have a recorded outcome.
    pub async fn count(&self) -> Result<u64, WorkerError> {
        entity::Entity::find()
            .count(&self.db)
            .await
            .map_err(|e| WorkerError::Database(format!("cannot count worker_results: {e}")))
    }
}
