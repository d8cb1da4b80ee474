//! Opaque cursors for keyset pagination.
//!
//! A cursor carries the sort key of the last row of a page; the next page starts strictly
//! after it. Unlike an offset, it stays correct while sagas are added (a new saga sorts after
//! the ones already listed, or in its own place) and costs one index seek however deep the walk.
//! The text is hex so it survives shells and URLs unquoted; callers must not build or read it.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use uuid::Uuid;

use crate::EngineError;

/// Where the next page starts. Print it, hand it back, never build it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Cursor(String);

/// Which listing a cursor belongs to: a cursor from `list` is refused by `audit` and back.
const LIST: &str = "l1";
const AUDIT: &str = "a1";

impl Cursor {
    /// The cursor's text, as printed.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn for_list(created_at: i64, id: &str) -> Self {
        Cursor(hex(&format!("{LIST}|{created_at}|{id}")))
    }

    /// `(created_at, id)` of the last saga of the previous page.
    pub(crate) fn list_key(&self) -> Result<(i64, String), EngineError> {
        let fields = self.fields(LIST, 3, "sagaflow list")?;
        let created_at = fields[1]
            .parse()
            .map_err(|_| self.invalid("sagaflow list"))?;
        let id = Uuid::parse_str(&fields[2]).map_err(|_| self.invalid("sagaflow list"))?;
        Ok((created_at, id.to_string()))
    }

    pub(crate) fn for_audit(at: i64, saga_id: &str, seq: i64) -> Self {
        Cursor(hex(&format!("{AUDIT}|{at}|{saga_id}|{seq}")))
    }

    /// `(at, saga_id, seq)` of the last history entry of the previous page.
    pub(crate) fn audit_key(&self) -> Result<(i64, String, i64), EngineError> {
        let fields = self.fields(AUDIT, 4, "sagaflow audit")?;
        let at = fields[1]
            .parse()
            .map_err(|_| self.invalid("sagaflow audit"))?;
        let id = Uuid::parse_str(&fields[2]).map_err(|_| self.invalid("sagaflow audit"))?;
        let seq = fields[3]
            .parse()
            .map_err(|_| self.invalid("sagaflow audit"))?;
        Ok((at, id.to_string(), seq))
    }

    fn fields(&self, kind: &str, count: usize, command: &str) -> Result<Vec<String>, EngineError> {
        let text = unhex(&self.0).ok_or_else(|| self.invalid(command))?;
        let fields: Vec<String> = text.split('|').map(str::to_string).collect();
        if fields.len() != count || fields[0] != kind {
            return Err(self.invalid(command));
        }
        Ok(fields)
    }

    fn invalid(&self, command: &str) -> EngineError {
        EngineError::invalid_query(
            format!("`{}` is not a cursor of `{command}`", self.0),
            format!(
                "pass the `next` cursor the previous `{command}` page printed, unchanged, with the \
                 same filters; leave it out to start from the first page"
            ),
        )
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Cursor {
    type Err = std::convert::Infallible;

    /// Takes any text: whether it is a cursor is checked when it is used, by the listing it
    /// belongs to.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Cursor(text.trim().to_string()))
    }
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_belong_to_one_listing() {
        let id = Uuid::from_u128(7).to_string();
        let list = Cursor::for_list(1_700_000_000_000, &id);
        assert_eq!(
            list.list_key().map_err(|e| e.to_string()),
            Ok((1_700_000_000_000, id.clone()))
        );
        let again: Cursor = list.to_string().parse().unwrap_or_else(|e| match e {});
        assert_eq!(again, list);
        let audit = Cursor::for_audit(5, &id, 3);
        assert_eq!(audit.audit_key().map_err(|e| e.to_string()), Ok((5, id, 3)));

        let error = audit
            .list_key()
            .expect_err("an audit cursor is not a list cursor");
        assert!(
            error
                .to_string()
                .contains("is not a cursor of `sagaflow list`"),
            "{error}"
        );
        for garbage in [
            "",
            "zz",
            "abc",
            "6c317c787c79",
            "6c317c317c6e6f742d612d75756964",
        ] {
            let cursor: Cursor = garbage.parse().unwrap_or_else(|e| match e {});
            assert!(cursor.list_key().is_err(), "{garbage:?} is refused");
        }
    }
}
