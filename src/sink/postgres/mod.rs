//! The Postgres sink: exactly-once effects.
//!
//! A partition's share of a batch is one transaction: its net ops, then its
//! position moves in `kawka_offsets` (fenced by the epoch this owner got
//! when it was assigned the partition; the row lock it takes makes a new
//! owner's claim wait for this commit). Since the position and the effects
//! commit together, and a newly assigned consumer starts at the stored
//! positions, every event's effect lands once, increments included.
//!
//! The partitions of a batch are written concurrently, on separate
//! connections (one backend is the bottleneck otherwise), and so are
//! consecutive batches of one partition: a batch's transaction runs its
//! statements while the one before it is still in flight, and moves its
//! position and commits only once that one has committed (a batch that
//! follows a failed one rolls back). A partition's transaction only moves
//! its position forward: when a retried batch finds it already there, that
//! share committed before and is rolled back, so a batch that failed
//! half-way is retried without applying anything twice. A batch in which
//! one key has events from several partitions is written in one
//! transaction instead (its compacted op cannot be split).
//!
//! Upserts of keys the table does not have yet are written with `COPY`
//! (several times the rate of `INSERT … ON CONFLICT`): each upsert statement
//! first tries `COPY` of all its rows in a savepoint, unless a recent
//! statement of its shape (its columns) met existing keys (then one in 8
//! tries it), and otherwise runs the upsert. A `COPY` that meets an
//! existing key (a concurrent writer, a wrong guess) is rolled back to its
//! savepoint and the upsert runs instead, so the effect is always the
//! upsert's. Either touches the rows in one pass in the order of their
//! keys, so writers of the same rows queue instead of deadlocking. The
//! `COPY` is binary when every value of the statement has a binary form
//! equal to its text (`binary.rs`), text otherwise.
//!
//! * `mod.rs`: the sink: its pool, its tables' setup, and ops checked before batching.
//! * `write.rs`: a batch planned and written, per partition or whole, with its positions.
//! * `apply.rs`: one statement run: an upsert's rows by `COPY` while its keys are new, else by the upsert.
//! * `positions.rs`: claims, ownership and position moves in `kawka_offsets`.
//! * `parked.rs`: parked keys (`on_error: park`) in `kawka_parked`, changed with a replay's writes.
//! * `rejected.rs`: the ops a table refuses, found in savepoints that are rolled back.
//! * `types.rs`: declared column types (pure).
//! * `table.rs`: a table's names, its `CREATE TABLE` and the SQL of its positions (pure).
//! * `statements.rs`: the statements that apply net ops: deletes and upserts with their `COPY` (pure).
//! * `bind.rs`: a statement's rows filled from the net ops, as arrays or as `COPY` data (pure).
//! * `arrays.rs`: the typed arrays a statement binds, one per column (pure).
//! * `coerce.rs`: values converted for a column's type, dates and timestamps included (pure).
//! * `copy.rs`: `COPY` text written from arrays or from ops, and read back into arrays (pure).
//! * `binary.rs`: binary `COPY` data written from ops where it equals the text, and read back into arrays (pure).
//! * `fixtures.rs`: tables and net ops the unit tests share (tests only).

mod apply;
mod arrays;
mod binary;
mod bind;
mod coerce;
mod copy;
#[cfg(test)]
mod fixtures;
mod parked;
mod positions;
mod rejected;
mod settings;
mod statements;
mod table;
pub mod types;
mod write;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};

use super::{CheckPlan, SinkError, SinkSettings};
use crate::projection::{OpShape, WriteOp};
use crate::value::{intern, name_position, Kinds, Name};
pub use coerce::format_millis;
pub use copy::copy_rows;
pub use settings::{Column, PostgresConnection, PostgresTarget};
pub use table::{quote, TableSql};
use types::ColumnType;
pub use write::PostgresPlan;

