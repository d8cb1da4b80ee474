//! Ownership by partition: the cluster's partition count, one lease row per partition, the
//! engine nodes that hold them, each saga's partition, and the node and epoch of every history
//! record (docs/architecture.md §3.1).
//!
//! The columns are `partition_id`, not `partition`, which both databases know as a keyword.
//! A saga's partition is fixed when it is created and never changes, so it is a column, not a
//! function the readers must agree on. No index is added: every index of `sagas` is written on
//! every transition, and the two queries that select by partition (the timer poller's due sagas
//! and a new owner's recovery of active sagas) already read `idx_sagas_wake_at` and
//! `idx_sagas_status_created_id` and check the partition on the rows those give.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ClusterSettings {
    Table,
    Id,
    Partitions,
    CreatedAt,
}

#[derive(DeriveIden)]
enum PartitionLeases {
    Table,
    PartitionId,
    Owner,
    Epoch,
    ExpiresAt,
    AcquiredAt,
    RenewedAt,
}

#[derive(DeriveIden)]
enum EngineNodes {
    Table,
    Id,
    Host,
    Pid,
    StartedAt,
    LastSeen,
    ExpiresAt,
    Stopping,
}

#[derive(DeriveIden)]
enum Sagas {
    Table,
    PartitionId,
}

#[derive(DeriveIden)]
enum SagaHistory {
    Table,
    Node,
    Epoch,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One row (id 1): how many partitions sagas are spread over, set when the first engine
        // starts on the database and fixed from then on.
        manager
            .create_table(
                Table::create()
                    .table(ClusterSettings::Table)
                    .if_not_exists()
                    .col(integer(ClusterSettings::Id).primary_key())
                    .col(integer(ClusterSettings::Partitions))
                    .col(big_integer(ClusterSettings::CreatedAt))
                    .to_owned(),
            )
            .await?;
        // One row per partition. `epoch` only grows: each acquisition takes the next one, and a
        // write of a saga is accepted only under its partition's current epoch, by its owner,
        // before `expires_at` (all times by the database's clock).
        manager
            .create_table(
                Table::create()
                    .table(PartitionLeases::Table)
                    .if_not_exists()
                    .col(integer(PartitionLeases::PartitionId).primary_key())
                    .col(string_null(PartitionLeases::Owner))
                    .col(big_integer(PartitionLeases::Epoch).default(0))
                    .col(big_integer(PartitionLeases::ExpiresAt).default(0))
                    .col(big_integer_null(PartitionLeases::AcquiredAt))
                    .col(big_integer_null(PartitionLeases::RenewedAt))
                    .to_owned(),
            )
            .await?;
        // The engine processes that share the database: a node is live while `expires_at` (its
        // last heartbeat plus one lease) is ahead of the database's clock.
        manager
            .create_table(
                Table::create()
                    .table(EngineNodes::Table)
                    .if_not_exists()
                    .col(string(EngineNodes::Id).primary_key())
                    .col(string(EngineNodes::Host))
                    .col(integer(EngineNodes::Pid))
                    .col(big_integer(EngineNodes::StartedAt))
                    .col(big_integer(EngineNodes::LastSeen))
                    .col(big_integer(EngineNodes::ExpiresAt))
                    .col(boolean(EngineNodes::Stopping).default(false))
                    .to_owned(),
            )
            .await?;
        // SQLite adds one column per statement.
        manager
            .alter_table(
                Table::alter()
                    .table(Sagas::Table)
                    .add_column(integer(Sagas::PartitionId).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SagaHistory::Table)
                    .add_column(string_null(SagaHistory::Node))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SagaHistory::Table)
                    .add_column(big_integer_null(SagaHistory::Epoch))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (table, column) in [
            (
                SagaHistory::Table.into_iden(),
                SagaHistory::Epoch.into_iden(),
            ),
            (
                SagaHistory::Table.into_iden(),
                SagaHistory::Node.into_iden(),
            ),
            (Sagas::Table.into_iden(), Sagas::PartitionId.into_iden()),
        ] {
            manager
                .alter_table(Table::alter().table(table).drop_column(column).to_owned())
                .await?;
        }
        for table in [
            EngineNodes::Table.into_iden(),
            PartitionLeases::Table.into_iden(),
            ClusterSettings::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
