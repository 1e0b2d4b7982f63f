//! The channels from a connector's consumer thread to its pipeline:
//! records in chunks, bounded in chunks and in bytes; rebalances and the
//! thread's end on a control channel of their own, which the pipeline
//! reads even while it is paused or its records channel is full.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::RawRecord;
use crate::event::Claim;

/// Records per chunk sent to the pipeline.
pub(super) const CHUNK: usize = 1000;
/// Chunks the channel holds.
pub(super) const CHANNEL_CHUNKS: usize = 8;

/// A chunk of records, on the records channel.
#[derive(Debug)]
pub struct Chunk {
    /// The assignment the records were fetched for.
    pub generation: u64,
    pub records: Vec<RawRecord>,
    /// Bytes of the records ([`RawRecord::size`]: what the channel's budget counts).
    pub bytes: usize,
}

/// The bytes of records in the records channel, against its budget: the
/// channel's capacity counts chunks, and chunks of large records would
/// otherwise let the fetch-ahead grow far past `source.max_prefetch_bytes`.
#[derive(Debug)]
pub(super) struct ChannelBytes {
    used: AtomicUsize,
    budget: usize,
    /// Signalled when the pipeline takes a chunk.
    pub(super) freed: tokio::sync::Notify,
}

impl ChannelBytes {
    /// Whether a chunk of `bytes` may go in now. An empty channel takes
    /// any chunk, so one record larger than the budget still passes.
    pub(super) fn has_room(&self, bytes: usize) -> bool {
        let used = self.used.load(Ordering::SeqCst);
        used == 0 || used + bytes <= self.budget
    }
}

/// The consumer thread's end of the records channel.
pub(super) struct RecordsSender {
    pub(super) tx: mpsc::Sender<Chunk>,
    pub(super) bytes: Arc<ChannelBytes>,
}

impl RecordsSender {
    /// Sends `chunk` if the channel has room for it, in chunks and bytes.
    pub(super) fn try_send(&self, chunk: Chunk) -> Result<(), mpsc::error::TrySendError<Chunk>> {
        if !self.bytes.has_room(chunk.bytes) {
            return Err(mpsc::error::TrySendError::Full(chunk));
        }
        let bytes = chunk.bytes;
        // Counted before it can be taken, so the count never goes below zero.
        self.bytes.used.fetch_add(bytes, Ordering::SeqCst);
        self.tx.try_send(chunk).inspect_err(|_| {
            self.bytes.used.fetch_sub(bytes, Ordering::SeqCst);
        })
    }

    /// The most records to read into a chunk holding `held` bytes in
    /// `len` records, so that it stays within its share of the budget;
    /// `average` is the size of records read lately.
    pub(super) fn room(&self, len: usize, held: usize, average: usize) -> usize {
        let share = (self.bytes.budget / CHANNEL_CHUNKS).max(1);
        let by_bytes = share.saturating_sub(held) / average.max(1);
        CHUNK.saturating_sub(len).min(by_bytes.max(usize::from(len == 0)))
    }
}

/// The pipeline's end of the records channel.
#[derive(Debug)]
pub struct RecordsReceiver {
    rx: mpsc::Receiver<Chunk>,
    bytes: Arc<ChannelBytes>,
}

impl RecordsReceiver {
    /// A receiver whose sender is gone: the consumer thread's sends find
    /// the channel closed and drop their records (for closing a consumer
    /// whose receiver was lost).
    pub fn closed() -> RecordsReceiver {
        records_channel(1).1
    }

    /// The next chunk; its bytes leave the channel's budget.
    pub async fn recv(&mut self) -> Option<Chunk> {
        self.recv_held().await.map(|(chunk, _released_here)| chunk)
    }

    /// The next chunk, its bytes still counted in the channel's budget
    /// until the [`Held`] is dropped: for a stage that hands the records
    /// on (the decode thread), so that what waits there counts too.
    pub async fn recv_held(&mut self) -> Option<(Chunk, Held)> {
        let chunk = self.rx.recv().await?;
        let held = Held { bytes: chunk.bytes, budget: self.bytes.clone() };
        Some((chunk, held))
    }
}

/// A chunk's bytes, counted in the records channel's budget until dropped.
#[derive(Debug)]
pub struct Held {
    bytes: usize,
    budget: Arc<ChannelBytes>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
        self.budget.freed.notify_one();
    }
}

/// What the consumer thread tells the pipeline besides records, on the
/// control channel (see [`SourceChannels`]).
#[derive(Debug)]
pub enum Control {
    /// New partitions; `generation` tags the records that follow.
    Assigned { generation: u64, claims: Vec<Claim> },
    /// Partitions are being taken away: flush what is pending, then ack.
    Revoked { ack: std::sync::mpsc::SyncSender<()> },
    /// The consumer thread failed and stopped polling (the context keeps a
    /// sender, so the channel alone would never say so).
    Ended { reason: String },
}

/// The two channels from the consumer thread.
///
/// Ordering contract: a control message is sent before any record chunk of
/// the generation it starts, from the same thread, so once a chunk of a
/// generation the pipeline does not know yet is received, the `Assigned`
/// that starts it is already in `control` (drain it with `try_recv`).
#[derive(Debug)]
pub struct SourceChannels {
    /// Chunks of records; bounded in chunks and in bytes (what the
    /// pipeline has not taken yet).
    pub records: RecordsReceiver,
    /// `Assigned`, `Revoked`, `Ended`: one per rebalance or end, so
    /// unbounded costs nothing, and a send never blocks the rebalance.
    pub control: mpsc::UnboundedReceiver<Control>,
}

/// A records channel whose chunks may hold `budget` bytes in all (an
/// empty channel takes any one chunk).
pub(super) fn records_channel(budget: usize) -> (RecordsSender, RecordsReceiver) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let bytes =
        Arc::new(ChannelBytes { used: AtomicUsize::new(0), budget: budget.max(1), freed: tokio::sync::Notify::new() });
    (RecordsSender { tx, bytes: bytes.clone() }, RecordsReceiver { rx, bytes })
}
