//! A batch planned and written with its positions: each partition's share
//! in a transaction of its own, concurrently, or the whole batch in one.

use std::time::Duration;

use sqlx::{Postgres, Row};

use super::apply::bind;
use super::statements::{BindError, Statement};
use super::PostgresSink;
use crate::event::PartitionOffset;
use crate::projection::fold::{self, fold, Folded, GroupBy, NetOp};
use crate::projection::WriteOp;
use crate::sink::{succeeded_all, Follows, SinkError, StepDone, StepSignal, TxLocks};

/// A batch's statements, ready to run (see [`PostgresSink::plan`]).
#[derive(Debug)]
pub enum PostgresPlan {
    /// Each partition's share, in a transaction of its own.
    PerPartition(Vec<(PartitionOffset, Vec<Statement>)>),
    /// One transaction for all (a key has events from several partitions,
    /// or there is one partition).
    Whole(Vec<Statement>, Vec<PartitionOffset>),
    /// With a domain version: one transaction, whose statements are planned
    /// in it, once the versions stored for the batch's keys (in rows and
    /// tombstones) are read: the ops at or below them are stale and left
    /// out before folding, so the fold of the rest applies whole.
    /// (The ops are the batch's own, given to the write: not copied here.)
    Versioned(Vec<PartitionOffset>),
}

impl PostgresSink {
    /// Applies the ops of a batch, folded per key, and the positions: per
    /// partition, concurrently, when no key spans partitions.
    /// This is also how a failed batch is written again: a share that
    /// committed before is recognised before its statements run, so they
    /// are not tried twice (a check constraint could refuse the second
    /// application of a decrement that the first one made).
    pub async fn write(&self, ops: &[WriteOp], offsets: &[PartitionOffset]) -> Result<Vec<usize>, SinkError> {
        let plan = self.plan(ops, &fold::key_hashes(ops), offsets)?;
        self.write_plan(&plan, ops, &Follows::default(), None, true).await
    }

    /// Folds a batch's ops per key and builds its statements: CPU only, no
    /// I/O, so the pipeline does it while the batches before it are still
    /// being written, and the write itself is just the SQL. Every statement
    /// is planned before anything is written. `hashes` are the ops'
    /// [`fold::key_hashes`].
    pub fn plan(
        &self,
        ops: &[WriteOp],
        hashes: &[u64],
        offsets: &[PartitionOffset],
    ) -> Result<PostgresPlan, SinkError> {
        if self.table.versioned {
            // Folded once the stored versions are read: an op that fails to
            // fold here may be stale there (and then change nothing).
            return Ok(PostgresPlan::Versioned(offsets.to_vec()));
        }
        let folded = fold(ops, hashes, GroupBy::Key);
        if !folded.errors.is_empty() {
            return Err(SinkError::RejectedOps(folded.errors.into_iter().map(|e| (e.op, e.to_string())).collect()));
        }
        let net = folded.net;
        let rejected = |error: BindError| SinkError::Rejected(error.to_string());
        // The upserts expected to find new keys are planned straight into
        // their `COPY` text, built while the writes ahead run, not in this
        // batch's.
        let binary = self.binary_copy();
        let statements = |net: &[NetOp]| {
            self.table.plan_rendering(net, &|copy| self.new_keys.try_copy(copy), binary).map_err(rejected)
        };
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
        ops: &[WriteOp],
        follows: &Follows,
        ran: StepSignal,
    ) -> Result<Vec<usize>, SinkError> {
        // A batch's first write: nothing of it can have committed yet.
        self.write_plan(plan, ops, follows, Some(ran), false).await
    }

