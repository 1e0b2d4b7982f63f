//! Runtime settings: what validation makes of the files, checked and typed.
//! Each stage's settings live in that stage; these are the daemon's and the
//! connector's own, which hold the stages' and hand each its part.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use super::files::{ErrorPolicy, LogFormat, ParkFallback};
use crate::codec::{KeyFormat, RegistryClientSettings};
use crate::projection::expr::Expr;
use crate::projection::{EventRule, ProjectionSettings, TombstonePolicy, UnknownEventPolicy};
use crate::secret::Secret;
use crate::sink::{SinkConnection, SinkSettings, Target};
use crate::source::{KafkaSettings, SourceSettings};
use crate::upcast::online::Consumed;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The daemon file these settings were read from (reloads read it again).
    pub config_file: PathBuf,
    pub kafka: KafkaSettings,
    pub schema_registry: RegistryClientSettings,
    pub sinks: BTreeMap<String, SinkConnection>,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub reload: ReloadSettings,
    pub connectors_dir: PathBuf,
    pub schemas_dir: PathBuf,
    pub connectors: Vec<ConnectorSettings>,
    /// The event catalogue under `schemas_dir`.
    pub catalogue: std::sync::Arc<crate::upcast::catalogue::Catalogue>,
    /// The declarative upcasters of `schemas_dir/upcasters.yaml`.
    pub upcasters: Vec<crate::upcast::steps::Declared>,
}

impl Settings {
    /// What `kawka schemas check` looks for in the registry.
    pub fn consumed(&self) -> Consumed {
        Consumed {
            topics: self.connectors.iter().flat_map(|c| c.source.topics.iter().cloned()).collect(),
            event_types: self.connectors.iter().flat_map(|c| c.events.iter().map(|e| e.event_type.clone())).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

/// When the daemon reloads its files by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSettings {
    /// Look at the files every `interval`; reload when their contents change.
    pub watch: bool,
    pub interval: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// One connector file, checked: the settings of each of its stages.
#[derive(Debug, Clone)]
pub struct ConnectorSettings {
    pub name: String,
    /// The file it came from, for messages.
    pub file: PathBuf,
    pub source: SourceSettings,
    /// How record keys are read (`source.key_format` in the file).
    pub key_format: KeyFormat,
    /// The named connection in `sinks:`.
    pub connection: String,
    pub target: Target,
    /// Key columns (Postgres) or parts of the document id (Elasticsearch),
    /// with the expression of each.
    pub key: Vec<(String, Expr)>,
    pub version: Option<Expr>,
    pub on_error: ErrorPolicy,
    /// How keys are parked (used with `on_error: park`).
    pub park: ParkSettings,
    pub dead_letter_topic: String,
    pub tombstones: TombstonePolicy,
    pub unknown_events: UnknownEventPolicy,
    pub batch: BatchSettings,
    pub events: Vec<EventRule>,
}

impl ConnectorSettings {
    /// What its [`RulesProjection`](crate::projection::RulesProjection) is built from.
    pub fn projection_settings(&self) -> ProjectionSettings {
        ProjectionSettings {
            key: self.key.clone(),
            version: self.version.clone(),
            tombstones: self.tombstones,
            unknown_events: self.unknown_events,
            events: self.events.clone(),
        }
    }

    /// What its [`Sink`](crate::sink::Sink) is built from.
    pub fn sink_settings(&self) -> SinkSettings {
        SinkSettings {
            name: self.name.clone(),
            connection: self.connection.clone(),
            target: self.target.clone(),
            versioned: self.version.is_some(),
            parks: self.on_error == ErrorPolicy::Park,
        }
    }
}

/// `park:` checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkSettings {
    pub max_keys: usize,
    pub fallback: ParkFallback,
}

impl Default for ParkSettings {
    fn default() -> ParkSettings {
        ParkSettings { max_keys: 10_000, fallback: ParkFallback::Stop }
    }
}

#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings { max_events: 5000, max_bytes: 8 << 20, max_wait: Duration::from_millis(200) }
    }
}
