//! `COPY … FROM STDIN (FORMAT binary)` data: written from an op's values,
//! and read back into arrays (pure).
//!
//! Binary `COPY` spares kawka writing each value's text and Postgres
//! parsing it (a timestamp's above all): issue 27. A statement goes in
//! binary only when every one of its values has a binary form that
//! Postgres reads to exactly what it reads from the value's text
//! ([`binary_field`]); one value without such a form (a timestamp given as
//! a string, which Postgres parses itself; an integer out of an `integer`
//! column's range, which its text input refuses) sends the whole statement
//! back to text ([`Encoded::AsText`]), so the effect and the errors stay
//! the text's. And only where the table's column types are the declared
//! ones (the sink reads them when it starts): Postgres reads binary data
//! with the table's own types.
//!
//! The layout (Postgres' `COPY` docs, "Binary Format"): a header, then per
//! row the number of fields (int16) and per field its length (int32, -1
//! for null) and its bytes, each type as its `recv` function reads it, all
//! integers big-endian; a field count of -1 ends the data.

use super::arrays::ColumnArray;
use super::coerce::{real_of, text_of, to_bool, to_bytes, to_float, to_int, Text};
use super::types::{BindKind, ColumnType};
use crate::codec::avro::uuid_text;
use crate::value::time::Style;
use crate::value::{Temporal, TimeKind, Unit, Value};

/// The signature, no flags (no OIDs), no header extension.
const HEADER: &[u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Postgres counts timestamps from 2000-01-01T00:00:00 (and dates from
/// that day), Avro from 1970: the days in between.
const PG_EPOCH_DAYS: i64 = 10_957;
const PG_EPOCH_MICROS: i64 = PG_EPOCH_DAYS * Unit::Micros.per_day();

/// The days written in binary: 0001-01-01 to 9999-12-31, where a day's
/// text is plain digits (outside, kawka's text is clamped or written in
/// the rare spellings, so it is left to Postgres' text input).
const DAYS: std::ops::RangeInclusive<i64> = -719_162..=2_932_896;

/// Whether a column of type `ty` is written in binary: all but `numeric`
/// and `interval`, whose binary forms are Postgres' own digit and field
/// layouts and whose values go as text.
pub(super) fn has_binary_form(ty: ColumnType) -> bool {
    !matches!(ty, ColumnType::Numeric | ColumnType::Interval)
}

/// Whether a value went in, or has no binary form equal to its text's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Encoded {
    Written,
    /// The statement must be written as text: nothing of this value was
    /// written.
    AsText,
}

/// Starts the data of a `COPY` in binary.
pub(super) fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(HEADER);
}

/// Starts a row of `fields` fields.
pub(super) fn begin_row(fields: i16, out: &mut Vec<u8>) {
    out.extend_from_slice(&fields.to_be_bytes());
}

/// Ends the data.
pub(super) fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

/// The version column's value (bigint).
pub(super) fn version_field(version: Option<i64>, out: &mut Vec<u8>) {
    match version {
        Some(version) => field(&version.to_be_bytes(), out),
        None => null(out),
    };
}

fn null(out: &mut Vec<u8>) -> Encoded {
    out.extend_from_slice(&(-1i32).to_be_bytes());
    Encoded::Written
}

/// One field: its length, then its bytes (room made once: every value of
/// every row passes here).
#[inline]
fn field(bytes: &[u8], out: &mut Vec<u8>) -> Encoded {
    let length = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    out.reserve(4 + bytes.len());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(bytes);
    Encoded::Written
}

