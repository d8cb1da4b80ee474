//! The whole schema: the saga tables, the transactional outbox and the indexes the engine's and
//! the operators' queries read.
//!
//! Why each shape is there, and what guards it, is `docs/architecture.md` §7.1 ("Performance
//! invariants"); the comments below say it for each table and index.
//!
//! Every transition rewrites its saga's row, which is a new row version and so an entry in every
//! index of `sagas` (on PostgreSQL a changed indexed column means every index gets one), and
//! appends attempt, history and outbox rows. So each index here is one a query needs, and there
//! is no index per filter combination: the rarer filters (version, error text) are checked on
//! the rows an index walks in page order.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum SagaDefinitions {
    Table,
    Name,
    Version,
    Spec,
    RegisteredAt,
}

#[derive(DeriveIden)]
enum Sagas {
    Table,
    Id,
    Name,
    DefinitionVersion,
    Status,
    CurrentStep,
    StartKey,
    Input,
    Outputs,
    Progress,
    LastError,
    WakeAt,
    RowVersion,
    HistorySeq,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum StepAttempts {
    Table,
    SagaId,
    Step,
    StepName,
    Direction,
    Attempt,
    IdempotencyKey,
    Status,
    DispatchedAt,
    Deadline,
    FinishedAt,
    Error,
}

#[derive(DeriveIden)]
enum SagaHistory {
    Table,
    SagaId,
    Seq,
    At,
    Kind,
    StepName,
    Direction,
    Attempt,
    Payload,
    Error,
    Actor,
}

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Id,
    SagaId,
    Payload,
    CreatedAt,
}

/// The indexes of both databases. (The text is what SQLite keeps in `sqlite_master`, less
/// `IF NOT EXISTS`.)
const INDEXES: [&str; 11] = [
    // The timer poller: the next sagas to wake.
    r#"CREATE INDEX IF NOT EXISTS "idx_sagas_wake_at" ON "sagas" ("wake_at")"#,
    // `stuck`: sagas of a status by the time they last changed.
    r#"CREATE INDEX IF NOT EXISTS "idx_sagas_status_updated" ON "sagas" ("status", "updated_at")"#,
    // `list` sorts by `(created_at, id)` and pages by keyset, so each filter it serves well has
    // an index that ends in those two columns: a page is then a range read of at most `limit`
    // rows instead of a sort of every match.
    //
    // `list` without a filter, or by creation time, and the keyset of every page. (It also
    // serves what an index on `created_at` alone would.)
    r#"CREATE INDEX IF NOT EXISTS "idx_sagas_created_id" ON "sagas" ("created_at", "id")"#,
    // `list --status`.
    r#"CREATE INDEX IF NOT EXISTS "idx_sagas_status_created_id" ON "sagas" ("status", "created_at", "id")"#,
    // `list --name [--version]`: a name has few versions, checked on the rows walked. No query
    // looks sagas up by version alone, and definitions are never deleted (which is what the
    // foreign key from `sagas` would need an index on `(name, definition_version)` for).
    r#"CREATE INDEX IF NOT EXISTS "idx_sagas_name_created_id" ON "sagas" ("name", "created_at", "id")"#,
    // `list --step`: only sagas working on a step (active and stuck ones) have one, so a
    // partial index stays as small as that set, however many finished sagas there are.
    r#"CREATE INDEX IF NOT EXISTS "idx_sagas_current_step_created_id" ON "sagas" ("current_step", "created_at", "id") WHERE "current_step" IS NOT NULL"#,
    // `list --updated-since/--updated-before` first finds the earliest creation time among the
    // sagas updated in the range, then walks the listing order from there: this index answers
    // the first part from the index alone.
    "CREATE INDEX IF NOT EXISTS idx_sagas_updated_created ON sagas (updated_at, created_at)",
    // `history <id>` needs no index of its own: the primary key is `(saga_id, seq)`.
    //
    // Kinds of record over time.
    r#"CREATE INDEX IF NOT EXISTS "idx_history_kind_at" ON "saga_history" ("kind", "at")"#,
    // `audit --kind K --step S --direction D --since T` ("who compensated S since Monday").
    r#"CREATE INDEX IF NOT EXISTS "idx_history_kind_step_direction_at" ON "saga_history" ("kind", "step_name", "direction", "at")"#,
    // `audit --since/--until` across every saga.
    r#"CREATE INDEX IF NOT EXISTS "idx_history_at" ON "saga_history" ("at")"#,
    // The relay's sweep takes unpublished commands in `created_at` order. The outbox holds only
    // those (the relay deletes a command once the broker has it), so this index stays as small
    // as what is in flight; there is no index by saga (only retention looks commands up by
    // saga, in a table this small).
    "CREATE INDEX IF NOT EXISTS idx_outbox_created ON outbox (created_at)",
];

