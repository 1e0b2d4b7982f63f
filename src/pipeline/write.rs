//! Writing the pending batch: at once with retries (a flush), or handed to
//! a background write (a pipelined flush), and the writes in flight settled
//! in the order their batches were cut.

use std::time::Duration;

use tokio::time::Instant;

use super::batch::Pending;
use super::in_flight::{follows, sorted, InFlightWrite, WriteDone, CHAIN_DEPTH};
use super::worker::Worker;
use super::Halt;
use crate::error::ErrorClass;
use crate::error::Failure;
use crate::event::PartitionOffset;
use crate::projection::fold;
use crate::sink::{Plan, SinkError, StepDone, TxLocks, Written};
use crate::status::Outcome;
use crate::value::{same_name, Name};

/// How long a shutdown waits for an unreachable sink before abandoning the
/// in-flight batch (its events are consumed again on the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Worker<'_> {
    /// Makes everything so far durable: the batches in flight, then the
    /// pending one.
    pub(super) async fn flush(&mut self) -> Result<(), Halt> {
        let parked_before = self.parking.changes();
        self.settle().await?;
        let written = self.write_pending().await;
        if self.parking.changes() != parked_before {
            // A key parked here may have a record on its way already,
            // admitted while the key was free (a flush while a record's
            // decode waits for the registry): whatever joins the batch
            // next is held again before it is written.
            self.parking.dirty = true;
        }
        written
    }

    /// Hands the pending batch to a background write and goes on
    /// collecting the next one (decode and project overlap the sink's
    /// work). Batches are written concurrently, up to the connections the
    /// sink has: those of other partitions with no key in common freely;
    /// when the sink chains writes, also those of the same partition (each
    /// commits only after the one before it; the source hands records over
    /// in long runs of one partition, so that is where the overlap is) and
    /// those sharing a key (statements after the other's, see [`follows`]:
    /// the worker goes on decoding instead of waiting). Otherwise a batch
    /// waits for every write in flight it shares a partition or a key with.
    pub(super) async fn flush_pipelined(&mut self) -> Result<(), Halt> {
        let offsets = self.pending.offsets(&self.epochs);
        self.runtime.status.handed(&offsets);
        let partitions: Vec<(Name, i32)> = offsets.iter().map(|o| (o.topic, o.partition)).collect();
        let capabilities = self.runtime.sink.capabilities();
        let (most, chains) = (capabilities.concurrent_writes, capabilities.chains_writes);
        let parked_before = self.parking.changes();
        // Each key hashed once, for the fold and for the writes in flight.
        let hashes = fold::key_hashes(&self.pending.ops);
        let mut keys = if most > 1 { sorted(&hashes) } else { Vec::new() };
        // Planned (folded, SQL built) before waiting for the writes ahead:
        // the planning overlaps them, and the write is only I/O. A batch
        // that fails to plan is written, and fails, in its task, so its
        // error takes the settling path of any failed write.
        let mut plan = self.runtime.sink.plan(&self.pending.ops, &hashes, &offsets);
        let mut connections = plan.as_ref().map_or(1, Plan::connections);
        while let Some(index) = self.in_flight.iter().position(|write| write.blocks(&partitions, &keys, chains)) {
            self.settle_through(index).await?;
        }
        // A batch follows at most one write of its partitions: one batch
        // committing while the next runs its statements keeps the sink
        // busy, and each batch held in flight is memory.
        while self.in_flight.iter().filter(|write| write.shares_partition(&partitions)).count() >= CHAIN_DEPTH {
            let oldest = self.in_flight.iter().position(|write| write.shares_partition(&partitions));
            self.settle_through(oldest.expect("counted at least one such write")).await?;
        }
        // A write that follows another holds its connections while it
        // waits: with connections for every write in flight, the one it
        // waits for never waits for a connection itself.
        while !self.in_flight.is_empty()
            && self.in_flight.iter().map(|write| write.connections).sum::<usize>() + connections > most
        {
            self.settle_oldest().await?;
        }
        // A write that failed was written again as it settled (above or
        // earlier), or failed and waits to be; the writes in flight that
        // follow it fail too (they roll back, to be written again as they
        // settle). A batch following one of them would fail in turn, and
        // so would every batch after it, each written twice for as long as
        // batches keep coming.
        if self.behind_a_failure || self.in_flight.iter().any(|write| write.committed.failed()) {
            self.settle().await?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.parking.dirty || self.parking.changes() != parked_before {
            // Settling parked a key: its events in the writes behind and
            // in this batch are held first, in order; the plan made before
            // is of ops this batch may no longer have. (Its records, and so
            // its positions, are the same.)
            self.parking.dirty = true;
            self.catch_up_parking().await?;
            let hashes = fold::key_hashes(&self.pending.ops);
            keys = if most > 1 { sorted(&hashes) } else { Vec::new() };
            plan = self.runtime.sink.plan(&self.pending.ops, &hashes, &offsets);
            // Nothing is in flight after catching up: any share fits.
            connections = plan.as_ref().map_or(1, Plan::connections);
            if self.pending.is_empty() {
                return Ok(());
            }
        }
        let follows = follows(&self.in_flight, &partitions, &keys);
        // The locks of the write's transactions, and of the writes it
        // waits for, for the writes that will wait for it (see [`TxLocks`]).
        let locks = TxLocks::waiting_for(&follows.committed);
        let (ran_signal, ran) = StepDone::channel_of(locks.clone());
        let (signal, committed) = StepDone::channel_of(locks);
        // (Settling a failed write rewrites it through `pending` and puts
        // this batch back as it was, so `offsets` and `plan` still hold,
        // unless it halts: then this batch is dropped, unwritten.)
        let next = self.pending.empty_like();
        let batch = std::mem::replace(&mut self.pending, next);
        let sink = self.runtime.sink.clone();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = match plan {
                Ok(plan) => sink.write_planned(&plan, &batch.ops, &follows, ran_signal).await,
                Err(error) => Err(error),
            };
            signal.send(result.is_ok());
            (batch, offsets, result, started.elapsed().as_secs_f64())
        });
        self.in_flight.push(InFlightWrite { task, partitions, keys, ran, committed, connections });
        // The new task sits in this worker's LIFO slot, which the other
        // workers cannot steal from: without a yield it would start only
        // when this loop next waits (at the next batch, for this one),
        // and decode and write would take turns instead of overlapping.
        tokio::task::yield_now().await;
        Ok(())
    }

    /// Waits for the writes in flight, oldest first. On success a write's
    /// positions become durable; on failure it is written again here, with
    /// the retries and rejections of the synchronous path, before anything
    /// newer of its partitions.
    pub(super) async fn settle(&mut self) -> Result<(), Halt> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        // Nothing in flight follows a failed write now.
        self.behind_a_failure = false;
        Ok(())
    }

    /// Settles the oldest write in flight (see [`Worker::settled`]). At
    /// shutdown a write is waited for [`SHUTDOWN_GRACE`] at most, then
    /// abandoned with the rest (nothing past it is committed; its events
    /// are read again on the next start), so a drain ends in bounded time.
    async fn settle_oldest(&mut self) -> Result<(), Halt> {
        // (Never expected: every caller counts what is in flight first.)
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let mut write = self.in_flight.remove(0);
        if !*self.shutdown.borrow() {
            return self.settled((&mut write.task).await).await;
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut write.task).await {
            Ok(done) => self.settled(done).await,
            Err(_) => {
                tracing::warn!(connector = %self.name(), grace = ?SHUTDOWN_GRACE,
                    "abandoning the writes in flight at shutdown");
                write.task.abort();
                for write in self.in_flight.drain(..) {
                    write.task.abort();
                }
                self.pending.clear();
                Err(Halt::Shutdown)
            }
        }
    }

    /// Settles the writes in flight up to `index`, oldest first. Never one
    /// alone out of order: a failed write is written again as it settles,
    /// and one of a partition written again before the failed one it
    /// followed would move the position past that one's events.
    async fn settle_through(&mut self, index: usize) -> Result<(), Halt> {
        for _ in 0..=index {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Settles the write at `index`, which is done, after the older ones:
    /// positions become durable in the order the batches were cut (a
    /// chained write can finish just before the one it followed is seen to).
    pub(super) async fn settle_finished(
        &mut self,
        index: usize,
        done: Result<WriteDone, tokio::task::JoinError>,
    ) -> Result<(), Halt> {
        self.in_flight.remove(index);
        for _ in 0..index {
            self.settle_oldest().await?;
        }
        self.settled(done).await
    }

    /// Settles a finished background write (see [`Worker::settle`]).
    async fn settled(&mut self, done: Result<WriteDone, tokio::task::JoinError>) -> Result<(), Halt> {
        let (batch, offsets, result, seconds) = match done {
            Ok(done) => done,
            Err(error) => return Err(Halt::of_join_error(error, "a sink write task")),
        };
        match result {
            Ok(written) => {
                self.batch_done(&batch, &offsets, &written, seconds);
                Ok(())
            }
            Err(SinkError::Fenced) => Err(Halt::Fenced),
            // Nothing of it was written (a write that follows one that
            // failed rolls back); its events are read again on restart.
            Err(_) if self.stopping => Ok(()),
            Err(error) => {
                tracing::info!(connector = %self.name(), %error, "a batch write failed; writing it again");
                self.behind_a_failure = true;
                let parked_before = self.parking.changes();
                let next = std::mem::replace(&mut self.pending, batch);
                let written = self.write_pending().await;
                // Under `stop`, the batch being built and the writes in
                // flight after this one come after the bad event: they
                // must not be written (the halt flushes what is pending
                // and settles what is in flight), only read again when the
                // connector restarts.
                if matches!(written, Err(Halt::Stopped(_))) {
                    self.stopping = true;
                } else {
                    self.pending = next;
                    if self.parking.changes() != parked_before {
                        // The rewrite parked a key: its later events, in
                        // the writes in flight behind this one (which failed
                        // with it and are written again, holding them, as
                        // they settle, in order) and in the batch being
                        // built, are parked before any new record is.
                        self.parking.dirty = true;
                    }
                }
                written
            }
        }
    }

    /// Counts, logs and commits a durable batch.
    fn batch_done(&self, batch: &Pending, offsets: &[PartitionOffset], done: &Written, seconds: f64) {
        let status = &self.runtime.status;
        // Counted once the batch is durable, per batch rather than per
        // event (the counters sit behind a lock): a record consumed again
        // after a crash or a fence is not counted twice.
        for (event_type, n) in count_runs(batch.types.iter().copied(), same_name) {
            status.count_many(event_type, Outcome::Consumed, n);
        }
        // An event is superseded when a guard found every one of its ops
        // applied or overtaken; otherwise written.
        let mut superseded_ops = vec![false; batch.ops.len()];
        for &op in &done.superseded {
            if let Some(flag) = superseded_ops.get_mut(op) {
                *flag = true;
            }
        }
        let mut by_event: Vec<bool> = vec![true; batch.types.len()];
        let mut has_ops = vec![false; batch.types.len()];
        for (op, &origin) in batch.origins.iter().enumerate() {
            has_ops[origin] = true;
            by_event[origin] &= superseded_ops[op];
        }
        let outcomes =
            batch.types.iter().enumerate().filter(|(origin, _)| has_ops[*origin]).map(|(origin, &event_type)| {
                (event_type, if by_event[origin] { Outcome::Superseded } else { Outcome::Written })
            });
        for ((event_type, outcome), n) in count_runs(outcomes, |a, b| a.1 == b.1 && same_name(a.0, b.0)) {
            status.count_many(event_type, outcome, n);
        }
        let newest = batch.records.iter().filter_map(|r| r.timestamp).max();
        status.batch_written(batch.records.len(), batch.ops.len(), done.duplicates, seconds, newest);
        let positions: Vec<(Name, i32, i64)> = offsets.iter().map(|o| (o.topic, o.partition, o.next_offset)).collect();
        status.positions(&positions);
        self.source.durable(offsets, self.generation);
    }

    /// Drops from the pending batch the ops of the partitions whose share
    /// of it committed (written per partition, another share failed):
    /// they are applied, so none of them may be found refused, parked or
    /// dead-lettered; found so alone (a refused value that a later op of
    /// its key replaced in the share), it would park a key whose events
    /// are in the table. Their records stay: the positions are written
    /// again (and found there). A failed look changes nothing: the search
    /// for a culprit is as before.
    async fn forget_written_shares(&mut self, offsets: &[PartitionOffset]) {
        let reached = match self.runtime.sink.reached_each(offsets).await {
            Ok(reached) => reached,
            Err(error) => {
                tracing::warn!(connector = %self.name(), %error, "reading which shares of a batch committed failed");
                return;
            }
        };
        let written: Vec<(Name, i32)> =
            offsets.iter().zip(reached).filter(|(_, reached)| *reached).map(|(o, _)| (o.topic, o.partition)).collect();
        if written.is_empty() {
            return;
        }
        let records = &self.pending.records;
        let mut applied: Vec<usize> = self
            .pending
            .origins
            .iter()
            .copied()
            .filter(|&origin| written.contains(&(records[origin].position.topic, records[origin].position.partition)))
            .collect();
        applied.dedup();
        tracing::info!(connector = %self.name(), partitions = ?written, events = applied.len(),
            "part of a failed batch had committed; looking for the refused events in the rest");
        self.pending.remove_events(&applied);
    }

    /// Writes the pending batch until it is durable, dead-lettering the
    /// events the sink refuses.
    async fn write_pending(&mut self) -> Result<(), Halt> {
        if self.pending.is_empty() {
            // Nothing to write: a deadline, if one was set, is spent.
            self.pending.deadline = None;
            return Ok(());
        }
        let mut attempt = 0;
        let mut give_up_at: Option<Instant> = None;
        let mut stop_after: Option<Failure> = None;
        loop {
            // A batch written again after an earlier one parked a key (its
            // write failed behind that one) holds that key's events.
            self.hold_pending().await?;
            let offsets = self.pending.offsets(&self.epochs);
            self.runtime.status.handed(&offsets);
            let started = std::time::Instant::now();
            let write = self.runtime.sink.write(&self.pending.ops, &offsets);
            // At shutdown one attempt, too, ends with the grace period.
            let written = if *self.shutdown.borrow() {
                let deadline = *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
                match tokio::time::timeout_at(deadline, write).await {
                    Ok(written) => written,
                    Err(_) => {
                        tracing::warn!(connector = %self.name(), "abandoning the in-flight batch at shutdown");
                        self.pending.clear();
                        return Err(Halt::Shutdown);
                    }
                }
            } else {
                write.await
            };
            match written {
                Ok(written) => {
                    self.batch_done(&self.pending, &offsets, &written, started.elapsed().as_secs_f64());
                    self.pending.clear();
                    return match stop_after {
                        Some(failure) => Err(Halt::Stopped(failure)),
                        None => Ok(()),
                    };
                }
                Err(SinkError::RejectedOps(rejected)) => {
                    if let Some(failure) = self.reject(rejected).await? {
                        stop_after.get_or_insert(failure);
                    }
                }
                Err(SinkError::Fenced) => {
                    self.pending.clear();
                    return Err(Halt::Fenced);
                }
                Err(error) if error.class() == ErrorClass::Permanent => {
                    self.forget_written_shares(&offsets).await;
                    let rejected = match self.runtime.sink.find_rejected(&self.pending.ops).await {
                        Ok(rejected) => rejected,
                        Err(error) => {
                            tracing::warn!(connector = %self.name(), %error, "isolating a bad row failed; retrying");
                            Vec::new()
                        }
                    };
                    if rejected.is_empty() {
                        // The batch fails as a whole but no op alone does:
                        // retry rather than guess which event to drop.
                        self.runtime.status.retrying(
                            "sink",
                            ErrorClass::Transient,
                            &format!("batch refused without a culprit: {error}"),
                            attempt,
                        );
                        self.pause(attempt).await?;
                        attempt += 1;
                    } else if let Some(failure) = self.reject(rejected).await? {
                        stop_after.get_or_insert(failure);
                    }
                }
                Err(error) => {
                    self.runtime.status.retrying("sink", error.class(), &error.to_string(), attempt);
                    let stopping = *self.shutdown.borrow();
                    if stopping {
                        let deadline = *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
                        if Instant::now() >= deadline {
                            tracing::warn!(connector = %self.name(), "abandoning the in-flight batch at shutdown");
                            self.pending.clear();
                            return Err(Halt::Shutdown);
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    } else {
                        self.pause(attempt).await?;
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// How many of each key `keys` holds, counted in runs of equal ones: a
/// batch's events come in long runs of one type (a partition's), so the
/// list of counts (a batch has a few types) is searched once per run
/// rather than a map hashed once per event (issue 27: that hashing was
/// 3 % of kawka's instructions on a folding run). Keys are equal when
/// `same` says so: event types compare by address first ([`same_name`]).
fn count_runs<K: Copy>(keys: impl Iterator<Item = K>, same: impl Fn(K, K) -> bool) -> Vec<(K, u64)> {
    let mut counts: Vec<(K, u64)> = Vec::new();
    // The count the run so far adds to.
    let mut current = 0;
    for key in keys {
        if counts.get(current).is_none_or(|(k, _)| !same(*k, key)) {
            current = counts.iter().position(|(k, _)| same(*k, key)).unwrap_or_else(|| {
                counts.push((key, 0));
                counts.len() - 1
            });
        }
        counts[current].1 += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// Counting in runs gives each key's count, whatever the runs.
    #[test]
    fn runs_count_as_events_do() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(27);
        for _ in 0..200 {
            let keys: Vec<u8> = (0..rng.random_range(0..60)).map(|_| rng.random_range(0..4)).collect();
            let mut counted = super::count_runs(keys.iter().copied(), |a, b| a == b);
            counted.sort_unstable();
            let mut expected: Vec<(u8, u64)> = Vec::new();
            for key in 0..4 {
                let n = keys.iter().filter(|&&k| k == key).count() as u64;
                if n > 0 {
                    expected.push((key, n));
                }
            }
            assert_eq!(counted, expected, "{keys:?}");
        }
    }
}
