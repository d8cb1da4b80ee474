//! Operator and audit operations: find sagas, inspect one, read its history, query the history
//! of all of them, and remove old finished sagas. The `sagaflow` CLI is a thin layer over these.
//!
//! Everything here reads through the [`Store`](crate::store::Store)'s connection with the
//! sea-orm query builder: every value a caller passes is a bound parameter, never SQL text.
//! Reads go through indexes (see the `audit_indexes` migration): `list` pages by keyset on
//! `(created_at, id)`, `history` reads the `(saga_id, seq)` primary key, `stuck` the
//! `(status, updated_at)` index.
//!
//! - [`list`]: sagas by status, name and version, current step, time ranges, error text and
//!   start key, oldest first, with an opaque [`Cursor`] for the next page.
//! - [`stuck`]: stuck sagas and active sagas without progress, each with the reason.
//! - [`show`]: one saga step by step, with attempts and idempotency keys.
//! - [`history`]: one saga's complete history as a timeline.
//! - [`audit`] and [`export_jsonl`]: history records of every saga by saga, name, kind, step,
//!   direction, actor and time.
//! - [`Disclosure`]: secret fields shown as `«secret»`, or opened with the operator's keys.
//! - [`retention`]: removes whole finished sagas older than a cutoff.
//! - [`act`] (and [`plan`]): resume, retry now, skip a step, cancel; each recorded with the
//!   operator and the reason, committed conditionally with its step commands in the outbox.
//! - [`act_in_bulk`]: resume or cancel every saga a [`ListFilter`] matches, dry run by default.
//! - [`nodes`]: the engine nodes sharing the database and the partitions each holds.

mod act;
mod audit;
mod cursor;
mod definitions;
mod disclose;
mod inspect;
mod json;
mod list;
mod nodes;
mod page;
#[cfg(test)]
mod plans;
mod query;
pub mod render;
mod retention;
mod stuck;
pub mod time;

pub use act::{
    ActOptions, ActReport, BulkAction, BulkEntry, BulkOutcome, BulkReport, BulkRequest,
    DispatchedAttempt, OutputCheck, PlannedAct, act, act_in_bulk, plan,
};
pub use audit::{ActorFilter, AuditEntry, AuditFilter, AuditPage, audit, export_jsonl};
pub use cursor::Cursor;
pub use disclose::{Disclose, Disclosure};
pub use inspect::{
    ActivityView, AttemptView, HistoryView, OwnershipView, SagaDetail, StepView, StuckView,
    TimelineEntry, history, show,
};
pub use json::{JSON_FORMAT_VERSION, Versioned};
pub use list::{ListFilter, ListPage, SagaSummary, list};
pub use nodes::{LeaseView, NodeState, NodeView, NodesView, nodes};
pub use page::{DEFAULT_PAGE, MAX_PAGE, Page, TimeRange};
pub use retention::{RetentionReport, retention};
pub use stuck::{StuckKind, StuckQuery, StuckReport, StuckSaga, stuck};