#[derive(Debug, Clone)]
pub struct PostgresSink {
    pool: PgPool,
    table: TableSql,
    connector: String,
    /// Whether the connector parks keys (`kawka_parked` is created).
    parks: bool,
    /// Whether upserts try `COPY` first, per shape. Shared by the clones.
    new_keys: Arc<apply::CopyGuesses>,
    /// The table's columns by interned name: every op's fields are checked
    /// against them, and op field names are interned too.
    columns: Arc<[(Name, ColumnType)]>,
    /// The primary key's columns and their types, in key order (`None`:
    /// not a column of the table): looked up once, not per op.
    key_columns: Arc<[(Name, Option<ColumnType>)]>,
    /// Whether the server has advisory locks (probed by `prepare`): a
    /// chained write's transactions hold one, so that a write waiting for
    /// it to commit can wait in Postgres too, where a cycle through that
    /// wait is a deadlock Postgres breaks. Postgres-compatible servers may
    /// lack them. Shared by the clones.
    waits_visibly: Arc<std::sync::atomic::AtomicBool>,
    /// Whether `COPY` may go in binary: every column of the table has, in
    /// the database, the type the connector declares (probed by
    /// `prepare`; text until then). Binary data is read with the table's
    /// own types, where text goes through each type's input function: a
    /// `bigint` value's bytes in a `numeric` column would read as another
    /// number. Shared by the clones.
    binary_copy: Arc<std::sync::atomic::AtomicBool>,
    /// The advisory locks a chained write's transactions take: the first
    /// key, random, so replicas' locks do not meet, and the second of the
    /// next one (from a random start too). Shared by the clones.
    tx_locks: (i32, Arc<std::sync::atomic::AtomicI32>),
}

impl PostgresSink {
    /// A sink with a lazy pool: nothing is reached until the first use.
    pub fn new(
        connection: &PostgresConnection,
        connector: &SinkSettings,
        target: &PostgresTarget,
    ) -> Result<PostgresSink, SinkError> {
        let pool = pool_options(connection.max_connections)
            .connect_lazy(connection.url.expose())
            .map_err(SinkError::Postgres)?;
        Ok(PostgresSink::with_pool(pool, connector, target))
    }

    /// A sink for another connector's table (a rebuild writes beside the
    /// live connector) on a lazy pool of its own, with this one's server
    /// and size. Not on this sink's pool: each pipeline keeps its writes'
    /// connections within its pool's size, but two pipelines on one pool
    /// could each hold part of it while their writes of several partitions
    /// (whose transactions stay open until all have run) waited for the
    /// rest, until the pool timed out.
    pub fn beside(&self, connector: &SinkSettings, target: &PostgresTarget) -> PostgresSink {
        let pool = pool_options(self.pool.options().get_max_connections())
            .connect_lazy_with(self.pool.connect_options().as_ref().clone());
        PostgresSink::with_pool(pool, connector, target)
    }

    fn with_pool(pool: PgPool, connector: &SinkSettings, target: &PostgresTarget) -> PostgresSink {
        PostgresSink {
            pool,
            table: TableSql::new(target, connector.versioned),
            connector: connector.name.clone(),
            parks: connector.parks,
            new_keys: Arc::default(),
            waits_visibly: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            binary_copy: Arc::default(),
            tx_locks: (random_key(), Arc::new(std::sync::atomic::AtomicI32::new(random_key()))),
            columns: target.columns.iter().map(|c| (intern(&c.name), c.ty)).collect(),
            key_columns: target
                .primary_key
                .iter()
                .map(|name| (intern(name), target.columns.iter().find(|c| c.name == *name).map(|c| c.ty)))
                .collect(),
        }
    }

    /// Checks one op against the table before it joins a batch: key parts
    /// present, every field a column whose type can hold its value.
    pub fn check(&self, op: &WriteOp) -> Result<(), String> {
        for (part, (name, ty)) in op.key.iter().zip(self.key_columns.iter()) {
            if part.is_null() {
                return Err(format!("key column `{name}` is null"));
            }
            self.check_typed(name, *ty, part)?;
        }
        // Ops of one rule name their fields in one order, often the
        // table's: each field is looked for first where the one before it
        // was found, plus one (one compare instead of a search per field).
        // The guess finds what the search would, as a table's column names
        // are unique (a connector file cannot repeat a key of `columns:`).
        let mut next = 0;
        for (name, value) in &op.fields {
            let at = match self.columns.get(next) {
                Some((column, _)) if std::ptr::eq(*column, *name) => Some(next),
                _ => name_position(&self.columns, name),
            };
            next = at.map_or(0, |at| at + 1);
            self.check_typed(name, at.map(|at| self.columns[at].1), value)?;
        }
        Ok(())
    }

