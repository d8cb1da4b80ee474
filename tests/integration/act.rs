//! Operator actions (`sagaflow_engine::ops::act`, `act_in_bulk` and the `sagaflow` CLI) on
//! SQLite and PostgreSQL, against a real embedded engine that keeps running while the operator
//! acts from outside it: through a store connection of its own, as the CLI does, and through
//! the `sagaflow` binary as a child process.
//!
//! The engine learns of an action only through the database: the action commits the saga's new
//! state with its step commands in the outbox, the engine's relay sweeps them up and sends them
//! to its workers, and an engine that had the saga in memory finds its next write stale and
//! re-reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rstest_reuse::apply;
use sagaflow_engine::EngineError;
use sagaflow_engine::machine::scenarios::{self, Scenario};
use sagaflow_engine::machine::{
    Event, Inputs, OperatorAction, OperatorCommand, RecordKind, SagaState, SagaStatus, decide,
};
use sagaflow_engine::ops::{
    self, ActOptions, BulkAction, BulkOutcome, BulkRequest, ListFilter, OutputCheck, render,
};
use sagaflow_engine::store::{HistoryEntry, SagaWrite, Store, StoredSaga, WriteOutcome};
use sagaflow_protocol::backoff::ExactDelays;
use sagaflow_sdk::{
    Compensate, Direction, RetryPolicy, Saga, Step, StepContext, StepError, StepHandler,
};
use sagaflow_tests::{Backend, TestDb};
use sagaflow_workflows::{
    FaultPoint, Faults, GOOD_CARD, OrderServices, Service, install, place_order_saga, seed_stock,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{
    Counted, ReadsCount, backends, build_binary, check_compensations, fast_policy, launch,
};

// ----- steerable steps and the sagas built from them -----

/// A step the test steers: its forward action fails retryably its next `retryable_failures`
/// calls, or permanently while `fail_permanently`; its compensation fails (retryably) while
/// `compensation_broken`. Its output is `Counted { n: output_n }`.
#[derive(Clone, Default)]
struct Steered {
    retryable_failures: Arc<AtomicU32>,
    fail_permanently: Arc<AtomicBool>,
    compensation_broken: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
    compensations: Arc<AtomicU32>,
    output_n: u32,
}

impl StepHandler for Steered {
    type Input = Value;
    type Output = Counted;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Counted, StepError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_permanently.load(Ordering::SeqCst) {
            return Err(StepError::permanent("declined", "refused for good"));
        }
        let left = self.retryable_failures.load(Ordering::SeqCst);
        if left > 0 {
            self.retryable_failures.store(left - 1, Ordering::SeqCst);
            return Err(StepError::retryable("busy", "try again later"));
        }
        Ok(Counted { n: self.output_n })
    }
}

impl Compensate for Steered {
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _input: Value,
        _output: Option<Counted>,
    ) -> Result<(), StepError> {
        if self.compensation_broken.load(Ordering::SeqCst) {
            return Err(StepError::retryable(
                "unavailable",
                "the hold service is down",
            ));
        }
        self.compensations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `refund`: `reserve` then `charge`, both compensatable. A failing `charge` makes the saga
/// compensate `reserve`; a broken `reserve` compensation makes it stuck after 3 attempts.
fn refund_saga(reserve: &Steered, charge: &Steered) -> Saga {
    Saga::builder("refund", 1)
        .step(
            Step::compensatable("reserve", reserve.clone())
                .retry(fast_policy(3))
                .compensation_retry(fast_policy(3)),
        )
        .step(Step::compensatable("charge", charge.clone()).retry(fast_policy(3)))
        .build()
        .expect("valid saga")
}

/// `manual`: the pivot `one` (2 attempts), then `two`, which reads `one`'s output.
fn manual_saga(one: &Steered) -> Saga {
    Saga::builder("manual", 1)
        .step(Step::pivot("one", one.clone()).retry(fast_policy(2)))
        .step(Step::retriable("two", ReadsCount).retry(fast_policy(3)))
        .build()
        .expect("valid saga")
}

/// An hour between attempts: a saga in this backoff does not move by itself during a test.
fn hourly_policy() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_secs(3_600))
        .max_interval(Duration::from_secs(3_600))
        .max_attempts(3)
        .jitter(0.0)
        .build()
        .expect("valid policy")
}

/// `slow`: `first`, then `second`, which waits an hour between attempts.
fn slow_saga(first: &Steered, second: &Steered) -> Saga {
    Saga::builder("slow", 1)
        .step(Step::compensatable("first", first.clone()).retry(fast_policy(3)))
        .step(Step::compensatable("second", second.clone()).retry(hourly_policy()))
        .build()
        .expect("valid saga")
}

fn command(actor: &str, reason: &str, action: OperatorAction) -> OperatorCommand {
    OperatorCommand {
        actor: actor.into(),
        reason: reason.into(),
        action,
    }
}

fn skip(step: &str, output: Option<Value>) -> OperatorAction {
    OperatorAction::SkipStep {
        step: step.into(),
        output,
    }
}

