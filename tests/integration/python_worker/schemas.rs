//! Step types as data: the Python worker registers a JSON Schema for each step's input and
//! output (`docs/protocol.md` section 7.7), and the engine and the CLI check against them with no
//! code of the saga: a start whose input breaks the first step's input schema is refused with
//! `invalid_input` and writes nothing, and `sagaflow skip-step --output` is refused with the
//! schema's complaint for a wrong output and accepted for a right one.

use std::path::Path;

use sagaflow_engine::machine::SagaStatus;
use sagaflow_protocol::Direction;
use serde_json::json;

use super::*;

/// The `sagaflow` binary's outcome.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn sagaflow(binary: &Path, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .env_remove("SAGAFLOW_DATABASE_URL")
        .env("USER", "erin")
        .output()
        .await
        .expect("run sagaflow");
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_schemas_check_starts_and_skipped_outputs() {
    require_python_with_nats();
    let binary = crate::support::build_binary("sagaflow-cli", "sagaflow");
    let nats = NatsServer::start();
    let db = TestDb::new(Backend::Sqlite).await;
    let store = Store::connect(&db.url)
        .await
        .expect("open the engine's store");
    let engine = Engine::launch_distributed(
        store.clone(),
        &nats.url,
        Vec::new(),
        EngineOptions::default(),
    )
    .await
    .expect("launch the engine");
    let scratch = tempfile::tempdir().expect("a folder for the Python worker");
    let worker = start_python_worker(&nats.url, scratch.path()).await;
    let client = async_nats::connect(&nats.url)
        .await
        .expect("connect to the test's nats-server");

    // The definition as stored carries the worker's hand-written schemas.
    let spec = store
        .definition("py_transfer", 1)
        .await
        .expect("read the definition")
        .expect("the worker registered py_transfer@1");
    assert_eq!(
        spec.steps[0]
            .input_schema
            .as_ref()
            .expect("an input schema")["title"],
        "Transfer"
    );
    assert_eq!(
        spec.steps[0]
            .output_schema
            .as_ref()
            .expect("an output schema")["required"],
        json!(["account", "amount", "balance"])
    );

    // --- A start whose input breaks the first step's input schema: refused, nothing written.
    let wrong = json!({"from": "acct-s", "to": "dest-s", "amount": "ten"});
    let body = json!({"v": 2, "saga": "py_transfer", "input": wrong, "key": "schema-1"});
    let answer = ask(&client, "sagaflow.start", body.to_string().into_bytes()).await;
    assert_refused(&answer, "invalid_input", "first step `debit`");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(r#""ten" is not of type "integer""#)
            && message.contains("at JSON path /amount")
            && message.contains("nothing was started"),
        "{answer}"
    );
    let run = sagaflow(
        &binary,
        &[
            "start",
            "py_transfer",
            "--input",
            r#"{"from": "acct-s", "to": "dest-s", "amount": 0}"#,
            "--nats-url",
            &nats.url,
        ],
    )
    .await;
    assert!(!run.ok, "{}", run.stdout);
    assert!(
        run.stderr.contains("invalid_input")
            && run.stderr.contains("0 is less than the minimum of 1"),
        "{}",
        run.stderr
    );
    assert!(
        store.status_counts().await.unwrap().is_empty(),
        "a refused start writes no saga"
    );
    let run = sagaflow(&binary, &["list", "--json", "--database-url", &db.url]).await;
    assert!(run.ok, "{}", run.stderr);
    let listed: Value = serde_json::from_str(&run.stdout).expect("list --json is JSON");
    assert_eq!(listed["sagas"], json!([]), "{listed}");

    // --- A saga whose first step is in progress with no worker to run it: the operator
    // declares it done by hand.
    drop(worker);
    let id = start(
        &client,
        json!({"from": "acct-s", "to": "dest-s", "amount": 10}),
        "schema-2",
    )
    .await;
    let in_flight = store.load(id).await.unwrap().expect("the saga exists");
    assert_eq!(
        in_flight.state.current_step(),
        Some((0, Direction::Forward))
    );
    let id_text = id.to_string();
    let skip = |output: &'static str| {
        [
            "skip-step",
            "ID",
            "--step",
            "debit",
            "--output",
            output,
            "--reason",
            "debited by hand, ticket OPS-9",
            "--database-url",
            &db.url,
            "--json",
        ]
    };
    let fingerprint = || async {
        let saga = store.load(id).await.unwrap().expect("the saga exists");
        (saga.row_version, store.history(id).await.unwrap().len())
    };
    let before = fingerprint().await;
    let mut args = skip(r#"{"account": "acct-s", "amount": "10", "balance": 90}"#);
    args[1] = &id_text;
    let run = sagaflow(&binary, &args).await;
    assert!(!run.ok, "a wrong output must be refused: {}", run.stdout);
    assert!(
        run.stderr
            .contains("the output given does not fit what step `debit` returns (Moved)")
            && run.stderr.contains(r#""10" is not of type "integer""#)
            && run.stderr.contains("at JSON path /amount")
            && run.stderr.contains("nothing was changed"),
        "{}",
        run.stderr
    );
    assert_eq!(fingerprint().await, before, "the refusal changed nothing");

    let mut args = skip(r#"{"account": "acct-s", "amount": 10, "balance": 90}"#);
    args[1] = &id_text;
    let run = sagaflow(&binary, &args).await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("skip-step --json is JSON");
    assert_eq!(report["output_check"], "checked", "{report}");
    assert_eq!(report["dispatched"][0]["step"], "fee", "{report}");

    // The worker comes back and finishes the saga from the output the operator gave.
    let _worker = start_python_worker(&nats.url, scratch.path()).await;
    let counts = engine
        .wait_until_settled(PATIENCE)
        .await
        .expect("status counts");
    assert_eq!(counts.get(SagaStatus::Completed), 1, "{counts:?}");
    let done = store.load(id).await.unwrap().expect("the saga exists");
    assert_eq!(
        done.state.outputs["debit"],
        json!({"account": "acct-s", "amount": 10, "balance": 90})
    );
    let history = store.history(id).await.unwrap();
    let action = records(&history, "operator_action");
    assert_eq!(action.len(), 1, "{history:#?}");
    assert_eq!(action[0].detail["output_checked"], true);

    // `sagaflow show --schema` prints what the worker registered.
    let run = sagaflow(
        &binary,
        &["show", &id_text, "--schema", "--database-url", &db.url],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains("0 `debit` output:") && run.stdout.contains(r#""title": "Moved""#),
        "{}",
        run.stdout
    );
    let run = sagaflow(
        &binary,
        &[
            "show",
            &id_text,
            "--schema",
            "--json",
            "--database-url",
            &db.url,
        ],
    )
    .await;
    assert!(run.ok, "{}", run.stderr);
    let shown: Value = serde_json::from_str(&run.stdout).expect("show --json is JSON");
    assert_eq!(
        shown["steps"][3]["output_schema"]["title"], "Notified",
        "{shown}"
    );
    let run = sagaflow(
        &binary,
        &["show", &id_text, "--json", "--database-url", &db.url],
    )
    .await;
    let plain: Value = serde_json::from_str(&run.stdout).expect("show --json is JSON");
    assert!(
        plain["steps"][0].get("output_schema").is_none(),
        "schemas only with --schema: {plain}"
    );
    engine.shutdown().await;
}
