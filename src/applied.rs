//! Read your writes: wait until a connector's read model reflects the
//! events at given positions (what a producer's delivery report names).
//!
//! A position is applied once the connector's durable position on its
//! partition is past it: every event up to it has had its effect written,
//! or was dead-lettered or skipped (the answer says which). Waiters sleep
//! on the connector's [`ConnectorStatus::applied_changes`], woken by the
//! batch that makes a position durable; partitions this process does not
//! own (another replica does) are looked up where the positions are kept
//! (Postgres: `kawka_offsets`; Elasticsearch: the group's committed
//! offsets), every [`LOOK_ELSEWHERE_EVERY`]. For Elasticsearch "applied"
//! also means searchable: once durable, the alias is refreshed (one
//! refresh for all the waiters that arrived before it started), so
//! nothing is refreshed while nobody waits.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::pipeline::ConnectorRuntime;
use crate::sink::Sink;
use crate::status::{ConnectorStatus, Outcome};

/// How often positions of partitions owned elsewhere are looked up.
pub const LOOK_ELSEWHERE_EVERY: Duration = Duration::from_millis(250);

/// The longest wait one request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A position to wait for: the event at `offset` of `topic`/`partition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wanted {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::str::FromStr for Wanted {
    type Err = String;

    /// `topic:partition:offset` (Kafka topic names hold no `:`).
    fn from_str(text: &str) -> Result<Wanted, String> {
        let mut parts = text.rsplitn(3, ':');
        let (offset, partition, topic) = (parts.next(), parts.next(), parts.next());
        match (topic, partition.map(str::parse::<i32>), offset.map(str::parse::<i64>)) {
            (Some(topic), Some(Ok(partition)), Some(Ok(offset)))
                if !topic.is_empty() && partition >= 0 && offset >= 0 =>
            {
                Ok(Wanted { topic: topic.to_string(), partition, offset })
            }
            _ => Err(format!("`{text}` is not a position topic:partition:offset")),
        }
    }
}

/// Where one wanted position stands.
#[derive(Debug, Clone, Serialize)]
pub struct PositionState {
    #[serde(flatten)]
    pub wanted: Wanted,
    /// The next offset whose effect is not durable yet, where known.
    pub position: Option<i64>,
    /// `applied`, `dead_lettered`, `skipped` (processed, without effect) or `pending`.
    pub outcome: &'static str,
}

/// The answer to a wait.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// Every position is processed (and, for Elasticsearch, searchable).
    pub applied: bool,
    pub positions: Vec<PositionState>,
    /// Elasticsearch: refreshed after the positions were durable.
    pub searchable: Option<bool>,
    pub waited_ms: u64,
    /// The connector's state (a paused one makes waits time out).
    pub state: crate::status::State,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("connector {connector} does not read topic {topic}")]
    UnknownTopic { connector: String, topic: String },
    #[error("no position to wait for")]
    Nothing,
}

