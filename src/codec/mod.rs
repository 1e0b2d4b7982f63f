//! Decoding: Confluent framing, writer schemas from the registry, Avro
//! binary → [`Event`].
//!
//! * [`framing`]: the wire format header (pure).
//! * [`avro`]: the compiled decoder (pure).
//! * [`registry`]: the registry client and the writer-schema cache.
//! * [`KeyFormat`], [`RegistryClientSettings`]: what a codec is built from.

pub mod avro;
pub mod framing;
pub mod registry;
mod settings;

use std::sync::Arc;

use crate::error::ErrorClass;
use crate::event::Event;
use crate::source::RawRecord;
use crate::value::Value;
use registry::{RegistryClient, RegistryError, WriterSchema};
pub use settings::{KeyFormat, RegistryClientSettings};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    #[error("value: {0}")]
    Framing(#[from] framing::FramingError),
    #[error("key: {0}")]
    KeyFraming(framing::FramingError),
    #[error("value does not match writer schema {schema_id}: {error}")]
    Avro { schema_id: u32, error: avro::DecodeError },
    #[error("key does not match writer schema {schema_id}: {error}")]
    KeyAvro { schema_id: u32, error: avro::DecodeError },
    #[error("key is not UTF-8")]
    KeyNotUtf8,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl CodecError {
    pub fn class(&self) -> ErrorClass {
        match self {
            CodecError::Registry(error) => error.class(),
            _ => ErrorClass::Permanent,
        }
    }
}

/// What a record decodes to.
#[derive(Debug)]
pub enum Decoded {
    /// An event and the writer schema it was decoded with (the catalogue
    /// matches versions by it).
    Event { event: Event, writer: Arc<WriterSchema> },
    /// A record with a null value: a delete of its key, if the connector says so.
    Tombstone { key: Value },
}

/// The writer schemas one thread has met, and which top-level fields of
/// each one's events a connector reads (issue 27: the others are skipped
/// over, never built; and a schema met before is found here, without the
/// registry cache's lock). Filled by its owner as writer schemas are first
/// met; a schema it holds nothing for is looked up in the cache and
/// decodes whole.
#[derive(Debug, Default)]
pub struct Reading {
    schemas: std::collections::HashMap<u32, Learned, foldhash::fast::RandomState>,
}

#[derive(Debug)]
struct Learned {
    writer: Arc<WriterSchema>,
    /// Per field of the record, whether it is read (`None`: all of them,
    /// or a schema that cannot be read in part).
    read: Option<Box<[bool]>>,
}

impl Reading {
    /// Whether schema `id` is known yet.
    pub fn knows(&self, id: u32) -> bool {
        self.schemas.contains_key(&id)
    }

    /// Learns `writer` and the fields read of its events (`None`: all).
    pub fn set(&mut self, writer: Arc<WriterSchema>, read: Option<Box<[bool]>>) {
        self.schemas.insert(writer.id, Learned { writer, read });
    }
}

/// A record's writer schema by id, with the fields read of its events
/// (`None`: all); `Err(id)` when it is not at hand.
type SchemaOf<'r> = dyn Fn(u32) -> Result<(Arc<WriterSchema>, Option<&'r [bool]>), u32> + 'r;

/// Decodes the records of one connector.
#[derive(Debug, Clone)]
pub struct Codec {
    registry: Arc<RegistryClient>,
    key_format: KeyFormat,
}

impl Codec {
    pub fn new(registry: Arc<RegistryClient>, key_format: KeyFormat) -> Codec {
        Codec { registry, key_format }
    }

    pub fn registry(&self) -> &Arc<RegistryClient> {
        &self.registry
    }

