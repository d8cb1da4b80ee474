//! Fault tests of the distributed mode: the engine (`sagaflow serve`), one or two demo workers
//! (`sagaflow-demo-worker`) and a private nats-server run as real processes, the engine on a
//! fresh PostgreSQL database and the workers (demo tables and `worker_results`) on another.
//! Each test starts 300 `place_order` sagas over NATS (15% declined cards; the workers inject
//! 5% transient failures and 2% lost replies) and injects one fault while they run: the engine
//! SIGKILLed and restarted, a worker SIGKILLed mid-step, nats-server restarted, commands and
//! replies delivered twice, late replies, the command stream purged, a graceful SIGTERM.
//!
//! Afterwards, every time: each saga completed, compensated, or is stuck with a reason; each
//! forward step succeeded at most once, with the very outcome the worker recorded for its
//! idempotency key; each compensation ran exactly once per step, in reverse order; the demo
//! services' invariants hold and no order has two reservations or authorizations; and the
//! engine and workers still serve new sagas.
//!
//! The tests take turns (they share two cores with PostgreSQL and the broker), and every child
//! process is killed when its guard drops, pass or fail.

mod harness;
mod multinode;
mod security;
mod traces;

use std::time::{Duration, Instant};

use rand::Rng;
use sagaflow_workflows::STEP_TIMEOUT;
use tokio::sync::watch;

use harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_sigkilled_repeatedly_loses_nothing() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::new("engine_kill", 1, 10).await;
    let (seed, mut rng) = rng();
    println!("engine_kill: kill timings from seed {seed}");
    // More orders than the other tests, so that the kills find more attempts in flight.
    let starts = cluster.spawn_starts(cluster.orders(450, 1), Duration::from_secs(18));
    for _ in 0..6 {
        cluster.engine_ready().await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1_200))).await;
        let in_flight = cluster.wait_in_flight(1).await;
        cluster.kill_engine();
        println!("engine_kill: SIGKILL with {in_flight} attempts in flight");
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..600))).await;
        cluster.start_engine();
    }
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkilled_mid_step_loses_nothing() {
    let _turn = SERIAL.lock().await;
    // A short ack wait: what a killed worker held is redelivered to the other one too.
    let mut cluster = Cluster::new("worker_kill", 2, 4).await;
    let (seed, mut rng) = rng();
    println!("worker_kill: kill timings from seed {seed}");
    let starts = cluster.spawn_starts(cluster.orders(ORDERS, 2), Duration::from_secs(15));
    for round in 0..4 {
        let i = round % 2;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1_500))).await;
        // Frozen first, so that the kill provably catches it holding work: an attempt left
        // unanswered for half a second was delivered to it (or waits on a row lock its open
        // transaction holds). Frozen then killed is, to everyone else, killed at the freeze.
        cluster.worker(i).signal("STOP");
        let held = cluster
            .wait_unanswered_for(Duration::from_millis(500))
            .await;
        cluster.kill_worker(i);
        println!("worker_kill: SIGKILL w{i} holding work ({held} attempts unanswered)");
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1_000))).await;
        cluster.start_worker(i);
        cluster.worker_ready(i).await;
    }
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
    // What the killed workers held was answered late: redelivered after the ack wait, or
    // re-dispatched after the attempt timed out.
    let slow = cluster.slow_attempts().await;
    println!("worker_kill: {slow} attempts answered after 3 s or more");
    assert!(slow > 0, "worker_kill: no kill caught an attempt in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_run_loses_nothing() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::new("nats_restart", 1, 10).await;
    let starts = cluster.spawn_starts(cluster.orders(ORDERS, 3), Duration::from_secs(15));
    // Once stopped (SIGTERM), once killed (SIGKILL); down for two seconds each time.
    for graceful in [true, false] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let in_flight = cluster.wait_in_flight(1).await;
        if graceful {
            cluster.nats.single().stop();
        } else {
            cluster.nats.single().kill();
        }
        println!(
            "nats_restart: nats-server {} with {in_flight} attempts in flight",
            if graceful { "stopped" } else { "killed" }
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.nats.single().restart();
    }
    let started = starts.finish().await;
    // Among the rest: the engine and the worker are still alive, reconnected, and serving.
    settle_and_verify(&mut cluster, &started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_replies_delivered_twice_apply_once() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::new("duplicates", 1, 10).await;
    let (stop, stopped) = watch::channel(false);
    let commands = tokio::spawn(duplicate_commands(
        cluster.client.clone(),
        cluster.js.clone(),
        stopped.clone(),
    ));
    let replies = tokio::spawn(duplicate_replies(
        cluster.client.clone(),
        cluster.js.clone(),
        stopped,
    ));
    let spread = Duration::from_secs(10);
    let starts = cluster.spawn_starts(cluster.orders(ORDERS, 4), spread);
    tokio::time::sleep(spread).await;
    let started = starts.finish().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop.send(true);
    let commands = commands.await.expect("the command copier");
    let replies = replies.await.expect("the reply copier");
    println!("duplicates: {commands} command copies, {replies} reply copies");
    assert!(
        commands >= 30 && replies >= 30,
        "duplicates: too few copies to prove anything"
    );
    let findings = settle_and_verify(&mut cluster, &started).await;
    assert!(
        findings.ignored.get("duplicate").copied().unwrap_or(0) > 0,
        "duplicates: no reply was recorded as an ignored duplicate: {:?}",
        findings.ignored
    );
    metrics_agree_with_the_database(&cluster).await;
}

/// The engine's and the worker's `/metrics` hold every documented series, and the engine's
/// counters agree with what it wrote (it ran one life, so its counters cover the history).
async fn metrics_agree_with_the_database(cluster: &Cluster) {
    let engine = cluster.scrape_node(0);
    let worker = cluster.scrape_worker(0);
    crate::metrics::assert_documented(&engine, "serve");
    crate::metrics::assert_documented(&worker, "worker");
    let db = cluster.store.connection();
    let checks = [
        (
            "sagaflow_sagas_started_total",
            vec![],
            "SELECT COUNT(*) FROM sagas",
        ),
        (
            "sagaflow_sagas_completed_total",
            vec![],
            "SELECT COUNT(*) FROM sagas WHERE status = 'completed'",
        ),
        (
            "sagaflow_sagas_compensated_total",
            vec![],
            "SELECT COUNT(*) FROM sagas WHERE status = 'compensated'",
        ),
        (
            "sagaflow_compensations_started_total",
            vec![],
            "SELECT COUNT(*) FROM saga_history WHERE kind = 'compensation_started'",
        ),
        (
            "sagaflow_retries_scheduled_total",
            vec![],
            "SELECT COUNT(*) FROM saga_history WHERE kind = 'retry_scheduled'",
        ),
        (
            "sagaflow_replies_ignored_total",
            vec![],
            "SELECT COUNT(*) FROM saga_history WHERE kind = 'reply_ignored'",
        ),
        (
            "sagaflow_replies_ignored_total",
            vec![("cause", "duplicate")],
            "SELECT COUNT(*) FROM saga_history WHERE kind = 'reply_ignored' \
             AND payload LIKE '%\"reason\":\"duplicate:%'",
        ),
        (
            "sagaflow_step_attempts_total",
            vec![("outcome", "succeeded")],
            "SELECT COUNT(*) FROM saga_history WHERE kind = 'attempt_succeeded'",
        ),
        (
            "sagaflow_step_attempts_total",
            vec![("outcome", "timed_out")],
            "SELECT COUNT(*) FROM saga_history WHERE kind = 'attempt_timed_out'",
        ),
    ];
    for (name, labels, sql) in checks {
        let metric = engine.sum(name, &labels);
        let stored = count(db, sql).await as f64;
        assert_eq!(
            metric, stored,
            "the engine's {name}{labels:?} is {metric}, the database says {stored}"
        );
    }
    // One reply consumer per partition, all read by the one node.
    let consumers = engine
        .parsed
        .samples
        .iter()
        .filter(|s| s.metric == "sagaflow_consumer_pending_messages")
        .filter(|s| s.labels.get("stream") == Some("SAGAFLOW_REPLIES"))
        .count();
    assert_eq!(
        consumers as f64,
        engine.sum("sagaflow_partitions_owned", &[])
    );
    // One engine and no operator: no write can lose to another writer's version. Writes
    // fenced off by a lease that lapsed under a slow database (these tests use 1 s leases)
    // are counted apart, as `epoch`.
    assert_eq!(
        engine.sum("sagaflow_stale_writes_total", &[("cause", "version")]),
        0.0
    );
    // The copies of commands were answered from the worker's record.
    let duplicates = worker.sum("sagaflow_worker_duplicate_commands_total", &[]);
    assert!(duplicates > 0.0, "the worker counted no duplicate command");
    let recorded = cluster.worker_results().await as f64;
    let succeeded = worker.sum(
        "sagaflow_worker_commands_total",
        &[("outcome", "succeeded")],
    );
    assert!(
        succeeded >= recorded,
        "the worker counted {succeeded} successful runs but recorded {recorded} results"
    );
    println!(
        "duplicates: metrics agree with the database; the worker answered {duplicates} commands \
         from its record; {} writes fenced off by a lapsed lease",
        engine.sum("sagaflow_stale_writes_total", &[("cause", "epoch")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reply_after_a_retry_is_ignored() {
    let _turn = SERIAL.lock().await;
    // The default ack wait: a stopped worker keeps its commands until it resumes.
    let mut cluster = Cluster::new("late_reply", 2, 30).await;
    let starts = cluster.spawn_starts(cluster.orders(ORDERS, 5), Duration::from_secs(20));
    let mut rounds = 0;
    while cluster.ignored_with("late").await == 0 {
        rounds += 1;
        assert!(
            rounds <= 3,
            "late_reply: no late reply after {} rounds",
            rounds - 1
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.wait_in_flight(1).await;
        // Frozen past the step timeout: the engine times its attempts out and re-dispatches
        // them (to w1); when w0 resumes, it answers the attempts that were superseded.
        cluster.worker(0).signal("STOP");
        tokio::time::sleep(STEP_TIMEOUT + Duration::from_secs(3)).await;
        cluster.worker(0).signal("CONT");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let started = starts.finish().await;
    let findings = settle_and_verify(&mut cluster, &started).await;
    assert!(
        findings.ignored.get("late").copied().unwrap_or(0) > 0 && findings.redispatched > 0,
        "late_reply: {findings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_command_stream_is_recovered_by_timeouts() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::new("purge", 1, 10).await;
    let starts = cluster.spawn_starts(cluster.orders(ORDERS, 6), Duration::from_secs(12));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = purge_commands(&cluster.js).await;
    // Commands that reached the worker before the purge are still answered. To lose some for
    // certain, let them pile up in the stream with no worker pulling, then purge again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.worker(0).signal("TERM");
    let status = cluster
        .worker(0)
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the worker stops on SIGTERM");
    assert!(status.success(), "purge: the worker stopped with {status}");
    cluster.workers[0] = None;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = purge_commands(&cluster.js).await;
    println!("purge: {first} then {second} commands purged");
    assert!(second > 0, "purge: nothing was waiting in the stream");
    cluster.start_worker(0);
    cluster.worker_ready(0).await;
    let started = starts.finish().await;
    let findings = settle_and_verify(&mut cluster, &started).await;
    assert!(
        findings.timed_out > 0 && findings.redispatched > 0,
        "purge: the lost commands were not recovered by timeouts: {findings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_engine_gracefully_and_loses_nothing() {
    let _turn = SERIAL.lock().await;
    let mut cluster = Cluster::new("graceful", 1, 10).await;
    let starts = cluster.spawn_starts(cluster.orders(ORDERS, 7), Duration::from_secs(8));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let in_flight = cluster.wait_in_flight(1).await;
    let asked = Instant::now();
    cluster.engine().signal("TERM");
    let status = cluster.engine().wait_exit(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    println!(
        "graceful: SIGTERM with {in_flight} attempts in flight; exited in {took:.1?} with {status:?}"
    );
    let status = status.expect("graceful: the engine did not exit within 30 s of SIGTERM");
    assert!(
        status.success(),
        "graceful: the engine exited with {status}"
    );
    assert!(
        took < Duration::from_secs(15),
        "graceful: the engine took {took:?} to stop"
    );
    assert!(
        tail(&cluster.log("engine"), 5).contains("stopped"),
        "graceful: the engine did not say it stopped"
    );
    cluster.engines[0] = None;
    // The transitions it had taken in are committed and their commands published: the relay
    // says so when it stops with commands the broker did not take.
    let unsent = count(cluster.store.connection(), "SELECT COUNT(*) FROM outbox").await;
    assert_eq!(
        unsent, 0,
        "graceful: the engine left commands in the outbox"
    );
    assert!(
        !std::fs::read_to_string(cluster.log("engine"))
            .unwrap_or_default()
            .contains("did not accept"),
        "graceful: the engine stopped with commands unpublished"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.start_engine();
    let started = starts.finish().await;
    settle_and_verify(&mut cluster, &started).await;
}
