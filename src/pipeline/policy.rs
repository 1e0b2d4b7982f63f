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
    /// Applies the error policy to one bad event.
    pub(super) async fn fail(&mut self, record: &RawRecord, event_type: Name, failure: Failure) -> Result<(), Halt> {
        let settings = self.runtime.settings.clone();
        let status = self.runtime.status.clone();
        match settings.on_error {
            ErrorPolicy::Skip => {
                status.failed_event(event_type, record.position, &failure, Outcome::Skipped, "");
                Ok(())
            }
            ErrorPolicy::Stop => Err(Halt::Stopped(failure)),
            ErrorPolicy::DeadLetter => {
                let mut attempt = 0;
                loop {
                    let run = self.runtime.replay.as_ref().map(|r| r.id.as_str());
                    let sent = self
                        .runtime
                        .dead_letters
                        .send(&settings.dead_letter_topic, &settings.name, record, &failure, run)
                        .await;
                    match sent {
                        Ok(()) => break,
                        Err(error) => {
                            status.retrying("dead_letter", ErrorClass::Transient, &error.to_string(), attempt);
                            // A shutdown here leaves the event unconsumed: it is read again.
                            self.pause(attempt).await?;
                            attempt += 1;
                        }
                    }
                }
                status.failed_event(
                    event_type,
                    record.position,
                    &failure,
                    Outcome::DeadLettered,
                    &settings.dead_letter_topic,
                );
                Ok(())
            }
        }
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
            self.fail(&record, self.pending.types[*origin], failure).await?;
        }
        let origins: Vec<usize> = events.into_iter().map(|(origin, _)| origin).collect();
        self.pending.remove_events(&origins);
        Ok(None)
    }
}
