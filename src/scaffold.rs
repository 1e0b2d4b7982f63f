//! `kawka new connector`: a first connector for existing topics, written
//! from the schemas registered for them: the catalogue entries of their
//! event types (`schemas/<type>/v<N>.avsc`) and a commented connector file
//! with a column (Postgres) or a mapping (Elasticsearch) per field, Avro
//! types mapped to the store's (logical types included), a guessed key,
//! and an `events:` rule per type for the user to edit.
//!
//! [`plan`] is pure (schemas in, files out); [`fetch`] reads the registry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use apache_avro::schema::{RecordSchema, Schema};

use crate::codec::registry::{fingerprint, RegistryClient, RegistryError};
use crate::upcast::catalogue::Catalogue;

/// Which store the connector writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Postgres,
    Elasticsearch,
}

/// An event type found on the topics: its newest registered schema.
#[derive(Debug, Clone)]
pub struct Found {
    pub event_type: String,
    pub schema: Schema,
    /// The schema's text as registered.
    pub text: String,
    /// Where it was found (`subject vN`), for the file's comments.
    pub source: String,
}

/// What `kawka new connector` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaffold {
    /// Catalogue files to write (path under the schemas directory, text);
    /// types whose newest registered schema is already catalogued are not here.
    pub schemas: Vec<(PathBuf, String)>,
    /// The connector file's text.
    pub connector: String,
}

/// The newest schema of every record type registered for `topics` (subjects
/// `<topic>-value`, `<topic>-<record>`; a top-level union gives each branch).
pub async fn fetch(client: &RegistryClient, topics: &[String]) -> Result<Vec<Found>, RegistryError> {
    let subjects = client.subjects().await?;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for topic in topics {
        let prefix = format!("{topic}-");
        for subject in subjects.iter().filter(|s| s.starts_with(&prefix) && !s.ends_with("-key")) {
            let registered = client.subject_version(subject, "latest").await?;
            let writer = client.writer_schema(registered.id).await?;
            let source = format!("{subject} v{}", registered.version);
            for record in records(&writer.schema) {
                let event_type = record.name.fullname(None);
                let text = if matches!(writer.schema, Schema::Record(_)) {
                    registered.schema.clone()
                } else {
                    // A union's branch, on its own.
                    Schema::Record(record.clone()).canonical_form()
                };
                found.insert(
                    event_type.clone(),
                    Found { event_type, schema: Schema::Record(record.clone()), text, source: source.clone() },
                );
            }
        }
    }
    Ok(found.into_values().collect())
}

fn records(schema: &Schema) -> Vec<&RecordSchema> {
    match schema {
        Schema::Record(record) => vec![record],
        Schema::Union(union) => union.variants().iter().flat_map(records).collect(),
        _ => Vec::new(),
    }
}

