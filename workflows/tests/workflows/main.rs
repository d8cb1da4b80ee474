//! The workflows' tests, one binary with a module per area (one link instead of many).

#[macro_use]
mod common;

mod inventory;
mod payment;
mod sagas;
