//! The Confluent API's shared wire types: what the registry reads and writes
//! besides schema text.
//!
//! The daemon's registry client (`kawka::codec::registry`) spells the same
//! types on its side; the two crates share the wire format, not code.

use serde::{Deserialize, Serialize};

/// The content type of the Confluent API.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A schema reference as the Confluent API spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaReference {
    pub name: String,
    pub subject: String,
    pub version: i32,
}
