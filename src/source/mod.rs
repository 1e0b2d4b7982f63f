//! Reading from Kafka.

mod record;

pub use record::RawRecord;
