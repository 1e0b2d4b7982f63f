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
//! * `applied`: per partition, the last offset a replay applied. A replay
//!   applies only dead letters within `parked` and after `applied`, so a
//!   dead letter written twice (a crash between the send and the store) or
//!   one of an earlier parking of the key is never applied twice, and one
//!   not yet in `parked` (a send racing the replay) is left to its writer.
//! * K is released when `applied` covers every range of `parked`.

use serde::{Deserialize, Serialize};

use crate::event::Position;

/// A partition's offsets in [`ParkedKey::parked`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub upto: i64,
}

/// A partition's offset in [`ParkedKey::applied`].
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
    /// The event the key is held behind: the first of its events not
    /// applied, whose failure parked it (a replay that applies some moves it).
    pub behind: Spot,
    /// Why `behind` failed: `<stage>: <message>`.
    pub reason: String,
    /// When the key was parked, in milliseconds since the epoch.
    pub since_ms: i64,
    pub parked: Vec<Range>,
    #[serde(default)]
    pub applied: Vec<Spot>,
}

/// What the pipeline does with an event of a parked key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// It comes before the failed event in its partition: apply it.
    Before,
    /// It is a dead letter already (read again after a restart): skip it.
    Parked,
    /// A later event: park it.
    Park,
}

impl ParkedKey {
    /// A key parked behind the event at `position`, whose dead letter is written.
    pub fn new(position: Position, reason: String, since_ms: i64) -> ParkedKey {
        ParkedKey {
            behind: Spot::of(position),
            reason,
            since_ms,
            parked: vec![Range {
                topic: position.topic.to_string(),
                partition: position.partition,
                from: position.offset,
                upto: position.offset,
            }],
            applied: Vec::new(),
        }
    }

    fn range(&self, topic: &str, partition: i32) -> Option<&Range> {
        self.parked.iter().find(|r| r.partition == partition && r.topic == topic)
    }

    fn applied_at(&self, topic: &str, partition: i32) -> Option<i64> {
        self.applied.iter().find(|s| s.partition == partition && s.topic == topic).map(|s| s.offset)
    }

    /// What to do with an event of this key at `position`. Offsets order
    /// events within a partition only: in a partition the key has no
    /// range in, every event is parked (no order to it is known).
    pub fn hold(&self, position: Position) -> Hold {
        match self.range(position.topic, position.partition) {
            Some(range) if position.offset < range.from => Hold::Before,
            Some(range) if position.offset <= range.upto => Hold::Parked,
            _ => Hold::Park,
        }
    }

    /// Records the dead letter of a later event, written at `position`.
    pub fn extend(&mut self, position: Position) {
        match self.parked.iter_mut().find(|r| r.partition == position.partition && r.topic == position.topic) {
            Some(range) => range.upto = range.upto.max(position.offset),
            None => self.parked.push(Range {
                topic: position.topic.to_string(),
                partition: position.partition,
                from: position.offset,
                upto: position.offset,
            }),
        }
    }

    /// Whether a replay applies a dead letter of this key whose event was
    /// at `position`: parked (within a range) and not applied yet.
    pub fn wants(&self, position: Position) -> bool {
        let Some(range) = self.range(position.topic, position.partition) else { return false };
        let after_applied = self.applied_at(position.topic, position.partition).is_none_or(|at| position.offset > at);
        (range.from..=range.upto).contains(&position.offset) && after_applied
    }

    /// Records that a replay applied the event at `position`.
    pub fn applied(&mut self, position: Position) {
        match self.applied.iter_mut().find(|s| s.partition == position.partition && s.topic == position.topic) {
            Some(spot) => spot.offset = spot.offset.max(position.offset),
            None => self.applied.push(Spot::of(position)),
        }
    }

    /// Whether every parked event has been applied: the key can go.
    pub fn done(&self) -> bool {
        self.parked.iter().all(|r| self.applied_at(&r.topic, r.partition).is_some_and(|at| at >= r.upto))
    }

    /// Parked events not applied yet, as far as the offsets tell (a
    /// partition's offsets may skip: an upper bound).
    pub fn outstanding(&self) -> u64 {
        self.parked
            .iter()
            .map(|r| {
                let from = self.applied_at(&r.topic, r.partition).map_or(r.from, |at| (at + 1).max(r.from));
                u64::try_from(r.upto - from + 1).unwrap_or(0)
            })
            .sum()
    }
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
        key.extend(at(0, 14));
        assert_eq!(key.hold(at(0, 9)), Hold::Before, "before the failure: never parked");
        assert_eq!(key.hold(at(0, 10)), Hold::Parked);
        assert_eq!(key.hold(at(0, 14)), Hold::Parked, "read again after a restart: already a dead letter");
        assert_eq!(key.hold(at(0, 15)), Hold::Park);
        assert_eq!(key.hold(at(1, 3)), Hold::Park, "another partition has no order with this one");
        key.extend(at(1, 3));
        assert_eq!(key.hold(at(1, 2)), Hold::Before);
        assert_eq!(key.outstanding(), 6);
    }

    #[test]
    fn a_replay_applies_each_parked_event_once_and_releases_when_all_are() {
        let mut key = ParkedKey::new(at(0, 10), "x".into(), 0);
        key.extend(at(0, 12));
        key.extend(at(1, 5));
        assert!(!key.wants(at(0, 9)), "not parked");
        assert!(!key.wants(at(0, 13)), "not parked yet: its writer stores it first");
        assert!(key.wants(at(0, 10)));
        key.applied(at(0, 10));
        assert!(!key.wants(at(0, 10)), "a second dead letter of one event is applied once");
        key.applied(at(0, 12));
        assert!(!key.done(), "partition 1 is outstanding");
        assert_eq!(key.outstanding(), 1);
        key.applied(at(1, 5));
        assert!(key.done());
        assert_eq!(key.outstanding(), 0);
        // A later event parked while the replay ran keeps it.
        key.extend(at(0, 20));
        assert!(!key.done());
        assert!(key.wants(at(0, 20)) && !key.wants(at(0, 11)));
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
