//! The imperative shell around the state machine: one task that takes events in batches, runs
//! the pure transition for each, commits all of a batch's transitions in one transaction, then
//! dispatches the resulting commands.
//!
//! Grouping many sagas' transitions into one commit is what makes the engine fast: the cost of
//! a durable commit is shared by every saga in the batch.
//!
//! The commit path can be a pipeline: while one batch commits (in a task of its own), the next
//! is decided and starts committing too, up to `EngineOptions::commits_in_flight` batches at
//! once (by default [`COMMITS_IN_FLIGHT`], one: no overlap); each batch's
//! commands go to the relay the moment its own commit is done, not after the next one. Two rules
//! keep the order a saga needs: a saga is in at most one committing batch (an event about a saga
//! whose batch is still committing is parked, and decided once that commit's outcome is known,
//! on the state it left), and a batch's commands are handed to the relay only after its commit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sagaflow_protocol::backoff::RandomizedDelays;
use sagaflow_protocol::{Direction, SagaSpec, Timestamp};
use sagaflow_sdk::telemetry;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{Span, debug, error, field, info_span, warn};
use uuid::Uuid;

use super::catalog::Catalog;
use crate::EngineError;
use crate::machine::{
    Activity, Command, Event, Inputs, OperatorCommand, Record, RecordKind, Reply, SagaState,
    SagaStatus, Transition, decide,
};
use crate::metrics::{self, StaleCause};
use crate::store::{Fence, SagaWrite, Store, StoredSaga, WriteOutcome};
use sagaflow_protocol::{StepCommand, StepReply};

use super::commands::{Route, command_for};
use super::leases::{Ownership, changed_partitions};
use super::relay::Outgoing;
use super::transport::Outbound;

/// The most events folded into one commit.
const MAX_BATCH: usize = 512;

/// How many batches may be committing at once by default
/// ([`EngineOptions::commits_in_flight`](super::EngineOptions::commits_in_flight)). One: each
/// batch commits before the next is decided. Two (deciding the next batch while one commits)
/// was measured no faster on a two-core machine where the engine, its workers, PostgreSQL and
/// NATS share the cores (smaller batches, more commits), and the multi-node kill test saw the
/// first write after a takeover come later with it (BENCHMARKS.md, "Performance round"); it
/// stays an option for machines where the commit, not the CPU, is what a step waits on.
pub const COMMITS_IN_FLIGHT: usize = 1;

/// What the driver is asked to do.
pub(crate) enum Inbound {
    Start {
        spec: Arc<SagaSpec>,
        input: Value,
        start_key: Option<String>,
        respond: oneshot::Sender<Result<Uuid, EngineError>>,
    },
    /// A worker's reply, with the acknowledgement to send once its transition is committed and
    /// the span of its receipt (the parent of the transition it causes).
    Reply(StepReply, Option<Acker>, Span),
    Wake(Uuid),
    /// A message about a saga that was refused; recorded in its history.
    Rejected {
        saga_id: Uuid,
        source: String,
        reason: String,
    },
    /// Everything before this is processed, then the driver ends.
    Shutdown,
    Operator {
        saga_id: Uuid,
        command: OperatorCommand,
        respond: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// A saga that stopped moving by itself: completed, compensated or stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The saga.
    pub saga_id: Uuid,
    /// Its status now.
    pub status: crate::machine::SagaStatus,
}

/// What becomes of a broker message once the driver is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// What it caused is durable: acknowledge it.
    Done,
    /// Another node must handle it: deliver it again now.
    Redeliver,
}

/// Settles a broker message once the driver is done with it.
pub(crate) type Acker = Box<dyn FnOnce(Settle) + Send + Sync>;

/// Sagas the timer poller has sent a wake for that the driver has not handled yet.
pub(crate) type PendingWakes = Arc<Mutex<HashSet<Uuid>>>;

pub(crate) struct Driver {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    /// Committed step commands go to the outbox relay, which publishes them.
    pub relay: mpsc::UnboundedSender<Outgoing>,
    /// When the timer poller plans to look next (ms since the epoch): a new timer earlier than
    /// that wakes it, a later one does not.
    pub planned_wake: Arc<std::sync::atomic::AtomicI64>,
    pub inbox: mpsc::UnboundedReceiver<Inbound>,
    pub requeue: mpsc::UnboundedSender<Inbound>,
    pub pending_wakes: PendingWakes,
    pub timers_changed: Arc<Notify>,
    pub cache: HashMap<Uuid, StoredSaga>,
    /// Told about every saga that reaches a terminal status or becomes stuck (after commit).
    pub settled: tokio::sync::broadcast::Sender<Settled>,
    /// The partitions this node may drive, and the fence it writes under.
    pub ownership: watch::Receiver<Ownership>,
    /// Asks the lease keeper for new epochs after a commit whose outcome is unknown.
    pub refence: Arc<Notify>,
    /// The fence of the previous batch: a partition lost, gained or re-fenced since then may
    /// have been written by another node, so what is cached of it is dropped.
    pub seen_fence: Fence,
    /// When the attempt each saga waits on was dispatched (its dispatch committed), to time
    /// the attempt when its reply commits ([`metrics::STEP_ATTEMPT_DURATION`]).
    pub dispatched: HashMap<Uuid, DispatchedAttempt>,
    /// The batches committing now, and what waits for them.
    pub pipeline: Pipeline,
}

/// The batches whose commits are under way, and the events that wait for one of them.
pub(crate) struct Pipeline {
    /// The most batches committing at once (at least 1: then each batch commits before the
    /// next is decided).
    depth: usize,
    /// The commits under way, each ending with its batch and its outcome.
    committing: tokio::task::JoinSet<CommittedBatch>,
    /// The sagas and start keys of each commit under way, by its task.
    batches: HashMap<tokio::task::Id, (Vec<Uuid>, Vec<String>)>,
    /// Sagas in a committing batch: their next events wait for its outcome.
    sagas: HashSet<Uuid>,
    /// Start keys of sagas a committing batch starts, with the saga each names.
    start_keys: HashMap<String, Uuid>,
    /// Events about sagas in a committing batch, in arrival order, by saga.
    parked: HashMap<Uuid, Vec<Inbound>>,
    /// Parked events whose batch has committed, to be decided before anything new.
    ready: VecDeque<Inbound>,
}

