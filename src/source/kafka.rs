//! The Kafka consumer of one connector, on its own OS thread.
//!
//! librdkafka's consumer is driven by `poll`, which also runs the rebalance
//! callback; the callback must finish its work (claiming partitions in the
//! sink, letting the pipeline flush before a revoke) before the assignment
//! changes, so it blocks. Keeping the consumer on a thread of its own lets
//! it block without stalling the async runtime.
//!
//! Records are read from a queue of their own, a chunk per call (see
//! [`super::queue`]); the consumer's queue keeps the events (rebalances,
//! errors), served by `poll` as before.
//!
//! Rebalances and the thread's end travel on a channel of their own (the
//! control channel), which the pipeline reads even while it is paused or
//! its records channel is full: a rebalance never waits for room behind
//! records nobody takes, and a revoke waits at most [`REVOKE_WAIT`] for the
//! pipeline's flush (the sink's fencing protects positions past that).
//!
//! Records travel to the pipeline in chunks over a bounded channel. When
//! the channel is full the thread pauses its partitions and keeps polling
//! (so the group keeps it as a member) until there is room: memory is
//! bounded by the channel and librdkafka's prefetch queue, whatever the
//! backlog.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::sync::mpsc;

use super::channel::{records_channel, Chunk, Control, RecordsSender, SourceChannels, CHUNK};
use super::queue::{self, QueueHandle, RecordQueue};
use super::{KeyBytes, RawRecord};
use crate::event::Claim;
use crate::event::Position;
use crate::source::{KafkaSettings, SourceSettings, StartPosition};
use crate::status::ConnectorStatus;
use crate::value::{intern, Name};

/// How long a full channel is waited on before the partitions are paused
/// (well below `max.poll.interval.ms`: rebalances are served only by polls).
const PATIENCE: Duration = Duration::from_secs(5);
/// How long stopping waits for the consumer to commit and leave its group.
const CLOSE_WAIT: Duration = Duration::from_secs(15);
/// How often the high watermarks are fetched (for lag).
const WATERMARK_EVERY: Duration = Duration::from_secs(5);
/// How long a revoke waits for the pipeline to flush: the whole group
/// waits with it. A pipeline busy past this (a sink down, a long retry)
/// gives up its partitions unflushed; the new owner starts from the
/// positions the sink holds, and the old batch is fenced there.
pub const REVOKE_WAIT: Duration = Duration::from_secs(10);

/// Claims partitions in the sink: returns the positions to start from.
/// Must retry transient errors itself; it runs inside the rebalance.
pub type ClaimFn = Arc<dyn Fn(Vec<(Name, i32)>) -> BoxFuture<'static, Vec<Claim>> + Send + Sync>;

struct SourceContext {
    control: mpsc::UnboundedSender<Control>,
    claim: Option<ClaimFn>,
    runtime: tokio::runtime::Handle,
    start: StartPosition,
    generation: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// Positions durable in the sink, committed to Kafka on revoke.
    durable: Mutex<HashMap<(Name, i32), i64>>,
    /// Changes to `durable` so far, and how many of them the last commit
    /// the consumer thread saw succeed covered: asynchronous commits may
    /// fail unseen, so the thread commits again, synchronously, until what
    /// was written is committed even when no batch follows (a rebuild's
    /// cut-over waits for the live group's commits).
    durable_changes: AtomicU64,
    committed_changes: AtomicU64,
    /// Whether the last check failed (its warning was given).
    commit_failing: AtomicBool,
    /// The record queue of the consumer thread, while it runs: assigned
    /// partitions are forwarded to it.
    records: Mutex<Option<QueueHandle>>,
    connector: String,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer),
            other => {
                tracing::warn!(connector = %self.connector, error = ?other, "rebalance failed; dropping assignment");
                self.revoke(consumer);
            }
        }
    }
}

