//! `sagaflow show <id>`: one saga, step by step.

use sagaflow_engine::ops::{self, render};
use uuid::Uuid;

use crate::common::{DatabaseArgs, OutputArgs, print_json};

/// Options of `sagaflow show`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  sagaflow show 0190f1c2-7a4b-7cde-8f00-123456789abc")]
pub struct ShowArgs {
    /// The saga's id (`sagaflow list` shows them).
    id: Uuid,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn run(args: ShowArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    let detail = ops::show(&store, args.id).await?;
    if args.output.json {
        print_json(&detail)
    } else {
        println!("{}", render::show_text(&detail));
        Ok(())
    }
}
