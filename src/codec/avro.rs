//! Avro binary decoding into [`Value`], driven by a plan compiled once per
//! writer schema.
//!
//! Why not `apache_avro::from_avro_datum`: it rebuilds its resolved schema on
//! every call, allocates every field name per record, and trusts lengths in
//! the input. This decoder compiles the schema once (names interned), checks
//! every length against the bytes left, bounds nesting and item counts, and
//! returns an error for any input it cannot read, never a panic.

use std::collections::HashMap;

use apache_avro::schema::{InnerDecimalSchema, Schema, UuidSchema};

use crate::value::{intern, Kinds, Name, Record, SmolStr, Temporal, TimeKind, Unit, Value};

/// Deepest nesting accepted (recursive schemas could otherwise nest as deep
/// as the input is long).
const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated Avro: needed {needed} more bytes at byte {at}")]
    Truncated { at: usize, needed: usize },
    #[error("bad Avro varint at byte {0}")]
    BadVarint(usize),
    #[error("negative length {length} at byte {at}")]
    NegativeLength { at: usize, length: i64 },
    #[error("string at byte {0} is not UTF-8")]
    InvalidUtf8(usize),
    #[error("union branch {index} at byte {at} does not exist (the union has {count})")]
    BadUnionBranch { at: usize, index: i64, count: usize },
    #[error("enum symbol {index} at byte {at} does not exist (the enum has {count})")]
    BadEnumSymbol { at: usize, index: i64, count: usize },
    #[error("boolean byte {value} at byte {at} is neither 0 nor 1")]
    BadBoolean { at: usize, value: u8 },
    #[error("{0} bytes left over after the value: the bytes do not match the schema")]
    TrailingBytes(usize),
    #[error("value nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more items than the payload can hold")]
    TooManyItems,
    #[error("decimal of {0} bytes is too large")]
    DecimalTooLarge(usize),
    #[error("decimal scale {0} is above {MAX_DECIMAL_SCALE}")]
    DecimalScale(usize),
    #[error("{logical_type} {value} at byte {at} is not a time of day (0 to 24 hours after midnight)")]
    TimeOutOfDay { at: usize, logical_type: String, value: i64 },
    #[error("uuid of {0} bytes (a uuid has 16)")]
    BadUuid(usize),
}

/// The largest decimal scale written out: the text of a value has that
/// many digits, so a writer schema with a huge scale (a registry kawka
/// does not run could hold one) must not make every value that large.
pub const MAX_DECIMAL_SCALE: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("schema refers to unknown type `{0}`")]
    UnknownReference(String),
}

/// How to read one value.
#[derive(Debug, Clone)]
enum Plan {
    Null,
    Boolean,
    /// int and long.
    Long,
    /// The date, time and timestamp logical types over int and long.
    Time(TimeKind),
    /// A uuid written as bytes (`None`) or fixed: 16 bytes.
    Uuid(Option<usize>),
    /// Avro's duration: fixed(12), months, days and milliseconds.
    Duration,
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Decimal {
        fixed: Option<usize>,
        scale: usize,
    },
    Array(Box<Plan>),
    Map(Box<Plan>),
    Union(Vec<Plan>),
    /// A named type (record or enum), by index, so recursive schemas compile.
    Named(usize),
}

#[derive(Debug, Clone)]
enum NamedPlan {
    Record {
        name: Name,
        fields: Vec<(Name, Plan)>,
    },
    Enum {
        symbols: Vec<SmolStr>,
    },
    /// Placeholder while a named type's children compile.
    Pending,
}

/// A compiled writer schema.
#[derive(Debug, Clone)]
pub struct Decoder {
    root: Plan,
    named: Vec<NamedPlan>,
    /// Full name of the top-level record (or, for a top-level union,
    /// resolved per value).
    type_name: Name,
}

impl Decoder {
    /// Compiles `schema`; `references` are the schemas it names by reference.
    pub fn compile(schema: &Schema, references: &[Schema]) -> Result<Decoder, CompileError> {
        let mut compiler = Compiler { named: Vec::new(), index: HashMap::new(), definitions: HashMap::new() };
        for reference in references {
            compiler.collect_definitions(reference, None);
        }
        compiler.collect_definitions(schema, None);
        let root = compiler.plan(schema, None)?;
        let type_name = match schema {
            Schema::Record(record) => intern(&record.name.fullname(None)),
            other => intern(&primitive_name(other)),
        };
        Ok(Decoder { root, named: compiler.named, type_name })
    }

    /// The full name of the written type, when the top level is not a union.
    pub fn type_name(&self) -> Name {
        self.type_name
    }

    /// Decodes one value and returns it with the full name of its type (for
    /// a top-level union, the branch that was written).
    pub fn decode(&self, bytes: &[u8]) -> Result<(Name, Value), DecodeError> {
        let mut reader = Reader { bytes, at: 0, budget: bytes.len().saturating_mul(2) + 1024 };
        let (name, value) = match &self.root {
            Plan::Union(branches) => {
                let branch = reader.branch(branches)?;
                let name = match branch {
                    Plan::Named(i) => match &self.named[*i] {
                        NamedPlan::Record { name, .. } => *name,
                        _ => self.type_name,
                    },
                    _ => self.type_name,
                };
                (name, self.read(branch, &mut reader, 0)?)
            }
            root => (self.type_name, self.read(root, &mut reader, 0)?),
        };
        let left = bytes.len() - reader.at;
        if left > 0 {
            return Err(DecodeError::TrailingBytes(left));
        }
        Ok((name, value))
    }

