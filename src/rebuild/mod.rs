//! `kawka rebuild <connector>`: replay the whole log into the next version
//! of a read model beside the live one, then swap them atomically; the
//! previous version is kept for `--rollback` until `--cleanup`.
//!
//! * [`postgres`]: `<table>_v<N+1>`, positions in `kawka_offsets`, the swap
//!   is renames in one transaction that also moves the live positions.
//! * [`elasticsearch`]: `<alias>-v<N+1>` loaded with refresh off and no
//!   replicas, positions in Kafka's committed offsets, the swap is one
//!   `_aliases` call while the live index is write-blocked.
//!
//! Both run the connector's own projection and upcasters with another
//! consumer group, in large batches, and cut over only once the rebuild has
//! reached the live connector's positions (the broker's high watermarks,
//! which some brokers misreport, are only a further floor for an
//! Elasticsearch cut-over: see [`elasticsearch`]); where a partition's log
//! now starts is a floor under the rebuild's positions ([`LogStarts`]: what
//! expired is not there to read). [`Rebuilds`] runs them inside
//! the daemon for the HTTP API; progress goes to the live connector's status.

pub mod elasticsearch;
pub mod postgres;

use std::future::Future;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::sync::watch;

use crate::config::{ConnectorSettings, ErrorPolicy, Settings};
use crate::pipeline::ConnectorRuntime;
use crate::sink::{Sink, Target};
use crate::source::kafka::GroupOffsets;
use crate::status::{ConnectorStatus, RebuildProgress, RebuildState};

/// A (topic, partition, next offset) position.
pub type Position = (String, i32, i64);

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
    /// What readers now query (the table, or the index behind the alias).
    pub new_version: String,
    pub previous_version: String,
    /// Events the rebuild skipped: they failed (and were dead-lettered by
    /// the live run), so the new version lacks them as the live one does.
    pub skipped: u64,
}

impl RebuildReport {
    pub fn summary(&self) -> String {
        let skipped = match self.skipped {
            0 => String::new(),
            n => format!(", {n} failing event(s) skipped (the live run dead-lettered them)"),
        };
        format!(
            "rebuilt {} in {:.1} s ({:.0} events/s{skipped}); the previous version is kept as {}",
            self.new_version,
            self.seconds,
            self.events as f64 / self.seconds.max(1e-3),
            self.previous_version
        )
    }
}

/// Rebuilds `runtime`'s read model and cuts over. A Postgres rebuild that
/// did not finish is resumed unless `restart` (an Elasticsearch one starts
/// anew).
pub async fn rebuild(
    runtime: ConnectorRuntime,
    restart: bool,
    shutdown: watch::Receiver<bool>,
    progress: impl FnMut(&RebuildProgress),
) -> anyhow::Result<RebuildReport> {
    match &runtime.sink {
        Sink::Postgres(_) => postgres::rebuild(runtime, restart, shutdown, progress).await,
        Sink::Elasticsearch(_) => elasticsearch::rebuild(runtime, shutdown, progress).await,
    }
}

/// Swaps back to the previous version; returns the name the rolled-out
/// version is kept under.
pub async fn rollback(runtime: &ConnectorRuntime, shutdown: watch::Receiver<bool>) -> anyhow::Result<String> {
    match &runtime.sink {
        Sink::Postgres(_) => postgres::rollback(runtime).await,
        Sink::Elasticsearch(_) => elasticsearch::rollback(runtime, shutdown).await,
    }
}

/// Drops the previous version kept for rollback.
pub async fn cleanup(runtime: &ConnectorRuntime) -> anyhow::Result<Option<String>> {
    match &runtime.sink {
        Sink::Postgres(_) => postgres::cleanup(runtime).await,
        Sink::Elasticsearch(_) => elasticsearch::cleanup(runtime).await,
    }
}

