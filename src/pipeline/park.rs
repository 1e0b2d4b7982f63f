//! `on_error: park` in the consume loop: a key whose event failed is held
//! behind it (see [`crate::parked`] for what is stored and why).
//!
//! Order of effects, which exactly-once and "nothing lost" rest on: a
//! parked event's dead letter is written first, then the key's stored
//! range, then (later) the batch that moves the position past the event.
//! A crash between any two finds, on restart, either the event unparked
//! and read again (parked again: at worst a second dead letter, which a
//! replay applies once), or the range stored (the event is skipped as
//! already parked). Each step is awaited before the next record is
//! processed, so no batch commits past an event whose parking is not durable.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::worker::Worker;
use super::Halt;
use crate::config::{ErrorPolicy, ParkFallback};
use crate::error::{ErrorClass, Failure};
use crate::parked::{show_key, Change, Hold, ParkedKey};
use crate::source::RawRecord;
use crate::status::{OldestParked, ParkedSummary};
use crate::value::Name;

/// The event type counted for events parked without being decoded.
const PARKED: Name = "(parked)";

/// How often a connector reads the parked keys again, beside each
/// assignment: a key parked by another replica (through another topic) or
/// released by a replay or an operator is seen within this.
const REFRESH: Duration = Duration::from_secs(5);

/// The keys parked, as this worker knows them (a key's partition is
/// consumed by one worker at a time, so for that partition's events this
/// is the truth; see [`REFRESH`] for the rest).
#[derive(Default)]
pub(super) struct Parking {
    keys: HashMap<Vec<u8>, ParkedKey, foldhash::fast::RandomState>,
    /// When the keys were last read from the sink (`None`: never this assignment).
    read_at: Option<Instant>,
    /// Bumped at every change of `keys`.
    changes: u64,
    /// In a rebuild: the live connector's durable positions (next offset
    /// per partition), read with the keys. What it has passed it has
    /// parked itself; the rest the rebuild parks in its name.
    live: HashMap<(String, i32), i64>,
    /// Set when a batch written again parked a key while writes after it
    /// were in flight: before anything else is parked or written, they are
    /// settled (each holding that key's events as it is written again) and
    /// the batch being built is held ([`Worker::catch_up_parking`]).
    pub(super) dirty: bool,
}

impl Parking {
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(super) fn changes(&self) -> u64 {
        self.changes
    }
}

/// Whether a record of a parked key was taken out of the stream.
pub(super) enum Held {
    /// Not held: process it.
    No(RawRecord),
    /// Parked or already parked: pushed without ops.
    Yes,
}

