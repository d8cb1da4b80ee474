//! Inspecting one saga: [`show`] (where it is, step by step) and [`history`] (everything that
//! happened to it, in order).

use sagaflow_protocol::{Direction, SagaSpec, StepKind, Timestamp};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::EngineError;
use crate::machine::{Activity, SagaState, SagaStatus, StepStatus};
use crate::store::{AttemptStatus, Elapsed, HistoryEntry, Store, attempt, definition, saga};

/// Everything about one saga an operator needs to decide what to do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaDetail {
    /// The saga id.
    pub id: Uuid,
    /// The definition name.
    pub name: String,
    /// The definition version the saga is pinned to.
    pub version: u32,
    /// Where it is.
    pub status: SagaStatus,
    /// The start key it was started with, if any.
    pub start_key: Option<String>,
    /// When it was created.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub created_at: Timestamp,
    /// When it last changed.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub updated_at: Timestamp,
    /// Its row version (one per committed transition).
    pub row_version: i64,
    /// Its partition, and the engine node that owns the partition now, if any: the one node
    /// that drives the saga.
    pub ownership: OwnershipView,
    /// How many history records it has.
    pub history_len: i64,
    /// What it is doing now.
    pub activity: ActivityView,
    /// When it wakes by itself next: a retry, an attempt timeout or its deadline.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub next_wake: Option<Timestamp>,
    /// Its overall deadline, if the definition has one.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub deadline: Option<Timestamp>,
    /// Whether the pivot succeeded (from then on it only moves forward).
    pub past_pivot: bool,
    /// Why compensation began, if it did.
    pub failure: Option<String>,
    /// Why it is stuck, while it is.
    pub stuck: Option<StuckView>,
    /// Steps still to compensate, next first.
    pub compensation_queue: Vec<String>,
    /// The start input.
    pub input: Value,
    /// Every step of the pinned definition, in order.
    pub steps: Vec<StepView>,
}

/// Who drives a saga: its partition's lease, as the database has it now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnershipView {
    /// The saga's partition.
    pub partition: u32,
    /// The node holding the partition's lease, while the lease is live.
    pub owner: Option<String>,
    /// The partition's current fencing epoch (0 before any node took it).
    pub epoch: u64,
    /// When the lease runs out (or ran out) unless renewed, by the database's clock.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub lease_expires_at: Option<Timestamp>,
    /// The last holder, when the lease lapsed or was released and nobody took it since.
    pub last_owner: Option<String>,
}

impl OwnershipView {
    async fn of(store: &Store, id: Uuid) -> Result<Self, EngineError> {
        let partition = store.partition_of(id);
        let lease = store.partition_lease(partition).await?;
        // Every partition has a row from the start; one no node ever took has epoch 0.
        Ok(
            match lease.filter(|lease| lease.epoch > 0 || lease.owner.is_some()) {
                None => OwnershipView {
                    partition,
                    owner: None,
                    epoch: 0,
                    lease_expires_at: None,
                    last_owner: None,
                },
                Some(lease) => OwnershipView {
                    partition,
                    owner: lease.owner.clone().filter(|_| lease.live),
                    epoch: lease.epoch,
                    lease_expires_at: Some(Timestamp(lease.expires_at)),
                    last_owner: lease.owner.filter(|_| !lease.live),
                },
            },
        )
    }
}

/// What a saga is doing now.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ActivityView {
    /// Recorded, not started.
    NotStarted,
    /// Completed or compensated: nothing more will happen.
    Finished,
    /// Stuck at a step: waiting for an operator.
    WaitingForOperator {
        /// The step.
        step: String,
        /// Forward or compensation.
        direction: Direction,
    },
    /// An attempt was sent and its reply is awaited.
    InFlight {
        /// The step.
        step: String,
        /// Forward or compensation.
        direction: Direction,
        /// The attempt number.
        attempt: u32,
        /// The attempt's idempotency key.
        idempotency_key: Option<String>,
        /// When it was sent.
        #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
        since: Option<Timestamp>,
        /// When it times out, if the step has a timeout.
        #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
        deadline: Option<Timestamp>,
    },
    /// A failed attempt will be retried.
    BackingOff {
        /// The step.
        step: String,
        /// Forward or compensation.
        direction: Direction,
        /// The attempt number that will be sent.
        attempt: u32,
        /// When.
        #[serde(serialize_with = "super::time::rfc3339::serialize")]
        retry_at: Timestamp,
    },
    /// Waiting on nothing (not expected for an active saga).
    Idle,
}

/// Why a saga is stuck.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckView {
    /// The step that cannot proceed.
    pub step: String,
    /// In which direction.
    pub direction: Direction,
    /// What happened.
    pub reason: String,
}

