//! Spreading the partitions over the engine nodes (docs/architecture.md §3.1).
//!
//! Every node periodically reads the cluster from the database (the live nodes and each
//! partition's lease, judged by the database's clock), asks [`plan()`] what to do, and carries
//! the answer out with conditional statements: an acquisition succeeds only on a partition that
//! is still free, so two nodes acting on the same reading cannot both win one partition.
//!
//! - [`plan()`]: the pure decision, from one node's [`ClusterView`] to the [`Plan`] of partitions
//!   to acquire and to release. No I/O, no clock: the same view always gives the same plan.
//! - [`fair_share`]: how many partitions the node at a rank among the live nodes should hold.

pub mod plan;

pub use plan::{ClusterView, LeaseState, Plan, fair_share, plan};
