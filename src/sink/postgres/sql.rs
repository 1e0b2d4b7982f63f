//! The SQL of a Postgres read model and the arrays bound to it (pure).
//!
//! Every statement binds one typed array per column and reads them back with
//! `UNNEST`, so a batch of any size is a handful of statements with a few
//! parameters each (multi-row `VALUES` would hit the 65,535-parameter limit).
//! Compaction guarantees each key appears once per batch, which
//! `INSERT … ON CONFLICT DO UPDATE` requires.
//!
//! An upsert also carries an [`Insert`]: the same rows as `COPY` text and an
//! `UPDATE … RETURNING` of the rows whose key exists. `COPY` checks no
//! conflicts and inserts at several times the rate of an upsert, so the sink
//! writes new keys with it and keeps the upsert for when a key turns up.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::types::{BindKind, ColumnType};
use crate::projection::compact::{Effect, NetOp};
use crate::sink::postgres::PostgresTarget;
use crate::value::{intern, name_position, Name, Value};

/// The hidden column that holds the domain version when the connector names one.
pub const VERSION_COLUMN: &str = "kawka_version";

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
/// copied once, into it, rather than each into an allocation of its own
/// (allocating and freeing them was a good part of kawka's CPU).
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
    fn new(kind: BindKind, capacity: usize) -> ColumnArray {
        match kind {
            BindKind::Int => ColumnArray::Int(Vec::with_capacity(capacity)),
            BindKind::Float => ColumnArray::Float(Vec::with_capacity(capacity)),
            BindKind::Bool => ColumnArray::Bool(Vec::with_capacity(capacity)),
            BindKind::Bytes => ColumnArray::Bytes(Vec::with_capacity(capacity)),
            BindKind::Text => ColumnArray::Text(TextColumn::with_capacity(capacity)),
        }
    }

    fn array_type(&self) -> &'static str {
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

    /// An empty array of the same kind, with room for `capacity` values.
    fn empty_like(&self, capacity: usize) -> ColumnArray {
        let kind = match self {
            ColumnArray::Int(_) => BindKind::Int,
            ColumnArray::Float(_) => BindKind::Float,
            ColumnArray::Bool(_) => BindKind::Bool,
            ColumnArray::Bytes(_) => BindKind::Bytes,
            ColumnArray::Text(_) => BindKind::Text,
        };
        ColumnArray::new(kind, capacity)
    }

    /// Appends the value one field of `COPY` text holds (as
    /// [`copy_value`] wrote it).
    fn push_copy_field(&mut self, field: &[u8]) -> Result<(), String> {
        if field == COPY_NULL {
            match self {
                ColumnArray::Int(v) => v.push(None),
                ColumnArray::Float(v) => v.push(None),
                ColumnArray::Bool(v) => v.push(None),
                ColumnArray::Bytes(v) => v.push(None),
                ColumnArray::Text(v) => v.push(None),
            }
            return Ok(());
        }
        let text = unescape_copy(field);
        let text = std::str::from_utf8(&text).map_err(|_| "not UTF-8".to_string())?;
        match self {
            ColumnArray::Int(v) => v.push(Some(text.parse().map_err(|_| format!("not an integer: {text:?}"))?)),
            ColumnArray::Float(v) => v.push(Some(text.parse().map_err(|_| format!("not a number: {text:?}"))?)),
            ColumnArray::Bool(v) => v.push(Some(match text {
                "t" => true,
                "f" => false,
                _ => return Err(format!("not a boolean: {text:?}")),
            })),
            ColumnArray::Bytes(v) => {
                let hex = text.strip_prefix("\\x").ok_or_else(|| format!("not hex bytea: {text:?}"))?;
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|at| hex.get(at..at + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| format!("not hex bytea: {text:?}"))?;
                v.push(Some(bytes));
            }
            ColumnArray::Text(v) => v.push(Some(text)),
        }
        Ok(())
    }

    /// Appends one value converted for `ty`; `Err` says why it does not fit.
    fn push(&mut self, ty: ColumnType, value: &Value) -> Result<(), String> {
        match self {
            ColumnArray::Int(v) => v.push(to_int(value)?),
            ColumnArray::Float(v) => v.push(to_float(value)?),
            ColumnArray::Bool(v) => v.push(to_bool(value)?),
            ColumnArray::Bytes(v) => v.push(to_bytes(value)?),
            // Written straight into the column's buffer.
            ColumnArray::Text(v) => match text_of(ty, value)? {
                // (Apart: through `write` the common case ran a third slower.)
                Some(Text::Str(s)) => v.push(Some(s)),
                Some(text) => v.push_with(|out| text.write(out)),
                None => v.push(None),
            },
        }
        Ok(())
    }
}

/// Checks that `value` fits a column of type `ty` (what `push` would say),
/// without building the bound value: it runs once per op before batching.
pub fn check_value(ty: ColumnType, value: &Value) -> Result<(), String> {
    match ty.bind_kind() {
        BindKind::Int => to_int(value).map(drop),
        BindKind::Float => to_float(value).map(drop),
        BindKind::Bool => to_bool(value).map(drop),
        BindKind::Bytes => match value {
            Value::Null | Value::Bytes(_) | Value::Str(_) => Ok(()),
            other => Err(mismatch(other, "a bytea column")),
        },
        BindKind::Text => text_of(ty, value).map(drop),
    }
}

fn mismatch(value: &Value, what: &str) -> String {
    match value {
        Value::Str(s) if s.chars().count() <= 40 => format!("{what} cannot hold the string {s:?}"),
        other => format!("{what} cannot hold a {}", other.kind()),
    }
}

fn to_int(value: &Value) -> Result<Option<i64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i)),
        Value::Float(x) if x.fract() == 0.0 && x.abs() < 9.2e18 => Ok(Some(*x as i64)),
        Value::Str(s) => s.trim().parse().map(Some).map_err(|_| mismatch(value, "an integer column")),
        other => Err(mismatch(other, "an integer column")),
    }
}

fn to_float(value: &Value) -> Result<Option<f64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i as f64)),
        Value::Float(x) => Ok(Some(*x)),
        Value::Str(s) => s.trim().parse().map(Some).map_err(|_| mismatch(value, "a float column")),
        other => Err(mismatch(other, "a float column")),
    }
}

fn to_bool(value: &Value) -> Result<Option<bool>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::Str(s) if s == "true" || s == "false" => Ok(Some(s == "true")),
        other => Err(mismatch(other, "a boolean column")),
    }
}

fn to_bytes(value: &Value) -> Result<Option<Vec<u8>>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Bytes(b) => Ok(Some(b.clone())),
        Value::Str(s) => Ok(Some(s.as_bytes().to_vec())),
        other => Err(mismatch(other, "a bytea column")),
    }
}