    /// [`crate::sink::Sink::check_plan`]: a key part or field needs no
    /// look when its column's type takes every value its kinds can be.
    pub fn check_plan(&self, shape: &OpShape) -> CheckPlan {
        let key_passes = shape.key.iter().zip(self.key_columns.iter()).all(|(kinds, (_, ty))| {
            // A null key part is an error whatever the column.
            ty.is_some_and(|ty| kinds.within(coerce::always_fits(ty).without(Kinds::NULL)))
        });
        if !key_passes {
            return CheckPlan::Whole;
        }
        let checked = shape.fields.iter().enumerate().filter_map(|(at, (name, kinds))| {
            let ty = name_position(&self.columns, name).map(|column| self.columns[column].1);
            let passes = ty.is_some_and(|ty| kinds.within(coerce::always_fits(ty)));
            (!passes).then_some(at)
        });
        CheckPlan::Fields { key: shape.key.len(), fields: shape.fields.len(), checked: checked.collect() }
    }

    /// [`PostgresSink::check`] of only the fields at `checked` of `op`,
    /// in their order (see [`PostgresSink::check_plan`]).
    pub fn check_fields(&self, op: &WriteOp, checked: &[usize]) -> Result<(), String> {
        for (name, value) in checked.iter().filter_map(|&at| op.fields.get(at)) {
            let ty = name_position(&self.columns, name).map(|column| self.columns[column].1);
            self.check_typed(name, ty, value)?;
        }
        Ok(())
    }

    #[inline]
    fn check_typed(&self, name: &str, ty: Option<ColumnType>, value: &crate::value::Value) -> Result<(), String> {
        match ty {
            Some(ty) => coerce::check_value(ty, value).map_err(|message| format!("column `{name}`: {message}")),
            None => Err(format!("column `{name}` is not in table {}", self.table.target().table)),
        }
    }

