//! `kawka dlq replay`: feeds a connector's dead letters back through it
//! once the cause is fixed.
//!
//! The replay is the connector itself reading its dead-letter topic (its
//! own consumer group, `<group>.dlq-replay`; for Postgres its own rows in
//! `kawka_offsets`, so replayed effects also land exactly once). Events that
//! fail again are dead-lettered again, marked with the run's id; the run
//! stops when it meets them, or when the topic is idle, so it never loops.
//!
//! A replayed event keeps its original position (the `kawka.error.topic`,
//! `.partition` and `.offset` headers): the fold and the guards see it
//! where it was in the log, so an event newer ones have overtaken is found
//! superseded (counted, never written) rather than applied over them.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::{ConnectorRuntime, ReplayRun, REPLAY_HEADER};
use crate::error::Failure;
use crate::event::Position;
use crate::projection::WriteOp;
use crate::source::{KafkaSettings, RawRecord, StartPosition};
use crate::status::Outcome;

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    pub read: u64,
    pub written: u64,
    /// Found applied, or overtaken by newer events, by the sink's guards:
    /// never written.
    pub superseded: u64,
    pub failed_again: u64,
    pub skipped: u64,
}

/// Turns a connector's runtime into the runtime that replays its dead letters.
pub fn replay_runtime(mut runtime: ConnectorRuntime, idle: Duration) -> ConnectorRuntime {
    let mut settings = (*runtime.settings).clone();
    settings.source.topics = vec![settings.dead_letter_topic.clone()];
    settings.source.group_id = format!("{}.dlq-replay", settings.source.group_id);
    settings.source.start = StartPosition::Earliest;
    runtime.settings = Arc::new(settings);
    let id = format!("{:016x}", rand::random::<u64>());
    runtime.replay = Some(ReplayRun { id, idle });
    runtime
}

/// Runs the replay until the dead-letter topic has nothing more for it.
pub async fn run(runtime: ConnectorRuntime, shutdown: watch::Receiver<bool>) -> ReplaySummary {
    let status = runtime.status.clone();
    let _ = runtime.run(shutdown).await;
    ReplaySummary {
        read: status.total(Outcome::Consumed),
        written: status.total(Outcome::Written),
        superseded: status.total(Outcome::Superseded),
        failed_again: status.total(Outcome::DeadLettered),
        skipped: status.total(Outcome::Skipped) + status.total(Outcome::Unknown),
    }
}

/// What one dead letter would do now.
#[derive(Debug, Clone, PartialEq)]
pub struct DryRunLine {
    pub position: Position,
    /// Ops it would write (0: its event type has no rule), or why it fails.
    pub outcome: Result<usize, Failure>,
}

/// Reads the dead-letter topic from the beginning, without a group and
/// without writing, and says what each dead letter would do now.
pub async fn dry_run(runtime: &ConnectorRuntime, idle: Duration) -> anyhow::Result<Vec<DryRunLine>> {
    let topic = runtime.settings.dead_letter_topic.clone();
    let kafka = runtime.kafka.clone();
    let records = tokio::task::spawn_blocking(move || read_all(&kafka, &topic, idle)).await??;
    let mut lines = Vec::with_capacity(records.len());
    // A parked key's letters are replayed by key (`replay_parked`).
    let plain =
        records.into_iter().filter(|r| !r.headers.iter().any(|(k, _)| k == crate::parked::PARKED_BEHIND_HEADER));
    for mut record in plain {
        record.headers.retain(|(k, _)| !k.starts_with("kawka.error.") && k != REPLAY_HEADER);
        let outcome = evaluate(runtime, &record).await;
        lines.push(DryRunLine { position: record.position, outcome });
    }
    Ok(lines)
}

fn read_all(kafka: &KafkaSettings, topic: &str, idle: Duration) -> anyhow::Result<Vec<RawRecord>> {
    let consumer = reader(kafka, "kawka-dlq-dry-run")?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut records = Vec::new();
    let mut last = std::time::Instant::now();
    while last.elapsed() < idle {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            last = std::time::Instant::now();
            records.push(crate::source::kafka::raw_record(&message));
        }
    }
    Ok(records)
}

/// A consumer of the dead-letter tools: `group` only names it (partitions
/// are assigned, nothing is committed).
pub(super) fn reader(kafka: &KafkaSettings, group: &str) -> anyhow::Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (key, value) in kafka.properties.iter() {
        config.set(key, value);
    }
    Ok(config.create().map_err(crate::source::kafka::redact_config_error)?)
}

/// Decode → upcast → project → check, without writing: how many ops.
async fn evaluate(runtime: &ConnectorRuntime, record: &RawRecord) -> Result<usize, Failure> {
    ops_of(runtime, record).await.map(|ops| ops.len())
}

/// Decode → upcast → project → check, without writing: the ops a record
/// becomes now, or why it fails (a registry outage included: the caller
/// reports it, nothing is written).
pub(super) async fn ops_of(runtime: &ConnectorRuntime, record: &RawRecord) -> Result<Vec<WriteOp>, Failure> {
    if let Some(oversized) = super::prepare::oversized(runtime, record) {
        return oversized.result.map(|_| Vec::new());
    }
    if let Some(failure) = super::dead_letter::unreplayable(record) {
        return Err(failure);
    }
    let decoded = runtime.codec.decode(record).await.map_err(|error| Failure {
        class: error.class(),
        stage: "decode",
        message: error.to_string(),
    });
    let mut ops = Vec::new();
    super::prepare::prepare(runtime, decoded, record.position, &mut ops, None).result.map(|_| ops)
}
