//! Three engine nodes (`sagaflow serve --node-name e0|e1|e2`) on one PostgreSQL database and one
//! test-owned nats-server (or three-server JetStream cluster), two demo workers, 600
//! `place_order` sagas per test, and one kind of fault: a node SIGKILLed and restarted, a node
//! SIGSTOPped past its lease, a rolling restart, the server leading the command stream killed.
//!
//! Besides every check of the single-node fault tests (`Cluster::verify`), each run checks what
//! several writers could break: no saga has two history records with one sequence number, every
//! record names the node and epoch that wrote it, and no record was written under an epoch that
//! had been superseded when it was written. The lease table is sampled every 20 ms during the
//! run (`LeaseLog`): each partition's epochs, who took each and when (by the database's clock),
//! which is what a record's epoch is checked against.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::task::JoinHandle;

use super::harness::*;

/// Sagas per multi-node test.
const MULTI_ORDERS: usize = 600;
/// The defaults of `sagaflow serve`.
const DEFAULT_LEASE: (&str, &str) = ("5s", "1s");
/// A short lease, for the test that pauses a node many times.
const SHORT_LEASE: (&str, &str) = ("1s", "250ms");

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64
}

/// One epoch of one partition, as sampled from `partition_leases`.
#[derive(Debug, Clone)]
struct Tenure {
    owner: String,
    /// When the owner took it, by the database's clock (ms since the epoch).
    acquired_at: i64,
}

/// Every epoch of every partition seen during a run, and the current owners.
#[derive(Debug, Default)]
struct LeaseHistory {
    tenures: BTreeMap<(u32, u64), Tenure>,
    /// Partition → (live owner or `None`, epoch) at the last sample.
    current: BTreeMap<u32, (Option<String>, u64)>,
}

/// Samples `partition_leases` every 20 ms until dropped.
struct LeaseLog {
    seen: Arc<Mutex<LeaseHistory>>,
    task: JoinHandle<()>,
}

