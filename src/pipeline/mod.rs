//! One connector's loop: poll → decode → project → batch → write → commit.
//!
//! * [`build`]: wiring: each connector's runtime, its stages built from the settings.
//! * `prepare.rs`: the decode thread: records decoded, upcast, projected and checked ahead of the worker.
//! * `worker.rs`: the consume loop: records → decode → upcast → project → the pending batch.
//! * `write.rs`: flushes: the batch written at once or in the background, the writes in flight settled in order.
//! * `batch.rs`: the batch being built: its records, their ops and the positions it commits.
//! * `in_flight.rs`: the background writes and which of them a new batch must wait for or follow.
//! * `policy.rs`: the error policy: a bad event is skipped, dead-lettered, parks its key or stops the connector.
//! * `park.rs`: `on_error: park`: a failed event's key held behind it, its later events parked in order.
//! * `dead_letter.rs`: the dead-letter producer.
//! * `replay.rs`: `kawka dlq replay`: the connector run over its dead letters.
//! * `replay_parked.rs`: `kawka dlq replay` and `release` of parked keys: each key's events in order.
//!
//! Records are processed one at a time in the order the source hands them
//! over, so within a partition every record below the batch's last one has
//! been written, dead-lettered or skipped by the time the batch commits:
//! the batch's positions (last processed + 1 per partition) are a
//! contiguous watermark by construction.

mod batch;
pub mod build;
pub mod dead_letter;
mod in_flight;
mod park;
mod policy;
mod prepare;
pub mod replay;
pub mod replay_parked;
mod worker;
mod write;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use tokio::sync::watch;

use crate::codec::Codec;
use crate::config::ConnectorSettings;
use crate::error::Failure;
use crate::error::{Backoff, ErrorClass};
use crate::projection::Projection;
use crate::sink::Sink;
use crate::source::{ClaimFn, KafkaSettings, KafkaSource, RecordsReceiver, SourceChannels};
use crate::status::{ConnectorStatus, State};
use crate::value::Name;
use dead_letter::DeadLetters;
use worker::Worker;

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
    /// The sink could not be prepared (a permanent error) or a write task failed.
    Sink(String),
    /// Code of the connector panicked (a user's upcaster or projection, a
    /// decoder edge, a sink write): it would panic again on the same events,
    /// so the connector stops, its consumer leaves the group, and the
    /// others run on.
    Panicked(String),
}

impl Halt {
    /// A task's panic, or any other way it failed (cancelled), as a halt.
    fn of_join_error(error: tokio::task::JoinError, what: &str) -> Halt {
        if error.is_panic() {
            Halt::Panicked(format!("{what} panicked: {}", panic_message(&*error.into_panic())))
        } else {
            Halt::Sink(format!("{what} failed: {error}"))
        }
    }
}

pub use crate::error::panic_message;

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
    /// A rebuild of a connector that parks keys: that connector. The
    /// rebuild holds back the keys it has parked (their events from the
    /// failed one on are not written), so the version it builds has them
    /// as the live one does, for a replay after the cut-over; and it parks,
    /// in the live connector's name, what the live connector has not read
    /// yet (the cut-over moves the live positions to the rebuild's).
    pub holds_parked_of: Option<LiveConnector>,
}

/// The live connector a rebuild builds a new version for.
#[derive(Debug, Clone)]
pub struct LiveConnector {
    pub name: String,
    /// Its consumer group (its positions, for Elasticsearch).
    pub group: String,
}

/// The runtimes of the running connectors, shared by the supervisor (which
/// replaces them on reloads), rebuilds and read-your-writes waits.
#[derive(Clone, Default)]
pub struct Runtimes(Arc<std::sync::RwLock<Vec<ConnectorRuntime>>>);

impl Runtimes {
    pub fn new(runtimes: Vec<ConnectorRuntime>) -> Runtimes {
        Runtimes(Arc::new(std::sync::RwLock::new(runtimes)))
    }

    pub fn set(&self, runtimes: Vec<ConnectorRuntime>) {
        *self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = runtimes;
    }

