//! `kawka dlq replay` and `kawka dlq release` of parked keys
//! (`on_error: park`; see [`crate::parked`]).
//!
//! A replay reads the dead-letter topic up to its end, takes each parked
//! key's dead letters in the order they were written (the order its events
//! were read: one key's letters share a partition of the dead-letter
//! topic, since they carry its key), and applies them with their original
//! positions. It stops at a key's first letter that fails again: the key
//! stays parked behind it, what came before it is applied. Postgres writes
//! a key's events and the change of its stored entry in one transaction
//! (exactly once); Elasticsearch writes them first, idempotently.
//!
//! A replay and a running connector may meet: the connector parks more
//! events of a key while the replay applies the earlier ones. The change is
//! decided under the entry's lock (Postgres) or version (Elasticsearch)
//! from what is stored then: the key is released only if every event
//! stored as parked has been applied, and events parked after the letters
//! read are left for the next round.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::replay::ops_of;
use super::{ConnectorRuntime, REPLAY_HEADER};
use crate::error::{Backoff, ErrorClass, Failure};
use crate::event::Position;
use crate::parked::{show_key, Change, ParkedKey, Spot, PARKED_BEHIND_HEADER};
use crate::projection::WriteOp;
use crate::sink::SinkError;
use crate::source::{KafkaSettings, KeyBytes, RawRecord};
use crate::value::intern;

/// How a parked key's replay ended.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyOutcome {
    /// All its parked events applied: the key flows again.
    Released,
    /// An event failed again: the key stays parked behind it.
    Failed { at: Position, failure: Failure },
    /// Events stored as parked were not found in the dead-letter topic
    /// (deleted by retention, or not written yet): the key stays parked.
    Missing { events: u64 },
    /// Released by someone else meanwhile (`kawka dlq release`, another replay).
    Gone,
}

/// One parked key's replay (or, with `--dry-run`, what it would do).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyReport {
    /// As [`show_key`] shows it.
    pub key: String,
    /// Events applied (would be, in a dry run).
    pub replayed: usize,
    /// Of those, found applied or overtaken by a version guard.
    pub superseded: usize,
    pub outcome: KeyOutcome,
}

/// Most rounds of a replay: a round applies what it read; another follows
/// only if a key got more parked events meanwhile and the round moved on.
const MOST_ROUNDS: usize = 20;

/// How often a transient failure of a key's write is retried before the
/// replay gives up on the key (the key stays parked; run it again).
const WRITE_ATTEMPTS: u32 = 8;

/// Replays the parked keys of a connector (`only`: one key), or says what
/// a replay would do (`dry_run`: nothing is written).
pub async fn replay(runtime: &ConnectorRuntime, only: Option<&[u8]>, dry_run: bool) -> anyhow::Result<Vec<KeyReport>> {
    runtime.sink.prepare().await?;
    let connector = runtime.settings.name.clone();
    let mut reports: Vec<(Vec<u8>, KeyReport)> = Vec::new();
    // Keys this run is done with: released, failed again, gone, or
    // missing events a round did not find.
    let mut settled: HashSet<Vec<u8>> = HashSet::new();
    for _ in 0..MOST_ROUNDS {
        let mut keys = runtime.sink.parked_keys(&connector).await?;
        keys.retain(|(key, _)| only.is_none_or(|only| only == key.as_slice()) && !settled.contains(key));
        if keys.is_empty() {
            break;
        }
        let wanted: HashMap<Vec<u8>, ParkedKey> = keys.into_iter().collect();
        let mut letters = read_letters(runtime, &wanted).await?;
        let mut again = false;
        for (key, entry) in &wanted {
            let mine = letters.remove(key).unwrap_or_default();
            let report = replay_key(runtime, key, entry, &mine, dry_run).await?;
            let index = match reports.iter().position(|(k, _)| k == key) {
                Some(index) => index,
                None => {
                    let empty = KeyReport { key: show_key(key), replayed: 0, superseded: 0, outcome: KeyOutcome::Gone };
                    reports.push((key.clone(), empty));
                    reports.len() - 1
                }
            };
            let total = &mut reports[index].1;
            total.replayed += report.replayed;
            total.superseded += report.superseded;
            total.outcome = report.outcome;
            // Events parked while this round read: another round finds
            // them, as long as rounds move on.
            let missing = matches!(total.outcome, KeyOutcome::Missing { .. });
            if missing && report.replayed > 0 && !dry_run {
                again = true;
            } else {
                settled.insert(key.clone());
            }
        }
        if !again {
            break;
        }
    }
    Ok(reports.into_iter().map(|(_, report)| report).collect())
}

