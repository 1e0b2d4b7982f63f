//! Reading from Kafka.
//!
//! * [`kafka`]: the consumer thread of a connector, its rebalance handling
//!   (claims in the sink, flush before revoke) and bounded prefetch.
//! * `channel`: the records channel (bounded in chunks and bytes) and the
//!   control channel (rebalances) from the consumer thread to the pipeline.
//! * [`queue`]: the queue records are read from, a chunk per call
//!   (`headers.c`: whether a record has headers, from librdkafka's own
//!   struct, built by `build.rs`).
//! * [`RawRecord`]: a record as it left Kafka.
//! * [`KafkaSettings`], [`SourceSettings`]: what a source is built from.

mod channel;
pub mod kafka;
pub mod queue;
mod record;
mod settings;

pub use channel::{Chunk, Control, Held, RecordsReceiver, SourceChannels};
pub use kafka::{ClaimFn, KafkaSource};
pub use record::{KeyBytes, RawRecord};
pub use settings::{KafkaSettings, SourceSettings, StartPosition};
