//! Parked keys (`on_error: park`): what is stored of a key held behind its
//! failed event, and the decisions made from it (pure: the sinks store it,
//! the pipeline parks and replays).
//!
//! A key is a record's Kafka key (its bytes): the one thing every event
//! has, decodable or not. When an event of key K fails for good, K is
//! parked: the event and every later event of K go to the dead-letter
//! topic, in order, and nothing of K is written until a replay has applied
//! them all (or an operator releases K).
//!
//! What is stored per key, and why each part:
//! * `parked`: per partition, the offsets of K's events sent to the dead
//!   letters, first to last. An event of K read again after a restart is
//!   told apart by it: before `from` it was never parked (apply it), within
//!   the range it is already a dead letter (skip it), after it is new
//!   (park it). The range is stored *after* the dead letter is written, so
//!   the range never claims a dead letter that is not there.
//!   Each range also counts its events: a replay applies a key only when
//!   it finds every one of them (a letter lost to retention, or written
//!   without its key, keeps the key parked rather than leave a hole).
//! * `applied`: per partition, the last offset a replay applied and how
//!   many. A replay applies only dead letters within a range and after
//!   `applied`, in offset order, so a dead letter written twice (a crash
//!   between the send and the store) or one of an earlier parking of the
//!   key is never applied twice, and one not yet in a range (a send racing
//!   the replay) is left to its writer.
//! * K is released when every range's events are applied and the live
//!   connector's positions are past them (so it never reads them again
//!   without the entry that says they are parked).

use serde::{Deserialize, Serialize};

use crate::event::Position;

/// What a key parked in one partition: the offsets of its events sent to
/// the dead letters, how many there are, and how far a replay got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub topic: String,
    pub partition: i32,
    /// The first event parked in read order: every event of the key read
    /// after it, up to `upto`, is parked (the connector parks each as it
    /// reads it).
    pub from: i64,
    pub upto: i64,
    /// Events parked below `from`: events read before it, still being
    /// written, whose failure was found after it (a sink refusal). Only
    /// these offsets are parked there; the key's other events between the
    /// first of them and `from` are to be parked, those before it applied.
    #[serde(default)]
    pub below: Vec<i64>,
    /// Events parked in this partition (dead letters written, one per
    /// event: a replay needs every one before it releases the key).
    pub events: u64,
    /// The last offset a replay applied here, and how many events.
    #[serde(default)]
    pub applied: Option<i64>,
    #[serde(default)]
    pub applied_events: u64,
}

impl Range {
    /// The lowest offset parked here.
    pub fn first(&self) -> i64 {
        self.below.first().copied().unwrap_or(self.from)
    }

    /// The range of one event, parked at `position`.
    fn at(position: Position) -> Range {
        Range {
            topic: position.topic.to_string(),
            partition: position.partition,
            from: position.offset,
            upto: position.offset,
            below: Vec::new(),
            events: 1,
            applied: None,
            applied_events: 0,
        }
    }
}

/// A position, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spot {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Spot {
    pub fn of(position: Position) -> Spot {
        Spot { topic: position.topic.to_string(), partition: position.partition, offset: position.offset }
    }
}

impl std::fmt::Display for Spot {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        // As a [`Position`] prints: what `kawka.parked.behind` carries.
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// One parked key, as stored in the sink (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedKey {
    /// The event the key is held behind: the earliest of its events not
    /// applied whose failure parked it (a replay that applies some, or an
    /// earlier failure found later, moves it).
    pub behind: Spot,
    /// Why `behind` failed: `<stage>: <message>`.
    pub reason: String,
    /// When the key was parked, in milliseconds since the epoch.
    pub since_ms: i64,
    pub parked: Vec<Range>,
}

/// What the pipeline does with an event of a parked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// It comes before the failed event in its partition (or, for a
    /// rebuild, a replay applied it): apply it.
    Before,
    /// Its dead letter is written (read again after a restart): skip it.
    Parked,
    /// A later event: park it.
    Park,
}

