//! The distributed transport: NATS JetStream for step commands and replies, core NATS request
//! and reply for starting sagas and for workers announcing their definitions. The subjects,
//! streams and messages are the wire protocol of `docs/protocol.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use futures::future::BoxFuture;
use sagaflow_protocol::backoff::Backoff;
use sagaflow_protocol::trace::{message_id, read_trace_headers, trace_headers};
use sagaflow_protocol::{
    AnswerCode, EngineAnswer, PROTOCOL_VERSION, RegisterRequest, StartRequest, StepReply, names,
};
use sagaflow_protocol::{NatsSecurity, WhileUnreachable, durable_consumer, ensure_streams};
use sagaflow_sdk::telemetry;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{Span, error, info, warn};
use uuid::Uuid;

use super::Starter;
use super::catalog::Catalog;
use super::driver::{Acker, Inbound, Settle};
use super::leases::Ownership;
use super::transport::{Outbound, Transport};
use crate::EngineError;
use crate::store::Store;

/// How long JetStream waits for the engine to acknowledge a reply before redelivering it: also
/// how long replies a killed node had pulled wait before its partitions' next owners see them.
const REPLY_ACK_WAIT: Duration = Duration::from_secs(10);
/// How soon a reply this node may not handle (its partition moved) is delivered again.
const REDELIVER_AFTER: Duration = Duration::from_millis(250);
/// The most replies one pull of a partition asks for.
const REPLY_BATCH: usize = 64;
/// How often the broker says a pull is alive while no replies come.
const REPLY_HEARTBEAT: Duration = Duration::from_secs(5);
/// How often a reply is delivered at most.
const REPLY_MAX_DELIVER: i64 = 10;

/// A connection to the broker.
#[derive(Clone)]
pub(crate) struct Broker {
    client: async_nats::Client,
    js: jetstream::Context,
}

fn broker_error(what: &str, error: impl std::error::Error + Send + Sync + 'static) -> EngineError {
    EngineError::Broker {
        what: what.to_string(),
        source: Box::new(error),
    }
}

impl Broker {
    /// Connects to the servers of `url`, one NATS URL or several separated by commas (the
    /// client reconnects to another of them when its server goes away), and creates the
    /// streams with `stream_replicas` replicas.
    pub(crate) async fn connect(
        url: &str,
        security: &NatsSecurity,
        stream_replicas: usize,
    ) -> Result<Self, EngineError> {
        let client =
            sagaflow_protocol::connect(url, security, "sagaflow-engine", WhileUnreachable::Wait)
                .await
                .map_err(EngineError::NatsConnection)?;
        let js = jetstream::new(client.clone());
        ensure_streams(&js, stream_replicas)
            .await
            .map_err(|e| broker_error("cannot prepare the streams", e))?;
        Ok(Broker { client, js })
    }

    /// The JetStream context, for reading the consumers' lag.
    pub(crate) fn jetstream(&self) -> jetstream::Context {
        self.js.clone()
    }

    /// The transport that publishes this node's commands.
    pub(crate) fn transport(&self) -> JetStreamTransport {
        JetStreamTransport {
            js: self.js.clone(),
        }
    }

    /// Pulls the replies of every partition this node owns and hands them to the driver, which
    /// settles each once the transition it caused is committed (or hands it back when the
    /// partition changed owner). A partition's consumer is read while the partition is held and
    /// left the moment it is not, so its replies go to its next owner. Malformed replies are
    /// dropped without redelivery (and recorded in the saga's history when they name one).
    pub(crate) async fn consume_replies(
        &self,
        inbox: mpsc::UnboundedSender<Inbound>,
        mut ownership: watch::Receiver<Ownership>,
        node: &str,
    ) -> Result<JoinHandle<()>, EngineError> {
        self.retire_legacy_consumer().await?;
        let js = self.js.clone();
        let node: Arc<str> = node.into();
        Ok(tokio::spawn(async move {
            let mut readers: HashMap<u32, AbortOnDrop> = HashMap::new();
            loop {
                // Held partitions, valid or not: a lease that lapses is either renewed (then
                // the replies are still ours to read) or lost (then it leaves the fence).
                let held: Vec<u32> = ownership
                    .borrow_and_update()
                    .fence
                    .epochs
                    .keys()
                    .copied()
                    .collect();
                readers.retain(|partition, _| held.contains(partition));
                for partition in held {
                    readers.entry(partition).or_insert_with(|| {
                        AbortOnDrop(tokio::spawn(read_partition(
                            js.clone(),
                            partition,
                            inbox.clone(),
                            node.clone(),
                        )))
                    });
                }
                if ownership.changed().await.is_err() {
                    // The lease keeper ended: the engine is stopping.
                    return;
                }
            }
        }))
    }

