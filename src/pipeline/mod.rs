//! One connector's loop: poll → decode → project → batch → write → commit.
//!
//! * [`dead_letter`]: the dead-letter producer.
//! * [`replay`]: `kawka dlq replay`: the connector run over its dead letters.
//!
//! Records are processed one at a time in the order the source hands them
//! over, so within a partition every record below the batch's last one has
//! been written, dead-lettered or skipped by the time the batch commits:
//! the batch's positions (last processed + 1 per partition) are a
//! contiguous watermark by construction.

pub mod dead_letter;
pub mod replay;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::codec::{Codec, Decoded};
use crate::config::{ConnectorSettings, ErrorPolicy};
use crate::error::{Backoff, ErrorClass, Failure};
use crate::event::Position;
use crate::projection::compact;
use crate::projection::{Projected, Projection, WriteOp};
use crate::sink::{Claim, Committed, Follows, PartitionOffset, Plan, Sink, SinkError};
use crate::source::{ClaimFn, KafkaSettings, KafkaSource, RawRecord, SourceMessage};
use crate::status::{ConnectorStatus, Outcome, State};
use crate::value::Name;
use dead_letter::DeadLetters;

/// The event type counted for tombstones and undecodable records.
const TOMBSTONE: Name = "(tombstone)";
const UNDECODABLE: Name = "(undecodable)";
const OVERSIZED: Name = "(oversized)";

/// How long a connector may sit idle before it checks that its partitions
/// are still its own (a rebuild's cut-over or rollback moves them).
const OWNERSHIP_CHECK: Duration = Duration::from_secs(3);

/// Writes of one partition in flight at once, when the sink chains them.
const CHAIN_DEPTH: usize = 2;

/// How long a shutdown waits for an unreachable sink before abandoning the
/// in-flight batch (its events are consumed again on the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why a connector's loop ended.
#[derive(Debug)]
pub enum Halt {
    /// The daemon is stopping.
    Shutdown,
    /// The `stop` error policy met a bad event: nothing past it is committed.
    Stopped(Failure),
    /// Another consumer took over a partition while a batch was in flight.
    Fenced,
    /// The consumer could not be created or its thread ended.
    Source(String),
}

/// Everything one connector needs, built once.
#[derive(Clone)]
pub struct ConnectorRuntime {
    pub settings: Arc<ConnectorSettings>,
    pub kafka: KafkaSettings,
    pub codec: Codec,
    pub upcasting: Arc<crate::upcast::Upcasting>,
    pub projection: Arc<dyn Projection>,
    pub sink: Sink,
    pub dead_letters: DeadLetters,
    pub status: Arc<ConnectorStatus>,
    /// Set when this runtime replays the dead-letter topic (`kawka dlq replay`).
    pub replay: Option<ReplayRun>,
}

/// One `kawka dlq replay` run: it reads the dead-letter topic and ends when
/// it is idle or meets the records it dead-lettered again itself.
#[derive(Debug, Clone)]
pub struct ReplayRun {
    /// Written as `kawka.replay.run` on events that fail again.
    pub id: String,
    /// The run ends after this long without a record.
    pub idle: Duration,
}

/// The header that marks a dead letter written by a replay run.
pub const REPLAY_HEADER: &str = "kawka.replay.run";

