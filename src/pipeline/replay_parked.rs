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

use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::replay::{ops_of, reader};
use super::{ConnectorRuntime, REPLAY_HEADER};
use crate::error::{Backoff, ErrorClass, Failure};
use crate::event::Position;
use crate::parked::{show_key, Change, ParkedKey, Spot, PARKED_BEHIND_HEADER};
use crate::projection::WriteOp;
use crate::sink::SinkError;
use crate::source::kafka::raw_record;
use crate::source::{KafkaSettings, RawRecord};

/// How a parked key's replay ended.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyOutcome {
    /// All its parked events applied: the key flows again.
    Released,
    /// An event failed again: the key stays parked behind it.
    Failed { at: Position, failure: Failure },
    /// Parked events were not found in the dead-letter topic (deleted by
    /// retention, written without their key, or not written yet): nothing
    /// of the key is applied, it stays parked.
    Missing { events: u64 },
    /// The connector has not made its events up to this position durable:
    /// before it, events of the key may still be on their way (nothing is
    /// applied yet), or after its parked events it may still read them
    /// again (all are applied; the key is released once it has passed).
    Behind { position: String, applied: bool },
    /// Released by someone else meanwhile (`kawka dlq release`, another replay).
    Gone,
    /// Changed since it was read (another replay, or an earlier failure of
    /// it found late): nothing applied; the next round reads it again.
    Changed,
    /// The key's write failed (the key stays parked; run the replay again).
    Error(String),
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
/// while a key waits for events still being parked or for the connector.
const MOST_ROUNDS: usize = 30;

/// The pause between rounds.
const ROUND_PAUSE: Duration = Duration::from_millis(500);

/// Most events of one key applied in one transaction (its progress is
/// stored with each, so a key of any size replays within the write timeout).
const CHUNK: usize = 2_000;

/// How often a transient failure of a key's write is retried before the
/// replay gives up on the key (the key stays parked; run it again).
const WRITE_ATTEMPTS: u32 = 8;

/// Replays the parked keys of a connector (`only`: one key), or says what
/// a replay would do (`dry_run`: nothing is written). A key that waits for
/// more of its letters or for the connector is tried again for `wait`.
pub async fn replay(
    runtime: &ConnectorRuntime,
    only: Option<&[u8]>,
    dry_run: bool,
    wait: Duration,
) -> anyhow::Result<Vec<KeyReport>> {
    runtime.sink.prepare().await?;
    let connector = runtime.settings.name.clone();
    let started = std::time::Instant::now();
    let mut reports: Vec<(Vec<u8>, KeyReport)> = Vec::new();
    // Keys this run is done with: released, failed again, gone, in error.
    let mut settled: HashSet<Vec<u8>> = HashSet::new();
    for round in 0..MOST_ROUNDS {
        if round > 0 {
            tokio::time::sleep(ROUND_PAUSE).await;
        }
        let mut keys = runtime.sink.parked_keys(&connector).await?;
        keys.retain(|(key, _)| only.is_none_or(|only| only == key.as_slice()) && !settled.contains(key));
        if keys.is_empty() {
            break;
        }
        let wanted: HashMap<Vec<u8>, ParkedKey> = keys.into_iter().collect();
        let mut letters = read_letters(runtime, &wanted).await?;
        let (name, group) = (&runtime.settings.name, &runtime.settings.source.group_id);
        let live = positions_of(runtime, name, group).await?;
        let mut again = false;
        for (key, entry) in &wanted {
            let mine = letters.remove(key).unwrap_or_default();
            let report = replay_key(runtime, key, entry, &mine, &live, dry_run).await;
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
            // Letters still being written, or a connector still writing
            // the events before them: worth another round, for a while.
            let waits =
                matches!(total.outcome, KeyOutcome::Missing { .. } | KeyOutcome::Behind { .. } | KeyOutcome::Changed);
            if waits && !dry_run && started.elapsed() < wait {
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

/// Per partition, the next offset whose effect connector `name` (of
/// consumer group `group`) made durable: Postgres' stored positions, or the
/// group's committed offsets in Kafka.
pub(super) async fn positions_of(
    runtime: &ConnectorRuntime,
    name: &str,
    group: &str,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    if let Some(stored) = runtime.sink.stored_positions(name).await? {
        return Ok(stored.into_iter().filter_map(|(t, p, next)| Some(((t, p), next?))).collect());
    }
    let kafka = runtime.kafka.clone();
    let (group, topics) = (group.to_string(), runtime.settings.source.topics.clone());
    tokio::task::spawn_blocking(move || committed(&kafka, &group, &topics)).await?
}

/// The committed offsets of `group` on `topics` (read without joining it).
fn committed(kafka: &KafkaSettings, group: &str, topics: &[String]) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let consumer = reader(kafka, group)?;
    let mut partitions = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            partitions.add_partition(topic, partition.id());
        }
    }
    let committed = consumer.committed_offsets(partitions, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(next) => Some(((e.topic().to_string(), e.partition()), next)),
            _ => None,
        })
        .collect())
}

