//! The event catalogue: `schemas/<event type>/v<N>.avsc`, and how a writer
//! schema finds its version in it.
//!
//! A writer schema is matched by the fingerprint of its Parsing Canonical
//! Form. One that is not in the catalogue is read as the newest version by
//! Avro schema resolution when that is legal (fields by name, defaults for
//! missing ones, numeric promotions), and is otherwise an error of its events.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use apache_avro::schema::{RecordSchema, Schema, SchemaKind};
use apache_avro::schema_compatibility::SchemaCompatibility;

use crate::codec::avro::time_kind;
use crate::codec::registry::fingerprint;
use crate::value::{intern, Name, Record, Temporal, TimeKind, Value};

/// One version of an event type.
#[derive(Debug, Clone)]
pub struct CatalogueVersion {
    pub version: u32,
    pub schema: Schema,
    pub fingerprint: u64,
    pub file: PathBuf,
}

/// Every known version of every event type.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    types: BTreeMap<String, Vec<CatalogueVersion>>,
    by_fingerprint: HashMap<u64, (Name, u32)>,
}

/// How a writer schema reaches the catalogue.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// The writer schema is this catalogue version.
    Version(u32),
    /// Not in the catalogue, readable as the newest version.
    Resolved { version: u32, reader: Schema },
    /// The event type is not in the catalogue: events pass as they are.
    Uncatalogued,
    /// Neither: an error of every event written with it.
    Unreadable(String),
}

/// A problem with a catalogue file.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogueProblem {
    pub file: PathBuf,
    pub message: String,
}

impl Catalogue {
    /// Reads every `<event type>/v<N>.avsc` under `dir` (a missing
    /// directory is an empty catalogue).
    pub fn load(dir: &Path) -> Result<Catalogue, Vec<CatalogueProblem>> {
        let mut catalogue = Catalogue::default();
        let mut problems = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else { return Ok(catalogue) };
        let mut type_dirs: Vec<PathBuf> =
            entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        type_dirs.sort();
        for type_dir in type_dirs {
            let event_type = type_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let Ok(files) = std::fs::read_dir(&type_dir) else { continue };
            let mut versions = Vec::new();
            for file in files.filter_map(Result::ok).map(|e| e.path()) {
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let problem = |message: String| CatalogueProblem { file: file.clone(), message };
                let Some(version) = name.strip_prefix('v').and_then(|n| n.strip_suffix(".avsc")) else {
                    continue;
                };
                let Ok(version) = version.parse::<u32>() else {
                    problems.push(problem(format!("`{name}` is not named v<N>.avsc")));
                    continue;
                };
                let schema = match std::fs::read_to_string(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|text| Schema::parse_str(&text).map_err(|e| format!("not a valid Avro schema: {e}")))
                {
                    Ok(schema) => schema,
                    Err(message) => {
                        problems.push(problem(message));
                        continue;
                    }
                };
                match &schema {
                    Schema::Record(RecordSchema { name, .. }) if name.fullname(None) == event_type => {}
                    Schema::Record(RecordSchema { name, .. }) => {
                        problems.push(problem(format!(
                            "the record is `{}` but its directory says `{event_type}`",
                            name.fullname(None)
                        )));
                        continue;
                    }
                    _ => {
                        problems.push(problem("an event schema must be a record".into()));
                        continue;
                    }
                }
                let fingerprint = match fingerprint(&schema, &[]) {
                    Ok(fingerprint) => fingerprint,
                    Err(message) => {
                        problems.push(problem(message));
                        continue;
                    }
                };
                versions.push(CatalogueVersion { version, schema, fingerprint, file });
            }
            versions.sort_by_key(|v| v.version);
            for (expected, found) in (1..).zip(&versions) {
                if found.version != expected {
                    problems.push(CatalogueProblem {
                        file: found.file.clone(),
                        message: format!(
                            "versions of {event_type} must be v1, v2, … without gaps; v{expected} is missing"
                        ),
                    });
                    break;
                }
            }
            let name = intern(&event_type);
            for version in &versions {
                catalogue.by_fingerprint.entry(version.fingerprint).or_insert((name, version.version));
            }
            if !versions.is_empty() {
                catalogue.types.insert(event_type, versions);
            }
        }
        if problems.is_empty() {
            Ok(catalogue)
        } else {
            Err(problems)
        }
    }

    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    pub fn versions(&self, event_type: &str) -> &[CatalogueVersion] {
        self.types.get(event_type).map_or(&[], Vec::as_slice)
    }

