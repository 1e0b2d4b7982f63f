//! Runtime settings: what `validate` makes of the files, checked and typed.
//! Building them does no I/O; reaching the services is checked separately.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::files::{ConnectorFile, DaemonFile, KeyConfig, OpConfig, SinkConfig, TargetConfig};
pub use super::files::{ErrorPolicy, LogFormat};
use super::{Problem, Problems};
use crate::codec::{KeyFormat, RegistryClientSettings};
use crate::projection::expr::{self, Expr};
use crate::projection::{EventRule, OpKind, OpTemplate, ProjectionSettings, TombstonePolicy, UnknownEventPolicy};
use crate::secret::{redact_url, Secret, SecretUrl};
use crate::sink::elasticsearch::{ElasticsearchConnection, ElasticsearchTarget};
use crate::sink::postgres::types::ColumnType;
use crate::sink::postgres::{Column, PostgresConnection, PostgresTarget};
use crate::sink::{SinkConnection, SinkSettings, Target};
use crate::source::{KafkaSettings, SourceSettings};
use crate::upcast::online::Consumed;
use crate::yaml::{Mark, OrderedMap, Spanned};

#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub schema_registry: RegistryClientSettings,
    pub sinks: BTreeMap<String, SinkConnection>,
    pub http: HttpSettings,
    pub log: LogSettings,
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
            topics: self.source.topics.len(),
        }
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

/// Parses `500ms`, `5s`, `2m`, `1h`, `1m30s`; a bare number is milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(millis) = text.parse::<u64>() {
        return Ok(Duration::from_millis(millis));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".to_string());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let unit_end = rest[digits..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| digits + i);
        let (number, unit) = (&rest[..digits], rest[digits..unit_end].trim());
        let number: f64 =
            number.parse().map_err(|_| format!("`{text}` is not a duration (examples: 250ms, 5s, 2m, 1h)"))?;
        let seconds = match unit {
            "ms" => number / 1000.0,
            "s" => number,
            "m" | "min" => number * 60.0,
            "h" => number * 3600.0,
            _ => return Err(format!("`{text}` is not a duration (examples: 250ms, 5s, 2m, 1h)")),
        };
        total += Duration::from_secs_f64(seconds);
        rest = &rest[unit_end..];
    }
    Ok(total)
}

/// Parses `512KiB`, `5MiB`, `1GiB`, `1000kB`, `4096`; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number: u64 =
        text[..digits].parse().map_err(|_| format!("`{text}` is not a size (examples: 512KiB, 5MiB, 1GiB)"))?;
    let factor: u64 = match text[digits..].trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(format!("`{text}` is not a size (examples: 512KiB, 5MiB, 1GiB)")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

/// Collects problems of one file.
struct FileProblems<'a> {
    file: &'a Path,
    problems: &'a mut Vec<Problem>,
}

impl FileProblems<'_> {
    fn at(&mut self, mark: Mark, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line: mark.line,
            column: mark.column,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, value: &Option<Spanned<String>>, field: &str, default: Duration) -> Duration {
        match value {
            None => default,
            Some(text) => parse_duration(text).unwrap_or_else(|message| {
                self.at(text.mark, field, message);
                default
            }),
        }
    }

    fn size(&mut self, value: &Option<Spanned<String>>, field: &str, default: u64) -> u64 {
        match value {
            None => default,
            Some(text) => match parse_size(text) {
                Ok(0) => {
                    self.at(text.mark, field, "must be more than zero");
                    default
                }
                Ok(size) => size,
                Err(message) => {
                    self.at(text.mark, field, message);
                    default
                }
            },
        }
    }

    fn expr(&mut self, text: &Spanned<String>, field: &str) -> Option<Expr> {
        match expr::parse(text) {
            Ok(expr) => Some(expr),
            Err(error) => {
                self.at(text.mark, field, error.to_string());
                None
            }
        }
    }
}