impl Pipeline {
    /// A pipeline with up to `depth` batches committing at once.
    pub fn new(depth: usize) -> Self {
        Pipeline {
            depth: depth.max(1),
            committing: tokio::task::JoinSet::new(),
            batches: HashMap::new(),
            sagas: HashSet::new(),
            start_keys: HashMap::new(),
            parked: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// Waits for the next commit under way to end (forever when there is none).
    async fn next_finished(&mut self) -> Finished {
        let Some(joined) = self.committing.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, batch) = match joined {
            Ok((id, batch)) => (id, Some(batch)),
            Err(error) => {
                error!(%error, "a batch's commit task failed; its sagas are read again");
                (error.id(), None)
            }
        };
        let (sagas, start_keys) = self.batches.remove(&id).unwrap_or_default();
        Finished {
            sagas,
            start_keys,
            batch,
        }
    }

    /// Whether another batch may start committing.
    fn has_room(&self) -> bool {
        self.committing.len() < self.depth
    }

    /// Whether nothing is committing or waiting.
    fn is_idle(&self) -> bool {
        self.committing.is_empty() && self.ready.is_empty()
    }

    /// Keeps the events a batch may decide now, and parks the rest: events about a saga whose
    /// batch is committing, and starts whose key such a batch is taking.
    fn sift(&mut self, batch: Vec<Inbound>) -> Vec<Inbound> {
        if self.sagas.is_empty() {
            return batch;
        }
        let mut now = Vec::with_capacity(batch.len());
        for inbound in batch {
            let waits_for = match &inbound {
                Inbound::Start {
                    start_key: Some(key),
                    ..
                } => self.start_keys.get(key).copied(),
                other => saga_of(other).filter(|id| self.sagas.contains(id)),
            };
            match waits_for {
                Some(saga_id) => self.parked.entry(saga_id).or_default().push(inbound),
                None => now.push(inbound),
            }
        }
        now
    }

    /// Takes a batch's sagas and start keys out of the pipeline, and makes the events parked
    /// behind them ready.
    fn release(&mut self, sagas: &[Uuid], start_keys: &[String]) {
        for key in start_keys {
            self.start_keys.remove(key);
        }
        for saga_id in sagas {
            self.sagas.remove(saga_id);
            if let Some(events) = self.parked.remove(saga_id) {
                self.ready.extend(events);
            }
        }
    }
}

/// The saga an event is about (none for a start or a shutdown).
fn saga_of(inbound: &Inbound) -> Option<Uuid> {
    match inbound {
        Inbound::Reply(reply, _, _) => Some(reply.saga_id),
        Inbound::Rejected { saga_id, .. } | Inbound::Operator { saga_id, .. } => Some(*saga_id),
        Inbound::Wake(id) => Some(*id),
        Inbound::Start { .. } | Inbound::Shutdown => None,
    }
}

/// A batch whose commit has ended: what the driver needs to settle it.
struct CommittedBatch {
    works: Vec<Pending>,
    dispatches: Vec<Vec<StepCommand>>,
    outcomes: Result<Vec<WriteOutcome>, EngineError>,
    now: Timestamp,
    ownership: Ownership,
}

/// A commit task's end: the batch's sagas and start keys (to release them even if the task
/// failed), and the batch, unless the task panicked.
struct Finished {
    sagas: Vec<Uuid>,
    start_keys: Vec<String>,
    batch: Option<CommittedBatch>,
}

/// The attempt a saga waits on and when its dispatch was committed.
pub(crate) struct DispatchedAttempt {
    step: String,
    direction: Direction,
    attempt: u32,
    at: std::time::Instant,
}

/// One saga's accumulated work within a batch.
struct Pending {
    spec: Arc<SagaSpec>,
    base: Option<StoredSaga>,
    state: SagaState,
    records: Vec<Record>,
    commands: Vec<Command>,
    start_key: Option<String>,
    events: Vec<Inbound>,
    start_responders: Vec<oneshot::Sender<Result<Uuid, EngineError>>>,
    operator_responders: Vec<oneshot::Sender<Result<(), EngineError>>>,
    /// The span of this batch's transition of the saga, in the saga's trace.
    span: Span,
}

impl Driver {
    /// Re-sends every attempt that was in flight when the engine last stopped: in the embedded
    /// mode the worker pool died with the process, so those commands are gone. The same attempt
    /// and idempotency key go out again; the handlers' idempotency absorbs any duplicate.
    pub async fn recover(&mut self) -> Result<usize, EngineError> {
        // Every outbox command is an in-flight attempt re-sent below (or a stale one).
        self.store.clear_outbox().await?;
        let (ownership, _) = self.current_ownership();
        let owned = ownership.partitions(tokio::time::Instant::now());
        self.resend_in_flight(&ownership.fence, &owned).await
    }

    /// Sends again, under this node's epoch, the attempt each active saga of `partitions` waits
    /// on. For partitions just taken over this is what makes the takeover quick: the previous
    /// owner's commands may be lost with it, and the replies it took but never acknowledged
    /// come back only after the consumer's ack wait; the re-sent attempt (same attempt, same
    /// idempotency key) is answered at once, from the worker's record if it already ran.
    async fn resend_in_flight(
        &mut self,
        fence: &Fence,
        partitions: &[u32],
    ) -> Result<usize, EngineError> {
        if partitions.is_empty() {
            return Ok(0);
        }
        let ids = self.store.active(Some(partitions)).await?;
        let mut resent = 0;
        for chunk in ids.chunks(500) {
            for stored in self.store.load_many(chunk).await? {
                if let Activity::InFlight { .. } = stored.state.activity {
                    let spec = self.spec_of(&stored.state)?;
                    let route = self.route(fence, stored.state.saga_id);
                    if let Some(command) = resend_command(&stored.state, &spec, route) {
                        let _ = self.relay.send(Outgoing {
                            commands: vec![Outbound::uncaused(command)],
                            in_outbox: false,
                        });
                        resent += 1;
                    }
                }
                self.cache.insert(stored.state.saga_id, stored);
            }
        }
        Ok(resent)
    }

