//! The `sagaflow` binary as a script sees it: versioned JSON, and a reader that goes away.

use std::process::Stdio;

use sagaflow_engine::store::Store;

use sagaflow_tests::{Backend, TestDb};

use crate::support::build_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_document_starts_with_the_format_version() {
    let db = TestDb::new(Backend::Sqlite).await;
    Store::connect(&db.url).await.unwrap();
    let binary = build_binary("sagaflow-cli", "sagaflow");
    for args in [
        &["list", "--json"][..],
        &["stuck", "--json"],
        &["audit", "--json"],
        &["retention", "--older-than", "90d", "--dry-run", "--json"],
    ] {
        let output = tokio::process::Command::new(&binary)
            .args(args)
            .args(["--database-url", &db.url])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.starts_with("{\n  \"v\": 1,"),
            "{args:?} printed {stdout}"
        );
    }
}

/// `sagaflow stuck --json | head -c 100`: the reader closes the pipe, and the command ends
/// without a panic or an error message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_every_command_quietly() {
    let db = TestDb::new(Backend::Sqlite).await;
    Store::connect(&db.url).await.unwrap();
    let binary = build_binary("sagaflow-cli", "sagaflow");
    for args in [
        &["stuck", "--json"][..],
        &["stuck"],
        &["list", "--json"],
        &["list"],
        &["audit", "--jsonl"],
        &["audit"],
    ] {
        let mut child = tokio::process::Command::new(&binary)
            .args(args)
            .args(["--database-url", &db.url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written.
        drop(child.stdout.take());
        let output = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert!(
            output.status.success(),
            "{args:?}: {:?} {stderr}",
            output.status
        );
    }
}
