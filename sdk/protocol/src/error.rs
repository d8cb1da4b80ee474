//! The protocol crate's error type.

use thiserror::Error;

/// What went wrong while checking a definition or setting up the broker's streams.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// Secret keys could not be read.
    #[error("{origin}: {reason}")]
    SecretKeys {
        /// Where the keys came from (a file, an environment variable).
        origin: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// A secret field could not be sealed or opened.
    #[error("secret field `{field}` (key `{kid}`): {reason}")]
    SecretField {
        /// The field's name.
        field: String,
        /// The id of the key its envelope names (or would be sealed with); `none` when the
        /// envelope names none.
        kid: String,
        /// What failed.
        reason: String,
    },

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

    /// A stream's replica count is out of JetStream's range.
    #[cfg(feature = "jetstream")]
    #[error(
        "a stream cannot have {0} replicas: give 1 to 5 (1 on a single nats-server, 3 on a \
         three-server JetStream cluster so that a stream survives losing one server)"
    )]
    InvalidReplicas(usize),

    /// A stream exists with another replica count and the broker refused to change it.
    #[cfg(feature = "jetstream")]
    #[error(
        "NATS: stream {stream} has {current} replica(s) and changing it to {requested} failed: \
         {source}; a count above 1 needs a JetStream cluster of at least that many servers. \
         Either ask for {current} (the stream's count), or change the stream yourself \
         (`nats stream edit {stream} --replicas {requested}`) and start again"
    )]
    Replicas {
        /// The stream's name.
        stream: String,
        /// Its replica count now.
        current: usize,
        /// The count asked for.
        requested: usize,
        /// The broker's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// More than one replica was asked for from a nats-server that is not part of a cluster.
    #[cfg(feature = "jetstream")]
    #[error(
        "NATS: {requested} stream replicas need a JetStream cluster of at least {requested} \
         servers, but the server connected to is not part of a cluster (on its own, \
         nats-server keeps one replica whatever is asked). Ask for 1 (`--stream-replicas 1`), \
         or connect to the servers of a cluster"
    )]
    NotClustered {
        /// The count asked for.
        requested: usize,
    },

    /// No connection to NATS: the servers refused the credentials, TLS failed, or (for a
    /// command run by hand) none answered. The reason says which and what to check.
    #[cfg(feature = "jetstream")]
    #[error("cannot connect to NATS at {servers}: {reason}")]
    Connect {
        /// The servers tried, credentials masked.
        servers: String,
        /// What failed and what to check.
        reason: String,
    },

    /// A credentials or TLS file could not be read or used.
    #[cfg(feature = "jetstream")]
    #[error("{what}: {reason}")]
    Credentials {
        /// What could not be read.
        what: String,
        /// Why, and what to check.
        reason: String,
    },

    /// A list of NATS servers could not be read.
    #[cfg(feature = "jetstream")]
    #[error("invalid NATS server list: {0}")]
    ServerList(String),
}
