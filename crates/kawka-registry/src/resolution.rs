//! Avro schema resolution, as the specification states it: can a reader
//! schema read what a writer schema wrote? What the compatibility levels
//! are made of (BACKWARD: the new schema reads the old one's data;
//! FORWARD: the old reads the new's).
//!
//! The rules (Avro 1.11 specification, "Schema Resolution", and the Java
//! implementation's `SchemaCompatibility`, which Confluent's registry
//! runs):
//! * primitives match themselves, and promote: int to long, float or
//!   double; long to float or double; float to double; string to bytes
//!   and bytes to string;
//! * named types (records, enums, fixed) match when their unqualified
//!   names are equal or the reader's aliases name the writer's full name;
//!   fixed sizes must be equal; a reader's enum must hold every symbol the
//!   writer's may write, unless it has a default;
//! * records: each reader field is read from the writer's field of the
//!   same name (or one its aliases name), or needs a default; writer
//!   fields the reader lacks are skipped;
//! * arrays and maps by their items and values;
//! * a writer's union is readable when each of its branches is; a
//!   reader's union reads a writer that some branch of it reads;
//! * logical types are read as their underlying types (as the Java
//!   implementation does).

use std::collections::{HashMap, HashSet};
use std::fmt;

use apache_avro::schema::{InnerDecimalSchema, Name, UuidSchema};
use apache_avro::Schema;

/// Why a reader cannot read a writer's data, Confluent's way: a type of
/// incompatibility, where (a JSON-pointer-like path in the reader), and
/// a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    pub kind: Kind,
    pub path: String,
    pub description: String,
    /// Confluent's `additionalInfo`: the field, the symbols, the types.
    pub additional_info: String,
}

/// The types of incompatibility of Avro's `SchemaCompatibility`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NameMismatch,
    FixedSizeMismatch,
    MissingEnumSymbols,
    ReaderFieldMissingDefaultValue,
    TypeMismatch,
    MissingUnionBranch,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::NameMismatch => "NAME_MISMATCH",
            Kind::FixedSizeMismatch => "FIXED_SIZE_MISMATCH",
            Kind::MissingEnumSymbols => "MISSING_ENUM_SYMBOLS",
            Kind::ReaderFieldMissingDefaultValue => "READER_FIELD_MISSING_DEFAULT_VALUE",
            Kind::TypeMismatch => "TYPE_MISMATCH",
            Kind::MissingUnionBranch => "MISSING_UNION_BRANCH",
        }
    }
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{{errorType:'{}', description:'{}', additionalInfo:'{}'}}",
            self.kind.name(),
            self.description,
            self.additional_info
        )
    }
}

/// A schema with the schemas it references (by the registry's
/// references): its `Ref`s resolve through them.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub schema: Schema,
    pub references: Vec<Schema>,
}

impl From<Schema> for Parsed {
    fn from(schema: Schema) -> Parsed {
        Parsed { schema, references: Vec::new() }
    }
}

impl Parsed {
    /// Its named types and those of its references, by full name.
    fn named(&self) -> HashMap<String, Schema> {
        let mut out = HashMap::new();
        for schema in self.references.iter().chain(std::iter::once(&self.schema)) {
            collect(schema, &mut out);
        }
        out
    }
}

/// Which of the two is the schema being registered: the descriptions
/// name the schemas "new" and "old" as Confluent's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum New {
    Reader,
    Writer,
}

/// Whether `reader` reads everything `writer` writes; every reason when
/// not. `new` says which of the two is the schema being registered.
pub fn can_read(writer: &Parsed, reader: &Parsed, new: New) -> Result<(), Vec<Incompatibility>> {
    let (reader_is, writer_is) = match new {
        New::Reader => ("new", "old"),
        New::Writer => ("old", "new"),
    };
    let mut check = Check {
        reader_is,
        writer_is,
        writer_named: writer.named(),
        reader_named: reader.named(),
        visiting: HashSet::new(),
        done: HashMap::new(),
        found: Vec::new(),
    };
    check.check(&writer.schema, &reader.schema, "");
    if check.found.is_empty() {
        Ok(())
    } else {
        Err(check.found)
    }
}

