//! The error policy (`on_error`): a bad event is skipped, dead-lettered,
//! parks its key (see `park.rs`) or stops the connector, and so are the
//! events the sink refuses.

use std::time::Duration;

use super::dead_letter::{DeadLetterError, Letter, Sent};
use super::worker::Worker;
use super::Halt;
use crate::config::ErrorPolicy;
use crate::error::ErrorClass;
use crate::error::Failure;
use crate::source::RawRecord;
use crate::status::Outcome;
use crate::value::Name;

/// How long a dead letter is waited for before the batch before its event
/// is written meanwhile (a broker round trip is milliseconds).
const FIRST_WAIT: Duration = Duration::from_secs(2);

/// What one attempt at a dead letter came to.
enum Attempt {
    Written,
    /// Waiting can fix it: retried.
    Failed,
    /// The topic refuses it for good: the connector stops, visibly.
    Refused(Failure),
}

impl Worker<'_> {
    /// Applies the error policy to one bad event, a record not yet in the
    /// pending batch: if its dead letter is not written within
    /// [`FIRST_WAIT`], the batch before it is written meanwhile (its
    /// neighbours do not wait with it).
    pub(super) async fn fail(&mut self, record: &RawRecord, event_type: Name, failure: Failure) -> Result<(), Halt> {
        if self.policy() != ErrorPolicy::DeadLetter {
            return self.apply_policy(record, event_type, failure).await;
        }
        // The send owns what it borrows, so the batch can be flushed while
        // it is under way (flushing needs the worker).
        let (dead_letters, settings) = (self.runtime.dead_letters.clone(), self.runtime.settings.clone());
        let run = self.runtime.replay.as_ref().map(|r| r.id.clone());
        let sent = {
            let letter = Letter {
                topic: &settings.dead_letter_topic,
                connector: &settings.name,
                record,
                failure: &failure,
                replay_run: run.as_deref(),
                parked_behind: None,
            };
            let send = dead_letters.send(&letter);
            tokio::pin!(send);
            tokio::select! {
                sent = &mut send => sent,
                _ = tokio::time::sleep(FIRST_WAIT) => {
                    self.flush().await?;
                    send.await
                }
            }
        };
        match self.judge(sent, 0) {
            Attempt::Written => {
                self.dead_lettered(record, event_type, &failure);
                Ok(())
            }
            Attempt::Refused(failure) => Err(Halt::Stopped(failure)),
            Attempt::Failed => {
                self.flush().await?;
                self.apply_policy(record, event_type, failure).await
            }
        }
    }

    /// Applies the error policy to one bad event; a dead letter is retried
    /// until the broker takes it (visibly: state `retrying`, stage
    /// `dead_letter`, the broker's reason). Never flushes: the events the
    /// sink refuses while a batch is written come here.
    async fn apply_policy(&mut self, record: &RawRecord, event_type: Name, failure: Failure) -> Result<(), Halt> {
        match self.policy() {
            ErrorPolicy::Skip => {
                self.runtime.status.failed_event(event_type, record.position, &failure, Outcome::Skipped, "");
                Ok(())
            }
            ErrorPolicy::Stop => Err(Halt::Stopped(failure)),
            ErrorPolicy::DeadLetter => self.dead_letter(record, event_type, failure).await,
            ErrorPolicy::Park => self.park_failed(record, event_type, failure).await,
        }
    }

    /// Dead-letters one bad event, retrying until the broker takes it.
    pub(super) async fn dead_letter(
        &mut self,
        record: &RawRecord,
        event_type: Name,
        failure: Failure,
    ) -> Result<(), Halt> {
        self.send_letter(record, &failure, None).await?;
        self.dead_lettered(record, event_type, &failure);
        Ok(())
    }

    /// Writes one dead letter (`parked_behind`: of a parked key), retrying
    /// (visibly) until the broker takes it; a topic that refuses it for
    /// good stops the connector.
    pub(super) async fn send_letter(
        &mut self,
        record: &RawRecord,
        failure: &Failure,
        parked_behind: Option<&str>,
    ) -> Result<(), Halt> {
        let mut attempt = 0;
        loop {
            let settings = &self.runtime.settings;
            // A parked key's letter is its connector's, also when a rebuild
            // of it parks it (the replay takes the connector's letters).
            let connector = match (&self.runtime.holds_parked_of, parked_behind) {
                (Some(live), Some(_)) => live.name.as_str(),
                _ => settings.name.as_str(),
            };
            let letter = Letter {
                topic: &settings.dead_letter_topic,
                connector,
                record,
                failure,
                replay_run: self.runtime.replay.as_ref().map(|r| r.id.as_str()),
                parked_behind,
            };
            let sent = self.runtime.dead_letters.send(&letter).await;
            match self.judge(sent, attempt) {
                Attempt::Written => return Ok(()),
                Attempt::Refused(failure) => return Err(Halt::Stopped(failure)),
                // A shutdown here leaves the event unconsumed: it is read again.
                Attempt::Failed => self.pause(attempt).await?,
            }
            attempt += 1;
        }
    }

    /// What a dead letter's send means for its connector; shows a failure
    /// (a reason that can pass: the topic is created, access granted, the
    /// broker back) as `retrying`.
    fn judge(&self, sent: Result<Sent, DeadLetterError>, attempt: u32) -> Attempt {
        let topic = &self.runtime.settings.dead_letter_topic;
        match sent {
            Ok(_) => Attempt::Written,
            Err(error @ DeadLetterError::Refused(_)) => Attempt::Refused(Failure {
                class: ErrorClass::Permanent,
                stage: "dead_letter",
                message: format!("dead-letter topic {topic}: {error}"),
            }),
            Err(DeadLetterError::Transient(error)) => {
                let reason = format!("dead-letter topic {topic}: {error}");
                self.runtime.status.retrying("dead_letter", ErrorClass::Transient, &reason, attempt);
                Attempt::Failed
            }
        }
    }

    fn dead_lettered(&self, record: &RawRecord, event_type: Name, failure: &Failure) {
        let topic = &self.runtime.settings.dead_letter_topic;
        self.runtime.status.failed_event(event_type, record.position, failure, Outcome::DeadLettered, topic);
    }

    /// Hands refused ops' events (indexes into `ops`) to the error policy
    /// and drops their ops. With `stop`, the batch is cut before the first
    /// refused event and the failure is returned to halt after writing.
    pub(super) async fn reject(&mut self, rejected: Vec<(usize, String)>) -> Result<Option<Failure>, Halt> {
        let mut events: Vec<(usize, String)> = Vec::new();
        for (op, message) in rejected {
            let origin = self.pending.origins[op];
            if !events.iter().any(|(e, _)| *e == origin) {
                events.push((origin, message));
            }
        }
        events.sort_by_key(|(origin, _)| *origin);
        if self.policy() == ErrorPolicy::Park {
            return self.park_rejected(events).await;
        }
        if self.policy() == ErrorPolicy::Stop {
            let (first, message) = events.swap_remove(0);
            self.pending.truncate(first);
            return Ok(Some(Failure { class: ErrorClass::Permanent, stage: "sink", message }));
        }
        for (origin, message) in &events {
            let record = self.pending.records[*origin].clone();
            let failure = Failure { class: ErrorClass::Permanent, stage: "sink", message: message.clone() };
            // These events are in the batch being written: no flush.
            self.apply_policy(&record, self.pending.types[*origin], failure).await?;
        }
        let origins: Vec<usize> = events.into_iter().map(|(origin, _)| origin).collect();
        self.pending.remove_events(&origins);
        Ok(None)
    }
}
