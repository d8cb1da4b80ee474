//! The subcommands of the `sagaflow` binary.

pub mod act;
pub mod audit;
pub mod common;
pub mod demo;
pub mod history;
pub mod list;
pub mod retention;
pub mod serve;
pub mod show;
pub mod start;
pub mod stuck;
pub mod table;
