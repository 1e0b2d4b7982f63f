//! What an Elasticsearch sink is built from: its connection and its alias
//! (`config` fills them in from the files).

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// An `elasticsearch` connection in `sinks:`.
#[derive(Debug, Clone)]
pub struct ElasticsearchConnection {
    pub url: crate::secret::SecretUrl,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub api_key: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// The index a connector writes, behind an alias.
#[derive(Debug, Clone)]
pub struct ElasticsearchTarget {
    /// The alias readers query.
    pub alias: String,
    pub mappings: Option<serde_json::Value>,
    pub settings: Option<serde_json::Value>,
    pub max_bulk_bytes: usize,
    pub max_bulk_actions: usize,
    pub in_flight: usize,
    /// How long a deleted document's guards are kept.
    pub tombstone_retention: Duration,
}
