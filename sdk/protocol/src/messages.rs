//! The messages between the engine and step workers, as JSON.
//!
//! These types are the contract of the wire protocol (see `docs/protocol.md`): the engine sends
//! a [`StepCommand`] for every attempt, and a worker answers with a [`StepReply`]. Both carry a
//! schema version `v`; a receiver refuses a version it does not know rather than guessing.
//! The embedded mode passes the very same values through a channel.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Direction, SagaSpec, StepError, Timestamp};

/// The schema version this library writes and reads.
///
/// Version 2 added the routing and fencing fields of a [`StepCommand`] (`partition`, `epoch`,
/// `reply_to`): a worker replies to `reply_to` and refuses a command of a superseded epoch.
pub const PROTOCOL_VERSION: u32 = 2;

/// The length of `value` as compact JSON (what the size limits count), measured without
/// building the text.
pub fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Infallible: a `Value` always serializes, and the counter never fails a write.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// "Run this attempt": everything a worker needs, and nothing it must look up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCommand {
    /// Schema version, [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Unique per attempt: `{saga_id}:{step}:{direction}:{attempt}`. Used for broker
    /// de-duplication and echoed in the reply.
    pub command_id: String,
    /// The saga instance.
    pub saga_id: Uuid,
    /// The saga definition's name.
    pub saga: String,
    /// The definition version the saga is pinned to.
    pub saga_version: u32,
    /// The partition the saga belongs to: the unit of ownership among engine nodes.
    pub partition: u32,
    /// The fencing epoch under which the engine node owning `partition` sent this command. It
    /// only grows; a worker that has seen a higher one for the partition refuses this command
    /// with [`STALE_EPOCH`](crate::codes::STALE_EPOCH) and runs nothing.
    pub epoch: u64,
    /// Where the reply goes: opaque to the worker, which publishes its reply there unchanged.
    pub reply_to: String,
    /// The step's position in the definition, from 0.
    pub step_index: usize,
    /// The step's name.
    pub step: String,
    /// Forward action or compensation.
    pub direction: Direction,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// Stable across retries and redeliveries of this step in this direction.
    pub idempotency_key: String,
    /// The forward action's key; in a compensation, it names what to undo.
    pub forward_key: String,
    /// When the engine stops waiting for this attempt.
    pub deadline: Option<Timestamp>,
    /// The saga's input.
    pub input: Value,
    /// Outputs of the steps completed so far, by step name.
    pub outputs: BTreeMap<String, Value>,
}

impl StepCommand {
    /// The command id of an attempt.
    pub fn id_for(saga_id: Uuid, step: &str, direction: Direction, attempt: u32) -> String {
        format!("{saga_id}:{step}:{direction}:{attempt}")
    }
}

/// The idempotency key of a step of a saga in one direction: the same for every attempt and
/// redelivery, so the resource behind the step applies its effect at most once.
pub fn idempotency_key(saga_id: Uuid, step: &str, direction: Direction) -> String {
    format!("{saga_id}:{step}:{direction}")
}

/// How an attempt ended, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StepOutcome {
    /// The handler succeeded; `output` is `null` for a compensation.
    Succeeded {
        /// The step's output.
        output: Value,
    },
    /// The handler failed, with a classified error.
    Failed {
        /// Retryable or permanent, with a code and a message.
        error: StepError,
    },
}

/// "This attempt ended so": a worker's answer to one [`StepCommand`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReply {
    /// Schema version, [`PROTOCOL_VERSION`].
    pub v: u32,
    /// The command answered.
    pub command_id: String,
    /// Copied from the command.
    pub saga_id: Uuid,
    /// Copied from the command.
    pub step_index: usize,
    /// Copied from the command.
    pub step: String,
    /// Copied from the command.
    pub direction: Direction,
    /// Copied from the command.
    pub attempt: u32,
    /// Who ran it, for the history.
    pub worker: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: StepOutcome,
}

impl StepReply {
    /// The reply to `command` with `outcome`, signed by `worker`.
    pub fn to(command: &StepCommand, worker: &str, outcome: StepOutcome) -> Self {
        StepReply {
            v: PROTOCOL_VERSION,
            command_id: command.command_id.clone(),
            saga_id: command.saga_id,
            step_index: command.step_index,
            step: command.step.clone(),
            direction: command.direction,
            attempt: command.attempt,
            worker: worker.to_string(),
            outcome,
        }
    }

    /// Whether the worker refused the command because its epoch was superseded
    /// ([`STALE_EPOCH`](crate::codes::STALE_EPOCH)): nothing ran, and the reply says nothing
    /// about the step.
    pub fn is_stale_epoch_refusal(&self) -> bool {
        matches!(&self.outcome, StepOutcome::Failed { error } if error.code == crate::codes::STALE_EPOCH)
    }

    /// The outcome as a `Result`.
    pub fn result(&self) -> Result<Value, StepError> {
        match &self.outcome {
            StepOutcome::Succeeded { output } => Ok(output.clone()),
            StepOutcome::Failed { error } => Err(error.clone()),
        }
    }
}

/// A request to start a saga, sent on [`START_SUBJECT`](crate::names::START_SUBJECT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    /// Schema version, [`PROTOCOL_VERSION`].
    pub v: u32,
    /// The saga's name.
    pub saga: String,
    /// A definition version; the latest registered when absent.
    #[serde(default)]
    pub version: Option<u32>,
    /// The input.
    pub input: Value,
    /// Starting is idempotent on this key: the same key returns the same saga.
    #[serde(default)]
    pub key: Option<String>,
}

