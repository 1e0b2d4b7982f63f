//! Checks one connector file: its source, its sink target against the named
//! connection's type, its key, version and ops.

use std::collections::{BTreeMap, HashSet};

use super::FileProblems;
use crate::config::files::ErrorPolicy;
use crate::config::files::{ConnectorFile, KeyConfig, OpConfig, TargetConfig};
use crate::config::{BatchSettings, ConnectorSettings, ParkSettings};
use crate::projection::expr::Expr;
use crate::projection::{EventRule, OpKind, OpTemplate};
use crate::sink::elasticsearch::ElasticsearchTarget;
use crate::sink::postgres::types::ColumnType;
use crate::sink::postgres::{Column, PostgresTarget};
use crate::sink::{SinkConnection, Target};
use crate::source::SourceSettings;
use crate::yaml::Spanned;

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Whether `name` may name a connector: it names its file, its table or
/// index and its group, so the characters of a topic name, and not a
/// leading `.` (a hidden Elasticsearch index, a hidden file).
pub fn valid_connector_name(name: &str) -> bool {
    valid_name(name) && !name.starts_with('.')
}

pub(super) fn validate_connector(
    at: &mut FileProblems,
    sinks: Option<&BTreeMap<String, SinkConnection>>,
    file: ConnectorFile,
) -> Option<ConnectorSettings> {
    let start_problems = at.problems.len();
    let name = file.name.value.clone();
    if !valid_connector_name(&name) {
        at.at(file.name.mark, "name", "use letters, digits, `.`, `_` and `-` only, not starting with `.`");
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
        properties: source.properties.clone().into(),
        max_prefetch_bytes: at.size(&source.max_prefetch_bytes, "source.max_prefetch_bytes", 64 << 20),
        // Set with the batch size below.
        max_prefetch_records: 0,
        max_record_bytes: at.size(&source.max_record_bytes, "source.max_record_bytes", 1 << 20) as usize,
        assign_all: false,
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

    let park = park_settings(at, &file);

    let batch = &file.batch;
    let defaults = BatchSettings::default();
    if let Some(max_events) = batch.max_events.as_ref().filter(|m| m.value == 0 || m.value > MOST_EVENTS) {
        at.at(max_events.mark, "batch.max_events", format!("must be 1 to {MOST_EVENTS}"));
    }
    let batch = BatchSettings {
        max_events: batch.max_events.as_ref().map_or(defaults.max_events, |m| m.value).clamp(1, MOST_EVENTS),
        max_bytes: at.size(&batch.max_bytes, "batch.max_bytes", defaults.max_bytes as u64) as usize,
        max_wait: at.duration(&batch.max_wait, "batch.max_wait", defaults.max_wait),
    };

    source_settings.max_prefetch_records = batch.max_events.saturating_mul(2);

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
        park,
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
        tombstone_retention: at.duration(&sink.tombstone_retention, "sink.tombstone_retention", TOMBSTONE_RETENTION),
    }))
}

/// The most events a batch may hold: a batch and the two fetched ahead of
/// it are in memory, and counts derived from it must not overflow.
const MOST_EVENTS: usize = 10_000_000;

/// Most keys one connector may park: each is held in memory and loaded
/// whole at every assignment (one page of an Elasticsearch search).
const MOST_PARKED_KEYS: usize = crate::sink::elasticsearch::MOST_PARKED;

/// `park:` checked; a block without `on_error: park` is a mistake.
fn park_settings(at: &mut FileProblems, file: &ConnectorFile) -> ParkSettings {
    let defaults = ParkSettings::default();
    let Some(park) = &file.park else { return defaults };
    if file.on_error != ErrorPolicy::Park {
        at.at(park.mark, "park", "applies only with `on_error: park`");
    }
    let max_keys = match &park.max_keys {
        Some(max) if max.value == 0 || max.value > MOST_PARKED_KEYS => {
            at.at(max.mark, "park.max_keys", format!("must be 1 to {MOST_PARKED_KEYS}"));
            defaults.max_keys
        }
        Some(max) => max.value,
        None => defaults.max_keys,
    };
    ParkSettings { max_keys, fallback: park.fallback }
}

/// How long a deleted key's version is kept by default: longer than any
/// late duplicate or second writer is expected to lag.
const TOMBSTONE_RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

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
        tombstone_retention: at.duration(&sink.tombstone_retention, "sink.tombstone_retention", TOMBSTONE_RETENTION),
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
