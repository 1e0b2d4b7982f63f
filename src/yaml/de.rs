//! The serde deserializer over a [`Node`] tree, which records every problem
//! with its position instead of stopping at the first one.
//!
//! Recovery rules (so that one run finds as much as it can):
//! * a scalar of the wrong kind is recorded and replaced by a neutral value
//!   (`0`, `false`, `""`, empty list) so that the rest still deserializes;
//! * an unknown key of a struct is recorded and skipped (the struct's field
//!   list comes from `deserialize_struct`, so `deny_unknown_fields` structs
//!   never see it);
//! * an unknown enum variant is recorded and the first variant stands in for
//!   it, with recording muted for its content;
//! * structural errors (a missing required field, a list where a mapping must
//!   be) are recorded at the nearest node and abort the enclosing value.
//!
//! The caller treats any recorded problem as failure, so neutral values never
//! reach a running daemon.

use std::cell::{Cell, RefCell};
use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use super::{is_null_text, Mark, Node, NodeKind};

/// One problem found while deserializing, before the file name is attached.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProblem {
    pub mark: Mark,
    /// Dotted path of the field, e.g. `source.topics[1]`.
    pub field: String,
    pub message: String,
}

/// The serde name that makes a struct deserialize as [`Spanned`].
const SPANNED: &str = "$kawka::Spanned";
const SPANNED_FIELDS: &[&str] = &["line", "column", "value"];

/// A value with the position of the node it came from, so that `validate`
/// can report problems it finds later (a bad duration, an unknown sink name)
/// at the right line.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub mark: Mark,
    pub value: T,
}

impl<T> Spanned<T> {
    pub fn new(value: T) -> Spanned<T> {
        Spanned { mark: Mark::default(), value }
    }
}

impl<T> std::ops::Deref for Spanned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: de::Deserialize<'de>> de::Deserialize<'de> for Spanned<T> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpannedVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: de::Deserialize<'de>> Visitor<'de> for SpannedVisitor<T> {
            type Value = Spanned<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Spanned<T>, A::Error> {
                let mut mark = Mark::default();
                let mut value = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "line" => mark.line = map.next_value()?,
                        "column" => mark.column = map.next_value()?,
                        _ => value = Some(map.next_value()?),
                    }
                }
                let value = value.ok_or_else(|| de::Error::missing_field("value"))?;
                Ok(Spanned { mark, value })
            }
        }
        deserializer.deserialize_struct(SPANNED, SPANNED_FIELDS, SpannedVisitor(Default::default()))
    }
}

/// Deserializes `T` from `node`, collecting every problem.
pub fn from_node<T: de::DeserializeOwned>(node: &Node) -> Result<T, Vec<NodeProblem>> {
    let recorder = Recorder::default();
    let result = T::deserialize(NodeDeserializer { node, recorder: &recorder, path: &Path::Root });
    let mut problems = recorder.problems.into_inner();
    match result {
        Ok(value) if problems.is_empty() => Ok(value),
        Ok(_) | Err(Error::Recorded) => Err(problems),
        Err(Error::Message(message)) => {
            problems.push(NodeProblem { mark: node.mark, field: String::new(), message });
            Err(problems)
        }
    }
}

#[derive(Default)]
struct Recorder {
    problems: RefCell<Vec<NodeProblem>>,
    /// While positive, problems are not recorded (content of a substituted
    /// enum variant would only produce follow-on noise).
    muted: Cell<u32>,
}

impl Recorder {
    fn record(&self, mark: Mark, path: &Path, message: String) {
        if self.muted.get() == 0 {
            self.problems.borrow_mut().push(NodeProblem { mark, field: path.to_string(), message });
        }
    }
}

enum Path<'a> {
    Root,
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Key(Path::Root, key) => write!(f, "{key}"),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

#[derive(Debug)]
enum Error {
    /// Already recorded with its position; just unwind.
    Recorded,
    /// Raised by a `Deserialize` impl (missing field, custom check): the
    /// nearest node on the way out records it.
    Message(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Recorded => f.write_str("problem recorded"),
            Error::Message(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::Message(msg.to_string())
    }
}

#[derive(Clone, Copy)]
struct NodeDeserializer<'a> {
    node: &'a Node,
    recorder: &'a Recorder,
    path: &'a Path<'a>,
}

impl<'a> NodeDeserializer<'a> {
    fn record(&self, message: String) {
        self.recorder.record(self.node.mark, self.path, message);
    }

    fn fail<T>(&self, message: String) -> Result<T, Error> {
        self.record(message);
        Err(Error::Recorded)
    }

    /// Gives an error raised below this node the node's position.
    fn attach(&self, error: Error) -> Error {
        match error {
            Error::Recorded => Error::Recorded,
            Error::Message(message) => {
                self.record(message);
                Error::Recorded
            }
        }
    }

