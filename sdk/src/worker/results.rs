//! The worker-side idempotency table: the outcome of every idempotency key that succeeded.
//!
//! Why a table (through sea-orm) and not NATS key-value: the record must outlive anything the
//! broker may lose (a purged stream, a restarted server), because its job is exactly to stop a
//! re-delivered or re-dispatched command from applying its effect twice. A database row gives an
//! atomic insert-if-absent, survives broker restarts, and can sit next to the data the handlers
//! change. (The NATS server this project targets, 2.9, also lacks per-key TTLs, and its
//! key-value API does not work with the client version in use.)
//!
//! Lookups and records from concurrent attempts are grouped: while one group is in the
//! database the next gathers, so a busy worker reads and writes many keys per statement and
//! shares one commit among them, instead of a commit per step. Statements have a few fixed texts
//! whatever the group's size (rows to record travel as one JSON parameter, lookups are padded),
//! so the database parses and plans each once per connection, not once per size.
//!
//! On PostgreSQL the store keeps a small pool of its own whose planner reads `worker_results`
//! only through its primary key (see [`POSTGRES_SETTINGS`]).

use std::collections::HashMap;

use sea_orm::entity::prelude::*;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseConnectionType,
    DbBackend, DbErr, Schema, SqlxPostgresConnector, Statement, TransactionTrait,
};
use tokio::sync::{mpsc, oneshot};

use super::WorkerError;
use super::epochs::{self, EpochCheck, Epochs};
use crate::Timestamp;
use crate::protocol::StepOutcome;

/// The most keys one statement reads or writes.
const MAX_GROUP: usize = 256;

/// The PostgreSQL advisory lock key that serializes creating `worker_results`.
const CREATE_LOCK: i64 = 7_036_815_064;

/// Session settings of the store's own PostgreSQL connections.
///
/// PostgreSQL caches a generic plan per prepared statement. One made after the table was
/// analysed while small (autovacuum analyses a new table after its first fifty rows or so) is
/// a scan of the whole table, and it stays cached while the table grows until the next analysis
/// replaces it: in a benchmark on a new database that was a scan of up to 30,000 rows for every
/// command's lookup, which made the lookups' p99 20-25 ms instead of 5-6 ms. With table scans
/// off (still possible where no index serves, at a prohibitive cost in the planner's eyes) every
/// lookup is an index lookup. The settings stay on the store's own connections, so a pool the
/// worker shares with its handlers keeps its own.
const POSTGRES_SETTINGS: [(&str, &str); 1] = [("enable_seqscan", "off")];

/// Connections of the store's own PostgreSQL pool: one group of lookups and one of records at
/// a time, and one for [`ResultStore::count`].
const POSTGRES_CONNECTIONS: u32 = 3;

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
    /// Whether `db` is the store's own pool (closed with the store) or the caller's.
    owns_pool: bool,
    epochs: std::sync::Arc<Epochs>,
    lookups: mpsc::UnboundedSender<Lookup>,
    records: mpsc::UnboundedSender<Recording>,
}

/// A lookup waiting for its group.
#[derive(Debug)]
struct Lookup {
    key: String,
    answer: oneshot::Sender<Result<Option<StepOutcome>, String>>,
}

/// A record waiting for its group.
#[derive(Debug)]
struct Recording {
    key: String,
    command_id: String,
    /// `outcome` as the JSON text the row keeps.
    outcome_text: String,
    recorded_at: i64,
    outcome: StepOutcome,
    answer: oneshot::Sender<Result<StepOutcome, String>>,
}

