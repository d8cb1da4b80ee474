//! `/metrics` of the embedded demo: every series `docs/metrics.md` promises for it is served,
//! parses as the Prometheus text format, keeps its name, type and labels (a snapshot), and
//! counts what the database holds. The distributed engine's and worker's metrics are checked
//! by the distributed fault tests (`distributed::commands_and_replies_delivered_twice_apply_once`).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sagaflow_tests::metrics::{Scrape, documented_series, free_metrics_addr, scrape};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::build_binary;

/// How long the demo may take to print its summary.
const DEMO_PATIENCE: Duration = Duration::from_secs(180);

async fn count(db: &DatabaseConnection, sql: &str) -> f64 {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: no row"));
    row.try_get_by_index::<i64>(0)
        .unwrap_or_else(|e| panic!("{sql}: {e}")) as f64
}

async fn records(db: &DatabaseConnection, kind: &str) -> f64 {
    count(
        db,
        &format!("SELECT COUNT(*) FROM saga_history WHERE kind = '{kind}'"),
    )
    .await
}

/// The families of a scrape as snapshot lines: `name type [labels]`, the `node` label left out
/// of nothing (its value changes, its name does not).
pub fn family_lines(scrape: &Scrape) -> Vec<String> {
    scrape
        .families()
        .into_iter()
        .map(|(name, (kind, labels))| {
            let labels: Vec<String> = labels.into_iter().collect();
            format!("{name} {kind} [{}]", labels.join(", "))
        })
        .collect()
}