impl SourceContext {
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions: Vec<(Name, i32)> = tpl.elements().iter().map(|e| (intern(e.topic()), e.partition())).collect();
        let claims = match &self.claim {
            Some(claim) => {
                let claims = self.runtime.block_on(claim(partitions.clone()));
                for claim in &claims {
                    let offset = match (claim.next_offset, self.start) {
                        (Some(next), _) => Offset::Offset(next),
                        (None, StartPosition::Earliest) => Offset::Beginning,
                        (None, StartPosition::Latest) => Offset::End,
                    };
                    if let Err(error) = tpl.set_partition_offset(claim.topic, claim.partition, offset) {
                        tracing::warn!(connector = %self.connector, %error, "cannot set a start offset");
                    }
                }
                claims
            }
            None => partitions
                .iter()
                .map(|&(topic, partition)| Claim { topic, partition, next_offset: None, epoch: None })
                .collect(),
        };
        let records = *self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(records) = records {
            // Before `assign`: the fetchers then start with the forward in
            // place (see `queue`).
            // SAFETY: the handle is set only while the consumer thread's
            // `RecordQueue` lives, and this callback runs on that thread.
            let missed = unsafe { queue::forward(consumer, records, &partitions) };
            if !missed.is_empty() {
                tracing::warn!(connector = %self.connector, partitions = ?missed, "partitions not forwarded; their records come one by one");
            }
        }
        tracing::info!(
            connector = %self.connector,
            partitions = ?claims.iter().map(|c| format!("{}/{}@{:?}", c.topic, c.partition, c.next_offset)).collect::<Vec<_>>(),
            "partitions assigned"
        );
        if let Err(error) = consumer.assign(tpl) {
            tracing::error!(connector = %self.connector, %error, "assign failed");
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.stopping.load(Ordering::SeqCst) {
            // Sent before any record of the new assignment: those are
            // polled only after this callback returns.
            let _ = self.control.send(Control::Assigned { generation, claims });
        }
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>) {
        if !self.stopping.load(Ordering::SeqCst) {
            let (ack, acked) = std::sync::mpsc::sync_channel(1);
            if self.control.send(Control::Revoked { ack }).is_ok() && acked.recv_timeout(REVOKE_WAIT).is_err() {
                tracing::warn!(connector = %self.connector, wait = ?REVOKE_WAIT,
                    "pipeline did not flush before the revoke; fencing protects the positions");
            }
        }
        // Records still in flight belong to the old assignment.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.commit_durable(consumer, CommitMode::Sync);
        // The partitions may be another member's next: their positions are
        // never committed again from here (a retry would move theirs back).
        self.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
        self.committed_changes.store(self.durable_changes.load(Ordering::SeqCst), Ordering::SeqCst);
        if let Err(error) = consumer.unassign() {
            tracing::warn!(connector = %self.connector, %error, "unassign failed");
        }
        tracing::info!(connector = %self.connector, "partitions revoked");
    }

    fn commit_durable(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) {
        if let Err(error) = self.try_commit_durable(consumer, mode) {
            tracing::debug!(connector = %self.connector, %error, "offset commit to kafka failed");
        }
    }

    fn try_commit_durable(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) -> KafkaResult<()> {
        let durable = self.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if durable.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in durable {
            // Kafka's committed offset is, like ours, last processed + 1.
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next));
        }
        consumer.commit(&tpl, mode)
    }

    /// On the consumer thread, at most once a `COMMIT_CHECK`: commits the
    /// durable positions synchronously when they changed since the last
    /// commit seen to succeed. Told once per run of failures.
    fn commit_if_behind(&self, consumer: &BaseConsumer<Self>, checked_at: &mut std::time::Instant) {
        if checked_at.elapsed() < COMMIT_CHECK {
            return;
        }
        *checked_at = std::time::Instant::now();
        let changes = self.durable_changes.load(Ordering::SeqCst);
        if changes == self.committed_changes.load(Ordering::SeqCst) {
            return;
        }
        match self.try_commit_durable(consumer, CommitMode::Sync) {
            Ok(()) => {
                self.committed_changes.store(changes, Ordering::SeqCst);
                self.commit_failing.store(false, Ordering::SeqCst);
            }
            Err(error) if !self.commit_failing.swap(true, Ordering::SeqCst) => {
                tracing::warn!(connector = %self.connector, %error, "offset commit to kafka failed; committing again")
            }
            Err(error) => tracing::debug!(connector = %self.connector, %error, "offset commit to kafka failed again"),
        }
    }
}

/// How often the consumer thread checks that the durable positions are
/// committed.
const COMMIT_CHECK: Duration = Duration::from_secs(1);