// ----- waiting and looking -----

async fn load(store: &Store, id: Uuid) -> StoredSaga {
    store.load(id).await.unwrap().expect("the saga exists")
}

/// Waits (up to 30 s) until the saga has `status`.
async fn wait_for_status(store: &Store, id: Uuid, status: SagaStatus) -> StoredSaga {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let saga = load(store, id).await;
        if saga.state.status == status {
            return saga;
        }
        assert!(
            Instant::now() < give_up,
            "saga {id} is {:?}, not {status:?}, after 30 s: {:#?}",
            saga.state.status,
            store.history(id).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 30 s) until the saga's history has a record of `kind`.
async fn wait_for_record(store: &Store, id: Uuid, kind: &str) -> HistoryEntry {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let history = store.history(id).await.unwrap();
        if let Some(entry) = history.iter().find(|h| h.kind.as_str() == kind) {
            return entry.clone();
        }
        assert!(
            Instant::now() < give_up,
            "no {kind} after 30 s: {history:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a refused action must leave alone: the saga's version and its history.
async fn fingerprint(store: &Store, id: Uuid) -> (i64, usize, SagaStatus) {
    let saga = load(store, id).await;
    let history = store.history(id).await.unwrap();
    (saga.row_version, history.len(), saga.state.status)
}

fn operator_actions(history: &[HistoryEntry]) -> Vec<&HistoryEntry> {
    history
        .iter()
        .filter(|h| h.kind == RecordKind::OperatorAction)
        .collect()
}

/// Attempt numbers of one step in one direction with records of `kind`, in order.
fn attempts(history: &[HistoryEntry], kind: &str, step: &str, direction: &str) -> Vec<u32> {
    history
        .iter()
        .filter(|h| {
            h.kind.as_str() == kind
                && h.step.as_deref() == Some(step)
                && h.direction.map(Direction::as_str) == Some(direction)
        })
        .filter_map(|h| h.attempt)
        .collect()
}

fn position(history: &[HistoryEntry], pred: impl Fn(&HistoryEntry) -> bool) -> usize {
    history
        .iter()
        .position(pred)
        .expect("the record is in the history")
}

/// A store of the operator's own: another connection (pool) to the engine's database.
async fn operator_store(db: &TestDb) -> Store {
    Store::connect(&db.url).await.expect("open the store")
}

// ----- resume -----

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_of_a_stuck_compensation_after_the_fix_finishes_compensated(backend: Backend) {
    let db = TestDb::new(backend).await;
    let reserve = Steered::default();
    reserve.compensation_broken.store(true, Ordering::SeqCst);
    let charge = Steered::default();
    charge.fail_permanently.store(true, Ordering::SeqCst);
    let engine = launch(&db.url, vec![refund_saga(&reserve, &charge)]).await;
    let id = engine.start("refund", json!({}), None).await.unwrap();

    let stuck = wait_for_status(engine.store(), id, SagaStatus::Stuck).await;
    let reason = stuck.state.stuck.expect("a stuck reason").reason;
    assert!(
        reason.contains("compensation of step `reserve` gave up after 3 attempts"),
        "{reason}"
    );

    // The operator fixes the cause, then resumes from outside the engine.
    reserve.compensation_broken.store(false, Ordering::SeqCst);
    let store = operator_store(&db).await;
    let report = ops::act(
        &store,
        id,
        command("alice", "hold service restarted", OperatorAction::Resume),
        &ActOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.status_before, SagaStatus::Stuck);
    assert_eq!(report.status, SagaStatus::Compensating);
    assert_eq!(report.actor, "operator:alice");
    let dispatched: Vec<_> = report
        .dispatched
        .iter()
        .map(|d| (d.step.as_str(), d.direction, d.attempt))
        .collect();
    assert_eq!(dispatched, [("reserve", Direction::Compensate, 4)]);

    wait_for_status(&store, id, SagaStatus::Compensated).await;
    assert_eq!(reserve.compensations.load(Ordering::SeqCst), 1);
    let history = store.history(id).await.unwrap();
    check_compensations(&history, id);

    let actions = operator_actions(&history);
    assert_eq!(actions.len(), 1, "{history:#?}");
    let action = actions[0];
    assert_eq!(action.actor, "operator:alice");
    assert_eq!(action.detail["action"], "resume");
    assert_eq!(action.detail["reason"], "hold service restarted");
    assert_eq!(action.step.as_deref(), Some("reserve"));
    // Attempts before and after, numbered on: 1-3 failed, the operator resumed, 4 succeeded.
    assert_eq!(
        attempts(&history, "attempt_dispatched", "reserve", "compensate"),
        [1, 2, 3, 4]
    );
    assert_eq!(
        attempts(&history, "attempt_failed", "reserve", "compensate"),
        [1, 2, 3]
    );
    assert_eq!(
        attempts(&history, "attempt_succeeded", "reserve", "compensate"),
        [4]
    );
    let resumed = position(&history, |h| h.kind == RecordKind::OperatorAction);
    let third_failure = position(&history, |h| {
        h.kind == RecordKind::AttemptFailed && h.attempt == Some(3)
    });
    let fourth = position(&history, |h| {
        h.kind == RecordKind::AttemptDispatched
            && h.direction == Some(Direction::Compensate)
            && h.attempt == Some(4)
    });
    assert!(
        third_failure < resumed && resumed < fourth,
        "{backend:?}: {history:#?}"
    );
    engine.shutdown().await;
}

// ----- skip -----

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_step_of_a_stuck_step_moves_on_with_the_output_given(backend: Backend) {
    let db = TestDb::new(backend).await;
    let one = Steered::default();
    one.retryable_failures.store(1_000, Ordering::SeqCst);
    let engine = launch(&db.url, vec![manual_saga(&one)]).await;
    let id = engine
        .start("manual", json!({"sku": "A", "quantity": 1}), None)
        .await
        .unwrap();
    let stuck = wait_for_status(engine.store(), id, SagaStatus::Stuck).await;
    let reason = stuck.state.stuck.expect("a stuck reason").reason;
    assert!(reason.contains("pivot `one`"), "{reason}");

    let store = operator_store(&db).await;
    // The operator's program knows nothing of the saga: the definition carries the step's
    // output schema.
    let options = ActOptions::default();

    // Refused: an output that does not fit the step's output schema (twice: a wrong type,
    // a value out of range); an unknown step.
    let before = fingerprint(&store, id).await;
    let error = ops::act(
        &store,
        id,
        command(
            "alice",
            "done by hand",
            skip("one", Some(json!({"n": "many"}))),
        ),
        &options,
    )
    .await
    .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, EngineError::Refused(_)), "{message}");
    assert!(
        message.contains("does not fit what step `one` returns")
            && message.contains("Counted")
            && message.contains("n"),
        "says which step, which type and which field: {message}"
    );
    let error = ops::act(
        &store,
        id,
        command("alice", "done by hand", skip("nope", Some(json!({"n": 1})))),
        &options,
    )
    .await
    .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("no step `nope`") && message.contains("one, two"),
        "{message}"
    );
    let error = ops::act(
        &store,
        id,
        command("alice", "done by hand", skip("one", Some(json!({"n": -1})))),
        &options,
    )
    .await
    .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("does not fit what step `one` returns (Counted)")
            && message.contains("-1 is less than the minimum of 0")
            && message.contains("at JSON path /n"),
        "{message}"
    );
    assert_eq!(
        fingerprint(&store, id).await,
        before,
        "refusals change nothing"
    );

    let report = ops::act(
        &store,
        id,
        command(
            "alice",
            "confirmed with the partner by phone",
            skip("one", Some(json!({"n": 41}))),
        ),
        &options,
    )
    .await
    .unwrap();
    assert_eq!(report.output_check, OutputCheck::Checked);
    assert_eq!(report.status, SagaStatus::Running);
    assert_eq!(report.dispatched.len(), 1);
    assert_eq!(report.dispatched[0].step, "two");

    let done = wait_for_status(&store, id, SagaStatus::Completed).await;
    assert_eq!(done.state.outputs["one"], json!({"n": 41}));
    assert_eq!(
        done.state.outputs["two"],
        json!({"n": 42}),
        "the next step read the output the operator gave"
    );
    let history = store.history(id).await.unwrap();
    let actions = operator_actions(&history);
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].actor, "operator:alice");
    assert_eq!(actions[0].detail["action"], "skip");
    assert_eq!(actions[0].detail["output"], json!({"n": 41}));
    assert_eq!(actions[0].detail["output_checked"], true);
    assert_eq!(
        actions[0].detail["reason"],
        "confirmed with the partner by phone"
    );
    assert_eq!(one.calls.load(Ordering::SeqCst), 2, "{backend:?}");
    engine.shutdown().await;
}

