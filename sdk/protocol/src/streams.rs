//! Creating the protocol's streams and consumers, idempotently.

use std::time::Duration;

use async_nats::ServerAddr;
use async_nats::jetstream::{self, consumer, stream};
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::{ProtocolError, names};

/// How long JetStream remembers a `Nats-Msg-Id` to drop a duplicate publish.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The most replicas JetStream keeps of a stream.
pub const MAX_STREAM_REPLICAS: usize = 5;

/// Creates the command and reply streams if they do not exist (both sides call this at start),
/// each kept on `replicas` servers: 1 on a single server, 3 on a three-server JetStream
/// cluster so that a stream survives losing one server.
///
/// A stream that exists with fewer replicas is raised to `replicas` (JetStream copies the data;
/// the rest of its configuration stays as it is); one with more keeps them, so a process started
/// with the default of 1 never strips a cluster's streams of their copies (lowering the count is
/// an operator's act, with the `nats` tool). When the broker refuses, the error says how to
/// change it by hand.
pub async fn ensure_streams(js: &jetstream::Context, replicas: usize) -> Result<(), ProtocolError> {
    if !(1..=MAX_STREAM_REPLICAS).contains(&replicas) {
        return Err(ProtocolError::InvalidReplicas(replicas));
    }
    for (name, subjects) in [
        (names::COMMAND_STREAM, "sagaflow.cmd.>"),
        (names::REPLY_STREAM, "sagaflow.reply.>"),
    ] {
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            // Each message is for exactly one consumer and goes once acknowledged.
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_message_size: names::MAX_MESSAGE_BYTES,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        };
        let stream =
            get_or_create_patiently(js, config)
                .await
                .map_err(|e| ProtocolError::Stream {
                    action: if replicas > 1 {
                        format!(
                            "create stream {name} with {replicas} replicas (more than one needs a \
                         JetStream cluster of at least {replicas} servers; on a single server \
                         use 1)"
                        )
                    } else {
                        format!("create stream {name}")
                    },
                    source: Box::new(e),
                })?;
        let config = &stream.cached_info().config;
        // The broker reports 0 for a stream created without a count: that is one replica.
        let current = config.num_replicas.max(1);
        if current > replicas {
            info!(
                stream = name,
                kept = current,
                asked = replicas,
                "the stream keeps more replicas than asked for; it is left as it is"
            );
        } else if current < replicas {
            // On its own, nats-server accepts the change of a stream to more replicas than one,
            // and keeps one (it refuses a new stream with more). It has greeted this client by
            // now: the stream's info came from it.
            if replicas > 1 && js.client().server_info().cluster.is_none() {
                return Err(ProtocolError::NotClustered {
                    requested: replicas,
                });
            }
            warn!(
                stream = name,
                from = current,
                to = replicas,
                "raising the stream's replica count; give every engine and worker on this \
                 broker the same count"
            );
            js.update_stream(stream::Config {
                num_replicas: replicas,
                ..config.clone()
            })
            .await
            .map_err(|e| ProtocolError::Replicas {
                stream: name.to_string(),
                current,
                requested: replicas,
                source: Box::new(e),
            })?;
        }
    }
    Ok(())
}