fn collect(schema: &Schema, out: &mut HashMap<String, Schema>) {
    match schema {
        // (A record met again is a recursive reference: collected once.)
        Schema::Record(record) if out.insert(record.name.fullname(None), schema.clone()).is_none() => {
            for field in &record.fields {
                collect(&field.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(e.name.fullname(None), schema.clone());
        }
        Schema::Fixed(fixed) | Schema::Duration(fixed) => {
            out.insert(fixed.name.fullname(None), schema.clone());
        }
        Schema::Decimal(decimal) => {
            if let InnerDecimalSchema::Fixed(fixed) = &decimal.inner {
                out.insert(fixed.name.fullname(None), Schema::Fixed(fixed.clone()));
            }
        }
        Schema::Uuid(UuidSchema::Fixed(fixed)) => {
            out.insert(fixed.name.fullname(None), Schema::Fixed(fixed.clone()));
        }
        Schema::Array(array) => collect(&array.items, out),
        Schema::Map(map) => collect(&map.types, out),
        Schema::Union(union) => union.variants().iter().for_each(|v| collect(v, out)),
        _ => {}
    }
}

/// The underlying shape of a schema: logical types as what they are
/// written as; references resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Array,
    Map,
    Union,
    Record,
    Enum,
    Fixed,
}

/// A path as Confluent shows it: the root is `/`.
fn shown(path: &str) -> &str {
    if path.is_empty() {
        "/"
    } else {
        path
    }
}

impl Shape {
    /// As Avro Java's `Schema.Type` names it.
    fn upper(self) -> String {
        self.name().to_ascii_uppercase()
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Null => "null",
            Shape::Boolean => "boolean",
            Shape::Int => "int",
            Shape::Long => "long",
            Shape::Float => "float",
            Shape::Double => "double",
            Shape::Bytes => "bytes",
            Shape::String => "string",
            Shape::Array => "array",
            Shape::Map => "map",
            Shape::Union => "union",
            Shape::Record => "record",
            Shape::Enum => "enum",
            Shape::Fixed => "fixed",
        }
    }
}

struct Check {
    /// "new" or "old", for the descriptions.
    reader_is: &'static str,
    writer_is: &'static str,
    writer_named: HashMap<String, Schema>,
    reader_named: HashMap<String, Schema>,
    /// (writer, reader) named pairs being checked: a recursive type meets
    /// itself again; the pair holds unless something else says not.
    visiting: HashSet<(String, String)>,
    /// Named pairs checked already, with what they found: a type used in
    /// many places (T0 {a: T1, b: T1}, T1 {a: T2, b: T2}, …) is checked
    /// once, not once per path (which grows exponentially).
    done: HashMap<(String, String), Vec<Incompatibility>>,
    found: Vec<Incompatibility>,
}