impl ParkedKey {
    /// A key parked behind the event at `position`, whose dead letter is written.
    pub fn new(position: Position, reason: String, since_ms: i64) -> ParkedKey {
        ParkedKey { behind: Spot::of(position), reason, since_ms, parked: vec![Range::at(position)] }
    }

    fn range(&self, topic: &str, partition: i32) -> Option<&Range> {
        self.parked.iter().find(|r| r.partition == partition && r.topic == topic)
    }

    /// What the live connector does with an event of this key at
    /// `position` as it reads it. Offsets order events within a partition
    /// only: in a partition the key has no range in, every event is parked
    /// (no order to it is known).
    pub fn hold(&self, position: Position) -> Hold {
        let Some(range) = self.range(position.topic, position.partition) else { return Hold::Park };
        let offset = position.offset;
        match range.below.first() {
            Some(&lowest) if offset < lowest => Hold::Before,
            Some(_) if offset < range.from && range.below.contains(&offset) => Hold::Parked,
            Some(_) if offset < range.from => Hold::Park,
            None if offset < range.from => Hold::Before,
            _ if offset <= range.upto => Hold::Parked,
            _ => Hold::Park,
        }
    }

    /// What a rebuild does with an event of this key: what a replay
    /// applied to the live read model is applied to the new version too;
    /// the rest is held back (`Park`: skipped there, nothing is parked).
    pub fn hold_in_rebuild(&self, position: Position) -> Hold {
        match self.range(position.topic, position.partition) {
            Some(range) if range.applied.is_some_and(|at| position.offset <= at) => Hold::Before,
            Some(_) if self.hold(position) == Hold::Before => Hold::Before,
            _ => Hold::Park,
        }
    }

    /// Records the dead letter of another event, written at `position`;
    /// an event parked already changes nothing (two writers may park one
    /// event: a rebuild and its connector). An event before `from` (found
    /// failing after later ones were parked, or following such a one) is
    /// listed in `below`; one before `behind` in its partition becomes what
    /// the key is held behind.
    pub fn extend(&mut self, position: Position, reason: &str) {
        if self.hold(position) == Hold::Parked {
            return;
        }
        let offset = position.offset;
        match self.parked.iter_mut().find(|r| r.partition == position.partition && r.topic == position.topic) {
            Some(range) if offset < range.from => {
                let at = range.below.partition_point(|&o| o < offset);
                range.below.insert(at, offset);
                range.events += 1;
            }
            Some(range) => {
                range.upto = range.upto.max(offset);
                range.events += 1;
            }
            None => self.parked.push(Range::at(position)),
        }
        let behind = &self.behind;
        if behind.partition == position.partition && behind.topic == position.topic && position.offset < behind.offset {
            self.behind = Spot::of(position);
            self.reason = reason.to_string();
        }
    }

    /// Whether a replay applies a dead letter of this key whose event was
    /// at `position`: parked (within a range) and not applied yet.
    pub fn wants(&self, position: Position) -> bool {
        let Some(range) = self.range(position.topic, position.partition) else { return false };
        let parked = self.hold(position) == Hold::Parked;
        parked && range.applied.is_none_or(|at| position.offset > at)
    }

    /// Parked events of a partition a replay has not applied yet.
    pub fn missing_in(&self, topic: &str, partition: i32) -> u64 {
        self.range(topic, partition).map_or(0, |r| r.events.saturating_sub(r.applied_events))
    }

    /// Records that a replay applied the event at `position` (each once:
    /// the replay takes letters in offset order, after `applied`).
    pub fn applied(&mut self, position: Position) {
        if let Some(range) =
            self.parked.iter_mut().find(|r| r.partition == position.partition && r.topic == position.topic)
        {
            range.applied = Some(range.applied.map_or(position.offset, |at| at.max(position.offset)));
            range.applied_events += 1;
        }
    }