/// A running consumer thread.
pub struct KafkaSource {
    consumer: Arc<BaseConsumer<SourceContext>>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSource {
    /// Subscribes and starts polling. `claim` is given when positions live
    /// in the sink.
    pub fn start(
        connector: &str,
        kafka: &KafkaSettings,
        source: &SourceSettings,
        claim: Option<ClaimFn>,
        status: Arc<ConnectorStatus>,
    ) -> KafkaResult<(KafkaSource, SourceChannels)> {
        // The fetch-ahead cap is shared: half in librdkafka's queue (see
        // `consumer_config`), half in the channel.
        let (tx, rx) = records_channel(usize::try_from(source.max_prefetch_bytes / 2).unwrap_or(usize::MAX));
        let (control, control_rx) = mpsc::unbounded_channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let context = SourceContext {
            control: control.clone(),
            claim,
            runtime: tokio::runtime::Handle::current(),
            start: source.start,
            generation: AtomicU64::new(0),
            stopping: stopping.clone(),
            durable: Mutex::new(HashMap::new()),
            durable_changes: AtomicU64::new(0),
            committed_changes: AtomicU64::new(0),
            commit_failing: AtomicBool::new(false),
            records: Mutex::new(None),
            connector: connector.to_string(),
        };
        let config = consumer_config(connector, kafka, source);
        let consumer: BaseConsumer<SourceContext> = config.create_with_context(context).map_err(redact_config_error)?;
        // Assigned by the consumer thread once it polls (see `assign_all`),
        // or by the group.
        let assign_all = source.assign_all.then(|| source.topics.clone());
        if assign_all.is_none() {
            let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        let consumer = Arc::new(consumer);
        let thread = {
            let consumer = consumer.clone();
            let stopping = stopping.clone();
            let name = connector.to_string();
            std::thread::Builder::new()
                .name(format!("kafka-{connector}"))
                .spawn(move || {
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        poll_loop(&name, &consumer, &tx, &stopping, &status, assign_all.as_deref())
                    }));
                    if let Err(panic) = polled {
                        let reason = crate::error::panic_message(&*panic);
                        let reason = format!("the kafka consumer thread failed: {reason}");
                        tracing::error!(connector = %name, %reason, "consumer thread failed");
                        let _ = control.send(Control::Ended { reason });
                    }
                })
                .map_err(|error| rdkafka::error::KafkaError::ClientCreation(error.to_string()))?
        };
        Ok((
            KafkaSource { consumer, stopping, thread: Some(thread) },
            SourceChannels { records: rx, control: control_rx },
        ))
    }

    /// Records positions that are durable in the sink and commits them to
    /// Kafka asynchronously. `generation` is the assignment the batch was
    /// written under: if a revoke has ended it meanwhile (it stopped waiting
    /// for this flush), the partitions may be another member's now and
    /// their offsets are not committed from here. (The revoke moves the
    /// generation before it commits and forgets the positions; the check
    /// and the insert hold the map's lock, so no stale position slips in
    /// after it.)
    pub fn durable(&self, offsets: &[crate::event::PartitionOffset], generation: Option<u64>) {
        let context = self.consumer.context();
        {
            let mut durable = context.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if generation != Some(context.generation.load(Ordering::SeqCst)) {
                tracing::debug!(connector = %context.connector, "positions of a revoked assignment are not committed");
                return;
            }
            for offset in offsets {
                durable.insert((offset.topic, offset.partition), offset.next_offset);
            }
        }
        context.durable_changes.fetch_add(1, Ordering::SeqCst);
        context.commit_durable(&self.consumer, CommitMode::Async);
    }

    /// Stops polling, commits what is durable, leaves the group. Drains
    /// the channels meanwhile, so a thread waiting on a full channel or on
    /// a revoke's ack can finish.
    pub async fn stop(mut self, channels: SourceChannels) {
        let SourceChannels { records: mut rx, mut control } = channels;
        self.stopping.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else { return };
        let consumer = self.consumer.clone();
        let connector = consumer.context().connector.clone();
        let (closed, mut join) = tokio::sync::oneshot::channel::<()>();
        // A thread of its own, not `spawn_blocking`: the runtime waits for
        // its blocking tasks when it shuts down, and librdkafka's close can
        // hang (an unassign inside the closing rebalance that is never
        // served, seen on tansu right after an assignment); the process
        // must still end.
        let closing = std::thread::Builder::new().name(format!("close-{connector}")).spawn(move || {
            let _ = thread.join();
            consumer.context().commit_durable(&consumer, CommitMode::Sync);
            // The last reference leaves the group: BaseConsumer's drop closes.
            drop(consumer);
            let _ = closed.send(());
        });
        if let Err(error) = closing {
            tracing::warn!(connector = %connector, %error, "cannot start closing the consumer");
            return;
        }
        drop(self);
        let deadline = tokio::time::sleep(CLOSE_WAIT);
        tokio::pin!(deadline);
        let mut records_open = true;
        loop {
            tokio::select! {
                _ = &mut join => break,
                _ = &mut deadline => {
                    tracing::warn!(connector = %connector, wait = ?CLOSE_WAIT,
                        "the consumer did not close in time; leaving it (its group sees the session end)");
                    break;
                }
                Some(message) = control.recv() => {
                    if let Control::Revoked { ack } = message { let _ = ack.send(()); }
                }
                message = rx.recv(), if records_open => records_open = message.is_some(),
            }
        }
    }
}