/// Replays one key's letters (in the order they were written).
async fn replay_key(
    runtime: &ConnectorRuntime,
    key: &[u8],
    entry: &ParkedKey,
    letters: &[RawRecord],
    dry_run: bool,
) -> anyhow::Result<KeyReport> {
    let shown = show_key(key);
    // The letters this entry wants, once each (a letter may have been
    // written twice: a crash between its send and the entry's change).
    let mut expect = entry.clone();
    let mut todo: Vec<&RawRecord> = Vec::new();
    for letter in letters {
        if expect.wants(letter.position) {
            expect.applied(letter.position);
            todo.push(letter);
        }
    }
    // Each letter's ops, up to the first that fails again.
    let mut ops: Vec<WriteOp> = Vec::new();
    let mut origins: Vec<usize> = Vec::new();
    let mut failed: Option<(Position, Failure)> = None;
    for (at, letter) in todo.iter().enumerate() {
        match ops_of(runtime, letter).await {
            Ok(more) => {
                origins.extend(std::iter::repeat_n(at, more.len()));
                ops.extend(more);
            }
            Err(failure) => {
                failed = Some((letter.position, failure));
                break;
            }
        }
    }
    if let Some((position, _)) = &failed {
        let at = todo.iter().position(|l| l.position == *position).unwrap_or(todo.len());
        todo.truncate(at);
    }
    if dry_run {
        let outcome = outcome_of(&expect, failed);
        return Ok(KeyReport { key: shown, replayed: todo.len(), superseded: 0, outcome });
    }
    let mut attempt = 0;
    loop {
        let applied: Vec<Position> = todo.iter().map(|l| l.position).collect();
        let failure = failed.clone();
        let read = entry.applied.clone();
        // Decided from what is stored now: only if no other replay moved
        // the key since it was read (its `applied` unchanged).
        let decide = move |stored: Option<&ParkedKey>| {
            let stored = stored.filter(|s| s.applied == read)?;
            let mut next = stored.clone();
            for &position in &applied {
                next.applied(position);
            }
            if let Some((at, failure)) = &failure {
                next.behind = Spot::of(*at);
                next.reason = format!("{}: {}", failure.stage, failure.message);
            }
            if next.done() && failure.is_none() {
                Some(Change::Delete)
            } else {
                Some(Change::Put(next))
            }
        };
        match runtime.sink.change_parked(&runtime.settings.name, key, &ops, &decide).await {
            Ok(Some((change, superseded))) => {
                let stored_after = match &change {
                    Change::Delete => None,
                    Change::Put(next) => Some(next),
                };
                let outcome = match (failed, stored_after) {
                    (Some((at, failure)), _) => KeyOutcome::Failed { at, failure },
                    (None, None) => KeyOutcome::Released,
                    (None, Some(next)) => KeyOutcome::Missing { events: next.outstanding() },
                };
                let superseded = origins_of(&superseded, &origins);
                tracing::info!(connector = %runtime.settings.name, key = %shown, replayed = todo.len(),
                    outcome = ?outcome, "parked key replayed");
                return Ok(KeyReport { key: shown, replayed: todo.len(), superseded, outcome });
            }
            Ok(None) => {
                return Ok(KeyReport { key: shown, replayed: 0, superseded: 0, outcome: KeyOutcome::Gone });
            }
            // The sink refuses an event: the key stays parked behind it,
            // with the events before it applied.
            Err(SinkError::RejectedOps(rejected)) => {
                let Some(first) = rejected.iter().filter_map(|(op, _)| origins.get(*op).copied()).min() else {
                    anyhow::bail!("parked key {shown}: the sink refused ops it did not name");
                };
                let message = rejected
                    .iter()
                    .find(|(op, _)| origins.get(*op) == Some(&first))
                    .map_or_else(String::new, |(_, m)| m.clone());
                failed = Some((todo[first].position, Failure { class: ErrorClass::Permanent, stage: "sink", message }));
                todo.truncate(first);
                let keep = origins.iter().take_while(|&&o| o < first).count();
                ops.truncate(keep);
                origins.truncate(keep);
            }
            Err(error) if error.class() == ErrorClass::Permanent => {
                let rejected = runtime.sink.find_rejected(&ops).await?;
                if rejected.is_empty() {
                    anyhow::bail!("parked key {shown}: the sink refuses its events as a whole: {error}");
                }
                let first = rejected.iter().filter_map(|(op, _)| origins.get(*op).copied()).min().unwrap_or(0);
                let message = rejected.first().map_or_else(|| error.to_string(), |(_, m)| m.clone());
                failed = Some((todo[first].position, Failure { class: ErrorClass::Permanent, stage: "sink", message }));
                todo.truncate(first);
                let keep = origins.iter().take_while(|&&o| o < first).count();
                ops.truncate(keep);
                origins.truncate(keep);
            }
            Err(error) => {
                attempt += 1;
                if attempt >= WRITE_ATTEMPTS {
                    anyhow::bail!("parked key {shown}: {error} ({attempt} attempts)");
                }
                tracing::warn!(key = %shown, %error, attempt, "replaying a parked key failed; retrying");
                tokio::time::sleep(
                    Backoff { base: Duration::from_millis(200), cap: Duration::from_secs(5) }.delay(attempt),
                )
                .await;
            }
        }
    }
}