/// One step of a saga.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepView {
    /// Its position, from 0.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Compensatable, pivot or retriable.
    pub kind: StepKind,
    /// Where it is.
    pub status: StepStatus,
    /// Forward attempts dispatched.
    pub forward_attempts: u32,
    /// Compensation attempts dispatched.
    pub compensation_attempts: u32,
    /// The latest error of either direction.
    pub last_error: Option<String>,
    /// Its output, once it succeeded (or was skipped with one).
    pub output: Option<Value>,
    /// The idempotency keys its attempts carried (one per direction: stable across retries).
    pub idempotency_keys: Vec<String>,
    /// Every attempt, forward first, in order.
    pub attempts: Vec<AttemptView>,
    /// The JSON Schema of what the step reads from the saga input, as its worker registered it
    /// with the pinned definition; `None` (and left out of the JSON) when it sent none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// The JSON Schema of the step's output, as its worker registered it; `skip-step --output`
    /// is checked against it. `None` (and left out of the JSON) when it sent none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
}

/// One dispatched attempt, from `step_attempts`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptView {
    /// Forward or compensation.
    pub direction: String,
    /// The attempt number.
    pub attempt: i32,
    /// How it stands: in flight (`dispatched`) or how it ended.
    pub status: AttemptStatus,
    /// The key the worker received.
    pub idempotency_key: String,
    /// When it was sent.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub dispatched_at: Timestamp,
    /// When it would time out.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub deadline: Option<Timestamp>,
    /// When it ended.
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub finished_at: Option<Timestamp>,
    /// Its error, if it failed.
    pub error: Option<String>,
}

/// A saga's row and state read at the same version.
struct Loaded {
    row: saga::Model,
    state: SagaState,
}

/// Reads the row (for the columns the state lacks) and the state; a transition committed in
/// between is noticed by the row version and the pair is read again.
async fn load(store: &Store, id: Uuid) -> Result<Loaded, EngineError> {
    for _ in 0..5 {
        let row = saga::Entity::find_by_id(id.to_string())
            .one(store.connection())
            .await
            .map_err(EngineError::db("loading a saga"))?
            .ok_or(EngineError::UnknownSaga(id))?;
        let stored = store.load(id).await?.ok_or(EngineError::UnknownSaga(id))?;
        if stored.row_version == row.row_version {
            return Ok(Loaded {
                row,
                state: stored.state,
            });
        }
    }
    Err(EngineError::Conflict(id))
}

async fn pinned_definition(
    store: &Store,
    name: &str,
    version: u32,
    id: Uuid,
) -> Result<SagaSpec, EngineError> {
    let row = definition::Entity::find_by_id((name.to_string(), version as i32))
        .one(store.connection())
        .await
        .map_err(EngineError::db("reading a saga definition"))?
        .ok_or_else(|| EngineError::Corrupt {
            saga_id: id.to_string(),
            detail: format!("its definition `{name}` version {version} is not registered"),
        })?;
    serde_json::from_str(&row.spec).map_err(|e| EngineError::CorruptDefinition {
        name: name.to_string(),
        version: i64::from(version),
        detail: e.to_string(),
    })
}

