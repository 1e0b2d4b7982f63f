//! Declarative upcasters: `schemas/upcasters.yaml`, one step list per
//! (event type, from-version), applied to events and checked against the
//! catalogue schemas they run between (pure).
//!
//! ```yaml
//! - event: com.example.users.UserRegistered
//!   from: 1                        # to 2
//!   steps:
//!     - rename: { fullName: name }
//!     - add: { country: "unknown" }
//!     - remove: [legacy_flag]
//!     - move: { from: street, to: address.street }      # into or out of a nested record
//!     - map: { status: { ACTIVE: active, GONE: deleted } }
//!     - retype: { type: com.example.users.Registered, version: 1 }
//!     - split:                                           # one event becomes several
//!         - { type: com.example.A, version: 1, fields: { id: id, a: a } }
//!         - { type: com.example.B, version: 1, fields: { id: id, b: b } }
//! ```

use std::path::{Path, PathBuf};

use apache_avro::schema::Schema;
use serde::Deserialize;

use super::catalogue::Catalogue;
use crate::event::Event;
use crate::value::{intern, Record, Value};
use crate::yaml::{self, Mark, OrderedMap, Spanned};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpcasterConfig {
    /// The event type this upcaster reads.
    event: Spanned<String>,
    /// The version it reads; it writes `from + 1` unless it retypes or splits.
    from: Spanned<u32>,
    /// What to do, in order.
    steps: Vec<Spanned<StepConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StepConfig {
    Rename(OrderedMap<String>),
    Add(OrderedMap<serde_json::Value>),
    Remove(Vec<String>),
    Move(MoveConfig),
    Map(OrderedMap<OrderedMap<serde_json::Value>>),
    Retype(TargetConfig),
    Split(Vec<SplitConfig>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveConfig {
    from: String,
    to: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetConfig {
    #[serde(rename = "type")]
    event_type: String,
    version: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitConfig {
    #[serde(rename = "type")]
    event_type: String,
    version: u32,
    /// New field name → field of the input event.
    fields: OrderedMap<String>,
}

/// One step of a declarative upcaster.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Rename(Vec<(String, String)>),
    Add(Vec<(String, serde_json::Value)>),
    Remove(Vec<String>),
    Move { from: Vec<String>, to: Vec<String> },
    Map(Vec<(String, Vec<(String, serde_json::Value)>)>),
    Retype { event_type: String, version: u32 },
    Split(Vec<SplitTarget>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SplitTarget {
    pub event_type: String,
    pub version: u32,
    pub fields: Vec<(String, String)>,
}

/// A declarative upcaster and where it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub event_type: String,
    pub from: u32,
    pub steps: Vec<Step>,
    pub file: PathBuf,
    pub mark: Mark,
}

/// A problem in the upcaster file or a check, with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProblem {
    pub file: PathBuf,
    pub mark: Mark,
    pub field: String,
    pub message: String,
}

/// Reads `upcasters.yaml` (a missing file means no upcasters).
pub fn load(file: &Path) -> Result<Vec<Declared>, Vec<StepProblem>> {
    let Ok(text) = std::fs::read_to_string(file) else { return Ok(Vec::new()) };
    let problem =
        |mark: Mark, field: String, message: String| StepProblem { file: file.to_path_buf(), mark, field, message };
    let node = yaml::parse(&text)
        .map_err(|e| vec![problem(e.mark, String::new(), format!("not valid YAML: {}", e.message))])?;
    if node.is_null() {
        return Ok(Vec::new());
    }
    let configs: Vec<UpcasterConfig> = yaml::from_node(&node)
        .map_err(|found| found.into_iter().map(|p| problem(p.mark, p.field, p.message)).collect::<Vec<_>>())?;
    let mut declared = Vec::new();
    let mut problems = Vec::new();
    for config in configs {
        if config.from.value == 0 {
            problems.push(problem(config.from.mark, "from".into(), "versions start at 1".into()));
        }
        if declared.iter().any(|d: &Declared| d.event_type == *config.event && d.from == config.from.value) {
            problems.push(problem(
                config.event.mark,
                "event".into(),
                format!("a second upcaster for {} from v{}", *config.event, config.from.value),
            ));
        }
        let steps = config
            .steps
            .into_iter()
            .map(|step| match step.value {
                StepConfig::Rename(map) => Step::Rename(map.0),
                StepConfig::Add(map) => Step::Add(map.0),
                StepConfig::Remove(fields) => Step::Remove(fields),
                StepConfig::Move(MoveConfig { from, to }) => {
                    Step::Move { from: split_path(&from), to: split_path(&to) }
                }
                StepConfig::Map(map) => Step::Map(map.0.into_iter().map(|(field, values)| (field, values.0)).collect()),
                StepConfig::Retype(TargetConfig { event_type, version }) => Step::Retype { event_type, version },
                StepConfig::Split(targets) => Step::Split(
                    targets
                        .into_iter()
                        .map(|t| SplitTarget { event_type: t.event_type, version: t.version, fields: t.fields.0 })
                        .collect(),
                ),
            })
            .collect();
        declared.push(Declared {
            event_type: config.event.value,
            from: config.from.value,
            steps,
            file: file.to_path_buf(),
            mark: config.event.mark,
        });
    }
    if problems.is_empty() {
        Ok(declared)
    } else {
        Err(problems)
    }
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_string).collect()
}

impl Declared {
    /// Runs the steps on one event; returns the events it becomes.
    pub fn apply(&self, mut event: Event) -> Result<Vec<Event>, String> {
        event.version = self.from + 1;
        let mut record = match std::mem::take(&mut event.payload) {
            Value::Record(record) => record,
            other => return Err(format!("the payload is a {}, not a record", other.kind())),
        };
        for step in &self.steps {
            match step {
                Step::Rename(pairs) => {
                    for (from, to) in pairs {
                        if !record.rename(from, intern(to)) {
                            return Err(format!("rename: field `{from}` is missing"));
                        }
                    }
                }
                Step::Add(fields) => {
                    for (name, default) in fields {
                        if !record.contains(name) {
                            record.push(intern(name), Value::from_json(default));
                        }
                    }
                }
                Step::Remove(fields) => {
                    for name in fields {
                        record.remove(name);
                    }
                }
                Step::Move { from, to } => {
                    let value =
                        take_path(&mut record, from).ok_or_else(|| format!("move: `{}` is missing", from.join(".")))?;
                    put_path(&mut record, to, value)?;
                }
                Step::Map(fields) => {
                    for (name, values) in fields {
                        let Some(slot) = record.get_mut(name) else { continue };
                        let current = slot.to_string();
                        if let Some((_, to)) = values.iter().find(|(from, _)| *from == current) {
                            *slot = Value::from_json(to);
                        }
                    }
                }
                Step::Retype { event_type, version } => {
                    event.event_type = intern(event_type);
                    event.version = *version;
                }
                Step::Split(targets) => {
                    let mut out = Vec::with_capacity(targets.len());
                    for target in targets {
                        let mut part = Record::with_capacity(target.fields.len());
                        for (to, from) in &target.fields {
                            let value =
                                record.get(from).cloned().ok_or_else(|| format!("split: field `{from}` is missing"))?;
                            part.push(intern(to), value);
                        }
                        out.push(Event {
                            event_type: intern(&target.event_type),
                            version: target.version,
                            payload: Value::Record(part),
                            ..event.clone()
                        });
                    }
                    return Ok(out);
                }
            }
        }
        event.payload = Value::Record(record);
        Ok(vec![event])
    }

    /// The (type, version) pairs this upcaster writes.
    pub fn targets(&self) -> Vec<(String, u32)> {
        let mut target = (self.event_type.clone(), self.from + 1);
        for step in &self.steps {
            match step {
                Step::Retype { event_type, version } => target = (event_type.clone(), *version),
                Step::Split(parts) => return parts.iter().map(|p| (p.event_type.clone(), p.version)).collect(),
                _ => {}
            }
        }
        vec![target]
    }

    /// Proves the steps fit the schemas they run between: fields renamed,
    /// removed or moved exist; added defaults fit their field's type; the
    /// result has the fields and types of the target version.
    pub fn check(&self, catalogue: &Catalogue) -> Vec<StepProblem> {
        let problem = |message: String| StepProblem {
            file: self.file.clone(),
            mark: self.mark,
            field: format!("{} from v{}", self.event_type, self.from),
            message,
        };
        let Some(input) = catalogue.version(&self.event_type, self.from) else {
            return vec![problem(format!("the catalogue has no v{} of {}", self.from, self.event_type))];
        };
        let mut shape = Shape::of(&input.schema);
        let mut outputs: Option<Vec<(String, u32, Shape)>> = None;
        let mut target = (self.event_type.clone(), self.from + 1);
        for step in &self.steps {
            let result = match step {
                Step::Rename(pairs) => pairs.iter().try_for_each(|(from, to)| {
                    let field =
                        shape.take(std::slice::from_ref(from)).ok_or_else(|| format!("rename: no field `{from}`"))?;
                    shape.put(std::slice::from_ref(to), field)
                }),
                Step::Add(fields) => fields.iter().try_for_each(|(name, default)| {
                    if shape.get(name).is_some() {
                        return Err(format!("add: field `{name}` already exists"));
                    }
                    shape.put(std::slice::from_ref(name), Shape::Added(default.clone()))
                }),
                Step::Remove(fields) => fields.iter().try_for_each(|name| {
                    shape
                        .take(std::slice::from_ref(name))
                        .map(|_| ())
                        .ok_or_else(|| format!("remove: no field `{name}`"))
                }),
                Step::Move { from, to } => {
                    let field = shape.take(from).ok_or_else(|| format!("move: no field `{}`", from.join(".")));
                    field.and_then(|field| shape.put(to, field))
                }
                Step::Map(fields) => fields.iter().try_for_each(|(name, values)| {
                    shape.get(name).ok_or_else(|| format!("map: no field `{name}`"))?;
                    shape.put(
                        std::slice::from_ref(name),
                        Shape::Mapped(values.iter().map(|(_, to)| to.clone()).collect()),
                    )
                }),
                Step::Retype { event_type, version } => {
                    target = (event_type.clone(), *version);
                    Ok(())
                }
                Step::Split(parts) => {
                    let mut split = Vec::new();
                    for part in parts {
                        let mut fields = Vec::new();
                        for (to, from) in &part.fields {
                            match shape.get(from) {
                                Some(field) => fields.push((to.clone(), field.clone())),
                                None => return vec![problem(format!("split: no field `{from}`"))],
                            }
                        }
                        split.push((part.event_type.clone(), part.version, Shape::Record(fields)));
                    }
                    outputs = Some(split);
                    break;
                }
            };
            if let Err(message) = result {
                return vec![problem(message)];
            }
        }
        let outputs = outputs.unwrap_or_else(|| vec![(target.0, target.1, shape)]);
        let mut problems = Vec::new();
        for (event_type, version, shape) in outputs {
            match catalogue.version(&event_type, version) {
                None => problems.push(problem(format!("the catalogue has no v{version} of {event_type} to upcast to"))),
                Some(next) => {
                    if let Err(message) = shape.fits(&next.schema, "") {
                        problems.push(problem(format!("the result does not match {event_type} v{version}: {message}")));
                    }
                }
            }
        }
        problems
    }
}

fn take_path(record: &mut Record, path: &[String]) -> Option<Value> {
    match path {
        [] => None,
        [name] => record.remove(name),
        [head, rest @ ..] => take_path(record.get_mut(head)?.as_record_mut()?, rest),
    }
}

fn put_path(record: &mut Record, path: &[String], value: Value) -> Result<(), String> {
    match path {
        [] => Err("move: empty target".into()),
        [name] => {
            record.set(intern(name), value);
            Ok(())
        }
        [head, rest @ ..] => {
            if !record.contains(head) {
                record.push(intern(head), Value::Record(Record::new()));
            }
            match record.get_mut(head) {
                Some(Value::Record(inner)) => put_path(inner, rest, value),
                _ => Err(format!("move: `{head}` is not a record")),
            }
        }
    }
}

/// The shape of a record as steps change it, for checks.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Record(Vec<(String, Shape)>),
    /// A field of a known type (its canonical form).
    Leaf(String),
    /// Added with this default: fits any type the default fits.
    Added(serde_json::Value),
    /// Values mapped to these: fits any type they all fit.
    Mapped(Vec<serde_json::Value>),
}

impl Shape {
    fn of(schema: &Schema) -> Shape {
        match schema {
            Schema::Record(record) => {
                Shape::Record(record.fields.iter().map(|f| (f.name.clone(), Shape::of(&f.schema))).collect())
            }
            other => Shape::Leaf(other.canonical_form()),
        }
    }

    fn get(&self, name: &str) -> Option<&Shape> {
        match self {
            Shape::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, s)| s),
            _ => None,
        }
    }

    fn take(&mut self, path: &[String]) -> Option<Shape> {
        let Shape::Record(fields) = self else { return None };
        match path {
            [] => None,
            [name] => fields.iter().position(|(n, _)| n == name).map(|at| fields.remove(at).1),
            [head, rest @ ..] => fields.iter_mut().find(|(n, _)| n == head).and_then(|(_, inner)| inner.take(rest)),
        }
    }

    fn put(&mut self, path: &[String], value: Shape) -> Result<(), String> {
        let Shape::Record(fields) = self else { return Err("not a record".into()) };
        match path {
            [] => Err("empty path".into()),
            [name] => {
                fields.retain(|(n, _)| n != name);
                fields.push((name.clone(), value));
                Ok(())
            }
            [head, rest @ ..] => {
                if !fields.iter().any(|(n, _)| n == head) {
                    fields.push((head.clone(), Shape::Record(Vec::new())));
                }
                let inner = fields.iter_mut().find(|(n, _)| n == head).map(|(_, s)| s).ok_or("unreachable")?;
                inner.put(rest, value).map_err(|_| format!("`{head}` is not a record"))
            }
        }
    }

    /// Whether this shape is the schema (field names and types; order free).
    fn fits(&self, schema: &Schema, at: &str) -> Result<(), String> {
        match (self, schema) {
            (Shape::Record(fields), Schema::Record(record)) => {
                for field in &record.fields {
                    let path = if at.is_empty() { field.name.clone() } else { format!("{at}.{}", field.name) };
                    match fields.iter().find(|(n, _)| *n == field.name) {
                        Some((_, shape)) => shape.fits(&field.schema, &path)?,
                        None => return Err(format!("field `{path}` is missing")),
                    }
                }
                if let Some((extra, _)) = fields.iter().find(|(n, _)| !record.fields.iter().any(|f| f.name == *n)) {
                    let path = if at.is_empty() { extra.clone() } else { format!("{at}.{extra}") };
                    return Err(format!("field `{path}` is not in the target"));
                }
                Ok(())
            }
            (Shape::Leaf(canonical), schema) if *canonical == schema.canonical_form() => Ok(()),
            (Shape::Leaf(canonical), schema) => {
                Err(format!("field `{at}` is {canonical} but the target has {}", schema.canonical_form()))
            }
            (Shape::Added(default), schema) => json_fits(default, schema)
                .then_some(())
                .ok_or_else(|| format!("the default {default} of `{at}` does not fit {}", schema.canonical_form())),
            (Shape::Mapped(values), schema) => match values.iter().find(|v| !json_fits(v, schema)) {
                None => Ok(()),
                Some(value) => Err(format!("`{at}` maps to {value}, which does not fit {}", schema.canonical_form())),
            },
            (Shape::Record(_), other) => {
                Err(format!("`{at}` is a record but the target has {}", other.canonical_form()))
            }
        }
    }
}

