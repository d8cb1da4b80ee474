//! Retry delays, computed with the `backoff` crate.
//!
//! This is the only module that touches `backoff`: the crate is flagged unmaintained
//! (RUSTSEC-2025-0012, recorded in `deny.toml`), so replacing it must stay a one-file change.
//!
//! Two callers use it:
//! - the engine's shell, which draws the jittered delay for a step's next attempt and hands it
//!   to the pure state machine through the [`RetryDelays`] trait ([`RandomizedDelays`] in
//!   production, [`ExactDelays`] where a trace must be reproducible);
//! - in-process retries of infrastructure calls (reconnecting to the database or NATS), through
//!   [`retry_infrastructure`].

use std::future::Future;
use std::time::Duration;

use backoff::backoff::Backoff;
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

/// Retries an infrastructure call (connecting to the database or the broker) under `policy`,
/// sleeping the jittered delay between attempts, and returns the last error when the policy
/// runs out. `on_retry` sees each failure before the wait, for logging.
pub async fn retry_infrastructure<T, E, Op, Fut>(
    policy: &RetryPolicy,
    mut operation: Op,
    mut on_retry: impl FnMut(&E, Duration),
) -> Result<T, E>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts_made = 0u32;
    loop {
        match operation().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                attempts_made = attempts_made.saturating_add(1);
                if !policy.allows_attempt_after(attempts_made) {
                    return Err(error);
                }
                let delay = RandomizedDelays.retry_delay(policy, attempts_made);
                on_retry(&error, delay);
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
}
