//! Writing a whole batch of transitions at once: the conditional saga updates, the new sagas,
//! attempts, outbox commands and history rows of every saga in the batch.
//!
//! A statement's text is the same for any batch size, so it is prepared once per connection. On
//! PostgreSQL each column of a kind of row travels as one array parameter in the binary
//! protocol, read back into rows by `unnest`: nothing to escape on this side and nothing to
//! parse on the server's (the same rows as JSON text were a fifth of the commit's time in
//! PostgreSQL, most of it de-escaping the JSON documents the rows carry). The whole batch is
//! one statement of data-modifying `WITH` clauses, one round trip per commit
//! (docs/architecture.md §7.1). SQLite has no data-modifying `WITH`; it runs the same parts in
//! one transaction, each kind of row as one JSON parameter.
//!
//! Either way the saga updates decide: rows of a saga whose version moved on (a stale write)
//! are left out, and the caller learns which sagas were written.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use sea_orm::sea_query::ColumnType;
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, ConnectionTrait, DatabaseConnection,
    DatabaseConnectionType, DbBackend, DbErr, EntityName, EntityTrait, IdenStatic, Iterable,
    RuntimeErr, Statement, TransactionTrait, Value,
};
use serde::Serialize;

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

/// A `FROM` item named `v` with one column per `(name, type)`, whose rows come from the
/// parameters from `first` (1-based) on: on PostgreSQL one array per column, on SQLite one JSON
/// array of objects.
fn rows_from(backend: DbBackend, first: usize, columns: &[(&str, SqlType)]) -> String {
    match backend {
        DbBackend::Postgres => {
            let arrays: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("CAST(${} AS {}[])", first + i, ty.name()))
                .collect();
            let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
            // `unnest` of several arrays gives one row per index. The batch writer's
            // connections allow only index lookups for the joins (`BATCH_WRITER_SETTINGS` in
            // connection.rs), so the planner's guess at the row count cannot turn them into
            // table scans.
            format!("unnest({}) AS v({})", arrays.join(", "), names.join(", "))
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

/// One column of a kind of row: the array parameter PostgreSQL reads it from.
enum ColumnArray {
    Text(Vec<Option<String>>),
    Integer(Vec<Option<i32>>),
    BigInt(Vec<Option<i64>>),
}

impl ColumnArray {
    fn new(ty: SqlType, capacity: usize) -> ColumnArray {
        match ty {
            SqlType::Text => ColumnArray::Text(Vec::with_capacity(capacity)),
            SqlType::Integer => ColumnArray::Integer(Vec::with_capacity(capacity)),
            SqlType::BigInt => ColumnArray::BigInt(Vec::with_capacity(capacity)),
        }
    }

    fn push(&mut self, value: Value) -> Result<(), EngineError> {
        match (self, value) {
            (ColumnArray::Text(column), Value::String(text)) => column.push(text),
            (ColumnArray::Integer(column), Value::Int(n)) => column.push(n),
            (ColumnArray::BigInt(column), Value::BigInt(n)) => column.push(n),
            (_, other) => return Err(unsupported(format!("value {other:?} in its column"))),
        }
        Ok(())
    }
}

/// Rows of values, each in the order of `columns`, as one array per column.
fn columns_of<Row: IntoIterator<Item = Value>>(
    columns: &[(&str, SqlType)],
    rows: impl ExactSizeIterator<Item = Row>,
) -> Result<Vec<ColumnArray>, EngineError> {
    let mut arrays: Vec<ColumnArray> = columns
        .iter()
        .map(|(_, ty)| ColumnArray::new(*ty, rows.len()))
        .collect();
    for row in rows {
        for (array, value) in arrays.iter_mut().zip(row) {
            array.push(value)?;
        }
    }
    Ok(arrays)
}

/// A parameter of the statement a batch is written with on PostgreSQL.
enum Parameter {
    Column(ColumnArray),
    Text(String),
}

/// Rows for one table: each row's values, in the order of `columns`.
pub(super) struct Rows {
    table: &'static str,
    columns: Vec<(&'static str, SqlType)>,
    rows: Vec<Row>,
}

/// One row's values and the saga it belongs to.
struct Row {
    saga: String,
    values: Vec<Value>,
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
            let mut saga = String::new();
            let mut values = Vec::with_capacity(all.len());
            for (i, (column, (_, ty))) in all.iter().zip(&columns).enumerate() {
                let value = match model.take(*column) {
                    ActiveValue::Set(value) | ActiveValue::Unchanged(value) => value,
                    ActiveValue::NotSet => match ty {
                        SqlType::Text => Value::String(None),
                        SqlType::Integer => Value::Int(None),
                        SqlType::BigInt => Value::BigInt(None),
                    },
                };
                if Some(i) == saga_column
                    && let Value::String(Some(id)) = &value
                {
                    saga.clone_from(id);
                }
                values.push(value);
            }
            rows.push(Row { saga, values });
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

    /// The rows as one JSON array of objects keyed by column name: SQLite's parameter.
    ///
    /// The text is written straight from the values: building `serde_json` maps first cost an
    /// allocation per column per row and was a fifth of a commit's instructions.
    fn parameter(&self) -> Result<Value, EngineError> {
        let mut array = Vec::with_capacity(256 * self.rows.len() + 2);
        array.push(b'[');
        for (i, row) in self.rows.iter().enumerate() {
            if i > 0 {
                array.push(b',');
            }
            array.push(b'{');
            for (j, ((name, _), value)) in self.columns.iter().zip(&row.values).enumerate() {
                if j > 0 {
                    array.push(b',');
                }
                array.push(b'"');
                array.extend_from_slice(name.as_bytes());
                array.extend_from_slice(b"\":");
                write_json(&mut array, value)?;
            }
            array.push(b'}');
        }
        array.push(b']');
        String::from_utf8(array)
            .map(Value::from)
            .map_err(|e| unsupported(format!("rows not expressible as JSON: {e}")))
    }

    /// The rows as one array per column, in column order: PostgreSQL's parameters.
    fn into_columns(self) -> Result<Vec<ColumnArray>, EngineError> {
        columns_of(&self.columns, self.rows.into_iter().map(|row| row.values))
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
            rows_from(backend, param, &self.columns)
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
fn write_json(out: &mut Vec<u8>, value: &Value) -> Result<(), EngineError> {
    let written = match value {
        Value::String(Some(text)) => serde_json::to_writer(&mut *out, text),
        Value::Int(Some(n)) => serde_json::to_writer(&mut *out, n),
        Value::BigInt(Some(n)) => serde_json::to_writer(&mut *out, n),
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

/// The saga updates as one array per column of [`SAGA_UPDATE_COLUMNS`], in its order.
fn saga_update_columns(updates: Vec<SagaUpdate>) -> Result<Vec<ColumnArray>, EngineError> {
    columns_of(
        &SAGA_UPDATE_COLUMNS,
        updates
            .into_iter()
            .map(|update| -> [Value; SAGA_UPDATE_COLUMNS.len()] {
                [
                    update.id.into(),
                    update.status.into(),
                    update.current_step.into(),
                    update.outputs.into(),
                    update.progress.into(),
                    update.last_error.into(),
                    update.wake_at.into(),
                    update.row_version.into(),
                    update.history_seq.into(),
                    update.updated_at.into(),
                    update.expected.into(),
                    update.partition_id.into(),
                ]
            }),
    )
}

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
        rows_from(backend, param, &SAGA_UPDATE_COLUMNS)
    )
}

/// The partitions of `fence` whose lease its node still holds under the epoch it names, now by
/// the database's clock; each lease row read is share-locked until the batch commits, so a
/// takeover (which updates the row) waits for this batch and cannot see the partition's sagas
/// before it (docs/architecture.md §3.1). The rows are locked in partition order, the order the
/// lease keeper's updates lock them in (`leases::locked_in_order`), so neither can deadlock the
/// other.
///
/// The fence's partitions and epochs are the arrays in parameters `first` and `first + 1`, its
/// node in `first + 2`.
fn held_partitions_sql(first: usize) -> String {
    let (partitions, epochs, node_param) = (first, first + 1, first + 2);
    format!(
        "SELECT l.partition_id FROM partition_leases l \
         JOIN unnest(CAST(${partitions} AS integer[]), CAST(${epochs} AS bigint[])) AS h(partition_id, epoch) \
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
        rows_from(backend, param, &ATTEMPT_UPDATE_COLUMNS)
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

/// One row per attempt; for one attempt, the last update wins (PostgreSQL would use an
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

/// Attempt update rows as one array per column of [`ATTEMPT_UPDATE_COLUMNS`], in its order.
fn attempt_update_columns(rows: &[AttemptUpdateRow<'_>]) -> Result<Vec<ColumnArray>, EngineError> {
    columns_of(
        &ATTEMPT_UPDATE_COLUMNS,
        rows.iter()
            .map(|row| -> [Value; ATTEMPT_UPDATE_COLUMNS.len()] {
                [
                    row.saga_id.into(),
                    row.step.into(),
                    row.direction.into(),
                    row.attempt.into(),
                    row.status.into(),
                    row.finished_at.into(),
                    row.error.map(str::to_string).into(),
                ]
            }),
    )
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
    match &db.inner {
        // This arm matched a PostgreSQL pool, so the pool's accessor cannot panic.
        DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
            write_in_one_statement(db.get_postgres_connection_pool(), batch).await
        }
        _ => write_in_one_transaction(db, db.get_database_backend(), batch).await,
    }
}

/// The text of the one statement a batch is written with on PostgreSQL, fenced or not. It
/// depends only on the tables' columns, so it is built once per process (the batch writer's
/// commits would otherwise format the same few kilobytes of SQL every time). Its parameters
/// are, in order, the columns of the saga updates, the new sagas, the new attempts, the attempt
/// updates, the outbox commands and the history records, then the fence's (the order
/// [`write_in_one_statement`] binds them in).
fn one_statement_sql(batch: &BatchWrite) -> &'static str {
    static FENCED: OnceLock<String> = OnceLock::new();
    static UNFENCED: OnceLock<String> = OnceLock::new();
    let fenced = batch.fence.is_some();
    let cell = if fenced { &FENCED } else { &UNFENCED };
    cell.get_or_init(|| {
        let backend = DbBackend::Postgres;
        let committed = Some("SELECT CAST(id AS text) FROM committed");
        let held = fenced.then_some("SELECT partition_id FROM held");
        let mut next = 1;
        let mut take = |count: usize| {
            let first = next;
            next += count;
            first
        };
        let updates = take(SAGA_UPDATE_COLUMNS.len());
        let new_sagas = take(batch.new_sagas.columns.len());
        let new_attempts = take(batch.new_attempts.columns.len());
        let attempt_updates = take(ATTEMPT_UPDATE_COLUMNS.len());
        let outbox = take(batch.outbox.columns.len());
        let history = take(batch.history.columns.len());
        let fence = take(3);
        let (held_cte, held_rows) = if fenced {
            (
                format!("held AS ({}), ", held_partitions_sql(fence)),
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
            update_sagas_sql(backend, updates, held),
            batch.new_sagas.insert_where_sql(
                backend,
                new_sagas,
                held.map(|held| among("v.partition_id", held)).as_deref()
            ),
            batch
                .new_attempts
                .insert_sql(backend, new_attempts, committed),
            update_attempts_sql(backend, attempt_updates, committed),
            batch.outbox.insert_sql(backend, outbox, committed),
            batch.history.insert_sql(backend, history, committed),
        )
    })
}

/// The error of a statement the batch writer ran through the driver directly.
fn driver_error(doing: &'static str) -> impl FnOnce(sea_orm::sqlx::Error) -> EngineError {
    move |e| EngineError::Database {
        doing,
        source: DbErr::Query(RuntimeErr::SqlxError(Arc::new(e))),
    }
}

async fn write_in_one_statement(
    pool: &sea_orm::sqlx::PgPool,
    batch: BatchWrite,
) -> Result<Written, EngineError> {
    use sea_orm::sqlx::Row as _;

    let sql = one_statement_sql(&batch);
    let mut parameters: Vec<Parameter> = Vec::with_capacity(66);
    let attempt_updates = attempt_update_rows(&batch.attempt_updates, None);
    let columns = [
        saga_update_columns(batch.saga_updates)?,
        batch.new_sagas.into_columns()?,
        batch.new_attempts.into_columns()?,
        attempt_update_columns(&attempt_updates)?,
        batch.outbox.into_columns()?,
        batch.history.into_columns()?,
    ];
    parameters.extend(columns.into_iter().flatten().map(Parameter::Column));
    let fenced = batch.fence.is_some();
    if let Some(fence) = batch.fence {
        let mut partitions = Vec::with_capacity(fence.epochs.len());
        let mut epochs = Vec::with_capacity(fence.epochs.len());
        for &(partition, epoch) in &fence.epochs {
            // Partitions are counted in the thousands at most and epochs grow by one a
            // takeover: a value that does not fit fails the commit rather than wraps.
            let (Ok(partition), Ok(epoch)) = (i32::try_from(partition), i64::try_from(epoch))
            else {
                return Err(unsupported(format!(
                    "partition {partition} or its epoch {epoch} is out of range"
                )));
            };
            partitions.push(Some(partition));
            epochs.push(Some(epoch));
        }
        parameters.push(Parameter::Column(ColumnArray::Integer(partitions)));
        parameters.push(Parameter::Column(ColumnArray::BigInt(epochs)));
        parameters.push(Parameter::Text(fence.node));
    }
    let mut query = sea_orm::sqlx::query(sql);
    for parameter in parameters {
        query = match parameter {
            Parameter::Column(ColumnArray::Text(column)) => query.bind(column),
            Parameter::Column(ColumnArray::Integer(column)) => query.bind(column),
            Parameter::Column(ColumnArray::BigInt(column)) => query.bind(column),
            Parameter::Text(text) => query.bind(text),
        };
    }
    let rows = query
        .fetch_all(pool)
        .await
        .map_err(driver_error("committing a batch of transitions"))?;
    let mut written = Written {
        updated: HashSet::new(),
        inserted: HashSet::new(),
        held: fenced.then(HashSet::new),
    };
    for row in rows {
        let tag: String = row
            .try_get(0)
            .map_err(driver_error("reading what a batch wrote"))?;
        let value: String = row
            .try_get(1)
            .map_err(driver_error("reading what a batch wrote"))?;
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
