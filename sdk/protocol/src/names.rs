//! NATS subjects, streams and consumers of the protocol.

/// The JetStream stream that holds step commands.
pub const COMMAND_STREAM: &str = "SAGAFLOW_COMMANDS";
/// The JetStream stream that holds replies.
pub const REPLY_STREAM: &str = "SAGAFLOW_REPLIES";
/// The durable consumer the engine reads replies with.
pub const ENGINE_CONSUMER: &str = "sagaflow-engine";
/// Core NATS request subject to start a saga.
pub const START_SUBJECT: &str = "sagaflow.start";
/// Core NATS request subject a worker announces its saga definitions on.
pub const REGISTER_SUBJECT: &str = "sagaflow.register";
/// Queue group the engines answer start and register requests in.
pub const ENGINE_QUEUE: &str = "sagaflow-engine";
/// The largest message either stream accepts, in bytes.
pub const MAX_MESSAGE_BYTES: i32 = 1024 * 1024;
/// The largest output one step may return, as compact JSON: every later command carries
/// it, so a few of them must fit in one message.
pub const MAX_OUTPUT_BYTES: usize = 256 * 1024;
/// The largest saga definition a register request may carry, as compact JSON: the engine keeps
/// every definition in memory and in its database, and one this big is a mistake (a document
/// pasted into a step's description), not a saga.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;

/// Where the command for a step of a saga is published.
pub fn command_subject(saga: &str, step: &str) -> String {
    format!("sagaflow.cmd.{saga}.{step}")
}

/// What a worker serving every step of `saga` consumes.
pub fn command_filter(saga: &str) -> String {
    format!("sagaflow.cmd.{saga}.>")
}

/// Where replies for `saga` are published.
pub fn reply_subject(saga: &str) -> String {
    format!("sagaflow.reply.{saga}")
}

/// The durable consumer the workers of `saga` share.
pub fn worker_consumer(saga: &str) -> String {
    format!("sagaflow-worker-{saga}")
}

/// The `Nats-Msg-Id` of the reply to a command.
pub fn reply_message_id(command_id: &str) -> String {
    format!("reply:{command_id}")
}
