//! The event: what decoding produces and what every later stage consumes.

use std::fmt;

use crate::value::{Name, Value};

/// Where a record sits in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Interned: topic names are few.
    pub topic: Name,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// Where one partition ends after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: Name,
    pub partition: i32,
    /// Offset of the first record not covered: every record below it was
    /// written, dead-lettered or skipped (last processed + 1).
    pub next_offset: i64,
    /// The owner's fencing epoch, when the sink stores positions (Postgres).
    pub epoch: Option<i64>,
}

/// A claimed partition: where to start and the fencing epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub topic: Name,
    pub partition: i32,
    /// `None` when nothing was ever written from this partition.
    pub next_offset: Option<i64>,
    pub epoch: Option<i64>,
}

/// The events one record becomes once upcast: one, inline (an upcaster
/// may split an event into several).
pub type Events = smallvec::SmallVec<[Event; 1]>;

/// One decoded (and, once upcast, current) event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Full name of the record type, e.g. `com.example.users.UserRegistered`.
    pub event_type: Name,
    /// Catalogue version of `event_type` that `payload` conforms to; 0 when
    /// the type is not in the catalogue.
    pub version: u32,
    pub payload: Value,
    /// The decoded Kafka key: `Str` for string keys, the decoded value for
    /// Avro keys, `Null` when absent or not read.
    pub key: Value,
    pub position: Position,
    /// Kafka record timestamp in milliseconds since the epoch.
    pub timestamp: Option<i64>,
}
