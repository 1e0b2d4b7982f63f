//! The shape of the user-facing files, as serde reads them.
//!
//! Every struct denies unknown fields and documents each field; values that
//! need checking beyond their YAML type (durations, sizes, expressions, names
//! of other things) are kept as [`Spanned`] text and checked in
//! `validate/`, which reports them at their line.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::codec::KeyFormat;
use crate::projection::{TombstonePolicy, UnknownEventPolicy};
use crate::secret::{Secret, SecretUrl};
use crate::source::StartPosition;
use crate::yaml::{OrderedMap, Spanned};

/// `config/kawka.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonFile {
    /// The Kafka cluster every connector reads from.
    pub kafka: KafkaConfig,
    /// The Confluent-compatible schema registry that holds writer schemas.
    pub schema_registry: RegistryClientConfig,
    /// Named connections to read-model stores; connectors refer to them by name.
    #[serde(default)]
    pub sinks: OrderedMap<Spanned<SinkConfig>>,
    /// The HTTP server for health, metrics and control.
    #[serde(default)]
    pub http: HttpConfig,
    /// Directory of connector files (every `*.yaml` in it), relative to the
    /// working directory.
    #[serde(default = "default_connectors_dir")]
    pub connectors: Spanned<String>,
    /// Directory of the event catalogue, relative to the working directory.
    #[serde(default = "default_schemas_dir")]
    pub schemas: Spanned<String>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Reloading the files while the daemon runs.
    #[serde(default)]
    pub reload: ReloadConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Reload when the config file or a file under `connectors/` or
    /// `schemas/` changes (default `true`; `SIGHUP` and `POST /reload`
    /// always work).
    pub watch: Option<bool>,
    /// How often the files are looked at (default `2s`).
    pub interval: Option<Spanned<String>>,
}

fn default_connectors_dir() -> Spanned<String> {
    Spanned::new("connectors/".to_string())
}

fn default_schemas_dir() -> Spanned<String> {
    Spanned::new("schemas/".to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: Spanned<String>,
    /// Any librdkafka setting (`security.protocol`, `sasl.*`, `ssl.*`, …),
    /// applied to every consumer and producer.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryClientConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: Spanned<String>,
    /// Basic-auth user.
    pub username: Option<String>,
    /// Basic-auth password; never printed.
    pub password: Option<Secret>,
    /// PEM file of extra CA certificates for `https` URLs.
    pub ca_file: Option<Spanned<String>>,
    /// Timeout of one registry request (default `10s`).
    pub timeout: Option<Spanned<String>>,
}

/// A named connection in `sinks:`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    Elasticsearch {
        /// Base URL of the cluster, e.g. `http://127.0.0.1:9200`; a
        /// password in it is never printed.
        url: SecretUrl,
        /// Basic-auth user.
        username: Option<String>,
        /// Basic-auth password; never printed.
        password: Option<Secret>,
        /// API key (`id:key` or its base64 form); never printed.
        api_key: Option<Secret>,
        /// PEM file of extra CA certificates for `https` URLs.
        ca_file: Option<String>,
        /// Timeout of one request (default `30s`).
        timeout: Option<String>,
    },
    Postgres {
        /// `postgres://user:password@host:port/database`; the password (also
        /// a `?password=` parameter) is never printed.
        url: SecretUrl,
        /// Connections in the pool shared by the connectors using this sink (default 8).
        max_connections: Option<u32>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP server (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: Spanned<String>,
    /// Bearer token required by the mutating endpoints (pause, resume,
    /// rebuild); never printed. Required when `listen` is not a loopback
    /// address (unless `insecure`).
    pub token: Option<Secret>,
    /// Listen beyond loopback without a token: anyone who reaches the port
    /// may pause, resume and rebuild connectors (default `false`).
    #[serde(default)]
    pub insecure: bool,
}

fn default_listen() -> Spanned<String> {
    Spanned::new("127.0.0.1:8080".to_string())
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: default_listen(), token: None, insecure: false }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `kawka=debug,rdkafka=warn`
    /// (default `info`; `RUST_LOG` wins when set).
    pub level: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// One file in `connectors/`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFile {
    /// Unique name; also the default consumer group (`kawka.<name>`).
    pub name: Spanned<String>,
    /// Where events come from.
    pub source: SourceConfig,
    /// Where the read model lives.
    pub sink: TargetConfig,
    /// The read-model key: one expression (`$key`, the default) or a mapping
    /// of key column to expression for a composite key.
    pub key: Option<Spanned<KeyConfig>>,
    /// Expression of a domain version (an aggregate sequence number) that
    /// grows along each key's events; stale writes are then refused.
    pub version: Option<Spanned<String>>,
    /// What to do with an event that can never be written:
    /// `dead_letter` (default), `park`, `skip` or `stop`.
    #[serde(default)]
    pub on_error: ErrorPolicy,
    /// How keys are parked (`on_error: park`).
    pub park: Option<Spanned<ParkConfig>>,
    /// Topic of dead letters (default `<name>.dlq`).
    pub dead_letter_topic: Option<Spanned<String>>,
    /// What a record with a null value means: `delete` (default) or `ignore`.
    #[serde(default)]
    pub tombstones: TombstonePolicy,
    /// An event type missing from `events`: `skip` (default, counted) or `error`.
    #[serde(default)]
    pub unknown_events: UnknownEventPolicy,
    /// When a batch is written.
    #[serde(default)]
    pub batch: BatchConfig,
    /// What each event type does to the read model.
    pub events: OrderedMap<Spanned<OpConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Topics to read; one consumer group reads them all.
    pub topics: Spanned<Vec<String>>,
    /// Where a group with no stored position starts: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start: StartPosition,
    /// Consumer group id (default `kawka.<connector name>`).
    pub group: Option<String>,
    /// How record keys are read: `string` (default, UTF-8), `avro`
    /// (Confluent framed) or `none`.
    #[serde(default)]
    pub key_format: KeyFormat,
    /// librdkafka settings for this connector's consumer only.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Cap on records fetched ahead of processing, e.g. `64MiB` (default).
    pub max_prefetch_bytes: Option<Spanned<String>>,
    /// Largest record (key + value) accepted, e.g. `1MiB` (default); a
    /// larger one is an error of that event.
    pub max_record_bytes: Option<Spanned<String>>,
}

