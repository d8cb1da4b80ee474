//! `sagaflow list`: find sagas by status, definition, step, time, error or start key.

use sagaflow_engine::ops::{self, Cursor, Page, render};

use crate::common::{DatabaseArgs, OutputArgs, SagaFilterArgs, print_json, print_text};

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
    #[command(flatten)]
    filter: SagaFilterArgs,
    /// How many sagas per page (at most 1000).
    #[arg(long, default_value_t = ops::DEFAULT_PAGE)]
    limit: u64,
    /// Continue after this cursor (printed under the previous page), with the same filters.
    #[arg(long)]
    after: Option<Cursor>,
}

pub async fn run(args: ListArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    let filter = args.filter.into_filter();
    let page = Page {
        limit: args.limit,
        after: args.after,
    };
    let result = ops::list(&store, &filter, &page).await?;
    if args.output.json {
        print_json(&result)
    } else {
        print_text(render::list_table(&result))?;
        Ok(())
    }
}