    /// Decodes one record. Only registry errors can be transient: the caller
    /// retries those and hands every other error to the error policy.
    pub async fn decode(&self, record: &RawRecord) -> Result<Decoded, CodecError> {
        // At most two schemas (the key's and the value's) are fetched.
        let mut fetched: Vec<Arc<WriterSchema>> = Vec::new();
        loop {
            match self.decode_with(record, &fetched, &Reading::default()) {
                Ok(decoded) => return decoded,
                Err(id) => fetched.push(self.registry.fetch_writer_schema_cached(id).await?),
            }
        }
    }

    /// Decodes one record with the writer schemas already cached, without
    /// waiting: `None` when one it needs is not (then [`Codec::decode`]).
    /// What the pipeline decodes ahead with, off the worker's thread.
    /// The value's fields that `reading` says nobody reads are skipped over
    /// ([`avro::Decoder::decode_fields`]).
    pub fn decode_cached(&self, record: &RawRecord, reading: &Reading) -> Option<Result<Decoded, CodecError>> {
        self.decode_with(record, &[], reading).ok()
    }

    /// Decodes with the schemas of `fetched`, `reading` and the cache;
    /// `Err(id)` when the writer schema `id` is in none (the key's is looked up first,
    /// so a key error comes before the value's schema is fetched).
    /// Cache hits are counted once the record is decoded (or fails for a
    /// reason of its own), so an attempt that stops at a missing schema,
    /// then is made again, counts each schema once.
    fn decode_with(
        &self,
        record: &RawRecord,
        fetched: &[Arc<WriterSchema>],
        reading: &Reading,
    ) -> Result<Result<Decoded, CodecError>, u32> {
        let hits = std::cell::Cell::new(0);
        // One lookup per schema: the writer, and the fields read of its
        // events when `reading` has learned them.
        let schema = |id: u32| match fetched.iter().find(|w| w.id == id) {
            Some(writer) => Ok((writer.clone(), None)),
            None => {
                let found = match reading.schemas.get(&id) {
                    Some(learned) => (learned.writer.clone(), learned.read.as_deref()),
                    None => (self.registry.peek(id).ok_or(id)?, None),
                };
                hits.set(hits.get() + 1);
                Ok(found)
            }
        };
        let decoded = self.decode_found(record, &schema);
        if decoded.is_ok() {
            self.registry.count_hits(hits.get());
        }
        decoded
    }