    /// The top-level record's field names, in the order written; `None`
    /// when the top level is not a record.
    pub fn record_fields(&self) -> Option<Vec<Name>> {
        match &self.root {
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { fields, .. } => Some(fields.iter().map(|(name, _)| *name).collect()),
                _ => None,
            },
            _ => None,
        }
    }

    /// What each of the top-level record's fields decodes to, in the order
    /// of [`Decoder::record_fields`]; `None` when the top level is not a
    /// record.
    pub fn record_field_kinds(&self) -> Option<Vec<Kinds>> {
        match &self.root {
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { fields, .. } => Some(fields.iter().map(|(_, plan)| self.kinds(plan)).collect()),
                _ => None,
            },
            _ => None,
        }
    }

    /// The kinds of value [`Decoder::read`] can give for `plan`: one per
    /// plan but a union's, which is its branches' together.
    fn kinds(&self, plan: &Plan) -> Kinds {
        match plan {
            Plan::Null => Kinds::NULL,
            Plan::Boolean => Kinds::BOOL,
            Plan::Long => Kinds::INT,
            Plan::Time(_) => Kinds::TIME,
            Plan::Uuid(_) | Plan::Duration | Plan::String | Plan::Decimal { .. } => Kinds::STR,
            Plan::Float | Plan::Double => Kinds::FLOAT,
            Plan::Bytes | Plan::Fixed(_) => Kinds::BYTES,
            Plan::Array(_) => Kinds::ARRAY,
            Plan::Map(_) => Kinds::MAP,
            // A named type is not followed (it may be recursive): this ends.
            Plan::Union(branches) => branches.iter().fold(Kinds::NONE, |kinds, branch| kinds.or(self.kinds(branch))),
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { .. } => Kinds::RECORD,
                NamedPlan::Enum { .. } => Kinds::STR,
                NamedPlan::Pending => Kinds::ANY,
            },
        }
    }

    /// [`Decoder::decode`] of a top-level record, reading into the value
    /// only the fields whose place in [`Decoder::record_fields`] is `true`
    /// in `read`: the others are skipped over, checked as [`Decoder::decode`]
    /// checks them (lengths, union branches and enum symbols, UTF-8, a
    /// time's range, …: a record is an error here exactly when it is
    /// there, whichever path decodes it) but not built.
    /// A top-level other than a record of as many fields decodes whole.
    pub fn decode_fields(&self, bytes: &[u8], read: &[bool]) -> Result<(Name, Value), DecodeError> {
        let fields = match &self.root {
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { fields, .. } if fields.len() == read.len() => fields,
                _ => return self.decode(bytes),
            },
            _ => return self.decode(bytes),
        };
        let mut reader = Reader { bytes, at: 0, budget: bytes.len().saturating_mul(2) + 1024 };
        let mut record = Record::with_capacity(read.iter().filter(|&&r| r).count());
        for ((name, field), &wanted) in fields.iter().zip(read) {
            if wanted {
                record.push(name, self.read(field, &mut reader, 1)?);
            } else {
                self.skip(field, &mut reader, 1)?;
            }
        }
        let left = bytes.len() - reader.at;
        if left > 0 {
            return Err(DecodeError::TrailingBytes(left));
        }
        Ok((self.type_name, Value::Record(record)))
    }

    /// [`Decoder::decode_fields`] into `slots`: the top-level record's
    /// field at place `i` of [`Decoder::record_fields`] is read into
    /// `slots[slot_of[i]]`, or skipped where that is `None`. `false` when
    /// the record does not decode so (the caller decodes it the whole
    /// way, which says why).
    pub fn decode_slots(&self, bytes: &[u8], slot_of: &[Option<usize>], slots: &mut [Value]) -> bool {
        let fields = match &self.root {
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { fields, .. } if fields.len() == slot_of.len() => fields,
                _ => return false,
            },
            _ => return false,
        };
        let mut reader = Reader { bytes, at: 0, budget: bytes.len().saturating_mul(2) + 1024 };
        for ((_, field), slot) in fields.iter().zip(slot_of) {
            let read = match slot.map(|slot| slots.get_mut(slot)) {
                Some(Some(value)) => self.read_into(field, &mut reader, value),
                // Fewer slots than the plan fills: not decoded so.
                Some(None) => return false,
                None => self.skip(field, &mut reader, 1),
            };
            if read.is_err() {
                return false;
            }
        }
        reader.at == bytes.len()
    }

    /// [`Decoder::read`] of a top-level field into `slot`: the usual
    /// kinds (a string, a long, a boolean) without a call per value, and
    /// an emptied slot (the op moved its value out) overwritten without
    /// dropping what was there (issue 27: most of a record's fields).
    #[inline]
    fn read_into(&self, plan: &Plan, reader: &mut Reader, slot: &mut Value) -> Result<(), DecodeError> {
        let value = match plan {
            Plan::String => Value::Str(SmolStr::new(reader.str()?)),
            Plan::Long => Value::Int(reader.long()?),
            Plan::Boolean => reader.boolean()?,
            _ => self.read(plan, reader, 1)?,
        };
        match slot {
            // Null owns nothing: forgetting it drops nothing.
            Value::Null => std::mem::forget(std::mem::replace(slot, value)),
            _ => *slot = value,
        }
        Ok(())
    }

    /// Moves past one value without building it, with the checks
    /// [`Decoder::read`] makes (see [`Decoder::decode_fields`]).
    fn skip(&self, plan: &Plan, reader: &mut Reader, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        match plan {
            Plan::Null => {}
            Plan::Long => {
                reader.long()?;
            }
            Plan::Float => {
                reader.take(4)?;
            }
            Plan::Double => {
                reader.take(8)?;
            }
            // No check beyond the length, as when read.
            Plan::Duration => {
                reader.take(12)?;
            }
            Plan::Fixed(size) => {
                reader.take(*size)?;
            }
            Plan::Bytes => {
                reader.length_prefixed()?;
            }
            Plan::String => {
                reader.str()?;
            }
            // Rare, and with checks of their own: read and dropped.
            Plan::Boolean | Plan::Time(_) | Plan::Uuid(_) | Plan::Decimal { .. } => {
                self.read(plan, reader, depth)?;
            }
            Plan::Array(items) => reader.blocks(|reader| self.skip(items, reader, depth + 1))?,
            Plan::Map(values) => reader.blocks(|reader| {
                reader.str()?;
                self.skip(values, reader, depth + 1)
            })?,
            Plan::Union(branches) => self.skip(reader.branch(branches)?, reader, depth + 1)?,
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { fields, .. } => {
                    for (_, field) in fields {
                        self.skip(field, reader, depth + 1)?;
                    }
                }
                NamedPlan::Enum { symbols } => {
                    reader.symbol(symbols)?;
                }
                NamedPlan::Pending => unreachable!("compilation finishes every named type"),
            },
        }
        Ok(())
    }

    fn read(&self, plan: &Plan, reader: &mut Reader, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        Ok(match plan {
            Plan::Null => Value::Null,
            Plan::Boolean => reader.boolean()?,
            Plan::Long => Value::Int(reader.long()?),
            Plan::Time(kind) => {
                let at = reader.at;
                let temporal = Temporal::new(*kind, reader.long()?);
                if !temporal.is_valid() {
                    let (logical_type, value) = (temporal.logical_type(), temporal.value);
                    return Err(DecodeError::TimeOutOfDay { at, logical_type, value });
                }
                Value::Time(temporal)
            }
            Plan::Uuid(fixed) => {
                let bytes = match fixed {
                    Some(size) => reader.take(*size)?,
                    None => reader.length_prefixed()?,
                };
                Value::Str(uuid_text(bytes)?)
            }
            Plan::Duration => Value::Str(duration_text(reader.take(12)?).into()),
            Plan::Float => {
                let bytes = reader.take(4)?;
                Value::Float(f64::from(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])))
            }
            Plan::Double => {
                let bytes = reader.take(8)?;
                let mut array = [0u8; 8];
                array.copy_from_slice(bytes);
                Value::Float(f64::from_le_bytes(array))
            }
            Plan::Bytes => Value::Bytes(reader.length_prefixed()?.to_vec()),
            Plan::String => Value::Str(reader.str()?.into()),
            Plan::Fixed(size) => Value::Bytes(reader.take(*size)?.to_vec()),
            Plan::Decimal { fixed, scale } => {
                let bytes = match fixed {
                    Some(size) => reader.take(*size)?,
                    None => reader.length_prefixed()?,
                };
                Value::Str(decimal_text(bytes, *scale)?.into())
            }
            Plan::Array(items) => {
                let mut out = Vec::new();
                reader.blocks(|reader| {
                    out.push(self.read(items, reader, depth + 1)?);
                    Ok(())
                })?;
                Value::Array(out)
            }
            Plan::Map(values) => {
                let mut out = Vec::new();
                reader.blocks(|reader| {
                    let key = reader.string()?;
                    out.push((key, self.read(values, reader, depth + 1)?));
                    Ok(())
                })?;
                Value::Map(out)
            }
            Plan::Union(branches) => self.read(reader.branch(branches)?, reader, depth + 1)?,
            Plan::Named(index) => match &self.named[*index] {
                NamedPlan::Record { fields, .. } => {
                    let mut record = Record::with_capacity(fields.len());
                    for (name, field) in fields {
                        record.push(name, self.read(field, reader, depth + 1)?);
                    }
                    Value::Record(record)
                }
                NamedPlan::Enum { symbols } => Value::Str(reader.symbol(symbols)?.clone()),
                NamedPlan::Pending => unreachable!("compilation finishes every named type"),
            },
        })
    }
}