/// Counts a waiter while it waits.
struct Waiting<'a>(&'a ConnectorStatus);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits until every position in `wanted` is applied, or `timeout`.
pub async fn wait(runtime: &ConnectorRuntime, wanted: &[Wanted], timeout: Duration) -> Result<Answer, WaitError> {
    if wanted.is_empty() {
        return Err(WaitError::Nothing);
    }
    if let Some(unknown) = wanted.iter().find(|w| !runtime.settings.source.topics.contains(&w.topic)) {
        return Err(WaitError::UnknownTopic { connector: runtime.settings.name.clone(), topic: unknown.topic.clone() });
    }
    let status = &runtime.status;
    status.waiters.fetch_add(1, Ordering::Relaxed);
    let _waiting = Waiting(status);
    let started = Instant::now();
    let deadline = started + timeout.min(MAX_WAIT);
    // Subscribed before the first look: a batch that lands in between
    // still wakes this waiter.
    let mut changes = status.applied_changes();
    let mut elsewhere: Vec<Option<i64>> = vec![None; wanted.len()];
    let mut elsewhere_looked: Option<Instant> = None;
    let mut group_offsets = None;
    loop {
        let reached: Vec<Option<i64>> = wanted
            .iter()
            .zip(&elsewhere)
            .map(|(w, other)| status.applied_position(&w.topic, w.partition).max(*other))
            .collect();
        let done = |i: usize| reached[i].is_some_and(|next| next > wanted[i].offset);
        if (0..wanted.len()).all(done) {
            let searchable = match &runtime.sink {
                Sink::Elasticsearch(sink) => Some(refreshed(status, sink).await),
                Sink::Postgres(_) => None,
            };
            let elapsed = started.elapsed();
            status.wait_seconds.observe(elapsed.as_secs_f64());
            return Ok(answer(status, wanted, &reached, searchable.unwrap_or(true), searchable, elapsed));
        }
        let now = Instant::now();
        if now >= deadline {
            status.wait_timeouts.fetch_add(1, Ordering::Relaxed);
            status.wait_seconds.observe(started.elapsed().as_secs_f64());
            return Ok(answer(status, wanted, &reached, false, None, started.elapsed()));
        }
        if elsewhere_looked.is_none_or(|at| at.elapsed() >= LOOK_ELSEWHERE_EVERY) {
            elsewhere_looked = Some(Instant::now());
            for (i, w) in wanted.iter().enumerate() {
                if !done(i) {
                    elsewhere[i] = stored_position(runtime, w, &mut group_offsets).await.max(elsewhere[i]);
                }
            }
            continue;
        }
        let nap = LOOK_ELSEWHERE_EVERY.min(deadline.saturating_duration_since(now));
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
}

fn answer(
    status: &ConnectorStatus,
    wanted: &[Wanted],
    reached: &[Option<i64>],
    applied: bool,
    searchable: Option<bool>,
    waited: Duration,
) -> Answer {
    let positions = wanted
        .iter()
        .zip(reached)
        .map(|(w, &position)| {
            let processed = position.is_some_and(|next| next > w.offset);
            let outcome = match status.failed_at(&w.topic, w.partition, w.offset) {
                Some(Outcome::DeadLettered) if processed => "dead_lettered",
                Some(Outcome::Parked) if processed => "parked",
                Some(_) if processed => "skipped",
                _ if processed => "applied",
                _ => "pending",
            };
            PositionState { wanted: w.clone(), position, outcome }
        })
        .collect();
    Answer { applied, positions, searchable, waited_ms: waited.as_millis() as u64, state: status.state() }
}

/// Refreshes the alias unless a refresh started after this waiter's
/// positions were durable (then that one covers them).
async fn refreshed(status: &ConnectorStatus, sink: &crate::sink::elasticsearch::ElasticsearchSink) -> bool {
    let durable_at = Instant::now();
    let mut last = status.last_refresh.lock().await;
    if last.is_some_and(|started| started >= durable_at) {
        return true;
    }
    *last = Some(Instant::now());
    match sink.refresh().await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(connector = %status.name, %error, "refresh for a waiter failed");
            *last = None;
            false
        }
    }
}

/// The durable position of a partition as the sink's owner recorded it,
/// whichever process that is.
async fn stored_position(
    runtime: &ConnectorRuntime,
    wanted: &Wanted,
    group_offsets: &mut Option<std::sync::Arc<crate::source::kafka::GroupOffsets>>,
) -> Option<i64> {
    match &runtime.sink {
        Sink::Postgres(sink) => sink.stored_position(&wanted.topic, wanted.partition).await.ok().flatten(),
        Sink::Elasticsearch(_) => {
            if group_offsets.is_none() {
                let (kafka, group, topics) = (
                    runtime.kafka.clone(),
                    runtime.settings.source.group_id.clone(),
                    runtime.settings.source.topics.clone(),
                );
                let created = tokio::task::spawn_blocking(move || {
                    crate::source::kafka::GroupOffsets::new(&kafka, &group, &topics)
                })
                .await
                .ok()?
                .ok()?;
                *group_offsets = Some(std::sync::Arc::new(created));
            }
            let reader = group_offsets.clone()?;
            let committed = tokio::task::spawn_blocking(move || reader.read()).await.ok()?.ok()?;
            committed
                .into_iter()
                .find(|(t, p, _)| *t == wanted.topic && *p == wanted.partition)
                .map(|(_, _, next)| next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_as_topic_partition_offset() {
        assert_eq!(
            "users.v1:2:1500".parse::<Wanted>(),
            Ok(Wanted { topic: "users.v1".into(), partition: 2, offset: 1500 })
        );
        for bad in ["users:2", "users:x:1", ":1:2", "users:-1:3", "users:1:-3", ""] {
            assert!(bad.parse::<Wanted>().is_err(), "{bad}");
        }
    }
}
