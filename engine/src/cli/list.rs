//! `sagaflow list`: find sagas by status, definition, step, time, error or start key.

use sagaflow_engine::machine::SagaStatus;
use sagaflow_engine::ops::{self, Cursor, ListFilter, Page, TimeRange, render};
use sagaflow_sdk::Timestamp;

use super::common::{DatabaseArgs, OutputArgs, instant, print_json};

/// Options of `sagaflow list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sagaflow list --status stuck\n  \
    sagaflow list --name place_order --version 2 --step authorize_payment\n  \
    sagaflow list --status compensated --updated-since 24h --error declined\n  \
    sagaflow list --start-key order-1042 --json")]
pub struct ListArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// Only sagas in this status (repeat it, or separate with commas, for several).
    #[arg(long, value_delimiter = ',', value_parser = status)]
    status: Vec<SagaStatus>,
    /// Only sagas of this definition name.
    #[arg(long)]
    name: Option<String>,
    /// Only sagas pinned to this definition version.
    #[arg(long)]
    version: Option<u32>,
    /// Only sagas working on, or stuck at, this step (by name).
    #[arg(long)]
    step: Option<String>,
    /// Only sagas created at or after this time (RFC3339, a UTC date, or a duration ago: 2h).
    #[arg(long, value_parser = instant)]
    created_since: Option<Timestamp>,
    /// Only sagas created before this time.
    #[arg(long, value_parser = instant)]
    created_before: Option<Timestamp>,
    /// Only sagas last changed at or after this time.
    #[arg(long, value_parser = instant)]
    updated_since: Option<Timestamp>,
    /// Only sagas last changed before this time.
    #[arg(long, value_parser = instant)]
    updated_before: Option<Timestamp>,
    /// Only sagas whose last error contains this text (ignoring case).
    #[arg(long)]
    error: Option<String>,
    /// Only the saga started with this start key.
    #[arg(long)]
    start_key: Option<String>,
    /// How many sagas per page (at most 1000).
    #[arg(long, default_value_t = ops::DEFAULT_PAGE)]
    limit: u64,
    /// Continue after this cursor (printed under the previous page), with the same filters.
    #[arg(long)]
    after: Option<Cursor>,
}

fn status(text: &str) -> Result<SagaStatus, String> {
    SagaStatus::parse(text).ok_or_else(|| {
        format!(
            "`{text}` is not a saga status; use created, running, compensating, completed, \
             compensated or stuck"
        )
    })
}

pub async fn run(args: ListArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    let filter = ListFilter {
        statuses: args.status,
        name: args.name,
        version: args.version,
        current_step: args.step,
        created: TimeRange {
            from: args.created_since,
            until: args.created_before,
        },
        updated: TimeRange {
            from: args.updated_since,
            until: args.updated_before,
        },
        error_contains: args.error,
        start_key: args.start_key,
    };
    let page = Page {
        limit: args.limit,
        after: args.after,
    };
    let result = ops::list(&store, &filter, &page).await?;
    if args.output.json {
        print_json(&result)
    } else {
        println!("{}", render::list_table(&result));
        Ok(())
    }
}
