//! The transactional outbox: step commands committed with the transition that emits them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Id,
    SagaId,
    Payload,
    CreatedAt,
    SentAt,
}

#[derive(DeriveIden)]
enum Sagas {
    Table,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Outbox::Table)
                    .if_not_exists()
                    .col(string(Outbox::Id).primary_key())
                    .col(string_len(Outbox::SagaId, 36))
                    .col(text(Outbox::Payload))
                    .col(big_integer(Outbox::CreatedAt))
                    .col(big_integer_null(Outbox::SentAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Outbox::Table, Outbox::SagaId)
                            .to(Sagas::Table, Sagas::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_unsent")
                    .table(Outbox::Table)
                    .col(Outbox::SentAt)
                    .col(Outbox::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_saga")
                    .table(Outbox::Table)
                    .col(Outbox::SagaId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Outbox::Table).if_exists().to_owned())
            .await
    }
}
