//! NATS subjects, streams and consumers of the protocol.

/// The JetStream stream that holds step commands.
pub const COMMAND_STREAM: &str = "SAGAFLOW_COMMANDS";
/// The JetStream stream that holds replies.
pub const REPLY_STREAM: &str = "SAGAFLOW_REPLIES";
/// The durable consumer protocol version 1 engines read every reply with. Its filter overlaps
/// every partition's, which a work-queue stream does not allow, so an engine of version 2
/// deletes it.
pub const LEGACY_ENGINE_CONSUMER: &str = "sagaflow-engine";
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

/// Where the engine asks for replies to the commands of a saga named `saga` in `partition`
/// (a command's `reply_to`; workers do not build it, they publish where the command says).
pub fn reply_subject(partition: u32, saga: &str) -> String {
    format!("sagaflow.reply.{partition}.{saga}")
}

/// Every reply for sagas of `partition`: what the owner of the partition consumes.
pub fn partition_reply_filter(partition: u32) -> String {
    format!("sagaflow.reply.{partition}.>")
}

/// The durable consumer that reads the replies of `partition`, shared by whichever engine node
/// owns the partition at the moment.
pub fn engine_consumer(partition: u32) -> String {
    format!("sagaflow-engine-{partition}")
}

/// The `Nats-Msg-Id` of a command: the command id and the epoch it was sent under, so that the
/// new owner of a partition can send an attempt again (under its own epoch) within the
/// duplicate window, while the same send repeated is still de-duplicated.
pub fn command_message_id(command_id: &str, epoch: u64) -> String {
    format!("{command_id}@{epoch}")
}

/// The durable consumer the workers of `saga` share.
pub fn worker_consumer(saga: &str) -> String {
    format!("sagaflow-worker-{saga}")
}

/// The `Nats-Msg-Id` of the reply to a command sent under `epoch`: a command the new owner of
/// a partition sends again under its own epoch gets a reply of its own, not one de-duplicated
/// against the refusal the old epoch's command got.
pub fn reply_message_id(command_id: &str, epoch: u64) -> String {
    format!("reply:{command_id}@{epoch}")
}
