//! What each connector is doing, for the HTTP API, `/metrics` and logs.
//!
//! Every happening worth a metric is a method here that counts it *and*
//! logs it, so the two never disagree.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::error::{ErrorClass, Failure};
use crate::event::Position;
use crate::value::Name;

/// A connector retrying longer than this makes `/readyz` fail.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Preparing the sink, joining the group.
    Starting,
    Running,
    Paused,
    /// A transient failure is being retried.
    Retrying,
    /// Halted by the `stop` error policy.
    Stopped,
    /// Ended by the daemon's shutdown.
    Drained,
}

/// Histograms are `prometheus-client`'s (buckets per bound, sum, count;
/// [`crate::metrics`] exposes them).
pub use prometheus_client::metrics::histogram::Histogram;

const BATCH_BOUNDS: &[f64] = &[1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0];
const SECONDS_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Where one assigned partition is (built when asked for: the position is
/// the assignment's, the high watermark the log's).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Next offset whose effect is not durable yet.
    pub position: Option<i64>,
    /// As the broker last reported it (some brokers misreport it).
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastError {
    pub at_ms: i64,
    pub class: ErrorClass,
    pub stage: String,
    pub message: String,
}

/// Counters of events by outcome and event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Consumed,
    Written,
    /// Found applied by a guard: a replay, a duplicate, or an event newer
    /// ones overtook (a dead letter replayed late). Never counted written.
    Superseded,
    Skipped,
    DeadLettered,
    /// Dead-lettered behind an earlier failed event of its key
    /// (`on_error: park`; the failed one itself is counted here too).
    Parked,
    Unknown,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Consumed => "consumed",
            Outcome::Written => "written",
            Outcome::Superseded => "superseded",
            Outcome::Skipped => "skipped",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Parked => "parked",
            Outcome::Unknown => "unknown",
        }
    }
}

/// Where a rebuild of a connector's read model is (`kawka rebuild`, or
/// `POST /connectors/{name}/rebuild`).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RebuildProgress {
    pub state: RebuildState,
    /// Events the rebuild has made durable.
    pub done: u64,
    /// Events up to the live connector's positions (moves while it runs).
    pub target: u64,
    pub percent: f64,
    pub events_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub started_at_ms: i64,
    /// The outcome once it ended: what was swapped, or why it failed.
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildState {
    Running,
    Done,
    Failed,
}

impl RebuildProgress {
    pub fn new(done: u64, target: u64, events_per_second: f64, started_at_ms: i64) -> RebuildProgress {
        let percent = if target == 0 { 0.0 } else { (done as f64 / target as f64 * 100.0).min(100.0) };
        let eta_seconds =
            (events_per_second > 0.0 && target > done).then(|| (target - done) as f64 / events_per_second);
        RebuildProgress {
            state: RebuildState::Running,
            done,
            target,
            percent,
            events_per_second,
            eta_seconds,
            started_at_ms,
            message: None,
        }
    }
}

