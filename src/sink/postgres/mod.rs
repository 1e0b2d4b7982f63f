//! The Postgres sink.

pub mod types;
