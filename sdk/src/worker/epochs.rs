//! The highest fencing epoch the worker has seen per partition (`docs/protocol.md` section 9.1):
//! what lets it refuse a command from an engine node whose ownership of a saga's partition was
//! superseded, before the handler runs.
//!
//! Kept in the idempotency store's database (`worker_epochs`), beside the results, so that a
//! restarted worker, and every worker process sharing the database, refuses what one of them
//! already knows to be stale. The database is written only when a partition's epoch grows (a
//! new owner), and read only then and the first time a partition is seen; every other command
//! is checked against memory.

use std::collections::HashMap;
use std::sync::Mutex;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};

/// The table, as either backend creates it.
pub(super) const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS worker_epochs (\
     partition_id BIGINT NOT NULL PRIMARY KEY, epoch BIGINT NOT NULL)";

/// What a command's epoch is, against the highest seen for its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochCheck {
    /// The highest seen (or higher, and now the highest): serve the command.
    Current,
    /// Lower than one already seen: the sender no longer owns the partition.
    Stale {
        /// The highest epoch seen for the partition.
        highest: u64,
    },
}

/// The highest epoch per partition, in memory and in `worker_epochs`.
#[derive(Debug, Default)]
pub(super) struct Epochs {
    highest: Mutex<HashMap<u32, u64>>,
}

impl Epochs {
    fn known(&self, partition: u32) -> Option<u64> {
        // A poisoned lock only means another thread panicked mid-insert of a plain integer.
        let highest = self.highest.lock().unwrap_or_else(|e| e.into_inner());
        highest.get(&partition).copied()
    }

    /// Checks `epoch` for `partition`, raising the recorded highest when it is higher.
    pub(super) async fn check(
        &self,
        db: &DatabaseConnection,
        partition: u32,
        epoch: u64,
    ) -> Result<EpochCheck, String> {
        match self.known(partition) {
            Some(highest) if epoch < highest => return Ok(EpochCheck::Stale { highest }),
            Some(highest) if epoch == highest => return Ok(EpochCheck::Current),
            _ => {}
        }
        let highest = raise(db, partition, epoch).await?;
        {
            let mut known = self.highest.lock().unwrap_or_else(|e| e.into_inner());
            let entry = known.entry(partition).or_insert(highest);
            *entry = (*entry).max(highest);
        }
        Ok(if epoch < highest {
            EpochCheck::Stale { highest }
        } else {
            EpochCheck::Current
        })
    }
}

/// Records `epoch` for `partition` unless a higher one is there, and returns the highest.
async fn raise(db: &DatabaseConnection, partition: u32, epoch: u64) -> Result<u64, String> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "INSERT INTO worker_epochs (partition_id, epoch) VALUES ($1, $2) \
             ON CONFLICT (partition_id) DO UPDATE \
             SET epoch = GREATEST(worker_epochs.epoch, excluded.epoch) RETURNING epoch"
        }
        _ => {
            "INSERT INTO worker_epochs (partition_id, epoch) VALUES (?1, ?2) \
             ON CONFLICT (partition_id) DO UPDATE \
             SET epoch = MAX(worker_epochs.epoch, excluded.epoch) RETURNING epoch"
        }
    };
    // Epochs are at most the database clock in ms plus one per change of owner: far below
    // i64::MAX.
    let stored = i64::try_from(epoch).unwrap_or(i64::MAX);
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [Value::from(i64::from(partition)), Value::from(stored)],
        ))
        .await
        .map_err(|e| format!("cannot record the epoch of partition {partition}: {e}"))?
        .ok_or_else(|| format!("recording the epoch of partition {partition} returned nothing"))?;
    let highest: i64 = row
        .try_get("", "epoch")
        .map_err(|e| format!("cannot read the epoch of partition {partition}: {e}"))?;
    Ok(highest.max(0) as u64)
}
