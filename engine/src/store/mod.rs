//! The durable store: saga definitions, instances, attempts and history in SQLite or
//! PostgreSQL, through sea-orm.
//!
//! Every transition is written with its history rows in one transaction, and the saga row is
//! updated only if its `row_version` is still the one the writer read: a stale writer is told
//! so ([`WriteOutcome::Stale`]) and must re-read. Timers are the `wake_at` column, not sleeps,
//! so a restarted engine finds every retry and timeout where it left them.

mod attempt_status;
mod batch;
mod codecs;
mod commit;
mod connection;
mod definitions;
mod entities;
mod history_row;
mod leases;
mod outbox_cleanup;
mod partitions;
mod reads;

use sagaflow_protocol::{SagaSpec, StepCommand, Timestamp};
use sea_orm::{DatabaseConnection, DbBackend};
use uuid::Uuid;

pub use attempt_status::AttemptStatus;
pub use commit::Fence;
pub use entities::{attempt, cluster, definition, history, lease, node, outbox, saga};
pub(crate) use history_row::HistoryColumns;
pub use history_row::{Elapsed, HistoryEntry, OfSaga};
pub use leases::{ClusterRows, LEASE_CHANNEL, LeaseRow, NodeInfo, NodeRow};
pub use partitions::{DEFAULT_PARTITIONS, MAX_PARTITIONS, partition_of};

use crate::machine::{Record, SagaState, SagaStatus};

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

/// How many sagas are in one status, and when the one waiting longest last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSummary {
    /// The status.
    pub status: SagaStatus,
    /// How many sagas are in it.
    pub count: i64,
    /// The earliest last change among them (for stuck sagas: since when the longest-stuck
    /// one has waited).
    pub oldest_change: Option<Timestamp>,
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
    /// The writer does not hold the saga's partition under the epoch it wrote with (its lease
    /// lapsed or was taken over): nothing of this write was kept, and the node must stop
    /// driving the partition until it acquires it again.
    Fenced,
    /// A new saga was not created because another saga has its start key: another node
    /// started it at the same moment. Nothing of this write was kept; the key's saga is the
    /// one to answer with ([`Store::find_start_keys`]).
    StartKeyTaken,
}

/// The database, opened and migrated.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// Where batches of transitions are committed: on PostgreSQL, connections of their own
    /// that plan only index lookups (see
    /// [`BATCH_WRITER_SETTINGS`](connection::BATCH_WRITER_SETTINGS)); on SQLite, `db`.
    writer: DatabaseConnection,
    /// How many partitions the database spreads sagas over (fixed at its creation).
    partitions: u32,
    /// The database file, on SQLite.
    sqlite_file: Option<String>,
    /// The URL it was opened with, for a PostgreSQL listener (never logged: it may hold a
    /// password).
    url: String,
    /// On SQLite, held by each batch commit: the driver may have two batches committing at
    /// once, and SQLite takes one writer at a time (a deferred transaction that loses the race
    /// to upgrade its read snapshot fails at once instead of waiting its busy timeout).
    sqlite_commits: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// How to open a [`Store`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The partition count for a database that has none yet (a new one): `None` for
    /// [`DEFAULT_PARTITIONS`]. A database that has one refuses another.
    pub partitions: Option<u32>,
}

impl Store {
    /// The connection, for components that keep their own tables in the same database.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// How many partitions the database spreads sagas over.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of saga `id` in this database.
    pub fn partition_of(&self, id: Uuid) -> u32 {
        partition_of(id, self.partitions)
    }

    /// Whether this is SQLite (one writer at a time) or PostgreSQL.
    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }
}
