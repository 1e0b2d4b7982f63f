//! Reading from Kafka.
//!
//! * [`kafka`]: the consumer thread of a connector, its rebalance handling
//!   (claims in the sink, flush before revoke) and bounded prefetch.
//! * [`RawRecord`]: a record as it left Kafka.

pub mod kafka;
mod record;

pub use kafka::{ClaimFn, KafkaSource, SourceMessage};
pub use record::RawRecord;
