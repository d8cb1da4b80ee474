//! `sagaflow audit`: history records of every saga, by saga, name, kind, step, actor and time;
//! `--jsonl` exports them all.

use sagaflow_engine::machine::RecordKind;
use sagaflow_engine::ops::{
    self, ActorFilter, AuditFilter, Cursor, Disclose, Page, TimeRange, render,
};
use sagaflow_sdk::{Direction, Timestamp};
use uuid::Uuid;

use crate::common::{DatabaseArgs, RevealArgs, instant, named, print_json, print_text};

/// Options of `sagaflow audit`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct AuditArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Only records of this saga.
    #[arg(long)]
    saga: Option<Uuid>,
    /// Only records of sagas of this definition name.
    #[arg(long)]
    name: Option<String>,
    /// Only records of this kind (repeat it, or separate with commas, for several).
    #[arg(long, value_delimiter = ',', value_parser = named::<RecordKind>())]
    kind: Vec<RecordKind>,
    /// Only records about this step.
    #[arg(long)]
    step: Option<String>,
    /// Only records in this direction.
    #[arg(long, value_parser = named::<Direction>())]
    direction: Option<Direction>,
    /// Only records by exactly this actor (engine, worker:ID, operator:NAME).
    #[arg(long, conflicts_with_all = ["actor_prefix", "operators"])]
    actor: Option<String>,
    /// Only records by actors whose name starts with this (worker: for every worker).
    #[arg(long, conflicts_with = "operators")]
    actor_prefix: Option<String>,
    /// Only operator actions, whoever the operator (the same as --actor-prefix operator:).
    #[arg(long)]
    operators: bool,
    /// Only records at or after this time (RFC3339, a UTC date, or a duration ago: 7d).
    #[arg(long, value_parser = instant)]
    since: Option<Timestamp>,
    /// Only records before this time.
    #[arg(long, value_parser = instant)]
    until: Option<Timestamp>,
    /// How many records per page (at most 1000); --jsonl exports every page.
    #[arg(long, default_value_t = ops::DEFAULT_PAGE)]
    limit: u64,
    /// Continue after this cursor (printed under the previous page), with the same filters.
    #[arg(long, conflicts_with = "jsonl")]
    after: Option<Cursor>,
    /// Print one page as JSON (one document) instead of a table.
    #[arg(long, conflicts_with = "jsonl")]
    json: bool,
    /// Export every matching record as JSON lines (one object per line) on stdout.
    #[arg(long)]
    jsonl: bool,
    #[command(flatten)]
    reveal: RevealArgs,
}

const EXAMPLES: &str = "Examples:\n  \
    # which sagas compensated authorize_payment since Monday\n  \
    sagaflow audit --kind attempt_succeeded --direction compensate --step authorize_payment --since 2026-11-23\n  \
    # every operator action, exported as JSON lines\n  \
    sagaflow audit --operators --jsonl > operator-actions.jsonl\n  \
    # what happened to place_order sagas last Tuesday\n  \
    sagaflow audit --name place_order --since 2026-11-17 --until 2026-11-18";

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let actor = match (args.actor, args.actor_prefix, args.operators) {
        (Some(actor), _, _) => Some(ActorFilter::Exact(actor)),
        (None, Some(prefix), _) => Some(ActorFilter::Prefix(prefix)),
        (None, None, true) => Some(ActorFilter::operators()),
        (None, None, false) => None,
    };
    let filter = AuditFilter {
        saga_id: args.saga,
        saga_name: args.name,
        kinds: args.kind,
        step: args.step,
        direction: args.direction,
        actor,
        at: TimeRange {
            from: args.since,
            until: args.until,
        },
    };
    let disclosure = args.reveal.disclosure()?;
    let store = args.database.open().await?;
    if args.jsonl {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let written = ops::export_jsonl(&store, &filter, &disclosure, &mut out).await?;
        eprintln!("{written} history records exported");
        return Ok(());
    }
    let page = Page {
        limit: args.limit,
        after: args.after,
    };
    let result = ops::audit(&store, &filter, &page)
        .await?
        .disclose(&disclosure);
    if args.json {
        print_json(&result)
    } else {
        print_text(render::audit_table(&result))?;
        Ok(())
    }
}