/// Asserts that `scrape` holds every series documented as served by `process`, and that the
/// whole text was read by the parser.
pub fn assert_documented(scrape: &Scrape, process: &str) {
    let families = scrape.families();
    let missing: Vec<String> = documented_series()
        .into_iter()
        .filter(|(_, served_by)| served_by.contains(process))
        .map(|(name, _)| name)
        .filter(|name| !families.contains_key(name))
        .collect();
    assert!(
        missing.is_empty(),
        "{process}: /metrics lacks documented series {missing:?}\n{}",
        scrape.text
    );
    let undocumented: Vec<&String> = families
        .keys()
        .filter(|name| !documented_series().contains_key(*name))
        .collect();
    assert!(
        undocumented.is_empty(),
        "{process}: /metrics serves series docs/metrics.md does not list: {undocumented:?}"
    );
    let (lines, parsed) = scrape.lines_and_parsed();
    assert_eq!(
        lines, parsed,
        "{process}: the parser read {parsed} of {lines} sample lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_every_documented_series_and_counts_what_the_database_holds() {
    let binary = build_binary("sagaflow-cli", "sagaflow");
    let dir = tempfile::tempdir().expect("a temporary folder");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("demo.db").display());
    let addr = free_metrics_addr();
    let mut child = tokio::process::Command::new(&binary)
        .args(["demo", "--database-url", &url])
        .args(["--orders", "120", "--trips", "20", "--timeout-secs", "150"])
        .args(["--metrics-addr", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the demo");
    let stdout = child.stdout.take().expect("the demo's stdout");
    let mut lines = BufReader::new(stdout).lines();
    let give_up = Instant::now() + DEMO_PATIENCE;
    let mut printed = String::new();
    loop {
        let line = tokio::time::timeout_at(give_up.into(), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the demo printed no summary in time:\n{printed}"))
            .expect("read the demo's output");
        let Some(line) = line else {
            panic!("the demo ended before serving its metrics:\n{printed}");
        };
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("Serving metrics at") {
            break;
        }
    }

    let db = Database::connect(&url)
        .await
        .expect("open the demo's database");
    let stuck = count(&db, "SELECT COUNT(*) FROM sagas WHERE status = 'stuck'").await;
    // The gauges are read every second: wait for a reading taken after the last saga settled.
    let metrics = {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = scrape(addr);
            let settled = metrics.sum("sagaflow_sagas", &[("status", "running")]) == 0.0
                && metrics.sum("sagaflow_sagas", &[("status", "created")]) == 0.0
                && metrics.sum("sagaflow_sagas", &[("status", "compensating")]) == 0.0
                && metrics.sum("sagaflow_stuck_sagas", &[]) == stuck;
            if settled || Instant::now() > give_up {
                break metrics;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_documented(&metrics, "demo");
    insta::assert_snapshot!("demo_metric_families", family_lines(&metrics).join("\n"));

    let sum = |name: &str, labels: &[(&str, &str)]| metrics.sum(name, labels);
    let mut compared: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    compared.insert(
        "sagas started",
        (
            sum("sagaflow_sagas_started_total", &[]),
            count(&db, "SELECT COUNT(*) FROM sagas").await,
        ),
    );
    compared.insert(
        "sagas completed",
        (
            sum("sagaflow_sagas_completed_total", &[]),
            count(&db, "SELECT COUNT(*) FROM sagas WHERE status = 'completed'").await,
        ),
    );
    compared.insert(
        "sagas compensated",
        (
            sum("sagaflow_sagas_compensated_total", &[]),
            count(
                &db,
                "SELECT COUNT(*) FROM sagas WHERE status = 'compensated'",
            )
            .await,
        ),
    );
    compared.insert(
        "stuck sagas",
        (sum("sagaflow_sagas", &[("status", "stuck")]), stuck),
    );
    compared.insert(
        "compensations started",
        (
            sum("sagaflow_compensations_started_total", &[]),
            records(&db, "compensation_started").await,
        ),
    );
    compared.insert(
        "attempts succeeded",
        (
            sum("sagaflow_step_attempts_total", &[("outcome", "succeeded")]),
            records(&db, "attempt_succeeded").await,
        ),
    );
    compared.insert(
        "attempts failed",
        (
            sum(
                "sagaflow_step_attempts_total",
                &[("outcome", "failed_retryable")],
            ) + sum(
                "sagaflow_step_attempts_total",
                &[("outcome", "failed_permanent")],
            ),
            records(&db, "attempt_failed").await,
        ),
    );
    compared.insert(
        "attempts timed out",
        (
            sum("sagaflow_step_attempts_total", &[("outcome", "timed_out")]),
            records(&db, "attempt_timed_out").await,
        ),
    );
    compared.insert(
        "retries scheduled",
        (
            sum("sagaflow_retries_scheduled_total", &[]),
            records(&db, "retry_scheduled").await,
        ),
    );
    compared.insert(
        "replies ignored",
        (
            sum("sagaflow_replies_ignored_total", &[]),
            records(&db, "reply_ignored").await,
        ),
    );
    compared.insert(
        "stale writes",
        (sum("sagaflow_stale_writes_total", &[]), 0.0),
    );
    compared.insert(
        "attempts timed (dispatch to reply)",
        (
            sum("sagaflow_step_attempt_duration_seconds_count", &[]),
            records(&db, "attempt_succeeded").await + records(&db, "attempt_failed").await,
        ),
    );
    compared.insert(
        "reservations created",
        (
            sum("sagaflow_demo_reservations_total", &[("event", "created")]),
            count(
                &db,
                "SELECT COUNT(*) FROM demo_reservations WHERE quantity > 0",
            )
            .await,
        ),
    );
    compared.insert(
        "reservations confirmed",
        (
            sum(
                "sagaflow_demo_reservations_total",
                &[("event", "confirmed")],
            ),
            count(
                &db,
                "SELECT COUNT(*) FROM demo_reservations WHERE state = 'committed'",
            )
            .await,
        ),
    );
    compared.insert(
        "reservations released",
        (
            sum("sagaflow_demo_reservations_total", &[("event", "released")]),
            count(
                &db,
                "SELECT COUNT(*) FROM demo_reservations WHERE state = 'released' AND quantity > 0",
            )
            .await,
        ),
    );
    compared.insert(
        "reservations expired",
        (
            sum("sagaflow_demo_reservations_total", &[("event", "expired")]),
            count(
                &db,
                "SELECT COUNT(*) FROM demo_reservations WHERE state = 'expired'",
            )
            .await,
        ),
    );
    compared.insert(
        "partitions owned",
        (
            sum("sagaflow_partitions_owned", &[]),
            count(&db, "SELECT COUNT(*) FROM partition_leases").await,
        ),
    );
    let differ: Vec<_> = compared.iter().filter(|(_, (m, d))| m != d).collect();
    println!("demo metrics against the database: {compared:?}");
    assert!(
        differ.is_empty(),
        "metrics that disagree with the database (metric, database): {differ:?}"
    );
    // The demo's failures make these non-zero: a zero would mean the counting is not wired.
    assert!(sum("sagaflow_compensations_started_total", &[]) > 0.0);
    assert!(sum("sagaflow_retries_scheduled_total", &[]) > 0.0);
    assert!(sum("sagaflow_step_queue_seconds_count", &[]) > 0.0);

    child.start_kill().expect("stop the demo");
    let _ = child.wait().await;
}

/// The series an expression names: every `sagaflow_...` identifier, a histogram's `_bucket`,
/// `_sum` and `_count` taken back to the histogram's own name.
fn series_named(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("sagaflow_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        found.push(base.to_string());
        rest = &tail[end..];
    }
    found
}

#[test]
fn every_expression_of_the_dashboard_names_documented_series() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let documented = documented_series();
    let mut expressions = 0;
    let mut named = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            expressions += 1;
            let series = series_named(expr);
            assert!(!series.is_empty(), "`{expr}` names no Sagaflow series");
            for name in series {
                assert!(
                    documented.contains_key(&name),
                    "panel `{}`: `{expr}` names `{name}`, which docs/metrics.md does not list",
                    panel["title"]
                );
                named.insert(name);
            }
        }
    }
    // The panels: throughput, compensation rate, stuck backlog, lag, takeovers.
    for needed in [
        "sagaflow_sagas_started_total",
        "sagaflow_compensations_started_total",
        "sagaflow_stuck_sagas",
        "sagaflow_consumer_pending_messages",
        "sagaflow_lease_takeovers_total",
    ] {
        assert!(
            named.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }
    println!(
        "dashboard: {expressions} expressions over {} series",
        named.len()
    );
}
