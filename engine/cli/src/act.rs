//! The operator actions: `sagaflow resume`, `retry-step`, `skip-step` and `cancel`, on one saga
//! or (resume and cancel) on every saga a filter matches, dry run by default.
//!
//! Each is committed straight to the database, conditionally on the saga's version, with the
//! step commands it dispatches in the outbox: a running engine (embedded or `sagaflow serve`)
//! sends them to the workers. A refused action exits non-zero and changes nothing.

use anyhow::anyhow;
use sagaflow_engine::EngineError;
use sagaflow_engine::machine::{OperatorAction, OperatorCommand};
use sagaflow_engine::ops::{
    self, ActOptions, ActReport, BulkAction, BulkOutcome, BulkReport, BulkRequest, OutputCheck,
    render,
};
use sagaflow_engine::store::Store;
use sagaflow_sdk::keys::SecretKeyArgs;
use uuid::Uuid;

use crate::common::{DatabaseArgs, OutputArgs, SagaFilterArgs, print_json, print_text};

/// Who acts and why: every action records both in the saga's history.
#[derive(Debug, clap::Args)]
pub struct Operator {
    /// Why you act, in a few words: recorded in the saga's history with your name (required).
    #[arg(long)]
    reason: String,
    /// Your name in the history (recorded as operator:NAME); $USER when not given, else
    /// "operator".
    #[arg(long, env = "USER", default_value = "operator", hide_env_values = true)]
    actor: String,
}

impl Operator {
    fn command(&self, action: OperatorAction) -> OperatorCommand {
        OperatorCommand {
            actor: self.actor.trim().to_string(),
            reason: self.reason.trim().to_string(),
            action,
        }
    }
}

/// Options of `sagaflow resume`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sagaflow resume 0190f1c2-7a4b-7cde-8f00-123456789abc --reason 'payment provider is back'\n  \
    # how many stuck place_order sagas would resume, and which\n  \
    sagaflow resume --all --name place_order --error 'provider unavailable' --reason 'provider is back'\n  \
    # then do it\n  \
    sagaflow resume --all --name place_order --error 'provider unavailable' --reason 'provider is back' --execute")]
pub struct ResumeArgs {
    /// The stuck saga (`sagaflow stuck` lists them).
    #[arg(required_unless_present = "all", conflicts_with_all = ["all", "filters"])]
    id: Option<Uuid>,
    /// Resume every saga the filters match (stuck ones unless --status says otherwise). Only
    /// counts and lists them unless --execute is given.
    #[arg(long)]
    all: bool,
    /// With --all: resume them, instead of the dry run.
    #[arg(long, requires = "all")]
    execute: bool,
    #[command(flatten)]
    operator: Operator,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    format: OutputArgs,
    #[command(flatten, next_help_heading = "Which sagas, with --all")]
    filter: SagaFilterArgs,
}

/// Options of `sagaflow cancel`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sagaflow cancel 0190f1c2-7a4b-7cde-8f00-123456789abc --reason 'customer withdrew the order'\n  \
    # every place_order saga stuck at authorize_payment: dry run, then for real\n  \
    sagaflow cancel --all --name place_order --status stuck --step authorize_payment --reason 'card network outage'\n  \
    sagaflow cancel --all --name place_order --status stuck --step authorize_payment --reason 'card network outage' --execute")]
pub struct CancelArgs {
    /// The saga to cancel: running (or stuck) before its pivot.
    #[arg(required_unless_present = "all", conflicts_with_all = ["all", "filters"])]
    id: Option<Uuid>,
    /// Cancel every saga the filters match (created, running and stuck ones unless --status
    /// says otherwise). Only counts and lists them unless --execute is given.
    #[arg(long)]
    all: bool,
    /// With --all: cancel them, instead of the dry run.
    #[arg(long, requires = "all")]
    execute: bool,
    #[command(flatten)]
    operator: Operator,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    format: OutputArgs,
    #[command(flatten, next_help_heading = "Which sagas, with --all")]
    filter: SagaFilterArgs,
}

