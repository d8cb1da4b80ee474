//! How step commands reach workers and replies come back.
//!
//! The embedded mode uses [`InProcess`]: commands go over a channel to a pool of tasks that run
//! the SDK handlers in this process. The distributed mode carries the same [`StepCommand`] over
//! NATS JetStream; the engine does not care which.

use std::collections::BTreeMap;
use std::sync::Arc;

use sagaflow_sdk::{StepContext, StepError, StepRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

use super::catalog::Catalog;
use crate::machine::{Dispatch, Reply};

/// Everything a worker needs to run one attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepCommand {
    /// The saga.
    pub saga_id: Uuid,
    /// Its definition name.
    pub saga_name: String,
    /// Its pinned definition version.
    pub saga_version: u32,
    /// The attempt.
    pub dispatch: Dispatch,
    /// The saga input.
    pub input: Value,
    /// Outputs of completed steps.
    pub outputs: BTreeMap<String, Value>,
}

/// A worker's answer, addressed to its saga.
#[derive(Debug, Clone)]
pub struct StepReply {
    /// The saga.
    pub saga_id: Uuid,
    /// The answer.
    pub reply: Reply,
}

/// Sends step commands to workers.
pub trait Transport: Send + Sync + 'static {
    /// Hands a command over; delivery is at least once, and a lost command is recovered by the
    /// attempt's timeout.
    fn send(&self, command: StepCommand);
}

/// The embedded transport: a channel to an in-process worker pool.
#[derive(Debug, Clone)]
pub struct InProcess {
    commands: mpsc::UnboundedSender<StepCommand>,
}

impl Transport for InProcess {
    fn send(&self, command: StepCommand) {
        // The pool only stops when the engine shuts down; a command sent after that is
        // recovered from the store on the next start, like any lost command.
        let _ = self.commands.send(command);
    }
}

impl InProcess {
    /// Starts a worker pool running up to `concurrency` attempts at once, answering into
    /// `replies`.
    pub fn spawn(
        catalog: Arc<Catalog>,
        concurrency: usize,
        replies: mpsc::UnboundedSender<StepReply>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (commands, mut incoming) = mpsc::unbounded_channel::<StepCommand>();
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let pool = tokio::spawn(async move {
            while let Some(command) = incoming.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let catalog = catalog.clone();
                let replies = replies.clone();
                tokio::spawn(async move {
                    let saga_id = command.saga_id;
                    let reply = run_attempt(&catalog, command).await;
                    let _ = replies.send(StepReply { saga_id, reply });
                    drop(permit);
                });
            }
        });
        (InProcess { commands }, pool)
    }
}

/// Runs one attempt with the registered handler and turns any failure into a classified error.
pub async fn run_attempt(catalog: &Catalog, command: StepCommand) -> Reply {
    let dispatch = command.dispatch.clone();
    let result = match catalog.get(&command.saga_name, Some(command.saga_version)) {
        Err(error) => Err(StepError::permanent("unknown_saga", error.to_string())),
        Ok(saga) => {
            let own_output = command.outputs.get(&dispatch.step_name).cloned();
            let request = StepRequest {
                step: dispatch.step,
                ctx: StepContext {
                    saga_id: command.saga_id,
                    saga_name: command.saga_name.clone(),
                    step: dispatch.step_name.clone(),
                    direction: dispatch.direction,
                    attempt: dispatch.attempt,
                    idempotency_key: dispatch.idempotency_key.clone(),
                    forward_key: dispatch.forward_key.clone(),
                    deadline: dispatch.deadline,
                    outputs: Arc::new(command.outputs),
                },
                input: command.input,
                output: own_output,
            };
            // A panicking handler must not take the worker down: run it in its own task and
            // report the panic as a retryable failure.
            match tokio::spawn(saga.run(request)).await {
                Ok(result) => result,
                Err(join_error) => Err(StepError::retryable(
                    "handler_panicked",
                    format!("the step handler panicked: {join_error}"),
                )),
            }
        }
    };
    Reply {
        step: dispatch.step,
        direction: dispatch.direction,
        attempt: dispatch.attempt,
        result,
        worker: "embedded".into(),
    }
}