// ----- cancel and retry-step during a long backoff -----

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_saga_compensates_what_it_completed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let first = Steered::default();
    let second = Steered::default();
    second.retryable_failures.store(1, Ordering::SeqCst);
    let engine = launch(&db.url, vec![slow_saga(&first, &second)]).await;
    let id = engine.start("slow", json!({}), None).await.unwrap();
    // `second` failed once and waits an hour for its retry; the engine has the saga in
    // memory.
    wait_for_record(engine.store(), id, "retry_scheduled").await;
    assert_eq!(
        load(engine.store(), id).await.state.status,
        SagaStatus::Running
    );

    let store = operator_store(&db).await;
    let started = Instant::now();
    let report = ops::act(
        &store,
        id,
        command("bob", "customer withdrew the order", OperatorAction::Cancel),
        &ActOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.status_before, SagaStatus::Running);
    assert_eq!(report.status, SagaStatus::Compensating);
    assert!(!report.dispatched.is_empty());
    assert!(
        report
            .dispatched
            .iter()
            .all(|d| d.direction == Direction::Compensate)
    );

    wait_for_status(&store, id, SagaStatus::Compensated).await;
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(first.compensations.load(Ordering::SeqCst), 1);
    assert_eq!(second.calls.load(Ordering::SeqCst), 1, "never retried");
    let history = store.history(id).await.unwrap();
    check_compensations(&history, id);
    let actions = operator_actions(&history);
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].actor, "operator:bob");
    assert_eq!(actions[0].detail["action"], "cancel");
    assert_eq!(actions[0].detail["reason"], "customer withdrew the order");
    let cancelled = position(&history, |h| h.kind == RecordKind::OperatorAction);
    let compensation = position(&history, |h| h.kind == RecordKind::CompensationStarted);
    assert!(cancelled < compensation, "{backend:?}: {history:#?}");
    engine.shutdown().await;
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_step_skips_a_long_backoff(backend: Backend) {
    let db = TestDb::new(backend).await;
    let first = Steered::default();
    let second = Steered::default();
    second.retryable_failures.store(1, Ordering::SeqCst);
    let engine = launch(&db.url, vec![slow_saga(&first, &second)]).await;
    let id = engine.start("slow", json!({}), None).await.unwrap();
    let scheduled = wait_for_record(engine.store(), id, "retry_scheduled").await;
    let due = scheduled.detail["at"].as_i64().expect("retry time");
    assert!(due - scheduled.at.as_millis() >= 3_600_000, "{scheduled:?}");

    let store = operator_store(&db).await;
    let report = ops::act(
        &store,
        id,
        command("carol", "rate limit lifted", OperatorAction::RetryNow),
        &ActOptions::default(),
    )
    .await
    .unwrap();
    let dispatched: Vec<_> = report
        .dispatched
        .iter()
        .map(|d| (d.step.as_str(), d.direction, d.attempt))
        .collect();
    assert_eq!(dispatched, [("second", Direction::Forward, 2)]);

    let done = wait_for_status(&store, id, SagaStatus::Completed).await;
    assert_eq!(done.state.wake_at(), None);
    let history = store.history(id).await.unwrap();
    let actions = operator_actions(&history);
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].actor, "operator:carol");
    assert_eq!(actions[0].detail["action"], "retry");
    let retried = history
        .iter()
        .find(|h| h.kind == RecordKind::AttemptDispatched && h.attempt == Some(2))
        .expect("attempt 2 dispatched");
    assert!(
        retried.at.as_millis() < due,
        "{backend:?}: not an hour later"
    );
    assert!(
        !history
            .iter()
            .any(|h| h.kind == RecordKind::RetryTimerFired),
        "the timer never had to fire"
    );
    engine.shutdown().await;
}

