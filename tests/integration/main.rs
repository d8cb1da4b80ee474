//! Integration tests, one binary with a module per area (one link instead of many).

mod act;
mod cli;
mod crash;
mod distributed;
mod embedded;
mod fencing;
mod limits;
mod metrics;
mod nats_cluster;
mod ops;
mod python_worker;
mod recovery;
mod scenarios;
mod stale_epoch;
mod startup;
mod store;
mod support;
mod worker_results;
