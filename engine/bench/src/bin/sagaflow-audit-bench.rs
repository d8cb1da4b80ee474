//! How fast the operator and audit queries answer on a large history.
//!
//! Loads (once) `--sagas` finished and unfinished order sagas with `--history-per-saga` history
//! rows each into a PostgreSQL database (10 million history rows by default), then times the
//! library calls behind `sagaflow history`, `list`, `stuck` and `audit`, each `--runs` times.
//!
//! ```sh
//! createdb -h 127.0.0.1 -U postgres sagaflow_audit_bench
//! cargo run --release -p sagaflow-bench --bin sagaflow-audit-bench -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/sagaflow_audit_bench
//! ```
//!
//! The data is generated inside PostgreSQL (`generate_series`), so loading 10 million rows
//! takes minutes, not hours; a second run reuses it (`--reload` starts over).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sagaflow_engine::machine::{RecordKind, SagaState, SagaStatus};
use sagaflow_engine::ops::{
    self, ActorFilter, AuditFilter, ListFilter, Page, StuckQuery, TimeRange,
};
use sagaflow_engine::store::Store;
use sagaflow_sdk::{
    Compensate, Direction, Saga, Step, StepContext, StepError, StepHandler, Timestamp,
};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Time the operator and audit queries on millions of history rows.
#[derive(Debug, Parser)]
#[command(name = "sagaflow-audit-bench", version, about)]
struct Args {
    /// A PostgreSQL database for the benchmark's data (created beforehand, used only by it).
    #[arg(long)]
    database_url: String,
    /// Sagas to load.
    #[arg(long, default_value_t = 1_000_000)]
    sagas: u64,
    /// History rows per saga.
    #[arg(long, default_value_t = 10)]
    history_per_saga: u64,
    /// Times each query runs.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Delete the loaded data and load it again.
    #[arg(long)]
    reload: bool,
    /// Print only the JSON lines.
    #[arg(long)]
    json: bool,
}

/// The sagas span this many days, ending now.
const SPAN_DAYS: i64 = 30;
const DAY_MS: i64 = 86_400_000;
/// Sagas loaded per statement (so the load shows progress).
const LOAD_CHUNK: u64 = 100_000;

struct Noop;

impl StepHandler for Noop {
    type Input = Value;
    type Output = Value;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
}

impl Compensate for Noop {
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _input: Value,
        _output: Option<Value>,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// The shape of the loaded sagas: the order saga of the examples.
fn order_saga() -> Result<Saga> {
    Ok(Saga::builder("place_order", 1)
        .step(Step::compensatable("reserve_inventory", Noop))
        .step(Step::compensatable("authorize_payment", Noop))
        .step(Step::pivot("confirm_order", Noop))
        .step(Step::retriable("request_shipment", Noop))
        .build()?)
}

#[derive(Debug, Serialize)]
struct Timing {
    query: &'static str,
    rows: usize,
    runs: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let store = Store::connect(&args.database_url).await?;
    if store.backend() != DbBackend::Postgres {
        bail!(
            "the audit benchmark loads its data with PostgreSQL's generate_series: give a PostgreSQL URL"
        );
    }
    let saga = order_saga()?;
    store.register_definition(saga.spec()).await?;
    let now = Timestamp::now().as_millis();
    let loaded = load(&store, &args, now, &progress_template(&saga)?).await?;

    let sample_ids = sample_ids(&store, args.runs).await?;
    let mut timings = Vec::new();
    let runs = args.runs;
    let page = Page::default();
    let since = |days: i64| Some(Timestamp(loaded.newest - days * DAY_MS));