/// One field whose bytes are `prefix` then `bytes`. A field is at most
/// 1 GB in Postgres; a longer value is refused by the server (as its text
/// would be), its length written as the most an int32 holds.
fn field_with_prefix(prefix: &[u8], bytes: &[u8], out: &mut Vec<u8>) -> Encoded {
    let length = i32::try_from(prefix.len() + bytes.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(bytes);
    Encoded::Written
}

/// `value` for a column of type `ty` (with [`has_binary_form`]) as a
/// binary field: converted as binding converts it ([`ColumnArray::push`]),
/// with the same errors, then written as the column type's `recv` reads
/// what the text's cast gives. [`Encoded::AsText`] writes nothing.
/// `scratch` holds text built before it is written (JSON, numbers in text
/// columns).
pub(super) fn binary_field(
    ty: ColumnType,
    value: &Value,
    scratch: &mut String,
    out: &mut Vec<u8>,
) -> Result<Encoded, String> {
    use Encoded::AsText;
    // The usual pairs first, without the conversion's steps.
    match (ty, value) {
        (_, Value::Null) => return Ok(null(out)),
        (ColumnType::BigInt, Value::Int(n)) => return Ok(field(&n.to_be_bytes(), out)),
        (ColumnType::Text, Value::Str(text)) => return Ok(field(text.as_bytes(), out)),
        // An instant in a `timestamptz` column, as `text_of` takes it.
        (ColumnType::TimestampTz, Value::Time(temporal @ Temporal { kind: TimeKind::Timestamp(_), .. })) => {
            return Ok(timestamp_field(*temporal, out));
        }
        // Milliseconds since the epoch in a `timestamptz` or `timestamp`
        // column, as `text_of` reads an integer there.
        (ColumnType::TimestampTz | ColumnType::Timestamp, Value::Int(millis)) => {
            return Ok(timestamp_field(Temporal::new(TimeKind::Timestamp(Unit::Millis), *millis), out));
        }
        (ColumnType::Boolean, Value::Bool(b)) => return Ok(field(&[u8::from(*b)], out)),
        _ => {}
    }
    Ok(match ty.bind_kind() {
        BindKind::Int => match to_int(value)? {
            None => null(out),
            // The text input of `integer` and `smallint` refuses what
            // does not fit: left to it.
            Some(n) => match ty {
                ColumnType::SmallInt => i16::try_from(n).map_or(AsText, |n| field(&n.to_be_bytes(), out)),
                ColumnType::Integer => i32::try_from(n).map_or(AsText, |n| field(&n.to_be_bytes(), out)),
                _ => field(&n.to_be_bytes(), out),
            },
        },
        BindKind::Float => match to_float(value)? {
            None => null(out),
            Some(x) if ty == ColumnType::Real => real(x).map_or(AsText, |x| field(&x.to_bits().to_be_bytes(), out)),
            Some(x) => field(&double(x).to_bits().to_be_bytes(), out),
        },
        BindKind::Bool => match to_bool(value)? {
            None => null(out),
            Some(b) => field(&[u8::from(b)], out),
        },
        BindKind::Bytes => match value {
            Value::Bytes(bytes) => field(bytes, out),
            Value::Str(text) => field(text.as_bytes(), out),
            // Anything else is refused here as binding refuses it; what
            // binding would take after all goes as text.
            other => {
                to_bytes(other)?;
                AsText
            }
        },
        BindKind::Text => match text_of(ty, value)? {
            None => null(out),
            Some(text) => text_field(ty, text, scratch, out),
        },
    })
}

/// A value of a text-bound column type in the type's binary form, unless
/// it has none equal to the text's.
fn text_field(ty: ColumnType, text: Text, scratch: &mut String, out: &mut Vec<u8>) -> Encoded {
    match (ty, &text) {
        // `text` and `json` take the text's bytes as they are.
        (ColumnType::Text | ColumnType::Json, text) => text_bytes(&[], text, scratch, out),
        // `jsonb`: a format version (1), then the text.
        (ColumnType::Jsonb, text) => text_bytes(&[1], text, scratch, out),
        (ColumnType::Uuid, Text::Str(text)) => uuid_bytes(text).map_or(Encoded::AsText, |bytes| field(&bytes, out)),
        (ColumnType::TimestampTz | ColumnType::Timestamp, Text::Time(temporal)) => timestamp_field(*temporal, out),
        (ColumnType::Date, Text::Time(Temporal { kind: TimeKind::Date, value: day })) if DAYS.contains(day) => {
            let day = i32::try_from(day - PG_EPOCH_DAYS).expect("the days of years 1 to 9999 fit an i32");
            field(&day.to_be_bytes(), out)
        }
        (ColumnType::Time, Text::Time(Temporal { kind: TimeKind::TimeOfDay(unit), value })) => micros(*value, *unit)
            .filter(|micros| (0..Unit::Micros.per_day()).contains(micros))
            .map_or(Encoded::AsText, |micros| field(&micros.to_be_bytes(), out)),
        // Strings for dates, times and UUIDs in other spellings are
        // parsed by Postgres; numeric and interval have no binary form
        // here.
        _ => Encoded::AsText,
    }
}

/// A field of `prefix` then `text`'s bytes (built in `scratch` unless it
/// is a string already).
fn text_bytes(prefix: &[u8], text: &Text, scratch: &mut String, out: &mut Vec<u8>) -> Encoded {
    match text {
        Text::Str(text) => field_with_prefix(prefix, text.as_bytes(), out),
        other => {
            scratch.clear();
            other.write(scratch);
            field_with_prefix(prefix, scratch.as_bytes(), out)
        }
    }
}

/// A timestamp (or local timestamp) counted from Postgres' epoch, unless
/// its text is not read to exactly that.
fn timestamp_field(temporal: Temporal, out: &mut Vec<u8>) -> Encoded {
    timestamp_micros(temporal).map_or(Encoded::AsText, |micros| field(&(micros - PG_EPOCH_MICROS).to_be_bytes(), out))
}

/// A timestamp's (or local timestamp's) microseconds since 1970, when its
/// text is read to exactly that: a whole number of microseconds in the
/// years 1 to 9999.
fn timestamp_micros(temporal: Temporal) -> Option<i64> {
    let (TimeKind::Timestamp(unit) | TimeKind::LocalTimestamp(unit)) = temporal.kind else { return None };
    let micros = micros(temporal.value, unit)?;
    DAYS.contains(&micros.div_euclid(Unit::Micros.per_day())).then_some(micros)
}

/// `value` counted in `unit` as microseconds; `None` for a fraction of one
/// (Postgres rounds the text's nanoseconds by its own rule) or past i64.
fn micros(value: i64, unit: Unit) -> Option<i64> {
    match unit {
        Unit::Millis => value.checked_mul(1_000),
        Unit::Micros => Some(value),
        Unit::Nanos => (value % 1_000 == 0).then_some(value / 1_000),
    }
}

/// A float for a `double precision` column: NaN as Postgres writes the one
/// it reads from `NaN`.
fn double(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else {
        x
    }
}

/// A float for a `real` column as its text gives it ([`real_of`]); `None`
/// when the text writes the full value, which the text input refuses.
fn real(x: f64) -> Option<f32> {
    if x.is_nan() {
        Some(f32::NAN)
    } else if x.is_infinite() {
        Some(x as f32)
    } else {
        real_of(x)
    }
}

/// The 16 bytes of a UUID in its canonical text (`8-4-4-4-12` hex digits,
/// either case); `None` for the other spellings Postgres reads (braces,
/// no hyphens), which are left to its text input.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    if text.len() != 36 || [8, 13, 18, 23].iter().any(|&at| text[at] != b'-') {
        return None;
    }
    let mut digits = text.iter().filter(|&&b| b != b'-').map(|&b| char::from(b).to_digit(16));
    let mut bytes = [0; 16];
    for byte in &mut bytes {
        let (high, low) = (digits.next()??, digits.next()??);
        *byte = (high * 16 + low) as u8;
    }
    // 32 digits and the four hyphens: nothing is left.
    Some(bytes)
}

