//! Writing a whole batch of transitions at once: the conditional saga updates, the new sagas,
//! attempts, outbox commands and history rows of every saga in the batch.
//!
//! Each kind of row travels as one JSON parameter, so a statement's text is the same for any
//! batch size and is prepared once per connection; on PostgreSQL the whole batch is then one
//! statement of data-modifying `WITH` clauses, one round trip per commit (docs/architecture.md
//! §7.1). SQLite has no data-modifying `WITH`; it runs the same parts in one transaction.
//!
//! Either way the saga updates decide: rows of a saga whose version moved on (a stale write)
//! are left out, and the caller learns which sagas were written.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use sea_orm::sea_query::ColumnType;
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend,
    EntityName, EntityTrait, IdenStatic, Iterable, Statement, TransactionTrait, Value,
};
use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::EngineError;

/// The SQL type a JSON field is read as.
#[derive(Clone, Copy)]
enum SqlType {
    Text,
    Integer,
    BigInt,
}

impl SqlType {
    fn name(self) -> &'static str {
        match self {
            SqlType::Text => "text",
            SqlType::Integer => "integer",
            SqlType::BigInt => "bigint",
        }
    }
}

/// A `FROM` item named `v` whose rows are the JSON array in parameter `param` (1-based), with
/// one column per `(name, type)`.
fn json_rows(backend: DbBackend, param: usize, columns: &[(&str, SqlType)]) -> String {
    match backend {
        DbBackend::Postgres => {
            let fields: Vec<String> = columns
                .iter()
                .map(|(name, ty)| format!("{name} {}", ty.name()))
                .collect();
            // The batch writer's connections allow only index lookups for the joins
            // (`BATCH_WRITER_SETTINGS` in connection.rs), so the planner's guess at the row
            // count cannot turn them into table scans.
            format!(
                "json_to_recordset(CAST(${param} AS json)) AS v({})",
                fields.join(", ")
            )
        }
        _ => {
            // json_extract gives integers as INTEGER, strings as TEXT and null as NULL.
            let fields: Vec<String> = columns
                .iter()
                .map(|(name, _)| format!("json_extract(value, '$.{name}') AS {name}"))
                .collect();
            format!("(SELECT {} FROM json_each(?)) AS v", fields.join(", "))
        }
    }
}

/// Rows for one table, each the text of a JSON object keyed by column name.
///
/// The text is written straight from the models' values: building `serde_json` maps first
/// cost an allocation per column per row and was a fifth of a commit's instructions.
pub(super) struct Rows {
    table: &'static str,
    columns: Vec<(&'static str, SqlType)>,
    rows: Vec<Row>,
}

/// One row's JSON text and the saga it belongs to.
struct Row {
    saga: String,
    json: Vec<u8>,
}

impl Rows {
    /// The rows of `models` (every column set), taking their values.
    pub fn of<A: ActiveModelTrait>(models: Vec<A>) -> Result<Rows, EngineError> {
        let all: Vec<_> = <A::Entity as EntityTrait>::Column::iter().collect();
        let mut columns = Vec::with_capacity(all.len());
        for column in &all {
            let ty = match column.def().get_column_type() {
                ColumnType::Integer | ColumnType::SmallInteger => SqlType::Integer,
                ColumnType::BigInteger => SqlType::BigInt,
                ColumnType::String(_) | ColumnType::Text | ColumnType::Char(_) => SqlType::Text,
                other => {
                    return Err(unsupported(format!(
                        "column `{}` has type {other:?}",
                        column.as_str()
                    )));
                }
            };
            columns.push((column.as_str(), ty));
        }
        // A row's saga: `saga_id` where the table has one, else `id` (the sagas table).
        let saga_column = all
            .iter()
            .position(|c| c.as_str() == "saga_id")
            .or_else(|| all.iter().position(|c| c.as_str() == "id"));
        let mut rows = Vec::with_capacity(models.len());
        for mut model in models {
            let mut json = Vec::with_capacity(256);
            let mut saga = String::new();
            json.push(b'{');
            for (i, column) in all.iter().enumerate() {
                if i > 0 {
                    json.push(b',');
                }
                json.push(b'"');
                json.extend_from_slice(column.as_str().as_bytes());
                json.extend_from_slice(b"\":");
                match model.take(*column) {
                    ActiveValue::Set(value) | ActiveValue::Unchanged(value) => {
                        if Some(i) == saga_column
                            && let Value::String(Some(id)) = &value
                        {
                            saga.clone_from(id);
                        }
                        write_json(&mut json, value)?;
                    }
                    ActiveValue::NotSet => json.extend_from_slice(b"null"),
                }
            }
            json.push(b'}');
            rows.push(Row { saga, json });
        }
        Ok(Rows {
            table: <A::Entity as Default>::default().table_name(),
            columns,
            rows,
        })
    }