/// Where each partition's log starts, as a floor under the rebuild's
/// positions: below it there is nothing left to read, so the rebuild has
/// applied there all it ever can, committed or not. Without it a partition
/// whose records all expired after the live connector read them (its log
/// starts and ends at the live position) would never be committed by the
/// rebuild, which would wait for it forever. Asked only of the partitions
/// short of the target whose positions have not moved since the last look
/// (the others are being read), at most every [`STARTS_EVERY`]; a log's
/// start only moves up, so one read earlier is a lower floor, never a
/// wrong one (a broker that reports a start past records it still holds
/// would make the rebuild skip them: Kafka does not).
struct LogStarts {
    reader: Arc<GroupOffsets>,
    seen: Mutex<StartsSeen>,
}

/// How often a rebuild standing short of its target asks where the logs start.
const STARTS_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct StartsSeen {
    /// The rebuild's positions at the last look, as committed.
    done: Option<Vec<Position>>,
    starts: Vec<Position>,
    read_at: Option<Instant>,
}

impl StartsSeen {
    /// The partitions to ask where their logs start, the rebuild's
    /// positions being `done` and its target `toward`: those short of it
    /// (past what is known of their starts) that stood still since the
    /// last look, at most every [`STARTS_EVERY`].
    fn due(&self, done: &[Position], toward: &[Position]) -> Vec<(String, i32)> {
        let Some(last) = &self.done else { return Vec::new() };
        if self.read_at.is_some_and(|at| at.elapsed() < STARTS_EVERY) {
            return Vec::new();
        }
        toward
            .iter()
            .filter(|(t, p, next)| next_of(done, t, *p).max(next_of(&self.starts, t, *p)).is_none_or(|at| at < *next))
            .filter(|(t, p, _)| next_of(done, t, *p) == next_of(last, t, *p))
            .map(|(t, p, _)| (t.clone(), *p))
            .collect()
    }

    /// `done` floored, after a look that asked (`Some`, with the starts
    /// read unless reading them failed) or did not.
    fn looked(&mut self, done: Vec<Position>, asked: Option<Option<Vec<Position>>>) -> Vec<Position> {
        if let Some(read) = asked {
            self.read_at = Some(Instant::now());
            for (topic, partition, start) in read.into_iter().flatten() {
                match self.starts.iter_mut().find(|(t, p, _)| *t == topic && *p == partition) {
                    // A start only moves up: a lower answer is not news.
                    Some(known) => known.2 = known.2.max(start),
                    None => self.starts.push((topic, partition, start)),
                }
            }
        }
        let floored = furthest(&done, &self.starts);
        self.done = Some(done);
        floored
    }
}

impl LogStarts {
    /// For the partitions `reader` was made for (whatever its group).
    fn new(reader: Arc<GroupOffsets>) -> LogStarts {
        LogStarts { reader, seen: Mutex::default() }
    }

    /// For the partitions `source` reads, through a client of its own.
    async fn of(
        kafka: &crate::source::KafkaSettings,
        source: &crate::source::SourceSettings,
    ) -> anyhow::Result<LogStarts> {
        let (kafka, source) = (kafka.clone(), source.clone());
        let reader = tokio::task::spawn_blocking(move || GroupOffsets::of_source(&kafka, &source))
            .await?
            .context("a client to read where the logs start")?;
        Ok(LogStarts::new(Arc::new(reader)))
    }

    /// The rebuild's positions `done` (as committed) raised to where the
    /// logs start, asking of the partitions standing short of `toward`.
    async fn floor(&self, done: Vec<Position>, toward: &[Position]) -> Vec<Position> {
        let due = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).due(&done, toward);
        let asked = if due.is_empty() {
            None
        } else {
            let reader = self.reader.clone();
            let read: anyhow::Result<Vec<Position>> =
                async { Ok(tokio::task::spawn_blocking(move || reader.starts(&due)).await??) }.await;
            // Only a floor: a failed read is asked again at a later look.
            Some(
                read.inspect_err(
                    |error| tracing::warn!(error = %format!("{error:#}"), "reading where the logs start failed"),
                )
                .ok(),
            )
        };
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).looked(done, asked)
    }

    /// The starts read so far (none yet: no floor).
    fn last(&self) -> Vec<Position> {
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).starts.clone()
    }
}

