//! The queue a consumer's records are read from, many at a time.
//!
//! rust-rdkafka hands out one record per `poll`, and each takes a trip
//! through librdkafka's queue lock, an event and an `Arc` (BENCHMARKS.md
//! has what that costs). `rd_kafka_consume_batch_queue` takes up to a chunk
//! per call, but served on the consumer's own queue it would also serve
//! the rebalance events, without kawka's handler (librdkafka answers them
//! with an empty assignment). So the records take a queue of their own:
//! each assigned partition's fetch queue is forwarded to it, and the
//! consumer queue is left with the events, still served by `poll`.
//!
//! Hidden contracts of librdkafka 2.x that this relies on (`rdkafka_queue.c`,
//! `rdkafka_partition.c`):
//! * A forward set by the application marks the partition's queue, and the
//!   fetcher's start then leaves the forward alone; so forwarding *before*
//!   `assign` sends every record of the assignment here.
//! * Stopping a partition's fetcher (unassign) clears the forward, so each
//!   assignment forwards again.
//! * Setting a forward moves what the partition queue already holds to the
//!   end of this queue: a partition's records stay in offset order.
//! * Records of a stopped or paused partition left here are outdated by
//!   their version and dropped by the batch call itself.
//! * A consumed record keeps its header section unparsed (`binhdrs`: the
//!   count, then the headers); of one byte, it is the count alone and holds
//!   no header. `headers.c`, compiled against the linked librdkafka's own
//!   headers, reads its length, so that records without headers skip the
//!   parse (which allocates even for a count of 0).

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use bytes::BytesMut;
use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;

use super::{KeyBytes, RawRecord};
use crate::event::Position;
use crate::value::{intern, Name};

/// A librdkafka queue owned by kawka, records only.
pub struct RecordQueue {
    queue: NonNull<rdsys::rd_kafka_queue_t>,
    /// Where librdkafka puts a batch's message pointers.
    batch: Vec<*mut rdsys::rd_kafka_message_t>,
    /// The last record's topic handle and its interned name: a chunk is
    /// mostly one topic, and interning takes a global lock.
    topic: Option<(*const rdsys::rd_kafka_topic_t, Name)>,
}

// SAFETY: librdkafka queues are thread-safe (every operation takes the
// queue's lock); the topic handle is only compared, never dereferenced
// outside librdkafka.
unsafe impl Send for RecordQueue {}

impl RecordQueue {
    /// A new queue of `consumer`'s handle. It must be dropped before the
    /// consumer (librdkafka's queue refers to its handle).
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> RecordQueue {
        // SAFETY: the handle is valid for as long as `consumer` lives.
        let queue = unsafe { rdsys::rd_kafka_queue_new(consumer.client().native_ptr()) };
        RecordQueue {
            queue: NonNull::new(queue).expect("rd_kafka_queue_new never returns null"),
            batch: Vec::new(),
            topic: None,
        }
    }

    /// The raw queue, for [`forward`].
    pub fn handle(&self) -> QueueHandle {
        QueueHandle(self.queue)
    }