    /// [`Rows::parameter`], or `None` when there are no rows (nothing to run).
    fn parameter_if_any(&self) -> Option<Result<Value, EngineError>> {
        (!self.rows.is_empty()).then(|| self.parameter())
    }

    /// The JSON array of the rows, as the statement's parameter.
    fn parameter(&self) -> Result<Value, EngineError> {
        let length = self.rows.iter().map(|r| r.json.len() + 1).sum::<usize>() + 2;
        let mut array = Vec::with_capacity(length);
        array.push(b'[');
        for (i, row) in self.rows.iter().enumerate() {
            if i > 0 {
                array.push(b',');
            }
            array.extend_from_slice(&row.json);
        }
        array.push(b']');
        String::from_utf8(array)
            .map(Value::from)
            .map_err(|e| unsupported(format!("rows not expressible as JSON: {e}")))
    }

    /// `INSERT INTO table (...) SELECT ... FROM <parameter param>`, keeping only rows of the
    /// sagas `committed` names (a subquery), if given.
    fn insert_sql(&self, backend: DbBackend, param: usize, committed: Option<&str>) -> String {
        let condition = committed.map(|ids| among("v.saga_id", ids));
        self.insert_where_sql(backend, param, condition.as_deref())
    }

    /// [`Rows::insert_sql`] keeping only the rows that meet `condition`, if given.
    fn insert_where_sql(
        &self,
        backend: DbBackend,
        param: usize,
        condition: Option<&str>,
    ) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        let names = names.join(", ");
        let filter = condition
            .map(|condition| format!(" WHERE {condition}"))
            .unwrap_or_default();
        format!(
            "INSERT INTO {} ({names}) SELECT {names} FROM {}{filter}",
            self.table,
            json_rows(backend, param, &self.columns)
        )
    }

    fn retain_sagas(&mut self, committed: &HashSet<String>) {
        self.rows.retain(|row| committed.contains(&row.saga));
    }
}

/// `column` is among what `subquery` returns, as a condition PostgreSQL evaluates with the
/// subquery run once (an init plan) and the rows' JSON read once: written as `IN (subquery)`,
/// it could not estimate either side and read the JSON rows again for every row of the
/// subquery (a batch's rows parsed once per committed saga, or per held partition).
fn among(column: &str, subquery: &str) -> String {
    format!("{column} = ANY(ARRAY({subquery}))")
}

fn unsupported(detail: String) -> EngineError {
    EngineError::Corrupt {
        saga_id: String::new(),
        detail: format!("the batch writer cannot store this: {detail}"),
    }
}

/// Appends the JSON form of a column value the store writes (text and integers).
fn write_json(out: &mut Vec<u8>, value: Value) -> Result<(), EngineError> {
    let written = match value {
        Value::String(Some(text)) => serde_json::to_writer(&mut *out, &text),
        Value::Int(Some(n)) => serde_json::to_writer(&mut *out, &n),
        Value::BigInt(Some(n)) => serde_json::to_writer(&mut *out, &n),
        Value::String(None) | Value::Int(None) | Value::BigInt(None) => {
            out.extend_from_slice(b"null");
            Ok(())
        }
        other => return Err(unsupported(format!("value {other:?}"))),
    };
    written.map_err(|e| unsupported(format!("a value not expressible as JSON: {e}")))
}

/// The JSON array parameter for `rows`, serialized straight from the slice.
fn parameter<T: Serialize>(rows: &[T]) -> Result<Value, EngineError> {
    serde_json::to_string(rows)
        .map(Value::from)
        .map_err(|e| unsupported(format!("rows not expressible as JSON: {e}")))
}

/// One saga row's new values, written only if its version is still `expected`; serialized
/// as the update statement's JSON row (the fields are its columns).
#[derive(Serialize)]
pub(super) struct SagaUpdate {
    pub id: String,
    pub status: String,
    pub current_step: Option<String>,
    pub outputs: String,
    pub progress: String,
    pub last_error: Option<String>,
    pub wake_at: Option<i64>,
    pub row_version: i64,
    pub history_seq: i64,
    pub updated_at: i64,
    pub expected: i64,
    /// Its partition (fixed at creation), so the fence is checked on the update rows.
    pub partition_id: i32,
}

