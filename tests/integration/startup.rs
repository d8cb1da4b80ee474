//! Starting up: engines launched together on one new PostgreSQL database all apply the schema
//! and come up, and a database that cannot be opened is reported at once, not after retries.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sagaflow_engine::EngineError;
use sagaflow_engine::store::Store;
use sagaflow_tests::{Backend, NatsServer, TestDb};

use crate::support::build_binary;

/// How long a `sagaflow serve` gets to come up.
const READY_PATIENCE: Duration = Duration::from_secs(60);
/// What `sagaflow serve` logs once it serves.
const READY_LINE: &str = "sagaflow engine serving on";

/// `sagaflow serve` processes, killed when dropped (pass or fail).
struct Engines(Vec<Child>);

impl Drop for Engines {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

fn logs(dir: &Path, n: usize) -> String {
    (0..n)
        .map(|i| {
            let text =
                std::fs::read_to_string(dir.join(format!("engine{i}.log"))).unwrap_or_default();
            format!("--- engine {i} ---\n{text}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts `n` engines at the same instant on one new database and checks that each comes up,
/// stays up, and stops cleanly on SIGTERM.
async fn engines_start_together(n: usize) {
    let binary = build_binary("sagaflow-cli", "sagaflow");
    let nats = NatsServer::start();
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().expect("a folder for the logs");
    let mut commands: Vec<Command> = (0..n)
        .map(|i| {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join(format!("engine{i}.log")))
                .expect("open a log file");
            let mut command = Command::new(&binary);
            command
                .args(["serve", "--database-url", &db.url, "--nats-url", &nats.url])
                .env("RUST_LOG", "warn,sagaflow_engine=info,sagaflow=info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone a log file"))
                .stderr(log);
            command
        })
        .collect();
    // Spawned back to back, so they connect and migrate at the same moment.
    let mut engines = Engines(
        commands
            .iter_mut()
            .map(|c| c.spawn().expect("start sagaflow serve"))
            .collect(),
    );

    let give_up = Instant::now() + READY_PATIENCE;
    loop {
        for (i, child) in engines.0.iter_mut().enumerate() {
            if let Some(status) = child.try_wait().expect("poll an engine") {
                panic!(
                    "engine {i} of {n} exited ({status}) while starting\n{}",
                    logs(dir.path(), n)
                );
            }
        }
        let ready = (0..n)
            .filter(|i| {
                std::fs::read_to_string(dir.path().join(format!("engine{i}.log")))
                    .unwrap_or_default()
                    .contains(READY_LINE)
            })
            .count();
        if ready == n {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "{ready} of {n} engines came up in {READY_PATIENCE:?}\n{}",
            logs(dir.path(), n)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Up means still up a moment later, too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, child) in engines.0.iter_mut().enumerate() {
        assert!(
            child.try_wait().expect("poll an engine").is_none(),
            "engine {i} of {n} exited after coming up\n{}",
            logs(dir.path(), n)
        );
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(signalled.success(), "SIGTERM to engine {i}");
    }
    for (i, child) in engines.0.iter_mut().enumerate() {
        let give_up = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll an engine") {
                break status;
            }
            assert!(
                Instant::now() < give_up,
                "engine {i} did not stop on SIGTERM\n{}",
                logs(dir.path(), n)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            status.success(),
            "engine {i} of {n} stopped with {status}\n{}",
            logs(dir.path(), n)
        );
    }
    let text = logs(dir.path(), n);
    assert!(!text.contains("duplicate key"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_started_together_on_a_new_postgres_database_all_come_up() {
    engines_start_together(2).await;
    engines_start_together(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_store_connects_on_a_new_postgres_database_all_succeed() {
    for round in 0..3 {
        let db = TestDb::new(Backend::Postgres).await;
        let connects: Vec<_> = (0..6)
            .map(|_| {
                let url = db.url.clone();
                tokio::spawn(async move { Store::connect(&url).await })
            })
            .collect();
        for (i, connect) in connects.into_iter().enumerate() {
            let store = connect
                .await
                .expect("the connect task")
                .unwrap_or_else(|e| panic!("round {round}: connect {i} failed: {e}"));
            // The schema is all there: a query over the tables works.
            assert!(
                store
                    .definitions()
                    .await
                    .expect("read definitions")
                    .is_empty()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_database_that_does_not_exist_is_reported_after_one_attempt() {
    let server = std::env::var("SAGAFLOW_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("sagaflow_missing_{}", uuid::Uuid::new_v4().simple());
    let error = Store::connect(&format!("{server}/{name}"))
        .await
        .expect_err("no such database");
    let message = error.to_string();
    assert!(
        message.contains(&format!("database \"{name}\" does not exist")),
        "{message}"
    );
    match error {
        EngineError::Connect { attempts, .. } => {
            assert_eq!(attempts, 1, "retried a permanent error: {message}")
        }
        other => panic!("not a connect error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_that_cannot_be_opened_is_reported_after_one_attempt() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    // A folder that does not exist: SQLite creates files, not folders.
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("missing").join("sagaflow.db").display()
    );
    let error = Store::connect(&url).await.expect_err("cannot open");
    let message = error.to_string();
    assert!(
        message.contains("unable to open database file"),
        "{message}"
    );
    match error {
        EngineError::Connect { attempts, .. } => {
            assert_eq!(attempts, 1, "retried a permanent error: {message}")
        }
        other => panic!("not a connect error: {other}"),
    }
}