impl Check {
    /// `schema` with a `Ref` resolved against the named types of its side.
    fn resolve<'a>(named: &'a HashMap<String, Schema>, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => named.get(&name.fullname(None)).unwrap_or(schema),
            other => other,
        }
    }

    fn shape(schema: &Schema) -> Shape {
        match schema {
            Schema::Null => Shape::Null,
            Schema::Boolean => Shape::Boolean,
            Schema::Int | Schema::Date | Schema::TimeMillis => Shape::Int,
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Shape::Long,
            Schema::Float => Shape::Float,
            Schema::Double => Shape::Double,
            Schema::Bytes | Schema::BigDecimal => Shape::Bytes,
            Schema::String => Shape::String,
            Schema::Uuid(UuidSchema::String) => Shape::String,
            Schema::Uuid(UuidSchema::Bytes) => Shape::Bytes,
            Schema::Uuid(UuidSchema::Fixed(_)) | Schema::Fixed(_) | Schema::Duration(_) => Shape::Fixed,
            Schema::Decimal(decimal) => match decimal.inner {
                InnerDecimalSchema::Bytes => Shape::Bytes,
                InnerDecimalSchema::Fixed(_) => Shape::Fixed,
            },
            Schema::Array(_) => Shape::Array,
            Schema::Map(_) => Shape::Map,
            Schema::Union(_) => Shape::Union,
            Schema::Record(_) => Shape::Record,
            Schema::Enum(_) => Shape::Enum,
            // An unresolved reference: a record is the usual case; the
            // name check below reports a mismatch if it is not one.
            Schema::Ref { .. } => Shape::Record,
        }
    }

    fn fail(&mut self, kind: Kind, path: &str, description: String, additional_info: String) {
        self.found.push(Incompatibility { kind, path: path.to_string(), description, additional_info });
    }

    /// Whether checking `writer` against `reader` finds nothing, without
    /// keeping what it finds (a union branch is tried this way).
    fn quietly(&mut self, writer: &Schema, reader: &Schema, path: &str) -> bool {
        let before = self.found.len();
        self.check(writer, reader, path);
        let ok = self.found.len() == before;
        self.found.truncate(before);
        ok
    }

    fn check(&mut self, writer: &Schema, reader: &Schema, path: &str) {
        let writer_named = std::mem::take(&mut self.writer_named);
        let reader_named = std::mem::take(&mut self.reader_named);
        let (w, r) = (Self::resolve(&writer_named, writer).clone(), Self::resolve(&reader_named, reader).clone());
        self.writer_named = writer_named;
        self.reader_named = reader_named;
        let (ws, rs) = (Self::shape(&w), Self::shape(&r));
        // A writer's union: every branch it may write must be readable.
        if let Schema::Union(union) = &w {
            for (index, branch) in union.variants().iter().enumerate() {
                if rs == Shape::Union {
                    self.check(branch, &r, path);
                } else if !self.quietly(branch, &r, path) {
                    let branch_path = format!("{path}/{index}");
                    let description = format!(
                        "The {} schema is missing a type inside a union field at path '{branch_path}' in the {} schema",
                        self.reader_is, self.writer_is
                    );
                    let info = format!(
                        "reader type: {} not compatible with writer type: {}",
                        rs.upper(),
                        Self::shape(branch).upper()
                    );
                    self.fail(Kind::MissingUnionBranch, &branch_path, description, info);
                }
            }
            return;
        }
        // A reader's union reads what one of its branches reads.
        if let Schema::Union(union) = &r {
            let readable = union.variants().iter().any(|branch| self.quietly(&w, branch, path));
            if !readable {
                let description = format!(
                    "The {} schema is missing a type inside a union field at path '{}' in the {} schema",
                    self.reader_is,
                    shown(path),
                    self.writer_is
                );
                let info = format!("reader union lacking writer type: {}", ws.upper());
                self.fail(Kind::MissingUnionBranch, path, description, info);
            }
            return;
        }
        let promotes = matches!(
            (ws, rs),
            (Shape::Int, Shape::Long | Shape::Float | Shape::Double)
                | (Shape::Long, Shape::Float | Shape::Double)
                | (Shape::Float, Shape::Double)
                | (Shape::String, Shape::Bytes)
                | (Shape::Bytes, Shape::String)
        );
        if promotes {
            return;
        }
        if ws != rs {
            let description = format!(
                "The type (path '{}') of a field in the {} schema does not match with the {} schema",
                shown(path),
                self.reader_is,
                self.writer_is
            );
            let info = format!("reader type: {} not compatible with writer type: {}", rs.upper(), ws.upper());
            self.fail(Kind::TypeMismatch, path, description, info);
            return;
        }
        match (&w, &r) {
            (Schema::Array(wa), Schema::Array(ra)) => self.check(&wa.items, &ra.items, &format!("{path}/items")),
            (Schema::Map(wm), Schema::Map(rm)) => self.check(&wm.types, &rm.types, &format!("{path}/values")),
            _ if matches!(ws, Shape::Record | Shape::Enum | Shape::Fixed) => self.named_pair(&w, &r, path),
            _ => {}
        }
    }

    /// Records, enums and fixed: names, then their own rules.
    fn named_pair(&mut self, w: &Schema, r: &Schema, path: &str) {
        let (Some((w_name, _)), Some((r_name, r_aliases))) = (name_of(w), name_of(r)) else { return };
        let names_match =
            w_name.name() == r_name.name() || r_aliases.iter().any(|alias| *alias == w_name.fullname(None));
        if !names_match {
            let name_path = format!("{path}/name");
            let description = format!("The name of the schema has changed (path '{name_path}')");
            let info = format!("expected: {}", w_name.fullname(None));
            self.fail(Kind::NameMismatch, &name_path, description, info);
            return;
        }
        match (w, r) {
            (Schema::Record(wr), Schema::Record(rr)) => {
                let pair = (wr.name.fullname(None), rr.name.fullname(None));
                if let Some(found) = self.done.get(&pair) {
                    self.found.extend(found.iter().cloned());
                    return;
                }
                if !self.visiting.insert(pair.clone()) {
                    return;
                }
                let before = self.found.len();
                for (index, field) in rr.fields.iter().enumerate() {
                    let field_path = format!("{path}/fields/{index}");
                    let from = wr
                        .fields
                        .iter()
                        .find(|wf| wf.name == field.name)
                        .or_else(|| wr.fields.iter().find(|wf| field.aliases.contains(&wf.name)));
                    match from {
                        Some(wf) => self.check(&wf.schema, &field.schema, &format!("{field_path}/type")),
                        None if field.default.is_some() => {}
                        None => {
                            let description = format!(
                                "The field '{}' at path '{field_path}' in the {} schema has no default value and is missing in the {} schema",
                                field.name, self.reader_is, self.writer_is
                            );
                            let info = field.name.clone();
                            self.fail(Kind::ReaderFieldMissingDefaultValue, &field_path, description, info);
                        }
                    }
                }
                self.visiting.remove(&pair);
                self.done.insert(pair, self.found[before..].to_vec());
            }
            (Schema::Enum(we), Schema::Enum(re)) => {
                if re.default.is_some() {
                    return;
                }
                let missing: Vec<&str> =
                    we.symbols.iter().filter(|s| !re.symbols.contains(s)).map(String::as_str).collect();
                if !missing.is_empty() {
                    let symbols_path = format!("{path}/symbols");
                    let symbols = format!("[{}]", missing.join(", "));
                    let description = format!(
                        "The {} schema is missing enum symbols '{symbols}' at path '{symbols_path}' in the {} schema",
                        self.reader_is, self.writer_is
                    );
                    self.fail(Kind::MissingEnumSymbols, &symbols_path, description, symbols);
                }
            }
            _ => {
                let (ws, rs) = (fixed_size(w), fixed_size(r));
                if ws != rs {
                    let size_path = format!("{path}/size");
                    let description = format!(
                        "The size of FIXED type field at path '{size_path}' in the {} schema does not match with the {} schema",
                        self.reader_is, self.writer_is
                    );
                    let size = |s: Option<usize>| s.map_or("?".into(), |s| s.to_string());
                    let info = format!("expected: {}, found: {}", size(ws), size(rs));
                    self.fail(Kind::FixedSizeMismatch, &size_path, description, info);
                }
            }
        }
    }
}

