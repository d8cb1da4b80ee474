//! How one attempt row in `step_attempts` stands.

use serde::{Deserialize, Serialize};

/// How an attempt stands. Its snake_case name is what the `step_attempts.status` column, the
/// CLI and JSON use.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumString,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AttemptStatus {
    /// Sent to a worker; no answer yet (in flight).
    Dispatched,
    /// The worker answered with success.
    Succeeded,
    /// The worker answered with a failure.
    Failed,
    /// Its deadline passed without an answer.
    TimedOut,
    /// The saga walked away from it (deadline, cancel, skip) while it was in flight.
    Abandoned,
}

impl AttemptStatus {
    /// The snake_case name stored in `step_attempts.status`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Parses [`AttemptStatus::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        text.parse().ok()
    }
}

impl std::fmt::Display for AttemptStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantNames;

    #[test]
    fn names_round_trip_and_match_serde() {
        for name in AttemptStatus::VARIANTS {
            let status = AttemptStatus::parse(name).expect("a known name");
            assert_eq!(status.as_str(), *name);
            assert_eq!(serde_json::to_value(status).expect("encode"), *name);
        }
        assert_eq!(AttemptStatus::TimedOut.as_str(), "timed_out");
        assert_eq!(AttemptStatus::parse("lost"), None);
    }
}
