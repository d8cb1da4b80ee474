//! Every scenario of the state machine, replayed end to end through the real store on SQLite
//! and on PostgreSQL, exactly as the engine's shell drives it: load, `decide`, conditional
//! commit. What the store persisted (state, denormalized columns, history, attempt rows) must
//! agree with the pure run of the same script ([`scenarios::run`]).
//!
//! All scenarios share one database per backend: each gets a saga id of its own in place of
//! [`SAGA_ID`], and the pure run's state and records are compared with that id substituted (it
//! appears in idempotency keys and refusal messages).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use sagaflow_engine::machine::scenarios::{self, SAGA_ID, Scenario, summarize};
use sagaflow_engine::machine::{Activity, Event, Inputs, Record, RecordKind, SagaState, decide};
use sagaflow_engine::store::{HistoryEntry, SagaWrite, Store, StoredSaga, WriteOutcome};
use sagaflow_engine::store::{attempt, saga};
use sagaflow_protocol::backoff::ExactDelays;
use sagaflow_sdk::Timestamp;
use sagaflow_tests::{Backend, TestDb};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_through_the_sqlite_store() {
    every_scenario_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_through_the_postgres_store() {
    every_scenario_on(Backend::Postgres).await;
}

async fn every_scenario_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.unwrap();
    let all = scenarios::all();
    assert!(!all.is_empty());
    let mut failures = Vec::new();
    for (n, scenario) in all.iter().enumerate() {
        // Distinct from SAGA_ID (1) and from each other.
        let id = Uuid::from_u128(0x5ca1_0000 + n as u128);
        let problems = replay(&store, scenario, id).await;
        if !problems.is_empty() {
            failures.push(format!(
                "- {} (saga {id}):\n    {}",
                scenario.name,
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{backend:?}: {} of {} scenarios disagree between the store and the pure machine:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

/// Collects disagreements instead of stopping at the first.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn eq<T: PartialEq + Debug>(&mut self, what: impl FnOnce() -> String, got: T, want: T) {
        if got != want {
            self.0
                .push(format!("{}: got {got:?}, want {want:?}", what()));
        }
    }

    fn add(&mut self, problem: String) {
        self.0.push(problem);
    }
}

fn remap_str(text: &str, id: Uuid) -> String {
    text.replace(&SAGA_ID.to_string(), &id.to_string())
}

fn remap_value(value: &Value, id: Uuid) -> Value {
    serde_json::from_str(&remap_str(&value.to_string(), id)).expect("remapped JSON")
}

fn remap_record(record: &Record, id: Uuid) -> Record {
    Record {
        detail: remap_value(&record.detail, id),
        error: record.error.as_deref().map(|e| remap_str(e, id)),
        ..record.clone()
    }
}

fn remap_state(state: &SagaState, id: Uuid) -> SagaState {
    let text = serde_json::to_string(state).expect("state serializes");
    serde_json::from_str(&remap_str(&text, id)).expect("remapped state")
}

/// An attempt row as the history says it must be.
#[derive(Debug, Clone, PartialEq)]
struct ExpectedAttempt {
    step_name: String,
    idempotency_key: String,
    status: &'static str,
    dispatched_at: i64,
    deadline: Option<i64>,
    finished_at: Option<i64>,
    error: Option<String>,
}

/// (step index, direction, attempt): the attempt table's key.
type AttemptKey = (i32, String, i32);

fn attempt_key(scenario: &Scenario, record: &Record) -> Option<AttemptKey> {
    let step = scenario.spec.step_index(record.step.as_deref()?)?;
    Some((
        step as i32,
        record.direction?.as_str().to_string(),
        record.attempt? as i32,
    ))
}

/// Replays `scenario` through `store` as saga `id`; returns every disagreement found.
async fn replay(store: &Store, scenario: &Scenario, id: Uuid) -> Vec<String> {
    let mut p = Problems::default();
    let spec = &scenario.spec;
    let trace = scenarios::run(scenario);
    if let Err(e) = store.register_definition(spec).await {
        p.add(format!("registering the definition failed: {e}"));
        return p.0;
    }
    let mut initial = scenario.initial_state();
    p.eq(|| "initial saga id".into(), initial.saga_id, SAGA_ID);
    initial.saga_id = id;
    p.eq(
        || "trace entries".into(),
        trace.entries.len(),
        scenario.script.len(),
    );

    // The records the store must hold, each with the time of the event that produced it.
    let mut expected_history: Vec<(Timestamp, Record)> = Vec::new();
    let mut expected_attempts: BTreeMap<AttemptKey, ExpectedAttempt> = BTreeMap::new();
    let mut stored: Option<StoredSaga> = None;
    let mut applied = 0_i64;

    for (i, ((at_ms, event), entry)) in scenario.script.iter().zip(&trace.entries).enumerate() {
        let now = Scenario::at(*at_ms);
        let label = |what: &str| format!("event #{i} ({at_ms} ms, {event:?}): {what}");
        let base = if i == 0 {
            if *event != Event::Start {
                p.add(label("the first event is not Start"));
                return p.0;
            }
            None
        } else {
            match store.load(id).await {
                Ok(Some(loaded)) => {
                    if let Some(previous) = &stored {
                        p.eq(
                            || label("state as loaded before the event"),
                            &loaded.state,
                            &previous.state,
                        );
                    }
                    Some(loaded)
                }
                Ok(None) => {
                    p.add(label("the saga is not in the store"));
                    return p.0;
                }
                Err(e) => {
                    p.add(label(&format!("load failed: {e}")));
                    return p.0;
                }
            }
        };
        let before = base.as_ref().map_or(&initial, |b| &b.state);
        let decided = decide(
            before,
            spec,
            event.clone(),
            Inputs {
                now,
                delays: &mut ExactDelays,
            },
        );
        let transition = match decided {
            Err(refusal) => {
                p.eq(
                    || label("refusal"),
                    Some(refusal.to_string()),
                    entry.refused.as_deref().map(|r| remap_str(r, id)),
                );
                let Some(base) = &base else {
                    p.add(label("Start refused for a new saga"));
                    return p.0;
                };
                // A refused event writes nothing: the saga is exactly as it was.
                match store.load(id).await {
                    Ok(Some(after)) => {
                        p.eq(
                            || label("row_version after a refusal"),
                            after.row_version,
                            base.row_version,
                        );
                        p.eq(
                            || label("history_seq after a refusal"),
                            after.history_seq,
                            base.history_seq,
                        );
                        p.eq(|| label("state after a refusal"), &after.state, &base.state);
                    }
                    other => p.add(label(&format!("reload after a refusal: {other:?}"))),
                }
                continue;
            }
            Ok(transition) => transition,
        };
        p.eq(|| label("refusal"), None, entry.refused.clone());
        let want_records: Vec<Record> = entry.history.iter().map(|r| remap_record(r, id)).collect();
        p.eq(
            || label("records decided from the stored state"),
            &transition.history,
            &want_records,
        );

        let outcome = store
            .commit(&[SagaWrite {
                spec,
                base: base.as_ref(),
                state: &transition.state,
                records: &transition.history,
                start_key: None,
                dispatches: &[],
                now,
            }])
            .await;
        let (base_version, base_seq) = base
            .as_ref()
            .map_or((0, 0), |b| (b.row_version, b.history_seq));
        let records = transition.history.len() as i64;
        match outcome.as_deref() {
            Ok(
                [
                    WriteOutcome::Committed {
                        row_version,
                        history_seq,
                    },
                ],
            ) => {
                p.eq(
                    || label("committed row_version"),
                    *row_version,
                    base_version + 1,
                );
                p.eq(
                    || label("committed history_seq"),
                    *history_seq,
                    base_seq + records,
                );
            }
            other => {
                p.add(label(&format!("commit: {other:?}")));
                return p.0;
            }
        }
        applied += 1;

        // Read back: the state round-trips, and the columns derived from it agree.
        let reloaded = match store.load(id).await {
            Ok(Some(reloaded)) => reloaded,
            other => {
                p.add(label(&format!("reload after commit: {other:?}")));
                return p.0;
            }
        };
        p.eq(
            || label("state as reloaded"),
            &reloaded.state,
            &transition.state,
        );
        p.eq(
            || label("state summary vs the pure trace"),
            &summarize(&reloaded.state, spec),
            &entry.state,
        );
        p.eq(|| label("row_version"), reloaded.row_version, applied);
        p.eq(
            || label("history_seq"),
            reloaded.history_seq,
            base_seq + records,
        );
        match saga::Entity::find_by_id(id.to_string())
            .one(store.connection())
            .await
        {
            Ok(Some(row)) => {
                p.eq(
                    || label("sagas.status"),
                    row.status.as_str(),
                    transition.state.status.as_str(),
                );
                p.eq(
                    || label("sagas.wake_at"),
                    row.wake_at,
                    transition.state.wake_at().map(Timestamp::as_millis),
                );
                p.eq(|| label("sagas.row_version"), row.row_version, applied);
            }
            other => p.add(label(&format!("sagas row: {other:?}"))),
        }

        // What the attempt rows must say after this event.
        for record in &transition.history {
            let Some(key) = attempt_key(scenario, record) else {
                continue;
            };
            let status = match record.kind {
                RecordKind::AttemptDispatched => {
                    let row = ExpectedAttempt {
                        step_name: record.step.clone().unwrap_or_default(),
                        idempotency_key: record.detail["idempotency_key"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        status: "dispatched",
                        dispatched_at: now.as_millis(),
                        deadline: record.detail["deadline"].as_i64(),
                        finished_at: None,
                        error: None,
                    };
                    if expected_attempts.insert(key.clone(), row).is_some() {
                        p.add(label(&format!("attempt {key:?} dispatched twice")));
                    }
                    continue;
                }
                RecordKind::AttemptSucceeded => "succeeded",
                RecordKind::AttemptFailed => "failed",
                RecordKind::AttemptTimedOut => "timed_out",
                _ => continue,
            };
            match expected_attempts.get_mut(&key) {
                Some(row) if row.status == "dispatched" => {
                    row.status = status;
                    row.finished_at = Some(now.as_millis());
                    row.error = record.error.clone();
                }
                Some(row) => p.add(label(&format!(
                    "attempt {key:?} ended twice ({} then {status})",
                    row.status
                ))),
                None => p.add(label(&format!(
                    "attempt {key:?} ended ({status}) but was never dispatched"
                ))),
            }
        }
        // An attempt the saga walked away from (it was in flight, is no longer, and got no
        // outcome record) must be marked abandoned.
        if let Activity::InFlight {
            step,
            direction,
            attempt,
            ..
        } = before.activity
        {
            let still_in_flight = transition.state.activity == before.activity;
            let key = (step as i32, direction.as_str().to_string(), attempt as i32);
            if let Some(row) = expected_attempts.get_mut(&key)
                && row.status == "dispatched"
                && !still_in_flight
            {
                row.status = "abandoned";
                row.finished_at = Some(now.as_millis());
            }
        }
        expected_history.extend(transition.history.iter().map(|r| (now, r.clone())));
        stored = Some(reloaded);
    }

    // The final state, as persisted, is the pure run's.
    match store.load(id).await {
        Ok(Some(last)) => {
            p.eq(
                || "final state vs the pure trace".into(),
                &last.state,
                &remap_state(&trace.final_state, id),
            );
            p.eq(
                || "final status".into(),
                last.state.status,
                scenario.expected_status,
            );
        }
        other => p.add(format!("final load: {other:?}")),
    }

    // The persisted history is the pure run's, record for record, with seq and time.
    let want_flat: Vec<Record> = trace.history.iter().map(|r| remap_record(r, id)).collect();
    let got_flat: Vec<Record> = expected_history.iter().map(|(_, r)| r.clone()).collect();
    p.eq(
        || "records applied vs the pure trace's history".into(),
        &got_flat,
        &want_flat,
    );
    match store.history(id).await {
        Ok(history) => check_history(&mut p, &history, &expected_history),
        Err(e) => p.add(format!("reading the history failed: {e}")),
    }

    // The attempt table agrees with the history.
    match attempt::Entity::find()
        .filter(attempt::Column::SagaId.eq(id.to_string()))
        .order_by_asc(attempt::Column::Step)
        .order_by_asc(attempt::Column::Direction)
        .order_by_asc(attempt::Column::Attempt)
        .all(store.connection())
        .await
    {
        Ok(rows) => {
            let got: BTreeMap<AttemptKey, ExpectedAttempt> = rows
                .into_iter()
                .map(|row| {
                    let key = (row.step, row.direction.clone(), row.attempt);
                    let status = match row.status.as_str() {
                        "dispatched" => "dispatched",
                        "succeeded" => "succeeded",
                        "failed" => "failed",
                        "timed_out" => "timed_out",
                        "abandoned" => "abandoned",
                        _ => "UNKNOWN STATUS",
                    };
                    let attempt = ExpectedAttempt {
                        step_name: row.step_name,
                        idempotency_key: row.idempotency_key,
                        status,
                        dispatched_at: row.dispatched_at,
                        deadline: row.deadline,
                        finished_at: row.finished_at,
                        error: row.error,
                    };
                    (key, attempt)
                })
                .collect();
            let keys: BTreeSet<&AttemptKey> = got.keys().chain(expected_attempts.keys()).collect();
            for key in keys {
                p.eq(
                    || format!("step_attempts row {key:?}"),
                    got.get(key),
                    expected_attempts.get(key),
                );
            }
            // At most the attempt in flight at the end is still open.
            let open: Vec<&AttemptKey> = got
                .iter()
                .filter(|(_, a)| a.status == "dispatched")
                .map(|(k, _)| k)
                .collect();
            let in_flight: Vec<AttemptKey> = match &trace.final_state.activity {
                Activity::InFlight {
                    step,
                    direction,
                    attempt,
                    ..
                } => vec![(
                    *step as i32,
                    direction.as_str().to_string(),
                    *attempt as i32,
                )],
                _ => Vec::new(),
            };
            p.eq(
                || "attempt rows still dispatched vs the attempt in flight".into(),
                open,
                in_flight.iter().collect(),
            );
        }
        Err(e) => p.add(format!("reading step_attempts failed: {e}")),
    }
    p.0
}

fn check_history(p: &mut Problems, got: &[HistoryEntry], want: &[(Timestamp, Record)]) {
    p.eq(|| "history length".into(), got.len(), want.len());
    for (n, (entry, (at, record))) in got.iter().zip(want).enumerate() {
        let seq = n as i64 + 1;
        let here = |what: &str| format!("history #{seq} ({}): {what}", record.kind.as_str());
        p.eq(|| here("seq"), entry.seq, seq);
        p.eq(|| here("at"), entry.at, *at);
        p.eq(|| here("kind"), entry.kind.as_str(), record.kind.as_str());
        p.eq(
            || here("step"),
            entry.step.as_deref(),
            record.step.as_deref(),
        );
        p.eq(
            || here("direction"),
            entry.direction.map(|d| d.as_str()),
            record.direction.map(|d| d.as_str()),
        );
        p.eq(|| here("attempt"), entry.attempt, record.attempt);
        p.eq(
            || here("error"),
            entry.error.as_deref(),
            record.error.as_deref(),
        );
        p.eq(
            || here("actor"),
            entry.actor.clone(),
            record.actor.to_string(),
        );
        p.eq(|| here("detail"), &entry.detail, &record.detail);
    }
}
