//! A step handler's failure as it travels in a reply: classified, so the engine knows whether
//! to retry.

use serde::{Deserialize, Serialize};

/// Whether a failed attempt may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Transient: the step's retry policy decides whether another attempt follows.
    Retryable,
    /// Final: no more attempts (a declined card, an invalid address).
    Permanent,
}

/// A step handler's failure, classified so the engine knows whether to retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    /// Retryable or permanent.
    pub class: ErrorClass,
    /// A short machine-readable code (`card_declined`, `timeout`); retry policies can list codes
    /// that are never retried.
    pub code: String,
    /// What happened, for people reading the history.
    pub message: String,
}

impl StepError {
    /// A transient failure: retried by the step's policy.
    ///
    /// A retryable error promises nothing about the effect (the attempt may have applied it and
    /// failed afterwards), so when the policy gives up, a compensatable step is compensated too,
    /// with no output, and a pivot leaves the saga stuck for an operator to decide.
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Retryable,
            code: code.into(),
            message: message.into(),
        }
    }

    /// A final failure: the saga compensates (before the pivot) or becomes stuck (after it, or
    /// in a compensation).
    ///
    /// A permanent error is a promise that nothing was applied under this step's idempotency
    /// key, by this attempt or an earlier one (an idempotent handler that finds an earlier effect
    /// reports it instead of failing), so the failed step itself is not compensated.
    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Permanent,
            code: code.into(),
            message: message.into(),
        }
    }

    /// Whether the handler marked it retryable.
    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let class = match self.class {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
        };
        write!(f, "{} ({class}): {}", self.code, self.message)
    }
}

impl std::error::Error for StepError {}

/// Error codes the protocol itself gives meaning to (`docs/protocol.md` section 8).
pub mod codes {
    /// The command came from an engine node whose ownership of the saga's partition was
    /// superseded (its epoch is lower than one the worker already saw): nothing was run. The
    /// engine records such a reply and ignores it; the current owner sends the attempt again.
    pub const STALE_EPOCH: &str = "stale_epoch";
    /// The command's schema version is not one the worker speaks.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// The worker serves no such saga definition.
    pub const UNKNOWN_SAGA: &str = "unknown_saga";
    /// The command does not match the protocol's schema.
    pub const MALFORMED_COMMAND: &str = "malformed_command";
}
