//! Which partitions one node should acquire or release, given what it sees of the cluster.
//!
//! Each node decides alone, from one reading of the database, and nodes read at different
//! instants. The rules are chosen so that this still settles:
//!
//! - every node computes the same shares, because they depend only on the sorted ids of the live
//!   nodes and the partition count;
//! - a node acquires only while it is below its share and releases only while it is above it, so
//!   once every node holds its share no plan has anything in it (no churn);
//! - a partition is taken only when nobody can still be writing to it: it has no owner or its
//!   lease lapsed by the database's clock. A live node's own opinion of who is alive does not
//!   matter, since a lease that has not lapsed may still back a commit.

/// What one node sees of the cluster at one instant (all read from the database).
#[derive(Debug, Clone, Copy)]
pub struct ClusterView<'a> {
    /// This node's id.
    pub me: &'a str,
    /// Ids of the live nodes that take partitions (not stopping), including `me` unless `me` is
    /// stopping. Any order; a repeated id counts once.
    pub live: &'a [String],
    /// One entry per partition `0..count`, in partition order.
    pub leases: &'a [LeaseState],
}

/// One partition's lease, as read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    /// The partition.
    pub partition: u32,
    /// The node named on the lease, if any; it may have lapsed.
    pub owner: Option<String>,
    /// The lease is still valid by the database's clock.
    pub live: bool,
}

impl LeaseState {
    /// Nobody can be writing to the partition under this lease any more, so it may be taken.
    ///
    /// Whether the owner is among the live nodes does not enter into it: a node that stopped
    /// heartbeating may still commit until its lease runs out.
    fn is_free(&self) -> bool {
        self.owner.is_none() || !self.live
    }

    fn is_held_by(&self, node: &str) -> bool {
        self.live && self.owner.as_deref() == Some(node)
    }
}

/// What one node should do now. At most one of the two lists is non-empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions to try to acquire, in the order to try them. Each was free in the view; the
    /// acquisition must still be conditional, since another node may take it first.
    pub acquire: Vec<u32>,
    /// Partitions whose lease to give up, ascending. Each was held by this node in the view.
    pub release: Vec<u32>,
}

impl Plan {
    /// Nothing to acquire and nothing to release.
    pub fn is_empty(&self) -> bool {
        self.acquire.is_empty() && self.release.is_empty()
    }
}

/// How many of `partitions` the node at `rank` (0-based, among `nodes` live nodes sorted by id)
/// should hold: `partitions / nodes`, plus one for the first `partitions % nodes` ranks.
///
/// The shares of ranks `0..nodes` add up to `partitions`. With no nodes, or a rank beyond them,
/// the share is 0.
pub fn fair_share(partitions: usize, nodes: usize, rank: usize) -> usize {
    if rank >= nodes {
        return 0;
    }
    partitions / nodes + usize::from(rank < partitions % nodes)
}

/// Decides which partitions the node `view.me` should acquire and release.
///
/// - Its share is [`fair_share`] of its rank among the live nodes sorted by id; a node not among
///   them (stopping, or not registered yet) has a share of 0.
/// - It holds a partition when the lease names it and is live; a lapsed lease of its own is free,
///   like any other.
/// - Below its share, it acquires free partitions up to the share: first those whose lease last
///   named it (it is likely to still have their sagas cached), then the others, ascending.
/// - Above its share, it releases the excess, highest-numbered first. Another live node is then
///   always below its share (the shares add up to the partition count), so what is released
///   is wanted.
///
/// ```
/// use sagaflow_engine::cluster::{ClusterView, LeaseState, plan};
///
/// let leases: Vec<LeaseState> = (0..4)
///     .map(|partition| LeaseState { partition, owner: Some("a".into()), live: true })
///     .collect();
/// let live = ["a".to_string(), "b".to_string()];
///
/// // "b" joined: "a" gives up half, "b" waits for them to be free.
/// assert_eq!(plan(&ClusterView { me: "a", live: &live, leases: &leases }).release, [2, 3]);
/// assert!(plan(&ClusterView { me: "b", live: &live, leases: &leases }).is_empty());
/// ```
pub fn plan(view: &ClusterView<'_>) -> Plan {
    let mut held: Vec<u32> = view
        .leases
        .iter()
        .filter(|lease| lease.is_held_by(view.me))
        .map(|lease| lease.partition)
        .collect();
    held.sort_unstable();

    let Some(share) = share_of(view) else {
        return Plan {
            acquire: Vec::new(),
            release: held,
        };
    };

    if held.len() > share {
        return Plan {
            acquire: Vec::new(),
            release: held.split_off(share),
        };
    }

    // `false` sorts first: partitions last leased to this node come before the others.
    let mut free: Vec<(bool, u32)> = view
        .leases
        .iter()
        .filter(|lease| lease.is_free())
        .map(|lease| (lease.owner.as_deref() != Some(view.me), lease.partition))
        .collect();
    free.sort_unstable();
    Plan {
        acquire: free
            .into_iter()
            .take(share - held.len())
            .map(|(_, partition)| partition)
            .collect(),
        release: Vec::new(),
    }
}

