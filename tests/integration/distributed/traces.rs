//! One OpenTelemetry trace per saga across processes: the engine (`sagaflow serve`), the Rust
//! demo worker and the Python worker (`tests/python/transfer_worker.py`) export their spans to
//! an in-process OTLP/HTTP receiver (the Rust processes in protobuf, the Python one in JSON),
//! and every span of a saga must be in the trace whose id is the saga id, linked by the
//! `traceparent` headers of the commands and replies: each attempt's command is sent by an
//! engine span under the transition that dispatched it, handled by a worker span under that,
//! answered by a worker span under the handling, and the reply handled by an engine span under
//! the answer, which the next transition (with its commit) is under. The saga's root span, recorded when it
//! ends, has the id every other span of the saga names.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

use sagaflow_engine::machine::{RecordKind, SagaStatus};
use sagaflow_sdk::protocol::{StepCommand, TraceParent, names};
use sagaflow_tests::otlp::{OtlpReceiver, ReceivedSpan, kind};
use sagaflow_workflows::{OrderMix, PLACE_ORDER, generate_orders};
use serde_json::json;
use uuid::Uuid;

use super::harness::*;
use crate::python_worker::{python_worker_script, require_python_with_nats};

/// The services the processes export as.
const ENGINE: &str = "sagaflow";
const RUST_WORKER: &str = "sagaflow-demo-worker";
const PYTHON_WORKER: &str = "py-transfer-worker";
const PY_TRANSFER: &str = "py_transfer";

/// How long the sagas get to end, and the processes to stop and flush their spans.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_saga_across_the_engine_and_rust_and_python_workers() {
    require_python_with_nats();
    let _turn = SERIAL.lock().await;
    let receiver = OtlpReceiver::start().await;
    let mut cluster = Cluster::traced("traces", &receiver.endpoint()).await;
    let python_log = cluster.log("python");
    let mut python = Proc::spawn(
        "the Python worker",
        Command::new("python3")
            .arg(python_worker_script())
            .args([
                "--nats-url",
                &cluster.nats.urls(),
                "--id",
                "py-traced",
                "--db",
            ])
            .arg(python_log.with_extension("db"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
            .env("SAGAFLOW_SECRET_KEYS", sagaflow_tests::TEST_SECRET_KEYS),
        &python_log,
    );
    cluster.wait_for_line("python", "READY py-traced", 1).await;

    // Two orders (one paid with a declined card: it compensates) and two transfers (one to a
    // closed account: its pivot fails and it compensates; the other retries `notify` once).
    let mut sagas: Vec<(Uuid, &str)> = Vec::new();
    let orders = generate_orders(&OrderMix {
        prefix: "traces".into(),
        count: 2,
        decline_ratio: 0.5,
        seed: 3,
        ..OrderMix::default()
    });
    for order in &orders {
        let input = serde_json::to_value(order).expect("an order as JSON");
        let id = start_saga(&cluster.client, &order.order_id, input).await;
        sagas.push((id, PLACE_ORDER));
    }
    for (key, to) in [("transfer-ok", "dest-1"), ("transfer-closed", "closed-2")] {
        let input = json!({ "from": format!("acct-{key}"), "to": to, "amount": 10 });
        let id = start_saga_of(&cluster.client, PY_TRANSFER, key, input).await;
        sagas.push((id, PY_TRANSFER));
    }
    let mut statuses = HashMap::new();
    for (id, _) in &sagas {
        statuses.insert(*id, wait_finished(&cluster, *id).await);
    }
    assert!(
        statuses.values().any(|s| *s == SagaStatus::Completed)
            && statuses.values().any(|s| *s == SagaStatus::Compensated),
        "the run should hold completed and compensated sagas: {statuses:?}"
    );

    // Stopping flushes what each process still buffers.
    cluster.engine().signal("TERM");
    cluster.worker(0).signal("TERM");
    python.signal("TERM");
    let stopped = [
        ("the engine", cluster.engine().wait_exit(PATIENCE).await),
        ("the worker", cluster.worker(0).wait_exit(PATIENCE).await),
        ("the Python worker", python.wait_exit(PATIENCE).await),
    ];
    for (who, status) in stopped {
        assert!(
            status.is_some(),
            "{who} did not stop within {PATIENCE:?} of SIGTERM"
        );
    }
    assert_eq!(receiver.refused(), 0, "every export must read as OTLP");

    let spans = receiver.spans();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for span in &spans {
        *seen
            .entry((span.service.clone(), span.name.clone()))
            .or_default() += 1;
    }
    println!(
        "traces: {} spans in {} exports: {seen:?}",
        spans.len(),
        receiver.requests()
    );
    for (id, saga) in &sagas {
        let trace: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.trace_id == id.simple().to_string())
            .collect();
        let worker = if *saga == PY_TRANSFER {
            PYTHON_WORKER
        } else {
            RUST_WORKER
        };
        let history = cluster.store.history(*id).await.expect("read a history");
        let dispatched: Vec<(String, String, u32)> = history
            .iter()
            .filter(|r| r.kind == RecordKind::AttemptDispatched)
            .map(|r| {
                (
                    r.step.clone().expect("a dispatch names its step"),
                    r.direction.expect("and its direction").to_string(),
                    r.attempt.expect("and its attempt"),
                )
            })
            .collect();
        check_trace(*id, saga, statuses[id], worker, &dispatched, &trace);
        println!(
            "traces: saga {id} ({saga}, {:?}): {} spans, {} attempts, each engine -> {worker} -> engine",
            statuses[id],
            trace.len(),
            dispatched.len()
        );
    }
}

