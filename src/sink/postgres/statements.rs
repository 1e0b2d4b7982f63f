//! The statements that apply a batch's net ops to a table (pure).
//!
//! Every statement binds one typed array per column and reads them back with
//! `UNNEST`, so a batch of any size is a handful of statements with a few
//! parameters each (multi-row `VALUES` would hit the 65,535-parameter limit).
//! Compaction guarantees each key appears once per batch, which
//! `INSERT … ON CONFLICT DO UPDATE` requires.
//!
//! An upsert also carries an [`Insert`]: the same rows as `COPY` data.
//! `COPY` checks no conflicts and inserts at several times the rate of an
//! upsert, so the sink writes new keys with it and keeps the upsert for
//! when keys exist.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::arrays::ColumnArray;
use super::binary::arrays_from_binary;
use super::copy::arrays_from_copy;
use super::table::{quote, TableSql, VERSION_COLUMN};
use super::types::ColumnType;
use crate::projection::fold::{Effect, NetOp};
use crate::value::{intern, same_name, Name, Value};

/// One statement and its arrays, `$1…$n` in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    /// The bound values; empty arrays of the right kinds when the rows were
    /// planned straight into `COPY` data ([`Insert::rendered`]), read back
    /// from it by [`Statement::bound_arrays`] if the upsert is needed after all.
    pub arrays: Vec<ColumnArray>,
    /// Index into the planned net ops of each row, to name the culprit.
    pub rows: Vec<usize>,
    /// For an upsert: how to write the same rows without conflict checks.
    pub insert: Option<Insert>,
}

/// The rows of an upsert written as plain inserts. Equal in effect to the
/// upsert only for keys no row has yet: the sink runs `copy` in a savepoint
/// while it expects new keys, and the upsert when the copy meets a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    /// `COPY t (…) FROM STDIN`, one column per array, in order.
    pub copy: String,
    /// The type of the column each array fills (`None`: the version column).
    pub types: Vec<Option<ColumnType>>,
    /// The `COPY` data of every row, when the plan was asked for it (the
    /// sink expects new keys): written straight from the net ops, without
    /// the bound arrays, which the usual write (a `COPY` of new keys) does
    /// not need. The write is then only I/O.
    pub rendered: Option<CopyData>,
}

impl Insert {
    /// The `COPY` statement for data in `format`.
    pub fn copy_sql(&self, format: CopyFormat) -> std::borrow::Cow<'_, str> {
        match format {
            CopyFormat::Text => std::borrow::Cow::Borrowed(&self.copy),
            CopyFormat::Binary => std::borrow::Cow::Owned(format!("{} (FORMAT binary)", self.copy)),
        }
    }
}

/// Rows as `COPY` data.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyData {
    pub format: CopyFormat,
    pub bytes: Vec<u8>,
}

/// The two formats of `COPY` data kawka writes: binary where every value
/// of a statement has a binary form equal to its text's, text otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Binary,
}

impl Statement {
    /// The bound arrays: as planned, or read back from the `COPY` data when
    /// the rows were planned into that alone (a `COPY` that met an existing
    /// key, or a guess that changed, needs the upsert's arrays after all).
    pub fn bound_arrays(&self) -> Result<std::borrow::Cow<'_, [ColumnArray]>, String> {
        let rows = self.rows.len();
        let arrays = match &self.insert {
            Some(Insert { rendered: Some(CopyData { format: CopyFormat::Text, bytes }), .. }) => {
                arrays_from_copy(bytes, &self.arrays, rows)?
            }
            Some(Insert { rendered: Some(CopyData { format: CopyFormat::Binary, bytes }), types, .. }) => {
                arrays_from_binary(bytes, types, &self.arrays, rows)?
            }
            _ => return Ok(std::borrow::Cow::Borrowed(&self.arrays)),
        };
        Ok(std::borrow::Cow::Owned(arrays))
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

impl TableSql {
    /// The statements that apply `net` (deletes, replaces, then one patch
    /// statement per shape of set and added columns). Each key is in
    /// exactly one statement, so their order does not matter.
    pub fn plan(&self, net: &[NetOp]) -> Result<Vec<Statement>, BindError> {
        self.plan_rendering(net, &|_| false, false)
    }

