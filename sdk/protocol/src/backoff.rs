//! Retry delays, computed with the `backoff` crate.
//!
//! This is the only module that touches `backoff`: the crate is flagged unmaintained
//! (RUSTSEC-2025-0012, recorded in `deny.toml`), so replacing it must stay a one-file change.
//!
//! Its callers:
//! - the engine's shell, which draws the jittered delay for a step's next attempt and hands it
//!   to the pure state machine through the [`RetryDelays`] trait ([`RandomizedDelays`] in
//!   production, [`ExactDelays`] where a trace must be reproducible);
//! - in-process retries of infrastructure calls: a call that may give up (connecting to the
//!   database at start-up) through [`retry_infrastructure`], and the loops that serve for as long
//!   as the process runs (pulling commands and replies, polling the store) through [`Backoff`].

use std::future::Future;
use std::time::Duration;

// The crate's trait, for `next_backoff`; its name is this module's `Backoff` struct's.
use backoff::backoff::Backoff as _;
use backoff::{ExponentialBackoff, ExponentialBackoffBuilder};

use crate::RetryPolicy;

/// Supplies the delay before the next attempt of a step. The state machine asks; the shell
/// decides where randomness comes from.
pub trait RetryDelays {
    /// The delay to wait after `attempts_made` failed attempts (1 after the first failure).
    fn retry_delay(&mut self, policy: &RetryPolicy, attempts_made: u32) -> Duration;
}

/// Production delays: the exponential backoff with the policy's jitter as its randomization
/// factor, clamped to the policy's maximum after the jitter.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomizedDelays;

impl RetryDelays for RandomizedDelays {
    fn retry_delay(&mut self, policy: &RetryPolicy, attempts_made: u32) -> Duration {
        jittered_delay(policy, attempts_made, policy.jitter())
    }
}

/// Delays without jitter: exactly `initial * multiplier^(n-1)`, capped. For reproducible traces.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExactDelays;

impl RetryDelays for ExactDelays {
    fn retry_delay(&mut self, policy: &RetryPolicy, attempts_made: u32) -> Duration {
        jittered_delay(policy, attempts_made, 0.0)
    }
}

fn jittered_delay(policy: &RetryPolicy, attempts_made: u32, randomization: f64) -> Duration {
    let mut schedule = exponential(policy, randomization);
    // `ExponentialBackoff` is stateful: each call moves to the next interval. Step it to the
    // retry we are computing; intervals stop growing at the cap, so at most a few dozen steps
    // matter before the interval is pinned there.
    let steps = attempts_made.clamp(1, 64);
    let mut delay = policy.initial_interval();
    for _ in 0..steps {
        // `max_elapsed_time` is `None`, so `next_backoff` always yields an interval.
        delay = schedule.next_backoff().unwrap_or(policy.max_interval());
    }
    // The crate caps before applying jitter; the contract is a cap on the actual wait.
    delay.min(policy.max_interval())
}

fn exponential(policy: &RetryPolicy, randomization: f64) -> ExponentialBackoff {
    ExponentialBackoffBuilder::new()
        .with_initial_interval(policy.initial_interval())
        .with_multiplier(policy.multiplier())
        .with_max_interval(policy.max_interval())
        .with_randomization_factor(randomization)
        .with_max_elapsed_time(None)
        .build()
}

/// The back-off of a loop that serves for as long as the process runs (pulling commands or
/// replies, polling timers, reading the outbox) and must outlive any outage of the broker or the
/// database: it never gives up, it waits longer after each failure in a row (jittered, so a fleet
/// restarted by the same outage does not retry in step), and starts over after a success.
///
/// ```
/// # use sagaflow_protocol::backoff::Backoff;
/// let mut backoff = Backoff::infrastructure();
/// let first = backoff.next_delay();
/// assert_eq!(backoff.failures(), 1);
/// assert!(first <= Backoff::infrastructure_policy().max_interval());
/// assert_eq!(backoff.reset(), 1);
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    failures: u32,
}

impl Backoff {
    /// A back-off following `policy`'s intervals, multiplier and jitter; its attempt limit is
    /// not consulted (a serving loop has no "last" attempt).
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            failures: 0,
        }
    }

    /// The back-off of the engine's and worker's infrastructure loops
    /// ([`Backoff::infrastructure_policy`]).
    pub fn infrastructure() -> Self {
        Self::new(Self::infrastructure_policy())
    }

    /// 100 ms doubling up to 5 s, 30% jitter, no attempt limit: quick enough that a short blip
    /// costs little, slow enough that a long outage is not hammered.
    pub fn infrastructure_policy() -> RetryPolicy {
        RetryPolicy::builder()
            .initial_interval(Duration::from_millis(100))
            .multiplier(2.0)
            .max_interval(Duration::from_secs(5))
            .jitter(0.3)
            .unlimited_attempts()
            .build()
            // These constants satisfy every rule `build` checks.
            .unwrap_or_default()
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts one more failure and returns how long to wait before trying again.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        RandomizedDelays.retry_delay(&self.policy, self.failures)
    }

    /// Starts over after a success; returns how many failures in a row it ends.
    pub fn reset(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }

    /// Logs a failure of `what` (with the attempt count and the coming delay) and returns the
    /// wait before the next try, to await. (Logged at once, not in the returned future, so the
    /// future holds no borrow of the error and can move between threads.)
    pub fn wait_after_failure(
        &mut self,
        what: &str,
        error: &dyn std::fmt::Display,
    ) -> tokio::time::Sleep {
        let delay = self.next_delay();
        tracing::warn!(
            attempt = self.failures,
            ?delay,
            %error,
            "{what} failed; retrying"
        );
        tokio::time::sleep(delay)
    }

    /// Marks a success of `what`: logs the recovery when failures came before, and starts over.
    pub fn succeeded(&mut self, what: &str) {
        let failures = self.reset();
        if failures > 0 {
            tracing::info!(failures, "{what} works again");
        }
    }
}

