//! The saga tables: definitions, instances, attempts and history.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

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

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
        for (name, columns) in [
            ("idx_sagas_wake_at", vec![Sagas::WakeAt]),
            (
                "idx_sagas_status_updated",
                vec![Sagas::Status, Sagas::UpdatedAt],
            ),
            (
                "idx_sagas_name_version",
                vec![Sagas::Name, Sagas::DefinitionVersion],
            ),
            ("idx_sagas_created_at", vec![Sagas::CreatedAt]),
        ] {
            let mut index = Index::create();
            index.name(name).table(Sagas::Table).if_not_exists();
            for column in columns {
                index.col(column);
            }
            manager.create_index(index.to_owned()).await?;
        }

        manager
            .create_table(
                Table::create()
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
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(StepAttempts::Table, StepAttempts::SagaId)
                            .to(Sagas::Table, Sagas::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
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
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(SagaHistory::Table, SagaHistory::SagaId)
                            .to(Sagas::Table, Sagas::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            (
                "idx_history_kind_at",
                vec![SagaHistory::Kind, SagaHistory::At],
            ),
            (
                "idx_history_actor_at",
                vec![SagaHistory::Actor, SagaHistory::At],
            ),
        ] {
            let mut index = Index::create();
            index.name(name).table(SagaHistory::Table).if_not_exists();
            for column in columns {
                index.col(column);
            }
            manager.create_index(index.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
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
