//! What a [`Sink`](super::Sink) is built from: a named connection of the
//! daemon file and what the sink needs of its connector (`config` fills
//! them in from the files).

use super::elasticsearch::{ElasticsearchConnection, ElasticsearchTarget};
use super::postgres::{PostgresConnection, PostgresTarget};

/// A named connection in `sinks:` of the daemon file.
#[derive(Debug, Clone)]
pub enum SinkConnection {
    Elasticsearch(ElasticsearchConnection),
    Postgres(PostgresConnection),
}

impl SinkConnection {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConnection::Elasticsearch(_) => "elasticsearch",
            SinkConnection::Postgres(_) => "postgres",
        }
    }
}

/// The table or index a connector writes.
#[derive(Debug, Clone)]
pub enum Target {
    Elasticsearch(ElasticsearchTarget),
    Postgres(PostgresTarget),
}

/// What a sink needs of its connector.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// The connector's name (Postgres keeps its positions under it).
    pub name: String,
    /// The named connection in `sinks:`, for messages.
    pub connection: String,
    pub target: Target,
    /// Whether the connector names a domain version (stale writes are refused).
    pub versioned: bool,
    /// Whether the connector parks keys (`on_error: park`): their store is prepared.
    pub parks: bool,
}