/// A key's letters as a replay takes them: those its entry wants, each
/// partition's in offset order (a failure found after later events of
/// its key were parked is written after them) and once each, keeping
/// the order in which the partitions' letters were written.
fn in_order<'l>(entry: &ParkedKey, letters: &'l [RawRecord]) -> Vec<&'l RawRecord> {
    let wanted: Vec<&RawRecord> = letters.iter().filter(|l| entry.wants(l.position)).collect();
    let mut by_partition: HashMap<(&str, i32), Vec<&RawRecord>> = HashMap::new();
    for letter in &wanted {
        by_partition.entry((letter.position.topic, letter.position.partition)).or_default().push(letter);
    }
    for letters in by_partition.values_mut() {
        letters.sort_by_key(|l| l.position.offset);
        letters.dedup_by_key(|l| l.position.offset);
        letters.reverse();
    }
    // Each slot a partition's letter had takes that partition's next in
    // offset order; slots of its duplicates are left out.
    wanted
        .iter()
        .filter_map(|letter| by_partition.get_mut(&(letter.position.topic, letter.position.partition))?.pop())
        .collect()
}

/// Replays one key's letters.
async fn replay_key(
    runtime: &ConnectorRuntime,
    key: &[u8],
    entry: &ParkedKey,
    letters: &[RawRecord],
    live: &HashMap<(String, i32), i64>,
    dry_run: bool,
) -> KeyReport {
    let shown = show_key(key);
    let report = |replayed: usize, superseded: usize, outcome: KeyOutcome| KeyReport {
        key: shown.clone(),
        replayed,
        superseded,
        outcome,
    };
    let mut todo = in_order(entry, letters);
    // Every parked event's letter, or none applied: a missing one would
    // be the very hole parking exists to prevent.
    let missing: u64 = entry
        .parked
        .iter()
        .map(|range| {
            let found =
                todo.iter().filter(|l| l.position.partition == range.partition && l.position.topic == range.topic);
            entry.missing_in(&range.topic, range.partition).saturating_sub(found.count() as u64)
        })
        .sum();
    if missing > 0 {
        return report(0, 0, KeyOutcome::Missing { events: missing });
    }
    // The connector's events of the key before the parked ones must be
    // durable first (one may still be in a batch being written).
    let reached = |range: &crate::parked::Range, offset: i64| {
        live.get(&(range.topic.clone(), range.partition)).is_some_and(|&next| next >= offset)
    };
    if let Some(range) = entry.parked.iter().find(|r| !reached(r, r.first())) {
        let position = format!("{}/{}@{}", range.topic, range.partition, range.first());
        return report(0, 0, KeyOutcome::Behind { position, applied: false });
    }
    // Each letter's ops, up to the first that fails again.
    let mut ops_by_letter: Vec<Vec<WriteOp>> = Vec::with_capacity(todo.len());
    let mut failed: Option<(Position, Failure)> = None;
    for letter in &todo {
        match ops_of(runtime, letter).await {
            Ok(ops) => ops_by_letter.push(ops),
            Err(failure) => {
                failed = Some((letter.position, failure));
                break;
            }
        }
    }
    todo.truncate(ops_by_letter.len());
    // Released only once the connector is past every parked event: until
    // then it may read them again, and the entry is what says they are parked.
    let releasable = |entry: &ParkedKey| entry.parked.iter().all(|r| reached(r, r.upto + 1));
    if dry_run {
        let mut after = entry.clone();
        todo.iter().for_each(|l| after.applied(l.position));
        let outcome = match failed {
            Some((at, failure)) => KeyOutcome::Failed { at, failure },
            None if !releasable(&after) => behind_of(&after, &reached),
            None => outcome_of(&after, None),
        };
        return report(todo.len(), 0, outcome);
    }
    let (mut start, mut superseded, mut attempt) = (0, 0, 0);
    let mut current = entry.clone();
    loop {
        let end = (start + CHUNK).min(todo.len());
        let last = end == todo.len();
        let chunk: Vec<Position> = todo[start..end].iter().map(|l| l.position).collect();
        let mut ops: Vec<WriteOp> = Vec::new();
        let mut origins: Vec<usize> = Vec::new();
        for (at, letter_ops) in ops_by_letter[start..end].iter().enumerate() {
            origins.extend(std::iter::repeat_n(at, letter_ops.len()));
            ops.extend(letter_ops.iter().cloned());
        }
        let failure = failed.clone().filter(|_| last);
        let read = current.progress();
        let changed = std::sync::atomic::AtomicBool::new(false);
        // Decided from what is stored now: only if nothing the replay
        // decided from changed since it was read (see `ParkedKey::progress`).
        let decide = |stored: Option<&ParkedKey>| {
            let stored = stored?;
            if stored.progress() != read {
                changed.store(true, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            let mut next = stored.clone();
            chunk.iter().for_each(|&position| next.applied(position));
            if let Some((at, failure)) = &failure {
                next.behind = Spot::of(*at);
                next.reason = format!("{}: {}", failure.stage, failure.message);
            }
            if last && failure.is_none() && next.done() && releasable(&next) {
                Some(Change::Delete)
            } else {
                Some(Change::Put(next))
            }
        };
        match runtime.sink.change_parked(&runtime.settings.name, key, &ops, &decide).await {
            Ok(Some((change, stale))) => {
                superseded += origins_of(&stale, &origins);
                attempt = 0;
                match change {
                    Change::Delete => {
                        tracing::info!(connector = %runtime.settings.name, key = %shown, replayed = end,
                            "parked key replayed and released");
                        return report(end, superseded, KeyOutcome::Released);
                    }
                    Change::Put(next) => current = next,
                }
                if last {
                    let outcome = match failed {
                        Some((at, failure)) => KeyOutcome::Failed { at, failure },
                        None if current.done() => behind_of(&current, &reached),
                        None => KeyOutcome::Missing { events: current.outstanding() },
                    };
                    tracing::info!(connector = %runtime.settings.name, key = %shown, replayed = end,
                        outcome = ?outcome, "parked key replayed; it stays parked");
                    return report(end, superseded, outcome);
                }
                start = end;
            }
            Ok(None) if changed.load(std::sync::atomic::Ordering::Relaxed) => {
                return report(start, superseded, KeyOutcome::Changed)
            }
            Ok(None) => return report(start, superseded, KeyOutcome::Gone),
            // The sink refuses an event: the key stays parked behind it,
            // with the events before it applied.
            Err(error) if error.class() == ErrorClass::Permanent => {
                let rejected = match error {
                    SinkError::RejectedOps(rejected) => rejected,
                    error => match runtime.sink.find_rejected(&ops).await {
                        Ok(rejected) if !rejected.is_empty() => rejected,
                        _ => return report(start, superseded, KeyOutcome::Error(error.to_string())),
                    },
                };
                let Some((first, message)) = rejected
                    .iter()
                    .filter_map(|(op, message)| Some((*origins.get(*op)?, message.clone())))
                    .min_by_key(|(origin, _)| *origin)
                else {
                    return report(start, superseded, KeyOutcome::Error("the sink refused ops it did not name".into()));
                };
                let at = todo[start + first].position;
                failed = Some((at, Failure { class: ErrorClass::Permanent, stage: "sink", message }));
                todo.truncate(start + first);
                ops_by_letter.truncate(start + first);
            }
            Err(error) => {
                attempt += 1;
                if attempt >= WRITE_ATTEMPTS {
                    return report(start, superseded, KeyOutcome::Error(format!("{error} ({attempt} attempts)")));
                }
                tracing::warn!(key = %shown, %error, attempt, "replaying a parked key failed; retrying");
                let backoff = Backoff { base: Duration::from_millis(200), cap: Duration::from_secs(5) };
                tokio::time::sleep(backoff.delay(attempt)).await;
            }
        }
    }
}

/// A key whose parked events are all applied but whose connector has not
/// passed them yet.
fn behind_of(entry: &ParkedKey, reached: &dyn Fn(&crate::parked::Range, i64) -> bool) -> KeyOutcome {
    match entry.parked.iter().find(|r| !reached(r, r.upto + 1)) {
        Some(range) => KeyOutcome::Behind {
            position: format!("{}/{}@{}", range.topic, range.partition, range.upto + 1),
            applied: entry.done(),
        },
        None => outcome_of(entry, None),
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
    let consumer = reader(kafka, "kawka-dlq-parked")?;
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
        records.push(raw_record(&message));
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
        key.extend(at(9), "park");
        let mut after = key.clone();
        after.applied(at(4));
        assert_eq!(outcome_of(&after, None), KeyOutcome::Missing { events: 1 }, "the event at 9 not read");
        after.applied(at(9));
        assert_eq!(outcome_of(&after, None), KeyOutcome::Released);
        let failure = Failure { class: ErrorClass::Permanent, stage: "upcast", message: "no path".into() };
        let failed = outcome_of(&after, Some((at(4), failure.clone())));
        assert_eq!(failed, KeyOutcome::Failed { at: at(4), failure });
    }

    fn letter(partition: i32, offset: i64) -> RawRecord {
        RawRecord {
            position: Position { topic: "users", partition, offset },
            timestamp: None,
            key: Some(crate::source::KeyBytes::from_slice(b"k")),
            value: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn letters_are_taken_in_offset_order_per_partition_once_each() {
        let at = |partition, offset| Position { topic: "users", partition, offset };
        let mut key = ParkedKey::new(at(0, 12), "decode: bad".into(), 0);
        key.extend(at(1, 3), "park");
        key.extend(at(0, 10), "sink: too long");
        key.extend(at(0, 11), "park");
        key.extend(at(0, 13), "park");
        // Written: 0@12, 1@3, 0@10, 0@11, 0@12 again (a crash), 0@13, and
        // 0@9 (not parked) and 0@14 (not stored as parked yet).
        let letters: Vec<RawRecord> = [(0, 12), (1, 3), (0, 10), (0, 11), (0, 12), (0, 13), (0, 9), (0, 14)]
            .iter()
            .map(|&(p, o)| letter(p, o))
            .collect();
        let taken: Vec<(i32, i64)> =
            in_order(&key, &letters).iter().map(|l| (l.position.partition, l.position.offset)).collect();
        assert_eq!(taken, vec![(0, 10), (1, 3), (0, 11), (0, 12), (0, 13)]);
        key.applied(at(0, 10));
        let taken: Vec<i64> = in_order(&key, &letters).iter().map(|l| l.position.offset).collect();
        assert_eq!(taken, vec![11, 3, 12, 13], "applied ones are not taken again");
    }
}
