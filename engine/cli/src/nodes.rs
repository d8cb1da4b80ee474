//! `sagaflow nodes`: the engine nodes sharing the database and the partitions each holds.

use sagaflow_engine::ops::{self, render};

use crate::common::{DatabaseArgs, OutputArgs, print_json, print_text};

/// Options of `sagaflow nodes`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  sagaflow nodes --database-url postgres://sagaflow@db/sagaflow --json"
)]
pub struct NodesArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn run(args: NodesArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    let view = ops::nodes(&store).await?;
    if args.output.json {
        print_json(&view)
    } else {
        print_text(render::nodes_table(&view))?;
        Ok(())
    }
}
