//! The one shape of a history row as read back: the store's [`HistoryEntry`], which the
//! timeline (`sagaflow history`) and the audit trail (`sagaflow audit`) extend with fields of
//! their own, flattened into the same JSON object.

use sagaflow_protocol::{Direction, Timestamp};
use serde::Serialize;
use serde_json::Value;

use super::history;
use crate::EngineError;
use crate::machine::RecordKind;

/// A history row as read back, with `X`'s fields beside its own.
///
/// `X` is `()` for the store's plain rows, [`Elapsed`] on a saga's timeline and [`OfSaga`] in
/// the audit trail. Its fields come right after `at` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry<X = ()> {
    /// Position in the saga's history, from 1, without gaps.
    pub seq: i64,
    /// When.
    #[serde(serialize_with = "crate::ops::time::rfc3339::serialize")]
    pub at: Timestamp,
    /// What a reader of this row adds to it.
    #[serde(flatten)]
    pub extra: X,
    /// The record kind (`attempt_failed`, `operator_action`, ...).
    pub kind: RecordKind,
    /// The step, if any.
    pub step: Option<String>,
    /// The direction, if any.
    pub direction: Option<Direction>,
    /// The attempt, if any.
    pub attempt: Option<u32>,
    /// Who: `engine`, `worker:ID` or `operator:NAME`.
    pub actor: String,
    /// The error, if any.
    pub error: Option<String>,
    /// Details: an output, a retry time, an operator's reason.
    pub detail: Value,
    /// The engine node that wrote the record; `None` for an operator's action from the CLI
    /// (written unfenced, conditional on the saga's version only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The fencing epoch of the saga's partition the node wrote under; `None` when `node` is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// On a timeline: how long after the saga's first record a row was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Elapsed {
    /// Milliseconds since the saga's first record.
    pub elapsed_ms: i64,
}

/// In the audit trail: the saga a row belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OfSaga {
    /// The saga.
    pub saga_id: uuid::Uuid,
    /// Its definition name.
    pub saga_name: String,
    /// Its pinned definition version.
    pub saga_version: u32,
}

impl<X> HistoryEntry<X> {
    /// The same row with `extra` in place of what it carried.
    pub fn with<Y>(self, extra: Y) -> HistoryEntry<Y> {
        HistoryEntry {
            seq: self.seq,
            at: self.at,
            extra,
            kind: self.kind,
            step: self.step,
            direction: self.direction,
            attempt: self.attempt,
            actor: self.actor,
            error: self.error,
            detail: self.detail,
            node: self.node,
            epoch: self.epoch,
        }
    }
}

/// The columns of a `saga_history` row, however it was read (an entity or a joined query).
pub(crate) struct HistoryColumns {
    pub saga_id: String,
    pub seq: i64,
    pub at: i64,
    pub kind: String,
    pub step_name: Option<String>,
    pub direction: Option<String>,
    pub attempt: Option<i32>,
    pub payload: Option<String>,
    pub error: Option<String>,
    pub actor: String,
    pub node: Option<String>,
    pub epoch: Option<i64>,
}

impl From<history::Model> for HistoryColumns {
    fn from(row: history::Model) -> Self {
        HistoryColumns {
            saga_id: row.saga_id,
            seq: row.seq,
            at: row.at,
            kind: row.kind,
            step_name: row.step_name,
            direction: row.direction,
            attempt: row.attempt,
            payload: row.payload,
            error: row.error,
            actor: row.actor,
            node: row.node,
            epoch: row.epoch,
        }
    }
}

impl HistoryColumns {
    /// The typed row; a value no version of the engine writes is [`EngineError::Corrupt`],
    /// naming the saga and the row.
    pub(crate) fn decode(self) -> Result<HistoryEntry, EngineError> {
        let seq = self.seq;
        let corrupt = |detail: String| EngineError::Corrupt {
            saga_id: self.saga_id.clone(),
            detail: format!("history #{seq} {detail}"),
        };
        let kind = self
            .kind
            .parse::<RecordKind>()
            .map_err(|_| corrupt(format!("kind: unknown record kind `{}`", self.kind)))?;
        let direction = self
            .direction
            .as_deref()
            .map(|text| {
                text.parse::<Direction>()
                    .map_err(|_| corrupt(format!("direction: unknown direction `{text}`")))
            })
            .transpose()?;
        let attempt = self
            .attempt
            .map(|a| u32::try_from(a).map_err(|e| corrupt(format!("attempt {a}: {e}"))))
            .transpose()?;
        let detail = match &self.payload {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| corrupt(format!("payload: {e}")))?
            }
            None => Value::Null,
        };
        Ok(HistoryEntry {
            seq,
            at: Timestamp(self.at),
            extra: (),
            kind,
            step: self.step_name,
            direction,
            attempt,
            actor: self.actor,
            error: self.error,
            detail,
            node: self.node,
            epoch: self.epoch.map(|e| e.max(0) as u64),
        })
    }
}
