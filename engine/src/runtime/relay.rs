//! The outbox relay: publishes committed step commands and deletes them from the outbox once
//! the broker has them.
//!
//! The driver hands every batch of committed commands straight to the relay (the fast path).
//! A sweep also picks up commands left unsent: those another process committed (an operator's
//! resume from the CLI), and those a crashed engine committed but never published. A command
//! published twice is harmless: brokers de-duplicate by command id, and workers by idempotency
//! key.

use std::sync::Arc;
use std::time::Duration;

use sagaflow_sdk::Timestamp;
use sagaflow_sdk::protocol::StepCommand;
use tokio::sync::mpsc;
use tracing::warn;

use super::transport::Transport;
use crate::store::Store;

/// How old an unsent command must be before the sweep takes it, so that it does not race the
/// fast path for commands committed a moment ago.
const SWEEP_GRACE: Duration = Duration::from_millis(1_000);
/// How often the sweep looks.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// The most commands one publish call carries.
const MAX_BATCH: usize = 1_024;
/// Published commands are deleted from the outbox in one statement at most this often (or once
/// this many wait): the delete is a write of its own, and a command published twice (after a
/// crash before its delete) is dropped by the broker's de-duplication and the workers'
/// idempotency.
const FORGET_EVERY: Duration = Duration::from_millis(100);
const FORGET_AT_MOST: usize = 4_096;

/// Commands for the relay to publish.
pub(crate) struct Outgoing {
    pub commands: Vec<StepCommand>,
    /// Whether they are rows in the outbox, to be deleted once published. The embedded engine does not
    /// write its own commands there: on a restart it re-sends every attempt in flight anyway.
    pub in_outbox: bool,
}

pub(crate) async fn run(
    store: Store,
    transport: Arc<dyn Transport>,
    mut committed: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut forget = tokio::time::interval(FORGET_EVERY);
    let mut published: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            batch = committed.recv() => {
                let Some(first) = batch else {
                    // The driver has ended: forget what went out before ending too.
                    forget_sent(&store, &mut published).await;
                    return;
                };
                let in_outbox = first.in_outbox;
                let mut commands = first.commands;
                while commands.len() < MAX_BATCH {
                    match committed.try_recv() {
                        Ok(more) => commands.extend(more.commands),
                        Err(_) => break,
                    }
                }
                let accepted = publish(transport.as_ref(), &commands).await;
                if in_outbox {
                    published.extend(accepted);
                    if published.len() >= FORGET_AT_MOST {
                        forget_sent(&store, &mut published).await;
                    }
                }
            }
            _ = forget.tick() => forget_sent(&store, &mut published).await,
            _ = sweep.tick() => {
                let now = Timestamp::now();
                let written_by = Timestamp(now.as_millis() - SWEEP_GRACE.as_millis() as i64);
                match store.unsent(written_by, MAX_BATCH as u64).await {
                    Ok(commands) if !commands.is_empty() => {
                        let mut accepted = publish(transport.as_ref(), &commands).await;
                        forget_sent(&store, &mut accepted).await;
                    }
                    Ok(_) => {}
                    Err(error) => warn!(%error, "cannot read the outbox; trying again"),
                }
            }
        }
    }
}

/// Publishes `commands`; returns the ids the broker accepted.
async fn publish(transport: &dyn Transport, commands: &[StepCommand]) -> Vec<String> {
    let accepted = transport.publish(commands).await;
    if accepted.len() < commands.len() {
        warn!(
            unsent = commands.len() - accepted.len(),
            "some step commands were not accepted; the outbox sweep tries them again"
        );
    }
    accepted
}

/// Deletes `published` from the outbox and empties it.
async fn forget_sent(store: &Store, published: &mut Vec<String>) {
    if published.is_empty() {
        return;
    }
    if let Err(error) = store.forget_sent(published).await {
        // They stay and will be published again: duplicates are absorbed downstream.
        warn!(%error, "cannot delete published outbox commands");
    }
    published.clear();
}