/// `view.me`'s share, or `None` when it is not a live node.
fn share_of(view: &ClusterView<'_>) -> Option<usize> {
    let mut live: Vec<&str> = view.live.iter().map(String::as_str).collect();
    live.sort_unstable();
    // A duplicated id would shift every later rank and make the shares add up to less than
    // the partition count, leaving partitions nobody wants.
    live.dedup();
    let rank = live.binary_search(&view.me).ok()?;
    Some(fair_share(view.leases.len(), live.len(), rank))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_string()).collect()
    }

    fn free(count: u32) -> Vec<LeaseState> {
        (0..count)
            .map(|partition| LeaseState {
                partition,
                owner: None,
                live: false,
            })
            .collect()
    }

    fn set(leases: &mut [LeaseState], partitions: &[u32], owner: &str, live: bool) {
        for &partition in partitions {
            leases[partition as usize] = LeaseState {
                partition,
                owner: Some(owner.to_string()),
                live,
            };
        }
    }

    fn plan_of(me: &str, live: &[String], leases: &[LeaseState]) -> Plan {
        plan(&ClusterView { me, live, leases })
    }

    fn acquiring(partitions: &[u32]) -> Plan {
        Plan {
            acquire: partitions.to_vec(),
            release: Vec::new(),
        }
    }

    fn releasing(partitions: &[u32]) -> Plan {
        Plan {
            acquire: Vec::new(),
            release: partitions.to_vec(),
        }
    }

    #[test]
    fn a_lone_node_takes_every_partition() {
        let live = ids(&["a"]);
        assert_eq!(plan_of("a", &live, &free(4)), acquiring(&[0, 1, 2, 3]));

        let mut leases = free(4);
        set(&mut leases, &[0, 1, 2, 3], "a", true);
        assert!(plan_of("a", &live, &leases).is_empty());
    }

    #[test]
    fn a_joining_node_gets_half_once_the_first_releases_it() {
        let live = ids(&["a", "b"]);
        let mut leases = free(4);
        set(&mut leases, &[0, 1, 2, 3], "a", true);

        assert_eq!(plan_of("a", &live, &leases), releasing(&[2, 3]));
        assert!(
            plan_of("b", &live, &leases).is_empty(),
            "nothing is free yet"
        );

        for lease in &mut leases[2..] {
            lease.owner = None;
        }
        assert!(plan_of("a", &live, &leases).is_empty());
        assert_eq!(plan_of("b", &live, &leases), acquiring(&[2, 3]));

        set(&mut leases, &[2, 3], "b", true);
        assert!(plan_of("a", &live, &leases).is_empty());
        assert!(plan_of("b", &live, &leases).is_empty());
    }

    #[test]
    fn the_expired_partitions_of_a_dead_node_are_taken() {
        let live = ids(&["a"]);
        let mut leases = free(4);
        set(&mut leases, &[0, 1], "a", true);
        set(&mut leases, &[2, 3], "dead", false);
        assert_eq!(plan_of("a", &live, &leases), acquiring(&[2, 3]));
    }

    #[test]
    fn a_live_lease_of_an_unknown_owner_is_not_taken() {
        let live = ids(&["a"]);
        let mut leases = free(4);
        set(&mut leases, &[1], "gone", true);
        assert_eq!(plan_of("a", &live, &leases), acquiring(&[0, 2, 3]));

        set(&mut leases, &[1], "gone", false);
        assert_eq!(plan_of("a", &live, &leases), acquiring(&[0, 1, 2, 3]));
    }

    #[test]
    fn a_stopping_node_releases_all_it_holds_and_takes_nothing() {
        let live = ids(&["b"]);
        let mut leases = free(4);
        set(&mut leases, &[0, 3], "a", true);
        set(&mut leases, &[1], "a", false);
        assert_eq!(plan_of("a", &live, &leases), releasing(&[0, 3]));

        set(&mut leases, &[0, 3], "a", false);
        assert!(plan_of("a", &live, &leases).is_empty());
    }

    #[test]
    fn an_unregistered_node_takes_nothing() {
        assert!(plan_of("new", &ids(&["a"]), &free(4)).is_empty());
        assert!(plan_of("new", &[], &free(4)).is_empty());
    }

    #[test]
    fn shares_follow_the_order_of_the_ids() {
        let live = ids(&["node-c", "node-a", "node-b"]);
        let leases = free(16);
        assert_eq!(plan_of("node-a", &live, &leases).acquire.len(), 6);
        assert_eq!(plan_of("node-b", &live, &leases).acquire.len(), 5);
        assert_eq!(plan_of("node-c", &live, &leases).acquire.len(), 5);

        // By string order, not by number: "n10" ranks before "n9".
        let live = ids(&["n9", "n10"]);
        assert_eq!(plan_of("n10", &live, &free(3)).acquire.len(), 2);
        assert_eq!(plan_of("n9", &live, &free(3)).acquire.len(), 1);

        let repeated = ids(&["node-a", "node-a", "node-b"]);
        assert_eq!(plan_of("node-b", &repeated, &free(4)).acquire.len(), 2);
    }

    #[test]
    fn fair_shares_add_up_to_the_partition_count() {
        assert_eq!(
            (0..3)
                .map(|rank| fair_share(16, 3, rank))
                .collect::<Vec<_>>(),
            [6, 5, 5]
        );
        for partitions in 0..50 {
            for nodes in 1..8 {
                let total: usize = (0..nodes)
                    .map(|rank| fair_share(partitions, nodes, rank))
                    .sum();
                assert_eq!(total, partitions);
            }
        }
        assert_eq!(fair_share(16, 0, 0), 0);
        assert_eq!(fair_share(16, 3, 3), 0);
    }

    #[test]
    fn partitions_last_leased_to_me_come_first() {
        let live = ids(&["a", "b"]);
        let mut leases = free(6);
        set(&mut leases, &[4], "a", false);
        set(&mut leases, &[1], "b", false);
        set(&mut leases, &[5], "a", true);
        assert_eq!(plan_of("a", &live, &leases), acquiring(&[4, 0]));
    }

    #[test]
    fn the_excess_released_is_the_highest_numbered() {
        let live = ids(&["a", "b", "c"]);
        let mut leases = free(9);
        set(&mut leases, &[0, 2, 4, 6, 8], "a", true);
        assert_eq!(plan_of("a", &live, &leases), releasing(&[6, 8]));
    }

    #[test]
    fn a_node_at_its_share_takes_no_more() {
        let live = ids(&["a", "b"]);
        let mut leases = free(4);
        set(&mut leases, &[0, 1], "a", true);
        assert!(plan_of("a", &live, &leases).is_empty());
        assert_eq!(plan_of("b", &live, &leases), acquiring(&[2, 3]));
    }

    /// xorshift64*: enough randomness for the simulation, and the same run for the same seed.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            // xorshift never leaves the all-zero state.
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn percent(&mut self, chance: u64) -> bool {
            self.next() % 100 < chance
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }

    /// How long a lease lasts after an acquisition or a renewal, in rounds. A node that steps
    /// every round keeps its leases; one that misses a round or two may lose them.
    const TTL: u64 = 3;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Status {
        Active,
        Stopping,
        /// Not stepping: paused (it may resume with what it believed it held) or gone for good.
        Down,
    }

    #[derive(Debug)]
    struct Node {
        id: String,
        status: Status,
        /// What the node believes it holds: partition -> (epoch, expiry), as the database
        /// answered its last successful acquisition or renewal.
        leases: BTreeMap<u32, (u64, u64)>,
    }

    /// One lease row: the database's side.
    #[derive(Debug, Clone, Copy)]
    struct Row {
        owner: Option<usize>,
        epoch: u64,
        expires_at: u64,
    }

    struct Sim {
        rng: Rng,
        now: u64,
        nodes: Vec<Node>,
        rows: Vec<Row>,
    }

    impl Sim {
        fn new(seed: u64) -> Self {
            let mut rng = Rng::new(seed);
            let partitions = 1 + rng.below(40);
            let mut sim = Sim {
                rng,
                now: 10,
                nodes: Vec::new(),
                rows: Vec::new(),
            };
            for _ in 0..1 + sim.rng.below(6) {
                sim.add_node(Status::Active);
            }
            // Owners that already left, some of whose leases have not lapsed yet.
            for _ in 0..sim.rng.below(3) {
                sim.add_node(Status::Down);
            }
            for _ in 0..partitions {
                let row = if sim.rng.percent(25) {
                    Row {
                        owner: None,
                        epoch: sim.rng.below(5) as u64,
                        expires_at: 0,
                    }
                } else {
                    Row {
                        owner: Some(sim.rng.below(sim.nodes.len())),
                        epoch: 1 + sim.rng.below(5) as u64,
                        expires_at: sim.now - 2 + sim.rng.below(TTL as usize + 2) as u64,
                    }
                };
                sim.rows.push(row);
            }
            for (partition, row) in sim.rows.iter().enumerate() {
                if let Some(owner) = row.owner
                    && row.expires_at > sim.now
                {
                    sim.nodes[owner]
                        .leases
                        .insert(partition as u32, (row.epoch, row.expires_at));
                }
            }
            sim
        }

        /// Ids are random so that the rank of a node has nothing to do with when it joined.
        fn add_node(&mut self, status: Status) {
            let id = loop {
                let id = format!("node-{:x}", self.rng.next() % 0x1000);
                if self.nodes.iter().all(|node| node.id != id) {
                    break id;
                }
            };
            self.nodes.push(Node {
                id,
                status,
                leases: BTreeMap::new(),
            });
        }

        fn active(&self) -> Vec<usize> {
            (0..self.nodes.len())
                .filter(|&n| self.nodes[n].status == Status::Active)
                .collect()
        }

        fn live_ids(&self) -> Vec<String> {
            self.active()
                .into_iter()
                .map(|n| self.nodes[n].id.clone())
                .collect()
        }

        fn leases(&self) -> Vec<LeaseState> {
            self.rows
                .iter()
                .enumerate()
                .map(|(partition, row)| LeaseState {
                    partition: partition as u32,
                    owner: row.owner.map(|n| self.nodes[n].id.clone()),
                    live: row.expires_at > self.now,
                })
                .collect()
        }

        fn share(&self, node: usize) -> usize {
            if self.nodes[node].status != Status::Active {
                return 0;
            }
            let mut live = self.live_ids();
            live.sort();
            let rank = live
                .iter()
                .position(|id| *id == self.nodes[node].id)
                .unwrap();
            fair_share(self.rows.len(), live.len(), rank)
        }

        /// The node's plan from the database as it is now, checked against what it was given.
        fn plan_for(&self, node: usize) -> Plan {
            let live = self.live_ids();
            let leases = self.leases();
            let me = &self.nodes[node].id;
            let plan = plan(&ClusterView {
                me,
                live: &live,
                leases: &leases,
            });
            let held: Vec<u32> = leases
                .iter()
                .filter(|lease| lease.live && lease.owner.as_ref() == Some(me))
                .map(|lease| lease.partition)
                .collect();
            let believed: Vec<u32> = self.nodes[node]
                .leases
                .iter()
                .filter(|(_, (_, expires_at))| *expires_at > self.now)
                .map(|(partition, _)| *partition)
                .collect();
            assert_eq!(held, believed, "the model lost track of {me}'s leases");
            let share = self.share(node);
            assert!(plan.acquire.is_empty() || plan.release.is_empty());
            assert!(plan.acquire.len() <= share.saturating_sub(held.len()));
            for &partition in &plan.acquire {
                let lease = &leases[partition as usize];
                assert!(
                    lease.owner.is_none() || !lease.live,
                    "{me} wants {partition}, which is not free: {lease:?}"
                );
            }
            for &partition in &plan.release {
                assert!(held.contains(&partition), "{me} releases {partition}");
            }
            let mut wanted = plan.acquire.clone();
            wanted.extend(&plan.release);
            wanted.sort_unstable();
            wanted.dedup();
            assert_eq!(wanted.len(), plan.acquire.len() + plan.release.len());
            if share > held.len() {
                assert!(plan.release.is_empty());
            } else {
                assert_eq!(plan.release.len(), held.len() - share);
            }
            plan
        }

        /// Carries out a plan the way the lease statements do: each change is conditional on
        /// the row as it is now, not as it was when the plan was made.
        fn apply(&mut self, node: usize, plan: &Plan) {
            let now = self.now;
            let believed: Vec<(u32, (u64, u64))> = self.nodes[node]
                .leases
                .iter()
                .map(|(partition, lease)| (*partition, *lease))
                .collect();
            for (partition, (epoch, _)) in believed {
                let row = &mut self.rows[partition as usize];
                let still_mine =
                    row.owner == Some(node) && row.epoch == epoch && row.expires_at > now;
                if still_mine && plan.release.contains(&partition) {
                    // Either way the lapsed lease frees it; keeping the owner tells the node
                    // it may get it back first.
                    if self.rng.percent(50) {
                        row.owner = None;
                    }
                    row.expires_at = now;
                    self.nodes[node].leases.remove(&partition);
                } else if still_mine {
                    row.expires_at = now + TTL;
                    self.nodes[node]
                        .leases
                        .insert(partition, (epoch, now + TTL));
                } else {
                    self.nodes[node].leases.remove(&partition);
                }
            }
            for &partition in &plan.acquire {
                let row = &mut self.rows[partition as usize];
                if row.owner.is_none() || row.expires_at <= now {
                    row.owner = Some(node);
                    row.epoch += 1;
                    row.expires_at = now + TTL;
                    self.nodes[node]
                        .leases
                        .insert(partition, (row.epoch, row.expires_at));
                }
            }
        }

        /// At most one node may believe it holds a partition, and only under the lease the
        /// database has: otherwise two nodes could both commit to its sagas.
        fn check_exclusive(&self) {
            for (partition, row) in self.rows.iter().enumerate() {
                let believers: Vec<usize> = (0..self.nodes.len())
                    .filter(|&n| {
                        self.nodes[n]
                            .leases
                            .get(&(partition as u32))
                            .is_some_and(|(_, expires_at)| *expires_at > self.now)
                    })
                    .collect();
                assert!(
                    believers.len() <= 1,
                    "partition {partition} held by {believers:?}"
                );
                if let Some(&node) = believers.first() {
                    assert_eq!(row.owner, Some(node));
                    assert_eq!(
                        Some(row.epoch),
                        self.nodes[node]
                            .leases
                            .get(&(partition as u32))
                            .map(|(epoch, _)| *epoch)
                    );
                }
            }
        }

        /// One round: the nodes that step do so in a random order, either all from one reading
        /// (as when their timers fire together) or each from a fresh one.
        fn round(&mut self, skip_percent: u64) -> Vec<Plan> {
            self.now += 1;
            let mut stepping: Vec<usize> = (0..self.nodes.len())
                .filter(|&n| self.nodes[n].status != Status::Down)
                .filter(|_| !self.rng.percent(skip_percent))
                .collect();
            self.rng.shuffle(&mut stepping);
            let one_reading = self.rng.percent(50);
            let plans: Vec<Plan> = if one_reading {
                stepping.iter().map(|&n| self.plan_for(n)).collect()
            } else {
                Vec::new()
            };
            let mut made = Vec::new();
            for (i, &node) in stepping.iter().enumerate() {
                let plan = if one_reading {
                    plans[i].clone()
                } else {
                    self.plan_for(node)
                };
                self.apply(node, &plan);
                self.check_exclusive();
                made.push(plan);
            }
            made
        }

        fn churn(&mut self) {
            if !self.rng.percent(20) {
                return;
            }
            let n = self.rng.below(self.nodes.len());
            match (self.rng.below(4), self.nodes[n].status) {
                (0, _) if self.active().len() < 6 => self.add_node(Status::Active),
                (1, Status::Active) => self.nodes[n].status = Status::Stopping,
                (2, Status::Active | Status::Stopping) => self.nodes[n].status = Status::Down,
                (3, Status::Down) if self.active().len() < 6 => {
                    self.nodes[n].status = Status::Active;
                }
                _ => {}
            }
        }

        fn settled(&self) -> bool {
            let live = self.active();
            self.rows.iter().all(|row| {
                row.owner.is_some_and(|n| live.contains(&n)) && row.expires_at > self.now + 1
            }) && live.iter().all(|&n| {
                let held = self.rows.iter().filter(|row| row.owner == Some(n)).count();
                held == self.share(n)
            })
        }
    }

    #[test]
    fn random_clusters_settle_on_fair_shares_without_sharing_a_partition() {
        let mut slowest = 0;
        for seed in 0..2000 {
            let mut sim = Sim::new(seed);
            sim.check_exclusive();
            for _ in 0..sim.rng.below(40) {
                sim.churn();
                sim.round(15);
            }
            if sim.active().is_empty() {
                sim.add_node(Status::Active);
            }

            // From here on, every node that is not down steps every round. Dead owners' leases
            // lapse within TTL rounds, the excess is released in one, and each later round
            // acquires at least one partition until every share is filled.
            let bound = TTL as usize + sim.rows.len() + 2;
            let mut rounds = 0;
            while !sim.settled() {
                rounds += 1;
                assert!(
                    rounds <= bound,
                    "seed {seed}: not settled after {bound} rounds: {:?}, nodes {:?}",
                    sim.rows,
                    sim.nodes
                );
                sim.round(0);
            }
            slowest = slowest.max(rounds);
            for _ in 0..5 {
                let plans = sim.round(0);
                assert!(
                    plans.iter().all(Plan::is_empty),
                    "seed {seed}: churn after settling: {plans:?}"
                );
                assert!(sim.settled());
            }
        }
        assert!(slowest > 0, "some runs start unsettled");
    }
}
