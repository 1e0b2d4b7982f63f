//! How a value converts for a column of a declared type, dates and
//! timestamps included (pure).

use super::types::{BindKind, ColumnType};
use crate::value::Value;

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

pub(super) fn to_int(value: &Value) -> Result<Option<i64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i)),
        Value::Float(x) if x.fract() == 0.0 && x.abs() < 9.2e18 => Ok(Some(*x as i64)),
        Value::Str(s) => s.trim().parse().map(Some).map_err(|_| mismatch(value, "an integer column")),
        other => Err(mismatch(other, "an integer column")),
    }
}

pub(super) fn to_float(value: &Value) -> Result<Option<f64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i as f64)),
        Value::Float(x) => Ok(Some(*x)),
        Value::Str(s) => s.trim().parse().map(Some).map_err(|_| mismatch(value, "a float column")),
        other => Err(mismatch(other, "a float column")),
    }
}

pub(super) fn to_bool(value: &Value) -> Result<Option<bool>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::Str(s) if s == "true" || s == "false" => Ok(Some(s == "true")),
        other => Err(mismatch(other, "a boolean column")),
    }
}

pub(super) fn to_bytes(value: &Value) -> Result<Option<Vec<u8>>, String> {
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
pub(super) enum Text<'v> {
    Str(&'v str),
    /// Integers in timestamp columns are milliseconds since the epoch
    /// (`$timestamp`, Avro timestamp-millis).
    Millis(i64),
    /// Integers in date columns are days since the epoch.
    Days(i64),
    Json(&'v Value),
    /// Numbers and booleans as they display.
    Shown(&'v Value),
    /// NaN and the infinities, as Postgres spells them (JSON has no
    /// spelling for them and would write `null`).
    NonFinite(f64),
}

impl Text<'_> {
    #[inline]
    pub(super) fn write(&self, out: &mut String) {
        use std::fmt::Write as _;
        match self {
            Text::Str(s) => out.push_str(s),
            Text::Millis(millis) => push_millis(*millis, out),
            Text::Days(days) => push_days(*days, out),
            // Writing to a String cannot fail.
            Text::Json(value) => drop(write!(out, "{}", value.to_json())),
            Text::Shown(value) => drop(write!(out, "{value}")),
            Text::NonFinite(x) => out.push_str(non_finite(*x)),
        }
    }
}

/// The text form of `value` for a column of type `ty`; `None` for null.
pub(super) fn text_of(ty: ColumnType, value: &Value) -> Result<Option<Text<'_>>, String> {
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
        (_, Value::Float(x))
            if !x.is_finite() && !matches!(ty, ColumnType::TimestampTz | ColumnType::Timestamp | ColumnType::Date) =>
        {
            Text::NonFinite(*x)
        }
        (ColumnType::Numeric, Value::Int(_) | Value::Float(_)) => Text::Shown(value),
        (ColumnType::Numeric, other) => return Err(wrong(other)),
        (_, Value::Int(_) | Value::Float(_) | Value::Bool(_)) => Text::Shown(value),
        (ColumnType::Text, Value::Record(_) | Value::Map(_) | Value::Array(_)) => Text::Json(value),
        (_, other) => return Err(wrong(other)),
    };
    Ok(Some(text))
}

/// `NaN`, `Infinity` or `-Infinity`: how Postgres reads a float that is
/// not finite (`numeric` too, since Postgres 14).
pub(super) fn non_finite(x: f64) -> &'static str {
    if x.is_nan() {
        "NaN"
    } else if x < 0.0 {
        "-Infinity"
    } else {
        "Infinity"
    }
}

/// `1970-01-01T00:00:00.000Z` for milliseconds since the epoch; years
/// before 1 as Postgres writes them (`0001-12-31T…Z BC` is year 0).
///
/// Written digit by digit, not with `format!`: every timestamp of a batch passes here.
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
    if before_year_one(millis.div_euclid(86_400_000)) {
        out.push_str(" BC");
    }
}

/// `YYYY-MM-DD` for days since 1970-01-01 (proleptic Gregorian); years
/// before 1 with ` BC`, as Postgres writes and reads them (astronomical
/// year 0 is 1 BC).
#[cfg(test)]
fn format_days(days: i64) -> String {
    let mut out = String::with_capacity(10);
    push_days(days, &mut out);
    if before_year_one(days) {
        out.push_str(" BC");
    }
    out
}

/// Whether a day is before 0001-01-01 (day -719,162).
fn before_year_one(days: i64) -> bool {
    days < -719_162
}

/// The date part of a day, the era left to the caller (` BC`).
fn push_days(days: i64, out: &mut String) {
    // Howard Hinnant's civil_from_days; saturating, so that no day (an
    // event's i64) overflows: years beyond what Postgres holds are refused
    // by Postgres, as that event's error.
    let days = days.clamp(-(1 << 40), 1 << 40);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Year 0 is 1 BC, -1 is 2 BC.
    let year = if year <= 0 { 1 - year } else { year };
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(format_days(-719_528), "0001-01-01 BC");
        assert_eq!(format_days(-719_162), "0001-01-01");
        assert_eq!(format_days(-719_163), "0001-12-31 BC");
        assert_eq!(format_millis(-62_135_596_800_001), "0001-12-31T23:59:59.999Z BC");
        assert!(format_days(i64::MIN).len() > 10, "no overflow");
        assert!(format_millis(i64::MAX).ends_with('Z'));
        assert_eq!(format_days(2_932_896), "9999-12-31");
        assert_eq!(format_days(2_932_897), "10000-01-01");
        assert_eq!(format_days(-719_529), "0002-12-31 BC");
        assert_eq!(format_days(19_723), "2024-01-01");
        assert_eq!(format_days(11_016), "2000-02-29");
        assert!(check_value(ColumnType::Boolean, &Value::Int(1)).is_err());
        let text = |ty, x: f64| {
            let mut out = String::new();
            text_of(ty, &Value::Float(x)).expect("fits").expect("not null").write(&mut out);
            out
        };
        assert_eq!(text(ColumnType::Text, f64::NAN), "NaN");
        assert_eq!(text(ColumnType::Numeric, f64::INFINITY), "Infinity");
        assert_eq!(text(ColumnType::Text, f64::NEG_INFINITY), "-Infinity");
        assert_eq!(text(ColumnType::Text, 1.5), "1.5");
        assert!(check_value(ColumnType::Jsonb, &Value::Array(vec![Value::Int(1)])).is_ok());
    }
}
