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
//! first tries `COPY` of all its rows in a savepoint when the last
//! statement of its shape (its columns) found mostly new keys, otherwise
//! runs a plain `UPDATE … RETURNING` for the keys that exist and copies
//! the rest. A `COPY` that meets an existing key (a concurrent writer, a
//! wrong guess) is rolled back to its savepoint and the upsert runs
//! instead, so the effect is always the upsert's.
//!
//! * [`types`]: declared column types (pure).
//! * [`sql`]: statements and bound arrays (pure).

mod settings;
pub mod sql;
pub mod types;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgArguments, PgPoolOptions};
use sqlx::query::Query;
use sqlx::{Arguments, Executor, PgPool, Postgres, Row};

use super::SinkSettings;
use super::{succeeded_all, Claim, CommitSignal, Committed, Follows, PartitionOffset, SinkError};
use crate::projection::compact::{self, compact, NetOp};
use crate::projection::WriteOp;
use crate::value::{intern, name_position, Name};
pub use settings::{Column, PostgresConnection, PostgresTarget};
use sql::{ColumnArray, Insert, Statement, TableSql};
use types::ColumnType;

/// A batch's statements, ready to run (see [`PostgresSink::plan`]).
#[derive(Debug)]
pub enum PostgresPlan {
    /// Each partition's share, in a transaction of its own.
    PerPartition(Vec<(PartitionOffset, Vec<Statement>)>),
    /// One transaction for all (a key has events from several partitions,
    /// or there is one partition).
    Whole(Vec<Statement>, Vec<PartitionOffset>),
}

