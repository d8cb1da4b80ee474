//! Row codecs: a saga's state as `sagas` columns and back, and a record or step command as its
//! `saga_history` or `outbox` row.

use sagaflow_protocol::{StepCommand, StepError, Timestamp};
use sea_orm::ActiveValue::Set;
use serde_json::Value;
use uuid::Uuid;

use super::{StoredSaga, history, outbox, saga};
use crate::EngineError;
use crate::machine::{
    Activity, Attempts, Record, SagaState, SagaStatus, StepState, StepStatus, Stuck,
};

/// The `sagas` columns of a state that change as it moves (the input is written once).
pub(super) struct SagaColumns {
    pub status: String,
    pub current_step: Option<String>,
    pub outputs: String,
    pub progress: String,
    pub last_error: Option<String>,
    pub wake_at: Option<i64>,
}

impl SagaColumns {
    pub fn of(state: &SagaState) -> Result<Self, EngineError> {
        let current_step = state
            .current_step()
            .and_then(|(step, _)| state.steps.get(step).map(|_| step))
            .map(|step| step.to_string());
        let last_error = state
            .stuck
            .as_ref()
            .map(|s| s.reason.clone())
            .or_else(|| state.failure.clone());
        Ok(SagaColumns {
            status: state.status.as_str().to_string(),
            current_step,
            outputs: serde_json::to_string(&state.outputs).map_err(Self::corrupt(state))?,
            progress: serde_json::to_string(&ProgressDocument::of(state))
                .map_err(Self::corrupt(state))?,
            last_error,
            wake_at: state.wake_at().map(Timestamp::as_millis),
        })
    }

    pub fn corrupt(state: &SagaState) -> impl Fn(serde_json::Error) -> EngineError + '_ {
        |e| EngineError::Corrupt {
            saga_id: state.saga_id.to_string(),
            detail: format!("cannot serialize state: {e}"),
        }
    }
}

/// The `progress` column: the state without its input and outputs, which have columns of their
/// own. Serialized from borrowed fields, not through a JSON tree of the whole state, because it
/// runs for every saga of every batch (docs/architecture.md §7.1). Readers parse the document,
/// so its key order is free.
#[derive(serde::Serialize)]
struct ProgressDocument<'a> {
    activity: &'a Activity,
    compensation_queue: &'a [usize],
    created_at: Timestamp,
    deadline: Option<Timestamp>,
    failure: &'a Option<String>,
    name: &'a str,
    past_pivot: bool,
    saga_id: Uuid,
    status: SagaStatus,
    #[serde(serialize_with = "compact_steps")]
    steps: &'a [StepState],
    stuck: &'a Option<Stuck>,
    version: u32,
}

/// A step of the progress document without what still holds its starting value: counts of a
/// direction never attempted, no error. The document is rewritten at every transition, and
/// most of a long saga's steps are pending (or done in one direction) most of the time, so
/// writing them whole made a transition's cost grow with the saga's length. They read back
/// whole: those fields default when missing (`StepState`, `Attempts`).
#[derive(serde::Serialize)]
struct CompactStep<'a> {
    status: StepStatus,
    #[serde(skip_serializing_if = "never_attempted")]
    forward: &'a Attempts,
    #[serde(skip_serializing_if = "never_attempted")]
    compensation: &'a Attempts,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: &'a Option<StepError>,
}

fn never_attempted(attempts: &&Attempts) -> bool {
    **attempts == Attempts::default()
}

fn compact_steps<S: serde::Serializer>(steps: &&[StepState], out: S) -> Result<S::Ok, S::Error> {
    out.collect_seq(steps.iter().map(|step| CompactStep {
        status: step.status,
        forward: &step.forward,
        compensation: &step.compensation,
        last_error: &step.last_error,
    }))
}

impl<'a> ProgressDocument<'a> {
    fn of(state: &'a SagaState) -> Self {
        // Named exhaustively: a field added to the state fails to compile here until the
        // document says whether it holds it.
        let SagaState {
            saga_id,
            name,
            version,
            status,
            input: _,
            outputs: _,
            steps,
            activity,
            compensation_queue,
            past_pivot,
            deadline,
            failure,
            stuck,
            created_at,
        } = state;
        ProgressDocument {
            activity,
            compensation_queue,
            created_at: *created_at,
            deadline: *deadline,
            failure,
            name,
            past_pivot: *past_pivot,
            saga_id: *saga_id,
            status: *status,
            steps,
            stuck,
            version: *version,
        }
    }
}

