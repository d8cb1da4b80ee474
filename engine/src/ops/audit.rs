//! Audit queries over every saga's history and JSON-lines export.
//!
//! The history is append-only: nothing here changes a record. [`retention`](super::retention)
//! is the only way anything leaves, and it removes whole finished sagas with their history,
//! attempts and outbox rows in one transaction, never part of a history.

use std::io::Write;

use sagaflow_protocol::Direction;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, DbBackend, EntityTrait, FromQueryResult, JoinType, QueryFilter, QueryOrder,
    QuerySelect, Select,
};
use serde::Serialize;
use uuid::Uuid;

use super::cursor::Cursor;
use super::json::Versioned;
use super::page::{MAX_PAGE, Page, TimeRange, like_pattern};
use crate::EngineError;
use crate::machine::RecordKind;
use crate::store::{HistoryColumns, HistoryEntry, OfSaga, Store, history, saga};

/// Whose records an audit query selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActorFilter {
    /// Exactly this actor: `engine`, `worker:ID` or `operator:NAME`.
    Exact(String),
    /// Every actor whose name starts with this, e.g. `operator:` for every operator.
    Prefix(String),
}

impl ActorFilter {
    /// Every operator action, whoever the operator.
    pub fn operators() -> Self {
        ActorFilter::Prefix("operator:".into())
    }
}

/// What [`audit`] selects from the history of every saga. Every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records of this saga.
    pub saga_id: Option<Uuid>,
    /// Records of sagas of this definition name.
    pub saga_name: Option<String>,
    /// Records of any of these kinds (all kinds when empty).
    pub kinds: Vec<RecordKind>,
    /// Records about this step.
    pub step: Option<String>,
    /// Records in this direction.
    pub direction: Option<Direction>,
    /// Records by this actor.
    pub actor: Option<ActorFilter>,
    /// Records made in this range.
    pub at: TimeRange,
}

impl AuditFilter {
    fn validate(&self) -> Result<(), EngineError> {
        let empty = |what: &str| {
            EngineError::invalid_query(
                format!("the {what} to filter on is empty"),
                "give some text, or leave the filter out",
            )
        };
        if self
            .saga_name
            .as_deref()
            .is_some_and(|v| v.trim().is_empty())
        {
            return Err(empty("saga name"));
        }
        if self.step.as_deref().is_some_and(|v| v.trim().is_empty()) {
            return Err(empty("step name"));
        }
        match &self.actor {
            Some(ActorFilter::Exact(a) | ActorFilter::Prefix(a)) if a.is_empty() => {
                return Err(empty("actor"));
            }
            _ => {}
        }
        self.at.validate("time")
    }
}

/// One history record with the saga it belongs to.
pub type AuditEntry = HistoryEntry<OfSaga>;

/// One page of [`audit`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditPage {
    /// Records by time, then saga id, then sequence number.
    pub entries: Vec<AuditEntry>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

#[derive(Debug, FromQueryResult)]
struct AuditRow {
    saga_id: String,
    seq: i64,
    at: i64,
    kind: String,
    step_name: Option<String>,
    direction: Option<String>,
    attempt: Option<i32>,
    payload: Option<String>,
    error: Option<String>,
    actor: String,
    node: Option<String>,
    epoch: Option<i64>,
    saga_name: String,
    saga_version: i32,
}

impl AuditRow {
    fn entry(self) -> Result<AuditEntry, EngineError> {
        let corrupt = |detail: String| EngineError::Corrupt {
            saga_id: self.saga_id.clone(),
            detail,
        };
        let saga = OfSaga {
            saga_id: Uuid::parse_str(&self.saga_id).map_err(|e| corrupt(format!("id: {e}")))?,
            saga_name: self.saga_name,
            saga_version: u32::try_from(self.saga_version)
                .map_err(|e| corrupt(format!("definition_version: {e}")))?,
        };
        let row = HistoryColumns {
            saga_id: self.saga_id,
            seq: self.seq,
            at: self.at,
            kind: self.kind,
            step_name: self.step_name,
            direction: self.direction,
            attempt: self.attempt,
            payload: self.payload,
            error: self.error,
            actor: self.actor,
            node: self.node,
            epoch: self.epoch,
        };
        Ok(row.decode()?.with(saga))
    }
}