    /// Moves up to `limit` records into `out`, waiting up to `timeout` for
    /// the *whole* `limit` (librdkafka's batch call returns early only when
    /// the time is up): wait with `limit` 1, then take the rest with no
    /// wait. Returns how many records were read; error records (a broken
    /// fetch) are logged and dropped, as librdkafka goes on fetching.
    pub fn read(&mut self, out: &mut Vec<RawRecord>, limit: usize, timeout: Duration, connector: &str) -> usize {
        if limit == 0 {
            return 0;
        }
        let mut messages = std::mem::take(&mut self.batch);
        messages.resize(limit, std::ptr::null_mut());
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `messages` has room for `limit` pointers; librdkafka
        // fills the first `n` and hands over their ownership.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(self.queue.as_ptr(), timeout_ms, messages.as_mut_ptr(), limit)
        };
        let n = usize::try_from(n).unwrap_or(0);
        let before = out.len();
        // One buffer for the chunk's values, each record holding its slice.
        // SAFETY: the first `n` pointers are live messages we own.
        let size = messages[..n]
            .iter()
            .filter(|&&m| unsafe { is_record(m) && !(*m).payload.is_null() })
            .map(|&m| unsafe { (*m).len })
            .sum();
        let mut values = BytesMut::with_capacity(size);
        // The chunk grows by `n` at most: one allocation, not a doubling per push.
        out.reserve(n);
        for &message in &messages[..n] {
            // SAFETY: each pointer is a live message we own until destroyed.
            unsafe {
                if is_record(message) {
                    out.push(self.record(message, &mut values));
                } else {
                    let error = CStr::from_ptr(rdsys::rd_kafka_err2str((*message).err)).to_string_lossy();
                    tracing::warn!(connector, %error, "kafka consumer error");
                }
                rdsys::rd_kafka_message_destroy(message);
            }
        }
        self.batch = messages;
        out.len() - before
    }

    /// Copies one message out of librdkafka's buffers, its value into
    /// `values` (sized for it: a slice of it needs no allocation).
    ///
    /// # Safety
    /// `message` must be a live message without an error.
    unsafe fn record(&mut self, message: *const rdsys::rd_kafka_message_t, values: &mut BytesMut) -> RawRecord {
        let m = &*message;
        let topic = match self.topic {
            Some((handle, name)) if std::ptr::eq(handle, m.rkt) => name,
            _ => {
                let name = intern(&CStr::from_ptr(rdsys::rd_kafka_topic_name(m.rkt)).to_string_lossy());
                self.topic = Some((m.rkt, name));
                name
            }
        };
        let mut kind = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        let timestamp = rdsys::rd_kafka_message_timestamp(message, &mut kind);
        let timestamp = (kind != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && timestamp >= 0)
            .then_some(timestamp);
        RawRecord {
            position: Position { topic, partition: m.partition, offset: m.offset },
            timestamp,
            key: bytes(m.key as *const u8, m.key_len).map(KeyBytes::from_slice),
            value: bytes(m.payload as *const u8, m.len).map(|value| {
                values.extend_from_slice(value);
                values.split().freeze()
            }),
            headers: headers(message),
        }
    }
}