    fn decode_found<'r>(&self, record: &RawRecord, schema: &SchemaOf<'r>) -> Result<Result<Decoded, CodecError>, u32> {
        let key = match self.decode_key(record.key.as_deref(), schema)? {
            Ok(key) => key,
            Err(error) => return Ok(Err(error)),
        };
        let Some(value) = record.value.as_deref() else {
            return Ok(Ok(Decoded::Tombstone { key }));
        };
        let framed = match framing::parse(value) {
            Ok(framed) => framed,
            Err(error) => return Ok(Err(error.into())),
        };
        let (writer, read) = schema(framed.schema_id)?;
        let decoded = match read {
            Some(read) => writer.decoder.decode_fields(framed.body, read),
            None => writer.decoder.decode(framed.body),
        };
        let decoded = decoded.map(|(event_type, payload)| Decoded::Event {
            event: Event {
                event_type,
                version: 0,
                payload,
                key,
                position: record.position,
                timestamp: record.timestamp,
            },
            writer,
        });
        Ok(decoded.map_err(|error| CodecError::Avro { schema_id: framed.schema_id, error }))
    }

    /// Decodes a record's value into `slots` without building its event,
    /// when its writer schema is one `reading` has learned and `slot_of`
    /// gives that schema's slots (see [`avro::Decoder::decode_slots`])
    /// and whether the key is read: the record's key (null when it is not
    /// read; it is still checked); `None` otherwise, or when the
    /// record does not decode so ([`Codec::decode_cached`] then decodes
    /// it, and says why). Counts no cache hit: the caller does once it
    /// has used what this read.
    pub fn decode_slots<'p>(
        &self,
        record: &RawRecord,
        reading: &Reading,
        slot_of: impl FnOnce(u32) -> Option<(&'p [Option<usize>], bool)>,
        slots: &mut [Value],
    ) -> Option<Value> {
        // An Avro key needs its own schema: those take the full path.
        if self.key_format == KeyFormat::Avro {
            return None;
        }
        // The plan first: a record without one costs a frame's header here,
        // not a key decoded twice.
        let framed = framing::parse(record.value.as_deref()?).ok()?;
        let (slot_of, key_read) = slot_of(framed.schema_id)?;
        let learned = reading.schemas.get(&framed.schema_id)?;
        let key = match record.key.as_deref() {
            Some(bytes) if !key_read => {
                // Checked as `decode_key` checks a string or absent key
                // (an Avro key never comes here), not built: most plans
                // key by payload fields.
                if self.key_format == KeyFormat::String {
                    crate::value::utf8(bytes).ok()?;
                }
                Value::Null
            }
            key => self.decode_key(key, &Err).ok()?.ok()?,
        };
        learned.writer.decoder.decode_slots(framed.body, slot_of, slots).then_some(key)
    }

    fn decode_key(&self, key: Option<&[u8]>, schema: &SchemaOf) -> Result<Result<Value, CodecError>, u32> {
        let Some(bytes) = key else { return Ok(Ok(Value::Null)) };
        Ok(match self.key_format {
            KeyFormat::None => Ok(Value::Null),
            KeyFormat::String => {
                crate::value::utf8(bytes).map(|text| Value::Str(text.into())).map_err(|_| CodecError::KeyNotUtf8)
            }
            KeyFormat::Avro => {
                let framed = match framing::parse(bytes) {
                    Ok(framed) => framed,
                    Err(error) => return Ok(Err(CodecError::KeyFraming(error))),
                };
                let (writer, _) = schema(framed.schema_id)?;
                writer
                    .decoder
                    .decode(framed.body)
                    .map(|(_, value)| value)
                    .map_err(|error| CodecError::KeyAvro { schema_id: framed.schema_id, error })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    fn record(value: Vec<u8>) -> RawRecord {
        RawRecord {
            position: Position { topic: crate::value::intern("t"), partition: 0, offset: 5 },
            timestamp: None,
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn decoding_ahead_uses_cached_schemas_only_and_never_waits() {
        // Nothing listens here: a fetch would fail (transient), so a
        // decode that succeeds found its schema in the cache.
        let registry = Arc::new(RegistryClient::new(&RegistryClientSettings::plain("http://127.0.0.1:9")).unwrap());
        let codec = Codec::new(registry.clone(), KeyFormat::String);
        let text = r#"{"type":"record","name":"Placed","namespace":"t","fields":[{"name":"n","type":"long"}]}"#;
        let mut framed = Vec::new();
        framing::frame_into(7, &[0x06], &mut framed);
        let placed = record(framed);

        assert!(codec.decode_cached(&placed, &Reading::default()).is_none(), "id 7 is not cached: left to the worker");
        assert!(
            matches!(codec.decode_cached(&record(vec![1, 2]), &Reading::default()), Some(Err(CodecError::Framing(_)))),
            "no schema needed to fail framing"
        );
        assert_eq!(codec.decode(&placed).await.err().map(|e| e.class()), Some(ErrorClass::Transient));

        assert_eq!(registry.cache_counts(), (0, 1), "the fetch counted one miss; the attempt ahead nothing");
        registry.remember(Arc::new(registry::compile(7, text.to_string(), &[]).unwrap()));
        for decoded in [codec.decode_cached(&placed, &Reading::default()).unwrap(), codec.decode(&placed).await] {
            let Ok(Decoded::Event { event, writer }) = decoded else { panic!("decodes once cached") };
            assert_eq!((event.event_type, writer.id, event.position.offset), ("t.Placed", 7, 5));
            assert_eq!(event.payload.path(&["n"]), Some(&Value::Int(3)));
        }
        assert_eq!(registry.cache_counts(), (2, 1), "one hit per record decoded from the cache");

        // A schema the thread has learned is found without the cache (here
        // the cache never had id 8), with the fields it reads, and counted
        // as a hit as the cache's are.
        let two = r#"{"type":"record","name":"Two","namespace":"t","fields":[{"name":"a","type":"string"},{"name":"b","type":"long"}]}"#;
        let mut framed = Vec::new();
        framing::frame_into(8, &[0x02, b'x', 0x08], &mut framed);
        let learned = record(framed);
        assert!(codec.decode_cached(&learned, &Reading::default()).is_none(), "id 8 is not cached");
        let mut reading = Reading::default();
        reading.set(Arc::new(registry::compile(8, two.to_string(), &[]).unwrap()), Some(Box::new([false, true])));
        let Some(Ok(Decoded::Event { event, writer })) = codec.decode_cached(&learned, &reading) else {
            panic!("decodes with the schema learned")
        };
        assert_eq!((event.event_type, writer.id), ("t.Two", 8));
        assert_eq!(event.payload.to_json(), serde_json::json!({"b": 4}), "only the field read");
        assert_eq!(registry.cache_counts(), (3, 1));
        reading.set(writer, None);
        let Some(Ok(Decoded::Event { event, .. })) = codec.decode_cached(&learned, &reading) else { panic!("decodes") };
        assert_eq!(event.payload.to_json(), serde_json::json!({"a": "x", "b": 4}), "all fields");
    }

    /// A key the plan does not read is checked, not built: a UTF-8 key
    /// gives null, one that is not gives nothing (the full path then
    /// fails it, as it would have either way); a key read is the string.
    #[test]
    fn straight_decoding_checks_a_key_it_does_not_build() {
        let registry = Arc::new(RegistryClient::new(&RegistryClientSettings::plain("http://127.0.0.1:9")).unwrap());
        let one = r#"{"type":"record","name":"One","namespace":"t","fields":[{"name":"n","type":"long"}]}"#;
        let mut reading = Reading::default();
        reading.set(Arc::new(registry::compile(9, one.to_string(), &[]).unwrap()), None);
        let mut framed = Vec::new();
        framing::frame_into(9, &[0x06], &mut framed);
        let keyed = |key: Option<&[u8]>| RawRecord { key: key.map(Into::into), ..record(framed.clone()) };
        let slot_of: &[Option<usize>] = &[Some(0)];
        for format in [KeyFormat::String, KeyFormat::None] {
            let codec = Codec::new(registry.clone(), format);
            for key_read in [false, true] {
                let decode = |record: &RawRecord| {
                    let mut slots = vec![Value::Null];
                    let key =
                        codec.decode_slots(record, &reading, |id| (id == 9).then_some((slot_of, key_read)), &mut slots);
                    key.map(|key| (key, slots.remove(0)))
                };
                let text = match (format, key_read) {
                    (KeyFormat::String, true) => Value::Str("k-1".into()),
                    _ => Value::Null,
                };
                assert_eq!(decode(&keyed(Some(b"k-1"))), Some((text, Value::Int(3))), "{format:?}, read {key_read}");
                assert_eq!(decode(&keyed(None)), Some((Value::Null, Value::Int(3))), "{format:?}, read {key_read}");
                let bad = decode(&keyed(Some(&[b'k', 0xff])));
                match format {
                    KeyFormat::String => assert_eq!(bad, None, "not UTF-8, read {key_read}: the full path's"),
                    _ => assert_eq!(bad, Some((Value::Null, Value::Int(3))), "no key format: any bytes"),
                }
                let full = codec.decode_cached(&keyed(Some(&[b'k', 0xff])), &reading).expect("cached");
                assert_eq!(full.is_err(), format == KeyFormat::String, "the full path agrees");
            }
        }
    }
}