/// `saga_history` joined to `sagas` (for the saga's name and version).
fn history_to_saga() -> sea_orm::RelationDef {
    history::Entity::belongs_to(saga::Entity)
        .from(history::Column::SagaId)
        .to(saga::Column::Id)
        .into()
}

/// The first string after every string that starts with `prefix`, bytewise: the prefix with
/// its last character moved up by one. `None` when that character is not plain ASCII (then
/// only the LIKE applies).
fn prefix_end(prefix: &str) -> Option<String> {
    let last = prefix.chars().last()?;
    if !last.is_ascii() || last == '\u{7f}' {
        return None;
    }
    let next = char::from(last as u8 + 1);
    Some(format!("{}{next}", &prefix[..prefix.len() - 1]))
}

/// The query [`audit`] runs, ordered and limited to one row more than the page.
pub(crate) fn audit_select(
    filter: &AuditFilter,
    page: &Page,
    backend: DbBackend,
) -> Result<Select<history::Entity>, EngineError> {
    page.validate()?;
    filter.validate()?;
    let mut query = history::Entity::find()
        .select_only()
        .columns([
            history::Column::SagaId,
            history::Column::Seq,
            history::Column::At,
            history::Column::Kind,
            history::Column::StepName,
            history::Column::Direction,
            history::Column::Attempt,
            history::Column::Payload,
            history::Column::Error,
            history::Column::Actor,
            history::Column::Node,
            history::Column::Epoch,
        ])
        .column_as(saga::Column::Name, "saga_name")
        .column_as(saga::Column::DefinitionVersion, "saga_version")
        .join(JoinType::InnerJoin, history_to_saga());
    if let Some(id) = filter.saga_id {
        query = query.filter(history::Column::SagaId.eq(id.to_string()));
    }
    if let Some(name) = &filter.saga_name {
        query = query.filter(saga::Column::Name.eq(name.as_str()));
    }
    if !filter.kinds.is_empty() {
        query = query.filter(history::Column::Kind.is_in(filter.kinds.iter().map(|k| k.as_str())));
    }
    if let Some(step) = &filter.step {
        query = query.filter(history::Column::StepName.eq(step.as_str()));
    }
    if let Some(direction) = filter.direction {
        query = query.filter(history::Column::Direction.eq(direction.as_str()));
    }
    match &filter.actor {
        Some(ActorFilter::Exact(actor)) => {
            query = query.filter(history::Column::Actor.eq(actor.as_str()));
        }
        Some(ActorFilter::Prefix(prefix)) => {
            // LIKE says what matches; the same prefix as a range of bytes is what an index
            // reads. SQLite only uses an index for LIKE under `case_sensitive_like`, but it
            // compares text bytewise, so the plain range reads `idx_history_actor_at`.
            // PostgreSQL derives that range from a LIKE prefix only when the pattern is a
            // literal: the generic plan of a prepared statement (a parameter) walked the whole
            // history in time order instead (115 ms on 10 million rows). Its pattern operators
            // spell the range out bytewise whatever the collation (plain `>=`/`<` would follow
            // a linguistic collation), which `idx_history_actor_prefix_at` serves.
            query = query.filter(history::Column::Actor.like(like_pattern("", prefix, "%")));
            if let Some(end) = prefix_end(prefix) {
                query = match backend {
                    DbBackend::Postgres => query
                        .filter(Expr::cust_with_values(
                            "saga_history.actor ~>=~ $1",
                            [prefix.as_str()],
                        ))
                        .filter(Expr::cust_with_values(
                            "saga_history.actor ~<~ $1",
                            [end.as_str()],
                        )),
                    _ => query
                        .filter(history::Column::Actor.gte(prefix.as_str()))
                        .filter(history::Column::Actor.lt(end)),
                };
            }
        }
        None => {}
    }
    query = query.filter(filter.at.condition(history::Column::At));
    if let Some(until) = filter.at.until {
        // A saga's records all come after its creation: this lets the planner skip sagas
        // created after the range, through the sagas' creation-time indexes.
        query = query.filter(saga::Column::CreatedAt.lt(until.as_millis()));
    }
    if let Some(cursor) = &page.after {
        let (at, saga_id, seq) = cursor.audit_key()?;
        query = query.filter(
            Expr::tuple([
                history::Column::At.into_expr(),
                history::Column::SagaId.into_expr(),
                history::Column::Seq.into_expr(),
            ])
            .gt(Expr::tuple([
                Expr::val(at),
                Expr::val(saga_id),
                Expr::val(seq),
            ])),
        );
    }
    Ok(query
        .order_by_asc(history::Column::At)
        .order_by_asc(history::Column::SagaId)
        .order_by_asc(history::Column::Seq)
        .limit(page.limit + 1))
}

