//! The worker runtime: serves the steps of registered sagas over NATS JetStream.
//!
//! A worker pulls [`StepCommand`]s from the durable consumer of each saga it serves, runs the
//! handler, publishes the [`StepReply`] (waiting for JetStream to store it) and only then
//! acknowledges the command. A command whose idempotency key already succeeded (recorded in the
//! worker's [`ResultStore`]) is answered with the recorded output without running the handler
//! again, so a redelivered or re-dispatched command never applies its effect twice.
//!
//! Bad messages never stop a worker: a command that is not JSON, has an unknown schema version
//! or names a saga version this worker does not have is logged, answered with a permanent error
//! when it names a saga (so the saga's history records it), and removed without redelivery.

mod epochs;
mod results;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use thiserror::Error;
use tokio::sync::Semaphore;
use tracing::{Instrument, Span, info, warn};

pub use epochs::EpochCheck;
pub use results::ResultStore;

use crate::metrics::{self, CommandOutcome, RejectReason};
use crate::protocol::backoff::Backoff;
use crate::protocol::trace::{message_id, read_trace_headers, trace_headers};
use crate::protocol::{
    EngineAnswer, PROTOCOL_VERSION, RegisterRequest, SecretKeys, StepCommand, StepOutcome,
    StepReply, codes, durable_consumer, ensure_streams, names,
};
use crate::telemetry;
use crate::{Saga, StepError};

/// What can stop a worker.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The broker is unreachable or refused an operation.
    #[error(
        "NATS: {what}: {source}; check that nats-server runs with JetStream (-js) at the given URL"
    )]
    Broker {
        /// What failed ("cannot publish a reply").
        what: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker refused the connection (credentials, TLS) or to create or open the
    /// protocol's streams or consumers.
    #[error(transparent)]
    Streams(#[from] sagaflow_protocol::ProtocolError),
    /// A saga served declares secret fields and the worker was given no keys.
    #[error(
        "saga `{saga}` has secret fields ({fields}) and this worker has no keys to open and \
         seal them; give it the key file (--secret-keys or SAGAFLOW_SECRET_KEYS_FILE)"
    )]
    SecretKeysMissing {
        /// The saga's name.
        saga: String,
        /// Its secret fields, comma separated.
        fields: String,
    },
    /// The worker's idempotency table is unreachable.
    #[error("worker database: {0}")]
    Database(String),
}

/// Tuning for a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Names this worker in replies and history (`worker:ID`).
    pub id: String,
    /// How many attempts run at once, per saga served.
    pub concurrency: usize,
    /// How long JetStream waits for an ack before redelivering a command.
    pub ack_wait: Duration,
    /// How many times JetStream delivers one command at most.
    pub max_deliver: i64,
    /// On how many NATS servers the command and reply streams are kept: 1 on a single
    /// server; 3 on a three-server JetStream cluster, so that a stream survives losing one
    /// server. A stream that exists with another count is changed to this one, so give every
    /// engine and worker on a broker the same count.
    pub stream_replicas: usize,
    /// How often the lag of this worker's command consumers is read for the metrics gauges,
    /// when the process exports metrics; `None` (the default) reads nothing.
    pub gauges_every: Option<Duration>,
    /// Credentials and TLS for the NATS connection ([`crate::nats::NatsArgs`] reads them from
    /// flags); none by default.
    pub nats: crate::nats::NatsSecurity,
    /// The keys that open the secret fields of commands and seal those of outputs
    /// ([`SecretKeyArgs`](crate::keys::SecretKeyArgs) reads them); required when a saga served declares
    /// secret fields.
    pub secret_keys: Option<Arc<SecretKeys>>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            id: format!("worker-{}", std::process::id()),
            concurrency: 32,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            stream_replicas: 1,
            gauges_every: None,
            nats: crate::nats::NatsSecurity::default(),
            secret_keys: None,
        }
    }
}

/// A worker process's runtime.
pub struct Worker {
    client: async_nats::Client,
    js: jetstream::Context,
    sagas: BTreeMap<String, Vec<Arc<Saga>>>,
    results: ResultStore,
    options: WorkerOptions,
}

