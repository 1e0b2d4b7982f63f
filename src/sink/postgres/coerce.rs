//! How a value converts for a column of a declared type, dates and
//! timestamps included (pure).

use super::types::{BindKind, ColumnType};
use crate::value::time::Style;
use crate::value::{Kinds, Temporal, TimeKind, Unit, Value};

/// Checks that `value` fits a column of type `ty` (what `push` would say),
/// without building the bound value: it runs once per op before batching.
#[inline]
pub fn check_value(ty: ColumnType, value: &Value) -> Result<(), String> {
    // The pairs the conversion below accepts whatever the value, answered
    // without it: every op passes here (issue 27). The same rule lets a
    // planned check skip such a place altogether (`always_fits`).
    if Kinds::of(value).within(always_fits(ty)) {
        return Ok(());
    }
    converts(ty, value)
}

/// The kinds of value that [`check_value`] accepts for a column of type
/// `ty` whatever the value is: a place whose values can only be of these
/// needs no check per op (`sink::CheckPlan`), and [`check_value`] answers
/// them without converting. Each is a pair that the conversion below
/// accepts whatever the value.
pub fn always_fits(ty: ColumnType) -> Kinds {
    let kinds = match ty.bind_kind() {
        // `to_int`, `to_float`: the integer a time was written as.
        BindKind::Int => Kinds::INT.or(Kinds::TIME),
        BindKind::Float => Kinds::INT.or(Kinds::FLOAT).or(Kinds::TIME),
        BindKind::Bool => Kinds::BOOL,
        BindKind::Bytes => Kinds::BYTES.or(Kinds::STR),
        BindKind::Text => match ty {
            // A time of day's integer must fall within the day; an
            // interval takes only text.
            ColumnType::Time | ColumnType::Interval => Kinds::STR,
            // An integer is shown as written, or counts the days or
            // milliseconds of a date or timestamp (`temporal_for`: any
            // integer is one). Other kinds depend on the value or the
            // type (a float's finiteness, a time of day in a timestamp).
            _ => Kinds::STR.or(Kinds::INT),
        },
    };
    kinds.or(Kinds::NULL)
}

/// Whether `value` converts for a column of type `ty`, by converting it.
fn converts(ty: ColumnType, value: &Value) -> Result<(), String> {
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
        // The integer Avro wrote (days, or ms/µs/ns as the type says).
        Value::Time(temporal) => Ok(Some(temporal.value)),
        Value::Float(x) if x.fract() == 0.0 && x.abs() < 9.2e18 => Ok(Some(*x as i64)),
        Value::Str(s) => s.trim().parse().map(Some).map_err(|_| mismatch(value, "an integer column")),
        other => Err(mismatch(other, "an integer column")),
    }
}

pub(super) fn to_float(value: &Value) -> Result<Option<f64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Int(i) => Ok(Some(*i as f64)),
        Value::Time(temporal) => Ok(Some(temporal.value as f64)),
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

/// A finite float as a `real` column holds it (rounded to `f32`, as the
/// upsert's `float8::real` cast rounds it); `None` when that overflows or
/// turns a nonzero value into zero, which Postgres refuses. The one rule
/// for `COPY` text and binary.
pub(super) fn real_of(x: f64) -> Option<f32> {
    let narrow = x as f32;
    (narrow.is_finite() && (narrow != 0.0 || x == 0.0)).then_some(narrow)
}

