//! The consume loop: records → decode → upcast → project → the pending
//! batch, flushed when it is full, due, revoked or the daemon stops.

use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::batch::{Epochs, Pending};
use super::in_flight::{finished, InFlightWrite};
use super::prepare::{self, Ahead, Effect, Prepared, PreparedChunk, UNDECODABLE};
use super::{stopped, ConnectorRuntime, Halt, REPLAY_HEADER};
use crate::codec::Decoded;
use crate::error::Failure;
use crate::error::{Backoff, ErrorClass};
use crate::event::{Claim, Position};
use crate::projection::WriteOp;
use crate::source::{Control, KafkaSource, RawRecord};
use crate::status::Outcome;
use crate::value::Name;

/// How long a connector may sit idle before it checks that its partitions
/// are still its own (a rebuild's cut-over or rollback moves them).
const OWNERSHIP_CHECK: Duration = Duration::from_secs(3);

/// One run of a connector's consumer: the records it hands over, the batch
/// being built and the writes in flight.
pub(super) struct Worker<'a> {
    pub(super) runtime: &'a ConnectorRuntime,
    pub(super) source: &'a KafkaSource,
    pub(super) pending: Pending,
    /// The epoch of each assigned partition.
    pub(super) epochs: Epochs,
    /// The assignment being consumed (`None` from a revoke to the next
    /// assignment): its batches' positions are committed to Kafka only
    /// while it is the consumer's.
    pub(super) generation: Option<u64>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// Replay: partitions that reached records this run wrote itself (foldhash: looked up per record).
    replay_done: std::collections::HashSet<(Name, i32), foldhash::fast::RandomState>,
    /// Batches being written in the background, oldest first; no two
    /// share a key, nor a partition unless the sink chains writes.
    pub(super) in_flight: Vec<InFlightWrite>,
    /// Set once a rewritten write halted under `stop`: the writes in
    /// flight behind it that fail are dropped, not written again (their
    /// events come after the bad one; they are read again on restart).
    pub(super) stopping: bool,
    /// Set when a write in flight failed (and was written again as it
    /// settled): the writes behind it that follow it fail too, so the next
    /// batch waits for them all rather than follow one of them.
    pub(super) behind_a_failure: bool,
    /// The keys parked (`on_error: park`).
    pub(super) parking: super::park::Parking,
}

impl<'a> Worker<'a> {
    pub(super) fn new(
        runtime: &'a ConnectorRuntime,
        source: &'a KafkaSource,
        shutdown: watch::Receiver<bool>,
    ) -> Worker<'a> {
        Worker {
            runtime,
            source,
            pending: Pending::default(),
            epochs: Epochs::default(),
            generation: None,
            shutdown,
            replay_done: std::collections::HashSet::default(),
            in_flight: Vec::new(),
            stopping: false,
            behind_a_failure: false,
            parking: super::park::Parking::default(),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.runtime.settings.name
    }

