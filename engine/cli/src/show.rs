//! `sagaflow show <id>`: one saga, step by step.

use sagaflow_engine::ops::{self, Disclose, render};
use uuid::Uuid;

use crate::common::{DatabaseArgs, OutputArgs, RevealArgs, print_json, print_text};

/// Options of `sagaflow show`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sagaflow show 0190f1c2-7a4b-7cde-8f00-123456789abc\n  \
    # what each step reads and returns, as its worker registered it\n  \
    sagaflow show 0190f1c2-7a4b-7cde-8f00-123456789abc --schema")]
pub struct ShowArgs {
    /// The saga's id (`sagaflow list` shows them).
    id: Uuid,
    /// Also print each step's input and output JSON Schema (pretty JSON per step; with --json,
    /// as `input_schema` and `output_schema` of each step).
    #[arg(long)]
    schema: bool,
    #[command(flatten)]
    reveal: RevealArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn run(args: ShowArgs) -> anyhow::Result<()> {
    let disclosure = args.reveal.disclosure()?;
    let store = args.database.open().await?;
    let mut detail = ops::show(&store, args.id).await?.disclose(&disclosure);
    if !args.schema {
        // Schemas are long and rarely what an operator looks for: only on request.
        for step in &mut detail.steps {
            step.input_schema = None;
            step.output_schema = None;
        }
    }
    if args.output.json {
        print_json(&detail)
    } else {
        print_text(render::show_text(&detail))?;
        if args.schema {
            print_text(format_args!("\n{}", render::schemas_text(&detail)))?;
        }
        Ok(())
    }
}
