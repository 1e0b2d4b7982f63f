//! What a Postgres sink is built from: its connection and its table
//! (`config` fills them in from the files).

use super::types::ColumnType;
use crate::secret::SecretUrl;

/// A `postgres` connection in `sinks:`.
#[derive(Debug, Clone)]
pub struct PostgresConnection {
    pub url: SecretUrl,
    pub max_connections: u32,
}

/// The table a connector writes.
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    pub schema: String,
    pub table: String,
    /// In table order; key columns included.
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    pub create: bool,
    /// Of a created table (10–100); `None`: Postgres' default.
    pub fillfactor: Option<u32>,
    /// How long the version of a deleted key is kept (versioned tables).
    pub tombstone_retention: std::time::Duration,
}

impl PostgresTarget {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
}