/// The files for a connector `name` reading `topics` into `sink` (a sink
/// name of the daemon config, of type `store`).
pub fn plan(
    name: &str,
    topics: &[String],
    sink: &str,
    store: Store,
    found: &[Found],
    catalogue: &Catalogue,
) -> Scaffold {
    let mut schemas = Vec::new();
    for event in found {
        let newest = catalogue.newest(&event.event_type);
        let known = fingerprint(&event.schema, &[]).ok();
        if newest.is_some_and(|v| Some(v.fingerprint) == known) {
            continue;
        }
        let version = newest.map_or(1, |v| v.version + 1);
        let pretty = serde_json::from_str::<serde_json::Value>(&event.text)
            .and_then(|json| serde_json::to_string_pretty(&json))
            .unwrap_or_else(|_| event.text.clone());
        schemas.push((PathBuf::from(&event.event_type).join(format!("v{version}.avsc")), pretty + "\n"));
    }
    // Every field of every type, first seen first, with its type.
    let mut fields: Vec<(String, Schema)> = Vec::new();
    for event in found {
        if let Schema::Record(record) = &event.schema {
            for field in &record.fields {
                if !fields.iter().any(|(name, _)| *name == field.name) {
                    fields.push((field.name.clone(), field.schema.clone()));
                }
            }
        }
    }
    let key = guess_key(found);
    let mut out = String::new();
    let _ = writeln!(out, "# Written by `kawka new connector` from the registry's newest schemas of");
    let _ = writeln!(out, "# {}:", topics.join(", "));
    for event in found {
        let _ = writeln!(out, "#   {} ({})", event.event_type, event.source);
    }
    let _ = writeln!(out, "# Edit the key and the events' rules, then `kawka validate`.");
    let _ = writeln!(out, "name: {name}");
    let _ = writeln!(out, "source:");
    let _ = writeln!(out, "  topics: [{}]", topics.join(", "));
    let _ = writeln!(out, "  start: earliest");
    let _ = writeln!(out, "sink:");
    let _ = writeln!(out, "  to: {sink}");
    match store {
        Store::Postgres => {
            let _ = writeln!(out, "  table: {name}");
            let _ = writeln!(out, "  columns:");
            let key_column = key.as_deref().unwrap_or("key");
            if key.is_none() {
                let _ = writeln!(out, "    key: text   # the record key ($key)");
            }
            for (field, schema) in &fields {
                let _ = writeln!(out, "    {field}: {}", quote_yaml(column_type(schema)));
            }
            let _ = writeln!(out, "  primary_key: [{key_column}]");
            let _ = writeln!(out, "key: {{ {key_column}: {} }}", key.as_deref().unwrap_or("$key"));
        }
        Store::Elasticsearch => {
            let _ = writeln!(out, "  index: {name}");
            let _ = writeln!(out, "  mappings:");
            let _ = writeln!(out, "    properties:");
            for (field, schema) in &fields {
                let _ = writeln!(out, "      {field}: {}", mapping(schema));
            }
            let _ = writeln!(out, "key: {}   # the document id", key.as_deref().unwrap_or("$key"));
        }
    }
    let _ = writeln!(out, "# One rule per event type: upsert (replace the row/document), merge (set");
    let _ = writeln!(out, "# these fields), increment/decrement (add a number) or delete: {{}}. Types");
    let _ = writeln!(out, "# named as creations (…Created, …Registered, …Opened) upsert, the others merge.");
    let _ = writeln!(out, "events:");
    for event in found {
        let Schema::Record(record) = &event.schema else { continue };
        let set: Vec<String> = record
            .fields
            .iter()
            .filter(|f| Some(&f.name) != key.as_ref())
            .map(|f| format!("{0}: {0}", f.name))
            .collect();
        // A type named as a creation sets the whole row; others set their
        // fields only, so no rule wipes what another wrote.
        let op = if creates(&event.event_type) { "upsert" } else { "merge" };
        let _ = writeln!(out, "  {}: {{ {op}: {{ {} }} }}", event.event_type, set.join(", "));
    }
    if found.is_empty() {
        let _ = writeln!(out, "  # no schema is registered for these topics yet");
    }
    Scaffold { schemas, connector: out }
}

/// Whether an event type's name says it creates its entity
/// (`AccountOpened`, `UserRegistered`, `OrderPlaced`, …).
fn creates(event_type: &str) -> bool {
    const CREATIONS: [&str; 8] =
        ["Created", "Registered", "Opened", "Placed", "Added", "Started", "Submitted", "Signed"];
    let name = event_type.rsplit('.').next().unwrap_or(event_type);
    CREATIONS.iter().any(|verb| name.ends_with(verb))
}

