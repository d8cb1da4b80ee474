//! Paging and ranges shared by the listings: [`Page`] with its limits, [`TimeRange`], and the
//! escaping of user text for LIKE.

use sagaflow_protocol::Timestamp;
use sea_orm::sea_query::LikeExpr;
use sea_orm::{ColumnTrait, Condition};

use super::cursor::Cursor;
use super::time::format_time;
use crate::EngineError;

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
