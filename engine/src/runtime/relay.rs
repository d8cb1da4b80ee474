//! The relay: publishes committed step commands, and those the outbox holds.
//!
//! The driver hands every batch of committed commands straight to the relay. They are not
//! written to the outbox: each is the attempt its saga's committed state says is in flight, so
//! it can be built again from that state. One the broker does not accept is kept here and sent
//! again at every sweep (the newest per saga, until its attempt's deadline, after which the
//! attempt's timeout sends a new one); one lost with the engine's process is sent again by the
//! partition's next owner, or by this node when it starts, from the saga's state
//! (`Driver::take_up`, `Driver::recover`).
//!
//! The outbox holds the commands other processes commit (an operator's resume or retry from
//! the CLI): the sweep publishes them and deletes them once the broker has them. A command
//! published twice is harmless: brokers de-duplicate by command id, and workers by idempotency
//! key.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sagaflow_protocol::Timestamp;
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

use super::transport::{Outbound, Transport};
use crate::store::Store;

/// How old an unsent command must be before the sweep takes it, so that it does not race the
/// fast path for commands committed a moment ago.
const SWEEP_GRACE: Duration = Duration::from_millis(1_000);
/// How often the sweep looks.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// The most commands one publish call carries.
const MAX_BATCH: usize = 1_024;
/// Publish calls whose acknowledgements may be awaited at once. Beyond that (a slow or absent
/// broker), committed commands wait in the channel and go out in larger batches.
const PUBLISHES_IN_FLIGHT: usize = 8;
/// Published commands are deleted from the outbox in one statement at most this often (or once
/// this many wait): the delete is a write of its own, and a command published twice (after a
/// crash before its delete) is dropped by the broker's de-duplication and the workers'
/// idempotency.
const FORGET_EVERY: Duration = Duration::from_millis(100);
const FORGET_AT_MOST: usize = 4_096;

/// Commands for the relay to publish.
pub(crate) struct Outgoing {
    pub commands: Vec<Outbound>,
    /// Whether they are rows in the outbox, to be deleted once published. The embedded engine
    /// does not write its own commands there: on a restart it re-sends every attempt in flight
    /// anyway.
    pub in_outbox: bool,
}

pub(crate) async fn run(
    store: Store,
    transport: Arc<dyn Transport>,
    mut committed: mpsc::UnboundedReceiver<Outgoing>,
) {
    // Deleting published commands is a database write: it runs beside the publishing, so a
    // slow delete never holds up the next batch's commands.
    let (published, to_forget) = mpsc::unbounded_channel();
    let forgetter = tokio::spawn(forget_published(store.clone(), to_forget));
    // Publishes whose acknowledgements are awaited, while the next batch goes out.
    let mut in_flight = FuturesUnordered::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut unaccepted = Unaccepted::default();
    // Batches received so far: a later batch holds a saga's later commands.
    let mut received: u64 = 0;
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            batch = committed.recv(), if open && in_flight.len() < PUBLISHES_IN_FLIGHT => {
                let Some(first) = batch else {
                    // The driver has ended: finish what is in flight, then end too.
                    open = false;
                    continue;
                };
                let in_outbox = first.in_outbox;
                let mut commands = first.commands;
                while commands.len() < MAX_BATCH {
                    match committed.try_recv() {
                        Ok(more) => commands.extend(more.commands),
                        Err(_) => break,
                    }
                }
                let transport = transport.clone();
                received += 1;
                let order = received;
                in_flight.push(async move {
                    let accepted = publish(transport.as_ref(), &commands).await;
                    (accepted, in_outbox, commands, order)
                });
            }
            Some((accepted, in_outbox, commands, order)) = in_flight.next(), if !in_flight.is_empty() => {
                if in_outbox {
                    let _ = published.send(accepted);
                } else {
                    let commands = commands.into_iter().map(|c| (order, c)).collect();
                    unaccepted.keep(commands, &accepted);
                    crate::metrics::unpublished(unaccepted.len());
                }
            }
            _ = sweep.tick(), if open => {
                let now = Timestamp::now();
                let (orders, again): (Vec<u64>, Vec<Outbound>) =
                    unaccepted.take_due(now).into_iter().unzip();
                if !again.is_empty() {
                    let accepted = publish(transport.as_ref(), &again).await;
                    unaccepted.keep(orders.into_iter().zip(again).collect(), &accepted);
                }
                crate::metrics::unpublished(unaccepted.len());
                let written_by = Timestamp(now.as_millis() - SWEEP_GRACE.as_millis() as i64);
                match store.unsent(written_by, MAX_BATCH as u64).await {
                    Ok(commands) if !commands.is_empty() => {
                        let commands: Vec<Outbound> =
                            commands.into_iter().map(Outbound::uncaused).collect();
                        let _ = published.send(publish(transport.as_ref(), &commands).await);
                    }
                    Ok(_) => {}
                    Err(error) => warn!(%error, "cannot read the outbox; trying again"),
                }
            }
        }
    }
    if !unaccepted.is_empty() {
        info!(
            commands = unaccepted.len(),
            "step commands the broker did not accept are left to be sent again from their \
             sagas' states when the partitions are next taken"
        );
    }
    drop(published);
    let _ = forgetter.await;
}

