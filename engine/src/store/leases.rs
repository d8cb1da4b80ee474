//! The lease table's operations: heartbeats of the nodes, acquiring, renewing, releasing and
//! re-fencing partitions (docs/architecture.md §3.1).
//!
//! Every statement measures time by the database's clock, never a node's, and is conditional:
//! an acquisition succeeds only on a partition that is free or whose lease lapsed, a renewal
//! only on a lease the node still holds under the epoch it names. So two nodes can never both
//! believe, correctly, that they hold one partition.

use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};
use serde_json::json;

use super::Store;
use super::batch::DATABASE_NOW_MS;
use crate::EngineError;

/// The database's clock in milliseconds since the epoch, as SQL for `backend`.
fn now_ms(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => DATABASE_NOW_MS,
        _ => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    }
}

/// A lease's next epoch, as SQL for `backend`: one more than its current one, or the
/// database's clock in milliseconds if that is greater. The clock makes epochs grow across
/// databases too: a node of an engine database that was recreated (epochs starting afresh)
/// must still outrank every epoch the workers and resources saw from the old one, or they
/// would refuse all its commands as superseded (docs/protocol.md §9.1).
fn next_epoch(backend: DbBackend) -> String {
    let now = now_ms(backend);
    match backend {
        DbBackend::Postgres => format!("GREATEST(epoch + 1, {now})"),
        _ => format!("MAX(epoch + 1, {now})"),
    }
}

/// Placeholder `n` (1-based) for `backend`: numbered on both, so a statement may name its
/// parameters in any order.
fn param(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => format!("?{n}"),
    }
}

/// `partition_id` among the JSON array of partitions in parameter `n`.
fn partition_in(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!(
            "partition_id IN (SELECT CAST(value AS integer) FROM json_array_elements_text(CAST(${n} AS json)))"
        ),
        _ => format!("partition_id IN (SELECT value FROM json_each(?{n}))"),
    }
}

/// `(partition_id, epoch)` among the JSON array of `{partition_id, epoch}` in parameter `n`.
fn lease_in(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!(
            "(partition_id, epoch) IN (SELECT h.partition_id, h.epoch FROM \
             json_to_recordset(CAST(${n} AS json)) AS h(partition_id integer, epoch bigint))"
        ),
        _ => format!(
            "(partition_id, epoch) IN (SELECT json_extract(value, '$.partition_id'), \
             json_extract(value, '$.epoch') FROM json_each(?{n}))"
        ),
    }
}

/// On PostgreSQL, a condition that first locks the lease rows meeting `condition` in partition
/// order: a batch commit share-locks its partitions' rows in that order too
/// (`batch::held_partitions_sql`), so a renewal or release updating several rows while batches
/// commit waits for them instead of deadlocking with one (each holding a row the other wants
/// next, as two scans in different orders did). SQLite has no row locks: nothing to add.
fn locked_in_order(backend: DbBackend, condition: &str) -> String {
    match backend {
        DbBackend::Postgres => format!(
            " AND partition_id IN (SELECT partition_id FROM partition_leases WHERE {condition} \
             ORDER BY partition_id FOR UPDATE)"
        ),
        _ => String::new(),
    }
}

fn leases_json(leases: &[(u32, u64)]) -> Value {
    let rows: Vec<serde_json::Value> = leases
        .iter()
        .map(|(partition, epoch)| json!({ "partition_id": partition, "epoch": epoch }))
        .collect();
    Value::from(serde_json::Value::Array(rows).to_string())
}

/// One engine node, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Unique per process run.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
}

/// One partition's lease as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    /// The partition.
    pub partition: u32,
    /// Its owner, if any.
    pub owner: Option<String>,
    /// Its current epoch.
    pub epoch: u64,
    /// Until when (the database's clock, ms since the epoch).
    pub expires_at: i64,
    /// Whether the lease is still valid now, by the database's clock.
    pub live: bool,
    /// When its owner last renewed it.
    pub renewed_at: Option<i64>,
}

/// One node as the others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// The node id.
    pub id: String,
    /// Its host.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it started.
    pub started_at: i64,
    /// Its last heartbeat.
    pub last_seen: i64,
    /// Live until then.
    pub expires_at: i64,
    /// It is handing its partitions over.
    pub stopping: bool,
    /// Whether it is live now, by the database's clock.
    pub live: bool,
}

/// The cluster at one instant of the database's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRows {
    /// The database's clock when it was read.
    pub now: i64,
    /// Every node row (live or not).
    pub nodes: Vec<NodeRow>,
    /// Every partition's lease, in partition order.
    pub leases: Vec<LeaseRow>,
}

fn db_error(doing: &'static str) -> impl FnOnce(sea_orm::DbErr) -> EngineError {
    EngineError::db(doing)
}