/// `audit --operators` and `audit --actor` on SQLite, which compares text bytewise: the query
/// spells the prefix out as a range, and this index serves it as it serves equality.
const SQLITE_INDEXES: [&str; 1] =
    [r#"CREATE INDEX IF NOT EXISTS "idx_history_actor_at" ON "saga_history" ("actor", "at")"#];

/// `audit --operators` and `audit --actor` on PostgreSQL, which uses a b-tree for a text prefix
/// only under the C collation or with a pattern operator class. The query spells the prefix out
/// as a range with the pattern operators (`~>=~`, `~<~`), which this index serves even under a
/// generic plan, and it answers equality too, so there is no plain `(actor, at)` index beside
/// it.
const POSTGRES_INDEXES: [&str; 1] = [
    r#"CREATE INDEX IF NOT EXISTS "idx_history_actor_prefix_at" ON "saga_history" ("actor" varchar_pattern_ops, "at")"#,
];

/// On SQLite, a foreign key from a child table's `saga_id` to its saga (removed with it).
///
/// PostgreSQL has none from `step_attempts`, `saga_history` and `outbox`: each inserted row
/// cost a lookup of its saga (a trigger per row, about a tenth of the database's time per
/// batch); the engine writes those rows only in the statement that writes their saga, and
/// retention deletes them explicitly with their saga. SQLite's cost per row is small, so it
/// keeps them.
fn saga_foreign_key(
    backend: DbBackend,
    table: &mut TableCreateStatement,
    child: impl IntoIden,
    column: impl IntoIden,
) {
    if backend == DbBackend::Sqlite {
        table.foreign_key(
            ForeignKey::create()
                .from(child, column)
                .to(Sagas::Table, Sagas::Id)
                .on_delete(ForeignKeyAction::Cascade),
        );
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();

        // Every registered (name, version) with its spec; instances pin one.
        manager
            .create_table(
                Table::create()
                    .table(SagaDefinitions::Table)
                    .if_not_exists()
                    .col(string(SagaDefinitions::Name))
                    .col(integer(SagaDefinitions::Version))
                    .col(text(SagaDefinitions::Spec))
                    .col(big_integer(SagaDefinitions::RegisteredAt))
                    .primary_key(
                        Index::create()
                            .col(SagaDefinitions::Name)
                            .col(SagaDefinitions::Version),
                    )
                    .to_owned(),
            )
            .await?;

        // One row per instance, written only conditionally on `row_version`. `input` is written
        // once, with the row; a transition updates the rest.
        manager
            .create_table(
                Table::create()
                    .table(Sagas::Table)
                    .if_not_exists()
                    .col(string_len(Sagas::Id, 36).primary_key())
                    .col(string(Sagas::Name))
                    .col(integer(Sagas::DefinitionVersion))
                    .col(string(Sagas::Status))
                    .col(string_null(Sagas::CurrentStep))
                    .col(string_null(Sagas::StartKey).unique_key())
                    .col(text(Sagas::Input))
                    .col(text(Sagas::Outputs))
                    .col(text(Sagas::Progress))
                    .col(text_null(Sagas::LastError))
                    .col(big_integer_null(Sagas::WakeAt))
                    .col(big_integer(Sagas::RowVersion))
                    .col(big_integer(Sagas::HistorySeq))
                    .col(big_integer(Sagas::CreatedAt))
                    .col(big_integer(Sagas::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Sagas::Table, (Sagas::Name, Sagas::DefinitionVersion))
                            .to(
                                SagaDefinitions::Table,
                                (SagaDefinitions::Name, SagaDefinitions::Version),
                            ),
                    )
                    .to_owned(),
            )
            .await?;

        // One row per dispatched attempt of a step in one direction.
        let mut attempts = Table::create();
        attempts
            .table(StepAttempts::Table)
            .if_not_exists()
            .col(string_len(StepAttempts::SagaId, 36))
            .col(integer(StepAttempts::Step))
            .col(string(StepAttempts::StepName))
            .col(string(StepAttempts::Direction))
            .col(integer(StepAttempts::Attempt))
            .col(string(StepAttempts::IdempotencyKey))
            .col(string(StepAttempts::Status))
            .col(big_integer(StepAttempts::DispatchedAt))
            .col(big_integer_null(StepAttempts::Deadline))
            .col(big_integer_null(StepAttempts::FinishedAt))
            .col(text_null(StepAttempts::Error))
            .primary_key(
                Index::create()
                    .col(StepAttempts::SagaId)
                    .col(StepAttempts::Step)
                    .col(StepAttempts::Direction)
                    .col(StepAttempts::Attempt),
            );
        saga_foreign_key(
            backend,
            &mut attempts,
            StepAttempts::Table,
            StepAttempts::SagaId,
        );
        manager.create_table(attempts).await?;

        // The append-only audit trail, `(saga_id, seq)` ordered.
        let mut history = Table::create();
        history
            .table(SagaHistory::Table)
            .if_not_exists()
            .col(string_len(SagaHistory::SagaId, 36))
            .col(big_integer(SagaHistory::Seq))
            .col(big_integer(SagaHistory::At))
            .col(string(SagaHistory::Kind))
            .col(string_null(SagaHistory::StepName))
            .col(string_null(SagaHistory::Direction))
            .col(integer_null(SagaHistory::Attempt))
            .col(text_null(SagaHistory::Payload))
            .col(text_null(SagaHistory::Error))
            .col(string(SagaHistory::Actor))
            .primary_key(
                Index::create()
                    .col(SagaHistory::SagaId)
                    .col(SagaHistory::Seq),
            );
        saga_foreign_key(
            backend,
            &mut history,
            SagaHistory::Table,
            SagaHistory::SagaId,
        );
        manager.create_table(history).await?;

        // The transactional outbox: step commands committed with the transition that emits
        // them, until the broker has taken them. The relay then deletes them rather than marking
        // them sent: a mark would be a new row version and an entry in every index, and a sent
        // command is never read again (the history records every dispatch).
        let mut outbox = Table::create();
        outbox
            .table(Outbox::Table)
            .if_not_exists()
            .col(string(Outbox::Id).primary_key())
            .col(string_len(Outbox::SagaId, 36))
            .col(text(Outbox::Payload))
            .col(big_integer(Outbox::CreatedAt));
        saga_foreign_key(backend, &mut outbox, Outbox::Table, Outbox::SagaId);
        manager.create_table(outbox).await?;

        let own = match backend {
            DbBackend::Postgres => &POSTGRES_INDEXES,
            _ => &SQLITE_INDEXES,
        };
        let db = manager.get_connection();
        for create in INDEXES.iter().chain(own) {
            db.execute_unprepared(create).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Outbox::Table.into_iden(),
            SagaHistory::Table.into_iden(),
            StepAttempts::Table.into_iden(),
            Sagas::Table.into_iden(),
            SagaDefinitions::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
