//! The error policy (`on_error`): a bad event is skipped, dead-lettered
//! or stops the connector, and so are the events the sink refuses.

use super::worker::Worker;
use super::Halt;
use crate::config::ErrorPolicy;
use crate::error::ErrorClass;
use crate::error::Failure;
use crate::source::RawRecord;
use crate::status::Outcome;
use crate::value::Name;

impl Worker<'_> {
    /// Applies the error policy to one bad event, a record not yet in the
    /// pending batch: if its dead letter has to wait, the batch before it
    /// is written first (its neighbours do not wait with it).
    pub(super) async fn fail(&mut self, record: &RawRecord, event_type: Name, failure: Failure) -> Result<(), Halt> {
        if self.runtime.settings.on_error == ErrorPolicy::DeadLetter && self.send_dead_letter(record, &failure, 0).await
        {
            self.dead_lettered(record, event_type, &failure);
            return Ok(());
        }
        if self.runtime.settings.on_error == ErrorPolicy::DeadLetter {
            self.flush().await?;
        }
        self.apply_policy(record, event_type, failure).await
    }

    /// Applies the error policy to one bad event; a dead letter is retried
    /// until the broker takes it (visibly: state `retrying`, stage
    /// `dead_letter`, the broker's reason). Never flushes: the events the
    /// sink refuses while a batch is written come here.
    async fn apply_policy(&mut self, record: &RawRecord, event_type: Name, failure: Failure) -> Result<(), Halt> {
        match self.runtime.settings.on_error {
            ErrorPolicy::Skip => {
                self.runtime.status.failed_event(event_type, record.position, &failure, Outcome::Skipped, "");
                Ok(())
            }
            ErrorPolicy::Stop => Err(Halt::Stopped(failure)),
            ErrorPolicy::DeadLetter => {
                let mut attempt = 0;
                while !self.send_dead_letter(record, &failure, attempt).await {
                    // A shutdown here leaves the event unconsumed: it is read again.
                    self.pause(attempt).await?;
                    attempt += 1;
                }
                self.dead_lettered(record, event_type, &failure);
                Ok(())
            }
        }
    }

    /// Sends one dead letter; on failure shows why (a reason that can pass:
    /// the topic is created, access granted, the broker back) and says so.
    async fn send_dead_letter(&self, record: &RawRecord, failure: &Failure, attempt: u32) -> bool {
        let settings = &self.runtime.settings;
        let run = self.runtime.replay.as_ref().map(|r| r.id.as_str());
        let sent =
            self.runtime.dead_letters.send(&settings.dead_letter_topic, &settings.name, record, failure, run).await;
        match sent {
            Ok(_) => true,
            Err(error) => {
                let reason = format!("dead-letter topic {}: {error}", settings.dead_letter_topic);
                self.runtime.status.retrying("dead_letter", ErrorClass::Transient, &reason, attempt);
                false
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
        if self.runtime.settings.on_error == ErrorPolicy::Stop {
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
