//! The in-memory value of an event, shared by every stage.
//!
//! Avro values are decoded into this small tree rather than into
//! `apache_avro::types::Value`: record field names are interned `&'static str`
//! (a schema's names are few and live as long as the process, since schema
//! ids are immutable), so a decoded record allocates nothing for its names and
//! a field lookup is a short scan of pointer-sized names.
//!
//! Avro type → value: null → `Null`; boolean → `Bool`; int, long → `Int`;
//! the date, time and timestamp logical types over them → `Time` (the
//! integer with its kind and unit, see [`time`]); float, double → `Float`;
//! string, enum symbol → `Str`; uuid (string or fixed) → `Str` in its
//! hyphenated form; decimal (bytes or fixed) → `Str` in plain decimal
//! notation; duration → `Str` in ISO 8601 (`P1M2DT3.004S`); other bytes,
//! fixed → `Bytes`; array → `Array`; map → `Map`; record → `Record`; union →
//! the written branch's value.

pub mod time;

use std::collections::HashSet;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use serde::ser::{SerializeMap, SerializeSeq};
use serde::Serialize;
pub use smol_str::SmolStr;

pub use time::{Temporal, TimeKind, Unit};

/// An interned field name.
pub type Name = &'static str;

/// Returns the one `&'static str` for `name`.
///
/// Names come from schemas, the catalogue and connector files: a bounded set.
/// Never intern data (map keys, string values) here.
pub fn intern(name: &str) -> Name {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    // A poisoned lock only means another thread panicked while inserting;
    // the set itself is still a valid set of leaked names.
    let mut names = names.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(existing) = names.get(name) {
        return existing;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    leaked
}

/// Whether two names are one: by address first (names are interned, so
/// nearly always), then by content (a name written as a literal).
pub fn same_name(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

/// Where `name` is among named entries (a record's fields, an op's fields,
/// a table's columns): by address first, since those names and the names
/// looked up are both interned (one compare per entry instead of a string
/// compare each, on every event's path), then by content for a name that
/// is not.
pub fn name_position<T>(entries: &[(Name, T)], name: &str) -> Option<usize> {
    entries.iter().position(|(n, _)| std::ptr::eq(*n, name)).or_else(|| entries.iter().position(|(n, _)| *n == name))
}

/// `bytes` as text, if they are UTF-8: what `std::str::from_utf8` says,
/// sooner for ASCII. Nearly every string an event carries (ids, codes,
/// names) is short ASCII, which `is_ascii` tells in a few word compares;
/// `from_utf8` costs several times that on a short string (4 % of kawka's
/// instructions on the inventory run, issue 27) and checks the rest.
pub fn utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    if bytes.is_ascii() {
        // SAFETY: every ASCII byte sequence is valid UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Text; up to 23 bytes inline (most of an event's strings), longer
    /// shared: decoding and copying a string allocates nothing in the usual
    /// case.
    Str(SmolStr),
    Bytes(Vec<u8>),
    Array(Vec<Value>),
    /// An Avro map: keys are data.
    Map(Vec<(String, Value)>),
    Record(Record),
    /// A date, time of day or timestamp: the integer Avro wrote, with what
    /// it counts. Text and JSON show it in ISO 8601; integer columns and
    /// versions take the integer as written.
    Time(Temporal),
}

/// A set of [`Value`]'s variants: what the values of a place can be, as
/// a writer schema says before any is decoded (issue 27: an op whose
/// values can only be kinds its columns always take needs no check per
/// event, see `sink::CheckPlan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kinds(u16);

impl Kinds {
    pub const NONE: Kinds = Kinds(0);
    pub const NULL: Kinds = Kinds(1);
    pub const BOOL: Kinds = Kinds(1 << 1);
    pub const INT: Kinds = Kinds(1 << 2);
    pub const FLOAT: Kinds = Kinds(1 << 3);
    pub const STR: Kinds = Kinds(1 << 4);
    pub const BYTES: Kinds = Kinds(1 << 5);
    pub const ARRAY: Kinds = Kinds(1 << 6);
    pub const MAP: Kinds = Kinds(1 << 7);
    pub const RECORD: Kinds = Kinds(1 << 8);
    pub const TIME: Kinds = Kinds(1 << 9);
    /// Whatever a value can be (nothing known of it).
    pub const ANY: Kinds = Kinds((1 << 10) - 1);

    /// The one kind of `value`.
    pub fn of(value: &Value) -> Kinds {
        match value {
            Value::Null => Kinds::NULL,
            Value::Bool(_) => Kinds::BOOL,
            Value::Int(_) => Kinds::INT,
            Value::Float(_) => Kinds::FLOAT,
            Value::Str(_) => Kinds::STR,
            Value::Bytes(_) => Kinds::BYTES,
            Value::Array(_) => Kinds::ARRAY,
            Value::Map(_) => Kinds::MAP,
            Value::Record(_) => Kinds::RECORD,
            Value::Time(_) => Kinds::TIME,
        }
    }

    pub fn or(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
    }

    pub fn and(self, other: Kinds) -> Kinds {
        Kinds(self.0 & other.0)
    }

    pub fn without(self, other: Kinds) -> Kinds {
        Kinds(self.0 & !other.0)
    }

    /// Whether every kind of `self` is one of `other`'s.
    pub fn within(self, other: Kinds) -> bool {
        self.0 & !other.0 == 0
    }
}

/// The fields of a record, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    fields: Vec<(Name, Value)>,
}

impl Record {
    pub fn new() -> Record {
        Record::default()
    }

    pub fn with_capacity(capacity: usize) -> Record {
        Record { fields: Vec::with_capacity(capacity) }
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.position(name).map(|index| &self.fields[index].1)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.position(name).map(|index| &mut self.fields[index].1)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    fn position(&self, name: &str) -> Option<usize> {
        name_position(&self.fields, name)
    }

    /// Sets `name`, keeping its place if it exists, appending otherwise.
    pub fn set(&mut self, name: Name, value: Value) {
        match self.get_mut(name) {
            Some(slot) => *slot = value,
            None => self.fields.push((name, value)),
        }
    }

    /// Appends without looking for an existing field: for decoders that
    /// know names are unique.
    pub fn push(&mut self, name: Name, value: Value) {
        self.fields.push((name, value));
    }

    pub fn remove(&mut self, name: &str) -> Option<Value> {
        let index = self.fields.iter().position(|(n, _)| *n == name)?;
        Some(self.fields.remove(index).1)
    }

    /// Renames a field in place; false when `from` is absent.
    pub fn rename(&mut self, from: &str, to: Name) -> bool {
        match self.fields.iter_mut().find(|(n, _)| *n == from) {
            Some(field) => {
                field.0 = to;
                true
            }
            None => false,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (Name, &Value)> {
        self.fields.iter().map(|(n, v)| (*n, v))
    }

    pub fn names(&self) -> impl Iterator<Item = Name> + '_ {
        self.fields.iter().map(|(n, _)| *n)
    }
}

impl FromIterator<(Name, Value)> for Record {
    fn from_iter<I: IntoIterator<Item = (Name, Value)>>(iter: I) -> Record {
        let mut record = Record::new();
        for (name, value) in iter {
            record.set(name, value);
        }
        record
    }
}

impl IntoIterator for Record {
    type Item = (Name, Value);
    type IntoIter = std::vec::IntoIter<(Name, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.fields.into_iter()
    }
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_record(&self) -> Option<&Record> {
        match self {
            Value::Record(record) => Some(record),
            _ => None,
        }
    }

    pub fn as_record_mut(&mut self) -> Option<&mut Record> {
        match self {
            Value::Record(record) => Some(record),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            _ => None,
        }
    }

    /// Follows a dotted path of record fields (`address.city`).
    pub fn path<'v>(&'v self, path: &[Name]) -> Option<&'v Value> {
        let mut current = self;
        for name in path {
            current = current.as_record()?.get(name)?;
        }
        Some(current)
    }

    /// The value at `path`, to change or take (see [`Value::path`]).
    pub fn path_mut(&mut self, path: &[Name]) -> Option<&mut Value> {
        let mut current = self;
        for name in path {
            current = current.as_record_mut()?.get_mut(name)?;
        }
        Some(current)
    }

    /// A short name of the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
            Value::Record(_) => "record",
            Value::Time(time) => match time.kind {
                TimeKind::Date => "date",
                TimeKind::TimeOfDay(_) => "time of day",
                TimeKind::Timestamp(_) => "timestamp",
                TimeKind::LocalTimestamp(_) => "local timestamp",
            },
        }
    }

    /// The value as JSON. Bytes become a string of their Latin-1 code points
    /// (what Avro's JSON encoding does).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Reads JSON: objects become records (their keys interned), integers
    /// `Int`, other numbers `Float`.
    ///
    /// Only for bounded input (a catalogue default, `kawka upcast` stdin):
    /// object keys are interned.
    pub fn from_json(json: &serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s.into()),
            serde_json::Value::Array(items) => Value::Array(items.iter().map(Value::from_json).collect()),
            serde_json::Value::Object(map) => {
                Value::Record(map.iter().map(|(k, v)| (intern(k), Value::from_json(v))).collect())
            }
        }
    }
}