/// How a value goes to Postgres as text, to be cast there to the column
/// type: decided without building the text, so that checking an op (for
/// every op, before batching) allocates nothing; [`Text::write`] builds it.
pub(super) enum Text<'v> {
    Str(&'v str),
    /// A date, time or timestamp in a column of such a type, already in
    /// the column's terms ([`temporal_for`]).
    Time(Temporal),
    Json(&'v Value),
    /// Numbers and booleans as they display.
    Shown(&'v Value),
    Integer(i64),
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
            Text::Time(temporal) => drop(temporal.write(Style::Postgres, out)),
            // Writing to a String cannot fail.
            Text::Json(value) => drop(write!(out, "{}", value.to_json())),
            Text::Shown(value) => drop(write!(out, "{value}")),
            Text::Integer(n) => drop(write!(out, "{n}")),
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
        (ColumnType::TimestampTz | ColumnType::Timestamp | ColumnType::Date | ColumnType::Time, other) => {
            match temporal_for(ty, other) {
                Some(temporal) => Text::Time(temporal),
                None => return Err(wrong(other)),
            }
        }
        (ColumnType::Interval, other) => return Err(wrong(other)),
        (_, Value::Float(x)) if !x.is_finite() => Text::NonFinite(*x),
        (ColumnType::Numeric, Value::Int(_) | Value::Float(_)) => Text::Shown(value),
        // The integer written, as in integer columns.
        (ColumnType::Numeric, Value::Time(temporal)) => Text::Integer(temporal.value),
        (ColumnType::Numeric, other) => return Err(wrong(other)),
        (_, Value::Int(_) | Value::Float(_) | Value::Bool(_)) => Text::Shown(value),
        (ColumnType::Text, Value::Record(_) | Value::Map(_) | Value::Array(_)) => Text::Json(value),
        // ISO 8601, as in JSON and Elasticsearch.
        (ColumnType::Text, Value::Time(_)) => Text::Shown(value),
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
pub fn format_millis(millis: i64) -> String {
    Temporal::new(TimeKind::Timestamp(Unit::Millis), millis).to_text(Style::Postgres)
}

/// What a date, time or integer means in a column of a date/time type, or
/// why it cannot go there. Integers are what `$timestamp` and the
/// connector's literals are: milliseconds since the epoch for timestamps,
/// days for dates, milliseconds after midnight for times.
fn temporal_for(ty: ColumnType, value: &Value) -> Option<Temporal> {
    let temporal = match value {
        Value::Time(temporal) => *temporal,
        Value::Int(i) => Temporal::new(
            match ty {
                ColumnType::Date => TimeKind::Date,
                ColumnType::Time => TimeKind::TimeOfDay(Unit::Millis),
                _ => TimeKind::Timestamp(Unit::Millis),
            },
            *i,
        ),
        _ => return None,
    };
    match ty {
        // An instant: a local timestamp is read as UTC (documented), a
        // date as its midnight. A timestamp column (no zone) keeps the
        // UTC wall clock of an instant, since Postgres drops the `Z`.
        ColumnType::TimestampTz => temporal.as_instant(),
        ColumnType::Timestamp => match temporal.kind {
            TimeKind::LocalTimestamp(_) => Some(temporal),
            _ => temporal.as_instant(),
        },
        ColumnType::Date => temporal.day().map(|day| Temporal::new(TimeKind::Date, day)),
        // A plain integer must be a time of day already (a timestamp's
        // is taken from it); a decoded time of day is one.
        ColumnType::Time => match value {
            Value::Int(_) => Some(temporal).filter(Temporal::is_valid),
            _ => temporal.time_of_day(),
        },
        _ => None,
    }
}
#[cfg(test)]
mod tests {
    use super::super::fixtures::{every_column_type, sample_values};
    use super::*;

    /// The shortcut for the usual pairs answers as the conversion does,
    /// for every column type and every kind of value (the edges of each
    /// conversion among them).
    #[test]
    fn the_check_answers_as_the_conversion_does() {
        let (types, values) = (every_column_type(), sample_values());
        let mut shortcut = 0;
        for &ty in &types {
            for value in &values {
                assert_eq!(check_value(ty, value), converts(ty, value), "{ty:?}, {value:?}");
                shortcut += usize::from(matches!(value, Value::Null | Value::Int(_) | Value::Str(_)));
            }
        }
        assert!(shortcut > 100, "the usual pairs are among those tried");
    }

    /// What `always_fits` promises for a column type, `check_value` keeps
    /// for every value of those kinds (the edges of each conversion among
    /// them), and it promises more than null for every type.
    #[test]
    fn a_kind_that_always_fits_passes_the_check_whatever_its_value() {
        let (types, mut values) = (every_column_type(), sample_values());
        values.extend([
            Value::Int(i64::MAX),
            Value::Int(86_400_000),
            Value::Int(-1),
            Value::Float(f64::INFINITY),
            Value::Float(1e300),
            Value::Bool(false),
            Value::Str("not a number".into()),
            Value::Map(vec![("a".into(), Value::Int(1))]),
            Value::Record(crate::value::Record::new()),
            Value::Time(Temporal::new(TimeKind::TimeOfDay(Unit::Micros), 5)),
            Value::Time(Temporal::new(TimeKind::LocalTimestamp(Unit::Nanos), i64::MIN)),
        ]);
        let mut promised = 0;
        for &ty in &types {
            let fits = always_fits(ty);
            assert_ne!(fits, Kinds::NULL, "{ty:?}: some kind always fits");
            for value in values.iter().filter(|value| Kinds::of(value).within(fits)) {
                assert_eq!(check_value(ty, value), Ok(()), "{ty:?} always takes {value:?}");
                promised += 1;
            }
        }
        assert!(promised > types.len() * 5, "{promised} promises tried");
    }

    fn written(ty: ColumnType, value: &Value) -> Result<String, String> {
        let mut out = String::new();
        text_of(ty, value)?.expect("not null").write(&mut out);
        Ok(out)
    }

    #[test]
    fn dates_and_times_land_in_their_columns_with_their_units() {
        use ColumnType::{Date, Text, Time, Timestamp, TimestampTz};
        let time = |kind, value| Value::Time(Temporal::new(kind, value));
        let micros = time(TimeKind::Timestamp(Unit::Micros), 1_700_000_000_123_456);
        assert_eq!(written(TimestampTz, &micros).as_deref(), Ok("2023-11-14T22:13:20.123456Z"));
        assert_eq!(written(Timestamp, &micros).as_deref(), Ok("2023-11-14T22:13:20.123456Z"));
        assert_eq!(written(Date, &micros).as_deref(), Ok("2023-11-14"));
        assert_eq!(written(Time, &micros).as_deref(), Ok("22:13:20.123456"));
        assert_eq!(written(Text, &micros).as_deref(), Ok("2023-11-14T22:13:20.123456Z"));
        assert_eq!(to_int(&micros), Ok(Some(1_700_000_000_123_456)), "integer columns get the integer written");
        let nanos = time(TimeKind::Timestamp(Unit::Nanos), 1_700_000_000_123_456_789);
        assert_eq!(written(TimestampTz, &nanos).as_deref(), Ok("2023-11-14T22:13:20.123456789Z"));
        let local = time(TimeKind::LocalTimestamp(Unit::Millis), 1_700_000_000_123);
        assert_eq!(written(Timestamp, &local).as_deref(), Ok("2023-11-14T22:13:20.123"));
        assert_eq!(written(TimestampTz, &local).as_deref(), Ok("2023-11-14T22:13:20.123Z"), "read as UTC");
        let date = time(TimeKind::Date, -719_529);
        assert_eq!(written(Date, &date).as_deref(), Ok("0002-12-31 BC"));
        assert_eq!(written(TimestampTz, &time(TimeKind::Date, 1)).as_deref(), Ok("1970-01-02T00:00:00.000Z"));
        assert!(written(Time, &date).is_err(), "a date has no time of day");
        let of_day = time(TimeKind::TimeOfDay(Unit::Micros), 1);
        assert_eq!(written(Time, &of_day).as_deref(), Ok("00:00:00.000001"));
        assert!(written(TimestampTz, &of_day).is_err(), "a time of day is no instant");
        assert!(written(Date, &of_day).is_err());
        // Integers keep what they meant before logical types were kept.
        assert_eq!(written(TimestampTz, &Value::Int(1_700_000_000_123)).as_deref(), Ok("2023-11-14T22:13:20.123Z"));
        assert_eq!(written(Date, &Value::Int(19_723)).as_deref(), Ok("2024-01-01"));
        assert_eq!(written(Time, &Value::Int(1_000)).as_deref(), Ok("00:00:01.000"));
        assert!(written(Time, &Value::Int(86_400_000)).is_err());
        assert_eq!(written(ColumnType::Numeric, &micros).as_deref(), Ok("1700000000123456"));
        assert_eq!(to_float(&micros), Ok(Some(1_700_000_000_123_456.0)));
        assert!(written(ColumnType::Uuid, &micros).is_err());
        assert!(written(TimestampTz, &Value::Float(f64::NAN)).is_err());
        assert_eq!(written(ColumnType::Interval, &Value::from("P1M2DT3.004S")).as_deref(), Ok("P1M2DT3.004S"));
        assert_eq!(format_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn non_finite_floats_as_postgres_spells_them() {
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
