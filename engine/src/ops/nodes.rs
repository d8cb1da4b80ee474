//! `sagaflow nodes`: the engine nodes sharing the database, the partitions each holds, under
//! which epoch, until when, and the partitions nobody holds.

use sagaflow_protocol::Timestamp;
use serde::Serialize;

use crate::EngineError;
use crate::store::Store;

/// The cluster as the database sees it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodesView {
    /// The database's clock when read.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub now: Timestamp,
    /// How many partitions the database has.
    pub partitions: u32,
    /// Every registered node, live or not, by id.
    pub nodes: Vec<NodeView>,
    /// Partitions no live lease holds: nobody drives their sagas until a node takes them.
    pub unowned: Vec<u32>,
}

/// One engine node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// Its id (host, process id and a random suffix).
    pub id: String,
    /// Its host.
    pub host: String,
    /// Its process id there.
    pub pid: u32,
    /// `live`, `stopping` (handing its partitions over) or `gone` (its heartbeat lapsed).
    pub state: NodeState,
    /// When it started.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub started_at: Timestamp,
    /// Its last heartbeat.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub last_seen: Timestamp,
    /// The partitions whose live lease it holds.
    pub leases: Vec<LeaseView>,
}

/// How a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum NodeState {
    /// Heartbeating and taking its share.
    Live,
    /// Handing its partitions over.
    Stopping,
    /// Its heartbeat lapsed: dead, paused or cut off.
    Gone,
}

/// One lease a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseView {
    /// The partition.
    pub partition: u32,
    /// The fencing epoch it holds it under.
    pub epoch: u64,
    /// Until when, unless renewed.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub expires_at: Timestamp,
    /// When it was last renewed.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub renewed_at: Option<Timestamp>,
}

/// Reads the nodes and leases.
pub async fn nodes(store: &Store) -> Result<NodesView, EngineError> {
    let cluster = store.cluster().await?;
    let nodes = cluster
        .nodes
        .iter()
        .map(|node| NodeView {
            id: node.id.clone(),
            host: node.host.clone(),
            pid: node.pid,
            state: match (node.live, node.stopping) {
                (false, _) => NodeState::Gone,
                (true, true) => NodeState::Stopping,
                (true, false) => NodeState::Live,
            },
            started_at: Timestamp(node.started_at),
            last_seen: Timestamp(node.last_seen),
            leases: cluster
                .leases
                .iter()
                .filter(|l| l.live && l.owner.as_deref() == Some(node.id.as_str()))
                .map(|l| LeaseView {
                    partition: l.partition,
                    epoch: l.epoch,
                    expires_at: Timestamp(l.expires_at),
                    renewed_at: l.renewed_at.map(Timestamp),
                })
                .collect(),
        })
        .collect();
    let unowned = cluster
        .leases
        .iter()
        .filter(|l| !l.live || l.owner.is_none())
        .map(|l| l.partition)
        .collect();
    Ok(NodesView {
        now: Timestamp(cluster.now),
        partitions: store.partitions(),
        nodes,
        unowned,
    })
}
