//! Times and durations as operators type and read them: instants in RFC3339 UTC, durations as
//! `15m`, `2h`, `7d` or `1h30m`.
//!
//! The store keeps milliseconds since the epoch ([`Timestamp`]); people never see those.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use sagaflow_protocol::Timestamp;

use crate::EngineError;

/// The units [`format_duration`] shows, longest first.
const UNITS: [(&str, u64); 6] = [
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

const DURATION_HINT: &str =
    "write a duration as a number and a unit (ms, s, m, h, d, w), e.g. 15m, 2h, 7d or 1h30m";

const INSTANT_HINT: &str = "give an RFC3339 time (2026-11-23T08:00:00Z), a UTC date (2026-11-23) \
     or a duration meaning that long ago (15m, 2h, 7d)";

/// An instant as RFC3339 in UTC with milliseconds, e.g. `2023-11-14T22:13:20.000Z`.
pub fn format_time(at: Timestamp) -> String {
    match DateTime::<Utc>::from_timestamp_millis(at.as_millis()) {
        Some(time) => time.to_rfc3339_opts(SecondsFormat::Millis, true),
        // Out of chrono's range (hundreds of thousands of years): show the raw value.
        None => format!("{}ms since epoch", at.as_millis()),
    }
}

/// Parses `15m`, `2h`, `7d`, `1h30m`, `500ms`: one or more numbers, each with a unit (and the
/// longer unit names `humantime` knows, such as `2hours`).
pub fn parse_duration(text: &str) -> Result<Duration, EngineError> {
    let invalid =
        || EngineError::invalid_query(format!("`{text}` is not a duration"), DURATION_HINT);
    let trimmed = text.trim();
    // Whole numbers and units only: `humantime` also reads `1.5h` and `15 m`, which the
    // format we document (and scripts rely on) does not allow.
    if !trimmed.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(invalid());
    }
    humantime::parse_duration(trimmed).map_err(|_| invalid())
}

/// A duration for people: the two largest units, e.g. `2h 5m`, `3d 4h`, `45s`, `850ms`.
pub fn format_duration(duration: Duration) -> String {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    let mut parts = Vec::new();
    let mut rest = millis;
    for (name, size) in UNITS.iter().filter(|(name, _)| *name != "ms") {
        if parts.len() == 2 {
            break;
        }
        let count = rest / size;
        rest %= size;
        if count > 0 {
            parts.push(format!("{count}{name}"));
        } else if !parts.is_empty() {
            // Only adjacent units read well ("2h 5m", not "2d 5m"): stop at a gap.
            break;
        }
    }
    parts.join(" ")
}

/// Parses an instant: RFC3339 (`2026-11-23T08:00:00Z`, any offset), a UTC date (`2026-11-23`,
/// its midnight), or a duration meaning that long before `now` (`7d`).
pub fn parse_instant(text: &str, now: Timestamp) -> Result<Timestamp, EngineError> {
    let trimmed = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(trimmed) {
        return Ok(Timestamp(time.timestamp_millis()));
    }
    if let Ok(date) = NaiveDate::parse_from_str(trimmed, "%Y-%m-%d") {
        let midnight = date
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis());
        if let Some(millis) = midnight {
            return Ok(Timestamp(millis));
        }
    }
    match parse_duration(trimmed) {
        Ok(ago) => {
            let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
            Ok(Timestamp(now.as_millis().saturating_sub(ago)))
        }
        Err(_) => Err(EngineError::invalid_query(
            format!("`{text}` is not a time"),
            INSTANT_HINT,
        )),
    }
}

/// Serde helpers: instants in JSON output are RFC3339 strings, like everywhere people read them.
pub(crate) mod rfc3339 {
    use sagaflow_protocol::Timestamp;
    use serde::Serializer;

    /// Serializes a [`Timestamp`] as RFC3339.
    pub fn serialize<S: Serializer>(at: &Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_time(*at))
    }

    /// The same for an optional instant (`null` when absent).
    pub mod option {
        use sagaflow_protocol::Timestamp;
        use serde::Serializer;

        /// Serializes an optional [`Timestamp`] as RFC3339 or `null`.
        pub fn serialize<S: Serializer>(
            at: &Option<Timestamp>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match at {
                Some(at) => serializer.serialize_str(&super::super::format_time(*at)),
                None => serializer.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit_and_in_combinations() {
        let ms = |n| Ok(Duration::from_millis(n));
        assert_eq!(
            parse_duration("15m").map_err(|e| e.to_string()),
            ms(900_000)
        );
        assert_eq!(
            parse_duration("2h").map_err(|e| e.to_string()),
            ms(7_200_000)
        );
        assert_eq!(
            parse_duration("7d").map_err(|e| e.to_string()),
            ms(604_800_000)
        );
        assert_eq!(
            parse_duration("1w").map_err(|e| e.to_string()),
            ms(604_800_000)
        );
        assert_eq!(
            parse_duration("1h30m").map_err(|e| e.to_string()),
            ms(5_400_000)
        );
        assert_eq!(parse_duration("500ms").map_err(|e| e.to_string()), ms(500));
        assert_eq!(
            parse_duration(" 45s ").map_err(|e| e.to_string()),
            ms(45_000)
        );
        for bad in [
            "",
            "15",
            "m",
            "15 m",
            "15x",
            "-5m",
            "1.5h",
            "99999999999999999999d",
        ] {
            let error = parse_duration(bad).expect_err(bad).to_string();
            assert!(error.contains("is not a duration"), "{bad}: {error}");
            assert!(
                error.contains("15m, 2h, 7d"),
                "the message says what to write: {error}"
            );
        }
    }

    #[test]
    fn durations_read_in_their_two_largest_units() {
        let f = |ms| format_duration(Duration::from_millis(ms));
        assert_eq!(f(850), "850ms");
        assert_eq!(f(45_000), "45s");
        assert_eq!(f(900_000), "15m");
        assert_eq!(f(7_500_000), "2h 5m");
        assert_eq!(f(3 * 86_400_000 + 4 * 3_600_000 + 59_000), "3d 4h");
        assert_eq!(f(86_400_000 + 5 * 60_000), "1d");
        assert_eq!(f(1_234), "1s");
    }

    #[test]
    fn instants_parse_as_rfc3339_dates_or_durations_ago() {
        let now = Timestamp(1_700_000_000_000);
        let at = |t| parse_instant(t, now).map_err(|e| e.to_string());
        assert_eq!(at("2023-11-14T22:13:20Z"), Ok(Timestamp(1_700_000_000_000)));
        assert_eq!(
            at("2023-11-14T23:13:20.5+01:00"),
            Ok(Timestamp(1_700_000_000_500))
        );
        assert_eq!(at("2023-11-14"), Ok(Timestamp(1_699_920_000_000)));
        assert_eq!(at("2h"), Ok(Timestamp(1_700_000_000_000 - 7_200_000)));
        let error = at("last tuesday").expect_err("not a time");
        assert!(error.contains("`last tuesday` is not a time"), "{error}");
        assert!(error.contains("RFC3339"), "{error}");
    }

    #[test]
    fn times_print_as_rfc3339_utc_with_milliseconds() {
        assert_eq!(
            format_time(Timestamp(1_700_000_000_000)),
            "2023-11-14T22:13:20.000Z"
        );
        assert_eq!(
            format_time(Timestamp(1_700_000_000_042)),
            "2023-11-14T22:13:20.042Z"
        );
    }
}
