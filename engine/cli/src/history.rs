//! `sagaflow history <id>`: one saga's complete history, in order.

use sagaflow_engine::ops::{self, Disclose, render};
use uuid::Uuid;

use crate::common::{DatabaseArgs, OutputArgs, RevealArgs, print_json, print_text};

/// Options of `sagaflow history`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  sagaflow history 0190f1c2-7a4b-7cde-8f00-123456789abc --json")]
pub struct HistoryArgs {
    /// The saga's id (`sagaflow list` shows them).
    id: Uuid,
    #[command(flatten)]
    reveal: RevealArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn run(args: HistoryArgs) -> anyhow::Result<()> {
    let disclosure = args.reveal.disclosure()?;
    let store = args.database.open().await?;
    let view = ops::history(&store, args.id).await?.disclose(&disclosure);
    if args.output.json {
        print_json(&view)
    } else {
        print_text(render::history_table(&view))?;
        Ok(())
    }
}
