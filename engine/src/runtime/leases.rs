//! The lease keeper: registers this engine node, renews the leases of the partitions it holds,
//! takes its share of the partitions and gives back what is over it, and tells the driver, the
//! timer poller and the transport which partitions the node may drive (docs/architecture.md
//! §3.1).
//!
//! What the node may drive is an [`Ownership`]: the [`Fence`] it writes under and the instant
//! (by this process's monotonic clock) after which it must stop writing even if it heard
//! nothing, because its leases may have lapsed by then. That instant is the moment the last
//! successful renewal was *sent*, plus the lease, minus a margin: the database extended the
//! lease after receiving the request, so the node stops before the database's expiry whatever
//! the round trip took. A node that cannot renew (the database is unreachable, the process was
//! paused) therefore stops driving in time, and its writes after that are fenced off anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::EngineError;
use crate::cluster::plan::{ClusterView, LeaseState, plan};
use crate::metrics;
use crate::store::{ClusterRows, Fence, NodeInfo, Store};

/// How long leases last and how often they are renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lease lasts after each renewal, by the database's clock.
    pub lease: Duration,
    /// How often the node renews its leases and looks for partitions to take or give back.
    pub renew_every: Duration,
}

impl Default for LeaseSettings {
    /// 5 s leases renewed every second.
    fn default() -> Self {
        LeaseSettings {
            lease: Duration::from_secs(5),
            renew_every: Duration::from_secs(1),
        }
    }
}

impl LeaseSettings {
    /// Checks that a renewal comes well before a lease lapses.
    pub fn validated(self) -> Result<Self, EngineError> {
        if self.renew_every.is_zero() || self.lease < self.renew_every * 2 {
            return Err(EngineError::InvalidLeaseSettings {
                lease: self.lease,
                renew_every: self.renew_every,
            });
        }
        Ok(self)
    }

    /// How long before its lease could lapse a node stops writing: one renewal interval, which
    /// also covers the clocks' drift over a lease.
    fn margin(self) -> Duration {
        self.renew_every
    }

    fn lease_ms(self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

/// What this node may drive now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ownership {
    /// The node and the epoch of each partition it holds.
    pub fence: Fence,
    /// Until when (this process's monotonic clock) the node may write under `fence` without a
    /// renewal; `None` before the first.
    pub valid_until: Option<Instant>,
}

impl Ownership {
    /// Whether the node may write in `partition` now.
    pub fn holds(&self, partition: u32, now: Instant) -> bool {
        self.is_valid(now) && self.fence.epochs.contains_key(&partition)
    }

    /// Whether the leases may still be live: before `valid_until`.
    pub fn is_valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|until| now < until)
    }

    /// The partitions held, while valid.
    pub fn partitions(&self, now: Instant) -> Vec<u32> {
        if self.is_valid(now) {
            self.fence.epochs.keys().copied().collect()
        } else {
            Vec::new()
        }
    }
}

/// The running keeper's handles.
#[derive(Clone)]
pub(crate) struct LeaseHandle {
    /// What the node may drive; changes after every renewal that changes it.
    pub ownership: watch::Receiver<Ownership>,
    /// Wakes the keeper before its next renewal (a commit whose outcome is unknown).
    pub refence: Arc<Notify>,
}

pub(crate) struct LeaseKeeper {
    store: Store,
    node: NodeInfo,
    settings: LeaseSettings,
    ownership: watch::Sender<Ownership>,
    refence: Arc<Notify>,
    /// Epochs held after the last successful renewal.
    held: BTreeMap<u32, u64>,
    /// When the last successful renewal was sent.
    renewed_at: Option<Instant>,
    /// When the lease of a node that stopped renewing (it died, or is paused) runs out, if
    /// sooner than the next renewal: a round then takes its partitions without waiting for
    /// the tick.
    takeover_at: Option<Instant>,
}

impl LeaseKeeper {
    pub(crate) fn new(
        store: Store,
        node: NodeInfo,
        settings: LeaseSettings,
    ) -> (Self, LeaseHandle) {
        let (ownership, receiver) = watch::channel(Ownership {
            fence: Fence {
                node: node.id.clone(),
                epochs: BTreeMap::new(),
            },
            valid_until: None,
        });
        let refence = Arc::new(Notify::new());
        let takeover_at = None;
        (
            LeaseKeeper {
                store,
                node,
                settings,
                ownership,
                refence: refence.clone(),
                held: BTreeMap::new(),
                renewed_at: None,
                takeover_at,
            },
            LeaseHandle {
                ownership: receiver,
                refence,
            },
        )
    }

