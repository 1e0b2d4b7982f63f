//! Column types a Postgres read model may declare, and how values are bound.

use std::fmt;

/// A declared column type. Each is bound as one typed array per statement
/// (`UNNEST($1::bigint[], …)`), so a batch costs one parameter per column
/// whatever its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Text,
    BigInt,
    Integer,
    SmallInt,
    Double,
    Real,
    Boolean,
    Numeric,
    TimestampTz,
    Timestamp,
    Date,
    /// Time of day (`time`, no zone).
    Time,
    Interval,
    Jsonb,
    Json,
    Uuid,
    Bytea,
}

/// How a column's values travel to Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    /// `bigint[]`, also for integer and smallint (cast in SQL).
    Int,
    /// `double precision[]`, also for real.
    Float,
    Bool,
    Bytes,
    /// `text[]`, cast to the column type in SQL (numeric, timestamps, json, uuid).
    Text,
}

impl ColumnType {
    const NAMES: [(&'static str, ColumnType); 27] = [
        ("text", ColumnType::Text),
        ("varchar", ColumnType::Text),
        ("character varying", ColumnType::Text),
        ("bigint", ColumnType::BigInt),
        ("int8", ColumnType::BigInt),
        ("integer", ColumnType::Integer),
        ("int", ColumnType::Integer),
        ("int4", ColumnType::Integer),
        ("smallint", ColumnType::SmallInt),
        ("int2", ColumnType::SmallInt),
        ("double precision", ColumnType::Double),
        ("float8", ColumnType::Double),
        ("real", ColumnType::Real),
        ("float4", ColumnType::Real),
        ("boolean", ColumnType::Boolean),
        ("bool", ColumnType::Boolean),
        ("numeric", ColumnType::Numeric),
        ("timestamptz", ColumnType::TimestampTz),
        ("timestamp with time zone", ColumnType::TimestampTz),
        ("timestamp", ColumnType::Timestamp),
        ("date", ColumnType::Date),
        ("time", ColumnType::Time),
        ("time without time zone", ColumnType::Time),
        ("interval", ColumnType::Interval),
        ("jsonb", ColumnType::Jsonb),
        ("json", ColumnType::Json),
        ("uuid", ColumnType::Uuid),
    ];

    /// Reads a type name as written in a connector (case-insensitive).
    pub fn parse(text: &str) -> Option<ColumnType> {
        let wanted = text.trim().to_ascii_lowercase();
        if wanted == "bytea" {
            return Some(ColumnType::Bytea);
        }
        Self::NAMES.iter().find(|(name, _)| *name == wanted).map(|(_, ty)| *ty)
    }

    pub fn known_names() -> String {
        let mut names: Vec<&str> = Self::NAMES.iter().map(|(n, _)| *n).collect();
        names.push("bytea");
        names.join(", ")
    }

    /// The SQL name, as used in `CREATE TABLE` and casts.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::BigInt => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::SmallInt => "smallint",
            ColumnType::Double => "double precision",
            ColumnType::Real => "real",
            ColumnType::Boolean => "boolean",
            ColumnType::Numeric => "numeric",
            ColumnType::TimestampTz => "timestamptz",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Date => "date",
            ColumnType::Time => "time",
            ColumnType::Interval => "interval",
            ColumnType::Jsonb => "jsonb",
            ColumnType::Json => "json",
            ColumnType::Uuid => "uuid",
            ColumnType::Bytea => "bytea",
        }
    }

    pub fn bind_kind(self) -> BindKind {
        match self {
            ColumnType::BigInt | ColumnType::Integer | ColumnType::SmallInt => BindKind::Int,
            ColumnType::Double | ColumnType::Real => BindKind::Float,
            ColumnType::Boolean => BindKind::Bool,
            ColumnType::Bytea => BindKind::Bytes,
            _ => BindKind::Text,
        }
    }

    /// Whether it holds JSON (its text is a value's JSON, a string's too).
    pub fn is_json(self) -> bool {
        matches!(self, ColumnType::Json | ColumnType::Jsonb)
    }

    /// Whether `increment`/`decrement` may target it.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            ColumnType::BigInt
                | ColumnType::Integer
                | ColumnType::SmallInt
                | ColumnType::Double
                | ColumnType::Real
                | ColumnType::Numeric
        )
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.sql())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_aliases() {
        assert_eq!(ColumnType::parse("BIGINT"), Some(ColumnType::BigInt));
        assert_eq!(ColumnType::parse(" double precision "), Some(ColumnType::Double));
        assert_eq!(ColumnType::parse("bytea"), Some(ColumnType::Bytea));
        assert_eq!(ColumnType::parse("money"), None);
        assert!(ColumnType::Numeric.is_numeric() && !ColumnType::Text.is_numeric());
        assert_eq!(ColumnType::SmallInt.bind_kind(), BindKind::Int);
    }
}