// ----- refusals and races -----

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_actions_say_why_and_change_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let reserve = Steered::default();
    reserve.compensation_broken.store(true, Ordering::SeqCst);
    let charge = Steered::default();
    charge.fail_permanently.store(true, Ordering::SeqCst);
    let engine = launch(&db.url, vec![refund_saga(&reserve, &charge)]).await;
    let stuck_id = engine.start("refund", json!({}), None).await.unwrap();
    wait_for_status(engine.store(), stuck_id, SagaStatus::Stuck).await;
    charge.fail_permanently.store(false, Ordering::SeqCst);
    let done_id = engine.start("refund", json!({}), None).await.unwrap();
    wait_for_status(engine.store(), done_id, SagaStatus::Completed).await;
    let store = operator_store(&db).await;

    let refusals: Vec<(Uuid, OperatorCommand, &str)> = vec![
        (
            done_id,
            command("alice", "try again", OperatorAction::Resume),
            "cannot resume saga",
        ),
        (
            done_id,
            command("alice", "try again", OperatorAction::Cancel),
            "it is already completed",
        ),
        (
            stuck_id,
            command("alice", "done by hand", skip("refund_it", None)),
            "it has no step `refund_it`; its steps are: reserve, charge",
        ),
        (
            stuck_id,
            command(
                "alice",
                "done by hand",
                skip("reserve", Some(json!({"n": 1}))),
            ),
            "skipping a compensation takes no output",
        ),
        (
            stuck_id,
            command("alice", "give up", OperatorAction::Cancel),
            "only a saga moving forward can be cancelled",
        ),
        (
            stuck_id,
            command("alice", "now", OperatorAction::RetryNow),
            "no retry is waiting",
        ),
        (
            stuck_id,
            command("alice", "  ", OperatorAction::Resume),
            "no reason was given",
        ),
    ];
    for (id, cmd, expected) in refusals {
        let before = fingerprint(&store, id).await;
        let error = ops::act(&store, id, cmd.clone(), &ActOptions::default())
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, EngineError::Refused(_)),
            "{cmd:?}: {message}"
        );
        assert!(
            message.contains(expected) && message.contains(&id.to_string()),
            "{cmd:?}: {message}"
        );
        assert_eq!(
            fingerprint(&store, id).await,
            before,
            "{backend:?}: {cmd:?} changed nothing"
        );
    }
    let unknown = Uuid::from_u128(42);
    let error = ops::act(
        &store,
        unknown,
        command("alice", "why not", OperatorAction::Resume),
        &ActOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, EngineError::UnknownSaga(_)), "{error}");

    // Two operators act on the same stored version: the first commits, the second is told
    // of the conflict and writes nothing.
    let resume = |actor: &str| command(actor, "second try", OperatorAction::Resume);
    let first = ops::plan(&store, stuck_id, resume("alice"), &ActOptions::default())
        .await
        .unwrap();
    let second = ops::plan(&store, stuck_id, resume("bob"), &ActOptions::default())
        .await
        .unwrap();
    assert_eq!(first.report().row_version, second.report().row_version);
    let committed = first.commit(&store).await.unwrap();
    let error = second.commit(&store).await.unwrap_err();
    assert!(matches!(error, EngineError::Conflict(id) if id == stuck_id));
    assert!(
        error
            .to_string()
            .contains("changed by another writer at the same time; nothing was changed"),
        "{error}"
    );
    let history = store.history(stuck_id).await.unwrap();
    let actors: Vec<&str> = operator_actions(&history)
        .iter()
        .map(|h| h.actor.as_str())
        .collect();
    assert_eq!(actors, ["operator:alice"], "only the winner is recorded");
    assert!(load(&store, stuck_id).await.row_version >= committed.row_version);

    // The compensation is still broken: the saga gets stuck again. Then eight operators
    // resume it at once: exactly one succeeds.
    let stuck_again = async {
        loop {
            let saga = load(&store, stuck_id).await;
            if saga.state.status == SagaStatus::Stuck && saga.row_version > committed.row_version {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), stuck_again)
        .await
        .expect("stuck again");
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                ops::act(
                    &store,
                    stuck_id,
                    command(&format!("racer-{n}"), "all at once", OperatorAction::Resume),
                    &ActOptions::default(),
                )
                .await
            })
        })
        .collect();
    let mut wins = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(_) => wins += 1,
            Err(EngineError::Conflict(_)) => {}
            Err(EngineError::Refused(refusal)) => {
                assert!(refusal.to_string().contains("not stuck"), "{refusal}")
            }
            Err(other) => panic!("{backend:?}: unexpected {other}"),
        }
    }
    assert_eq!(wins, 1, "{backend:?}: exactly one concurrent resume wins");
    let history = store.history(stuck_id).await.unwrap();
    assert_eq!(operator_actions(&history).len(), 2, "{history:#?}");
    engine.shutdown().await;
}