/// What a date/time logical type's integer counts; `None` for other types.
pub fn time_kind(schema: &Schema) -> Option<TimeKind> {
    Some(match schema {
        Schema::Date => TimeKind::Date,
        Schema::TimeMillis => TimeKind::TimeOfDay(Unit::Millis),
        Schema::TimeMicros => TimeKind::TimeOfDay(Unit::Micros),
        Schema::TimestampMillis => TimeKind::Timestamp(Unit::Millis),
        Schema::TimestampMicros => TimeKind::Timestamp(Unit::Micros),
        Schema::TimestampNanos => TimeKind::Timestamp(Unit::Nanos),
        Schema::LocalTimestampMillis => TimeKind::LocalTimestamp(Unit::Millis),
        Schema::LocalTimestampMicros => TimeKind::LocalTimestamp(Unit::Micros),
        Schema::LocalTimestampNanos => TimeKind::LocalTimestamp(Unit::Nanos),
        _ => return None,
    })
}

fn primitive_name(schema: &Schema) -> String {
    match schema {
        Schema::Enum(e) => e.name.fullname(None),
        Schema::Fixed(f) => f.name.fullname(None),
        other => other.to_string().to_lowercase(),
    }
}

struct Compiler {
    named: Vec<NamedPlan>,
    /// Full name → index in `named`, once compilation of it has started.
    index: HashMap<String, usize>,
    /// Full name → definition, for references to types defined elsewhere
    /// (schema references, or a name used before its definition).
    definitions: HashMap<String, (Schema, Option<String>)>,
}

impl Compiler {
    fn collect_definitions(&mut self, schema: &Schema, namespace: Option<&str>) {
        match schema {
            Schema::Record(record) => {
                let full = record.name.fullname(namespace);
                let inner = record.name.namespace().map(str::to_string).or(namespace.map(str::to_string));
                self.definitions.entry(full).or_insert_with(|| (schema.clone(), inner.clone()));
                for field in &record.fields {
                    self.collect_definitions(&field.schema, inner.as_deref());
                }
            }
            Schema::Enum(e) => {
                let full = e.name.fullname(namespace);
                self.definitions.entry(full).or_insert_with(|| (schema.clone(), namespace.map(str::to_string)));
            }
            Schema::Fixed(f) | Schema::Duration(f) => {
                let full = f.name.fullname(namespace);
                self.definitions.entry(full).or_insert_with(|| (schema.clone(), namespace.map(str::to_string)));
            }
            Schema::Array(array) => self.collect_definitions(&array.items, namespace),
            Schema::Map(map) => self.collect_definitions(&map.types, namespace),
            Schema::Union(union) => {
                for variant in union.variants() {
                    self.collect_definitions(variant, namespace);
                }
            }
            _ => {}
        }
    }