    pub(super) async fn consume(
        &mut self,
        records: &mut Ahead,
        control_rx: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Halt {
        let mut shutdown = self.shutdown.clone();
        let mut paused = self.runtime.status.paused();
        let idle = self.runtime.replay.as_ref().map(|r| r.idle);
        let mut last_record = Instant::now();
        loop {
            let deadline = self.pending.deadline;
            let is_paused = *paused.borrow_and_update();
            let idle_at = idle.filter(|_| self.generation.is_some()).map(|idle| last_record + idle);
            let result = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => {
                    let halt = match self.flush().await { Ok(()) => Halt::Shutdown, Err(halt) => halt };
                    return halt;
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    if let Err(halt) = self.flush().await { return halt }
                    continue;
                }
                // A write in flight is done: its positions reach Kafka now,
                // not when the next batch is handed over.
                (index, done) = finished(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    if let Err(halt) = self.settle_finished(index, done).await { return halt }
                    continue;
                }
                // Paused: nothing is taken from the channel, so the consumer
                // thread fills it and pauses its partitions.
                _ = paused.changed() => continue,
                // While idle, check that the partitions are still ours.
                _ = tokio::time::sleep(OWNERSHIP_CHECK), if self.pending.is_empty() && self.in_flight.is_empty() && !self.epochs.is_empty() => {
                    let epochs: Vec<(Name, i32, i64)> =
                        self.epochs.iter().filter_map(|(&(t, p), e)| e.map(|e| (t, p, e))).collect();
                    if let Ok(false) = self.runtime.sink.owns(&epochs).await {
                        tracing::info!(connector = %self.name(), "partitions were taken over while idle; restarting the consumer");
                        return Halt::Fenced;
                    }
                    continue;
                }
                // A replay ends when nothing more comes.
                _ = sleep_until(idle_at), if idle_at.is_some() => {
                    let halt = match self.flush().await { Ok(()) => Halt::Shutdown, Err(halt) => halt };
                    return halt;
                }
                // Rebalances are served even while paused: the group
                // waits for them, not for this connector's records.
                control = control_rx.recv() => match control {
                    Some(control) => {
                        if matches!(control, Control::Assigned { .. }) {
                            last_record = Instant::now();
                        }
                        self.control(control).await
                    }
                    None => Err(Halt::Source("the consumer thread ended".into())),
                },
                chunk = records.recv(), if !is_paused => match chunk {
                    Some(PreparedChunk { generation, records, prepared, ops, _held }) => {
                        last_record = Instant::now();
                        // A chunk of a generation not yet known: its
                        // `Assigned` is already on the control channel
                        // (sent first, see `SourceChannels`).
                        let mut result = Ok(());
                        while result.is_ok() && self.generation.is_none_or(|known| known < generation) {
                            let Ok(control) = control_rx.try_recv() else { break };
                            result = self.control(control).await;
                        }
                        match result {
                            Ok(()) => self.records(generation, records, prepared, ops).await,
                            Err(halt) => Err(halt),
                        }
                    }
                    None => Err(Halt::Source("the consumer thread ended".into())),
                },
            };
            if let Err(halt) = result {
                if let Halt::Stopped(_) = halt {
                    // Commit the events before the bad one, nothing past it.
                    if let Err(flush_halt) = self.flush().await {
                        return flush_halt;
                    }
                }
                return halt;
            }
        }
    }

    /// Serves a message of the control channel.
    async fn control(&mut self, message: Control) -> Result<(), Halt> {
        match message {
            Control::Assigned { generation, claims } => {
                self.assigned(generation, &claims);
                // The keys parked on partitions that moved here come with them.
                self.read_parked().await
            }
            Control::Revoked { ack } => {
                let flushed = self.flush().await;
                self.runtime.status.revoked();
                self.epochs.clear();
                self.generation = None;
                let _ = ack.send(());
                flushed
            }
            Control::Ended { reason } => Err(Halt::Source(reason)),
        }
    }

    fn assigned(&mut self, generation: u64, claims: &[Claim]) {
        self.generation = Some(generation);
        self.epochs = claims.iter().map(|c| ((c.topic, c.partition), c.epoch)).collect();
        let partitions: Vec<(Name, i32, Option<i64>)> =
            claims.iter().map(|c| (c.topic, c.partition, c.next_offset)).collect();
        self.runtime.status.assigned(&partitions);
    }

    async fn records(
        &mut self,
        generation: u64,
        records: Vec<RawRecord>,
        prepared: Vec<Option<Prepared>>,
        ops: Vec<WriteOp>,
    ) -> Result<(), Halt> {
        if self.generation != Some(generation) {
            // Fetched for an assignment that has since changed.
            return Ok(());
        }
        self.refresh_parked().await?;
        let batch = &self.runtime.settings.batch;
        // The records' ops in record order: each record takes its own
        // (`Prepared::ops` of them), or skips them when it is not processed.
        let mut ops = ops.into_iter();
        let mut records = records.into_iter();
        let mut prepared = prepared.into_iter();
        loop {
            // Most records need nothing but a place in the batch: runs of
            // them move in at once (issue 27: one by one, through the
            // awaits below, moving them cost a fifth of kawka's time).
            if self.take_run(&mut records, &mut prepared, &mut ops) {
                self.flush_pipelined().await?;
                continue;
            }
            let (Some(record), Some(prepared)) = (records.next(), prepared.next()) else { break };
            let mine = prepared.as_ref().map_or(0, Prepared::ops);
            let Some((record, original)) = self.admit(record).await? else {
                if mine > 0 {
                    ops.nth(mine - 1);
                }
                continue;
            };
            self.process(record, original, prepared, &mut ops).await?;
            if self.pending.ops.len() >= batch.max_events || self.pending.bytes >= batch.max_bytes {
                self.flush_pipelined().await?;
            }
        }
        Ok(())
    }