fn read_u32(row: &sea_orm::QueryResult, column: &str) -> Result<u32, EngineError> {
    let value: i64 = match row.try_get::<i64>("", column) {
        Ok(v) => v,
        Err(_) => i64::from(
            row.try_get::<i32>("", column)
                .map_err(db_error("reading a lease row"))?,
        ),
    };
    u32::try_from(value).map_err(|_| EngineError::Corrupt {
        saga_id: String::new(),
        detail: format!("{column} is {value}"),
    })
}

fn read_leases(rows: Vec<sea_orm::QueryResult>) -> Result<Vec<(u32, u64)>, EngineError> {
    let mut leases = rows
        .iter()
        .map(|row| {
            let partition = read_u32(row, "partition_id")?;
            let epoch: i64 = row
                .try_get("", "epoch")
                .map_err(db_error("reading a lease row"))?;
            Ok((partition, epoch.max(0) as u64))
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    leases.sort_unstable();
    Ok(leases)
}

/// A `partition_leases` row, live or not at `clock` (the database's, ms since the epoch).
fn lease_row(row: &sea_orm::QueryResult, clock: i64) -> Result<LeaseRow, EngineError> {
    let read = || db_error("reading a lease row");
    let expires_at: i64 = row.try_get("", "expires_at").map_err(read())?;
    let epoch: i64 = row.try_get("", "epoch").map_err(read())?;
    Ok(LeaseRow {
        partition: read_u32(row, "partition_id")?,
        owner: row.try_get("", "owner").map_err(read())?,
        epoch: epoch.max(0) as u64,
        expires_at,
        live: expires_at > clock,
        renewed_at: row.try_get("", "renewed_at").map_err(read())?,
    })
}

impl Store {
    /// The lease of `partition` as the database has it now (`None` before any node took it).
    pub async fn partition_lease(&self, partition: u32) -> Result<Option<LeaseRow>, EngineError> {
        let backend = self.backend();
        let now = now_ms(backend);
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "SELECT partition_id, owner, epoch, expires_at, renewed_at, {now} AS now \
                     FROM partition_leases WHERE partition_id = {}",
                    param(backend, 1)
                ),
                [Value::from(i64::from(partition))],
            ))
            .await
            .map_err(db_error("reading a partition's lease"))?;
        let Some(row) = row else { return Ok(None) };
        let clock: i64 = row
            .try_get("", "now")
            .map_err(db_error("reading the database's clock"))?;
        lease_row(&row, clock).map(Some)
    }

    /// Registers `node` or renews its heartbeat: live for `lease_ms` more of the database's
    /// clock. Returns that clock's reading.
    pub async fn heartbeat(&self, node: &NodeInfo, lease_ms: i64) -> Result<i64, EngineError> {
        let backend = self.backend();
        let now = now_ms(backend);
        let p = |n| param(backend, n);
        let sql = format!(
            "INSERT INTO engine_nodes (id, host, pid, started_at, last_seen, expires_at, stopping) \
             VALUES ({}, {}, {}, {now}, {now}, {now} + {}, false) \
             ON CONFLICT (id) DO UPDATE SET last_seen = {now}, expires_at = {now} + {} \
             RETURNING last_seen",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
        );
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [
                    Value::from(node.id.clone()),
                    Value::from(node.host.clone()),
                    Value::from(i64::from(node.pid)),
                    Value::from(lease_ms),
                    Value::from(lease_ms),
                ],
            ))
            .await
            .map_err(db_error("renewing the node's heartbeat"))?;
        row.and_then(|row| row.try_get::<i64>("", "last_seen").ok())
            .ok_or_else(|| EngineError::Corrupt {
                saga_id: String::new(),
                detail: "the heartbeat returned no time".into(),
            })
    }

    /// Every node and lease, with whether each is live by the database's clock.
    pub async fn cluster(&self) -> Result<ClusterRows, EngineError> {
        let backend = self.backend();
        let now = now_ms(backend);
        let clock = self
            .db
            .query_one_raw(Statement::from_string(
                backend,
                format!("SELECT {now} AS now"),
            ))
            .await
            .map_err(db_error("reading the database's clock"))?
            .and_then(|row| row.try_get::<i64>("", "now").ok())
            .unwrap_or_default();
        let nodes = self
            .db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT id, host, pid, started_at, last_seen, expires_at, stopping \
                 FROM engine_nodes ORDER BY id",
            ))
            .await
            .map_err(db_error("reading the engine nodes"))?
            .iter()
            .map(|row| {
                let read = db_error("reading a node row");
                let expires_at: i64 = row.try_get("", "expires_at").map_err(read)?;
                Ok(NodeRow {
                    id: row
                        .try_get("", "id")
                        .map_err(db_error("reading a node row"))?,
                    host: row
                        .try_get("", "host")
                        .map_err(db_error("reading a node row"))?,
                    pid: read_u32(row, "pid")?,
                    started_at: row
                        .try_get("", "started_at")
                        .map_err(db_error("reading a node row"))?,
                    last_seen: row
                        .try_get("", "last_seen")
                        .map_err(db_error("reading a node row"))?,
                    expires_at,
                    stopping: row
                        .try_get("", "stopping")
                        .map_err(db_error("reading a node row"))?,
                    live: expires_at > clock,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let leases = self
            .db
            .query_all_raw(Statement::from_string(
                backend,
                "SELECT partition_id, owner, epoch, expires_at, renewed_at \
                 FROM partition_leases ORDER BY partition_id",
            ))
            .await
            .map_err(db_error("reading the partition leases"))?
            .iter()
            .map(|row| lease_row(row, clock))
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(ClusterRows {
            now: clock,
            nodes,
            leases,
        })
    }

    /// Takes those of `partitions` that are free or whose lease lapsed, each under a new epoch
    /// (one more than the last, or the database clock in ms if that is greater), for
    /// `lease_ms`. Returns what was taken, with the epochs.
    pub async fn acquire_partitions(
        &self,
        node: &str,
        partitions: &[u32],
        lease_ms: i64,
    ) -> Result<Vec<(u32, u64)>, EngineError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let backend = self.backend();
        let now = now_ms(backend);
        let sql = format!(
            "UPDATE partition_leases SET owner = {node_p}, epoch = {next}, \
             expires_at = {now} + {lease_p}, acquired_at = {now}, renewed_at = {now} \
             WHERE {within} AND (owner IS NULL OR expires_at <= {now}){in_order} \
             RETURNING partition_id, epoch",
            node_p = param(backend, 1),
            lease_p = param(backend, 2),
            within = partition_in(backend, 3),
            next = next_epoch(backend),
            in_order = locked_in_order(
                backend,
                &format!(
                    "{} AND (owner IS NULL OR expires_at <= {now})",
                    partition_in(backend, 3)
                )
            ),
        );
        let list = serde_json::Value::from(partitions.to_vec()).to_string();
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [
                    Value::from(node.to_string()),
                    Value::from(lease_ms),
                    Value::from(list),
                ],
            ))
            .await
            .map_err(db_error("acquiring partition leases"))?;
        read_leases(rows)
    }

    /// Extends, for `lease_ms` from now, the leases of `held` that `node` still holds under the
    /// epochs named and that have not lapsed. Returns those; a lease missing from the answer is
    /// lost, and the node must stop writing its partition.
    pub async fn renew_partitions(
        &self,
        node: &str,
        held: &[(u32, u64)],
        lease_ms: i64,
    ) -> Result<Vec<(u32, u64)>, EngineError> {
        self.update_held(
            node,
            held,
            lease_ms,
            "expires_at = {now} + {lease}, renewed_at = {now}",
            "renewing partition leases",
        )
        .await
    }

    /// Gives each lease of `held` that `node` still holds a new epoch, greater than its
    /// current one, and renews it: after a commit whose outcome is unknown, what the node wrote
    /// under the old epoch can no longer race anything it writes under the new one.
    pub async fn refence_partitions(
        &self,
        node: &str,
        held: &[(u32, u64)],
        lease_ms: i64,
    ) -> Result<Vec<(u32, u64)>, EngineError> {
        self.update_held(
            node,
            held,
            lease_ms,
            // A new epoch is taken now: readers match an epoch with when it was taken.
            "epoch = {next}, expires_at = {now} + {lease}, acquired_at = {now}, renewed_at = {now}",
            "taking new epochs for partitions",
        )
        .await
    }

    async fn update_held(
        &self,
        node: &str,
        held: &[(u32, u64)],
        lease_ms: i64,
        set: &str,
        doing: &'static str,
    ) -> Result<Vec<(u32, u64)>, EngineError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let backend = self.backend();
        let now = now_ms(backend);
        let set = set
            .replace("{next}", &next_epoch(backend))
            .replace("{now}", now)
            .replace("{lease}", &param(backend, 2));
        let sql = format!(
            "UPDATE partition_leases SET {set} \
             WHERE owner = {node_p} AND expires_at > {now} AND {held_in}{in_order} \
             RETURNING partition_id, epoch",
            node_p = param(backend, 1),
            held_in = lease_in(backend, 3),
            in_order = locked_in_order(backend, &lease_in(backend, 3)),
        );
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [
                    Value::from(node.to_string()),
                    Value::from(lease_ms),
                    leases_json(held),
                ],
            ))
            .await
            .map_err(db_error(doing))?;
        read_leases(rows)
    }

    /// Gives up the leases of `held` that `node` still holds, at once, so another node can
    /// take them without waiting for them to lapse; on PostgreSQL the other nodes are told
    /// (`NOTIFY sagaflow_leases`).
    pub async fn release_partitions(
        &self,
        node: &str,
        held: &[(u32, u64)],
    ) -> Result<(), EngineError> {
        if held.is_empty() {
            return Ok(());
        }
        let backend = self.backend();
        let sql = format!(
            "UPDATE partition_leases SET owner = NULL, expires_at = 0 \
             WHERE owner = {} AND {}{}",
            param(backend, 1),
            lease_in(backend, 2),
            locked_in_order(backend, &lease_in(backend, 2)),
        );
        self.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [Value::from(node.to_string()), leases_json(held)],
            ))
            .await
            .map_err(db_error("releasing partition leases"))?;
        self.notify_lease_change(node).await
    }

    /// Marks `node` as stopping: it takes no more partitions, and the others count it out of
    /// their shares at once.
    pub async fn mark_stopping(&self, node: &str) -> Result<(), EngineError> {
        let backend = self.backend();
        let sql = format!(
            "UPDATE engine_nodes SET stopping = true WHERE id = {}",
            param(backend, 1)
        );
        self.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [Value::from(node.to_string())],
            ))
            .await
            .map_err(db_error("marking the node as stopping"))?;
        self.notify_lease_change(node).await
    }

    /// Removes `node`'s row (a node that stopped) and the rows of nodes whose heartbeat lapsed
    /// more than `forget_after_ms` ago.
    pub async fn forget_node(&self, node: &str, forget_after_ms: i64) -> Result<(), EngineError> {
        let backend = self.backend();
        let sql = format!(
            "DELETE FROM engine_nodes WHERE id = {} OR expires_at < {} - {}",
            param(backend, 1),
            now_ms(backend),
            param(backend, 2),
        );
        self.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [Value::from(node.to_string()), Value::from(forget_after_ms)],
            ))
            .await
            .map_err(db_error("removing a stopped node"))?;
        Ok(())
    }

    async fn notify_lease_change(&self, node: &str) -> Result<(), EngineError> {
        if self.backend() != DbBackend::Postgres {
            return Ok(());
        }
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!("SELECT pg_notify('{LEASE_CHANNEL}', $1)"),
                [Value::from(node.to_string())],
            ))
            .await
            .map_err(db_error("telling the other nodes of a lease change"))?;
        Ok(())
    }
}