    /// Deletes the one consumer of every reply that engines of protocol version 1 used: a
    /// work-queue stream refuses a partition's consumer beside it.
    async fn retire_legacy_consumer(&self) -> Result<(), EngineError> {
        let stream = self
            .js
            .get_stream(names::REPLY_STREAM)
            .await
            .map_err(|e| broker_error("cannot open the reply stream", e))?;
        if stream
            .consumer_info(names::LEGACY_ENGINE_CONSUMER)
            .await
            .is_ok()
        {
            stream
                .delete_consumer(names::LEGACY_ENGINE_CONSUMER)
                .await
                .map_err(|e| {
                    broker_error(
                        "cannot delete the reply consumer of protocol version 1 engines \
                         (`sagaflow-engine`); stop every older engine first",
                        e,
                    )
                })?;
            warn!(
                consumer = names::LEGACY_ENGINE_CONSUMER,
                "deleted the reply consumer of protocol version 1 engines; replies it still \
                 held are answered again when their attempts time out"
            );
        }
        Ok(())
    }

    /// Answers start requests on the start subject.
    pub(crate) async fn serve_starts(
        &self,
        starter: Starter,
    ) -> Result<JoinHandle<()>, EngineError> {
        let mut requests = self
            .client
            .queue_subscribe(names::START_SUBJECT, names::ENGINE_QUEUE.into())
            .await
            .map_err(|e| broker_error("cannot subscribe to the start subject", e))?;
        let client = self.client.clone();
        Ok(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let starter = starter.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let answer = match serde_json::from_slice::<StartRequest>(&request.payload) {
                        Err(e) => {
                            refusal(AnswerCode::BadRequest, format!("not a start request: {e}"))
                        }
                        // The start request did not change in version 2: clients of version 1
                        // still start sagas.
                        Ok(start) if !(1..=PROTOCOL_VERSION).contains(&start.v) => refusal(
                            AnswerCode::UnsupportedVersion,
                            format!(
                                "start request version {} is not supported; send v={PROTOCOL_VERSION}",
                                start.v
                            ),
                        ),
                        Ok(start) => match starter
                            .start(&start.saga, start.version, start.input, start.key)
                            .await
                        {
                            Ok(id) => EngineAnswer::Ok {
                                v: PROTOCOL_VERSION,
                                saga_id: Some(id),
                            },
                            Err(e) => refusal(error_code(&e), e.to_string()),
                        },
                    };
                    if let EngineAnswer::Error { code, message, .. } = &answer {
                        warn!(%code, %message, "start request refused");
                    }
                    respond(&client, request.reply, &answer).await;
                });
            }
        }))
    }

    /// Records the saga definitions workers announce.
    pub(crate) async fn serve_registrations(
        &self,
        store: Store,
        catalog: Arc<Catalog>,
    ) -> Result<JoinHandle<()>, EngineError> {
        let mut requests = self
            .client
            .queue_subscribe(names::REGISTER_SUBJECT, names::ENGINE_QUEUE.into())
            .await
            .map_err(|e| broker_error("cannot subscribe to the register subject", e))?;
        let client = self.client.clone();
        Ok(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let answer = match parse_registration(&request.payload) {
                    Err(refused) => refused,
                    Ok(register) if register.v != PROTOCOL_VERSION => refusal(
                        AnswerCode::UnsupportedVersion,
                        format!("register request version {} is not supported", register.v),
                    ),
                    Ok(register) => {
                        let mut answer = EngineAnswer::Ok {
                            v: PROTOCOL_VERSION,
                            saga_id: None,
                        };
                        for spec in register.sagas {
                            match store.register_definition(&spec).await {
                                Ok(()) => {
                                    info!(saga = %spec.name, version = spec.version, "definition registered by a worker");
                                    warn_untimed_steps(&spec);
                                    catalog.add_spec(spec);
                                }
                                Err(e) => {
                                    answer = refusal(error_code(&e), e.to_string());
                                    break;
                                }
                            }
                        }
                        answer
                    }
                };
                respond(&client, request.reply, &answer).await;
            }
        }))
    }
}

