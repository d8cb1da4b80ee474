//! Opening the database: the pools, the batch writer's PostgreSQL session settings, the schema
//! migrations, and the retries while a database is still starting.

use std::time::Duration;

use sagaflow_migrations::{Migrator, MigratorTrait};
use sagaflow_protocol::RetryPolicy;
use sagaflow_protocol::backoff::retry_infrastructure;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, RuntimeErr,
    TransactionTrait,
};
use tracing::warn;

use super::partitions::ensure_partitions;
use super::{Store, StoreOptions};
use crate::EngineError;

/// Session settings of the connections that commit batches on PostgreSQL: a batch joins its
/// parameter rows to the tables by primary key, and a cached generic plan must not turn that
/// into table scans (docs/architecture.md §7.1).
pub(super) const BATCH_WRITER_SETTINGS: [(&str, &str); 3] = [
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("enable_seqscan", "off"),
];

/// Connections of the batch writer pool: one per batch the driver may have committing at once
/// (`runtime::driver::COMMITS_IN_FLIGHT`), and one more that covers a connection being
/// replaced.
const BATCH_WRITER_CONNECTIONS: u32 = 3;

impl Store {
    /// Opens (and for SQLite creates) the database at `url` and applies the schema.
    ///
    /// SQLite runs in WAL mode with `synchronous=FULL`, so a committed transition survives a
    /// killed process or a power cut.
    pub async fn connect(url: &str) -> Result<Self, EngineError> {
        Self::connect_with(url, &StoreOptions::default()).await
    }

    /// [`Store::connect`] with options: the partition count a new database is created with.
    pub async fn connect_with(
        url: &str,
        store_options: &StoreOptions,
    ) -> Result<Self, EngineError> {
        let url = sagaflow_protocol::database_url(url);
        let mut options = ConnectOptions::new(url.clone());
        options
            .sqlx_logging(false)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(60));
        if url.starts_with("sqlite:") {
            use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
            options.max_connections(4).map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(30))
                    .foreign_keys(true)
            });
        } else {
            options.max_connections(16);
        }
        let db = connect_with_retries(&url, &options).await?;
        let partitions = migrate(&db, store_options.partitions).await?;
        let writer = if db.get_database_backend() == DbBackend::Postgres {
            let mut writer_options = options.clone();
            writer_options
                .max_connections(BATCH_WRITER_CONNECTIONS)
                .map_sqlx_postgres_opts(|o| o.options(BATCH_WRITER_SETTINGS));
            connect_with_retries(&url, &writer_options).await?
        } else {
            db.clone()
        };
        Ok(Store {
            db,
            writer,
            partitions,
            sqlite_file: sagaflow_protocol::sqlite_file(&url).map(str::to_string),
            url,
            sqlite_commits: Default::default(),
        })
    }
}

/// The PostgreSQL advisory lock key that serializes schema migrations (an arbitrary constant,
/// the same in every engine version; the worker's `worker_results` table uses another).
const MIGRATION_LOCK: i64 = 7_036_815_063;

/// Applies the pending schema migrations.
///
/// Engines of a fleet start together, and two processes migrating one new PostgreSQL database
/// at once collide in its catalog (`CREATE TABLE` of the same table in two sessions fails the
/// second with a unique violation on `pg_type`). On PostgreSQL the migrations therefore run in
/// one transaction holding a transaction-level advisory lock: the second engine waits for the
/// first to commit, then finds nothing left to apply. A transaction (not a session lock) because
/// the pool may hand each statement another connection, while a transaction keeps one, and its
/// lock ends with it whatever happens, even if this process dies. The migrations' own
/// transactions nest inside as savepoints; none of them needs to run outside a transaction.
///
/// The partition count is read (or, for a new database, recorded) in the same place, so
/// engines starting together agree on it.
async fn migrate(db: &DatabaseConnection, partitions: Option<u32>) -> Result<u32, EngineError> {
    let failed = EngineError::db("applying the schema migrations");
    let now = sagaflow_protocol::Timestamp::now().as_millis();
    if db.get_database_backend() != DbBackend::Postgres {
        // SQLite takes a write lock per transaction and waits `busy_timeout` for it.
        Migrator::up(db, None).await.map_err(failed)?;
        return ensure_partitions(db, partitions, now).await;
    }
    let txn = db
        .begin()
        .await
        .map_err(EngineError::db("applying the schema migrations"))?;
    txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        .await
        .map_err(EngineError::db(
            "waiting for another engine's schema migrations",
        ))?;
    Migrator::up(&txn, None)
        .await
        .map_err(EngineError::db("applying the schema migrations"))?;
    let count = ensure_partitions(&txn, partitions, now).await?;
    txn.commit().await.map_err(failed)?;
    Ok(count)
}

/// Opens a pool; a database that is still starting (or restarting) gets a few seconds to come
/// up.
async fn connect_with_retries(
    url: &str,
    options: &ConnectOptions,
) -> Result<DatabaseConnection, EngineError> {
    retry_infrastructure(
        &connect_policy(),
        || Database::connect(options.clone()),
        is_permanent_connect_error,
        |error, attempt, delay| {
            warn!(%error, attempt, ?delay, "cannot reach the database yet; retrying");
        },
    )
    .await
    .map_err(|gave_up| EngineError::Connect {
        url: redact(url),
        attempts: gave_up.attempts,
        source: gave_up.error,
    })
}

/// Whether connecting failed for a reason that waiting does not fix: the database does not
/// exist, the credentials or permissions are refused, the SQLite file cannot be opened, the URL
/// is malformed. A refused or timed-out connection (the server is starting) is worth retrying.
fn is_permanent_connect_error(error: &DbErr) -> bool {
    use sea_orm::sqlx;
    let (DbErr::Conn(RuntimeErr::SqlxError(error))
    | DbErr::Exec(RuntimeErr::SqlxError(error))
    | DbErr::Query(RuntimeErr::SqlxError(error))) = error
    else {
        return false;
    };
    match error.as_ref() {
        sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // PostgreSQL: invalid_catalog_name (no such database), invalid_password,
            // invalid_authorization_specification (no such role, refused by pg_hba),
            // insufficient_privilege (no CONNECT right).
            Some("3D000" | "28P01" | "28000" | "42501")
                // SQLite: SQLITE_CANTOPEN (missing folder, no permission), SQLITE_NOTADB.
                | Some("14" | "26")
        ),
        _ => false,
    }
}

/// How long `connect` keeps trying: about eight seconds over six attempts.
fn connect_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(250))
        .multiplier(2.0)
        .max_interval(Duration::from_secs(4))
        .max_attempts(6)
        .jitter(0.2)
        .build()
        // These constants satisfy every rule `build` checks.
        .unwrap_or_default()
}

/// Hides a password in a database URL.
fn redact(url: &str) -> String {
    sagaflow_protocol::redact_database_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
