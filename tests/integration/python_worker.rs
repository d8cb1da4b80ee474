//! The wire protocol as a contract: a step worker written in Python from `docs/protocol.md`
//! alone (`tests/python/transfer_worker.py`, with `nats-py` from PyPI and its idempotency
//! records in SQLite) serves the saga `py_transfer` for a real engine, over a private
//! nats-server with JetStream, on a fresh PostgreSQL database.
//!
//! The test talks to the engine only through NATS, with raw JSON of protocol version 2 as the
//! document describes it:
//! it starts 20 sagas on `sagaflow.start` (some complete, some fail permanently after two
//! compensatable steps and compensate them in reverse order, some fail at the first step), then
//! reads every history. It replays a command the worker already answered (answered from the
//! record, effect not applied twice, the engine records the late reply as `reply_ignored`), and
//! sends bad input on every subject of ours: malformed JSON, an unknown saga, an unknown schema
//! version, payloads over the size limits, malformed replies and commands. Each is refused
//! without a redelivery loop, recorded in a saga's history where it names one, and the engine
//! and the Python worker still serve new sagas afterwards.
//!
//! A second test sends the worker crafted commands of its own (rule 9.7): one under epoch N, then
//! one for the same partition under epoch N-1, which it must refuse with `stale_epoch` on the
//! command's `reply_to` without running the handler or answering from its idempotency record,
//! also after a restart (the highest epoch per partition is kept in its SQLite file).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_engine::runtime::{Engine, EngineOptions};
use sagaflow_engine::store::{HistoryEntry, Store};
use sagaflow_protocol::names;
use sagaflow_protocol::sealed::is_envelope;
use sagaflow_sdk::Direction;
use sagaflow_tests::{Backend, NatsServer, TestDb};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::check_compensations;

/// Sagas started in the main run.
const SAGAS: usize = 20;
/// The Python worker's id, as it appears in the histories.
const WORKER_ID: &str = "py-worker-1";
const ACTOR: &str = "worker:py-worker-1";
/// Every account opens with this balance in the Python worker.
const OPENING_BALANCE: i64 = 100;
/// How long a wait for something asynchronous may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// What a saga of the run is expected to do, chosen by its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// All four steps succeed (`notify` after one retryable failure).
    Completes,
    /// `credit`, the pivot, fails permanently: `fee` then `debit` are compensated.
    CreditRefused,
    /// `debit`, the first step, fails permanently: nothing to compensate.
    DebitRefused,
}

fn fate(i: usize) -> Fate {
    match i % 5 {
        3 => Fate::CreditRefused,
        4 => Fate::DebitRefused,
        _ => Fate::Completes,
    }
}

fn transfer(i: usize) -> (String, String, i64) {
    let to = match fate(i) {
        Fate::CreditRefused => format!("closed-{i}"),
        _ => format!("dest-{i}"),
    };
    let amount = match fate(i) {
        Fate::DebitRefused => 500,
        _ => 10 + i as i64,
    };
    (format!("acct-{i}"), to, amount)
}

/// The input of transfer `i` in clear: `reference` is a secret member, sealed by [`start`].
fn transfer_input(i: usize) -> Value {
    let (from, to, amount) = transfer(i);
    json!({ "from": from, "to": to, "amount": amount, "reference": format!("ref-{i}") })
}

/// The secret receipt the Python worker's `credit` returns for transfer `i`.
fn receipt(i: usize) -> String {
    format!("rcpt-ref-{i}-{}", transfer(i).2)
}

/// A child process killed (and reaped) when the guard drops, pass or fail; on a failure its log
/// is printed.
struct ChildGuard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- last lines of {}'s log ({}) ---\n{}",
                self.name,
                self.log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// The Python worker's script.
