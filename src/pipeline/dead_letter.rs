//! The dead-letter topic: the original record, plus why it failed.
//!
//! A dead letter must never be the event that stalls its connector: the
//! producer takes any record the source accepts (plus headers), and when
//! the broker or the client still refuses the value for its size, the dead
//! letter goes without it (its headers say so, with the value's size and
//! SHA-256), so the event's fate is still recorded and its neighbours flow.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::error::Failure;
use crate::source::KafkaSettings;
use crate::source::RawRecord;

/// Room for the headers beside the largest record a source accepts (the
/// error message is capped at [`MAX_MESSAGE_BYTES`]; the record's own
/// headers are not counted in its size).
const HEADER_ROOM: usize = 256 * 1024;

/// The longest `kawka.error.message` written: messages quote input.
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// How long one dead letter may wait for the broker before its connector
/// shows the failure and retries (librdkafka's default is five minutes).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The header naming the value left out of a dead letter.
pub const VALUE_DROPPED_HEADER: &str = "kawka.error.value_dropped";
/// The header naming the key and headers left out of a bare dead letter.
pub const REST_DROPPED_HEADER: &str = "kawka.error.rest_dropped";

/// How long the delivery thread sleeps while nothing is in flight before
/// it serves what librdkafka queued meanwhile (its errors and logs).
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// A producer shared by every connector of the daemon.
#[derive(Clone)]
pub struct DeadLetters {
    producer: Arc<DeliveryThread>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("DeadLetters")
    }
}

/// One dead letter to write.
#[derive(Debug, Clone, Copy)]
pub struct Letter<'a> {
    /// The dead-letter topic.
    pub topic: &'a str,
    pub connector: &'a str,
    /// The record as it was read.
    pub record: &'a RawRecord,
    pub failure: &'a Failure,
    /// `kawka.replay.run` when a replay run dead-letters it again.
    pub replay_run: Option<&'a str>,
    /// `kawka.parked.behind`: the event its key is parked behind (`on_error: park`).
    pub parked_behind: Option<&'a str>,
}

/// A dead letter that was written, and what it carries of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Whole,
    /// The value was refused (for its size): written without it.
    WithoutValue,
    /// Refused even so (a large key or headers, a timestamp out of range):
    /// written with the `kawka.error.*` headers alone, naming what was
    /// left out.
    Bare,
}

/// Why a dead letter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// Waiting can fix it: the broker away, the topic missing or not yet
    /// writable for us, a delivery timeout.
    #[error("{0}")]
    Transient(KafkaError),
    /// The topic refuses even the bare dead letter (a compacted topic wants
    /// a key, say): waiting cannot fix it.
    #[error("the dead-letter topic refuses even a dead letter without key, value and headers: {0}")]
    Refused(KafkaError),
}

/// What one attempt leaves out of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Nothing,
    Value,
    All,
}

