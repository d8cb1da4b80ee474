//! The sagas that need an operator: [`stuck`] finds stuck sagas and active sagas without
//! progress, each with the reason.

use std::collections::BTreeMap;
use std::time::Duration;

use sagaflow_protocol::{Direction, Timestamp};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::Serialize;
use serde_with::{DurationMilliSeconds, serde_as};
use uuid::Uuid;

use super::definitions::Definitions;
use super::list::{SagaSummary, SummaryRow, select_summaries};
use super::page::Page;
use super::time::{format_duration, format_time};
use crate::EngineError;
use crate::machine::{Activity, SagaState, SagaStatus};
use crate::store::{AttemptStatus, Store, attempt, saga};

/// What [`stuck`] looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckQuery {
    /// A created, running or compensating saga that has not changed for longer than this counts
    /// as making no progress.
    pub threshold: Duration,
    /// The current time (handed in, so the result is reproducible).
    pub now: Timestamp,
    /// At most this many sagas (1 to [`MAX_PAGE`](super::MAX_PAGE)); the totals count them all.
    pub limit: u64,
}

/// Why a saga is in the [`stuck`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StuckKind {
    /// The saga is in the stuck state: it waits for an operator.
    Stuck,
    /// The saga is active but has not changed for longer than the threshold.
    NoProgress,
}

/// One saga that needs looking at.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckSaga {
    /// The saga.
    #[serde(flatten)]
    pub saga: SagaSummary,
    /// Stuck, or without progress.
    pub kind: StuckKind,
    /// How long since it last changed.
    #[serde(rename = "idle_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub idle_for: Duration,
    /// Why, in words: the stuck reason, or what it has been waiting on.
    pub reason: String,
}

/// The sagas that need an operator, and how many there are in all.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckReport {
    /// The time the report was made at.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub now: Timestamp,
    /// The no-progress threshold.
    #[serde(rename = "threshold_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    pub threshold: Duration,
    /// Sagas in the stuck state, in all.
    pub stuck_total: u64,
    /// Active sagas without progress for longer than the threshold, in all.
    pub no_progress_total: u64,
    /// Stuck sagas first, then those without progress; each group longest idle first.
    pub sagas: Vec<StuckSaga>,
}

/// Sagas in the stuck state, plus created, running or compensating sagas that have not changed
/// for longer than `query.threshold`, each with the reason. Both halves read the
/// `(status, updated_at)` index.
pub async fn stuck(store: &Store, query: &StuckQuery) -> Result<StuckReport, EngineError> {
    Page::first(query.limit).validate()?;
    let db = store.connection();
    let threshold_ms = i64::try_from(query.threshold.as_millis()).unwrap_or(i64::MAX);
    let cutoff = query.now.as_millis().saturating_sub(threshold_ms);
    let stuck_filter = Condition::all().add(saga::Column::Status.eq(SagaStatus::Stuck.as_str()));
    let idle_filter = Condition::all()
        .add(saga::Column::Status.is_in(SagaStatus::ACTIVE.map(SagaStatus::as_str)))
        .add(saga::Column::UpdatedAt.lt(cutoff));
    let stuck_total = saga::Entity::find()
        .filter(stuck_filter.clone())
        .count(db)
        .await
        .map_err(EngineError::db("counting stuck sagas"))?;
    let no_progress_total = saga::Entity::find()
        .filter(idle_filter.clone())
        .count(db)
        .await
        .map_err(EngineError::db("counting sagas without progress"))?;

    let mut rows = Vec::new();
    for (kind, filter) in [
        (StuckKind::Stuck, stuck_filter),
        (StuckKind::NoProgress, idle_filter),
    ] {
        let room = query.limit.saturating_sub(rows.len() as u64);
        if room == 0 {
            break;
        }
        let found = select_summaries()
            .filter(filter)
            .order_by_asc(saga::Column::UpdatedAt)
            .order_by_asc(saga::Column::Id)
            .limit(room)
            .into_model::<SummaryRow>()
            .all(db)
            .await
            .map_err(EngineError::db("finding stuck sagas"))?;
        rows.extend(found.into_iter().map(|row| (kind, row)));
    }

    let definitions = Definitions::load(store).await?;
    let ids: Vec<Uuid> = rows
        .iter()
        .filter_map(|(_, row)| Uuid::parse_str(&row.id).ok())
        .collect();
    let states: BTreeMap<Uuid, SagaState> = store
        .load_many(&ids)
        .await?
        .into_iter()
        .map(|s| (s.state.saga_id, s.state))
        .collect();
    let in_flight_since = dispatch_times(store, &ids).await?;

    let mut sagas = Vec::with_capacity(rows.len());
    for (kind, row) in rows {
        let saga = definitions.summary(row)?;
        let idle_for = saga.updated_at.until(query.now);
        let reason = match (kind, states.get(&saga.id)) {
            (StuckKind::Stuck, Some(state)) => state
                .stuck
                .as_ref()
                .map(|s| s.reason.clone())
                .or_else(|| saga.last_error.clone())
                .unwrap_or_else(|| "stuck (no reason recorded)".into()),
            (StuckKind::Stuck, None) => saga
                .last_error
                .clone()
                .unwrap_or_else(|| "stuck (no reason recorded)".into()),
            (StuckKind::NoProgress, state) => no_progress_reason(
                &saga,
                state,
                &definitions,
                idle_for,
                in_flight_since.get(&saga.id).copied(),
                query.now,
            ),
        };
        sagas.push(StuckSaga {
            saga,
            kind,
            idle_for,
            reason,
        });
    }
    Ok(StuckReport {
        now: query.now,
        threshold: query.threshold,
        stuck_total,
        no_progress_total,
        sagas,
    })
}