    fn plan(&mut self, schema: &Schema, namespace: Option<&str>) -> Result<Plan, CompileError> {
        Ok(match schema {
            Schema::Null => Plan::Null,
            Schema::Boolean => Plan::Boolean,
            Schema::Int | Schema::Long => Plan::Long,
            Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => {
                Plan::Time(time_kind(schema).expect("time_kind knows every date/time logical type"))
            }
            Schema::Float => Plan::Float,
            Schema::Double => Plan::Double,
            Schema::Bytes | Schema::BigDecimal => Plan::Bytes,
            Schema::Uuid(UuidSchema::Bytes) => Plan::Uuid(None),
            Schema::Uuid(UuidSchema::Fixed(fixed)) => Plan::Uuid(Some(fixed.size)),
            Schema::String | Schema::Uuid(UuidSchema::String) => Plan::String,
            // A duration is a fixed of 12 bytes by the spec; another size
            // is read as the plain fixed it is.
            Schema::Duration(fixed) if fixed.size == 12 => Plan::Duration,
            Schema::Duration(fixed) | Schema::Fixed(fixed) => Plan::Fixed(fixed.size),
            Schema::Decimal(decimal) => Plan::Decimal {
                fixed: match &decimal.inner {
                    InnerDecimalSchema::Bytes => None,
                    InnerDecimalSchema::Fixed(fixed) => Some(fixed.size),
                },
                scale: decimal.scale,
            },
            Schema::Array(array) => Plan::Array(Box::new(self.plan(&array.items, namespace)?)),
            Schema::Map(map) => Plan::Map(Box::new(self.plan(&map.types, namespace)?)),
            Schema::Union(union) => {
                Plan::Union(union.variants().iter().map(|v| self.plan(v, namespace)).collect::<Result<_, _>>()?)
            }
            Schema::Record(record) => {
                let full = record.name.fullname(namespace);
                if let Some(&index) = self.index.get(&full) {
                    return Ok(Plan::Named(index));
                }
                let index = self.reserve(&full);
                let inner = record.name.namespace().map(str::to_string).or(namespace.map(str::to_string));
                let mut fields = Vec::with_capacity(record.fields.len());
                for field in &record.fields {
                    fields.push((intern(&field.name), self.plan(&field.schema, inner.as_deref())?));
                }
                self.named[index] = NamedPlan::Record { name: intern(&full), fields };
                Plan::Named(index)
            }
            Schema::Enum(e) => {
                let full = e.name.fullname(namespace);
                if let Some(&index) = self.index.get(&full) {
                    return Ok(Plan::Named(index));
                }
                let index = self.reserve(&full);
                self.named[index] = NamedPlan::Enum { symbols: e.symbols.iter().map(SmolStr::new).collect() };
                Plan::Named(index)
            }
            Schema::Ref { name } => {
                let full = name.fullname(namespace);
                if let Some(&index) = self.index.get(&full) {
                    return Ok(Plan::Named(index));
                }
                let short = name.fullname(None);
                let (definition, inner) = self
                    .definitions
                    .get(&full)
                    .or_else(|| self.definitions.get(&short))
                    .cloned()
                    .ok_or(CompileError::UnknownReference(full))?;
                self.plan(&definition, inner.as_deref())?
            }
        })
    }

    fn reserve(&mut self, full: &str) -> usize {
        let index = self.named.len();
        self.named.push(NamedPlan::Pending);
        self.index.insert(full.to_string(), index);
        index
    }
}

