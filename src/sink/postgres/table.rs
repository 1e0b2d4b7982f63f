//! A read model's table: its names, its `CREATE TABLE`, and the SQL of its
//! positions in `kawka_offsets` (pure).

use std::fmt::Write as _;

use super::types::ColumnType;
use crate::sink::postgres::PostgresTarget;

/// The hidden column that holds the domain version when the connector names one.
pub const VERSION_COLUMN: &str = "kawka_version";

/// Double-quotes an identifier.
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Builds the statements of one table: its DDL and positions SQL here, the
/// statements that apply net ops in `statements.rs` and `bind.rs`.
#[derive(Debug, Clone)]
pub struct TableSql {
    pub(super) target: PostgresTarget,
    /// `"schema"."table"`.
    pub qualified: String,
    /// `"schema"."kawka_offsets"`.
    pub offsets_table: String,
    /// `"schema"."<table>_kawka_deleted"`: the versions of deleted keys,
    /// when versioned (a stale event after a delete must not bring a row
    /// back).
    pub tombstones: String,
    pub(super) versioned: bool,
}

impl TableSql {
    pub fn new(target: &PostgresTarget, versioned: bool) -> TableSql {
        TableSql {
            qualified: format!("{}.{}", quote(&target.schema), quote(&target.table)),
            offsets_table: format!("{}.kawka_offsets", quote(&target.schema)),
            tombstones: format!("{}.{}", quote(&target.schema), quote(&format!("{}_kawka_deleted", target.table))),
            target: target.clone(),
            versioned,
        }
    }

    pub fn target(&self) -> &PostgresTarget {
        &self.target
    }

    /// Whether the table's columns in the database (`actual`: each name
    /// with its type as `regtype` spells it) have the declared types, and
    /// the version column is `bigint`: then binary `COPY` data, which
    /// Postgres reads with the table's own types, means what the text
    /// means. A missing column, a domain or another type says no.
    pub(super) fn types_as_declared(&self, actual: &[(String, String)]) -> bool {
        let type_of = |name: &str| actual.iter().find(|(column, _)| column == name).map(|(_, ty)| ty.as_str());
        let is = |name: &str, declared: ColumnType| {
            type_of(name).is_some_and(|ty| {
                ColumnType::parse(ty) == Some(declared)
                    || (ty == "timestamp without time zone" && declared == ColumnType::Timestamp)
            })
        };
        self.target.columns.iter().all(|column| is(&column.name, column.ty))
            && (!self.versioned || is(VERSION_COLUMN, ColumnType::BigInt))
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

    /// The tombstones of a versioned table: each deleted key with the
    /// version of its delete, kept for `retention` after it.
    pub fn create_tombstones(&self) -> String {
        let mut sql = format!("CREATE TABLE IF NOT EXISTS {} (", self.tombstones);
        for key in &self.target.primary_key {
            let _ = write!(sql, "{} {} NOT NULL, ", quote(key), self.column_type(key).sql());
        }
        let _ = write!(
            sql,
            "{VERSION_COLUMN} bigint NOT NULL, deleted_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY ({}))",
            self.key_list()
        );
        sql
    }

    /// Forgets tombstones older than `$1` seconds.
    pub fn expire_tombstones(&self) -> String {
        format!("DELETE FROM {} WHERE deleted_at < now() - make_interval(secs => $1)", self.tombstones)
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

    pub(super) fn key_list(&self) -> String {
        self.target.primary_key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")
    }

    pub(super) fn column_type(&self, name: &str) -> ColumnType {
        self.target.column(name).map_or(ColumnType::Text, |c| c.ty)
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::inventory;
    use super::TableSql;

    /// Binary `COPY` only where the table's types are the declared ones:
    /// Postgres reads binary data with the table's own types.
    #[test]
    fn binary_copy_needs_the_declared_types() {
        let actual = |types: &[&str], version: Option<&str>| -> Vec<(String, String)> {
            let names = ["store_id", "item_id", "on_hand", "seen_at"];
            let mut columns: Vec<(String, String)> =
                names.iter().zip(types).map(|(name, ty)| (name.to_string(), ty.to_string())).collect();
            columns.extend(version.map(|ty| ("kawka_version".to_string(), ty.to_string())));
            columns
        };
        let declared = ["text", "character varying", "bigint", "timestamp with time zone"];
        let table = inventory();
        assert!(table.types_as_declared(&actual(&declared, None)));
        for (at, other) in
            [(2, "numeric"), (2, "integer"), (0, "bytea"), (3, "timestamp without time zone"), (1, "citext")]
        {
            let mut types = declared;
            types[at] = other;
            assert!(!table.types_as_declared(&actual(&types, None)), "{other} for {}", declared[at]);
        }
        assert!(!table.types_as_declared(&actual(&declared[..3], None)), "a column missing");
        let versioned = TableSql::new(table.target(), true);
        assert!(versioned.types_as_declared(&actual(&declared, Some("bigint"))));
        assert!(!versioned.types_as_declared(&actual(&declared, Some("integer"))));
        assert!(!versioned.types_as_declared(&actual(&declared, None)));
    }

    #[test]
    fn a_created_table_takes_its_fillfactor() {
        let mut table = inventory();
        assert!(!table.create_table().contains("WITH"), "{}", table.create_table());
        table.target.fillfactor = Some(70);
        assert!(table.create_table().ends_with("PRIMARY KEY (\"store_id\", \"item_id\")) WITH (fillfactor = 70)"));
    }
}
