//! What a source is built from: the Kafka cluster and one connector's
//! topics, group and prefetch limits (`config` fills them in from the files).

use serde::Deserialize;

/// The Kafka cluster every connector reads from (and dead letters go to).
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub properties: crate::secret::Properties,
}

/// One connector's consumer.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub topics: Vec<String>,
    pub start: StartPosition,
    pub group_id: String,
    pub properties: crate::secret::Properties,
    pub max_prefetch_bytes: u64,
    /// Records fetched ahead of processing, at most: two batches.
    pub max_prefetch_records: usize,
    pub max_record_bytes: usize,
    /// Every partition of the topics, assigned at start without joining
    /// the group (no rebalance, no join delay: a new group waits out the
    /// broker's `group.initial.rebalance.delay.ms`, 3 s by default). For
    /// a consumer that is alone by construction and whose positions live
    /// in the sink (a Postgres rebuild); partitions and topics that appear
    /// later are assigned when the consumer next looks (every 5 s).
    pub assign_all: bool,
}

/// Where a group with no stored position starts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    #[default]
    Earliest,
    Latest,
}
