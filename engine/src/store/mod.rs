//! The durable store: saga definitions, instances, attempts and history in SQLite or
//! PostgreSQL, through sea-orm.
//!
//! Every transition is written with its history rows in one transaction, and the saga row is
//! updated only if its `row_version` is still the one the writer read: a stale writer is told
//! so ([`WriteOutcome::Stale`]) and must re-read. Timers are the `wake_at` column, not sleeps,
//! so a restarted engine finds every retry and timeout where it left them.

mod attempt_status;
mod batch;
mod definitions;
mod entities;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sagaflow_migrations::{Migrator, MigratorTrait};
use sagaflow_protocol::StepCommand;
use sagaflow_protocol::backoff::retry_infrastructure;
use sagaflow_protocol::{RetryPolicy, SagaSpec, Timestamp};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect, RuntimeErr,
    TransactionTrait,
};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;

pub use attempt_status::AttemptStatus;
pub use entities::{attempt, definition, history, outbox, saga};

use crate::EngineError;
use crate::machine::{
    Activity, AttemptOutcome, Record, RecordKind, SagaState, SagaStatus, StepState, Stuck,
};

/// Rows per multi-row INSERT: stays well under both databases' bound-parameter limits.
const INSERT_CHUNK: usize = 500;

/// A saga as stored: its state plus the bookkeeping for conditional writes.
#[derive(Debug, Clone)]
pub struct StoredSaga {
    /// The machine state.
    pub state: SagaState,
    /// The version a conditional write must match.
    pub row_version: i64,
    /// The sequence number of its last history row.
    pub history_seq: i64,
}

/// One saga's part of a commit.
#[derive(Debug)]
pub struct SagaWrite<'a> {
    /// The definition the saga is pinned to.
    pub spec: &'a SagaSpec,
    /// `None` for a new saga (inserted), else the stored version it was read at.
    pub base: Option<&'a StoredSaga>,
    /// The state after the transition.
    pub state: &'a SagaState,
    /// History to append.
    pub records: &'a [Record],
    /// For a new saga: its idempotent start key.
    pub start_key: Option<&'a str>,
    /// Step commands the transition emits, written to the outbox in the same transaction.
    pub dispatches: &'a [StepCommand],
    /// When the transition happened.
    pub now: Timestamp,
}

/// What happened to one saga's write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written; the saga is now at this version.
    Committed {
        /// The new row version.
        row_version: i64,
        /// The new last history sequence number.
        history_seq: i64,
    },
    /// Another writer changed the saga since it was read: nothing of this write was kept.
    Stale,
}

/// A history row as read back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryEntry {
    /// Position in the saga's history, from 1.
    pub seq: i64,
    /// When.
    pub at: Timestamp,
    /// The record kind, snake_case.
    pub kind: String,
    /// The step, if any.
    pub step: Option<String>,
    /// The direction, if any.
    pub direction: Option<String>,
    /// The attempt, if any.
    pub attempt: Option<u32>,
    /// Details.
    pub detail: Value,
    /// The error, if any.
    pub error: Option<String>,
    /// Who: `engine`, `worker:ID` or `operator:NAME`.
    pub actor: String,
}

/// The database, opened and migrated.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// Where batches of transitions are committed: on PostgreSQL, connections of their own
    /// that plan only index lookups (see [`BATCH_WRITER_SETTINGS`]); on SQLite, `db`.
    writer: DatabaseConnection,
}

/// Session settings of the connections that commit batches on PostgreSQL.
///
/// A batch statement joins a few hundred rows of its parameters with the tables they update,
/// by primary key, so the right plan is always an index lookup per row. PostgreSQL caches a
/// generic plan for a prepared statement, and a plan made while a table was small (a new
/// database) or between two analyses can be a hash join that reads the whole `step_attempts`
/// table on every commit, for as long as the plan stays cached: in one benchmark run that was
/// 625 scans of 27,000 rows each, and a fifth of the throughput. With these joins and table
/// scans off (a table scan stays possible where no index serves, at a prohibitive cost in the
/// planner's eyes) the index lookup is the plan. Only the batch writer's connections have
/// them: operator and audit queries, which do join large sets, keep the planner's full choice.
const BATCH_WRITER_SETTINGS: [(&str, &str); 3] = [
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("enable_seqscan", "off"),
];

