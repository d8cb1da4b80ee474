//! The state machine's tests: one snapshot per scenario of `scenarios/`, invariants checked in
//! code over every scenario, and a seeded random walk over several definitions that checks the
//! same invariants (and a few more) after every event.

mod failures;
mod invariants;
mod operator;
mod random_walk;
mod replies;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sagaflow_protocol::backoff::{ExactDelays, RetryDelays};
use sagaflow_protocol::{
    Direction, RetryPolicy, SagaSpec, StepError, StepKind, StepSpec, Timestamp, idempotency_key,
};
use serde_json::{Value, json};

use super::scenarios::{self, SAGA_ID, START, Scenario, Trace};
use super::*;

use invariants::Checker;

// ----- scenarios -----

#[test]
fn scenario_names_are_unique_and_every_snapshot_has_its_scenario() {
    let all = scenarios::all();
    let names: BTreeSet<&str> = all.iter().map(|s| s.name).collect();
    assert_eq!(names.len(), all.len(), "duplicate scenario names");
    for s in &all {
        assert_eq!(s.script.first(), Some(&(0, Event::Start)), "{}", s.name);
        assert!(
            s.script.windows(2).all(|w| w[0].0 <= w[1].0),
            "{}: script not in time order",
            s.name
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/machine/snapshots");
    let prefix = "sagaflow_engine__machine__tests__";
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries {
            let file = entry.unwrap().file_name().into_string().unwrap();
            if let Some(name) = file
                .strip_prefix(prefix)
                .and_then(|f| f.strip_suffix(".snap"))
            {
                assert!(names.contains(name), "orphan snapshot {file}");
            }
        }
    }
}

#[test]
fn scenario_traces_match_their_snapshots() {
    for scenario in scenarios::all() {
        let trace = scenarios::run(&scenario);
        insta::with_settings!({
            description => scenario.description.clone(),
            omit_expression => true,
        }, {
            insta::assert_yaml_snapshot!(scenario.name, trace);
        });
    }
}

#[test]
fn scenarios_end_as_expected_and_are_reproducible() {
    for scenario in scenarios::all() {
        let trace = scenarios::run(&scenario);
        assert_eq!(
            trace.final_state.status, scenario.expected_status,
            "{}",
            scenario.name
        );
        let again = scenarios::run(&scenario);
        assert_eq!(
            serde_json::to_value(&trace).unwrap(),
            serde_json::to_value(&again).unwrap()
        );
        assert_eq!(trace.final_state, again.final_state);
        let flattened: Vec<Record> = trace
            .entries
            .iter()
            .flat_map(|e| e.history.clone())
            .collect();
        assert_eq!(flattened, trace.history, "{}", scenario.name);
        assert_eq!(trace.entries.len(), scenario.script.len());
    }
}

#[test]
fn scenarios_keep_the_invariants() {
    for scenario in scenarios::all() {
        let spec = &scenario.spec;
        let mut state = scenario.initial_state();
        let mut checker = Checker::new(spec, scenario.name);
        for (at_ms, event) in &scenario.script {
            let now = Scenario::at(*at_ms);
            let before = state.clone();
            let result = decide(
                &before,
                spec,
                event.clone(),
                Inputs {
                    now,
                    delays: &mut ExactDelays,
                },
            );
            checker.observe(&before, event, now, &result);
            if let Ok(t) = result {
                state = t.state;
            }
        }
        assert_eq!(state, scenarios::run(&scenario).final_state);
    }
}

fn trace_of(name: &str) -> Trace {
    let scenario = scenarios::all()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name}"));
    scenarios::run(&scenario)
}

/// Names of the steps compensated (by a worker or an operator's skip), in order.
fn compensation_order(trace: &Trace) -> Vec<String> {
    trace
        .history
        .iter()
        .filter(|r| {
            (r.kind == RecordKind::AttemptSucceeded && r.direction == Some(Direction::Compensate))
                || (r.kind == RecordKind::OperatorAction
                    && r.detail["action"] == "skip"
                    && r.detail["direction"] == "compensate")
        })
        .map(|r| r.step.clone().unwrap())
        .collect()
}

fn ignored_reasons(trace: &Trace) -> Vec<String> {
    trace
        .history
        .iter()
        .filter(|r| r.kind == RecordKind::ReplyIgnored)
        .map(|r| r.detail["reason"].as_str().unwrap().to_string())
        .collect()
}

fn stuck_reason(trace: &Trace) -> String {
    trace.final_state.stuck.as_ref().unwrap().reason.clone()
}

fn count(trace: &Trace, kind: RecordKind) -> usize {
    trace.history.iter().filter(|r| r.kind == kind).count()
}