    pub fn newest(&self, event_type: &str) -> Option<&CatalogueVersion> {
        self.versions(event_type).last()
    }

    pub fn version(&self, event_type: &str, version: u32) -> Option<&CatalogueVersion> {
        self.versions(event_type).iter().find(|v| v.version == version)
    }

    /// Finds the version a writer schema's record `event_type` is.
    pub fn resolve(&self, writer: &Schema, references: &[Schema], event_type: &str) -> Resolution {
        let Some(newest) = self.newest(event_type) else { return Resolution::Uncatalogued };
        let Some(record) = branch(writer, event_type) else {
            return Resolution::Unreadable(format!("the writer schema has no record {event_type}"));
        };
        if let Ok(print) = fingerprint(record, references) {
            if let Some(&(name, version)) = self.by_fingerprint.get(&print) {
                if name == event_type {
                    return Resolution::Version(version);
                }
            }
        }
        match SchemaCompatibility::can_read(record, &newest.schema) {
            Ok(_) => Resolution::Resolved { version: newest.version, reader: newest.schema.clone() },
            Err(error) => Resolution::Unreadable(format!(
                "the writer schema of {event_type} is in no catalogue version and v{} cannot read it: {error}",
                newest.version
            )),
        }
    }
}

/// The record of a writer schema that an event type names: the schema
/// itself, or a branch of a top-level union.
fn branch<'s>(writer: &'s Schema, event_type: &str) -> Option<&'s Schema> {
    match writer {
        Schema::Record(RecordSchema { name, .. }) if name.fullname(None) == event_type => Some(writer),
        Schema::Union(union) => union.variants().iter().find(|v| match v {
            Schema::Record(RecordSchema { name, .. }) => name.fullname(None) == event_type,
            _ => false,
        }),
        _ => None,
    }
}