impl Store {
    /// On SQLite, locks the database file for this engine (a lock file beside it, held until
    /// the returned file is dropped, released by the system if the process dies): a second
    /// engine on the same file is refused instead of racing the first. `None` on PostgreSQL,
    /// where several engines share the database by their leases.
    pub fn lock_for_one_engine(&self) -> Result<Option<std::fs::File>, EngineError> {
        let Some(path) = &self.sqlite_file else {
            return Ok(None);
        };
        let lock_path = format!("{path}.engine-lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| EngineError::EngineLock {
                path: lock_path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(EngineError::AnotherEngine { path: path.clone() })
            }
            Err(std::fs::TryLockError::Error(source)) => Err(EngineError::EngineLock {
                path: lock_path,
                source,
            }),
        }
    }

    /// On PostgreSQL, a listener on [`LEASE_CHANNEL`]: it hears at once when another node
    /// releases partitions or stops. `None` on SQLite, which has one node.
    pub async fn lease_changes(
        &self,
    ) -> Result<Option<sea_orm::sqlx::postgres::PgListener>, EngineError> {
        if self.backend() != DbBackend::Postgres {
            return Ok(None);
        }
        let failed = |source: sea_orm::sqlx::Error| EngineError::Database {
            doing: "listening for lease changes",
            source: sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(source.into())),
        };
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect(&self.url)
            .await
            .map_err(failed)?;
        listener.listen(LEASE_CHANNEL).await.map_err(failed)?;
        Ok(Some(listener))
    }

    /// Frees every partition lease: only for an engine that knows it is the only one (it holds
    /// [`Store::lock_for_one_engine`]'s lock), so leases left by an earlier run are its own.
    pub async fn clear_leases(&self) -> Result<(), EngineError> {
        self.db
            .execute_unprepared("UPDATE partition_leases SET owner = NULL, expires_at = 0")
            .await
            .map_err(db_error("freeing the leases of an earlier run"))?;
        Ok(())
    }
}

/// The PostgreSQL notification channel on which nodes announce released partitions and
/// stopping nodes, so the others rebalance at once instead of at their next renewal.
pub const LEASE_CHANNEL: &str = "sagaflow_leases";
