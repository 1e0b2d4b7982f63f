//! `kawka new connector`: a first connector for existing topics, written
//! from the schemas registered for them: the catalogue entries of their
//! event types (`schemas/<type>/v<N>.avsc`) and a commented connector file
//! with a column (Postgres) or a mapping (Elasticsearch) per field, Avro
//! types mapped to the store's (logical types included), a guessed key,
//! and an `events:` rule per type for the user to edit.
//!
//! [`plan`] is pure (schemas in, files out); [`fetch`] reads the registry.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use apache_avro::schema::Schema;

use crate::codec::registry::{fingerprint, records, topic_subject, RegistryClient, RegistryError};
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
    /// Catalogue files to write (path under the schemas directory, text),
    /// for event types the catalogue does not have.
    pub schemas: Vec<(PathBuf, String)>,
    /// What the user should know: a catalogued type whose registered
    /// schema is none of its versions needs a new version and an upcaster.
    pub notes: Vec<String>,
    /// The connector file's text.
    pub connector: String,
}

/// The newest schema of every record type registered for `topics` (subjects
/// `<topic>-value`, `<topic>-<record>`; a top-level union gives each branch).
pub async fn fetch(client: &RegistryClient, topics: &[String]) -> Result<Vec<Found>, RegistryError> {
    let subjects = client.subjects().await?;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    for topic in topics {
        for (subject, named) in subjects.iter().filter_map(|s| topic_subject(s, topic).map(|named| (s, named))) {
            let registered = client.subject_version(subject, "latest").await?;
            let writer = client.writer_schema(registered.id).await?;
            let source = format!("{subject} v{}", registered.version);
            for record in records(&writer.schema) {
                let event_type = record.name.fullname(None);
                if named.is_some_and(|named| named != event_type) {
                    continue;
                }
                let text = if matches!(writer.schema, Schema::Record(_)) {
                    registered.schema.clone()
                } else {
                    // A union's branch, on its own, with its logical types
                    // and defaults (the canonical form would drop them).
                    serde_json::to_string(&Schema::Record(record.clone()))
                        .expect("a parsed schema serializes to JSON (its own format)")
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
    let (mut schemas, mut notes) = (Vec::new(), Vec::new());
    for event in found {
        let versions = catalogue.versions(&event.event_type);
        if !versions.is_empty() {
            // Catalogued: never a new version here (it would need an
            // upcaster path, and `kawka validate` would refuse the project).
            let known = fingerprint(&event.schema, &[]).ok();
            if !versions.iter().any(|v| Some(v.fingerprint) == known) {
                notes.push(format!(
                    "{} ({}) is none of the catalogue's versions of it: add it as v{} with an upcaster, \
                     or check that it resolves (`kawka schemas check`)",
                    event.event_type,
                    event.source,
                    versions.iter().map(|v| v.version).max().unwrap_or(0) + 1
                ));
            }
            continue;
        }
        let version = 1;
        let pretty = serde_json::from_str::<serde_json::Value>(&event.text)
            .and_then(|json| serde_json::to_string_pretty(&json))
            .unwrap_or_else(|_| event.text.clone());
        schemas.push((PathBuf::from(&event.event_type).join(format!("v{version}.avsc")), pretty + "\n"));
    }
    let mut names = Names::new();
    for event in found {
        collect_names(&event.schema, &mut names);
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
                let _ = writeln!(out, "    {field}: {}", quote_yaml(column_type(schema, &names)));
            }
            let _ = writeln!(out, "  primary_key: [{key_column}]");
            let _ = writeln!(out, "key: {{ {key_column}: {} }}", key.as_deref().unwrap_or("$key"));
        }
        Store::Elasticsearch => {
            let _ = writeln!(out, "  index: {name}");
            let _ = writeln!(out, "  mappings:");
            let _ = writeln!(out, "    properties:");
            for (field, schema) in &fields {
                let _ = writeln!(out, "      {field}: {}", mapping(schema, &names));
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
            // A field named like a literal would read as the literal.
            .filter(|f| !matches!(f.name.as_str(), "true" | "false" | "null"))
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
    Scaffold { schemas, notes, connector: out }
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

/// Named types (records, enums, fixed) by full name, for references.
type Names = HashMap<String, Schema>;

fn collect_names(schema: &Schema, names: &mut Names) {
    match schema {
        Schema::Record(record) => {
            names.entry(record.name.fullname(None)).or_insert_with(|| schema.clone());
            for field in &record.fields {
                collect_names(&field.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.entry(e.name.fullname(None)).or_insert_with(|| schema.clone());
        }
        Schema::Fixed(f) => {
            names.entry(f.name.fullname(None)).or_insert_with(|| schema.clone());
        }
        Schema::Array(array) => collect_names(&array.items, names),
        Schema::Map(map) => collect_names(&map.types, names),
        Schema::Union(union) => union.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

/// The branch of `["null", T]` (or `[T, "null"]`), a reference resolved;
/// the schema otherwise.
fn resolved<'s>(schema: &'s Schema, names: &'s Names) -> &'s Schema {
    match nullable(schema) {
        Schema::Ref { name } => names.get(&name.fullname(None)).unwrap_or(schema),
        other => other,
    }
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
fn column_type(schema: &Schema, names: &Names) -> &'static str {
    match resolved(schema, names) {
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
fn mapping(schema: &Schema, names: &Names) -> String {
    let simple = |ty: &str| format!("{{ type: {ty} }}");
    match resolved(schema, names) {
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
        Schema::Array(array) => mapping(&array.items, names),
        Schema::Record(record) => {
            let properties: Vec<String> =
                record.fields.iter().map(|f| format!("{}: {}", f.name, mapping(&f.schema, names))).collect();
            format!("{{ properties: {{ {} }} }}", properties.join(", "))
        }
        // Scalars of several types: text takes them all (numbers too).
        Schema::Union(union)
            if union
                .variants()
                .iter()
                .all(|v| !matches!(resolved(v, names), Schema::Record(_) | Schema::Map(_) | Schema::Array(_))) =>
        {
            simple("keyword")
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
    fn references_literal_names_and_catalogued_types() {
        let text = r#"{"type":"record","name":"Moved","namespace":"bank","fields":[
            {"name":"account_id","type":"string"},
            {"name":"from","type":{"type":"enum","name":"Branch","symbols":["A","B"]}},
            {"name":"to","type":"Branch"},
            {"name":"null","type":"string"},
            {"name":"note","type":["null","string","long"]}]}"#;
        let events = [found(text)];
        let topics = ["t".to_string()];
        let es = plan("m", &topics, "search", Store::Elasticsearch, &events, &Catalogue::default());
        assert!(es.connector.contains("      to: { type: keyword }"), "a reference resolves: {}", es.connector);
        assert!(es.connector.contains("      note: { type: keyword }"), "{}", es.connector);
        assert!(!es.connector.contains("null: null"), "a field named like a literal has no rule: {}", es.connector);
        let pg = plan("m", &topics, "readdb", Store::Postgres, &events, &Catalogue::default());
        assert!(pg.connector.contains("    to: text"), "{}", pg.connector);
        // A catalogued type gets no new file, and a note when it differs.
        let dir = tempfile::tempdir().expect("temp dir");
        let older =
            r#"{"type":"record","name":"Moved","namespace":"bank","fields":[{"name":"account_id","type":"string"}]}"#;
        std::fs::create_dir_all(dir.path().join("bank.Moved")).expect("mkdir");
        std::fs::write(dir.path().join("bank.Moved/v1.avsc"), older).expect("write");
        let catalogue = Catalogue::load(dir.path()).expect("catalogue");
        let again = plan("m", &topics, "readdb", Store::Postgres, &events, &catalogue);
        assert!(again.schemas.is_empty(), "{:?}", again.schemas);
        assert!(again.notes.iter().any(|n| n.contains("add it as v2")), "{:?}", again.notes);
        let same = plan("m", &topics, "readdb", Store::Postgres, &[found(older)], &catalogue);
        assert!(same.schemas.is_empty() && same.notes.is_empty());
        // A connector's name is checked as `kawka validate` checks it: no path outside `connectors/`.
        let valid_name = crate::config::valid_connector_name;
        assert!(valid_name("orders.v2_x-1") && !valid_name("../x") && !valid_name(".hidden") && !valid_name(""));
    }

    #[test]
    fn without_a_common_id_the_record_key_is_the_key() {
        let other = r#"{"type":"record","name":"Ping","namespace":"x","fields":[{"name":"n","type":"int"}]}"#;
        let pg = plan("p", &["t".to_string()], "readdb", Store::Postgres, &[found(other)], &Catalogue::default());
        assert!(pg.connector.contains("key: { key: $key }"), "{}", pg.connector);
        assert!(pg.connector.contains("    key: text"), "{}", pg.connector);
    }
}
