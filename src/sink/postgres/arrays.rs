//! The typed arrays a statement binds, one per column (pure).

use super::coerce::{text_of, to_bool, to_bytes, to_float, to_int, Text};
use super::types::{BindKind, ColumnType};
use crate::value::Value;

/// Values of one column across the rows of a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnArray {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Bytes(Vec<Option<Vec<u8>>>),
    Text(TextColumn),
}

/// The text values of one column, in one buffer: a batch's strings are
/// copied once, into it, rather than each into an allocation of its own.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextColumn {
    text: String,
    /// Where each value sits in `text`; `None` for null.
    spans: Vec<Option<(usize, usize)>>,
}

impl TextColumn {
    pub fn with_capacity(rows: usize) -> TextColumn {
        TextColumn { text: String::with_capacity(rows * 16), spans: Vec::with_capacity(rows) }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn push(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.push_with(|text| text.push_str(value)),
            None => self.spans.push(None),
        }
    }

    /// Appends the value `write` appends to the buffer.
    fn push_with(&mut self, write: impl FnOnce(&mut String)) {
        let start = self.text.len();
        write(&mut self.text);
        self.spans.push(Some((start, self.text.len())));
    }

    pub fn get(&self, row: usize) -> Option<&str> {
        self.spans[row].map(|(start, end)| &self.text[start..end])
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<&str>> {
        (0..self.len()).map(|row| self.get(row))
    }
}

impl<'a> FromIterator<Option<&'a str>> for TextColumn {
    fn from_iter<I: IntoIterator<Item = Option<&'a str>>>(values: I) -> TextColumn {
        let mut column = TextColumn::default();
        values.into_iter().for_each(|value| column.push(value));
        column
    }
}

impl ColumnArray {
    pub(super) fn new(kind: BindKind, capacity: usize) -> ColumnArray {
        match kind {
            BindKind::Int => ColumnArray::Int(Vec::with_capacity(capacity)),
            BindKind::Float => ColumnArray::Float(Vec::with_capacity(capacity)),
            BindKind::Bool => ColumnArray::Bool(Vec::with_capacity(capacity)),
            BindKind::Bytes => ColumnArray::Bytes(Vec::with_capacity(capacity)),
            BindKind::Text => ColumnArray::Text(TextColumn::with_capacity(capacity)),
        }
    }

    pub(super) fn array_type(&self) -> &'static str {
        match self {
            ColumnArray::Int(_) => "bigint[]",
            ColumnArray::Float(_) => "float8[]",
            ColumnArray::Bool(_) => "bool[]",
            ColumnArray::Bytes(_) => "bytea[]",
            ColumnArray::Text(_) => "text[]",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ColumnArray::Int(v) => v.len(),
            ColumnArray::Float(v) => v.len(),
            ColumnArray::Bool(v) => v.len(),
            ColumnArray::Bytes(v) => v.len(),
            ColumnArray::Text(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a null.
    pub(super) fn push_null(&mut self) {
        match self {
            ColumnArray::Int(v) => v.push(None),
            ColumnArray::Float(v) => v.push(None),
            ColumnArray::Bool(v) => v.push(None),
            ColumnArray::Bytes(v) => v.push(None),
            ColumnArray::Text(v) => v.push(None),
        }
    }

    /// An empty array of the same kind, with room for `capacity` values.
    pub(super) fn empty_like(&self, capacity: usize) -> ColumnArray {
        let kind = match self {
            ColumnArray::Int(_) => BindKind::Int,
            ColumnArray::Float(_) => BindKind::Float,
            ColumnArray::Bool(_) => BindKind::Bool,
            ColumnArray::Bytes(_) => BindKind::Bytes,
            ColumnArray::Text(_) => BindKind::Text,
        };
        ColumnArray::new(kind, capacity)
    }

    /// Appends one value converted for `ty`; `Err` says why it does not fit.
    pub(super) fn push(&mut self, ty: ColumnType, value: &Value) -> Result<(), String> {
        match self {
            ColumnArray::Int(v) => v.push(to_int(value)?),
            ColumnArray::Float(v) => v.push(to_float(value)?),
            ColumnArray::Bool(v) => v.push(to_bool(value)?),
            ColumnArray::Bytes(v) => v.push(to_bytes(value)?),
            // Written straight into the column's buffer.
            ColumnArray::Text(v) => match text_of(ty, value)? {
                // Apart: the common case is cheaper without `write`.
                Some(Text::Str(s)) => v.push(Some(s)),
                Some(text) => v.push_with(|out| text.write(out)),
                None => v.push(None),
            },
        }
        Ok(())
    }
}