/// The live status of one connector.
#[derive(Debug)]
pub struct ConnectorStatus {
    pub name: String,
    pub sink: &'static str,
    state: Mutex<State>,
    paused: watch::Sender<bool>,
    assigned: Mutex<bool>,
    events: Mutex<HashMap<(Name, Outcome), u64>>,
    retries: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    pub batch_events: Histogram,
    pub write_seconds: Histogram,
    /// The assigned partitions and their positions (see [`PartitionStatus`]).
    partitions: Mutex<BTreeMap<(Name, i32), Option<i64>>>,
    /// The last high watermark the broker reported per partition, kept
    /// across revokes: it is the log's, not the assignment's, so a consumer
    /// restarted on the same partitions (after fencing, say) shows its lag
    /// as soon as it knows its positions, not one watermark fetch later.
    log_ends: Mutex<HashMap<(Name, i32), i64>>,
    last_error: Mutex<Option<LastError>>,
    retrying_since: Mutex<Option<Instant>>,
    /// Kafka timestamp (ms) of the newest event whose effect is durable.
    last_written_timestamp: AtomicI64,
    rebuild: Mutex<Option<RebuildProgress>>,
    /// When this incarnation of the connector was built (a reload that
    /// restarts it builds a new one; an untouched one keeps its time).
    pub started_at_ms: i64,
    /// Set when a reload changed the projection of an existing read model.
    rebuild_suggested: Mutex<Option<String>>,
    /// Read-your-writes: the durable position this process reached per
    /// partition (kept across revokes: it only says "at least here"), and
    /// a counter bumped each time one moves, which waiters watch.
    applied: Mutex<HashMap<(String, i32), i64>>,
    applied_changes: watch::Sender<u64>,
    /// Per partition, the position past the last batch handed to the sink
    /// since the last revoke: with `applied`, whether a write is pending.
    handed: Mutex<Vec<(Name, i32, i64)>>,
    /// The latest events dead-lettered or skipped (at most
    /// [`FAILED_REMEMBERED`]), so a waiter learns its event was not applied.
    failed: Mutex<std::collections::VecDeque<(String, i32, i64, Outcome)>>,
    /// Waiters now, wait times, timeouts (`kawka_applied_*`).
    pub waiters: AtomicI64,
    pub wait_seconds: Histogram,
    pub wait_timeouts: AtomicU64,
    /// When the last refresh a waiter asked for started (Elasticsearch):
    /// concurrent waiters share one.
    pub last_refresh: tokio::sync::Mutex<Option<Instant>>,
    /// The keys parked (`on_error: park`) as the connector last read or
    /// changed them; `None` for a connector that does not park.
    parked: Mutex<Option<ParkedSummary>>,
    /// Failures of keys not parked because `park.max_keys` were (`kawka_park_overflow_total`).
    pub park_overflows: AtomicU64,
    /// Parked keys seen released, by a replay or `kawka dlq release`
    /// (`kawka_parked_released_total`).
    pub parked_released: AtomicU64,
}

/// What `GET /connectors/{name}` and `/metrics` show of parked keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ParkedSummary {
    pub keys: usize,
    pub limit: usize,
    /// Parked events not applied yet (an upper bound: see
    /// [`crate::parked::ParkedKey::outstanding`]).
    pub events: u64,
    pub oldest: Option<OldestParked>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OldestParked {
    pub key: String,
    pub behind: String,
    pub reason: String,
    /// RFC 3339.
    pub since: String,
    #[serde(skip)]
    pub since_ms: i64,
}

/// How many dead-lettered or skipped positions a connector remembers for waiters.
pub const FAILED_REMEMBERED: usize = 10_000;

/// The statuses of the running connectors, replaced as reloads add and
/// remove connectors (read for every HTTP request; never held across an
/// await).
#[derive(Debug, Default)]
pub struct Connectors(std::sync::RwLock<Vec<std::sync::Arc<ConnectorStatus>>>);

impl Connectors {
    pub fn new(statuses: Vec<std::sync::Arc<ConnectorStatus>>) -> Connectors {
        Connectors(std::sync::RwLock::new(statuses))
    }

    /// The statuses now, in name order.
    pub fn snapshot(&self) -> Vec<std::sync::Arc<ConnectorStatus>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, mut statuses: Vec<std::sync::Arc<ConnectorStatus>>) {
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = statuses;
    }

    pub fn get(&self, name: &str) -> Option<std::sync::Arc<ConnectorStatus>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).iter().find(|c| c.name == name).cloned()
    }
}

/// Remembers how the event at `position` ended, for waiters (the latest
/// [`FAILED_REMEMBERED`]).
fn remember_failed(
    failed: &Mutex<std::collections::VecDeque<(String, i32, i64, Outcome)>>,
    position: Position,
    outcome: Outcome,
) {
    let mut failed = lock(failed);
    if failed.len() >= FAILED_REMEMBERED {
        failed.pop_front();
    }
    failed.push_back((position.topic.to_string(), position.partition, position.offset, outcome));
}