/// The name and the full names of the aliases of a named schema.
fn name_of(schema: &Schema) -> Option<(&Name, Vec<String>)> {
    let aliases = |aliases: &apache_avro::schema::Aliases, name: &Name| -> Vec<String> {
        aliases.iter().flatten().map(|alias| alias.fullname(name.namespace())).collect()
    };
    match schema {
        Schema::Record(record) => Some((&record.name, aliases(&record.aliases, &record.name))),
        Schema::Enum(e) => Some((&e.name, aliases(&e.aliases, &e.name))),
        Schema::Fixed(fixed) | Schema::Duration(fixed) | Schema::Uuid(UuidSchema::Fixed(fixed)) => {
            Some((&fixed.name, aliases(&fixed.aliases, &fixed.name)))
        }
        Schema::Decimal(decimal) => match &decimal.inner {
            InnerDecimalSchema::Fixed(fixed) => Some((&fixed.name, aliases(&fixed.aliases, &fixed.name))),
            InnerDecimalSchema::Bytes => None,
        },
        _ => None,
    }
}

fn fixed_size(schema: &Schema) -> Option<usize> {
    match schema {
        Schema::Fixed(fixed) | Schema::Duration(fixed) | Schema::Uuid(UuidSchema::Fixed(fixed)) => Some(fixed.size),
        Schema::Decimal(decimal) => match &decimal.inner {
            InnerDecimalSchema::Fixed(fixed) => Some(fixed.size),
            InnerDecimalSchema::Bytes => None,
        },
        _ => None,
    }
}