impl DeadLetters {
    /// A producer for records up to `max_record_bytes` (the largest any
    /// connector's source accepts).
    pub fn new(kafka: &KafkaSettings, max_record_bytes: usize) -> KafkaResult<DeadLetters> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("client.id", "kawka-dead-letters")
            // A dead letter is the only copy of a failed event's fate.
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // Each send is awaited: lingering would only add to its wait.
            .set("linger.ms", "0")
            .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string());
        for (key, value) in kafka.properties.iter() {
            config.set(key, value);
        }
        if !kafka.properties.contains_key("message.max.bytes") {
            // librdkafka's default (1,000,000) is below the source's default
            // limit (1 MiB): records in between could not be dead-lettered.
            let most = (max_record_bytes + HEADER_ROOM).min(1_000_000_000);
            config.set("message.max.bytes", most.max(1_000_000).to_string());
        }
        let producer: BaseProducer<Deliveries> =
            config.create_with_context(Deliveries).map_err(crate::source::kafka::redact_config_error)?;
        Ok(DeadLetters { producer: Arc::new(DeliveryThread::start(producer)) })
    }

    /// Produces the letter's record to its topic and waits until the
    /// broker has it. What the client or the broker refuses for good (its
    /// size, its shape) is produced again with less: without its value,
    /// then with the `kawka.error.*` headers alone.
    pub async fn send(&self, letter: &Letter<'_>) -> Result<Sent, DeadLetterError> {
        let Letter { topic, connector, record, .. } = *letter;
        let steps: &[(Cut, Sent)] = if record.value.is_some() {
            &[(Cut::Nothing, Sent::Whole), (Cut::Value, Sent::WithoutValue), (Cut::All, Sent::Bare)]
        } else {
            &[(Cut::Nothing, Sent::Whole), (Cut::All, Sent::Bare)]
        };
        let mut refusal = None;
        for &(cut, sent) in steps {
            match self.produce(letter, cut).await {
                Ok(()) => return Ok(sent),
                Err(error) if refused_for_good(&error) => {
                    tracing::warn!(connector, topic, error = %error, bytes = record.size(), cut = ?cut,
                        "dead letter refused; writing it with less");
                    refusal = Some(error);
                }
                Err(error) => return Err(DeadLetterError::Transient(error)),
            }
        }
        Err(DeadLetterError::Refused(refusal.expect("every step was refused")))
    }

    async fn produce(&self, letter: &Letter<'_>, cut: Cut) -> Result<(), KafkaError> {
        let Letter { topic, connector, record, failure, replay_run, parked_behind } = *letter;
        let drop_value = cut != Cut::Nothing;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis().to_string();
        let (partition, offset) = (record.position.partition.to_string(), record.position.offset.to_string());
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 9);
        // The record's own headers, without those of an earlier failure.
        let own = record.headers.iter().filter(|(k, _)| {
            !k.starts_with("kawka.error.") && k != "kawka.replay.run" && k != crate::parked::PARKED_BEHIND_HEADER
        });
        for (key, value) in own.filter(|_| cut != Cut::All) {
            headers = headers.insert(Header { key, value: value.as_deref() });
        }
        if let Some(run) = replay_run {
            headers = headers.insert(Header { key: "kawka.replay.run", value: Some(run.as_bytes()) });
        }
        if let Some(behind) = parked_behind {
            headers =
                headers.insert(Header { key: crate::parked::PARKED_BEHIND_HEADER, value: Some(behind.as_bytes()) });
        }
        let message = truncate(&failure.message, MAX_MESSAGE_BYTES);
        for (key, value) in [
            ("kawka.error.class", failure.class.name()),
            ("kawka.error.stage", failure.stage),
            ("kawka.error.message", message),
            ("kawka.error.connector", connector),
            ("kawka.error.topic", record.position.topic),
            ("kawka.error.partition", partition.as_str()),
            ("kawka.error.offset", offset.as_str()),
            ("kawka.error.timestamp", now.as_str()),
        ] {
            headers = headers.insert(Header { key, value: Some(value.as_bytes()) });
        }
        // A dead letter that lost its value keeps saying so when it is
        // dead-lettered again (a replay refuses it).
        let dropped = if drop_value {
            record.value.as_deref().map(describe_dropped)
        } else {
            value_dropped(record).map(str::to_string)
        };
        if let Some(dropped) = &dropped {
            headers = headers.insert(Header { key: VALUE_DROPPED_HEADER, value: Some(dropped.as_bytes()) });
        }
        let rest_dropped = (cut == Cut::All).then(|| {
            let key = record.key.as_ref().map_or("no key".to_string(), |key| describe_dropped(key.as_slice()));
            format!("key: {key}; {} headers of the record", record.headers.len())
        });
        if let Some(rest) = &rest_dropped {
            headers = headers.insert(Header { key: REST_DROPPED_HEADER, value: Some(rest.as_bytes()) });
        }
        let (delivered, delivery) = oneshot::channel();
        let mut message: BaseRecord<'_, [u8], [u8], Delivery> =
            BaseRecord::with_opaque_to(topic, Box::new(delivered)).headers(headers);
        if let Some(key) = record.key.as_ref().filter(|_| cut != Cut::All) {
            message = message.key(key.as_slice());
        }
        if let Some(value) = record.value.as_ref().filter(|_| !drop_value) {
            message = message.payload(&value[..]);
        }
        if let Some(timestamp) = record.timestamp.filter(|_| cut != Cut::All) {
            message = message.timestamp(timestamp);
        }
        self.producer.send(message).await?;
        // librdkafka reports every message within `message.timeout.ms`
        // (DELIVERY_TIMEOUT); the delivery thread serves the report. The
        // wait is bounded all the same, so that a report never served
        // shows as a failed dead letter its connector retries, not as a
        // connector waiting without a word.
        match tokio::time::timeout(DELIVERY_TIMEOUT + IDLE_WAKE, delivery).await {
            Ok(Ok(result)) => result,
            // The report's sender dropped unanswered: librdkafka dropped
            // the message without one.
            Ok(Err(_)) => Err(KafkaError::Canceled),
            Err(_) => Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)),
        }
    }
}

/// Where a dead letter's delivery report goes.
type Delivery = Box<oneshot::Sender<Result<(), KafkaError>>>;

/// The producer's context: each delivery report answers its letter.
struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Delivery;

    fn delivery(&self, result: &DeliveryResult<'_>, delivered: Delivery) {
        // The letter's sender may have given up waiting (its connector
        // stopped): nothing else waits for the report.
        let _ = delivered.send(result.as_ref().map(|_| ()).map_err(|(error, _)| error.clone()));
    }
}

