//! Creating the protocol's streams and consumers, idempotently.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::{ProtocolError, names};

/// How long JetStream remembers a `Nats-Msg-Id` to drop a duplicate publish.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Creates the command and reply streams if they do not exist (both sides call this at start).
pub async fn ensure_streams(js: &jetstream::Context) -> Result<(), ProtocolError> {
    for (name, subjects) in [
        (names::COMMAND_STREAM, "sagaflow.cmd.>"),
        (names::REPLY_STREAM, "sagaflow.reply.>"),
    ] {
        js.get_or_create_stream(stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            // Each message is for exactly one consumer and goes once acknowledged.
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_message_size: names::MAX_MESSAGE_BYTES,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| ProtocolError::Stream {
            action: format!("create stream {name}"),
            source: Box::new(e),
        })?;
    }
    Ok(())
}

/// The durable pull consumer named `durable` on `stream_name`, filtered to `filter`.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    durable: &str,
    filter: &str,
    ack_wait: Duration,
    max_deliver: i64,
) -> Result<consumer::Consumer<consumer::pull::Config>, ProtocolError> {
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| ProtocolError::Stream {
            action: format!("open stream {stream_name}"),
            source: Box::new(e),
        })?;
    stream
        .get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.to_string()),
                filter_subject: filter.to_string(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ProtocolError::Stream {
            action: format!("create consumer {durable}"),
            source: Box::new(e),
        })
}