/// How a value goes to Postgres as text, to be cast there to the column
/// type: decided without building the text, so that checking an op (for
/// every op, before batching) allocates nothing; [`Text::write`] builds it.
enum Text<'v> {
    Str(&'v str),
    /// Integers in timestamp columns are milliseconds since the epoch
    /// (`$timestamp`, Avro timestamp-millis).
    Millis(i64),
    /// Integers in date columns are days since the epoch.
    Days(i64),
    Json(&'v Value),
    /// Numbers and booleans as they display.
    Shown(&'v Value),
}

impl Text<'_> {
    #[inline]
    fn write(&self, out: &mut String) {
        use std::fmt::Write as _;
        match self {
            Text::Str(s) => out.push_str(s),
            Text::Millis(millis) => push_millis(*millis, out),
            Text::Days(days) => push_days(*days, out),
            // Writing to a String cannot fail.
            Text::Json(value) => drop(write!(out, "{}", value.to_json())),
            Text::Shown(value) => drop(write!(out, "{value}")),
        }
    }
}

/// The text form of `value` for a column of type `ty`; `None` for null.
fn text_of(ty: ColumnType, value: &Value) -> Result<Option<Text<'_>>, String> {
    if value.is_null() {
        return Ok(None);
    }
    let wrong = |other: &Value| mismatch(other, &format!("a {} column", ty.sql()));
    let text = match (ty, value) {
        (ColumnType::Json | ColumnType::Jsonb, value) => Text::Json(value),
        (_, Value::Str(s)) => Text::Str(s),
        (ColumnType::TimestampTz | ColumnType::Timestamp, Value::Int(millis)) => Text::Millis(*millis),
        (ColumnType::Date, Value::Int(days)) => Text::Days(*days),
        (ColumnType::TimestampTz | ColumnType::Timestamp | ColumnType::Date, other) => return Err(wrong(other)),
        (ColumnType::Numeric, Value::Int(_) | Value::Float(_)) => Text::Shown(value),
        (ColumnType::Numeric, other) => return Err(wrong(other)),
        (_, Value::Int(_) | Value::Float(_) | Value::Bool(_)) => Text::Shown(value),
        (ColumnType::Text, Value::Record(_) | Value::Map(_) | Value::Array(_)) => Text::Json(value),
        (_, other) => return Err(wrong(other)),
    };
    Ok(Some(text))
}

/// `1970-01-01T00:00:00.000Z` for milliseconds since the epoch.
///
/// Written digit by digit: every timestamp of a batch passes here, and
/// with `format!` this was 7 % of kawka's CPU profile.
pub fn format_millis(millis: i64) -> String {
    let mut out = String::with_capacity(24);
    push_millis(millis, &mut out);
    out
}

fn push_millis(millis: i64, out: &mut String) {
    let in_day = millis.rem_euclid(86_400_000);
    push_days(millis.div_euclid(86_400_000), out);
    out.push('T');
    push_digits(out, in_day / 3_600_000, 2);
    out.push(':');
    push_digits(out, in_day / 60_000 % 60, 2);
    out.push(':');
    push_digits(out, in_day / 1000 % 60, 2);
    out.push('.');
    push_digits(out, in_day % 1000, 3);
    out.push('Z');
}

/// `YYYY-MM-DD` for days since 1970-01-01 (proleptic Gregorian).
pub fn format_days(days: i64) -> String {
    let mut out = String::with_capacity(10);
    push_days(days, &mut out);
    out
}

fn push_days(days: i64, out: &mut String) {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if (0..=9999).contains(&year) {
        push_digits(out, year, 4);
    } else {
        // Years Postgres mostly refuses anyway; the rare path may format.
        out.push_str(&format!("{year:04}"));
    }
    out.push('-');
    push_digits(out, month, 2);
    out.push('-');
    push_digits(out, day, 2);
}

/// `n` (0 ≤ n < 10^width) in exactly `width` digits.
fn push_digits(out: &mut String, n: i64, width: u32) {
    let mut divisor = 10i64.pow(width - 1);
    while divisor > 0 {
        out.push(char::from(b'0' + (n / divisor % 10) as u8));
        divisor /= 10;
    }
}

/// Double-quotes an identifier.
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// One statement and its arrays, `$1…$n` in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    /// The bound values; empty arrays of the right kinds when the rows were
    /// planned straight into `COPY` text ([`Insert::rendered`]), read back
    /// from it by [`Statement::bound_arrays`] if the upsert is needed after all.
    pub arrays: Vec<ColumnArray>,
    /// Index into the planned net ops of each row, to name the culprit.
    pub rows: Vec<usize>,
    /// For an upsert: how to write the same rows without conflict checks.
    pub insert: Option<Insert>,
}

/// The rows of an upsert written as plain inserts. Equal in effect to the
/// upsert only for keys no row has yet: the sink runs `copy` in a savepoint
/// and falls back to the upsert when it meets an existing key.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    /// `COPY t (…) FROM STDIN`, one column per array, in order.
    pub copy: String,
    /// The type of the column each array fills (`None`: the version column).
    pub types: Vec<Option<ColumnType>>,
    /// `UPDATE t … FROM UNNEST(…) WITH ORDINALITY … RETURNING u.n` and
    /// `array_agg` of those: applies the rows whose key exists and returns
    /// their 1-based ordinals, so the rest can be copied. In one array, not
    /// a row each: receiving thousands of rows was a sixth of kawka's CPU
    /// in an update-heavy run. `None` when a row can exist and still not be
    /// updated (a version guard) or there is nothing to set: a missing
    /// ordinal would not mean a missing row.
    pub update: Option<String>,
    /// The `COPY` text of every row, when the plan was asked for it (the
    /// sink expects new keys): written straight from the net ops, without
    /// the bound arrays, which the usual write (a `COPY` of new keys) does
    /// not need. The write is then only I/O.
    pub rendered: Option<Vec<u8>>,
}

impl Statement {
    /// The bound arrays: as planned, or read back from the `COPY` text when
    /// the rows were planned into that alone (a `COPY` that met an existing
    /// key, or a guess that changed, needs the upsert's arrays after all).
    pub fn bound_arrays(&self) -> Result<std::borrow::Cow<'_, [ColumnArray]>, String> {
        match &self.insert {
            Some(Insert { rendered: Some(text), .. }) => {
                arrays_from_copy(text, &self.arrays, self.rows.len()).map(std::borrow::Cow::Owned)
            }
            _ => Ok(std::borrow::Cow::Borrowed(&self.arrays)),
        }
    }
}

/// A net op whose values do not fit the table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("column `{column}`: {message}")]
pub struct BindError {
    /// Index of the net op.
    pub op: usize,
    pub column: String,
    pub message: String,
}

/// Builds the statements of one table.
#[derive(Debug, Clone)]
pub struct TableSql {
    target: PostgresTarget,
    /// `"schema"."table"`.
    pub qualified: String,
    /// `"schema"."kawka_offsets"`.
    pub offsets_table: String,
    versioned: bool,
}

impl TableSql {
    pub fn new(target: &PostgresTarget, versioned: bool) -> TableSql {
        TableSql {
            qualified: format!("{}.{}", quote(&target.schema), quote(&target.table)),
            offsets_table: format!("{}.kawka_offsets", quote(&target.schema)),
            target: target.clone(),
            versioned,
        }
    }

    pub fn target(&self) -> &PostgresTarget {
        &self.target
    }

