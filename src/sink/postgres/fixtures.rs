//! Tables and net ops the unit tests of the statement modules share.

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