/// `sink:` of a connector. Which fields apply depends on the type of the
/// named connection; `validate` says which are missing or misplaced.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name of a connection in `sinks:` of `config/kawka.yaml`.
    pub to: Spanned<String>,
    /// Elasticsearch: the alias readers query; kawka writes to `<index>-v<N>` behind it.
    pub index: Option<Spanned<String>>,
    /// Elasticsearch: mappings of a newly created index.
    pub mappings: Option<serde_json::Value>,
    /// Elasticsearch: settings of a newly created index.
    pub settings: Option<serde_json::Value>,
    /// Elasticsearch: bulk request limits.
    pub bulk: Option<BulkConfig>,
    /// Postgres: the table (or, once rebuilt, the view) readers query.
    pub table: Option<Spanned<String>>,
    /// Postgres: schema of the table (default `public`).
    pub schema: Option<Spanned<String>>,
    /// Postgres: columns and their SQL types, in table order.
    pub columns: Option<Spanned<OrderedMap<Spanned<String>>>>,
    /// Postgres: the primary-key columns.
    pub primary_key: Option<Spanned<Vec<String>>>,
    /// Postgres: create the table when missing (default true).
    pub create: Option<bool>,
    /// Postgres: the `fillfactor` (10–100) of a table kawka creates. Below
    /// 100 each page keeps room for new row versions, so an update can stay
    /// on its page (a HOT update: no new index entry): for read models whose
    /// rows are updated often. Default: Postgres' own (100).
    pub fillfactor: Option<Spanned<u32>>,
    /// How long the guards of a deleted key are kept (Postgres: with
    /// `version:`; Elasticsearch: always), so that a stale
    /// event arriving later (a late duplicate, a replay, a second writer)
    /// cannot bring the key back, e.g. `7d` (default).
    pub tombstone_retention: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkConfig {
    /// Largest request body, e.g. `5MiB` (default).
    pub max_bytes: Option<Spanned<String>>,
    /// Most actions in one request (default 5000).
    pub max_actions: Option<usize>,
    /// Requests in flight at once (default 2); a key's ops are never reordered.
    pub in_flight: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum KeyConfig {
    One(String),
    Fields(OrderedMap<String>),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    #[default]
    DeadLetter,
    /// Dead-letter the event and hold every later event of its key behind
    /// it, in order, until `kawka dlq replay` or `kawka dlq release`.
    Park,
    Skip,
    Stop,
}

/// `park:` of a connector file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParkConfig {
    /// Most keys parked at once (default 10000).
    pub max_keys: Option<Spanned<usize>>,
    /// What a failure of a key that is not parked does once `max_keys`
    /// keys are: `stop` (default) or `dead_letter`.
    #[serde(default)]
    pub fallback: ParkFallback,
}

/// What `on_error: park` does once `park.max_keys` keys are parked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParkFallback {
    /// Halt the connector: nothing past the event is committed.
    #[default]
    Stop,
    /// Dead-letter the event without holding its key (loudly: logged and
    /// counted in `kawka_park_overflow_total`).
    DeadLetter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most events in a batch (default 5000).
    pub max_events: Option<Spanned<usize>>,
    /// Most bytes of record values in a batch, e.g. `8MiB` (default).
    pub max_bytes: Option<Spanned<String>>,
    /// Longest a batch stays open once it has an event, e.g. `200ms` (default).
    pub max_wait: Option<Spanned<String>>,
}

/// What one event type does: exactly one op with its fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpConfig {
    /// Replace the row/document with these fields (others become null).
    Upsert(OrderedMap<Spanned<String>>),
    /// Set these fields, creating the row/document when missing.
    Merge(OrderedMap<Spanned<String>>),
    /// Add to numeric fields.
    Increment(OrderedMap<Spanned<String>>),
    /// Subtract from numeric fields.
    Decrement(OrderedMap<Spanned<String>>),
    /// Delete the row/document.
    Delete(NoFields),
}

/// `delete: {}` takes nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}