/// Connections of the batch writer pool: one commits at a time (the driver is single), one
/// more covers a connection being replaced.
const BATCH_WRITER_CONNECTIONS: u32 = 2;

impl Store {
    /// Opens (and for SQLite creates) the database at `url` and applies the schema.
    ///
    /// SQLite runs in WAL mode with `synchronous=FULL`, so a committed transition survives a
    /// killed process or a power cut.
    pub async fn connect(url: &str) -> Result<Self, EngineError> {
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
        migrate(&db).await?;
        let writer = if db.get_database_backend() == DbBackend::Postgres {
            let mut writer_options = options.clone();
            writer_options
                .max_connections(BATCH_WRITER_CONNECTIONS)
                .map_sqlx_postgres_opts(|o| o.options(BATCH_WRITER_SETTINGS));
            connect_with_retries(&url, &writer_options).await?
        } else {
            db.clone()
        };
        Ok(Store { db, writer })
    }

    /// The connection, for components that keep their own tables in the same database.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Whether this is SQLite (one writer at a time) or PostgreSQL.
    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Registers a definition. Registering the same spec again is a no-op; a different spec
    /// under an existing version is refused, because running sagas are pinned to it. The one
    /// difference accepted is step schemas added where the stored definition has none: the
    /// richer definition is stored ([`SagaSpec::merge_schemas`]).
    pub async fn register_definition(&self, spec: &SagaSpec) -> Result<(), EngineError> {
        // Definitions also arrive from workers over the network: check them like the SDK does.
        spec.validate().map_err(EngineError::InvalidDefinition)?;
        definitions::check_schemas(spec)?;
        let text = serde_json::to_string(spec).map_err(|e| EngineError::CorruptDefinition {
            name: spec.name.clone(),
            version: i64::from(spec.version),
            detail: e.to_string(),
        })?;
        let existing = definition::Entity::find_by_id((spec.name.clone(), spec.version as i32))
            .one(&self.db)
            .await
            .map_err(EngineError::db("reading a saga definition"))?;
        if let Some(row) = existing {
            return self.register_again(spec, row).await;
        }
        let row = definition::ActiveModel {
            name: Set(spec.name.clone()),
            version: Set(spec.version as i32),
            spec: Set(text),
            registered_at: Set(Timestamp::now().as_millis()),
        };
        definition::Entity::insert(row)
            .on_conflict_do_nothing()
            .exec_without_returning(&self.db)
            .await
            .map_err(EngineError::db("registering a saga definition"))?;
        Ok(())
    }