impl Worker {
    /// Connects to NATS and prepares the streams; `results` keeps the idempotency records.
    ///
    /// `nats_url` is one NATS URL or several separated by commas (the servers of a cluster):
    /// the worker connects to one of them and, when it goes away, reconnects to another.
    pub async fn connect(
        nats_url: &str,
        results: ResultStore,
        sagas: Vec<Saga>,
        options: WorkerOptions,
    ) -> Result<Self, WorkerError> {
        if options.secret_keys.is_none()
            && let Some(saga) = sagas.iter().find(|saga| saga.declares_secrets())
        {
            return Err(WorkerError::SecretKeysMissing {
                saga: saga.spec().name.clone(),
                fields: saga.secret_fields().join(", "),
            });
        }
        let client = crate::protocol::connect(
            nats_url,
            &options.nats,
            &options.id,
            crate::protocol::WhileUnreachable::Wait,
        )
        .await?;
        let js = jetstream::new(client.clone());
        ensure_streams(&js, options.stream_replicas).await?;
        let mut by_name: BTreeMap<String, Vec<Arc<Saga>>> = BTreeMap::new();
        for saga in sagas {
            by_name
                .entry(saga.spec().name.clone())
                .or_default()
                .push(Arc::new(saga));
        }
        Ok(Worker {
            client,
            js,
            sagas: by_name,
            results,
            options,
        })
    }