    /// [`PostgresSink::write_planned`]; with `retry`, each transaction
    /// first reads whether its positions are already there. `ran`, when
    /// dropped unsent (an early error), reads as not ran. Returns the ops
    /// (indexes into the batch) that were superseded: stale versions.
    async fn write_plan(
        &self,
        plan: &PostgresPlan,
        ops: &[WriteOp],
        follows: &Follows,
        ran: Option<StepSignal>,
        retry: bool,
    ) -> Result<Vec<usize>, SinkError> {
        succeeded_all(&follows.ran).await?;
        // A chained write's transactions each hold a lock that a write
        // waiting for it to commit can wait for in Postgres (see
        // `committed_before`). Written alone (again), nothing waits for it.
        let locks = ran.as_ref().map(|ran| ran.locks().clone());
        let locks = locks.as_ref();
        match plan {
            PostgresPlan::PerPartition(shares) => {
                // Each share commits as soon as it has run its statements
                // (and the writes it follows have committed), not once the
                // other shares have run theirs too: another writer of the
                // same rows (a replica) could wait in Postgres for a share
                // that had run while the next share waited for that writer,
                // a cycle Postgres cannot see, held until a timeout. Once
                // every share has run, the batch tells the writes that wait
                // for that. (The capacity lets every share report at once.)
                let (report, mut reports) = tokio::sync::mpsc::channel(shares.len().max(1));
                let writes = futures::future::join_all(shares.iter().map(|(offset, statements)| {
                    let report = report.clone();
                    async move {
                        let started = self.run_share(offset, statements, retry, locks).await;
                        // Read below until every share has reported.
                        let _ = report.send(started.is_ok()).await;
                        match started? {
                            Some(tx) => self.commit_share(tx, offset, &follows.committed).await,
                            None => Ok(()),
                        }
                    }
                }));
                drop(report);
                let all_ran = async {
                    let mut all = true;
                    while let Some(share_ran) = reports.recv().await {
                        all &= share_ran;
                    }
                    if let Some(ran) = ran {
                        ran.send(all);
                    }
                };
                let (results, ()) = futures::future::join(writes, all_ran).await;
                // Fenced first: the caller must stop, not retry.
                if results.iter().any(|r| matches!(r, Err(SinkError::Fenced))) {
                    return Err(SinkError::Fenced);
                }
                results.into_iter().collect::<Result<(), _>>().map(|()| Vec::new())
            }
            PostgresPlan::Whole(_, offsets) | PostgresPlan::Versioned(offsets) => {
                if matches!(plan, PostgresPlan::Versioned(..)) {
                    // The versions it reads must include those of the
                    // writes ahead of it (Postgres shows only committed
                    // rows): it starts once they have committed.
                    succeeded_all(&follows.committed).await?;
                }
                let mut tx = self.begin(locks).await?;
                if retry && !offsets.is_empty() && self.reached_all(&mut tx, offsets).await? {
                    return tx.rollback().await.map_err(SinkError::Postgres).map(|()| Vec::new());
                }
                let against_stored;
                let mut superseded = Vec::new();
                let statements: &[Statement] = match plan {
                    PostgresPlan::Versioned(_) => {
                        (against_stored, superseded) = self.plan_against_stored(&mut tx, ops).await?;
                        &against_stored
                    }
                    PostgresPlan::Whole(statements, _) => statements,
                    // Written share by share above.
                    PostgresPlan::PerPartition(_) => &[],
                };
                for statement in statements {
                    self.apply(&mut tx, statement).await?;
                }
                if let Some(ran) = ran {
                    ran.send(true);
                }
                // Dropping `tx` on an error rolls it back.
                self.committed_before(&mut tx, &follows.committed).await?;
                if self.advance(&mut tx, offsets).await? {
                    tx.commit().await.map_err(SinkError::Postgres).map(|()| superseded)
                } else {
                    tx.rollback().await.map_err(SinkError::Postgres).map(|()| Vec::new())
                }
            }
        }
    }

