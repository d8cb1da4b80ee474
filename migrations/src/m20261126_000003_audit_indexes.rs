//! Indexes for the operator and audit queries (`sagaflow list`, `stuck`, `audit`).
//!
//! `list` sorts by `(created_at, id)` and pages by keyset, so each filter it serves well has an
//! index that ends in those two columns: the page is then a range read of at most `limit` rows
//! instead of a sort of every match. `history <id>` needs nothing new (the primary key is
//! `(saga_id, seq)`), nor does `stuck` (`idx_sagas_status_updated`).
//!
//! The `sagas` row changes on every transition, and on PostgreSQL a changed indexed column
//! (status, updated_at) means every index gets a new entry; so there is no index per filter
//! combination: the rarer filters (version, error text) are checked on rows walked in page
//! order.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden, Clone, Copy)]
enum Sagas {
    Table,
    Id,
    Name,
    Status,
    CurrentStep,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum SagaHistory {
    Table,
    At,
    Kind,
    StepName,
    Direction,
    Actor,
}

/// One index: its name and table (to drop it) and how to create it.
struct AuditIndex {
    name: &'static str,
    table: DynIden,
    create: IndexCreateStatement,
}

fn index(
    name: &'static str,
    table: impl IntoIden + Clone,
    columns: Vec<IndexColumn>,
) -> AuditIndex {
    let mut create = Index::create();
    create.name(name).table(table.clone()).if_not_exists();
    for column in columns {
        create.col(column);
    }
    AuditIndex {
        name,
        table: table.into_iden(),
        create,
    }
}

/// The indexes for `backend`.
fn indexes(backend: DbBackend) -> Vec<AuditIndex> {
    let mut all = vec![
        // `list` without a filter, or by creation time, and the keyset of every page.
        index(
            "idx_sagas_created_id",
            Sagas::Table,
            vec![Sagas::CreatedAt.into(), Sagas::Id.into()],
        ),
        // `list --status`.
        index(
            "idx_sagas_status_created_id",
            Sagas::Table,
            vec![
                Sagas::Status.into(),
                Sagas::CreatedAt.into(),
                Sagas::Id.into(),
            ],
        ),
        // `list --name [--version]`: a name has few versions, checked on the rows walked.
        index(
            "idx_sagas_name_created_id",
            Sagas::Table,
            vec![
                Sagas::Name.into(),
                Sagas::CreatedAt.into(),
                Sagas::Id.into(),
            ],
        ),
        // `list --updated-since/--updated-before`.
        index(
            "idx_sagas_updated_id",
            Sagas::Table,
            vec![Sagas::UpdatedAt.into(), Sagas::Id.into()],
        ),
        // `audit --kind K --step S --direction D --since T` ("who compensated S since Monday").
        index(
            "idx_history_kind_step_direction_at",
            SagaHistory::Table,
            vec![
                SagaHistory::Kind.into(),
                SagaHistory::StepName.into(),
                SagaHistory::Direction.into(),
                SagaHistory::At.into(),
            ],
        ),
        // `audit --since/--until` across every saga.
        index(
            "idx_history_at",
            SagaHistory::Table,
            vec![SagaHistory::At.into()],
        ),
    ];
    // `list --step`: only sagas working on a step have one, so a partial index stays as small
    // as the set of active and stuck sagas, however many finished ones there are.
    let mut step = index(
        "idx_sagas_current_step_created_id",
        Sagas::Table,
        vec![
            Sagas::CurrentStep.into(),
            Sagas::CreatedAt.into(),
            Sagas::Id.into(),
        ],
    );
    step.create
        .and_where(Expr::col(Sagas::CurrentStep).is_not_null());
    all.push(step);
    if backend == DbBackend::Postgres {
        // `audit --operators` (actor LIKE 'operator:%'): PostgreSQL uses a b-tree for a LIKE
        // prefix only under the C collation or with a pattern operator class. (SQLite compares
        // text bytewise, so the query adds an exact range and `idx_history_actor_at` serves.
        // Migration 000007 drops `idx_history_actor_at` on PostgreSQL: this one serves both.)
        all.push(index(
            "idx_history_actor_prefix_at",
            SagaHistory::Table,
            vec![
                SagaHistory::Actor
                    .into_index_column()
                    .with_operator_class("varchar_pattern_ops"),
                SagaHistory::At.into(),
            ],
        ));
    }
    all
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for index in indexes(manager.get_database_backend()) {
            manager.create_index(index.create).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for index in indexes(manager.get_database_backend()) {
            manager
                .drop_index(
                    Index::drop()
                        .name(index.name)
                        .table(index.table)
                        .if_exists()
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