/// A uuid's 16 bytes in the hyphenated form (`8-4-4-4-12` lowercase hex),
/// the form of a string uuid and of a Postgres `uuid`.
pub(crate) fn uuid_text(bytes: &[u8]) -> Result<SmolStr, DecodeError> {
    if bytes.len() != 16 {
        return Err(DecodeError::BadUuid(bytes.len()));
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 36];
    let mut at = 0;
    for (index, byte) in bytes.iter().enumerate() {
        if matches!(index, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    // Only ASCII hex digits and hyphens were written.
    Ok(SmolStr::new(std::str::from_utf8(&text).expect("hex digits and hyphens are UTF-8")))
}

/// Avro's duration (three little-endian u32: months, days, milliseconds)
/// in ISO 8601, which Postgres reads into an `interval` unchanged:
/// `P1M2DT3.004S` (months and days are not folded into seconds, since their
/// length varies).
fn duration_text(bytes: &[u8]) -> String {
    let part = |index: usize| {
        let mut word = [0u8; 4];
        word.copy_from_slice(&bytes[index * 4..index * 4 + 4]);
        u32::from_le_bytes(word)
    };
    let (months, days, millis) = (part(0), part(1), part(2));
    format!("P{months}M{days}DT{}.{:03}S", millis / 1000, millis % 1000)
}

/// A big-endian two's-complement integer with `scale` decimal places, as text.
fn decimal_text(bytes: &[u8], scale: usize) -> Result<String, DecodeError> {
    if scale > MAX_DECIMAL_SCALE {
        return Err(DecodeError::DecimalScale(scale));
    }
    if bytes.len() > 16 {
        return Err(DecodeError::DecimalTooLarge(bytes.len()));
    }
    let mut unscaled: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) { -1 } else { 0 };
    for byte in bytes {
        unscaled = (unscaled << 8) | i128::from(*byte);
    }
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    if scale == 0 {
        return Ok(format!("{sign}{digits}"));
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    Ok(format!("{sign}{whole}.{fraction}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Items left to read in arrays and maps: items of zero-byte types (null,
    /// empty records) cost no input, so the count alone must be bounded.
    budget: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.bytes.len() - self.at;
        if count > left {
            return Err(DecodeError::Truncated { at: self.at, needed: count - left });
        }
        let slice = &self.bytes[self.at..self.at + count];
        self.at += count;
        Ok(slice)
    }

    /// A boolean: one byte, 0 or 1.
    fn boolean(&mut self) -> Result<Value, DecodeError> {
        let at = self.at;
        match self.take(1)?[0] {
            0 => Ok(Value::Bool(false)),
            1 => Ok(Value::Bool(true)),
            value => Err(DecodeError::BadBoolean { at, value }),
        }
    }

    /// A zig-zag varint of at most 10 bytes.
    fn long(&mut self) -> Result<i64, DecodeError> {
        let start = self.at;
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(DecodeError::Truncated { at: self.at, needed: 1 });
            };
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err(DecodeError::BadVarint(start))
    }

    fn length(&mut self) -> Result<usize, DecodeError> {
        let at = self.at;
        let length = self.long()?;
        usize::try_from(length).map_err(|_| DecodeError::NegativeLength { at, length })
    }

    fn length_prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let length = self.length()?;
        self.take(length)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_string)
    }

    /// A string borrowed from the input (most become a `SmolStr` inline,
    /// without an allocation).
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.at;
        let bytes = self.length_prefixed()?;
        crate::value::utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(at))
    }

    /// The union branch written next.
    fn branch<'p>(&mut self, branches: &'p [Plan]) -> Result<&'p Plan, DecodeError> {
        self.pick(branches, |at, index, count| DecodeError::BadUnionBranch { at, index, count })
    }

    /// The enum symbol written next.
    fn symbol<'p>(&mut self, symbols: &'p [SmolStr]) -> Result<&'p SmolStr, DecodeError> {
        self.pick(symbols, |at, index, count| DecodeError::BadEnumSymbol { at, index, count })
    }

    /// The one of `items` an index written next picks; `bad` is the error
    /// of an index out of range (at, index, count).
    fn pick<'p, T>(&mut self, items: &'p [T], bad: fn(usize, i64, usize) -> DecodeError) -> Result<&'p T, DecodeError> {
        let at = self.at;
        let index = self.long()?;
        usize::try_from(index).ok().and_then(|i| items.get(i)).ok_or_else(|| bad(at, index, items.len()))
    }

    /// Reads Avro blocks (arrays and maps): counts until a zero count; a
    /// negative count is followed by the block's size in bytes.
    fn blocks(&mut self, mut item: impl FnMut(&mut Reader<'a>) -> Result<(), DecodeError>) -> Result<(), DecodeError> {
        loop {
            let mut count = self.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                count = count.checked_neg().ok_or(DecodeError::TooManyItems)?;
                self.length()?;
            }
            let count = usize::try_from(count).map_err(|_| DecodeError::TooManyItems)?;
            if count > self.budget {
                return Err(DecodeError::TooManyItems);
            }
            self.budget -= count;
            for _ in 0..count {
                item(self)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as AvroValue;

    const USER: &str = r#"{
        "type": "record", "name": "UserRegistered", "namespace": "com.example.users",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "age", "type": "int"},
            {"name": "score", "type": "double"},
            {"name": "ratio", "type": "float"},
            {"name": "active", "type": "boolean"},
            {"name": "nickname", "type": ["null", "string"], "default": null},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "attributes", "type": {"type": "map", "values": "long"}},
            {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["ACTIVE", "BANNED"]}},
            {"name": "address", "type": {"type": "record", "name": "Address", "fields": [
                {"name": "city", "type": "string"}]}},
            {"name": "previous", "type": ["null", "Address"], "default": null},
            {"name": "avatar", "type": {"type": "fixed", "name": "Hash", "size": 4}},
            {"name": "balance", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
            {"name": "created", "type": {"type": "long", "logicalType": "timestamp-millis"}}
        ]}"#;

    fn user_value() -> AvroValue {
        AvroValue::Record(vec![
            ("id".into(), AvroValue::String("u-1".into())),
            ("age".into(), AvroValue::Int(-42)),
            ("score".into(), AvroValue::Double(9.5)),
            ("ratio".into(), AvroValue::Float(0.25)),
            ("active".into(), AvroValue::Boolean(true)),
            ("nickname".into(), AvroValue::Union(1, Box::new(AvroValue::String("ada".into())))),
            ("tags".into(), AvroValue::Array(vec![AvroValue::String("a".into()), AvroValue::String("b".into())])),
            ("attributes".into(), AvroValue::Map([("k".to_string(), AvroValue::Long(7))].into_iter().collect())),
            ("status".into(), AvroValue::Enum(1, "BANNED".into())),
            ("address".into(), AvroValue::Record(vec![("city".into(), AvroValue::String("Łódź".into()))])),
            ("previous".into(), AvroValue::Union(0, Box::new(AvroValue::Null))),
            ("avatar".into(), AvroValue::Fixed(4, vec![1, 2, 3, 4])),
            ("balance".into(), AvroValue::Decimal(apache_avro::Decimal::from(vec![0xff, 0x85]))),
            ("created".into(), AvroValue::TimestampMillis(1_700_000_000_123)),
        ])
    }

    fn encode(schema: &Schema, value: AvroValue) -> Vec<u8> {
        apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .and_then(|writer| writer.write_value_to_vec(value))
            .expect("test value matches its schema")
    }

    #[test]
    fn decodes_every_type_like_apache_avro_encodes_it() {
        let schema = Schema::parse_str(USER).unwrap();
        let bytes = encode(&schema, user_value());
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        let (name, value) = decoder.decode(&bytes).unwrap();
        assert_eq!(name, "com.example.users.UserRegistered");
        assert_eq!(
            value.to_json(),
            serde_json::json!({
                "id": "u-1", "age": -42, "score": 9.5, "ratio": 0.25, "active": true, "nickname": "ada",
                "tags": ["a", "b"], "attributes": {"k": 7}, "status": "BANNED", "address": {"city": "Łódź"},
                "previous": null, "avatar": "\u{1}\u{2}\u{3}\u{4}", "balance": "-1.23", "created": "2023-11-14T22:13:20.123Z"
            })
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let schema = Schema::parse_str(USER).unwrap();
        let bytes = encode(&schema, user_value());
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        for len in 0..bytes.len() {
            assert!(decoder.decode(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decoder.decode(&longer), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn reading_some_fields_gives_the_whole_decode_without_the_others() {
        let schema = Schema::parse_str(USER).unwrap();
        let bytes = encode(&schema, user_value());
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        let (name, Value::Record(whole)) = decoder.decode(&bytes).unwrap() else { panic!("a record") };
        let fields = decoder.record_fields().expect("a record at the top");
        assert_eq!(fields.len(), 14);
        // Every choice of the 14 fields: each kind of value is skipped
        // after and before each other kind.
        for mask in 0u32..1 << fields.len() {
            let read: Vec<bool> = (0..fields.len()).map(|i| mask & (1 << i) != 0).collect();
            let (got_name, got) = decoder.decode_fields(&bytes, &read).unwrap();
            let expected: Record = fields
                .iter()
                .zip(&read)
                .filter(|(_, &r)| r)
                .map(|(f, _)| (*f, whole.get(f).unwrap().clone()))
                .collect();
            assert_eq!((got_name, got), (name, Value::Record(expected.clone())), "fields read: {read:?}");
            // Into slots (numbered backwards), the same values.
            let slot_of = slots_of(&read);
            let mut slots = vec![Value::Str("unset".into()); 14];
            assert!(decoder.decode_slots(&bytes, &slot_of, &mut slots), "fields read: {read:?}");
            for (field, slot) in fields.iter().zip(&slot_of) {
                if let Some(slot) = slot {
                    assert_eq!(Some(&slots[*slot]), expected.get(field), "{field} in slot {slot}");
                }
            }
        }
    }

    /// What each field decodes to is among the kinds the schema says, and
    /// a union says each of its branches.
    #[test]
    fn a_fields_kinds_are_what_it_decodes_to() {
        let schema = Schema::parse_str(USER).unwrap();
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        let kinds = decoder.record_field_kinds().expect("a record at the top");
        let (_, Value::Record(record)) = decoder.decode(&encode(&schema, user_value())).unwrap() else {
            panic!("a record")
        };
        assert_eq!(kinds.len(), record.len());
        for ((name, value), kinds) in record.iter().zip(&kinds) {
            assert!(Kinds::of(value).within(*kinds), "{name}: {value:?} is not among {kinds:?}");
        }
        let expected = [
            Kinds::STR,
            Kinds::INT,
            Kinds::FLOAT,
            Kinds::FLOAT,
            Kinds::BOOL,
            Kinds::NULL.or(Kinds::STR),
            Kinds::ARRAY,
            Kinds::MAP,
            Kinds::STR,
            Kinds::RECORD,
            Kinds::NULL.or(Kinds::RECORD),
            Kinds::BYTES,
            Kinds::STR,
            Kinds::TIME,
        ];
        assert_eq!(kinds, expected);
        // The unions' other branches (a null nickname, a previous address).
        let AvroValue::Record(mut fields) = user_value() else { panic!("a record") };
        fields[5].1 = AvroValue::Union(0, Box::new(AvroValue::Null));
        let address = fields[9].1.clone();
        fields[10].1 = AvroValue::Union(1, Box::new(address));
        let (_, Value::Record(other)) = decoder.decode(&encode(&schema, AvroValue::Record(fields))).unwrap() else {
            panic!("a record")
        };
        for (((name, value), kinds), (_, first)) in other.iter().zip(&kinds).zip(record.iter()) {
            assert!(Kinds::of(value).within(*kinds), "{name}: {value:?} is not among {kinds:?}");
            if name == "nickname" || name == "previous" {
                assert_ne!(Kinds::of(value), Kinds::of(first), "{name}: the other branch");
            }
        }
        assert_eq!(Decoder::compile(&Schema::Long, &[]).unwrap().record_field_kinds(), None);
    }

    /// A slot per field read, the last field's first.
    fn slots_of(read: &[bool]) -> Vec<Option<usize>> {
        read.iter().enumerate().map(|(at, &r)| r.then_some(read.len() - 1 - at)).collect()
    }

    #[test]
    fn skipping_a_field_finds_every_error_reading_it_finds() {
        let schema = Schema::parse_str(USER).unwrap();
        let bytes = encode(&schema, user_value());
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        let masks: [Vec<bool>; 3] = [vec![false; 14], (0..14).map(|i| i % 2 == 0).collect(), vec![true; 14]];
        // Every byte of the record set to values that break UTF-8, booleans,
        // varints, lengths, branches, symbols and times: a record is an
        // error read in part exactly when it is read whole.
        for at in 0..bytes.len() {
            for value in [0x00, 0x01, 0x02, 0x7f, 0x80, 0xc3, 0xfe, 0xff] {
                let mut bad = bytes.clone();
                bad[at] = value;
                let whole = decoder.decode(&bad).is_err();
                for read in &masks {
                    assert_eq!(
                        decoder.decode_fields(&bad, read).is_err(),
                        whole,
                        "byte {at} set to {value:#x}, fields read {read:?}"
                    );
                    let mut slots = vec![Value::Null; 14];
                    assert_eq!(
                        !decoder.decode_slots(&bad, &slots_of(read), &mut slots),
                        whole,
                        "into slots: byte {at} set to {value:#x}, fields read {read:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn skipping_fields_still_finds_every_truncation() {
        let schema = Schema::parse_str(USER).unwrap();
        let bytes = encode(&schema, user_value());
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        for read in [vec![false; 14], vec![true; 14], (0..14).map(|i| i % 3 == 0).collect()] {
            for len in 0..bytes.len() {
                assert!(decoder.decode_fields(&bytes[..len], &read).is_err(), "prefix of {len} bytes decoded");
                let mut slots = vec![Value::Null; 14];
                assert!(!decoder.decode_slots(&bytes[..len], &slots_of(&read), &mut slots), "prefix of {len} bytes");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decoder.decode_fields(&longer, &read), Err(DecodeError::TrailingBytes(1)));
            assert!(!decoder.decode_slots(&longer, &slots_of(&read), &mut vec![Value::Null; 14]), "a trailing byte");
        }
    }

    #[test]
    fn hostile_lengths_and_indexes_are_errors() {
        let strings = Schema::parse_str(r#"{"type": "array", "items": "null"}"#).unwrap();
        let decoder = Decoder::compile(&strings, &[]).unwrap();
        // 2^62 null items in one block: nothing to read, so the item budget stops it.
        let huge = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert_eq!(decoder.decode(&huge), Err(DecodeError::TooManyItems));
        let string = Decoder::compile(&Schema::String, &[]).unwrap();
        assert!(matches!(string.decode(&[0x01]), Err(DecodeError::NegativeLength { .. })));
        assert!(matches!(string.decode(&[0xfe, 0xff, 0xff, 0x0f]), Err(DecodeError::Truncated { .. })));
        assert!(matches!(string.decode(&[0x04, 0xff, 0xfe]), Err(DecodeError::InvalidUtf8(_))));
        let long = Decoder::compile(&Schema::Long, &[]).unwrap();
        assert!(matches!(long.decode(&[0xff; 11]), Err(DecodeError::BadVarint(0))));
        let union = Decoder::compile(&Schema::parse_str(r#"["null", "string"]"#).unwrap(), &[]).unwrap();
        assert!(matches!(union.decode(&[0x04]), Err(DecodeError::BadUnionBranch { index: 2, .. })));
        let boolean = Decoder::compile(&Schema::Boolean, &[]).unwrap();
        assert!(matches!(boolean.decode(&[2]), Err(DecodeError::BadBoolean { value: 2, .. })));
    }

    #[test]
    fn recursive_schemas_compile_and_nesting_is_bounded() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Node", "fields": [
                {"name": "value", "type": "long"},
                {"name": "next", "type": ["null", "Node"]}]}"#,
        )
        .unwrap();
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        // value 1, next = Node(value 2, next = null)
        let (_, value) = decoder.decode(&[0x02, 0x02, 0x04, 0x00]).unwrap();
        assert_eq!(value.to_json(), serde_json::json!({"value": 1, "next": {"value": 2, "next": null}}));
        let mut deep = Vec::new();
        for _ in 0..200 {
            deep.extend_from_slice(&[0x02, 0x02]);
        }
        deep.extend_from_slice(&[0x02, 0x00]);
        assert_eq!(decoder.decode(&deep), Err(DecodeError::TooDeep));
    }

    #[test]
    fn top_level_union_reports_the_written_branch() {
        let schema = Schema::parse_str(
            r#"[{"type": "record", "name": "A", "namespace": "x", "fields": [{"name": "a", "type": "int"}]},
                {"type": "record", "name": "B", "namespace": "x", "fields": [{"name": "b", "type": "string"}]}]"#,
        )
        .unwrap();
        let decoder = Decoder::compile(&schema, &[]).unwrap();
        let (name, value) = decoder.decode(&[0x02, 0x02, b'z']).unwrap();
        assert_eq!(name, "x.B");
        assert_eq!(value.to_json(), serde_json::json!({"b": "z"}));
    }

    #[test]
    fn schema_references_resolve() {
        let address = r#"{"type": "record", "name": "Address", "namespace": "com.example", "fields": [{"name": "city", "type": "string"}]}"#;
        let user = r#"{"type": "record", "name": "User", "namespace": "com.example", "fields": [{"name": "home", "type": "com.example.Address"}]}"#;
        let (schema, references) = Schema::parse_str_with_list(user, [address]).unwrap();
        let decoder = Decoder::compile(&schema, &references).unwrap();
        let (_, value) = decoder.decode(&[0x04, b'P', b'o']).unwrap();
        assert_eq!(value.to_json(), serde_json::json!({"home": {"city": "Po"}}));
    }

    /// Every logical type decodes to what it means: the right unit for
    /// each date and time, uuids and durations as text.
    #[test]
    fn every_logical_type_keeps_its_meaning() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Times", "fields": [
                {"name": "date", "type": {"type": "int", "logicalType": "date"}},
                {"name": "time_ms", "type": {"type": "int", "logicalType": "time-millis"}},
                {"name": "time_us", "type": {"type": "long", "logicalType": "time-micros"}},
                {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                {"name": "ts_ns", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
                {"name": "local_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
                {"name": "local_us", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
                {"name": "local_ns", "type": {"type": "long", "logicalType": "local-timestamp-nanos"}},
                {"name": "uuid", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "uuid_fixed", "type": {"type": "fixed", "name": "U", "size": 16, "logicalType": "uuid"}},
                {"name": "duration", "type": {"type": "fixed", "name": "D", "size": 12, "logicalType": "duration"}},
                {"name": "price", "type": {"type": "fixed", "name": "P", "size": 8, "logicalType": "decimal", "precision": 18, "scale": 4}}
            ]}"#,
        )
        .expect("a valid schema");
        let uuid = apache_avro::Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let value = AvroValue::Record(vec![
            ("date".into(), AvroValue::Date(19_675)),
            ("time_ms".into(), AvroValue::TimeMillis(80_000_123)),
            ("time_us".into(), AvroValue::TimeMicros(80_000_123_456)),
            ("ts_ms".into(), AvroValue::TimestampMillis(1_700_000_000_123)),
            ("ts_us".into(), AvroValue::TimestampMicros(1_700_000_000_123_456)),
            ("ts_ns".into(), AvroValue::TimestampNanos(1_700_000_000_123_456_789)),
            ("local_ms".into(), AvroValue::LocalTimestampMillis(1_700_000_000_123)),
            ("local_us".into(), AvroValue::LocalTimestampMicros(1_700_000_000_123_456)),
            ("local_ns".into(), AvroValue::LocalTimestampNanos(-1)),
            ("uuid".into(), AvroValue::Uuid(uuid)),
            ("uuid_fixed".into(), AvroValue::Uuid(uuid)),
            (
                "duration".into(),
                AvroValue::Duration(apache_avro::Duration::new(
                    apache_avro::Months::new(14),
                    apache_avro::Days::new(3),
                    apache_avro::Millis::new(3_723_004),
                )),
            ),
            ("price".into(), AvroValue::Decimal(apache_avro::Decimal::from(123_456_789i64.to_be_bytes().to_vec()))),
        ]);
        let bytes = encode(&schema, value);
        let (_, decoded) = Decoder::compile(&schema, &[]).expect("compiles").decode(&bytes).expect("decodes");
        let field = |name: &str| decoded.as_record().and_then(|r| r.get(name)).cloned().expect("field present");
        let time = |kind, value| Value::Time(Temporal::new(kind, value));
        assert_eq!(field("date"), time(TimeKind::Date, 19_675));
        assert_eq!(field("time_ms"), time(TimeKind::TimeOfDay(Unit::Millis), 80_000_123));
        assert_eq!(field("ts_us"), time(TimeKind::Timestamp(Unit::Micros), 1_700_000_000_123_456));
        assert_eq!(field("local_ns"), time(TimeKind::LocalTimestamp(Unit::Nanos), -1));
        assert_eq!(
            decoded.to_json(),
            serde_json::json!({
                "date": "2023-11-14", "time_ms": "22:13:20.123", "time_us": "22:13:20.123456",
                "ts_ms": "2023-11-14T22:13:20.123Z", "ts_us": "2023-11-14T22:13:20.123456Z",
                "ts_ns": "2023-11-14T22:13:20.123456789Z", "local_ms": "2023-11-14T22:13:20.123",
                "local_us": "2023-11-14T22:13:20.123456", "local_ns": "1969-12-31T23:59:59.999999999",
                "uuid": "01234567-89ab-cdef-0011-223344556677", "uuid_fixed": "01234567-89ab-cdef-0011-223344556677",
                "duration": "P14M3DT3723.004S", "price": "12345.6789"
            })
        );
    }

    #[test]
    fn a_time_of_day_beyond_the_day_is_the_events_error() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "T", "fields": [{"name": "t", "type": {"type": "long", "logicalType": "time-micros"}}]}"#,
        )
        .expect("a valid schema");
        let decoder = Decoder::compile(&schema, &[]).expect("compiles");
        for (micros, ok) in [(0i64, true), (86_399_999_999, true), (86_400_000_000, false), (-1, false)] {
            let bytes = encode(&schema, AvroValue::Record(vec![("t".into(), AvroValue::Long(micros))]));
            let outcome = decoder.decode(&bytes);
            assert_eq!(outcome.is_ok(), ok, "{micros}: {outcome:?}");
            if let Err(error) = outcome {
                assert!(error.to_string().contains("time-micros"), "{error}");
            }
        }
        assert_eq!(uuid_text(&[0; 15]), Err(DecodeError::BadUuid(15)));
    }

    #[test]
    fn decimals_render_with_their_scale() {
        assert_eq!(decimal_text(&[0x30, 0x39], 2).unwrap(), "123.45");
        assert_eq!(decimal_text(&[0x05], 3).unwrap(), "0.005");
        assert_eq!(decimal_text(&[0xff], 0).unwrap(), "-1");
        assert_eq!(decimal_text(&[], 0).unwrap(), "0");
        assert!(decimal_text(&[1; 17], 0).is_err());
        assert_eq!(decimal_text(&[0x05], MAX_DECIMAL_SCALE).expect("at the limit").len(), MAX_DECIMAL_SCALE + 2);
    }

    #[test]
    fn a_huge_decimal_scale_is_the_events_error_not_a_huge_string() {
        // What a registry that checks nothing could hand out: a scale near
        // usize::MAX (scale + 1 would overflow) and one of a trillion.
        let mut decimals = 0;
        for scale in [u64::MAX / 2, 1_000_000_000_000, 5000] {
            let text = format!(
                r#"{{"type":"record","name":"R","fields":[{{"name":"d","type":{{"type":"bytes","logicalType":"decimal","precision":{scale},"scale":{scale}}}}}]}}"#
            );
            // apache-avro may refuse the schema or read it as plain bytes.
            let Ok(schema) = Schema::parse_str(&text) else { continue };
            let decoder = Decoder::compile(&schema, &[]).expect("compiles");
            let outcome = decoder.decode(&[0x02, 0x05]);
            if matches!(outcome, Err(DecodeError::DecimalScale(_))) {
                decimals += 1;
            } else {
                assert!(outcome.is_ok_and(|(_, v)| v.to_json().to_string().len() < 100), "scale {scale}");
            }
        }
        assert!(decimals >= 1, "at least one huge scale reached the decoder as a decimal");
    }
}
