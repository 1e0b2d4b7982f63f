//! The Kafka consumer of one connector, on its own OS thread.
//!
//! librdkafka's consumer is driven by `poll`, which also runs the rebalance
//! callback; the callback must finish its work (claiming partitions in the
//! sink, letting the pipeline flush before a revoke) before the assignment
//! changes, so it blocks. Keeping the consumer on a thread of its own lets
//! it block without stalling the async runtime.
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

use super::RawRecord;
use crate::config::{KafkaSettings, SourceSettings, StartPosition};
use crate::event::Position;
use crate::sink::Claim;
use crate::status::ConnectorStatus;
use crate::value::{intern, Name};

/// Records per chunk sent to the pipeline.
const CHUNK: usize = 1000;
/// Chunks the channel holds.
const CHANNEL_CHUNKS: usize = 8;
/// How long a full channel is waited on before the partitions are paused
/// (well below `max.poll.interval.ms`: rebalances are served only by polls).
const PATIENCE: Duration = Duration::from_secs(5);
/// How often the high watermarks are fetched (for lag).
const WATERMARK_EVERY: Duration = Duration::from_secs(5);
/// How long a revoke waits for the pipeline to flush.
const REVOKE_WAIT: Duration = Duration::from_secs(30);

/// Claims partitions in the sink: returns the positions to start from.
/// Must retry transient errors itself; it runs inside the rebalance.
pub type ClaimFn = Arc<dyn Fn(Vec<(Name, i32)>) -> BoxFuture<'static, Vec<Claim>> + Send + Sync>;

/// What the consumer thread tells the pipeline, in order.
#[derive(Debug)]
pub enum SourceMessage {
    /// New partitions; `generation` tags the records that follow.
    Assigned {
        generation: u64,
        claims: Vec<Claim>,
    },
    Records {
        generation: u64,
        records: Vec<RawRecord>,
    },
    /// Partitions are being taken away: flush what is pending, then ack.
    Revoked {
        ack: std::sync::mpsc::SyncSender<()>,
    },
    /// The consumer thread failed and stopped polling (the context keeps a
    /// sender, so the channel alone would never say so).
    Ended {
        reason: String,
    },
}