// ----- bulk -----

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_resume_dry_run_counts_and_execute_resumes_them_all(backend: Backend) {
    let db = TestDb::new(backend).await;
    let reserve = Steered::default();
    reserve.compensation_broken.store(true, Ordering::SeqCst);
    let charge = Steered::default();
    charge.fail_permanently.store(true, Ordering::SeqCst);
    let engine = launch(&db.url, vec![refund_saga(&reserve, &charge)]).await;
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(engine.start("refund", json!({}), None).await.unwrap());
    }
    for id in &stuck {
        wait_for_status(engine.store(), *id, SagaStatus::Stuck).await;
    }
    charge.fail_permanently.store(false, Ordering::SeqCst);
    let completed = engine.start("refund", json!({}), None).await.unwrap();
    wait_for_status(engine.store(), completed, SagaStatus::Completed).await;
    let store = operator_store(&db).await;
    let mut all = stuck.clone();
    all.push(completed);
    let mut before = Vec::new();
    for id in &all {
        before.push(fingerprint(&store, *id).await);
    }

    let request = |filter: ListFilter, execute: bool| BulkRequest {
        filter,
        action: BulkAction::Resume,
        actor: "dave".into(),
        reason: "hold service restarted".into(),
        execute,
    };
    let by_name = ListFilter {
        name: Some("refund".into()),
        ..ListFilter::default()
    };
    // No status given: resume selects the stuck ones.
    let dry = ops::act_in_bulk(&store, &request(by_name.clone(), false))
        .await
        .unwrap();
    assert!(!dry.executed);
    assert_eq!((dry.matched, dry.changed, dry.refused), (3, 3, 0));
    let ids: Vec<Uuid> = dry.sagas.iter().map(|s| s.saga_id).collect();
    let mut expected = stuck.clone();
    expected.sort();
    let mut found = ids.clone();
    found.sort();
    assert_eq!(found, expected);
    assert!(dry.sagas.iter().all(|s| s.outcome
        == BulkOutcome::WouldChange {
            status: SagaStatus::Compensating
        }));
    // Naming the statuses includes the completed saga, which would be refused.
    let wider = ListFilter {
        statuses: vec![SagaStatus::Stuck, SagaStatus::Completed],
        ..by_name.clone()
    };
    let dry_wider = ops::act_in_bulk(&store, &request(wider, false))
        .await
        .unwrap();
    assert_eq!(
        (dry_wider.matched, dry_wider.changed, dry_wider.refused),
        (4, 3, 1)
    );
    let refused = dry_wider
        .sagas
        .iter()
        .find(|s| s.saga_id == completed)
        .expect("the completed saga is listed");
    assert!(
        matches!(&refused.outcome, BulkOutcome::Refused { message } if message.contains("already completed")),
        "{refused:?}"
    );
    for (id, fingerprint_before) in all.iter().zip(&before) {
        assert_eq!(
            &fingerprint(&store, *id).await,
            fingerprint_before,
            "{backend:?}: a dry run changes nothing"
        );
    }

    reserve.compensation_broken.store(false, Ordering::SeqCst);
    let done = ops::act_in_bulk(&store, &request(by_name, true))
        .await
        .unwrap();
    assert!(done.executed);
    assert_eq!(
        (done.matched, done.changed, done.refused, done.failed),
        (3, 3, 0, 0)
    );
    for id in &stuck {
        wait_for_status(&store, *id, SagaStatus::Compensated).await;
        let history = store.history(*id).await.unwrap();
        let actions = operator_actions(&history);
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].actor, "operator:dave");
        assert_eq!(actions[0].detail["reason"], "hold service restarted");
    }
    assert_eq!(
        fingerprint(&store, completed).await,
        before[3],
        "the completed saga was not touched"
    );
    engine.shutdown().await;
}

