//! Projections: what each event does to the read model.

pub mod expr;