    pub fn get(&self, name: &str) -> Option<ConnectorRuntime> {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().find(|r| r.settings.name == name).cloned()
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Runtimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtimes").field("connectors", &self.len()).finish()
    }
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
    /// Runs until shutdown, a `stop` or a panic; restarts its consumer
    /// after fencing or a failure of the source or the sink.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Halt {
        // The consume loop catches its own panics (to stop its consumer);
        // this catches the rest (preparing the sink, claiming), so a panic
        // anywhere shows as this connector stopped, never as a task that
        // vanished while its state says running.
        let status = self.status.clone();
        stop_on_panic(&status, self.run_loop(shutdown)).await
    }

    async fn run_loop(self, mut shutdown: watch::Receiver<bool>) -> Halt {
        let name = self.settings.name.clone();
        loop {
            let halt = self.run_once(&mut shutdown).await;
            match halt {
                Halt::Fenced | Halt::Source(_) | Halt::Sink(_) => {
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
                Halt::Panicked(ref message) => {
                    let failure = Failure { class: ErrorClass::Permanent, stage: "panic", message: message.clone() };
                    self.status.stopped(&failure);
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
                return Halt::Sink(error.to_string());
            }
            self.status.retrying("sink", error.class(), &error.to_string(), attempt);
            tokio::select! {
                _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                _ = stopped(shutdown) => return Halt::Shutdown,
            }
            attempt += 1;
        }
        let claim = self.sink.capabilities().stores_positions.then(|| self.claim_fn(shutdown.clone()));
        self.status.recovered();
        let started =
            KafkaSource::start(&self.settings.name, &self.kafka, &self.settings.source, claim, self.status.clone());
        let (source, channels) = match started {
            Ok(started) => started,
            // A setting librdkafka refuses cannot pass by waiting: the
            // connector stops, visibly, with librdkafka's reason.
            Err(error @ rdkafka::error::KafkaError::ClientConfig(..)) => {
                return Halt::Stopped(Failure {
                    class: ErrorClass::Config,
                    stage: "source",
                    message: error.to_string(),
                })
            }
            Err(error) => return Halt::Source(error.to_string()),
        };
        let SourceChannels { records, mut control } = channels;
        let mut ahead = match prepare::Ahead::start(self, records) {
            Ok(ahead) => ahead,
            Err(error) => {
                source.stop(SourceChannels { records: RecordsReceiver::closed(), control }).await;
                return Halt::Source(format!("cannot start the decoding thread: {error}"));
            }
        };
        let mut worker = Worker::new(self, &source, shutdown.clone());
        // A panic unwinds to here, not through the task: the consumer is
        // stopped below (it leaves the group) instead of polling on,
        // holding its partitions, behind a task that is gone.
        let consumed = std::panic::AssertUnwindSafe(worker.consume(&mut ahead, &mut control)).catch_unwind().await;
        let halt = match consumed {
            Ok(halt) => halt,
            Err(panic) => {
                // The writes in flight of the panicked run are abandoned
                // (their batches are read again on the next start).
                for write in worker.in_flight.drain(..) {
                    write.task.abort();
                }
                Halt::Panicked(format!("the connector panicked: {}", panic_message(&*panic)))
            }
        };
        drop(worker);
        let records = ahead.stop().await.unwrap_or_else(RecordsReceiver::closed);
        source.stop(SourceChannels { records, control }).await;
        halt
    }

    /// Claims in the sink, retrying failures until they pass (visibly:
    /// `retrying`, stage `claim`) or the daemon stops. It runs inside the
    /// rebalance, so each attempt is bounded ([`CLAIM_TIMEOUT`]).
    fn claim_fn(&self, shutdown: watch::Receiver<bool>) -> ClaimFn {
        let sink = self.sink.clone();
        let status = self.status.clone();
        Arc::new(move |partitions: Vec<(Name, i32)>| {
            let (sink, status, mut shutdown) = (sink.clone(), status.clone(), shutdown.clone());
            Box::pin(async move {
                let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(5) };
                let mut attempt = 0;
                loop {
                    let claimed = tokio::time::timeout(CLAIM_TIMEOUT, sink.claim(&partitions)).await;
                    let error = match claimed {
                        Ok(Ok(claims)) => return claims,
                        Ok(Err(error)) => error.to_string(),
                        Err(_) => format!("no answer from the sink within {CLAIM_TIMEOUT:?}"),
                    };
                    status.retrying("claim", ErrorClass::Transient, &format!("claiming partitions: {error}"), attempt);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                        // Stopping: the consumer is closing and nothing of
                        // this assignment will be written.
                        _ = stopped(&mut shutdown) => return Vec::new(),
                    }
                    attempt += 1;
                }
            })
        })
    }
}

/// How long one claim of partitions may wait for the sink.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a connector's loop; a panic that escapes it stops the connector
/// visibly (state `stopped`, the panic as its last error, `/readyz` 503).
async fn stop_on_panic(status: &ConnectorStatus, run: impl std::future::Future<Output = Halt>) -> Halt {
    match std::panic::AssertUnwindSafe(run).catch_unwind().await {
        Ok(halt) => halt,
        Err(panic) => {
            let message = format!("the connector panicked: {}", panic_message(&*panic));
            status.stopped(&Failure { class: ErrorClass::Permanent, stage: "panic", message: message.clone() });
            Halt::Panicked(message)
        }
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

    #[tokio::test]
    async fn a_panic_stops_the_connector_visibly() {
        let status = ConnectorStatus::new("panics", "postgres");
        status.set_state(State::Running);
        let halt = stop_on_panic(&status, async { panic!("a user's projection failed") }).await;
        assert!(matches!(&halt, Halt::Panicked(m) if m.contains("a user's projection failed")), "{halt:?}");
        assert_eq!(status.state(), State::Stopped);
        let shown = status.to_json().to_string();
        assert!(shown.contains("a user's projection failed"), "{shown}");
        assert!(!status.is_ready(), "/readyz answers 503 for a stopped connector");
        // A loop that ends normally is left alone.
        let status = ConnectorStatus::new("fine", "postgres");
        assert!(matches!(stop_on_panic(&status, async { Halt::Shutdown }).await, Halt::Shutdown));
        assert_ne!(status.state(), State::Stopped);
    }
}