    pub fn create_table(&self) -> String {
        let mut sql = format!("CREATE TABLE IF NOT EXISTS {} (", self.qualified);
        for column in &self.target.columns {
            let not_null = if self.target.primary_key.contains(&column.name) { " NOT NULL" } else { "" };
            let _ = write!(sql, "{} {}{not_null}, ", quote(&column.name), column.ty.sql());
        }
        if self.versioned {
            let _ = write!(sql, "{VERSION_COLUMN} bigint, ");
        }
        let _ = write!(sql, "PRIMARY KEY ({}))", self.key_list());
        if let Some(fillfactor) = self.target.fillfactor {
            let _ = write!(sql, " WITH (fillfactor = {fillfactor})");
        }
        sql
    }

    /// The positions table: `next_offset` is the offset of the first record
    /// whose effect is not in the table (last applied + 1); `epoch` fences
    /// owners: each assignment bumps it, and a write only commits while the
    /// epoch it read is still current.
    pub fn create_offsets_table(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (connector text NOT NULL, topic text NOT NULL, partition integer NOT NULL, \
             next_offset bigint, epoch bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (connector, topic, partition))",
            self.offsets_table
        )
    }

    /// Takes ownership of partitions: `$1` connector, `$2` topics, `$3` partitions.
    pub fn claim(&self) -> String {
        format!(
            "INSERT INTO {t} AS o (connector, topic, partition, next_offset, epoch) \
             SELECT $1, u.topic, u.partition, NULL, 1 FROM UNNEST($2::text[], $3::int[]) AS u(topic, partition) \
             ON CONFLICT (connector, topic, partition) DO UPDATE SET epoch = o.epoch + 1, updated_at = now() \
             RETURNING topic, partition, next_offset, epoch",
            t = self.offsets_table
        )
    }

    /// Moves positions forward only, where the epoch is still ours: `$1`
    /// connector, `$2` topics, `$3` partitions, `$4` next offsets, `$5`
    /// epochs. Fewer rows updated than partitions given means another owner
    /// took over, or the batch committed before.
    pub fn advance(&self) -> String {
        format!(
            "UPDATE {t} AS o SET next_offset = u.next_offset, updated_at = now() \
             FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS u(topic, partition, next_offset, epoch) \
             WHERE o.connector = $1 AND o.topic = u.topic AND o.partition = u.partition AND o.epoch = u.epoch \
             AND (o.next_offset IS NULL OR o.next_offset < u.next_offset)",
            t = self.offsets_table
        )
    }

    /// Moves one partition's position forward only, where the epoch is
    /// still ours: `$1` connector, `$2` topic, `$3` partition, `$4` next
    /// offset, `$5` epoch. No row updated means fenced, or already there.
    pub fn advance_one(&self) -> String {
        format!(
            "UPDATE {t} SET next_offset = $4, updated_at = now() \
             WHERE connector = $1 AND topic = $2 AND partition = $3 AND epoch = $5 \
             AND (next_offset IS NULL OR next_offset < $4)",
            t = self.offsets_table
        )
    }

    /// The epoch and position of one partition: `$1` connector, `$2` topic, `$3` partition.
    pub fn position_of(&self) -> String {
        format!(
            "SELECT epoch, next_offset FROM {t} WHERE connector = $1 AND topic = $2 AND partition = $3",
            t = self.offsets_table
        )
    }

    fn key_list(&self) -> String {
        self.target.primary_key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")
    }

    fn column_type(&self, name: &str) -> ColumnType {
        self.target.column(name).map_or(ColumnType::Text, |c| c.ty)
    }

    /// The statements that apply `net` (deletes, replaces, then one patch
    /// statement per shape of set and added columns). Each key is in
    /// exactly one statement, so their order does not matter.
    pub fn plan(&self, net: &[NetOp]) -> Result<Vec<Statement>, BindError> {
        self.plan_rendering(net, &|_| false)
    }

    /// [`TableSql::plan`], with the upserts whose `COPY` statement `render`
    /// picks planned straight into `COPY` text ([`Insert::rendered`]).
    pub fn plan_rendering(&self, net: &[NetOp], render: &dyn Fn(&str) -> bool) -> Result<Vec<Statement>, BindError> {
        let mut deletes = Vec::new();
        let mut replaces = Vec::new();
        // Patches grouped by shape (sorted set and added names), each shape
        // once in `shapes`, found by `by_shape`. An op naming the same fields
        // in the same order as the patch before it (ops of one rule do) joins
        // its shape without sorting and comparing the names again.
        let mut shapes: Vec<(Shape, Vec<usize>)> = Vec::new();
        let mut by_shape: BTreeMap<Shape, usize> = BTreeMap::new();
        let mut last: Option<(usize, usize)> = None;
        for (index, op) in net.iter().enumerate() {
            match &op.effect {
                Effect::Delete => deletes.push(index),
                Effect::Replace(_) => replaces.push(index),
                Effect::Patch { set, add } => {
                    let shape = match last {
                        Some((before, shape)) if same_names(&net[before].effect, set, add) => shape,
                        _ => {
                            let names = |fields: &[(Name, Value)]| {
                                let mut names: Vec<Name> = fields.iter().map(|(n, _)| *n).collect();
                                names.sort_unstable();
                                names
                            };
                            *by_shape.entry((names(set), names(add))).or_insert_with_key(|key| {
                                shapes.push((key.clone(), Vec::new()));
                                shapes.len() - 1
                            })
                        }
                    };
                    shapes[shape].1.push(index);
                    last = Some((index, shape));
                }
            }
        }
        let mut statements = Vec::new();
        if !deletes.is_empty() {
            statements.push(self.delete(net, deletes)?);
        }
        if !replaces.is_empty() {
            statements.push(self.replace(net, replaces, render)?);
        }
        for shape in by_shape.into_values() {
            let ((set, add), rows) = std::mem::take(&mut shapes[shape]);
            statements.push(self.patch(net, rows, &set, &add, render)?);
        }
        Ok(statements)
    }

    fn key_arrays(&self, net: &[NetOp], rows: &[usize]) -> Result<Vec<ColumnArray>, BindError> {
        let mut arrays = Vec::with_capacity(self.target.primary_key.len());
        for (part, name) in self.target.primary_key.iter().enumerate() {
            let ty = self.column_type(name);
            let mut array = ColumnArray::new(ty.bind_kind(), rows.len());
            for &row in rows {
                let value = key_part(net, row, part, name)?;
                array.push(ty, value).map_err(|message| BindError { op: row, column: name.clone(), message })?;
            }
            arrays.push(array);
        }
        Ok(arrays)
    }

    fn version_array(&self, net: &[NetOp], rows: &[usize]) -> ColumnArray {
        ColumnArray::Int(rows.iter().map(|&row| net[row].version).collect())
    }

    /// One array per column of `columns` (name, and whether it is an
    /// added column of a patch) over `rows`, which are all replaces or all
    /// patches. Filled row by row, each row's fields read while they are in
    /// cache: column by column, every op of a batch was read again for each
    /// column and missed the cache each time (a visible part of kawka's
    /// profile, unlike in a small benchmark). Each column remembers where
    /// its field was in the row before: ops of one rule list their fields in
    /// one order, so most lookups take one compare.
    fn value_arrays(
        &self,
        net: &[NetOp],
        rows: &[usize],
        columns: &[(Name, bool)],
    ) -> Result<Vec<ColumnArray>, BindError> {
        let types: Vec<ColumnType> = columns.iter().map(|(name, _)| self.column_type(name)).collect();
        let mut arrays: Vec<ColumnArray> =
            types.iter().map(|ty| ColumnArray::new(ty.bind_kind(), rows.len())).collect();
        let mut hints = vec![0; columns.len()];
        for &row in rows {
            let (set, add) = match &net[row].effect {
                Effect::Replace(fields) => (&fields[..], &[][..]),
                Effect::Patch { set, add } => (&set[..], &add[..]),
                Effect::Delete => unreachable!("rows are replaces or patches"),
            };
            for (column, &(name, adding)) in columns.iter().enumerate() {
                let fields = if adding { add } else { set };
                let value = field_value_from(fields, name, &mut hints[column]);
                arrays[column].push(types[column], value).map_err(|message| BindError {
                    op: row,
                    column: name.to_string(),
                    message,
                })?;
            }
        }
        Ok(arrays)
    }

    fn delete(&self, net: &[NetOp], rows: Vec<usize>) -> Result<Statement, BindError> {
        let mut arrays = self.key_arrays(net, &rows)?;
        let keys = &self.target.primary_key;
        let mut sql = format!("DELETE FROM {} AS t USING (SELECT ", self.qualified);
        let casts: Vec<String> =
            keys.iter().enumerate().map(|(i, k)| format!("u.c{i}::{} AS c{i}", self.column_type(k).sql())).collect();
        sql.push_str(&casts.join(", "));
        if self.versioned {
            let _ = write!(sql, ", u.v");
            arrays.push(self.version_array(net, &rows));
        }
        let _ = write!(sql, " FROM UNNEST({}) AS u(", unnest_params(&arrays));
        let mut names: Vec<String> = (0..keys.len()).map(|i| format!("c{i}")).collect();
        if self.versioned {
            names.push("v".into());
        }
        let _ = write!(sql, "{})) AS d WHERE ", names.join(", "));
        let matches: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("t.{} = d.c{i}", quote(k))).collect();
        sql.push_str(&matches.join(" AND "));
        if self.versioned {
            let _ = write!(sql, " AND (d.v IS NULL OR t.{VERSION_COLUMN} IS NULL OR t.{VERSION_COLUMN} < d.v)");
        }
        Ok(Statement { sql, arrays, rows, insert: None })
    }

    /// Replace: every column, unlisted ones null.
    fn replace(&self, net: &[NetOp], rows: Vec<usize>, render: &dyn Fn(&str) -> bool) -> Result<Statement, BindError> {
        // Interned, as the ops' field names are: `field_value_from` then finds
        // each by address.
        let columns: Vec<(Name, bool)> = self
            .target
            .columns
            .iter()
            .filter(|c| !self.target.primary_key.contains(&c.name))
            .map(|c| (intern(&c.name), false))
            .collect();
        let set = columns.len();
        self.upsert(net, rows, &columns, set, render)
    }

    /// Patch: set some columns, add to others; the row is created if missing.
    fn patch(
        &self,
        net: &[NetOp],
        rows: Vec<usize>,
        set: &[Name],
        add: &[Name],
        render: &dyn Fn(&str) -> bool,
    ) -> Result<Statement, BindError> {
        let columns: Vec<(Name, bool)> =
            set.iter().map(|name| (*name, false)).chain(add.iter().map(|name| (*name, true))).collect();
        self.upsert(net, rows, &columns, set.len(), render)
    }

    /// Insert-or-update of the `bound` value columns (name, and whether it
    /// is added to): the first `set` of them are set, the others added to (a missing
    /// row starts from the delta; an existing null counts as 0). With
    /// `render` picking its `COPY`, the rows become `COPY` text and the
    /// arrays stay empty ([`Insert::rendered`]).
    fn upsert(
        &self,
        net: &[NetOp],
        rows: Vec<usize>,
        bound: &[(Name, bool)],
        set: usize,
        render: &dyn Fn(&str) -> bool,
    ) -> Result<Statement, BindError> {
        let keys = &self.target.primary_key;
        let value_columns: Vec<&str> = bound.iter().map(|(name, _)| *name).collect();
        let mut columns: Vec<String> = keys.iter().map(|k| quote(k)).collect();
        columns.extend(value_columns.iter().map(|c| quote(c)));
        let mut types: Vec<Option<ColumnType>> = keys
            .iter()
            .map(String::as_str)
            .chain(value_columns.iter().copied())
            .map(|n| Some(self.column_type(n)))
            .collect();
        // The SQL needs only the arrays' kinds: empty ones until the rows
        // are bound (below, unless rendered).
        let mut arrays: Vec<ColumnArray> =
            types.iter().flatten().map(|ty| ColumnArray::new(ty.bind_kind(), 0)).collect();
        let mut casts: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("u.c{i}::{}", ty.map_or("bigint", ColumnType::sql)))
            .collect();
        // The new value of each column, from the proposed one (`EXCLUDED.c`
        // in the upsert, the bound array in the plain update).
        let assign = |proposed: &dyn Fn(usize, &str) -> String| -> Vec<String> {
            value_columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (c, value) = (quote(c), proposed(keys.len() + i, c));
                    if i < set {
                        format!("{c} = {value}")
                    } else {
                        format!("{c} = COALESCE(t.{c}, 0) + {value}")
                    }
                })
                .collect()
        };
        let mut updates = assign(&|_, c| format!("EXCLUDED.{}", quote(c)));
        // Without a version guard an existing key's row is always updated,
        // so the rows `UPDATE` does not return are exactly the new keys.
        let update = (!self.versioned && !updates.is_empty()).then(|| {
            let names: Vec<String> = (0..arrays.len()).map(|i| format!("c{i}")).collect();
            let matches: Vec<String> =
                keys.iter().enumerate().map(|(i, k)| format!("t.{} = {}", quote(k), casts[i])).collect();
            format!(
                "WITH updated AS (UPDATE {} AS t SET {} FROM UNNEST({}) WITH ORDINALITY AS u({}, n) WHERE {} \
                 RETURNING u.n) SELECT array_agg(n) FROM updated",
                self.qualified,
                assign(&|i, _| casts[i].clone()).join(", "),
                unnest_params(&arrays),
                names.join(", "),
                matches.join(" AND ")
            )
        });
        if self.versioned {
            columns.push(VERSION_COLUMN.to_string());
            casts.push(format!("u.c{}", casts.len()));
            types.push(None);
            updates.push(format!("{VERSION_COLUMN} = EXCLUDED.{VERSION_COLUMN}"));
            arrays.push(ColumnArray::Int(Vec::new()));
        }
        let names: Vec<String> = (0..arrays.len()).map(|i| format!("c{i}")).collect();
        let mut sql = format!(
            "INSERT INTO {} AS t ({}) SELECT {} FROM UNNEST({}) AS u({}) ON CONFLICT ({}) ",
            self.qualified,
            columns.join(", "),
            casts.join(", "),
            unnest_params(&arrays),
            names.join(", "),
            self.key_list()
        );
        if updates.is_empty() {
            sql.push_str("DO NOTHING");
        } else {
            let _ = write!(sql, "DO UPDATE SET {}", updates.join(", "));
            if self.versioned {
                let _ = write!(
                    sql,
                    " WHERE t.{VERSION_COLUMN} IS NULL OR EXCLUDED.{VERSION_COLUMN} IS NULL \
                     OR t.{VERSION_COLUMN} < EXCLUDED.{VERSION_COLUMN}"
                );
            }
        }
        let copy = format!("COPY {} ({}) FROM STDIN", self.qualified, columns.join(", "));
        let rendered = if render(&copy) {
            Some(self.copy_text_of(net, &rows, bound, &types)?)
        } else {
            arrays = self.key_arrays(net, &rows)?;
            arrays.extend(self.value_arrays(net, &rows, bound)?);
            if self.versioned {
                arrays.push(self.version_array(net, &rows));
            }
            None
        };
        Ok(Statement { sql, arrays, rows, insert: Some(Insert { copy, types, update, rendered }) })
    }

    /// The `COPY` text of `rows` (keys, `columns`, then the version when
    /// versioned), straight from the net ops: the same text as binding them
    /// ([`ColumnArray::push`]) and rendering the arrays ([`copy_rows`]), the
    /// same errors, without building the arrays in between. `types` are the
    /// upsert's, one per column of the text.
    fn copy_text_of(
        &self,
        net: &[NetOp],
        rows: &[usize],
        columns: &[(Name, bool)],
        types: &[Option<ColumnType>],
    ) -> Result<Vec<u8>, BindError> {
        let keys = &self.target.primary_key;
        let mut out = copy_buffer(rows.len(), types.len());
        let mut scratch = String::new();
        let mut hints = vec![0; columns.len()];
        let column_type = |at: usize| types[at].expect("key and value columns have a type");
        for &row in rows {
            let op = &net[row];
            for (part, name) in keys.iter().enumerate() {
                if part > 0 {
                    out.push(b'\t');
                }
                let value = key_part(net, row, part, name)?;
                copy_field(column_type(part), value, &mut scratch, &mut out).map_err(|message| BindError {
                    op: row,
                    column: name.clone(),
                    message,
                })?;
            }
            let (set, add) = match &op.effect {
                Effect::Replace(fields) => (&fields[..], &[][..]),
                Effect::Patch { set, add } => (&set[..], &add[..]),
                Effect::Delete => unreachable!("rows of an upsert are replaces or patches"),
            };
            for (column, &(name, adding)) in columns.iter().enumerate() {
                out.push(b'\t');
                let value = field_value_from(if adding { add } else { set }, name, &mut hints[column]);
                copy_field(column_type(keys.len() + column), value, &mut scratch, &mut out)
                    .map_err(|message| BindError { op: row, column: name.to_string(), message })?;
            }
            if self.versioned {
                out.push(b'\t');
                write_copy(op.version.map_or(CopyValue::Null, CopyValue::Int), None, &mut out);
            }
            out.push(b'\n');
        }
        Ok(out)
    }
}

