//! Durable timers: polls the store for sagas whose `wake_at` has come and wakes them.
//!
//! Timers live in the database, never in memory only: after a crash, the first poll finds every
//! retry and timeout that fell due while the engine was down, and none fires before its time
//! because the state machine checks each against `now`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sagaflow_protocol::Timestamp;
use sagaflow_protocol::backoff::Backoff;
use tokio::sync::{Notify, mpsc, watch};

use super::driver::{Inbound, PendingWakes};
use super::leases::Ownership;
use crate::store::Store;

/// How many due sagas one poll takes.
const DUE_BATCH: u64 = 1_000;

pub(crate) async fn run(
    store: Store,
    inbox: mpsc::UnboundedSender<Inbound>,
    pending_wakes: PendingWakes,
    timers_changed: Arc<Notify>,
    planned_wake: Arc<AtomicI64>,
    poll_interval: Duration,
    mut ownership: watch::Receiver<Ownership>,
) {
    let mut backoff = Backoff::infrastructure();
    loop {
        let now = Timestamp::now();
        // Only the timers of the partitions this node holds: the others' owners fire theirs.
        let partitions = ownership
            .borrow_and_update()
            .partitions(tokio::time::Instant::now());
        if partitions.is_empty() {
            tokio::time::sleep(poll_interval).await;
            if inbox.is_closed() {
                return;
            }
            continue;
        }
        match store.due_in(now, DUE_BATCH, Some(&partitions)).await {
            Ok(ids) => {
                backoff.succeeded("polling the timers");
                for id in ids {
                    let newly_pending = pending_wakes
                        .lock()
                        .map(|mut p| p.insert(id))
                        .unwrap_or(true);
                    if newly_pending && inbox.send(Inbound::Wake(id)).is_err() {
                        return;
                    }
                }
            }
            Err(error) => {
                // The database is down: look again after a growing pause, not every poll.
                backoff
                    .wait_after_failure("polling the timers", &error)
                    .await;
                if inbox.is_closed() {
                    return;
                }
                continue;
            }
        }
        let sleep_for = match store.next_wake_in(Some(&partitions)).await {
            Ok(Some(next)) => Timestamp::now()
                .until(next)
                .clamp(Duration::from_millis(5), poll_interval),
            _ => poll_interval,
        };
        planned_wake.store(
            Timestamp::now().plus(sleep_for).as_millis(),
            Ordering::Relaxed,
        );
        tokio::select! {
            _ = tokio::time::sleep(sleep_for) => {}
            _ = timers_changed.notified() => {}
            // A partition just taken over has timers that fell due while its last owner was
            // gone (the attempts it had in flight): fire them now, not at the next poll.
            changed = ownership.changed() => {
                if changed.is_err() {
                    // The lease keeper ended: the engine is stopping.
                    return;
                }
            }
        }
        if inbox.is_closed() {
            return;
        }
    }
}