    fn scalar(&self) -> Option<&'a str> {
        match &self.node.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    fn integer(&self) -> Option<i128> {
        let NodeKind::Scalar { text, plain: true } = &self.node.kind else { return None };
        let text = text.replace('_', "");
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(&text)),
        };
        let magnitude = if let Some(hex) = digits.strip_prefix("0x") {
            i128::from_str_radix(hex, 16).ok()?
        } else if let Some(octal) = digits.strip_prefix("0o") {
            i128::from_str_radix(octal, 8).ok()?
        } else {
            digits.parse::<i128>().ok()?
        };
        Some(if negative { -magnitude } else { magnitude })
    }

    fn float(&self) -> Option<f64> {
        let NodeKind::Scalar { text, plain: true } = &self.node.kind else { return None };
        match text.as_str() {
            ".inf" | ".Inf" | "+.inf" => Some(f64::INFINITY),
            "-.inf" | "-.Inf" => Some(f64::NEG_INFINITY),
            ".nan" | ".NaN" => Some(f64::NAN),
            // Only things that look like numbers: `inf` or `nan` as words are strings.
            other if other.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c)) => {
                other.replace('_', "").parse().ok()
            }
            _ => None,
        }
    }

    fn boolean(&self) -> Option<bool> {
        match &self.node.kind {
            NodeKind::Scalar { text, plain: true } => match text.as_str() {
                "true" | "True" | "TRUE" => Some(true),
                "false" | "False" | "FALSE" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    fn child(&self, node: &'a Node, path: &'a Path<'a>) -> NodeDeserializer<'a> {
        NodeDeserializer { node, recorder: self.recorder, path }
    }

    fn deserialize_integer<'de, V: Visitor<'de>>(
        self,
        min: i128,
        max: i128,
        kind: &str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        let value = match self.integer() {
            Some(value) if (min..=max).contains(&value) => value,
            Some(value) => {
                self.record(format!("{value} is out of range for {kind} ({min}..={max})"));
                0
            }
            None => {
                self.record(format!("expected {kind}, found {}", self.node.describe()));
                0
            }
        };
        if value < 0 { visitor.visit_i64(value as i64) } else { visitor.visit_u64(value as u64) }
            .map_err(|e| self.attach(e))
    }
}

macro_rules! integer_methods {
    ($($method:ident => $ty:ty, $kind:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.deserialize_integer(<$ty>::MIN as i128, <$ty>::MAX as i128, $kind, visitor)
        }
    )*};
}

impl<'de, 'a> de::Deserializer<'de> for NodeDeserializer<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = match &self.node.kind {
            NodeKind::Scalar { text, plain } => {
                if *plain && is_null_text(text) {
                    visitor.visit_unit()
                } else if let Some(value) = self.boolean() {
                    visitor.visit_bool(value)
                } else if let Some(value) = self.integer().and_then(|v| i64::try_from(v).ok()) {
                    visitor.visit_i64(value)
                } else if let Some(value) = self.float() {
                    visitor.visit_f64(value)
                } else {
                    visitor.visit_str(text)
                }
            }
            NodeKind::Seq(items) => visitor.visit_seq(SeqAccess::new(self, items)),
            NodeKind::Map(entries) => visitor.visit_map(MapAccess::new(self, entries, None)),
        };
        result.map_err(|e| self.attach(e))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let value = self.boolean().unwrap_or_else(|| {
            self.record(format!("expected true or false, found {}", self.node.describe()));
            false
        });
        visitor.visit_bool(value).map_err(|e| self.attach(e))
    }

    integer_methods! {
        deserialize_i8 => i8, "an integer";
        deserialize_i16 => i16, "an integer";
        deserialize_i32 => i32, "an integer";
        deserialize_i64 => i64, "an integer";
        deserialize_u8 => u8, "a non-negative integer";
        deserialize_u16 => u16, "a non-negative integer";
        deserialize_u32 => u32, "a non-negative integer";
        deserialize_u64 => u64, "a non-negative integer";
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let value = self.float().unwrap_or_else(|| {
            self.record(format!("expected a number, found {}", self.node.describe()));
            0.0
        });
        visitor.visit_f64(value).map_err(|e| self.attach(e))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Any scalar reads as a string (`topics: [2024]` is the topic "2024");
        // a null is not a string.
        let text = match self.scalar() {
            Some(text) if !self.node.is_null() => text,
            _ => {
                self.record(format!("expected a string, found {}", self.node.describe()));
                ""
            }
        };
        visitor.visit_str(text).map_err(|e| self.attach(e))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.node.is_null() { visitor.visit_none() } else { visitor.visit_some(self) }.map_err(|e| self.attach(e))
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if !self.node.is_null() {
            self.record(format!("expected nothing, found {}", self.node.describe()));
        }
        visitor.visit_unit().map_err(|e| self.attach(e))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self).map_err(|e| self.attach(e))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let items: &[Node] = match &self.node.kind {
            NodeKind::Seq(items) => items,
            // An empty value (`topics:`) reads as an empty list; checks of
            // "at least one" belong to validation, which says it better.
            _ if self.node.is_null() => &[],
            _ => {
                self.record(format!("expected a list, found {}", self.node.describe()));
                &[]
            }
        };
        visitor.visit_seq(SeqAccess::new(self, items)).map_err(|e| self.attach(e))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let entries: &[(Node, Node)] = match &self.node.kind {
            NodeKind::Map(entries) => entries,
            _ if self.node.is_null() => &[],
            _ => return self.fail(format!("expected a mapping, found {}", self.node.describe())),
        };
        visitor.visit_map(MapAccess::new(self, entries, None)).map_err(|e| self.attach(e))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        if name == SPANNED {
            return visitor.visit_map(SpannedAccess { de: self, step: 0 });
        }
        let entries: &[(Node, Node)] = match &self.node.kind {
            NodeKind::Map(entries) => entries,
            _ if self.node.is_null() => &[],
            _ => return self.fail(format!("expected a mapping, found {}", self.node.describe())),
        };
        visitor.visit_map(MapAccess::new(self, entries, Some(fields))).map_err(|e| self.attach(e))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let (tag_node, content) = match &self.node.kind {
            NodeKind::Scalar { .. } => (self.node, None),
            NodeKind::Map(entries) if entries.len() == 1 => (&entries[0].0, Some(&entries[0].1)),
            _ => return self.fail(format!("expected one of {}, found {}", list_names(variants), self.node.describe())),
        };
        let tag = tag_node.as_str().unwrap_or_default();
        let known = variants.contains(&tag);
        if !known {
            self.recorder.record(
                tag_node.mark,
                self.path,
                format!("unknown value `{tag}`, expected one of {}", list_names(variants)),
            );
            self.recorder.muted.set(self.recorder.muted.get() + 1);
        }
        let access = EnumAccess {
            de: self,
            variant: if known { tag } else { variants.first().copied().unwrap_or_default() },
            content,
        };
        let result = visitor.visit_enum(access);
        if !known {
            self.recorder.muted.set(self.recorder.muted.get() - 1);
            // The problem is recorded, so the document fails as a whole; the
            // stand-in only lets the rest of it be checked.
            return result.map_err(|_| Error::Recorded);
        }
        result.map_err(|e| self.attach(e))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

