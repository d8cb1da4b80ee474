//! The crash test: the embedded engine runs the order demo in a child process that is killed
//! with SIGKILL at random moments and restarted, on a SQLite file and on PostgreSQL. Afterwards
//! every saga must have ended whole, the demo services' invariants must hold, and the history
//! must show each compensation exactly once per step, in reverse order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::store::{HistoryEntry, Store};
use sagaflow_tests::{Backend, TestDb};

const TRIPS: usize = 60;
const KILLS: usize = 10;

/// The `sagaflow` binary, built if it is not there yet.
fn sagaflow_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "sagaflow-engine",
            "--bin",
            "sagaflow",
        ])
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the sagaflow binary failed");
    let deps = std::env::current_exe().expect("test binary path");
    // target/debug/deps/integration-HASH -> target/debug/sagaflow
    deps.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("sagaflow"))
        .expect("target folder")
}

fn demo_command(binary: &PathBuf, url: &str, orders: usize, concurrency: usize) -> Command {
    let mut command = Command::new(binary);
    command.args([
        "demo",
        "--database-url",
        url,
        "--orders",
        &orders.to_string(),
        "--trips",
        &TRIPS.to_string(),
        "--seed",
        "7",
        "--transient",
        "0.1",
        "--lost-reply",
        "0.05",
        "--concurrency",
        &concurrency.to_string(),
    ]);
    command
}

async fn crash_and_recover(backend: Backend) {
    let db = TestDb::new(backend).await;
    let binary = sagaflow_binary();
    // Enough work, done few attempts at a time, that the run lasts long enough to be killed
    // ten times (SQLite commits are much cheaper than PostgreSQL's here).
    let (orders, concurrency) = match backend {
        Backend::Sqlite => (1_500, 1),
        Backend::Postgres => (500, 4),
    };
    let seed: u64 = rand::random();
    println!("{backend:?}: kill timings from seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    let mut runs = 0;
    while kills < KILLS {
        runs += 1;
        assert!(
            runs <= KILLS * 3,
            "the demo kept finishing before it could be killed"
        );
        let mut child = demo_command(&binary, &db.url, orders, concurrency)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the demo");
        tokio::time::sleep(Duration::from_millis(rng.gen_range(80..400))).await;
        if child.try_wait().expect("poll the child").is_none() {
            child.kill().expect("SIGKILL the engine");
            kills += 1;
        }
        let _ = child.wait();
    }

    // The last life runs to the end; the demo exits non-zero if an invariant is broken.
    let started = Instant::now();
    let output = demo_command(&binary, &db.url, orders, concurrency)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{backend:?}: the final run failed after {kills} kills:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("all invariants hold"), "{stdout}");
    println!(
        "{backend:?}: {kills} kills over {runs} runs; final run took {:?}",
        started.elapsed()
    );

    let store = Store::connect(&db.url).await.unwrap();
    let counts = store.status_counts().await.unwrap();
    let total: i64 = counts.values().sum();
    assert_eq!(
        total,
        (orders + TRIPS) as i64,
        "{backend:?}: one saga per start key: {counts:?}"
    );
    for status in ["created", "running", "compensating"] {
        assert!(
            !counts.contains_key(status),
            "{backend:?}: sagas left {status}: {counts:?}"
        );
    }
    for id in store.ids_with_status("stuck").await.unwrap() {
        let stuck = store.load(id).await.unwrap().unwrap().state.stuck;
        assert!(
            stuck.is_some_and(|s| !s.reason.is_empty()),
            "stuck saga {id} without a reason"
        );
    }
    let mut compensated = 0;
    for id in store.ids_with_status("compensated").await.unwrap() {
        check_compensations(&store.history(id).await.unwrap(), id);
        compensated += 1;
    }
    for id in store.ids_with_status("completed").await.unwrap() {
        let history = store.history(id).await.unwrap();
        assert!(
            !history
                .iter()
                .any(|h| h.direction.as_deref() == Some("compensate")),
            "completed saga {id} ran a compensation"
        );
    }
    assert!(
        compensated > 0,
        "the demo's declines must compensate some sagas"
    );
}

/// Each step that completed forward is compensated exactly once, latest first.
fn check_compensations(history: &[HistoryEntry], id: uuid::Uuid) {
    let succeeded = |direction: &str| -> Vec<String> {
        history
            .iter()
            .filter(|h| h.kind == "attempt_succeeded" && h.direction.as_deref() == Some(direction))
            .filter_map(|h| h.step.clone())
            .collect()
    };
    let forward = succeeded("forward");
    let compensations = succeeded("compensate");
    let mut per_step: BTreeMap<&str, usize> = BTreeMap::new();
    for step in &compensations {
        *per_step.entry(step).or_default() += 1;
    }
    assert!(
        per_step.values().all(|&n| n == 1),
        "saga {id}: a compensation ran twice: {compensations:?}"
    );
    let planned: Vec<String> = history
        .iter()
        .find(|h| h.kind == "compensation_started")
        .and_then(|h| serde_json::from_value(h.detail["steps"].clone()).ok())
        .unwrap_or_default();
    assert_eq!(
        compensations, planned,
        "saga {id}: compensations ran as planned"
    );
    let completed_in_reverse: Vec<String> = forward.iter().rev().cloned().collect();
    let undone_known: Vec<String> = compensations
        .iter()
        .filter(|s| forward.contains(s))
        .cloned()
        .collect();
    assert_eq!(
        undone_known, completed_in_reverse,
        "saga {id}: every completed step compensated, in reverse order"
    );
    assert_eq!(
        history
            .iter()
            .filter(|h| h.kind == "saga_compensated")
            .count(),
        1,
        "saga {id}: one terminal record"
    );
    let last = history.last().map(|h| h.kind.as_str());
    assert!(
        history
            .iter()
            .skip_while(|h| h.kind != "saga_compensated")
            .skip(1)
            .all(|h| h.kind == "reply_ignored"),
        "saga {id}: nothing but ignored replies after the end, last was {last:?}"
    );
    let _ = SagaStatus::Compensated;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_embedded_engine_on_sqlite_loses_nothing() {
    crash_and_recover(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_embedded_engine_on_postgres_loses_nothing() {
    crash_and_recover(Backend::Postgres).await;
}
