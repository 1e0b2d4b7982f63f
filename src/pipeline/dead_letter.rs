//! The dead-letter topic: the original record, plus why it failed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::error::Failure;
use crate::source::KafkaSettings;
use crate::source::RawRecord;

/// A producer shared by every connector of the daemon.
#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("DeadLetters")
    }
}

impl DeadLetters {
    pub fn new(kafka: &KafkaSettings) -> KafkaResult<DeadLetters> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("client.id", "kawka-dead-letters")
            // A dead letter is the only copy of a failed event's fate.
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        for (key, value) in &kafka.properties {
            config.set(key, value);
        }
        Ok(DeadLetters { producer: config.create()? })
    }

    /// Produces the record to `topic` and waits until the broker has it.
    pub async fn send(
        &self,
        topic: &str,
        connector: &str,
        record: &RawRecord,
        failure: &Failure,
        replay_run: Option<&str>,
    ) -> Result<(), KafkaError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis().to_string();
        let (partition, offset) = (record.position.partition.to_string(), record.position.offset.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 8);
        // The record's own headers, without those of an earlier failure.
        for (key, value) in
            record.headers.iter().filter(|(k, _)| !k.starts_with("kawka.error.") && k != "kawka.replay.run")
        {
            headers = headers.insert(Header { key, value: value.as_deref() });
        }
        if let Some(run) = replay_run {
            headers = headers.insert(Header { key: "kawka.replay.run", value: Some(run.as_bytes()) });
        }
        for (key, value) in [
            ("kawka.error.class", failure.class.name()),
            ("kawka.error.stage", failure.stage),
            ("kawka.error.message", failure.message.as_str()),
            ("kawka.error.connector", connector),
            ("kawka.error.topic", record.position.topic),
            ("kawka.error.partition", partition.as_str()),
            ("kawka.error.offset", offset.as_str()),
            ("kawka.error.timestamp", now.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        let mut message: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            message = message.payload(&value[..]);
        }
        if let Some(timestamp) = record.timestamp {
            message = message.timestamp(timestamp);
        }
        self.producer.send(message, Duration::from_secs(30)).await.map(|_| ()).map_err(|(error, _)| error)
    }
}