/// Reads a value decoded with its writer schema as `reader` (Avro schema
/// resolution on decoded values): record fields by name or alias, reader
/// defaults for missing fields, writer-only fields dropped, int → long →
/// float → double promotions, string ↔ bytes.
pub fn resolve_value(value: Value, reader: &Schema) -> Result<Value, String> {
    match (value, reader) {
        (Value::Record(record), Schema::Record(schema)) => {
            let mut fields: Vec<(Name, Value)> = record.into_iter().collect();
            let mut out = Record::with_capacity(schema.fields.len());
            for field in &schema.fields {
                let found = fields
                    .iter()
                    .position(|(name, _)| *name == field.name || field.aliases.iter().any(|alias| alias == name));
                let value = match found {
                    Some(at) => resolve_value(fields.swap_remove(at).1, &field.schema)?,
                    None => match &field.default {
                        Some(default) => default_value(default, &field.schema)?,
                        None => return Err(format!("field `{}` is missing and has no default", field.name)),
                    },
                };
                out.push(intern(&field.name), value);
            }
            Ok(Value::Record(out))
        }
        (Value::Int(i), Schema::Float | Schema::Double) => Ok(Value::Float(i as f64)),
        // A logical type is a reading of its int or long: a writer without
        // one wrote the integer the reader's type reads.
        (Value::Int(i), reader) if time_kind(reader).is_some() => {
            let kind = time_kind(reader).expect("the guard found a date/time type");
            in_range(Temporal::new(kind, i)).map(Value::Time)
        }
        (Value::Time(t), Schema::Int | Schema::Long) => Ok(Value::Int(t.value)),
        (Value::Time(t), Schema::Float | Schema::Double) => Ok(Value::Float(t.value as f64)),
        // Between date/time types the value is converted, not relabelled:
        // micros read as millis would land 1,000 times too far.
        (Value::Time(t), reader) if time_kind(reader).is_some() => {
            convert(t, time_kind(reader).expect("the guard found a date/time type")).map(Value::Time)
        }
        (Value::Str(s), Schema::Bytes) => Ok(Value::Bytes(s.as_bytes().to_vec())),
        (Value::Bytes(b), Schema::String) => {
            String::from_utf8(b).map(Value::from).map_err(|_| "bytes are not UTF-8".into())
        }
        (Value::Array(items), Schema::Array(array)) => {
            items.into_iter().map(|item| resolve_value(item, &array.items)).collect::<Result<_, _>>().map(Value::Array)
        }
        (Value::Map(entries), Schema::Map(map)) => entries
            .into_iter()
            .map(|(k, v)| resolve_value(v, &map.types).map(|v| (k, v)))
            .collect::<Result<_, _>>()
            .map(Value::Map),
        (Value::Str(symbol), Schema::Enum(schema)) => {
            if schema.symbols.iter().any(|s| *s == symbol) {
                Ok(Value::Str(symbol))
            } else {
                schema
                    .default
                    .as_deref()
                    .map(Value::from)
                    .ok_or_else(|| format!("enum symbol `{symbol}` is unknown to the reader"))
            }
        }
        (value, Schema::Union(union)) => {
            // The written branch's value: the first reader branch that takes it.
            if value.is_null() {
                return Ok(value);
            }
            for variant in union.variants() {
                if variant_takes(&value, variant) {
                    return resolve_value(value, variant);
                }
            }
            Ok(value)
        }
        (value, _) => Ok(value),
    }
}

/// Gives the integers in date/time fields of `schema` their logical type:
/// what an upcaster wrote as a JSON integer (`add`, `map`) or a Rust
/// upcaster as `Value::Int` then reads as the field's type, as a writer's
/// value of that type would (a `timestamp-micros` field's integer is
/// microseconds). Everything else is left as it is; an integer outside a
/// time of day stays an integer (the sink says what is wrong with it).
pub fn type_times(value: &mut Value, schema: &Schema) {
    match (value, schema) {
        (Value::Record(record), Schema::Record(fields)) => {
            for field in &fields.fields {
                if let Some(slot) = record.get_mut(&field.name) {
                    type_times(slot, &field.schema);
                }
            }
        }
        (Value::Array(items), Schema::Array(array)) => items.iter_mut().for_each(|item| type_times(item, &array.items)),
        (Value::Map(entries), Schema::Map(map)) => entries.iter_mut().for_each(|(_, v)| type_times(v, &map.types)),
        (value @ Value::Int(_), Schema::Union(union)) => {
            // Only where the union has no plain integer branch to take it.
            let variants = union.variants();
            if !variants.iter().any(|v| matches!(v, Schema::Int | Schema::Long)) {
                if let Some(variant) = variants.iter().find(|v| time_kind(v).is_some()) {
                    type_times(value, variant);
                }
            }
        }
        (value @ Value::Int(_), schema) => {
            if let (Some(kind), Value::Int(i)) = (time_kind(schema), &*value) {
                if let Ok(temporal) = in_range(Temporal::new(kind, *i)) {
                    *value = Value::Time(temporal);
                }
            }
        }
        _ => {}
    }
}

/// A field's default (JSON, as in the schema) as a value of its type: a
/// date's default is its day number, bytes and fixed defaults are strings
/// of Latin-1 code points (Avro's JSON encoding).
fn default_value(default: &serde_json::Value, schema: &Schema) -> Result<Value, String> {
    match (default, schema) {
        (serde_json::Value::String(text), Schema::Bytes | Schema::Fixed(_)) => text
            .chars()
            .map(|c| u8::try_from(u32::from(c)).map_err(|_| format!("default {text:?} is not Latin-1 bytes")))
            .collect::<Result<Vec<u8>, _>>()
            .map(Value::Bytes),
        (default, schema) => resolve_value(Value::from_json(default), schema),
    }
}