    /// Moves the records at the head of a chunk that need no decision
    /// into the batch at once: prepared ahead without a failure, of a
    /// partition this run holds, with no key parked and no replay (those
    /// take the one-by-one path: it may wait, dead-letter or hold). Stops
    /// after the record that fills the batch; `true` then (flush it).
    fn take_run(
        &mut self,
        records: &mut std::vec::IntoIter<RawRecord>,
        prepared: &mut std::vec::IntoIter<Option<Prepared>>,
        ops: &mut std::vec::IntoIter<WriteOp>,
    ) -> bool {
        if self.runtime.replay.is_some() || !self.parking.is_empty() || self.parking.dirty {
            return false;
        }
        let batch = &self.runtime.settings.batch;
        let (mut events, mut bytes) = (self.pending.ops.len(), self.pending.bytes);
        let (mut run, mut run_ops, mut full) = (0, 0, false);
        // Records come in long runs of one partition: its epoch is looked up once per run.
        let mut ours: Option<(Name, i32)> = None;
        for (record, prepared) in records.as_slice().iter().zip(prepared.as_slice()) {
            let Some(Prepared { result: Ok(effect), .. }) = prepared else { break };
            let partition = (record.position.topic, record.position.partition);
            if ours != Some(partition) {
                if !self.epochs.contains_key(&partition) {
                    break;
                }
                ours = Some(partition);
            }
            let mine = match effect {
                Effect::Ops(n) => *n,
                Effect::Skipped => 0,
            };
            run += 1;
            run_ops += mine;
            events += mine;
            bytes += record.size();
            if events >= batch.max_events || bytes >= batch.max_bytes {
                full = true;
                break;
            }
        }
        if run == 0 {
            return false;
        }
        let first = self.pending.records.len();
        let pending = &mut self.pending;
        for (index, prepared) in (first..).zip(prepared.by_ref().take(run)) {
            let Prepared { event_type, result } = prepared.expect("a run holds prepared records only");
            match result {
                Ok(Effect::Ops(n)) => pending.origins.extend(std::iter::repeat_n(index, n)),
                Ok(Effect::Skipped) => self.runtime.status.count(event_type, Outcome::Unknown),
                Err(_) => unreachable!("a run holds no failure"),
            }
            pending.types.push(event_type);
        }
        pending.ops.extend(ops.by_ref().take(run_ops));
        pending.records.extend(records.by_ref().take(run));
        pending.bytes = bytes;
        if pending.deadline.is_none() {
            pending.deadline = Some(Instant::now() + batch.max_wait);
        }
        debug_assert_eq!(pending.ops.len(), pending.origins.len(), "each op has its origin");
        full
    }

    /// Whether a record is processed, and the position of its events when
    /// it is a dead letter replayed; `None`: not (its partition is not
    /// this run's, a replay is done with it or reads it by key, it was
    /// dead-lettered here, or its key is parked).
    async fn admit(&mut self, mut record: RawRecord) -> Result<Option<(RawRecord, Option<Position>)>, Halt> {
        let partition = (record.position.topic, record.position.partition);
        let mut original = None;
        if !self.epochs.contains_key(&partition) || self.replay_done.contains(&partition) {
            return Ok(None);
        }
        if let Some(run) = &self.runtime.replay {
            // Records this run dead-lettered again come after every
            // record it was asked to replay: this partition is done
            // (its position stays before them, for the next run).
            let mine =
                record.headers.iter().any(|(k, v)| k == REPLAY_HEADER && v.as_deref() == Some(run.id.as_bytes()));
            if mine {
                self.replay_done.insert(partition);
                if self.replay_done.len() == self.epochs.len() {
                    self.flush().await?;
                    return Err(Halt::Shutdown);
                }
                return Ok(None);
            }
            // A parked key's events are replayed by key, in order
            // (`kawka dlq replay` reads them itself), never here.
            if record.headers.iter().any(|(k, _)| k == crate::parked::PARKED_BEHIND_HEADER) {
                return Ok(None);
            }
            // A dead letter written without its value has no event to
            // replay (a null value would read as a tombstone: a delete).
            if let Some(failure) = super::dead_letter::unreplayable(&record) {
                self.fail(&record, UNDECODABLE, failure).await?;
                self.push(record, UNDECODABLE);
                return Ok(None);
            }
            // The event keeps the position it had: the guards and the
            // fold see it where it was in the log, not in the dead letters.
            original = original_position(&record.headers);
            // The headers of the earlier failure are not part of the event.
            record.headers.retain(|(k, _)| !k.starts_with("kawka.error.") && k != REPLAY_HEADER);
        }
        if !self.parking.is_empty() {
            record = match self.hold(record).await? {
                super::park::Held::No(record) => record,
                super::park::Held::Yes => return Ok(None),
            };
        }
        Ok(Some((record, original)))
    }

