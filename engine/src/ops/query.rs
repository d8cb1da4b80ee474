//! Finding sagas: [`list`] with filters and keyset pagination, and [`stuck`] for the sagas that
//! need an operator.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sagaflow_protocol::{Direction, SagaSpec, Timestamp};
use sea_orm::sea_query::{Expr, ExprTrait, Func, LikeExpr};
use sea_orm::{
    ColumnTrait, Condition, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
};
use serde::Serialize;
use tracing::warn;
use uuid::Uuid;

use super::cursor::Cursor;
use super::time::{format_duration, format_time};
use crate::EngineError;
use crate::machine::{Activity, SagaState, SagaStatus};
use crate::store::{Store, attempt, definition, saga};

/// The most rows one page may hold.
pub const MAX_PAGE: u64 = 1_000;

/// The page size when none is given.
pub const DEFAULT_PAGE: u64 = 50;

/// Which page of a listing to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// At most this many rows (1 to [`MAX_PAGE`]).
    pub limit: u64,
    /// Start after this cursor (the `next` of the previous page); `None` for the first page.
    pub after: Option<Cursor>,
}

impl Default for Page {
    fn default() -> Self {
        Page {
            limit: DEFAULT_PAGE,
            after: None,
        }
    }
}

impl Page {
    /// The first page, `limit` rows long.
    pub fn first(limit: u64) -> Self {
        Page { limit, after: None }
    }

    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        if self.limit == 0 || self.limit > MAX_PAGE {
            return Err(EngineError::invalid_query(
                format!("a page of {} rows cannot be read", self.limit),
                format!("ask for 1 to {MAX_PAGE} rows and follow the cursor for more"),
            ));
        }
        Ok(())
    }
}

/// A half-open time range: from `from` (inclusive) until `until` (exclusive); either end may be
/// left open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    /// The earliest instant included.
    pub from: Option<Timestamp>,
    /// The first instant no longer included.
    pub until: Option<Timestamp>,
}

impl TimeRange {
    /// Whether both ends are open.
    pub fn is_open(&self) -> bool {
        self.from.is_none() && self.until.is_none()
    }

    pub(crate) fn validate(&self, what: &str) -> Result<(), EngineError> {
        if let (Some(from), Some(until)) = (self.from, self.until)
            && from >= until
        {
            return Err(EngineError::invalid_query(
                format!(
                    "the {what} range is empty: it starts at {} and ends at {}",
                    format_time(from),
                    format_time(until)
                ),
                "give a start before the end",
            ));
        }
        Ok(())
    }

    pub(crate) fn condition(&self, column: impl ColumnTrait) -> Condition {
        let mut condition = Condition::all();
        if let Some(from) = self.from {
            condition = condition.add(column.gte(from.as_millis()));
        }
        if let Some(until) = self.until {
            condition = condition.add(column.lt(until.as_millis()));
        }
        condition
    }
}

/// What [`list`] selects. Every field narrows; an empty filter lists every saga.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Sagas in any of these statuses (all statuses when empty).
    pub statuses: Vec<SagaStatus>,
    /// Sagas of this definition name.
    pub name: Option<String>,
    /// Sagas pinned to this definition version.
    pub version: Option<u32>,
    /// Sagas working on, or stuck at, the step of this name (forward or compensation).
    pub current_step: Option<String>,
    /// Created in this range.
    pub created: TimeRange,
    /// Last changed in this range.
    pub updated: TimeRange,
    /// Whose last error (the stuck reason, or why compensation began) contains this text,
    /// ignoring ASCII case.
    pub error_contains: Option<String>,
    /// Started with this start key (the idempotent key given to `start`).
    pub start_key: Option<String>,
}

impl ListFilter {
    fn validate(&self) -> Result<(), EngineError> {
        for (what, value) in [
            ("saga name", &self.name),
            ("step name", &self.current_step),
            ("error text", &self.error_contains),
            ("start key", &self.start_key),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(EngineError::invalid_query(
                    format!("the {what} to filter on is empty"),
                    "give some text, or leave the filter out",
                ));
            }
        }
        self.created.validate("created")?;
        self.updated.validate("updated")
    }
}