/// The dead-letter producer and the thread that serves its delivery
/// reports.
///
/// Not rdkafka's `FutureProducer`: its thread polls in 100 ms windows
/// whose last millisecond rounds to a zero timeout, so it spins for that
/// millisecond of every window, about 1 % of a core for as long as the
/// daemon runs, dead letters or not (3 % of kawka's CPU in the benchmark's
/// runs, issue 27). This thread polls only while something is in flight
/// (letters, or reports, errors and logs librdkafka queued) and otherwise
/// sleeps until a letter is sent, or [`IDLE_WAKE`] passes.
struct DeliveryThread {
    producer: Arc<BaseProducer<Deliveries>>,
    wake: Arc<Wake>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How a sender wakes the delivery thread, and how its owner stops it:
/// both are set under the lock the thread sleeps on, so neither is missed
/// by a thread about to sleep.
#[derive(Default)]
struct Wake {
    state: Mutex<WakeState>,
    signal: Condvar,
}

#[derive(Default)]
struct WakeState {
    /// A letter was sent since the thread last looked.
    sent: bool,
    stop: bool,
}

impl Wake {
    fn state(&self) -> MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, change: impl FnOnce(&mut WakeState)) {
        change(&mut self.state());
        self.signal.notify_one();
    }
}

impl DeliveryThread {
    fn start(producer: BaseProducer<Deliveries>) -> DeliveryThread {
        let producer = Arc::new(producer);
        let wake = Arc::new(Wake::default());
        let thread = {
            let (producer, wake) = (Arc::clone(&producer), Arc::clone(&wake));
            std::thread::Builder::new()
                .name("kawka-dead-letters".to_string())
                .spawn(move || serve_deliveries(&producer, &wake))
                .expect("the OS starts a thread for the dead-letter producer")
        };
        DeliveryThread { producer, wake, thread: Some(thread) }
    }

    /// Hands `message` to librdkafka and wakes the delivery thread. A full
    /// queue is waited out for [`DELIVERY_TIMEOUT`], as a refused delivery
    /// would be.
    async fn send(&self, mut message: BaseRecord<'_, [u8], [u8], Delivery>) -> Result<(), KafkaError> {
        let started = Instant::now();
        loop {
            match self.producer.send(message) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), again))
                    if started.elapsed() < DELIVERY_TIMEOUT =>
                {
                    message = again;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
        self.wake.set(|state| state.sent = true);
        Ok(())
    }
}

impl Drop for DeliveryThread {
    fn drop(&mut self) {
        self.wake.set(|state| state.stop = true);
        if let Some(thread) = self.thread.take() {
            // Within one poll window (100 ms). The producer, dropped after
            // it, answers what is still queued with an error, as rdkafka's
            // own producers do.
            let _ = thread.join();
        }
    }
}

/// The delivery thread's loop (see [`DeliveryThread`]).
fn serve_deliveries(producer: &BaseProducer<Deliveries>, wake: &Wake) {
    loop {
        if wake.state().stop {
            return;
        }
        // Letters in flight, or reports, errors and logs to serve: each
        // poll serves them as they come for 100 ms (spinning its last
        // millisecond, but only while something is in flight).
        if producer.in_flight_count() > 0 {
            producer.poll(Duration::from_millis(100));
            continue;
        }
        let (mut state, _) = wake
            .signal
            .wait_timeout_while(wake.state(), IDLE_WAKE, |state| !state.sent && !state.stop)
            .unwrap_or_else(PoisonError::into_inner);
        state.sent = false;
    }
}

/// What a dead letter's `kawka.error.value_dropped` header says, if it
/// was written without its value.
fn value_dropped(record: &RawRecord) -> Option<&str> {
    record
        .headers
        .iter()
        .find(|(key, _)| key == VALUE_DROPPED_HEADER)
        .and_then(|(_, value)| std::str::from_utf8(value.as_deref()?).ok())
}

/// Why a dead letter cannot be replayed, if it was written without its
/// value: there is no event (a null value would read as a tombstone, a
/// delete of its key).
pub fn unreplayable(record: &RawRecord) -> Option<Failure> {
    let dropped = value_dropped(record)?;
    let message = format!("this dead letter was written without its value ({dropped}): it cannot be replayed");
    Some(Failure { class: crate::error::ErrorClass::Permanent, stage: "replay", message })
}

/// Errors that say the client or the topic refuses this record as it is
/// (its size, a timestamp out of range, a record the topic's settings do
/// not take): waiting cannot fix them, leaving parts of it out may.
fn refused_for_good(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidTimestamp
        )
    )
}

/// What the value-dropped header says: the value's size and SHA-256, so an
/// operator can match it with the original record.
fn describe_dropped(value: &[u8]) -> String {
    let digest = Sha256::digest(value);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{} bytes, sha256 {hex}", value.len())
}

