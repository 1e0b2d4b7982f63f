//! A statement's rows filled from the net ops: as bound arrays, or straight
//! as `COPY` data, binary or text (pure).

use super::arrays::ColumnArray;
use super::binary::{self, Encoded};
use super::copy::{copy_buffer, copy_field, write_copy, CopyValue};
use super::statements::{BindError, CopyData, CopyFormat};
use super::table::{TableSql, VERSION_COLUMN};
use super::types::ColumnType;
use crate::projection::fold::{Effect, NetOp};
use crate::value::{name_position, Name, Value};

impl TableSql {
    pub(super) fn key_arrays(&self, net: &[NetOp], rows: &[usize]) -> Result<Vec<ColumnArray>, BindError> {
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

    pub(super) fn version_array(&self, net: &[NetOp], rows: &[usize]) -> ColumnArray {
        ColumnArray::Int(rows.iter().map(|&row| net[row].version).collect())
    }

    /// One array per column of `columns` (name, and whether it is an
    /// added column of a patch) over `rows`, which are all replaces or all
    /// patches. Filled row by row, so each op's fields are read while they
    /// are in cache, not once per column. Each column remembers where
    /// its field was in the row before: ops of one rule list their fields in
    /// one order, so most lookups take one compare.
    pub(super) fn value_arrays(
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

    /// The `COPY` data of `rows` (keys, `columns`, then the version when
    /// versioned), straight from the net ops: binary when `binary` allows
    /// it (the table's types are the declared ones) and every column and
    /// every value has a binary form equal to its text's (see
    /// `binary.rs`), else text. The text is what binding the ops
    /// ([`ColumnArray::push`]) and rendering the arrays
    /// ([`copy_rows`](super::copy::copy_rows)) give, the binary what
    /// Postgres reads to the same values; either way the same errors,
    /// without building the arrays in between. `types` are the upsert's,
    /// one per column of the data.
    pub(super) fn copy_data_of(
        &self,
        net: &[NetOp],
        rows: &[usize],
        columns: &[(Name, bool)],
        types: &[Option<ColumnType>],
        binary: bool,
    ) -> Result<CopyData, BindError> {
        let mut scratch = String::new();
        // A row's field count is an i16 in binary data: a statement of more
        // columns (Postgres refuses tables of more than 1,600) goes as text.
        let fields = i16::try_from(types.len()).ok().filter(|_| binary);
        if let Some(fields) = fields.filter(|_| types.iter().flatten().all(|&ty| binary::has_binary_form(ty))) {
            let mut out = copy_buffer(rows.len(), types.len());
            binary::begin(&mut out);
            let encoded = self.each_value(net, rows, columns, types, |column, value| {
                if column == 0 {
                    binary::begin_row(fields, &mut out);
                }
                match value {
                    Field::Value(ty, value) => binary::binary_field(ty, value, &mut scratch, &mut out),
                    Field::Version(version) => {
                        binary::version_field(version, &mut out);
                        Ok(Encoded::Written)
                    }
                }
            })?;
            if encoded == Encoded::Written {
                binary::end(&mut out);
                return Ok(CopyData { format: CopyFormat::Binary, bytes: out });
            }
        }
        let mut out = copy_buffer(rows.len(), types.len());
        let last = types.len() - 1;
        self.each_value(net, rows, columns, types, |column, value| {
            match value {
                Field::Value(ty, value) => copy_field(ty, value, &mut scratch, &mut out)?,
                Field::Version(version) => write_copy(version.map_or(CopyValue::Null, CopyValue::Int), None, &mut out),
            }
            out.push(if column == last { b'\n' } else { b'\t' });
            Ok(Encoded::Written)
        })?;
        Ok(CopyData { format: CopyFormat::Text, bytes: out })
    }

    /// Hands `write` each value of `rows` in `COPY` order with its column's
    /// index: each row's key parts, its `columns`, then its version when
    /// versioned (`types`: the upsert's, one per column). Stops at the
    /// first error (that op's, naming the column) or at a value `write`
    /// wants as text ([`Encoded::AsText`]).
    fn each_value(
        &self,
        net: &[NetOp],
        rows: &[usize],
        columns: &[(Name, bool)],
        types: &[Option<ColumnType>],
        mut write: impl FnMut(usize, Field) -> Result<Encoded, String>,
    ) -> Result<Encoded, BindError> {
        let keys = &self.target.primary_key;
        let mut hints = vec![0; columns.len()];
        let column_type = |at: usize| types[at].expect("key and value columns have a type");
        for &row in rows {
            let op = &net[row];
            for (part, name) in keys.iter().enumerate() {
                let value = key_part(net, row, part, name)?;
                if write(part, Field::Value(column_type(part), value)).map_err(failed(row, name))? == Encoded::AsText {
                    return Ok(Encoded::AsText);
                }
            }
            let (set, add) = match &op.effect {
                Effect::Replace(fields) => (&fields[..], &[][..]),
                Effect::Patch { set, add } => (&set[..], &add[..]),
                Effect::Delete => unreachable!("rows of an upsert are replaces or patches"),
            };
            for (column, &(name, adding)) in columns.iter().enumerate() {
                let value = field_value_from(if adding { add } else { set }, name, &mut hints[column]);
                let field = Field::Value(column_type(keys.len() + column), value);
                if write(keys.len() + column, field).map_err(failed(row, name))? == Encoded::AsText {
                    return Ok(Encoded::AsText);
                }
            }
            if self.versioned {
                let column = keys.len() + columns.len();
                if write(column, Field::Version(op.version)).map_err(failed(row, VERSION_COLUMN))? == Encoded::AsText {
                    return Ok(Encoded::AsText);
                }
            }
        }
        Ok(Encoded::Written)
    }
}

/// An op's error at a column, from the message: only built on an error.
fn failed(op: usize, column: &str) -> impl FnOnce(String) -> BindError + '_ {
    move |message| BindError { op, column: column.to_string(), message }
}

/// One value of a `COPY` row: a column's (with its type) or the version.
enum Field<'v> {
    Value(ColumnType, &'v Value),
    Version(Option<i64>),
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

#[cfg(test)]
mod tests {
    use super::super::copy::copy_rows;
    use super::super::fixtures::{inventory, meaning, net, net_op, patch, replace};
    use super::*;
    use crate::sink::postgres::{Column, PostgresTarget};
    use crate::value::{intern, Record};

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
                tombstone_retention: std::time::Duration::from_secs(60),
            },
            versioned,
        )
    }

    fn every_row(id: &str, version: Option<i64>, fields: Vec<(Name, Value)>) -> NetOp<'static> {
        net_op(vec![Value::from(id)], replace(fields), version)
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
            let rendered = table.plan_rendering(&ops, &|copy| copy.starts_with("COPY"), true).expect("binds");
            assert_eq!(bound.len(), 1);
            let insert = bound[0].insert.as_ref().expect("an upsert");
            let mut expected = Vec::new();
            copy_rows(&bound[0].arrays, &insert.types, 0..3, &mut expected);
            let data = rendered[0].insert.as_ref().and_then(|i| i.rendered.clone()).expect("rendered");
            assert_eq!(data.format, CopyFormat::Text, "a numeric column keeps the statement in text");
            let text = data.bytes;
            assert_eq!(String::from_utf8_lossy(&text), String::from_utf8_lossy(&expected), "versioned: {versioned}");
            assert!(rendered[0].arrays.iter().all(ColumnArray::is_empty), "no arrays bound beside the text");
            assert_eq!(rendered[0].sql, bound[0].sql);
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

    /// Random rows of a table whose columns all have a binary form, cut
    /// into statements of random sizes: each statement goes in binary
    /// unless one of its values has no binary form equal to its text, and
    /// its data reads back into arrays that mean what the bound ones mean.
    #[test]
    fn binary_copy_planned_from_the_ops_reads_back_into_the_bound_arrays() {
        use rand::{Rng, SeedableRng};
        use ColumnType::*;
        let types = [
            BigInt,
            Integer,
            SmallInt,
            Double,
            Real,
            Boolean,
            Bytea,
            Text,
            TimestampTz,
            Timestamp,
            Date,
            Time,
            Jsonb,
            Json,
            Uuid,
        ];
        let names: Vec<String> = (0..types.len()).map(|n| format!("c{n}")).collect();
        let table = TableSql::new(
            &PostgresTarget {
                schema: "public".into(),
                table: "binary".into(),
                columns: std::iter::once(Column { name: "id".into(), ty: Text })
                    .chain(names.iter().zip(types).map(|(name, ty)| Column { name: name.clone(), ty }))
                    .collect(),
                primary_key: vec!["id".into()],
                create: true,
                fillfactor: None,
                tombstone_retention: std::time::Duration::from_secs(60),
            },
            true,
        );
        let time = |kind, value| Value::Time(crate::value::Temporal::new(kind, value));
        let value = |rng: &mut rand::rngs::StdRng, ty: ColumnType| -> Value {
            use crate::value::{TimeKind, Unit};
            if rng.random_ratio(1, 8) {
                return Value::Null;
            }
            // Any i64 now and then: past a column's range, a timestamp's
            // years, a date's; then the statement goes as text.
            let n: i64 = if rng.random_ratio(1, 3_000) { rng.random() } else { rng.random_range(-1 << 60..1 << 60) };
            let unit = [Unit::Millis, Unit::Micros, Unit::Nanos][rng.random_range(0..3)];
            let kind = if rng.random() { TimeKind::Timestamp(unit) } else { TimeKind::LocalTimestamp(unit) };
            // Whole microseconds but now and then (nanoseconds that are not
            // go as text).
            let whole = if unit == Unit::Nanos && rng.random_ratio(99, 100) { 1_000 } else { 1 };
            match ty {
                BigInt => Value::Int(n),
                Integer => Value::Int(n >> 30),
                SmallInt => Value::Int(n >> 46),
                // Now and then any bits: NaNs, subnormals, past a `real`.
                Double | Real if rng.random_ratio(1, 100) => Value::Float(f64::from_bits(rng.random())),
                Double | Real => Value::Float(n as f64 / 1e9),
                Boolean => Value::Bool(rng.random()),
                Bytea => Value::Bytes((0..rng.random_range(0..9)).map(|_| rng.random()).collect()),
                Text => Value::from(format!("t\t{n}\\")),
                // ±136 years around 1970 (any i64 now and then, above).
                TimestampTz | Timestamp => {
                    let fraction = rng.random_range(0..unit.per_second()) / whole * whole;
                    time(kind, (n >> 28).saturating_mul(unit.per_second()).saturating_add(fraction))
                }
                Date => time(TimeKind::Date, n >> 42),
                Time => time(TimeKind::TimeOfDay(unit), n.rem_euclid(unit.per_day()) / whole * whole),
                Jsonb | Json => Value::Array(vec![Value::Int(n), Value::from("é\n")]),
                Uuid if rng.random() => {
                    Value::from(format!("{:08X}-0000-4000-8000-{:012X}", n as u32, n.unsigned_abs() >> 16))
                }
                _ => Value::from(format!("{:08x}-0000-4000-8000-{:012x}", n as u32, n.unsigned_abs() >> 16)),
            }
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xb1_c0);
        let (mut binary, mut text) = (0, 0);
        for round in 0..300 {
            let rows = rng.random_range(1..40);
            let ops: Vec<NetOp> = (0..rows)
                .map(|row| {
                    let mut fields = Vec::new();
                    for (name, ty) in names.iter().zip(types) {
                        if rng.random_ratio(7, 8) {
                            fields.push((intern(name), value(&mut rng, ty)));
                        }
                    }
                    let version = rng.random_ratio(3, 4).then(|| rng.random_range(0..1_000));
                    every_row(&format!("{round}-{row}"), version, fields)
                })
                .collect();
            // An out-of-range value now and then sends its statement to text.
            let bound = table.plan(&ops).expect("binds");
            let rendered = table.plan_rendering(&ops, &|_| true, true).expect("binds");
            // A table whose types are not the declared ones: text only.
            let texts = table.plan_rendering(&ops, &|_| true, false).expect("binds");
            assert!(texts.iter().all(|s| s
                .insert
                .as_ref()
                .and_then(|i| i.rendered.as_ref())
                .expect("rendered")
                .format
                == CopyFormat::Text));
            for (bound, rendered) in bound.iter().zip(&rendered) {
                let insert = bound.insert.as_ref().expect("an upsert");
                let data = rendered.insert.as_ref().and_then(|i| i.rendered.as_ref()).expect("rendered");
                match data.format {
                    CopyFormat::Binary => binary += 1,
                    CopyFormat::Text => text += 1,
                }
                let read_back = rendered.bound_arrays().expect("reads back");
                for (column, (array, ty)) in read_back.iter().zip(&insert.types).enumerate() {
                    assert_eq!(
                        meaning(*ty, array),
                        meaning(*ty, &bound.arrays[column]),
                        "round {round}, column {column}, {:?}",
                        data.format
                    );
                }
            }
        }
        assert!(binary > 100 && text > 20, "{binary} statements in binary, {text} in text");
    }

    #[test]
    fn copy_text_planned_from_the_ops_refuses_what_binding_refuses() {
        let ops = vec![
            every_row("ok", None, vec![(intern("n"), Value::Int(1))]),
            every_row("bad", None, vec![(intern("at"), Value::Bool(true))]),
        ];
        let table = every_type(false);
        let bound = table.plan(&ops).expect_err("a bool is no timestamp");
        let rendered = table.plan_rendering(&ops, &|_| true, true).expect_err("a bool is no timestamp");
        assert_eq!(rendered, bound);
        assert_eq!(rendered.op, 1);
        let null_key = vec![NetOp { key: vec![Value::Null].into(), ..every_row("", None, vec![]) }];
        assert_eq!(table.plan_rendering(&null_key, &|_| true, true), table.plan(&null_key));
        assert!(table.plan(&null_key).is_err());
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
}