/// The outcome a replay that applies up to `failed` would have.
fn outcome_of(after: &ParkedKey, failed: Option<(Position, Failure)>) -> KeyOutcome {
    match failed {
        Some((at, failure)) => KeyOutcome::Failed { at, failure },
        None if after.done() => KeyOutcome::Released,
        None => KeyOutcome::Missing { events: after.outstanding() },
    }
}

/// How many events had every op superseded (`superseded_ops`: indexes
/// into the ops; `origins`: each op's event, ascending).
fn origins_of(superseded_ops: &[usize], origins: &[usize]) -> usize {
    let Some(&last) = origins.last() else { return 0 };
    let mut all = vec![true; last + 1];
    let superseded: HashSet<usize> = superseded_ops.iter().copied().collect();
    for (op, &event) in origins.iter().enumerate() {
        all[event] &= superseded.contains(&op);
    }
    let mut events: Vec<usize> = origins.to_vec();
    events.dedup();
    events.into_iter().filter(|&event| all[event]).count()
}

/// Releases a parked key without replaying it: its parked events stay in
/// the dead-letter topic, unapplied, and its later events apply. Returns
/// how many parked events were left (`None`: the key was not parked).
pub async fn release(runtime: &ConnectorRuntime, key: &[u8]) -> anyhow::Result<Option<u64>> {
    runtime.sink.prepare().await?;
    let left = std::sync::Mutex::new(None);
    let decide = |stored: Option<&ParkedKey>| {
        let stored = stored?;
        *left.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored.outstanding());
        Some(Change::Delete)
    };
    let changed = runtime.sink.change_parked(&runtime.settings.name, key, &[], &decide).await?;
    let left = left.into_inner().unwrap_or_else(|p| p.into_inner());
    if changed.is_some() {
        tracing::warn!(connector = %runtime.settings.name, key = %show_key(key), left = ?left,
            "parked key released without replay: its parked events stay unapplied");
    }
    Ok(changed.and(left))
}