/// Committed commands (not in the outbox) the broker did not accept, to be published again:
/// the newest per saga (by the order the relay received them in), as a saga waits on one
/// attempt at a time.
#[derive(Default)]
struct Unaccepted {
    by_saga: HashMap<Uuid, (u64, Outbound)>,
}

impl Unaccepted {
    /// Keeps those of `commands` (each with the order it was received in) whose ids are not
    /// among `accepted`; a saga's command the broker accepted makes an older one kept for it
    /// moot.
    fn keep(&mut self, commands: Vec<(u64, Outbound)>, accepted: &[String]) {
        if accepted.len() == commands.len() && self.by_saga.is_empty() {
            return;
        }
        let accepted: HashSet<&str> = accepted.iter().map(String::as_str).collect();
        for (order, outbound) in commands {
            let saga_id = outbound.command.saga_id;
            let kept_order = self.by_saga.get(&saga_id).map(|(kept, _)| *kept);
            if kept_order.is_some_and(|kept| kept > order) {
                continue;
            }
            if accepted.contains(outbound.command.command_id.as_str()) {
                self.by_saga.remove(&saga_id);
            } else {
                self.by_saga.insert(saga_id, (order, outbound));
            }
        }
    }

    /// Takes the commands to publish again: all kept, less those whose attempt's deadline has
    /// passed (its timeout sends the next attempt).
    fn take_due(&mut self, now: Timestamp) -> Vec<(u64, Outbound)> {
        self.by_saga
            .drain()
            .map(|(_, kept)| kept)
            .filter(|(_, outbound)| outbound.command.deadline.is_none_or(|at| at > now))
            .collect()
    }

    fn len(&self) -> usize {
        self.by_saga.len()
    }

    fn is_empty(&self) -> bool {
        self.by_saga.is_empty()
    }
}

/// Deletes published commands from the outbox, in one statement at most every
/// [`FORGET_EVERY`] (or once [`FORGET_AT_MOST`] wait), until `to_forget` closes.
async fn forget_published(store: Store, mut to_forget: mpsc::UnboundedReceiver<Vec<String>>) {
    let mut waiting: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(FORGET_EVERY);
    loop {
        tokio::select! {
            ids = to_forget.recv() => match ids {
                Some(ids) => {
                    waiting.extend(ids);
                    if waiting.len() >= FORGET_AT_MOST {
                        forget(&store, &mut waiting).await;
                    }
                }
                None => {
                    forget(&store, &mut waiting).await;
                    return;
                }
            },
            _ = tick.tick() => forget(&store, &mut waiting).await,
        }
    }
}

/// Publishes `commands`; returns the ids the broker accepted.
async fn publish(transport: &dyn Transport, commands: &[Outbound]) -> Vec<String> {
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
async fn forget(store: &Store, published: &mut Vec<String>) {
    if published.is_empty() {
        return;
    }
    if let Err(error) = store.forget_sent(published).await {
        // They stay and will be published again: duplicates are absorbed downstream.
        warn!(%error, "cannot delete published outbox commands");
    }
    published.clear();
}