/// Everything about saga `id`: status, pinned version, each step with its attempts, errors,
/// output and idempotency keys, what it is doing now and when it wakes next.
pub async fn show(store: &Store, id: Uuid) -> Result<SagaDetail, EngineError> {
    let Loaded { row, state } = load(store, id).await?;
    let spec = pinned_definition(store, &state.name, state.version, id).await?;
    let attempts = attempt::Entity::find()
        .filter(attempt::Column::SagaId.eq(id.to_string()))
        .order_by_asc(attempt::Column::Step)
        // `compensate` sorts before `forward`; the order is fixed below.
        .order_by_asc(attempt::Column::Direction)
        .order_by_asc(attempt::Column::Attempt)
        .all(store.connection())
        .await
        .map_err(EngineError::db("reading a saga's attempts"))?
        .into_iter()
        .map(|a| match AttemptStatus::parse(&a.status) {
            Some(status) => Ok((status, a)),
            None => Err(EngineError::Corrupt {
                saga_id: id.to_string(),
                detail: format!(
                    "attempt {} of step {} ({}) has an unknown status `{}`",
                    a.attempt, a.step, a.direction, a.status
                ),
            }),
        })
        .collect::<Result<Vec<(AttemptStatus, attempt::Model)>, EngineError>>()?;
    let step_name = |index: usize| {
        spec.steps
            .get(index)
            .map(|s| s.name.clone())
            .unwrap_or_else(|| format!("#{index}"))
    };

    let steps = spec
        .steps
        .iter()
        .enumerate()
        .map(|(index, step_spec)| {
            let progress = state.steps.get(index);
            let mut mine: Vec<(AttemptStatus, &attempt::Model)> = attempts
                .iter()
                .filter(|(_, a)| a.step == index as i32)
                .map(|(status, a)| (*status, a))
                .collect();
            mine.sort_by_key(|(_, a)| (a.direction != Direction::Forward.as_str(), a.attempt));
            let mut keys: Vec<String> = Vec::new();
            for (_, a) in &mine {
                if !keys.contains(&a.idempotency_key) {
                    keys.push(a.idempotency_key.clone());
                }
            }
            StepView {
                index,
                name: step_spec.name.clone(),
                kind: step_spec.kind,
                status: progress.map_or(StepStatus::Pending, |p| p.status),
                forward_attempts: progress.map_or(0, |p| p.forward.made),
                compensation_attempts: progress.map_or(0, |p| p.compensation.made),
                last_error: progress
                    .and_then(|p| p.last_error.as_ref())
                    .map(ToString::to_string),
                output: state.outputs.get(&step_spec.name).cloned(),
                idempotency_keys: keys,
                attempts: mine
                    .into_iter()
                    .map(|(status, a)| AttemptView {
                        direction: a.direction.clone(),
                        attempt: a.attempt,
                        status,
                        idempotency_key: a.idempotency_key.clone(),
                        dispatched_at: Timestamp(a.dispatched_at),
                        deadline: a.deadline.map(Timestamp),
                        finished_at: a.finished_at.map(Timestamp),
                        error: a.error.clone(),
                    })
                    .collect(),
                input_schema: step_spec.input_schema.clone(),
                output_schema: step_spec.output_schema.clone(),
            }
        })
        .collect();

    let activity = match &state.activity {
        Activity::InFlight {
            step,
            direction,
            attempt,
            deadline,
        } => {
            let row = attempts.iter().map(|(_, a)| a).find(|a| {
                a.step == *step as i32
                    && a.direction == direction.as_str()
                    && a.attempt == *attempt as i32
            });
            ActivityView::InFlight {
                step: step_name(*step),
                direction: *direction,
                attempt: *attempt,
                idempotency_key: row.map(|a| a.idempotency_key.clone()),
                since: row.map(|a| Timestamp(a.dispatched_at)),
                deadline: *deadline,
            }
        }
        Activity::BackingOff {
            step,
            direction,
            attempt,
            at,
        } => ActivityView::BackingOff {
            step: step_name(*step),
            direction: *direction,
            attempt: *attempt,
            retry_at: *at,
        },
        Activity::Idle => match (&state.stuck, state.status) {
            (Some(stuck), _) => ActivityView::WaitingForOperator {
                step: step_name(stuck.step),
                direction: stuck.direction,
            },
            (None, SagaStatus::Created) => ActivityView::NotStarted,
            (None, status) if status.is_terminal() => ActivityView::Finished,
            (None, _) => ActivityView::Idle,
        },
    };

    Ok(SagaDetail {
        id,
        name: state.name.clone(),
        version: state.version,
        status: state.status,
        start_key: row.start_key,
        created_at: state.created_at,
        updated_at: Timestamp(row.updated_at),
        row_version: row.row_version,
        ownership: OwnershipView::of(store, id).await?,
        history_len: row.history_seq,
        activity,
        next_wake: state.wake_at(),
        deadline: state.deadline,
        past_pivot: state.past_pivot,
        failure: state.failure.clone(),
        stuck: state.stuck.as_ref().map(|s| StuckView {
            step: step_name(s.step),
            direction: s.direction,
            reason: s.reason.clone(),
        }),
        compensation_queue: state
            .compensation_queue
            .iter()
            .map(|&i| step_name(i))
            .collect(),
        input: state.input.clone(),
        steps,
    })
}

/// A saga's complete history, for reading as a timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryView {
    /// The saga id.
    pub saga_id: Uuid,
    /// The definition name.
    pub name: String,
    /// The pinned definition version.
    pub version: u32,
    /// Its status now.
    pub status: SagaStatus,
    /// Every record, in order.
    pub entries: Vec<TimelineEntry>,
}

/// One history record on a saga's timeline: the stored row and how long after the saga's first
/// record it was written.
pub type TimelineEntry = HistoryEntry<Elapsed>;

/// The complete, ordered history of saga `id` (read by the `(saga_id, seq)` primary key).
pub async fn history(store: &Store, id: Uuid) -> Result<HistoryView, EngineError> {
    let row = saga::Entity::find_by_id(id.to_string())
        .one(store.connection())
        .await
        .map_err(EngineError::db("loading a saga"))?
        .ok_or(EngineError::UnknownSaga(id))?;
    let corrupt = |detail: String| EngineError::Corrupt {
        saga_id: id.to_string(),
        detail,
    };
    let status = SagaStatus::parse(&row.status)
        .ok_or_else(|| corrupt(format!("unknown status `{}`", row.status)))?;
    let version = u32::try_from(row.definition_version)
        .map_err(|e| corrupt(format!("definition_version: {e}")))?;
    let entries = store.history(id).await?;
    let start = entries.first().map_or(Timestamp(row.created_at), |e| e.at);
    Ok(HistoryView {
        saga_id: id,
        name: row.name,
        version,
        status,
        entries: entries
            .into_iter()
            .map(|e| {
                let elapsed_ms = e.at.as_millis() - start.as_millis();
                e.with(Elapsed { elapsed_ms })
            })
            .collect(),
    })
}