fn consumer_config(connector: &str, kafka: &KafkaSettings, source: &SourceSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", &source.group_id)
        .set("client.id", format!("kawka-{connector}"))
        // Offsets move only when the sink says the effects are durable.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match source.start {
                StartPosition::Earliest => "earliest",
                StartPosition::Latest => "latest",
            },
        )
        // Half the fetch-ahead cap; the records channel holds the other half.
        .set("queued.max.messages.kbytes", (source.max_prefetch_bytes / 2 / 1024).max(1).to_string())
        // librdkafka fetches until this many records wait (100k by
        // default): with small records that, not the byte cap, set the
        // memory (~500 bytes each with librdkafka's own, 40 MB more peak
        // RSS than two batches ahead, which keep the pipeline fed).
        .set("queued.min.messages", source.max_prefetch_records.max(1000).to_string())
        // Smaller per-partition fetches interleave the partitions in the
        // queue, so a batch holds several of them and the Postgres sink
        // writes their shares concurrently (1 MiB would give ~10k records
        // of one partition in a row).
        .set("max.partition.fetch.bytes", "262144")
        // Once a partition holds `queued.min.messages` fetched records,
        // librdkafka waits this long before fetching it again (1 s by
        // default): the pipeline then drains the queue and idles. That
        // capped a consumer at ~185k records/s on the benchmark machine
        // whatever it did with them; with 10 ms, 1.6M/s. The queue stays
        // bounded by the two settings above.
        .set("fetch.queue.backoff.ms", "10");
    for (key, value) in kafka.properties.iter().chain(source.properties.iter()) {
        config.set(key, value);
    }
    config
}

/// A consumer of `group` that never joins it: for reading and setting the
/// group's committed offsets from outside (rebuilds).
fn group_client(kafka: &KafkaSettings, group: &str) -> KafkaResult<BaseConsumer> {
    group_config(kafka, group).create().map_err(redact_config_error)
}

/// A client of `source`'s group that reads as its consumer does: only its
/// `isolation.level` is taken from its properties (others, such as a
/// static `group.instance.id`, belong to the consumer alone).
fn offsets_config(kafka: &KafkaSettings, source: &super::SourceSettings) -> ClientConfig {
    let mut config = group_config(kafka, &source.group_id);
    if let Some(isolation) = source.properties.get("isolation.level") {
        config.set("isolation.level", isolation);
    }
    config
}

fn group_config(kafka: &KafkaSettings, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers).set("group.id", group).set("enable.auto.commit", "false");
    for (key, value) in kafka.properties.iter() {
        config.set(key, value);
    }
    config
}

/// librdkafka's refusal of a setting names the setting and its value
/// (rdkafka's `Display` prints both): the value of a secret setting
/// ([`crate::secret::is_secret_key`]) becomes `***`, in the description too.
pub fn redact_config_error(error: rdkafka::error::KafkaError) -> rdkafka::error::KafkaError {
    match error {
        rdkafka::error::KafkaError::ClientConfig(code, description, key, value)
            if crate::secret::is_secret_key(&key) && !value.is_empty() =>
        {
            rdkafka::error::KafkaError::ClientConfig(code, description.replace(&value, "***"), key, "***".to_string())
        }
        other => other,
    }
}

/// Reads one group's committed offsets on the partitions of some topics,
/// again and again through one client (a rebuild polls them several times
/// a second). Blocking: call it from `spawn_blocking`.
pub struct GroupOffsets {
    // Declared before the consumer so it is dropped first (see STACK.md).
    wanted: TopicPartitionList,
    consumer: BaseConsumer,
}

impl GroupOffsets {
    pub fn new(kafka: &KafkaSettings, group: &str, topics: &[String]) -> KafkaResult<GroupOffsets> {
        GroupOffsets::built(group_client(kafka, group)?, topics)
    }

    /// One for `source`'s group and topics that reads the log's ends as
    /// `source`'s consumer reads it: under its `isolation.level` (the end is
    /// the last stable offset under `read_committed`, librdkafka's default,
    /// the high watermark under `read_uncommitted`).
    pub fn of_source(kafka: &KafkaSettings, source: &super::SourceSettings) -> KafkaResult<GroupOffsets> {
        GroupOffsets::built(offsets_config(kafka, source).create().map_err(redact_config_error)?, &source.topics)
    }