/// `text` cut to at most `most` bytes, at a character boundary.
fn truncate(text: &str, most: usize) -> &str {
    if text.len() <= most {
        return text;
    }
    let mut end = most;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_value_is_named_by_its_size_and_digest() {
        assert_eq!(
            describe_dropped(b"abc"),
            "3 bytes, sha256 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn messages_are_cut_at_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    /// The CPU time, in nanoseconds, of this process' threads named
    /// `name` (as `/proc` shows it: 15 bytes at most), by thread id.
    fn cpu_of_threads(name: &str) -> std::collections::BTreeMap<u32, u64> {
        let mut threads = std::collections::BTreeMap::new();
        for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let Ok(id) = task.file_name().to_string_lossy().parse::<u32>() else { continue };
            if comm.trim_end() == name {
                let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
                let ns = schedstat.split_whitespace().next().and_then(|ns| ns.parse().ok()).unwrap_or(0);
                threads.insert(id, ns);
            }
        }
        threads
    }

    fn failed_record() -> (RawRecord, Failure) {
        let record = RawRecord {
            position: crate::event::Position { topic: crate::value::intern("orders"), partition: 0, offset: 7 },
            timestamp: Some(1_700_000_000_000),
            key: Some(b"k".as_slice().into()),
            value: Some(bytes::Bytes::from_static(b"v")),
            headers: Vec::new(),
        };
        let failure =
            Failure { class: crate::error::ErrorClass::Permanent, stage: "decode", message: "bad".to_string() };
        (record, failure)
    }

    fn letter_of<'a>(record: &'a RawRecord, failure: &'a Failure) -> Letter<'a> {
        Letter { topic: "dead", connector: "c", record, failure, replay_run: None, parked_behind: None }
    }

    /// Letters sent at once to a producer whose queue holds one wait for
    /// room (librdkafka refuses the others with a full queue) and are all
    /// delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn letters_wait_out_a_full_queue() {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("dead", 1, 1).expect("a topic");
        let properties =
            std::collections::BTreeMap::from([("queue.buffering.max.messages".to_string(), "1".to_string())]);
        let kafka = KafkaSettings { bootstrap_servers: cluster.bootstrap_servers(), properties: properties.into() };
        let letters = DeadLetters::new(&kafka, 1 << 20).expect("a producer");
        let (record, failure) = failed_record();
        let letter = letter_of(&record, &failure);
        let (a, b, c) = tokio::join!(letters.send(&letter), letters.send(&letter), letters.send(&letter));
        for sent in [a, b, c] {
            assert_eq!(sent.expect("delivered"), Sent::Whole);
        }
    }

    /// Letters are delivered, each as soon as the broker has it, and in
    /// between the producer's thread sleeps: rdkafka's `FutureProducer`
    /// spun for the last millisecond of every 100 ms, ~1 % of a core for
    /// the daemon's whole life (issue 27).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn letters_are_delivered_and_the_idle_producer_sleeps() {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("dead", 1, 1).expect("a topic");
        let kafka = KafkaSettings { bootstrap_servers: cluster.bootstrap_servers(), properties: Default::default() };
        let name = "kawka-dead-lett";
        let before = cpu_of_threads(name);
        let letters = DeadLetters::new(&kafka, 1 << 20).expect("a producer");
        let (record, failure) = failed_record();
        let letter = letter_of(&record, &failure);
        // The first also waits for the connection to the broker.
        assert_eq!(letters.send(&letter).await.expect("delivered"), Sent::Whole);
        for _ in 0..3 {
            // Longer than a poll window, shorter than the idle wake: a
            // send the thread missed would wait for the idle wake.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let started = Instant::now();
            assert_eq!(letters.send(&letter).await.expect("delivered"), Sent::Whole);
            assert!(started.elapsed() < Duration::from_millis(500), "delivered in {:?}", started.elapsed());
        }
        let ours = || -> Vec<u64> {
            cpu_of_threads(name).into_iter().filter(|(id, _)| !before.contains_key(id)).map(|(_, ns)| ns).collect()
        };
        assert_eq!(ours().len(), 1, "one delivery thread, named {name}");
        let (idle_from, started) = (ours()[0], Instant::now());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (spent, idle) = (ours()[0] - idle_from, started.elapsed());
        // Spinning 1 ms of every 100 would be ~30 ms here; a sleeping
        // thread wakes three times.
        assert!(spent < 3_000_000, "the idle delivery thread ran {spent} ns in {idle:?}");
        drop(letters);
        assert!(
            cpu_of_threads(name).keys().all(|id| before.contains_key(id)),
            "the delivery thread ends with its producer"
        );
    }

    #[test]
    fn size_refusals_are_told_from_other_errors() {
        let size = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert!(refused_for_good(&size));
        assert!(!refused_for_good(&unknown));
    }
}