/// Turns parsed files into settings, reporting every problem.
pub fn validate(
    daemon_file: &Path,
    daemon: DaemonFile,
    connectors: Vec<(PathBuf, ConnectorFile)>,
) -> Result<Settings, Problems> {
    let mut problems = Vec::new();
    let mut at = FileProblems { file: daemon_file, problems: &mut problems };

    if daemon.kafka.bootstrap_servers.trim().is_empty() {
        at.at(daemon.kafka.bootstrap_servers.mark, "kafka.bootstrap_servers", "must not be empty");
    }
    let kafka = KafkaSettings {
        bootstrap_servers: daemon.kafka.bootstrap_servers.value.clone(),
        properties: daemon.kafka.properties.clone(),
    };

    let registry = &daemon.schema_registry;
    if !(registry.url.starts_with("http://") || registry.url.starts_with("https://")) {
        at.at(registry.url.mark, "schema_registry.url", format!("`{}` is not an http(s) URL", *registry.url));
    }
    let schema_registry = RegistryClientSettings {
        url: registry.url.trim_end_matches('/').to_string(),
        username: registry.username.clone(),
        password: registry.password.clone().map(Secret::new),
        ca_file: registry.ca_file.as_ref().map(|f| PathBuf::from(&f.value)),
        timeout: at.duration(&registry.timeout, "schema_registry.timeout", Duration::from_secs(10)),
    };

    let sinks = sink_connections(&mut at, &daemon.sinks);

    let listen = daemon.http.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        at.at(
            daemon.http.listen.mark,
            "http.listen",
            format!("`{}` is not an address such as 127.0.0.1:8080", *daemon.http.listen),
        );
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    let http = HttpSettings { listen, token: daemon.http.token.clone().filter(|t| !t.is_empty()).map(Secret::new) };
    let log = LogSettings {
        format: daemon.log.format,
        level: daemon.log.level.clone().unwrap_or_else(|| "info".to_string()),
    };

    let connectors = validate_connectors(Some(&sinks), connectors, &mut problems);

    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    Ok(Settings {
        kafka,
        schema_registry,
        sinks,
        http,
        log,
        connectors_dir: PathBuf::from(&daemon.connectors.value),
        schemas_dir: PathBuf::from(&daemon.schemas.value),
        connectors,
        catalogue: Default::default(),
        upcasters: Vec::new(),
    })
}

/// The named connections of `sinks:`, checked.
fn sink_connections(
    at: &mut FileProblems,
    sinks: &OrderedMap<Spanned<SinkConfig>>,
) -> BTreeMap<String, SinkConnection> {
    let mut connections = BTreeMap::new();
    for (name, sink) in sinks.iter() {
        let field = format!("sinks.{name}");
        let connection = match &sink.value {
            SinkConfig::Elasticsearch { url, username, password, api_key, ca_file, timeout } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    at.at(sink.mark, &format!("{field}.url"), format!("`{url}` is not an http(s) URL"));
                }
                let timeout = timeout.clone().map(|t| Spanned { mark: sink.mark, value: t });
                SinkConnection::Elasticsearch(ElasticsearchConnection {
                    url: url.trim_end_matches('/').to_string(),
                    username: username.clone(),
                    password: password.clone().map(Secret::new),
                    api_key: api_key.clone().map(Secret::new),
                    ca_file: ca_file.as_ref().map(PathBuf::from),
                    timeout: at.duration(&timeout, &format!("{field}.timeout"), Duration::from_secs(30)),
                })
            }
            SinkConfig::Postgres { url, max_connections } => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    at.at(
                        sink.mark,
                        &format!("{field}.url"),
                        format!("`{}` is not a postgres:// URL", redact_url(url)),
                    );
                }
                if *max_connections == Some(0) {
                    at.at(sink.mark, &format!("{field}.max_connections"), "must be at least 1");
                }
                SinkConnection::Postgres(PostgresConnection {
                    url: SecretUrl::new(url.clone()),
                    max_connections: max_connections.unwrap_or(8).max(1),
                })
            }
        };
        connections.insert(name.to_string(), connection);
    }
    connections
}

/// Checks connector files against the named connections (`None` when the
/// daemon file is too broken to know them: sink names are then not checked).
fn validate_connectors(
    sinks: Option<&BTreeMap<String, SinkConnection>>,
    connectors: Vec<(PathBuf, ConnectorFile)>,
    problems: &mut Vec<Problem>,
) -> Vec<ConnectorSettings> {
    let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut settings = Vec::new();
    for (file, connector) in connectors {
        let mut at = FileProblems { file: &file, problems };
        if let Some(first) = names.get(connector.name.as_str()) {
            at.at(
                connector.name.mark,
                "name",
                format!("connector `{}` is already defined in {}", *connector.name, first.display()),
            );
        } else {
            names.insert(connector.name.value.clone(), file.clone());
        }
        if let Some(connector) = validate_connector(&mut at, sinks, connector) {
            settings.push(connector);
        }
    }

    settings
}