/// The answer to a [`StartRequest`] or a [`RegisterRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EngineAnswer {
    /// Done; for a start, the saga's id.
    Ok {
        /// Schema version.
        v: u32,
        /// The saga started (or found by its key); absent for a registration.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        saga_id: Option<Uuid>,
    },
    /// Refused, with the reason.
    Error {
        /// Schema version.
        v: u32,
        /// Why, as a short code (`docs/protocol.md` section 7.5).
        code: AnswerCode,
        /// What to do about it.
        message: String,
    },
}

/// Why an engine refused a request: the `code` of an [`EngineAnswer::Error`]
/// (`docs/protocol.md` section 7.5). Its snake_case name is what travels on the wire.
///
/// A code this build does not know still parses, as [`AnswerCode::Other`] with its text, so a
/// newer engine's answer is read rather than dropped.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::EnumString, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum AnswerCode {
    /// The body is not JSON, or not the message's schema.
    BadRequest,
    /// The body fits the schema, but its `v` is not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// No definition with that name (and version).
    UnknownSaga,
    /// The input, the request or a definition is over its size limit.
    TooLarge,
    /// The input does not fit the first step's input.
    InvalidInput,
    /// A member the saga declares secret arrived in clear, or not as a well-formed envelope:
    /// seal it where it enters (`docs/protocol.md` section 17).
    SecretInClear,
    /// A definition breaks a rule of the saga model.
    InvalidDefinition,
    /// That name and version is already registered with a different definition.
    DefinitionChanged,
    /// The engine is shutting down.
    Stopping,
    /// Anything else; the message says what.
    Internal,
    /// A code this build does not know, with its text as received.
    #[strum(default)]
    Other(String),
}

impl AnswerCode {
    /// The code as it travels on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            AnswerCode::Other(text) => text,
            known => known.into(),
        }
    }
}

impl std::fmt::Display for AnswerCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for AnswerCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for AnswerCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for AnswerCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AnswerCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // An unknown text parses as `Other`: parsing cannot fail.
        let Ok(code) = String::deserialize(deserializer)?.parse::<AnswerCode>();
        Ok(code)
    }
}

/// A worker's announcement of the saga definitions it serves, sent on
/// [`REGISTER_SUBJECT`](crate::names::REGISTER_SUBJECT), so engines can start and drive them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Schema version, [`PROTOCOL_VERSION`].
    pub v: u32,
    /// The definitions.
    pub sagas: Vec<SagaSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_counts_the_compact_text() {
        let value = serde_json::json!({"a": [1, 2.5, null], "b": "quote \" and é", "c": {}});
        assert_eq!(json_len(&value), value.to_string().len());
    }

    #[test]
    fn reply_json_is_flat_and_round_trips() {
        let command = StepCommand {
            v: PROTOCOL_VERSION,
            command_id: "c".into(),
            saga_id: Uuid::from_u128(7),
            saga: "s".into(),
            saga_version: 1,
            partition: 3,
            epoch: 7,
            reply_to: crate::names::reply_subject(3, "s"),
            step_index: 0,
            step: "a".into(),
            direction: Direction::Forward,
            attempt: 2,
            idempotency_key: "k".into(),
            forward_key: "k".into(),
            deadline: Some(Timestamp(5)),
            input: Value::Null,
            outputs: BTreeMap::new(),
        };
        let failed = StepReply::to(
            &command,
            "w1",
            StepOutcome::Failed {
                error: StepError::permanent("card_declined", "no"),
            },
        );
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["status"], "failed");
        assert_eq!(json["error"]["class"], "permanent");
        assert_eq!(json["attempt"], 2);
        assert_eq!(serde_json::from_value::<StepReply>(json).unwrap(), failed);
        let ok = StepReply::to(&command, "w1", StepOutcome::Succeeded { output: 3.into() });
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(json["status"], "succeeded");
        assert_eq!(json["output"], 3);
    }

    #[test]
    fn answer_codes_are_snake_case_and_unknown_ones_still_parse() {
        let refused = EngineAnswer::Error {
            v: PROTOCOL_VERSION,
            code: AnswerCode::UnsupportedVersion,
            message: "m".into(),
        };
        let json = serde_json::to_value(&refused).unwrap();
        assert_eq!(json["code"], "unsupported_version");
        assert_eq!(
            serde_json::from_value::<EngineAnswer>(json).unwrap(),
            refused
        );
        for name in <AnswerCode as strum::VariantNames>::VARIANTS {
            let code: AnswerCode = serde_json::from_value(Value::from(*name)).unwrap();
            assert_eq!(code.as_str(), *name);
        }
        let json =
            serde_json::json!({"status": "error", "v": 1, "code": "rate_limited", "message": "m"});
        match serde_json::from_value::<EngineAnswer>(json).unwrap() {
            EngineAnswer::Error { code, .. } => {
                assert_eq!(code, AnswerCode::Other("rate_limited".into()));
                assert_eq!(code, "rate_limited");
                assert_eq!(serde_json::to_value(&code).unwrap(), "rate_limited");
            }
            other => panic!("not an error: {other:?}"),
        }
    }
}