    /// [`TableSql::plan`], with the upserts whose `COPY` statement `render`
    /// picks planned straight into `COPY` data ([`Insert::rendered`]):
    /// binary where `binary` allows it (the table's types are the declared
    /// ones) and every value has a binary form equal to its text, else text.
    pub fn plan_rendering(
        &self,
        net: &[NetOp],
        render: &dyn Fn(&str) -> bool,
        binary: bool,
    ) -> Result<Vec<Statement>, BindError> {
        let render = Render { copy: render, binary };
        let render = &render;
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
        // Rows go in one order of their keys, whatever order the batch
        // met them in: writers of overlapping keys (two replicas, a rebuild
        // and a live connector) then lock them in the same order and wait
        // for each other instead of deadlocking. The stable sort, though
        // keys are unique: it merges runs already in order, and a batch's
        // keys often come in a few (ids that grow, read a partition's
        // chunk at a time), where the unstable one compares ~log n times
        // per row whatever the order.
        let by_key = |rows: &mut Vec<usize>| {
            rows.sort_by(|&a, &b| {
                let (a, b) = (&net[a].key, &net[b].key);
                a.iter().zip(b.iter()).map(|(x, y)| x.total_cmp(y)).find(|o| o.is_ne()).unwrap_or(a.len().cmp(&b.len()))
            })
        };
        by_key(&mut deletes);
        by_key(&mut replaces);
        for (_, rows) in &mut shapes {
            by_key(rows);
        }
        let mut statements = Vec::new();
        // Several statements lock their rows one statement after another
        // (and a DELETE's join in whatever order its plan reads the
        // table): the transaction's rows are then locked first, all of
        // them in key order, so two writers still queue.
        let several = usize::from(!deletes.is_empty())
            + usize::from(!replaces.is_empty())
            + shapes.iter().filter(|(_, rows)| !rows.is_empty()).count();
        if several > 1 || !deletes.is_empty() {
            let mut all: Vec<usize> = (0..net.len()).collect();
            by_key(&mut all);
            statements.push(self.lock_rows(net, all, !deletes.is_empty())?);
        }
        if !deletes.is_empty() {
            let delete = self.delete(net, deletes)?;
            statements.push(if self.versioned { self.delete_keeping_versions(delete) } else { delete });
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

    /// Locks the existing rows of `rows` (in their order): `FOR UPDATE`
    /// when some will be deleted, else `FOR NO KEY UPDATE` (what an UPDATE
    /// of non-key columns takes, so foreign keys' checks are not blocked).
    fn lock_rows(&self, net: &[NetOp], rows: Vec<usize>, deleting: bool) -> Result<Statement, BindError> {
        let arrays = self.key_arrays(net, &rows)?;
        let keys = &self.target.primary_key;
        let names: Vec<String> = (0..keys.len()).map(|i| format!("c{i}")).collect();
        let matches: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("t.{} = u.c{i}::{}", quote(k), self.column_type(k).sql()))
            .collect();
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM UNNEST({params}) WITH ORDINALITY AS u({names}, n) \
             JOIN {table} AS t ON {matches} ORDER BY u.n FOR {strength} OF t) AS locked",
            params = unnest_params(&arrays),
            names = names.join(", "),
            table = self.qualified,
            matches = matches.join(" AND "),
            strength = if deleting { "UPDATE" } else { "NO KEY UPDATE" },
        );
        Ok(Statement { sql, arrays, rows, insert: None })
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