/// A field every type has, named `id` or ending in `_id`/`Id`; else none
/// (the record key).
fn guess_key(found: &[Found]) -> Option<String> {
    let names = |event: &Found| -> Vec<String> {
        match &event.schema {
            Schema::Record(record) => record
                .fields
                .iter()
                .filter(|f| {
                    matches!(nullable(&f.schema), Schema::String | Schema::Uuid(_) | Schema::Long | Schema::Int)
                })
                .map(|f| f.name.clone())
                .collect(),
            _ => Vec::new(),
        }
    };
    let first = names(found.first()?);
    let common: Vec<&String> =
        first.iter().filter(|name| found.iter().all(|event| names(event).contains(name))).collect();
    common
        .iter()
        .find(|name| name.as_str() == "id")
        .or_else(|| common.iter().find(|name| name.ends_with("_id") || name.ends_with("Id")))
        .map(|name| name.to_string())
}

/// The branch of `["null", T]` (or `[T, "null"]`); the schema otherwise.
fn nullable(schema: &Schema) -> &Schema {
    match schema {
        Schema::Union(union) => {
            let others: Vec<&Schema> = union.variants().iter().filter(|v| !matches!(v, Schema::Null)).collect();
            match others.as_slice() {
                [only] => only,
                _ => schema,
            }
        }
        other => other,
    }
}

fn quote_yaml(text: &str) -> String {
    if text.contains(' ') {
        format!("\"{text}\"")
    } else {
        text.to_string()
    }
}

/// The Postgres column type of an Avro type.
pub fn column_type(schema: &Schema) -> &'static str {
    match nullable(schema) {
        Schema::String | Schema::Enum(_) => "text",
        Schema::Uuid(_) => "uuid",
        Schema::Boolean => "boolean",
        Schema::Int => "integer",
        Schema::Long => "bigint",
        Schema::Float => "real",
        Schema::Double => "double precision",
        Schema::Bytes | Schema::Fixed(_) | Schema::BigDecimal => "bytea",
        Schema::Decimal(_) => "numeric",
        Schema::Date => "date",
        Schema::TimeMillis | Schema::TimeMicros => "time",
        Schema::TimestampMillis | Schema::TimestampMicros | Schema::TimestampNanos => "timestamptz",
        Schema::LocalTimestampMillis | Schema::LocalTimestampMicros | Schema::LocalTimestampNanos => "timestamp",
        Schema::Duration(_) => "interval",
        Schema::Record(_) | Schema::Map(_) | Schema::Array(_) | Schema::Union(_) | Schema::Ref { .. } => "jsonb",
        Schema::Null => "text",
    }
}