/// Reads binary `COPY` data written by [`binary_field`] (`rows` rows of
/// the columns of `types`, `None` the version column) back into arrays of
/// the kinds of `kinds`, holding what binding the ops gives: the text of a
/// date or time is its microseconds' (`…:20.123000Z`), which Postgres
/// reads to the same value. `Err` says where it does not read, which would
/// be a bug in the writing.
pub(super) fn arrays_from_binary(
    data: &[u8],
    types: &[Option<ColumnType>],
    kinds: &[ColumnArray],
    rows: usize,
) -> Result<Vec<ColumnArray>, String> {
    let mut arrays: Vec<ColumnArray> = kinds.iter().map(|kind| kind.empty_like(rows)).collect();
    let mut data = Reader(data.strip_prefix(HEADER.as_slice()).ok_or("no binary COPY header")?);
    for row in 0..rows {
        let fields = i16::from_be_bytes(data.take()?);
        if usize::try_from(fields).ok() != Some(arrays.len()) {
            return Err(format!("row {row} has {fields} fields, not {}", arrays.len()));
        }
        for (column, array) in arrays.iter_mut().enumerate() {
            // -1: null.
            let bytes = match usize::try_from(i32::from_be_bytes(data.take()?)) {
                Ok(length) => Some(data.bytes(length)?),
                Err(_) => None,
            };
            let ty = types.get(column).copied().flatten();
            array.push_binary(ty, bytes).map_err(|message| format!("row {row}, column {column}: {message}"))?;
        }
    }
    if data.take()? != (-1i16).to_be_bytes() || !data.0.is_empty() {
        return Err(format!("the data does not end after {rows} rows"));
    }
    Ok(arrays)
}