/// When each saga's open attempt (the one still `dispatched`) was sent.
async fn dispatch_times(
    store: &Store,
    ids: &[Uuid],
) -> Result<BTreeMap<Uuid, Timestamp>, EngineError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows: Vec<(String, i64)> = attempt::Entity::find()
        .select_only()
        .column(attempt::Column::SagaId)
        .column(attempt::Column::DispatchedAt)
        .filter(attempt::Column::SagaId.is_in(ids.iter().map(Uuid::to_string)))
        .filter(attempt::Column::Status.eq(AttemptStatus::Dispatched.as_str()))
        .into_tuple()
        .all(store.connection())
        .await
        .map_err(EngineError::db("reading attempts in flight"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, at)| Some((Uuid::parse_str(&id).ok()?, Timestamp(at))))
        .collect())
}

fn no_progress_reason(
    saga: &SagaSummary,
    state: Option<&SagaState>,
    definitions: &Definitions,
    idle_for: Duration,
    dispatched_at: Option<Timestamp>,
    now: Timestamp,
) -> String {
    let idle = format!("no progress for {}", format_duration(idle_for));
    let Some(state) = state else {
        return idle;
    };
    let step_name = |index: usize| {
        definitions
            .step_name(&state.name, state.version, index)
            .unwrap_or_else(|| format!("#{index}"))
    };
    let what = |step: usize, direction: Direction| match direction {
        Direction::Forward => format!("step {}", step_name(step)),
        Direction::Compensate => format!("the compensation of step {}", step_name(step)),
    };
    let mut reason = match &state.activity {
        Activity::InFlight {
            step,
            direction,
            attempt,
            deadline,
        } => {
            let since = dispatched_at
                .map(|t| format!("in flight since {}", format_time(t)))
                .unwrap_or_else(|| "in flight".into());
            let until = deadline
                .map(|d| format!(", times out at {}", format_time(d)))
                .unwrap_or_else(|| ", no timeout".into());
            format!(
                "{idle}, waiting on {} attempt {attempt} ({since}{until})",
                what(*step, *direction)
            )
        }
        Activity::BackingOff {
            step,
            direction,
            attempt,
            at,
        } => format!(
            "{idle}, waiting on {} attempt {attempt} (retry at {})",
            what(*step, *direction),
            format_time(*at)
        ),
        Activity::Idle if state.status == SagaStatus::Created => {
            format!("{idle}, created but not started")
        }
        Activity::Idle => format!("{idle}, waiting on nothing"),
    };
    // A timer that fell due and did not fire means no engine is serving this saga.
    if let Some(wake) = state.wake_at()
        && wake < now
    {
        reason.push_str(&format!(
            "; its timer was due {} ago: is an engine running on this database with `{}` \
             version {} registered?",
            format_duration(wake.until(now)),
            saga.name,
            saga.version
        ));
    }
    reason
}