    pub fn table(&self) -> &TableSql {
        &self.table
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The most connections this sink's writes hold at once: its pool's size.
    pub fn max_connections(&self) -> usize {
        self.pool.options().get_max_connections().max(1) as usize
    }

    /// Creates the positions table, and the read-model table when the
    /// connector asks for it. Concurrent daemons serialize on an advisory
    /// lock: `CREATE TABLE IF NOT EXISTS` alone races on the type catalog.
    pub async fn prepare(&self) -> Result<(), SinkError> {
        let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
        tx.execute("SELECT pg_advisory_xact_lock(7306073)").await.map_err(SinkError::Postgres)?;
        tx.execute(self.table.create_offsets_table().as_str()).await.map_err(SinkError::Postgres)?;
        if self.parks {
            tx.execute(self.create_parked_table().as_str()).await.map_err(SinkError::Postgres)?;
        }
        if self.table.target().create {
            tx.execute(self.table.create_table().as_str()).await.map_err(SinkError::Postgres)?;
        }
        if self.table.versioned {
            tx.execute(self.table.create_tombstones().as_str()).await.map_err(SinkError::Postgres)?;
            sqlx::query(&self.table.expire_tombstones())
                .bind(self.table.target().tombstone_retention.as_secs_f64())
                .execute(&mut *tx)
                .await
                .map_err(SinkError::Postgres)?;
        }
        tx.commit().await.map_err(SinkError::Postgres)?;
        // Text `COPY` is right whatever the answer, binary only for the
        // declared types: a server that cannot say (a Postgres-compatible
        // one without `pg_attribute`) gets text.
        let types = sqlx::query_as::<_, (String, String)>(
            "SELECT attname::text, atttypid::regtype::text FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        )
        .bind(&self.table.qualified)
        .fetch_all(&self.pool)
        .await;
        let as_declared = match types {
            Ok(types) if self.table.types_as_declared(&types) => true,
            Ok(_) => {
                tracing::info!(connector = %self.connector, table = %self.table.qualified,
                    "the table's column types are not the connector's: new keys go in by text COPY");
                false
            }
            Err(error) => {
                tracing::warn!(connector = %self.connector, error = %database_message(&error),
                    "the table's column types could not be read: new keys go in by text COPY");
                false
            }
        };
        self.binary_copy.store(as_declared, std::sync::atomic::Ordering::Relaxed);
        // On a connection of its own: a refusal aborts its transaction. (A
        // lock of its own statement only, never waited for.)
        let probe = sqlx::query("SELECT pg_try_advisory_xact_lock_shared(0, 0)").execute(&self.pool).await;
        let has = match probe {
            Ok(_) => true,
            Err(error) => {
                // Only "no such function" or "not supported" say the server
                // lacks them; anything else is this attempt's.
                let code = error.as_database_error().and_then(|e| e.code());
                if !code.is_some_and(|c| c == "42883" || c == "0A000") {
                    return Err(SinkError::Postgres(error));
                }
                tracing::warn!(connector = %self.connector, error = %database_message(&error),
                    "the server has no advisory locks: a batch waiting for the one before it to commit \
                     waits where the server cannot see it, and a cycle through that wait with another \
                     writer holds until the idle-in-transaction timeout");
                false
            }
        };
        self.waits_visibly.store(has, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether a write waiting for the one before it can wait in Postgres.
    pub(super) fn binary_copy(&self) -> bool {
        self.binary_copy.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn waits_visibly(&self) -> bool {
        self.waits_visibly.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The keys of an advisory lock no other transaction of this sink has
    /// had (the second wraps after 2^32 transactions, long after those
    /// ended).
    pub(super) fn next_tx_lock(&self) -> (i32, i32) {
        (self.tx_locks.0, self.tx_locks.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// A key no other sink (in this process or another) is likely to draw:
/// the standard library's per-process random hash keys.
fn random_key() -> i32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    // Truncated on purpose: any 32 bits of the hash.
    hasher.finish() as i32
}

/// The server-side bound every connection of a sink asks for: a client
/// that vanished inside a transaction (killed, its network cut) releases
/// its row locks after this long instead of holding them until TCP
/// notices. (The other way round, writes are bounded by
/// [`super::WRITE_TIMEOUT`].) Set after connecting, not as a startup
/// parameter, which poolers such as PgBouncer refuse; a server or pooler
/// that refuses the `SET` too leaves the connection as it is.
const IDLE_IN_TRANSACTION: &str = "SET idle_in_transaction_session_timeout = '120s'";

/// A pool of `max_connections` that gives up on a connection after 10 s.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10)).after_connect(
        |connection, _| {
            Box::pin(async move {
                if let Err(error) = connection.execute(IDLE_IN_TRANSACTION).await {
                    tracing::debug!(%error, "idle_in_transaction_session_timeout not set");
                }
                Ok(())
            })
        },
    )
}

/// The message of a database error without sqlx's prefix.
pub fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{every_column_type, sample_values};
    use super::*;
    use crate::event::Position;
    use crate::projection::{OpKind, WriteOp};
    use crate::value::{Kinds, Value};

    /// A sink (on a pool that reaches nothing) for a table keyed by `id` of
    /// type `key`, with a column `c<i>` of each of [`every_column_type`].
    fn sink_of_every_type(key: ColumnType) -> (PostgresSink, Vec<Column>) {
        let columns: Vec<Column> = std::iter::once(Column { name: "id".into(), ty: key })
            .chain(every_column_type().iter().enumerate().map(|(i, &ty)| Column { name: format!("c{i}"), ty }))
            .collect();
        let target = PostgresTarget {
            schema: "public".into(),
            table: "checked".into(),
            columns: columns.clone(),
            primary_key: vec!["id".into()],
            create: false,
            fillfactor: None,
            tombstone_retention: std::time::Duration::from_secs(60),
        };
        let settings = SinkSettings {
            name: "checked".into(),
            connection: "db".into(),
            target: crate::sink::settings::Target::Postgres(target.clone()),
            versioned: false,
            parks: false,
        };
        let pool = pool_options(1).connect_lazy("postgres://127.0.0.1/none").expect("a lazy pool reaches nothing");
        let sink = PostgresSink::with_pool(pool, &settings, &target);
        (sink, columns)
    }

    /// The check planned for a shape of op answers, on every op of that
    /// shape, what the whole check answers: random shapes (kinds of key
    /// parts and fields, unknown columns, any kind), random key column
    /// types and values of the shape's kinds, the edges among them, and
    /// ops of another size than their shape.
    #[tokio::test]
    async fn a_planned_check_answers_as_the_whole_check() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = std::env::var("KAWKA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let types = every_column_type();
        let mut values = sample_values();
        values.extend([
            Value::Map(vec![("a".into(), Value::Int(1))]),
            Value::Record(crate::value::Record::new()),
            Value::Float(1e300),
            Value::Str("not a number".into()),
            Value::Time(crate::value::Temporal::new(crate::value::TimeKind::TimeOfDay(crate::value::Unit::Micros), 5)),
        ]);
        let kinds = [
            Kinds::NULL,
            Kinds::BOOL,
            Kinds::INT,
            Kinds::FLOAT,
            Kinds::STR,
            Kinds::BYTES,
            Kinds::ARRAY,
            Kinds::MAP,
            Kinds::RECORD,
            Kinds::TIME,
        ];
        // Kinds most columns take half of the time, so that plans skip
        // fields and ops pass; any kinds the rest of it.
        let some_kinds = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..16) {
            0..4 => Kinds::STR,
            4..6 => Kinds::INT,
            6..8 => Kinds::STR.or(Kinds::NULL),
            8 => Kinds::ANY,
            9 => kinds[rng.random_range(0..kinds.len())].or(Kinds::NULL),
            10 => kinds[rng.random_range(0..kinds.len())].or(kinds[rng.random_range(0..kinds.len())]),
            _ => kinds[rng.random_range(0..kinds.len())],
        };
        let pick = |rng: &mut rand::rngs::StdRng, kinds: Kinds| {
            let of: Vec<&Value> = values.iter().filter(|v| Kinds::of(v).within(kinds)).collect();
            of[rng.random_range(0..of.len())].clone()
        };
        let (mut skipped, mut failed, mut agreed) = (0, 0, 0);
        for _ in 0..600 {
            let key_type =
                if rng.random_bool(0.5) { ColumnType::Text } else { types[rng.random_range(0..types.len())] };
            let (sink, columns) = sink_of_every_type(key_type);
            let sink = crate::sink::Sink::Postgres(sink);
            let key = vec![some_kinds(&mut rng).without(Kinds::NULL)].into_iter().filter(|k| *k != Kinds::NONE);
            let key: Vec<Kinds> = key.collect();
            let fields: Vec<(Name, Kinds)> = (0..rng.random_range(0..5))
                .map(|_| {
                    let name = match rng.random_range(0..10) {
                        0 => "not_a_column",
                        _ => intern(&columns[rng.random_range(0..columns.len())].name),
                    };
                    (name, some_kinds(&mut rng))
                })
                .collect();
            let shape = OpShape { key, fields };
            let plan = sink.check_plan(&shape);
            if let CheckPlan::Fields { checked, .. } = &plan {
                skipped += usize::from(checked.len() < shape.fields.len());
            }
            for _ in 0..10 {
                let mut op = WriteOp {
                    key: shape.key.iter().map(|kinds| pick(&mut rng, *kinds)).collect(),
                    kind: OpKind::Upsert,
                    fields: shape.fields.iter().map(|(name, kinds)| (*name, pick(&mut rng, *kinds))).collect(),
                    version: None,
                    position: Position { topic: "t", partition: 0, offset: 0 },
                };
                if rng.random_ratio(1, 20) {
                    op.fields.push(("c0", values[rng.random_range(0..values.len())].clone()));
                }
                let whole = sink.check(&op);
                assert_eq!(sink.check_as(&op, &plan), whole, "seed {seed}: {op:?} under {plan:?}");
                failed += usize::from(whole.is_err());
                agreed += 1;
            }
        }
        eprintln!("{skipped} plans skip, {failed} of {agreed} fail");
        assert!(
            skipped > 100 && failed > 500 && agreed - failed > 500,
            "{skipped} plans skip, {failed} of {agreed} fail"
        );
    }

    /// An op of the benchmark's orders (text, integers, a boolean, an
    /// integer in a `timestamptz`) needs no look; a field whose kinds do
    /// not settle it (a float in a `timestamptz`, a column not in the
    /// table) is looked at, and a key of a kind its column may refuse
    /// makes the whole op looked at.
    #[tokio::test]
    async fn only_fields_of_unsettled_kinds_are_checked() {
        let (sink, columns) = sink_of_every_type(ColumnType::Text);
        let column =
            |ty: ColumnType| intern(&columns[1..].iter().find(|c| c.ty == ty).expect("a column of each type").name);
        let shape = OpShape {
            key: vec![Kinds::STR],
            fields: vec![
                (column(ColumnType::Text), Kinds::STR),
                (column(ColumnType::BigInt), Kinds::INT),
                (column(ColumnType::Boolean), Kinds::BOOL.or(Kinds::NULL)),
                (column(ColumnType::TimestampTz), Kinds::INT),
                (column(ColumnType::TimestampTz), Kinds::INT.or(Kinds::FLOAT)),
                (column(ColumnType::Double), Kinds::FLOAT.or(Kinds::INT)),
                ("not_a_column", Kinds::NULL),
            ],
        };
        assert_eq!(sink.check_plan(&shape), CheckPlan::Fields { key: 1, fields: 7, checked: [4, 6].into() });
        let keyed_by_int = OpShape { key: vec![Kinds::STR], fields: vec![] };
        assert_eq!(sink_of_every_type(ColumnType::BigInt).0.check_plan(&keyed_by_int), CheckPlan::Whole);
    }

    /// Random ops against a reference that looks each field up by its
    /// text: fields in the table's order, shuffled, repeated, unknown, or
    /// named by a string that is not the interned one; values that fit
    /// their column or not, anywhere in the op.
    #[tokio::test]
    async fn a_check_finds_each_fields_column_wherever_it_is() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        // A text key, which the op's key (`"k"`) always fits.
        let (sink, columns) = sink_of_every_type(ColumnType::Text);
        let values = sample_values();
        let reference = |op: &WriteOp| -> Result<(), String> {
            for (name, value) in &op.fields {
                match columns.iter().find(|c| c.name == *name) {
                    Some(column) => coerce::check_value(column.ty, value)
                        .map_err(|message| format!("column `{name}`: {message}"))?,
                    None => return Err(format!("column `{name}` is not in table checked")),
                }
            }
            Ok(())
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xc4ec);
        let (mut failed, mut passed) = (0, 0);
        for _ in 0..5_000 {
            let mut names: Vec<Name> = columns.iter().map(|c| intern(&c.name)).collect();
            if rng.random_bool(0.5) {
                names.shuffle(&mut rng);
            }
            names.truncate(rng.random_range(0..=names.len()));
            if rng.random_ratio(1, 4) {
                // A name equal to a column's but at another address.
                let at = rng.random_range(0..=names.len());
                let column = &columns[rng.random_range(0..columns.len())].name;
                let text: &'static str = Box::leak(column.clone().into_boxed_str());
                names.insert(at, text);
            }
            if rng.random_ratio(1, 8) {
                names.insert(rng.random_range(0..=names.len()), "not_a_column");
            }
            // Mostly values that fit, so that a failure can come late in the op.
            let fields = names
                .into_iter()
                .map(|name| {
                    let value = if rng.random_ratio(1, 6) {
                        values[rng.random_range(0..values.len())].clone()
                    } else {
                        Value::Null
                    };
                    (name, value)
                })
                .collect();
            let op = WriteOp {
                key: vec![Value::from("k")].into(),
                kind: OpKind::Upsert,
                fields,
                version: None,
                position: Position { topic: "t", partition: 0, offset: 0 },
            };
            let checked = sink.check(&op);
            assert_eq!(checked, reference(&op), "{op:?}");
            if checked.is_err() {
                failed += 1
            } else {
                passed += 1
            }
        }
        assert!(failed > 1_000 && passed > 1_000, "{failed} failed, {passed} passed");
    }
}