    /// Re-sends the in-flight attempts of the partitions this node has just gained (or holds
    /// under a new epoch). A failure is only logged: each attempt's deadline still re-sends it.
    async fn take_up(&mut self, ownership: &Ownership, changed: &BTreeSet<u32>) {
        let now = tokio::time::Instant::now();
        let gained: Vec<u32> = changed
            .iter()
            .copied()
            .filter(|p| ownership.holds(*p, now))
            .collect();
        match self.resend_in_flight(&ownership.fence, &gained).await {
            Ok(0) => {}
            Ok(resent) => debug!(
                resent,
                partitions = gained.len(),
                "re-sent the in-flight attempts of partitions taken up"
            ),
            Err(error) => warn!(
                %error,
                "cannot re-send the in-flight attempts of partitions taken up; their deadlines will"
            ),
        }
    }

    /// Takes events in batches until the inbox closes or a [`Inbound::Shutdown`] comes, then
    /// waits for every batch committing and decides what was parked behind them, and ends.
    pub async fn run(mut self) {
        let mut watching = true;
        let mut stopping = false;
        loop {
            if stopping && self.pipeline.is_idle() {
                return;
            }
            let room = self.pipeline.has_room();
            let take_inbox = room && !stopping && self.pipeline.ready.is_empty();
            let take_ready = room && !self.pipeline.ready.is_empty();
            let first = tokio::select! {
                biased;
                finished = self.pipeline.next_finished(),
                    if !self.pipeline.committing.is_empty() => {
                    self.finish(finished);
                    continue;
                }
                changed = self.ownership.changed(), if watching => {
                    if changed.is_err() {
                        // The lease keeper is gone (shutting down): nothing more to take up.
                        watching = false;
                    } else {
                        let (ownership, changed) = self.current_ownership();
                        if !changed.is_empty() {
                            self.take_up(&ownership, &changed).await;
                        }
                    }
                    continue;
                }
                () = std::future::ready(()), if take_ready => None,
                next = self.inbox.recv(), if take_inbox => match next {
                    Some(first) => Some(first),
                    None => {
                        stopping = true;
                        continue;
                    }
                },
            };
            if matches!(first, Some(Inbound::Reply(_, Some(_), _))) {
                // Replies from the broker come in bursts (a worker's group answers at once),
                // and the first of a burst wakes this task before the others are read: one
                // yield lets the readers already running hand them over, so the burst is one
                // commit, not two. (Replies of in-process handlers come one by one; there the
                // yield only cost time, about 7% of the embedded benchmark's rate.)
                tokio::task::yield_now().await;
            }
            let mut batch: Vec<Inbound> = first.into_iter().collect();
            while batch.len() < MAX_BATCH {
                match self.pipeline.ready.pop_front() {
                    Some(next) => batch.push(next),
                    None => break,
                }
            }
            while !stopping && batch.len() < MAX_BATCH {
                match self.inbox.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            if let Some(at) = batch.iter().position(|i| matches!(i, Inbound::Shutdown)) {
                batch.truncate(at);
                stopping = true;
            }
            let batch = self.pipeline.sift(batch);
            if batch.is_empty() {
                continue;
            }
            let (size, began) = (batch.len(), std::time::Instant::now());
            self.process(batch).await;
            tracing::trace!(
                size,
                took_us = began.elapsed().as_micros() as u64,
                "batch decided"
            );
        }
    }

    /// The partition of `saga_id` and this node's epoch for it (0 where it holds none: such a
    /// write is fenced off, and its commands never sent).
    fn route(&self, fence: &Fence, saga_id: Uuid) -> Route {
        let partition = self.store.partition_of(saga_id);
        Route {
            partition,
            epoch: fence.epochs.get(&partition).copied().unwrap_or(0),
        }
    }

    /// A worker refused the attempt the saga waits on because it came under a superseded epoch
    /// (sent by this partition's previous owner): the same attempt goes out again under this
    /// node's epoch, instead of waiting for its deadline.
    fn resend_after_stale_refusal(&self, work: &Pending, fence: &Fence) -> Option<StepCommand> {
        let Activity::InFlight {
            step,
            direction,
            attempt,
            ..
        } = work.state.activity
        else {
            return None;
        };
        let refused_now = work.events.iter().any(|event| match event {
            Inbound::Reply(reply, _, _) => {
                reply.step_index == step
                    && reply.direction == direction
                    && reply.attempt == attempt
                    && reply.is_stale_epoch_refusal()
            }
            _ => false,
        });
        if !refused_now {
            return None;
        }
        let route = self.route(fence, work.state.saga_id);
        resend_command(&work.state, &work.spec, route)
    }

    fn spec_of(&self, state: &SagaState) -> Result<Arc<SagaSpec>, EngineError> {
        self.catalog.spec(&state.name, Some(state.version))
    }

    /// The ownership to drive under, and the partitions whose lease changed hands or epoch
    /// since it was last looked at (what is cached of them is forgotten).
    fn current_ownership(&mut self) -> (Ownership, BTreeSet<u32>) {
        let ownership = self.ownership.borrow_and_update().clone();
        if ownership.fence == self.seen_fence {
            return (ownership, BTreeSet::new());
        }
        let changed = changed_partitions(&self.seen_fence, &ownership.fence);
        let store = &self.store;
        self.cache
            .retain(|id, _| !changed.contains(&store.partition_of(*id)));
        self.seen_fence = ownership.fence.clone();
        (ownership, changed)
    }

    /// A new saga id in one of `owned` (sorted), so this node is its writer.
    fn new_saga_id(&self, owned: &[u32]) -> Uuid {
        loop {
            let id = Uuid::now_v7();
            if owned.binary_search(&self.store.partition_of(id)).is_ok() {
                return id;
            }
        }
    }

    async fn process(&mut self, batch: Vec<Inbound>) {
        let now = Timestamp::now();
        let (ownership, changed) = self.current_ownership();
        if !changed.is_empty() {
            self.take_up(&ownership, &changed).await;
        }
        let owned = ownership.partitions(tokio::time::Instant::now());
        let mut order: Vec<Uuid> = Vec::new();
        let mut pending: HashMap<Uuid, Pending> = HashMap::new();
        if let Err(error) = self.load_missing(&batch).await {
            error!(%error, "cannot load sagas; retrying the batch shortly");
            self.retry_later(batch);
            return;
        }
        let start_keys = match self.existing_start_keys(&batch).await {
            Ok(keys) => keys,
            Err(error) => {
                error!(%error, "cannot look up start keys; retrying the batch shortly");
                self.retry_later(batch);
                return;
            }
        };
        let mut keys_in_batch: HashMap<String, Uuid> = HashMap::new();
        for inbound in batch {
            match inbound {
                Inbound::Start {
                    spec,
                    input,
                    start_key,
                    respond,
                } => {
                    if let Some(key) = &start_key
                        && let Some(id) = start_keys.get(key).or_else(|| keys_in_batch.get(key))
                    {
                        let _ = respond.send(Ok(*id));
                        continue;
                    }
                    if owned.is_empty() {
                        let _ = respond.send(Err(EngineError::NoPartitions));
                        continue;
                    }
                    let saga_id = self.new_saga_id(&owned);
                    let state = SagaState::new(saga_id, &spec, input.clone(), now);
                    let transition = match apply(&state, &spec, Event::Start, now) {
                        Ok(t) => t,
                        Err(error) => {
                            let _ = respond.send(Err(error));
                            continue;
                        }
                    };
                    if let Some(key) = &start_key {
                        keys_in_batch.insert(key.clone(), saga_id);
                    }
                    let span = transition_span(saga_id, &spec.name, &ownership.fence.node, "start");
                    telemetry::join_saga_trace(&span, saga_id, None);
                    order.push(saga_id);
                    pending.insert(
                        saga_id,
                        Pending {
                            spec,
                            base: None,
                            state: transition.state,
                            records: transition.history,
                            commands: transition.commands,
                            start_key,
                            events: Vec::new(),
                            start_responders: vec![respond],
                            operator_responders: Vec::new(),
                            span,
                        },
                    );
                }
                other => self.fold_event(other, now, &mut order, &mut pending),
            }
        }
        self.launch_commit(order, pending, now, ownership);
    }

    /// Applies one reply, wake or operator command to the saga's latest state in this batch.
    fn fold_event(
        &mut self,
        inbound: Inbound,
        now: Timestamp,
        order: &mut Vec<Uuid>,
        pending: &mut HashMap<Uuid, Pending>,
    ) {
        let (saga_id, event) = match &inbound {
            Inbound::Reply(reply, _, _) => (reply.saga_id, Event::Reply(machine_reply(reply))),
            Inbound::Rejected {
                saga_id,
                source,
                reason,
            } => (
                *saga_id,
                Event::Rejected {
                    source: source.clone(),
                    reason: reason.clone(),
                },
            ),
            Inbound::Wake(id) => {
                if let Ok(mut wakes) = self.pending_wakes.lock() {
                    wakes.remove(id);
                }
                (*id, Event::TimerFired)
            }
            Inbound::Operator {
                saga_id, command, ..
            } => (*saga_id, Event::Operator(command.clone())),
            Inbound::Start { .. } | Inbound::Shutdown => return,
        };
        if let Entry::Vacant(slot) = pending.entry(saga_id) {
            let Some(stored) = self.cache.get(&saga_id).cloned() else {
                match inbound {
                    Inbound::Reply(reply, acker, span) => {
                        warn!(
                            parent: &span,
                            saga = %reply.saga_id,
                            command = %reply.command_id,
                            "reply for an unknown saga; dropped"
                        );
                        acknowledge(vec![Inbound::Reply(reply, acker, span)]);
                    }
                    Inbound::Operator { respond, .. } => {
                        let _ = respond.send(Err(EngineError::UnknownSaga(saga_id)));
                    }
                    _ => {}
                }
                return;
            };
            let spec = match self.spec_of(&stored.state) {
                Ok(spec) => spec,
                Err(error) => {
                    error!(saga = %saga_id, %error, "saga's definition is not registered here");
                    return;
                }
            };
            let span = transition_span(
                saga_id,
                &spec.name,
                &self.seen_fence.node,
                event_name(&inbound),
            );
            match &inbound {
                Inbound::Reply(_, _, received) => telemetry::follow(&span, received, saga_id),
                _ => telemetry::join_saga_trace(&span, saga_id, None),
            }
            order.push(saga_id);
            slot.insert(Pending {
                span,
                spec,
                state: stored.state.clone(),
                base: Some(stored),
                records: Vec::new(),
                commands: Vec::new(),
                start_key: None,
                events: Vec::new(),
                start_responders: Vec::new(),
                operator_responders: Vec::new(),
            });
        }
        let Some(work) = pending.get_mut(&saga_id) else {
            return;
        };
        match apply(&work.state, &work.spec, event, now) {
            Ok(transition) => {
                work.state = transition.state;
                work.records.extend(transition.history);
                work.commands.extend(transition.commands);
                match inbound {
                    Inbound::Operator { respond, .. } => work.operator_responders.push(respond),
                    other => work.events.push(other),
                }
            }
            Err(error) => match inbound {
                Inbound::Operator { respond, .. } => {
                    let _ = respond.send(Err(error));
                }
                other => {
                    error!(saga = %saga_id, %error, "event refused by the state machine");
                    // Redelivering it would be refused the same way.
                    acknowledge(vec![other]);
                }
            },
        }
    }

    /// Starts committing a decided batch in a task of its own; [`Driver::finish`] settles it
    /// when the commit ends. A batch with nothing to write is settled at once.
    fn launch_commit(
        &mut self,
        order: Vec<Uuid>,
        mut pending: HashMap<Uuid, Pending>,
        now: Timestamp,
        ownership: Ownership,
    ) {
        let works: Vec<Pending> = order.iter().filter_map(|id| pending.remove(id)).collect();
        let dispatches: Vec<Vec<StepCommand>> = works
            .iter()
            .map(|w| {
                let route = self.route(&ownership.fence, w.state.saga_id);
                w.commands
                    .iter()
                    .filter_map(|c| match c {
                        Command::Dispatch(dispatch) => {
                            Some(command_for(&w.state, dispatch.clone(), route))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let batch_size = works.iter().filter(|w| writes_something(w)).count();
        for work in works.iter().filter(|w| writes_something(w)) {
            describe_transition(work, batch_size);
        }
        if batch_size == 0 {
            self.settle(CommittedBatch {
                works,
                dispatches,
                outcomes: Ok(Vec::new()),
                now,
                ownership,
            });
            return;
        }
        // Leases that may have lapsed hold nothing: every write is then fenced off without
        // asking the database.
        let fence = if ownership.is_valid(tokio::time::Instant::now()) {
            ownership.fence.clone()
        } else {
            Fence {
                node: ownership.fence.node.clone(),
                epochs: Default::default(),
            }
        };
        let sagas: Vec<Uuid> = works.iter().map(|w| w.state.saga_id).collect();
        let new_keyed: Vec<(String, Uuid)> = works
            .iter()
            .filter(|w| w.base.is_none())
            .filter_map(|w| Some((w.start_key.clone()?, w.state.saga_id)))
            .collect();
        self.pipeline.sagas.extend(sagas.iter().copied());
        self.pipeline.start_keys.extend(new_keyed.iter().cloned());
        let start_keys: Vec<String> = new_keyed.into_iter().map(|(key, _)| key).collect();
        let store = self.store.clone();
        let task = self.pipeline.committing.spawn(async move {
            let outcomes = commit_batch(&store, &works, &fence, now).await;
            CommittedBatch {
                works,
                dispatches,
                outcomes,
                now,
                ownership,
            }
        });
        self.pipeline.batches.insert(task.id(), (sagas, start_keys));
    }

    /// Settles a batch whose commit ended, and lets the events parked behind it go on.
    fn finish(&mut self, finished: Finished) {
        let Finished {
            sagas,
            start_keys,
            batch,
        } = finished;
        match batch {
            Some(batch) => self.settle(batch),
            None => {
                // Whether it was written is not known: what is cached of its sagas is read
                // again, and new epochs make sure nothing written later races it.
                self.refence.notify_one();
                for saga_id in &sagas {
                    self.cache.remove(saga_id);
                }
            }
        }
        self.pipeline.release(&sagas, &start_keys);
    }

    /// What follows a batch's commit: caching what was written, answering and acknowledging
    /// what caused it, handing its commands to the relay; or, where a write was refused,
    /// handing its events on to whoever may write them.
    fn settle(&mut self, batch: CommittedBatch) {
        let CommittedBatch {
            works,
            dispatches,
            outcomes,
            now,
            ownership,
        } = batch;
        let ownership = &ownership;
        if let Ok(outcomes) = &outcomes {
            for (work, outcome) in works.iter().filter(|w| writes_something(w)).zip(outcomes) {
                work.span.record("sagaflow.commit", outcome_name(outcome));
            }
        }
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(error) => {
                error!(%error, "commit failed; nothing of this batch was written");
                // Whether it was written is not known for certain (a commit that timed out may
                // have landed): new epochs make sure nothing written later races it.
                self.refence.notify_one();
                for work in works {
                    self.cache.remove(&work.state.saga_id);
                    for respond in work.start_responders {
                        let _ = respond.send(Err(commit_failure(&error, "starting a saga")));
                    }
                    // The database failed, not a version check: saying "changed by another
                    // writer" would send the operator looking for a rival instead of the outage.
                    for respond in work.operator_responders {
                        let _ = respond
                            .send(Err(commit_failure(&error, "committing an operator action")));
                    }
                    if work.base.is_some() {
                        self.retry_later(work.events);
                    }
                }
                return;
            }
        };
        let mut outcomes = outcomes.into_iter();
        let mut earliest_wake: Option<Timestamp> = None;
        let mut to_publish = Vec::new();
        let mut to_resend = Vec::new();
        for (work, commands) in works.into_iter().zip(dispatches) {
            let saga_id = work.state.saga_id;
            if work.base.is_some() && work.records.is_empty() {
                // Nothing happened (an early wake, a wake for a finished saga): nothing to write
                // or send, and a finished saga need not stay cached.
                if !work.state.status.is_active() {
                    self.cache.remove(&saga_id);
                }
                acknowledge(work.events);
                continue;
            }
            match outcomes.next() {
                Some(WriteOutcome::Committed {
                    row_version,
                    history_seq,
                }) => {
                    metrics::committed(&work.spec.name, &work.records, now);
                    self.time_attempts(&work);
                    if matches!(
                        work.state.status,
                        SagaStatus::Completed | SagaStatus::Compensated
                    ) {
                        telemetry::record_finished_saga(telemetry::FinishedSaga {
                            saga_id,
                            saga: &work.spec.name,
                            version: work.state.version,
                            status: work.state.status.as_str(),
                            started: system_time(work.state.created_at),
                            node: &ownership.fence.node,
                        });
                    }
                    to_publish.extend(commands.into_iter().map(|command| Outbound {
                        command,
                        cause: work.span.clone(),
                    }));
                    if let Some(again) = self.resend_after_stale_refusal(&work, &ownership.fence) {
                        to_resend.push(again);
                    }
                    for command in &work.commands {
                        match command {
                            Command::Dispatch(_) => {}
                            Command::ScheduleWake { at } => {
                                earliest_wake = Some(earliest_wake.map_or(*at, |e| e.min(*at)));
                            }
                            Command::Finish { status } => {
                                debug!(saga = %saga_id, status = status.as_str(), "saga finished");
                            }
                        }
                    }
                    if !work.state.status.is_active() {
                        // Nobody listening is fine: the notification is a convenience.
                        let _ = self.settled.send(Settled {
                            saga_id,
                            status: work.state.status,
                        });
                    }
                    // Only sagas that move by themselves stay cached; a stuck saga waits for an
                    // operator, who may act from another process. Nor a saga whose partition
                    // changed hands or epoch while this batch committed: another node may have
                    // written it since.
                    let partition = self.store.partition_of(saga_id);
                    let same_lease = self.seen_fence.epochs.get(&partition)
                        == ownership.fence.epochs.get(&partition);
                    if !work.state.status.is_active() || !same_lease {
                        self.cache.remove(&saga_id);
                    } else {
                        self.cache.insert(
                            saga_id,
                            StoredSaga {
                                state: work.state,
                                row_version,
                                history_seq,
                            },
                        );
                    }
                    for respond in work.start_responders {
                        let _ = respond.send(Ok(saga_id));
                    }
                    for respond in work.operator_responders {
                        let _ = respond.send(Ok(()));
                    }
                    acknowledge(work.events);
                }
                Some(WriteOutcome::Fenced) => {
                    // The partition's lease is gone: its new owner drives the saga. Replies go
                    // back to the broker at once, which delivers them to that owner.
                    let partition = self.store.partition_of(saga_id);
                    metrics::stale_write(StaleCause::Epoch);
                    redeliver(work.events);
                    warn!(saga = %saga_id, partition, "write fenced off: this node no longer holds the saga's partition");
                    self.cache.remove(&saga_id);
                    for respond in work.start_responders {
                        let _ = respond.send(Err(EngineError::NotOwner { saga_id, partition }));
                    }
                    for respond in work.operator_responders {
                        let _ = respond.send(Err(EngineError::NotOwner { saga_id, partition }));
                    }
                }
                Some(WriteOutcome::StartKeyTaken) => {
                    // Another node started a saga with this key at the same moment: starting
                    // again finds that saga by its key and answers with it.
                    debug!(saga = %saga_id, "start key taken by another node's start; answering with its saga");
                    for respond in work.start_responders {
                        let _ = self.requeue.send(Inbound::Start {
                            spec: work.spec.clone(),
                            input: work.state.input.clone(),
                            start_key: work.start_key.clone(),
                            respond,
                        });
                    }
                }
                Some(WriteOutcome::Stale) | None => {
                    // Another writer got there first: forget what we knew, re-read, re-apply.
                    warn!(saga = %saga_id, "stale write refused; re-reading the saga");
                    metrics::stale_write(StaleCause::Version);
                    self.cache.remove(&saga_id);
                    for respond in work.operator_responders {
                        let _ = respond.send(Err(EngineError::Conflict(saga_id)));
                    }
                    for event in work.events {
                        let _ = self.requeue.send(event);
                    }
                }
            }
        }
        if !to_publish.is_empty() {
            let _ = self.relay.send(Outgoing {
                commands: to_publish,
                in_outbox: false,
            });
        }
        if !to_resend.is_empty() {
            // Not in the outbox: if this send is lost, the attempt's deadline recovers it.
            let _ = self.relay.send(Outgoing {
                commands: to_resend.into_iter().map(Outbound::uncaused).collect(),
                in_outbox: false,
            });
        }
        let planned = self.planned_wake.load(std::sync::atomic::Ordering::Relaxed);
        if earliest_wake.is_some_and(|at| at.as_millis() < planned) {
            self.timers_changed.notify_one();
        }
    }

    /// Times the attempt a committed transition answered (from its dispatch's commit to now)
    /// and notes when the one it dispatched went out.
    fn time_attempts(&mut self, work: &Pending) {
        let saga_id = work.state.saga_id;
        if let Some(waited) = self.dispatched.get(&saga_id) {
            let answered = work.records.iter().any(|r| {
                matches!(
                    r.kind,
                    RecordKind::AttemptSucceeded | RecordKind::AttemptFailed
                ) && r.step.as_deref() == Some(waited.step.as_str())
                    && r.direction == Some(waited.direction)
                    && r.attempt == Some(waited.attempt)
            });
            if answered {
                metrics::attempt_duration(
                    &work.spec.name,
                    &waited.step,
                    waited.direction,
                    waited.at.elapsed(),
                );
                self.dispatched.remove(&saga_id);
            }
        }
        if !work.state.status.is_active() {
            self.dispatched.remove(&saga_id);
            return;
        }
        let dispatched = work
            .records
            .iter()
            .rev()
            .find(|r| r.kind == RecordKind::AttemptDispatched);
        if let Some(record) = dispatched
            && let (Some(step), Some(direction), Some(attempt)) =
                (&record.step, record.direction, record.attempt)
        {
            self.dispatched.insert(
                saga_id,
                DispatchedAttempt {
                    step: step.clone(),
                    direction,
                    attempt,
                    at: std::time::Instant::now(),
                },
            );
        }
    }

    async fn load_missing(&mut self, batch: &[Inbound]) -> Result<(), EngineError> {
        // A wake the cached state does not explain (its own wake-up is later, or it has none)
        // means another writer changed the saga, e.g. an operator acting from the CLI: the
        // timer is in the database, not in the cache, so read the saga again.
        let now = Timestamp::now();
        for inbound in batch {
            if let Inbound::Wake(id) = inbound
                && self
                    .cache
                    .get(id)
                    .is_some_and(|s| s.state.wake_at().is_none_or(|at| at > now))
            {
                self.cache.remove(id);
            }
        }
        let missing: Vec<Uuid> = batch
            .iter()
            .filter_map(|inbound| match inbound {
                Inbound::Reply(reply, _, _) => Some(reply.saga_id),
                Inbound::Rejected { saga_id, .. } => Some(*saga_id),
                Inbound::Wake(id) => Some(*id),
                Inbound::Operator { saga_id, .. } => Some(*saga_id),
                Inbound::Start { .. } | Inbound::Shutdown => None,
            })
            .filter(|id| !self.cache.contains_key(id))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut unknown_definition = false;
        for stored in self.store.load_many(&missing).await? {
            unknown_definition |= self.spec_of(&stored.state).is_err();
            self.cache.insert(stored.state.saga_id, stored);
        }
        if unknown_definition {
            // Another engine (or an earlier run) registered it: the store has every definition.
            for spec in self.store.definitions().await? {
                self.catalog.add_spec(spec);
            }
        }
        Ok(())
    }

    async fn existing_start_keys(
        &self,
        batch: &[Inbound],
    ) -> Result<HashMap<String, Uuid>, EngineError> {
        let keys: Vec<&str> = batch
            .iter()
            .filter_map(|inbound| match inbound {
                Inbound::Start {
                    start_key: Some(key),
                    ..
                } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(self
            .store
            .find_start_keys(&keys)
            .await?
            .into_iter()
            .collect())
    }

    fn retry_later(&self, events: Vec<Inbound>) {
        let requeue = self.requeue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            for event in events {
                let _ = requeue.send(event);
            }
        });
    }
}

/// Whether a saga's work in a batch writes anything: a new saga, or records of a change (an
/// early wake or a wake for a finished saga changes nothing).
fn writes_something(work: &Pending) -> bool {
    work.base.is_none() || !work.records.is_empty()
}

/// Commits the writes of a batch's `works` under `fence`; the outcomes are those of the works
/// that write something, in order.
///
/// Their step commands are not written to the outbox: each is the attempt its saga's new
/// state says is in flight, which can be built again from that state (the relay keeps what the
/// broker did not accept; a partition's next owner re-sends the rest, `Driver::take_up`).
async fn commit_batch(
    store: &Store,
    works: &[Pending],
    fence: &Fence,
    now: Timestamp,
) -> Result<Vec<WriteOutcome>, EngineError> {
    let writes: Vec<SagaWrite<'_>> = works
        .iter()
        .filter(|w| writes_something(w))
        .map(|w| SagaWrite {
            spec: &w.spec,
            base: w.base.as_ref(),
            state: &w.state,
            records: &w.records,
            start_key: w.start_key.as_deref(),
            dispatches: &[],
            now,
        })
        .collect();
    let began = std::time::Instant::now();
    let result = store.commit_fenced(&writes, fence).await;
    let took = began.elapsed();
    metrics::commit(writes.len(), took);
    tracing::trace!(
        writes = writes.len(),
        took_us = took.as_micros() as u64,
        "commit"
    );
    result
}

/// What a caller waiting on a batch whose commit failed is told: the database error itself
/// (each waiter gets a copy, the driver's error is not `Clone`).
fn commit_failure(error: &EngineError, doing: &'static str) -> EngineError {
    let source = match error {
        EngineError::Database { source, .. } | EngineError::Connect { source, .. } => {
            source.clone()
        }
        other => sea_orm::DbErr::Custom(other.to_string()),
    };
    EngineError::Database { doing, source }
}

/// Acknowledges the broker messages behind `events`: what they caused is committed (or was
/// nothing to commit).
fn acknowledge(events: Vec<Inbound>) {
    for event in events {
        if let Inbound::Reply(_, Some(acker), _) = event {
            acker(Settle::Done);
        }
    }
}

/// Hands the broker messages behind `events` back for another delivery now: this node may not
/// write what they cause, the partition's owner will.
fn redeliver(events: Vec<Inbound>) {
    for event in events {
        if let Inbound::Reply(_, Some(acker), _) = event {
            acker(Settle::Redeliver);
        }
    }
}

fn apply(
    state: &SagaState,
    spec: &SagaSpec,
    event: Event,
    now: Timestamp,
) -> Result<Transition, EngineError> {
    Ok(decide(
        state,
        spec,
        event,
        Inputs {
            now,
            delays: &mut RandomizedDelays,
        },
    )?)
}

/// The span of one saga's transition in a batch, caused by an event of kind `event`, from the
/// event's folding to the end of the batch's commit: its step, attempt, resulting status and
/// batch size are recorded before the commit ([`describe_transition`]), and the commit's
/// outcome (`sagaflow.commit`) after it. One span for both: the commit is the batch's, and a
/// span of its own per saga would add a span per saga and batch to what tracing costs.
fn transition_span(saga_id: Uuid, saga: &str, node: &str, event: &'static str) -> Span {
    if !telemetry::traced(saga_id) {
        return Span::none();
    }
    let name = format!("transition {saga}");
    info_span!(
        parent: None,
        "transition",
        otel.name = name.as_str(),
        sagaflow.saga_id = %saga_id,
        sagaflow.saga = saga,
        sagaflow.node = node,
        sagaflow.event = event,
        sagaflow.step = field::Empty,
        sagaflow.direction = field::Empty,
        sagaflow.attempt = field::Empty,
        sagaflow.status = field::Empty,
        sagaflow.batch_size = field::Empty,
        sagaflow.commit = field::Empty,
    )
}

/// What caused a transition, as its span says.
fn event_name(inbound: &Inbound) -> &'static str {
    match inbound {
        Inbound::Start { .. } => "start",
        Inbound::Reply(..) => "reply",
        Inbound::Wake(_) => "timer",
        Inbound::Operator { .. } => "operator",
        Inbound::Rejected { .. } => "rejected",
        Inbound::Shutdown => "shutdown",
    }
}

/// Records on a transition's span the status it leads to, the attempt it is about (the one a
/// reply answered, or else the one it dispatched) and how many sagas share its commit.
fn describe_transition(work: &Pending, batch_size: usize) {
    if work.span.is_disabled() {
        return;
    }
    work.span
        .record("sagaflow.status", work.state.status.as_str());
    work.span.record("sagaflow.batch_size", batch_size);
    let answered = work.events.iter().find_map(|event| match event {
        Inbound::Reply(reply, _, _) => Some((reply.step.as_str(), reply.direction, reply.attempt)),
        _ => None,
    });
    let dispatched = || {
        work.commands.iter().find_map(|command| match command {
            Command::Dispatch(d) => Some((d.step_name.as_str(), d.direction, d.attempt)),
            _ => None,
        })
    };
    if let Some((step, direction, attempt)) = answered.or_else(dispatched) {
        work.span.record("sagaflow.step", step);
        work.span
            .record("sagaflow.direction", tracing::field::display(direction));
        work.span.record("sagaflow.attempt", attempt);
    }
}

/// How a saga's write ended, as its transition's span says.
fn outcome_name(outcome: &WriteOutcome) -> &'static str {
    match outcome {
        WriteOutcome::Committed { .. } => "committed",
        WriteOutcome::Fenced => "fenced",
        WriteOutcome::Stale => "stale",
        WriteOutcome::StartKeyTaken => "start_key_taken",
    }
}

/// `at` as the system clock's time.
fn system_time(at: Timestamp) -> std::time::SystemTime {
    let millis = u64::try_from(at.as_millis()).unwrap_or(0);
    std::time::UNIX_EPOCH + Duration::from_millis(millis)
}

/// A worker's reply as the state machine's event.
fn machine_reply(reply: &StepReply) -> Reply {
    Reply {
        step: reply.step_index,
        direction: reply.direction,
        attempt: reply.attempt,
        result: reply.result(),
        worker: reply.worker.clone(),
    }
}

/// The command for the attempt a saga is waiting on, rebuilt from its state.
fn resend_command(state: &SagaState, spec: &SagaSpec, route: Route) -> Option<StepCommand> {
    let Activity::InFlight {
        step,
        direction,
        attempt,
        deadline,
    } = state.activity
    else {
        return None;
    };
    let name = spec.steps.get(step)?.name.clone();
    let dispatch = crate::machine::Dispatch {
        step,
        idempotency_key: sagaflow_protocol::idempotency_key(state.saga_id, &name, direction),
        forward_key: sagaflow_protocol::idempotency_key(
            state.saga_id,
            &name,
            sagaflow_protocol::Direction::Forward,
        ),
        step_name: name,
        direction,
        attempt,
        deadline,
    };
    Some(command_for(state, dispatch, route))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(saga_id: Uuid) -> Inbound {
        Inbound::Wake(saga_id)
    }

    fn start(key: &str) -> (Inbound, oneshot::Receiver<Result<Uuid, EngineError>>) {
        let (respond, answer) = oneshot::channel();
        let spec = SagaSpec {
            name: "s".into(),
            version: 1,
            steps: Vec::new(),
            deadline: None,
            secret_input: Vec::new(),
        };
        let inbound = Inbound::Start {
            spec: Arc::new(spec),
            input: Value::Null,
            start_key: Some(key.into()),
            respond,
        };
        (inbound, answer)
    }

    fn sagas_of(events: &[Inbound]) -> Vec<Option<Uuid>> {
        events.iter().map(saga_of).collect()
    }

    /// A saga is in one committing batch at most: what arrives about it meanwhile waits, in
    /// arrival order, and is decided after that batch, before anything newer; other sagas and
    /// starts go on at once, except a start whose key a committing batch is taking.
    #[test]
    fn pipelined_commits_keep_each_sagas_order() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut pipeline = Pipeline::new(2);
        assert!(pipeline.has_room() && pipeline.is_idle());
        // Nothing committing: a batch goes through whole.
        let through = pipeline.sift(vec![wake(a), wake(b)]);
        assert_eq!(sagas_of(&through), vec![Some(a), Some(b)]);
        // A batch with `a` and a start keyed `k` (saga `c`) is committing.
        pipeline.sagas.insert(a);
        pipeline.start_keys.insert("k".into(), c);
        let (same_key, mut same_key_answer) = start("k");
        let (other_key, _) = start("other");
        let now = pipeline.sift(vec![
            wake(a),
            wake(b),
            same_key,
            Inbound::Rejected {
                saga_id: a,
                source: "test".into(),
                reason: "second".into(),
            },
            other_key,
        ]);
        // `b` and the other start go on; both events of `a` and the same-key start wait.
        assert_eq!(sagas_of(&now), vec![Some(b), None]);
        assert!(matches!(&now[1], Inbound::Start { start_key: Some(k), .. } if k == "other"));
        assert_eq!(pipeline.parked[&a].len(), 2);
        assert_eq!(pipeline.parked[&c].len(), 1);
        assert!(pipeline.ready.is_empty());
        // The batch's commit ends: what waited is ready, `a`'s events in arrival order.
        pipeline.release(&[a, c], &["k".to_string()]);
        assert!(pipeline.sagas.is_empty() && pipeline.start_keys.is_empty());
        assert!(pipeline.parked.is_empty());
        let ready: Vec<Inbound> = pipeline.ready.drain(..).collect();
        assert_eq!(ready.len(), 3);
        assert!(matches!(ready[0], Inbound::Wake(id) if id == a));
        assert!(
            matches!(&ready[1], Inbound::Rejected { saga_id, reason, .. } if *saga_id == a && reason == "second")
        );
        assert!(matches!(&ready[2], Inbound::Start { start_key: Some(k), .. } if k == "k"));
        // The parked start was neither answered nor dropped while it waited.
        assert!(same_key_answer.try_recv().is_err());
        // Released, the sagas no longer wait.
        let through = pipeline.sift(vec![wake(a)]);
        assert_eq!(sagas_of(&through), vec![Some(a)]);
    }

    #[test]
    fn a_pipeline_has_room_for_at_least_one_batch() {
        assert_eq!(Pipeline::new(0).depth, 1);
        assert_eq!(Pipeline::new(3).depth, 3);
    }
}
