//! `sagaflow retention`: remove whole finished sagas older than a cutoff.

use anyhow::bail;
use sagaflow_engine::ops::time::{format_time, parse_instant};
use sagaflow_engine::ops::{self, render};
use sagaflow_sdk::Timestamp;

use crate::common::{DatabaseArgs, OutputArgs, print_json, print_text};

/// Options of `sagaflow retention`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sagaflow retention --older-than 90d --dry-run\n  \
    sagaflow retention --older-than 2026-01-01T00:00:00Z")]
pub struct RetentionArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
    /// Remove completed and compensated sagas last changed before this: a duration ago (90d,
    /// 12h) or a time (RFC3339, or a UTC date).
    #[arg(long)]
    older_than: String,
    /// Only count what would be removed.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(args: RetentionArgs) -> anyhow::Result<()> {
    let now = Timestamp::now();
    let cutoff = parse_instant(&args.older_than, now)?;
    if cutoff > now {
        bail!(
            "the cutoff {} is in the future, so every finished saga would be removed; give a \
             duration (90d) or a past time",
            format_time(cutoff)
        );
    }
    let store = args.database.open().await?;
    let report = ops::retention(&store, cutoff, args.dry_run).await?;
    if args.output.json {
        print_json(&report)
    } else {
        print_text(render::retention_text(&report))?;
        Ok(())
    }
}