impl ConnectorRuntime {
    /// Runs until shutdown or a `stop`; restarts its consumer after fencing.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Halt {
        let name = self.settings.name.clone();
        loop {
            let halt = self.run_once(&mut shutdown).await;
            match halt {
                Halt::Fenced | Halt::Source(_) => {
                    tracing::warn!(connector = %name, reason = ?halt, "restarting the consumer");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stopped(&mut shutdown) => return Halt::Shutdown,
                    }
                }
                Halt::Stopped(ref failure) => {
                    self.status.stopped(failure);
                    return halt;
                }
                Halt::Shutdown => {
                    self.status.set_state(State::Drained);
                    return halt;
                }
            }
        }
    }

    async fn run_once(&self, shutdown: &mut watch::Receiver<bool>) -> Halt {
        let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
        let mut attempt = 0;
        while let Err(error) = self.sink.prepare().await {
            if error.class() == ErrorClass::Permanent {
                return Halt::Source(error.to_string());
            }
            self.status.retrying("sink", error.class(), &error.to_string(), attempt);
            tokio::select! {
                _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                _ = stopped(shutdown) => return Halt::Shutdown,
            }
            attempt += 1;
        }
        let claim = self.sink.stores_positions().then(|| self.claim_fn());
        self.status.recovered();
        let started =
            KafkaSource::start(&self.settings.name, &self.kafka, &self.settings.source, claim, self.status.clone());
        let (source, rx) = match started {
            Ok(started) => started,
            Err(error) => return Halt::Source(error.to_string()),
        };
        let mut worker = Worker {
            runtime: self,
            source: &source,
            pending: Pending::default(),
            epochs: HashMap::default(),
            generation: None,
            shutdown: shutdown.clone(),
            replay_done: std::collections::HashSet::default(),
            in_flight: Vec::new(),
            stopping: false,
        };
        let (halt, rx) = worker.consume(rx).await;
        source.stop(rx).await;
        halt
    }

    /// Claims in the sink, retrying transient errors until they pass.
    fn claim_fn(&self) -> ClaimFn {
        let sink = self.sink.clone();
        let name = self.settings.name.clone();
        Arc::new(move |partitions: Vec<(Name, i32)>| {
            let sink = sink.clone();
            let name = name.clone();
            Box::pin(async move {
                let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
                let mut attempt = 0;
                loop {
                    match sink.claim(&partitions).await {
                        Ok(claims) => return claims,
                        Err(error) => {
                            tracing::warn!(connector = %name, %error, "claiming partitions failed; retrying");
                            tokio::time::sleep(backoff.delay(attempt)).await;
                            attempt += 1;
                        }
                    }
                }
            })
        })
    }
}

/// The records and ops of the batch being built.
#[derive(Default)]
struct Pending {
    /// Every record processed since the last commit, in order (also those
    /// dead-lettered or skipped: they move the positions too).
    records: Vec<RawRecord>,
    /// Event type of each record (for per-type counts), aligned with `records`.
    types: Vec<Name>,
    ops: Vec<WriteOp>,
    /// Index into `records` of each op's event.
    origins: Vec<usize>,
    bytes: usize,
    deadline: Option<Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// An empty batch with room for as much as this one holds: the next
    /// batch is usually as big, and growing its vectors from nothing copied
    /// them over and over (records are ~100 bytes each).
    fn empty_like(&self) -> Pending {
        Pending {
            records: Vec::with_capacity(self.records.len()),
            types: Vec::with_capacity(self.types.len()),
            ops: Vec::with_capacity(self.ops.len()),
            origins: Vec::with_capacity(self.origins.len()),
            ..Pending::default()
        }
    }

    fn clear(&mut self) {
        self.records.clear();
        self.types.clear();
        self.ops.clear();
        self.origins.clear();
        self.bytes = 0;
        self.deadline = None;
    }

    /// Drops the ops of the events at `rejected` (indexes into `records`).
    fn remove_events(&mut self, rejected: &[usize]) {
        let mut keep = self.origins.iter().map(|origin| !rejected.contains(origin));
        self.ops.retain(|_| keep.next().unwrap_or(true));
        self.origins.retain(|origin| !rejected.contains(origin));
    }

    /// Forgets the records from `index` on (for `stop`: commit nothing past it).
    fn truncate(&mut self, index: usize) {
        self.records.truncate(index);
        self.types.truncate(index);
        let mut keep = self.origins.iter().map(|origin| *origin < index);
        self.ops.retain(|_| keep.next().unwrap_or(true));
        self.origins.retain(|origin| *origin < index);
    }
}

