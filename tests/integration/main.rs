//! Integration tests, one binary with a module per area (one link instead of many).

mod crash;
mod embedded;
mod scenarios;
mod store;
mod support;