impl ResultStore {
    /// Opens the database at `url` (a SQLite file is created if missing) and creates the table.
    pub async fn open(url: &str) -> Result<Self, WorkerError> {
        let url = sagaflow_protocol::database_url(url);
        let mut options = ConnectOptions::new(url.clone());
        options.sqlx_logging(false);
        if url.starts_with("postgres") {
            options
                .max_connections(POSTGRES_CONNECTIONS)
                .map_sqlx_postgres_opts(|o| o.options(POSTGRES_SETTINGS));
        } else if url.starts_with("sqlite:") {
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
        Self::on(db, true).await
    }

    /// Keeps the records in the database of an open connection (for workers that keep their
    /// data in the same database).
    ///
    /// On SQLite the store shares the connection. On PostgreSQL it opens a small pool of its own
    /// (up to three more connections) to the same database, with the same credentials and set-up
    /// (such as the schema search path), because its sessions turn table scans off (so a lookup
    /// stays an index lookup however much the table grew since its plan was cached), a setting
    /// the caller's connections should not get. That pool lives as long as the store; closing
    /// `db` does not close it.
    pub async fn with_connection(db: DatabaseConnection) -> Result<Self, WorkerError> {
        match &db.inner {
            // This arm matched a PostgreSQL pool, so the pool's accessor cannot panic.
            DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
                Self::on(own_postgres_pool(db.get_postgres_connection_pool()), true).await
            }
            _ => Self::on(db, false).await,
        }
    }

    /// Creates the table if missing and starts serving lookups and records on `db`.
    async fn on(db: DatabaseConnection, owns_pool: bool) -> Result<Self, WorkerError> {
        let backend = db.get_database_backend();
        let mut create = Schema::new(backend).create_table_from_entity(entity::Entity);
        create.if_not_exists();
        let failed = |e: DbErr| {
            WorkerError::Database(format!(
                "cannot create worker_results and worker_epochs: {e}"
            ))
        };
        if backend == DbBackend::Postgres {
            // Workers of a fleet start together, and concurrent CREATE TABLE IF NOT EXISTS can
            // still collide in PostgreSQL's catalog (a unique violation on pg_type): serialize
            // them with a transaction-scoped advisory lock.
            let txn = db.begin().await.map_err(failed)?;
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({CREATE_LOCK})"))
                .await
                .map_err(failed)?;
            txn.execute(&create).await.map_err(failed)?;
            txn.execute_unprepared(epochs::CREATE_TABLE)
                .await
                .map_err(failed)?;
            txn.commit().await.map_err(failed)?;
        } else {
            db.execute(&create).await.map_err(failed)?;
            db.execute_unprepared(epochs::CREATE_TABLE)
                .await
                .map_err(failed)?;
        }
        let (lookups, pending_lookups) = mpsc::unbounded_channel();
        let (records, pending_records) = mpsc::unbounded_channel();
        // Both tasks end when the last clone of the store is dropped.
        tokio::spawn(serve_lookups(db.clone(), pending_lookups));
        tokio::spawn(serve_records(db.clone(), pending_records));
        Ok(ResultStore {
            db,
            owns_pool,
            epochs: Default::default(),
            lookups,
            records,
        })
    }

    /// Checks a command's fencing `epoch` against the highest seen for its `partition` (by any
    /// worker sharing this database), and records it when it is the highest yet.
    pub async fn check_epoch(&self, partition: u32, epoch: u64) -> Result<EpochCheck, WorkerError> {
        self.epochs
            .check(&self.db, partition, epoch)
            .await
            .map_err(WorkerError::Database)
    }

    /// The recorded outcome for `key`, if it succeeded.
    pub async fn lookup(&self, key: &str) -> Result<Option<StepOutcome>, WorkerError> {
        let (answer, answered) = oneshot::channel();
        let lookup = Lookup {
            key: key.to_string(),
            answer,
        };
        if self.lookups.send(lookup).is_err() {
            return Err(stopped());
        }
        answered
            .await
            .map_err(|_| stopped())?
            .map_err(WorkerError::Database)
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
        let (answer, answered) = oneshot::channel();
        let recording = Recording {
            key: key.to_string(),
            command_id: command_id.to_string(),
            outcome_text: text,
            recorded_at: Timestamp::now().as_millis(),
            outcome: outcome.clone(),
            answer,
        };
        if self.records.send(recording).is_err() {
            return Err(stopped());
        }
        answered
            .await
            .map_err(|_| stopped())?
            .map_err(WorkerError::Database)
    }

    /// Closes the store's own connections, for a worker that has stopped: lookups and records
    /// still waiting fail. A connection handed to [`ResultStore::with_connection`] on SQLite is
    /// the caller's, and stays open.
    pub async fn close(self) -> Result<(), WorkerError> {
        if !self.owns_pool {
            return Ok(());
        }
        self.db
            .close()
            .await
            .map_err(|e| WorkerError::Database(format!("cannot close the connections: {e}")))
    }

