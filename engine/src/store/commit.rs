//! Assembling a commit: every saga's write of a batch turned into the rows `batch::write`
//! writes at once, and the outcome of each.

use std::collections::{BTreeMap, HashMap};

use sea_orm::DbBackend;

use sea_orm::ActiveValue::Set;

use super::codecs::{SagaColumns, active, history_row, outbox_row};
use super::{AttemptStatus, SagaWrite, Store, WriteOutcome, attempt, batch, saga};
use crate::EngineError;
use crate::machine::{Activity, AttemptOutcome, Record, RecordKind};

/// The leases an engine node writes under: its id and, for each partition it holds, the epoch
/// it acquired the partition's lease with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fence {
    /// The node.
    pub node: String,
    /// Partition to epoch, for every partition the node believes it holds.
    pub epochs: BTreeMap<u32, u64>,
}

impl Store {
    /// Commits several sagas' transitions in one transaction. Each saga's write is kept or
    /// dropped whole: a saga whose row changed since it was read comes back
    /// [`WriteOutcome::Stale`] and nothing of it is written; the others commit.
    ///
    /// Unfenced: for an operator's action from the CLI, which is conditional on the saga's
    /// version only. Engine nodes commit with [`Store::commit_fenced`].
    pub async fn commit(&self, writes: &[SagaWrite<'_>]) -> Result<Vec<WriteOutcome>, EngineError> {
        self.commit_as(writes, None).await
    }

    /// [`Store::commit`] by an engine node under `fence`: a saga's write is kept only while the
    /// node holds its partition's lease under the epoch `fence` names, measured by the
    /// database's clock at the commit, and otherwise comes back [`WriteOutcome::Fenced`] with
    /// nothing written. Every history row records the node and the epoch.
    ///
    /// On SQLite the lease is not checked: one engine holds every partition there, and a
    /// second engine is refused at start (docs/architecture.md §3.1).
    pub async fn commit_fenced(
        &self,
        writes: &[SagaWrite<'_>],
        fence: &Fence,
    ) -> Result<Vec<WriteOutcome>, EngineError> {
        self.commit_as(writes, Some(fence)).await
    }

    async fn commit_as(
        &self,
        writes: &[SagaWrite<'_>],
        fence: Option<&Fence>,
    ) -> Result<Vec<WriteOutcome>, EngineError> {
        let partition_of = |write: &SagaWrite<'_>| self.partition_of(write.state.saga_id);
        // A write in a partition the node does not believe it holds is refused without asking.
        let unheld = |write: &SagaWrite<'_>| {
            fence.is_some_and(|fence| !fence.epochs.contains_key(&partition_of(write)))
        };
        let mut used_epochs: BTreeMap<u32, u64> = BTreeMap::new();
        let mut saga_updates = Vec::new();
        let mut new_sagas = Vec::new();
        let mut history_rows = Vec::new();
        let mut new_attempts = Vec::new();
        let mut attempt_updates = Vec::new();
        let mut outbox_rows = Vec::new();
        // Every saga's rows are built as if its update succeeds; the batch writer leaves out
        // those of sagas whose version moved on.
        for write in writes.iter().filter(|write| !unheld(write)) {
            let partition = partition_of(write);
            let writer = fence.and_then(|fence| {
                let epoch = *fence.epochs.get(&partition)?;
                used_epochs.insert(partition, epoch);
                Some((fence.node.as_str(), epoch))
            });
            let c = SagaColumns::of(write.state)?;
            let saga_id = write.state.saga_id.to_string();
            let now = write.now.as_millis();
            let first_seq = match write.base {
                None => {
                    new_sagas.push(saga::ActiveModel {
                        id: Set(saga_id.clone()),
                        name: Set(write.state.name.clone()),
                        definition_version: Set(write.state.version as i32),
                        status: Set(c.status),
                        current_step: Set(c.current_step),
                        start_key: Set(write.start_key.map(str::to_string)),
                        // Only a new saga writes its input: it never changes afterwards.
                        input: Set(serde_json::to_string(&write.state.input)
                            .map_err(SagaColumns::corrupt(write.state))?),
                        outputs: Set(c.outputs),
                        progress: Set(c.progress),
                        last_error: Set(c.last_error),
                        wake_at: Set(c.wake_at),
                        row_version: Set(1),
                        history_seq: Set(write.records.len() as i64),
                        created_at: Set(write.state.created_at.as_millis()),
                        updated_at: Set(now),
                        partition_id: Set(partition as i32),
                    });
                    1
                }
                Some(base) => {
                    saga_updates.push(batch::SagaUpdate {
                        id: saga_id.clone(),
                        status: c.status,
                        current_step: c.current_step,
                        outputs: c.outputs,
                        progress: c.progress,
                        last_error: c.last_error,
                        wake_at: c.wake_at,
                        row_version: base.row_version + 1,
                        history_seq: base.history_seq + write.records.len() as i64,
                        updated_at: now,
                        expected: base.row_version,
                        partition_id: partition as i32,
                    });
                    base.history_seq + 1
                }
            };
            for (offset, record) in write.records.iter().enumerate() {
                history_rows.push(history_row(
                    &saga_id,
                    first_seq + offset as i64,
                    now,
                    record,
                    writer,
                ));
                attempt_changes(
                    write,
                    &saga_id,
                    now,
                    record,
                    &mut new_attempts,
                    &mut attempt_updates,
                );
            }
            abandoned_attempts(write, &saga_id, now, &mut attempt_updates);
            for command in write.dispatches {
                outbox_rows.push(outbox_row(command, now)?);
            }
        }
        if saga_updates.is_empty() && new_sagas.is_empty() {
            // Every write was refused before asking (no lease held): nothing to send.
            return Ok(vec![WriteOutcome::Fenced; writes.len()]);
        }
        let attempt_updates = fold_into_new_attempts(&mut new_attempts, attempt_updates);
        let fenced_on_postgres = fence.filter(|_| self.backend() == DbBackend::Postgres);
        let _one_writer = match self.backend() {
            DbBackend::Sqlite => Some(self.sqlite_commits.lock().await),
            _ => None,
        };
        let written = batch::write(
            &self.writer,
            batch::BatchWrite {
                fence: fenced_on_postgres.map(|fence| batch::FenceRows {
                    node: fence.node.clone(),
                    epochs: used_epochs.into_iter().collect(),
                }),
                saga_updates,
                new_sagas: batch::Rows::of(new_sagas)?,
                new_attempts: batch::Rows::of(new_attempts)?,
                attempt_updates,
                outbox: batch::Rows::of(outbox_rows)?,
                history: batch::Rows::of(history_rows)?,
            },
        )
        .await?;
        Ok(writes
            .iter()
            .map(|write| {
                let lease_held = written
                    .held
                    .as_ref()
                    .is_none_or(|held| held.contains(&partition_of(write)));
                if unheld(write) || !lease_held {
                    return WriteOutcome::Fenced;
                }
                let id = write.state.saga_id.to_string();
                let last_seq = |base_seq: i64| base_seq + write.records.len() as i64;
                match write.base {
                    None if written.inserted.contains(&id) => WriteOutcome::Committed {
                        row_version: 1,
                        history_seq: last_seq(0),
                    },
                    // Its partition was held, so only the start key can have kept it out.
                    None if write.start_key.is_some() => WriteOutcome::StartKeyTaken,
                    None => WriteOutcome::Fenced,
                    Some(base) if written.updated.contains(&id) => WriteOutcome::Committed {
                        row_version: base.row_version + 1,
                        history_seq: last_seq(base.history_seq),
                    },
                    Some(_) => WriteOutcome::Stale,
                }
            })
            .collect())
    }
}

/// An attempt dispatched and finished within one batch is inserted with its final values, as
/// the batch's parts all see one snapshot (docs/architecture.md §7.1); the updates left are for
/// attempts that existed before.
fn fold_into_new_attempts(
    new_attempts: &mut [attempt::ActiveModel],
    updates: Vec<batch::AttemptUpdate>,
) -> Vec<batch::AttemptUpdate> {
    let mut index: HashMap<(String, i32, String, i32), usize> = HashMap::new();
    for (i, row) in new_attempts.iter().enumerate() {
        let key = (
            active(&row.saga_id).cloned().unwrap_or_default(),
            active(&row.step).copied().unwrap_or_default(),
            active(&row.direction).cloned().unwrap_or_default(),
            active(&row.attempt).copied().unwrap_or_default(),
        );
        index.insert(key, i);
    }
    let mut rest = Vec::new();
    for update in updates {
        match index
            .get(&update.key())
            .and_then(|&i| new_attempts.get_mut(i))
        {
            Some(row) => {
                row.status = Set(update.status.to_string());
                row.finished_at = Set(Some(update.finished_at));
                row.error = Set(update.error);
            }
            None => rest.push(update),
        }
    }
    rest
}

fn attempt_changes(
    write: &SagaWrite<'_>,
    saga_id: &str,
    now: i64,
    record: &Record,
    inserts: &mut Vec<attempt::ActiveModel>,
    updates: &mut Vec<batch::AttemptUpdate>,
) {
    let (Some(step_name), Some(direction), Some(attempt_no)) =
        (&record.step, record.direction, record.attempt)
    else {
        return;
    };
    let Some(step) = write.spec.step_index(step_name) else {
        return;
    };
    let status = match record.kind {
        RecordKind::AttemptDispatched => {
            inserts.push(attempt::ActiveModel {
                saga_id: Set(saga_id.to_string()),
                step: Set(step as i32),
                step_name: Set(step_name.clone()),
                direction: Set(direction.as_str().to_string()),
                attempt: Set(attempt_no as i32),
                idempotency_key: Set(record.detail["idempotency_key"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()),
                status: Set(AttemptStatus::Dispatched.as_str().into()),
                dispatched_at: Set(now),
                deadline: Set(record.detail["deadline"].as_i64()),
                finished_at: Set(None),
                error: Set(None),
            });
            return;
        }
        RecordKind::AttemptSucceeded => AttemptStatus::Succeeded,
        RecordKind::AttemptFailed => AttemptStatus::Failed,
        RecordKind::AttemptTimedOut => AttemptStatus::TimedOut,
        _ => return,
    };
    updates.push(batch::AttemptUpdate {
        saga_id: saga_id.to_string(),
        step: step as i32,
        direction: direction.as_str(),
        attempt: attempt_no as i32,
        status,
        finished_at: now,
        error: record.error.clone(),
    });
}

/// Attempts the saga walked away from (deadline, cancel, skip) are marked so in their rows.
fn abandoned_attempts(
    write: &SagaWrite<'_>,
    saga_id: &str,
    now: i64,
    updates: &mut Vec<batch::AttemptUpdate>,
) {
    let Some(base) = write.base else { return };
    let Activity::InFlight {
        step,
        direction,
        attempt,
        ..
    } = base.state.activity
    else {
        return;
    };
    let abandoned = write
        .state
        .steps
        .get(step)
        .is_some_and(|s| s.attempts(direction).last_outcome == Some(AttemptOutcome::Abandoned));
    if abandoned {
        updates.push(batch::AttemptUpdate {
            saga_id: saga_id.to_string(),
            step: step as i32,
            direction: direction.as_str(),
            attempt: attempt as i32,
            status: AttemptStatus::Abandoned,
            finished_at: now,
            error: None,
        });
    }
}