    timings.push(
        time("history <id>", runs, |i| {
            let id = sample_ids[i % sample_ids.len()];
            let store = &store;
            async move { Ok(ops::history(store, id).await?.entries.len()) }
        })
        .await?,
    );
    let lists: Vec<(&'static str, ListFilter)> = vec![
        ("list (no filter)", ListFilter::default()),
        (
            "list --status compensated",
            ListFilter {
                statuses: vec![SagaStatus::Compensated],
                ..ListFilter::default()
            },
        ),
        (
            "list --status stuck",
            ListFilter {
                statuses: vec![SagaStatus::Stuck],
                ..ListFilter::default()
            },
        ),
        (
            "list --name place_order --created-since 7d",
            ListFilter {
                name: Some("place_order".into()),
                created: TimeRange {
                    from: since(7),
                    until: None,
                },
                ..ListFilter::default()
            },
        ),
        (
            "list --step authorize_payment",
            ListFilter {
                current_step: Some("authorize_payment".into()),
                ..ListFilter::default()
            },
        ),
        (
            "list --status compensated --error declined",
            ListFilter {
                statuses: vec![SagaStatus::Compensated],
                error_contains: Some("declined".into()),
                ..ListFilter::default()
            },
        ),
        (
            // One saga in a hundred matches, and no other filter narrows.
            "list --error exhausted",
            ListFilter {
                error_contains: Some("exhausted".into()),
                ..ListFilter::default()
            },
        ),
        (
            "list --updated-since 24h",
            ListFilter {
                updated: TimeRange {
                    from: since(1),
                    until: None,
                },
                ..ListFilter::default()
            },
        ),
        (
            "list --start-key order-<n>",
            ListFilter {
                start_key: Some(format!("order-{}", args.sagas / 2)),
                ..ListFilter::default()
            },
        ),
    ];
    for (name, filter) in &lists {
        timings.push(
            time(name, runs, |_| {
                let (store, page) = (&store, &page);
                async move { Ok(ops::list(store, filter, page).await?.sagas.len()) }
            })
            .await?,
        );
    }
    // The tenth page of a filtered listing, through the cursors.
    let compensated = &lists[1].1;
    let mut cursor = None;
    for _ in 0..9 {
        let page = Page {
            limit: page.limit,
            after: cursor,
        };
        cursor = ops::list(&store, compensated, &page).await?.next;
    }
    let tenth = Page {
        limit: page.limit,
        after: cursor,
    };
    timings.push(
        time("list --status compensated (page 10)", runs, |_| {
            let (store, page) = (&store, &tenth);
            async move { Ok(ops::list(store, compensated, page).await?.sagas.len()) }
        })
        .await?,
    );
    let stuck_query = StuckQuery {
        threshold: Duration::from_secs(3_600),
        now: Timestamp(loaded.newest),
        limit: 50,
    };
    timings.push(
        time("stuck --threshold 1h", runs, |_| {
            let (store, query) = (&store, &stuck_query);
            async move { Ok(ops::stuck(store, query).await?.sagas.len()) }
        })
        .await?,
    );
    let audits: Vec<(&'static str, AuditFilter)> = vec![
        (
            "audit --saga <id>",
            AuditFilter {
                saga_id: sample_ids.first().copied(),
                ..AuditFilter::default()
            },
        ),
        (
            "audit compensations of authorize_payment since 7d",
            AuditFilter {
                kinds: vec![RecordKind::AttemptSucceeded],
                step: Some("authorize_payment".into()),
                direction: Some(Direction::Compensate),
                at: TimeRange {
                    from: since(7),
                    until: None,
                },
                ..AuditFilter::default()
            },
        ),
        (
            "audit --actor operator: (every operator action)",
            AuditFilter {
                actor: Some(ActorFilter::operators()),
                ..AuditFilter::default()
            },
        ),
        (
            "audit --name place_order, one day",
            AuditFilter {
                saga_name: Some("place_order".into()),
                at: TimeRange {
                    from: since(3),
                    until: since(2),
                },
                ..AuditFilter::default()
            },
        ),
    ];
    for (name, filter) in &audits {
        timings.push(
            time(name, runs, |_| {
                let (store, page) = (&store, &page);
                async move { Ok(ops::audit(store, filter, page).await?.entries.len()) }
            })
            .await?,
        );
    }