struct Worker<'a> {
    runtime: &'a ConnectorRuntime,
    source: &'a KafkaSource,
    pending: Pending,
    /// The epoch of each assigned partition; looked up for every record
    /// (as is `replay_done`): foldhash rather than SipHash.
    epochs: HashMap<(Name, i32), Option<i64>, foldhash::fast::RandomState>,
    generation: Option<u64>,
    shutdown: watch::Receiver<bool>,
    /// Replay: partitions that reached records this run wrote itself.
    replay_done: std::collections::HashSet<(Name, i32), foldhash::fast::RandomState>,
    /// Batches being written in the background, oldest first; no two
    /// share a key, nor a partition unless the sink chains writes.
    in_flight: Vec<InFlightWrite>,
    /// Set once a rewritten write halted under `stop`: the writes in
    /// flight behind it that fail are dropped, not written again (their
    /// events come after the bad one; they are read again on restart).
    stopping: bool,
}

/// A background write, the partitions its batch has records of, the
/// sorted hashes of the keys it writes (empty when writes are not
/// concurrent), whether its statements ran and whether it committed (for
/// the writes that follow it) and the connections it holds.
struct InFlightWrite {
    task: tokio::task::JoinHandle<WriteDone>,
    partitions: Vec<(Name, i32)>,
    keys: Vec<u64>,
    ran: Committed,
    committed: Committed,
    connections: usize,
}

impl InFlightWrite {
    fn shares_partition(&self, partitions: &[(Name, i32)]) -> bool {
        self.partitions.iter().any(|p| partitions.contains(p))
    }

    /// Whether a batch of these partitions and keys must wait for this
    /// write to finish, when the sink cannot chain writes: a shared
    /// partition (its positions commit in order) or a shared key (two
    /// transactions locking the same rows in different orders would
    /// deadlock; a hash collision only costs a wait). A sink that chains
    /// writes follows such a write instead ([`follows`]).
    fn blocks(&self, partitions: &[(Name, i32)], keys: &[u64], chains: bool) -> bool {
        !chains && (self.shares_partition(partitions) || share_any(&self.keys, keys))
    }
}

/// What a batch of these partitions and keys follows of the writes in
/// flight, when the sink chains writes: it runs its statements after those
/// it shares a key with ran theirs, and commits after those it shares a
/// partition or a key with committed.
fn follows(in_flight: &[InFlightWrite], partitions: &[(Name, i32)], keys: &[u64]) -> Follows {
    let mut follows = Follows::default();
    for write in in_flight {
        let shares_key = share_any(&write.keys, keys);
        if shares_key {
            follows.ran.push(write.ran.clone());
        }
        if shares_key || write.shares_partition(partitions) {
            follows.committed.push(write.committed.clone());
        }
    }
    follows
}

/// `hashes` (of a batch's keys, [`compact::key_hashes`]) sorted. A sorted
/// list (one allocation) rather than a hash set, which would hash each
/// value again: built for every batch on the worker's own path.
fn sorted(hashes: &[u64]) -> Vec<u64> {
    let mut sorted = hashes.to_vec();
    sorted.sort_unstable();
    sorted
}