fn list_names(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

struct SeqAccess<'a> {
    de: NodeDeserializer<'a>,
    items: &'a [Node],
    index: usize,
}

impl<'a> SeqAccess<'a> {
    fn new(de: NodeDeserializer<'a>, items: &'a [Node]) -> Self {
        SeqAccess { de, items, index: 0 }
    }
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        let Some(item) = self.items.get(self.index) else { return Ok(None) };
        let path = Path::Index(self.de.path, self.index);
        self.index += 1;
        let de = self.de.child(item, &path);
        seed.deserialize(de).map(Some).map_err(|e| de.attach(e))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.index)
    }
}

struct MapAccess<'a> {
    de: NodeDeserializer<'a>,
    entries: &'a [(Node, Node)],
    index: usize,
    /// The struct's fields, when deserializing a struct: unknown keys are
    /// recorded and skipped here.
    fields: Option<&'static [&'static str]>,
}

impl<'a> MapAccess<'a> {
    fn new(de: NodeDeserializer<'a>, entries: &'a [(Node, Node)], fields: Option<&'static [&'static str]>) -> Self {
        MapAccess { de, entries, index: 0, fields }
    }
}

impl<'de> de::MapAccess<'de> for MapAccess<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        while let Some((key, _)) = self.entries.get(self.index) {
            if let (Some(fields), Some(name)) = (self.fields, key.as_str()) {
                if !fields.contains(&name) {
                    let path = Path::Key(self.de.path, name);
                    self.de.recorder.record(
                        key.mark,
                        &path,
                        format!("unknown field `{name}`, expected one of {}", list_names(fields)),
                    );
                    self.index += 1;
                    continue;
                }
            }
            let de = self.de.child(key, self.de.path);
            return seed.deserialize(de).map(Some).map_err(|e| de.attach(e));
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (key, value) = &self.entries[self.index];
        self.index += 1;
        let path = Path::Key(self.de.path, key.as_str().unwrap_or("?"));
        let de = self.de.child(value, &path);
        seed.deserialize(de).map_err(|e| de.attach(e))
    }
}

struct SpannedAccess<'a> {
    de: NodeDeserializer<'a>,
    step: usize,
}

