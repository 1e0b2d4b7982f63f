//! Validation: the parsed files become runtime settings, checked and typed,
//! with every problem reported at its line. Building them does no I/O;
//! reaching the services is checked separately.
//!
//! This file checks the daemon file and its named connections; `connector.rs`
//! checks each connector file.

mod connector;

pub use connector::valid_connector_name;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::files::{ConnectorFile, DaemonFile, SinkConfig};
use super::units::{parse_duration, parse_size};
use super::{ConnectorSettings, HttpSettings, LogSettings, Problem, Problems, ReloadSettings, Settings};
use crate::codec::RegistryClientSettings;
use crate::projection::expr::{self, Expr};
use crate::secret::SecretUrl;
use crate::sink::elasticsearch::ElasticsearchConnection;
use crate::sink::postgres::PostgresConnection;
use crate::sink::SinkConnection;
use crate::source::KafkaSettings;
use crate::yaml::{Mark, OrderedMap, Spanned};
use connector::validate_connector;

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
        properties: daemon.kafka.properties.clone().into(),
    };

    let registry = &daemon.schema_registry;
    if !(registry.url.starts_with("http://") || registry.url.starts_with("https://")) {
        at.at(
            registry.url.mark,
            "schema_registry.url",
            format!("`{}` is not an http(s) URL", crate::secret::redact_url(&registry.url)),
        );
    }
    // Credentials in the URL become basic auth (the URL is printed in
    // errors and logs); `username`/`password` win over them.
    let (url, in_url) = crate::secret::split_credentials(registry.url.trim_end_matches('/'));
    // Empty is unset: `${SCHEMA_REGISTRY_USER:-}` with nothing behind it.
    let username = registry.username.clone().filter(|u| !u.is_empty());
    let password = registry.password.clone().filter(|p| !p.expose().is_empty());
    let (username, password) = match (username, in_url) {
        (None, Some((user, in_url))) => (Some(user), password.or(Some(in_url))),
        (username, _) => (username, password),
    };
    let schema_registry = RegistryClientSettings {
        url,
        username,
        password,
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
    let token = daemon.http.token.clone().filter(|t| !t.expose().is_empty());
    if token.is_none() && !daemon.http.insecure && !listen.ip().is_loopback() {
        at.at(
            daemon.http.listen.mark,
            "http.listen",
            format!(
                "{listen} is beyond loopback and http.token is not set: anyone who reaches the port could pause, \
                 resume and rebuild connectors; set http.token (or listen on 127.0.0.1, or set http.insecure: true)"
            ),
        );
    }
    let http = HttpSettings { listen, token };
    let log = LogSettings {
        format: daemon.log.format,
        level: daemon.log.level.clone().unwrap_or_else(|| "info".to_string()),
    };

    let reload = ReloadSettings {
        watch: daemon.reload.watch.unwrap_or(true),
        interval: at.duration(&daemon.reload.interval, "reload.interval", Duration::from_secs(2)),
    };
    if reload.watch && reload.interval.is_zero() {
        let mark = daemon.reload.interval.as_ref().map(|i| i.mark).unwrap_or_default();
        at.at(mark, "reload.interval", "must be above zero (set reload.watch: false to stop watching)");
    }

    let connectors = validate_connectors(Some(&sinks), connectors, &mut problems);

    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    Ok(Settings {
        config_file: daemon_file.to_path_buf(),
        reload,
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
                let text = url.expose();
                if !(text.starts_with("http://") || text.starts_with("https://")) {
                    at.at(sink.mark, &format!("{field}.url"), format!("`{url}` is not an http(s) URL"));
                }
                let timeout = timeout.clone().map(|t| Spanned { mark: sink.mark, value: t });
                SinkConnection::Elasticsearch(ElasticsearchConnection {
                    url: SecretUrl::new(text.trim_end_matches('/')),
                    username: username.clone().filter(|u| !u.is_empty()),
                    password: password.clone().filter(|p| !p.expose().is_empty()),
                    api_key: api_key.clone().filter(|k| !k.expose().is_empty()),
                    ca_file: ca_file.as_ref().map(PathBuf::from),
                    timeout: at.duration(&timeout, &format!("{field}.timeout"), Duration::from_secs(30)),
                })
            }
            SinkConfig::Postgres { url, max_connections } => {
                if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
                    at.at(sink.mark, &format!("{field}.url"), format!("`{url}` is not a postgres:// URL"));
                }
                if *max_connections == Some(0) {
                    at.at(sink.mark, &format!("{field}.max_connections"), "must be at least 1");
                }
                SinkConnection::Postgres(PostgresConnection {
                    url: url.clone(),
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