    fn built(consumer: BaseConsumer, topics: &[String]) -> KafkaResult<GroupOffsets> {
        let mut wanted = TopicPartitionList::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                wanted.add_partition(topic, partition.id());
            }
        }
        Ok(GroupOffsets { wanted, consumer })
    }

    /// (topic, partition, next offset) of every partition with a commit.
    pub fn read(&self) -> KafkaResult<Vec<(String, i32, i64)>> {
        let committed = self.consumer.committed_offsets(self.wanted.clone(), Duration::from_secs(10))?;
        let offsets = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(n) => Some((e.topic().to_string(), e.partition(), n)),
                _ => None,
            })
            .collect();
        // The list goes before the consumer (see STACK.md).
        drop(committed);
        Ok(offsets)
    }

    /// (topic, partition, end) of every partition that holds records:
    /// where the log ends now as this client reads it (the high watermark,
    /// or the last stable offset under `read_committed`: see
    /// [`GroupOffsets::of_source`]), as the broker says (some brokers
    /// misreport it; see STACK.md). A partition whose records all expired
    /// (start = end) has nothing to read and is left out.
    pub fn ends(&self) -> KafkaResult<Vec<(String, i32, i64)>> {
        let partitions = self.wanted.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        let watermarks = self.watermarks(partitions)?;
        Ok(watermarks.into_iter().filter(|(_, _, low, high)| high > low).map(|(t, p, _, high)| (t, p, high)).collect())
    }

    /// (topic, partition, low watermark) of each of `partitions`: where its
    /// log starts now (what was below expired or was deleted).
    pub fn starts(&self, partitions: &[(String, i32)]) -> KafkaResult<Vec<(String, i32, i64)>> {
        Ok(self.watermarks(partitions.to_vec())?.into_iter().map(|(t, p, low, _)| (t, p, low)).collect())
    }

    /// (topic, partition, low, high) of each partition, one after the other
    /// (librdkafka asks the earliest and the latest offsets of each at once).
    fn watermarks(&self, partitions: Vec<(String, i32)>) -> KafkaResult<Vec<(String, i32, i64, i64)>> {
        let mut watermarks = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            let (low, high) = self.consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
            watermarks.push((topic, partition, low, high));
        }
        Ok(watermarks)
    }
}

/// The offsets `group` has committed on the partitions of `topics`, once.
/// Blocking.
pub fn committed_offsets(
    kafka: &KafkaSettings,
    group: &str,
    topics: &[String],
) -> KafkaResult<Vec<(String, i32, i64)>> {
    GroupOffsets::new(kafka, group, topics)?.read()
}

/// Commits `positions` (next offsets) for `group`, which has no members:
/// a group made to start a consumer at chosen positions. Blocking.
pub fn commit_offsets(kafka: &KafkaSettings, group: &str, positions: &[(String, i32, i64)]) -> KafkaResult<()> {
    let consumer = group_client(kafka, group)?;
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, next) in positions {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    let result = consumer.commit(&tpl, CommitMode::Sync);
    drop(tpl);
    result
}

fn poll_loop(
    connector: &str,
    consumer: &BaseConsumer<SourceContext>,
    tx: &RecordsSender,
    stopping: &AtomicBool,
    status: &ConnectorStatus,
    assign_all: Option<&[String]>,
) {
    let context = consumer.context();
    let mut records = RecordQueue::new(consumer);
    // Unset when this thread ends, even by a panic: the queue goes first.
    let _published = Published::new(context, &records);
    // Partitions assigned without the group (`assign_all`).
    let mut assigned = 0;
    if let Some(topics) = assign_all {
        // As a rebalance would, with every partition: claims, the forward
        // to the record queue, `Assigned` on the control channel.
        let Some(mut partitions) = every_partition(connector, consumer, topics, stopping, Some(status)) else { return };
        assigned = partitions.count();
        context.assign(consumer, &mut partitions);
    }
    let mut chunk: Vec<RawRecord> = Vec::with_capacity(CHUNK);
    let mut chunk_generation = context.generation.load(Ordering::SeqCst);
    let mut watermarks_at = std::time::Instant::now();
    let mut commit_checked = std::time::Instant::now();
    // The size of records read lately, to size reads by bytes.
    let mut average = 1;
    let held = |chunk: &[RawRecord]| chunk.iter().map(RawRecord::size).sum::<usize>();
    while !stopping.load(Ordering::SeqCst) {
        if watermarks_at.elapsed() >= WATERMARK_EVERY {
            watermarks_at = std::time::Instant::now();
            report_watermarks(consumer, status);
            // Partitions added since the assignment: all assigned again, as
            // a rebalance would (the pipeline flushes, the claims give each
            // partition's position back); what is gathered goes stale.
            let more = assign_all.and_then(|topics| every_partition(connector, consumer, topics, stopping, None));
            if let Some(mut partitions) = more.filter(|p| p.count() > assigned) {
                context.revoke(consumer);
                assigned = partitions.count();
                context.assign(consumer, &mut partitions);
            }
        }
        // Events first: a rebalance they run makes what was gathered stale.
        serve_events(connector, consumer, &mut chunk, &mut chunk_generation, Duration::ZERO);
        context.commit_if_behind(consumer, &mut commit_checked);
        // (What `serve_events` or a full channel left may exceed a chunk;
        // it is usually nothing, and then not summed.)
        let left = if chunk.is_empty() { 0 } else { held(&chunk) };
        let room = tx.room(chunk.len(), left, average);
        if records.read(&mut chunk, room, Duration::ZERO, connector) == 0 && chunk.is_empty() {
            // Nothing waiting: wait for one record (the batch call waits
            // for all it is asked for), then take what came with it.
            if records.read(&mut chunk, 1, Duration::from_millis(100), connector) == 0 {
                continue;
            }
            // The one record read sizes the rest of the read.
            average = chunk.first().map_or(1, RawRecord::size).max(1);
            let room = tx.room(1, average, average);
            records.read(&mut chunk, room, Duration::ZERO, connector);
        }
        if chunk.is_empty() {
            continue;
        }
        // Each record's size is summed once, here (its headers included).
        let bytes = held(&chunk);
        average = (bytes / chunk.len()).max(1);
        let batch = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
        let message = Chunk { generation: chunk_generation, records: batch, bytes };
        (chunk, chunk_generation) =
            send_or_wait(consumer, &mut records, tx, stopping, message, chunk_generation, &mut commit_checked);
    }
}

