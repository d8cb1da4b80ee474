//! Finding sagas: [`list`] with filters and keyset pagination.

use sagaflow_protocol::Timestamp;
use sea_orm::sea_query::{Expr, ExprTrait, Func};
use sea_orm::{
    ColumnTrait, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
};
use serde::Serialize;
use uuid::Uuid;

use super::cursor::Cursor;
use super::definitions::Definitions;
use super::page::{Page, TimeRange};
use crate::EngineError;
use crate::machine::SagaStatus;
use crate::store::{Store, saga};

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
pub(super) struct SummaryRow {
    pub(super) id: String,
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

pub(super) fn select_summaries() -> Select<saga::Entity> {
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

impl Definitions {
    pub(super) fn summary(&self, row: SummaryRow) -> Result<SagaSummary, EngineError> {
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