struct SourceContext {
    tx: mpsc::Sender<SourceMessage>,
    claim: Option<ClaimFn>,
    runtime: tokio::runtime::Handle,
    start: StartPosition,
    generation: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// Positions durable in the sink, committed to Kafka on revoke.
    durable: Mutex<HashMap<(Name, i32), i64>>,
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
            let _ = self.tx.blocking_send(SourceMessage::Assigned { generation, claims });
        }
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>) {
        if !self.stopping.load(Ordering::SeqCst) {
            let (ack, acked) = std::sync::mpsc::sync_channel(1);
            if self.tx.blocking_send(SourceMessage::Revoked { ack }).is_ok() && acked.recv_timeout(REVOKE_WAIT).is_err()
            {
                tracing::warn!(connector = %self.connector, "pipeline did not flush before the revoke; fencing protects the positions");
            }
        }
        // Records still in flight belong to the old assignment.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.commit_durable(consumer, CommitMode::Sync);
        if let Err(error) = consumer.unassign() {
            tracing::warn!(connector = %self.connector, %error, "unassign failed");
        }
        tracing::info!(connector = %self.connector, "partitions revoked");
    }

    fn commit_durable(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) {
        let durable = self.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if durable.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in durable {
            // Kafka's committed offset is, like ours, last processed + 1.
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next));
        }
        if let Err(error) = consumer.commit(&tpl, mode) {
            tracing::debug!(connector = %self.connector, %error, "offset commit to kafka failed");
        }
    }
}

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
    ) -> KafkaResult<(KafkaSource, mpsc::Receiver<SourceMessage>)> {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let stopping = Arc::new(AtomicBool::new(false));
        let context = SourceContext {
            tx: tx.clone(),
            claim,
            runtime: tokio::runtime::Handle::current(),
            start: source.start,
            generation: AtomicU64::new(0),
            stopping: stopping.clone(),
            durable: Mutex::new(HashMap::new()),
            connector: connector.to_string(),
        };
        let config = consumer_config(connector, kafka, source);
        let consumer: BaseConsumer<SourceContext> = config.create_with_context(context)?;
        let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let thread = {
            let consumer = consumer.clone();
            let stopping = stopping.clone();
            let name = connector.to_string();
            std::thread::Builder::new()
                .name(format!("kafka-{connector}"))
                .spawn(move || {
                    let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        poll_loop(&name, &consumer, &tx, &stopping, &status)
                    }));
                    if let Err(panic) = polled {
                        let reason = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        let reason = format!("the kafka consumer thread failed: {reason}");
                        tracing::error!(connector = %name, %reason, "consumer thread failed");
                        let _ = tx.blocking_send(SourceMessage::Ended { reason });
                    }
                })
                .map_err(|error| rdkafka::error::KafkaError::ClientCreation(error.to_string()))?
        };
        Ok((KafkaSource { consumer, stopping, thread: Some(thread) }, rx))
    }

    /// Records positions that are durable in the sink and commits them to
    /// Kafka asynchronously.
    pub fn durable(&self, offsets: &[crate::sink::PartitionOffset]) {
        let context = self.consumer.context();
        {
            let mut durable = context.durable.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for offset in offsets {
                durable.insert((offset.topic, offset.partition), offset.next_offset);
            }
        }
        context.commit_durable(&self.consumer, CommitMode::Async);
    }

    /// Stops polling, commits what is durable, leaves the group. Drains
    /// `rx` meanwhile, so a thread blocked on a full channel can finish.
    pub async fn stop(mut self, mut rx: mpsc::Receiver<SourceMessage>) {
        self.stopping.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else { return };
        let consumer = self.consumer.clone();
        let mut join = tokio::task::spawn_blocking(move || {
            let _ = thread.join();
            consumer.context().commit_durable(&consumer, CommitMode::Sync);
            // The last reference leaves the group: BaseConsumer's drop closes.
            drop(consumer);
        });
        drop(self);
        loop {
            tokio::select! {
                _ = &mut join => break,
                message = rx.recv() => match message {
                    Some(SourceMessage::Revoked { ack }) => { let _ = ack.send(()); }
                    Some(_) => {}
                    None => { let _ = (&mut join).await; break; }
                },
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
        .set("queued.max.messages.kbytes", (source.max_prefetch_bytes / 1024).max(1).to_string())
        // Smaller per-partition fetches interleave the partitions in the
        // queue, so a batch holds several of them and the Postgres sink
        // writes their shares concurrently (1 MiB would give ~10k records
        // of one partition in a row).
        .set("max.partition.fetch.bytes", "262144");
    for (key, value) in kafka.properties.iter().chain(&source.properties) {
        config.set(key, value);
    }
    config
}

/// A consumer of `group` that never joins it: for reading and setting the
/// group's committed offsets from outside (rebuilds).
fn group_client(kafka: &KafkaSettings, group: &str) -> KafkaResult<BaseConsumer> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers).set("group.id", group).set("enable.auto.commit", "false");
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config.create()
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
        let consumer = group_client(kafka, group)?;
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
    tx: &mpsc::Sender<SourceMessage>,
    stopping: &AtomicBool,
    status: &ConnectorStatus,
) {
    let context = consumer.context();
    let mut chunk: Vec<RawRecord> = Vec::with_capacity(CHUNK);
    let mut chunk_generation = 0;
    let mut watermarks_at = std::time::Instant::now();
    while !stopping.load(Ordering::SeqCst) {
        if watermarks_at.elapsed() >= WATERMARK_EVERY {
            watermarks_at = std::time::Instant::now();
            report_watermarks(consumer, status);
        }
        let mut timeout = Duration::from_millis(100);
        while chunk.len() < CHUNK {
            match consumer.poll(timeout) {
                None => break,
                Some(Ok(message)) => {
                    let generation = context.generation.load(Ordering::SeqCst);
                    if generation != chunk_generation && !chunk.is_empty() {
                        // A rebalance ran during this poll: what was
                        // gathered belongs to the old assignment.
                        chunk.clear();
                    }
                    chunk_generation = generation;
                    chunk.push(raw_record(&message));
                }
                Some(Err(error)) => {
                    tracing::warn!(connector, %error, "kafka consumer error");
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        if chunk.is_empty() {
            continue;
        }
        let records = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
        chunk = send_or_wait(consumer, tx, stopping, SourceMessage::Records { generation: chunk_generation, records });
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
/// chunk, in order.
fn send_or_wait(
    consumer: &BaseConsumer<SourceContext>,
    tx: &mpsc::Sender<SourceMessage>,
    stopping: &AtomicBool,
    message: SourceMessage,
) -> Vec<RawRecord> {
    let mut message = match tx.try_send(message) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return Vec::new(),
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
        // This is the consumer's own thread, outside the runtime; the
        // timer is made inside it (tokio's timers need the runtime).
        let slot =
            context.runtime.block_on(async { tokio::time::timeout(Duration::from_millis(100), tx.reserve()).await });
        match slot {
            Ok(Ok(permit)) => {
                permit.send(message);
                return Vec::new();
            }
            Ok(Err(_closed)) => return Vec::new(),
            Err(_still_full) => {}
        }
    }
    let mut overflow = Vec::new();
    let paused = consumer.assignment().ok();
    if let Some(assignment) = &paused {
        let _ = consumer.pause(assignment);
    }
    while !stopping.load(Ordering::SeqCst) {
        if let Some(Ok(record)) = consumer.poll(Duration::from_millis(50)) {
            overflow.push(raw_record(&record));
        }
        if let SourceMessage::Records { generation, .. } = &message {
            if *generation != context.generation.load(Ordering::SeqCst) {
                // A rebalance ran: the chunk belongs to the old assignment,
                // and the new one starts from the stored positions.
                overflow.clear();
                return overflow;
            }
        }
        match tx.try_send(message) {
            Ok(()) => break,
            Err(mpsc::error::TrySendError::Closed(_)) => break,
            Err(mpsc::error::TrySendError::Full(back)) => message = back,
        }
    }
    if let Some(assignment) = paused {
        let _ = consumer.resume(&assignment);
    }
    overflow
}

fn raw_record<M: Message>(message: &M) -> RawRecord {
    let headers = message
        .headers()
        .map(|headers| headers.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    RawRecord {
        position: Position { topic: intern(message.topic()), partition: message.partition(), offset: message.offset() },
        timestamp: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}