/// Every partition of `topics` the broker's metadata knows (a topic it
/// does not know yet is left out, with a warning: the next look adds
/// it). When it knows none: `None`, or when `patient` (the status to
/// show the wait on) asked again each second (`None` once stopping).
/// Blocking: the patient look waits up to 5 s per topic, the other 1 s.
fn every_partition(
    connector: &str,
    consumer: &BaseConsumer<SourceContext>,
    topics: &[String],
    stopping: &AtomicBool,
    patient: Option<&ConnectorStatus>,
) -> Option<TopicPartitionList> {
    let timeout = Duration::from_secs(if patient.is_some() { 5 } else { 1 });
    let mut attempt = 0;
    while !stopping.load(Ordering::SeqCst) {
        let mut unknown = Vec::new();
        let mut partitions = TopicPartitionList::new();
        for topic in topics {
            let found = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| e.to_string()).and_then(|metadata| {
                match metadata.topics().first() {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        Ok(t.partitions().iter().map(|p| p.id()).collect::<Vec<i32>>())
                    }
                    Some(t) => Err(format!("{:?}", t.error())),
                    None => Err("not in the metadata".to_string()),
                }
            });
            match found {
                Ok(ids) => ids.into_iter().for_each(|id| {
                    partitions.add_partition(topic, id);
                }),
                Err(error) => unknown.push(format!("{topic}: {error}")),
            }
        }
        let Some(status) = patient else { return (partitions.count() > 0).then_some(partitions) };
        if partitions.count() > 0 {
            if !unknown.is_empty() {
                tracing::warn!(connector, topics = ?unknown, "topics not known yet; reading the others (added when they appear)");
            }
            status.recovered();
            return Some(partitions);
        }
        // Nothing to read yet: a visible retry (state `retrying`, stage
        // source) until a topic appears or the consumer stops.
        let message = format!("no partition of the topics is known yet ({})", unknown.join("; "));
        status.retrying("source", crate::error::ErrorClass::Transient, &message, attempt);
        attempt += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    None
}

/// Publishes the record queue to the rebalance handler for as long as it
/// lives.
struct Published<'a> {
    context: &'a SourceContext,
}

impl<'a> Published<'a> {
    fn new(context: &'a SourceContext, records: &RecordQueue) -> Published<'a> {
        *context.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(records.handle());
        Published { context }
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        *self.context.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }
}

/// Serves the consumer queue's events (rebalances, errors) until it is
/// empty, waiting up to `timeout` for the first. A record found there (a
/// partition librdkafka would not forward) joins `chunk`: its partition's
/// records all come this way, so their order holds. A rebalance (run
/// inside `poll`) makes what `chunk` holds stale: it is cleared and
/// `generation` moves to the new assignment's.
fn serve_events(
    connector: &str,
    consumer: &BaseConsumer<SourceContext>,
    chunk: &mut Vec<RawRecord>,
    generation: &mut u64,
    timeout: Duration,
) {
    let mut timeout = timeout;
    loop {
        let polled = consumer.poll(timeout);
        let now = consumer.context().generation.load(Ordering::SeqCst);
        if now != *generation {
            chunk.clear();
            *generation = now;
        }
        match polled {
            None => break,
            Some(Ok(message)) => chunk.push(raw_record(&message)),
            Some(Err(error)) => tracing::warn!(connector, %error, "kafka consumer error"),
        }
        timeout = Duration::ZERO;
    }
}

/// Asks the broker for the high watermarks of the assignment, for lag.
fn report_watermarks(consumer: &BaseConsumer<SourceContext>, status: &ConnectorStatus) {
    let Ok(assignment) = consumer.assignment() else { return };
    let mut marks = Vec::new();
    for element in assignment.elements() {
        if let Ok((_, high)) =
            consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_millis(500))
        {
            marks.push((intern(element.topic()), element.partition(), high));
        }
    }
    status.high_watermarks(&marks);
}