    /// A versioned delete (its arrays: the keys, then the versions) that
    /// keeps, in each key's tombstone, the highest version it knew: the
    /// delete's own or the deleted row's (a delete without a version, such
    /// as a Kafka tombstone's, still remembers the row's).
    fn delete_keeping_versions(&self, delete: Statement) -> Statement {
        let keys = &self.target.primary_key;
        let names: Vec<String> = (0..keys.len()).map(|i| format!("c{i}")).collect();
        let casts: Vec<String> =
            keys.iter().enumerate().map(|(i, k)| format!("u.c{i}::{} AS c{i}", self.column_type(k).sql())).collect();
        let matches: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("t.{} = d.c{i}", quote(k))).collect();
        let returned: Vec<String> = keys.iter().enumerate().map(|(i, k)| format!("t.{} AS c{i}", quote(k))).collect();
        let sql = format!(
            "WITH d AS (SELECT {casts}, u.v FROM UNNEST({params}) AS u({names}, v)), \
             gone AS (DELETE FROM {table} AS t USING d WHERE {matches} \
             AND (d.v IS NULL OR t.{VERSION_COLUMN} IS NULL OR t.{VERSION_COLUMN} < d.v) \
             RETURNING {returned}, t.{VERSION_COLUMN} AS was) \
             INSERT INTO {tomb} AS x ({key_list}, {VERSION_COLUMN}) \
             SELECT {d_keys}, GREATEST(d.v, gone.was) FROM d LEFT JOIN gone ON {gone_on} \
             WHERE GREATEST(d.v, gone.was) IS NOT NULL \
             ON CONFLICT ({key_list}) DO UPDATE SET {VERSION_COLUMN} = \
             GREATEST(x.{VERSION_COLUMN}, EXCLUDED.{VERSION_COLUMN}), deleted_at = now()",
            casts = casts.join(", "),
            params = unnest_params(&delete.arrays),
            names = names.join(", "),
            table = self.qualified,
            matches = matches.join(" AND "),
            returned = returned.join(", "),
            tomb = self.tombstones,
            key_list = self.key_list(),
            d_keys = names.iter().map(|n| format!("d.{n}")).collect::<Vec<_>>().join(", "),
            gone_on = names.iter().map(|n| format!("gone.{n} = d.{n}")).collect::<Vec<_>>().join(" AND "),
        );
        Statement { sql, ..delete }
    }

    /// The version stored for each of `net`'s keys, in its row or its
    /// tombstone, whichever is higher: `(ordinal, version)` rows, 1-based
    /// ordinals into the key arrays ([`TableSql::key_arrays`] of every net op).
    pub(super) fn stored_versions(&self, arrays: &[ColumnArray]) -> String {
        let keys = &self.target.primary_key;
        let names: Vec<String> = (0..keys.len()).map(|i| format!("c{i}")).collect();
        let on = |alias: &str| {
            keys.iter()
                .enumerate()
                .map(|(i, k)| format!("{alias}.{} = u.c{i}::{}", quote(k), self.column_type(k).sql()))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        format!(
            "SELECT u.n, GREATEST(t.{VERSION_COLUMN}, d.{VERSION_COLUMN}) FROM UNNEST({}) WITH ORDINALITY AS u({}, n) \
             LEFT JOIN {} AS t ON {} LEFT JOIN {} AS d ON {}",
            unnest_params(arrays),
            names.join(", "),
            self.qualified,
            on("t"),
            self.tombstones,
            on("d"),
        )
    }

    /// Replace: every column, unlisted ones null.
    fn replace(&self, net: &[NetOp], rows: Vec<usize>, render: &Render) -> Result<Statement, BindError> {
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
        render: &Render,
    ) -> Result<Statement, BindError> {
        let columns: Vec<(Name, bool)> =
            set.iter().map(|name| (*name, false)).chain(add.iter().map(|name| (*name, true))).collect();
        self.upsert(net, rows, &columns, set.len(), render)
    }

    /// Insert-or-update of the `bound` value columns (name, and whether it
    /// is added to): the first `set` of them are set, the others added to (a missing
    /// row starts from the delta; an existing null counts as 0). With
    /// `render` picking its `COPY`, the rows become `COPY` data and the
    /// arrays stay empty ([`Insert::rendered`]).
    fn upsert(
        &self,
        net: &[NetOp],
        rows: Vec<usize>,
        bound: &[(Name, bool)],
        set: usize,
        render: &Render,
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
        // The new value of each column, from the proposed one.
        let mut updates: Vec<String> = value_columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let c = quote(c);
                if i < set {
                    format!("{c} = EXCLUDED.{c}")
                } else {
                    format!("{c} = COALESCE(t.{c}, 0) + EXCLUDED.{c}")
                }
            })
            .collect();
        if self.versioned {
            columns.push(VERSION_COLUMN.to_string());
            casts.push(format!("u.c{}", casts.len()));
            types.push(None);
            updates.push(format!("{VERSION_COLUMN} = EXCLUDED.{VERSION_COLUMN}"));
            arrays.push(ColumnArray::Int(Vec::new()));
        }
        let names: Vec<String> = (0..arrays.len()).map(|i| format!("c{i}")).collect();
        // The rows are inserted or updated in one pass, in the order of the
        // bound arrays (the keys' order, see `plan_rendering`).
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
        let rendered = if (render.copy)(&copy) {
            Some(self.copy_data_of(net, &rows, bound, &types, render.binary)?)
        } else {
            arrays = self.key_arrays(net, &rows)?;
            arrays.extend(self.value_arrays(net, &rows, bound)?);
            if self.versioned {
                arrays.push(self.version_array(net, &rows));
            }
            None
        };
        Ok(Statement { sql, arrays, rows, insert: Some(Insert { copy, types, rendered }) })
    }
}