/// Options of `sagaflow retry-step`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  sagaflow retry-step 0190f1c2-7a4b-7cde-8f00-123456789abc --reason 'rate limit lifted'"
)]
pub struct RetryStepArgs {
    /// The saga waiting to retry a step.
    id: Uuid,
    #[command(flatten)]
    operator: Operator,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    format: OutputArgs,
}

/// Options of `sagaflow skip-step`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    # the payment was authorized by hand: later steps read this output\n  \
    sagaflow skip-step 0190f1c2-7a4b-7cde-8f00-123456789abc --step authorize_payment \\\n    \
      --output '{\"authorization_key\":\"manual-1042\",\"order_id\":\"order-1042\",\"amount_cents\":1999,\"card_last4\":\"4242\",\"state\":\"authorized\"}' \\\n    \
      --reason 'authorized by phone, ticket OPS-311'\n  \
    # a refund issued by hand: the stuck compensation is done\n  \
    sagaflow skip-step 0190f1c2-7a4b-7cde-8f00-123456789abc --step authorize_payment --reason 'refunded manually'")]
pub struct SkipStepArgs {
    /// The saga.
    id: Uuid,
    /// The step to declare done: the one in progress or stuck (its forward action, or its
    /// compensation when the saga is compensating).
    #[arg(long)]
    step: String,
    /// The step's output as JSON, which later steps read: required to skip a forward action,
    /// refused for a compensation. Checked against the step's output schema, which its worker
    /// registered with the definition (`sagaflow show ID --schema` prints it).
    #[arg(long)]
    output: Option<String>,
    /// Accept --output without checking it, for a definition registered without an output
    /// schema for the step (by a worker that sends none). An output that does not fit a schema
    /// is refused regardless.
    #[arg(long, requires = "output")]
    unchecked_output: bool,
    /// The keys that seal the secret fields of --output (the step's output schema marks them);
    /// needed only for such a step.
    #[command(flatten)]
    keys: SecretKeyArgs,
    #[command(flatten)]
    operator: Operator,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    format: OutputArgs,
}

pub async fn resume(args: ResumeArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    match args.id {
        Some(id) => {
            let command = args.operator.command(OperatorAction::Resume);
            single(
                &store,
                id,
                command,
                &ActOptions::default(),
                args.format.json,
            )
            .await
        }
        None => {
            bulk(
                &store,
                BulkAction::Resume,
                args.filter,
                &args.operator,
                args.execute,
                args.format.json,
            )
            .await
        }
    }
}

pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    match args.id {
        Some(id) => {
            let command = args.operator.command(OperatorAction::Cancel);
            single(
                &store,
                id,
                command,
                &ActOptions::default(),
                args.format.json,
            )
            .await
        }
        None => {
            bulk(
                &store,
                BulkAction::Cancel,
                args.filter,
                &args.operator,
                args.execute,
                args.format.json,
            )
            .await
        }
    }
}

pub async fn retry_step(args: RetryStepArgs) -> anyhow::Result<()> {
    let store = args.database.open().await?;
    let command = args.operator.command(OperatorAction::RetryNow);
    single(
        &store,
        args.id,
        command,
        &ActOptions::default(),
        args.format.json,
    )
    .await
}

pub async fn skip_step(args: SkipStepArgs) -> anyhow::Result<()> {
    let output = args
        .output
        .as_deref()
        .map(|text| {
            serde_json::from_str::<serde_json::Value>(text).map_err(|error| {
                anyhow!(
                    "--output is not valid JSON ({error}); give the step's output as one JSON \
                     document in single quotes, e.g. --output '{{\"n\": 1}}'; nothing was changed"
                )
            })
        })
        .transpose()?;
    let store = args.database.open().await?;
    let command = args.operator.command(OperatorAction::SkipStep {
        step: args.step,
        output,
    });
    let options = ActOptions {
        unchecked_output: args.unchecked_output,
        at: None,
        secret_keys: args.keys.keys()?,
    };
    single(&store, args.id, command, &options, args.format.json).await
}