    /// Every registered definition, by name then version.
    pub async fn definitions(&self) -> Result<Vec<SagaSpec>, EngineError> {
        let rows = definition::Entity::find()
            .order_by_asc(definition::Column::Name)
            .order_by_asc(definition::Column::Version)
            .all(&self.db)
            .await
            .map_err(EngineError::db("listing saga definitions"))?;
        rows.into_iter()
            .map(|row| {
                serde_json::from_str(&row.spec).map_err(|e| EngineError::CorruptDefinition {
                    name: row.name.clone(),
                    version: i64::from(row.version),
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Loads one saga.
    pub async fn load(&self, id: Uuid) -> Result<Option<StoredSaga>, EngineError> {
        let row = saga::Entity::find_by_id(id.to_string())
            .one(&self.db)
            .await
            .map_err(EngineError::db("loading a saga"))?;
        row.map(stored_from_row).transpose()
    }

    /// Loads several sagas at once; missing ids are simply absent from the result.
    pub async fn load_many(&self, ids: &[Uuid]) -> Result<Vec<StoredSaga>, EngineError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(INSERT_CHUNK) {
            let rows = saga::Entity::find()
                .filter(saga::Column::Id.is_in(chunk.iter().map(Uuid::to_string)))
                .all(&self.db)
                .await
                .map_err(EngineError::db("loading sagas"))?;
            for row in rows {
                out.push(stored_from_row(row)?);
            }
        }
        Ok(out)
    }

    /// The sagas already started under these start keys.
    pub async fn find_start_keys(
        &self,
        keys: &[&str],
    ) -> Result<BTreeMap<String, Uuid>, EngineError> {
        let mut found = BTreeMap::new();
        for chunk in keys.chunks(INSERT_CHUNK) {
            let rows: Vec<(String, Option<String>)> = saga::Entity::find()
                .select_only()
                .column(saga::Column::Id)
                .column(saga::Column::StartKey)
                .filter(saga::Column::StartKey.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(&self.db)
                .await
                .map_err(EngineError::db("looking up start keys"))?;
            for (id, key) in rows {
                if let (Some(key), Ok(id)) = (key, Uuid::parse_str(&id)) {
                    found.insert(key, id);
                }
            }
        }
        Ok(found)
    }

    /// Sagas whose wake-up time has come, earliest first.
    pub async fn due(&self, now: Timestamp, limit: u64) -> Result<Vec<Uuid>, EngineError> {
        let ids: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::WakeAt.lte(now.as_millis()))
            .order_by_asc(saga::Column::WakeAt)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(EngineError::db("looking for due timers"))?;
        Ok(ids
            .iter()
            .filter_map(|id| Uuid::parse_str(id).ok())
            .collect())
    }

    /// The earliest wake-up time of any saga, if one is set.
    pub async fn next_wake(&self) -> Result<Option<Timestamp>, EngineError> {
        let next: Option<Option<i64>> = saga::Entity::find()
            .select_only()
            .column_as(saga::Column::WakeAt.min(), "next")
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(EngineError::db("reading the next timer"))?;
        Ok(next.flatten().map(Timestamp))
    }

    /// Ids of sagas that are neither finished nor stuck.
    pub async fn active(&self) -> Result<Vec<Uuid>, EngineError> {
        let ids: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::Status.is_in(SagaStatus::ACTIVE.map(SagaStatus::as_str)))
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(EngineError::db("listing active sagas"))?;
        Ok(ids
            .iter()
            .filter_map(|id| Uuid::parse_str(id).ok())
            .collect())
    }

    /// How many sagas are in each status.
    pub async fn status_counts(&self) -> Result<BTreeMap<String, i64>, EngineError> {
        let rows: Vec<(String, i64)> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Status)
            .column_as(saga::Column::Id.count(), "n")
            .group_by(saga::Column::Status)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(EngineError::db("counting sagas by status"))?;
        Ok(rows.into_iter().collect())
    }

    /// How many history records there are of each kind, over every saga.
    pub async fn history_kind_counts(&self) -> Result<BTreeMap<String, i64>, EngineError> {
        let rows: Vec<(String, i64)> = history::Entity::find()
            .select_only()
            .column(history::Column::Kind)
            .column_as(history::Column::Seq.count(), "n")
            .group_by(history::Column::Kind)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(EngineError::db("counting history records"))?;
        Ok(rows.into_iter().collect())
    }

    /// Ids of sagas in one status, oldest first.
    pub async fn ids_with_status(&self, status: &str) -> Result<Vec<Uuid>, EngineError> {
        let ids: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::Status.eq(status))
            .order_by_asc(saga::Column::CreatedAt)
            .order_by_asc(saga::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(EngineError::db("listing sagas by status"))?;
        Ok(ids
            .iter()
            .filter_map(|id| Uuid::parse_str(id).ok())
            .collect())
    }

    /// A saga's full history, in order.
    pub async fn history(&self, id: Uuid) -> Result<Vec<HistoryEntry>, EngineError> {
        let rows = history::Entity::find()
            .filter(history::Column::SagaId.eq(id.to_string()))
            .order_by_asc(history::Column::Seq)
            .all(&self.db)
            .await
            .map_err(EngineError::db("reading a saga's history"))?;
        Ok(rows
            .into_iter()
            .map(|row| HistoryEntry {
                seq: row.seq,
                at: Timestamp(row.at),
                kind: row.kind,
                step: row.step_name,
                direction: row.direction,
                attempt: row.attempt.and_then(|a| u32::try_from(a).ok()),
                detail: row
                    .payload
                    .and_then(|p| serde_json::from_str(&p).ok())
                    .unwrap_or(Value::Null),
                error: row.error,
                actor: row.actor,
            })
            .collect())
    }

    /// Commands in the outbox (all of them unpublished), written at or before `written_by`,
    /// oldest first.
    pub async fn unsent(
        &self,
        written_by: Timestamp,
        limit: u64,
    ) -> Result<Vec<StepCommand>, EngineError> {
        let rows = outbox::Entity::find()
            .filter(outbox::Column::CreatedAt.lte(written_by.as_millis()))
            .order_by_asc(outbox::Column::CreatedAt)
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(EngineError::db("reading the outbox"))?;
        rows.into_iter()
            .map(|row| {
                serde_json::from_str(&row.payload).map_err(|e| EngineError::Corrupt {
                    saga_id: row.saga_id.clone(),
                    detail: format!("outbox command {}: {e}", row.id),
                })
            })
            .collect()
    }

    /// Deletes published commands from the outbox.
    pub async fn forget_sent(&self, command_ids: &[String]) -> Result<(), EngineError> {
        for chunk in command_ids.chunks(INSERT_CHUNK) {
            outbox::Entity::delete_many()
                .filter(outbox::Column::Id.is_in(chunk.iter().cloned()))
                .exec(&self.db)
                .await
                .map_err(EngineError::db("deleting published outbox commands"))?;
        }
        Ok(())
    }

    /// Empties the outbox: the embedded engine re-sends in-flight attempts from the sagas'
    /// states when it starts, which covers every command there.
    pub async fn clear_outbox(&self) -> Result<u64, EngineError> {
        let result = outbox::Entity::delete_many()
            .exec(&self.db)
            .await
            .map_err(EngineError::db("clearing the outbox"))?;
        Ok(result.rows_affected)
    }

    /// Commits several sagas' transitions in one transaction. Each saga's write is kept or
    /// dropped whole: a saga whose row changed since it was read comes back
    /// [`WriteOutcome::Stale`] and nothing of it is written; the others commit.
    pub async fn commit(&self, writes: &[SagaWrite<'_>]) -> Result<Vec<WriteOutcome>, EngineError> {
        let mut saga_updates = Vec::new();
        let mut new_sagas = Vec::new();
        let mut history_rows = Vec::new();
        let mut new_attempts = Vec::new();
        let mut attempt_updates = Vec::new();
        let mut outbox_rows = Vec::new();
        // Every saga's rows are built as if its update succeeds; the batch writer leaves out
        // those of sagas whose version moved on.
        for write in writes {
            let c = SagaColumns::of(write.state)?;
            let saga_id = write.state.saga_id.to_string();
            let now = write.now.as_millis();
            let first_seq = match write.base {
                None => {
                    new_sagas.push(saga::ActiveModel {
                        id: Set(saga_id.clone()),
                        name: Set(write.state.name.clone()),
                        definition_version: Set(write.state.version as i32),
                        status: Set(c.status),
                        current_step: Set(c.current_step),
                        start_key: Set(write.start_key.map(str::to_string)),
                        // Only a new saga writes its input: it never changes afterwards.
                        input: Set(serde_json::to_string(&write.state.input)
                            .map_err(SagaColumns::corrupt(write.state))?),
                        outputs: Set(c.outputs),
                        progress: Set(c.progress),
                        last_error: Set(c.last_error),
                        wake_at: Set(c.wake_at),
                        row_version: Set(1),
                        history_seq: Set(write.records.len() as i64),
                        created_at: Set(write.state.created_at.as_millis()),
                        updated_at: Set(now),
                    });
                    1
                }
                Some(base) => {
                    saga_updates.push(batch::SagaUpdate {
                        id: saga_id.clone(),
                        status: c.status,
                        current_step: c.current_step,
                        outputs: c.outputs,
                        progress: c.progress,
                        last_error: c.last_error,
                        wake_at: c.wake_at,
                        row_version: base.row_version + 1,
                        history_seq: base.history_seq + write.records.len() as i64,
                        updated_at: now,
                        expected: base.row_version,
                    });
                    base.history_seq + 1
                }
            };
            for (offset, record) in write.records.iter().enumerate() {
                history_rows.push(history_row(
                    &saga_id,
                    first_seq + offset as i64,
                    now,
                    record,
                ));
                attempt_changes(
                    write,
                    &saga_id,
                    now,
                    record,
                    &mut new_attempts,
                    &mut attempt_updates,
                );
            }
            abandoned_attempts(write, &saga_id, now, &mut attempt_updates);
            for command in write.dispatches {
                outbox_rows.push(outbox_row(command, now)?);
            }
        }
        let attempt_updates = fold_into_new_attempts(&mut new_attempts, attempt_updates);
        let updated = batch::write(
            &self.writer,
            batch::BatchWrite {
                saga_updates,
                new_sagas: batch::Rows::of(&new_sagas)?,
                new_attempts: batch::Rows::of(&new_attempts)?,
                attempt_updates,
                outbox: batch::Rows::of(&outbox_rows)?,
                history: batch::Rows::of(&history_rows)?,
            },
        )
        .await?;
        Ok(writes
            .iter()
            .map(|write| {
                let last_seq = |base_seq: i64| base_seq + write.records.len() as i64;
                match write.base {
                    None => WriteOutcome::Committed {
                        row_version: 1,
                        history_seq: last_seq(0),
                    },
                    Some(base) if updated.contains(&write.state.saga_id.to_string()) => {
                        WriteOutcome::Committed {
                            row_version: base.row_version + 1,
                            history_seq: last_seq(base.history_seq),
                        }
                    }
                    Some(_) => WriteOutcome::Stale,
                }
            })
            .collect())
    }
}

/// An attempt dispatched and finished within one batch is inserted with its final values; the
/// updates left are for attempts that existed before.
fn fold_into_new_attempts(
    new_attempts: &mut [attempt::ActiveModel],
    updates: Vec<batch::AttemptUpdate>,
) -> Vec<batch::AttemptUpdate> {
    let mut index: HashMap<(String, i32, String, i32), usize> = HashMap::new();
    for (i, row) in new_attempts.iter().enumerate() {
        let key = (
            active(&row.saga_id).cloned().unwrap_or_default(),
            active(&row.step).copied().unwrap_or_default(),
            active(&row.direction).cloned().unwrap_or_default(),
            active(&row.attempt).copied().unwrap_or_default(),
        );
        index.insert(key, i);
    }
    let mut rest = Vec::new();
    for update in updates {
        match index
            .get(&update.key())
            .and_then(|&i| new_attempts.get_mut(i))
        {
            Some(row) => {
                row.status = Set(update.status.to_string());
                row.finished_at = Set(Some(update.finished_at));
                row.error = Set(update.error);
            }
            None => rest.push(update),
        }
    }
    rest
}

/// The value of a field that was set.
fn active<T: Into<sea_orm::Value>>(value: &sea_orm::ActiveValue<T>) -> Option<&T> {
    match value {
        sea_orm::ActiveValue::Set(v) | sea_orm::ActiveValue::Unchanged(v) => Some(v),
        sea_orm::ActiveValue::NotSet => None,
    }
}

/// The `sagas` columns of a state that change as it moves (the input is written once).
struct SagaColumns {
    status: String,
    current_step: Option<String>,
    outputs: String,
    progress: String,
    last_error: Option<String>,
    wake_at: Option<i64>,
}

impl SagaColumns {
    fn of(state: &SagaState) -> Result<Self, EngineError> {
        let current_step = state
            .current_step()
            .and_then(|(step, _)| state.steps.get(step).map(|_| step))
            .map(|step| step.to_string());
        let last_error = state
            .stuck
            .as_ref()
            .map(|s| s.reason.clone())
            .or_else(|| state.failure.clone());
        Ok(SagaColumns {
            status: state.status.as_str().to_string(),
            current_step,
            outputs: serde_json::to_string(&state.outputs).map_err(Self::corrupt(state))?,
            progress: serde_json::to_string(&ProgressDocument::of(state))
                .map_err(Self::corrupt(state))?,
            last_error,
            wake_at: state.wake_at().map(Timestamp::as_millis),
        })
    }

    fn corrupt(state: &SagaState) -> impl Fn(serde_json::Error) -> EngineError + '_ {
        |e| EngineError::Corrupt {
            saga_id: state.saga_id.to_string(),
            detail: format!("cannot serialize state: {e}"),
        }
    }
}

/// The `progress` column: the state without its input and outputs, which have columns of their
/// own. Serialized from borrowed fields instead of through a JSON tree of the whole state (a
/// copy of every value, input and outputs included): this runs for every saga of every batch,
/// on the engine's one commit path. Readers parse the document, so its key order is free.
#[derive(serde::Serialize)]
struct ProgressDocument<'a> {
    activity: &'a Activity,
    compensation_queue: &'a [usize],
    created_at: Timestamp,
    deadline: Option<Timestamp>,
    failure: &'a Option<String>,
    name: &'a str,
    past_pivot: bool,
    saga_id: Uuid,
    status: SagaStatus,
    steps: &'a [StepState],
    stuck: &'a Option<Stuck>,
    version: u32,
}

impl<'a> ProgressDocument<'a> {
    fn of(state: &'a SagaState) -> Self {
        // Named exhaustively: a field added to the state fails to compile here until the
        // document says whether it holds it.
        let SagaState {
            saga_id,
            name,
            version,
            status,
            input: _,
            outputs: _,
            steps,
            activity,
            compensation_queue,
            past_pivot,
            deadline,
            failure,
            stuck,
            created_at,
        } = state;
        ProgressDocument {
            activity,
            compensation_queue,
            created_at: *created_at,
            deadline: *deadline,
            failure,
            name,
            past_pivot: *past_pivot,
            saga_id: *saga_id,
            status: *status,
            steps,
            stuck,
            version: *version,
        }
    }
}

fn stored_from_row(row: saga::Model) -> Result<StoredSaga, EngineError> {
    let corrupt = |detail: String| EngineError::Corrupt {
        saga_id: row.id.clone(),
        detail,
    };
    let mut progress: Value =
        serde_json::from_str(&row.progress).map_err(|e| corrupt(format!("progress: {e}")))?;
    let input: Value =
        serde_json::from_str(&row.input).map_err(|e| corrupt(format!("input: {e}")))?;
    let outputs: Value =
        serde_json::from_str(&row.outputs).map_err(|e| corrupt(format!("outputs: {e}")))?;
    let map = progress
        .as_object_mut()
        .ok_or_else(|| corrupt("progress is not a JSON object".into()))?;
    map.insert("input".into(), input);
    map.insert("outputs".into(), outputs);
    let state: SagaState =
        serde_json::from_value(progress).map_err(|e| corrupt(format!("state: {e}")))?;
    Ok(StoredSaga {
        state,
        row_version: row.row_version,
        history_seq: row.history_seq,
    })
}

fn outbox_row(command: &StepCommand, now: i64) -> Result<outbox::ActiveModel, EngineError> {
    let payload = serde_json::to_string(command).map_err(|e| EngineError::Corrupt {
        saga_id: command.saga_id.to_string(),
        detail: format!("cannot serialize command {}: {e}", command.command_id),
    })?;
    Ok(outbox::ActiveModel {
        id: Set(command.command_id.clone()),
        saga_id: Set(command.saga_id.to_string()),
        payload: Set(payload),
        created_at: Set(now),
    })
}

fn history_row(saga_id: &str, seq: i64, at: i64, record: &Record) -> history::ActiveModel {
    history::ActiveModel {
        saga_id: Set(saga_id.to_string()),
        seq: Set(seq),
        at: Set(at),
        kind: Set(record.kind.as_str().to_string()),
        step_name: Set(record.step.clone()),
        direction: Set(record.direction.map(|d| d.as_str().to_string())),
        attempt: Set(record.attempt.map(|a| a as i32)),
        payload: Set((!record.detail.is_null()).then(|| record.detail.to_string())),
        error: Set(record.error.clone()),
        actor: Set(record.actor.to_string()),
    }
}

fn attempt_changes(
    write: &SagaWrite<'_>,
    saga_id: &str,
    now: i64,
    record: &Record,
    inserts: &mut Vec<attempt::ActiveModel>,
    updates: &mut Vec<batch::AttemptUpdate>,
) {
    let (Some(step_name), Some(direction), Some(attempt_no)) =
        (&record.step, record.direction, record.attempt)
    else {
        return;
    };
    let Some(step) = write.spec.step_index(step_name) else {
        return;
    };
    let status = match record.kind {
        RecordKind::AttemptDispatched => {
            inserts.push(attempt::ActiveModel {
                saga_id: Set(saga_id.to_string()),
                step: Set(step as i32),
                step_name: Set(step_name.clone()),
                direction: Set(direction.as_str().to_string()),
                attempt: Set(attempt_no as i32),
                idempotency_key: Set(record.detail["idempotency_key"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()),
                status: Set(AttemptStatus::Dispatched.as_str().into()),
                dispatched_at: Set(now),
                deadline: Set(record.detail["deadline"].as_i64()),
                finished_at: Set(None),
                error: Set(None),
            });
            return;
        }
        RecordKind::AttemptSucceeded => AttemptStatus::Succeeded,
        RecordKind::AttemptFailed => AttemptStatus::Failed,
        RecordKind::AttemptTimedOut => AttemptStatus::TimedOut,
        _ => return,
    };
    updates.push(batch::AttemptUpdate {
        saga_id: saga_id.to_string(),
        step: step as i32,
        direction: direction.as_str(),
        attempt: attempt_no as i32,
        status,
        finished_at: now,
        error: record.error.clone(),
    });
}

/// Attempts the saga walked away from (deadline, cancel, skip) are marked so in their rows.
fn abandoned_attempts(
    write: &SagaWrite<'_>,
    saga_id: &str,
    now: i64,
    updates: &mut Vec<batch::AttemptUpdate>,
) {
    let Some(base) = write.base else { return };
    let Activity::InFlight {
        step,
        direction,
        attempt,
        ..
    } = base.state.activity
    else {
        return;
    };
    let abandoned = write
        .state
        .steps
        .get(step)
        .is_some_and(|s| s.attempts(direction).last_outcome == Some(AttemptOutcome::Abandoned));
    if abandoned {
        updates.push(batch::AttemptUpdate {
            saga_id: saga_id.to_string(),
            step: step as i32,
            direction: direction.as_str(),
            attempt: attempt as i32,
            status: AttemptStatus::Abandoned,
            finished_at: now,
            error: None,
        });
    }
}

/// Opens a pool; a database that is still starting (or restarting) gets a few seconds to come
/// up.
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
async fn migrate(db: &DatabaseConnection) -> Result<(), EngineError> {
    let failed = EngineError::db("applying the schema migrations");
    if db.get_database_backend() != DbBackend::Postgres {
        // SQLite takes a write lock per transaction and waits `busy_timeout` for it.
        return Migrator::up(db, None).await.map_err(failed);
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
    txn.commit().await.map_err(failed)
}

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
pub(crate) fn is_permanent_connect_error(error: &DbErr) -> bool {
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

    /// The progress document is the state minus input and outputs (the document written through
    /// a JSON tree before), and it reads back into the same state.
    #[test]
    fn progress_document_is_the_state_without_input_and_outputs() {
        for scenario in crate::machine::scenarios::all() {
            let state = crate::machine::scenarios::run(&scenario).final_state;
            let mut tree = serde_json::to_value(&state).unwrap();
            let map = tree.as_object_mut().unwrap();
            map.remove("input");
            map.remove("outputs");
            let columns = SagaColumns::of(&state).unwrap();
            let document: Value = serde_json::from_str(&columns.progress).unwrap();
            assert_eq!(document, tree, "{}", scenario.name);
            let row = saga::Model {
                id: state.saga_id.to_string(),
                name: state.name.clone(),
                definition_version: state.version as i32,
                status: columns.status,
                current_step: columns.current_step,
                start_key: None,
                input: serde_json::to_string(&state.input).unwrap(),
                outputs: columns.outputs,
                progress: columns.progress,
                last_error: columns.last_error,
                wake_at: columns.wake_at,
                row_version: 1,
                history_seq: 0,
                created_at: state.created_at.as_millis(),
                updated_at: state.created_at.as_millis(),
            };
            assert_eq!(
                stored_from_row(row).unwrap().state,
                state,
                "{}",
                scenario.name
            );
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