/// Reads a register request and checks its sizes (`docs/protocol.md` section 13) before any of
/// it is registered: a request over [`names::MAX_MESSAGE_BYTES`] (a broker configured with a
/// larger `max_payload` delivers one), or one with a definition over
/// [`names::MAX_DEFINITION_BYTES`] as compact JSON, is refused whole.
fn parse_registration(payload: &[u8]) -> Result<RegisterRequest, EngineAnswer> {
    let too_large = |error: EngineError| refusal(error_code(&error), error.to_string());
    let limit = names::MAX_MESSAGE_BYTES as usize;
    if payload.len() > limit {
        return Err(too_large(EngineError::TooLarge {
            what: "the register request".into(),
            size: payload.len(),
            limit,
        }));
    }
    let register: RegisterRequest = serde_json::from_slice(payload).map_err(|e| {
        refusal(
            AnswerCode::BadRequest,
            format!("not a register request: {e}"),
        )
    })?;
    for spec in &register.sagas {
        // Measured as the engine stores it: compact, whatever spacing the sender used.
        let size = serde_json::to_vec(spec).map_or(usize::MAX, |json| json.len());
        if size > names::MAX_DEFINITION_BYTES {
            return Err(too_large(EngineError::TooLarge {
                what: format!(
                    "the definition of saga `{}` version {}",
                    spec.name, spec.version
                ),
                size,
                limit: names::MAX_DEFINITION_BYTES,
            }));
        }
    }
    Ok(register)
}

/// Reads the replies of one partition until aborted (the partition changed owner).
async fn read_partition(
    js: jetstream::Context,
    partition: u32,
    inbox: mpsc::UnboundedSender<Inbound>,
    node: Arc<str>,
) {
    let consumer_name = names::engine_consumer(partition);
    let filter = names::partition_reply_filter(partition);
    let what = format!("pulling the replies of partition {partition}");
    let open = || {
        durable_consumer(
            &js,
            names::REPLY_STREAM,
            &consumer_name,
            &filter,
            REPLY_ACK_WAIT,
            REPLY_MAX_DELIVER,
        )
    };
    // One back-off for both ways pulling fails, so an outage that alternates between them (the
    // stream opens, the next pull errs) still backs off instead of spinning.
    let mut backoff = Backoff::infrastructure();
    let mut consumer = None;
    loop {
        if consumer.is_none() || backoff.failures() > 0 {
            // After an outage the consumer may be gone (a broker that lost its store): open it
            // again; if that fails, wait and try again.
            match open().await {
                Ok(fresh) => consumer = Some(fresh),
                Err(e) => {
                    backoff.wait_after_failure(&what, &e).await;
                    continue;
                }
            }
        }
        let Some(current) = &consumer else { continue };
        // Small batches: what a pull buffered when the partition moves waits out the ack wait
        // before its next owner sees it.
        let mut messages = match current
            .stream()
            .max_messages_per_batch(REPLY_BATCH)
            .heartbeat(REPLY_HEARTBEAT)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(e) => {
                backoff.wait_after_failure(&what, &e).await;
                continue;
            }
        };
        while let Some(next) = messages.next().await {
            let message = match next {
                Ok(message) => message,
                Err(e) => {
                    // Opened again above: a stream whose consumer is gone never heals.
                    backoff.wait_after_failure(&what, &e).await;
                    break;
                }
            };
            backoff.succeeded(&what);
            if let Some(inbound) = admit_reply(message, &node).await
                && inbox.send(inbound).is_err()
            {
                return;
            }
        }
        if backoff.failures() == 0 {
            // The pull stream ended by itself: open it again.
            backoff
                .wait_after_failure(&what, &"the reply stream ended")
                .await;
        }
    }
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Turns a reply message into the driver's input, or drops it (acknowledged, so it is not
/// redelivered) when it cannot be one.
async fn admit_reply(message: jetstream::Message, node: &str) -> Option<Inbound> {
    match serde_json::from_slice::<StepReply>(&message.payload) {
        Ok(reply) if reply.v == PROTOCOL_VERSION => {
            let span = processing_span(&message, &reply, node);
            // The processing lasts until the reply is settled: the acker holds the span.
            let processing = span.clone();
            let acker: Acker = Box::new(move |settle| {
                tokio::spawn(async move {
                    let _processing = processing;
                    let kind = match settle {
                        Settle::Done => AckKind::Ack,
                        // Not at once: while this node's lease is lapsing it may still pull
                        // the partition for a moment, and must not spin on the same reply.
                        Settle::Redeliver => AckKind::Nak(Some(REDELIVER_AFTER)),
                    };
                    if let Err(e) = message.ack_with(kind).await {
                        warn!(error = %e, "reply ack failed; it will be redelivered and ignored as a duplicate");
                    }
                });
            });
            Some(Inbound::Reply(reply, Some(acker), span))
        }
        Ok(reply) => {
            let reason = format!(
                "reply {} has schema version {}; this engine speaks {PROTOCOL_VERSION}",
                reply.command_id, reply.v
            );
            warn!(%reason, "reply refused");
            let _ = message.ack_with(AckKind::Term).await;
            Some(Inbound::Rejected {
                saga_id: reply.saga_id,
                source: message.subject.to_string(),
                reason,
            })
        }
        Err(e) => {
            warn!(subject = %message.subject, error = %e, "malformed reply dropped");
            let saga_id = serde_json::from_slice::<serde_json::Value>(&message.payload)
                .ok()
                .and_then(|v| {
                    v.get("saga_id")
                        .and_then(|id| id.as_str())
                        .and_then(|id| Uuid::parse_str(id).ok())
                });
            let _ = message.ack_with(AckKind::Term).await;
            saga_id.map(|saga_id| Inbound::Rejected {
                saga_id,
                source: message.subject.to_string(),
                reason: format!("malformed reply: {e}"),
            })
        }
    }
}

