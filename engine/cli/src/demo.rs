//! `sagaflow demo`: the order workflow, embedded, with injected failures.

use crate::common::print_text;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::ops::{self, Disclose, render};
use sagaflow_engine::runtime::{Engine, EngineOptions, this_node};
use sagaflow_engine::store::Store;
use sagaflow_sdk::Timestamp;
use sagaflow_sdk::keys::SecretKeyArgs;
use sagaflow_sdk::protocol::SecretKeys;
use sagaflow_workflows::{
    DEMO_STOCK, FaultPlan, Faults, Inventory, OrderMix, OrderServices, SagaOutcomes, TripMix,
    TripServices, book_trip_saga, check_invariants, generate_orders, generate_trips, install,
    place_order_saga, seed_stock_once,
};
use uuid::Uuid;

use crate::table;

/// Options of `sagaflow demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where sagas and the demo services' tables live: sqlite://FILE or postgres://USER@HOST/DB.
    #[arg(
        long,
        env = "SAGAFLOW_DATABASE_URL",
        default_value = "sqlite://sagaflow-demo.db"
    )]
    database_url: String,
    /// The keys that seal the card numbers (a secret field of the order saga): one `ID:BASE64`
    /// per line, the sealing key first. Without it (and without SAGAFLOW_SECRET_KEYS), the
    /// demo uses sagaflow-demo.keys in the current directory, made on the first run.
    #[command(flatten)]
    keys: SecretKeyArgs,
    /// How many order sagas to run.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// How many trip-booking sagas to run.
    #[arg(long, default_value_t = 40)]
    trips: usize,
    /// Share of orders paid with a card that is declined.
    #[arg(long, default_value_t = 0.15)]
    decline_ratio: f64,
    /// Chance that a service call fails transiently before applying its effect.
    #[arg(long, default_value_t = 0.1)]
    transient: f64,
    /// Chance that a service applies its effect and then fails (a lost reply).
    #[arg(long, default_value_t = 0.03)]
    lost_reply: f64,
    /// Seed for the generated orders and the injected failures.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// How many step attempts run at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Give up waiting for the sagas after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464); the demo then
    /// keeps serving them after its summary, until Ctrl-C or SIGTERM. Off unless given.
    #[arg(long, env = "SAGAFLOW_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let began = Instant::now();
    let node = this_node(None);
    if let Some(addr) = args.metrics_addr {
        sagaflow_sdk::process::serve_metrics(addr, Some(&node.id))?;
        sagaflow_workflows::describe_metrics();
    }
    let store = Store::connect(&args.database_url).await?;
    let db = store.connection().clone();
    install(&db)
        .await
        .context("installing the demo services' tables")?;
    // Stock is seeded once per database, so a rerun after an interruption adds none.
    seed_stock_once(&db, &DEMO_STOCK).await?;
    let inventory = Inventory::new(db.clone(), Faults::none());

    let faults = Faults::new(
        FaultPlan::uniform(args.transient, args.lost_reply)?,
        args.seed,
    );
    let order_services = OrderServices::new(&db, &faults);
    let trip_services = TripServices::new(&db, &faults);
    let sagas = vec![
        place_order_saga(&order_services)?,
        book_trip_saga(&trip_services)?,
    ];
    let secret_keys = match args.keys.keys()? {
        Some(keys) => keys,
        None => std::sync::Arc::new(demo_keys(Path::new(DEMO_KEY_FILE))?),
    };
    let options = EngineOptions {
        worker_concurrency: args.concurrency,
        node: Some(node),
        gauges_every: args.metrics_addr.map(|_| GAUGES_EVERY),
        secret_keys: Some(secret_keys),
        ..EngineOptions::default()
    };
    let engine = Engine::launch(store.clone(), sagas, options).await?;

    // The inventory service releases reservations whose hold expired.
    let expiry = {
        let inventory = inventory.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(error) = inventory.release_expired(Timestamp::now()).await {
                    tracing::warn!(%error, "releasing expired reservations failed");
                }
            }
        })
    };

    let orders = generate_orders(&OrderMix {
        prefix: "order".into(),
        count: args.orders,
        skus: DEMO_STOCK.iter().map(|(sku, _)| sku.to_string()).collect(),
        max_quantity: 3,
        unit_price_cents: 1999,
        decline_ratio: args.decline_ratio,
        seed: args.seed,
    });
    let trips = generate_trips(&TripMix {
        prefix: "trip".into(),
        count: args.trips,
        sold_out_ratio: 0.2,
        seed: args.seed,
    });
    print_text(format_args!(
        "Starting {} order sagas and {} trip sagas on {} ...",
        orders.len(),
        trips.len(),
        describe(&args.database_url)
    ))?;
    let starts = orders
        .iter()
        .map(|o| ("place_order", o.order_id.clone(), o.to_json()))
        .chain(
            trips
                .iter()
                .map(|t| ("book_trip", t.trip_id.clone(), t.to_json())),
        );
    let engine_ref = &engine;
    let started: Vec<(String, String, Uuid)> = futures::stream::iter(starts)
        .map(|(saga, key, input)| async move {
            let id = engine_ref.start(saga, input, Some(key.clone())).await?;
            Ok::<_, sagaflow_engine::EngineError>((saga.to_string(), key, id))
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let counts = engine
        .wait_until_settled(Duration::from_secs(args.timeout_secs))
        .await?;
    expiry.abort();
    // With metrics on, the engine stays up (idle) so its gauges stay current while scraped.
    let engine = match args.metrics_addr {
        Some(_) => Some(engine),
        None => {
            engine.shutdown().await;
            None
        }
    };
    let active = counts.active();
    if active > 0 {
        bail!(
            "{active} sagas still active after {} s; run the demo again to continue them",
            args.timeout_secs
        );
    }

    let loaded = store
        .load_many(&started.iter().map(|(_, _, id)| *id).collect::<Vec<_>>())
        .await?;
    let states: BTreeMap<Uuid, SagaStatus> = loaded
        .iter()
        .map(|s| (s.state.saga_id, s.state.status))
        .collect();
    let history_lengths: BTreeMap<Uuid, i64> = loaded
        .iter()
        .map(|s| (s.state.saga_id, s.history_seq))
        .collect();
    let mut outcomes = SagaOutcomes::default();
    let mut by_saga: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    for (saga, key, id) in &started {
        let status = states.get(id).copied().unwrap_or(SagaStatus::Created);
        *by_saga.entry((saga.clone(), status.as_str())).or_default() += 1;
        let list = match (saga.as_str(), status) {
            ("place_order", SagaStatus::Completed) => &mut outcomes.completed_orders,
            ("place_order", SagaStatus::Compensated) => &mut outcomes.compensated_orders,
            ("book_trip", SagaStatus::Completed) => &mut outcomes.completed_trips,
            ("book_trip", SagaStatus::Compensated) => &mut outcomes.compensated_trips,
            _ => continue,
        };
        list.push(key.clone());
    }

    let kinds = store.history_kind_counts().await?;
    let kind = |k: &str| kinds.get(k).copied().unwrap_or(0);
    print_text(format_args!(
        "\nSummary ({:.1} s)",
        began.elapsed().as_secs_f64()
    ))?;
    let rows: Vec<Vec<String>> = by_saga
        .iter()
        .map(|((saga, status), n)| vec![saga.clone(), status.to_string(), n.to_string()])
        .collect();
    print_text(table::render(&["saga", "status", "count"], &rows))?;
    print_text(format_args!(
        "\nattempts dispatched: {}   retries scheduled: {}   attempts timed out: {}   \
         replies ignored: {}   failures injected this run: {}",
        kind("attempt_dispatched"),
        kind("retry_scheduled"),
        kind("attempt_timed_out"),
        kind("reply_ignored"),
        faults.injected_total()
    ))?;

    if let Some((_, key, id)) = pick_compensated(&started, &states, &history_lengths) {
        let view = ops::history(&store, *id)
            .await?
            .disclose(&ops::Disclosure::Redacted);
        print_text(format_args!("\nA compensated saga (start key {key}):"))?;
        print_text(render::history_table(&view))?;
    }

    let report = check_invariants(&db, &outcomes).await?;
    print_text(format_args!(
        "\nInvariant check over the demo services:\n{report}"
    ))?;
    if !report.is_ok() {
        bail!("{} invariant violations", report.violations.len());
    }
    if let (Some(engine), Some(addr)) = (engine, args.metrics_addr) {
        print_text(format_args!(
            "\nServing metrics at http://{addr}/metrics until Ctrl-C or SIGTERM"
        ))?;
        sagaflow_sdk::process::termination().await;
        engine.shutdown().await;
    }
    Ok(())
}

/// How often the demo's gauges are refreshed while it serves metrics.
const GAUGES_EVERY: Duration = Duration::from_secs(1);

/// Where the demo keeps its key when none is given.
const DEMO_KEY_FILE: &str = "sagaflow-demo.keys";

/// The demo's keys from `path`, made there (readable by this user only) on the first run.
fn demo_keys(path: &Path) -> anyhow::Result<SecretKeys> {
    if !path.exists() {
        let line = SecretKeys::generate_line("demo-1")?;
        let text = format!(
            "# Keys of the demo's secret fields (the card numbers): ID:BASE64, the sealing key \
             first.\n{line}\n"
        );
        write_private(path, &text)
            .with_context(|| format!("cannot write the demo's key file {}", path.display()))?;
        eprintln!(
            "made {} to seal the card numbers; `sagaflow show ID --reveal --secret-keys {}` \
             shows them",
            path.display(),
            path.display()
        );
    }
    Ok(SecretKeys::from_file(path)?)
}

/// Writes `text` to a new file at `path` that only this user can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

/// The compensated order saga with the longest history: the most interesting one to read.
fn pick_compensated<'a>(
    started: &'a [(String, String, Uuid)],
    states: &BTreeMap<Uuid, SagaStatus>,
    history_lengths: &BTreeMap<Uuid, i64>,
) -> Option<&'a (String, String, Uuid)> {
    started
        .iter()
        .filter(|(saga, _, id)| {
            saga == "place_order" && states.get(id) == Some(&SagaStatus::Compensated)
        })
        .max_by_key(|(_, _, id)| history_lengths.get(id).copied().unwrap_or(0))
}

fn describe(url: &str) -> String {
    if url.starts_with("postgres") {
        "PostgreSQL".into()
    } else {
        format!("SQLite ({url})")
    }
}
