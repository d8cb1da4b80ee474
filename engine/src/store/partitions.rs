//! Sagas spread over a fixed number of partitions, each written by the node holding its lease
//! (docs/architecture.md §3.1).
//!
//! The count is recorded in the database by the first engine that opens it and never changes:
//! a saga's partition is a function of its id and the count, computed once, when the saga is
//! created, and stored with it.

use std::collections::BTreeMap;

use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::OnConflict,
};
use uuid::Uuid;

use super::{INSERT_CHUNK, cluster, lease, saga};
use crate::EngineError;

/// Partitions of a database created without `--partitions`: enough for a dozen nodes, few
/// enough that each owned partition's reply consumer is cheap.
pub const DEFAULT_PARTITIONS: u32 = 16;

/// The most partitions a database may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The partition of saga `id` among `partitions`.
///
/// The last four bytes of the id are random in every UUID version the engine makes (v7: the
/// end of `rand_b`), so ids spread evenly.
pub fn partition_of(id: Uuid, partitions: u32) -> u32 {
    let bytes = id.as_bytes();
    let tail = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    tail % partitions.max(1)
}

/// Reads the partition count, recording `wanted` (or [`DEFAULT_PARTITIONS`]) first if the
/// database has none yet, with one free lease row per partition. Sagas written before the
/// database had partitions are given theirs.
///
/// Runs where the migrations run (under their lock on PostgreSQL), so engines starting together
/// agree on the count.
pub(super) async fn ensure_partitions(
    db: &impl ConnectionTrait,
    wanted: Option<u32>,
    now: i64,
) -> Result<u32, EngineError> {
    let failed = EngineError::db("reading the partition count");
    if let Some(row) = cluster::Entity::find_by_id(1)
        .one(db)
        .await
        .map_err(failed)?
    {
        let recorded = u32::try_from(row.partitions).map_err(|_| EngineError::Corrupt {
            saga_id: String::new(),
            detail: format!("cluster_settings.partitions is {}", row.partitions),
        })?;
        if let Some(wanted) = wanted
            && wanted != recorded
        {
            return Err(EngineError::PartitionCountFixed { recorded, wanted });
        }
        return Ok(recorded);
    }
    let partitions = wanted.unwrap_or(DEFAULT_PARTITIONS);
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(EngineError::InvalidPartitionCount(partitions));
    }
    let failed = EngineError::db("recording the partition count");
    cluster::Entity::insert(cluster::ActiveModel {
        id: Set(1),
        partitions: Set(partitions as i32),
        created_at: Set(now),
    })
    .exec(db)
    .await
    .map_err(failed)?;
    let leases = (0..partitions).map(|p| lease::ActiveModel {
        partition_id: Set(p as i32),
        owner: Set(None),
        epoch: Set(0),
        expires_at: Set(0),
        acquired_at: Set(None),
        renewed_at: Set(None),
    });
    lease::Entity::insert_many(leases)
        .on_conflict(
            OnConflict::column(lease::Column::PartitionId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map_err(EngineError::db("creating the partition leases"))?;
    assign_existing_sagas(db, partitions).await?;
    Ok(partitions)
}

/// Gives every saga that predates partitions (all in partition 0) its partition: one update
/// per partition and chunk of ids, not one per saga.
async fn assign_existing_sagas(
    db: &impl ConnectionTrait,
    partitions: u32,
) -> Result<(), EngineError> {
    let ids: Vec<String> = saga::Entity::find()
        .select_only()
        .column(saga::Column::Id)
        .into_tuple()
        .all(db)
        .await
        .map_err(EngineError::db("reading the sagas to partition"))?;
    let mut by_partition: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for id in ids {
        if let Ok(uuid) = Uuid::parse_str(&id) {
            by_partition
                .entry(partition_of(uuid, partitions))
                .or_default()
                .push(id);
        }
    }
    by_partition.remove(&0);
    for (partition, ids) in by_partition {
        for chunk in ids.chunks(INSERT_CHUNK) {
            saga::Entity::update_many()
                .col_expr(
                    saga::Column::PartitionId,
                    sea_orm::sea_query::Expr::value(partition as i32),
                )
                .filter(saga::Column::Id.is_in(chunk.iter().cloned()))
                .exec(db)
                .await
                .map_err(EngineError::db("giving sagas their partition"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_spread_evenly_over_the_partitions() {
        let mut counts = [0u32; 16];
        for _ in 0..16_000 {
            counts[partition_of(Uuid::now_v7(), 16) as usize] += 1;
        }
        for (partition, count) in counts.iter().enumerate() {
            assert!(
                (800..1_200).contains(count),
                "partition {partition} got {count} of 16,000 ids: {counts:?}"
            );
        }
    }

    #[test]
    fn the_partition_depends_only_on_the_id_and_the_count() {
        let id = Uuid::parse_str("0192f0c4-5b7e-7d2a-9c1e-00000000002b").expect("a uuid");
        assert_eq!(partition_of(id, 16), 0x2b % 16);
        assert_eq!(partition_of(id, 1), 0);
    }
}
