//! The read queries: sagas by id, start key, status or wake-up time, counts, a saga's history,
//! and the commands the outbox still holds.

use std::collections::BTreeMap;

use sagaflow_protocol::{StepCommand, Timestamp};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait};
use uuid::Uuid;

use super::codecs::stored_from_row;
use super::{
    HistoryColumns, HistoryEntry, INSERT_CHUNK, StatusSummary, Store, StoredSaga, history, outbox,
    saga,
};
use crate::EngineError;
use crate::machine::SagaStatus;

impl Store {
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
        self.due_in(now, limit, None).await
    }

    /// [`Store::due`] among the sagas of `partitions` only (all of them when `None`, or when
    /// it names every partition: then the query is the plain one).
    pub async fn due_in(
        &self,
        now: Timestamp,
        limit: u64,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<Uuid>, EngineError> {
        let ids: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::WakeAt.lte(now.as_millis()))
            .apply_if(self.partition_filter(partitions), |query, within| {
                query.filter(saga::Column::PartitionId.is_in(within))
            })
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
        self.next_wake_in(None).await
    }

    /// [`Store::next_wake`] among the sagas of `partitions` only (as in [`Store::due_in`]).
    pub async fn next_wake_in(
        &self,
        partitions: Option<&[u32]>,
    ) -> Result<Option<Timestamp>, EngineError> {
        let next: Option<Option<i64>> = saga::Entity::find()
            .select_only()
            .column_as(saga::Column::WakeAt.min(), "next")
            .apply_if(self.partition_filter(partitions), |query, within| {
                query.filter(saga::Column::PartitionId.is_in(within))
            })
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(EngineError::db("reading the next timer"))?;
        Ok(next.flatten().map(Timestamp))
    }

    /// Ids of sagas that are neither finished nor stuck, in `partitions` only where given.
    pub async fn active(&self, partitions: Option<&[u32]>) -> Result<Vec<Uuid>, EngineError> {
        let ids: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::Status.is_in(SagaStatus::ACTIVE.map(SagaStatus::as_str)))
            .apply_if(self.partition_filter(partitions), |query, within| {
                query.filter(saga::Column::PartitionId.is_in(within))
            })
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
        rows.into_iter()
            .map(|row| HistoryColumns::from(row).decode())
            .collect()
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

    /// The partitions to filter on, as column values: `None` when that is every partition.
    /// For each unfinished status (created, running, compensating, stuck), how many sagas of
    /// `partitions` (all where `None`) are in it and when the one that has waited longest last
    /// changed. Read from the status index, so its cost follows the unfinished sagas, not the
    /// finished ones.
    pub async fn unfinished_summary(
        &self,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<StatusSummary>, EngineError> {
        let unfinished = SagaStatus::ACTIVE
            .iter()
            .chain([SagaStatus::Stuck].iter())
            .map(|s| s.as_str());
        let rows: Vec<(String, i64, Option<i64>)> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Status)
            .column_as(saga::Column::Id.count(), "n")
            .column_as(saga::Column::UpdatedAt.min(), "oldest")
            .filter(saga::Column::Status.is_in(unfinished))
            .apply_if(self.partition_filter(partitions), |query, within| {
                query.filter(saga::Column::PartitionId.is_in(within))
            })
            .group_by(saga::Column::Status)
            .into_tuple()
            .all(&self.db)
            .await
            .map_err(EngineError::db("counting unfinished sagas"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(status, count, oldest)| {
                Some(StatusSummary {
                    status: SagaStatus::parse(&status)?,
                    count,
                    oldest_change: oldest.map(Timestamp),
                })
            })
            .collect())
    }

    /// How many commands the outbox holds and when the oldest was committed.
    pub async fn outbox_summary(&self) -> Result<(i64, Option<Timestamp>), EngineError> {
        let row: Option<(i64, Option<i64>)> = outbox::Entity::find()
            .select_only()
            .column_as(outbox::Column::Id.count(), "n")
            .column_as(outbox::Column::CreatedAt.min(), "oldest")
            .into_tuple()
            .one(&self.db)
            .await
            .map_err(EngineError::db("measuring the outbox"))?;
        Ok(row.map_or((0, None), |(n, oldest)| (n, oldest.map(Timestamp))))
    }

    fn partition_filter(&self, partitions: Option<&[u32]>) -> Option<Vec<i32>> {
        let partitions = partitions?;
        if partitions.len() as u32 >= self.partitions {
            return None;
        }
        Some(partitions.iter().map(|p| *p as i32).collect())
    }
}