/// The letters of `keys` in the dead-letter topic, per key in the order
/// they were written, with their original positions and without the
/// headers of their failure. Read up to the topic's end as it is now.
async fn read_letters(
    runtime: &ConnectorRuntime,
    keys: &HashMap<Vec<u8>, ParkedKey>,
) -> anyhow::Result<HashMap<Vec<u8>, Vec<RawRecord>>> {
    let kafka = runtime.kafka.clone();
    let topic = runtime.settings.dead_letter_topic.clone();
    let connector = runtime.settings.name.clone();
    let wanted: HashSet<Vec<u8>> = keys.keys().cloned().collect();
    let records = tokio::task::spawn_blocking(move || read_to_end(&kafka, &topic, &connector, &wanted)).await??;
    let mut letters: HashMap<Vec<u8>, Vec<RawRecord>> = HashMap::new();
    for mut record in records {
        let Some(original) = super::worker::original_position(&record.headers) else { continue };
        let Some(key) = record.key.as_deref().map(<[u8]>::to_vec) else { continue };
        record.position = original;
        record
            .headers
            .retain(|(k, _)| !k.starts_with("kawka.error.") && k != REPLAY_HEADER && k != PARKED_BEHIND_HEADER);
        letters.entry(key).or_default().push(record);
    }
    Ok(letters)
}

/// The parked letters of `connector` for `keys` in `topic`, up to its end
/// now (the high watermarks are read first).
fn read_to_end(
    kafka: &KafkaSettings,
    topic: &str,
    connector: &str,
    keys: &HashSet<Vec<u8>>,
) -> anyhow::Result<Vec<RawRecord>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", "kawka-dlq-parked")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    for (key, value) in kafka.properties.iter() {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().map_err(crate::source::kafka::redact_config_error)?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
        if high > low {
            ends.insert(partition.id(), high);
            assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("reading {topic} to its end took more than 5 minutes");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message?;
        let partition = message.partition();
        if ends.get(&partition).is_some_and(|&end| message.offset() + 1 >= end) {
            ends.remove(&partition);
        }
        let header = |name: &str| {
            message.headers().and_then(|h| h.iter().find(|h| h.key == name).map(|h| h.value.map(<[u8]>::to_vec)))
        };
        let parked = header(PARKED_BEHIND_HEADER).is_some();
        let mine = header("kawka.error.connector").flatten().as_deref() == Some(connector.as_bytes());
        let wanted = message.key().is_some_and(|key| keys.contains(key));
        if !(parked && mine && wanted) {
            continue;
        }
        let headers = message
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        records.push(RawRecord {
            position: Position { topic: intern(message.topic()), partition, offset: message.offset() },
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(KeyBytes::from_slice),
            value: message.payload().map(bytes::Bytes::copy_from_slice),
            headers,
        });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_superseded_only_when_every_op_of_it_is() {
        // Events 0 (ops 0, 1), 1 (op 2), 2 (ops 3, 4).
        let origins = [0, 0, 1, 2, 2];
        assert_eq!(origins_of(&[], &origins), 0);
        assert_eq!(origins_of(&[0], &origins), 0, "one of event 0's two ops");
        assert_eq!(origins_of(&[0, 1, 2], &origins), 2);
        assert_eq!(origins_of(&[0, 1, 2, 3, 4], &origins), 3);
        assert_eq!(origins_of(&[], &[]), 0);
    }

    #[test]
    fn a_dry_run_says_release_only_when_every_parked_event_would_apply() {
        let at = |offset| Position { topic: "users", partition: 0, offset };
        let mut key = ParkedKey::new(at(4), "upcast: no path".into(), 0);
        key.extend(at(9));
        let mut after = key.clone();
        after.applied(at(4));
        assert_eq!(outcome_of(&after, None), KeyOutcome::Missing { events: 5 }, "offsets 5 to 9 not read");
        after.applied(at(9));
        assert_eq!(outcome_of(&after, None), KeyOutcome::Released);
        let failure = Failure { class: ErrorClass::Permanent, stage: "upcast", message: "no path".into() };
        let failed = outcome_of(&after, Some((at(4), failure.clone())));
        assert_eq!(failed, KeyOutcome::Failed { at: at(4), failure });
    }
}
