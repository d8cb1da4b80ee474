//! Per-step retry policies, as validated data.
//!
//! A [`RetryPolicy`] is stored with the saga definition, so every saga instance retries by the
//! exact policy of the definition version it started with. The delay for a given attempt is
//! computed in [`crate::backoff`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_with::{DurationMilliSeconds, serde_as};

use crate::ProtocolError;

/// How a step (or its compensation) is retried after a failed attempt.
///
/// The delay before retry `n` grows as `initial_interval * multiplier^(n-1)`, is spread by
/// `jitter` (a randomization factor: 0.2 means up to 20% shorter or longer), and is clamped to
/// `max_interval` after the jitter. Errors whose code is in `non_retryable` fail permanently at
/// once, as do errors the handler itself classifies as permanent.
///
/// Build one with [`RetryPolicy::builder`]; deserializing validates too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RetryPolicyFields", into = "RetryPolicyFields")]
pub struct RetryPolicy {
    initial_interval: Duration,
    multiplier: f64,
    max_interval: Duration,
    max_attempts: Option<u32>,
    jitter: f64,
    non_retryable: Vec<String>,
}

/// The serialized form: durations as integer milliseconds so any language can read them.
#[serde_as]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryPolicyFields {
    #[serde(rename = "initial_interval_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    initial_interval: Duration,
    multiplier: f64,
    #[serde(rename = "max_interval_ms")]
    #[serde_as(as = "DurationMilliSeconds<u64>")]
    max_interval: Duration,
    max_attempts: Option<u32>,
    jitter: f64,
    #[serde(default)]
    non_retryable: Vec<String>,
}

impl TryFrom<RetryPolicyFields> for RetryPolicy {
    type Error = ProtocolError;

    fn try_from(fields: RetryPolicyFields) -> Result<Self, ProtocolError> {
        RetryPolicy {
            initial_interval: fields.initial_interval,
            multiplier: fields.multiplier,
            max_interval: fields.max_interval,
            max_attempts: fields.max_attempts,
            jitter: fields.jitter,
            non_retryable: fields.non_retryable,
        }
        .validated()
    }
}

impl From<RetryPolicy> for RetryPolicyFields {
    fn from(policy: RetryPolicy) -> Self {
        RetryPolicyFields {
            initial_interval: policy.initial_interval,
            multiplier: policy.multiplier,
            max_interval: policy.max_interval,
            max_attempts: policy.max_attempts,
            jitter: policy.jitter,
            non_retryable: policy.non_retryable,
        }
    }
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 10 s, 20% jitter.
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_millis(200),
            multiplier: 2.0,
            max_interval: Duration::from_secs(10),
            max_attempts: Some(5),
            jitter: 0.2,
            non_retryable: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// Starts from [`RetryPolicy::default`].
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            policy: RetryPolicy::default(),
        }
    }

    /// A policy that never retries: the first failure is final.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: Some(1),
            ..RetryPolicy::default()
        }
    }

    /// The delay before the first retry.
    pub fn initial_interval(&self) -> Duration {
        self.initial_interval
    }

    /// The factor each further retry's delay grows by.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The longest delay between two attempts, jitter included.
    pub fn max_interval(&self) -> Duration {
        self.max_interval
    }

    /// How many attempts in all (the first one included); `None` retries without end.
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The randomization factor in `0.0..=1.0`.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Error codes that are never retried.
    pub fn non_retryable(&self) -> &[String] {
        &self.non_retryable
    }

    /// Whether another attempt may follow `attempts_made` attempts.
    pub fn allows_attempt_after(&self, attempts_made: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempts_made < max)
    }

    /// Whether an error with this code may be retried under this policy.
    pub fn retries_code(&self, code: &str) -> bool {
        !self.non_retryable.iter().any(|c| c == code)
    }

    fn validated(self) -> Result<Self, ProtocolError> {
        let fail = |msg: String| Err(ProtocolError::InvalidRetryPolicy(msg));
        if self.initial_interval.is_zero() {
            return fail("initial_interval must be above zero".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return fail(format!(
                "multiplier must be a finite number of at least 1.0, got {}",
                self.multiplier
            ));
        }
        if self.max_interval < self.initial_interval {
            return fail(format!(
                "max_interval ({:?}) must not be shorter than initial_interval ({:?})",
                self.max_interval, self.initial_interval
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return fail(format!(
                "jitter must be between 0.0 and 1.0, got {}",
                self.jitter
            ));
        }
        if self.max_attempts == Some(0) {
            return fail("max_attempts must be at least 1 (or None for no limit)".into());
        }
        Ok(self)
    }
}

/// Builds a validated [`RetryPolicy`].
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
}

impl RetryPolicyBuilder {
    /// The delay before the first retry (must be above zero).
    pub fn initial_interval(mut self, interval: Duration) -> Self {
        self.policy.initial_interval = interval;
        self
    }

    /// The growth factor per retry (at least 1.0).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.policy.multiplier = multiplier;
        self
    }

    /// The cap on any delay, applied after jitter.
    pub fn max_interval(mut self, interval: Duration) -> Self {
        self.policy.max_interval = interval;
        self
    }

    /// Attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = Some(attempts);
        self
    }

    /// Retry until success or an operator steps in.
    pub fn unlimited_attempts(mut self) -> Self {
        self.policy.max_attempts = None;
        self
    }

    /// The randomization factor in `0.0..=1.0`.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.policy.jitter = jitter;
        self
    }

    /// An error code that fails the step permanently at once.
    pub fn non_retryable(mut self, code: impl Into<String>) -> Self {
        self.policy.non_retryable.push(code.into());
        self
    }

    /// Checks every field and returns the policy, or says which field is wrong.
    pub fn build(self) -> Result<RetryPolicy, ProtocolError> {
        self.policy.validated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_out_of_range_fields() {
        let zero = RetryPolicy::builder()
            .initial_interval(Duration::ZERO)
            .build();
        assert!(
            matches!(zero, Err(ProtocolError::InvalidRetryPolicy(m)) if m.contains("initial_interval"))
        );
        let shrinking = RetryPolicy::builder().multiplier(0.5).build();
        assert!(shrinking.is_err());
        let jitter = RetryPolicy::builder().jitter(1.5).build();
        assert!(jitter.is_err());
        let cap = RetryPolicy::builder()
            .initial_interval(Duration::from_secs(5))
            .max_interval(Duration::from_secs(1))
            .build();
        assert!(cap.is_err());
        assert!(RetryPolicy::builder().max_attempts(0).build().is_err());
    }

    #[test]
    fn round_trips_through_json_and_validates_on_the_way_in() {
        let policy = RetryPolicy::builder()
            .max_attempts(3)
            .non_retryable("card_declined")
            .build()
            .unwrap();
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(json["initial_interval_ms"], 200);
        let back: RetryPolicy = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, policy);

        let mut bad = json;
        bad["jitter"] = serde_json::json!(7.0);
        let err = serde_json::from_value::<RetryPolicy>(bad).unwrap_err();
        assert!(err.to_string().contains("jitter"), "{err}");
    }

    #[test]
    fn counts_attempts_and_codes() {
        let policy = RetryPolicy::builder()
            .max_attempts(2)
            .non_retryable("fatal")
            .build()
            .unwrap();
        assert!(policy.allows_attempt_after(1));
        assert!(!policy.allows_attempt_after(2));
        assert!(!policy.retries_code("fatal"));
        assert!(policy.retries_code("busy"));
        let forever = RetryPolicy::builder().unlimited_attempts().build().unwrap();
        assert!(forever.allows_attempt_after(1_000_000));
    }
}
