//! A record as it left Kafka, owned so it can cross threads.

use crate::event::Position;

/// A record's key bytes: inline up to 24 bytes (most keys are an id), so
/// copying a record out of librdkafka does not allocate for it.
pub type KeyBytes = smallvec::SmallVec<[u8; 24]>;

/// One Kafka record, copied out of librdkafka's buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord {
    pub position: Position,
    /// Milliseconds since the epoch (create or log-append time).
    pub timestamp: Option<i64>,
    pub key: Option<KeyBytes>,
    /// `None` for a tombstone. The values of records read together share
    /// one buffer (one allocation per chunk rather than per record: the
    /// worker frees a batch's records at once, on another thread).
    pub value: Option<bytes::Bytes>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawRecord {
    /// Bytes of key, value and headers: what the record, batch and
    /// prefetch limits count.
    pub fn size(&self) -> usize {
        let headers: usize =
            self.headers.iter().map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len)).sum();
        self.key.as_ref().map_or(0, |key| key.len()) + self.value.as_ref().map_or(0, bytes::Bytes::len) + headers
    }
}