/// Whether two sorted lists have a value in common.
fn share_any(a: &[u64], b: &[u64]) -> bool {
    let (mut i, mut j) = (0, 0);
    while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
        match x.cmp(y) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// A finished write: its batch, positions, result and the seconds the
/// sink took (timed in the task: the worker may look only much later).
type WriteDone = (Pending, Vec<PartitionOffset>, Result<u64, SinkError>, f64);

impl Worker<'_> {
    fn name(&self) -> &str {
        &self.runtime.settings.name
    }

    async fn consume(&mut self, mut rx: mpsc::Receiver<SourceMessage>) -> (Halt, mpsc::Receiver<SourceMessage>) {
        let mut shutdown = self.shutdown.clone();
        let mut paused = self.runtime.status.paused();
        let idle = self.runtime.replay.as_ref().map(|r| r.idle);
        let mut last_record = Instant::now();
        loop {
            let deadline = self.pending.deadline;
            let is_paused = *paused.borrow_and_update();
            let idle_at = idle.filter(|_| self.generation.is_some()).map(|idle| last_record + idle);
            let message = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => {
                    let halt = match self.flush().await { Ok(()) => Halt::Shutdown, Err(halt) => halt };
                    return (halt, rx);
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    if let Err(halt) = self.flush().await { return (halt, rx) }
                    continue;
                }
                // A write in flight is done: its positions reach Kafka now,
                // not when the next batch is handed over.
                (index, done) = finished(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    if let Err(halt) = self.settle_finished(index, done).await { return (halt, rx) }
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
                        return (Halt::Fenced, rx);
                    }
                    continue;
                }
                // A replay ends when nothing more comes.
                _ = sleep_until(idle_at), if idle_at.is_some() => {
                    let halt = match self.flush().await { Ok(()) => Halt::Shutdown, Err(halt) => halt };
                    return (halt, rx);
                }
                message = rx.recv(), if !is_paused => message,
            };
            if matches!(message, Some(SourceMessage::Records { .. }) | Some(SourceMessage::Assigned { .. })) {
                last_record = Instant::now();
            }
            let result = match message {
                None => Err(Halt::Source("the consumer thread ended".into())),
                Some(SourceMessage::Assigned { generation, claims }) => {
                    self.assigned(generation, &claims);
                    Ok(())
                }
                Some(SourceMessage::Revoked { ack }) => {
                    let flushed = self.flush().await;
                    self.runtime.status.revoked();
                    self.epochs.clear();
                    self.generation = None;
                    let _ = ack.send(());
                    flushed
                }
                Some(SourceMessage::Records { generation, records }) => self.records(generation, records).await,
                Some(SourceMessage::Ended { reason }) => Err(Halt::Source(reason)),
            };
            if let Err(halt) = result {
                if let Halt::Stopped(_) = halt {
                    // Commit the events before the bad one, nothing past it.
                    if let Err(flush_halt) = self.flush().await {
                        return (flush_halt, rx);
                    }
                }
                return (halt, rx);
            }
        }
    }

    fn assigned(&mut self, generation: u64, claims: &[Claim]) {
        self.generation = Some(generation);
        self.epochs = claims.iter().map(|c| ((c.topic, c.partition), c.epoch)).collect();
        let partitions: Vec<(Name, i32, Option<i64>)> =
            claims.iter().map(|c| (c.topic, c.partition, c.next_offset)).collect();
        self.runtime.status.assigned(&partitions);
    }

    async fn records(&mut self, generation: u64, records: Vec<RawRecord>) -> Result<(), Halt> {
        if self.generation != Some(generation) {
            // Fetched for an assignment that has since changed.
            return Ok(());
        }
        let batch = &self.runtime.settings.batch;
        for mut record in records {
            let partition = (record.position.topic, record.position.partition);
            if !self.epochs.contains_key(&partition) || self.replay_done.contains(&partition) {
                continue;
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
                    continue;
                }
                // The headers of the earlier failure are not part of the event.
                record.headers.retain(|(k, _)| !k.starts_with("kawka.error.") && k != REPLAY_HEADER);
            }
            self.process(record).await?;
            if self.pending.ops.len() >= batch.max_events || self.pending.bytes >= batch.max_bytes {
                self.flush_pipelined().await?;
            }
        }
        Ok(())
    }

    /// Decodes and projects one record into the pending batch.
    async fn process(&mut self, record: RawRecord) -> Result<(), Halt> {
        let limit = self.runtime.settings.source.max_record_bytes;
        if record.size() > limit {
            let message = format!("a record of {} bytes exceeds source.max_record_bytes ({limit})", record.size());
            self.fail(&record, OVERSIZED, Failure { class: ErrorClass::Permanent, stage: "source", message }).await?;
            self.push(record, OVERSIZED);
            return Ok(());
        }
        let decoded = self.decode(&record).await?;
        let index = self.pending.records.len();
        let (event_type, projected) = match decoded {
            Ok(Decoded::Event { event, writer }) => {
                let event_type = event.event_type;
                match self.runtime.upcasting.upcast(event, &writer) {
                    Ok(events) => (event_type, project_all(self.runtime.projection.as_ref(), events)),
                    Err(error) => {
                        let failure =
                            Failure { class: ErrorClass::Permanent, stage: "upcast", message: error.to_string() };
                        self.fail(&record, event_type, failure).await?;
                        self.push(record, event_type);
                        return Ok(());
                    }
                }
            }
            Ok(Decoded::Tombstone { key }) => (TOMBSTONE, self.runtime.projection.tombstone(&key, record.position)),
            Err(failure) => {
                self.fail(&record, UNDECODABLE, failure).await?;
                self.push(record, UNDECODABLE);
                return Ok(());
            }
        };
        match projected {
            Ok(Projected::Ops(ops)) => {
                if let Some(message) = ops.iter().find_map(|op| self.runtime.sink.check(op).err()) {
                    let failure = Failure { class: ErrorClass::Permanent, stage: "sink", message };
                    self.fail(&record, event_type, failure).await?;
                } else {
                    self.pending.origins.extend(std::iter::repeat_n(index, ops.len()));
                    self.pending.ops.extend(ops);
                }
            }
            Ok(Projected::Skipped) => self.runtime.status.count(event_type, Outcome::Unknown),
            Err(error) => {
                let failure = Failure { class: ErrorClass::Permanent, stage: "projection", message: error.to_string() };
                self.fail(&record, event_type, failure).await?;
            }
        }
        self.push(record, event_type);
        Ok(())
    }

    fn push(&mut self, record: RawRecord, event_type: Name) {
        self.pending.bytes += record.size();
        self.pending.records.push(record);
        self.pending.types.push(event_type);
        if self.pending.deadline.is_none() {
            self.pending.deadline = Some(Instant::now() + self.runtime.settings.batch.max_wait);
        }
    }

    /// Decodes, waiting out transient (registry) errors.
    async fn decode(&mut self, record: &RawRecord) -> Result<Result<Decoded, Failure>, Halt> {
        let mut attempt = 0;
        loop {
            match self.runtime.codec.decode(record).await {
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
                    self.flush().await?;
                    self.pause(attempt).await?;
                    attempt += 1;
                }
            }
        }
    }

    /// Waits before a retry; returns `Halt::Shutdown` if the daemon stops.
    async fn pause(&mut self, attempt: u32) -> Result<(), Halt> {
        let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
        tokio::select! {
            _ = tokio::time::sleep(backoff.delay(attempt)) => Ok(()),
            _ = stopped(&mut self.shutdown) => Err(Halt::Shutdown),
        }
    }

    /// Applies the error policy to one bad event.
    async fn fail(&mut self, record: &RawRecord, event_type: Name, failure: Failure) -> Result<(), Halt> {
        let settings = self.runtime.settings.clone();
        let status = self.runtime.status.clone();
        match settings.on_error {
            ErrorPolicy::Skip => {
                status.failed_event(event_type, record.position, &failure, Outcome::Skipped, "");
                Ok(())
            }
            ErrorPolicy::Stop => Err(Halt::Stopped(failure)),
            ErrorPolicy::DeadLetter => {
                let mut attempt = 0;
                loop {
                    let run = self.runtime.replay.as_ref().map(|r| r.id.as_str());
                    let sent = self
                        .runtime
                        .dead_letters
                        .send(&settings.dead_letter_topic, &settings.name, record, &failure, run)
                        .await;
                    match sent {
                        Ok(()) => break,
                        Err(error) => {
                            status.retrying("dead_letter", ErrorClass::Transient, &error.to_string(), attempt);
                            // A shutdown here leaves the event unconsumed: it is read again.
                            self.pause(attempt).await?;
                            attempt += 1;
                        }
                    }
                }
                status.failed_event(
                    event_type,
                    record.position,
                    &failure,
                    Outcome::DeadLettered,
                    &settings.dead_letter_topic,
                );
                Ok(())
            }
        }
    }

    /// Positions after a batch's records: last processed + 1 per partition.
    fn offsets(&self, batch: &Pending) -> Vec<PartitionOffset> {
        let mut next: Vec<PartitionOffset> = Vec::new();
        for record in &batch.records {
            let Position { topic, partition, offset } = record.position;
            match next.iter_mut().find(|o| o.topic == topic && o.partition == partition) {
                Some(found) => found.next_offset = found.next_offset.max(offset + 1),
                None => next.push(PartitionOffset {
                    topic,
                    partition,
                    next_offset: offset + 1,
                    epoch: self.epochs.get(&(topic, partition)).copied().flatten(),
                }),
            }
        }
        next
    }

    /// Makes everything so far durable: the batches in flight, then the
    /// pending one.
    async fn flush(&mut self) -> Result<(), Halt> {
        self.settle().await?;
        self.write_pending().await
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
    async fn flush_pipelined(&mut self) -> Result<(), Halt> {
        let offsets = self.offsets(&self.pending);
        let partitions: Vec<(Name, i32)> = offsets.iter().map(|o| (o.topic, o.partition)).collect();
        let most = self.runtime.sink.concurrent_writes();
        let chains = self.runtime.sink.chains_writes();
        // Each key hashed once, for compaction and for the writes in flight,
        // and only when one of them needs it.
        let hashes = if most > 1 || self.runtime.sink.folds_in_plan() {
            compact::key_hashes(&self.pending.ops)
        } else {
            Vec::new()
        };
        let keys = if most > 1 { sorted(&hashes) } else { Vec::new() };
        // Planned (folded, SQL built) before waiting for the writes ahead:
        // the planning overlaps them, and the write is only I/O. A batch
        // that fails to plan is written, and fails, in its task, so its
        // error takes the settling path of any failed write.
        let plan = self.runtime.sink.plan(&self.pending.ops, &hashes, &offsets);
        let connections = plan.as_ref().map_or(1, Plan::connections);
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
        if self.pending.is_empty() {
            return Ok(());
        }
        let follows = follows(&self.in_flight, &partitions, &keys);
        let (ran_signal, ran) = Committed::channel();
        let (signal, committed) = Committed::channel();
        // (Settling a failed write rewrites it through `pending` and puts
        // this batch back as it was, so `offsets` and `plan` still hold,
        // unless it halts: then this batch is dropped, unwritten.)
        let next = self.pending.empty_like();
        let batch = std::mem::replace(&mut self.pending, next);
        let sink = self.runtime.sink.clone();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = match plan {
                Ok(plan) => sink.write_planned(&plan, &batch.ops, &offsets, &follows, ran_signal).await,
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
    async fn settle(&mut self) -> Result<(), Halt> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Settles the oldest write in flight (see [`Worker::settled`]).
    async fn settle_oldest(&mut self) -> Result<(), Halt> {
        let write = self.in_flight.remove(0);
        self.settled(write.task.await).await
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
    async fn settle_finished(
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
            Err(error) => return Err(Halt::Source(format!("a sink write task failed: {error}"))),
        };
        match result {
            Ok(duplicates) => {
                self.batch_done(&batch, &offsets, duplicates, seconds);
                Ok(())
            }
            Err(SinkError::Fenced) => Err(Halt::Fenced),
            // Nothing of it was written (a write that follows one that
            // failed rolls back); its events are read again on restart.
            Err(_) if self.stopping => Ok(()),
            Err(error) => {
                tracing::info!(connector = %self.name(), %error, "a batch write failed; writing it again");
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
                }
                written
            }
        }
    }

    /// Counts, logs and commits a durable batch.
    fn batch_done(&self, batch: &Pending, offsets: &[PartitionOffset], duplicates: u64, seconds: f64) {
        let status = &self.runtime.status;
        // Counted once the batch is durable, per batch rather than per
        // event (the counters sit behind a lock): a record consumed again
        // after a crash or a fence is not counted twice.
        // foldhash: these run once per event of every batch, and SipHash
        // showed in the profile.
        let mut consumed: HashMap<Name, u64, foldhash::fast::RandomState> = HashMap::default();
        for &event_type in &batch.types {
            *consumed.entry(event_type).or_insert(0) += 1;
        }
        for (event_type, n) in consumed {
            status.count_many(event_type, Outcome::Consumed, n);
        }
        let mut written: HashMap<Name, u64, foldhash::fast::RandomState> = HashMap::default();
        let mut last_origin = usize::MAX;
        for &origin in &batch.origins {
            if origin != last_origin {
                *written.entry(batch.types[origin]).or_insert(0) += 1;
                last_origin = origin;
            }
        }
        for (event_type, n) in written {
            status.count_many(event_type, Outcome::Written, n);
        }
        let newest = batch.records.iter().filter_map(|r| r.timestamp).max();
        status.batch_written(batch.records.len(), batch.ops.len(), duplicates, seconds, newest);
        let positions: Vec<(Name, i32, i64)> = offsets.iter().map(|o| (o.topic, o.partition, o.next_offset)).collect();
        status.positions(&positions);
        self.source.durable(offsets);
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
            let offsets = self.offsets(&self.pending);
            let started = std::time::Instant::now();
            match self.runtime.sink.write(&self.pending.ops, &offsets).await {
                Ok(duplicates) => {
                    self.batch_done(&self.pending, &offsets, duplicates, started.elapsed().as_secs_f64());
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

    /// Hands refused ops' events (indexes into `ops`) to the error policy
    /// and drops their ops. With `stop`, the batch is cut before the first
    /// refused event and the failure is returned to halt after writing.
    async fn reject(&mut self, rejected: Vec<(usize, String)>) -> Result<Option<Failure>, Halt> {
        let mut events: Vec<(usize, String)> = Vec::new();
        for (op, message) in rejected {
            let origin = self.pending.origins[op];
            if !events.iter().any(|(e, _)| *e == origin) {
                events.push((origin, message));
            }
        }
        events.sort_by_key(|(origin, _)| *origin);
        if self.runtime.settings.on_error == ErrorPolicy::Stop {
            let (first, message) = events.swap_remove(0);
            self.pending.truncate(first);
            return Ok(Some(Failure { class: ErrorClass::Permanent, stage: "sink", message }));
        }
        for (origin, message) in &events {
            let record = self.pending.records[*origin].clone();
            let failure = Failure { class: ErrorClass::Permanent, stage: "sink", message: message.clone() };
            self.fail(&record, self.pending.types[*origin], failure).await?;
        }
        let origins: Vec<usize> = events.into_iter().map(|(origin, _)| origin).collect();
        self.pending.remove_events(&origins);
        Ok(None)
    }
}

/// Projects the events one record became (several after a split): their
/// ops together, or the first error. Skipped only if every event is. The
/// events are spent: their values move into the ops.
fn project_all(
    projection: &dyn Projection,
    events: Vec<crate::event::Event>,
) -> Result<Projected, crate::projection::ProjectionError> {
    let mut all: Option<Vec<WriteOp>> = None;
    for event in events {
        if let Projected::Ops(ops) = projection.project_owned(event)? {
            match all.as_mut() {
                // The usual case, one event: its ops as they are.
                None => all = Some(ops),
                Some(all) => all.extend(ops),
            }
        }
    }
    Ok(all.map_or(Projected::Skipped, Projected::Ops))
}

/// The first write in flight to finish: its index and result; pending
/// forever when there is none (the `select!` branch is disabled then anyway).
async fn finished(in_flight: &mut [InFlightWrite]) -> (usize, Result<WriteDone, tokio::task::JoinError>) {
    if in_flight.is_empty() {
        return std::future::pending().await;
    }
    let (done, index, _) = futures::future::select_all(in_flight.iter_mut().map(|write| &mut write.task)).await;
    (index, done)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Completes once the daemon is stopping (the guard `wait_for` returns is
/// not `Send`, so it must not live in a `select!` branch that awaits).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::OpKind;
    use crate::value::Value;

    fn hashed(ops: &[WriteOp]) -> Vec<u64> {
        sorted(&compact::key_hashes(ops))
    }

    fn ops(partition: i32, keys: &[&str]) -> Vec<WriteOp> {
        keys.iter()
            .enumerate()
            .map(|(n, key)| WriteOp {
                key: smallvec::smallvec![Value::from(*key), Value::Int(1)],
                kind: OpKind::Upsert,
                fields: Vec::new(),
                version: None,
                position: Position { topic: "t", partition, offset: n as i64 },
            })
            .collect()
    }

    fn in_flight(partitions: &[i32], keys: &[&str]) -> InFlightWrite {
        // A task that never runs to completion: only the bookkeeping is tested.
        let task = tokio::spawn(std::future::pending());
        let partitions = partitions.iter().map(|&p| ("t", p)).collect();
        let (_, ran) = Committed::channel();
        let (_, committed) = Committed::channel();
        InFlightWrite { task, partitions, keys: hashed(&ops(0, keys)), ran, committed, connections: 1 }
    }

    #[tokio::test]
    async fn a_batch_waits_for_writes_that_share_a_key_or_an_unchained_partition() {
        let write = in_flight(&[0, 1], &["a", "b"]);
        let (other_keys, same_key) = (hashed(&ops(2, &["c", "d"])), hashed(&ops(2, &["d", "b"])));
        assert!(!write.blocks(&[("t", 2)], &other_keys, false), "disjoint partitions and keys run concurrently");
        assert!(write.blocks(&[("t", 2)], &same_key, false), "a shared key waits (rows locked in another order)");
        assert!(!write.blocks(&[("u", 0)], &[], false), "partitions are per topic");
        // Keys are compared whole: ("a", 1) is not ("a", 2).
        let mut shifted = ops(2, &["a"]);
        shifted[0].key[1] = Value::Int(2);
        assert!(!write.blocks(&[("t", 2)], &hashed(&shifted), false));
        // A shared partition commits in order: after the write.
        assert!(write.blocks(&[("t", 2), ("t", 1)], &other_keys, false));
        assert!(write.shares_partition(&[("t", 2), ("t", 1)]));
        // A sink that chains writes never waits here: it follows them.
        for (partitions, keys) in [(&[("t", 2)][..], &same_key), (&[("t", 2), ("t", 1)][..], &other_keys)] {
            assert!(!write.blocks(partitions, keys, true));
        }
        write.task.abort();
    }

    #[tokio::test]
    async fn a_chained_batch_runs_after_writes_sharing_a_key_and_commits_after_those_sharing_a_partition() {
        let first = in_flight(&[0], &["a", "b"]);
        let second = in_flight(&[1], &["c"]);
        let writes = [first, second];
        let count = |f: &Follows| (f.ran.len(), f.committed.len());
        // Another partition, other keys: free.
        assert_eq!(count(&follows(&writes, &[("t", 2)], &hashed(&ops(2, &["x"])))), (0, 0));
        // The first's partition: commits after it, statements at once.
        assert_eq!(count(&follows(&writes, &[("t", 0)], &hashed(&ops(0, &["x"])))), (0, 1));
        // A key of the first from another partition: both waits, on it alone.
        assert_eq!(count(&follows(&writes, &[("t", 2)], &hashed(&ops(2, &["b"])))), (1, 1));
        // A key of each, and the second's partition.
        assert_eq!(count(&follows(&writes, &[("t", 1)], &hashed(&ops(1, &["a", "c"])))), (2, 2));
        for write in writes {
            write.task.abort();
        }
    }
}
