//! # Sagaflow engine
//!
//! - [`machine`]: the saga state machine, a pure function with no I/O.
//! - [`store`]: definitions, instances, attempts and history in SQLite or PostgreSQL.

mod error;
pub mod machine;
pub mod store;

pub use error::EngineError;
