//! Reading from Kafka.
//!
//! * [`kafka`]: the consumer thread of a connector, its rebalance handling
//!   (claims in the sink, flush before revoke) and bounded prefetch.
//! * [`queue`]: the queue records are read from, a chunk per call.
//! * [`RawRecord`]: a record as it left Kafka.
//! * [`KafkaSettings`], [`SourceSettings`]: what a source is built from.

pub mod kafka;
pub mod queue;
mod record;
mod settings;

pub use kafka::{Chunk, ClaimFn, Control, KafkaSource, SourceChannels};
pub use record::{KeyBytes, RawRecord};
pub use settings::{KafkaSettings, SourceSettings, StartPosition};
