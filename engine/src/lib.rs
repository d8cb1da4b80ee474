//! # Sagaflow engine
//!
//! - [`machine`]: the saga state machine, a pure function with no I/O.
pub mod machine;
