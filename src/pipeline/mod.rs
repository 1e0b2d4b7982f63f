//! One connector's loop: poll → decode → project → batch → write → commit.
//!
//! * [`build`]: wiring: each connector's runtime, its stages built from the settings.
//! * `worker.rs`: the consume loop: records → decode → upcast → project → the pending batch.
//! * `write.rs`: flushes: the batch written at once or in the background, the writes in flight settled in order.
//! * `batch.rs`: the batch being built: its records, their ops and the positions it commits.
//! * `in_flight.rs`: the background writes and which of them a new batch must wait for or follow.
//! * `policy.rs`: the error policy: a bad event is skipped, dead-lettered or stops the connector.
//! * `dead_letter.rs`: the dead-letter producer.
//! * `replay.rs`: `kawka dlq replay`: the connector run over its dead letters.
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
mod policy;
pub mod replay;
mod worker;
mod write;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::codec::Codec;
use crate::config::ConnectorSettings;
use crate::error::Failure;
use crate::error::{Backoff, ErrorClass};
use crate::projection::Projection;
use crate::sink::Sink;
use crate::source::{ClaimFn, KafkaSettings, KafkaSource};
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
    /// Runs until shutdown or a `stop`; restarts its consumer after fencing
    /// or a failure of the source or the sink.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Halt {
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
        let claim = self.sink.capabilities().stores_positions.then(|| self.claim_fn());
        self.status.recovered();
        let started =
            KafkaSource::start(&self.settings.name, &self.kafka, &self.settings.source, claim, self.status.clone());
        let (source, rx) = match started {
            Ok(started) => started,
            Err(error) => return Halt::Source(error.to_string()),
        };
        let mut worker = Worker::new(self, &source, shutdown.clone());
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

/// Completes once the daemon is stopping (the guard `wait_for` returns is
/// not `Send`, so it must not live in a `select!` branch that awaits).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
