//! # Sagaflow engine
//!
//! - [`machine`]: the saga state machine, a pure function with no I/O.
//! - [`store`]: definitions, instances, attempts and history in SQLite or PostgreSQL.
//! - [`runtime`]: the shell that runs the machine: batching driver, durable timers, transports.

mod error;
pub mod machine;
pub mod runtime;
pub mod store;

pub use error::EngineError;