const SAGA_UPDATE_COLUMNS: [(&str, SqlType); 12] = [
    ("id", SqlType::Text),
    ("status", SqlType::Text),
    ("current_step", SqlType::Text),
    ("outputs", SqlType::Text),
    ("progress", SqlType::Text),
    ("last_error", SqlType::Text),
    ("wake_at", SqlType::BigInt),
    ("row_version", SqlType::BigInt),
    ("history_seq", SqlType::BigInt),
    ("updated_at", SqlType::BigInt),
    ("expected", SqlType::BigInt),
    ("partition_id", SqlType::Integer),
];

/// The saga updates, each conditional on its version and, when `held` names a subquery of
/// partitions, on the saga's partition being among them.
///
/// The fence is checked on the update rows (`v.partition_id`), not on `sagas`: PostgreSQL
/// cannot estimate the subquery, and a condition on `sagas.partition_id` led it to plans that
/// read far more of `sagas` than the rows updated, doubling the commit's time.
fn update_sagas_sql(backend: DbBackend, param: usize, held: Option<&str>) -> String {
    let fence = held
        .map(|held| {
            format!(
                " AND {} AND sagas.partition_id = v.partition_id",
                among("v.partition_id", held)
            )
        })
        .unwrap_or_default();
    format!(
        "UPDATE sagas SET status = v.status, current_step = v.current_step, outputs = v.outputs, \
         progress = v.progress, last_error = v.last_error, wake_at = v.wake_at, \
         row_version = v.row_version, history_seq = v.history_seq, updated_at = v.updated_at \
         FROM {} WHERE sagas.id = v.id AND sagas.row_version = v.expected{fence} \
         RETURNING sagas.id",
        json_rows(backend, param, &SAGA_UPDATE_COLUMNS)
    )
}

/// The partitions of `fence` whose lease its node still holds under the epoch it names, now by
/// the database's clock; each lease row read is share-locked until the batch commits, so a
/// takeover (which updates the row) waits for this batch and cannot see the partition's sagas
/// before it (docs/architecture.md §3.1). The rows are locked in partition order, the order the
/// lease keeper's updates lock them in (`leases::locked_in_order`), so neither can deadlock the
/// other.
fn held_partitions_sql(leases_param: usize, node_param: usize) -> String {
    format!(
        "SELECT l.partition_id FROM partition_leases l \
         JOIN json_to_recordset(CAST(${leases_param} AS json)) AS h(partition_id integer, epoch bigint) \
         ON l.partition_id = h.partition_id AND l.epoch = h.epoch \
         WHERE l.owner = ${node_param} AND l.expires_at > {DATABASE_NOW_MS} \
         ORDER BY l.partition_id FOR SHARE OF l"
    )
}

/// The database's clock in milliseconds since the epoch, on PostgreSQL: leases are measured by
/// it, never by a node's own clock. (`clock_timestamp`, not `now`: the time of the check, not of
/// the transaction's start.)
pub(crate) const DATABASE_NOW_MS: &str =
    "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS bigint)";

/// A change to an attempt row that already exists.
#[derive(Debug, Clone)]
pub(super) struct AttemptUpdate {
    pub saga_id: String,
    pub step: i32,
    pub direction: &'static str,
    pub attempt: i32,
    pub status: super::AttemptStatus,
    pub finished_at: i64,
    pub error: Option<String>,
}

impl AttemptUpdate {
    /// The attempt row it changes.
    pub fn key(&self) -> (String, i32, String, i32) {
        let (saga_id, step, direction, attempt) = self.borrowed_key();
        (saga_id.to_string(), step, direction.to_string(), attempt)
    }

    /// [`AttemptUpdate::key`] without copying its strings.
    fn borrowed_key(&self) -> (&str, i32, &str, i32) {
        (&self.saga_id, self.step, self.direction, self.attempt)
    }
}

const ATTEMPT_UPDATE_COLUMNS: [(&str, SqlType); 7] = [
    ("saga_id", SqlType::Text),
    ("step", SqlType::Integer),
    ("direction", SqlType::Text),
    ("attempt", SqlType::Integer),
    ("status", SqlType::Text),
    ("finished_at", SqlType::BigInt),
    ("error", SqlType::Text),
];

fn update_attempts_sql(backend: DbBackend, param: usize, committed: Option<&str>) -> String {
    let filter = committed
        .map(|ids| format!(" AND {}", among("v.saga_id", ids)))
        .unwrap_or_default();
    format!(
        "UPDATE step_attempts SET status = v.status, finished_at = v.finished_at, error = v.error \
         FROM {} WHERE step_attempts.saga_id = v.saga_id AND step_attempts.step = v.step \
         AND step_attempts.direction = v.direction AND step_attempts.attempt = v.attempt{filter}",
        json_rows(backend, param, &ATTEMPT_UPDATE_COLUMNS)
    )
}

