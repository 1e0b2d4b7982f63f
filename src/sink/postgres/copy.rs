//! `COPY … FROM STDIN` text: written from bound arrays or from an op's
//! values, and read back into arrays (pure).

use super::arrays::ColumnArray;
use super::coerce::{real_of, text_of, to_bool, to_bytes, to_float, to_int, Text};
use super::types::{BindKind, ColumnType};
use crate::value::time::Style;
use crate::value::Value;

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
pub(super) enum CopyValue<'a> {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Bytes(&'a [u8]),
    Text(&'a str),
}

/// `value` as `COPY` text for a column of type `ty` (`None`: the version column).
pub(super) fn write_copy(value: CopyValue, ty: Option<ColumnType>, out: &mut Vec<u8>) {
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
pub(super) fn copy_field(ty: ColumnType, value: &Value, scratch: &mut String, out: &mut Vec<u8>) -> Result<(), String> {
    // The usual pairs, written as the conversion below writes them, without
    // its steps: every value of every row passes here (issue 27).
    let value = match (ty.bind_kind(), value) {
        (_, Value::Null) => CopyValue::Null,
        (BindKind::Int, Value::Int(i)) => CopyValue::Int(*i),
        (BindKind::Text, Value::Str(text)) if !ty.is_json() => CopyValue::Text(text),
        _ => return copy_converted(ty, value, scratch, out),
    };
    write_copy(value, Some(ty), out);
    Ok(())
}

/// [`copy_field`] for any pair: the value converted as binding converts it.
fn copy_converted(ty: ColumnType, value: &Value, scratch: &mut String, out: &mut Vec<u8>) -> Result<(), String> {
    let (bytes, time);
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
            // On the stack, not through `scratch`: every timestamp of a
            // batch passes here.
            Some(Text::Time(temporal)) => {
                time = temporal.text(Style::Postgres).map_err(|_| format!("{temporal:?} has no text that fits"))?;
                CopyValue::Text(time.as_str())
            }
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

/// Reads `COPY` text written by
/// [`TableSql::copy_data_of`](super::table::TableSql::copy_data_of) back
/// into arrays of the kinds of `kinds` (`rows` lines). `Err` says where it
/// does not read, which would be a bug in the writing.
pub(super) fn arrays_from_copy(text: &[u8], kinds: &[ColumnArray], rows: usize) -> Result<Vec<ColumnArray>, String> {
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
    match real_of(x).filter(|_| ty == Some(ColumnType::Real)) {
        Some(narrow) => write!(out, "{narrow:?}"),
        None => write!(out, "{x:?}"),
    }
}

/// Text with COPY's escapes for backslash, newline, carriage return and tab.
/// Copied whole when it has none (most values), else a run at a time.
fn escape_copy(text: &str, out: &mut Vec<u8>) {
    let mut rest = text.as_bytes();
    if !may_need_escapes(rest) {
        out.extend_from_slice(rest);
        return;
    }
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

/// Whether `bytes` may hold a byte [`escape_copy`] escapes: `false` only
/// when none is there. Eight bytes at a time: a byte below 14 (tab, newline
/// and carriage return are 9, 10 and 13) or a backslash is found with a few
/// word operations, where a byte loop takes four compares a byte.
fn may_need_escapes(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES * 0x80;
    // The high bit of a byte of `(w - n·ONES) & !w` is set where no lower
    // byte borrowed and the byte is below n (n ≤ 128), so the whole is
    // nonzero exactly when some byte is below n; a backslash is a zero
    // byte of `w` xor eight backslashes.
    let word = |w: u64| {
        let backslash = w ^ (ONES * u64::from(b'\\'));
        ((w.wrapping_sub(ONES * 14) & !w) | (backslash.wrapping_sub(ONES) & !backslash)) & HIGHS != 0
    };
    let mut chunks = bytes.chunks_exact(8);
    if chunks.by_ref().any(|chunk| word(u64::from_ne_bytes(chunk.try_into().expect("chunks of eight")))) {
        return true;
    }
    // The tail padded with spaces, which need no escape.
    let tail = chunks.remainder();
    let mut last = [b' '; 8];
    last[..tail.len()].copy_from_slice(tail);
    word(u64::from_ne_bytes(last))
}

impl ColumnArray {
    /// Appends the value one field of `COPY` text holds (as
    /// [`copy_value`] wrote it).
    fn push_copy_field(&mut self, field: &[u8]) -> Result<(), String> {
        if field == COPY_NULL {
            self.push_null();
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
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{every_column_type, sample_values};
    use super::*;

    /// The shortcut for the usual pairs writes what the conversion writes,
    /// with its errors, for every column type and every kind of value.
    #[test]
    fn copy_fields_write_what_the_conversion_writes() {
        let mut shortcut = 0;
        for ty in every_column_type() {
            for value in sample_values() {
                let (mut fast, mut slow) = (Vec::new(), Vec::new());
                let mut scratch = String::new();
                let answered = copy_field(ty, &value, &mut scratch, &mut fast);
                assert_eq!(answered, copy_converted(ty, &value, &mut scratch, &mut slow), "{ty:?}, {value:?}");
                assert_eq!(fast, slow, "{ty:?}, {value:?}");
                shortcut += usize::from(matches!(value, Value::Null | Value::Int(_) | Value::Str(_)));
            }
        }
        assert!(shortcut > 100, "the usual pairs are among those tried");
    }

    /// Random text, escaped, against escaping byte by byte: each escaped
    /// byte at every place of a word and of the tail, near misses (11, 12,
    /// 14, `[`, `]`) and non-ASCII among them.
    #[test]
    fn escaping_finds_every_byte_that_needs_it() {
        use rand::{Rng, SeedableRng};
        let reference = |text: &str| {
            let mut out = Vec::new();
            for &byte in text.as_bytes() {
                match byte {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    other => out.push(other),
                }
            }
            out
        };
        let alphabet: Vec<char> = "ab09 \\\n\r\t\u{b}\u{c}\u{e}\u{0}\u{7f}[]\\é€".chars().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0b1);
        let mut escaped = 0;
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            // Mostly plain text, so that a single escaped byte lands anywhere.
            let text: String = (0..len)
                .map(|_| if rng.random_ratio(1, 12) { alphabet[rng.random_range(0..alphabet.len())] } else { 'x' })
                .collect();
            let mut out = Vec::new();
            escape_copy(&text, &mut out);
            assert_eq!(out, reference(&text), "{text:?}");
            escaped += usize::from(out.len() != text.len());
        }
        assert!(escaped > 5_000, "{escaped} texts had something to escape");
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
}
