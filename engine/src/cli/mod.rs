//! The subcommands of the `sagaflow` binary.

pub mod demo;
pub mod table;
