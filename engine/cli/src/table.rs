//! Plain-text tables for people: the engine's renderer, shared with the operator commands.

pub use sagaflow_engine::ops::render::table as render;