/// Per partition, the further of `a`'s position and `b`'s; a partition
/// only `b` has is left out at 0 (no position to show). Sorted. A
/// rebuild's positions raised to where the logs start; a cut-over's target.
fn furthest(a: &[Position], b: &[Position]) -> Vec<Position> {
    let mut furthest: Vec<Position> =
        a.iter().map(|(t, p, next)| (t.clone(), *p, (*next).max(next_of(b, t, *p).unwrap_or(0)))).collect();
    furthest.extend(b.iter().filter(|(t, p, next)| *next > 0 && next_of(a, t, *p).is_none()).cloned());
    furthest.sort();
    furthest
}

/// The position `positions` hold for a partition, if any.
fn next_of(positions: &[Position], topic: &str, partition: i32) -> Option<i64> {
    positions.iter().find(|(t, p, _)| t == topic && *p == partition).map(|found| found.2)
}

/// Whether the rebuild has reached the live positions on every partition.
fn caught_up(live: &[Position], rebuild: &[Position]) -> bool {
    live.iter().all(|(t, p, next)| next_of(rebuild, t, *p).is_some_and(|reached| reached >= *next))
}

/// The rebuild's settings: the connector's, under another name and group,
/// from the earliest offsets, in large batches. Bad events were
/// dead-lettered by the live run already, so here they are skipped and
/// counted; a connector that parks keys parks them as the live one does
/// (see [`ConnectorRuntime::holds_parked_of`]).
fn rebuild_settings(
    runtime: &ConnectorRuntime,
    name: &str,
    version: i64,
    retarget: impl FnOnce(&mut Target),
) -> ConnectorSettings {
    let mut settings = (*runtime.settings).clone();
    settings.name = name.to_string();
    settings.source.group_id = format!("{}.rebuild-v{version}", settings.source.group_id);
    settings.source.start = crate::source::StartPosition::Earliest;
    // A connector that parks keys keeps parking them (see
    // `ConnectorRuntime::holds_parked_of`); the others skip.
    if settings.on_error != ErrorPolicy::Park {
        settings.on_error = ErrorPolicy::Skip;
    }
    settings.batch.max_events = settings.batch.max_events.max(20_000);
    settings.batch.max_bytes = settings.batch.max_bytes.max(32 << 20);
    // A batch being filled is not written yet: an Elasticsearch cut-over
    // tells a rebuild that has read everything from one that waits by its
    // writes, so a batch may not wait long for more events.
    settings.batch.max_wait = settings.batch.max_wait.min(Duration::from_secs(1));
    retarget(&mut settings.target);
    settings
}

fn runtime_with(runtime: &ConnectorRuntime, settings: ConnectorSettings, sink: Sink) -> ConnectorRuntime {
    let status = Arc::new(ConnectorStatus::new(&settings.name, sink.kind()));
    // The live connector's parked keys are held back in the new version too.
    let holds_parked_of = (runtime.settings.on_error == ErrorPolicy::Park).then(|| crate::pipeline::LiveConnector {
        name: runtime.settings.name.clone(),
        group: runtime.settings.source.group_id.clone(),
    });
    ConnectorRuntime { settings: Arc::new(settings), sink, status, replay: None, holds_parked_of, ..runtime.clone() }
}

/// A rebuild connector running in the background.
struct Follower {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<crate::pipeline::Halt>,
}

impl Follower {
    fn start(runtime: &ConnectorRuntime) -> Follower {
        // The status is the rebuild's, shared by its followers: the
        // partitions it lists are this one's once its consumer has joined
        // (a stopped follower's consumer leaves them behind).
        runtime.status.revoked();
        let (stop, stopping) = watch::channel(false);
        Follower { stop, task: tokio::spawn(runtime.clone().run(stopping)) }
    }

    /// Stops it; what it made durable stays, its positions included.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }

    /// An error once it has ended on its own (its connector stopped, or
    /// panicked): whoever waits for it must not wait on.
    fn alive(&self) -> anyhow::Result<()> {
        if self.task.is_finished() {
            bail!("the rebuild's connector stopped; see its log");
        }
        Ok(())
    }
}