/// One saga in a listing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaSummary {
    /// The saga id.
    pub id: Uuid,
    /// The definition name.
    pub name: String,
    /// The pinned definition version.
    pub version: u32,
    /// Where it is.
    pub status: SagaStatus,
    /// The step it works on or is stuck at, by name.
    pub current_step: Option<String>,
    /// The start key it was started with, if any.
    pub start_key: Option<String>,
    /// The stuck reason, or why compensation began.
    pub last_error: Option<String>,
    /// When it wakes by itself next (a retry, a timeout, its deadline).
    #[serde(serialize_with = "super::time::rfc3339::option::serialize")]
    pub wake_at: Option<Timestamp>,
    /// How many history records it has.
    pub history_len: i64,
    /// When it was created.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub created_at: Timestamp,
    /// When it last changed.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub updated_at: Timestamp,
}

/// One page of [`list`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListPage {
    /// The sagas, oldest first (by creation time, then id).
    pub sagas: Vec<SagaSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// The `sagas` columns a listing reads (not the input, outputs or progress documents).
#[derive(Debug, FromQueryResult)]
struct SummaryRow {
    id: String,
    name: String,
    definition_version: i32,
    status: String,
    current_step: Option<String>,
    start_key: Option<String>,
    last_error: Option<String>,
    wake_at: Option<i64>,
    history_seq: i64,
    created_at: i64,
    updated_at: i64,
}

fn select_summaries() -> Select<saga::Entity> {
    saga::Entity::find().select_only().columns([
        saga::Column::Id,
        saga::Column::Name,
        saga::Column::DefinitionVersion,
        saga::Column::Status,
        saga::Column::CurrentStep,
        saga::Column::StartKey,
        saga::Column::LastError,
        saga::Column::WakeAt,
        saga::Column::HistorySeq,
        saga::Column::CreatedAt,
        saga::Column::UpdatedAt,
    ])
}

/// The registered definitions, to name steps (the `sagas` table keeps the step index).
pub(crate) struct Definitions(BTreeMap<(String, u32), SagaSpec>);

impl Definitions {
    /// Every readable definition. One that does not parse is left out (its sagas show step
    /// numbers instead of names) rather than failing a listing of every other saga; `show`
    /// of one of its sagas reports it.
    pub(crate) async fn load(store: &Store) -> Result<Self, EngineError> {
        let rows = definition::Entity::find()
            .all(store.connection())
            .await
            .map_err(EngineError::db("reading saga definitions"))?;
        let mut specs = BTreeMap::new();
        for row in rows {
            match serde_json::from_str::<SagaSpec>(&row.spec) {
                Ok(spec) => {
                    specs.insert((spec.name.clone(), spec.version), spec);
                }
                Err(error) => warn!(
                    name = %row.name,
                    version = row.version,
                    %error,
                    "a saga definition cannot be read; its step names are left out"
                ),
            }
        }
        Ok(Definitions(specs))
    }

    pub(crate) fn get(&self, name: &str, version: u32) -> Option<&SagaSpec> {
        self.0.get(&(name.to_string(), version))
    }

    pub(crate) fn step_name(&self, name: &str, version: u32, index: usize) -> Option<String> {
        self.get(name, version)
            .and_then(|spec| spec.steps.get(index))
            .map(|step| step.name.clone())
    }