    /// One round: heartbeat, renew, take or give back, publish. `refence` gives every held
    /// partition a new epoch first.
    pub(crate) async fn round(&mut self, refence: bool) -> Result<(), EngineError> {
        let sent = Instant::now();
        let lease_ms = self.settings.lease_ms();
        let id = self.node.id.clone();
        self.store.heartbeat(&self.node, lease_ms).await?;
        let held: Vec<(u32, u64)> = self.held.iter().map(|(p, e)| (*p, *e)).collect();
        let kept = if refence {
            self.store.refence_partitions(&id, &held, lease_ms).await?
        } else {
            self.store.renew_partitions(&id, &held, lease_ms).await?
        };
        let kept: BTreeMap<u32, u64> = kept.into_iter().collect();
        ::metrics::histogram!(metrics::LEASE_RENEWAL_DURATION).record(sent.elapsed().as_secs_f64());
        ::metrics::counter!(metrics::LEASE_RENEWALS, "outcome" => "ok").increment(1);
        for partition in self.held.keys().filter(|p| !kept.contains_key(p)) {
            warn!(node = %id, partition, "partition lease lost; no longer driving it");
            ::metrics::counter!(metrics::LEASE_LOSSES).increment(1);
        }
        self.held = kept;
        self.renewed_at = Some(sent);
        self.publish();

        let cluster = self.store.cluster().await?;
        let live: Vec<String> = cluster
            .nodes
            .iter()
            .filter(|n| n.live && !n.stopping)
            .map(|n| n.id.clone())
            .collect();
        let leases: Vec<LeaseState> = cluster
            .leases
            .iter()
            .map(|l| LeaseState {
                partition: l.partition,
                owner: l.owner.clone(),
                live: l.live,
            })
            .collect();
        self.takeover_at = silent_lease_expiry(&cluster, &id, self.settings);
        let wanted = plan(&ClusterView {
            me: &id,
            live: &live,
            leases: &leases,
        });
        if !wanted.release.is_empty() {
            let release: Vec<(u32, u64)> = wanted
                .release
                .iter()
                .filter_map(|p| self.held.get(p).map(|e| (*p, *e)))
                .collect();
            // Stop driving them before giving them back, so nothing more is written under them.
            for (partition, _) in &release {
                self.held.remove(partition);
            }
            self.publish();
            self.store.release_partitions(&id, &release).await?;
            ::metrics::counter!(metrics::LEASE_HANDOVERS).increment(release.len() as u64);
            info!(node = %id, partitions = ?wanted.release, "partitions handed over");
        }
        if !wanted.acquire.is_empty() {
            // Valid as long as the renewal above, which was sent earlier: the conservative end.
            let taken = self
                .store
                .acquire_partitions(&id, &wanted.acquire, lease_ms)
                .await?;
            if !taken.is_empty() {
                // Taken from another node: its lease lapsed without being given back.
                let takeovers = taken
                    .iter()
                    .filter(|(partition, _)| {
                        cluster.leases.iter().any(|l| {
                            l.partition == *partition && l.owner.as_ref().is_some_and(|o| *o != id)
                        })
                    })
                    .count();
                ::metrics::counter!(metrics::LEASE_ACQUISITIONS).increment(taken.len() as u64);
                ::metrics::counter!(metrics::LEASE_TAKEOVERS).increment(takeovers as u64);
                info!(node = %id, partitions = ?taken, takeovers, "partitions acquired (partition, epoch)");
                self.held.extend(taken);
                self.publish();
            }
        }
        Ok(())
    }

    fn publish(&self) {
        let valid_until = self
            .renewed_at
            .map(|sent| sent + self.settings.lease.saturating_sub(self.settings.margin()));
        let next = Ownership {
            fence: Fence {
                node: self.node.id.clone(),
                epochs: self.held.clone(),
            },
            valid_until,
        };
        ::metrics::gauge!(metrics::PARTITIONS_OWNED).set(self.held.len() as f64);
        self.ownership.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }

    /// Renews until `stop` fires, then hands every partition over and leaves the cluster.
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.settings.renew_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refence = self.refence.clone();
        // Another node releasing partitions or stopping is heard at once on PostgreSQL, so its
        // partitions are taken now rather than at the next renewal.
        let mut listener = match self.store.lease_changes().await {
            Ok(listener) => listener,
            Err(error) => {
                warn!(%error, "cannot listen for lease changes; other nodes' handovers are seen at each renewal");
                None
            }
        };
        loop {
            let heard = async {
                match listener.as_mut() {
                    Some(listener) => listener.recv().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let takeover = async {
                match self.takeover_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let refencing = tokio::select! {
                _ = ticker.tick() => false,
                _ = takeover => false,
                _ = refence.notified() => true,
                _ = stop.changed() => break,
                ok = heard => {
                    if !ok {
                        // Reconnects by itself on the next recv; do not spin meanwhile.
                        tokio::time::sleep(self.settings.renew_every).await;
                    }
                    false
                }
            };
            if let Err(error) = self.round(refencing).await {
                ::metrics::counter!(metrics::LEASE_RENEWALS, "outcome" => "failed").increment(1);
                // The ownership published lapses by itself (`valid_until`) if this goes on.
                warn!(node = %self.node.id, %error, "cannot renew the partition leases; retrying");
            }
            if *stop.borrow() {
                break;
            }
        }
        self.hand_over().await;
    }

    /// Gives every partition back at once and removes the node, so the others take over now
    /// rather than after the leases lapse.
    pub(crate) async fn hand_over(&mut self) {
        let id = self.node.id.clone();
        let held: Vec<(u32, u64)> = self.held.iter().map(|(p, e)| (*p, *e)).collect();
        self.held.clear();
        self.publish();
        let result = async {
            self.store.mark_stopping(&id).await?;
            self.store.release_partitions(&id, &held).await?;
            self.store
                .forget_node(&id, self.settings.lease_ms() * 10)
                .await
        }
        .await;
        match result {
            Ok(()) => {
                ::metrics::counter!(metrics::LEASE_HANDOVERS).increment(held.len() as u64);
                info!(node = %id, partitions = held.len(), "partitions handed over; node stopped")
            }
            Err(error) => {
                warn!(node = %id, %error, "cannot hand the partitions over; the other nodes take them once the leases lapse")
            }
        }
    }
}

/// A node id unique per process run: the host, the process id and a random suffix.
pub fn new_node(host: &str) -> NodeInfo {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    NodeInfo {
        id: format!("{host}-{}-{}", std::process::id(), &suffix[..8]),
        host: host.to_string(),
        pid: std::process::id(),
    }
}

/// When the first live lease of another node that missed its last renewal runs out (a little
/// after, by this process's clock), if that comes before the next renewal tick would. Such a
/// node died or is paused: its partitions are free from that moment.
fn silent_lease_expiry(
    cluster: &ClusterRows,
    me: &str,
    settings: LeaseSettings,
) -> Option<Instant> {
    let renew_ms = i64::try_from(settings.renew_every.as_millis()).unwrap_or(i64::MAX);
    let silent: Vec<&str> = cluster
        .nodes
        .iter()
        .filter(|n| n.id != me && cluster.now - n.last_seen > renew_ms + renew_ms / 2)
        .map(|n| n.id.as_str())
        .collect();
    let expiry = cluster
        .leases
        .iter()
        .filter(|l| l.live && l.owner.as_deref().is_some_and(|o| silent.contains(&o)))
        .map(|l| l.expires_at)
        .min()?;
    let wait =
        Duration::from_millis(u64::try_from(expiry - cluster.now).unwrap_or(0)) + TAKEOVER_SLACK;
    (wait < settings.renew_every).then(|| Instant::now() + wait)
}

/// How long after a silent node's lease runs out (by the database's clock) the round that
/// takes it over runs: clocks of one machine, or of hosts kept in step, differ by less.
const TAKEOVER_SLACK: Duration = Duration::from_millis(20);

/// The partitions whose lease changed between `before` and `after`: gained, lost, or held
/// under a new epoch (what the node cached of them may be stale).
pub(crate) fn changed_partitions(before: &Fence, after: &Fence) -> BTreeSet<u32> {
    let moved = |from: &Fence, to: &Fence| {
        from.epochs
            .iter()
            .filter(|(p, e)| to.epochs.get(p) != Some(e))
            .map(|(p, _)| *p)
            .collect::<Vec<_>>()
    };
    moved(before, after)
        .into_iter()
        .chain(moved(after, before))
        .collect()
}