/// Sends a chunk; while the channel stays full, pauses the assignment and
/// keeps polling so rebalances and liveness are still served. Returns the
/// records polled meanwhile (librdkafka purges paused partitions' queues,
/// but one fetched just before the pause may still come): they follow the
/// chunk, in order, with the generation they belong to (a rebalance served
/// meanwhile drops the chunk: the new assignment starts from the stored
/// positions).
fn send_or_wait(
    consumer: &BaseConsumer<SourceContext>,
    records: &mut RecordQueue,
    tx: &RecordsSender,
    stopping: &AtomicBool,
    message: Chunk,
    generation: u64,
    commit_checked: &mut std::time::Instant,
) -> (Vec<RawRecord>, u64) {
    let mut message = match tx.try_send(message) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return (Vec::new(), generation),
        Err(mpsc::error::TrySendError::Full(message)) => message,
    };
    // Short waits first: the pipeline usually takes a chunk within a batch
    // write. Pausing would purge librdkafka's fetched data and refetch it
    // on resume, which costs more than it saves when the wait is short.
    // The wait ends the moment a slot frees (sleeping and retrying instead
    // left the pipeline idle for up to a nap after it drained the channel).
    let context = consumer.context();
    let patient_until = std::time::Instant::now() + PATIENCE;
    while std::time::Instant::now() < patient_until && !stopping.load(Ordering::SeqCst) {
        // The batches ahead become durable while this one waits.
        context.commit_if_behind(consumer, commit_checked);
        // This is the consumer's own thread, outside the runtime; the
        // timer is made inside it (tokio's timers need the runtime).
        let _ = context.runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), async {
                // Room in bytes first (the pipeline signals each chunk it
                // takes), then a slot in the channel.
                while !tx.bytes.has_room(message.bytes) {
                    tx.bytes.freed.notified().await;
                }
                let _ = tx.tx.reserve().await.map(drop);
            })
            .await
        });
        match tx.try_send(message) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return (Vec::new(), generation),
            Err(mpsc::error::TrySendError::Full(back)) => message = back,
        }
    }
    let mut overflow = Vec::new();
    let mut overflow_generation = generation;
    let paused = consumer.assignment().ok();
    if let Some(assignment) = &paused {
        let _ = consumer.pause(assignment);
    }
    let connector = context.connector.as_str();
    while !stopping.load(Ordering::SeqCst) {
        serve_events(connector, consumer, &mut overflow, &mut overflow_generation, Duration::ZERO);
        context.commit_if_behind(consumer, commit_checked);
        if overflow_generation != generation {
            // A rebalance ran: the chunk is stale. librdkafka keeps a
            // partition's pause across an unassign and a new assign, so the
            // partitions paused here that the new assignment kept would
            // stay paused for good: resumed (the others are not assigned;
            // resuming them changes nothing).
            if let Some(assignment) = &paused {
                let _ = consumer.resume(assignment);
            }
            return (overflow, overflow_generation);
        }
        records.read(&mut overflow, 1, Duration::from_millis(50), connector);
        let room = CHUNK.saturating_sub(overflow.len());
        records.read(&mut overflow, room, Duration::ZERO, connector);
        match tx.try_send(message) {
            Ok(()) => break,
            Err(mpsc::error::TrySendError::Closed(_)) => break,
            Err(mpsc::error::TrySendError::Full(back)) => message = back,
        }
    }
    if let Some(assignment) = paused {
        let _ = consumer.resume(&assignment);
    }
    (overflow, overflow_generation)
}

