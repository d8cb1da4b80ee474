//! The engine's error type.

use sagaflow_protocol::ProtocolError;
use sagaflow_sdk::SdkError;
use sea_orm::DbErr;
use thiserror::Error;
use uuid::Uuid;

use crate::machine::MachineError;

/// Everything the engine can refuse or fail at, with what to do about it.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The database could not be opened.
    #[error(
        "cannot open the database at `{url}` (attempts: {attempts}): {source}; use sqlite://PATH \
         for a file (created if missing) or postgres://USER@HOST:PORT/DB naming a database that \
         exists, with a user the server accepts"
    )]
    Connect {
        /// The URL given (without a password).
        url: String,
        /// How many connection attempts were made: one when the error is permanent (no such
        /// database, refused credentials), more when the server did not answer.
        attempts: u32,
        /// The driver's error.
        #[source]
        source: DbErr,
    },

    /// A database statement failed.
    #[error("database error while {doing}: {source}")]
    Database {
        /// What the engine was doing.
        doing: &'static str,
        /// The driver's error.
        #[source]
        source: DbErr,
    },

    /// No definition with that name (and version) is registered.
    #[error("unknown saga `{name}`{}; registered sagas: {known}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownDefinition {
        /// The name asked for.
        name: String,
        /// The version asked for, if any.
        version: Option<u32>,
        /// What is registered, as name@version, comma separated.
        known: String,
    },

    /// A definition breaks a rule of the saga model.
    #[error("definition refused: {0}")]
    InvalidDefinition(#[source] ProtocolError),

    /// A definition was registered again with different content under the same version.
    #[error(
        "saga `{name}` version {version} is already registered with a different definition; \
         sagas pin their version, so register the change as version {next}",
        next = version + 1
    )]
    DefinitionChanged {
        /// The saga name.
        name: String,
        /// The version that clashed.
        version: u32,
    },

    /// No saga has this id.
    #[error("no saga has id {0}; `sagaflow list` shows the sagas there are")]
    UnknownSaga(Uuid),

    /// A start's secret input member is in clear or not a well-formed envelope. Nothing was
    /// started, and nothing of the input was stored.
    #[error(
        "input refused for saga `{saga}`: member `{field}` is secret and {problem}; seal it \
         where the input enters (`sagaflow start --secret-keys FILE --seal {field}`, or \
         SecretKeys::seal_fields in Rust; docs/protocol.md section 17). Nothing was started"
    )]
    SecretInClear {
        /// The saga name.
        saga: String,
        /// The member.
        field: String,
        /// "arrived in clear", or what is wrong with its envelope.
        problem: String,
    },

    /// Secret fields could not be sealed or opened, or no keys were given for them.
    #[error("{0}")]
    Secret(#[source] ProtocolError),

    /// A saga run in this process declares secret fields, and the engine has no keys.
    #[error(
        "saga `{saga}` has secret fields ({fields}) and this engine runs its handlers without \
         keys to seal and open them; give it the key file (--secret-keys or \
         SAGAFLOW_SECRET_KEYS_FILE)"
    )]
    SecretKeysMissing {
        /// The saga name.
        saga: String,
        /// Its secret fields, comma separated.
        fields: String,
    },

    /// The start input does not fit the saga's step types.
    #[error("input refused for saga `{saga}`: {source}")]
    InvalidInput {
        /// The saga name.
        saga: String,
        /// Which step's type it did not fit, and where.
        #[source]
        source: SdkError,
    },

    /// The start input does not match the input schema of the saga's first step, as the
    /// step's worker registered it. Nothing was started.
    #[error(
        "input refused for saga `{saga}`: it does not match the input schema of its first step \
         `{step}`: {problem} (at JSON path {path}); nothing was started: fix the input"
    )]
    InputSchema {
        /// The saga name.
        saga: String,
        /// The first step's name.
        step: String,
        /// The schema's complaint.
        problem: String,
        /// Where in the input, as a JSON Pointer (`/` for the input as a whole).
        path: String,
    },

    /// The input (or a step output) is larger than the engine accepts.
    #[error(
        "{what} is {size} bytes, over the limit of {limit} bytes; store large data elsewhere and pass a reference"
    )]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },

    /// The state machine refused the event.
    #[error(transparent)]
    Refused(#[from] MachineError),

    /// Stored data does not parse: the database was edited by hand or by a newer version.
    #[error(
        "stored data of saga {saga_id} cannot be read ({detail}); it was written by another version or edited by hand"
    )]
    Corrupt {
        /// The saga.
        saga_id: String,
        /// What did not parse.
        detail: String,
    },

    /// A stored saga definition does not parse (or cannot be written back): the database was
    /// edited by hand or by a newer version.
    #[error(
        "stored definition `{name}` version {version} cannot be read ({detail}); it was written by another version or edited by hand"
    )]
    CorruptDefinition {
        /// The definition's saga name.
        name: String,
        /// The definition's version.
        version: i64,
        /// What did not parse.
        detail: String,
    },

    /// The database was created with another partition count, which cannot change.
    #[error(
        "this database was created with {recorded} partitions, and the count cannot change; drop --partitions {wanted} (it applies only to a new database)"
    )]
    PartitionCountFixed {
        /// The count the database records.
        recorded: u32,
        /// The count asked for.
        wanted: u32,
    },

    /// Lease settings that would let a lease lapse between two renewals.
    #[error(
        "a lease of {lease:?} renewed every {renew_every:?} could lapse between renewals; make the lease at least twice the renewal interval (the defaults are 5s and 1s)"
    )]
    InvalidLeaseSettings {
        /// The lease length.
        lease: std::time::Duration,
        /// The renewal interval.
        renew_every: std::time::Duration,
    },

    /// A partition count out of range.
    #[error("{0} partitions is not a usable count; give between 1 and 1024")]
    InvalidPartitionCount(u32),

    /// This engine node does not hold the lease of the saga's partition (any more): another
    /// node drives the saga.
    #[error(
        "saga {saga_id} is in partition {partition}, which this engine node does not hold; the node that holds it (see `sagaflow nodes`) drives it, so send the request again"
    )]
    NotOwner {
        /// The saga.
        saga_id: Uuid,
        /// Its partition.
        partition: u32,
    },

    /// Another engine runs on this SQLite file.
    #[error(
        "another engine is running on the SQLite database {path}; a SQLite database has one engine at a time (stop the other one, or use PostgreSQL to run several engine nodes)"
    )]
    AnotherEngine {
        /// The database file.
        path: String,
    },

    /// The SQLite engine lock file cannot be opened or locked.
    #[error("cannot lock {path} for this engine: {source}; check that its folder is writable")]
    EngineLock {
        /// The lock file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// This node holds no partition yet (it is starting, or has lost its leases): it can
    /// start no saga.
    #[error(
        "this engine node holds no partition yet, so it cannot start sagas; try again in a moment, or check `sagaflow nodes` and that the database is reachable"
    )]
    NoPartitions,

    /// Another writer changed the saga first; re-read and try again.
    #[error(
        "saga {0} was changed by another writer at the same time; nothing was changed, try again"
    )]
    Conflict(Uuid),

    /// The message broker is unreachable or refused an operation.
    #[error(
        "NATS: {what}: {source}; check that nats-server runs with JetStream (-js) at the given URL"
    )]
    Broker {
        /// What failed ("cannot connect to nats://...").
        what: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// NATS refused the connection: credentials refused, TLS failed, or the credentials or
    /// certificates could not be read (the message says which, and what to check).
    #[error(transparent)]
    NatsConnection(ProtocolError),

    /// The engine is shutting down or has stopped.
    #[error("the engine has stopped; start it again to continue")]
    Stopped,

    // ----- operator and audit queries (`ops`) -----
    /// A query (filter, cursor, time or duration) cannot be run as given; nothing was read or
    /// changed.
    #[error("{problem}; {hint}")]
    InvalidQuery {
        /// What is wrong with it.
        problem: String,
        /// What to give instead.
        hint: String,
    },

    /// An export could not be written (the disk is full, the pipe was closed).
    #[error("cannot write the export: {0}; check the destination and run it again")]
    Export(#[source] std::io::Error),
}

impl EngineError {
    /// An [`EngineError::InvalidQuery`].
    pub(crate) fn invalid_query(problem: impl Into<String>, hint: impl Into<String>) -> Self {
        EngineError::InvalidQuery {
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn db(doing: &'static str) -> impl FnOnce(DbErr) -> EngineError {
        move |source| EngineError::Database { doing, source }
    }
}