/// How long [`ensure_streams`] keeps asking while the broker times out or has no JetStream
/// leader yet: a cluster that is starting, or electing, answers within seconds.
const STREAM_SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// `get_or_create_stream`, asked again with back-off while the broker times out or its
/// JetStream is not available yet (a cluster electing its meta leader, or busy creating the
/// streams and consumers of several processes starting at once); any other refusal at once.
async fn get_or_create_patiently(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    use jetstream::context::CreateStreamErrorKind;
    let give_up = tokio::time::Instant::now() + STREAM_SETUP_PATIENCE;
    let mut backoff = Backoff::infrastructure();
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(stream) => return Ok(stream),
            Err(error)
                if matches!(
                    error.kind(),
                    CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable
                ) && tokio::time::Instant::now() < give_up =>
            {
                let delay = backoff.next_delay();
                warn!(stream = %config.name, %error, ?delay, "the broker did not answer the stream's set-up yet; asking again");
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The NATS servers of a comma-separated list (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`),
/// in order. Blanks around entries are ignored; an entry without a scheme is `nats://`, without
/// a port 4222. A client given several servers connects to one of them and, when it goes away,
/// reconnects to another.
pub fn server_addrs(list: &str) -> Result<Vec<ServerAddr>, ProtocolError> {
    const EXPECTED: &str = "expected one NATS URL or several separated by commas, like \
                            nats://127.0.0.1:4222,nats://127.0.0.1:4223";
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.iter().all(|e| e.is_empty()) {
        return Err(ProtocolError::ServerList(format!(
            "no NATS server given; {EXPECTED}"
        )));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            if entry.is_empty() {
                return Err(ProtocolError::ServerList(format!(
                    "entry {} of `{list}` is empty (a stray comma?); {EXPECTED}",
                    i + 1
                )));
            }
            entry.parse::<ServerAddr>().map_err(|e| {
                ProtocolError::ServerList(format!("`{entry}` in `{list}`: {e}; {EXPECTED}"))
            })
        })
        .collect()
}

/// How far consumer `durable` of `stream_name` lags: messages not yet delivered, and messages
/// delivered but not yet acknowledged.
pub async fn consumer_lag(
    js: &jetstream::Context,
    stream_name: &str,
    durable: &str,
) -> Result<(u64, u64), ProtocolError> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| ProtocolError::Stream {
        action: format!("read consumer {durable} of stream {stream_name}"),
        source: e,
    };
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| failed(Box::new(e)))?;
    let info = stream
        .consumer_info(durable)
        .await
        .map_err(|e| failed(Box::new(e)))?;
    Ok((info.num_pending, info.num_ack_pending as u64))
}

/// The durable pull consumer named `durable` on `stream_name`, filtered to `filter`.
///
/// It sets no replica count: the broker then keeps it on as many servers as its stream (a
/// work-queue stream's consumers must match the stream's count).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &str) -> Vec<String> {
        server_addrs(list)
            .expect("a valid list")
            .iter()
            .map(|a| format!("{}:{}", a.host(), a.port()))
            .collect()
    }

    fn refusal(list: &str) -> String {
        server_addrs(list).expect_err("an invalid list").to_string()
    }

    #[test]
    fn one_url_is_one_server() {
        assert_eq!(urls("nats://127.0.0.1:4222"), ["127.0.0.1:4222"]);
    }

    #[test]
    fn a_comma_separated_list_is_several_servers_in_order() {
        assert_eq!(
            urls("nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://10.0.0.5:4224"),
            ["127.0.0.1:4222", "127.0.0.1:4223", "10.0.0.5:4224"]
        );
    }

    #[test]
    fn blanks_around_entries_are_ignored() {
        assert_eq!(
            urls("  nats://127.0.0.1:4222 ,\tnats://127.0.0.1:4223\n"),
            ["127.0.0.1:4222", "127.0.0.1:4223"]
        );
    }

    #[test]
    fn scheme_and_port_default_as_in_async_nats() {
        assert_eq!(urls("localhost,tls://h:1"), ["localhost:4222", "h:1"]);
    }

    #[test]
    fn an_empty_list_is_refused_with_the_expected_form() {
        for list in ["", "  ", ",", " , "] {
            let message = refusal(list);
            assert!(
                message.contains("no NATS server given"),
                "{list:?}: {message}"
            );
            assert!(
                message.contains("nats://127.0.0.1:4222,nats://127.0.0.1:4223"),
                "{message}"
            );
        }
    }

    #[test]
    fn an_empty_entry_is_refused_and_named() {
        let message = refusal("nats://a:4222,,nats://b:4222");
        assert!(message.contains("entry 2"), "{message}");
        assert!(message.contains("separated by commas"), "{message}");
        let message = refusal("nats://a:4222,");
        assert!(message.contains("entry 2"), "{message}");
    }

    #[test]
    fn a_bad_entry_is_refused_and_named() {
        let message = refusal("nats://a:4222,http://b:80");
        assert!(message.contains("`http://b:80`"), "{message}");
        assert!(message.contains("expected one NATS URL"), "{message}");
        let message = refusal("nats://a:notaport");
        assert!(message.contains("nats://a:notaport"), "{message}");
    }
}