/// Why [`retry_infrastructure`] stopped trying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp<E> {
    /// The last error.
    pub error: E,
    /// How many attempts were made (1 when the first error was permanent).
    pub attempts: u32,
    /// Whether the last error was permanent (retrying would not help) rather than the policy
    /// running out.
    pub permanent: bool,
}

/// Retries an infrastructure call (connecting to the database or the broker) under `policy`,
/// sleeping the jittered delay between attempts. Stops at once on an error `is_permanent`
/// calls permanent (a database that does not exist, a refused password: waiting changes
/// nothing), or when the policy runs out. `on_retry` sees each failure that will be retried,
/// with its attempt number and the wait, for logging.
pub async fn retry_infrastructure<T, E, Op, Fut>(
    policy: &RetryPolicy,
    mut operation: Op,
    is_permanent: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(&E, u32, Duration),
) -> Result<T, GaveUp<E>>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(policy.clone());
    loop {
        match operation().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                let attempts = backoff.failures().saturating_add(1);
                let permanent = is_permanent(&error);
                if permanent || !policy.allows_attempt_after(attempts) {
                    return Err(GaveUp {
                        error,
                        attempts,
                        permanent,
                    });
                }
                let delay = backoff.next_delay();
                on_retry(&error, attempts, delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy::builder()
            .initial_interval(Duration::from_millis(100))
            .multiplier(2.0)
            .max_interval(Duration::from_millis(1_000))
            .jitter(jitter)
            .build()
            .unwrap()
    }

    #[test]
    fn exact_delays_grow_exponentially_up_to_the_cap() {
        let p = policy(0.0);
        let delays: Vec<u128> = (1..=6)
            .map(|n| ExactDelays.retry_delay(&p, n).as_millis())
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn randomized_delays_stay_within_the_jitter_band_and_the_cap() {
        let p = policy(0.5);
        for _ in 0..500 {
            let first = RandomizedDelays.retry_delay(&p, 1).as_millis();
            assert!((50..=151).contains(&first), "first retry {first}ms");
            let late = RandomizedDelays.retry_delay(&p, 10);
            assert!(late <= p.max_interval(), "{late:?} above the cap");
            assert!(late.as_millis() >= 500, "{late:?} below the jitter band");
        }
    }

    #[test]
    fn randomized_delays_actually_vary() {
        let p = policy(0.5);
        let draws: std::collections::BTreeSet<u128> = (0..50)
            .map(|_| RandomizedDelays.retry_delay(&p, 2).as_millis())
            .collect();
        assert!(draws.len() > 5, "only {} distinct delays", draws.len());
    }

    #[test]
    fn backoff_grows_to_its_cap_without_giving_up_and_starts_over_after_a_success() {
        let mut backoff = Backoff::new(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(100))
                .multiplier(2.0)
                .max_interval(Duration::from_millis(1_000))
                .jitter(0.0)
                .max_attempts(2)
                .build()
                .unwrap(),
        );
        let delays: Vec<u128> = (0..7).map(|_| backoff.next_delay().as_millis()).collect();
        // Past the policy's two attempts it keeps going, pinned at the cap.
        assert_eq!(delays, vec![100, 200, 400, 800, 1_000, 1_000, 1_000]);
        assert_eq!(backoff.failures(), 7);
        assert_eq!(backoff.reset(), 7);
        assert_eq!(backoff.next_delay().as_millis(), 100);
    }

    #[test]
    fn the_infrastructure_backoff_is_capped_at_a_few_seconds() {
        let mut backoff = Backoff::infrastructure();
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
        assert_eq!(backoff.failures(), 100);
    }

    #[tokio::test]
    async fn retry_infrastructure_stops_at_the_first_permanent_error() {
        let mut calls = 0u32;
        let mut retried = 0u32;
        let result: Result<(), GaveUp<&str>> = retry_infrastructure(
            &policy(0.0),
            || {
                calls += 1;
                async { Err("database \"x\" does not exist") }
            },
            |e| e.contains("does not exist"),
            |_, _, _| retried += 1,
        )
        .await;
        let gave_up = result.unwrap_err();
        assert_eq!((calls, retried), (1, 0));
        assert_eq!(gave_up.attempts, 1);
        assert!(gave_up.permanent);
    }

    #[tokio::test]
    async fn retry_infrastructure_retries_a_transient_error_until_the_policy_runs_out() {
        let quick = RetryPolicy::builder()
            .initial_interval(Duration::from_millis(1))
            .max_interval(Duration::from_millis(2))
            .max_attempts(3)
            .build()
            .unwrap();
        let mut calls = 0u32;
        let mut seen = Vec::new();
        let result: Result<(), GaveUp<&str>> = retry_infrastructure(
            &quick,
            || {
                calls += 1;
                async { Err("connection refused") }
            },
            |_| false,
            |_, attempt, _| seen.push(attempt),
        )
        .await;
        let gave_up = result.unwrap_err();
        assert_eq!(calls, 3);
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(gave_up.attempts, 3);
        assert!(!gave_up.permanent);
    }
}