pub(super) fn stored_from_row(row: saga::Model) -> Result<StoredSaga, EngineError> {
    let corrupt = |detail: String| EngineError::Corrupt {
        saga_id: row.id.clone(),
        detail,
    };
    let mut progress: Value =
        serde_json::from_str(&row.progress).map_err(|e| corrupt(format!("progress: {e}")))?;
    let input: Value =
        serde_json::from_str(&row.input).map_err(|e| corrupt(format!("input: {e}")))?;
    let outputs: Value =
        serde_json::from_str(&row.outputs).map_err(|e| corrupt(format!("outputs: {e}")))?;
    let map = progress
        .as_object_mut()
        .ok_or_else(|| corrupt("progress is not a JSON object".into()))?;
    map.insert("input".into(), input);
    map.insert("outputs".into(), outputs);
    let state: SagaState =
        serde_json::from_value(progress).map_err(|e| corrupt(format!("state: {e}")))?;
    Ok(StoredSaga {
        state,
        row_version: row.row_version,
        history_seq: row.history_seq,
    })
}

pub(super) fn outbox_row(
    command: &StepCommand,
    now: i64,
) -> Result<outbox::ActiveModel, EngineError> {
    let payload = serde_json::to_string(command).map_err(|e| EngineError::Corrupt {
        saga_id: command.saga_id.to_string(),
        detail: format!("cannot serialize command {}: {e}", command.command_id),
    })?;
    Ok(outbox::ActiveModel {
        id: Set(command.command_id.clone()),
        saga_id: Set(command.saga_id.to_string()),
        payload: Set(payload),
        created_at: Set(now),
    })
}

/// A history row; `writer` is the node and epoch it is written under (`None` for an operator's
/// write from the CLI).
pub(super) fn history_row(
    saga_id: &str,
    seq: i64,
    at: i64,
    record: &Record,
    writer: Option<(&str, u64)>,
) -> history::ActiveModel {
    history::ActiveModel {
        saga_id: Set(saga_id.to_string()),
        seq: Set(seq),
        at: Set(at),
        kind: Set(record.kind.as_str().to_string()),
        step_name: Set(record.step.clone()),
        direction: Set(record.direction.map(|d| d.as_str().to_string())),
        attempt: Set(record.attempt.map(|a| a as i32)),
        payload: Set((!record.detail.is_null()).then(|| record.detail.to_string())),
        error: Set(record.error.clone()),
        actor: Set(record.actor.to_string()),
        node: Set(writer.map(|(node, _)| node.to_string())),
        epoch: Set(writer.map(|(_, epoch)| epoch as i64)),
    }
}

/// The value of a field that was set.
pub(super) fn active<T: Into<sea_orm::Value>>(value: &sea_orm::ActiveValue<T>) -> Option<&T> {
    match value {
        sea_orm::ActiveValue::Set(v) | sea_orm::ActiveValue::Unchanged(v) => Some(v),
        sea_orm::ActiveValue::NotSet => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The progress document is the state minus input and outputs (the document written through
    /// a JSON tree before), less the step fields that hold their starting values, and it reads
    /// back into the same state.
    #[test]
    fn progress_document_is_the_state_without_input_and_outputs() {
        let untouched = serde_json::to_value(Attempts::default()).unwrap();
        let mut compacted = 0;
        for scenario in crate::machine::scenarios::all() {
            let state = crate::machine::scenarios::run(&scenario).final_state;
            let mut tree = serde_json::to_value(&state).unwrap();
            let map = tree.as_object_mut().unwrap();
            map.remove("input");
            map.remove("outputs");
            for step in map["steps"].as_array_mut().unwrap() {
                let step = step.as_object_mut().unwrap();
                let before = step.len();
                step.retain(|field, value| match field.as_str() {
                    "forward" | "compensation" => *value != untouched,
                    "last_error" => !value.is_null(),
                    _ => true,
                });
                compacted += before - step.len();
            }
            let columns = SagaColumns::of(&state).unwrap();
            let document: Value = serde_json::from_str(&columns.progress).unwrap();
            assert_eq!(document, tree, "{}", scenario.name);
            let row = saga::Model {
                id: state.saga_id.to_string(),
                name: state.name.clone(),
                definition_version: state.version as i32,
                status: columns.status,
                current_step: columns.current_step,
                start_key: None,
                input: serde_json::to_string(&state.input).unwrap(),
                outputs: columns.outputs,
                progress: columns.progress,
                last_error: columns.last_error,
                wake_at: columns.wake_at,
                row_version: 1,
                history_seq: 0,
                created_at: state.created_at.as_millis(),
                updated_at: state.created_at.as_millis(),
                partition_id: 0,
            };
            assert_eq!(
                stored_from_row(row).unwrap().state,
                state,
                "{}",
                scenario.name
            );
        }
        assert!(compacted > 0, "no scenario left a field out");
    }
}