/// An attempt update's JSON row.
#[derive(Serialize)]
struct AttemptUpdateRow<'a> {
    saga_id: &'a str,
    step: i32,
    direction: &'a str,
    attempt: i32,
    status: &'a str,
    finished_at: i64,
    error: Option<&'a str>,
}

/// One JSON row per attempt; for one attempt, the last update wins (PostgreSQL would use an
/// arbitrary one of several rows matching one target row).
fn attempt_update_rows<'a>(
    updates: &'a [AttemptUpdate],
    committed: Option<&HashSet<String>>,
) -> Vec<AttemptUpdateRow<'a>> {
    let mut last: HashMap<(&str, i32, &str, i32), &AttemptUpdate> = HashMap::new();
    for update in updates {
        if committed.is_none_or(|ids| ids.contains(&update.saga_id)) {
            last.insert(update.borrowed_key(), update);
        }
    }
    last.into_values()
        .map(|u| AttemptUpdateRow {
            saga_id: &u.saga_id,
            step: u.step,
            direction: u.direction,
            attempt: u.attempt,
            status: u.status.as_str(),
            finished_at: u.finished_at,
            error: u.error.as_deref(),
        })
        .collect()
}

/// The leases a fenced batch is written under: the node, and the epoch of each partition its
/// sagas are in.
pub(super) struct FenceRows {
    pub node: String,
    pub epochs: Vec<(u32, u64)>,
}

/// What a batch wrote.
pub(super) struct Written {
    /// Existing sagas whose update was written.
    pub updated: HashSet<String>,
    /// New sagas inserted.
    pub inserted: HashSet<String>,
    /// For a fenced batch on PostgreSQL, the partitions whose lease held; `None` when the batch
    /// was not fenced (or is on SQLite, where one engine holds every partition).
    pub held: Option<HashSet<u32>>,
}

/// Everything one batch writes, assuming every saga update succeeds.
pub(super) struct BatchWrite {
    /// Leases to write under (PostgreSQL only), if any.
    pub fence: Option<FenceRows>,
    pub saga_updates: Vec<SagaUpdate>,
    pub new_sagas: Rows,
    pub new_attempts: Rows,
    /// Changes to attempts that exist before this batch (an attempt inserted by the batch
    /// already carries its final values).
    pub attempt_updates: Vec<AttemptUpdate>,
    pub outbox: Rows,
    pub history: Rows,
}

/// Writes the batch atomically. New sagas are written whenever their partition's lease held
/// (always, unfenced); if one cannot be (a start key taken meanwhile), nothing is.
pub(super) async fn write(
    db: &DatabaseConnection,
    batch: BatchWrite,
) -> Result<Written, EngineError> {
    match db.get_database_backend() {
        DbBackend::Postgres => write_in_one_statement(db, batch).await,
        backend => write_in_one_transaction(db, backend, batch).await,
    }
}

/// The text of the one statement a batch is written with on PostgreSQL, fenced or not. It
/// depends only on the tables' columns, so it is built once per process (the batch writer's
/// commits would otherwise format the same few kilobytes of SQL every time).
fn one_statement_sql(batch: &BatchWrite) -> &'static str {
    static FENCED: OnceLock<String> = OnceLock::new();
    static UNFENCED: OnceLock<String> = OnceLock::new();
    let fenced = batch.fence.is_some();
    let cell = if fenced { &FENCED } else { &UNFENCED };
    cell.get_or_init(|| {
        let backend = DbBackend::Postgres;
        let committed = Some("SELECT CAST(id AS text) FROM committed");
        let held = fenced.then_some("SELECT partition_id FROM held");
        let (held_cte, held_rows) = if fenced {
            (
                format!("held AS ({}), ", held_partitions_sql(7, 8)),
                " UNION ALL SELECT 'h', CAST(partition_id AS text) FROM held",
            )
        } else {
            (String::new(), "")
        };
        format!(
            "WITH {held_cte}updated AS ({}), \
             inserted AS ({} ON CONFLICT (start_key) DO NOTHING RETURNING id), \
             committed AS (SELECT id FROM updated UNION ALL SELECT id FROM inserted), \
             new_attempts AS ({}), \
             finished_attempts AS ({}), \
             new_commands AS ({}), \
             new_history AS ({}) \
             SELECT 'u', id FROM updated UNION ALL SELECT 'i', id FROM inserted{held_rows}",
            update_sagas_sql(backend, 1, held),
            batch.new_sagas.insert_where_sql(
                backend,
                2,
                held.map(|held| among("v.partition_id", held)).as_deref()
            ),
            batch.new_attempts.insert_sql(backend, 3, committed),
            update_attempts_sql(backend, 4, committed),
            batch.outbox.insert_sql(backend, 5, committed),
            batch.history.insert_sql(backend, 6, committed),
        )
    })
}