/// The span of this node's handling of a reply, under the worker's span that sent it.
fn processing_span(message: &jetstream::Message, reply: &StepReply, node: &str) -> Span {
    if !telemetry::exporting() {
        return Span::none();
    }
    let headers = message.headers.as_ref();
    telemetry::processing_span(
        &message.subject,
        message_id(headers),
        read_trace_headers(headers).as_ref(),
        &telemetry::MessageAbout {
            saga_id: reply.saga_id,
            saga: "",
            step: &reply.step,
            direction: reply.direction,
            attempt: reply.attempt,
            node,
        },
    )
}

fn refusal(code: AnswerCode, message: String) -> EngineAnswer {
    EngineAnswer::Error {
        v: PROTOCOL_VERSION,
        code,
        message,
    }
}

fn error_code(error: &EngineError) -> AnswerCode {
    match error {
        EngineError::UnknownDefinition { .. } => AnswerCode::UnknownSaga,
        EngineError::InvalidInput { .. } | EngineError::InputSchema { .. } => {
            AnswerCode::InvalidInput
        }
        EngineError::TooLarge { .. } => AnswerCode::TooLarge,
        EngineError::SecretInClear { .. } => AnswerCode::SecretInClear,
        EngineError::DefinitionChanged { .. } => AnswerCode::DefinitionChanged,
        EngineError::InvalidDefinition(_) => AnswerCode::InvalidDefinition,
        EngineError::Stopped => AnswerCode::Stopping,
        _ => AnswerCode::Internal,
    }
}

async fn respond(
    client: &async_nats::Client,
    reply_to: Option<async_nats::Subject>,
    answer: &EngineAnswer,
) {
    let Some(reply_to) = reply_to else { return };
    match serde_json::to_vec(answer) {
        Ok(payload) => {
            if let Err(e) = client.publish(reply_to, payload.into()).await {
                warn!(error = %e, "cannot answer a request");
            }
        }
        Err(e) => warn!(error = %e, "cannot encode an answer"),
    }
}

/// Publishes step commands to JetStream, de-duplicated by command id.
pub(crate) struct JetStreamTransport {
    js: jetstream::Context,
}

