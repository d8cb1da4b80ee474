//! How step commands reach workers and replies come back.
//!
//! The embedded mode uses [`InProcess`]: commands go over a channel to a pool of tasks that run
//! the SDK handlers in this process. The distributed mode carries the same protocol messages
//! over NATS JetStream; the driver does not care which.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use sagaflow_protocol::{SecretKeys, StepCommand, StepReply};
use sagaflow_sdk::metrics as step_metrics;
use sagaflow_sdk::telemetry;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, Span, info_span};

use super::catalog::Catalog;

/// A step command on its way to a worker.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The command.
    pub command: StepCommand,
    /// The span of the transition that dispatched it, which its sending is part of; a disabled
    /// span (a command read back from the outbox) puts the sending under the saga's root.
    pub cause: Span,
}

impl Outbound {
    /// A command whose cause is not known here (read back from the outbox, or rebuilt).
    pub fn uncaused(command: StepCommand) -> Self {
        Outbound {
            command,
            cause: Span::none(),
        }
    }
}

/// Carries step commands to workers.
pub trait Transport: Send + Sync + 'static {
    /// Hands `commands` over for delivery and returns the ids of those the transport accepted
    /// (for a broker: acknowledged as stored). The rest stay unsent in the outbox and are tried
    /// again; a command accepted but then lost is recovered by the attempt's timeout.
    fn publish<'a>(&'a self, commands: &'a [Outbound]) -> BoxFuture<'a, Vec<String>>;
}

/// A step's reply, with the span of the step's handling (the parent of the transition the
/// reply causes).
pub type HandledReply = (StepReply, Span);

/// The embedded transport: a channel to an in-process worker pool.
#[derive(Debug, Clone)]
pub struct InProcess {
    /// Each command with when it was handed over, for its queue time.
    commands: mpsc::UnboundedSender<(Outbound, Instant)>,
}

impl Transport for InProcess {
    fn publish<'a>(&'a self, commands: &'a [Outbound]) -> BoxFuture<'a, Vec<String>> {
        let accepted = commands
            .iter()
            .filter(|outbound| {
                self.commands
                    .send(((*outbound).clone(), Instant::now()))
                    .is_ok()
            })
            .map(|outbound| outbound.command.command_id.clone())
            .collect();
        Box::pin(async move { accepted })
    }
}

impl InProcess {
    /// Starts a worker pool running up to `concurrency` attempts at once with the handlers in
    /// `catalog`, answering into `replies`.
    pub fn spawn(
        catalog: Arc<Catalog>,
        concurrency: usize,
        secret_keys: Option<Arc<SecretKeys>>,
        replies: mpsc::UnboundedSender<HandledReply>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (commands, mut incoming) = mpsc::unbounded_channel::<(Outbound, Instant)>();
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let pool = tokio::spawn(async move {
            while let Some((Outbound { command, cause }, handed_over)) = incoming.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let catalog = catalog.clone();
                let replies = replies.clone();
                let secret_keys = secret_keys.clone();
                tokio::spawn(async move {
                    step_metrics::queued(
                        &command.saga,
                        &command.step,
                        command.direction,
                        handed_over.elapsed(),
                    );
                    let span = if cause.is_disabled() && !telemetry::traced(command.saga_id) {
                        Span::none()
                    } else {
                        let name = format!("step {}.{}", command.saga, command.step);
                        info_span!(
                            parent: None,
                            "step",
                            otel.name = name.as_str(),
                            sagaflow.saga_id = %command.saga_id,
                            sagaflow.saga = %command.saga,
                            sagaflow.step = %command.step,
                            sagaflow.direction = %command.direction,
                            sagaflow.attempt = command.attempt,
                            sagaflow.node = "embedded",
                            sagaflow.outcome = tracing::field::Empty,
                        )
                    };
                    telemetry::follow(&span, &cause, command.saga_id);
                    let began = Instant::now();
                    let reply = run_attempt(&catalog, &command, secret_keys.as_deref())
                        .instrument(span.clone())
                        .await;
                    telemetry::record_outcome(&span, &reply.outcome);
                    step_metrics::handled(
                        &command.saga,
                        &command.step,
                        command.direction,
                        began.elapsed(),
                    );
                    let _ = replies.send((reply, span));
                    drop(permit);
                });
            }
        });
        (InProcess { commands }, pool)
    }
}

/// Runs one attempt with the registered handler.
pub async fn run_attempt(
    catalog: &Catalog,
    command: &StepCommand,
    secret_keys: Option<&SecretKeys>,
) -> StepReply {
    match catalog.handlers(&command.saga, command.saga_version) {
        Ok(Some(saga)) => saga.handle(command, "embedded", secret_keys).await,
        Ok(None) => StepReply::to(
            command,
            "embedded",
            sagaflow_protocol::StepOutcome::Failed {
                error: sagaflow_protocol::StepError::permanent(
                    "no_handlers",
                    format!(
                        "no handlers for saga `{}` run in this process",
                        command.saga
                    ),
                ),
            },
        ),
        Err(error) => StepReply::to(
            command,
            "embedded",
            sagaflow_protocol::StepOutcome::Failed {
                error: sagaflow_protocol::StepError::permanent("unknown_saga", error.to_string()),
            },
        ),
    }
}