/// Waits until saga `id` completed or compensated; its status then.
async fn wait_finished(cluster: &Cluster, id: Uuid) -> SagaStatus {
    let give_up = Instant::now() + PATIENCE;
    loop {
        let status = cluster
            .store
            .load(id)
            .await
            .expect("read a saga")
            .map(|stored| stored.state.status);
        if let Some(status @ (SagaStatus::Completed | SagaStatus::Compensated)) = status {
            return status;
        }
        assert!(
            Instant::now() < give_up,
            "saga {id} did not end within {PATIENCE:?}: {status:?}\n{}",
            cluster.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The spans of `trace` as an indented tree (for failure messages).
fn render(trace: &[&ReceivedSpan]) -> String {
    let mut children: BTreeMap<&str, Vec<&ReceivedSpan>> = BTreeMap::new();
    for span in trace {
        children.entry(&span.parent_span_id).or_default().push(span);
    }
    let ids: Vec<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let mut out = String::new();
    fn walk(
        span: &ReceivedSpan,
        depth: usize,
        children: &BTreeMap<&str, Vec<&ReceivedSpan>>,
        out: &mut String,
    ) {
        out.push_str(&format!(
            "{}{} [{}] {} {}/{}/{}\n",
            "  ".repeat(depth),
            span.name,
            span.service,
            span.span_id,
            span.attribute("sagaflow.step").unwrap_or("-"),
            span.attribute("sagaflow.direction").unwrap_or("-"),
            span.attribute("sagaflow.attempt").unwrap_or("-"),
        ));
        for child in children.get(span.span_id.as_str()).into_iter().flatten() {
            walk(child, depth + 1, children, out);
        }
    }
    for span in trace {
        if !ids.contains(&span.parent_span_id.as_str()) {
            if !span.parent_span_id.is_empty() {
                out.push_str(&format!("(parent {} not received)\n", span.parent_span_id));
            }
            walk(span, 0, &children, &mut out);
        }
    }
    out
}

/// Checks one saga's trace: its root, that every span hangs in the tree, and the chain of
/// spans of every attempt it dispatched.
fn check_trace(
    saga_id: Uuid,
    saga: &str,
    status: SagaStatus,
    worker: &str,
    dispatched: &[(String, String, u32)],
    trace: &[&ReceivedSpan],
) {
    let tree = render(trace);
    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let root_id = hex(&TraceParent::root_span_id(saga_id));
    let root = by_id
        .get(root_id.as_str())
        .unwrap_or_else(|| panic!("saga {saga_id}: no root span {root_id}\n{tree}"));
    assert_eq!(root.parent_span_id, "", "the root has no parent\n{tree}");
    assert_eq!(root.service, ENGINE);
    assert_eq!(root.name, format!("saga {saga}"));
    assert_eq!(root.attribute("sagaflow.status"), Some(status.as_str()));
    for span in trace {
        if span.span_id != root_id {
            assert!(
                by_id.contains_key(span.parent_span_id.as_str()),
                "saga {saga_id}: span `{}` of {} has parent {}, which is not in the trace\n{tree}",
                span.name,
                span.service,
                span.parent_span_id
            );
        }
        // A send names only its message: the saga, step, attempt and node are its parent's.
        if span.kind == kind::PRODUCER {
            assert_eq!(span.attribute("sagaflow.node"), None, "{tree}");
        } else {
            assert!(
                span.attribute("sagaflow.node")
                    .is_some_and(|n| !n.is_empty()),
                "span `{}` of {} names no node\n{tree}",
                span.name,
                span.service
            );
        }
    }
    let parent_of = |span: &ReceivedSpan| by_id.get(span.parent_span_id.as_str()).copied();
    let is_transition =
        |span: &ReceivedSpan| span.service == ENGINE && span.name == format!("transition {saga}");
    let start = trace
        .iter()
        .find(|s| is_transition(s) && s.attribute("sagaflow.event") == Some("start"))
        .unwrap_or_else(|| panic!("no transition of the start\n{tree}"));
    assert_eq!(
        start.parent_span_id, root_id,
        "the start is under the root\n{tree}"
    );

    let about = |span: &ReceivedSpan, (step, direction, attempt): &(String, String, u32)| {
        span.attribute("sagaflow.step") == Some(step.as_str())
            && span.attribute("sagaflow.direction") == Some(direction.as_str())
            && span.attribute("sagaflow.attempt") == Some(attempt.to_string().as_str())
    };
    for attempt in dispatched {
        let what = format!("saga {saga_id} {attempt:?}");
        let (step, direction, number) = attempt;
        let direction = direction.parse().expect("a direction's name");
        let command_id = StepCommand::id_for(saga_id, step, direction, *number);
        // The engine sends the command under the transition that dispatched it.
        let sent_id = format!("{command_id}@");
        let send = trace
            .iter()
            .find(|s| {
                s.service == ENGINE
                    && s.kind == kind::PRODUCER
                    && s.attribute("messaging.message.id")
                        .is_some_and(|id| id.starts_with(&sent_id))
            })
            .unwrap_or_else(|| panic!("{what}: no engine span sending the command\n{tree}"));
        assert_eq!(
            send.name,
            format!("send {}", names::command_subject(saga, step))
        );
        assert_eq!(send.attribute("messaging.system"), Some("nats"));
        assert_eq!(send.attribute("messaging.operation.type"), Some("send"));
        let message_id = send
            .attribute("messaging.message.id")
            .unwrap_or_else(|| panic!("{what}: the send names no message id\n{tree}"));
        assert!(
            parent_of(send).is_some_and(is_transition),
            "{what}: the send is not under a transition\n{tree}"
        );
        // The worker handles it under that send...
        let handled = trace
            .iter()
            .find(|s| {
                s.service == worker && s.kind == kind::CONSUMER && s.parent_span_id == send.span_id
            })
            .unwrap_or_else(|| {
                panic!("{what}: no {worker} span handling the command under the send\n{tree}")
            });
        assert!(
            about(handled, attempt),
            "{what}: the handling names another attempt\n{tree}"
        );
        assert_eq!(handled.attribute("messaging.message.id"), Some(message_id));
        assert_eq!(
            handled.attribute("messaging.operation.type"),
            Some("process")
        );
        assert_eq!(handled.attribute("sagaflow.saga"), Some(saga));
        // ...answers under the handling...
        let answer = trace
            .iter()
            .find(|s| {
                s.service == worker
                    && s.kind == kind::PRODUCER
                    && s.parent_span_id == handled.span_id
            })
            .unwrap_or_else(|| panic!("{what}: no {worker} span sending the reply\n{tree}"));
        assert!(
            answer.name.starts_with("send sagaflow.reply."),
            "{what}: {}",
            answer.name
        );
        assert_eq!(
            answer
                .attribute("messaging.message.id")
                .map(|id| id.starts_with(&format!("reply:{command_id}@"))),
            Some(true),
            "{what}\n{tree}"
        );
        // ...and the engine handles the reply under the answer, its transition under that.
        let received = trace
            .iter()
            .find(|s| {
                s.service == ENGINE
                    && s.kind == kind::CONSUMER
                    && s.parent_span_id == answer.span_id
            })
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no engine span handling the reply under the worker's answer\n{tree}"
                )
            });
        assert!(about(received, attempt), "{what}\n{tree}");
        let transition = trace
            .iter()
            .find(|s| is_transition(s) && s.parent_span_id == received.span_id)
            .unwrap_or_else(|| panic!("{what}: no transition under the reply's handling\n{tree}"));
        assert_eq!(transition.attribute("sagaflow.event"), Some("reply"));
        assert_eq!(
            transition.attribute("sagaflow.commit"),
            Some("committed"),
            "{what}: the transition's span covers its commit\n{tree}"
        );
        assert!(
            transition
                .attribute("sagaflow.batch_size")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n >= 1),
            "{what}: the transition's span names its commit's batch size\n{tree}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