pub(crate) fn python_worker_script() -> PathBuf {
    repo_root().join("tests/python/transfer_worker.py")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// Fails (never skips) when the Python side cannot run here.
pub(crate) fn require_python_with_nats() {
    let output = Command::new("python3")
        .args(["-c", "import nats, sqlite3, cryptography; print(nats.__name__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is required by this test and could not be run: {e}; install it (.ci/run does)")
        });
    assert!(
        output.status.success(),
        "the Python packages nats-py and cryptography are required by this test: `python3 -m \
         pip install nats-py cryptography` (.ci/run installs them); python3 said: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Starts the Python worker and waits for its `READY` line (its consumer exists and an engine
/// accepted its definition).
async fn start_python_worker(nats_url: &str, dir: &Path) -> ChildGuard {
    let log = dir.join("python-worker.log");
    let stderr = std::fs::File::create(&log).expect("create the worker's log");
    let mut child = Command::new("python3")
        .arg(python_worker_script())
        .args(["--nats-url", nats_url, "--id", WORKER_ID, "--db"])
        .arg(dir.join("py_transfer_worker.db"))
        .env("SAGAFLOW_SECRET_KEYS", sagaflow_tests::TEST_SECRET_KEYS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("run python3 tests/python/transfer_worker.py");
    let stdout = child.stdout.take().expect("the worker's stdout");
    let guard = ChildGuard {
        name: "the Python worker",
        child,
        log,
    };
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let ready = tokio::task::spawn_blocking(move || {
        let give_up = std::time::Instant::now() + PATIENCE;
        loop {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) if line.starts_with("READY") => return Ok(line),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("join the READY reader");
    match ready {
        Ok(line) => assert_eq!(line, format!("READY {WORKER_ID}")),
        Err(e) => panic!("the Python worker did not get ready within {PATIENCE:?} ({e})"),
    }
    guard
}

/// A core NATS request with a raw body; the answer as JSON.
async fn ask(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> Value {
    let message = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_string(), body.into()),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer on {subject} within 10 s"))
    .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"));
    serde_json::from_slice(&message.payload)
        .unwrap_or_else(|e| panic!("the answer on {subject} is not JSON ({e}): {message:?}"))
}

fn assert_refused(answer: &Value, code: &str, mentions: &str) {
    assert_eq!(answer["status"], "error", "{answer}");
    assert_eq!(answer["v"], 2, "{answer}");
    assert_eq!(answer["code"], code, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "the refusal should mention `{mentions}`: {answer}"
    );
}

/// Starts a `py_transfer` saga, its secret `reference` sealed with the test key.
async fn start(client: &async_nats::Client, input: Value, key: &str) -> Uuid {
    start_as_is(client, sagaflow_tests::sealed(input), key).await
}

/// Starts a `py_transfer` saga with `input` exactly as given.
async fn start_as_is(client: &async_nats::Client, input: Value, key: &str) -> Uuid {
    let body = json!({ "v": 2, "saga": "py_transfer", "input": input, "key": key });
    let answer = ask(client, "sagaflow.start", body.to_string().into_bytes()).await;
    assert_eq!(answer["status"], "ok", "start {key}: {answer}");
    assert_eq!(answer["v"], 2, "{answer}");
    answer["saga_id"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .unwrap_or_else(|| panic!("start {key}: no saga id in {answer}"))
}

/// A JetStream publish with a `Nats-Msg-Id`, waiting for the stream's ack.
async fn publish(js: &jetstream::Context, subject: &str, message_id: &str, body: Vec<u8>) {
    js.send_publish(
        subject.to_string(),
        jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(message_id),
    )
    .await
    .unwrap_or_else(|e| panic!("publish on {subject}: {e}"))
    .await
    .unwrap_or_else(|e| panic!("JetStream did not store the message on {subject}: {e}"));
}

/// Every message seen on `subject` (a core subscription), as JSON, in arrival order.
async fn capture(client: &async_nats::Client, subject: &str) -> Arc<Mutex<Vec<Value>>> {
    let mut subscriber = client
        .subscribe(subject.to_string())
        .await
        .expect("subscribe");
    client.flush().await.expect("flush the subscription");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            if let Ok(value) = serde_json::from_slice::<Value>(&message.payload) {
                sink.lock().unwrap().push(value);
            }
        }
    });
    seen
}

/// Polls the saga's history until `done` holds; panics with the history when it does not in
/// time.
async fn history_until(
    store: &Store,
    id: Uuid,
    what: &str,
    done: impl Fn(&[HistoryEntry]) -> bool,
) -> Vec<HistoryEntry> {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    loop {
        let history = store.history(id).await.expect("read a history");
        if done(&history) {
            return history;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("saga {id}: {what} did not happen in time; history: {history:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn records<'a>(history: &'a [HistoryEntry], kind: &str) -> Vec<&'a HistoryEntry> {
    history.iter().filter(|h| h.kind.as_str() == kind).collect()
}

/// (step, attempt) of each record of `kind` in `direction`, in order.
fn attempts(history: &[HistoryEntry], kind: &str, direction: &str) -> Vec<(String, u32)> {
    history
        .iter()
        .filter(|h| {
            h.kind.as_str() == kind && h.direction.map(Direction::as_str) == Some(direction)
        })
        .map(|h| (h.step.clone().unwrap_or_default(), h.attempt.unwrap_or(0)))
        .collect()
}

fn pairs(items: &[(&str, u32)]) -> Vec<(String, u32)> {
    items.iter().map(|(s, a)| (s.to_string(), *a)).collect()
}

/// Checks one saga of the main run against what its input makes it do.
fn check_saga(i: usize, id: Uuid, status: SagaStatus, history: &[HistoryEntry]) {
    let (from, to, amount) = transfer(i);
    if status == SagaStatus::Compensated {
        // Each completed step compensated exactly once, latest first, as planned.
        check_compensations(history, id);
    }
    // Everything a worker did is signed by the Python worker; everything else by the engine.
    for record in history {
        let by_worker = matches!(
            record.kind.as_str(),
            "attempt_succeeded" | "attempt_failed" | "reply_ignored"
        );
        let expected = if by_worker { ACTOR } else { "engine" };
        assert_eq!(record.actor, expected, "saga {id} record {record:?}");
    }
    let first = &history[0];
    assert_eq!(first.kind, RecordKind::SagaStarted, "saga {id}");
    let keys = sagaflow_tests::test_secret_keys();
    let input = &first.detail["input"];
    assert!(is_envelope(&input["reference"]), "saga {id}: {input}");
    assert_eq!(keys.reveal(input), transfer_input(i), "saga {id}");
    let compensation_plan = records(history, "compensation_started")
        .first()
        .map(|r| r.detail["steps"].clone());
    let output_of = |step: &str| -> Value {
        history
            .iter()
            .find(|h| {
                h.kind == RecordKind::AttemptSucceeded
                    && h.step.as_deref() == Some(step)
                    && h.direction == Some(Direction::Forward)
            })
            .map(|h| keys.reveal(&h.detail["output"]))
            .unwrap_or(Value::Null)
    };
    let failure = |step: &str| -> Option<&HistoryEntry> {
        history.iter().find(|h| {
            h.kind == RecordKind::AttemptFailed
                && h.step.as_deref() == Some(step)
                && h.direction == Some(Direction::Forward)
        })
    };
    match fate(i) {
        Fate::Completes => {
            assert_eq!(status, SagaStatus::Completed, "saga {id}: {history:#?}");
            assert_eq!(
                attempts(history, "attempt_succeeded", "forward"),
                pairs(&[("debit", 1), ("fee", 1), ("credit", 1), ("notify", 2)]),
                "saga {id}"
            );
            // The retryable failure of notify's first attempt, and the retry it caused.
            let failed = failure("notify").expect("notify failed once");
            assert_eq!(failed.attempt, Some(1));
            assert_eq!(
                failed.detail,
                json!({"class": "retryable", "code": "mail_busy"})
            );
            assert_eq!(failed.error.as_deref(), Some("the mail relay is busy"));
            assert_eq!(
                attempts(history, "retry_scheduled", "forward"),
                pairs(&[("notify", 2)]),
                "saga {id}"
            );
            assert_eq!(
                output_of("debit"),
                json!({"account": from, "amount": amount, "balance": OPENING_BALANCE - amount})
            );
            assert_eq!(
                output_of("fee"),
                json!({"account": from, "fee": 1, "balance": OPENING_BALANCE - amount - 1})
            );
            assert_eq!(
                output_of("credit"),
                json!({"account": to, "amount": amount, "balance": OPENING_BALANCE + amount,
                       "receipt": receipt(i)})
            );
            // The receipt is a secret output: the worker sealed it before it replied.
            let credited = records(history, "attempt_succeeded")
                .into_iter()
                .find(|h| h.step.as_deref() == Some("credit"))
                .expect("credit succeeded");
            assert!(
                is_envelope(&credited.detail["output"]["receipt"]),
                "saga {id}: {}",
                credited.detail
            );
            assert_eq!(compensation_plan, None, "saga {id}");
            assert!(attempts(history, "attempt_dispatched", "compensate").is_empty());
            assert_eq!(history.last().unwrap().kind, RecordKind::SagaCompleted);
        }
        Fate::CreditRefused => {
            assert_eq!(status, SagaStatus::Compensated, "saga {id}: {history:#?}");
            let failed = failure("credit").expect("credit failed");
            assert_eq!(
                failed.detail,
                json!({"class": "permanent", "code": "account_closed"})
            );
            assert_eq!(
                failed.error.as_deref(),
                Some(format!("account {to} is closed").as_str())
            );
            // Compensated in reverse order, by the Python worker; the pivot itself is not
            // (a permanent error promises nothing was applied).
            assert_eq!(
                compensation_plan,
                Some(json!(["fee", "debit"])),
                "saga {id}"
            );
            assert_eq!(
                attempts(history, "attempt_succeeded", "compensate"),
                pairs(&[("fee", 1), ("debit", 1)]),
                "saga {id}"
            );
            assert!(records(history, "retry_scheduled").is_empty(), "saga {id}");
            assert_eq!(history.last().unwrap().kind, RecordKind::SagaCompensated);
        }
        Fate::DebitRefused => {
            assert_eq!(status, SagaStatus::Compensated, "saga {id}: {history:#?}");
            let failed = failure("debit").expect("debit failed");
            assert_eq!(
                failed.detail,
                json!({"class": "permanent", "code": "insufficient_funds"})
            );
            assert_eq!(compensation_plan, Some(json!([])), "saga {id}");
            assert!(attempts(history, "attempt_dispatched", "compensate").is_empty());
            assert_eq!(
                attempts(history, "attempt_dispatched", "forward"),
                pairs(&[("debit", 1)])
            );
            assert_eq!(history.last().unwrap().kind, RecordKind::SagaCompensated);
        }
    }
}

async fn query(db: &DatabaseConnection, sql: &str) -> Vec<sea_orm::QueryResult> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("query the Python worker's SQLite file ({sql}): {e}"))
}

/// The Python worker's own books: no idempotency key applied twice, balances that add up.
async fn check_worker_books(db: &DatabaseConnection) {
    let twice = query(
        db,
        "SELECT idempotency_key, COUNT(*) AS n FROM ledger GROUP BY idempotency_key HAVING COUNT(*) > 1",
    )
    .await;
    assert!(
        twice.is_empty(),
        "{} idempotency keys were applied more than once",
        twice.len()
    );
    let mut balances = BTreeMap::new();
    for row in query(db, "SELECT name, balance FROM accounts").await {
        let name: String = row.try_get("", "name").unwrap();
        let balance: i64 = row.try_get("", "balance").unwrap();
        balances.insert(name, balance);
    }
    for i in 0..SAGAS {
        let (from, to, amount) = transfer(i);
        match fate(i) {
            Fate::Completes => {
                assert_eq!(balances[&from], OPENING_BALANCE - amount - 1, "{from}");
                assert_eq!(balances[&to], OPENING_BALANCE + amount, "{to}");
            }
            Fate::CreditRefused | Fate::DebitRefused => {
                // A refused debit leaves nothing behind, not even the account row it would
                // have opened: the worker keeps only what succeeded.
                let balance = balances.get(&from).copied().unwrap_or(OPENING_BALANCE);
                assert_eq!(balance, OPENING_BALANCE, "{from} is made whole");
                assert!(!balances.contains_key(&to), "{to} was never credited");
            }
        }
    }
    let notifications = query(db, "SELECT COUNT(*) AS n FROM notifications").await;
    let notified: i64 = notifications[0].try_get("", "n").unwrap();
    let completing = (0..SAGAS).filter(|&i| fate(i) == Fate::Completes).count();
    assert_eq!(
        notified, completing as i64,
        "one notification per completed saga"
    );
    // `notify` read the secret receipt `credit` returned, opened.
    let texts: Vec<String> = query(db, "SELECT text FROM notifications")
        .await
        .iter()
        .map(|row| row.try_get("", "text").unwrap())
        .collect();
    for i in (0..SAGAS).filter(|&i| fate(i) == Fate::Completes) {
        let expected = format!("receipt {}", receipt(i));
        assert!(
            texts.iter().any(|t| t.ends_with(&expected)),
            "no notification with {expected}: {texts:?}"
        );
    }
}

/// Waits until the consumer has nothing in flight, then checks it never redelivered anything
/// and its stream is empty (a work queue drops what was acked or terminated).
async fn check_drained(js: &jetstream::Context, stream: &str, consumer: &str) {
    let give_up = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut handle = js.get_stream(stream).await.expect("get the stream");
        let info = handle.consumer_info(consumer).await.expect("consumer info");
        let messages = handle.info().await.expect("stream info").state.messages;
        if info.num_ack_pending == 0 && info.num_pending == 0 && messages == 0 {
            assert_eq!(
                info.num_redelivered, 0,
                "{consumer}: nothing is ever redelivered, bad input included"
            );
            return;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!(
                "{stream}/{consumer} did not drain: {} in flight, {} pending, {messages} stored",
                info.num_ack_pending, info.num_pending
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`check_drained`] for the reply consumer of every partition (`sagaflow-engine-{partition}`).
async fn check_replies_drained(js: &jetstream::Context) {
    let stream = js
        .get_stream("SAGAFLOW_REPLIES")
        .await
        .expect("get the reply stream");
    let consumers: Vec<String> = stream
        .consumer_names()
        .map(|name| name.expect("list the reply consumers"))
        .collect()
        .await;
    assert!(
        !consumers.is_empty() && consumers.iter().all(|c| c.starts_with("sagaflow-engine-")),
        "one reply consumer per partition: {consumers:?}"
    );
    for consumer in consumers {
        check_drained(js, "SAGAFLOW_REPLIES", &consumer).await;
    }
}

/// What the NATS server itself says to a client that publishes more than `max_payload`
/// without checking (a raw socket, as a careless client in any language would).
fn raw_oversized_publish(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nats-server");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO "), "{info}");
    let size = 2 * 1024 * 1024;
    let _ = write!(
        stream,
        "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nPUB sagaflow.start {size}\r\n"
    );
    let _ = stream.write_all(&vec![b'x'; size]);
    let _ = stream.write_all(b"\r\n");
    let mut answer = String::new();
    let _ = reader.read_to_string(&mut answer);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_built_from_the_protocol_document() {
    require_python_with_nats();
    let nats = NatsServer::start();
    let db = TestDb::new(Backend::Postgres).await;
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
    let js = jetstream::new(client.clone());
    let commands = capture(&client, "sagaflow.cmd.py_transfer.>").await;
    // Every partition's replies: each command says where its reply goes (`reply_to`).
    let replies = capture(&client, "sagaflow.reply.*.py_transfer").await;

    // --- Bad start and register requests: each answered with an error, nothing started. ---
    let answer = ask(&client, "sagaflow.start", b"{this is not json".to_vec()).await;
    assert_refused(&answer, "bad_request", "not a start request");
    let answer = ask(
        &client,
        "sagaflow.start",
        json!({"v": 2, "saga": "no_such_saga", "input": {}})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_refused(&answer, "unknown_saga", "py_transfer@1");
    let answer = ask(
        &client,
        "sagaflow.start",
        json!({"v": 3, "saga": "py_transfer", "input": transfer_input(0)})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_refused(&answer, "unsupported_version", "send v=2");
    // Over the engine's 256 KiB input limit, under the server's 1 MiB message limit.
    let big = json!({"v": 2, "saga": "py_transfer", "input": {"blob": "x".repeat(300 * 1024)}});
    let answer = ask(&client, "sagaflow.start", big.to_string().into_bytes()).await;
    assert_refused(&answer, "too_large", "262144");
    // Over the server's 1 MiB max_payload: the client refuses to send it at all...
    let huge = json!({"v": 2, "saga": "py_transfer", "input": {"blob": "x".repeat(2 << 20)}});
    let refused = client
        .request("sagaflow.start", huge.to_string().into_bytes().into())
        .await
        .expect_err("a 2 MiB request cannot be sent");
    assert_eq!(
        refused.kind(),
        async_nats::RequestErrorKind::MaxPayloadExceeded,
        "{refused}"
    );
    // ... and a client that sends it anyway is cut off by the server.
    let said = raw_oversized_publish(nats.port);
    assert!(said.contains("-ERR 'Maximum Payload Violation'"), "{said}");
    let answer = ask(
        &client,
        "sagaflow.register",
        // A worker of version 1 cannot serve version-2 commands: its definitions are refused.
        json!({"v": 1, "sagas": []}).to_string().into_bytes(),
    )
    .await;
    assert_refused(&answer, "unsupported_version", "version 1");
    let bad_policy = json!({"v": 2, "sagas": [{
        "name": "py_bad", "version": 1, "deadline_ms": null,
        "steps": [{"name": "a", "kind": "compensatable", "timeout_ms": null,
                   "retry": {"initial_interval_ms": 10, "multiplier": 2.0, "max_interval_ms": 100,
                             "max_attempts": 3, "jitter": 7.0},
                   "compensation_retry": {"initial_interval_ms": 10, "multiplier": 2.0,
                                          "max_interval_ms": 100, "max_attempts": 3, "jitter": 0.1}}]
    }]});
    let answer = ask(
        &client,
        "sagaflow.register",
        bad_policy.to_string().into_bytes(),
    )
    .await;
    assert_refused(&answer, "bad_request", "jitter");
    // A secret member in clear is refused before anything is stored (section 17).
    let answer = ask(
        &client,
        "sagaflow.start",
        json!({"v": 2, "saga": "py_transfer", "input": transfer_input(0)})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_refused(&answer, "secret_in_clear", "`reference`");
    assert!(
        store.status_counts().await.unwrap().is_empty(),
        "no bad request started a saga"
    );

    // --- The main run: 20 sagas started on the start subject, all at once. ---
    let ids: Vec<Uuid> = futures::future::join_all((0..SAGAS).map(|i| {
        let client = &client;
        async move { start(client, transfer_input(i), &format!("transfer-{i}")).await }
    }))
    .await;
    // Starting is idempotent on the key.
    assert_eq!(
        start(&client, transfer_input(0), "transfer-0").await,
        ids[0]
    );
    let counts = engine
        .wait_until_settled(Duration::from_secs(60))
        .await
        .expect("status counts");
    let completing = (0..SAGAS).filter(|&i| fate(i) == Fate::Completes).count() as i64;
    assert_eq!(counts.get(SagaStatus::Completed), completing, "{counts:?}");
    assert_eq!(
        counts.get(SagaStatus::Compensated),
        SAGAS as i64 - completing,
        "{counts:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let stored = store.load(*id).await.unwrap().expect("the saga exists");
        let history = store.history(*id).await.unwrap();
        check_saga(i, *id, stored.state.status, &history);
    }
    let worker_db = Database::connect(format!(
        "sqlite://{}?mode=ro",
        scratch.path().join("py_transfer_worker.db").display()
    ))
    .await
    .expect("open the Python worker's SQLite file");
    check_worker_books(&worker_db).await;

    // --- A command delivered again after its saga finished: answered from the record. ---
    let first = ids[0];
    let original = commands
        .lock()
        .unwrap()
        .iter()
        .find(|c| c["saga_id"] == first.to_string() && c["step"] == "debit")
        .cloned()
        .expect("the debit command of the first saga was seen on the wire");
    assert_eq!(original["v"], 2);
    // Routed by partition: the reply goes where the command says, to the partition's owner.
    let partition = store.partition_of(first);
    assert_eq!(original["partition"], partition);
    assert_eq!(
        original["reply_to"],
        names::reply_subject(partition, "py_transfer")
    );
    assert!(original["epoch"].as_u64() >= Some(1), "{original}");
    assert_eq!(original["direction"], "forward");
    assert_eq!(original["attempt"], 1);
    assert_eq!(
        original["command_id"],
        format!("{first}:debit:forward:1"),
        "command ids as the document shows them"
    );
    let recorded_output = store
        .history(first)
        .await
        .unwrap()
        .iter()
        .find(|h| h.kind == RecordKind::AttemptSucceeded && h.step.as_deref() == Some("debit"))
        .map(|h| h.detail["output"].clone())
        .expect("the first saga's debit succeeded");
    publish(
        &js,
        "sagaflow.cmd.py_transfer.debit",
        "test-replay-1",
        original.to_string().into_bytes(),
    )
    .await;
    let give_up = tokio::time::Instant::now() + PATIENCE;
    let answers: Vec<Value> = loop {
        let answers: Vec<Value> = replies
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["command_id"] == original["command_id"])
            .cloned()
            .collect();
        if answers.len() >= 2 || tokio::time::Instant::now() >= give_up {
            break answers;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answers.len(), 2, "the original reply and the replayed one");
    assert_eq!(answers[0]["worker"], WORKER_ID);
    assert_eq!(
        answers[1]["output"], recorded_output,
        "the replay is answered with the recorded outcome, not by running the debit again"
    );
    // The worker's answer carries the same `Nats-Msg-Id` (`reply:{command_id}@{epoch}`, the
    // replay was sent under the same epoch) as the first, so JetStream drops it as a duplicate.
    // A duplicate that gets past the broker (published under another id, as after the duplicate
    // window) is recorded by the engine and ignored.
    let first_reply_to = original["reply_to"]
        .as_str()
        .expect("a command names its reply subject")
        .to_string();
    publish(
        &js,
        &first_reply_to,
        "test-duplicate-reply",
        answers[0].to_string().into_bytes(),
    )
    .await;
    let history = history_until(&store, first, "the duplicate reply is ignored", |h| {
        !records(h, "reply_ignored").is_empty()
    })
    .await;
    let ignored = records(&history, "reply_ignored");
    assert_eq!(
        ignored.len(),
        1,
        "the broker dropped the replayed command's reply: {history:#?}"
    );
    assert_eq!(ignored[0].actor, ACTOR);
    assert_eq!(ignored[0].step.as_deref(), Some("debit"));
    assert_eq!(
        ignored[0].detail,
        json!({"reason": "the saga is already completed", "reply": "succeeded"})
    );
    assert_eq!(
        store.load(first).await.unwrap().unwrap().state.status,
        SagaStatus::Completed
    );
    check_worker_books(&worker_db).await;

    // --- Bad replies on sagaflow.reply.{partition}.py_transfer. ---
    let reply_subject_of = |id: Uuid| names::reply_subject(store.partition_of(id), "py_transfer");
    publish(
        &js,
        &first_reply_to,
        "test-garbage-reply",
        b"\x00\x01 this is not a reply".to_vec(),
    )
    .await;
    publish(
        &js,
        &reply_subject_of(ids[1]),
        "test-malformed-reply",
        json!({"v": 2, "saga_id": ids[1], "status": "exploded"})
            .to_string()
            .into_bytes(),
    )
    .await;
    let mut future_reply = answers[1].clone();
    future_reply["v"] = json!(7);
    future_reply["saga_id"] = json!(ids[2]);
    publish(
        &js,
        &reply_subject_of(ids[2]),
        "test-v7-reply",
        future_reply.to_string().into_bytes(),
    )
    .await;
    for (id, reason) in [
        (ids[1], "malformed reply: missing field `command_id`"),
        (ids[2], "has schema version 7; this engine speaks 2"),
    ] {
        let history = history_until(&store, id, "the bad reply is rejected", |h| {
            !records(h, "message_rejected").is_empty()
        })
        .await;
        let rejected = records(&history, "message_rejected");
        assert_eq!(rejected.len(), 1, "{history:#?}");
        assert_eq!(rejected[0].actor, "engine");
        assert_eq!(rejected[0].detail["source"], reply_subject_of(id));
        let why = rejected[0].detail["reason"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "saga {id}: {why}");
        let status = store.load(id).await.unwrap().unwrap().state.status;
        assert!(status.is_terminal(), "a rejected message changes nothing");
    }

    // --- Bad commands on sagaflow.cmd.py_transfer.*: the Python worker copes. ---
    publish(
        &js,
        "sagaflow.cmd.py_transfer.debit",
        "test-garbage-command",
        b"{\"v\": 1, \"oops\"".to_vec(),
    )
    .await;
    let mut future_command = commands
        .lock()
        .unwrap()
        .iter()
        .find(|c| c["saga_id"] == ids[5].to_string() && c["step"] == "fee")
        .cloned()
        .expect("the fee command of saga 5");
    // A new attempt (its own command id): the answer to the same command id would share the
    // first reply's `Nats-Msg-Id` and be dropped by JetStream as a duplicate.
    future_command["v"] = json!(9);
    future_command["attempt"] = json!(7);
    future_command["command_id"] = json!(format!("{}:fee:forward:7", ids[5]));
    publish(
        &js,
        "sagaflow.cmd.py_transfer.fee",
        "test-v9-command",
        future_command.to_string().into_bytes(),
    )
    .await;
    // A command that names its saga and attempt but breaks the schema is answered with a
    // permanent `malformed_command` error (so a waiting saga's history would show it), then
    // terminated.
    let mut broken_command = commands
        .lock()
        .unwrap()
        .iter()
        .find(|c| c["saga_id"] == ids[6].to_string() && c["step"] == "credit")
        .cloned()
        .expect("the credit command of saga 6");
    broken_command["attempt"] = json!(8);
    broken_command["command_id"] = json!(format!("{}:credit:forward:8", ids[6]));
    broken_command["outputs"] = json!("not an object");
    publish(
        &js,
        "sagaflow.cmd.py_transfer.credit",
        "test-broken-command",
        broken_command.to_string().into_bytes(),
    )
    .await;
    for (id, code) in [
        (ids[5], "unsupported_version"),
        (ids[6], "malformed_command"),
    ] {
        let history = history_until(&store, id, "the worker's refusal arrives", |h| {
            !records(h, "reply_ignored").is_empty()
        })
        .await;
        let ignored = records(&history, "reply_ignored");
        assert_eq!(ignored.len(), 1, "{history:#?}");
        assert_eq!(ignored[0].actor, ACTOR);
        assert_eq!(
            ignored[0].detail,
            json!({
                "reason": "the saga is already completed",
                "reply": {"class": "permanent", "code": code}
            })
        );
    }

    // Nothing loops: both consumers drained, nothing ever redelivered.
    check_replies_drained(&js).await;
    check_drained(&js, "SAGAFLOW_COMMANDS", "sagaflow-worker-py_transfer").await;

    // --- The engine and the Python worker still serve new sagas. ---
    let mut after = Vec::new();
    for i in 0..3 {
        let input =
            json!({"from": format!("after-{i}"), "to": format!("after-dest-{i}"), "amount": 1});
        after.push(start(&client, input, &format!("after-{i}")).await);
    }
    let counts = engine
        .wait_until_settled(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        counts.get(SagaStatus::Completed),
        completing + 3,
        "{counts:?}"
    );
    for id in after {
        let saga = store.load(id).await.unwrap().unwrap();
        assert_eq!(saga.state.status, SagaStatus::Completed, "saga {id}");
    }

    // --- An envelope that does not open: a permanent error naming the member and the key,
    // not a retry loop; nothing was applied, so nothing is compensated. ---
    let mut tampered = sagaflow_tests::sealed(
        json!({"from": "acct-t", "to": "dest-t", "amount": 5, "reference": "ref-t"}),
    );
    tampered["reference"]["$sagaflow_secret"]["ct"] = json!("AAAAAAAAAAAAAAAAAAAAAAAA");
    let id = start_as_is(&client, tampered, "transfer-tampered").await;
    let history = history_until(&store, id, "the tampered saga compensates", |h| {
        !records(h, "saga_compensated").is_empty()
    })
    .await;
    let failed = records(&history, "attempt_failed");
    assert_eq!(failed.len(), 1, "{history:#?}");
    assert_eq!(
        failed[0].detail,
        json!({"class": "permanent", "code": "secret_unreadable"})
    );
    let message = failed[0].error.as_deref().unwrap_or_default();
    assert!(
        message.contains("`reference`") && message.contains("`test-1`"),
        "{message}"
    );
    assert_eq!(
        attempts(&history, "attempt_dispatched", "forward"),
        pairs(&[("debit", 1)])
    );

    let history_kinds = store.history_kind_counts().await.unwrap();
    println!("history records by kind: {history_kinds:?}");

    drop(worker);
    engine.shutdown().await;
    drop(nats);
}

/// A saga id whose partition is `partition` when `want` is true, and another one when false.
fn saga_in(store: &Store, partition: u32, want: bool) -> Uuid {
    loop {
        let id = Uuid::now_v7();
        if (store.partition_of(id) == partition) == want {
            return id;
        }
    }
}

/// The `debit` command of saga `saga_id` (one the engine never started), attempt `attempt`,
/// as the engine node owning the saga's partition under `epoch` would send it: raw JSON of
/// `docs/protocol.md` section 7.1, version 2.
fn crafted_debit(store: &Store, saga_id: Uuid, attempt: u32, epoch: u64, from: &str) -> Value {
    let partition = store.partition_of(saga_id);
    let key = format!("{saga_id}:debit:forward");
    let command = json!({
        "v": 2,
        "command_id": format!("{saga_id}:debit:forward:{attempt}"),
        "saga_id": saga_id,
        "saga": "py_transfer",
        "saga_version": 1,
        "partition": partition,
        "epoch": epoch,
        "reply_to": names::reply_subject(partition, "py_transfer"),
        "step_index": 0,
        "step": "debit",
        "direction": "forward",
        "attempt": attempt,
        "idempotency_key": key,
        "forward_key": key,
        "deadline": null,
        "input": {"from": from, "to": format!("{from}-dest"), "amount": 5},
        "outputs": {},
    });
    // What the engine itself would send, field for field.
    let parsed: sagaflow_protocol::StepCommand =
        serde_json::from_value(command.clone()).expect("a version-2 step command");
    assert_eq!(serde_json::to_value(&parsed).unwrap(), command);
    command
}

/// Every message on `subject` (a core subscription), with its `Nats-Msg-Id`, in arrival order.
async fn capture_with_ids(
    client: &async_nats::Client,
    subject: &str,
) -> Arc<Mutex<Vec<(Option<String>, Value)>>> {
    let mut subscriber = client
        .subscribe(subject.to_string())
        .await
        .expect("subscribe");
    client.flush().await.expect("flush the subscription");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string());
            if let Ok(value) = serde_json::from_slice::<Value>(&message.payload) {
                sink.lock().unwrap().push((id, value));
            }
        }
    });
    seen
}

/// Publishes `command` on the command subject of its step, with the `Nats-Msg-Id` an engine
/// gives it, and returns the one reply to it seen on its `reply_to`, after checking the reply's
/// own `Nats-Msg-Id` (`reply:{command_id}@{epoch}`).
async fn command_and_reply(
    js: &jetstream::Context,
    replies: &Mutex<Vec<(Option<String>, Value)>>,
    command: &Value,
) -> Value {
    let command_id = command["command_id"].as_str().expect("a command id");
    let epoch = command["epoch"].as_u64().expect("an epoch");
    publish(
        js,
        &format!(
            "sagaflow.cmd.py_transfer.{}",
            command["step"].as_str().unwrap()
        ),
        &names::command_message_id(command_id, epoch),
        command.to_string().into_bytes(),
    )
    .await;
    let give_up = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answers: Vec<(Option<String>, Value)> = replies
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, reply)| reply["command_id"] == command_id)
            .cloned()
            .collect();
        if let [(id, reply)] = answers.as_slice() {
            assert_eq!(
                id.as_deref(),
                Some(names::reply_message_id(command_id, epoch).as_str()),
                "{reply}"
            );
            assert_eq!(reply["v"], 2, "{reply}");
            assert_eq!(reply["attempt"], command["attempt"], "{reply}");
            assert_eq!(reply["worker"], WORKER_ID, "{reply}");
            return reply.clone();
        }
        assert!(answers.len() < 2, "one reply per command: {answers:?}");
        if tokio::time::Instant::now() >= give_up {
            panic!(
                "no reply to {command_id} on {} within {PATIENCE:?}",
                command["reply_to"]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_stale_refusal(reply: &Value, partition: u32, epoch: u64, highest: u64) {
    assert_eq!(reply["status"], "failed", "{reply}");
    assert_eq!(reply["error"]["class"], "permanent", "{reply}");
    assert_eq!(reply["error"]["code"], "stale_epoch", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "partition {partition}: epoch {epoch} was superseded by epoch {highest}"
        )),
        "{reply}"
    );
    assert!(reply.get("output").is_none(), "{reply}");
}

/// What the Python worker's SQLite file holds for one idempotency key: ledger rows, recorded
/// results, and whether the account it would debit was ever opened.
async fn effects_of(db: &DatabaseConnection, key: &str, account: &str) -> (i64, i64, bool) {
    let count =
        |table: &str| format!("SELECT COUNT(*) AS n FROM {table} WHERE idempotency_key = '{key}'");
    let ledger: i64 = query(db, &count("ledger")).await[0]
        .try_get("", "n")
        .unwrap();
    let results: i64 = query(db, &count("results")).await[0]
        .try_get("", "n")
        .unwrap();
    let opened = !query(
        db,
        &format!("SELECT balance FROM accounts WHERE name = '{account}'"),
    )
    .await
    .is_empty();
    (ledger, results, opened)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_refuses_commands_of_a_superseded_epoch() {
    require_python_with_nats();
    let nats = NatsServer::start();
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::connect(&db.url)
        .await
        .expect("open the engine's store");
    // Only there to accept the worker's definition (and to drain the replies of sagas it never
    // heard of): every command in this test is crafted by hand.
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
    let js = jetstream::new(client.clone());

    // Two sagas in partition `p`, one in another partition `q`.
    let x = Uuid::now_v7();
    let p = store.partition_of(x);
    let y = saga_in(&store, p, true);
    let z = saga_in(&store, p, false);
    let q = store.partition_of(z);
    // Replies are captured on the `reply_to` of each partition only: one seen there was
    // published where the command said.
    let replies_p = capture_with_ids(&client, &names::reply_subject(p, "py_transfer")).await;
    let replies_q = capture_with_ids(&client, &names::reply_subject(q, "py_transfer")).await;
    let worker_db = Database::connect(format!(
        "sqlite://{}?mode=ro",
        scratch.path().join("py_transfer_worker.db").display()
    ))
    .await
    .expect("open the Python worker's SQLite file");
    let key = |id: Uuid| format!("{id}:debit:forward");

    // Epoch N = 7 in partition p: served, and the debit is applied.
    let n: u64 = 7;
    let reply = command_and_reply(&js, &replies_p, &crafted_debit(&store, x, 1, n, "acct-x")).await;
    assert_eq!(reply["status"], "succeeded", "{reply}");
    assert_eq!(
        reply["output"],
        json!({"account": "acct-x", "amount": 5, "balance": OPENING_BALANCE - 5})
    );
    assert_eq!(
        effects_of(&worker_db, &key(x), "acct-x").await,
        (1, 1, true)
    );

    // Epoch N-1, same partition, another saga: refused, and its handler never ran.
    let reply = command_and_reply(
        &js,
        &replies_p,
        &crafted_debit(&store, y, 1, n - 1, "acct-y"),
    )
    .await;
    assert_stale_refusal(&reply, p, n - 1, n);
    assert_eq!(
        effects_of(&worker_db, &key(y), "acct-y").await,
        (0, 0, false),
        "a stale command runs nothing: no ledger row, no record, not even the account opened"
    );

    // Epoch N-1 for the saga served under N: refused too, not answered from its record.
    let reply = command_and_reply(
        &js,
        &replies_p,
        &crafted_debit(&store, x, 2, n - 1, "acct-x"),
    )
    .await;
    assert_stale_refusal(&reply, p, n - 1, n);
    assert_eq!(
        effects_of(&worker_db, &key(x), "acct-x").await,
        (1, 1, true)
    );

    // Epochs are per partition: a low one in partition q is served.
    let reply = command_and_reply(&js, &replies_q, &crafted_debit(&store, z, 1, 1, "acct-z")).await;
    assert_eq!(reply["status"], "succeeded", "{reply}");
    assert_eq!(
        effects_of(&worker_db, &key(z), "acct-z").await,
        (1, 1, true)
    );

    // Kept in the worker's file, not only in its memory: a restarted worker still refuses.
    drop(worker);
    let worker = start_python_worker(&nats.url, scratch.path()).await;
    let reply = command_and_reply(
        &js,
        &replies_p,
        &crafted_debit(&store, y, 2, n - 1, "acct-y"),
    )
    .await;
    assert_stale_refusal(&reply, p, n - 1, n);
    assert_eq!(
        effects_of(&worker_db, &key(y), "acct-y").await,
        (0, 0, false)
    );

    // A higher epoch raises the highest: served, and N is stale from then on.
    let reply = command_and_reply(
        &js,
        &replies_p,
        &crafted_debit(&store, y, 3, n + 1, "acct-y"),
    )
    .await;
    assert_eq!(reply["status"], "succeeded", "{reply}");
    assert_eq!(
        effects_of(&worker_db, &key(y), "acct-y").await,
        (1, 1, true)
    );
    let w = saga_in(&store, p, true);
    let reply = command_and_reply(&js, &replies_p, &crafted_debit(&store, w, 1, n, "acct-w")).await;
    assert_stale_refusal(&reply, p, n, n + 1);
    assert_eq!(
        effects_of(&worker_db, &key(w), "acct-w").await,
        (0, 0, false)
    );

    let mut epochs = BTreeMap::new();
    for row in query(&worker_db, "SELECT partition_id, epoch FROM worker_epochs").await {
        let partition: i64 = row.try_get("", "partition_id").unwrap();
        let epoch: i64 = row.try_get("", "epoch").unwrap();
        epochs.insert(partition, epoch);
    }
    assert_eq!(
        epochs,
        BTreeMap::from([
            (i64::from(p), i64::try_from(n + 1).unwrap()),
            (i64::from(q), 1)
        ])
    );

    // Every command answered and acknowledged once; the engine dropped the replies (they name
    // no saga of its own).
    check_drained(&js, "SAGAFLOW_COMMANDS", "sagaflow-worker-py_transfer").await;
    check_replies_drained(&js).await;
    drop(worker);
    engine.shutdown().await;
}

/// Step schemas registered by the Python worker, checked by the engine and the CLI.
mod schemas;