impl Value {
    /// A total order over values, the same in every process (kinds first,
    /// then contents; floats by their IEEE total order): a batch's rows
    /// are written in this order of their keys, so two writers lock
    /// overlapping rows in one order and queue instead of deadlocking.
    pub fn total_cmp(&self, other: &Value) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        fn rank(value: &Value) -> u8 {
            match value {
                Value::Null => 0,
                Value::Bool(_) => 1,
                Value::Int(_) => 2,
                Value::Float(_) => 3,
                Value::Str(_) => 4,
                Value::Bytes(_) => 5,
                Value::Array(_) => 6,
                Value::Map(_) => 7,
                Value::Record(_) => 8,
                Value::Time(_) => 9,
            }
        }
        fn all<'a, T: 'a>(
            a: impl IntoIterator<Item = &'a T>,
            b: impl IntoIterator<Item = &'a T>,
            cmp: impl Fn(&T, &T) -> Ordering,
        ) -> Ordering {
            let (mut a, mut b) = (a.into_iter(), b.into_iter());
            loop {
                match (a.next(), b.next()) {
                    (None, None) => return Ordering::Equal,
                    (None, Some(_)) => return Ordering::Less,
                    (Some(_), None) => return Ordering::Greater,
                    (Some(x), Some(y)) => match cmp(x, y) {
                        Ordering::Equal => {}
                        unequal => return unequal,
                    },
                }
            }
        }
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Str(a), Value::Str(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            (Value::Array(a), Value::Array(b)) => all(a, b, Value::total_cmp),
            (Value::Map(a), Value::Map(b)) => all(a, b, |(ka, va), (kb, vb)| ka.cmp(kb).then_with(|| va.total_cmp(vb))),
            (Value::Record(a), Value::Record(b)) => {
                all(&a.fields, &b.fields, |(ka, va), (kb, vb)| ka.cmp(kb).then_with(|| va.total_cmp(vb)))
            }
            (Value::Time(a), Value::Time(b)) => a.value.cmp(&b.value).then(a.kind.cmp(&b.kind)),
            (a, b) => rank(a).cmp(&rank(b)),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Value::Str(text) => f.write_str(text),
            Value::Time(time) => write!(f, "{time}"),
            other => write!(f, "{}", other.to_json()),
        }
    }
}