/// The shape of a patch: its set and its added column names, each sorted.
type Shape = (Vec<Name>, Vec<Name>);

/// Whether `effect` is a patch naming the fields of `set` and `add`, in the
/// same order (names are interned: compared by address, then by content).
fn same_names(effect: &Effect, set: &[(Name, Value)], add: &[(Name, Value)]) -> bool {
    let same = |a: &[(Name, Value)], b: &[(Name, Value)]| {
        a.len() == b.len() && a.iter().zip(b).all(|((x, _), (y, _))| std::ptr::eq(*x, *y) || x == y)
    };
    matches!(effect, Effect::Patch { set: before_set, add: before_add } if same(before_set, set) && same(before_add, add))
}

/// Key part `part` of net op `row`, which must not be null.
fn key_part<'v>(net: &'v [NetOp], row: usize, part: usize, name: &str) -> Result<&'v Value, BindError> {
    match net[row].key.get(part) {
        Some(value) if !value.is_null() => Ok(value),
        _ => Err(BindError { op: row, column: name.to_string(), message: "key is null".into() }),
    }
}

/// The value of field `name` (null when absent): the field at `*hint`
/// first (this runs for every column of every row), then as
/// [`name_position`] finds it. `*hint` becomes where it was found.
fn field_value_from<'v>(fields: &'v [(Name, Value)], name: &str, hint: &mut usize) -> &'v Value {
    if let Some((n, value)) = fields.get(*hint) {
        if std::ptr::eq(*n, name) {
            return value;
        }
    }
    match name_position(fields, name) {
        Some(index) => {
            *hint = index;
            &fields[index].1
        }
        None => &Value::Null,
    }
}