impl Worker<'_> {
    /// The policy in force: a replay of dead letters dead-letters again
    /// what fails again (parked keys are replayed by `kawka dlq replay`'s
    /// own loop, not through the consumer).
    pub(super) fn policy(&self) -> ErrorPolicy {
        match self.runtime.settings.on_error {
            ErrorPolicy::Park if self.runtime.replay.is_some() => ErrorPolicy::DeadLetter,
            policy => policy,
        }
    }

    fn parks(&self) -> bool {
        self.policy() == ErrorPolicy::Park
    }

    /// Whose parked keys this worker holds: its own connector's when it
    /// parks, the live connector's in a rebuild of one that does.
    fn parked_of(&self) -> Option<&str> {
        match &self.runtime.holds_parked_of {
            Some(live) => Some(&live.name),
            None => self.parks().then_some(self.runtime.settings.name.as_str()),
        }
    }

    fn rebuilding(&self) -> bool {
        self.runtime.holds_parked_of.is_some()
    }

    /// In a rebuild: whether the live connector has made the event at
    /// `position` durable (applied it, or parked it) already.
    fn live_passed(&self, position: crate::event::Position) -> bool {
        let live = self.parking.live.get(&(position.topic.to_string(), position.partition));
        live.is_some_and(|&next| next > position.offset)
    }

    /// Reads the parked keys from the sink: at each assignment (the keys of
    /// partitions that moved here come with them) and every [`REFRESH`].
    /// Failures are retried, visibly, until they pass or the daemon stops.
    pub(super) async fn read_parked(&mut self) -> Result<(), Halt> {
        let Some(connector) = self.parked_of().map(str::to_string) else { return Ok(()) };
        let mut attempt = 0;
        let keys = loop {
            match self.runtime.sink.parked_keys(&connector).await {
                Ok(keys) => break keys,
                Err(error) => {
                    let reason = format!("reading the parked keys: {error}");
                    self.runtime.status.retrying("park", retried(error.class()), &reason, attempt);
                    self.pause(attempt).await?;
                    attempt += 1;
                }
            }
        };
        if attempt > 0 {
            self.runtime.status.recovered();
        }
        if let Some(live) = self.runtime.holds_parked_of.clone() {
            // Read after the keys: a position passed now was passed when
            // the keys were read, so what it passed is in them.
            let mut attempt = 0;
            self.parking.live = loop {
                match super::replay_parked::positions_of(self.runtime, &live.name, &live.group).await {
                    Ok(positions) => break positions,
                    Err(error) => {
                        let reason = format!("reading {}'s positions: {error:#}", live.name);
                        self.runtime.status.retrying("park", ErrorClass::Transient, &reason, attempt);
                        self.pause(attempt).await?;
                        attempt += 1;
                    }
                }
            };
        }
        let keys: HashMap<Vec<u8>, ParkedKey, foldhash::fast::RandomState> = keys.into_iter().collect();
        let released = self.parking.keys.keys().filter(|key| !keys.contains_key(*key)).count();
        if released > 0 {
            self.runtime.status.parked_released(released as u64);
        }
        let added = keys.keys().any(|key| !self.parking.keys.contains_key(key));
        self.parking.keys = keys;
        self.parking.changes += 1;
        self.parking.read_at = Some(Instant::now());
        self.show_parked();
        if added {
            // Parked elsewhere (another replica, a rebuild's live
            // connector) after the batch being built or a write in flight
            // took events of it: they are held before anything else is
            // parked or written, as after a key parked here (the writes in
            // flight settled first: see `Parking::dirty`).
            self.parking.dirty = true;
        }
        Ok(())
    }

    /// [`Worker::read_parked`] when the last read is older than [`REFRESH`].
    pub(super) async fn refresh_parked(&mut self) -> Result<(), Halt> {
        if self.parked_of().is_some() && self.parking.read_at.is_none_or(|at| at.elapsed() >= REFRESH) {
            self.read_parked().await?;
        }
        Ok(())
    }

    /// Takes a record of a parked key out of the stream (parks it, or
    /// skips it when it is a dead letter already, or in a rebuild); hands
    /// any other back.
    pub(super) async fn hold(&mut self, record: RawRecord) -> Result<Held, Halt> {
        if self.parking.dirty {
            self.catch_up_parking().await?;
        }
        let rebuild = self.rebuilding();
        let hold = match record.key.as_deref().and_then(|key| self.parking.keys.get(key)) {
            Some(parked) if rebuild => parked.hold_in_rebuild(record.position),
            Some(parked) => parked.hold(record.position),
            None => return Ok(Held::No(record)),
        };
        match hold {
            Hold::Before => Ok(Held::No(record)),
            Hold::Parked => {
                // A waiter on its position learns it is parked.
                self.runtime.status.remember_parked(record.position);
                self.push(record, PARKED);
                Ok(Held::Yes)
            }
            // A rebuild holds the key back; what the live connector has
            // read it parked itself.
            Hold::Park if rebuild && self.live_passed(record.position) => {
                self.runtime.status.count(PARKED, crate::status::Outcome::Skipped);
                self.push(record, PARKED);
                Ok(Held::Yes)
            }
            Hold::Park => {
                if self.park(&record, PARKED, None).await? {
                    self.push(record, PARKED);
                    Ok(Held::Yes)
                } else {
                    Ok(Held::No(record))
                }
            }
        }
    }

    /// Settles the writes in flight and holds the batch being built, after
    /// a batch written again parked a key (see [`Parking::dirty`]).
    pub(super) async fn catch_up_parking(&mut self) -> Result<(), Halt> {
        while self.parking.dirty {
            self.parking.dirty = false;
            self.settle().await?;
            self.hold_pending().await?;
        }
        Ok(())
    }

    /// Whether a failure of `key` finds `park.max_keys` other keys parked.
    fn over_limit(&self, key: &[u8]) -> bool {
        !self.parking.keys.contains_key(key) && self.parking.keys.len() >= self.runtime.settings.park.max_keys
    }

    /// The halt of `fallback: stop` once `park.max_keys` keys are parked.
    fn limit_reached(&self, record: &RawRecord, failure: &Failure) -> Failure {
        let limit = self.runtime.settings.park.max_keys;
        let shown = record.key.as_deref().map_or_else(String::new, show_key);
        self.runtime.status.park_overflow(&shown, limit, "stop");
        Failure {
            class: ErrorClass::Permanent,
            stage: "park",
            message: format!(
                "park.max_keys ({limit}) keys are parked; key {shown} failed at {}: {}: {} \
                 (replay or release parked keys, or raise park.max_keys)",
                record.position, failure.stage, failure.message
            ),
        }
    }

    /// `on_error: park` for a bad event: its key is parked behind it (the
    /// event dead-lettered, the key stored). A record without a key is
    /// dead-lettered (nothing to hold), and so, with the `dead_letter`
    /// fallback, is the failure of a new key once `park.max_keys` are parked.
    pub(super) async fn park_failed(
        &mut self,
        record: &RawRecord,
        event_type: Name,
        failure: Failure,
    ) -> Result<(), Halt> {
        let Some(key) = record.key.as_deref() else {
            if self.rebuilding() {
                // The live connector dead-letters it (a rebuild did not).
                let skipped = crate::status::Outcome::Skipped;
                self.runtime.status.failed_event(event_type, record.position, &failure, skipped, "");
                return Ok(());
            }
            tracing::warn!(connector = %self.name(), position = %record.position,
                "a record without a key has no key to park; dead-lettering it");
            return self.dead_letter(record, event_type, failure).await;
        };
        if self.rebuilding() && self.live_passed(record.position) {
            // The live connector read this event: it parked its key (then
            // the rebuild holds it too) or the key was released since (the
            // hole accepted: only the event is skipped).
            if let Some(entry) = self.stored_entry(key).await? {
                self.learn_parked(key.to_vec(), entry);
            }
            self.runtime.status.failed_event(
                event_type,
                record.position,
                &failure,
                crate::status::Outcome::Skipped,
                "",
            );
            return Ok(());
        }
        if self.over_limit(key) && self.rebuilding() {
            // The live connector applies its fallback when it reads it.
            let skipped = crate::status::Outcome::Skipped;
            self.runtime.status.failed_event(event_type, record.position, &failure, skipped, "");
            return Ok(());
        }
        if self.over_limit(key) {
            return match self.runtime.settings.park.fallback {
                ParkFallback::Stop => Err(Halt::Stopped(self.limit_reached(record, &failure))),
                ParkFallback::DeadLetter => {
                    let limit = self.runtime.settings.park.max_keys;
                    self.runtime.status.park_overflow(&show_key(key), limit, "dead_letter");
                    self.dead_letter(record, event_type, failure).await
                }
            };
        }
        self.park(record, event_type, Some(&failure)).await.map(drop)
    }

    /// Applies `on_error: park` to the events of the pending batch the sink
    /// refused (`rejected`: indexes into its records, with the reason),
    /// in the order they were read, together with the other events of their
    /// keys that follow them in the batch: each key is parked behind its
    /// first refused event and every later event of it is parked behind,
    /// refused or not, so the dead letters keep the key's order. Returns
    /// the failure to halt on after writing the events before it, when
    /// `fallback: stop` meets `park.max_keys`.
    pub(super) async fn park_rejected(&mut self, rejected: Vec<(usize, String)>) -> Result<Option<Failure>, Halt> {
        let mut with_ops: Vec<usize> = self.pending.origins.clone();
        with_ops.dedup();
        let mut held = Vec::new();
        let mut halt = None;
        for origin in with_ops {
            let record = self.pending.records[origin].clone();
            let event_type = self.pending.types[origin];
            if let Some((_, message)) = rejected.iter().find(|(at, _)| *at == origin) {
                let failure = Failure { class: ErrorClass::Permanent, stage: "sink", message: message.clone() };
                let over = record.key.as_deref().is_some_and(|key| self.over_limit(key));
                if over && self.runtime.settings.park.fallback == ParkFallback::Stop && !self.rebuilding() {
                    // Written: the events before it; nothing past it commits.
                    halt = Some(self.limit_reached(&record, &failure));
                    self.pending.remove_events(&held);
                    self.pending.truncate(origin);
                    return Ok(halt);
                }
                self.park_failed(&record, event_type, failure).await?;
                held.push(origin);
                continue;
            }
            if self.held_in_pending(origin).await? {
                held.push(origin);
            }
        }
        self.pending.remove_events(&held);
        Ok(halt)
    }

    /// Parks one record: its dead letter (with `kawka.parked.behind`), then
    /// its key's stored range. `failure` is the event's own failure (its
    /// key is parked behind it unless it already was); without one, the
    /// event follows a parked key. `false`: the key was released meanwhile
    /// (by a replay or an operator) and the event is to be applied.
    async fn park(&mut self, record: &RawRecord, event_type: Name, failure: Option<&Failure>) -> Result<bool, Halt> {
        let key = record.key.as_deref().expect("only records with a key are parked").to_vec();
        let position = record.position;
        let known = self.parking.keys.get(&key).cloned();
        // A failure parks its key whether or not the store still has it; a
        // later event only while it does (released meanwhile: it applies).
        let creates = failure.is_some();
        let failure = match failure {
            Some(failure) => failure.clone(),
            None => Failure {
                class: ErrorClass::Permanent,
                stage: "park",
                message: format!(
                    "parked behind {}, whose event failed",
                    known.as_ref().map_or_else(|| position.to_string(), |k| k.behind.to_string())
                ),
            },
        };
        let reason = format!("{}: {}", failure.stage, failure.message);
        // What the key is held behind once this event is parked (itself,
        // when it is the first or an earlier failure of its partition).
        let behind = match &known {
            Some(known) => {
                let mut after = known.clone();
                after.extend(position, &reason);
                after.behind.to_string()
            }
            None => position.to_string(),
        };
        // An event that follows a parked key is parked only while the key
        // is: released since this worker read it (a replay, an operator),
        // it applies, and no dead letter says otherwise.
        // What the store says now: an event that follows a parked key is
        // parked only while the key is (released since this worker read
        // it, by a replay or an operator, it applies); and an event another
        // worker parked already (a rebuild and its live connector both read
        // it) is not parked twice (each entry counts its events once).
        match self.stored_entry(&key).await? {
            None if !creates => {
                self.forget(&key, position);
                return Ok(false);
            }
            Some(entry) if entry.hold(position) == Hold::Parked => {
                let shown = show_key(&key);
                let topic = &self.runtime.settings.dead_letter_topic;
                self.runtime.status.parked_event(event_type, position, &shown, &entry.behind.to_string(), topic);
                self.learn_parked(key, entry);
                self.show_parked();
                return Ok(true);
            }
            _ => {}
        }
        self.send_letter(record, &failure, Some(&behind)).await?;
        let since_ms = crate::status::now_ms();
        let decide = move |stored: Option<&ParkedKey>| match stored {
            Some(stored) => {
                let mut stored = stored.clone();
                stored.extend(position, &reason);
                Some(Change::Put(stored))
            }
            None if creates => Some(Change::Put(ParkedKey::new(position, reason.clone(), since_ms))),
            None => None,
        };
        let connector = self.parked_of().unwrap_or(&self.runtime.settings.name).to_string();
        let mut attempt = 0;
        let changed = loop {
            match self.runtime.sink.change_parked(&connector, &key, &[], &decide).await {
                Ok(changed) => break changed,
                Err(error) => {
                    let reason = format!("storing parked key {}: {error}", show_key(&key));
                    self.runtime.status.retrying("park", retried(error.class()), &reason, attempt);
                    self.pause(attempt).await?;
                    attempt += 1;
                }
            }
        };
        if attempt > 0 {
            self.runtime.status.recovered();
        }
        self.parking.changes += 1;
        match changed {
            Some((Change::Put(entry), _)) => {
                let topic = &self.runtime.settings.dead_letter_topic;
                if creates {
                    let outcome = crate::status::Outcome::Parked;
                    self.runtime.status.failed_event(event_type, position, &failure, outcome, topic);
                } else {
                    let behind = entry.behind.to_string();
                    self.runtime.status.parked_event(event_type, position, &show_key(&key), &behind, topic);
                }
                self.parking.keys.insert(key, entry);
                self.show_parked();
                Ok(true)
            }
            Some((Change::Delete, _)) | None => {
                // Released between the look above and this change (a
                // replay or an operator, under the key's lock): the event
                // applies here, and the letter just sent is not in the
                // key's range, so no replay applies it again; said, so an
                // operator counting dead letters knows it is spent.
                tracing::warn!(connector = %self.name(), key = %show_key(&key), %position,
                    topic = %self.runtime.settings.dead_letter_topic,
                    "the key was released while its event was being parked: the event applies, its dead letter is spent");
                self.forget(&key, position);
                Ok(false)
            }
        }
    }

    /// Takes in a key's entry found in the store (parked by another
    /// writer): one this worker did not know may have events in the batch
    /// being built or in flight, let through while it was free; they are
    /// held before anything else is written (see [`Parking::dirty`]).
    fn learn_parked(&mut self, key: Vec<u8>, entry: ParkedKey) {
        if self.parking.keys.insert(key, entry).is_none() {
            self.parking.dirty = true;
        }
        self.parking.changes += 1;
    }

    /// Forgets a key found released (by a replay or an operator) when its
    /// event at `position` was about to be parked: the event applies.
    fn forget(&mut self, key: &[u8], position: crate::event::Position) {
        tracing::info!(connector = %self.name(), key = %show_key(key), %position,
            "the key was released; applying its event");
        if self.parking.keys.remove(key).is_some() {
            self.runtime.status.parked_released(1);
        }
        self.parking.changes += 1;
        self.show_parked();
    }

    /// What the store holds of `key` now (read under its lock, changing
    /// nothing), retrying failures visibly.
    async fn stored_entry(&mut self, key: &[u8]) -> Result<Option<ParkedKey>, Halt> {
        let connector = self.parked_of().unwrap_or(&self.runtime.settings.name).to_string();
        let found = std::sync::Mutex::new(None);
        let look = |stored: Option<&ParkedKey>| {
            *found.lock().unwrap_or_else(|p| p.into_inner()) = stored.cloned();
            None
        };
        let mut attempt = 0;
        while let Err(error) = self.runtime.sink.change_parked(&connector, key, &[], &look).await {
            let reason = format!("reading parked key {}: {error}", show_key(key));
            self.runtime.status.retrying("park", retried(error.class()), &reason, attempt);
            self.pause(attempt).await?;
            attempt += 1;
        }
        if attempt > 0 {
            self.runtime.status.recovered();
        }
        Ok(found.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// Parks the events of the pending batch whose keys were parked after
    /// they joined it (a sink refused an earlier event of their key), and
    /// drops their ops: nothing of a parked key is written past its hole.
    pub(super) async fn hold_pending(&mut self) -> Result<(), Halt> {
        if self.parking.is_empty() {
            return Ok(());
        }
        let mut with_ops: Vec<usize> = self.pending.origins.clone();
        with_ops.dedup();
        let mut held = Vec::new();
        for origin in with_ops {
            if self.held_in_pending(origin).await? {
                held.push(origin);
            }
        }
        self.pending.remove_events(&held);
        Ok(())
    }

    /// Whether the pending batch's event at `origin` (with ops) is held now
    /// its key is parked: parked (or found parked by another writer), or,
    /// in a rebuild, left to the live connector that has read it.
    async fn held_in_pending(&mut self, origin: usize) -> Result<bool, Halt> {
        let record = &self.pending.records[origin];
        let hold = match record.key.as_deref().and_then(|key| self.parking.keys.get(key)) {
            Some(parked) if self.rebuilding() => parked.hold_in_rebuild(record.position),
            Some(parked) => parked.hold(record.position),
            None => return Ok(false),
        };
        match hold {
            Hold::Before => Ok(false),
            Hold::Park if self.rebuilding() && self.live_passed(record.position) => Ok(true),
            // With ops, it was not parked by this worker: a later failure
            // parked its key, or another writer parked it (then `park`
            // finds it so and writes nothing).
            Hold::Parked | Hold::Park => {
                let record = record.clone();
                let event_type = self.pending.types[origin];
                self.park(&record, event_type, None).await
            }
        }
    }

    /// Shows the parked keys in the status (`GET /connectors/{name}`, `/metrics`).
    fn show_parked(&self) {
        if !self.parks() {
            return;
        }
        let oldest = self.parking.keys.iter().min_by_key(|(_, k)| k.since_ms).map(|(key, k)| OldestParked {
            key: show_key(key),
            behind: k.behind.to_string(),
            reason: k.reason.clone(),
            since: crate::sink::postgres::format_millis(k.since_ms),
            since_ms: k.since_ms,
        });
        self.runtime.status.set_parked(ParkedSummary {
            keys: self.parking.keys.len(),
            limit: self.runtime.settings.park.max_keys,
            events: self.parking.keys.values().map(ParkedKey::outstanding).sum(),
            oldest,
        });
    }
}

/// The class shown while the parked keys' store fails: retried, since
/// only waiting (or a fix outside kawka) helps; a permanent error here is
/// the store's setup, shown as config.
fn retried(class: ErrorClass) -> ErrorClass {
    match class {
        ErrorClass::Permanent => ErrorClass::Config,
        other => other,
    }
}
