//! The batch being built: the records processed since the last commit,
//! the ops their events became and the positions the batch commits.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::event::PartitionOffset;
use crate::event::Position;
use crate::projection::WriteOp;
use crate::source::RawRecord;
use crate::value::Name;

/// The epoch of each assigned partition; looked up for every record: foldhash rather than SipHash.
pub(super) type Epochs = HashMap<(Name, i32), Option<i64>, foldhash::fast::RandomState>;

/// The records and ops of the batch being built.
#[derive(Default)]
pub(super) struct Pending {
    /// Every record processed since the last commit, in order (also those
    /// dead-lettered or skipped: they move the positions too).
    pub(super) records: Vec<RawRecord>,
    /// Event type of each record (for per-type counts), aligned with `records`.
    pub(super) types: Vec<Name>,
    pub(super) ops: Vec<WriteOp>,
    /// Index into `records` of each op's event.
    pub(super) origins: Vec<usize>,
    pub(super) bytes: usize,
    pub(super) deadline: Option<Instant>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// An empty batch with room for as much as this one holds: the next batch is usually as big.
    pub(super) fn empty_like(&self) -> Pending {
        Pending {
            records: Vec::with_capacity(self.records.len()),
            types: Vec::with_capacity(self.types.len()),
            ops: Vec::with_capacity(self.ops.len()),
            origins: Vec::with_capacity(self.origins.len()),
            ..Pending::default()
        }
    }

    pub(super) fn clear(&mut self) {
        self.records.clear();
        self.types.clear();
        self.ops.clear();
        self.origins.clear();
        self.bytes = 0;
        self.deadline = None;
    }

    /// Adds the ops of the event at `origin` (an index into `records`).
    pub(super) fn add_ops(&mut self, origin: usize, ops: impl IntoIterator<Item = WriteOp>) {
        self.ops.extend(ops);
        self.origins.resize(self.ops.len(), origin);
    }

    /// Adds a processed record; the first one of a batch sets its deadline.
    pub(super) fn push(&mut self, record: RawRecord, event_type: Name, max_wait: Duration) {
        self.bytes += record.size();
        self.records.push(record);
        self.types.push(event_type);
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + max_wait);
        }
    }

    /// Drops the ops of the events at `rejected` (indexes into `records`,
    /// ascending, as every caller gathers them in record order: looked up
    /// by binary search, so a whole partition's events cost no more than
    /// a few).
    pub(super) fn remove_events(&mut self, rejected: &[usize]) {
        debug_assert!(rejected.windows(2).all(|w| w[0] < w[1]), "events to remove in record order");
        let removed = |origin: &usize| rejected.binary_search(origin).is_ok();
        let mut keep = self.origins.iter().map(|origin| !removed(origin));
        self.ops.retain(|_| keep.next().unwrap_or(true));
        self.origins.retain(|origin| !removed(origin));
    }

    /// Forgets the records from `index` on (for `stop`: commit nothing past it).
    pub(super) fn truncate(&mut self, index: usize) {
        self.records.truncate(index);
        self.types.truncate(index);
        let mut keep = self.origins.iter().map(|origin| *origin < index);
        self.ops.retain(|_| keep.next().unwrap_or(true));
        self.origins.retain(|origin| *origin < index);
    }

    /// Positions after the batch's records: last processed + 1 per partition.
    pub(super) fn offsets(&self, epochs: &Epochs) -> Vec<PartitionOffset> {
        let mut next: Vec<PartitionOffset> = Vec::new();
        for record in &self.records {
            let Position { topic, partition, offset } = record.position;
            match next.iter_mut().find(|o| o.topic == topic && o.partition == partition) {
                Some(found) => found.next_offset = found.next_offset.max(offset + 1),
                None => next.push(PartitionOffset {
                    topic,
                    partition,
                    next_offset: offset + 1,
                    epoch: epochs.get(&(topic, partition)).copied().flatten(),
                }),
            }
        }
        next
    }
}
