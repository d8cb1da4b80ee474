//! sea-orm entities for the tables the migrations create.

/// `saga_definitions`: one row per registered (name, version).
pub mod definition {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_definitions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub version: i32,
        #[sea_orm(column_type = "Text")]
        pub spec: String,
        pub registered_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `sagas`: one row per instance.
pub mod saga {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sagas")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub name: String,
        pub definition_version: i32,
        pub status: String,
        pub current_step: Option<String>,
        pub start_key: Option<String>,
        #[sea_orm(column_type = "Text")]
        pub input: String,
        #[sea_orm(column_type = "Text")]
        pub outputs: String,
        #[sea_orm(column_type = "Text")]
        pub progress: String,
        #[sea_orm(column_type = "Text", nullable)]
        pub last_error: Option<String>,
        pub wake_at: Option<i64>,
        pub row_version: i64,
        pub history_seq: i64,
        pub created_at: i64,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `step_attempts`: one row per dispatched attempt.
pub mod attempt {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "step_attempts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub step: i32,
        pub step_name: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub direction: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        pub idempotency_key: String,
        pub status: String,
        pub dispatched_at: i64,
        pub deadline: Option<i64>,
        pub finished_at: Option<i64>,
        #[sea_orm(column_type = "Text", nullable)]
        pub error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `saga_history`: the append-only audit trail.
pub mod history {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_history")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub at: i64,
        pub kind: String,
        pub step_name: Option<String>,
        pub direction: Option<String>,
        pub attempt: Option<i32>,
        #[sea_orm(column_type = "Text", nullable)]
        pub payload: Option<String>,
        #[sea_orm(column_type = "Text", nullable)]
        pub error: Option<String>,
        pub actor: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `outbox`: step commands committed with their transition, deleted once published.
pub mod outbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub saga_id: String,
        #[sea_orm(column_type = "Text")]
        pub payload: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
