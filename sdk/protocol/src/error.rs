//! The protocol crate's error type.

use thiserror::Error;

/// What went wrong while checking a definition or setting up the broker's streams.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// A retry policy field is out of range.
    #[error("invalid retry policy: {0}")]
    InvalidRetryPolicy(String),

    /// The saga definition breaks a rule of the saga model.
    #[error("invalid saga definition `{saga}`: {reason}")]
    InvalidDefinition {
        /// The saga's name.
        saga: String,
        /// Which rule was broken and how to fix it.
        reason: String,
    },

    /// The broker refused to create or open one of the protocol's streams or consumers.
    #[cfg(feature = "jetstream")]
    #[error(
        "NATS: cannot {action}: {source}; check that nats-server runs with JetStream (-js) at the given URL"
    )]
    Stream {
        /// What was being done, naming the stream or consumer.
        action: String,
        /// The broker's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