impl<'de> de::MapAccess<'de> for SpannedAccess<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(key) = SPANNED_FIELDS.get(self.step) else { return Ok(None) };
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let step = self.step;
        self.step += 1;
        match step {
            0 => seed.deserialize((self.de.node.mark.line as u64).into_deserializer()),
            1 => seed.deserialize((self.de.node.mark.column as u64).into_deserializer()),
            _ => seed.deserialize(self.de),
        }
    }
}

struct EnumAccess<'a> {
    de: NodeDeserializer<'a>,
    variant: &'a str,
    content: Option<&'a Node>,
}

impl<'de, 'a> de::EnumAccess<'de> for EnumAccess<'a> {
    type Error = Error;
    type Variant = VariantAccess<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), Error> {
        let variant = seed.deserialize(self.variant.into_deserializer())?;
        Ok((variant, VariantAccess { de: self.de, content: self.content, name: self.variant }))
    }
}

struct VariantAccess<'a> {
    de: NodeDeserializer<'a>,
    content: Option<&'a Node>,
    name: &'a str,
}

impl<'a> VariantAccess<'a> {
    fn with_content<T>(&self, f: impl FnOnce(NodeDeserializer<'_>) -> Result<T, Error>) -> Result<T, Error> {
        let null = Node::null(self.de.node.mark);
        let node = self.content.unwrap_or(&null);
        let path = Path::Key(self.de.path, self.name);
        f(self.de.child(node, &path))
    }
}

impl<'de> de::VariantAccess<'de> for VariantAccess<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self.content {
            Some(node) if !node.is_null() => {
                self.with_content(|de| de.fail(format!("`{}` takes no value, found {}", self.name, node.describe())))
            }
            _ => Ok(()),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        self.with_content(|de| seed.deserialize(de).map_err(|e| de.attach(e)))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.with_content(|de| de::Deserializer::deserialize_seq(de, visitor))
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        self.with_content(|de| de::Deserializer::deserialize_struct(de, "", fields, visitor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        count: u32,
        #[serde(default)]
        flag: bool,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: Spanned<String>,
        inner: Inner,
        #[serde(default)]
        tags: Vec<String>,
        mode: Option<Mode>,
        #[serde(default)]
        extra: BTreeMap<String, serde_json::Value>,
    }

    fn problems(source: &str) -> Vec<String> {
        let node = parse(source).expect("test yaml parses");
        match from_node::<Outer>(&node) {
            Ok(value) => panic!("expected problems, got {value:?}"),
            Err(problems) => problems
                .iter()
                .map(|p| format!("{}:{} {}: {}", p.mark.line, p.mark.column, p.field, p.message))
                .collect(),
        }
    }

    #[test]
    fn reads_a_good_document_with_positions() {
        let node = parse("name: a\ninner: { count: 3 }\ntags: [1, x]\nmode: slow\nextra: {k: [1, 2.5, true, null]}\n")
            .unwrap();
        let value: Outer = from_node(&node).unwrap();
        assert_eq!(value.name.value, "a");
        assert_eq!(value.name.mark, Mark { line: 1, column: 7 });
        assert_eq!(value.inner, Inner { count: 3, flag: false });
        assert_eq!(value.tags, vec!["1", "x"]);
        assert_eq!(value.mode, Some(Mode::Slow));
        assert_eq!(value.extra["k"], serde_json::json!([1, 2.5, true, null]));
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let found = problems("name: a\nbogus: 1\ninner:\n  count: many\n  flag: maybe\n  other: 2\nmode: medium\n");
        assert_eq!(
            found,
            vec![
                "2:1 bogus: unknown field `bogus`, expected one of `name`, `inner`, `tags`, `mode`, `extra`",
                "4:10 inner.count: expected a non-negative integer, found `many`",
                "5:9 inner.flag: expected true or false, found `maybe`",
                "6:3 inner.other: unknown field `other`, expected one of `count`, `flag`",
                "7:7 mode: unknown value `medium`, expected one of `fast`, `slow`",
            ]
        );
    }

    #[test]
    fn missing_field_is_reported_at_the_mapping() {
        let found = problems("name: a\ninner:\n  flag: true\n");
        assert_eq!(found, vec!["3:3 inner: missing field `count`"]);
    }

    #[test]
    fn wrong_shape_is_reported() {
        let found = problems("name: [a]\ninner: 5\n");
        assert_eq!(
            found,
            vec!["1:7 name: expected a string, found a list", "2:8 inner: expected a mapping, found `5`",]
        );
    }

    #[test]
    fn out_of_range_integer_is_reported() {
        let found = problems("name: a\ninner: { count: -1 }\n");
        assert_eq!(found, vec!["2:17 inner.count: -1 is out of range for a non-negative integer (0..=4294967295)"]);
    }
}
