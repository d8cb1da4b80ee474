//! Many rows in one statement: the conditional saga updates and the attempt updates of a whole
//! batch of transitions go to the database as one `UPDATE ... FROM (VALUES ...)` each, so a
//! commit costs a handful of round trips however many sagas it carries.
//!
//! Both SQLite (3.33+) and PostgreSQL accept `UPDATE ... FROM`, both name the columns of a
//! `VALUES` list `column1`, `column2`, ..., and both accept the explicit casts PostgreSQL needs
//! to type the parameters. Every value is a bound parameter.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use crate::EngineError;

/// Rows per statement: at 11 parameters a row, well under both databases' limits.
const ROWS_PER_STATEMENT: usize = 500;

/// `(CAST($1 AS TEXT), CAST($2 AS BIGINT)), (...)` for `rows` rows of `casts`.
fn values_list(backend: DbBackend, rows: usize, casts: &[&str]) -> String {
    let mut n = 0;
    let mut out = String::new();
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for (i, cast) in casts.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            n += 1;
            match backend {
                DbBackend::Postgres => out.push_str(&format!("CAST(${n} AS {cast})")),
                _ => out.push_str(&format!("CAST(? AS {cast})")),
            }
        }
        out.push(')');
    }
    out
}

/// One saga row's new values, written only if its version is still `expected`.
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
}

/// Applies the updates whose version still matches and returns the ids that were written.
pub(super) async fn update_sagas(
    db: &impl ConnectionTrait,
    updates: &[SagaUpdate],
) -> Result<HashSet<String>, EngineError> {
    const CASTS: [&str; 11] = [
        "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "BIGINT", "BIGINT", "BIGINT", "BIGINT",
        "BIGINT",
    ];
    let backend = db.get_database_backend();
    let mut written = HashSet::new();
    for chunk in updates.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE sagas SET status = v.column2, current_step = v.column3, outputs = v.column4, \
             progress = v.column5, last_error = v.column6, wake_at = v.column7, \
             row_version = v.column8, history_seq = v.column9, updated_at = v.column10 \
             FROM (VALUES {}) AS v \
             WHERE sagas.id = v.column1 AND sagas.row_version = v.column11 \
             RETURNING sagas.id",
            values_list(backend, chunk.len(), &CASTS)
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * CASTS.len());
        for u in chunk {
            values.extend([
                u.id.clone().into(),
                u.status.clone().into(),
                u.current_step.clone().into(),
                u.outputs.clone().into(),
                u.progress.clone().into(),
                u.last_error.clone().into(),
                u.wake_at.into(),
                u.row_version.into(),
                u.history_seq.into(),
                u.updated_at.into(),
                u.expected.into(),
            ]);
        }
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .map_err(EngineError::db("updating sagas"))?;
        for row in rows {
            let id: String = row
                .try_get_by_index(0)
                .map_err(EngineError::db("reading updated saga ids"))?;
            written.insert(id);
        }
    }
    Ok(written)
}

/// A change to an attempt row that already exists.
#[derive(Debug, Clone)]
pub(super) struct AttemptUpdate {
    pub saga_id: String,
    pub step: i32,
    pub direction: &'static str,
    pub attempt: i32,
    pub status: &'static str,
    pub finished_at: i64,
    pub error: Option<String>,
}

/// Applies attempt updates; for one attempt, the last update wins.
pub(super) async fn update_attempts(
    db: &impl ConnectionTrait,
    updates: Vec<AttemptUpdate>,
) -> Result<(), EngineError> {
    const CASTS: [&str; 7] = [
        "TEXT", "INTEGER", "TEXT", "INTEGER", "TEXT", "BIGINT", "TEXT",
    ];
    // PostgreSQL uses an arbitrary one of several VALUES rows matching one target row.
    let mut last: std::collections::HashMap<(String, i32, &str, i32), AttemptUpdate> =
        std::collections::HashMap::new();
    for u in updates {
        last.insert((u.saga_id.clone(), u.step, u.direction, u.attempt), u);
    }
    let updates: Vec<AttemptUpdate> = last.into_values().collect();
    let backend = db.get_database_backend();
    for chunk in updates.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE step_attempts SET status = v.column5, finished_at = v.column6, error = v.column7 \
             FROM (VALUES {}) AS v \
             WHERE step_attempts.saga_id = v.column1 AND step_attempts.step = v.column2 \
             AND step_attempts.direction = v.column3 AND step_attempts.attempt = v.column4",
            values_list(backend, chunk.len(), &CASTS)
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * CASTS.len());
        for u in chunk {
            values.extend([
                u.saga_id.clone().into(),
                u.step.into(),
                u.direction.into(),
                u.attempt.into(),
                u.status.into(),
                u.finished_at.into(),
                u.error.clone().into(),
            ]);
        }
        db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .map_err(EngineError::db("updating attempts"))?;
    }
    Ok(())
}
