//! sea-orm entities for the tables the migrations create.

/// `saga_definitions`: one row per registered (name, version).
pub mod definition {
    use sea_orm::entity::prelude::*;

    /// One row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_definitions")]
    pub struct Model {
        /// The saga name.
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        /// The definition version.
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i32,
        /// The `SagaSpec` as JSON.
        #[sea_orm(column_type = "Text")]
        pub spec: String,
        /// When it was first registered (ms since the epoch).
        pub registered_at: i64,
    }

    /// No relations: the tables are joined by hand where needed.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `sagas`: one row per instance.
pub mod saga {
    use sea_orm::entity::prelude::*;

    /// One row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sagas")]
    pub struct Model {
        /// The saga id (a UUID).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The definition name.
        pub name: String,
        /// The definition version the saga is pinned to.
        pub definition_version: i32,
        /// `SagaStatus` as text.
        pub status: String,
        /// The step it is at, if any.
        pub current_step: Option<String>,
        /// The start key it was started with (unique), if any.
        pub start_key: Option<String>,
        /// The saga input as JSON.
        #[sea_orm(column_type = "Text")]
        pub input: String,
        /// Outputs of the completed steps, by step name, as JSON.
        #[sea_orm(column_type = "Text")]
        pub outputs: String,
        /// The rest of the machine state (without input and outputs) as JSON.
        #[sea_orm(column_type = "Text")]
        pub progress: String,
        /// The last error, for `list --error` and `stuck`.
        #[sea_orm(column_type = "Text", nullable)]
        pub last_error: Option<String>,
        /// The earliest durable timer (ms since the epoch): what the timer poller looks for.
        pub wake_at: Option<i64>,
        /// Bumped by every write; every write is conditional on it.
        pub row_version: i64,
        /// The `seq` of the last history record.
        pub history_seq: i64,
        /// When it was created (ms since the epoch).
        pub created_at: i64,
        /// When it was last written (ms since the epoch).
        pub updated_at: i64,
        /// The partition it belongs to, fixed at creation: its writer is the partition's owner.
        pub partition_id: i32,
    }

    /// No relations: the tables are joined by hand where needed.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `step_attempts`: one row per dispatched attempt.
pub mod attempt {
    use sea_orm::entity::prelude::*;

    /// One row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_attempts")]
    pub struct Model {
        /// The saga id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_id: String,
        /// The step index.
        #[sea_orm(primary_key, auto_increment = false)]
        pub step: i32,
        /// The step name.
        pub step_name: String,
        /// `Direction` as text.
        #[sea_orm(primary_key, auto_increment = false)]
        pub direction: String,
        /// The attempt number, from 1.
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        /// The key the attempt carried.
        pub idempotency_key: String,
        /// How the attempt stands: an [`AttemptStatus`](crate::store::AttemptStatus) name.
        pub status: String,
        /// When it was dispatched (ms since the epoch).
        pub dispatched_at: i64,
        /// When it times out, if the step has a timeout.
        pub deadline: Option<i64>,
        /// When it ended, if it has.
        pub finished_at: Option<i64>,
        /// Its error as JSON, if it failed.
        #[sea_orm(column_type = "Text", nullable)]
        pub error: Option<String>,
    }

    /// No relations: the tables are joined by hand where needed.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_history`: the append-only audit trail.
pub mod history {
    use sea_orm::entity::prelude::*;

    /// One row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_history")]
    pub struct Model {
        /// The saga id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_id: String,
        /// The record's position in the saga's history, from 1.
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        /// When (ms since the epoch).
        pub at: i64,
        /// `RecordKind` as text.
        pub kind: String,
        /// The step it concerns, if any.
        pub step_name: Option<String>,
        /// The direction it concerns, if any.
        pub direction: Option<String>,
        /// The attempt it concerns, if any.
        pub attempt: Option<i32>,
        /// Kind-specific detail as JSON.
        #[sea_orm(column_type = "Text", nullable)]
        pub payload: Option<String>,
        /// The error it records, if any.
        #[sea_orm(column_type = "Text", nullable)]
        pub error: Option<String>,
        /// Who: `engine`, `worker:ID` or `operator:NAME`.
        pub actor: String,
        /// The engine node that wrote it; `None` for an operator's write from the CLI.
        pub node: Option<String>,
        /// The fencing epoch it was written under; `None` when `node` is.
        pub epoch: Option<i64>,
    }

    /// No relations: the tables are joined by hand where needed.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `outbox`: step commands committed with their transition, deleted once published.
pub mod outbox {
    use sea_orm::entity::prelude::*;

    /// One row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox")]
    pub struct Model {
        /// The command id.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The saga the command belongs to.
        pub saga_id: String,
        /// The `StepCommand` as JSON.
        #[sea_orm(column_type = "Text")]
        pub payload: String,
        /// When it was committed (ms since the epoch).
        pub created_at: i64,
    }

    /// No relations: the tables are joined by hand where needed.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `cluster_settings`: one row (id 1), the partition count fixed when the database was created.
pub mod cluster {
    use sea_orm::entity::prelude::*;

    /// The row.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "cluster_settings")]
    pub struct Model {
        /// Always 1.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        /// How many partitions sagas are spread over.
        pub partitions: i32,
        /// When the first engine recorded it (ms since the epoch).
        pub created_at: i64,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `partition_leases`: which node may write each partition's sagas, under which epoch, until
/// when (by the database's clock).
pub mod lease {
    use sea_orm::entity::prelude::*;

    /// One partition's lease.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "partition_leases")]
    pub struct Model {
        /// The partition.
        #[sea_orm(primary_key, auto_increment = false)]
        pub partition_id: i32,
        /// The node holding it, if any.
        pub owner: Option<String>,
        /// The fencing epoch: greater at every acquisition (one more, or the database clock in ms
        /// if that is greater), never less.
        pub epoch: i64,
        /// Until when the owner may write (ms since the epoch, the database's clock).
        pub expires_at: i64,
        /// When the current owner took it under the current epoch (its acquisition, or its
        /// last re-fence).
        pub acquired_at: Option<i64>,
        /// When the current owner last renewed it.
        pub renewed_at: Option<i64>,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `engine_nodes`: the engine processes sharing the database, live while their heartbeat is.
pub mod node {
    use sea_orm::entity::prelude::*;

    /// One node.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "engine_nodes")]
    pub struct Model {
        /// The node id (unique per process run).
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        /// The host it runs on.
        pub host: String,
        /// Its process id there.
        pub pid: i32,
        /// When it started (the database's clock, ms since the epoch).
        pub started_at: i64,
        /// Its last heartbeat.
        pub last_seen: i64,
        /// Live until then: the last heartbeat plus one lease.
        pub expires_at: i64,
        /// It is handing its partitions over and takes no new ones.
        pub stopping: bool,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