impl From<&str> for Value {
    fn from(text: &str) -> Value {
        Value::Str(text.into())
    }
}

impl From<String> for Value {
    fn from(text: String) -> Value {
        Value::Str(text.into())
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::Int(value)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Value {
        Value::Float(value)
    }
}

impl From<bool> for Value {
    fn from(value: bool) -> Value {
        Value::Bool(value)
    }
}

impl From<Record> for Value {
    fn from(record: Record) -> Value {
        Value::Record(record)
    }
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            // JSON has no NaN or infinity; null is what serde_json writes too.
            Value::Float(x) if !x.is_finite() => serializer.serialize_unit(),
            Value::Float(x) => serializer.serialize_f64(*x),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Bytes(bytes) => {
                let text: String = bytes.iter().map(|&b| char::from(b)).collect();
                serializer.serialize_str(&text)
            }
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
            Value::Record(record) => record.serialize(serializer),
            // Streamed through its Display (ISO 8601): no String per value.
            Value::Time(time) => serializer.collect_str(time),
        }
    }
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len()))?;
        for (name, value) in &self.fields {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ASCII shortcut answers as `from_utf8` does: random byte
    /// strings of every length up to 40 (around the word sizes the ASCII
    /// check reads), mostly ASCII with a non-ASCII byte, a valid
    /// multi-byte character or a cut one placed anywhere.
    #[test]
    fn utf8_answers_as_from_utf8_does() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = std::env::var("KAWKA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut ascii, mut other) = (0, 0);
        for round in 0..20_000 {
            let len = rng.random_range(0..=40);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random_range(0x20..0x7f)).collect();
            let at = rng.random_range(0..=len);
            // What goes in at `at`: nothing, a byte above ASCII (never
            // UTF-8 alone), whole characters of 2 to 4 bytes, or the
            // start of a 3-byte one cut short.
            let inserted: &[u8] = match rng.random_range(0..4) {
                0 => &[],
                1 => &[rng.random_range(0x80..=0xff)],
                2 => "é€😀".as_bytes(),
                _ => &"€".as_bytes()[..rng.random_range(1..3)],
            };
            bytes.splice(at..at, inserted.iter().copied());
            let expected = std::str::from_utf8(&bytes);
            assert_eq!(utf8(&bytes), expected, "round {round} (seed {seed}): {bytes:?}");
            if bytes.is_ascii() {
                ascii += 1
            } else {
                other += 1
            }
        }
        assert!(ascii > 1000 && other > 1000, "both kinds tried: {ascii} ASCII, {other} not");
    }

    #[test]
    fn interning_returns_one_pointer_per_name() {
        let a = intern("order_id");
        let b = intern(&String::from("order_id"));
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn record_set_rename_remove_keep_order() {
        let mut record: Record = [(intern("a"), Value::Int(1)), (intern("b"), Value::Int(2))].into_iter().collect();
        record.set(intern("a"), Value::Int(3));
        assert!(record.rename("b", intern("c")));
        assert!(!record.rename("missing", intern("d")));
        record.set(intern("e"), Value::Null);
        assert_eq!(record.names().collect::<Vec<_>>(), vec!["a", "c", "e"]);
        assert_eq!(record.remove("c"), Some(Value::Int(2)));
        assert_eq!(record.get("a"), Some(&Value::Int(3)));
    }

    #[test]
    fn json_round_trip() {
        let json = serde_json::json!({"id": 7, "name": "x", "tags": ["a"], "nested": {"ok": true, "score": 1.5}});
        let value = Value::from_json(&json);
        assert_eq!(value.path(&[intern("nested"), intern("ok")]), Some(&Value::Bool(true)));
        assert_eq!(value.to_json(), json);
        assert_eq!(Value::Float(f64::NAN).to_json(), serde_json::Value::Null);
        assert_eq!(Value::Bytes(vec![0x41, 0xff]).to_json(), serde_json::json!("A\u{ff}"));
    }
}
