//! Thin helpers over sea-orm's raw SQL API, shared by the demo services.
//!
//! Every statement is written once with `$1, $2, ...` placeholders, which both PostgreSQL and
//! SQLite (through sqlx) accept, so the services carry no per-backend SQL.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, QueryResult,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait, TryGetable, Value,
};

use crate::DemoError;

fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(backend, sql, values)
}

/// Runs a statement and returns how many rows it changed.
pub(crate) async fn execute(
    conn: &impl ConnectionTrait,
    action: &str,
    sql: &str,
    values: Vec<Value>,
) -> Result<u64, DemoError> {
    let stmt = statement(conn.get_database_backend(), sql, values);
    let result = conn
        .execute_raw(stmt)
        .await
        .map_err(DemoError::db(action))?;
    Ok(result.rows_affected())
}

/// Runs a query and returns its first row, if any.
pub(crate) async fn query_one(
    conn: &impl ConnectionTrait,
    action: &str,
    sql: &str,
    values: Vec<Value>,
) -> Result<Option<QueryResult>, DemoError> {
    let stmt = statement(conn.get_database_backend(), sql, values);
    conn.query_one_raw(stmt)
        .await
        .map_err(DemoError::db(action))
}

/// Runs a query and returns all its rows.
pub(crate) async fn query_all(
    conn: &impl ConnectionTrait,
    action: &str,
    sql: &str,
    values: Vec<Value>,
) -> Result<Vec<QueryResult>, DemoError> {
    let stmt = statement(conn.get_database_backend(), sql, values);
    conn.query_all_raw(stmt)
        .await
        .map_err(DemoError::db(action))
}

/// Reads column `column` of `row`.
pub(crate) fn get<T: TryGetable>(row: &QueryResult, column: &str) -> Result<T, DemoError> {
    row.try_get::<T>("", column)
        .map_err(DemoError::db(format!("reading column `{column}`")))
}

/// Starts a transaction that is going to write.
///
/// On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so two transactions never
/// both read and then deadlock upgrading to a writer; PostgreSQL ignores the option.
pub(crate) async fn begin_write(
    db: &DatabaseConnection,
    action: &str,
) -> Result<DatabaseTransaction, DemoError> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
    .map_err(DemoError::db(action))
}

/// Commits `txn`.
pub(crate) async fn commit(txn: DatabaseTransaction, action: &str) -> Result<(), DemoError> {
    txn.commit().await.map_err(DemoError::db(action))
}

/// A `u32` quantity as the `BIGINT` it is stored as.
pub(crate) fn quantity_value(quantity: u32) -> Value {
    i64::from(quantity).into()
}

/// A stored `BIGINT` quantity back as `u32` (stored values came from `u32`, so out-of-range
/// values only appear if someone edited the table by hand; they read as `u32::MAX`).
pub(crate) fn quantity_from(stored: i64) -> u32 {
    u32::try_from(stored).unwrap_or(u32::MAX)
}
