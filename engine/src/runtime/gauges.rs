//! Gauges read from the database and the broker, every few seconds while metrics are
//! exported (`EngineOptions::gauges_every`): the unfinished sagas of this node's partitions by
//! status, the stuck backlog and its oldest saga, the outbox backlog and its oldest command,
//! and the lag of the reply consumers this node reads. Each query reads an index whose size
//! follows the unfinished work, not the finished history.
//!
//! A node reports only its own partitions' sagas and consumers, so summing a gauge over the
//! nodes gives the cluster's figure. The outbox is read whole by every node: take its
//! maximum, not its sum.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sagaflow_protocol::{Timestamp, names};
use sagaflow_sdk::metrics as step_metrics;
use tokio::sync::watch;
use tracing::debug;

use super::catalog::Catalog;
use super::leases::Ownership;
use crate::machine::SagaStatus;
use crate::metrics::{self, UNFINISHED};
use crate::store::Store;

/// Refreshes the gauges every `every` until aborted (with the engine's intake on shutdown).
pub(crate) async fn run(
    store: Store,
    catalog: Arc<Catalog>,
    ownership: watch::Receiver<Ownership>,
    broker: Option<jetstream::Context>,
    every: Duration,
) {
    metrics::describe();
    let mut described: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut reported_consumers: BTreeSet<u32> = BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Workers announce definitions while the engine runs: their series start at zero too.
        for spec in catalog.specs() {
            if described.insert((spec.name.clone(), spec.version)) {
                metrics::describe_saga(&spec);
            }
        }
        let owned = ownership.borrow().partitions(tokio::time::Instant::now());
        ::metrics::gauge!(metrics::PARTITIONS_OWNED).set(owned.len() as f64);
        let now = Timestamp::now();
        sagas(&store, &owned, now).await;
        outbox(&store, now).await;
        if let Some(js) = &broker {
            consumers(js, &owned, &mut reported_consumers).await;
        }
    }
}

fn age_seconds(since: Option<Timestamp>, now: Timestamp) -> f64 {
    since.map_or(0.0, |at| {
        (now.as_millis() - at.as_millis()).max(0) as f64 / 1000.0
    })
}

async fn sagas(store: &Store, owned: &[u32], now: Timestamp) {
    let summary = if owned.is_empty() {
        Vec::new()
    } else {
        match store.unfinished_summary(Some(owned)).await {
            Ok(summary) => summary,
            Err(error) => {
                debug!(%error, "cannot count the unfinished sagas for the gauges");
                return;
            }
        }
    };
    for status in UNFINISHED {
        let found = summary.iter().find(|s| s.status == status);
        let count = found.map_or(0, |s| s.count);
        ::metrics::gauge!(metrics::SAGAS, "status" => status.as_str()).set(count as f64);
        if status == SagaStatus::Stuck {
            ::metrics::gauge!(metrics::STUCK_SAGAS).set(count as f64);
            ::metrics::gauge!(metrics::STUCK_OLDEST_AGE)
                .set(age_seconds(found.and_then(|s| s.oldest_change), now));
        }
    }
}

async fn outbox(store: &Store, now: Timestamp) {
    match store.outbox_summary().await {
        Ok((backlog, oldest)) => {
            ::metrics::gauge!(metrics::OUTBOX_BACKLOG).set(backlog as f64);
            ::metrics::gauge!(metrics::OUTBOX_OLDEST_AGE).set(age_seconds(oldest, now));
        }
        Err(error) => debug!(%error, "cannot measure the outbox for the gauges"),
    }
}

/// The lag of the reply consumer of each partition this node reads; a consumer it no longer
/// reads is reported as 0 here (its new reader reports it).
async fn consumers(js: &jetstream::Context, owned: &[u32], reported: &mut BTreeSet<u32>) {
    for partition in owned {
        let consumer = names::engine_consumer(*partition);
        match sagaflow_protocol::consumer_lag(js, names::REPLY_STREAM, &consumer).await {
            Ok((pending, ack_pending)) => {
                step_metrics::consumer_lag(names::REPLY_STREAM, &consumer, pending, ack_pending);
                reported.insert(*partition);
            }
            Err(error) => debug!(%error, "cannot read a reply consumer's lag for the gauges"),
        }
    }
    let gone: Vec<u32> = reported
        .iter()
        .copied()
        .filter(|p| !owned.contains(p))
        .collect();
    for partition in gone {
        step_metrics::consumer_lag(
            names::REPLY_STREAM,
            &names::engine_consumer(partition),
            0,
            0,
        );
        reported.remove(&partition);
    }
}