    /// The statements of a versioned batch, against what is stored: the
    /// ops whose version is at or below the one stored for their key (its
    /// row's, or its tombstone's when it was deleted) are stale and left
    /// out, so the fold of the others applies whole (see
    /// [`crate::projection::fold::NetOp::against`]). Also returns the ops
    /// left out, in the batch or against what is stored: superseded.
    pub(super) async fn plan_against_stored(
        &self,
        tx: &mut sqlx::PgConnection,
        ops: &[WriteOp],
    ) -> Result<(Vec<Statement>, Vec<usize>), SinkError> {
        let rejected = |error: BindError| SinkError::Rejected(error.to_string());
        let folded = fold(ops, &[], GroupBy::Key);
        if folded.net.is_empty() {
            return Ok((Vec::new(), folded.stale));
        }
        let every: Vec<usize> = (0..folded.net.len()).collect();
        let keys = self.table.key_arrays(&folded.net, &every).map_err(rejected)?;
        let stored: Vec<(i64, Option<i64>)> = bind(&self.table.stored_versions(&keys), &keys)
            .fetch_all(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(SinkError::Postgres)?;
        let mut floor: Vec<Option<i64>> = vec![None; folded.net.len()];
        for (ordinal, version) in stored {
            // Ordinals are 1-based positions in the key arrays.
            if let Some(slot) = usize::try_from(ordinal - 1).ok().and_then(|i| floor.get_mut(i)) {
                *slot = version;
            }
        }
        let is_stale = |(op, &net): (&WriteOp, &u32)| {
            net != Folded::FAILED
                && matches!((op.version, floor[net as usize]), (Some(mine), Some(stored)) if mine <= stored)
        };
        let (mut superseded, mut fresh, mut fresh_at) = (Vec::new(), Vec::new(), Vec::new());
        for (index, pair) in ops.iter().zip(&folded.members).enumerate() {
            if is_stale(pair) {
                superseded.push(index);
            } else {
                fresh.push(pair.0.clone());
                fresh_at.push(index);
            }
        }
        // The fold of what is not stale: its errors are the batch's (an op
        // that fails to fold is never left out silently).
        let refolded;
        let (net, errors, stale): (&[NetOp], Vec<(usize, String)>, Vec<usize>) = if superseded.is_empty() {
            let errors = folded.errors.iter().map(|e| (e.op, e.to_string())).collect();
            (&folded.net, errors, folded.stale.clone())
        } else {
            refolded = fold(&fresh, &[], GroupBy::Key);
            let errors = refolded.errors.iter().map(|e| (fresh_at[e.op], e.to_string())).collect();
            (&refolded.net, errors, refolded.stale.iter().map(|&at| fresh_at[at]).collect())
        };
        if !errors.is_empty() {
            return Err(SinkError::RejectedOps(errors));
        }
        superseded.extend(stale);
        superseded.sort_unstable();
        Ok((self.table.plan(net).map_err(rejected)?, superseded))
    }

    /// One partition's share: its transaction with the statements run, or
    /// `None` (rolled back) when its position is already at or past
    /// `offset`: it committed before.
    async fn run_share(
        &self,
        offset: &PartitionOffset,
        statements: &[Statement],
        retry: bool,
        locks: Option<&TxLocks>,
    ) -> Result<Option<sqlx::Transaction<'static, Postgres>>, SinkError> {
        let mut tx = self.begin(locks).await?;
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
        after: &[StepDone],
    ) -> Result<(), SinkError> {
        self.committed_before(&mut tx, after).await?;
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
}

/// How long a transaction that ran its statements waits in kawka for the
/// writes before it to commit before it waits for their transactions in
/// Postgres too (and again as often while it waits).
const HOLDING_CHECK: Duration = Duration::from_secs(1);

/// Takes a chained write's transaction's own advisory lock (`$1`, `$2`):
/// the two-key form, apart from the one-key lock `prepare` takes.
const TAKE_TX_LOCK: &str = "SELECT pg_advisory_xact_lock($1, $2)";

/// Waits until the transactions holding the advisory locks (`$1`, `$2`
/// pairwise) end: a lock nobody holds is taken at once.
const WAIT_FOR_TX_LOCKS: &str =
    "SELECT count(pg_advisory_xact_lock_shared(key, token)) FROM unnest($1::int4[], $2::int4[]) AS held(key, token)";

impl PostgresSink {
    /// Begins a transaction; a chained write's (`locks`) takes its own
    /// advisory lock, keyed as no other transaction of this sink has been,
    /// and publishes it. (In a statement of its own, not with the `BEGIN`:
    /// a failure there would leave the pooled connection inside an
    /// aborted transaction that sqlx does not roll back.)
    async fn begin(&self, locks: Option<&TxLocks>) -> Result<sqlx::Transaction<'static, Postgres>, SinkError> {
        let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
        if let Some(locks) = locks.filter(|_| self.waits_visibly()) {
            let (key, token) = self.next_tx_lock();
            sqlx::query(TAKE_TX_LOCK).bind(key).bind(token).execute(&mut *tx).await.map_err(SinkError::Postgres)?;
            locks.add((key, token));
        }
        Ok(tx)
    }