    /// Decodes and projects one record into the pending batch, unless the
    /// stage ahead did (`prepared`: its ops are the next in `chunk_ops`);
    /// its events are at `original` when it is a dead letter replayed (the
    /// record's own position is where the replay reads).
    async fn process(
        &mut self,
        record: RawRecord,
        original: Option<Position>,
        prepared: Option<Prepared>,
        chunk_ops: &mut std::vec::IntoIter<WriteOp>,
    ) -> Result<(), Halt> {
        let mut own = Vec::new();
        let ahead = prepared.is_some();
        let Prepared { event_type, result } = match prepared {
            Some(prepared) => prepared,
            None => match prepare::oversized(self.runtime, &record) {
                Some(oversized) => oversized,
                None => {
                    let decoded = self.decode(&record).await?;
                    prepare::prepare(self.runtime, decoded, original.unwrap_or(record.position), &mut own, None)
                }
            },
        };
        match result {
            Ok(Effect::Ops(n)) => {
                let index = self.pending.records.len();
                if ahead {
                    self.pending.add_ops(index, chunk_ops.by_ref().take(n));
                } else {
                    self.pending.add_ops(index, own);
                }
            }
            Ok(Effect::Skipped) => self.runtime.status.count(event_type, Outcome::Unknown),
            Err(failure) => self.fail(&record, event_type, failure).await?,
        }
        self.push(record, event_type);
        Ok(())
    }

    pub(super) fn push(&mut self, record: RawRecord, event_type: Name) {
        self.pending.push(record, event_type, self.runtime.settings.batch.max_wait);
    }

    /// Decodes, waiting out transient (registry) errors.
    async fn decode(&mut self, record: &RawRecord) -> Result<Result<Decoded, Failure>, Halt> {
        let mut attempt = 0;
        loop {
            // A decoder that panics on a record panics on it again: the
            // record's error, like any it cannot read.
            let decoded = std::panic::AssertUnwindSafe(self.runtime.codec.decode(record)).catch_unwind().await;
            let decoded = match decoded {
                Ok(decoded) => decoded,
                Err(panic) => return Ok(Err(prepare::decoder_panicked(&*panic))),
            };
            match decoded {
                Ok(decoded) => return Ok(Ok(decoded)),
                Err(error) if error.class() == ErrorClass::Permanent => {
                    return Ok(Err(Failure {
                        class: ErrorClass::Permanent,
                        stage: "decode",
                        message: error.to_string(),
                    }))
                }
                Err(error) => {
                    self.runtime.status.retrying("decode", error.class(), &error.to_string(), attempt);
                    // What came before this record is done: make it durable
                    // rather than hold it for as long as the registry is away.
                    // (A key this parks is held in what comes after,
                    // this record included: see `Worker::flush`.)
                    self.flush().await?;
                    self.pause(attempt).await?;
                    attempt += 1;
                }
            }
        }
    }

    /// Waits before a retry; returns `Halt::Shutdown` if the daemon stops.
    pub(super) async fn pause(&mut self, attempt: u32) -> Result<(), Halt> {
        let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
        tokio::select! {
            _ = tokio::time::sleep(backoff.delay(attempt)) => Ok(()),
            _ = stopped(&mut self.shutdown) => Err(Halt::Shutdown),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Where a dead letter's event was, from its `kawka.error.*` headers.
pub(super) fn original_position(headers: &[(String, Option<Vec<u8>>)]) -> Option<Position> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    Some(Position {
        topic: crate::value::intern(header("kawka.error.topic")?),
        partition: header("kawka.error.partition")?.parse().ok()?,
        offset: header("kawka.error.offset")?.parse().ok()?,
    })
}