    /// `(name = N AND version = V AND current_step = I)` for every definition with the step.
    fn current_step_condition(
        &self,
        step: &str,
        name: Option<&str>,
        version: Option<u32>,
    ) -> Result<Condition, EngineError> {
        let mut any = Condition::any();
        let mut found = false;
        let mut known = BTreeSet::new();
        for ((spec_name, spec_version), spec) in &self.0 {
            if name.is_some_and(|n| n != spec_name) || version.is_some_and(|v| v != *spec_version) {
                continue;
            }
            known.extend(spec.steps.iter().map(|s| s.name.as_str()));
            if let Some(index) = spec.step_index(step) {
                found = true;
                any = any.add(
                    Condition::all()
                        .add(saga::Column::Name.eq(spec_name.as_str()))
                        .add(saga::Column::DefinitionVersion.eq(*spec_version as i32))
                        .add(saga::Column::CurrentStep.eq(index.to_string())),
                );
            }
        }
        if !found {
            let scope = match (name, version) {
                (Some(n), Some(v)) => format!("saga `{n}` version {v}"),
                (Some(n), None) => format!("saga `{n}`"),
                (None, Some(v)) => format!("version {v} of any saga"),
                (None, None) => "any registered saga".to_string(),
            };
            let hint = if known.is_empty() {
                "no matching definition is registered; `sagaflow list` without --step shows the \
                 sagas there are"
                    .to_string()
            } else {
                format!(
                    "its steps are: {}",
                    known.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(EngineError::invalid_query(
                format!("`{step}` is not a step of {scope}"),
                hint,
            ));
        }
        Ok(any)
    }

    fn summary(&self, row: SummaryRow) -> Result<SagaSummary, EngineError> {
        let corrupt = |detail: String| EngineError::Corrupt {
            saga_id: row.id.clone(),
            detail,
        };
        let id = Uuid::parse_str(&row.id).map_err(|e| corrupt(format!("id: {e}")))?;
        let status = SagaStatus::parse(&row.status)
            .ok_or_else(|| corrupt(format!("unknown status `{}`", row.status)))?;
        let version = u32::try_from(row.definition_version)
            .map_err(|e| corrupt(format!("definition_version: {e}")))?;
        let current_step = row.current_step.as_deref().map(|index| {
            index
                .parse::<usize>()
                .ok()
                .and_then(|i| self.step_name(&row.name, version, i))
                // A step the definition does not name still shows, by its index.
                .unwrap_or_else(|| format!("#{index}"))
        });
        Ok(SagaSummary {
            id,
            name: row.name,
            version,
            status,
            current_step,
            start_key: row.start_key,
            last_error: row.last_error,
            wake_at: row.wake_at.map(Timestamp),
            history_len: row.history_seq,
            created_at: Timestamp(row.created_at),
            updated_at: Timestamp(row.updated_at),
        })
    }
}

/// `%text%` for LIKE, with the wildcards in `text` escaped by `!` (both databases accept an
/// explicit ESCAPE; `!` needs no quoting in either).
pub(crate) fn like_pattern(prefix: &str, text: &str, suffix: &str) -> LikeExpr {
    let mut escaped = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if matches!(c, '!' | '%' | '_') {
            escaped.push('!');
        }
        escaped.push(c);
    }
    LikeExpr::new(format!("{prefix}{escaped}{suffix}")).escape('!')
}

/// Rows read per query while matching error text.
const TEXT_SCAN_CHUNK: u64 = 500;

/// Up to this many sagas updated in a range, [`list`] first looks up the earliest creation time
/// among them.
const FEW_UPDATED: u64 = 50_000;

/// For a lower-bounded `updated` range matching few sagas: the earliest creation time among
/// them. Listing walks creation order, and the sagas updated recently are mostly created
/// recently, at the far end of that walk: without the bound, "updated in the last day" read
/// nearly every saga (0.46 s at a million). With more matches than `FEW_UPDATED` they are
/// dense enough that the walk finds a page soon.
async fn earliest_created_among_updated(
    store: &Store,
    updated: &TimeRange,
) -> Result<Option<i64>, EngineError> {
    if updated.from.is_none() {
        return Ok(None);
    }
    let in_range = || {
        saga::Entity::find()
            .select_only()
            .filter(updated.condition(saga::Column::UpdatedAt))
    };
    let matches = in_range()
        .column(saga::Column::CreatedAt)
        .limit(FEW_UPDATED + 1)
        .count(store.connection())
        .await
        .map_err(EngineError::db("counting recently updated sagas"))?;
    if matches > FEW_UPDATED {
        return Ok(None);
    }
    let earliest: Option<Option<i64>> = in_range()
        // `+ 0`: a plain MIN(created_at) is planned as a walk of the creation index, the very
        // walk this spares.
        .expr(Func::min(Expr::col(saga::Column::CreatedAt).add(0)))
        .into_tuple()
        .one(store.connection())
        .await
        .map_err(EngineError::db(
            "finding the earliest recently updated saga",
        ))?;
    Ok(earliest.flatten())
}

/// The query [`list`] runs: filters, keyset position, order and limit (one row more than the
/// page, which tells whether there is a next page without counting).
pub(crate) fn list_select(
    filter: &ListFilter,
    page: &Page,
    definitions: &Definitions,
) -> Result<Select<saga::Entity>, EngineError> {
    page.validate()?;
    filter.validate()?;
    let mut query = select_summaries();
    if !filter.statuses.is_empty() {
        query =
            query.filter(saga::Column::Status.is_in(filter.statuses.iter().map(|s| s.as_str())));
    }
    if let Some(name) = &filter.name {
        query = query.filter(saga::Column::Name.eq(name.as_str()));
    }
    if let Some(version) = filter.version {
        query = query.filter(saga::Column::DefinitionVersion.eq(version as i32));
    }
    if let Some(step) = &filter.current_step {
        query = query.filter(definitions.current_step_condition(
            step,
            filter.name.as_deref(),
            filter.version,
        )?);
    }
    query = query
        .filter(filter.created.condition(saga::Column::CreatedAt))
        .filter(filter.updated.condition(saga::Column::UpdatedAt));
    if let Some(key) = &filter.start_key {
        query = query.filter(saga::Column::StartKey.eq(key.as_str()));
    }
    if let Some(cursor) = &page.after {
        let (created_at, id) = cursor.list_key()?;
        query = query.filter(
            Expr::tuple([
                saga::Column::CreatedAt.into_expr(),
                saga::Column::Id.into_expr(),
            ])
            .gt(Expr::tuple([Expr::val(created_at), Expr::val(id)])),
        );
    }
    Ok(query
        .order_by_asc(saga::Column::CreatedAt)
        .order_by_asc(saga::Column::Id)
        .limit(page.limit + 1))
}

/// The sagas that match `filter`, oldest first (by creation time, then id), one page at a time.
///
/// Pagination is by keyset: the cursor holds the last row's `(created_at, id)` and the next page
/// starts strictly after it, through the `(…, created_at, id)` indexes. Every value is a bound
/// parameter.
pub async fn list(
    store: &Store,
    filter: &ListFilter,
    page: &Page,
) -> Result<ListPage, EngineError> {
    let definitions = Definitions::load(store).await?;
    let earliest = earliest_created_among_updated(store, &filter.updated).await?;
    let read = |page: Page| {
        let definitions = &definitions;
        async move {
            let mut query = list_select(filter, &page, definitions)?;
            if let Some(earliest) = earliest {
                // Exact, so the answer is the same: it spares walking the sagas created before.
                query = query.filter(saga::Column::CreatedAt.gte(earliest));
            }
            query
                .into_model::<SummaryRow>()
                .all(store.connection())
                .await
                .map_err(EngineError::db("listing sagas"))
        }
    };
    let (rows, more) = match &filter.error_contains {
        None => {
            let mut rows = read(page.clone()).await?;
            let more = rows.len() as u64 > page.limit;
            rows.truncate(page.limit as usize);
            (rows, more)
        }
        Some(text) => {
            // Error text has no index, and PostgreSQL cannot tell how rare a substring is: it
            // guessed a handful of matches and read the whole table (0.45 s at a million
            // sagas). So the other filters walk the listing order a chunk at a time, through
            // their index, and the text is matched here.
            let needle = text.to_ascii_lowercase();
            let mut matched = Vec::new();
            let mut after = page.after.clone();
            loop {
                let chunk = read(Page {
                    limit: TEXT_SCAN_CHUNK,
                    after: after.clone(),
                })
                .await?;
                let exhausted = chunk.len() as u64 <= TEXT_SCAN_CHUNK;
                for row in chunk.into_iter().take(TEXT_SCAN_CHUNK as usize) {
                    after = Some(Cursor::for_list(row.created_at, &row.id));
                    let hit = row
                        .last_error
                        .as_deref()
                        .is_some_and(|e| e.to_ascii_lowercase().contains(&needle));
                    if hit {
                        matched.push(row);
                        if matched.len() as u64 > page.limit {
                            break;
                        }
                    }
                }
                if exhausted || matched.len() as u64 > page.limit {
                    break;
                }
            }
            let more = matched.len() as u64 > page.limit;
            matched.truncate(page.limit as usize);
            (matched, more)
        }
    };
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(Cursor::for_list(last.created_at, &last.id)),
        _ => None,
    };
    let sagas = rows
        .into_iter()
        .map(|row| definitions.summary(row))
        .collect::<Result<_, _>>()?;
    Ok(ListPage { sagas, next })
}

/// What [`stuck`] looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckQuery {
    /// A created, running or compensating saga that has not changed for longer than this counts
    /// as making no progress.
    pub threshold: Duration,
    /// The current time (handed in, so the result is reproducible).
    pub now: Timestamp,
    /// At most this many sagas (1 to [`MAX_PAGE`]); the totals count them all.
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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckSaga {
    /// The saga.
    #[serde(flatten)]
    pub saga: SagaSummary,
    /// Stuck, or without progress.
    pub kind: StuckKind,
    /// How long since it last changed.
    #[serde(rename = "idle_ms", serialize_with = "super::time::millis::serialize")]
    pub idle_for: Duration,
    /// Why, in words: the stuck reason, or what it has been waiting on.
    pub reason: String,
}

/// The sagas that need an operator, and how many there are in all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckReport {
    /// The time the report was made at.
    #[serde(serialize_with = "super::time::rfc3339::serialize")]
    pub now: Timestamp,
    /// The no-progress threshold.
    #[serde(
        rename = "threshold_ms",
        serialize_with = "super::time::millis::serialize"
    )]
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
        .filter(attempt::Column::Status.eq("dispatched"))
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