/// Events waiting past `position`: unknown until both are known, zero when
/// the position ran past a log end reported before it (the next report,
/// within the source's watermark interval, catches up).
fn lag_of(high_watermark: Option<i64>, position: Option<i64>) -> Option<i64> {
    Some((high_watermark? - position?).max(0))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is counters.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl ConnectorStatus {
    pub fn new(name: &str, sink: &'static str) -> ConnectorStatus {
        ConnectorStatus {
            name: name.to_string(),
            sink,
            state: Mutex::new(State::Starting),
            paused: watch::channel(false).0,
            assigned: Mutex::new(false),
            events: Mutex::new(HashMap::new()),
            retries: Mutex::new(BTreeMap::new()),
            duplicates: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batch_events: Histogram::new(BATCH_BOUNDS.iter().copied()),
            write_seconds: Histogram::new(SECONDS_BOUNDS.iter().copied()),
            partitions: Mutex::new(BTreeMap::new()),
            log_ends: Mutex::new(HashMap::new()),
            last_error: Mutex::new(None),
            retrying_since: Mutex::new(None),
            last_written_timestamp: AtomicI64::new(0),
            rebuild: Mutex::new(None),
            started_at_ms: now_ms(),
            rebuild_suggested: Mutex::new(None),
            applied: Mutex::new(HashMap::new()),
            applied_changes: watch::channel(0).0,
            handed: Mutex::new(Vec::new()),
            failed: Mutex::new(std::collections::VecDeque::new()),
            waiters: AtomicI64::new(0),
            wait_seconds: Histogram::new(SECONDS_BOUNDS.iter().copied()),
            wait_timeouts: AtomicU64::new(0),
            last_refresh: tokio::sync::Mutex::new(None),
            parked: Mutex::new(None),
            park_overflows: AtomicU64::new(0),
            parked_released: AtomicU64::new(0),
        }
    }

    /// The parked keys now (the connector parks keys).
    pub fn set_parked(&self, summary: ParkedSummary) {
        *lock(&self.parked) = Some(summary);
    }

    pub fn parked(&self) -> Option<ParkedSummary> {
        lock(&self.parked).clone()
    }

    /// An event of a parked key went to the dead letters behind `behind`.
    pub fn parked_event(&self, event_type: Name, position: Position, key: &str, behind: &str, topic: &str) {
        self.count(event_type, Outcome::Parked);
        remember_failed(&self.failed, position, Outcome::Parked);
        tracing::info!(connector = %self.name, %position, key, behind, dead_letter_topic = topic,
            "event of a parked key parked behind its failed event");
    }

    /// Parked keys were found released (by a replay or an operator).
    pub fn parked_released(&self, keys: u64) {
        self.parked_released.fetch_add(keys, Ordering::Relaxed);
        tracing::info!(connector = %self.name, keys, "parked keys released; their later events apply");
    }

    /// An event skipped as parked already (read again after a restart):
    /// a waiter on its position learns it is parked.
    pub fn remember_parked(&self, position: Position) {
        remember_failed(&self.failed, position, Outcome::Parked);
    }

    /// A key's failure found `park.max_keys` keys parked: the fallback applies.
    pub fn park_overflow(&self, key: &str, limit: usize, fallback: &str) {
        self.park_overflows.fetch_add(1, Ordering::Relaxed);
        tracing::error!(connector = %self.name, key, limit, fallback,
            "park.max_keys keys are parked: this key is not held; the fallback applies");
    }

    /// The durable position this process reached on a partition, if any.
    pub fn applied_position(&self, topic: &str, partition: i32) -> Option<i64> {
        lock(&self.applied).get(&(topic.to_string(), partition)).copied()
    }

    /// Wakes when a durable position moves.
    pub fn applied_changes(&self) -> watch::Receiver<u64> {
        self.applied_changes.subscribe()
    }

    /// How the event at a position ended, when it was dead-lettered or skipped.
    pub fn failed_at(&self, topic: &str, partition: i32, offset: i64) -> Option<Outcome> {
        lock(&self.failed).iter().find(|(t, p, o, _)| t == topic && *p == partition && *o == offset).map(|f| f.3)
    }

    /// A reload changed how this connector projects events into an
    /// existing read model: its rows were written by the old rules.
    pub fn suggest_rebuild(&self, reason: String) {
        tracing::warn!(connector = %self.name, %reason, "rebuild suggested");
        *lock(&self.rebuild_suggested) = Some(reason);
    }

    pub fn rebuild_suggested(&self) -> Option<String> {
        lock(&self.rebuild_suggested).clone()
    }

    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    pub fn set_state(&self, state: State) {
        *lock(&self.state) = state;
        if state != State::Retrying {
            *lock(&self.retrying_since) = None;
        }
    }

    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
        let mut state = lock(&self.state);
        if paused && matches!(*state, State::Running | State::Retrying | State::Starting) {
            *state = State::Paused;
        } else if !paused && *state == State::Paused {
            *state = State::Running;
        }
    }

    pub fn paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    pub fn count(&self, event_type: Name, outcome: Outcome) {
        *lock(&self.events).entry((event_type, outcome)).or_insert(0) += 1;
    }

    pub fn count_many(&self, event_type: Name, outcome: Outcome, n: u64) {
        *lock(&self.events).entry((event_type, outcome)).or_insert(0) += n;
    }

    /// Total of one outcome over every event type.
    pub fn total(&self, outcome: Outcome) -> u64 {
        lock(&self.events).iter().filter(|((_, o), _)| *o == outcome).map(|(_, n)| n).sum()
    }

    pub fn events_snapshot(&self) -> Vec<((Name, Outcome), u64)> {
        let mut all: Vec<_> = lock(&self.events).iter().map(|(k, v)| (*k, *v)).collect();
        all.sort();
        all
    }

    /// A transient failure is being retried: counted, logged, and the
    /// connector shows it until the next success.
    pub fn retrying(&self, stage: &'static str, class: ErrorClass, message: &str, attempt: u32) {
        *lock(&self.retries).entry((stage, class.name())).or_insert(0) += 1;
        lock(&self.retrying_since).get_or_insert_with(Instant::now);
        {
            let mut state = lock(&self.state);
            if matches!(*state, State::Running | State::Starting) {
                *state = State::Retrying;
            }
        }
        self.record_error(class, stage, message);
        tracing::warn!(connector = %self.name, stage, class = %class, attempt, error = message, "retrying");
    }

    /// Work went through again after retries.
    pub fn recovered(&self) {
        let was = lock(&self.retrying_since).take();
        let mut state = lock(&self.state);
        if *state == State::Retrying {
            *state = State::Running;
        }
        if let Some(since) = was {
            tracing::info!(connector = %self.name, after_seconds = since.elapsed().as_secs_f64(), "recovered");
        }
    }

    pub fn retries_snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        lock(&self.retries).iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn retrying_for(&self) -> Option<Duration> {
        lock(&self.retrying_since).map(|since| since.elapsed())
    }

    fn record_error(&self, class: ErrorClass, stage: &str, message: &str) {
        *lock(&self.last_error) =
            Some(LastError { at_ms: now_ms(), class, stage: stage.to_string(), message: message.to_string() });
    }

    pub fn last_error(&self) -> Option<LastError> {
        lock(&self.last_error).clone()
    }

    /// One bad event handed to the error policy.
    pub fn failed_event(&self, event_type: Name, position: Position, failure: &Failure, outcome: Outcome, topic: &str) {
        self.count(event_type, outcome);
        remember_failed(&self.failed, position, outcome);
        self.record_error(failure.class, failure.stage, &failure.message);
        match outcome {
            Outcome::DeadLettered => tracing::warn!(connector = %self.name, %position, stage = failure.stage,
                error = %failure.message, dead_letter_topic = topic, "bad event dead-lettered"),
            Outcome::Parked => tracing::warn!(connector = %self.name, %position, stage = failure.stage,
                error = %failure.message, dead_letter_topic = topic, "bad event dead-lettered; its key is parked"),
            _ => tracing::warn!(connector = %self.name, %position, stage = failure.stage,
                error = %failure.message, "bad event skipped"),
        }
    }

    /// The `stop` policy halted the connector.
    pub fn stopped(&self, failure: &Failure) {
        self.set_state(State::Stopped);
        self.record_error(failure.class, failure.stage, &failure.message);
        tracing::error!(connector = %self.name, stage = failure.stage, error = %failure.message,
            "connector stopped; fix the cause and restart");
    }

    /// A batch is durable.
    pub fn batch_written(
        &self,
        events: usize,
        ops: usize,
        duplicates: u64,
        seconds: f64,
        newest_timestamp: Option<i64>,
    ) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.batch_events.observe(events as f64);
        self.write_seconds.observe(seconds);
        if let Some(timestamp) = newest_timestamp {
            self.last_written_timestamp.fetch_max(timestamp, Ordering::Relaxed);
        }
        self.recovered();
        tracing::debug!(connector = %self.name, events, ops, duplicates, seconds, "batch written");
    }

    /// Seconds between now and the Kafka timestamp of the newest written event.
    pub fn freshness_seconds(&self) -> Option<f64> {
        match self.last_written_timestamp.load(Ordering::Relaxed) {
            0 => None,
            ts => Some((now_ms() - ts).max(0) as f64 / 1000.0),
        }
    }

    pub fn assigned(&self, partitions: &[(Name, i32, Option<i64>)]) {
        *lock(&self.assigned) = true;
        *lock(&self.partitions) =
            partitions.iter().map(|&(topic, partition, position)| ((topic, partition), position)).collect();
        let mut state = lock(&self.state);
        if *state == State::Starting {
            *state = if self.is_paused() { State::Paused } else { State::Running };
        }
    }

    pub fn revoked(&self) {
        lock(&self.partitions).clear();
        lock(&self.handed).clear();
    }

    /// A batch ending at `offsets` goes to the sink (once per batch).
    pub fn handed(&self, offsets: &[crate::event::PartitionOffset]) {
        let mut handed = lock(&self.handed);
        for offset in offsets {
            match handed.iter_mut().find(|(t, p, _)| *t == offset.topic && *p == offset.partition) {
                Some(entry) => entry.2 = entry.2.max(offset.next_offset),
                None => handed.push((offset.topic, offset.partition, offset.next_offset)),
            }
        }
    }

    /// Whether a batch handed to the sink since the last revoke is not
    /// durable yet (in flight, or being written again).
    pub fn writes_pending(&self) -> bool {
        let handed = lock(&self.handed).clone();
        let applied = lock(&self.applied);
        handed.iter().any(|(topic, partition, next)| {
            applied.get(&(topic.to_string(), *partition)).is_none_or(|reached| reached < next)
        })
    }

    pub fn has_joined(&self) -> bool {
        *lock(&self.assigned)
    }

    pub fn positions(&self, offsets: &[(Name, i32, i64)]) {
        {
            let mut applied = lock(&self.applied);
            for &(topic, partition, next) in offsets {
                let reached = applied.entry((topic.to_string(), partition)).or_insert(next);
                *reached = (*reached).max(next);
            }
        }
        self.applied_changes.send_modify(|n| *n = n.wrapping_add(1));
        let mut current = lock(&self.partitions);
        for &(topic, partition, next) in offsets {
            if let Some(position) = current.get_mut(&(topic, partition)) {
                *position = Some(next);
            }
        }
    }

    pub fn high_watermarks(&self, marks: &[(Name, i32, i64)]) {
        lock(&self.log_ends).extend(marks.iter().map(|&(topic, partition, high)| ((topic, partition), high)));
    }

    /// The assigned partitions, with their lag from the log ends last reported.
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        let log_ends = lock(&self.log_ends);
        let partitions = lock(&self.partitions);
        partitions
            .iter()
            .map(|(&(topic, partition), &position)| {
                let high_watermark = log_ends.get(&(topic, partition)).copied();
                PartitionStatus {
                    topic: topic.to_string(),
                    partition,
                    position,
                    high_watermark,
                    lag: lag_of(high_watermark, position),
                }
            })
            .collect()
    }

    /// Records a rebuild's progress (or its end).
    pub fn set_rebuild(&self, progress: RebuildProgress) {
        *lock(&self.rebuild) = Some(progress);
    }

    /// Ends the rebuild in progress, logging how.
    pub fn rebuild_ended(&self, outcome: Result<String, String>) {
        let mut rebuild = lock(&self.rebuild);
        let progress = rebuild.get_or_insert_with(|| RebuildProgress::new(0, 0, 0.0, now_ms()));
        progress.eta_seconds = None;
        match outcome {
            Ok(message) => {
                tracing::info!(connector = %self.name, %message, "rebuild done");
                progress.state = RebuildState::Done;
                progress.percent = 100.0;
                progress.message = Some(message);
            }
            Err(message) => {
                tracing::error!(connector = %self.name, %message, "rebuild failed");
                progress.state = RebuildState::Failed;
                progress.message = Some(message);
            }
        }
    }

    pub fn rebuild(&self) -> Option<RebuildProgress> {
        lock(&self.rebuild).clone()
    }

    /// The JSON of `GET /connectors/{name}`.
    pub fn to_json(&self) -> serde_json::Value {
        let partitions = self.partitions();
        let lag: Option<i64> = partitions.iter().map(|p| p.lag).sum();
        serde_json::json!({
            "name": self.name,
            "sink": self.sink,
            "state": self.state(),
            "paused": self.is_paused(),
            "partitions": partitions,
            "lag": lag,
            "retrying_for_seconds": self.retrying_for().map(|d| d.as_secs_f64()),
            "last_error": self.last_error(),
            "freshness_seconds": self.freshness_seconds(),
            "rebuild": self.rebuild(),
            "rebuild_suggested": self.rebuild_suggested(),
            "parked": self.parked(),
            "started_at_ms": self.started_at_ms,
            "counters": {
                "consumed": self.total(Outcome::Consumed),
                "written": self.total(Outcome::Written),
                "superseded": self.total(Outcome::Superseded),
                "skipped": self.total(Outcome::Skipped),
                "unknown": self.total(Outcome::Unknown),
                "dead_lettered": self.total(Outcome::DeadLettered),
                "parked": self.total(Outcome::Parked),
                "park_overflows": self.park_overflows.load(Ordering::Relaxed),
                "parked_released": self.parked_released.load(Ordering::Relaxed),
                "duplicates": self.duplicates.load(Ordering::Relaxed),
                "batches": self.batches.load(Ordering::Relaxed),
                "retries": self.retries_snapshot().iter().map(|(_, n)| n).sum::<u64>(),
            },
        })
    }

    /// Ready: joined its group, and not stuck retrying or stopped.
    pub fn is_ready(&self) -> bool {
        self.has_joined()
            && self.state() != State::Stopped
            && self.retrying_for().is_none_or(|elapsed| elapsed < STUCK_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_pending_from_its_hand_over_until_its_positions_are_durable() {
        let status = ConnectorStatus::new("c", "elasticsearch");
        let batch =
            |next_offset| [crate::event::PartitionOffset { topic: "t", partition: 0, next_offset, epoch: None }];
        assert!(!status.writes_pending());
        status.handed(&batch(10));
        assert!(status.writes_pending());
        status.positions(&[("t", 0, 9)]);
        assert!(status.writes_pending(), "short of the batch's end");
        status.positions(&[("t", 0, 10)]);
        assert!(!status.writes_pending());
        status.handed(&batch(12));
        status.handed(&batch(11));
        status.positions(&[("t", 0, 11)]);
        assert!(status.writes_pending(), "the furthest batch handed counts");
        status.revoked();
        assert!(!status.writes_pending(), "a revoke ends what this consumer was writing");
    }

    /// What happened to a connector's partitions, for the lag test below.
    #[derive(Debug, Clone)]
    enum Happening {
        Assigned(Vec<(Name, i32, Option<i64>)>),
        Revoked,
        Positions(Vec<(Name, i32, i64)>),
        LogEnds(Vec<(Name, i32, i64)>),
    }

    /// The lag of `(topic, partition)` after `history`, read off the
    /// history itself: `None` when not assigned since the last assignment
    /// or revoke; else the last log end ever reported minus the latest
    /// position since it was assigned.
    fn lag_after(history: &[Happening], at: (Name, i32)) -> Option<Option<i64>> {
        let since = history.iter().rposition(|h| matches!(h, Happening::Assigned(_) | Happening::Revoked))?;
        let Happening::Assigned(assigned) = &history[since] else { return None };
        let &(_, _, claimed) = assigned.iter().find(|(t, p, _)| (*t, *p) == at)?;
        let position = history[since..]
            .iter()
            .rev()
            .find_map(|h| match h {
                Happening::Positions(moved) => moved.iter().rev().find(|(t, p, _)| (*t, *p) == at).map(|m| m.2),
                _ => None,
            })
            .or(claimed);
        let end = history.iter().rev().find_map(|h| match h {
            Happening::LogEnds(ends) => ends.iter().rev().find(|(t, p, _)| (*t, *p) == at).map(|e| e.2),
            _ => None,
        });
        Some(match (end, position) {
            (Some(end), Some(position)) => Some((end - position).max(0)),
            _ => None,
        })
    }

    #[test]
    fn lag_is_the_last_log_end_less_the_position_whatever_the_order_of_happenings() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let every: Vec<(Name, i32)> = [("a", 0), ("a", 1), ("b", 0)].to_vec();
        for _ in 0..200 {
            let status = ConnectorStatus::new("c", "postgres");
            let mut history = Vec::new();
            for _ in 0..rng.random_range(1..40) {
                let some = |rng: &mut rand::rngs::StdRng| -> Vec<(Name, i32)> {
                    every.iter().copied().filter(|_| rng.random_bool(0.6)).collect()
                };
                let happening = match rng.random_range(0..4) {
                    0 => Happening::Assigned(
                        some(&mut rng)
                            .into_iter()
                            .map(|(t, p)| (t, p, rng.random_bool(0.7).then(|| rng.random_range(0..100))))
                            .collect(),
                    ),
                    1 => Happening::Revoked,
                    // Positions and log ends of any partition, assigned or
                    // not, stale (below the last) or not.
                    2 => Happening::Positions(
                        some(&mut rng).into_iter().map(|(t, p)| (t, p, rng.random_range(0..100))).collect(),
                    ),
                    _ => Happening::LogEnds(
                        some(&mut rng).into_iter().map(|(t, p)| (t, p, rng.random_range(0..100))).collect(),
                    ),
                };
                match &happening {
                    Happening::Assigned(partitions) => status.assigned(partitions),
                    Happening::Revoked => status.revoked(),
                    Happening::Positions(moved) => status.positions(moved),
                    Happening::LogEnds(ends) => status.high_watermarks(ends),
                }
                history.push(happening);
                let shown: Vec<(String, i32, Option<i64>)> =
                    status.partitions().into_iter().map(|p| (p.topic, p.partition, p.lag)).collect();
                let expected: Vec<(String, i32, Option<i64>)> = every
                    .iter()
                    .filter_map(|&(t, p)| lag_after(&history, (t, p)).map(|lag| (t.to_string(), p, lag)))
                    .collect();
                assert_eq!(shown, expected, "seed {seed}, after {history:?}");
            }
        }
    }

    #[test]
    fn retries_show_until_recovery_and_lag_follows_positions() {
        let status = ConnectorStatus::new("c", "postgres");
        status.assigned(&[("t", 0, Some(5))]);
        assert_eq!(status.state(), State::Running);
        status.retrying("sink", ErrorClass::Transient, "connection refused", 0);
        assert_eq!(status.state(), State::Retrying);
        assert!(status.retrying_for().is_some() && status.is_ready());
        status.batch_written(10, 10, 0, 0.01, Some(1));
        assert_eq!(status.state(), State::Running);
        assert!(status.retrying_for().is_none());
        status.high_watermarks(&[("t", 0, 20)]);
        status.positions(&[("t", 0, 15)]);
        assert_eq!(status.partitions()[0].lag, Some(5));
        assert_eq!(status.to_json()["last_error"]["message"], "connection refused");
        // A consumer restarted on the same partition (fenced, say) shows
        // its lag from its claimed position and the log end last reported.
        status.revoked();
        assert!(status.partitions().is_empty(), "a revoked partition is not this consumer's");
        status.assigned(&[("t", 0, Some(18))]);
        assert_eq!(status.partitions()[0].lag, Some(2));
        status.assigned(&[("t", 1, Some(0))]);
        assert_eq!(status.partitions()[0].lag, None, "no log end reported for this one yet");
        status.pause(true);
        assert_eq!(status.state(), State::Paused);
        status.pause(false);
        assert_eq!(status.state(), State::Running);
    }
}