/// The Elasticsearch mapping of an Avro type, as inline YAML.
pub fn mapping(schema: &Schema) -> String {
    let simple = |ty: &str| format!("{{ type: {ty} }}");
    match nullable(schema) {
        Schema::String | Schema::Enum(_) | Schema::Uuid(_) => simple("keyword"),
        Schema::Boolean => simple("boolean"),
        Schema::Int => simple("integer"),
        Schema::Long => simple("long"),
        Schema::Float => simple("float"),
        Schema::Double => simple("double"),
        // Bytes travel as text (Avro's JSON form): kept, not searched.
        Schema::Bytes | Schema::Fixed(_) | Schema::BigDecimal => "{ type: keyword, index: false }".to_string(),
        // Exact to its scale while it fits a long; text beyond.
        Schema::Decimal(decimal) if decimal.scale <= 15 && decimal.precision <= 18 => {
            format!("{{ type: scaled_float, scaling_factor: {} }}", 10u64.pow(decimal.scale as u32))
        }
        Schema::Decimal(_) => simple("keyword"),
        Schema::Date
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros => simple("date"),
        Schema::TimestampNanos | Schema::LocalTimestampNanos => simple("date_nanos"),
        // Fixed-width text sorts in time order; ISO 8601 for durations.
        Schema::TimeMillis | Schema::TimeMicros | Schema::Duration(_) => simple("keyword"),
        Schema::Array(array) => mapping(&array.items),
        Schema::Record(record) => {
            let properties: Vec<String> =
                record.fields.iter().map(|f| format!("{}: {}", f.name, mapping(&f.schema))).collect();
            format!("{{ properties: {{ {} }} }}", properties.join(", "))
        }
        Schema::Map(_) | Schema::Union(_) | Schema::Ref { .. } => simple("object"),
        Schema::Null => simple("keyword"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Found {
        let schema = Schema::parse_str(text).expect("a valid schema");
        let event_type = match &schema {
            Schema::Record(record) => record.name.fullname(None),
            _ => unreachable!("test schemas are records"),
        };
        Found { event_type, schema, text: text.to_string(), source: "t-value v1".into() }
    }

    const OPENED: &str = r#"{"type":"record","name":"Opened","namespace":"bank","fields":[
        {"name":"account_id","type":"string"},{"name":"owner","type":["null","string"],"default":null},
        {"name":"opened_at","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"balance","type":{"type":"bytes","logicalType":"decimal","precision":12,"scale":2}},
        {"name":"day","type":{"type":"int","logicalType":"date"}},
        {"name":"at","type":{"type":"long","logicalType":"time-micros"}},
        {"name":"ref","type":{"type":"string","logicalType":"uuid"}},
        {"name":"address","type":{"type":"record","name":"Address","fields":[{"name":"city","type":"string"}]}}]}"#;
    const CLOSED: &str = r#"{"type":"record","name":"Closed","namespace":"bank","fields":[
        {"name":"account_id","type":"string"},{"name":"closed_at","type":{"type":"long","logicalType":"timestamp-nanos"}}]}"#;

    #[test]
    fn columns_mappings_key_and_rules_follow_the_schemas() {
        let events = [found(OPENED), found(CLOSED)];
        let topics = ["accounts".to_string()];
        let pg = plan("accounts", &topics, "readdb", Store::Postgres, &events, &Catalogue::default());
        for line in [
            "    opened_at: timestamptz",
            "    balance: numeric",
            "    day: date",
            "    at: time",
            "    ref: uuid",
            "    address: jsonb",
            "    owner: text",
            "    closed_at: timestamptz",
            "  primary_key: [account_id]",
            "key: { account_id: account_id }",
            "  bank.Opened: { upsert: { owner: owner, opened_at: opened_at, balance: balance, day: day, at: at, ref: ref, address: address } }",
            "  bank.Closed: { merge: { closed_at: closed_at } }",
        ] {
            assert!(pg.connector.lines().any(|l| l == line), "{line:?} in\n{}", pg.connector);
        }
        assert_eq!(pg.schemas.len(), 2);
        assert_eq!(pg.schemas[0].0, PathBuf::from("bank.Opened/v1.avsc"));
        let es = plan("accounts", &topics, "search", Store::Elasticsearch, &events, &Catalogue::default());
        for line in [
            "      opened_at: { type: date }",
            "      closed_at: { type: date_nanos }",
            "      balance: { type: scaled_float, scaling_factor: 100 }",
            "      at: { type: keyword }",
            "      address: { properties: { city: { type: keyword } } }",
            "key: account_id   # the document id",
        ] {
            assert!(es.connector.lines().any(|l| l == line), "{line:?} in\n{}", es.connector);
        }
    }

    #[test]
    fn creations_upsert_and_the_rest_merge_whatever_their_order() {
        let events = [found(CLOSED), found(OPENED)];
        let pg = plan("a", &["t".to_string()], "readdb", Store::Postgres, &events, &Catalogue::default());
        assert!(pg.connector.contains("  bank.Closed: { merge: { closed_at: closed_at } }"), "{}", pg.connector);
        assert!(pg.connector.contains("  bank.Opened: { upsert: {"), "{}", pg.connector);
    }

    #[test]
    fn without_a_common_id_the_record_key_is_the_key() {
        let other = r#"{"type":"record","name":"Ping","namespace":"x","fields":[{"name":"n","type":"int"}]}"#;
        let pg = plan("p", &["t".to_string()], "readdb", Store::Postgres, &[found(other)], &Catalogue::default());
        assert!(pg.connector.contains("key: { key: $key }"), "{}", pg.connector);
        assert!(pg.connector.contains("    key: text"), "{}", pg.connector);
    }
}
