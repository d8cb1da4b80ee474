//! The SDK's error type.

use thiserror::Error;

/// What went wrong while declaring a saga or converting step data.
#[derive(Debug, Error)]
pub enum SdkError {
    /// The saga definition or a retry policy breaks a rule of the saga model (see
    /// [`crate::SagaBuilder::build`]).
    #[error(transparent)]
    Definition(#[from] sagaflow_protocol::ProtocolError),

    /// JSON could not be turned into the Rust type a step expects.
    #[error("{what} does not match the type `{type_name}` expected by step `{step}`: {detail}")]
    Deserialize {
        /// Which value was being read: the saga input, an output, ...
        what: String,
        /// The step that expected it.
        step: String,
        /// The Rust type it should have fitted.
        type_name: &'static str,
        /// serde's explanation, with the field path.
        detail: String,
    },

    /// A step output could not be turned into JSON.
    #[error("output of step `{step}` could not be serialized to JSON: {detail}")]
    Serialize {
        /// The step whose output failed.
        step: String,
        /// serde's explanation.
        detail: String,
    },

    /// The named step does not exist in the saga.
    #[error("saga `{saga}` has no step `{step}`; its steps are: {known}")]
    UnknownStep {
        /// The saga's name.
        saga: String,
        /// The step asked for.
        step: String,
        /// The step names it does have, comma separated.
        known: String,
    },

    /// The metrics endpoint could not be started.
    #[error(
        "cannot serve metrics on {addr}: {detail}; give --metrics-addr an address that is free on this host"
    )]
    Metrics {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the exporter said.
        detail: String,
    },
    /// The trace exporter cannot be set up from the `OTEL_*` variables.
    #[error(
        "cannot export traces: {detail}; fix the OTEL_EXPORTER_OTLP_* variables or unset \
         OTEL_EXPORTER_OTLP_ENDPOINT to run without exporting"
    )]
    Telemetry {
        /// What was wrong.
        detail: String,
    },
}