/// What is left of binary `COPY` data being read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, count: usize) -> Result<&'a [u8], String> {
        let (taken, rest) = self.0.split_at_checked(count).ok_or("the data ends early")?;
        self.0 = rest;
        Ok(taken)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.bytes(N)?.try_into().expect("N bytes taken"))
    }
}

impl ColumnArray {
    /// Appends the value of one binary field of a column of type `ty`
    /// (`None`: the version column; `bytes` `None`: null).
    fn push_binary(&mut self, ty: Option<ColumnType>, bytes: Option<&[u8]>) -> Result<(), String> {
        let Some(bytes) = bytes else {
            self.push_null();
            return Ok(());
        };
        let wrong = || format!("{} bytes are no {}", bytes.len(), ty.map_or("bigint", ColumnType::sql));
        let int = |bytes: &[u8]| -> Result<i64, String> {
            Ok(match bytes.len() {
                2 => i16::from_be_bytes(bytes.try_into().expect("two bytes")).into(),
                4 => i32::from_be_bytes(bytes.try_into().expect("four bytes")).into(),
                8 => i64::from_be_bytes(bytes.try_into().expect("eight bytes")),
                _ => return Err(wrong()),
            })
        };
        match self {
            ColumnArray::Int(v) => v.push(Some(int(bytes)?)),
            ColumnArray::Float(v) => v.push(Some(match bytes.len() {
                4 => f32::from_bits(u32::from_be_bytes(bytes.try_into().expect("four bytes"))).into(),
                8 => f64::from_bits(u64::from_be_bytes(bytes.try_into().expect("eight bytes"))),
                _ => return Err(wrong()),
            })),
            ColumnArray::Bool(v) => v.push(Some(match bytes {
                [b] => *b != 0,
                _ => return Err(wrong()),
            })),
            ColumnArray::Bytes(v) => v.push(Some(bytes.to_vec())),
            ColumnArray::Text(v) => {
                let utf8 = |bytes| std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string());
                let time = |kind, value| Temporal::new(kind, value).text(Style::Postgres).map_err(|_| wrong());
                match ty {
                    Some(ColumnType::Jsonb) => match bytes {
                        [1, text @ ..] => v.push(Some(utf8(text)?)),
                        _ => return Err(wrong()),
                    },
                    Some(ColumnType::Uuid) => {
                        v.push(Some(&uuid_text(bytes).map_err(|_| wrong())?));
                    }
                    Some(ColumnType::TimestampTz) => {
                        v.push(Some(
                            time(TimeKind::Timestamp(Unit::Micros), int(bytes)?.saturating_add(PG_EPOCH_MICROS))?
                                .as_str(),
                        ));
                    }
                    Some(ColumnType::Timestamp) => v.push(Some(
                        time(TimeKind::LocalTimestamp(Unit::Micros), int(bytes)?.saturating_add(PG_EPOCH_MICROS))?
                            .as_str(),
                    )),
                    Some(ColumnType::Date) => {
                        v.push(Some(time(TimeKind::Date, int(bytes)?.saturating_add(PG_EPOCH_DAYS))?.as_str()))
                    }
                    Some(ColumnType::Time) => {
                        v.push(Some(time(TimeKind::TimeOfDay(Unit::Micros), int(bytes)?)?.as_str()))
                    }
                    _ => v.push(Some(utf8(bytes)?)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::copy::{arrays_from_copy, copy_field};
    use super::super::fixtures::{every_column_type, meaning, sample_values};
    use super::*;
    use crate::value::Record;

    /// Values at the edges of the binary forms, beside the fixtures'.
    fn edge_values() -> Vec<Value> {
        let time = |kind, value| Value::Time(Temporal::new(kind, value));
        let year_1 = -62_135_596_800_000_000;
        let mut record = Record::new();
        record.push("k", Value::from("v\u{0}\t"));
        vec![
            Value::Int(i64::from(i16::MAX) + 1),
            Value::Int(i64::from(i16::MIN)),
            Value::Int(i64::from(i32::MIN) - 1),
            Value::Int(i64::from(i32::MAX)),
            Value::Int(i64::MAX),
            Value::Float(1e300),
            Value::Float(1e-50),
            Value::Float(1e-40),
            Value::Float(-0.0),
            Value::Float(f64::INFINITY),
            Value::Float(f64::from_bits(0x7ff8_0000_dead_beef)),
            Value::Float(0.1),
            Value::from("123e4567-e89b-12d3-a456-426614174000"),
            Value::from("123E4567-E89B-12D3-A456-42661417400F"),
            Value::from("{123e4567-e89b-12d3-a456-426614174000}"),
            Value::from("123e4567e89b12d3a456426614174000"),
            Value::from("123e4567-e89b-12d3-a456-42661417400g"),
            Value::from("123e4567+e89b-12d3-a456-426614174000"),
            Value::from("false"),
            Value::Bool(false),
            Value::Bytes(vec![]),
            Value::Record(record),
            time(TimeKind::Timestamp(Unit::Millis), 1_700_000_000_123),
            time(TimeKind::Timestamp(Unit::Micros), year_1),
            time(TimeKind::Timestamp(Unit::Micros), year_1 - 1),
            time(TimeKind::Timestamp(Unit::Nanos), 1_700_000_000_123_456_000),
            time(TimeKind::Timestamp(Unit::Nanos), 1_700_000_000_123_456_789),
            time(TimeKind::Timestamp(Unit::Millis), i64::MAX),
            time(TimeKind::LocalTimestamp(Unit::Micros), 253_402_300_799_999_999),
            time(TimeKind::LocalTimestamp(Unit::Micros), 253_402_300_800_000_000),
            time(TimeKind::Date, *DAYS.start()),
            time(TimeKind::Date, DAYS.start() - 1),
            time(TimeKind::Date, *DAYS.end()),
            time(TimeKind::Date, DAYS.end() + 1),
            time(TimeKind::TimeOfDay(Unit::Millis), 0),
            time(TimeKind::TimeOfDay(Unit::Micros), Unit::Micros.per_day() - 1),
            time(TimeKind::TimeOfDay(Unit::Nanos), 5),
        ]
    }

    /// One value of a column of type `ty` as binary data of one row of
    /// one field, or why not.
    fn one_binary_row(ty: ColumnType, value: &Value) -> Result<Option<Vec<u8>>, String> {
        let mut out = Vec::new();
        begin(&mut out);
        begin_row(1, &mut out);
        let before = out.len();
        match binary_field(ty, value, &mut String::new(), &mut out)? {
            Encoded::Written => {
                end(&mut out);
                Ok(Some(out))
            }
            Encoded::AsText => {
                assert_eq!(out.len(), before, "{ty:?}, {value:?}: nothing written for text");
                Ok(None)
            }
        }
    }

    /// Each value of each column type in binary means what its text means
    /// (read back into arrays both ways), with the text's errors; the
    /// values without a binary form equal to the text's are the ones
    /// Postgres parses or refuses itself.
    #[test]
    fn binary_fields_mean_what_their_text_means() {
        let (mut binary, mut as_text) = (0, Vec::new());
        for ty in every_column_type().into_iter().filter(|&ty| has_binary_form(ty)) {
            for value in sample_values().into_iter().chain(edge_values()) {
                let mut text = Vec::new();
                let texted = copy_field(ty, &value, &mut String::new(), &mut text);
                let data = match (one_binary_row(ty, &value), texted) {
                    (Ok(Some(data)), Ok(())) => data,
                    (Ok(None), Ok(())) => {
                        as_text.push(format!("{ty:?} {value:?}"));
                        continue;
                    }
                    (Err(binary), Err(text)) => {
                        assert_eq!(binary, text, "{ty:?}, {value:?}");
                        continue;
                    }
                    (binary, text) => panic!("{ty:?}, {value:?}: binary {binary:?}, text {text:?}"),
                };
                text.push(b'\n');
                let kind = [ColumnArray::new(ty.bind_kind(), 0)];
                let from_binary = arrays_from_binary(&data, &[Some(ty)], &kind, 1).expect("binary reads back");
                let from_text = arrays_from_copy(&text, &kind, 1).expect("text reads back");
                assert_eq!(meaning(Some(ty), &from_binary[0]), meaning(Some(ty), &from_text[0]), "{ty:?}, {value:?}");
                binary += 1;
            }
        }
        assert!(binary > 200, "{binary} values went in binary");
        let expected_as_text = [
            "SmallInt Int(-9223372036854775808)",
            "SmallInt Int(32768)",
            "Integer Int(-2147483649)",
            "Real Float(1e300)",
            "Real Float(1e-50)",
            "Uuid Str(\"{123e4567-e89b-12d3-a456-426614174000}\")",
            "Uuid Str(\"123e4567e89b12d3a456426614174000\")",
            "Uuid Str(\"123e4567-e89b-12d3-a456-42661417400g\")",
            "Uuid Str(\"123e4567+e89b-12d3-a456-426614174000\")",
            "Uuid Str(\"\")",
            "TimestampTz Str(\"2026-12-07\")",
            "Date Str(\"2026-12-07\")",
        ];
        for expected in expected_as_text {
            assert!(as_text.iter().any(|t| t == expected), "{expected} goes as text: {as_text:#?}");
        }
        for kept in ["Uuid Str(\"123e4567-e89b-12d3-a456-426614174000\")", "Integer Int(2147483647)", "Real Float(0.1)"]
        {
            assert!(!as_text.iter().any(|t| t == kept), "{kept} goes in binary");
        }
        let times_as_text = as_text.iter().filter(|t| t.starts_with("TimestampTz Time")).count();
        // A fraction of a microsecond, and instants (timestamps, local
        // ones, dates at midnight) outside the years 1 to 9999.
        assert_eq!(times_as_text, 6, "{as_text:#?}");
    }

    /// Binary forms pinned to Postgres' (its epoch, widths, byte order):
    /// reading back alone would not catch an epoch off by a day.
    #[test]
    fn binary_fields_are_what_postgres_recv_reads() {
        let time = |kind, value| Value::Time(Temporal::new(kind, value));
        let day_2000 = 10_957;
        let cases: [(ColumnType, Value, &[u8]); 11] = [
            (ColumnType::Date, time(TimeKind::Date, day_2000 + 1), &[0, 0, 0, 1]),
            (ColumnType::Date, time(TimeKind::Date, 0), &(-10_957i32).to_be_bytes()),
            (
                ColumnType::TimestampTz,
                time(TimeKind::Timestamp(Unit::Millis), (day_2000 + 1) * 86_400_000 + 1),
                &(86_400_000_000i64 + 1_000).to_be_bytes(),
            ),
            (ColumnType::Timestamp, time(TimeKind::LocalTimestamp(Unit::Micros), 946_684_800_000_000), &[0; 8]),
            (ColumnType::Time, time(TimeKind::TimeOfDay(Unit::Millis), 1), &[0, 0, 0, 0, 0, 0, 0x03, 0xe8]),
            (ColumnType::SmallInt, Value::Int(-2), &[0xff, 0xfe]),
            (ColumnType::Integer, Value::Int(258), &[0, 0, 1, 2]),
            (ColumnType::Real, Value::Float(1.5), &[0x3f, 0xc0, 0, 0]),
            (ColumnType::Double, Value::Float(f64::NAN), &[0x7f, 0xf8, 0, 0, 0, 0, 0, 0]),
            (ColumnType::Boolean, Value::from("true"), &[1]),
            (ColumnType::Jsonb, Value::Int(7), b"\x017"),
        ];
        for (ty, value, bytes) in cases {
            let mut out = Vec::new();
            assert_eq!(binary_field(ty, &value, &mut String::new(), &mut out), Ok(Encoded::Written), "{ty:?}");
            let length = i32::try_from(bytes.len()).expect("short").to_be_bytes();
            assert_eq!(out, [&length[..], bytes].concat(), "{ty:?}, {value:?}");
        }
        let mut out = Vec::new();
        begin(&mut out);
        end(&mut out);
        assert_eq!(out, b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\xff\xff", "header, no flags, no extension; trailer");
    }

    #[test]
    fn uuids_read_back_as_postgres_writes_them() {
        let bytes = uuid_bytes("123E4567-E89B-12D3-A456-42661417400F").expect("canonical");
        assert_eq!(uuid_text(&bytes).expect("16 bytes"), "123e4567-e89b-12d3-a456-42661417400f");
        assert_eq!(uuid_bytes(&uuid_text(&[0xab; 16]).expect("16 bytes")), Some([0xab; 16]));
        assert_eq!(uuid_bytes("123e4567-e89b-12d3-a456-42661417400é"), None, "37 bytes");
    }

    #[test]
    fn binary_data_that_does_not_read_back_is_an_error() {
        let types = [Some(ColumnType::Integer), None];
        let kinds = [ColumnArray::Int(Vec::new()), ColumnArray::Int(Vec::new())];
        let mut data = Vec::new();
        begin(&mut data);
        for row in 0..2 {
            begin_row(2, &mut data);
            assert_eq!(
                binary_field(ColumnType::Integer, &Value::Int(row), &mut String::new(), &mut data),
                Ok(Encoded::Written)
            );
            version_field((row == 0).then_some(7), &mut data);
        }
        end(&mut data);
        assert_eq!(
            arrays_from_binary(&data, &types, &kinds, 2),
            Ok(vec![ColumnArray::Int(vec![Some(0), Some(1)]), ColumnArray::Int(vec![Some(7), None])])
        );
        assert!(arrays_from_binary(&data, &types, &kinds, 1).is_err(), "a row more than said");
        assert!(arrays_from_binary(&data, &types, &kinds, 3).is_err(), "a row short");
        assert!(arrays_from_binary(&data[..data.len() - 1], &types, &kinds, 2).is_err(), "cut");
        assert!(arrays_from_binary(&data[1..], &types, &kinds, 2).is_err(), "no header");
        assert!(arrays_from_binary(&data, &types[..1], &kinds[..1], 2).is_err(), "a column more than said");
    }
}