/// Checks the connectors alone, for when the daemon file failed: every
/// problem is still found in one run. `sinks` is what could be read of the
/// daemon file's `sinks:`.
pub fn check_connectors(
    daemon_file: &Path,
    sinks: Option<OrderedMap<Spanned<SinkConfig>>>,
    connectors: Vec<(PathBuf, ConnectorFile)>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let connections =
        sinks.map(|sinks| sink_connections(&mut FileProblems { file: daemon_file, problems: &mut problems }, &sinks));
    validate_connectors(connections.as_ref(), connectors, &mut problems);
    problems
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn validate_connector(
    at: &mut FileProblems,
    sinks: Option<&BTreeMap<String, SinkConnection>>,
    file: ConnectorFile,
) -> Option<ConnectorSettings> {
    let start_problems = at.problems.len();
    let name = file.name.value.clone();
    if !valid_name(&name) {
        at.at(file.name.mark, "name", "use letters, digits, `.`, `_` and `-` only");
    }

    let source = &file.source;
    if source.topics.is_empty() {
        at.at(source.topics.mark, "source.topics", "list at least one topic");
    }
    for topic in source.topics.iter() {
        if !valid_name(topic) {
            at.at(source.topics.mark, "source.topics", format!("`{topic}` is not a valid topic name"));
        }
    }
    let mut source_settings = SourceSettings {
        topics: source.topics.value.clone(),
        start: source.start,
        group_id: source.group.clone().unwrap_or_else(|| format!("kawka.{name}")),
        properties: source.properties.clone(),
        max_prefetch_bytes: at.size(&source.max_prefetch_bytes, "source.max_prefetch_bytes", 64 << 20),
        // Set with the batch size below.
        max_prefetch_records: 0,
        max_record_bytes: at.size(&source.max_record_bytes, "source.max_record_bytes", 1 << 20) as usize,
    };

    let connection = file.sink.to.value.clone();
    let target = match sinks.map(|sinks| (sinks.get(&connection), sinks)) {
        None => None,
        Some((None, sinks)) => {
            let known: Vec<&str> = sinks.keys().map(String::as_str).collect();
            at.at(
                file.sink.to.mark,
                "sink.to",
                format!(
                    "no sink named `{connection}` in the daemon config (known: {})",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            );
            None
        }
        Some((Some(SinkConnection::Elasticsearch(_)), _)) => elasticsearch_target(at, &file.sink),
        Some((Some(SinkConnection::Postgres(_)), _)) => postgres_target(at, &file.sink),
    };

    let key = validate_key(at, &file, target.as_ref());
    let version = file.version.as_ref().and_then(|v| at.expr(v, "version"));

    let dead_letter_topic = match &file.dead_letter_topic {
        Some(topic) => {
            if !valid_name(topic) {
                at.at(topic.mark, "dead_letter_topic", format!("`{}` is not a valid topic name", **topic));
            }
            if source.topics.contains(&topic.value) {
                at.at(topic.mark, "dead_letter_topic", "must not be one of the source topics");
            }
            topic.value.clone()
        }
        None => format!("{name}.dlq"),
    };

    let batch = &file.batch;
    let defaults = BatchSettings::default();
    if let Some(max_events) = batch.max_events.as_ref().filter(|m| m.value == 0) {
        at.at(max_events.mark, "batch.max_events", "must be at least 1");
    }
    let batch = BatchSettings {
        max_events: batch.max_events.as_ref().map_or(defaults.max_events, |m| m.value).max(1),
        max_bytes: at.size(&batch.max_bytes, "batch.max_bytes", defaults.max_bytes as u64) as usize,
        max_wait: at.duration(&batch.max_wait, "batch.max_wait", defaults.max_wait),
    };

    source_settings.max_prefetch_records = 2 * batch.max_events;

    if file.events.is_empty() {
        at.at(file.name.mark, "events", "map at least one event type to an op");
    }
    let mut events = Vec::new();
    let mut seen = HashSet::new();
    for (event_type, op) in file.events.iter() {
        let field = format!("events.{event_type}");
        if !seen.insert(event_type) {
            at.at(op.mark, &field, "event type listed twice");
        }
        if let Some(op) = validate_op(at, &field, op, target.as_ref(), &key) {
            events.push(EventRule { event_type: event_type.to_string(), op });
        }
    }

    if at.problems.len() > start_problems {
        return None;
    }
    Some(ConnectorSettings {
        name,
        file: at.file.to_path_buf(),
        source: source_settings,
        key_format: source.key_format,
        connection,
        target: target?,
        key,
        version,
        on_error: file.on_error,
        dead_letter_topic,
        tombstones: file.tombstones,
        unknown_events: file.unknown_events,
        batch,
        events,
    })
}

fn elasticsearch_target(at: &mut FileProblems, sink: &TargetConfig) -> Option<Target> {
    for (present, field) in [
        (sink.table.is_some(), "table"),
        (sink.schema.is_some(), "schema"),
        (sink.columns.is_some(), "columns"),
        (sink.primary_key.is_some(), "primary_key"),
        (sink.create.is_some(), "create"),
        (sink.fillfactor.is_some(), "fillfactor"),
    ] {
        if present {
            at.at(
                sink.to.mark,
                &format!("sink.{field}"),
                format!("`{field}` is for postgres sinks; `{}` is elasticsearch", *sink.to),
            );
        }
    }
    let Some(alias) = &sink.index else {
        at.at(sink.to.mark, "sink.index", "an elasticsearch sink needs `index` (the alias readers query)");
        return None;
    };
    let alias_ok = !alias.is_empty()
        && !alias.starts_with(['_', '-', '+'])
        && alias.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !alias_ok {
        at.at(
            alias.mark,
            "sink.index",
            "index names are lowercase letters, digits, `.`, `_` and `-`, not starting with `_`, `-` or `+`",
        );
    }
    for (value, field) in [(&sink.mappings, "sink.mappings"), (&sink.settings, "sink.settings")] {
        if value.as_ref().is_some_and(|v| !v.is_object()) {
            at.at(sink.to.mark, field, "must be a mapping");
        }
    }
    let bulk = sink.bulk.as_ref();
    let max_bytes = at.size(&bulk.and_then(|b| b.max_bytes.clone()), "sink.bulk.max_bytes", 5 << 20);
    Some(Target::Elasticsearch(ElasticsearchTarget {
        alias: alias.value.clone(),
        mappings: sink.mappings.clone(),
        settings: sink.settings.clone(),
        max_bulk_bytes: max_bytes as usize,
        max_bulk_actions: bulk.and_then(|b| b.max_actions).unwrap_or(5000).max(1),
        in_flight: bulk.and_then(|b| b.in_flight).unwrap_or(2).max(1),
    }))
}

fn postgres_target(at: &mut FileProblems, sink: &TargetConfig) -> Option<Target> {
    for (present, field) in [
        (sink.index.is_some(), "index"),
        (sink.mappings.is_some(), "mappings"),
        (sink.settings.is_some(), "settings"),
        (sink.bulk.is_some(), "bulk"),
    ] {
        if present {
            at.at(
                sink.to.mark,
                &format!("sink.{field}"),
                format!("`{field}` is for elasticsearch sinks; `{}` is postgres", *sink.to),
            );
        }
    }
    let Some(table) = &sink.table else {
        at.at(sink.to.mark, "sink.table", "a postgres sink needs `table`");
        return None;
    };
    if !valid_identifier(table) {
        at.at(table.mark, "sink.table", "use lowercase letters, digits and `_`, starting with a letter or `_`");
    }
    let schema = match &sink.schema {
        Some(schema) => {
            if !valid_identifier(schema) {
                at.at(schema.mark, "sink.schema", "use lowercase letters, digits and `_`");
            }
            schema.value.clone()
        }
        None => "public".to_string(),
    };
    let Some(declared) = &sink.columns else {
        at.at(sink.to.mark, "sink.columns", "a postgres sink needs `columns` (name: type)");
        return None;
    };
    let mut columns = Vec::new();
    let mut all_typed = true;
    for (name, ty) in declared.iter() {
        if !valid_identifier(name) {
            at.at(ty.mark, &format!("sink.columns.{name}"), "column names are lowercase letters, digits and `_`");
        }
        if name.starts_with("kawka_") {
            at.at(ty.mark, &format!("sink.columns.{name}"), "names starting with `kawka_` are kawka's own");
        }
        match ColumnType::parse(ty) {
            Some(ty) => columns.push(Column { name: name.to_string(), ty }),
            None => all_typed = false,
        }
        if ColumnType::parse(ty).is_none() {
            at.at(
                ty.mark,
                &format!("sink.columns.{name}"),
                format!("unknown column type `{}` (known: {})", **ty, ColumnType::known_names()),
            );
        }
    }
    if !all_typed {
        // Checking ops against a partial column list would only repeat the
        // problem as "not a column" lines.
        return None;
    }
    let Some(primary_key) = &sink.primary_key else {
        at.at(declared.mark, "sink.primary_key", "a postgres sink needs `primary_key` (a list of columns)");
        return None;
    };
    if primary_key.is_empty() {
        at.at(primary_key.mark, "sink.primary_key", "list at least one column");
    }
    for column in primary_key.iter() {
        if declared.get(column).is_none() {
            at.at(primary_key.mark, "sink.primary_key", format!("`{column}` is not in `columns`"));
        }
    }
    if let Some(fillfactor) = sink.fillfactor.as_ref().filter(|f| !(10..=100).contains(&f.value)) {
        at.at(fillfactor.mark, "sink.fillfactor", format!("{} is not a fillfactor (10 to 100)", fillfactor.value));
    }
    Some(Target::Postgres(PostgresTarget {
        schema,
        table: table.value.clone(),
        columns,
        primary_key: primary_key.value.clone(),
        create: sink.create.unwrap_or(true),
        fillfactor: sink.fillfactor.as_ref().map(|f| f.value),
    }))
}

fn valid_identifier(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn validate_key(at: &mut FileProblems, file: &ConnectorFile, target: Option<&Target>) -> Vec<(String, Expr)> {
    let default_key = Spanned { mark: file.name.mark, value: KeyConfig::One("$key".to_string()) };
    let key = file.key.as_ref().unwrap_or(&default_key);
    let mut parts = Vec::new();
    match (&key.value, target) {
        (KeyConfig::One(text), target) => {
            let column = match target {
                Some(Target::Postgres(pg)) if pg.primary_key.len() == 1 => pg.primary_key[0].clone(),
                Some(Target::Postgres(pg)) => {
                    at.at(
                        key.mark,
                        "key",
                        format!(
                            "the primary key has {} columns: give `key` as a mapping of each ({})",
                            pg.primary_key.len(),
                            pg.primary_key.join(", ")
                        ),
                    );
                    return parts;
                }
                _ => "_id".to_string(),
            };
            if let Some(expr) = at.expr(&Spanned { mark: key.mark, value: text.clone() }, "key") {
                parts.push((column, expr));
            }
        }
        (KeyConfig::Fields(fields), target) => {
            if fields.is_empty() {
                at.at(key.mark, "key", "give at least one key field");
            }
            for (name, text) in fields.iter() {
                if let Some(expr) = at.expr(&Spanned { mark: key.mark, value: text.clone() }, &format!("key.{name}")) {
                    parts.push((name.to_string(), expr));
                }
            }
            if let Some(Target::Postgres(pg)) = target {
                let mut named: Vec<&str> = fields.iter().map(|(n, _)| n).collect();
                let mut primary: Vec<&str> = pg.primary_key.iter().map(String::as_str).collect();
                named.sort_unstable();
                primary.sort_unstable();
                if named != primary {
                    at.at(
                        key.mark,
                        "key",
                        format!(
                            "key fields ({}) must be the primary key columns ({})",
                            named.join(", "),
                            primary.join(", ")
                        ),
                    );
                }
            }
        }
    }
    parts
}

fn validate_op(
    at: &mut FileProblems,
    field: &str,
    op: &Spanned<OpConfig>,
    target: Option<&Target>,
    key: &[(String, Expr)],
) -> Option<OpTemplate> {
    let (kind, fields) = match &op.value {
        OpConfig::Upsert(fields) => (OpKind::Upsert, Some(fields)),
        OpConfig::Merge(fields) => (OpKind::Merge, Some(fields)),
        OpConfig::Increment(fields) => (OpKind::Increment, Some(fields)),
        OpConfig::Decrement(fields) => (OpKind::Decrement, Some(fields)),
        OpConfig::Delete(_) => (OpKind::Delete, None),
    };
    let field = format!("{field}.{}", kind.name());
    let mut out = Vec::new();
    let Some(fields) = fields else {
        return Some(OpTemplate { kind, fields: out });
    };
    if fields.is_empty() && kind != OpKind::Upsert {
        at.at(op.mark, &field, format!("`{}` needs at least one field", kind.name()));
    }
    for (name, text) in fields.iter() {
        let this = format!("{field}.{name}");
        if key.iter().any(|(k, _)| k == name) {
            at.at(text.mark, &this, "key fields come from `key`, not from the op");
        }
        if let Some(Target::Postgres(pg)) = target {
            match pg.column(name) {
                None => at.at(text.mark, &this, format!("`{name}` is not a column of `{}`", pg.table)),
                Some(column) if matches!(kind, OpKind::Increment | OpKind::Decrement) && !column.ty.is_numeric() => {
                    at.at(text.mark, &this, format!("`{name}` is {}, not a number", column.ty))
                }
                Some(_) => {}
            }
        }
        if let Some(expr) = at.expr(text, &this) {
            out.push((name.to_string(), expr));
        }
    }
    Some(OpTemplate { kind, fields: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("100"), Ok(Duration::from_millis(100)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5MiB"), Ok(5 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000kB"), Ok(1_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("5 MiBs").is_err());
        assert!(parse_size("lots").is_err());
    }
}