/// A date/time value read as another date/time type: units converted
/// (overflow and a time of day beyond the day are the event's error), a
/// date as its midnight, a timestamp's date; a time of day and a date or
/// timestamp do not read as each other.
fn convert(from: Temporal, to: TimeKind) -> Result<Temporal, String> {
    use crate::value::Unit;
    let rescale = |value: i64, from: Unit, to: Unit| -> Option<i64> {
        let (f, t) = (from.per_second(), to.per_second());
        if t >= f {
            value.checked_mul(t / f)
        } else {
            Some(value.div_euclid(f / t))
        }
    };
    let value = match (from.kind, to) {
        (TimeKind::Date, TimeKind::Date) => Some(from.value),
        (TimeKind::Date, TimeKind::Timestamp(unit) | TimeKind::LocalTimestamp(unit)) => {
            from.value.checked_mul(unit.per_day())
        }
        (TimeKind::Timestamp(unit) | TimeKind::LocalTimestamp(unit), TimeKind::Date) => {
            Some(from.value.div_euclid(unit.per_day()))
        }
        (
            TimeKind::Timestamp(a) | TimeKind::LocalTimestamp(a),
            TimeKind::Timestamp(b) | TimeKind::LocalTimestamp(b),
        )
        | (TimeKind::TimeOfDay(a), TimeKind::TimeOfDay(b)) => rescale(from.value, a, b),
        _ => {
            return Err(format!(
                "a {} cannot be read as a {}",
                from.logical_type(),
                Temporal::new(to, 0).logical_type()
            ))
        }
    };
    let value = value.ok_or_else(|| {
        format!("{} {} overflows as {}", from.logical_type(), from.value, Temporal::new(to, 0).logical_type())
    })?;
    in_range(Temporal::new(to, value))
}

/// A time of day must lie within its day (what the decoder checks of
/// values written as one).
fn in_range(temporal: Temporal) -> Result<Temporal, String> {
    if temporal.is_valid() {
        Ok(temporal)
    } else {
        Err(format!("{} {} is not a time of day", temporal.logical_type(), temporal.value))
    }
}

