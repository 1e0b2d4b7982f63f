//! The batches being written in the background and which of them a new
//! batch must wait for (no chaining) or follow (chaining).

use super::batch::Pending;
use crate::event::PartitionOffset;
use crate::sink::{Follows, SinkError, StepDone, Written};
use crate::value::Name;

/// Writes of one partition in flight at once, when the sink chains them.
pub(super) const CHAIN_DEPTH: usize = 2;

/// A finished write: its batch, positions, result and the seconds the
/// sink took (timed in the task: the worker may look only much later).
pub(super) type WriteDone = (Pending, Vec<PartitionOffset>, Result<Written, SinkError>, f64);

/// A background write, the partitions its batch has records of, the
/// sorted hashes of the keys it writes (empty when writes are not
/// concurrent), whether its statements ran and whether it committed (for
/// the writes that follow it) and the connections it holds.
pub(super) struct InFlightWrite {
    pub(super) task: tokio::task::JoinHandle<WriteDone>,
    pub(super) partitions: Vec<(Name, i32)>,
    pub(super) keys: Vec<u64>,
    pub(super) ran: StepDone,
    pub(super) committed: StepDone,
    pub(super) connections: usize,
}

impl InFlightWrite {
    pub(super) fn shares_partition(&self, partitions: &[(Name, i32)]) -> bool {
        self.partitions.iter().any(|p| partitions.contains(p))
    }

    /// Whether a batch of these partitions and keys must wait for this
    /// write to finish, when the sink cannot chain writes: a shared
    /// partition (its positions commit in order) or a shared key (two
    /// transactions locking the same rows in different orders would
    /// deadlock; a hash collision only costs a wait). A sink that chains
    /// writes follows such a write instead ([`follows`]).
    pub(super) fn blocks(&self, partitions: &[(Name, i32)], keys: &[u64], chains: bool) -> bool {
        !chains && (self.shares_partition(partitions) || share_any(&self.keys, keys))
    }
}

/// What a batch of these partitions and keys follows of the writes in
/// flight, when the sink chains writes: it runs its statements after those
/// it shares a key with ran theirs, and commits after those it shares a
/// partition or a key with committed.
pub(super) fn follows(in_flight: &[InFlightWrite], partitions: &[(Name, i32)], keys: &[u64]) -> Follows {
    let mut follows = Follows::default();
    for write in in_flight {
        let shares_key = share_any(&write.keys, keys);
        if shares_key {
            follows.ran.push(write.ran.clone());
        }
        if shares_key || write.shares_partition(partitions) {
            follows.committed.push(write.committed.clone());
        }
    }
    follows
}

/// `hashes` (of a batch's keys, [`crate::projection::fold::key_hashes`]) sorted: one allocation, no rehashing.
pub(super) fn sorted(hashes: &[u64]) -> Vec<u64> {
    let mut sorted = hashes.to_vec();
    sorted.sort_unstable();
    sorted
}

/// Whether two sorted lists have a value in common.
fn share_any(a: &[u64], b: &[u64]) -> bool {
    let (mut i, mut j) = (0, 0);
    while let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
        match x.cmp(y) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// The first write in flight to finish: its index and result; pending
/// forever when there is none (the `select!` branch is disabled then anyway).
pub(super) async fn finished(in_flight: &mut [InFlightWrite]) -> (usize, Result<WriteDone, tokio::task::JoinError>) {
    if in_flight.is_empty() {
        return std::future::pending().await;
    }
    let (done, index, _) = futures::future::select_all(in_flight.iter_mut().map(|write| &mut write.task)).await;
    (index, done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use crate::projection::OpKind;
    use crate::projection::{fold, WriteOp};
    use crate::value::Value;

    fn hashed(ops: &[WriteOp]) -> Vec<u64> {
        sorted(&fold::key_hashes(ops))
    }

    fn ops(partition: i32, keys: &[&str]) -> Vec<WriteOp> {
        keys.iter()
            .enumerate()
            .map(|(n, key)| WriteOp {
                key: smallvec::smallvec![Value::from(*key), Value::Int(1)],
                kind: OpKind::Upsert,
                fields: Default::default(),
                version: None,
                position: Position { topic: "t", partition, offset: n as i64 },
            })
            .collect()
    }

    fn in_flight(partitions: &[i32], keys: &[&str]) -> InFlightWrite {
        // A task that never runs to completion: only the bookkeeping is tested.
        let task = tokio::spawn(std::future::pending());
        let partitions = partitions.iter().map(|&p| ("t", p)).collect();
        let (_, ran) = StepDone::channel();
        let (_, committed) = StepDone::channel();
        InFlightWrite { task, partitions, keys: hashed(&ops(0, keys)), ran, committed, connections: 1 }
    }

    #[tokio::test]
    async fn a_batch_waits_for_writes_that_share_a_key_or_an_unchained_partition() {
        let write = in_flight(&[0, 1], &["a", "b"]);
        let (other_keys, same_key) = (hashed(&ops(2, &["c", "d"])), hashed(&ops(2, &["d", "b"])));
        assert!(!write.blocks(&[("t", 2)], &other_keys, false), "disjoint partitions and keys run concurrently");
        assert!(write.blocks(&[("t", 2)], &same_key, false), "a shared key waits (rows locked in another order)");
        assert!(!write.blocks(&[("u", 0)], &[], false), "partitions are per topic");
        // Keys are compared whole: ("a", 1) is not ("a", 2).
        let mut shifted = ops(2, &["a"]);
        shifted[0].key[1] = Value::Int(2);
        assert!(!write.blocks(&[("t", 2)], &hashed(&shifted), false));
        // A shared partition commits in order: after the write.
        assert!(write.blocks(&[("t", 2), ("t", 1)], &other_keys, false));
        assert!(write.shares_partition(&[("t", 2), ("t", 1)]));
        // A sink that chains writes never waits here: it follows them.
        for (partitions, keys) in [(&[("t", 2)][..], &same_key), (&[("t", 2), ("t", 1)][..], &other_keys)] {
            assert!(!write.blocks(partitions, keys, true));
        }
        write.task.abort();
    }

    #[tokio::test]
    async fn a_chained_batch_runs_after_writes_sharing_a_key_and_commits_after_those_sharing_a_partition() {
        let first = in_flight(&[0], &["a", "b"]);
        let second = in_flight(&[1], &["c"]);
        let writes = [first, second];
        let count = |f: &Follows| (f.ran.len(), f.committed.len());
        // Another partition, other keys: free.
        assert_eq!(count(&follows(&writes, &[("t", 2)], &hashed(&ops(2, &["x"])))), (0, 0));
        // The first's partition: commits after it, statements at once.
        assert_eq!(count(&follows(&writes, &[("t", 0)], &hashed(&ops(0, &["x"])))), (0, 1));
        // A key of the first from another partition: both waits, on it alone.
        assert_eq!(count(&follows(&writes, &[("t", 2)], &hashed(&ops(2, &["b"])))), (1, 1));
        // A key of each, and the second's partition.
        assert_eq!(count(&follows(&writes, &[("t", 1)], &hashed(&ops(1, &["a", "c"])))), (2, 2));
        for write in writes {
            write.task.abort();
        }
    }
}