/// A message as the pipeline's record (also how the dead-letter tools read theirs).
pub fn raw_record<M: Message>(message: &M) -> RawRecord {
    let headers = message
        .headers()
        .map(|headers| headers.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    RawRecord {
        position: Position { topic: intern(message.topic()), partition: message.partition(), offset: message.offset() },
        timestamp: message.timestamp().to_millis(),
        key: message.key().map(KeyBytes::from_slice),
        value: message.payload().map(bytes::Bytes::copy_from_slice),
        headers,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refused_secret_setting_does_not_show_its_value() {
        // This build of librdkafka has no OpenSSL: it refuses ssl.* settings,
        // and rdkafka's error would print the value.
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", "127.0.0.1:1").set("ssl.key.password", "hunter2-secret");
        let error = config.create::<BaseConsumer>().map_err(redact_config_error).err().expect("refused");
        let text = format!("{error} {error:?}");
        assert!(text.contains("ssl.key.password") && !text.contains("hunter2-secret"), "{text}");
        // Other settings keep their value: it says what is wrong.
        let mut config = ClientConfig::new();
        config.set("fetch.max.bytes", "lots");
        let error = config.create::<BaseConsumer>().map_err(redact_config_error).err().expect("refused");
        assert!(error.to_string().contains("lots"), "{error}");
    }

    /// The ends a cut-over waits for are where the connector's own reads
    /// end: its `isolation.level` carries over, and nothing else of its own.
    #[test]
    fn the_offsets_client_reads_under_the_connectors_isolation_level() {
        let kafka = KafkaSettings {
            bootstrap_servers: "127.0.0.1:1".to_string(),
            properties: BTreeMap::from([("client.id".to_string(), "kawka".to_string())]).into(),
        };
        let source = |properties: &[(&str, &str)]| SourceSettings {
            topics: vec!["events".to_string()],
            start: StartPosition::Earliest,
            group_id: "live".to_string(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
                .into(),
            max_prefetch_bytes: 1 << 20,
            max_prefetch_records: 1000,
            max_record_bytes: 1 << 20,
            assign_all: false,
        };
        let config = offsets_config(
            &kafka,
            &source(&[("isolation.level", "read_uncommitted"), ("group.instance.id", "live-1")]),
        );
        assert_eq!(config.get("isolation.level"), Some("read_uncommitted"));
        assert_eq!(config.get("group.instance.id"), None, "a static member id is the consumer's alone");
        assert_eq!((config.get("group.id"), config.get("client.id")), (Some("live"), Some("kawka")));
        assert_eq!(offsets_config(&kafka, &source(&[])).get("isolation.level"), None, "librdkafka's default");
    }

    use std::collections::BTreeMap;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::types::RDKafkaApiKey;

    use super::*;
    use crate::event::PartitionOffset;

    /// An asynchronous commit that fails is made again until one lands, so
    /// the group's committed offsets reach what was written even when no
    /// batch follows (a rebuild's cut-over waits for exactly that).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_is_made_again_until_one_lands() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("events", 1, 1).expect("a topic");
        let bootstrap = cluster.bootstrap_servers();
        let producer: BaseProducer =
            ClientConfig::new().set("bootstrap.servers", &bootstrap).create().expect("a producer");
        for _ in 0..10 {
            producer.send(BaseRecord::<str, str>::to("events").key("k").payload("v")).expect("queued");
        }
        producer.flush(Duration::from_secs(10)).expect("produced");
        let kafka = KafkaSettings { bootstrap_servers: bootstrap, properties: Default::default() };
        let source = SourceSettings {
            topics: vec!["events".to_string()],
            start: StartPosition::Earliest,
            group_id: "kawka.retries".to_string(),
            properties: BTreeMap::from([("session.timeout.ms".to_string(), "6000".to_string())]).into(),
            max_prefetch_bytes: 1 << 20,
            max_prefetch_records: 1000,
            max_record_bytes: 1 << 20,
            assign_all: false,
        };
        let status = Arc::new(ConnectorStatus::new("retries", "postgres"));
        let (consumer, mut channels) = KafkaSource::start("retries", &kafka, &source, None, status).expect("started");
        let mut read = 0;
        while read < 10 {
            let next = tokio::time::timeout(Duration::from_secs(30), channels.records.recv());
            match next.await.expect("records within 30 s") {
                Some(chunk) => read += chunk.records.len(),
                None => panic!("the source ended"),
            }
        }
        // The next commits fail; no batch follows the one written.
        let failures = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3];
        cluster.request_errors(RDKafkaApiKey::OffsetCommit, &failures);
        let topic = crate::value::intern("events");
        let generation = Some(consumer.consumer.context().generation.load(Ordering::SeqCst));
        consumer.durable(&[PartitionOffset { topic, partition: 0, next_offset: 10, epoch: None }], generation);
        let committed = tokio::task::spawn_blocking(move || {
            let offsets = GroupOffsets::new(&kafka, "kawka.retries", &["events".to_string()]).expect("a reader");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let now = offsets.read().expect("committed offsets");
                if now == [("events".to_string(), 0, 10)] || std::time::Instant::now() > deadline {
                    return now;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .expect("read");
        assert_eq!(committed, vec![("events".to_string(), 0, 10)], "the written position is committed in the end");
        consumer.stop(channels).await;
    }

    /// Where each partition's log starts and ends, an empty one included
    /// in the starts but not in the ends.
    #[test]
    fn the_logs_starts_and_ends_per_partition() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("events", 2, 1).expect("a topic");
        let bootstrap = cluster.bootstrap_servers();
        let producer: BaseProducer =
            ClientConfig::new().set("bootstrap.servers", &bootstrap).create().expect("a producer");
        for _ in 0..7 {
            producer.send(BaseRecord::<str, str>::to("events").partition(1).key("k").payload("v")).expect("queued");
        }
        producer.flush(Duration::from_secs(10)).expect("produced");
        let kafka = KafkaSettings { bootstrap_servers: bootstrap, properties: Default::default() };
        let offsets = GroupOffsets::new(&kafka, "readers", &["events".to_string()]).expect("a reader");
        let events = |p: i32, offset: i64| ("events".to_string(), p, offset);
        let both = [("events".to_string(), 0), ("events".to_string(), 1)];
        assert_eq!(offsets.starts(&both).expect("starts"), vec![events(0, 0), events(1, 0)]);
        assert_eq!(offsets.ends().expect("ends"), vec![events(1, 7)]);
    }
}
