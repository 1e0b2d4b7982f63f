//! Tables and net ops the unit tests of the statement modules share.

use super::arrays::ColumnArray;
use super::table::TableSql;
use super::types::ColumnType;
use crate::projection::fold::{Effect, NetOp};
use crate::sink::postgres::{Column, PostgresTarget};
use crate::value::{Name, Temporal, TimeKind, Unit, Value};

pub fn replace(fields: Vec<(Name, Value)>) -> Effect<'static> {
    Effect::Replace(fields.into())
}

pub fn patch(set: Vec<(Name, Value)>, add: Vec<(Name, Value)>) -> Effect<'static> {
    Effect::Patch { set: set.into(), add: add.into() }
}

pub fn inventory() -> TableSql {
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
            tombstone_retention: std::time::Duration::from_secs(60),
        },
        false,
    )
}

/// A net op of store `store`'s item `i1`.
pub fn net(store: &str, effect: Effect<'static>) -> NetOp<'static> {
    net_op(vec![Value::from(store), Value::from("i1")], effect, None)
}

/// A net op of partition `t`/0: every test net op is built here.
pub fn net_op(key: Vec<Value>, effect: Effect<'static>, version: Option<i64>) -> NetOp<'static> {
    NetOp {
        key: key.into(),
        effect,
        version,
        first_version: version,
        partition: Some(("t", 0)),
        first_offset: 0,
        last_offset: 0,
    }
}

/// Every type a connector can declare, by its names (aliases once).
pub fn every_column_type() -> Vec<ColumnType> {
    let mut types: Vec<ColumnType> = Vec::new();
    for ty in ColumnType::known_names().split(", ").filter_map(ColumnType::parse) {
        if !types.contains(&ty) {
            types.push(ty);
        }
    }
    assert!(types.contains(&ColumnType::Bytea) && types.len() > 10, "{types:?}");
    types
}

/// A value of every kind, some in forms only a conversion reads (numbers
/// and booleans as text, a float that is an integer).
pub fn sample_values() -> Vec<Value> {
    vec![
        Value::Null,
        Value::Bool(true),
        Value::Int(0),
        Value::Int(i64::MIN),
        Value::Float(1.5),
        Value::Float(2.0),
        Value::Float(f64::NAN),
        Value::Str("".into()),
        Value::Str(" 12 ".into()),
        Value::Str("true".into()),
        Value::Str("2026-12-07".into()),
        Value::Str("a\tb\\c and more than eight bytes\n".into()),
        Value::Bytes(vec![0xff]),
        Value::Array(vec![Value::Int(1)]),
        Value::Time(Temporal::new(TimeKind::Date, 3)),
        Value::Time(Temporal::new(TimeKind::Timestamp(Unit::Millis), -1)),
    ]
}

/// What an array's values mean to Postgres once cast to the column
/// type, as comparable text: a `real` as its `f32`, a NaN as any NaN,
/// a UUID in lower case, and the text of a date or time without the
/// fraction's trailing zeros (binary reads back in microseconds:
/// `.123000` for `.123`) and, in a `timestamp` column, without a zone.
pub fn meaning(ty: Option<ColumnType>, array: &ColumnArray) -> Vec<String> {
    let float = |x: f64| match ty {
        _ if x.is_nan() => "NaN".to_string(),
        Some(ColumnType::Real) => format!("{:?}", x as f32),
        _ => format!("{x:?}"),
    };
    let time = |text: &str| match text.split_once('.') {
        Some((whole, rest)) => {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let fraction = rest[..digits].trim_end_matches('0');
            let dot = if fraction.is_empty() { "" } else { "." };
            format!("{whole}{dot}{fraction}{}", &rest[digits..])
        }
        None => text.to_string(),
    };
    let temporal =
        matches!(ty, Some(ColumnType::TimestampTz | ColumnType::Timestamp | ColumnType::Date | ColumnType::Time));
    match array {
        ColumnArray::Int(v) => v.iter().map(|x| format!("{x:?}")).collect(),
        ColumnArray::Float(v) => v.iter().map(|x| x.map_or("null".into(), float)).collect(),
        ColumnArray::Bool(v) => v.iter().map(|x| format!("{x:?}")).collect(),
        ColumnArray::Bytes(v) => v.iter().map(|x| format!("{x:?}")).collect(),
        ColumnArray::Text(v) => v
            .iter()
            .map(|x| match x {
                // A `timestamp` column drops an instant's `Z`.
                Some(text) if ty == Some(ColumnType::Timestamp) => time(&text.replace('Z', "")),
                Some(text) if temporal => time(text),
                Some(text) if ty == Some(ColumnType::Uuid) => text.to_lowercase(),
                other => format!("{other:?}"),
            })
            .collect(),
    }
}
