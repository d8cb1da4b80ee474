//! The operator and audit operations (`sagaflow_engine::ops`) on SQLite and PostgreSQL: what
//! `list`, `show`, `history` and `stuck` print (snapshots, identical on both databases),
//! pagination, every filter, audit queries, JSON-lines export and retention.
//!
//! Sagas are built by driving the pure state machine with scripted events at fixed times and
//! committing each transition through `Store::commit`, as the engine's shell does; ids are
//! fixed too, so every view is reproducible to the character.

use std::collections::BTreeSet;
use std::time::Duration;

use rstest_reuse::apply;
use sagaflow_engine::EngineError;
use sagaflow_engine::machine::scenarios::{self, START, Scenario};
use sagaflow_engine::machine::{Event, Inputs, Record, RecordKind, SagaState, SagaStatus, decide};
use sagaflow_engine::ops::{
    self, ActorFilter, AuditEntry, AuditFilter, Cursor, ListFilter, Page, StuckKind, StuckQuery,
    TimeRange, render,
};
use sagaflow_engine::store::{SagaWrite, Store, WriteOutcome, attempt, history, saga};
use sagaflow_protocol::backoff::ExactDelays;
use sagaflow_sdk::{Direction, SagaSpec, Timestamp};
use sagaflow_tests::{Backend, TestDb};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::Value;
use uuid::Uuid;

use crate::support::backends;

/// A saga built for a test, with what the pure machine says about it (the oracle).
#[derive(Debug, Clone)]
struct Built {
    id: Uuid,
    spec: SagaSpec,
    state: SagaState,
    created: Timestamp,
    updated: Timestamp,
    start_key: Option<String>,
    /// Every record committed, with the time of its transition.
    records: Vec<(Timestamp, Record)>,
}

impl Built {
    fn current_step(&self) -> Option<String> {
        self.state
            .current_step()
            .map(|(step, _)| self.spec.steps[step].name.clone())
    }

    fn last_error(&self) -> Option<String> {
        self.state
            .stuck
            .as_ref()
            .map(|s| s.reason.clone())
            .or_else(|| self.state.failure.clone())
    }
}

fn scenario(name: &str) -> Scenario {
    scenarios::all()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name}"))
}

/// Drives `script` (offsets in ms from `created`) through the machine and the store, as saga
/// `id`. Refused events and transitions without records are not committed, as in the engine.
async fn drive(
    store: &Store,
    id: Uuid,
    spec: &SagaSpec,
    created: Timestamp,
    start_key: Option<&str>,
    script: &[(i64, Event)],
) -> Built {
    store.register_definition(spec).await.unwrap();
    let mut state = SagaState::new(id, spec, scenarios::order_input(), created);
    let mut base = None;
    let mut records = Vec::new();
    let mut updated = created;
    for (offset, event) in script {
        let now = Timestamp(created.as_millis() + offset);
        let inputs = Inputs {
            now,
            delays: &mut ExactDelays,
        };
        let Ok(transition) = decide(&state, spec, event.clone(), inputs) else {
            continue;
        };
        if base.is_some() && transition.history.is_empty() {
            continue;
        }
        let outcome = store
            .commit(&[SagaWrite {
                spec,
                base: base.as_ref(),
                state: &transition.state,
                records: &transition.history,
                start_key: if base.is_none() { start_key } else { None },
                dispatches: &[],
                now,
            }])
            .await
            .unwrap();
        assert!(
            matches!(outcome[..], [WriteOutcome::Committed { .. }]),
            "{outcome:?}"
        );
        records.extend(transition.history.iter().map(|r| (now, r.clone())));
        state = transition.state;
        updated = now;
        base = store.load(id).await.unwrap();
    }
    Built {
        id,
        spec: spec.clone(),
        state,
        created,
        updated,
        start_key: start_key.map(str::to_string),
        records,
    }
}

fn at(offset_ms: i64) -> Timestamp {
    Timestamp(START.as_millis() + offset_ms)
}

// ----- the four-saga scenario of the snapshots -----

