//! # Sagaflow protocol
//!
//! What the engine (`sagaflow-engine`) and the SDK (`sagaflow-sdk`) share, and nothing else:
//!
//! - the data form of a saga definition ([`SagaSpec`], [`StepSpec`], [`StepKind`],
//!   [`Direction`]) and its retry policy ([`RetryPolicy`]);
//! - [`backoff`]: the delay before each retry, computed from a policy (the one module that uses
//!   the `backoff` crate), and the retry loop of every infrastructure call;
//! - [`Timestamp`], the protocol's unit of time;
//! - the wire messages ([`StepCommand`], [`StepReply`], [`StartRequest`], [`RegisterRequest`],
//!   [`EngineAnswer`]), their errors ([`StepError`]) and the NATS [`names`], as in
//!   `docs/protocol.md`;
//! - with the `jetstream` feature, creating the protocol's streams and consumers
//!   (`ensure_streams`, `durable_consumer`) and reading a list of NATS servers
//!   (`server_addrs`);
//! - [`trace`]: the W3C trace context (`traceparent`, `tracestate`) messages carry, and the
//!   trace every saga's spans share;
//! - [`sealed`]: secret payload fields sealed into envelopes ([`SecretKeys`], [`Envelope`]);
//! - [`database_url`]: how a database URL given by a user becomes the URL the driver opens.
//!
//! A workflow author depends on `sagaflow-sdk`, which re-exports what an author needs from here.

pub mod backoff;
#[cfg(feature = "jetstream")]
mod connect;
mod database_url;
mod error;
mod messages;
pub mod names;
mod retry;
pub mod sealed;
mod spec;
mod step_error;
#[cfg(feature = "jetstream")]
mod streams;
mod time;
pub mod trace;

#[cfg(feature = "jetstream")]
pub use connect::{
    NatsAuth, NatsSecurity, NatsTls, Secret, WhileUnreachable, connect, connect_with,
    redact_nats_servers,
};
pub use database_url::{database_url, redact_database_url, sqlite_file};
pub use error::ProtocolError;
pub use messages::{
    AnswerCode, EngineAnswer, PROTOCOL_VERSION, RegisterRequest, StartRequest, StepCommand,
    StepOutcome, StepReply, idempotency_key, json_len,
};
pub use retry::{RetryPolicy, RetryPolicyBuilder};
pub use sealed::{Envelope, SecretKeys};
pub use spec::{Direction, SagaSpec, StepKind, StepSpec};
pub use step_error::{ErrorClass, StepError, codes};
#[cfg(feature = "jetstream")]
pub use streams::{
    DUPLICATE_WINDOW, MAX_STREAM_REPLICAS, consumer_lag, durable_consumer, ensure_streams,
    server_addrs,
};
pub use time::Timestamp;
pub use trace::{TraceContext, TraceParent};