    /// Waits, holding `tx`'s rows, for the writes `after` to commit. That
    /// wait is in kawka, where Postgres cannot see it: if one of those
    /// writes (or one they wait for) waits in Postgres, through other
    /// transactions (another replica's), for these rows, Postgres's
    /// deadlock detector would find no cycle and no one would ever move.
    /// So after each [`HOLDING_CHECK`] of waiting this transaction also
    /// waits in Postgres for theirs to end (their advisory locks, see
    /// [`PostgresSink::begin`]): a wait Postgres sees, so it breaks such a
    /// cycle as any deadlock, failing one of its transactions (this one,
    /// or another writer's) with 40P01, to be written again. Where there is
    /// no cycle this only waits for what it waited for anyway, unless a
    /// write it waits for fails on its own while one that write waited for
    /// still runs: this one then waits for that one too, in Postgres,
    /// rather than fail at once.
    async fn committed_before(&self, tx: &mut sqlx::PgConnection, after: &[StepDone]) -> Result<(), SinkError> {
        if after.is_empty() {
            return Ok(());
        }
        let mut committed = std::pin::pin!(succeeded_all(after));
        let mut unbounded = false;
        loop {
            if let Ok(done) = tokio::time::timeout(HOLDING_CHECK, &mut committed).await {
                return done;
            }
            // Locks of transactions that began: one not begun yet holds
            // no rows, and is looked for again after the next wait.
            let locks = TxLocks::of_all(after);
            if locks.is_empty() || !self.waits_visibly() {
                continue;
            }
            // As long as it takes (bounded by the write's own timeout): a
            // role's `lock_timeout` or `statement_timeout` would fail a
            // write whose predecessor is merely slow.
            // (`SET LOCAL` holds to the end of the transaction: once.)
            if !unbounded {
                sqlx::query("SET LOCAL lock_timeout = 0").execute(&mut *tx).await.map_err(SinkError::Postgres)?;
                sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await.map_err(SinkError::Postgres)?;
                unbounded = true;
            }
            let (keys, tokens): (Vec<i32>, Vec<i32>) = locks.into_iter().unzip();
            sqlx::query(WAIT_FOR_TX_LOCKS)
                .bind(&keys)
                .bind(&tokens)
                .execute(&mut *tx)
                .await
                .map_err(SinkError::Postgres)?;
        }
    }
}

/// The net ops of a batch split by the partition of their events, each
/// share with its partition's position; `Err` gives `net` back when there
/// is one partition only, a key has events from several, or there are more
/// partitions than `connections`. The shares' transactions can all be open
/// at once (a share that ran holds its connection until the writes before
/// it have committed), so with more shares than the pool's connections the
/// first could hold its connection while the next waited for one, until
/// the pool timed out, on every retry.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::fold::Effect;
    use crate::value::Value;

    fn net(key: &str, partitions: &[i32]) -> NetOp<'static> {
        NetOp {
            key: vec![Value::from(key)].into(),
            effect: Effect::Delete,
            version: None,
            first_version: None,
            // Events of several partitions: none.
            partition: partitions.iter().all(|&p| p == partitions[0]).then(|| ("t", partitions[0])),
            first_offset: 0,
            last_offset: 0,
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