/// A completed, a compensated, a stuck and a running saga, one second apart.
async fn four_sagas(store: &Store) -> Vec<Built> {
    let spec = scenarios::order_spec();
    let happy = scenario("happy_path").script;
    vec![
        drive(
            store,
            Uuid::from_u128(1),
            &spec,
            at(0),
            Some("order-1001"),
            &happy,
        )
        .await,
        drive(
            store,
            Uuid::from_u128(2),
            &spec,
            at(1_000),
            Some("order-1002"),
            &scenario("permanent_failure_at_step_2_pivot").script,
        )
        .await,
        drive(
            store,
            Uuid::from_u128(3),
            &spec,
            at(2_000),
            Some("order-1003"),
            &scenario("compensation_exhausted_stuck").script,
        )
        .await,
        // Started, reserve_stock done, authorize_payment in flight (and never answered).
        drive(
            store,
            Uuid::from_u128(4),
            &spec,
            at(3_000),
            None,
            &happy[..2],
        )
        .await,
    ]
}

/// What `stuck` is asked in the snapshots: an hour after the start, 15 minutes' patience.
fn stuck_query() -> StuckQuery {
    StuckQuery {
        threshold: Duration::from_secs(15 * 60),
        now: at(3_600_000),
        limit: 100,
    }
}