    /// Whether every parked event has been applied: the key can go.
    pub fn done(&self) -> bool {
        self.parked.iter().all(|r| r.applied_events >= r.events && r.applied.is_some_and(|at| at >= r.upto))
    }

    /// Parked events not applied yet.
    pub fn outstanding(&self) -> u64 {
        self.parked.iter().map(|r| r.events.saturating_sub(r.applied_events)).sum()
    }

    /// What a replay read and decided from, per partition: what was
    /// applied, where the parked events start, those below it. Compared
    /// before a replay's change, so that two replays never both apply the
    /// same events, and a replay that read the key before an earlier
    /// failure was found applies nothing ahead of it. (Events parked after
    /// `upto` meanwhile change nothing of it: the replay applies what it
    /// read and leaves the rest to its next round.)
    pub fn progress(&self) -> Vec<Progress> {
        self.parked
            .iter()
            .map(|r| Progress {
                topic: r.topic.clone(),
                partition: r.partition,
                applied: r.applied,
                applied_events: r.applied_events,
                from: r.from,
                below: r.below.clone(),
            })
            .collect()
    }
}

/// What a replay decides from, of one partition (see [`ParkedKey::progress`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub topic: String,
    pub partition: i32,
    pub applied: Option<i64>,
    pub applied_events: u64,
    pub from: i64,
    pub below: Vec<i64>,
}

/// A change a parked key's store makes, decided from what it holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(ParkedKey),
    Delete,
}

/// A key as shown and as given to `--key`: its text when it is printable
/// UTF-8 (and does not itself start with `0x`), `0x` and hex otherwise.
pub fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.starts_with("0x") && !text.is_empty() && !text.chars().any(char::is_control) => {
            text.to_string()
        }
        _ => format!("0x{}", hex(key)),
    }
}