#[derive(Debug, Clone)]
pub struct PostgresSink {
    pool: PgPool,
    table: TableSql,
    connector: String,
    /// Per statement shape (its `COPY`): whether the last such upsert found
    /// mostly new keys, so the next one tries `COPY` of all its rows first.
    /// Per shape, since an event type that creates rows and one that
    /// changes them are written by different statements (one hint for
    /// both would flip at every batch). Shared by the clones.
    new_keys: Arc<Mutex<HashMap<String, bool>>>,
    /// The table's columns by interned name: every op's fields are checked
    /// against them, and op field names are interned too.
    columns: Arc<[(Name, ColumnType)]>,
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
            new_keys: Arc::default(),
            columns: target.columns.iter().map(|c| (intern(&c.name), c.ty)).collect(),
        }
    }

    /// Checks one op against the table before it joins a batch: key parts
    /// present, every field a column whose type can hold its value.
    pub fn check(&self, op: &WriteOp) -> Result<(), String> {
        let target = self.table.target();
        for (part, name) in op.key.iter().zip(&target.primary_key) {
            if part.is_null() {
                return Err(format!("key column `{name}` is null"));
            }
            self.check_column(name, part)?;
        }
        for (name, value) in &op.fields {
            self.check_column(name, value)?;
        }
        Ok(())
    }

    fn check_column(&self, name: &str, value: &crate::value::Value) -> Result<(), String> {
        match name_position(&self.columns, name).map(|at| &self.columns[at]) {
            Some((_, ty)) => sql::check_value(*ty, value).map_err(|message| format!("column `{name}`: {message}")),
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
        if self.table.target().create {
            tx.execute(self.table.create_table().as_str()).await.map_err(SinkError::Postgres)?;
        }
        tx.commit().await.map_err(SinkError::Postgres)
    }

    /// Takes ownership of partitions: bumps their epochs and returns the
    /// stored positions to start from.
    pub async fn claim(&self, partitions: &[(Name, i32)]) -> Result<Vec<Claim>, SinkError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| *t).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let rows = sqlx::query(&self.table.claim())
            .bind(&self.connector)
            .bind(&topics)
            .bind(&numbers)
            .fetch_all(&self.pool)
            .await
            .map_err(SinkError::Postgres)?;
        rows.iter()
            .map(|row| {
                Ok(Claim {
                    topic: intern(row.try_get::<&str, _>(0).map_err(SinkError::Postgres)?),
                    partition: row.try_get(1).map_err(SinkError::Postgres)?,
                    next_offset: row.try_get(2).map_err(SinkError::Postgres)?,
                    epoch: Some(row.try_get(3).map_err(SinkError::Postgres)?),
                })
            })
            .collect()
    }

    /// Whether these partitions still carry these epochs (no other owner,
    /// no rebuild cut-over or rollback moved them since the claim).
    pub async fn owns(&self, epochs: &[(Name, i32, i64)]) -> Result<bool, SinkError> {
        if epochs.is_empty() {
            return Ok(true);
        }
        let topics: Vec<&str> = epochs.iter().map(|e| e.0).collect();
        let partitions: Vec<i32> = epochs.iter().map(|e| e.1).collect();
        let values: Vec<i64> = epochs.iter().map(|e| e.2).collect();
        let held: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {t} AS o JOIN UNNEST($2::text[], $3::int[], $4::bigint[]) AS u(topic, partition, epoch) \
             ON o.topic = u.topic AND o.partition = u.partition AND o.epoch = u.epoch WHERE o.connector = $1",
            t = self.table.offsets_table
        ))
        .bind(&self.connector)
        .bind(&topics)
        .bind(&partitions)
        .bind(&values)
        .fetch_one(&self.pool)
        .await
        .map_err(SinkError::Postgres)?;
        Ok(held == epochs.len() as i64)
    }

    /// Applies the ops of a batch, folded per key, and the positions: per
    /// partition, concurrently, when no key spans partitions.
    /// This is also how a failed batch is written again: a share that
    /// committed before is recognised before its statements run, so they
    /// are not tried twice (a check constraint could refuse the second
    /// application of a decrement that the first one made).
    pub async fn write(&self, ops: &[WriteOp], offsets: &[PartitionOffset]) -> Result<(), SinkError> {
        let plan = self.plan(ops, &compact::key_hashes(ops), offsets)?;
        self.write_plan(&plan, &Follows::default(), None, true).await
    }

    /// Folds a batch's ops per key and builds its statements: CPU only, no
    /// I/O, so the pipeline does it while the batches before it are still
    /// being written, and the write itself is just the SQL. Every statement
    /// is planned before anything is written. `hashes` are the ops'
    /// [`compact::key_hashes`].
    pub fn plan(
        &self,
        ops: &[WriteOp],
        hashes: &[u64],
        offsets: &[PartitionOffset],
    ) -> Result<PostgresPlan, SinkError> {
        let (net, fold_errors) = compact::compact_hashed(ops, hashes);
        if !fold_errors.is_empty() {
            return Err(SinkError::RejectedOps(fold_errors.into_iter().map(|e| (e.op, e.to_string())).collect()));
        }
        let rejected = |error: sql::BindError| SinkError::Rejected(error.to_string());
        // The upserts expected to find new keys are planned straight into
        // their `COPY` text, built while the writes ahead run, not in this
        // batch's.
        let statements =
            |net: &[NetOp]| self.table.plan_rendering(net, &|copy| self.guess_new_keys(copy)).map_err(rejected);
        match by_partition(net, offsets, self.max_connections()) {
            Ok(shares) => {
                let shares = shares
                    .iter()
                    .map(|(offset, net)| Ok((**offset, statements(net)?)))
                    .collect::<Result<Vec<_>, SinkError>>()?;
                Ok(PostgresPlan::PerPartition(shares))
            }
            Err(net) => Ok(PostgresPlan::Whole(statements(&net)?, offsets.to_vec())),
        }
    }

    /// Writes a planned batch and its positions (see
    /// [`crate::sink::Sink::write_planned`]): statements once the writes
    /// in `follows.ran` ran theirs, then `ran`, then the commit once those
    /// in `follows.committed` have.
    ///
    /// Each transaction runs its statements first and moves its positions
    /// last, just before it commits: the positions' rows are what the
    /// transactions of one partition share, and a row lock taken first
    /// would hold a batch back until the one before it commits, where now
    /// the two overlap. Fencing still holds: the epoch is checked in the
    /// same statement, and a claim made while the statements run bumps it,
    /// so this transaction rolls back.
    pub async fn write_planned(
        &self,
        plan: &PostgresPlan,
        follows: &Follows,
        ran: CommitSignal,
    ) -> Result<(), SinkError> {
        // A batch's first write: nothing of it can have committed yet.
        self.write_plan(plan, follows, Some(ran), false).await
    }

    /// [`PostgresSink::write_planned`]; with `retry`, each transaction
    /// first reads whether its positions are already there. `ran`, when
    /// dropped unsent (an early error), reads as not ran.
    async fn write_plan(
        &self,
        plan: &PostgresPlan,
        follows: &Follows,
        ran: Option<CommitSignal>,
        retry: bool,
    ) -> Result<(), SinkError> {
        succeeded_all(&follows.ran).await?;
        match plan {
            PostgresPlan::PerPartition(shares) => {
                // Every share runs its statements, then the batch tells the
                // writes that wait for that, then each share commits.
                let started = futures::future::join_all(
                    shares.iter().map(|(offset, statements)| self.run_share(offset, statements, retry)),
                )
                .await;
                if let Some(ran) = ran {
                    ran.send(started.iter().all(Result::is_ok));
                }
                let results = futures::future::join_all(started.into_iter().zip(shares).map(
                    |(started, (offset, _))| async move {
                        match started? {
                            Some(tx) => self.commit_share(tx, offset, &follows.committed).await,
                            None => Ok(()),
                        }
                    },
                ))
                .await;
                // Fenced first: the caller must stop, not retry.
                if results.iter().any(|r| matches!(r, Err(SinkError::Fenced))) {
                    return Err(SinkError::Fenced);
                }
                results.into_iter().collect()
            }
            PostgresPlan::Whole(statements, offsets) => {
                let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
                if retry && !offsets.is_empty() && self.reached_all(&mut tx, offsets).await? {
                    return tx.rollback().await.map_err(SinkError::Postgres);
                }
                for statement in statements {
                    self.apply(&mut tx, statement).await?;
                }
                if let Some(ran) = ran {
                    ran.send(true);
                }
                // Dropping `tx` on an error rolls it back.
                succeeded_all(&follows.committed).await?;
                if self.advance(&mut tx, offsets).await? {
                    tx.commit().await.map_err(SinkError::Postgres)
                } else {
                    tx.rollback().await.map_err(SinkError::Postgres)
                }
            }
        }
    }

    /// One partition's share: its transaction with the statements run, or
    /// `None` (rolled back) when its position is already at or past
    /// `offset`: it committed before.
    async fn run_share(
        &self,
        offset: &PartitionOffset,
        statements: &[Statement],
        retry: bool,
    ) -> Result<Option<sqlx::Transaction<'static, Postgres>>, SinkError> {
        let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
        if retry && self.reached(&mut tx, offset).await? {
            tx.rollback().await.map_err(SinkError::Postgres)?;
            return Ok(None);
        }
        for statement in statements {
            self.apply(&mut tx, statement).await?;
        }
        Ok(Some(tx))
    }

    /// Moves a share's position and commits, once the writes `after` have.
    async fn commit_share(
        &self,
        mut tx: sqlx::Transaction<'static, Postgres>,
        offset: &PartitionOffset,
        after: &[Committed],
    ) -> Result<(), SinkError> {
        succeeded_all(after).await?;
        let moved = sqlx::query(&self.table.advance_one())
            .bind(&self.connector)
            .bind(offset.topic)
            .bind(offset.partition)
            .bind(offset.next_offset)
            .bind(offset.epoch)
            .execute(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?
            .rows_affected();
        if moved == 0 {
            let committed_before = self.reached(&mut tx, offset).await?;
            tx.rollback().await.map_err(SinkError::Postgres)?;
            return if committed_before { Ok(()) } else { Err(SinkError::Fenced) };
        }
        tx.commit().await.map_err(SinkError::Postgres)
    }

    /// Whether a partition's stored position is at or past `offset` under
    /// the same epoch: the batch ending there committed before.
    async fn reached(&self, tx: &mut sqlx::PgConnection, offset: &PartitionOffset) -> Result<bool, SinkError> {
        let stored: Option<(i64, Option<i64>)> = sqlx::query_as(&self.table.position_of())
            .bind(&self.connector)
            .bind(offset.topic)
            .bind(offset.partition)
            .fetch_optional(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?;
        Ok(matches!(stored, Some((epoch, Some(next))) if Some(epoch) == offset.epoch && next >= offset.next_offset))
    }

    /// Runs one statement; an upsert's new keys go in by `COPY`.
    async fn apply(&self, tx: &mut sqlx::PgConnection, statement: &Statement) -> Result<(), SinkError> {
        let Some(insert) = &statement.insert else { return execute(tx, &statement.sql, &statement.arrays).await };
        let everything = 0..statement.rows.len();
        if self.guess_new_keys(&insert.copy) {
            let rendered = match &insert.rendered {
                Some(rendered) => Cow::Borrowed(rendered.as_slice()),
                None => Cow::Owned(copy_text(&statement.arrays, insert, everything.clone())),
            };
            if self.copy_new(tx, insert, &rendered, true).await? {
                return Ok(());
            }
            self.found_new_keys(insert, false);
        }
        // Rows planned into `COPY` text alone are read back into arrays: the
        // text is this sink's own, so not reading is a bug, not bad data.
        let arrays = statement.bound_arrays().map_err(|error| {
            SinkError::Setup(format!("bug: the planned COPY text of {} does not read back: {error}", insert.copy))
        })?;
        let Some(update) = &insert.update else { return execute(tx, &statement.sql, &arrays).await };
        // One savepoint around the update and the copy: if the copy meets a
        // key after all (inserted since by another writer), both are undone
        // and the upsert runs, so no row is updated twice (adds!).
        tx.execute("SAVEPOINT kawka_write").await.map_err(SinkError::Postgres)?;
        // `array_agg` of no rows is null: no key exists.
        let updated: Option<Vec<i64>> = bind(update, &arrays)
            .fetch_one(&mut *tx)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(SinkError::Postgres)?;
        let updated = updated.unwrap_or_default();
        let mut exists = vec![false; statement.rows.len()];
        for ordinal in &updated {
            // Ordinals are 1-based positions in the bound arrays.
            if let Some(flag) = usize::try_from(*ordinal - 1).ok().and_then(|i| exists.get_mut(i)) {
                *flag = true;
            }
        }
        let new: Vec<usize> = everything.filter(|&row| !exists[row]).collect();
        self.found_new_keys(insert, new.len() > updated.len());
        if !new.is_empty() && !self.copy_new(tx, insert, &copy_text(&arrays, insert, new), false).await? {
            tx.execute("ROLLBACK TO SAVEPOINT kawka_write").await.map_err(SinkError::Postgres)?;
            execute(tx, &statement.sql, &arrays).await?;
        }
        tx.execute("RELEASE SAVEPOINT kawka_write").await.map_err(SinkError::Postgres)?;
        Ok(())
    }

    /// Whether an upsert of this shape should try `COPY` of all its rows
    /// (yes until one finds existing keys).
    fn guess_new_keys(&self, copy: &str) -> bool {
        let hints = self.new_keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        hints.get(copy).copied().unwrap_or(true)
    }

    fn found_new_keys(&self, insert: &Insert, mostly_new: bool) {
        let mut hints = self.new_keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match hints.get_mut(&insert.copy) {
            Some(hint) => *hint = mostly_new,
            None => {
                hints.insert(insert.copy.clone(), mostly_new);
            }
        }
    }

    /// `COPY` of `rows`: `false` when a key exists (unique violation), the
    /// copy undone. With `own_savepoint` it sets and settles its savepoint;
    /// otherwise the caller's encloses it and rolls back.
    async fn copy_new(
        &self,
        tx: &mut sqlx::PgConnection,
        insert: &Insert,
        data: &[u8],
        own_savepoint: bool,
    ) -> Result<bool, SinkError> {
        if own_savepoint {
            tx.execute("SAVEPOINT kawka_copy").await.map_err(SinkError::Postgres)?;
        }
        let copied = async {
            let mut copy = tx.copy_in_raw(&insert.copy).await?;
            copy.send(data).await?;
            copy.finish().await
        }
        .await;
        match copied {
            Ok(_) => {
                if own_savepoint {
                    tx.execute("RELEASE SAVEPOINT kawka_copy").await.map_err(SinkError::Postgres)?;
                }
                Ok(true)
            }
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                if own_savepoint {
                    tx.execute("ROLLBACK TO SAVEPOINT kawka_copy; RELEASE SAVEPOINT kawka_copy")
                        .await
                        .map_err(SinkError::Postgres)?;
                }
                Ok(false)
            }
            Err(error) => Err(SinkError::Postgres(error)),
        }
    }

    /// Moves the positions of one transaction's partitions: `false` when
    /// the batch committed before (every position already there; the
    /// caller rolls back), `Fenced` when another owner took one over.
    async fn advance(&self, tx: &mut sqlx::PgConnection, offsets: &[PartitionOffset]) -> Result<bool, SinkError> {
        if offsets.is_empty() {
            return Ok(true);
        }
        let topics: Vec<&str> = offsets.iter().map(|o| o.topic).collect();
        let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
        let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
        let epochs: Vec<Option<i64>> = offsets.iter().map(|o| o.epoch).collect();
        let updated = sqlx::query(&self.table.advance())
            .bind(&self.connector)
            .bind(&topics)
            .bind(&partitions)
            .bind(&next)
            .bind(&epochs)
            .execute(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?
            .rows_affected();
        if updated == offsets.len() as u64 {
            return Ok(true);
        }
        // A transaction moves all its positions or none: the batch committed
        // before if every one is already there (later batches may have
        // moved some further). Anything else means another owner.
        if updated == 0 && self.reached_all(tx, offsets).await? {
            return Ok(false);
        }
        Err(SinkError::Fenced)
    }

    /// Whether every one of these positions is already there ([`PostgresSink::reached`]).
    async fn reached_all(&self, tx: &mut sqlx::PgConnection, offsets: &[PartitionOffset]) -> Result<bool, SinkError> {
        for offset in offsets {
            if !self.reached(tx, offset).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Finds the ops the table refuses, each alone in a savepoint of one
    /// transaction that is then rolled back: nothing is written. Returns
    /// the index of each refused op and why.
    pub async fn find_rejected(&self, ops: &[WriteOp]) -> Result<Vec<(usize, String)>, SinkError> {
        let mut rejected = Vec::new();
        let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
        for (index, op) in ops.iter().enumerate() {
            let (net, errors) = compact(std::slice::from_ref(op));
            if let Some(error) = errors.first() {
                rejected.push((index, error.to_string()));
                continue;
            }
            let statements = match self.table.plan(&net) {
                Ok(statements) => statements,
                Err(error) => {
                    rejected.push((index, error.to_string()));
                    continue;
                }
            };
            tx.execute("SAVEPOINT kawka_op").await.map_err(SinkError::Postgres)?;
            for statement in &statements {
                if let Err(error) = bind(&statement.sql, &statement.arrays).execute(&mut *tx).await {
                    match crate::error::classify_sqlx(&error) {
                        crate::error::ErrorClass::Permanent => {
                            rejected.push((index, database_message(&error)));
                            tx.execute("ROLLBACK TO SAVEPOINT kawka_op").await.map_err(SinkError::Postgres)?;
                            break;
                        }
                        _ => return Err(SinkError::Postgres(error)),
                    }
                }
            }
        }
        tx.rollback().await.map_err(SinkError::Postgres)?;
        Ok(rejected)
    }
}

/// A pool of `max_connections` that gives up on a connection after 10 s.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new().max_connections(max_connections).acquire_timeout(Duration::from_secs(10))
}

/// The net ops of a batch split by the partition of their events, each
/// share with its partition's position; `Err` gives `net` back when there
/// is one partition only, a key has events from several, or there are more
/// partitions than `connections`. The shares' transactions are all open at
/// once (each commits only after every share ran), so with more shares
/// than the pool's connections the first would hold its connection while
/// the next waited for one, until the pool timed out, on every retry.
fn by_partition<'n, 'o>(
    net: Vec<NetOp<'n>>,
    offsets: &'o [PartitionOffset],
    connections: usize,
) -> Result<Vec<(&'o PartitionOffset, Vec<NetOp<'n>>)>, Vec<NetOp<'n>>> {
    if offsets.len() < 2 || offsets.len() > connections {
        return Err(net);
    }
    let share_of = |op: &NetOp| {
        let (topic, partition) = op.partition?;
        offsets.iter().position(|o| o.partition == partition && o.topic == topic)
    };
    let shares: Option<Vec<usize>> = net.iter().map(share_of).collect();
    let Some(shares) = shares else { return Err(net) };
    // Sized up front: net ops are large, and growing moved them again.
    let mut sizes = vec![0; offsets.len()];
    shares.iter().for_each(|&share| sizes[share] += 1);
    let mut split: Vec<(&PartitionOffset, Vec<NetOp>)> =
        offsets.iter().zip(sizes).map(|(o, size)| (o, Vec::with_capacity(size))).collect();
    for (op, share) in net.into_iter().zip(shares) {
        split[share].1.push(op);
    }
    Ok(split)
}

/// The `COPY` text of `rows` of an upsert's arrays.
fn copy_text(arrays: &[ColumnArray], insert: &Insert, rows: impl IntoIterator<Item = usize>) -> Vec<u8> {
    let rows = rows.into_iter();
    let mut data = sql::copy_buffer(rows.size_hint().0, arrays.len());
    sql::copy_rows(arrays, &insert.types, rows, &mut data);
    data
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

/// Runs a statement's SQL (for an upsert: `INSERT … ON CONFLICT`) with its arrays.
async fn execute(tx: &mut sqlx::PgConnection, sql: &str, arrays: &[ColumnArray]) -> Result<(), SinkError> {
    bind(sql, arrays).execute(&mut *tx).await.map(drop).map_err(SinkError::Postgres)
}

/// SQLSTATE of a unique violation: a `COPY` met an existing key.
const UNIQUE_VIOLATION: &str = "23505";

fn bind<'q>(sql: &'q str, arrays: &'q [ColumnArray]) -> Query<'q, Postgres, PgArguments> {
    let mut arguments = PgArguments::default();
    for array in arrays {
        // Adding an array of a supported type cannot fail; the error type
        // exists for encoders that can.
        let added = match array {
            ColumnArray::Int(values) => arguments.add(values),
            ColumnArray::Float(values) => arguments.add(values),
            ColumnArray::Bool(values) => arguments.add(values),
            ColumnArray::Bytes(values) => arguments.add(values),
            ColumnArray::Text(values) => arguments.add(values.iter().collect::<Vec<Option<&str>>>()),
        };
        debug_assert!(added.is_ok(), "binding an array of a built-in type");
    }
    sqlx::query_with(sql, arguments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::compact::Effect;
    use crate::value::Value;

    fn net(key: &str, partitions: &[i32]) -> NetOp<'static> {
        NetOp {
            key: vec![Value::from(key)].into(),
            effect: Effect::Delete,
            version: None,
            // Events of several partitions: none.
            partition: partitions.iter().all(|&p| p == partitions[0]).then(|| ("t", partitions[0])),
        }
    }

    fn offset(partition: i32) -> PartitionOffset {
        PartitionOffset { topic: "t", partition, next_offset: 10, epoch: Some(1) }
    }

    #[test]
    fn batches_split_by_partition_unless_a_key_spans_partitions() {
        let offsets = [offset(0), offset(1), offset(2)];
        let shares = by_partition(vec![net("a", &[0, 0]), net("b", &[1]), net("c", &[0])], &offsets, 3).expect("split");
        let keys: Vec<(i32, Vec<&Value>)> =
            shares.iter().map(|(o, ops)| (o.partition, ops.iter().map(|op| &op.key[0]).collect())).collect();
        assert_eq!(
            keys,
            vec![(0, vec![&Value::from("a"), &Value::from("c")]), (1, vec![&Value::from("b")]), (2, vec![])],
            "every partition of the batch gets its share, even an empty one (its position still moves)"
        );
        assert_eq!(by_partition(vec![net("a", &[0, 1])], &offsets, 3).expect_err("spans").len(), 1);
        assert!(by_partition(vec![net("a", &[0])], &offsets[..1], 3).is_err(), "one partition: one transaction");
        assert!(
            by_partition(vec![net("a", &[0]), net("b", &[1])], &offsets, 2).is_err(),
            "more partitions than connections: one transaction, not shares waiting for each other's connections"
        );
    }
}