impl Drop for RecordQueue {
    fn drop(&mut self) {
        // SAFETY: the queue is ours; partitions forwarding to it keep their
        // own reference, and librdkafka drops what they send afterwards.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

/// A [`RecordQueue`]'s raw queue, for the rebalance handler to forward
/// partitions to. Valid while the `RecordQueue` lives.
#[derive(Clone, Copy)]
pub struct QueueHandle(NonNull<rdsys::rd_kafka_queue_t>);

// SAFETY: see `RecordQueue`.
unsafe impl Send for QueueHandle {}
unsafe impl Sync for QueueHandle {}

/// Forwards the fetch queue of each of `partitions` to `to`. Call before
/// `assign` (see the module's contracts); returns the partitions librdkafka
/// did not know, whose records would go to the consumer queue instead.
///
/// # Safety
/// `to` must belong to a live [`RecordQueue`] of `consumer`'s handle.
pub unsafe fn forward<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    to: QueueHandle,
    partitions: &[(Name, i32)],
) -> Vec<(Name, i32)> {
    let mut missed = Vec::new();
    for &(topic, partition) in partitions {
        let Ok(name) = CString::new(topic) else {
            missed.push((topic, partition));
            continue;
        };
        let queue = rdsys::rd_kafka_queue_get_partition(consumer.client().native_ptr(), name.as_ptr(), partition);
        if queue.is_null() {
            missed.push((topic, partition));
            continue;
        }
        rdsys::rd_kafka_queue_forward(queue, to.0.as_ptr());
        // Only the handle goes: the forward keeps its own reference.
        rdsys::rd_kafka_queue_destroy(queue);
    }
    missed
}

/// Whether a message is a record rather than an error.
///
/// # Safety
/// `message` must be a live message.
unsafe fn is_record(message: *const rdsys::rd_kafka_message_t) -> bool {
    (*message).err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
}

/// The `len` bytes at `ptr`, `None` for a null pointer; the caller copies
/// them out before the message is destroyed.
///
/// # Safety
/// A non-null `ptr` must point to `len` readable bytes that stay valid for `'m`.
unsafe fn bytes<'m>(ptr: *const u8, len: usize) -> Option<&'m [u8]> {
    if ptr.is_null() {
        return None;
    }
    Some(std::slice::from_raw_parts(ptr, len))
}

extern "C" {
    /// 0 when a consumed message has no header to read (src/source/headers.c,
    /// built by build.rs against the linked librdkafka).
    fn kawka_message_may_have_headers(message: *const rdsys::rd_kafka_message_t) -> std::os::raw::c_int;
}

/// # Safety
/// `message` must be a live message.
unsafe fn headers(message: *const rdsys::rd_kafka_message_t) -> Vec<(String, Option<Vec<u8>>)> {
    // Most records have none, and asking librdkafka allocates to parse
    // even a count of 0 (see headers.c).
    if kawka_message_may_have_headers(message) == 0 {
        return Vec::new();
    }
    let mut list: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    if rdsys::rd_kafka_message_headers(message, &mut list) != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        || list.is_null()
    {
        return Vec::new();
    }
    let mut headers = Vec::new();
    for index in 0.. {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size = 0usize;
        if rdsys::rd_kafka_header_get_all(list, index, &mut name, &mut value, &mut size)
            != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            break;
        }
        headers.push((
            CStr::from_ptr(name).to_string_lossy().into_owned(),
            bytes(value as *const u8, size).map(<[u8]>::to_vec),
        ));
    }
    headers
}

#[cfg(test)]
mod tests {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    use super::*;

    /// The headers of records read through the queue: none sent, an empty
    /// list sent (a count of 0 on the wire), and some, a null value among
    /// them (the shortcut past librdkafka's parse must miss none).
    #[test]
    fn records_come_with_exactly_the_headers_they_were_sent_with() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        cluster.create_topic("events", 1, 1).expect("a topic");
        let bootstrap = cluster.bootstrap_servers();
        let producer: BaseProducer =
            ClientConfig::new().set("bootstrap.servers", &bootstrap).create().expect("a producer");
        let some = OwnedHeaders::new()
            .insert(Header { key: "trace", value: Some("t-1") })
            .insert(Header { key: "gone", value: None::<&[u8]> });
        let sent = [None, Some(OwnedHeaders::new()), Some(some)];
        for headers in sent {
            let record = BaseRecord::<str, str>::to("events").partition(0).key("k").payload("v");
            let record = match headers {
                Some(headers) => record.headers(headers),
                None => record,
            };
            producer.send(record).map_err(|(error, _)| error).expect("queued");
        }
        producer.flush(Duration::from_secs(10)).expect("produced");

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "headers")
            .create()
            .expect("a consumer");
        let mut records = RecordQueue::new(&consumer);
        // SAFETY: `records` is a live queue of `consumer`'s handle.
        let missed = unsafe { forward(&consumer, records.handle(), &[(intern("events"), 0)]) };
        assert!(missed.is_empty());
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset("events", 0, Offset::Beginning).expect("a partition");
        consumer.assign(&partitions).expect("assigned");
        let mut read = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while read.len() < 3 && std::time::Instant::now() < deadline {
            let wanted = 3 - read.len();
            records.read(&mut read, wanted, Duration::from_millis(200), "test");
        }
        let headers: Vec<_> = read.iter().map(|r| r.headers.clone()).collect();
        assert_eq!(
            headers,
            vec![vec![], vec![], vec![("trace".to_string(), Some(b"t-1".to_vec())), ("gone".to_string(), None)]]
        );
        drop(records);
    }
}