    /// Serves until `shutdown` completes; then stops pulling and lets the attempts in progress
    /// finish (for up to the ack wait) before returning.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the worker like `shutdown` does, without waiting: it stops
    /// pulling commands and announcing its sagas at once, while the attempts already taken run
    /// to the end in the background and publish their replies. An attempt cut short by the
    /// process ending is not lost: its command was not acknowledged, so the broker redelivers
    /// it (with the same idempotency key) after the ack wait.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let worker = Arc::new(self);
        let mut consumers = Vec::new();
        for name in worker.sagas.keys() {
            let consumer = durable_consumer(
                &worker.js,
                names::COMMAND_STREAM,
                &names::worker_consumer(name),
                &names::command_filter(name),
                worker.options.ack_wait,
                worker.options.max_deliver,
            )
            .await?;
            consumers.push((name.clone(), consumer));
        }
        // Aborted when `run` returns or its future is dropped: a dropped worker must not go on
        // announcing sagas it no longer serves.
        let announcer = AbortOnDrop(tokio::spawn(announce(worker.clone())));
        for saga in worker.sagas.values().flatten() {
            metrics::describe_saga_steps(saga.spec());
        }
        let lag_reader = worker
            .options
            .gauges_every
            .map(|every| AbortOnDrop(tokio::spawn(read_consumer_lag(worker.clone(), every))));
        let permits = Arc::new(Semaphore::new(
            worker.options.concurrency.max(1) * consumers.len(),
        ));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut loops = Vec::new();
        for (name, consumer) in consumers {
            loops.push(tokio::spawn(worker.clone().pull(
                name,
                consumer,
                permits.clone(),
                stopped.clone(),
            )));
        }
        info!(id = %worker.options.id, sagas = ?worker.sagas.keys().collect::<Vec<_>>(), "worker serving");
        shutdown.await;
        info!("worker stopping: no new commands; finishing the attempts in progress");
        let _ = stop.send(true);
        for handle in loops {
            let _ = handle.await;
        }
        drop(announcer);
        drop(lag_reader);
        let all = u32::try_from(worker.options.concurrency.max(1) * worker.sagas.len())
            .unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(worker.options.ack_wait, permits.acquire_many(all)).await;
        Ok(())
    }

    /// Pulls the commands of saga `name` until the worker stops, whatever the broker does: a
    /// failed pull is retried with back-off (opening the consumer again, in case the broker lost
    /// it), never abandoned, so the saga is served again once the broker is back.
    async fn pull(
        self: Arc<Self>,
        name: String,
        mut consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
        permits: Arc<Semaphore>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let what = format!("pulling the commands of saga `{name}`");
        let mut backoff = Backoff::infrastructure();
        loop {
            let failure = match consumer.messages().await {
                Ok(mut messages) => loop {
                    let next = tokio::select! {
                        next = messages.next() => next,
                        _ = stopped.changed() => return,
                    };
                    let message = match next {
                        Some(Ok(message)) => message,
                        Some(Err(e)) => break e.to_string(),
                        None => break "the pull stream ended".to_string(),
                    };
                    backoff.succeeded(&what);
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let worker = self.clone();
                    let name = name.clone();
                    tokio::spawn(async move {
                        worker.serve(&name, message).await;
                        drop(permit);
                    });
                },
                Err(e) => e.to_string(),
            };
            tokio::select! {
                _ = backoff.wait_after_failure(&what, &failure) => {}
                _ = stopped.changed() => return,
            }
            // After an outage the consumer may be gone (a broker that lost its store): open it
            // again. If that fails too, the next pull fails and waits longer.
            match durable_consumer(
                &self.js,
                names::COMMAND_STREAM,
                &names::worker_consumer(&name),
                &names::command_filter(&name),
                self.options.ack_wait,
                self.options.max_deliver,
            )
            .await
            {
                Ok(fresh) => consumer = fresh,
                Err(e) => warn!(saga = %name, error = %e, "cannot open the command consumer yet"),
            }
        }
    }

    async fn serve(&self, saga_name: &str, message: jetstream::Message) {
        let command: StepCommand = match serde_json::from_slice(&message.payload) {
            Ok(command) => command,
            Err(e) => {
                warn!(subject = %message.subject, error = %e, "malformed command: dropped");
                metrics::rejected(RejectReason::MalformedCommand);
                if let Some((reply_to, epoch, reply)) =
                    reply_to_malformed(&message.payload, &self.options.id, &e)
                {
                    let span = self.processing_span(
                        &message,
                        &reply.step,
                        reply.direction,
                        reply.attempt,
                        reply.saga_id,
                        "",
                    );
                    telemetry::record_outcome(&span, &reply.outcome);
                    let _ = self
                        .publish(&reply_to, epoch, &reply, &span)
                        .instrument(span.clone())
                        .await;
                }
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let span = self.processing_span(
            &message,
            &command.step,
            command.direction,
            command.attempt,
            command.saga_id,
            &command.saga,
        );
        self.serve_command(saga_name, message, command, &span)
            .instrument(span.clone())
            .await;
    }

    /// Serves a well-formed command within `span`, the span of its processing.
    async fn serve_command(
        &self,
        saga_name: &str,
        message: jetstream::Message,
        command: StepCommand,
        span: &Span,
    ) {
        let reply = if command.v != PROTOCOL_VERSION {
            warn!(command = %command.command_id, v = command.v, "unsupported command version");
            metrics::rejected(RejectReason::UnsupportedVersion);
            self.refuse(
                &command,
                codes::UNSUPPORTED_VERSION,
                format!(
                    "command schema version {} is not supported by this worker (it speaks {PROTOCOL_VERSION})",
                    command.v
                ),
            )
        } else {
            match self.saga(saga_name, &command) {
                Some(saga) => match self.answer(&saga, &command, queued_since(&message)).await {
                    Ok(reply) => reply,
                    Err(e) => {
                        // Without the idempotency record the attempt must not run: try later.
                        warn!(command = %command.command_id, error = %e, "idempotency store unavailable");
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        return;
                    }
                },
                None => {
                    metrics::rejected(RejectReason::UnknownSaga);
                    self.refuse(
                        &command,
                        codes::UNKNOWN_SAGA,
                        format!(
                            "this worker serves no saga `{}` version {}",
                            command.saga, command.saga_version
                        ),
                    )
                }
            }
        };
        telemetry::record_outcome(span, &reply.outcome);
        match self
            .publish(&command.reply_to, command.epoch, &reply, span)
            .await
        {
            Ok(()) => {
                // A lost ack means one more delivery, answered from the record.
                if let Err(e) = message.ack().await {
                    warn!(command = %command.command_id, error = %e, "ack failed; the command will be redelivered and answered from the record");
                }
            }
            Err(e) => {
                warn!(command = %command.command_id, error = %e, "reply not stored; the command will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await;
            }
        }
    }

    fn saga(&self, name: &str, command: &StepCommand) -> Option<Arc<Saga>> {
        self.sagas
            .get(name)?
            .iter()
            .find(|s| s.spec().name == command.saga && s.spec().version == command.saga_version)
            .cloned()
    }

    /// Refuses a command of a superseded epoch, or answers from the idempotency record, or runs
    /// the handler and records a success. `queued` is how long the command waited since its
    /// dispatch, where the broker says.
    async fn answer(
        &self,
        saga: &Saga,
        command: &StepCommand,
        queued: Option<Duration>,
    ) -> Result<StepReply, WorkerError> {
        let (step, direction) = (command.step.as_str(), command.direction);
        if let EpochCheck::Stale { highest } = self
            .results
            .check_epoch(command.partition, command.epoch)
            .await?
        {
            warn!(
                command = %command.command_id,
                partition = command.partition,
                epoch = command.epoch,
                highest,
                "command of a superseded epoch refused"
            );
            metrics::answered(&command.saga, step, direction, CommandOutcome::StaleEpoch);
            return Ok(self.refuse(
                command,
                codes::STALE_EPOCH,
                format!(
                    "partition {}: epoch {} was superseded by epoch {highest}; the engine node \
                     that sent this command no longer owns the saga, nothing was run",
                    command.partition, command.epoch
                ),
            ));
        }
        if let Some(recorded) = self.results.lookup(&command.idempotency_key).await? {
            metrics::answered(&command.saga, step, direction, CommandOutcome::Duplicate);
            return Ok(StepReply::to(command, &self.options.id, recorded));
        }
        if let Some(queued) = queued {
            metrics::queued(&command.saga, step, direction, queued);
        }
        let began = std::time::Instant::now();
        let reply = saga
            .handle(
                command,
                &self.options.id,
                self.options.secret_keys.as_deref(),
            )
            .await;
        metrics::handled(&command.saga, step, direction, began.elapsed());
        metrics::answered(
            &command.saga,
            step,
            direction,
            CommandOutcome::of(&reply.outcome),
        );
        // Only successes are recorded. A permanent failure promises nothing was applied, so
        // running the handler again is safe, and it must run again when an operator who fixed
        // the cause resumes the step.
        if !matches!(reply.outcome, StepOutcome::Succeeded { .. }) {
            return Ok(reply);
        }
        let standing = self
            .results
            .record(
                &command.idempotency_key,
                &command.command_id,
                &reply.outcome,
            )
            .await?;
        Ok(StepReply::to(command, &self.options.id, standing))
    }

    fn refuse(&self, command: &StepCommand, code: &str, message: String) -> StepReply {
        StepReply::to(
            command,
            &self.options.id,
            StepOutcome::Failed {
                error: StepError::permanent(code, message),
            },
        )
    }

    /// The span of this worker's handling of a command, under the engine's span that sent it
    /// (or the saga's root). The handler runs within it, so its own spans and logs belong to
    /// the saga's trace too.
    fn processing_span(
        &self,
        message: &jetstream::Message,
        step: &str,
        direction: crate::Direction,
        attempt: u32,
        saga_id: uuid::Uuid,
        saga: &str,
    ) -> Span {
        if !telemetry::exporting() {
            return Span::none();
        }
        let headers = message.headers.as_ref();
        telemetry::processing_span(
            &message.subject,
            message_id(headers),
            read_trace_headers(headers).as_ref(),
            &telemetry::MessageAbout {
                saga_id,
                saga,
                step,
                direction,
                attempt,
                node: &self.options.id,
            },
        )
    }

    /// Publishes `reply` where its command said (`reply_to`, opaque to the worker), in a span
    /// under `processing` whose context the reply's headers carry.
    async fn publish(
        &self,
        reply_to: &str,
        epoch: u64,
        reply: &StepReply,
        processing: &Span,
    ) -> Result<(), WorkerError> {
        let payload = serde_json::to_vec(reply)
            .map_err(|e| WorkerError::broker("cannot encode a reply", e))?;
        let message_id = names::reply_message_id(&reply.command_id, epoch);
        let (span, context) = if processing.is_disabled() {
            // Not recorded here (not exported, or a saga not sampled): the reply says so.
            (Span::none(), telemetry::unsampled(reply.saga_id))
        } else {
            telemetry::sending_span(reply_to, &message_id, reply.saga_id, processing)
        };
        let headers = trace_headers(context.as_ref());
        async {
            let ack = self
                .js
                .send_publish(
                    reply_to.to_string(),
                    jetstream::message::PublishMessage::build()
                        .payload(payload.into())
                        .headers(headers)
                        .message_id(message_id),
                )
                .await
                .map_err(|e| WorkerError::broker("cannot publish a reply", e))?;
            ack.await
                .map_err(|e| WorkerError::broker("reply not acknowledged", e))?;
            Ok(())
        }
        .instrument(span)
        .await
    }
}

impl WorkerError {
    /// A [`WorkerError::Broker`]: `what` failed because of `source`.
    fn broker(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        WorkerError::Broker {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// Tells the engines which saga definitions this worker serves, until one answers, then again
/// now and then (an engine with a fresh database learns them too).
async fn announce(worker: Arc<Worker>) {
    let request = RegisterRequest {
        v: PROTOCOL_VERSION,
        sagas: worker
            .sagas
            .values()
            .flatten()
            .map(|s| s.spec().clone())
            .collect(),
    };
    let Ok(payload) = serde_json::to_vec(&request) else {
        return;
    };
    let what = "announcing this worker's sagas to an engine";
    let mut backoff = Backoff::infrastructure();
    loop {
        let answer = worker
            .client
            .request(names::REGISTER_SUBJECT, payload.clone().into())
            .await;
        let failure = match answer.map(|m| serde_json::from_slice::<EngineAnswer>(&m.payload)) {
            Ok(Ok(EngineAnswer::Ok { .. })) => None,
            Ok(Ok(EngineAnswer::Error { message, .. })) => {
                warn!(%message, "an engine refused this worker's saga definitions");
                None
            }
            Ok(Err(e)) => Some(format!("the answer is not an engine answer: {e}")),
            // No engine yet, or the broker is away.
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                backoff.succeeded(what);
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Some(failure) => backoff.wait_after_failure(what, &failure).await,
        }
    }
}

/// For a command that is not valid JSON of the schema but names where to reply and its attempt,
/// the permanent-error reply that lets the engine record the problem in the saga's history,
/// with the subject to publish it on and the command's epoch.
fn reply_to_malformed(
    payload: &[u8],
    worker: &str,
    error: &serde_json::Error,
) -> Option<(String, u64, StepReply)> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let reply_to = value.get("reply_to")?.as_str()?.to_string();
    let epoch = value.get("epoch").and_then(|e| e.as_u64()).unwrap_or(0);
    let reply = StepReply {
        v: PROTOCOL_VERSION,
        command_id: value.get("command_id")?.as_str()?.to_string(),
        saga_id: serde_json::from_value(value.get("saga_id")?.clone()).ok()?,
        step_index: usize::try_from(value.get("step_index")?.as_u64()?).ok()?,
        step: value.get("step")?.as_str()?.to_string(),
        direction: serde_json::from_value(value.get("direction")?.clone()).ok()?,
        attempt: u32::try_from(value.get("attempt")?.as_u64()?).ok()?,
        worker: worker.to_string(),
        outcome: StepOutcome::Failed {
            error: StepError::permanent(
                codes::MALFORMED_COMMAND,
                format!("the command does not match the protocol: {error}"),
            ),
        },
    };
    Some((reply_to, epoch, reply))
}

/// Reads the lag of the command consumer of each saga `worker` serves every `every`, for the
/// metrics gauges.
async fn read_consumer_lag(worker: Arc<Worker>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for name in worker.sagas.keys() {
            let consumer = names::worker_consumer(name);
            match crate::protocol::consumer_lag(&worker.js, names::COMMAND_STREAM, &consumer).await
            {
                Ok((pending, ack_pending)) => {
                    metrics::consumer_lag(names::COMMAND_STREAM, &consumer, pending, ack_pending)
                }
                Err(e) => tracing::debug!(error = %e, "cannot read a command consumer's lag"),
            }
        }
    }
}

/// How long `message` waited between its publication (the engine's dispatch, as the broker
/// stamped it) and now; `None` where the broker's metadata cannot be read.
fn queued_since(message: &jetstream::Message) -> Option<Duration> {
    let published = message.info().ok()?.published;
    Duration::try_from(async_nats::datetime::now() - published).ok()
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