async fn write_in_one_statement(
    db: &DatabaseConnection,
    batch: BatchWrite,
) -> Result<Written, EngineError> {
    let backend = DbBackend::Postgres;
    let sql = one_statement_sql(&batch);
    let mut values = vec![
        parameter(&batch.saga_updates)?,
        batch.new_sagas.parameter()?,
        batch.new_attempts.parameter()?,
        parameter(&attempt_update_rows(&batch.attempt_updates, None))?,
        batch.outbox.parameter()?,
        batch.history.parameter()?,
    ];
    if let Some(fence) = &batch.fence {
        let leases: Vec<Json> = fence
            .epochs
            .iter()
            .map(|(partition, epoch)| json!({ "partition_id": partition, "epoch": epoch }))
            .collect();
        values.push(parameter(&leases)?);
        values.push(Value::from(fence.node.clone()));
    }
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
        .map_err(EngineError::db("committing a batch of transitions"))?;
    let mut written = Written {
        updated: HashSet::new(),
        inserted: HashSet::new(),
        held: batch.fence.as_ref().map(|_| HashSet::new()),
    };
    for row in rows {
        let read = EngineError::db("reading what a batch wrote");
        let tag: String = row.try_get_by_index(0).map_err(read)?;
        let value: String = row
            .try_get_by_index(1)
            .map_err(EngineError::db("reading what a batch wrote"))?;
        match tag.as_str() {
            "u" => {
                written.updated.insert(value);
            }
            "i" => {
                written.inserted.insert(value);
            }
            _ => {
                if let (Some(held), Ok(partition)) = (written.held.as_mut(), value.parse()) {
                    held.insert(partition);
                }
            }
        }
    }
    Ok(written)
}

async fn write_in_one_transaction(
    db: &DatabaseConnection,
    backend: DbBackend,
    mut batch: BatchWrite,
) -> Result<Written, EngineError> {
    let txn = db
        .begin()
        .await
        .map_err(EngineError::db("beginning a transaction"))?;
    let mut updated = HashSet::new();
    if !batch.saga_updates.is_empty() {
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                update_sagas_sql(backend, 1, None),
                [parameter(&batch.saga_updates)?],
            ))
            .await
            .map_err(EngineError::db("updating sagas"))?;
        for row in rows {
            updated.insert(
                row.try_get_by_index::<String>(0)
                    .map_err(EngineError::db("reading updated saga ids"))?,
            );
        }
    }
    let inserted: HashSet<String> = batch
        .new_sagas
        .rows
        .iter()
        .map(|row| row.saga.clone())
        .collect();
    let mut committed = updated.clone();
    committed.extend(inserted.iter().cloned());
    batch.new_attempts.retain_sagas(&committed);
    batch.outbox.retain_sagas(&committed);
    batch.history.retain_sagas(&committed);
    let attempt_updates = attempt_update_rows(&batch.attempt_updates, Some(&committed));
    let statements = [
        (
            batch.new_sagas.insert_sql(backend, 1, None),
            batch.new_sagas.parameter_if_any(),
            "inserting new sagas",
        ),
        (
            batch.new_attempts.insert_sql(backend, 1, None),
            batch.new_attempts.parameter_if_any(),
            "recording attempts",
        ),
        (
            update_attempts_sql(backend, 1, None),
            (!attempt_updates.is_empty()).then(|| parameter(&attempt_updates)),
            "updating attempts",
        ),
        (
            batch.outbox.insert_sql(backend, 1, None),
            batch.outbox.parameter_if_any(),
            "writing step commands to the outbox",
        ),
        (
            batch.history.insert_sql(backend, 1, None),
            batch.history.parameter_if_any(),
            "appending history",
        ),
    ];
    for (sql, rows, doing) in statements {
        let Some(rows) = rows else { continue };
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, [rows?]))
            .await
            .map_err(EngineError::db(doing))?;
    }
    txn.commit()
        .await
        .map_err(EngineError::db("committing a transition"))?;
    Ok(Written {
        updated,
        inserted,
        held: None,
    })
}