fn variant_takes(value: &Value, schema: &Schema) -> bool {
    if matches!(value, Value::Int(_) | Value::Time(_)) && time_kind(schema).is_some() {
        return true;
    }
    matches!(
        (value, SchemaKind::from(schema)),
        (Value::Record(_), SchemaKind::Record)
            | (
                Value::Int(_) | Value::Time(_),
                SchemaKind::Int | SchemaKind::Long | SchemaKind::Float | SchemaKind::Double
            )
            | (Value::Float(_), SchemaKind::Float | SchemaKind::Double)
            | (Value::Str(_), SchemaKind::String | SchemaKind::Enum | SchemaKind::Uuid)
            | (Value::Bytes(_), SchemaKind::Bytes | SchemaKind::Fixed)
            | (Value::Bool(_), SchemaKind::Boolean)
            | (Value::Array(_), SchemaKind::Array)
            | (Value::Map(_), SchemaKind::Map)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(logical: &str, ty: &str) -> Schema {
        Schema::parse_str(&format!(r#"{{"type":"{ty}","logicalType":"{logical}"}}"#)).expect("a logical type")
    }

    fn time(kind: TimeKind, value: i64) -> Value {
        Value::Time(Temporal::new(kind, value))
    }

    #[test]
    fn resolution_converts_date_and_time_units_instead_of_relabelling_them() {
        use crate::value::Unit::{Micros, Millis, Nanos};
        let micros = time(TimeKind::Timestamp(Micros), 1_733_400_000_123_456);
        let as_millis = resolve_value(micros.clone(), &field("timestamp-millis", "long"));
        assert_eq!(as_millis, Ok(time(TimeKind::Timestamp(Millis), 1_733_400_000_123)));
        let as_nanos = resolve_value(micros.clone(), &field("timestamp-nanos", "long"));
        assert_eq!(as_nanos, Ok(time(TimeKind::Timestamp(Nanos), 1_733_400_000_123_456_000)));
        assert_eq!(
            resolve_value(time(TimeKind::Timestamp(Millis), -1), &field("timestamp-micros", "long")),
            Ok(time(TimeKind::Timestamp(Micros), -1000))
        );
        assert_eq!(
            resolve_value(time(TimeKind::Date, 19_723), &field("timestamp-millis", "long")),
            Ok(time(TimeKind::Timestamp(Millis), 19_723 * 86_400_000))
        );
        assert_eq!(
            resolve_value(time(TimeKind::Timestamp(Micros), -1), &field("date", "int")),
            Ok(time(TimeKind::Date, -1))
        );
        assert_eq!(
            resolve_value(time(TimeKind::TimeOfDay(Millis), 1), &field("time-micros", "long")),
            Ok(time(TimeKind::TimeOfDay(Micros), 1000))
        );
        // No reading across: a time of day is no instant, and overflow is an error.
        assert!(resolve_value(micros, &field("time-micros", "long")).is_err());
        assert!(resolve_value(time(TimeKind::Date, 1), &field("time-millis", "int")).is_err());
        let huge = time(TimeKind::Timestamp(Millis), i64::MAX / 10);
        assert!(resolve_value(huge, &field("timestamp-nanos", "long")).unwrap_err().contains("overflows"));
        // A writer without a logical type wrote the reader's integer, in range.
        assert_eq!(
            resolve_value(Value::Int(5), &field("timestamp-micros", "long")),
            Ok(time(TimeKind::Timestamp(Micros), 5))
        );
        assert!(resolve_value(Value::Int(86_400_000), &field("time-millis", "int")).is_err());
        assert_eq!(resolve_value(time(TimeKind::Date, 3), &Schema::Int), Ok(Value::Int(3)));
    }

    /// Random instants in every unit, read as every other unit and kind:
    /// never a panic (i64 extremes included); finer → coarser floors,
    /// coarser → finer is exact or an overflow error; the date is the
    /// timestamp's date.
    #[test]
    fn resolution_of_random_instants_between_units_never_lies() {
        use crate::value::Unit::{self, Micros, Millis, Nanos};
        use rand::{Rng, SeedableRng};
        let schema = |kind: &str| match kind {
            "date" => field("date", "int"),
            other => field(other, "long"),
        };
        let units = [(Millis, "millis"), (Micros, "micros"), (Nanos, "nanos")];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x71e5);
        for round in 0..20_000 {
            let (from, from_name) = units[rng.random_range(0..3)];
            let (to, to_name) = units[rng.random_range(0..3)];
            let value = match round % 10 {
                0 => i64::MIN,
                1 => i64::MAX,
                _ => rng.random(),
            };
            let written = time(TimeKind::Timestamp(from), value);
            let per = |unit: Unit| unit.per_second();
            match resolve_value(written.clone(), &schema(&format!("timestamp-{to_name}"))) {
                Ok(Value::Time(read)) => {
                    let expected = if per(to) >= per(from) {
                        value.checked_mul(per(to) / per(from)).expect("an Ok conversion did not overflow")
                    } else {
                        value.div_euclid(per(from) / per(to))
                    };
                    assert_eq!(read, Temporal::new(TimeKind::Timestamp(to), expected), "{value} {from_name}→{to_name}");
                }
                Ok(other) => panic!("{other:?}"),
                Err(message) => {
                    assert!(per(to) > per(from) && value.checked_mul(per(to) / per(from)).is_none(), "{message}");
                }
            }
            let date = resolve_value(written, &schema("date")).expect("every instant has a date");
            assert_eq!(date, time(TimeKind::Date, value.div_euclid(from.per_day())));
        }
    }

    #[test]
    fn defaults_are_read_as_their_fields_type() {
        let bytes = Schema::parse_str(
            r#"{"type":"record","name":"R","fields":[
            {"name":"b","type":"bytes","default":"\u00ff"},
            {"name":"d","type":{"type":"int","logicalType":"date"},"default":3}]}"#,
        )
        .expect("schema");
        let resolved = resolve_value(Value::Record(Record::new()), &bytes).expect("defaults");
        assert_eq!(resolved.as_record().and_then(|r| r.get("b")), Some(&Value::Bytes(vec![0xff])));
        assert_eq!(resolved.as_record().and_then(|r| r.get("d")), Some(&time(TimeKind::Date, 3)));
    }

    fn write(dir: &Path, event_type: &str, version: u32, schema: &str) {
        let type_dir = dir.join(event_type);
        std::fs::create_dir_all(&type_dir).expect("mkdir");
        std::fs::write(type_dir.join(format!("v{version}.avsc")), schema).expect("write");
    }

    const V1: &str = r#"{"type":"record","name":"Reg","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"fullName","type":"string"}]}"#;
    const V2: &str = r#"{"type":"record","name":"Reg","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"name","type":"string"},{"name":"country","type":"string","default":"unknown"}]}"#;

    #[test]
    fn writer_schemas_match_by_fingerprint_or_resolve_against_the_newest() {
        let dir = tempfile::tempdir().expect("temp dir");
        write(dir.path(), "t.Reg", 1, V1);
        write(dir.path(), "t.Reg", 2, V2);
        let catalogue = Catalogue::load(dir.path()).expect("loads");
        // Same canonical form, different whitespace and a doc: still v1.
        let v1 =
            Schema::parse_str(&V1.replace(",", ", ").replace("\"fields\"", "\"doc\":\"x\",\"fields\"")).expect("v1");
        assert!(matches!(catalogue.resolve(&v1, &[], "t.Reg"), Resolution::Version(1)));
        // Not in the catalogue, but v2 can read it (country has a default).
        let other = Schema::parse_str(
            r#"{"type":"record","name":"Reg","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"name","type":"string"},{"name":"extra","type":"int"}]}"#,
        )
        .expect("other");
        let Resolution::Resolved { version, reader } = catalogue.resolve(&other, &[], "t.Reg") else {
            panic!("resolvable")
        };
        assert_eq!(version, 2);
        let value = Value::Record(
            [(intern("id"), Value::from("1")), (intern("name"), Value::from("Ann")), (intern("extra"), Value::Int(3))]
                .into_iter()
                .collect(),
        );
        let resolved = resolve_value(value, &reader).expect("resolves");
        assert_eq!(resolved.to_json(), serde_json::json!({"id": "1", "name": "Ann", "country": "unknown"}));
        // Unreadable: `name` missing without a default.
        let bad = Schema::parse_str(
            r#"{"type":"record","name":"Reg","namespace":"t","fields":[{"name":"id","type":"string"}]}"#,
        )
        .expect("bad");
        assert!(matches!(catalogue.resolve(&bad, &[], "t.Reg"), Resolution::Unreadable(_)));
        assert!(matches!(catalogue.resolve(&bad, &[], "t.Other"), Resolution::Uncatalogued));
    }

    #[test]
    fn broken_catalogues_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        write(dir.path(), "t.Reg", 1, V1);
        write(dir.path(), "t.Reg", 3, V2);
        write(dir.path(), "t.Other", 1, V1);
        write(dir.path(), "t.Bad", 1, "{not json");
        let problems = Catalogue::load(dir.path()).expect_err("broken");
        let text: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.file.display(), p.message)).collect();
        assert!(text.iter().any(|t| t.contains("t.Reg/v3.avsc") && t.contains("v2 is missing")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("t.Other/v1.avsc") && t.contains("directory says")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("t.Bad/v1.avsc") && t.contains("not a valid Avro schema")), "{text:?}");
    }
}