fn unnest_params(arrays: &[ColumnArray]) -> String {
    arrays.iter().enumerate().map(|(i, a)| format!("${}::{}", i + 1, a.array_type())).collect::<Vec<_>>().join(", ")
}

/// Appends `rows` (indexes into the arrays) as `COPY … FROM STDIN` text:
/// each value as the text its column's input function reads to what the
/// upsert's cast of the bound value gives.
pub fn copy_rows(
    arrays: &[ColumnArray],
    types: &[Option<ColumnType>],
    rows: impl IntoIterator<Item = usize>,
    out: &mut Vec<u8>,
) {
    for row in rows {
        for (column, array) in arrays.iter().enumerate() {
            if column > 0 {
                out.push(b'\t');
            }
            copy_value(array, row, types.get(column).copied().flatten(), out);
        }
        out.push(b'\n');
    }
}

/// A buffer for the `COPY` text of `rows` rows of `columns` values, sized
/// for ~16 bytes a value up front: growing a buffer of megabytes by
/// doubling copies it and churns the allocator.
pub fn copy_buffer(rows: usize, columns: usize) -> Vec<u8> {
    Vec::with_capacity(rows * columns * 16)
}

/// How `COPY` text spells null.
const COPY_NULL: &[u8] = b"\\N";

fn copy_value(array: &ColumnArray, row: usize, ty: Option<ColumnType>, out: &mut Vec<u8>) {
    let value = match array {
        ColumnArray::Int(v) => v[row].map_or(CopyValue::Null, CopyValue::Int),
        ColumnArray::Float(v) => v[row].map_or(CopyValue::Null, CopyValue::Float),
        ColumnArray::Bool(v) => v[row].map_or(CopyValue::Null, CopyValue::Bool),
        ColumnArray::Bytes(v) => v[row].as_deref().map_or(CopyValue::Null, CopyValue::Bytes),
        ColumnArray::Text(v) => v.get(row).map_or(CopyValue::Null, CopyValue::Text),
    };
    write_copy(value, ty, out);
}

/// One value as bound, whether read from a bound array ([`copy_value`]) or
/// converted from an op's value ([`copy_field`]): both write it with
/// [`write_copy`], so the two give the same text.
enum CopyValue<'a> {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Bytes(&'a [u8]),
    Text(&'a str),
}