async fn single(
    store: &Store,
    id: Uuid,
    command: OperatorCommand,
    options: &ActOptions,
    json: bool,
) -> anyhow::Result<()> {
    let report = ops::act(store, id, command, options)
        .await
        .map_err(|error| match error {
            EngineError::Refused(_) | EngineError::TooLarge { .. } => {
                anyhow!("{error}; nothing was changed")
            }
            other => other.into(),
        })?;
    if json {
        print_json(&report)
    } else {
        print_text(act_text(&report))?;
        Ok(())
    }
}

fn past_tense(action: &str) -> &'static str {
    match action {
        "resume" => "Resumed",
        "retry" => "Retried the current step of",
        "skip" => "Skipped a step of",
        "cancel" => "Cancelled",
        _ => "Acted on",
    }
}

/// What one action did, for people.
fn act_text(report: &ActReport) -> String {
    let mut lines = vec![format!(
        "{} saga {} ({}@{}) as {}: {} -> {}.",
        past_tense(report.action),
        report.saga_id,
        report.name,
        report.version,
        report.actor,
        report.status_before.as_str(),
        report.status.as_str()
    )];
    if let Some(step) = &report.step {
        lines.push(match report.output_check {
            OutputCheck::Checked => {
                format!("Step `{step}` is done by hand; its output fits the step's output schema.")
            }
            OutputCheck::Unchecked => {
                format!("Step `{step}` is done by hand; its output was NOT checked (--unchecked-output).")
            }
            OutputCheck::NoOutput => format!("The compensation of `{step}` is done by hand."),
        });
    }
    if report.dispatched.is_empty() {
        lines.push("Nothing to send to the workers.".into());
    } else {
        for attempt in &report.dispatched {
            lines.push(format!(
                "Dispatched `{}` ({}) attempt {}.",
                attempt.step, attempt.direction, attempt.attempt
            ));
        }
        lines.push(
            "A running engine sends it to the workers from the outbox within seconds; \
             `sagaflow history` shows what follows."
                .into(),
        );
    }
    lines.join("\n")
}

async fn bulk(
    store: &Store,
    action: BulkAction,
    filter: SagaFilterArgs,
    operator: &Operator,
    execute: bool,
    json: bool,
) -> anyhow::Result<()> {
    let request = BulkRequest {
        filter: filter.into_filter(),
        action,
        actor: operator.actor.trim().to_string(),
        reason: operator.reason.trim().to_string(),
        execute,
    };
    let report = ops::act_in_bulk(store, &request).await?;
    if json {
        print_json(&report)?;
    } else {
        print_text(bulk_text(&report))?;
    }
    let not_done = report.refused + report.failed;
    if report.executed && not_done > 0 {
        return Err(anyhow!(
            "{not_done} of {} matching sagas were not changed (see above)",
            report.matched
        ));
    }
    Ok(())
}

/// A bulk action's outcome, for people: a summary, then one row per saga.
fn bulk_text(report: &BulkReport) -> String {
    let verb = match report.action {
        BulkAction::Resume => "resume",
        BulkAction::Cancel => "cancel",
    };
    let summary = if report.executed {
        format!(
            "{} sagas matched: {} changed, {} refused, {} failed.",
            report.matched, report.changed, report.refused, report.failed
        )
    } else {
        format!(
            "Dry run: {} sagas matched; {} would change, {} would be refused. Nothing was \
             changed: add --execute to {verb} them.",
            report.matched, report.changed, report.refused
        )
    };
    if report.sagas.is_empty() {
        return summary;
    }
    let rows: Vec<Vec<String>> = report
        .sagas
        .iter()
        .map(|entry| {
            let outcome = match &entry.outcome {
                BulkOutcome::WouldChange { status } => format!("would become {}", status.as_str()),
                BulkOutcome::Changed { status, .. } => format!("now {}", status.as_str()),
                BulkOutcome::Refused { message } => format!("refused: {message}"),
                BulkOutcome::Failed { message } => format!("failed: {message}"),
            };
            vec![
                entry.saga_id.to_string(),
                format!("{}@{}", entry.name, entry.version),
                entry.status_before.as_str().to_string(),
                outcome,
            ]
        })
        .collect();
    format!(
        "{summary}\n\n{}",
        render::table(&["id", "saga", "was", "outcome"], &rows)
    )
}