    /// How many keys have a recorded outcome.
    pub async fn count(&self) -> Result<u64, WorkerError> {
        entity::Entity::find()
            .count(&self.db)
            .await
            .map_err(|e| WorkerError::Database(format!("cannot count worker_results: {e}")))
    }
}

/// A pool to the database of `shared`, whose sessions carry [`POSTGRES_SETTINGS`]. It keeps
/// the shared pool's own set-up (its hooks, such as the schema search path sea-orm sets on each
/// new connection, and its timeouts) and connects on first use, so a server that is down shows
/// up as the first statement's error.
fn own_postgres_pool(shared: &sea_orm::sqlx::PgPool) -> DatabaseConnection {
    let options = (*shared.connect_options())
        .clone()
        .options(POSTGRES_SETTINGS);
    let pool = shared
        .options()
        .clone()
        .max_connections(POSTGRES_CONNECTIONS)
        .min_connections(0)
        .connect_lazy_with(options);
    SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
}

fn stopped() -> WorkerError {
    WorkerError::Database("the idempotency store stopped".into())
}

/// Takes what is waiting on `pending` (at least one, at most `MAX_GROUP`).
///
/// Commands come in bursts (an engine's batch is published at once), and the first of a burst
/// wakes this task before the others are asked for: one yield lets the attempts already
/// running ask too, so the burst is one group instead of a group of one and a group of the rest.
async fn next_group<T>(pending: &mut mpsc::UnboundedReceiver<T>) -> Option<Vec<T>> {
    let first = pending.recv().await?;
    tokio::task::yield_now().await;
    let mut group = vec![first];
    while group.len() < MAX_GROUP {
        match pending.try_recv() {
            Ok(next) => group.push(next),
            Err(_) => break,
        }
    }
    Some(group)
}

/// The recorded outcomes of `keys` (those that have one).
///
/// The keys are listed in the statement (an index lookup each, which the planner sizes right),
/// padded to a power of two by repeating the last: a group of any size then uses one of nine
/// statement texts, each parsed and planned once per connection.
async fn recorded(
    db: &DatabaseConnection,
    mut keys: Vec<String>,
) -> Result<HashMap<String, StepOutcome>, String> {
    if let Some(last) = keys.last().cloned() {
        keys.resize(keys.len().next_power_of_two(), last);
    }
    let rows = entity::Entity::find()
        .filter(entity::Column::IdempotencyKey.is_in(keys))
        .all(db)
        .await
        .map_err(|e| format!("cannot read worker_results: {e}"))?;
    rows.into_iter()
        .map(|row| {
            let outcome = serde_json::from_str(&row.outcome)
                .map_err(|e| format!("corrupt outcome for `{}`: {e}", row.idempotency_key))?;
            Ok((row.idempotency_key, outcome))
        })
        .collect()
}

