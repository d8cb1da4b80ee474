//! The JSON documents the operator commands print for scripts (`docs/cli-json.md`): each one,
//! and each line of a JSON-lines export, carries the version of the format as its first field.

use serde::Serialize;

/// The version of the operator JSON format. Fields may be added within a version; a field
/// removed, renamed or changed in type or meaning bumps it.
pub const JSON_FORMAT_VERSION: u32 = 1;

/// `body`'s fields after `"v": JSON_FORMAT_VERSION`. `body` must serialize as a JSON object.
#[derive(Debug, Serialize)]
pub struct Versioned<'a, T: Serialize> {
    v: u32,
    #[serde(flatten)]
    body: &'a T,
}

impl<'a, T: Serialize> Versioned<'a, T> {
    /// `body` with the current format version.
    pub fn new(body: &'a T) -> Self {
        Versioned {
            v: JSON_FORMAT_VERSION,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Page {
        sagas: Vec<u32>,
        next: Option<String>,
    }

    #[test]
    fn the_version_comes_first_and_the_fields_follow_unchanged() {
        let page = Page {
            sagas: vec![1, 2],
            next: None,
        };
        let text = serde_json::to_string(&Versioned::new(&page)).unwrap();
        assert_eq!(text, r#"{"v":1,"sagas":[1,2],"next":null}"#);
    }
}
