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
        let key = self.decode_key(record.key.as_deref()).await?;
        let Some(value) = record.value.as_deref() else {
            return Ok(Decoded::Tombstone { key });
        };
        let framed = framing::parse(value)?;
        let writer = self.writer_schema(framed.schema_id).await?;
        let (event_type, payload) = writer
            .decoder
            .decode(framed.body)
            .map_err(|error| CodecError::Avro { schema_id: framed.schema_id, error })?;
        let event =
            Event { event_type, version: 0, payload, key, position: record.position, timestamp: record.timestamp };
        Ok(Decoded::Event { event, writer })
    }

    /// The writer schema of an id: cached ids never wait.
    pub async fn writer_schema(&self, id: u32) -> Result<Arc<WriterSchema>, RegistryError> {
        // `writer_schema` looks in the cache first (and counts hits and misses).
        self.registry.writer_schema(id).await
    }

    async fn decode_key(&self, key: Option<&[u8]>) -> Result<Value, CodecError> {
        let Some(bytes) = key else { return Ok(Value::Null) };
        match self.key_format {
            KeyFormat::None => Ok(Value::Null),
            KeyFormat::String => {
                std::str::from_utf8(bytes).map(|text| Value::Str(text.into())).map_err(|_| CodecError::KeyNotUtf8)
            }
            KeyFormat::Avro => {
                let framed = framing::parse(bytes).map_err(CodecError::KeyFraming)?;
                let writer = self.writer_schema(framed.schema_id).await?;
                writer
                    .decoder
                    .decode(framed.body)
                    .map(|(_, value)| value)
                    .map_err(|error| CodecError::KeyAvro { schema_id: framed.schema_id, error })
            }
        }
    }
}
