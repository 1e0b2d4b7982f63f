//! Reading from Kafka.
//!
//! * [`kafka`]: the consumer thread of a connector, its rebalance handling
//!   (claims in the sink, flush before revoke) and bounded prefetch.
//! * [`queue`]: the queue records are read from, a chunk per call.
//! * [`RawRecord`]: a record as it left Kafka.

pub mod kafka;
pub mod queue;
mod record;

pub use kafka::{ClaimFn, KafkaSource, SourceMessage};
pub use record::{KeyBytes, RawRecord};