/// `value` as `COPY` text for a column of type `ty` (`None`: the version column).
fn write_copy(value: CopyValue, ty: Option<ColumnType>, out: &mut Vec<u8>) {
    match value {
        CopyValue::Null => out.extend_from_slice(COPY_NULL),
        CopyValue::Int(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
        // Writing to a Vec cannot fail.
        CopyValue::Float(x) => drop(write_float(out, x, ty)),
        CopyValue::Bool(b) => out.push(if b { b't' } else { b'f' }),
        CopyValue::Bytes(bytes) => copy_bytes(bytes, out),
        CopyValue::Text(text) => escape_copy(text, out),
    }
}

/// bytea's hex input, its backslash escaped for COPY.
fn copy_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\\\x");
    for byte in bytes {
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 0xf)]);
    }
}

/// One value of a column of type `ty` as `COPY` text: what binding it
/// ([`ColumnArray::push`]) and rendering that ([`copy_value`]) write, with
/// the same errors. `scratch` holds text that needs escaping after it is
/// built (timestamps, JSON, numbers in text columns).
fn copy_field(ty: ColumnType, value: &Value, scratch: &mut String, out: &mut Vec<u8>) -> Result<(), String> {
    let bytes;
    let value = match ty.bind_kind() {
        BindKind::Int => to_int(value)?.map_or(CopyValue::Null, CopyValue::Int),
        BindKind::Float => to_float(value)?.map_or(CopyValue::Null, CopyValue::Float),
        BindKind::Bool => to_bool(value)?.map_or(CopyValue::Null, CopyValue::Bool),
        BindKind::Bytes => {
            bytes = to_bytes(value)?;
            bytes.as_deref().map_or(CopyValue::Null, CopyValue::Bytes)
        }
        BindKind::Text => match text_of(ty, value)? {
            None => CopyValue::Null,
            Some(Text::Str(text)) => CopyValue::Text(text),
            Some(text) => {
                scratch.clear();
                text.write(scratch);
                CopyValue::Text(scratch)
            }
        },
    };
    write_copy(value, Some(ty), out);
    Ok(())
}

/// Reads `COPY` text written by [`TableSql::copy_text_of`] back into
/// arrays of the kinds of `kinds` (`rows` lines). `Err` says where it does
/// not read, which would be a bug in the writing.
fn arrays_from_copy(text: &[u8], kinds: &[ColumnArray], rows: usize) -> Result<Vec<ColumnArray>, String> {
    let mut arrays: Vec<ColumnArray> = kinds.iter().map(|kind| kind.empty_like(rows)).collect();
    let mut lines = text.split(|&b| b == b'\n');
    for row in 0..rows {
        let line = lines.next().ok_or_else(|| format!("COPY text ends before row {row}"))?;
        let mut fields = line.split(|&b| b == b'\t');
        for (column, array) in arrays.iter_mut().enumerate() {
            let field = fields.next().ok_or_else(|| format!("row {row} ends before column {column}"))?;
            array.push_copy_field(field).map_err(|message| format!("row {row}, column {column}: {message}"))?;
        }
    }
    Ok(arrays)
}