async fn serve_lookups(db: DatabaseConnection, mut pending: mpsc::UnboundedReceiver<Lookup>) {
    while let Some(group) = next_group(&mut pending).await {
        let keys = group.iter().map(|l| l.key.clone()).collect();
        match recorded(&db, keys).await {
            Ok(found) => {
                for lookup in group {
                    let _ = lookup.answer.send(Ok(found.get(&lookup.key).cloned()));
                }
            }
            Err(error) => {
                for lookup in group {
                    let _ = lookup.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

async fn serve_records(db: DatabaseConnection, mut pending: mpsc::UnboundedReceiver<Recording>) {
    while let Some(group) = next_group(&mut pending).await {
        match record_group(&db, &group).await {
            Ok(standing) => {
                for (recording, outcome) in group.into_iter().zip(standing) {
                    let _ = recording.answer.send(Ok(outcome));
                }
            }
            Err(error) => {
                for recording in group {
                    let _ = recording.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Inserts the group's rows where their key is new (one statement, one commit) and returns the
/// outcome that stands for each.
async fn record_group(
    db: &DatabaseConnection,
    group: &[Recording],
) -> Result<Vec<StepOutcome>, String> {
    let failed = |e: &dyn std::fmt::Display| format!("cannot write worker_results: {e}");
    let inserted = match &db.inner {
        // Each column as one binary array, read back by `unnest`: nothing to escape here or to
        // parse in the server, as the rows' JSON text had to be.
        DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
            let column = |field: fn(&Recording) -> &str| -> Vec<String> {
                group.iter().map(|r| field(r).to_string()).collect()
            };
            sea_orm::sqlx::query(
                "INSERT INTO worker_results (idempotency_key, command_id, outcome, recorded_at) \
                 SELECT * FROM unnest(CAST($1 AS text[]), CAST($2 AS text[]), \
                 CAST($3 AS text[]), CAST($4 AS bigint[])) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(column(|r| &r.key))
            .bind(column(|r| &r.command_id))
            .bind(column(|r| &r.outcome_text))
            .bind(group.iter().map(|r| r.recorded_at).collect::<Vec<i64>>())
            // This arm matched a PostgreSQL pool, so the pool's accessor cannot panic.
            .execute(db.get_postgres_connection_pool())
            .await
            .map_err(|e| failed(&e))?
            .rows_affected()
        }
        _ => {
            let backend = db.get_database_backend();
            // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT.
            let sql = "INSERT INTO worker_results (idempotency_key, command_id, outcome, recorded_at) \
                 SELECT json_extract(value, '$.idempotency_key'), json_extract(value, '$.command_id'), \
                 json_extract(value, '$.outcome'), json_extract(value, '$.recorded_at') \
                 FROM json_each(?) WHERE true ON CONFLICT DO NOTHING";
            let rows: Vec<serde_json::Value> = group
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "idempotency_key": r.key,
                        "command_id": r.command_id,
                        "outcome": r.outcome_text,
                        "recorded_at": r.recorded_at,
                    })
                })
                .collect();
            let rows = serde_json::to_string(&rows)
                .map_err(|e| format!("cannot encode the rows to record: {e}"))?;
            db.execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [Value::from(rows)],
            ))
            .await
            .map_err(|e| failed(&e))?
            .rows_affected()
        }
    };
    let all_new = inserted as usize == group.len();
    if all_new {
        return Ok(group.iter().map(|r| r.outcome.clone()).collect());
    }
    // Some keys were recorded before (or twice in this group): the earlier outcome stands.
    let standing = recorded(db, group.iter().map(|r| r.key.clone()).collect()).await?;
    Ok(group
        .iter()
        .map(|r| {
            standing
                .get(&r.key)
                .cloned()
                .unwrap_or_else(|| r.outcome.clone())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn succeeded(n: i64) -> StepOutcome {
        StepOutcome::Succeeded { output: json!(n) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_are_grouped_and_the_first_outcome_stands() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}", dir.path().join("results.db").display());
        let store = ResultStore::open(&url).await.expect("open");

        // Many attempts at once, and two deliveries of key 7 racing with different outcomes.
        let mut tasks = Vec::new();
        for n in 0..100i64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("key-{}", if n == 100 - 1 { 7 } else { n });
                store.record(&key, &format!("cmd-{n}"), &succeeded(n)).await
            }));
        }
        let mut standing = Vec::new();
        for task in tasks {
            standing.push(task.await.expect("task").expect("recorded"));
        }
        assert_eq!(store.count().await.expect("count"), 99);
        for (n, outcome) in standing.iter().enumerate().take(99) {
            if n != 7 {
                assert_eq!(outcome, &succeeded(n as i64), "key-{n}");
            }
        }
        // Both deliveries of key 7 are told the one outcome that was recorded.
        let (seven, unknown) = tokio::join!(store.lookup("key-7"), store.lookup("key-x"));
        let seven = seven.expect("lookup").expect("key 7 recorded");
        assert!(seven == succeeded(7) || seven == succeeded(99), "{seven:?}");
        assert_eq!(standing[7], seven);
        assert_eq!(standing[99], seven);
        assert_eq!(unknown.expect("lookup"), None);

        // A later delivery finds the record.
        let again = store
            .record("key-7", "cmd-late", &succeeded(-1))
            .await
            .expect("recorded");
        assert_eq!(again, seven);
    }
}