// ----- the `sagaflow` binary -----

fn sagaflow_binary() -> std::path::PathBuf {
    build_binary("sagaflow-cli", "sagaflow")
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn sagaflow(binary: &std::path::Path, args: &[&str], user: Option<&str>) -> Run {
    let mut command = tokio::process::Command::new(binary);
    command.args(args).env_remove("SAGAFLOW_DATABASE_URL");
    match user {
        Some(user) => command.env("USER", user),
        None => command.env_remove("USER"),
    };
    let output = command.output().await.expect("run sagaflow");
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn cli_skips_a_stuck_pivot_of_the_order_saga(backend: Backend) {
    let binary = sagaflow_binary();
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let conn = store.connection().clone();
    install(&conn).await.unwrap();
    seed_stock(&conn, &[("SKU-1", 10)]).await.unwrap();
    let faults = Faults::none();
    // Every attempt of the pivot fails before confirming: it gets stuck, outcome unknown.
    faults.fail_next(Service::Orders, FaultPoint::BeforeEffect, 1_000);
    let saga = place_order_saga(&OrderServices::new(&conn, &faults)).unwrap();
    let engine = sagaflow_engine::runtime::Engine::launch(
        store.clone(),
        vec![saga],
        crate::support::options(),
    )
    .await
    .unwrap();
    let order = json!({
        "order_id": "order-7", "customer": "ada", "sku": "SKU-1", "quantity": 2,
        "amount_cents": 1_999, "card": GOOD_CARD,
    });
    let id = engine.start("place_order", order, None).await.unwrap();
    let stuck = wait_for_status(&store, id, SagaStatus::Stuck).await;
    assert_eq!(
        stuck.state.current_step(),
        Some((2, Direction::Forward)),
        "stuck at confirm_order"
    );
    let url = db.url.as_str();
    let id_text = id.to_string();
    let before = fingerprint(&store, id).await;

    // Refusals: each exits non-zero with the reason, and changes nothing.
    let refusals: [(&[&str], &str); 4] = [
        (
            &[
                "skip-step",
                &id_text,
                "--step",
                "confirm_order",
                "--output",
                r#"{"confirm_key": 5}"#,
            ],
            "does not fit what step `confirm_order` returns",
        ),
        (
            &[
                "skip-step",
                &id_text,
                "--step",
                "confirm_order",
                "--output",
                "{not json",
            ],
            "--output is not valid JSON",
        ),
        (
            &[
                "skip-step",
                &id_text,
                "--step",
                "pack_box",
                "--output",
                "{}",
            ],
            "no step `pack_box`",
        ),
        (&["retry-step", &id_text], "no retry is waiting"),
    ];
    for (args, expected) in refusals {
        let mut args = args.to_vec();
        args.extend([
            "--reason",
            "ticket OPS-7",
            "--actor",
            "erin",
            "--database-url",
            url,
        ]);
        let run = sagaflow(&binary, &args, None).await;
        assert!(!run.ok, "{args:?} must fail: {}", run.stdout);
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("nothing was changed"),
            "{args:?}: {}",
            run.stderr
        );
        assert_eq!(fingerprint(&store, id).await, before, "{args:?}");
    }
    let run = sagaflow(
        &binary,
        &[
            "skip-step",
            &id_text,
            "--step",
            "confirm_order",
            "--output",
            "{}",
            "--database-url",
            url,
        ],
        None,
    )
    .await;
    assert!(!run.ok && run.stderr.contains("--reason"), "{}", run.stderr);

    // The pivot confirmed by hand: the output is checked against ConfirmedOrder, the saga
    // moves on to the shipment and completes. The actor comes from $USER.
    let reservation = stuck.state.outputs["reserve_inventory"]["reservation_key"].clone();
    let authorization = stuck.state.outputs["authorize_payment"]["authorization_key"].clone();
    let confirmed = json!({
        "confirm_key": "manual-order-7",
        "order_id": "order-7", "customer": "ada", "sku": "SKU-1", "quantity": 2,
        "amount_cents": 1_999, "reservation_key": reservation,
        "authorization_key": authorization, "confirmed_at": 1_700_000_000_000i64,
    })
    .to_string();
    let run = sagaflow(
        &binary,
        &[
            "skip-step",
            &id_text,
            "--step",
            "confirm_order",
            "--output",
            &confirmed,
            "--reason",
            "confirmed in the order system by hand",
            "--database-url",
            url,
            "--json",
        ],
        Some("frank"),
    )
    .await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["status"], "running");
    assert_eq!(report["output_check"], "checked");
    assert_eq!(report["actor"], "operator:frank");
    assert_eq!(report["dispatched"][0]["step"], "request_shipment");

    let done = wait_for_status(&store, id, SagaStatus::Completed).await;
    assert_eq!(
        done.state.outputs["confirm_order"]["confirm_key"],
        "manual-order-7"
    );
    assert!(done.state.outputs.contains_key("request_shipment"));

    // Resume of the completed saga: refused, non-zero, nothing changed.
    let before = fingerprint(&store, id).await;
    let run = sagaflow(
        &binary,
        &[
            "resume",
            &id_text,
            "--reason",
            "again",
            "--database-url",
            url,
        ],
        Some("frank"),
    )
    .await;
    assert!(!run.ok);
    assert!(
        run.stderr
            .contains(&format!("cannot resume saga {id}: it is already completed")),
        "{}",
        run.stderr
    );
    assert_eq!(fingerprint(&store, id).await, before);

    // The history, as the operator reads it.
    let run = sagaflow(&binary, &["history", &id_text, "--database-url", url], None).await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout.contains("operator_action") && run.stdout.contains("operator:frank"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("confirmed in the order system by hand"),
        "{}",
        run.stdout
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_skip_step_on_sqlite() {
    cli_skips_a_stuck_pivot_of_the_order_saga(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_skip_step_on_postgres() {
    cli_skips_a_stuck_pivot_of_the_order_saga(Backend::Postgres).await;
}

#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bulk_resume_is_a_dry_run_until_execute(backend: Backend) {
    let binary = sagaflow_binary();
    let db = TestDb::new(backend).await;
    let reserve = Steered::default();
    reserve.compensation_broken.store(true, Ordering::SeqCst);
    let charge = Steered::default();
    charge.fail_permanently.store(true, Ordering::SeqCst);
    let engine = launch(&db.url, vec![refund_saga(&reserve, &charge)]).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(engine.start("refund", json!({}), None).await.unwrap());
    }
    for id in &ids {
        wait_for_status(engine.store(), *id, SagaStatus::Stuck).await;
    }
    let store = engine.store().clone();
    let url = db.url.as_str();
    let args = [
        "resume",
        "--all",
        "--name",
        "refund",
        "--reason",
        "restarted",
        "--actor",
        "gil",
        "--database-url",
        url,
    ];
    let before: Vec<_> =
        futures::future::join_all(ids.iter().map(|id| fingerprint(&store, *id))).await;
    let run = sagaflow(&binary, &args, None).await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("Dry run: 2 sagas matched; 2 would change, 0 would be refused."),
        "{}",
        run.stdout
    );
    for id in &ids {
        assert!(run.stdout.contains(&id.to_string()), "{}", run.stdout);
    }
    let after: Vec<_> =
        futures::future::join_all(ids.iter().map(|id| fingerprint(&store, *id))).await;
    assert_eq!(before, after, "{backend:?}: the dry run changed nothing");

    reserve.compensation_broken.store(false, Ordering::SeqCst);
    let mut execute = args.to_vec();
    execute.push("--execute");
    let run = sagaflow(&binary, &execute, None).await;
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("2 sagas matched: 2 changed, 0 refused, 0 failed."),
        "{}",
        run.stdout
    );
    for id in &ids {
        wait_for_status(&store, *id, SagaStatus::Compensated).await;
    }
    engine.shutdown().await;
}