/// Undoes [`escape_copy`].
fn unescape_copy(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.iter();
    while let Some(&byte) = bytes.next() {
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(&other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    out
}

/// A float as `float8in`/`float4in` read it back exactly. A `real` column
/// gets the value rounded to `f32` first, as the upsert's `float8::real`
/// cast does, unless that overflows or underflows: then the full value,
/// which `float4in` refuses as the cast would.
fn write_float(out: &mut Vec<u8>, x: f64, ty: Option<ColumnType>) -> std::io::Result<()> {
    use std::io::Write as _;
    if x.is_nan() {
        return write!(out, "NaN");
    }
    if x.is_infinite() {
        return write!(out, "{}Infinity", if x < 0.0 { "-" } else { "" });
    }
    let narrow = x as f32;
    if ty == Some(ColumnType::Real) && narrow.is_finite() && (narrow != 0.0 || x == 0.0) {
        write!(out, "{narrow:?}")
    } else {
        write!(out, "{x:?}")
    }
}

/// Text with COPY's escapes for backslash, newline, carriage return and tab.
/// Copied a run at a time: most values have nothing to escape, and a push
/// per byte was most of rendering a batch's `COPY` text.
fn escape_copy(text: &str, out: &mut Vec<u8>) {
    let mut rest = text.as_bytes();
    while let Some(at) = rest.iter().position(|b| matches!(b, b'\\' | b'\n' | b'\r' | b'\t')) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(match rest[at] {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\t",
        });
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::postgres::Column;
    use crate::value::Record;

    fn replace(fields: Vec<(Name, Value)>) -> Effect<'static> {
        Effect::Replace(fields.into())
    }

    fn patch(set: Vec<(Name, Value)>, add: Vec<(Name, Value)>) -> Effect<'static> {
        Effect::Patch { set: set.into(), add: add.into() }
    }

    fn inventory() -> TableSql {
        TableSql::new(
            &PostgresTarget {
                schema: "public".into(),
                table: "inventory".into(),
                columns: vec![
                    Column { name: "store_id".into(), ty: ColumnType::Text },
                    Column { name: "item_id".into(), ty: ColumnType::Text },
                    Column { name: "on_hand".into(), ty: ColumnType::BigInt },
                    Column { name: "seen_at".into(), ty: ColumnType::TimestampTz },
                ],
                primary_key: vec!["store_id".into(), "item_id".into()],
                create: true,
                fillfactor: None,
            },
            false,
        )
    }

    fn net(store: &str, effect: Effect<'static>) -> NetOp<'static> {
        NetOp {
            key: vec![Value::from(store), Value::from("i1")].into(),
            effect,
            version: None,
            partition: Some(("t", 0)),
        }
    }

    #[test]
    fn patches_add_with_coalesce_and_group_by_shape() {
        let ops = vec![
            net("s1", patch(vec![], vec![("on_hand", Value::Int(5))])),
            net("s2", patch(vec![], vec![("on_hand", Value::Int(-2))])),
            net("s3", patch(vec![("seen_at", Value::Int(0))], vec![])),
        ];
        let statements = inventory().plan(&ops).expect("binds");
        assert_eq!(statements.len(), 2);
        assert_eq!(
            statements[0].sql,
            "INSERT INTO \"public\".\"inventory\" AS t (\"store_id\", \"item_id\", \"on_hand\") \
             SELECT u.c0::text, u.c1::text, u.c2::bigint FROM UNNEST($1::text[], $2::text[], $3::bigint[]) \
             AS u(c0, c1, c2) ON CONFLICT (\"store_id\", \"item_id\") \
             DO UPDATE SET \"on_hand\" = COALESCE(t.\"on_hand\", 0) + EXCLUDED.\"on_hand\""
        );
        assert_eq!(statements[0].arrays[2], ColumnArray::Int(vec![Some(5), Some(-2)]));
        assert_eq!(statements[0].rows, vec![0, 1]);
        assert!(statements[1].sql.contains("DO UPDATE SET \"seen_at\" = EXCLUDED.\"seen_at\""));
        assert_eq!(
            statements[1].arrays[2],
            ColumnArray::Text([Some("1970-01-01T00:00:00.000Z")].into_iter().collect())
        );
    }

    #[test]
    fn patches_of_one_shape_in_any_field_order_are_one_statement() {
        let both = |first: (Name, Value), second: (Name, Value)| patch(vec![first, second], vec![]);
        let ops = vec![
            net("s1", both(("on_hand", Value::Int(1)), ("seen_at", Value::Int(0)))),
            net("s2", both(("on_hand", Value::Int(2)), ("seen_at", Value::Int(0)))),
            net("s3", patch(vec![("on_hand", Value::Int(3))], vec![])),
            net("s4", both(("seen_at", Value::Int(0)), ("on_hand", Value::Int(4)))),
            net("s5", patch(vec![], vec![("on_hand", Value::Int(5))])),
        ];
        let statements = inventory().plan(&ops).expect("binds");
        let rows: Vec<&[usize]> = statements.iter().map(|s| &s.rows[..]).collect();
        assert_eq!(rows, [&[4][..], &[2], &[0, 1, 3]], "shapes in the order of their sorted names: add, set");
        assert_eq!(statements[2].arrays[2], ColumnArray::Int(vec![Some(1), Some(2), Some(4)]));
    }

    #[test]
    fn replaces_write_every_column_and_deletes_match_the_key() {
        let ops = vec![net("s1", replace(vec![("on_hand", Value::Int(1))])), net("s2", Effect::Delete)];
        let statements = inventory().plan(&ops).expect("binds");
        assert_eq!(
            statements[0].sql,
            "DELETE FROM \"public\".\"inventory\" AS t USING (SELECT u.c0::text AS c0, u.c1::text AS c1 \
             FROM UNNEST($1::text[], $2::text[]) AS u(c0, c1)) AS d WHERE t.\"store_id\" = d.c0 AND t.\"item_id\" = d.c1"
        );
        assert!(statements[1]
            .sql
            .ends_with("DO UPDATE SET \"on_hand\" = EXCLUDED.\"on_hand\", \"seen_at\" = EXCLUDED.\"seen_at\""));
        assert_eq!(statements[1].arrays[3], ColumnArray::Text([None].into_iter().collect()));
    }

    #[test]
    fn upserts_carry_a_copy_and_an_update_of_existing_keys() {
        let ops = vec![net("s1", patch(vec![("seen_at", Value::Int(0))], vec![("on_hand", Value::Int(5))]))];
        let statement = &inventory().plan(&ops).expect("binds")[0];
        let insert = statement.insert.as_ref().expect("an upsert can be copied");
        assert_eq!(
            insert.copy,
            "COPY \"public\".\"inventory\" (\"store_id\", \"item_id\", \"seen_at\", \"on_hand\") FROM STDIN"
        );
        assert_eq!(
            insert.update.as_deref(),
            Some(
                "WITH updated AS (UPDATE \"public\".\"inventory\" AS t SET \"seen_at\" = u.c2::timestamptz, \
                 \"on_hand\" = COALESCE(t.\"on_hand\", 0) + u.c3::bigint \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS u(c0, c1, c2, c3, n) \
                 WHERE t.\"store_id\" = u.c0::text AND t.\"item_id\" = u.c1::text \
                 RETURNING u.n) SELECT array_agg(n) FROM updated"
            )
        );
        let mut versioned = inventory();
        versioned.versioned = true;
        let statement = &versioned.plan(&ops).expect("binds")[0];
        let insert = statement.insert.as_ref().expect("copied too");
        assert!(insert.copy.contains("\"on_hand\", kawka_version) FROM STDIN"), "{}", insert.copy);
        assert_eq!(insert.update, None, "a guarded update may skip a row that exists");
        assert_eq!(insert.types.last(), Some(&None));
        let delete = &inventory().plan(&[net("s1", Effect::Delete)]).expect("binds")[0];
        assert_eq!(delete.insert, None);
    }

    #[test]
    fn copy_text_escapes_and_writes_what_the_casts_read() {
        let arrays = vec![
            ColumnArray::Text([Some("a\tb\\c\nd\re"), None].into_iter().collect()),
            ColumnArray::Int(vec![Some(-12), None]),
            ColumnArray::Float(vec![Some(0.1), Some(f64::NEG_INFINITY)]),
            ColumnArray::Float(vec![Some(0.1), Some(1e300)]),
            ColumnArray::Bool(vec![Some(true), Some(false)]),
            ColumnArray::Bytes(vec![Some(vec![0, 0x5c, 0xff]), Some(vec![])]),
        ];
        let types = [
            ColumnType::Text,
            ColumnType::BigInt,
            ColumnType::Double,
            ColumnType::Real,
            ColumnType::Boolean,
            ColumnType::Bytea,
        ]
        .map(Some);
        let mut out = Vec::new();
        copy_rows(&arrays, &types, [1, 0], &mut out);
        assert_eq!(
            String::from_utf8(out).expect("text"),
            "\\N\t\\N\t-Infinity\t1e300\tf\t\\\\x\n\
             a\\tb\\\\c\\nd\\re\t-12\t0.1\t0.1\tt\t\\\\x005cff\n",
            "a real is rounded to f32 first (0.1), unless that overflows (1e300 is refused as the cast would)"
        );
    }

    /// A table with a column of every kind of text conversion.
    fn every_type(versioned: bool) -> TableSql {
        use ColumnType::*;
        let columns = [("id", Text), ("n", BigInt), ("small", SmallInt), ("x", Double), ("r", Real), ("b", Boolean)]
            .into_iter()
            .chain([
                ("bytes", Bytea),
                ("t", Text),
                ("at", TimestampTz),
                ("day", Date),
                ("doc", Jsonb),
                ("amount", Numeric),
            ]);
        TableSql::new(
            &PostgresTarget {
                schema: "public".into(),
                table: "every".into(),
                columns: columns.map(|(name, ty)| Column { name: name.into(), ty }).collect(),
                primary_key: vec!["id".into()],
                create: true,
                fillfactor: None,
            },
            versioned,
        )
    }

    fn every_row(id: &str, version: Option<i64>, fields: Vec<(Name, Value)>) -> NetOp<'static> {
        NetOp { key: vec![Value::from(id)].into(), effect: replace(fields), version, partition: Some(("t", 0)) }
    }

    #[test]
    fn copy_text_planned_from_the_ops_is_the_arrays_text_and_reads_back_into_them() {
        let mut record = Record::new();
        record.push("k", Value::from("v\tw"));
        let full = vec![
            (intern("n"), Value::Int(-7)),
            (intern("small"), Value::Int(3)),
            (intern("x"), Value::Float(f64::NEG_INFINITY)),
            (intern("r"), Value::Float(0.5)),
            (intern("b"), Value::Bool(false)),
            (intern("bytes"), Value::Bytes(vec![0, 0x5c, 0xff, b'\t'])),
            (intern("t"), Value::from("a\tb\\c\nd\re \\N")),
            (intern("at"), Value::Int(1_700_000_000_123)),
            (intern("day"), Value::Int(-1)),
            (intern("doc"), Value::Record(record)),
            (intern("amount"), Value::Float(12.25)),
        ];
        // Fields in another order, some absent (null), numbers in text columns.
        let sparse = vec![
            (intern("t"), Value::Int(42)),
            (intern("x"), Value::Float(f64::NAN)),
            (intern("bytes"), Value::from("\\x")),
            (intern("amount"), Value::Int(-3)),
            (intern("b"), Value::Null),
        ];
        let ops = vec![every_row("a\nb", Some(3), full), every_row("", None, sparse), every_row("c", Some(1), vec![])];
        for versioned in [false, true] {
            let table = every_type(versioned);
            let bound = table.plan(&ops).expect("binds");
            let rendered = table.plan_rendering(&ops, &|copy| copy.starts_with("COPY")).expect("binds");
            assert_eq!(bound.len(), 1);
            let insert = bound[0].insert.as_ref().expect("an upsert");
            let mut expected = Vec::new();
            copy_rows(&bound[0].arrays, &insert.types, 0..3, &mut expected);
            let text = rendered[0].insert.as_ref().and_then(|i| i.rendered.clone()).expect("rendered");
            assert_eq!(String::from_utf8_lossy(&text), String::from_utf8_lossy(&expected), "versioned: {versioned}");
            assert!(rendered[0].arrays.iter().all(ColumnArray::is_empty), "no arrays bound beside the text");
            assert_eq!(rendered[0].sql, bound[0].sql);
            assert_eq!(rendered[0].insert.as_ref().map(|i| &i.update), Some(&insert.update));
            // NaN != NaN: compare what the arrays read back render to, and the
            // arrays themselves without the float column.
            let read_back = rendered[0].bound_arrays().expect("reads back");
            let mut again = Vec::new();
            copy_rows(&read_back, &insert.types, 0..3, &mut again);
            assert_eq!(again, expected);
            for (column, array) in read_back.iter().enumerate() {
                if !matches!(array, ColumnArray::Float(_)) {
                    assert_eq!(array, &bound[0].arrays[column], "column {column}, versioned: {versioned}");
                }
            }
            assert!(
                matches!(bound[0].bound_arrays(), Ok(std::borrow::Cow::Borrowed(arrays)) if std::ptr::eq(arrays, &bound[0].arrays[..])),
                "arrays planned as such are used as they are"
            );
        }
    }

    #[test]
    fn copy_text_planned_from_the_ops_refuses_what_binding_refuses() {
        let ops = vec![
            every_row("ok", None, vec![(intern("n"), Value::Int(1))]),
            every_row("bad", None, vec![(intern("at"), Value::Bool(true))]),
        ];
        let table = every_type(false);
        let bound = table.plan(&ops).expect_err("a bool is no timestamp");
        let rendered = table.plan_rendering(&ops, &|_| true).expect_err("a bool is no timestamp");
        assert_eq!(rendered, bound);
        assert_eq!(rendered.op, 1);
        let null_key = vec![NetOp { key: vec![Value::Null].into(), ..every_row("", None, vec![]) }];
        assert_eq!(table.plan_rendering(&null_key, &|_| true), table.plan(&null_key));
        assert!(table.plan(&null_key).is_err());
    }

    #[test]
    fn copy_text_that_does_not_read_back_is_an_error() {
        let kinds = [ColumnArray::Int(Vec::new()), ColumnArray::Bytes(Vec::new())];
        assert_eq!(
            arrays_from_copy(b"1\t\\\\x00\n2\t\\N\n", &kinds, 2),
            Ok(vec![ColumnArray::Int(vec![Some(1), Some(2)]), ColumnArray::Bytes(vec![Some(vec![0]), None])])
        );
        assert!(arrays_from_copy(b"1\t\\\\x00\n", &kinds, 2).is_err(), "a row short");
        assert!(arrays_from_copy(b"x\t\\N\n", &kinds, 1).is_err(), "not an integer");
        assert!(arrays_from_copy(b"1\t\\\\x0\n", &kinds, 1).is_err(), "odd hex");
        assert!(arrays_from_copy(b"1\n", &kinds, 1).is_err(), "a column short");
    }

    #[test]
    fn values_that_do_not_fit_name_the_op_and_column() {
        let ops = vec![
            net("s1", patch(vec![], vec![("on_hand", Value::Int(1))])),
            net("s2", patch(vec![], vec![("on_hand", Value::from("lots"))])),
        ];
        let error = inventory().plan(&ops).expect_err("text in bigint");
        assert_eq!(error.op, 1);
        assert_eq!(error.column, "on_hand");
        assert!(error.message.contains("\"lots\""), "{error}");
        let mut null_key = net("s1", Effect::Delete);
        null_key.key.to_mut()[1] = Value::Null;
        assert_eq!(inventory().plan(&[null_key]).expect_err("null key").message, "key is null");
    }

    #[test]
    fn versions_guard_updates_and_deletes() {
        let mut table = inventory();
        table.versioned = true;
        let mut op = net("s1", replace(vec![]));
        op.version = Some(3);
        let statements = table.plan(&[op.clone(), NetOp { effect: Effect::Delete, ..op }]).expect("binds");
        assert!(statements[0].sql.contains("t.kawka_version < d.v"), "{}", statements[0].sql);
        assert!(statements[1].sql.contains("kawka_version = EXCLUDED.kawka_version WHERE t.kawka_version IS NULL"));
        assert_eq!(statements[1].arrays.last(), Some(&ColumnArray::Int(vec![Some(3)])));
        assert!(table.create_table().contains("kawka_version bigint"));
    }

    #[test]
    fn a_created_table_takes_its_fillfactor() {
        let mut table = inventory();
        assert!(!table.create_table().contains("WITH"), "{}", table.create_table());
        table.target.fillfactor = Some(70);
        assert!(table.create_table().ends_with("PRIMARY KEY (\"store_id\", \"item_id\")) WITH (fillfactor = 70)"));
    }

    #[test]
    fn dates_and_timestamps_from_integers() {
        assert_eq!(format_millis(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_millis(-1), "1969-12-31T23:59:59.999Z");
        // Against the `format!` it replaced, over four centuries by odd steps.
        let reference = |millis: i64| {
            let days = millis.div_euclid(86_400_000);
            let in_day = millis.rem_euclid(86_400_000);
            let (h, m, s, ms) = (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60, in_day % 1000);
            format!("{}T{h:02}:{m:02}:{s:02}.{ms:03}Z", format_days(days))
        };
        let mut millis = -12_219_292_800_000i64; // 1582-10-15
        while millis < 253_402_300_799_999 {
            assert_eq!(format_millis(millis), reference(millis), "{millis}");
            millis += 7_777_777_777;
        }
        assert_eq!(format_days(-719_528), "0000-01-01");
        assert_eq!(format_days(2_932_896), "9999-12-31");
        assert_eq!(format_days(2_932_897), "10000-01-01");
        assert_eq!(format_days(-719_529), "-001-12-31");
        assert_eq!(format_days(19_723), "2024-01-01");
        assert_eq!(format_days(11_016), "2000-02-29");
        assert!(check_value(ColumnType::Boolean, &Value::Int(1)).is_err());
        assert!(check_value(ColumnType::Jsonb, &Value::Array(vec![Value::Int(1)])).is_ok());
    }
}
