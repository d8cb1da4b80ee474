//! `sagaflow stuck`: the sagas that need an operator, and why.

use std::time::Duration;

use sagaflow_engine::ops::{self, StuckQuery, render};
use sagaflow_sdk::Timestamp;

use crate::common::{DatabaseArgs, OutputArgs, duration, print_json, print_text};

/// Options of `sagaflow stuck`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sagaflow stuck\n  \
    sagaflow stuck --threshold 2h --json")]
pub struct StuckArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// A running or compensating saga unchanged for longer than this counts as making no
    /// progress (15m, 2h, 7d).
    #[arg(long, default_value = "15m", value_parser = duration)]
    threshold: Duration,
    /// Show at most this many sagas (the totals count them all).
    #[arg(long, default_value_t = 100)]
    limit: u64,
}

pub async fn run(args: StuckArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    let report = ops::stuck(
        &store,
        &StuckQuery {
            threshold: args.threshold,
            now: Timestamp::now(),
            limit: args.limit,
        },
    )
    .await?;
    if args.output.json {
        print_json(&report)
    } else {
        print_text(render::stuck_table(&report))?;
        Ok(())
    }
}
