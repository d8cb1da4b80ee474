//! Retention of finished sagas: [`retention`] removes whole finished sagas with their history,
//! attempts and outbox rows in one transaction, never part of a history.

use sagaflow_protocol::Timestamp;
use sea_orm::{
    ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use serde::Serialize;

use crate::EngineError;
use crate::machine::SagaStatus;
use crate::store::{Store, attempt, history, outbox, saga};

/// What [`retention`] removed, or would remove.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetentionReport {
    /// Finished sagas last changed before this were removed.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub cutoff: Timestamp,
    /// Whether this was only a count.
    pub dry_run: bool,
    /// How many sagas were removed (or would be, on a dry run).
    pub sagas: u64,
}

/// Removes the sagas of `ids` that still meet `condition`, with their history, attempts and
/// outbox rows, in one transaction. (On PostgreSQL those rows have no foreign key to cascade
/// through: the engine writes them with their saga, and only this removes them.)
async fn remove_sagas(
    db: &sea_orm::DatabaseConnection,
    ids: Vec<String>,
    condition: sea_orm::Condition,
) -> Result<u64, EngineError> {
    let txn = db
        .begin()
        .await
        .map_err(EngineError::db("beginning a retention batch"))?;
    // The condition is checked again in the DELETE itself, so a saga that changed since it was
    // selected (it cannot leave a finished status, but belt and braces) stays.
    let removed: Vec<String> = saga::Entity::delete_many()
        .filter(saga::Column::Id.is_in(ids))
        .filter(condition)
        .exec_with_returning(&txn)
        .await
        .map_err(EngineError::db("removing finished sagas"))?
        .into_iter()
        .map(|row| row.id)
        .collect();
    history::Entity::delete_many()
        .filter(history::Column::SagaId.is_in(removed.iter().cloned()))
        .exec(&txn)
        .await
        .map_err(EngineError::db("removing finished sagas' history"))?;
    attempt::Entity::delete_many()
        .filter(attempt::Column::SagaId.is_in(removed.iter().cloned()))
        .exec(&txn)
        .await
        .map_err(EngineError::db("removing finished sagas' attempts"))?;
    outbox::Entity::delete_many()
        .filter(outbox::Column::SagaId.is_in(removed.iter().cloned()))
        .exec(&txn)
        .await
        .map_err(EngineError::db("removing finished sagas' commands"))?;
    txn.commit()
        .await
        .map_err(EngineError::db("committing a retention batch"))?;
    Ok(removed.len() as u64)
}

/// Sagas removed per statement: each batch is one short transaction, so the engine's writes
/// are not held up behind one long delete, and a run that stops midway leaves whole sagas.
const RETENTION_BATCH: u64 = 500;

const FINISHED: [SagaStatus; 2] = [SagaStatus::Completed, SagaStatus::Compensated];

/// Removes whole finished (completed or compensated) sagas last changed before `cutoff`, with
/// their history and attempts; with `dry_run`, only counts them. Stuck and active sagas are
/// never removed, and no record of a kept saga is touched.
pub async fn retention(
    store: &Store,
    cutoff: Timestamp,
    dry_run: bool,
) -> Result<RetentionReport, EngineError> {
    let db = store.connection();
    let finished = || {
        sea_orm::Condition::all()
            .add(saga::Column::Status.is_in(FINISHED.map(SagaStatus::as_str)))
            .add(saga::Column::UpdatedAt.lt(cutoff.as_millis()))
    };
    if dry_run {
        let sagas = saga::Entity::find()
            .filter(finished())
            .count(db)
            .await
            .map_err(EngineError::db("counting finished sagas"))?;
        return Ok(RetentionReport {
            cutoff,
            dry_run,
            sagas,
        });
    }
    let mut removed = 0;
    loop {
        let ids: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(finished())
            .order_by_asc(saga::Column::UpdatedAt)
            .limit(RETENTION_BATCH)
            .into_tuple()
            .all(db)
            .await
            .map_err(EngineError::db("finding finished sagas"))?;
        if ids.is_empty() {
            break;
        }
        let deleted = remove_sagas(db, ids, finished()).await?;
        if deleted == 0 {
            break;
        }
        removed += deleted;
    }
    Ok(RetentionReport {
        cutoff,
        dry_run,
        sagas: removed,
    })
}