impl JetStreamTransport {
    /// The span of one command's publication, with the trace headers that make the worker's
    /// handling its child (none when nothing records it).
    fn sending(
        &self,
        outbound: &Outbound,
        subject: &str,
        id: &str,
    ) -> (Span, async_nats::HeaderMap) {
        let command = &outbound.command;
        let (span, context) =
            telemetry::sending_span(subject, id, command.saga_id, &outbound.cause);
        span.record("sagaflow.epoch", command.epoch);
        (span, trace_headers(context.as_ref()))
    }
}

impl Transport for JetStreamTransport {
    fn publish<'a>(&'a self, commands: &'a [Outbound]) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            // Send every publish first, then wait for the acks together: one round trip for
            // the batch instead of one per command.
            let mut pending = Vec::with_capacity(commands.len());
            for outbound in commands {
                let command = &outbound.command;
                let payload = match serde_json::to_vec(command) {
                    Ok(payload) => payload,
                    Err(e) => {
                        warn!(command = %command.command_id, error = %e, "cannot encode a command");
                        continue;
                    }
                };
                if payload.len() > names::MAX_MESSAGE_BYTES as usize {
                    // No broker takes it, now or later: counted as handled so the outbox sweep
                    // does not try forever. The attempt times out and its retry policy decides
                    // (a compensation that cannot be sent leaves the saga stuck, with a reason).
                    error!(
                        command = %command.command_id,
                        size = payload.len(),
                        limit = names::MAX_MESSAGE_BYTES,
                        "a step command is too large to publish (the saga's input and outputs \
                         outgrew one message); the attempt will time out"
                    );
                    pending.push((command.command_id.clone(), None));
                    continue;
                }
                let subject = names::command_subject(&command.saga, &command.step);
                let message_id = names::command_message_id(&command.command_id, command.epoch);
                let (span, headers) = self.sending(outbound, &subject, &message_id);
                let publish = jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .headers(headers)
                    .message_id(message_id);
                match self.js.send_publish(subject, publish).await {
                    // The span lasts until the broker acknowledges the command.
                    Ok(ack) => pending.push((command.command_id.clone(), Some((ack, span)))),
                    Err(e) => {
                        warn!(parent: &span, command = %command.command_id, error = %e, "publish failed")
                    }
                }
            }
            let mut accepted = Vec::with_capacity(pending.len());
            for (id, ack) in pending {
                let Some((ack, span)) = ack else {
                    accepted.push(id);
                    continue;
                };
                match ack.await {
                    Ok(_) => accepted.push(id),
                    Err(e) => {
                        warn!(parent: &span, command = %id, error = %e, "publish not acknowledged")
                    }
                }
            }
            accepted
        })
    }
}

/// Over a broker, the attempt timeout is what recovers a command or reply the broker lost; a
/// step without one waits forever if that happens. Allowed (some steps take unbounded time),
/// but said once per registration.
pub(crate) fn warn_untimed_steps(spec: &sagaflow_protocol::SagaSpec) {
    for step in spec.steps.iter().filter(|s| s.timeout.is_none()) {
        warn!(
            saga = %spec.name,
            version = spec.version,
            step = %step.name,
            "step has no attempt timeout: if the broker loses its command or reply, the saga \
             waits until an operator acts (`sagaflow skip-step` or `cancel`); give it a \
             timeout unless it may really run without bound"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(answer: EngineAnswer) -> String {
        match answer {
            EngineAnswer::Error { code, .. } => code.to_string(),
            EngineAnswer::Ok { .. } => "ok".into(),
        }
    }

    #[test]
    fn a_register_request_over_one_message_is_refused_before_it_is_read() {
        // Only a broker configured with a larger `max_payload` delivers one; valid JSON or not,
        // it is refused for its size.
        let mut payload = br#"{"v":1,"sagas":[]}"#.to_vec();
        payload.resize(names::MAX_MESSAGE_BYTES as usize + 1, b' ');
        let refused = parse_registration(&payload).expect_err("too large");
        assert_eq!(code(refused), "too_large");
        payload.truncate(names::MAX_MESSAGE_BYTES as usize);
        assert!(parse_registration(&payload).is_ok());
    }
}