/// History records of every saga that match `filter`, by time (then saga id and sequence
/// number), one page at a time with a keyset cursor. Every value is a bound parameter.
///
/// "Which sagas compensated `authorize_payment` since Monday" is
/// `kinds = [AttemptSucceeded], direction = Compensate, step = "authorize_payment",
/// at.from = Monday`; "every operator action" is `actor = ActorFilter::operators()`.
pub async fn audit(
    store: &Store,
    filter: &AuditFilter,
    page: &Page,
) -> Result<AuditPage, EngineError> {
    let query = audit_select(filter, page, store.backend())?;
    let mut rows = query
        .into_model::<AuditRow>()
        .all(store.connection())
        .await
        .map_err(EngineError::db("querying the history"))?;
    let more = rows.len() as u64 > page.limit;
    rows.truncate(page.limit as usize);
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(Cursor::for_audit(last.at, &last.saga_id, last.seq)),
        _ => None,
    };
    let entries = rows
        .into_iter()
        .map(AuditRow::entry)
        .collect::<Result<_, _>>()?;
    Ok(AuditPage { entries, next })
}

/// Writes every record matching `filter` to `out` as JSON lines (one [`AuditEntry`] object per
/// line), page by page so memory stays flat however long the history, secret fields shown as
/// `disclosure` says. Returns how many.
pub async fn export_jsonl<W: Write>(
    store: &Store,
    filter: &AuditFilter,
    disclosure: &super::Disclosure,
    out: &mut W,
) -> Result<u64, EngineError> {
    use super::Disclose;

    let mut page = Page::first(MAX_PAGE);
    let mut written = 0;
    loop {
        let result = audit(store, filter, &page).await?.disclose(disclosure);
        for entry in &result.entries {
            let line = serde_json::to_string(&Versioned::new(entry)).map_err(|e| {
                EngineError::Corrupt {
                    saga_id: entry.extra.saga_id.to_string(),
                    detail: format!("history #{} cannot be written as JSON: {e}", entry.seq),
                }
            })?;
            writeln!(out, "{line}").map_err(EngineError::Export)?;
            written += 1;
        }
        match result.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    out.flush().map_err(EngineError::Export)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_last_character_moves_up() {
        assert_eq!(prefix_end("operator:").as_deref(), Some("operator;"));
        assert_eq!(prefix_end("worker:w").as_deref(), Some("worker:x"));
        assert_eq!(prefix_end("opérateur:é"), None);
        assert_eq!(prefix_end(""), None);
    }

    #[test]
    fn like_patterns_escape_the_wildcards_in_user_text() {
        let query = saga::Entity::find()
            .filter(saga::Column::LastError.like(like_pattern("%", "50%_!", "%")));
        let built = sea_orm::QueryTrait::build(&query, sea_orm::DbBackend::Postgres);
        assert!(built.sql.contains("LIKE $1 ESCAPE '!'"), "{}", built.sql);
        assert_eq!(
            built
                .values
                .map(|v| v.0.iter().map(|v| v.to_string()).collect::<Vec<_>>()),
            Some(vec!["'%50!%!_!!%'".to_string()])
        );
    }
}