// ----- the history of a resumed saga, reproducibly -----

/// The `operator_resume_stuck_compensation` scenario at its fixed times through the store,
/// with the operator's resume applied by `ops::act` as the CLI would: the history must be the
/// pure machine's, record for record.
async fn resumed_history(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let scenario = scenarios::all()
        .into_iter()
        .find(|s| s.name == "operator_resume_stuck_compensation")
        .expect("the scenario exists");
    let spec = scenario.spec.clone();
    store.register_definition(&spec).await.unwrap();
    let id = scenarios::SAGA_ID;
    let mut state: SagaState = scenario.initial_state();
    let mut base: Option<StoredSaga> = None;
    for (offset, event) in &scenario.script {
        let now = Scenario::at(*offset);
        if let Event::Operator(cmd) = event {
            let report = ops::act(
                &store,
                id,
                cmd.clone(),
                &ActOptions {
                    at: Some(now),
                    ..ActOptions::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(report.status, SagaStatus::Compensating);
            base = store.load(id).await.unwrap();
            state = base.clone().unwrap().state;
            continue;
        }
        let inputs = Inputs {
            now,
            delays: &mut ExactDelays,
        };
        let Ok(transition) = decide(&state, &spec, event.clone(), inputs) else {
            continue;
        };
        if base.is_some() && transition.history.is_empty() {
            continue;
        }
        let outcome = store
            .commit(&[SagaWrite {
                spec: &spec,
                base: base.as_ref(),
                state: &transition.state,
                records: &transition.history,
                start_key: None,
                dispatches: &[],
                now,
            }])
            .await
            .unwrap();
        assert!(matches!(outcome[..], [WriteOutcome::Committed { .. }]));
        base = store.load(id).await.unwrap();
        state = transition.state;
    }
    assert_eq!(state.status, SagaStatus::Compensated);

    let trace = scenarios::run(&scenario);
    let stored = store.history(id).await.unwrap();
    let oracle: Vec<(String, Value, String)> = trace
        .history
        .iter()
        .map(|r| {
            (
                r.kind.as_str().to_string(),
                r.detail.clone(),
                r.actor.to_string(),
            )
        })
        .collect();
    let persisted: Vec<(String, Value, String)> = stored
        .iter()
        .map(|h| (h.kind.to_string(), h.detail.clone(), h.actor.clone()))
        .collect();
    assert_eq!(
        persisted, oracle,
        "{backend:?}: act records what the machine decides"
    );

    let view = ops::history(&store, id).await.unwrap();
    insta::assert_snapshot!("resumed_history_table", render::history_table(&view));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_history_snapshot_on_sqlite() {
    resumed_history(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_history_snapshot_identically_on_postgres() {
    resumed_history(Backend::Postgres).await;
}
/// A compensatable step whose first compensation never answers (it outlives its timeout).
#[derive(Clone, Default)]
struct HangsOnce {
    retryable_failures: Arc<AtomicU32>,
    compensation_calls: Arc<AtomicU32>,
}

impl StepHandler for HangsOnce {
    type Input = Value;
    type Output = Counted;

    async fn execute(&self, _ctx: &StepContext, _input: Value) -> Result<Counted, StepError> {
        let left = self.retryable_failures.load(Ordering::SeqCst);
        if left > 0 {
            self.retryable_failures.store(left - 1, Ordering::SeqCst);
            return Err(StepError::retryable("busy", "try again later"));
        }
        Ok(Counted { n: 1 })
    }
}

impl Compensate for HangsOnce {
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _input: Value,
        _output: Option<Counted>,
    ) -> Result<(), StepError> {
        if self.compensation_calls.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
        }
        Ok(())
    }
}

/// The engine has the saga in memory (backing off) when the operator cancels it from outside;
/// the compensation the cancel dispatched times out without a reply. The timeout is only in the
/// database: the engine must re-read the saga when that timer falls due, not apply the wake to
/// its stale copy (where nothing is due) forever.
#[apply(backends)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_set_by_an_operator_action_fires_in_an_engine_that_had_the_saga_cached(
    backend: Backend,
) {
    let db = TestDb::new(backend).await;
    let first = Steered::default();
    let second = HangsOnce::default();
    second.retryable_failures.store(1, Ordering::SeqCst);
    let saga = Saga::builder("hangs", 1)
        .step(Step::compensatable("first", first.clone()).retry(fast_policy(3)))
        .step(
            Step::compensatable("second", second.clone())
                .retry(hourly_policy())
                .compensation_retry(fast_policy(3))
                .timeout(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
    let engine = launch(&db.url, vec![saga]).await;
    let id = engine.start("hangs", json!({}), None).await.unwrap();
    wait_for_record(engine.store(), id, "retry_scheduled").await;
    let store = operator_store(&db).await;
    ops::act(
        &store,
        id,
        command("bob", "customer withdrew", OperatorAction::Cancel),
        &ActOptions::default(),
    )
    .await
    .unwrap();
    wait_for_status(&store, id, SagaStatus::Compensated).await;
    let history = store.history(id).await.unwrap();
    // Attempt 1 timed out (the outbox sweep may even deliver it after its timeout, and
    // the retry may meet the still hanging handler): the saga moved on by its timers.
    let timed_out = attempts(&history, "attempt_timed_out", "second", "compensate");
    assert_eq!(timed_out.first(), Some(&1), "{backend:?}: {history:#?}");
    assert_eq!(first.compensations.load(Ordering::SeqCst), 1);
    engine.shutdown().await;
}