    for timing in &timings {
        println!("{}", serde_json::to_string(timing)?);
    }
    if !args.json {
        println!(
            "\n{} sagas, {} history rows (PostgreSQL)\n",
            loaded.sagas, loaded.history_rows
        );
        println!(
            "{:<52} {:>5} {:>9} {:>9} {:>9}",
            "query", "rows", "p50 ms", "p99 ms", "max ms"
        );
        for t in &timings {
            println!(
                "{:<52} {:>5} {:>9.2} {:>9.2} {:>9.2}",
                t.query, t.rows, t.p50_ms, t.p99_ms, t.max_ms
            );
        }
    }
    Ok(())
}

struct Loaded {
    sagas: i64,
    history_rows: i64,
    /// The latest creation time loaded (queries are relative to it, so a reused load gives
    /// the same answers).
    newest: i64,
}

async fn scalar(store: &Store, sql: &str) -> Result<i64> {
    let row = store
        .connection()
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?
        .context("a row")?;
    Ok(row.try_get_by_index::<Option<i64>>(0)?.unwrap_or_default())
}

async fn execute(store: &Store, sql: String) -> Result<()> {
    store
        .connection()
        .execute_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await?;
    Ok(())
}

/// Loads the data unless it is there already.
async fn load(store: &Store, args: &Args, now: i64, progress: &str) -> Result<Loaded> {
    if args.reload {
        execute(store, "TRUNCATE sagas CASCADE".into()).await?;
    }
    let present = scalar(store, "SELECT COUNT(*) FROM sagas").await?;
    if present == 0 {
        let began = Instant::now();
        let n = args.sagas;
        let spacing = (SPAN_DAYS * DAY_MS) / n.max(1) as i64;
        let start = now - SPAN_DAYS * DAY_MS;
        let mut from = 1;
        while from <= n {
            let to = (from + LOAD_CHUNK - 1).min(n);
            execute(store, sagas_sql(from, to, start, spacing, progress)).await?;
            execute(
                store,
                history_sql(from, to, args.history_per_saga, start, spacing),
            )
            .await?;
            eprintln!(
                "loaded {to} of {n} sagas ({:.0} s)",
                began.elapsed().as_secs_f64()
            );
            from = to + 1;
        }
        execute(store, "VACUUM ANALYZE sagas".into()).await?;
        execute(store, "VACUUM ANALYZE saga_history".into()).await?;
        eprintln!("loaded in {:.0} s", began.elapsed().as_secs_f64());
    }
    Ok(Loaded {
        sagas: scalar(store, "SELECT COUNT(*) FROM sagas").await?,
        history_rows: scalar(store, "SELECT COUNT(*) FROM saga_history").await?,
        newest: scalar(store, "SELECT MAX(created_at) FROM sagas").await?,
    })
}

/// The saga id of number `g`, a valid UUID.
const ID: &str = "(md5('saga' || g::text))::uuid::text";

/// Sagas `from..=to`: 85% completed, 12% compensated (declined cards), 2% running, 1% stuck.
fn sagas_sql(from: u64, to: u64, start: i64, spacing: i64, progress: &str) -> String {
    format!(
        "INSERT INTO sagas (id, name, definition_version, status, current_step, start_key, input, \
           outputs, progress, last_error, wake_at, row_version, history_seq, created_at, updated_at) \
         SELECT {ID}, 'place_order', 1, \
           CASE WHEN g % 100 < 85 THEN 'completed' WHEN g % 100 < 97 THEN 'compensated' \
                WHEN g % 100 < 99 THEN 'running' ELSE 'stuck' END, \
           CASE WHEN g % 100 = 99 THEN '1' WHEN g % 100 >= 97 THEN '2' END, \
           'order-' || g, '{{}}', '{{}}', replace('{progress}', '{nil}', {ID}), \
           CASE WHEN g % 100 = 99 THEN 'compensation of authorize_payment exhausted its retry policy' \
                WHEN g % 100 >= 85 THEN 'authorize_payment failed: card declined (code 51)' END, \
           CASE WHEN g % 100 BETWEEN 97 AND 98 THEN {start} + g * {spacing} + 30000 END, \
           10, 10, {start} + g * {spacing}, {start} + g * {spacing} + 1500 + (g % 7) * 100 \
         FROM generate_series(CAST({from} AS bigint), CAST({to} AS bigint)) AS g",
        nil = Uuid::nil(),
    )
}

/// The progress document of a saga that was just created (as the store writes it: the state
/// without input and outputs), with the nil id where each row's id goes.
fn progress_template(saga: &Saga) -> Result<String> {
    let state = SagaState::new(Uuid::nil(), saga.spec(), Value::Null, Timestamp(0));
    let mut progress = serde_json::to_value(&state)?;
    if let Some(map) = progress.as_object_mut() {
        map.remove("input");
        map.remove("outputs");
    }
    Ok(progress.to_string().replace('\'', "''"))
}

/// `per_saga` history rows for each saga: the start, dispatches and successes by the engine and
/// the worker, compensations for the compensated, an operator action now and then.
fn history_sql(from: u64, to: u64, per_saga: u64, start: i64, spacing: i64) -> String {
    // The second half of a compensated saga's history undoes its steps, latest first.
    let compensating = format!("g % 100 BETWEEN 85 AND 96 AND s > {per_saga} / 2");
    format!(
        "INSERT INTO saga_history (saga_id, seq, at, kind, step_name, direction, attempt, payload, \
           error, actor) \
         SELECT {ID}, s, {start} + g * {spacing} + s * 150, \
           CASE WHEN s = 1 THEN 'saga_started' \
                WHEN g % 1000 = 7 AND s = {per_saga} THEN 'operator_action' \
                WHEN s % 2 = 0 THEN 'attempt_dispatched' ELSE 'attempt_succeeded' END, \
           CASE WHEN s = 1 THEN NULL WHEN {compensating} \
                THEN (ARRAY['reserve_inventory', 'authorize_payment'])[1 + (({per_saga} - s) / 2) % 2] \
                ELSE (ARRAY['reserve_inventory', 'authorize_payment', 'confirm_order', \
                'request_shipment'])[1 + (s / 2) % 4] END, \
           CASE WHEN s = 1 THEN NULL WHEN {compensating} THEN 'compensate' ELSE 'forward' END, \
           CASE WHEN s = 1 THEN NULL ELSE 1 END, \
           CASE WHEN s = 1 THEN '{{\"input\":{{}}}}' END, NULL, \
           CASE WHEN g % 1000 = 7 AND s = {per_saga} THEN 'operator:oncall' \
                WHEN s % 2 = 1 AND s > 1 THEN 'worker:w1' ELSE 'engine' END \
         FROM generate_series(CAST({from} AS bigint), CAST({to} AS bigint)) AS g, generate_series(1, {per_saga}) AS s"
    )
}

/// Ids of `count` sagas spread over the loaded range.
async fn sample_ids(store: &Store, count: usize) -> Result<Vec<Uuid>> {
    let rows = store
        .connection()
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT id FROM sagas TABLESAMPLE SYSTEM (1) LIMIT {count}"),
        ))
        .await?;
    let mut ids = Vec::new();
    for row in rows {
        ids.push(Uuid::parse_str(&row.try_get_by_index::<String>(0)?)?);
    }
    if ids.is_empty() {
        bail!("no sagas loaded");
    }
    Ok(ids)
}

/// Runs `query` `runs` times (after one warm-up run) and reports its latencies.
async fn time<F, Fut>(name: &'static str, runs: usize, mut query: F) -> Result<Timing>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<usize>>,
{
    let rows = query(0).await?;
    let mut took = Vec::with_capacity(runs);
    for i in 0..runs.max(1) {
        let began = Instant::now();
        query(i).await?;
        took.push(began.elapsed().as_secs_f64() * 1_000.0);
    }
    took.sort_by(f64::total_cmp);
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    Ok(Timing {
        query: name,
        rows,
        runs: took.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    })
}