/// The bytes of a key written as [`show_key`] writes it.
pub fn parse_key(text: &str) -> Vec<u8> {
    if let Some(digits) = text.strip_prefix("0x") {
        let bytes: Option<Vec<u8>> = (0..digits.len())
            .step_by(2)
            .map(|at| digits.get(at..at + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
            .collect();
        if let Some(bytes) = bytes.filter(|_| digits.len() % 2 == 0) {
            return bytes;
        }
    }
    text.as_bytes().to_vec()
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The header naming, on each dead letter of a parked key, the event it
/// is parked behind (`<topic>/<partition>@<offset>`).
pub const PARKED_BEHIND_HEADER: &str = "kawka.parked.behind";

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> Position {
        Position { topic: "users", partition, offset }
    }

    #[test]
    fn events_before_in_and_after_the_parked_range_are_told_apart() {
        let mut key = ParkedKey::new(at(0, 10), "upcast: no path".into(), 0);
        key.extend(at(0, 14), "park");
        assert_eq!(key.hold(at(0, 9)), Hold::Before, "before the failure: never parked");
        assert_eq!(key.hold(at(0, 10)), Hold::Parked);
        assert_eq!(key.hold(at(0, 14)), Hold::Parked, "read again after a restart: already a dead letter");
        assert_eq!(key.hold(at(0, 15)), Hold::Park);
        assert_eq!(key.hold(at(1, 3)), Hold::Park, "another partition has no order with this one");
        key.extend(at(1, 3), "park");
        assert_eq!(key.hold(at(1, 2)), Hold::Before);
        assert_eq!(key.outstanding(), 3, "events, not the offsets between them");
    }

    #[test]
    fn an_earlier_failure_found_later_widens_the_range_and_moves_behind() {
        let mut key = ParkedKey::new(at(0, 12), "decode: bad".into(), 0);
        key.extend(at(0, 10), "sink: too long");
        assert_eq!(key.behind, Spot::of(at(0, 10)));
        assert_eq!(key.reason, "sink: too long");
        assert_eq!(key.hold(at(0, 9)), Hold::Before);
        assert_eq!(key.hold(at(0, 10)), Hold::Parked);
        assert_eq!(key.hold(at(0, 11)), Hold::Park, "between the late failure and `from`: not parked yet");
        key.extend(at(0, 11), "park");
        assert_eq!(key.hold(at(0, 11)), Hold::Parked);
        assert_eq!(key.behind, Spot::of(at(0, 10)), "a later event does not move it");
        assert_eq!((key.parked[0].below.clone(), key.parked[0].from, key.parked[0].events), (vec![10, 11], 12, 3));
        key.extend(at(0, 11), "park");
        key.extend(at(0, 12), "park");
        assert_eq!(key.parked[0].events, 3, "an event parked twice (two writers) is counted once");
        assert!(key.wants(at(0, 10)) && key.wants(at(0, 11)) && key.wants(at(0, 12)) && !key.wants(at(0, 9)));
    }

    #[test]
    fn a_replay_applies_each_parked_event_once_and_releases_when_all_are() {
        let mut key = ParkedKey::new(at(0, 10), "x".into(), 0);
        key.extend(at(0, 12), "park");
        key.extend(at(1, 5), "park");
        assert!(!key.wants(at(0, 9)), "not parked");
        assert!(!key.wants(at(0, 13)), "not parked yet: its writer stores it first");
        assert!(key.wants(at(0, 10)));
        key.applied(at(0, 10));
        assert!(!key.wants(at(0, 10)), "a second dead letter of one event is applied once");
        assert_eq!(key.missing_in("users", 0), 1);
        key.applied(at(0, 12));
        assert!(!key.done(), "partition 1 is outstanding");
        assert_eq!(key.outstanding(), 1);
        key.applied(at(1, 5));
        assert!(key.done());
        assert_eq!(key.outstanding(), 0);
        // A later event parked while the replay ran keeps it.
        key.extend(at(0, 20), "park");
        assert!(!key.done());
        assert!(key.wants(at(0, 20)) && !key.wants(at(0, 11)));
    }

    #[test]
    fn a_rebuild_applies_what_a_replay_applied_and_holds_the_rest() {
        let mut key = ParkedKey::new(at(0, 10), "x".into(), 0);
        key.extend(at(0, 12), "park");
        key.extend(at(0, 14), "park");
        key.applied(at(0, 10));
        key.applied(at(0, 12));
        assert_eq!(key.hold_in_rebuild(at(0, 9)), Hold::Before);
        assert_eq!(key.hold_in_rebuild(at(0, 12)), Hold::Before, "applied live by a replay");
        assert_eq!(key.hold_in_rebuild(at(0, 13)), Hold::Park);
        assert_eq!(key.hold_in_rebuild(at(0, 30)), Hold::Park);
        assert_eq!(key.hold(at(0, 12)), Hold::Parked, "live: skipped when read again");
    }

    #[test]
    fn keys_are_shown_as_text_or_hex_and_read_back() {
        for key in [&b"user-7"[..], b"\x00\x01\xff", b"0xab", b"", b"tab\there"] {
            assert_eq!(parse_key(&show_key(key)), key, "{}", show_key(key));
        }
        assert_eq!(show_key(b"user-7"), "user-7");
        assert_eq!(show_key(b"\x00\x01"), "0x0001");
        assert_eq!(parse_key("0xzz"), b"0xzz", "not hex: the text itself");
    }

    #[test]
    fn the_stored_form_reads_back() {
        let mut key = ParkedKey::new(at(2, 7), "decode: bad".into(), 1_700_000_000_000);
        key.applied(at(2, 7));
        let json = serde_json::to_string(&key).expect("serializes");
        assert_eq!(serde_json::from_str::<ParkedKey>(&json).expect("reads"), key);
        assert_eq!(key.behind.to_string(), "users/2@7");
    }
}