/// Which upserts [`TableSql::plan_rendering`] plans into `COPY` data
/// (`copy` picks them by their `COPY` statement), and whether that data
/// may be binary.
struct Render<'a> {
    copy: &'a dyn Fn(&str) -> bool,
    binary: bool,
}

/// The shape of a patch: its set and its added column names, each sorted.
type Shape = (Vec<Name>, Vec<Name>);

/// Whether `effect` is a patch naming the fields of `set` and `add`, in the
/// same order (names are interned: compared by address, then by content).
fn same_names(effect: &Effect, set: &[(Name, Value)], add: &[(Name, Value)]) -> bool {
    let same = |a: &[(Name, Value)], b: &[(Name, Value)]| {
        a.len() == b.len() && a.iter().zip(b).all(|((x, _), (y, _))| same_name(x, y))
    };
    matches!(effect, Effect::Patch { set: before_set, add: before_add } if same(before_set, set) && same(before_add, add))
}

fn unnest_params(arrays: &[ColumnArray]) -> String {
    arrays.iter().enumerate().map(|(i, a)| format!("${}::{}", i + 1, a.array_type())).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{inventory, net, patch, replace};
    use super::*;

    #[test]
    fn patches_add_with_coalesce_and_group_by_shape() {
        let ops = vec![
            net("s1", patch(vec![], vec![("on_hand", Value::Int(5))])),
            net("s2", patch(vec![], vec![("on_hand", Value::Int(-2))])),
            net("s3", patch(vec![("seen_at", Value::Int(0))], vec![])),
        ];
        let statements = inventory().plan(&ops).expect("binds");
        assert_eq!(statements.len(), 3);
        // Two statements: the rows are locked first, in key order.
        assert!(statements[0].sql.ends_with("ORDER BY u.n FOR NO KEY UPDATE OF t) AS locked"), "{}", statements[0].sql);
        assert_eq!(statements[0].rows, vec![0, 1, 2]);
        let statements = &statements[1..];
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
        assert_eq!(
            rows,
            [&[0, 1, 2, 3, 4][..], &[4], &[2], &[0, 1, 3]],
            "the rows locked, then shapes in the order of their sorted names: add, set"
        );
        assert_eq!(statements[3].arrays[2], ColumnArray::Int(vec![Some(1), Some(2), Some(4)]));
    }

    #[test]
    fn replaces_write_every_column_and_deletes_match_the_key() {
        let ops = vec![net("s1", replace(vec![("on_hand", Value::Int(1))])), net("s2", Effect::Delete)];
        let statements = inventory().plan(&ops).expect("binds");
        // Deleting: the rows are locked first, for a delete.
        assert!(statements[0].sql.ends_with("ORDER BY u.n FOR UPDATE OF t) AS locked"), "{}", statements[0].sql);
        let statements = &statements[1..];
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
    fn upserts_carry_a_copy_of_their_rows() {
        let ops = vec![net("s1", patch(vec![("seen_at", Value::Int(0))], vec![("on_hand", Value::Int(5))]))];
        let statement = &inventory().plan(&ops).expect("binds")[0];
        let insert = statement.insert.as_ref().expect("an upsert can be copied");
        assert_eq!(
            insert.copy,
            "COPY \"public\".\"inventory\" (\"store_id\", \"item_id\", \"seen_at\", \"on_hand\") FROM STDIN"
        );
        assert_eq!(
            statement.sql,
            "INSERT INTO \"public\".\"inventory\" AS t (\"store_id\", \"item_id\", \"seen_at\", \"on_hand\") \
             SELECT u.c0::text, u.c1::text, u.c2::timestamptz, u.c3::bigint \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) AS u(c0, c1, c2, c3) \
             ON CONFLICT (\"store_id\", \"item_id\") DO UPDATE SET \"seen_at\" = EXCLUDED.\"seen_at\", \
             \"on_hand\" = COALESCE(t.\"on_hand\", 0) + EXCLUDED.\"on_hand\""
        );
        let mut versioned = inventory();
        versioned.versioned = true;
        let statement = &versioned.plan(&ops).expect("binds")[0];
        let insert = statement.insert.as_ref().expect("copied too");
        assert!(insert.copy.contains("\"on_hand\", kawka_version) FROM STDIN"), "{}", insert.copy);
        assert!(statement.sql.contains("WHERE t.kawka_version IS NULL"), "{}", statement.sql);
        assert_eq!(insert.types.last(), Some(&None));
        let delete = &inventory().plan(&[net("s1", Effect::Delete)]).expect("binds")[1];
        assert!(delete.sql.starts_with("DELETE"), "{}", delete.sql);
        assert_eq!(delete.insert, None);
    }

    #[test]
    fn versions_guard_updates_and_deletes() {
        let mut table = inventory();
        table.versioned = true;
        let mut op = net("s1", replace(vec![]));
        op.version = Some(3);
        let statements = table.plan(&[op.clone(), NetOp { effect: Effect::Delete, ..op }]).expect("binds");
        let statements = &statements[1..];
        assert!(statements[0].sql.contains("t.kawka_version < d.v"), "{}", statements[0].sql);
        // A versioned delete keeps the version it knew in the key's tombstone.
        let delete = &statements[0].sql;
        assert!(delete.contains("DELETE FROM \"public\".\"inventory\""), "{delete}");
        assert!(delete.contains("INSERT INTO \"public\".\"inventory_kawka_deleted\""), "{delete}");
        assert!(delete.contains("GREATEST(d.v, gone.was)"), "{delete}");
        assert!(delete.contains("GREATEST(x.kawka_version, EXCLUDED.kawka_version)"), "{delete}");
        assert!(statements[1].sql.contains("kawka_version = EXCLUDED.kawka_version WHERE t.kawka_version IS NULL"));
        assert_eq!(statements[1].arrays.last(), Some(&ColumnArray::Int(vec![Some(3)])));
        assert!(table.create_table().contains("kawka_version bigint"));
        assert!(table.create_tombstones().contains("kawka_version bigint NOT NULL"));
        let stored = table.stored_versions(&statements[0].arrays[..2]);
        assert!(stored.contains("GREATEST(t.kawka_version, d.kawka_version)"), "{stored}");
        assert!(stored.contains("WITH ORDINALITY"), "{stored}");
    }
}