impl Drop for Follower {
    /// One dropped unstopped (a cut-over given up on) still stops, as at
    /// a shutdown: it finishes or abandons its writes within the grace.
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// When a rebuild started, for its rate and report.
struct Started {
    at: Instant,
    at_ms: i64,
}

impl Started {
    fn now() -> Started {
        Started { at: Instant::now(), at_ms: crate::status::now_ms() }
    }

    /// The report of a rebuild done by `rebuilder`.
    fn report(
        &self,
        rebuilder: &ConnectorRuntime,
        events: u64,
        new_version: String,
        previous_version: String,
    ) -> RebuildReport {
        RebuildReport {
            events,
            seconds: self.at.elapsed().as_secs_f64(),
            new_version,
            previous_version,
            skipped: rebuilder.status.total(crate::status::Outcome::Skipped),
        }
    }
}

/// Reports progress every 250 ms until `read` (live positions, rebuild
/// positions) says the rebuild has caught up; fails when `shutdown` is set.
async fn follow<F, Fut>(
    shutdown: &watch::Receiver<bool>,
    started: &Started,
    progress: &mut impl FnMut(&RebuildProgress),
    mut read: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<(Vec<Position>, Vec<Position>)>>,
{
    loop {
        if *shutdown.borrow() {
            bail!("interrupted");
        }
        let (live, done) = read().await?;
        // Nothing to reach: waiting would never end.
        if live.is_empty() {
            bail!("the live connector has no positions yet (has it run?); there is nothing to catch up with");
        }
        let (done_events, target): (i64, i64) = (done.iter().map(|r| r.2).sum(), live.iter().map(|r| r.2).sum());
        progress(&RebuildProgress::new(
            done_events.max(0) as u64,
            target.max(0) as u64,
            done_events as f64 / started.at.elapsed().as_secs_f64().max(1e-3),
            started.at_ms,
        ));
        if caught_up(&live, &done) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A progress line for a terminal: a bar, percent, events/s, ETA.
pub fn progress_line(progress: &RebuildProgress) -> String {
    let RebuildProgress { done, target, percent, events_per_second, eta_seconds, message, .. } = progress;
    let filled = ((percent / 5.0) as usize).min(20);
    let eta = eta_seconds.map_or("-".to_string(), |s| format!("{s:.0}s"));
    // A running rebuild's message says what it waits for (the cut-over's locks).
    let waiting = message.as_deref().filter(|_| progress.state == RebuildState::Running).unwrap_or_default();
    format!(
        "[{}{}] {percent:5.1}% {done}/{target} events, {events_per_second:.0} events/s, ETA {eta} {waiting}",
        "#".repeat(filled),
        " ".repeat(20 - filled)
    )
}

/// Prints progress on one terminal line.
pub fn print_progress(progress: &RebuildProgress) {
    eprint!("\r{}", progress_line(progress));
    let _ = std::io::stderr().flush();
}

/// Why a rebuild asked for over HTTP did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no connector named {0}")]
    NotFound(String),
    #[error("a rebuild of {0} is already running")]
    Running(String),
}

/// Rebuilds run inside the daemon (`POST /connectors/{name}/rebuild`): one
/// at a time per connector; progress and outcome go to the live
/// connector's status, so `GET /connectors/{name}` and `kawka status`
/// show them.
#[derive(Clone)]
pub struct Rebuilds {
    /// The running connectors' runtimes (reloads replace them).
    runtimes: crate::pipeline::Runtimes,
    shutdown: watch::Receiver<bool>,
    /// Running rebuilds: the daemon waits for them on shutdown, so one
    /// interrupted mid-cut-over still lifts its write block.
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Rebuilds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuilds").field("connectors", &self.runtimes.len()).finish()
    }
}

impl Rebuilds {
    pub fn new(runtimes: crate::pipeline::Runtimes, shutdown: watch::Receiver<bool>) -> Rebuilds {
        Rebuilds { runtimes, shutdown, tasks: Arc::default() }
    }

    fn runtime(&self, name: &str) -> Result<ConnectorRuntime, StartError> {
        let runtime = self.runtimes.get(name).ok_or_else(|| StartError::NotFound(name.to_string()))?;
        if runtime.status.rebuild().is_some_and(|p| p.state == RebuildState::Running) {
            return Err(StartError::Running(name.to_string()));
        }
        Ok(runtime)
    }

    /// Starts a rebuild of `name` in the background.
    pub fn start(&self, name: &str) -> Result<(), StartError> {
        // Held from the check to the start: two requests cannot both start one.
        let mut tasks = self.tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let runtime = self.runtime(name)?;
        let status = runtime.status.clone();
        let started_at_ms = crate::status::now_ms();
        status.set_rebuild(RebuildProgress::new(0, 0, 0.0, started_at_ms));
        let shutdown = self.shutdown.clone();
        let task = tokio::spawn(async move {
            let outcome = rebuild(runtime, false, shutdown, |progress| status.set_rebuild(progress.clone())).await;
            status.rebuild_ended(outcome.map(|report| report.summary()).map_err(|error| format!("{error:#}")));
        });
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
        Ok(())
    }

    /// Waits for running rebuilds to end (after the shutdown signal they
    /// stop within a second, cleaning up).
    pub async fn finish(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// `kawka rebuild --rollback`, unless a rebuild is running.
    pub async fn rollback(&self, name: &str) -> Result<anyhow::Result<String>, StartError> {
        Ok(rollback(&self.runtime(name)?, self.shutdown.clone()).await.map(|table| rolled_back(&table)))
    }

    /// `kawka rebuild --cleanup`, unless a rebuild is running.
    pub async fn cleanup(&self, name: &str) -> Result<anyhow::Result<String>, StartError> {
        Ok(cleanup(&self.runtime(name)?).await.map(|table| cleaned_up(table.as_deref())))
    }
}

pub fn rolled_back(table: &str) -> String {
    format!("rolled back: the rebuilt version is kept as {table}")
}

pub fn cleaned_up(table: Option<&str>) -> String {
    match table {
        Some(table) => format!("dropped {table}"),
        None => "no previous version to drop".to_string(),
    }
}

/// Builds the runtime of one connector.
pub fn runtime_of(settings: &Settings, connector: &str) -> anyhow::Result<ConnectorRuntime> {
    crate::pipeline::build::connectors(settings, crate::pipeline::build::upcasting(settings, &[]), &[])?
        .into_iter()
        .find(|r| r.settings.name == connector)
        .with_context(|| format!("no connector named {connector}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_means_every_live_partition_reached() {
        let live = vec![("t".to_string(), 0, 10), ("t".to_string(), 1, 5)];
        assert!(caught_up(&live, &[("t".into(), 0, 10), ("t".into(), 1, 7)]));
        assert!(!caught_up(&live, &[("t".into(), 0, 10), ("t".into(), 1, 4)]));
        assert!(!caught_up(&live, &[("t".into(), 0, 12)]));
        let line = progress_line(&RebuildProgress::new(50, 100, 10.0, 0));
        assert!(line.starts_with("[##########          ]  50.0% 50/100 events, 10 events/s, ETA 5s"), "{line}");
        let line = progress_line(&RebuildProgress::new(150, 100, 10.0, 0));
        assert!(line.starts_with("[####################] 100.0% 150/100 events, 10 events/s, ETA -"), "{line}");
    }

    #[test]
    fn a_partition_whose_log_starts_past_the_live_position_counts_as_reached() {
        let t = |p: i32, next: i64| ("t".to_string(), p, next);
        // p0 read to 10; p1's records all expired after the live connector
        // read them (its log starts at 8, where the live one stands), the
        // rebuild having committed only 3 there; p2 was never committed by
        // the rebuild and its log starts at 6; p3 starts at 0.
        let (live, done) = (vec![t(0, 10), t(1, 8), t(2, 6)], vec![t(0, 10), t(1, 3)]);
        assert!(!caught_up(&live, &done));
        let starts = vec![t(0, 2), t(1, 8), t(2, 6), t(3, 0)];
        let raised = furthest(&done, &starts);
        assert_eq!(raised, vec![t(0, 10), t(1, 8), t(2, 6)], "a position is never lowered, nor one made at 0");
        assert!(caught_up(&live, &raised));
        // A log that starts short of the live position is no floor there.
        assert!(!caught_up(&live, &furthest(&done, &[t(1, 7), t(2, 6)])));
        assert_eq!(furthest(&done, &[]), done);
    }

    #[test]
    fn where_the_logs_start_is_asked_only_of_partitions_standing_short_of_the_target() {
        let t = |p: i32, next: i64| ("t".to_string(), p, next);
        let toward = [t(0, 100), t(1, 8), t(2, 5)];
        let mut seen = StartsSeen::default();
        assert!(seen.due(&[t(0, 5), t(2, 5)], &toward).is_empty(), "a first look: nothing known to stand still");
        assert_eq!(seen.looked(vec![t(0, 5), t(2, 5)], None), vec![t(0, 5), t(2, 5)]);
        // p0 is being read (it moved); p1 has no position and stands
        // still, short of 8: it is asked, busy p0 or not; p2 has reached.
        assert_eq!(seen.due(&[t(0, 40), t(2, 5)], &toward), vec![("t".to_string(), 1)]);
        // A failed read leaves no floor, and is asked again after the pause.
        assert_eq!(seen.looked(vec![t(0, 40), t(2, 5)], Some(None)), vec![t(0, 40), t(2, 5)]);
        assert!(seen.due(&[t(0, 70), t(2, 5)], &toward).is_empty(), "asked within STARTS_EVERY");
        seen.read_at = Instant::now().checked_sub(STARTS_EVERY);
        assert_eq!(seen.due(&[t(0, 40), t(2, 5)], &toward), vec![("t".to_string(), 0), ("t".to_string(), 1)]);
        let floored = seen.looked(vec![t(0, 40), t(2, 5)], Some(Some(vec![t(0, 2), t(1, 8)])));
        assert_eq!(floored, vec![t(0, 40), t(1, 8), t(2, 5)]);
        assert!(caught_up(&toward[1..], &floored));
        // What was read stays the floor at the looks that do not ask, and a
        // lower answer later (a broker that says 0) does not lower it.
        assert_eq!(seen.looked(vec![t(0, 90), t(2, 5)], None), vec![t(0, 90), t(1, 8), t(2, 5)]);
        seen.read_at = Instant::now().checked_sub(STARTS_EVERY);
        assert_eq!(seen.due(&[t(0, 90), t(2, 5)], &toward), vec![("t".to_string(), 0)], "p1 reached by its start");
        assert_eq!(
            seen.looked(vec![t(0, 90), t(2, 5)], Some(Some(vec![t(0, 0), t(1, 0)]))),
            vec![t(0, 90), t(1, 8), t(2, 5)]
        );
    }

    /// Rebuilds tried at random: partitions read at random paces, some of
    /// them with every record expired after the live connector read them
    /// (the log starts at the live position), others expired in part or
    /// not at all, their commits nearly every look (a busy rebuild); looked
    /// at every 250 ms as `follow` does, STARTS_EVERY
    /// passing or not between looks, the broker's answer failing, saying 0
    /// (tansu) or true. The floor claims nothing past what was read or
    /// expired, never goes down, finds an expired partition while the
    /// others are still being read, and the rebuild is caught up soon
    /// after the last record left is read, not before.
    #[test]
    fn random_rebuilds_with_expired_partitions_reach_the_target_and_claim_nothing_unread() {
        use rand::{Rng, SeedableRng};
        for seed in 0..100u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let partitions = rng.random_range(1..6usize);
            let live: Vec<Position> =
                (0..partitions).map(|p| ("t".to_string(), p as i32, rng.random_range(1..3000))).collect();
            let start: Vec<i64> = live
                .iter()
                .map(|(_, _, next)| match rng.random_range(0..3) {
                    0 => *next,
                    1 => rng.random_range(0..=*next),
                    _ => 0,
                })
                .collect();
            let expired = |p: usize| start[p] >= live[p].2;
            // The rebuild reads only [start, live): no position until it has.
            let mut committed: Vec<Option<i64>> = vec![None; partitions];
            let (mut seen, mut last, mut looks_since_read): (_, Vec<Position>, usize) =
                (StartsSeen::default(), Vec::new(), 0);
            for look in 0.. {
                for p in 0..partitions {
                    if expired(p) || !rng.random_bool(0.9) {
                        continue;
                    }
                    let from = committed[p].unwrap_or(start[p]);
                    if from < live[p].2 {
                        committed[p] = Some(rng.random_range(from + 1..=(from + 20).min(live[p].2)));
                    }
                }
                let done: Vec<Position> =
                    (0..partitions).filter_map(|p| committed[p].map(|c| ("t".to_string(), p as i32, c))).collect();
                if rng.random_bool(0.5) {
                    seen.read_at = seen.read_at.and_then(|_| Instant::now().checked_sub(STARTS_EVERY));
                }
                let due = seen.due(&done, &live);
                let answer = |start: &dyn Fn(usize) -> i64| {
                    due.iter().map(|(t, p)| (t.clone(), *p, start(*p as usize))).collect()
                };
                let asked = (!due.is_empty()).then(|| match rng.random_range(0..4) {
                    0 => None,
                    1 => Some(answer(&|_| 0)),
                    _ => Some(answer(&|p| start[p])),
                });
                let floored = seen.looked(done.clone(), asked);
                for (t, p, at) in &floored {
                    let truth = committed[*p as usize].unwrap_or(0).max(start[*p as usize]);
                    assert!(*at <= truth, "seed {seed}, look {look}: {t}/{p} at {at}, read or expired to {truth}");
                    assert!(
                        next_of(&done, t, *p).is_none_or(|d| d <= *at),
                        "seed {seed}: below the committed position"
                    );
                }
                for (t, p, before) in &last {
                    assert!(
                        next_of(&floored, t, *p).is_some_and(|now| now >= *before),
                        "seed {seed}: {t}/{p} went down"
                    );
                }
                for p in (0..partitions).filter(|&p| expired(p) && look >= 100) {
                    assert!(
                        next_of(&floored, "t", p as i32).is_some_and(|at| at >= live[p].2),
                        "seed {seed}, look {look}: expired partition {p} not found while others are read"
                    );
                }
                let all_read = (0..partitions).all(|p| expired(p) || committed[p] == Some(live[p].2));
                if caught_up(&live, &floored) {
                    assert!(all_read, "seed {seed}, look {look}: caught up before the records left were read");
                    break;
                }
                looks_since_read += usize::from(all_read);
                assert!(
                    looks_since_read < 100,
                    "seed {seed}: everything read {looks_since_read} looks ago, not caught up"
                );
                last = floored;
            }
        }
    }

    #[test]
    fn the_summary_says_what_was_skipped() {
        let report = RebuildReport {
            events: 100,
            seconds: 2.0,
            new_version: "t".into(),
            previous_version: "t_v1".into(),
            skipped: 0,
        };
        assert_eq!(report.summary(), "rebuilt t in 2.0 s (50 events/s); the previous version is kept as t_v1");
        let report = RebuildReport { skipped: 3, ..report };
        assert!(report.summary().contains("(50 events/s, 3 failing event(s) skipped"), "{}", report.summary());
    }

    #[tokio::test]
    async fn following_reports_progress_until_caught_up_and_refuses_an_empty_target() {
        let (_stop, shutdown) = watch::channel(false);
        let started = Started::now();
        let mut seen = Vec::new();
        let mut reads = 0;
        let followed = follow(&shutdown, &started, &mut |p: &RebuildProgress| seen.push((p.done, p.target)), || {
            reads += 1;
            let done = if reads < 3 { 4 } else { 10 };
            async move { Ok((vec![("t".to_string(), 0, 10)], vec![("t".to_string(), 0, done)])) }
        })
        .await;
        assert!(followed.is_ok());
        assert_eq!(seen, vec![(4, 10), (4, 10), (10, 10)]);
        let empty = follow(&shutdown, &started, &mut |_: &RebuildProgress| {}, || async { Ok((vec![], vec![])) }).await;
        assert!(empty.expect_err("no live positions").to_string().contains("no positions yet"));
    }
}