/// Whether a JSON default fits an Avro type (a union's default fits its first branch).
fn json_fits(value: &serde_json::Value, schema: &Schema) -> bool {
    use serde_json::Value as J;
    match (value, schema) {
        (J::Null, Schema::Null) => true,
        (J::Bool(_), Schema::Boolean) => true,
        (J::Number(n), Schema::Int) => n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
        (J::Number(n), Schema::Long) => n.as_i64().is_some(),
        (J::Number(_), Schema::Float | Schema::Double) => true,
        (J::String(_), Schema::String | Schema::Bytes | Schema::Uuid(_)) => true,
        (J::String(s), Schema::Enum(e)) => e.symbols.contains(s),
        (J::Array(items), Schema::Array(a)) => items.iter().all(|i| json_fits(i, &a.items)),
        (J::Object(map), Schema::Map(m)) => map.values().all(|v| json_fits(v, &m.types)),
        (J::Object(map), Schema::Record(r)) => {
            r.fields.iter().all(|f| map.get(&f.name).map_or(f.default.is_some(), |v| json_fits(v, &f.schema)))
        }
        (value, Schema::Union(u)) => u.variants().first().is_some_and(|first| json_fits(value, first)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    const V1: &str = r#"{"type":"record","name":"Reg","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"fullName","type":"string"},{"name":"legacy_flag","type":"boolean"},{"name":"street","type":"string"},{"name":"status","type":"string"}]}"#;
    const V2: &str = r#"{"type":"record","name":"Reg","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"name","type":"string"},{"name":"country","type":"string"},{"name":"address","type":{"type":"record","name":"Address","fields":[{"name":"street","type":"string"}]}},{"name":"status","type":{"type":"enum","name":"Status","symbols":["active","deleted"]}}]}"#;

    fn catalogue(files: &[(&str, u32, &str)]) -> (tempfile::TempDir, Catalogue) {
        let dir = tempfile::tempdir().expect("temp dir");
        for (event_type, version, schema) in files {
            let type_dir = dir.path().join(event_type);
            std::fs::create_dir_all(&type_dir).expect("mkdir");
            std::fs::write(type_dir.join(format!("v{version}.avsc")), schema).expect("write");
        }
        let catalogue = Catalogue::load(dir.path()).expect("catalogue loads");
        (dir, catalogue)
    }

    fn upcasters(yaml: &str) -> Result<Vec<Declared>, Vec<StepProblem>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("upcasters.yaml");
        std::fs::write(&file, yaml).expect("write");
        load(&file)
    }

    const GOOD: &str = "
- event: t.Reg
  from: 1
  steps:
    - rename: { fullName: name }
    - add: { country: unknown }
    - remove: [legacy_flag]
    - move: { from: street, to: address.street }
    - map: { status: { ACTIVE: active, GONE: deleted } }
";

    fn v1_event() -> Event {
        let payload = serde_json::json!({"id": "u1", "fullName": "Ann", "legacy_flag": true, "street": "Main 1", "status": "GONE"});
        Event {
            event_type: "t.Reg",
            version: 1,
            payload: Value::from_json(&payload),
            key: Value::Null,
            position: Position { topic: "t", partition: 0, offset: 0 },
            timestamp: None,
        }
    }

    #[test]
    fn every_kind_of_step_applies_and_checks_against_the_next_version() {
        let declared = upcasters(GOOD).expect("loads");
        let (_dir, catalogue) = catalogue(&[("t.Reg", 1, V1), ("t.Reg", 2, V2)]);
        assert_eq!(declared[0].check(&catalogue), Vec::new());
        let out = declared[0].apply(v1_event()).expect("applies");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].version, 2);
        assert_eq!(
            out[0].payload.to_json(),
            serde_json::json!({"id": "u1", "name": "Ann", "country": "unknown", "address": {"street": "Main 1"}, "status": "deleted"})
        );
    }

    #[test]
    fn checks_find_missing_fields_bad_defaults_and_mismatched_results() {
        let (_dir, catalogue) = catalogue(&[("t.Reg", 1, V1), ("t.Reg", 2, V2)]);
        let cases = [
            (GOOD.replace("fullName: name", "fullname: name"), "rename: no field `fullname`"),
            (GOOD.replace("country: unknown", "country: 42"), "the default 42 of `country` does not fit"),
            (GOOD.replace("GONE: deleted", "GONE: removed"), "`status` maps to \"removed\""),
            (GOOD.replace("    - remove: [legacy_flag]\n", ""), "field `legacy_flag` is not in the target"),
            (GOOD.replace("to: address.street", "to: street2"), "field `address` is missing"),
            ("- event: t.Reg\n  from: 2\n  steps: []\n".to_string(), "the catalogue has no v3 of t.Reg"),
            ("- event: t.Reg\n  from: 5\n  steps: []\n".to_string(), "the catalogue has no v5 of t.Reg"),
        ];
        for (yaml, expected) in cases {
            let declared = upcasters(&yaml).expect("loads");
            let problems = declared[0].check(&catalogue);
            assert!(problems.iter().any(|p| p.message.contains(expected)), "{expected:?} not in {problems:?}");
            let event_line = yaml.lines().position(|l| l.starts_with("- event")).expect("event line") + 1;
            assert_eq!(problems[0].mark.line, event_line, "problems point at the upcaster");
        }
    }

    #[test]
    fn retype_and_split_change_the_type() {
        let a = r#"{"type":"record","name":"A","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"name","type":"string"}]}"#;
        let b = r#"{"type":"record","name":"B","namespace":"t","fields":[{"name":"id","type":"string"},{"name":"street","type":"string"}]}"#;
        let (_dir, catalogue) = catalogue(&[("t.Reg", 1, V1), ("t.A", 1, a), ("t.B", 1, b)]);
        let declared = upcasters(
            "- event: t.Reg\n  from: 1\n  steps:\n    - split:\n        - { type: t.A, version: 1, fields: { id: id, name: fullName } }\n        - { type: t.B, version: 1, fields: { id: id, street: street } }\n",
        )
        .expect("loads");
        assert_eq!(declared[0].check(&catalogue), Vec::new());
        assert_eq!(declared[0].targets(), vec![("t.A".to_string(), 1), ("t.B".to_string(), 1)]);
        let out = declared[0].apply(v1_event()).expect("applies");
        assert_eq!(out.iter().map(|e| e.event_type).collect::<Vec<_>>(), vec!["t.A", "t.B"]);
        assert_eq!(out[1].payload.to_json(), serde_json::json!({"id": "u1", "street": "Main 1"}));

        let retyped = upcasters("- event: t.Reg\n  from: 1\n  steps:\n    - retype: { type: t.A, version: 1 }\n    - rename: { fullName: name }\n    - remove: [legacy_flag, street, status]\n").expect("loads");
        assert_eq!(retyped[0].check(&catalogue), Vec::new());
        let out = retyped[0].apply(v1_event()).expect("applies");
        assert_eq!((out[0].event_type, out[0].version), ("t.A", 1));
    }

    #[test]
    fn the_file_itself_is_checked() {
        let problems =
            upcasters("- event: t.Reg\n  from: 1\n  steps:\n    - rename_all: {}\n").expect_err("unknown step");
        assert_eq!(problems[0].mark.line, 4);
        let problems = upcasters("- event: t.Reg\n  from: 1\n  steps: []\n- event: t.Reg\n  from: 1\n  steps: []\n")
            .expect_err("duplicate");
        assert!(problems[0].message.contains("a second upcaster"), "{problems:?}");
    }
}