impl LeaseLog {
    fn start(cluster: &Cluster) -> LeaseLog {
        let seen = Arc::new(Mutex::new(LeaseHistory::default()));
        let db = cluster.store.connection().clone();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let sample = rows(
                    &db,
                    "SELECT partition_id, owner, epoch, acquired_at, \
                     expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint AS live \
                     FROM partition_leases",
                )
                .await;
                {
                    let mut seen = sink.lock().expect("the lease log");
                    for row in sample {
                        let partition: i32 = row.try_get("", "partition_id").expect("partition");
                        let owner: Option<String> = row.try_get("", "owner").expect("owner");
                        let epoch: i64 = row.try_get("", "epoch").expect("epoch");
                        let acquired_at: Option<i64> =
                            row.try_get("", "acquired_at").expect("acquired_at");
                        let live: bool = row.try_get("", "live").expect("live");
                        let (partition, epoch) = (partition as u32, epoch as u64);
                        if let (Some(owner), Some(acquired_at)) = (&owner, acquired_at) {
                            seen.tenures
                                .entry((partition, epoch))
                                .or_insert_with(|| Tenure {
                                    owner: owner.clone(),
                                    acquired_at,
                                });
                        }
                        seen.current
                            .insert(partition, (owner.filter(|_| live), epoch));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        LeaseLog { seen, task }
    }

    /// The partitions node `prefix` (`e1`) holds now, with their epochs.
    fn held_by(&self, prefix: &str) -> BTreeMap<u32, u64> {
        let seen = self.seen.lock().expect("the lease log");
        seen.current
            .iter()
            .filter(|(_, (owner, _))| owner.as_deref().is_some_and(|o| node_of(o) == prefix))
            .map(|(p, (_, e))| (*p, *e))
            .collect()
    }

    /// Whether every one of `partitions` is held, live, by a node other than `prefix`.
    fn all_taken_from(&self, prefix: &str, partitions: &BTreeMap<u32, u64>) -> bool {
        let seen = self.seen.lock().expect("the lease log");
        partitions.keys().all(|p| {
            seen.current
                .get(p)
                .and_then(|(owner, _)| owner.as_deref())
                .is_some_and(|o| node_of(o) != prefix)
        })
    }

    /// When each of `partitions` was taken under an epoch above the one given, by the database's
    /// clock, if it was.
    fn taken_over_at(&self, partitions: &BTreeMap<u32, u64>) -> BTreeMap<u32, i64> {
        let seen = self.seen.lock().expect("the lease log");
        partitions
            .iter()
            .filter_map(|(p, e)| {
                seen.tenures
                    .range((*p, e + 1)..=(*p, u64::MAX))
                    .next()
                    .map(|(_, t)| (*p, t.acquired_at))
            })
            .collect()
    }

    /// Waits (up to 20 s) until node `prefix` holds a partition; panics with `what` if not.
    async fn wait_for_share(&self, prefix: &str, what: &str) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while self.held_by(prefix).is_empty() {
            assert!(
                Instant::now() < give_up,
                "{what}: {prefix} holds no partition"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn history(&self) -> LeaseHistory {
        let seen = self.seen.lock().expect("the lease log");
        LeaseHistory {
            tenures: seen.tenures.clone(),
            current: seen.current.clone(),
        }
    }
}

impl Drop for LeaseLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `e1` of a node id `e1-PID-RANDOM`.
fn node_of(id: &str) -> &str {
    id.split('-').next().unwrap_or(id)
}

/// The checks a run with several writers adds; returns each node's share of the records.
async fn verify_single_writer(cluster: &Cluster, leases: &LeaseLog) -> BTreeMap<String, f64> {
    let db = cluster.store.connection();
    let doubled = count(
        db,
        "SELECT COUNT(*) FROM (SELECT saga_id, seq FROM saga_history \
         GROUP BY saga_id, seq HAVING COUNT(*) > 1) AS twice",
    )
    .await;
    assert_eq!(doubled, 0, "two history records with one sequence number");
    let unsigned = count(
        db,
        "SELECT COUNT(*) FROM saga_history WHERE node IS NULL OR epoch IS NULL",
    )
    .await;
    assert_eq!(unsigned, 0, "history records that name no node or epoch");

    let history = leases.history();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut superseded = Vec::new();
    let mut total = 0usize;
    for row in rows(
        db,
        "SELECT h.saga_id, h.seq, h.at, h.node, h.epoch, s.partition_id \
         FROM saga_history h JOIN sagas s ON s.id = h.saga_id",
    )
    .await
    {
        let node: String = row.try_get("", "node").expect("node");
        let epoch: i64 = row.try_get("", "epoch").expect("epoch");
        let at: i64 = row.try_get("", "at").expect("at");
        let partition: i32 = row.try_get("", "partition_id").expect("partition");
        let (partition, epoch) = (partition as u32, epoch as u64);
        total += 1;
        *per_node.entry(node_of(&node).to_string()).or_default() += 1;
        // The record's time is taken before its batch commits: a record stamped after a later
        // epoch of its partition was taken was certainly committed after it.
        if let Some(((_, later), tenure)) = history
            .tenures
            .range((partition, epoch + 1)..=(partition, u64::MAX))
            .next()
            && tenure.acquired_at < at
        {
            let saga: String = row.try_get("", "saga_id").expect("saga");
            let seq: i64 = row.try_get("", "seq").expect("seq");
            superseded.push(format!(
                "saga {saga} #{seq} by {node} under epoch {epoch} of partition {partition} at {at}, \
                 but epoch {later} was taken by {} at {}",
                tenure.owner, tenure.acquired_at
            ));
        }
    }
    assert!(
        superseded.is_empty(),
        "{} records written under a superseded epoch, e.g. {:?}",
        superseded.len(),
        &superseded[..superseded.len().min(5)]
    );
    per_node
        .into_iter()
        .map(|(node, n)| (node, n as f64 / total.max(1) as f64))
        .collect()
}

/// The p-th percentile (0..=100) of `values`, sorted in place.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// The partitions that have a saga still running (or compensating) now.
/// The lease takeovers the engine nodes running now, but for `except`, have counted.
fn takeovers_counted(cluster: &Cluster, except: usize) -> f64 {
    (0..cluster.engines.len())
        .filter(|e| *e != except && cluster.engines[*e].is_some())
        .map(|e| {
            cluster
                .scrape_node(e)
                .sum("sagaflow_lease_takeovers_total", &[])
        })
        .sum()
}

async fn partitions_with_active_sagas(cluster: &Cluster) -> std::collections::BTreeSet<u32> {
    rows(
        cluster.store.connection(),
        "SELECT DISTINCT partition_id FROM sagas WHERE status IN ('created', 'running', 'compensating')",
    )
    .await
    .iter()
    .map(|row| row.try_get::<i32>("", "partition_id").expect("partition") as u32)
    .collect()
}

/// The first write (history record) in each of `partitions` by a node other than `prefix`, at
/// or after `since` (ms since the epoch).
async fn first_writes_after(
    cluster: &Cluster,
    prefix: &str,
    partitions: &BTreeMap<u32, u64>,
    since: i64,
) -> BTreeMap<u32, i64> {
    let list = partitions
        .keys()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if list.is_empty() {
        return BTreeMap::new();
    }
    rows(
        cluster.store.connection(),
        &format!(
            "SELECT s.partition_id, MIN(h.at) AS first FROM saga_history h \
             JOIN sagas s ON s.id = h.saga_id \
             WHERE s.partition_id IN ({list}) AND h.at >= {since} AND h.node NOT LIKE '{prefix}-%' \
             GROUP BY s.partition_id"
        ),
    )
    .await
    .iter()
    .map(|row| {
        let p: i32 = row.try_get("", "partition_id").expect("partition");
        let first: i64 = row.try_get("", "first").expect("first");
        (p as u32, first)
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_the_sagas_evenly() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::with_engines("balance", 3, DEFAULT_LEASE, 2, 10).await;
    let leases = LeaseLog::start(&cluster);
    let starts = cluster.spawn_starts(cluster.orders(MULTI_ORDERS, 11), Duration::from_secs(15));
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
    let shares = verify_single_writer(&cluster, &leases).await;
    println!("balance: share of the history records written by each node: {shares:?}");
    assert_eq!(shares.len(), 3, "balance: not every node wrote: {shares:?}");
    for (node, share) in &shares {
        assert!(
            (0.25..=5.0 / 12.0).contains(share),
            "balance: node {node} wrote {:.1}% of the records (between 25% and 41.7% expected): \
             {shares:?}",
            share * 100.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sigkilled_repeatedly_is_taken_over_within_a_lease() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::with_engines("node_kill", 3, DEFAULT_LEASE, 2, 10).await;
    let leases = LeaseLog::start(&cluster);
    let (seed, mut rng) = rng();
    println!("node_kill: kill timings from seed {seed}");
    let starts = cluster.spawn_starts(cluster.orders(MULTI_ORDERS, 12), Duration::from_secs(60));
    let mut takeovers_ms: Vec<f64> = Vec::new();
    let mut ownership_ms: Vec<f64> = Vec::new();
    for round in 0..5 {
        let victim = 1 + round % 2;
        let prefix = format!("e{victim}");
        // It has its share before it is killed.
        leases
            .wait_for_share(&prefix, "node_kill: before the kill")
            .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2_000))).await;
        let held = leases.held_by(&prefix);
        let busy = partitions_with_active_sagas(&cluster).await;
        let counted_before = takeovers_counted(&cluster, victim);
        let killed_at = now_ms();
        cluster.kill_node(victim);
        let give_up = Instant::now() + Duration::from_secs(20);
        while !leases.all_taken_from(&prefix, &held) {
            assert!(
                Instant::now() < give_up,
                "node_kill: the partitions of {prefix} were not taken over in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The survivors' `/metrics` count each of those takeovers, once.
        let give_up = Instant::now() + Duration::from_secs(2);
        loop {
            let counted = takeovers_counted(&cluster, victim) - counted_before;
            if counted == held.len() as f64 {
                break;
            }
            assert!(
                Instant::now() < give_up,
                "node_kill: the survivors counted {counted} lease takeovers; the database shows \
                 the {} partitions of {prefix} taken over",
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // New sagas start in the live nodes' partitions, so the work of the killed node's is
        // what it left active: the new owner's first write there is the takeover. A partition
        // with nothing active has nothing to write: its lease's taking is the takeover.
        let taken = leases.taken_over_at(&held);
        let give_up = Instant::now() + Duration::from_secs(15);
        let writes = loop {
            let writes = first_writes_after(&cluster, &prefix, &held, killed_at).await;
            if held
                .keys()
                .all(|p| !busy.contains(p) || writes.contains_key(p))
            {
                break writes;
            }
            assert!(
                Instant::now() < give_up,
                "node_kill: partitions of {prefix} with active sagas saw no write by a new owner \
                 within 15 s: {held:?}, active in {busy:?}, written {writes:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for partition in held.keys() {
            let owned = taken[partition] - killed_at;
            ownership_ms.push(owned as f64);
            let first = match writes.get(partition) {
                Some(at) if busy.contains(partition) => at - killed_at,
                _ => owned,
            };
            takeovers_ms.push(first.max(owned) as f64);
        }
        println!(
            "node_kill: {prefix} SIGKILLed holding {} partitions ({} with active sagas); owned by \
             others after {:?} ms, first write by the new owner after {:?} ms",
            held.len(),
            held.keys().filter(|p| busy.contains(p)).count(),
            held.keys()
                .map(|p| taken[p] - killed_at)
                .collect::<Vec<_>>(),
            held.keys()
                .map(|p| writes.get(p).map(|w| w - killed_at))
                .collect::<Vec<_>>()
        );
        cluster.start_node(victim);
        cluster.node_ready(victim).await;
    }
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
    verify_single_writer(&cluster, &leases).await;
    let p50 = percentile(&mut takeovers_ms, 50.0);
    let p99 = percentile(&mut takeovers_ms, 99.0);
    let owned_p99 = percentile(&mut ownership_ms, 99.0);
    println!(
        "node_kill: takeover (kill to the new owner's first write) over {} partitions: p50 {p50:.0} ms, \
         p99 {p99:.0} ms, max {:.0} ms; kill to ownership p99 {owned_p99:.0} ms",
        takeovers_ms.len(),
        takeovers_ms.last().copied().unwrap_or(0.0)
    );
    // The lease is what a kill costs: the new owner re-sends the attempts the dead node left in
    // flight as it takes their partition, so its first write follows within a round trip.
    assert!(
        p99 <= 6_000.0,
        "node_kill: takeover (kill to the new owner's first write) p99 {p99:.0} ms is over 6 s \
         with the default 5 s lease"
    );
    assert!(
        owned_p99 <= 6_000.0,
        "node_kill: kill-to-ownership p99 {owned_p99:.0} ms is over 6 s with the default 5 s lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_lease_writes_nothing_and_rejoins() {
    let _turn = SERIAL.lock().await;
    // The soak in BENCHMARKS.md runs this with SAGAFLOW_PAUSES=100: the load grows with it, so
    // sagas are in flight through every pause.
    let pauses: usize = std::env::var("SAGAFLOW_PAUSES")
        .ok()
        .map(|n| n.parse().expect("SAGAFLOW_PAUSES is a number of pauses"))
        .unwrap_or(20)
        .max(20);
    let mut cluster = Cluster::with_engines("node_pause", 3, SHORT_LEASE, 2, 10).await;
    let leases = LeaseLog::start(&cluster);
    let (seed, mut rng) = rng();
    println!("node_pause: {pauses} pauses, timings from seed {seed}");
    let orders = cluster.orders(MULTI_ORDERS * pauses / 20, 13);
    if pauses > 20 {
        cluster.restock((pauses / 20) as u32).await;
    }
    let starts = cluster.spawn_starts(orders, Duration::from_millis(3_500 * pauses as u64));
    // What the paused node held, and from when its lease had certainly lapsed.
    let mut lapses: Vec<(String, BTreeMap<u32, u64>, i64)> = Vec::new();
    for round in 0..pauses {
        let victim = 1 + round % 2;
        let prefix = format!("e{victim}");
        leases
            .wait_for_share(&prefix, "node_pause: after its pause, rejoining")
            .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
        let held = leases.held_by(&prefix);
        let paused_at = now_ms();
        cluster.node(victim).signal("STOP");
        // Its last renewal was before the pause, so its leases ran out a lease after it at
        // the latest.
        lapses.push((prefix.clone(), held, paused_at + 1_000));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1_500..2_500))).await;
        cluster.node(victim).signal("CONT");
    }
    for victim in ["e1", "e2"] {
        leases
            .wait_for_share(victim, "node_pause: after its last pause, rejoining")
            .await;
    }
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
    verify_single_writer(&cluster, &leases).await;
    // Nothing written by a paused node under the epochs it held when paused, once they lapsed.
    let mut late = 0;
    for (prefix, held, lapsed_at) in &lapses {
        for (partition, epoch) in held {
            late += count(
                cluster.store.connection(),
                &format!(
                    "SELECT COUNT(*) FROM saga_history h JOIN sagas s ON s.id = h.saga_id \
                     WHERE s.partition_id = {partition} AND h.node LIKE '{prefix}-%' \
                     AND h.epoch = {epoch} AND h.at > {lapsed_at}"
                ),
            )
            .await;
        }
    }
    // Every lease a paused node found lost on waking was taken over by another node, and
    // counted there.
    let scrapes: Vec<_> = (0..3).map(|e| cluster.scrape_node(e)).collect();
    let total = |name: &str| -> f64 { scrapes.iter().map(|s| s.sum(name, &[])).sum() };
    let (losses, takeovers) = (
        total("sagaflow_lease_losses_total"),
        total("sagaflow_lease_takeovers_total"),
    );
    let fenced: f64 = scrapes
        .iter()
        .map(|s| s.sum("sagaflow_stale_writes_total", &[("cause", "epoch")]))
        .sum();
    println!(
        "node_pause: {} pauses past the lease; {late} records written under a lapsed lease; \
         {takeovers} lease takeovers and {losses} leases found lost counted; {fenced} writes \
         fenced off by the paused nodes' lapsed leases",
        lapses.len()
    );
    assert!(
        losses > 0.0 && takeovers >= losses,
        "node_pause: {losses} leases found lost, {takeovers} taken over: each pause past the \
         lease must lose leases, and each one lost was taken over by another node"
    );
    assert_eq!(
        late, 0,
        "node_pause: a paused node wrote after its lease lapsed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_hands_every_partition_over_at_once() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::with_engines("rolling", 3, DEFAULT_LEASE, 2, 10).await;
    let leases = LeaseLog::start(&cluster);
    let starts = cluster.spawn_starts(cluster.orders(MULTI_ORDERS, 14), Duration::from_secs(40));
    let mut handovers_ms: Vec<f64> = Vec::new();
    for round in 0..6 {
        let node = round % 3;
        let prefix = format!("e{node}");
        leases
            .wait_for_share(&prefix, "rolling: before its restart")
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let held = leases.held_by(&prefix);
        let asked = now_ms();
        cluster.node(node).signal("TERM");
        let status = cluster.node(node).wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "rolling: {prefix} did not stop cleanly on SIGTERM: {status:?}"
        );
        cluster.engines[node] = None;
        let give_up = Instant::now() + Duration::from_secs(20);
        while !leases.all_taken_from(&prefix, &held) {
            assert!(
                Instant::now() < give_up,
                "rolling: the partitions of {prefix} were not taken over"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let taken = leases.taken_over_at(&held);
        let gaps: Vec<i64> = held.keys().map(|p| taken[p] - asked).collect();
        println!(
            "rolling: {prefix} got SIGTERM holding {} partitions; owned by others after {gaps:?} ms",
            held.len()
        );
        handovers_ms.extend(gaps.iter().map(|g| *g as f64));
        cluster.start_node(node);
        cluster.node_ready(node).await;
    }
    let started = starts.finish().await;
    let findings = settle_and_verify(&mut cluster, &started).await;
    verify_single_writer(&cluster, &leases).await;
    let p50 = percentile(&mut handovers_ms, 50.0);
    let p99 = percentile(&mut handovers_ms, 99.0);
    println!(
        "rolling: handover (SIGTERM to another node's lease) over {} partitions: p50 {p50:.0} ms, \
         p99 {p99:.0} ms; attempts timed out: {}",
        handovers_ms.len(),
        findings.timed_out
    );
    assert!(
        p99 <= 500.0,
        "rolling: handover p99 {p99:.0} ms is over 0.5 s"
    );
}

/// The records a worker's reply wrote (an attempt's success or failure) from `from` to `to`
/// (ms since the epoch), oldest first.
async fn reply_records_between(cluster: &Cluster, from: i64, to: i64) -> Vec<i64> {
    rows(
        cluster.store.connection(),
        &format!(
            "SELECT at FROM saga_history WHERE kind IN ('attempt_succeeded', 'attempt_failed') \
             AND at >= {from} AND at < {to} ORDER BY at"
        ),
    )
    .await
    .iter()
    .map(|row| row.try_get::<i64>("", "at").expect("at"))
    .collect()
}

/// The server that leads `stream` now, waiting (up to 20 s) for one other than `not`.
async fn stream_leader_other_than(
    cluster: &mut Cluster,
    stream: &str,
    not: Option<usize>,
) -> usize {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = tokio::task::block_in_place(|| cluster.nats.cluster().stream_leader(stream));
        if let Some(leader) = leader.filter(|l| Some(*l) != not) {
            return leader;
        }
        assert!(
            Instant::now() < give_up,
            "nats_leader: no server other than {not:?} leads {stream} within 20 s\n{}",
            cluster.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_nats_cluster_ride_out_the_command_stream_leader_killed_every_20_s() {
    use sagaflow_sdk::protocol::names::COMMAND_STREAM;
    const KILL_EVERY: Duration = Duration::from_secs(20);
    const KILLS: u32 = 4;
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::on_nats_cluster("nats_leader", 3, DEFAULT_LEASE, 2, 10).await;
    let leases = LeaseLog::start(&cluster);
    let run = KILL_EVERY * (KILLS + 1);
    let starts = cluster.spawn_starts(cluster.orders(MULTI_ORDERS, 15), run);
    let began = Instant::now();
    // (killed at, ms to a new leader, server killed)
    let mut kills: Vec<(i64, u128, usize)> = Vec::new();
    for round in 1..=KILLS {
        tokio::time::sleep_until((began + KILL_EVERY * round).into()).await;
        let leader = stream_leader_other_than(&mut cluster, COMMAND_STREAM, None).await;
        let killed = Instant::now();
        let killed_at = now_ms();
        tokio::task::block_in_place(|| cluster.nats.cluster().kill(leader));
        let successor = stream_leader_other_than(&mut cluster, COMMAND_STREAM, Some(leader)).await;
        let elected = killed.elapsed().as_millis();
        println!(
            "nats_leader: n{leader} (leading {COMMAND_STREAM}) SIGKILLed; n{successor} leads it \
             after {elected} ms"
        );
        kills.push((killed_at, elected, leader));
        // Down for a while, then back with its store: it catches up as a follower.
        tokio::time::sleep(Duration::from_secs(3)).await;
        tokio::task::block_in_place(|| cluster.nats.cluster().restart(leader));
    }
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
    let shares = verify_single_writer(&cluster, &leases).await;
    println!("nats_leader: share of the history records written by each node: {shares:?}");
    // How long no reply was applied after each kill: the wait for the first, and the longest
    // gap between two within the 20 s that followed. Sagas start throughout, so replies only
    // pause while the broker cannot take or deliver them.
    let window = i64::try_from(KILL_EVERY.as_millis()).expect("20 s in ms");
    for (killed_at, elected, server) in &kills {
        let replies = reply_records_between(&cluster, *killed_at, killed_at + window).await;
        let first = replies.first().map(|at| at - killed_at);
        let longest = std::iter::once(*killed_at)
            .chain(replies.iter().copied())
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(window);
        println!(
            "nats_leader: kill of n{server}: new leader after {elected} ms; first reply applied \
             after {first:?} ms; dispatch stalled at most {longest} ms; {} replies applied in \
             the next 20 s",
            replies.len()
        );
        assert!(
            !replies.is_empty(),
            "nats_leader: no reply was applied in the 20 s after the kill of n{server}"
        );
    }
}
