//! The crash test: the embedded engine runs the order demo in a child process that is killed
//! with SIGKILL at random moments and restarted, on a SQLite file and on PostgreSQL. Afterwards
//! every saga must have ended whole, the demo services' invariants must hold, and the history
//! must show each compensation exactly once per step, in reverse order.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sagaflow_engine::store::Store;
use sagaflow_sdk::Direction;
use sagaflow_tests::{Backend, TestDb};

use crate::support::{build_binary, check_compensations};

const TRIPS: usize = 60;
const KILLS: usize = 10;

/// The `sagaflow` binary, built if it is not there yet.
fn sagaflow_binary() -> PathBuf {
    build_binary("sagaflow-cli", "sagaflow")
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
    // Enough work, done few attempts at a time, that the lives together last long enough to be
    // killed ten times: each life resumes what the last one left, and ten lives of at most
    // 400 ms must not finish it. On PostgreSQL 500 orders took 1.8 s uninterrupted, too close.
    let (orders, concurrency) = match backend {
        Backend::Sqlite => (1_500, 1),
        Backend::Postgres => (1_500, 4),
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
                .any(|h| h.direction == Some(Direction::Compensate)),
            "completed saga {id} ran a compensation"
        );
    }
    assert!(
        compensated > 0,
        "the demo's declines must compensate some sagas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_embedded_engine_on_sqlite_loses_nothing() {
    crash_and_recover(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_embedded_engine_on_postgres_loses_nothing() {
    crash_and_recover(Backend::Postgres).await;
}
