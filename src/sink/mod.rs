//! Writing read models.

pub mod postgres;
