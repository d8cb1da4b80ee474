//! The operator queries read through indexes: each is checked with SQLite's `EXPLAIN QUERY
//! PLAN` on a migrated (empty) database. SQLite plans without statistics, so the plan is the
//! same with ten rows or ten million: no table is scanned whole and no listing sorts all its
//! matches. (PostgreSQL plans by statistics; see the EXPLAIN notes in the migration.)

use sagaflow_protocol::{Direction, Timestamp};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QueryTrait,
    Statement,
};
use uuid::Uuid;

use super::audit::{ActorFilter, AuditFilter, audit_select};
use super::cursor::Cursor;
use super::definitions::Definitions;
use super::list::{ListFilter, list_select};
use super::page::{Page, TimeRange};
use crate::machine::{RecordKind, SagaStatus, scenarios};
use crate::store::{Store, history, saga};

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = format!("sqlite://{}", dir.path().join("plans.db").display());
    let store = Store::connect(&url).await.expect("open the store");
    store
        .register_definition(&scenarios::order_spec())
        .await
        .expect("register a definition");
    (dir, store)
}

/// The plan's lines, e.g. `SEARCH sagas USING INDEX idx_sagas_status_created_id (status=?)`.
async fn plan(store: &Store, query: impl QueryTrait) -> Vec<String> {
    let built = QueryTrait::build(&query, DbBackend::Sqlite);
    let explain = Statement {
        sql: format!("EXPLAIN QUERY PLAN {}", built.sql),
        ..built
    };
    store
        .connection()
        .query_all_raw(explain)
        .await
        .expect("explain")
        .iter()
        .map(|row| row.try_get::<String>("", "detail").expect("detail column"))
        .collect()
}

/// No full table scan (an index walk is fine), no sort of every match, and `index` is used.
fn assert_indexed(what: &str, plan: &[String], index: &str) {
    for line in plan {
        assert!(
            !line.starts_with("SCAN ") || line.contains("USING"),
            "{what}: full table scan in {plan:#?}"
        );
        assert!(
            !line.contains("TEMP B-TREE"),
            "{what}: sorts every match in {plan:#?}"
        );
    }
    assert!(
        plan.iter().any(|line| line.contains(index)),
        "{what}: expected {index} in {plan:#?}"
    );
}

#[tokio::test]
async fn every_list_filter_reads_an_index_in_page_order() {
    let (_dir, store) = store().await;
    let definitions = Definitions::load(&store).await.expect("definitions");
    let page = Page::first(50);
    let after = Page {
        limit: 50,
        after: Some(Cursor::for_list(1, &Uuid::from_u128(1).to_string())),
    };
    let cases: Vec<(&str, ListFilter, &Page, &str)> = vec![
        (
            "no filter",
            ListFilter::default(),
            &page,
            "idx_sagas_created_id",
        ),
        (
            "second page",
            ListFilter::default(),
            &after,
            "idx_sagas_created_id",
        ),
        (
            "status",
            ListFilter {
                statuses: vec![SagaStatus::Stuck],
                ..ListFilter::default()
            },
            &after,
            "idx_sagas_status_created_id",
        ),
        (
            "name",
            ListFilter {
                name: Some("place_order".into()),
                ..ListFilter::default()
            },
            &page,
            "idx_sagas_name_created_id",
        ),
        (
            "name and version",
            ListFilter {
                name: Some("place_order".into()),
                version: Some(1),
                ..ListFilter::default()
            },
            &after,
            "idx_sagas_name_created_id",
        ),
        (
            "current step",
            ListFilter {
                current_step: Some("authorize_payment".into()),
                ..ListFilter::default()
            },
            &page,
            "idx_sagas_current_step_created_id",
        ),
        (
            "created range",
            ListFilter {
                created: TimeRange {
                    from: Some(Timestamp(1)),
                    until: Some(Timestamp(2)),
                },
                ..ListFilter::default()
            },
            &page,
            "idx_sagas_created_id",
        ),
        (
            "start key",
            ListFilter {
                start_key: Some("order-1".into()),
                ..ListFilter::default()
            },
            &page,
            "sqlite_autoindex_sagas",
        ),
        (
            // A substring has no index: `list` checks it on the rows walked in page order.
            "error text",
            ListFilter {
                error_contains: Some("declined".into()),
                ..ListFilter::default()
            },
            &page,
            "idx_sagas_created_id",
        ),
    ];
    for (what, filter, page, index) in cases {
        let query = list_select(&filter, page, &definitions).expect("a valid filter");
        assert_indexed(what, &plan(&store, query).await, index);
    }
}

#[tokio::test]
async fn history_and_audit_queries_read_an_index() {
    let (_dir, store) = store().await;
    // What `Store::history` (and so `history <id>`) runs: the primary key.
    let by_saga = history::Entity::find()
        .filter(history::Column::SagaId.eq(Uuid::from_u128(1).to_string()))
        .order_by_asc(history::Column::Seq);
    assert_indexed(
        "history <id>",
        &plan(&store, by_saga).await,
        "sqlite_autoindex_saga_history",
    );

    let page = Page::first(50);
    let cases: Vec<(&str, AuditFilter, &str)> = vec![
        (
            "by saga",
            AuditFilter {
                saga_id: Some(Uuid::from_u128(1)),
                ..AuditFilter::default()
            },
            "sqlite_autoindex_saga_history",
        ),
        (
            "by kind, step, direction and time",
            AuditFilter {
                kinds: vec![RecordKind::AttemptSucceeded],
                step: Some("authorize_payment".into()),
                direction: Some(Direction::Compensate),
                at: TimeRange {
                    from: Some(Timestamp(1)),
                    until: None,
                },
                ..AuditFilter::default()
            },
            "idx_history_kind_step_direction_at",
        ),
        (
            "by actor",
            AuditFilter {
                actor: Some(ActorFilter::Exact("operator:alice".into())),
                ..AuditFilter::default()
            },
            "idx_history_actor_at",
        ),
        (
            "by actor prefix",
            AuditFilter {
                actor: Some(ActorFilter::operators()),
                ..AuditFilter::default()
            },
            "idx_history_actor_at",
        ),
        (
            "by time",
            AuditFilter {
                at: TimeRange {
                    from: Some(Timestamp(1)),
                    until: Some(Timestamp(2)),
                },
                ..AuditFilter::default()
            },
            "idx_history_at",
        ),
    ];
    for (what, filter, index) in cases {
        let query = audit_select(&filter, &page, DbBackend::Sqlite).expect("a valid filter");
        let plan = plan(&store, query).await;
        // The join reads each record's saga by its primary key.
        assert!(
            plan.iter()
                .any(|l| l.contains("SEARCH sagas USING INDEX sqlite_autoindex_sagas")),
            "{what}: {plan:#?}"
        );
        for line in &plan {
            assert!(
                !line.starts_with("SCAN ") || line.contains("USING"),
                "{what}: full table scan in {plan:#?}"
            );
        }
        assert!(
            plan.iter().any(|l| l.contains(index)),
            "{what}: {index} in {plan:#?}"
        );
    }

    // `stuck`: the stuck sagas by the time they last changed.
    let stuck = saga::Entity::find()
        .filter(saga::Column::Status.eq(SagaStatus::Stuck.as_str()))
        .order_by_asc(saga::Column::UpdatedAt)
        .order_by_asc(saga::Column::Id);
    let stuck_plan = plan(&store, stuck).await;
    assert!(
        stuck_plan
            .iter()
            .any(|l| l.contains("idx_sagas_status_updated")),
        "{stuck_plan:#?}"
    );
}
