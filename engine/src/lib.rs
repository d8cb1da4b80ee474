//! # Sagaflow engine
//!
//! Runs sagas declared with `sagaflow-sdk`: every transition is persisted before its effects
//! happen, attempts are retried on durable timers, and failures before the pivot are
//! compensated in reverse order. The crate is a functional core with an imperative shell:
//!
//! - [`machine`]: the saga state machine, a pure function `(state, event, now) -> (state,
//!   commands, history)` with no I/O and no clock reads, plus its scripted scenarios.
//! - [`store`]: definitions, instances, attempts and the append-only history in SQLite or
//!   PostgreSQL (sea-orm); every write is conditional on the saga's version, and an engine
//!   node's also on the fencing epoch of the saga's partition lease.
//! - [`cluster`]: which partitions an engine node should take or give back, a pure function
//!   of the nodes and leases it sees.
//! - [`runtime`]: the shell: a driver that applies events in batches and commits each batch in
//!   one transaction, a poller for durable timers, and the transports that carry step commands
//!   (in-process for the embedded mode).
//!
//! Running a saga embedded, on a SQLite file:
//!
//! ```
//! use std::time::Duration;
//!
//! use sagaflow_engine::machine::SagaStatus;
//! use sagaflow_engine::runtime::{Engine, EngineOptions};
//! use sagaflow_engine::store::Store;
//! use sagaflow_sdk::{Saga, Step, StepContext, StepError, StepHandler};
//!
//! struct Greet;
//!
//! impl StepHandler for Greet {
//!     type Input = serde_json::Value;
//!     type Output = String;
//!
//!     async fn execute(&self, _ctx: &StepContext, input: serde_json::Value) -> Result<String, StepError> {
//!         Ok(format!("hello {}", input["name"]))
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("sqlite://{}", dir.path().join("sagas.db").display());
//! let saga = Saga::builder("greet", 1).step(Step::pivot("greet", Greet)).build()?;
//! let store = Store::connect(&url).await?;
//! let engine = Engine::launch(store, vec![saga], EngineOptions::default()).await?;
//!
//! let id = engine.start("greet", serde_json::json!({"name": "ada"}), Some("greet-ada".into())).await?;
//! engine.wait_until_settled(Duration::from_secs(10)).await?;
//! let saga = engine.store().load(id).await?.expect("the saga exists");
//! assert_eq!(saga.state.status, SagaStatus::Completed);
//! assert_eq!(saga.state.outputs["greet"], "hello \"ada\"");
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod cluster;
mod error;
pub mod machine;
pub mod metrics;
pub mod ops;
pub mod runtime;
mod schema;
pub mod store;

pub use error::EngineError;