async fn snapshot_views(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = four_sagas(&store).await;
    let statuses: Vec<SagaStatus> = built.iter().map(|b| b.state.status).collect();
    assert_eq!(
        statuses,
        [
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Stuck,
            SagaStatus::Running
        ]
    );

    let page = ops::list(&store, &ListFilter::default(), &Page::default())
        .await
        .unwrap();
    insta::assert_snapshot!("list_table", render::list_table(&page));
    insta::assert_snapshot!("list_json", serde_json::to_string_pretty(&page).unwrap());

    let mut tables = Vec::new();
    let mut jsons = Vec::new();
    for b in &built {
        let detail = ops::show(&store, b.id).await.unwrap();
        tables.push(render::show_text(&detail));
        jsons.push(detail);
    }
    insta::assert_snapshot!("show_table", tables.join("\n\n========\n\n"));
    insta::assert_snapshot!("show_json", serde_json::to_string_pretty(&jsons).unwrap());

    let mut tables = Vec::new();
    let mut jsons = Vec::new();
    for b in &built {
        let view = ops::history(&store, b.id).await.unwrap();
        assert_eq!(view.entries.len(), b.records.len(), "{backend:?}");
        tables.push(render::history_table(&view));
        jsons.push(view);
    }
    insta::assert_snapshot!("history_table", tables.join("\n\n========\n\n"));
    insta::assert_snapshot!(
        "history_json",
        serde_json::to_string_pretty(&jsons).unwrap()
    );

    let report = ops::stuck(&store, &stuck_query()).await.unwrap();
    let kinds: Vec<(Uuid, StuckKind)> = report.sagas.iter().map(|s| (s.saga.id, s.kind)).collect();
    assert_eq!(
        kinds,
        [
            (Uuid::from_u128(3), StuckKind::Stuck),
            (Uuid::from_u128(4), StuckKind::NoProgress)
        ]
    );
    insta::assert_snapshot!("stuck_table", render::stuck_table(&report));
    insta::assert_snapshot!("stuck_json", serde_json::to_string_pretty(&report).unwrap());

    // Under the threshold the running saga is making progress as far as `stuck` can tell.
    let patient = ops::stuck(
        &store,
        &StuckQuery {
            threshold: Duration::from_secs(2 * 3600),
            ..stuck_query()
        },
    )
    .await
    .unwrap();
    assert_eq!((patient.stuck_total, patient.no_progress_total), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_snapshot_on_sqlite() {
    snapshot_views(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_snapshot_identically_on_postgres() {
    snapshot_views(Backend::Postgres).await;
}

// ----- a fleet for pagination, filters, audit and retention -----

fn version_2(spec: SagaSpec) -> SagaSpec {
    SagaSpec { version: 2, ..spec }
}

/// (id, definition, creation offset in ms, start key, script).
type Planned<'a> = (u128, &'a SagaSpec, i64, Option<&'a str>, Vec<(i64, Event)>);

/// Fourteen sagas over three definitions, every status, four of them created at the same
/// instant (in an order their ids do not follow) to exercise the tie-break of the cursor.
async fn fleet(store: &Store) -> Vec<Built> {
    let v1 = scenarios::order_spec();
    let v2 = version_2(scenarios::order_spec());
    let deadline = scenarios::order_spec_with_deadline();
    let happy = scenario("happy_path").script;
    let backoff = scenario("retry_then_success").script;
    let plan: Vec<Planned> = vec![
        (101, &v1, 0, Some("k-101"), happy.clone()),
        (
            102,
            &v1,
            10_000,
            Some("k-102"),
            scenario("permanent_failure_at_step_1").script,
        ),
        (
            103,
            &v1,
            20_000,
            Some("k-103"),
            scenario("compensation_exhausted_stuck").script,
        ),
        (104, &v1, 30_000, None, happy[..2].to_vec()),
        (105, &v2, 40_000, Some("k-105"), happy.clone()),
        (
            106,
            &v2,
            50_000,
            None,
            scenario("retriable_step_fails_permanently_stuck").script,
        ),
        (107, &v2, 60_000, None, backoff[..3].to_vec()),
        (
            108,
            &deadline,
            70_000,
            None,
            scenario("deadline_before_pivot_compensates").script,
        ),
        (
            109,
            &v1,
            80_000,
            Some("k-109"),
            scenario("operator_resume_stuck_compensation").script,
        ),
        (
            110,
            &v1,
            90_000,
            None,
            scenario("operator_cancel_running").script,
        ),
        (114, &v1, 100_000, None, happy.clone()),
        (112, &v1, 100_000, None, happy.clone()),
        (113, &v1, 100_000, None, happy[..3].to_vec()),
        (111, &v1, 100_000, None, happy.clone()),
    ];
    let mut built = Vec::new();
    for (n, spec, created, key, script) in plan {
        built.push(drive(store, Uuid::from_u128(n), spec, at(created), key, &script).await);
    }
    built
}

/// The ids of `fleet` in list order (creation time, then id).
fn in_list_order<'a>(sagas: impl IntoIterator<Item = &'a Built>) -> Vec<Uuid> {
    let mut ordered: Vec<&Built> = sagas.into_iter().collect();
    ordered.sort_by_key(|b| (b.created, b.id.to_string()));
    ordered.into_iter().map(|b| b.id).collect()
}

async fn list_all(store: &Store, filter: &ListFilter) -> Result<Vec<Uuid>, EngineError> {
    let page = ops::list(store, filter, &Page::first(ops::MAX_PAGE)).await?;
    assert!(page.next.is_none());
    Ok(page.sagas.iter().map(|s| s.id).collect())
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_walk_returns_every_saga_once_in_order(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = fleet(&store).await;
    let expected = in_list_order(&built);

    for limit in [1, 3, 4, 14, 50] {
        let mut walked = Vec::new();
        let mut page = Page::first(limit);
        let mut pages = 0;
        loop {
            let result = ops::list(&store, &ListFilter::default(), &page)
                .await
                .unwrap();
            assert!(result.sagas.len() as u64 <= limit);
            walked.extend(result.sagas.iter().map(|s| s.id));
            pages += 1;
            match result.next {
                Some(next) => page.after = Some(next),
                None => break,
            }
        }
        assert_eq!(walked, expected, "{backend:?}, pages of {limit}");
        assert_eq!(
            pages,
            expected.len().div_ceil(limit as usize),
            "{backend:?}"
        );
    }

    // A filtered walk pages through the filtered set only.
    let stuck_or_running = ListFilter {
        statuses: vec![SagaStatus::Running, SagaStatus::Stuck],
        ..ListFilter::default()
    };
    let mut walked = Vec::new();
    let mut page = Page::first(1);
    loop {
        let result = ops::list(&store, &stuck_or_running, &page).await.unwrap();
        walked.extend(result.sagas.iter().map(|s| s.id));
        match result.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    let want = in_list_order(
        built
            .iter()
            .filter(|b| matches!(b.state.status, SagaStatus::Running | SagaStatus::Stuck)),
    );
    assert_eq!(walked, want, "{backend:?}");

    // A saga created after the walk began shows on a later page, not twice or never.
    let first = ops::list(&store, &ListFilter::default(), &Page::first(5))
        .await
        .unwrap();
    let late = drive(
        &store,
        Uuid::from_u128(99),
        &scenarios::order_spec(),
        at(500_000),
        None,
        &scenario("happy_path").script,
    )
    .await;
    let rest = list_all_after(&store, first.next.clone()).await;
    let mut seen: Vec<Uuid> = first.sagas.iter().map(|s| s.id).collect();
    seen.extend(rest);
    let mut want = expected.clone();
    want.push(late.id);
    assert_eq!(seen, want, "{backend:?}");

    // Bad pages are refused with what to do.
    let zero = ops::list(&store, &ListFilter::default(), &Page::first(0)).await;
    assert!(
        matches!(&zero, Err(EngineError::InvalidQuery { .. })),
        "{zero:?}"
    );
    let garbage: Cursor = "not-a-cursor".parse().unwrap();
    let error = ops::list(
        &store,
        &ListFilter::default(),
        &Page {
            limit: 10,
            after: Some(garbage),
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("is not a cursor of `sagaflow list`"),
        "{error}"
    );
}

async fn list_all_after(store: &Store, after: Option<Cursor>) -> Vec<Uuid> {
    let page = ops::list(
        store,
        &ListFilter::default(),
        &Page {
            limit: ops::MAX_PAGE,
            after,
        },
    )
    .await
    .unwrap();
    page.sagas.iter().map(|s| s.id).collect()
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_list_filter_narrows_to_exactly_its_sagas(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = fleet(&store).await;
    let everything = list_all(&store, &ListFilter::default()).await.unwrap();
    assert_eq!(everything, in_list_order(&built), "{backend:?}");

    type Oracle = Box<dyn Fn(&Built) -> bool>;
    let cases: Vec<(&str, ListFilter, Oracle)> = vec![
        (
            "stuck",
            ListFilter {
                statuses: vec![SagaStatus::Stuck],
                ..ListFilter::default()
            },
            Box::new(|b| b.state.status == SagaStatus::Stuck),
        ),
        (
            "completed or compensated",
            ListFilter {
                statuses: vec![SagaStatus::Completed, SagaStatus::Compensated],
                ..ListFilter::default()
            },
            Box::new(|b| b.state.status.is_terminal()),
        ),
        (
            "name",
            ListFilter {
                name: Some("place_order".into()),
                ..ListFilter::default()
            },
            Box::new(|b| b.spec.name == "place_order"),
        ),
        (
            "name and version",
            ListFilter {
                name: Some("place_order".into()),
                version: Some(2),
                ..ListFilter::default()
            },
            Box::new(|b| b.spec.name == "place_order" && b.spec.version == 2),
        ),
        (
            "version alone",
            ListFilter {
                version: Some(1),
                ..ListFilter::default()
            },
            Box::new(|b| b.spec.version == 1),
        ),
        (
            "current step",
            ListFilter {
                current_step: Some("authorize_payment".into()),
                ..ListFilter::default()
            },
            Box::new(|b| b.current_step().as_deref() == Some("authorize_payment")),
        ),
        (
            "current step of version 2",
            ListFilter {
                current_step: Some("authorize_payment".into()),
                version: Some(2),
                ..ListFilter::default()
            },
            Box::new(|b| {
                b.spec.version == 2 && b.current_step().as_deref() == Some("authorize_payment")
            }),
        ),
        (
            "created range",
            ListFilter {
                created: TimeRange {
                    from: Some(at(20_000)),
                    until: Some(at(60_000)),
                },
                ..ListFilter::default()
            },
            Box::new(|b| b.created >= at(20_000) && b.created < at(60_000)),
        ),
        (
            "updated since",
            ListFilter {
                updated: TimeRange {
                    from: Some(at(72_000)),
                    until: None,
                },
                ..ListFilter::default()
            },
            Box::new(|b| b.updated >= at(72_000)),
        ),
        (
            "updated before",
            ListFilter {
                updated: TimeRange {
                    from: None,
                    until: Some(at(50_100)),
                },
                ..ListFilter::default()
            },
            Box::new(|b| b.updated < at(50_100)),
        ),
        (
            "error text, any case",
            ListFilter {
                error_contains: Some("DECLINED".into()),
                ..ListFilter::default()
            },
            Box::new(|b| {
                b.last_error()
                    .is_some_and(|e| e.to_lowercase().contains("declined"))
            }),
        ),
        (
            // `_` is a LIKE wildcard; here it must mean an underscore.
            "error text with a wildcard character",
            ListFilter {
                error_contains: Some("authorize_payment".into()),
                ..ListFilter::default()
            },
            Box::new(|b| {
                b.last_error()
                    .is_some_and(|e| e.contains("authorize_payment"))
            }),
        ),
        (
            "error text that is a wildcard",
            ListFilter {
                error_contains: Some("%".into()),
                ..ListFilter::default()
            },
            Box::new(|b| b.last_error().is_some_and(|e| e.contains('%'))),
        ),
        (
            "start key",
            ListFilter {
                start_key: Some("k-103".into()),
                ..ListFilter::default()
            },
            Box::new(|b| b.start_key.as_deref() == Some("k-103")),
        ),
        (
            "several at once",
            ListFilter {
                statuses: vec![SagaStatus::Compensated],
                name: Some("place_order".into()),
                created: TimeRange {
                    from: Some(at(10_000)),
                    until: None,
                },
                ..ListFilter::default()
            },
            Box::new(|b| {
                b.state.status == SagaStatus::Compensated
                    && b.spec.name == "place_order"
                    && b.created >= at(10_000)
            }),
        ),
    ];
    for (what, filter, oracle) in cases {
        let got = list_all(&store, &filter).await.unwrap();
        let want = in_list_order(built.iter().filter(|b| oracle(b)));
        assert_eq!(got, want, "{backend:?}: {what}");
        assert!(
            !got.is_empty() || what == "error text that is a wildcard",
            "{backend:?}: {what} selects something, so it shows narrowing"
        );
        assert!(
            got.len() < built.len(),
            "{backend:?}: {what} narrows ({} of {})",
            got.len(),
            built.len()
        );
    }
    // Spot checks of the oracle itself, by id.
    let ids = |ns: &[u128]| ns.iter().map(|&n| Uuid::from_u128(n)).collect::<Vec<_>>();
    let stuck = ListFilter {
        statuses: vec![SagaStatus::Stuck],
        ..ListFilter::default()
    };
    assert_eq!(list_all(&store, &stuck).await.unwrap(), ids(&[103, 106]));
    let at_authorize = ListFilter {
        current_step: Some("authorize_payment".into()),
        ..ListFilter::default()
    };
    assert_eq!(
        list_all(&store, &at_authorize).await.unwrap(),
        ids(&[103, 104, 107])
    );

    // The summary names the step and carries the error.
    let page = ops::list(&store, &stuck, &Page::default()).await.unwrap();
    let first = &page.sagas[0];
    assert_eq!(first.current_step.as_deref(), Some("authorize_payment"));
    assert_eq!(first.start_key.as_deref(), Some("k-103"));
    assert!(
        first
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 3 attempts")),
        "{first:?}"
    );

    // Refusals say what to do.
    let unknown_step = ListFilter {
        current_step: Some("refund".into()),
        ..ListFilter::default()
    };
    let error = list_all(&store, &unknown_step)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`refund` is not a step of any registered saga")
            && error.contains("authorize_payment"),
        "{error}"
    );
    let empty_range = ListFilter {
        created: TimeRange {
            from: Some(at(10)),
            until: Some(at(10)),
        },
        ..ListFilter::default()
    };
    let error = list_all(&store, &empty_range)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("the created range is empty"), "{error}");
}

// ----- audit -----

/// Every record of `built` that `keep` selects, as `(saga, seq)`, in audit order.
fn audit_oracle(
    built: &[Built],
    keep: impl Fn(&Built, Timestamp, &Record) -> bool,
) -> Vec<(Uuid, i64)> {
    let mut rows: Vec<(Timestamp, String, i64, Uuid)> = Vec::new();
    for b in built {
        for (n, (at, record)) in b.records.iter().enumerate() {
            if keep(b, *at, record) {
                rows.push((*at, b.id.to_string(), n as i64 + 1, b.id));
            }
        }
    }
    rows.sort();
    rows.into_iter().map(|(_, _, seq, id)| (id, seq)).collect()
}

async fn audit_all(store: &Store, filter: &AuditFilter) -> Vec<AuditEntry> {
    let mut entries = Vec::new();
    let mut page = Page::first(7);
    loop {
        let result = ops::audit(store, filter, &page).await.unwrap();
        entries.extend(result.entries);
        match result.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    entries
}

fn keys(entries: &[AuditEntry]) -> Vec<(Uuid, i64)> {
    entries.iter().map(|e| (e.extra.saga_id, e.seq)).collect()
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_by_saga_name_kind_and_time(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = fleet(&store).await;

    // Which sagas compensated `authorize_payment` since "Monday" (here: 75 s in).
    let monday = at(75_000);
    let compensated_authorize = AuditFilter {
        kinds: vec![RecordKind::AttemptSucceeded],
        step: Some("authorize_payment".into()),
        direction: Some(Direction::Compensate),
        at: TimeRange {
            from: Some(monday),
            until: None,
        },
        ..AuditFilter::default()
    };
    let got = audit_all(&store, &compensated_authorize).await;
    let want = audit_oracle(&built, |_, at, r| {
        r.kind == RecordKind::AttemptSucceeded
            && r.step.as_deref() == Some("authorize_payment")
            && r.direction == Some(Direction::Compensate)
            && at >= monday
    });
    assert_eq!(keys(&got), want, "{backend:?}");
    let sagas: BTreeSet<Uuid> = got.iter().map(|e| e.extra.saga_id).collect();
    assert_eq!(
        sagas,
        [109, 110].map(Uuid::from_u128).into(),
        "{backend:?}: the resumed and the cancelled saga compensated authorize_payment \
         after 75 s (the deadline saga did too, but before)"
    );
    for entry in &got {
        assert_eq!(entry.extra.saga_name, "place_order");
        assert_eq!(entry.kind, RecordKind::AttemptSucceeded);
        assert!(entry.actor.starts_with("worker:"), "{entry:?}");
    }

    // By saga name and time range.
    let range = TimeRange {
        from: Some(at(40_000)),
        until: Some(at(70_030)),
    };
    let by_name = AuditFilter {
        saga_name: Some("place_order_with_deadline".into()),
        at: range,
        ..AuditFilter::default()
    };
    let want = audit_oracle(&built, |b, at, _| {
        b.spec.name == "place_order_with_deadline" && at >= at_from(range) && at < at_until(range)
    });
    assert!(!want.is_empty());
    assert_eq!(
        keys(&audit_all(&store, &by_name).await),
        want,
        "{backend:?}"
    );

    // By saga: its whole history, in order.
    let one = Uuid::from_u128(109);
    let by_saga = audit_all(
        &store,
        &AuditFilter {
            saga_id: Some(one),
            ..AuditFilter::default()
        },
    )
    .await;
    let history = store.history(one).await.unwrap();
    assert_eq!(by_saga.len(), history.len());
    for (entry, h) in by_saga.iter().zip(&history) {
        assert_eq!(
            (entry.seq, entry.at, &entry.kind, &entry.detail),
            (h.seq, h.at, &h.kind, &h.detail)
        );
    }

    // Several kinds at once, across every saga.
    let ends = AuditFilter {
        kinds: vec![RecordKind::SagaCompleted, RecordKind::SagaCompensated],
        ..AuditFilter::default()
    };
    let want = audit_oracle(&built, |_, _, r| {
        matches!(
            r.kind,
            RecordKind::SagaCompleted | RecordKind::SagaCompensated
        )
    });
    assert_eq!(keys(&audit_all(&store, &ends).await), want, "{backend:?}");

    // A cursor from `list` is refused here.
    let list_page = ops::list(&store, &ListFilter::default(), &Page::first(1))
        .await
        .unwrap();
    let error = ops::audit(
        &store,
        &AuditFilter::default(),
        &Page {
            limit: 5,
            after: list_page.next,
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("not a cursor of `sagaflow audit`"),
        "{error}"
    );
}

fn at_from(range: TimeRange) -> Timestamp {
    range.from.unwrap_or(Timestamp(i64::MIN))
}

fn at_until(range: TimeRange) -> Timestamp {
    range.until.unwrap_or(Timestamp(i64::MAX))
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_by_actor_finds_every_operator_action(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = fleet(&store).await;
    let operator = format!("operator:{}", scenarios::OPERATOR);

    let want = audit_oracle(&built, |_, _, r| r.actor.to_string() == operator);
    assert_eq!(want.len(), 2, "a resume and a cancel");
    let every_operator = audit_all(
        &store,
        &AuditFilter {
            actor: Some(ActorFilter::operators()),
            ..AuditFilter::default()
        },
    )
    .await;
    assert_eq!(keys(&every_operator), want, "{backend:?}");
    for entry in &every_operator {
        assert_eq!(entry.kind, RecordKind::OperatorAction);
        assert_eq!(entry.actor, operator);
        assert!(entry.detail["reason"].is_string(), "{entry:?}");
    }
    let reasons: Vec<&str> = every_operator
        .iter()
        .filter_map(|e| e.detail["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "the payment provider is back",
            "the customer called to cancel"
        ]
    );

    let exact = audit_all(
        &store,
        &AuditFilter {
            actor: Some(ActorFilter::Exact(operator.clone())),
            ..AuditFilter::default()
        },
    )
    .await;
    assert_eq!(keys(&exact), want, "{backend:?}");
    let nobody = audit_all(
        &store,
        &AuditFilter {
            actor: Some(ActorFilter::Exact("operator:bob".into())),
            ..AuditFilter::default()
        },
    )
    .await;
    assert!(nobody.is_empty());
    // A prefix is a prefix, not a pattern: `_` and `%` in it are plain characters.
    let pattern = audit_all(
        &store,
        &AuditFilter {
            actor: Some(ActorFilter::Prefix("%".into())),
            ..AuditFilter::default()
        },
    )
    .await;
    assert!(pattern.is_empty(), "{backend:?}: {} records", pattern.len());
    let workers = audit_all(
        &store,
        &AuditFilter {
            actor: Some(ActorFilter::Prefix("worker:".into())),
            ..AuditFilter::default()
        },
    )
    .await;
    let want = audit_oracle(&built, |_, _, r| r.actor.to_string().starts_with("worker:"));
    assert_eq!(keys(&workers), want, "{backend:?}");
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_export_parses_line_by_line(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = fleet(&store).await;
    let total: usize = built.iter().map(|b| b.records.len()).sum();

    let mut out = Vec::new();
    let written = ops::export_jsonl(
        &store,
        &AuditFilter::default(),
        &Default::default(),
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(written as usize, total, "{backend:?}");
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), total);
    assert!(text.ends_with('\n'));
    let paged = audit_all(&store, &AuditFilter::default()).await;
    for (line, entry) in lines.iter().zip(&paged) {
        let parsed: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{backend:?}: line {line:?} is not JSON: {e}"));
        assert_eq!(
            parsed,
            serde_json::to_value(ops::Versioned::new(entry)).unwrap()
        );
        assert_eq!(parsed["v"], ops::JSON_FORMAT_VERSION, "{line}");
        for field in ["saga_id", "saga_name", "seq", "at", "kind", "actor"] {
            assert!(!parsed[field].is_null(), "{field} in {line}");
        }
    }

    // A filtered export holds only what the filter selects.
    let mut out = Vec::new();
    let operators = AuditFilter {
        actor: Some(ActorFilter::operators()),
        ..AuditFilter::default()
    };
    let written = ops::export_jsonl(&store, &operators, &Default::default(), &mut out)
        .await
        .unwrap();
    assert_eq!(written, 2);
    for line in String::from_utf8(out).unwrap().lines() {
        let parsed: Value = serde_json::from_str(line).unwrap();
        assert_eq!(parsed["kind"], "operator_action");
    }
}

// ----- show / history refusals -----

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_saga_is_refused_with_what_to_do(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    four_sagas(&store).await;
    let missing = Uuid::from_u128(0xdead);
    for result in [
        ops::show(&store, missing).await.map(|_| ()),
        ops::history(&store, missing).await.map(|_| ()),
    ] {
        let error = result.unwrap_err();
        assert!(matches!(error, EngineError::UnknownSaga(id) if id == missing));
        assert_eq!(
            error.to_string(),
            format!("no saga has id {missing}; `sagaflow list` shows the sagas there are")
        );
    }
}

// ----- retention -----

async fn rows_of(store: &Store, id: Uuid) -> (u64, u64) {
    let history = history::Entity::find()
        .filter(history::Column::SagaId.eq(id.to_string()))
        .count(store.connection())
        .await
        .unwrap();
    let attempts = attempt::Entity::find()
        .filter(attempt::Column::SagaId.eq(id.to_string()))
        .count(store.connection())
        .await
        .unwrap();
    (history, attempts)
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_finished_sagas_older_than_the_cutoff(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let built = fleet(&store).await;
    let cutoff = at(86_000);
    let doomed: BTreeSet<Uuid> = built
        .iter()
        .filter(|b| b.state.status.is_terminal() && b.updated < cutoff)
        .map(|b| b.id)
        .collect();
    let kept: Vec<&Built> = built.iter().filter(|b| !doomed.contains(&b.id)).collect();
    // Old stuck and running sagas are among the kept: age alone never removes a saga.
    for n in [103, 104, 106, 107] {
        assert!(kept.iter().any(|b| b.id == Uuid::from_u128(n)));
    }
    assert_eq!(doomed.len(), 5, "{doomed:?}");
    let mut kept_histories = Vec::new();
    for b in &kept {
        kept_histories.push(store.history(b.id).await.unwrap());
    }
    for id in &doomed {
        let (history, attempts) = rows_of(&store, *id).await;
        assert!(history > 0 && attempts > 0);
    }

    let dry = ops::retention(&store, cutoff, true).await.unwrap();
    assert_eq!((dry.sagas, dry.dry_run), (doomed.len() as u64, true));
    assert_eq!(
        list_all(&store, &ListFilter::default())
            .await
            .unwrap()
            .len(),
        built.len(),
        "{backend:?}: a dry run removes nothing"
    );

    let done = ops::retention(&store, cutoff, false).await.unwrap();
    assert_eq!((done.sagas, done.dry_run), (doomed.len() as u64, false));
    assert_eq!(
        render::retention_text(&done),
        format!(
            "Removed 5 finished sagas last changed before {}, with their history and attempts",
            ops::time::format_time(cutoff)
        )
    );
    let left = list_all(&store, &ListFilter::default()).await.unwrap();
    assert_eq!(left, in_list_order(kept.iter().copied()), "{backend:?}");
    for id in &doomed {
        assert!(store.load(*id).await.unwrap().is_none());
        assert_eq!(
            rows_of(&store, *id).await,
            (0, 0),
            "{backend:?}: the history and attempts went with saga {id}"
        );
    }
    for (b, before) in kept.iter().zip(&kept_histories) {
        assert_eq!(
            &store.history(b.id).await.unwrap(),
            before,
            "{backend:?}: history of kept saga {} untouched",
            b.id
        );
    }
    // Nothing more is that old and finished.
    let again = ops::retention(&store, cutoff, false).await.unwrap();
    assert_eq!(again.sagas, 0);
    let remaining = saga::Entity::find()
        .count(store.connection())
        .await
        .unwrap();
    assert_eq!(remaining as usize, kept.len());
}
