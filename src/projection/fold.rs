//! The one fold: the ops of one key within a batch, folded in partition
//! order into one net op, so that a batch touches a row or a document once
//! and a replay of a long history writes each key few times. Both sinks
//! write what this module folds; neither folds on its own.
//!
//! Fold rules (state ∘ next op → state):
//!
//! | state \ op       | upsert f      | merge f                 | increment d                  | delete |
//! |------------------|---------------|-------------------------|------------------------------|--------|
//! | none             | Replace f     | Patch{set f}            | Patch{add d}                 | Delete |
//! | Replace r        | Replace f     | Replace r⊕f             | Replace r with r.c + d       | Delete |
//! | Patch{set, add}  | Replace f     | Patch{set⊕f, add − f}   | set.c + d, or add.c + d      | Delete |
//! | Delete           | Replace f     | Replace f               | Replace {c: d}               | Delete |
//!
//! `Replace` means "the row is exactly these fields" (missing ones null),
//! `Patch` "create the row if missing, set these fields, add these deltas
//! (a missing or null field counts as 0)". A delete followed by a merge or an
//! increment is a `Replace`: the row starts again from nothing.
//!
//! With a domain version, an op whose version is not above the highest
//! folded so far for its key is stale and changes nothing.
//!
//! A net op equals its ops applied one at a time only against a stored
//! row or document that none of them has touched yet. What a sink has
//! stored may be inside the net op's run (a replay after a crash, a
//! duplicate at a new offset, a second writer): each net op says where it
//! starts and ends ([`NetOp::first_offset`], [`NetOp::first_version`]), so
//! a sink can tell whether the whole net op applies, none of it, or only
//! a suffix of its ops (then applied one by one, each the fold of one op:
//! [`Effect::of`]).

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use crate::event::Position;
use crate::projection::OpKind;
use crate::value::{name_position, Name, Value};

use super::WriteOp;

/// Fields of a net effect: those of the op they came from, borrowed, until
/// a fold changes them (a batch's keys mostly have one op: no copy).
pub type Fields<'a> = Cow<'a, [(Name, Value)]>;

/// The net effect on one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect<'a> {
    Replace(Fields<'a>),
    Patch { set: Fields<'a>, add: Fields<'a> },
    Delete,
}

/// The folded ops of one key (or, with [`GroupBy::KeyAndPartition`], of
/// one key and partition).
#[derive(Debug, Clone, PartialEq)]
pub struct NetOp<'a> {
    pub key: Cow<'a, [Value]>,
    pub effect: Effect<'a>,
    /// The highest domain version among the folded ops.
    pub version: Option<i64>,
    /// The domain version of the first op folded in (the lowest applied:
    /// later ops not above the highest so far are stale), `None` when an op
    /// folded in has no version (a delete from a Kafka tombstone): then no
    /// stored version tells the whole net op apart from its stale part. A
    /// stored version below it means the whole net op applies.
    pub first_version: Option<i64>,
    /// The partition of the events folded in (stale ones included, those
    /// that failed to fold not), `None` when they came from several: a
    /// key's net op goes in its partition's transaction, unless it cannot
    /// be split.
    pub partition: Option<(Name, i32)>,
    /// Offsets of the first and the last op folded in (stale ones
    /// included), in [`NetOp::partition`] when it is one.
    pub first_offset: i64,
    pub last_offset: i64,
}

/// What makes two ops one net op's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Ops of one key fold together, whatever their partition (Postgres:
    /// positions are stored with the rows, a key's net op is written once).
    Key,
    /// Ops of one key fold per partition (Elasticsearch: a document's
    /// guard holds a position per partition).
    KeyAndPartition,
}

/// A batch folded: the net ops, which net op each op went into, and the
/// ops that could not be folded.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded<'a> {
    /// In the order their keys first appear.
    pub net: Vec<NetOp<'a>>,
    /// For each op, the index in `net` of the net op it was folded into
    /// (stale ops too), [`Folded::FAILED`] for an op in `errors`.
    pub members: Vec<u32>,
    pub errors: Vec<FoldError>,
    /// The ops left out as stale (a version not above the highest folded
    /// before them for their key): superseded, never written.
    pub stale: Vec<usize>,
}

impl Folded<'_> {
    /// The member index of an op that failed to fold.
    pub const FAILED: u32 = u32::MAX;

    /// The indexes of the ops folded into each net op, in op order.
    pub fn members_of_each(&self) -> Vec<Vec<usize>> {
        let mut of_each = vec![Vec::new(); self.net.len()];
        for (op, &net) in self.members.iter().enumerate() {
            if net != Folded::FAILED {
                of_each[net as usize].push(op);
            }
        }
        of_each
    }
}

/// An op that cannot be folded: adding to a value that is not a number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot add {delta} to field `{field}` holding {found}")]
pub struct FoldError {
    /// Index of the op in the input.
    pub op: usize,
    pub position: Position,
    pub field: String,
    pub delta: String,
    pub found: String,
}

/// A key as a hash map key. Values are not `Eq` (floats): parts compare
/// by kind and content, floats by their bits (NaN is a key like any
/// other), composite values by their JSON text (rare as keys).
pub struct KeyRef<'a>(pub &'a [Value]);

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.len());
        for part in self.0 {
            match part {
                Value::Null => state.write_u8(0),
                Value::Bool(b) => {
                    state.write_u8(1);
                    state.write_u8(u8::from(*b));
                }
                Value::Int(i) => {
                    state.write_u8(2);
                    state.write_i64(*i);
                }
                Value::Float(x) => {
                    state.write_u8(3);
                    state.write_u64(x.to_bits());
                }
                Value::Str(s) => {
                    state.write_u8(4);
                    state.write(s.as_bytes());
                    state.write_usize(s.len());
                }
                Value::Bytes(b) => {
                    state.write_u8(5);
                    state.write(b);
                    state.write_usize(b.len());
                }
                Value::Time(t) => {
                    state.write_u8(7);
                    state.write_i64(t.value);
                }
                other => {
                    state.write_u8(6);
                    state.write(other.to_json().to_string().as_bytes());
                }
            }
        }
    }
}

impl PartialEq for KeyRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(other.0).all(|pair| match pair {
                (Value::Null, Value::Null) => true,
                (Value::Bool(a), Value::Bool(b)) => a == b,
                (Value::Int(a), Value::Int(b)) => a == b,
                (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
                (Value::Str(a), Value::Str(b)) => a == b,
                (Value::Bytes(a), Value::Bytes(b)) => a == b,
                (Value::Time(a), Value::Time(b)) => a == b,
                (a @ (Value::Array(_) | Value::Map(_) | Value::Record(_)), b) => {
                    std::mem::discriminant(a) == std::mem::discriminant(b) && a.to_json() == b.to_json()
                }
                _ => false,
            })
    }
}

impl Eq for KeyRef<'_> {}

/// A key with its hash, computed once ([`key_hashes`]), and its
/// partition when ops group by partition too.
struct Hashed<'a> {
    hash: u64,
    key: KeyRef<'a>,
    partition: Option<(Name, i32)>,
}

impl Hash for Hashed<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Hashed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.partition == other.partition && self.key == other.key
    }
}

impl Eq for Hashed<'_> {}

/// Passes a [`Hashed`] key's hash through (it is a full 64-bit hash).
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn write(&mut self, _: &[u8]) {
        unreachable!("only Hashed keys, which write their u64, go through Prehashed");
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The hasher of keys: one seed for the process, so hashes compare across
/// batches, drawn at random so a producer cannot choose keys that collide.
fn key_hasher() -> &'static foldhash::fast::FixedState {
    static HASHER: std::sync::OnceLock<foldhash::fast::FixedState> = std::sync::OnceLock::new();
    HASHER.get_or_init(|| {
        let seed = foldhash::fast::RandomState::default().hash_one(0u8);
        foldhash::fast::FixedState::with_seed(seed)
    })
}

/// The hash of every op's key, in op order: the fold indexes keys by them,
/// and the pipeline compares a batch's keys with those of the batches in
/// flight (see [`fold`]).
pub fn key_hashes(ops: &[WriteOp]) -> Vec<u64> {
    let hasher = key_hasher();
    ops.iter().map(|op| hasher.hash_one(KeyRef(&op.key))).collect()
}

/// Folds `ops` (in partition order per key) into net ops, grouped `by`.
/// Ops that cannot be folded are returned apart, each with its error; the
/// other ops of their key still fold. The net ops borrow keys and values
/// from `ops` where no fold changed them. `hashes` are the ops'
/// [`key_hashes`] when the caller has them (the pipeline does); a list of
/// another length than `ops` is not used (the keys are hashed here).
pub fn fold<'a>(ops: &'a [WriteOp], hashes: &[u64], by: GroupBy) -> Folded<'a> {
    // Zipped below: a list that does not match would drop ops silently, so
    // it is not trusted.
    let own;
    let hashes = if hashes.len() == ops.len() {
        hashes
    } else {
        own = key_hashes(ops);
        &own[..]
    };
    let mut index: HashMap<Hashed, usize, BuildHasherDefault<Prehashed>> =
        HashMap::with_capacity_and_hasher(ops.len(), Default::default());
    let mut net: Vec<NetOp> = Vec::with_capacity(ops.len());
    let mut members = Vec::with_capacity(ops.len());
    let mut errors = Vec::new();
    let mut stale_ops = Vec::new();
    for ((op_index, op), &hash) in ops.iter().enumerate().zip(hashes) {
        let here = (op.position.topic, op.position.partition);
        let (hash, partition) = match by {
            GroupBy::Key => (hash, None),
            GroupBy::KeyAndPartition => (key_hasher().hash_one((hash, here)), Some(here)),
        };
        // One lookup per op: the entry is found and, for a new key, filled.
        let at = match index.entry(Hashed { hash, key: KeyRef(&op.key), partition }) {
            Entry::Occupied(entry) => Some(*entry.get()),
            Entry::Vacant(entry) => {
                entry.insert(net.len());
                None
            }
        };
        let Some(at) = at else {
            members.push(net.len() as u32);
            net.push(NetOp {
                key: Cow::Borrowed(&op.key),
                effect: Effect::of(op.kind, &op.fields),
                version: op.version,
                first_version: op.version,
                partition: Some(here),
                first_offset: op.position.offset,
                last_offset: op.position.offset,
            });
            continue;
        };
        let current = &mut net[at];
        let stale = matches!((current.version, op.version), (Some(seen), Some(version)) if version <= seen);
        if stale {
            stale_ops.push(op_index);
        } else {
            if let Err(mut error) = apply(&mut current.effect, op.kind, &op.fields, op.position) {
                error.op = op_index;
                errors.push(error);
                members.push(Folded::FAILED);
                continue;
            }
            current.version = current.version.max(op.version);
            if op.version.is_none() {
                current.first_version = None;
            }
        }
        members.push(at as u32);
        current.last_offset = op.position.offset;
        if current.partition != Some(here) {
            current.partition = None;
        }
    }
    Folded { net, members, errors, stale: stale_ops }
}

/// How a net op meets what a sink has stored for its key (and partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// Every op of it was applied before (a replay), or a newer version is
    /// stored (stale, a duplicate): nothing changes.
    Applied,
    /// None of its ops was applied: the net effect applies whole.
    Whole,
    /// Some were: its ops apply one by one ([`Effect::of`] each), those at
    /// or below the stored offset or version skipped.
    OneByOne,
}

impl NetOp<'_> {
    /// The rule every sink follows (the Elasticsearch script mirrors it):
    /// `offset` is the last offset of the net op's partition applied to the
    /// stored row or document, `version` its domain version.
    pub fn against(&self, offset: Option<i64>, version: Option<i64>) -> Against {
        let at_or_below = |mine: Option<i64>| matches!((mine, version), (Some(mine), Some(stored)) if mine <= stored);
        let offset_covers = |mine: i64| offset.is_some_and(|stored| mine <= stored);
        // Some ops have a version and some none: which are stale, only
        // each op's own version says.
        let mixed = self.first_version.is_none() && self.version.is_some();
        if offset_covers(self.last_offset) || (!mixed && at_or_below(self.version)) {
            Against::Applied
        } else if offset_covers(self.first_offset) || at_or_below(self.first_version) || (mixed && version.is_some()) {
            Against::OneByOne
        } else {
            Against::Whole
        }
    }
}

impl<'a> Effect<'a> {
    /// The effect of one op alone: the first row of the fold table.
    pub fn of(kind: OpKind, fields: &'a [(Name, Value)]) -> Effect<'a> {
        let none = || Cow::Borrowed(&[][..]);
        match kind {
            OpKind::Upsert => Effect::Replace(Cow::Borrowed(fields)),
            OpKind::Merge => Effect::Patch { set: Cow::Borrowed(fields), add: none() },
            OpKind::Increment | OpKind::Decrement => Effect::Patch { set: none(), add: Cow::Borrowed(fields) },
            OpKind::Delete => Effect::Delete,
        }
    }
}

/// Applies one more op to a net effect. On error the effect is unchanged.
fn apply<'a>(
    effect: &mut Effect<'a>,
    kind: OpKind,
    fields: &'a [(Name, Value)],
    position: Position,
) -> Result<(), FoldError> {
    match (kind, &mut *effect) {
        (OpKind::Upsert, _) => *effect = Effect::Replace(Cow::Borrowed(fields)),
        (OpKind::Delete, _) => *effect = Effect::Delete,
        (OpKind::Merge, Effect::Replace(row)) => overlay(row.to_mut(), fields),
        (OpKind::Merge, Effect::Patch { set, add }) => {
            if add.iter().any(|(name, _)| fields.iter().any(|(n, _)| n == name)) {
                add.to_mut().retain(|(name, _)| !fields.iter().any(|(n, _)| n == name));
            }
            overlay(set.to_mut(), fields);
        }
        (OpKind::Merge, Effect::Delete) => *effect = Effect::Replace(Cow::Borrowed(fields)),
        (OpKind::Increment | OpKind::Decrement, Effect::Replace(row)) => {
            add_deltas(None, row.to_mut(), fields, position)?
        }
        (OpKind::Increment | OpKind::Decrement, Effect::Patch { set, add }) => {
            add_deltas(Some(set.to_mut()), add.to_mut(), fields, position)?
        }
        (OpKind::Increment | OpKind::Decrement, Effect::Delete) => *effect = Effect::Replace(Cow::Borrowed(fields)),
    }
    Ok(())
}

/// Sets each field, replacing an earlier value of the same name in place.
fn overlay(target: &mut Vec<(Name, Value)>, fields: &[(Name, Value)]) {
    for (name, value) in fields {
        match target.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value.clone(),
            None => target.push((name, value.clone())),
        }
    }
}

/// Adds each delta to the field of the same name in `set` when it has
/// one, else in `add` (missing or null = 0), in place and all or nothing:
/// an op with a delta that cannot be added leaves both as they were (its
/// earlier deltas are taken back), so the other ops of its key fold as
/// if it were not there. In place, not on a copy made per op: a key's
/// increments are most of a compaction-friendly batch (issue 27).
fn add_deltas(
    mut set: Option<&mut Vec<(Name, Value)>>,
    add: &mut Vec<(Name, Value)>,
    deltas: &[(Name, Value)],
    position: Position,
) -> Result<(), FoldError> {
    // What to take back: the values replaced (in `set` or not), and
    // `add`'s length (a field added new is pushed onto `add`). An op of
    // one delta (most) fails before it changes anything: nothing to keep.
    let added_from = add.len();
    let keeps = deltas.len() > 1;
    let mut replaced: smallvec::SmallVec<[(bool, usize, Value); 2]> = smallvec::SmallVec::new();
    for (name, delta) in deltas {
        let in_set = set.as_deref().and_then(|set| name_position(set, name));
        let (target, at, in_set) = match in_set {
            Some(at) => (set.as_deref_mut().expect("a position was found in it"), Some(at), true),
            None => {
                let at = name_position(add, name);
                (&mut *add, at, false)
            }
        };
        let Some(at) = at else {
            target.push((name, delta.clone()));
            continue;
        };
        match self::add(&target[at].1, delta) {
            Some(sum) if keeps => replaced.push((in_set, at, std::mem::replace(&mut target[at].1, sum))),
            Some(sum) => target[at].1 = sum,
            None => {
                let error = FoldError {
                    op: 0,
                    position,
                    field: name.to_string(),
                    delta: delta.to_string(),
                    found: format!("a {}", target[at].1.kind()),
                };
                for (in_set, at, old) in replaced.into_iter().rev() {
                    match (in_set, set.as_deref_mut()) {
                        (true, Some(set)) => set[at].1 = old,
                        _ => add[at].1 = old,
                    }
                }
                add.truncate(added_from);
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Numeric addition; integers stay integers unless they overflow.
pub fn add(current: &Value, delta: &Value) -> Option<Value> {
    match (current, delta) {
        (Value::Null, d @ (Value::Int(_) | Value::Float(_))) => Some(d.clone()),
        (Value::Int(a), Value::Int(b)) => {
            Some(a.checked_add(*b).map_or(Value::Float(*a as f64 + *b as f64), Value::Int))
        }
        (Value::Int(a), Value::Float(b)) => Some(Value::Float(*a as f64 + b)),
        (Value::Float(a), Value::Int(b)) => Some(Value::Float(a + *b as f64)),
        (Value::Float(a), Value::Float(b)) => Some(Value::Float(a + b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replace(fields: Vec<(Name, Value)>) -> Effect<'static> {
        Effect::Replace(fields.into())
    }

    fn patch(set: Vec<(Name, Value)>, add: Vec<(Name, Value)>) -> Effect<'static> {
        Effect::Patch { set: set.into(), add: add.into() }
    }

    fn op(offset: i64, kind: OpKind, fields: &[(Name, Value)]) -> WriteOp {
        WriteOp {
            key: smallvec::smallvec![Value::from("k")],
            kind,
            fields: fields.into(),
            version: None,
            position: Position { topic: "t", partition: 0, offset },
        }
    }

    fn fold_keys(ops: &[WriteOp]) -> (Vec<NetOp<'_>>, Vec<FoldError>) {
        let folded = fold(ops, &[], GroupBy::Key);
        (folded.net, folded.errors)
    }

    fn net(ops: Vec<WriteOp>) -> Effect<'static> {
        let (mut net, errors) = fold_keys(&ops);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(net.len(), 1);
        match net.remove(0).effect {
            Effect::Replace(fields) => replace(fields.into_owned()),
            Effect::Patch { set, add } => patch(set.into_owned(), add.into_owned()),
            Effect::Delete => Effect::Delete,
        }
    }

    fn up(offset: i64, fields: &[(Name, Value)]) -> WriteOp {
        op(offset, OpKind::Upsert, fields)
    }
    fn merge(offset: i64, fields: &[(Name, Value)]) -> WriteOp {
        op(offset, OpKind::Merge, fields)
    }
    fn inc(offset: i64, field: Name, delta: i64) -> WriteOp {
        op(offset, OpKind::Increment, &[(field, Value::Int(delta))])
    }
    fn del(offset: i64) -> WriteOp {
        op(offset, OpKind::Delete, &[])
    }

    #[test]
    fn every_pair_of_ops_folds_as_the_table_says() {
        let a = || ("a", Value::Int(1));
        let b = || ("b", Value::from("x"));
        // upsert ∘ …
        assert_eq!(net(vec![up(0, &[a()]), up(1, &[b()])]), replace(vec![b()]));
        assert_eq!(net(vec![up(0, &[a()]), merge(1, &[b()])]), replace(vec![a(), b()]));
        assert_eq!(net(vec![up(0, &[a()]), inc(1, "a", 4)]), replace(vec![("a", Value::Int(5))]));
        assert_eq!(net(vec![up(0, &[b()]), inc(1, "a", 4)]), replace(vec![b(), ("a", Value::Int(4))]));
        assert_eq!(net(vec![up(0, &[a()]), del(1)]), Effect::Delete);
        // merge ∘ …
        assert_eq!(net(vec![merge(0, &[a()]), up(1, &[b()])]), replace(vec![b()]));
        assert_eq!(
            net(vec![merge(0, &[a()]), merge(1, &[("a", Value::Int(9)), b()])]),
            patch(vec![("a", Value::Int(9)), b()], vec![])
        );
        assert_eq!(
            net(vec![merge(0, &[a()]), inc(1, "a", 2), inc(2, "c", 3)]),
            patch(vec![("a", Value::Int(3))], vec![("c", Value::Int(3))])
        );
        assert_eq!(net(vec![merge(0, &[a()]), del(1)]), Effect::Delete);
        // increment ∘ …
        assert_eq!(net(vec![inc(0, "a", 2), up(1, &[b()])]), replace(vec![b()]));
        assert_eq!(
            net(vec![inc(0, "a", 2), merge(1, &[("a", Value::Int(7))])]),
            patch(vec![("a", Value::Int(7))], vec![])
        );
        assert_eq!(net(vec![inc(0, "a", 2), inc(1, "a", -5)]), patch(vec![], vec![("a", Value::Int(-3))]));
        assert_eq!(net(vec![inc(0, "a", 2), del(1)]), Effect::Delete);
        // delete ∘ …
        assert_eq!(net(vec![del(0), up(1, &[b()])]), replace(vec![b()]));
        assert_eq!(net(vec![del(0), merge(1, &[b()])]), replace(vec![b()]));
        assert_eq!(net(vec![del(0), inc(1, "a", 6)]), replace(vec![("a", Value::Int(6))]));
        assert_eq!(net(vec![del(0), del(1)]), Effect::Delete);
    }

    #[test]
    fn keys_stay_apart_in_first_seen_order_with_the_partition_of_their_events() {
        let mut other = inc(1, "a", 1);
        other.key = smallvec::smallvec![Value::from("other")];
        let mut elsewhere = inc(3, "a", 1);
        (elsewhere.key, elsewhere.position.partition) = (smallvec::smallvec![Value::from("other")], 1);
        let ops = [inc(0, "a", 1), other, inc(2, "a", 1), elsewhere];
        let (net, errors) = fold_keys(&ops);
        assert!(errors.is_empty());
        assert_eq!(net.len(), 2);
        assert_eq!(net[0].key, vec![Value::from("k")]);
        assert_eq!(net[0].effect, patch(vec![], vec![("a", Value::Int(2))]));
        assert_eq!(net[0].partition, Some(("t", 0)));
        assert_eq!(net[1].key, vec![Value::from("other")]);
        assert_eq!(net[1].effect, patch(vec![], vec![("a", Value::Int(2))]));
        assert_eq!(net[1].partition, None, "events of two partitions");
    }

    #[test]
    fn hashes_that_do_not_match_the_ops_are_not_trusted() {
        let mut other = up(1, &[]);
        other.key = smallvec::smallvec![Value::from("other")];
        let ops = [up(0, &[]), other];
        let folded = fold(&ops, &key_hashes(&ops[..1]), GroupBy::Key);
        assert!(folded.errors.is_empty());
        assert_eq!(folded.net.len(), 2, "no op dropped");
        assert_eq!(folded.members, vec![0, 1]);
    }

    #[test]
    fn adding_to_text_is_an_error_of_that_op_only() {
        let mut failing = inc(1, "a", 1);
        failing.position.partition = 1;
        let ops = [up(0, &[("a", Value::from("text"))]), failing, inc(2, "b", 1)];
        let (net, errors) = fold_keys(&ops);
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].op, errors[0].position.offset), (1, 1));
        assert_eq!(net[0].effect, replace(vec![("a", Value::from("text")), ("b", Value::Int(1))]));
        // The op that failed is not part of the net op, nor its partition.
        assert_eq!(net[0].partition, Some(("t", 0)));
    }

    /// An increment of several fields that fails on one of them changes
    /// none of them, whether its key's state is a row (`Replace`) or a
    /// patch (`Patch`, the failing field among those it sets), and whether
    /// the state was borrowed from an op or already folded in place; the
    /// ops after it fold as if it were not there.
    #[test]
    fn an_increment_that_fails_on_one_field_takes_back_the_others() {
        let several = |offset, fields: &[(Name, Value)]| op(offset, OpKind::Increment, fields);
        let bad = |offset| several(offset, &[("n", Value::Int(2)), ("new", Value::Int(7)), ("t", Value::Int(1))]);
        let text = || ("t", Value::from("text"));
        // (ops before the failing one, the state they fold to)
        let cases = [
            (vec![up(0, &[("n", Value::Int(1)), text()])], replace(vec![("n", Value::Int(1)), text()])),
            (vec![up(0, &[("n", Value::Int(1)), text()]), inc(1, "n", 1)], replace(vec![("n", Value::Int(2)), text()])),
            (vec![merge(0, &[text()]), inc(1, "n", 1)], patch(vec![text()], vec![("n", Value::Int(1))])),
            (
                vec![merge(0, &[text(), ("n", Value::Int(4))]), inc(1, "n", 1)],
                patch(vec![text(), ("n", Value::Int(5))], vec![]),
            ),
        ];
        for (before, state) in cases {
            let after = before.len() as i64 + 1;
            let mut ops = before.clone();
            ops.push(bad(after - 1));
            ops.push(inc(after, "n", 10));
            let (mut folded, errors) = fold_keys(&ops);
            assert_eq!(errors.len(), 1, "{before:?}");
            assert_eq!((errors[0].op, errors[0].field.as_str()), (before.len(), "t"));
            let mut expected = before.clone();
            expected.push(inc(after, "n", 10));
            assert_eq!(folded.remove(0).effect, net(expected), "{before:?}");
            assert_eq!(net(before.clone()), state, "the state the failing op met");
        }
    }

    /// Random logs of one key where fields hold text as well as numbers
    /// and increments carry one to three deltas, some of which cannot be
    /// added: the batch's net op, applied to the row none of them touched,
    /// is the log applied one op at a time with each failing op left out
    /// whole, and the ops that fail are exactly those.
    #[test]
    fn failing_increments_fold_as_the_log_does_one_op_at_a_time() {
        use rand::{Rng, SeedableRng};
        let names = ["a", "b", "t"];
        let (mut failed, mut several) = (0, 0);
        for case in 0..3000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(case);
            let value = |rng: &mut rand::rngs::StdRng, text: bool| match rng.random_range(0..4) {
                _ if !text => Value::Int(rng.random_range(-5..10)),
                0 => Value::from("text"),
                1 => Value::Float(0.5),
                _ => Value::Int(rng.random_range(-5..10)),
            };
            let ops: Vec<WriteOp> = (0..rng.random_range(1..30))
                .map(|offset| {
                    let mut fields: Vec<(Name, Value)> = Vec::new();
                    let kind = match rng.random_range(0..10) {
                        0 => OpKind::Upsert,
                        1..=3 => OpKind::Merge,
                        4..=8 => OpKind::Increment,
                        _ => OpKind::Delete,
                    };
                    if kind != OpKind::Delete {
                        for name in names {
                            if rng.random_bool(0.5) {
                                let text = kind != OpKind::Increment;
                                fields.push((name, value(&mut rng, text)));
                            }
                        }
                    }
                    op(offset, kind, &fields)
                })
                .collect();
            // The reference: one op at a time, from no row.
            let (mut row, mut failing): (Option<Vec<(Name, Value)>>, Vec<usize>) = (None, Vec::new());
            for (index, op) in ops.iter().enumerate() {
                match op.kind {
                    OpKind::Upsert => row = Some(op.fields.to_vec()),
                    OpKind::Merge => overlay(row.get_or_insert_with(Vec::new), &op.fields),
                    OpKind::Delete => row = None,
                    _ => {
                        let mut next = row.clone().unwrap_or_default();
                        let mut ok = true;
                        for (name, delta) in &op.fields {
                            match next.iter_mut().find(|(n, _)| n == name) {
                                None => next.push((name, delta.clone())),
                                Some(slot) => match add(&slot.1, delta) {
                                    Some(sum) => slot.1 = sum,
                                    None => ok = false,
                                },
                            }
                        }
                        if ok {
                            row = Some(next);
                        } else {
                            failing.push(index);
                        }
                        several += usize::from(op.fields.len() > 1 && !ok);
                    }
                }
            }
            failed += failing.len();
            let (mut net, errors) = fold_keys(&ops);
            assert_eq!(errors.iter().map(|e| e.op).collect::<Vec<_>>(), failing, "case {case}: {ops:?}");
            let folded = match net.remove(0).effect {
                Effect::Replace(fields) => Some(fields.into_owned()),
                Effect::Patch { set, add } => {
                    let mut row = set.into_owned();
                    add_deltas(None, &mut row, &add, Position { topic: "t", partition: 0, offset: 0 })
                        .expect("deltas onto a row of what the patch sets");
                    Some(row)
                }
                Effect::Delete => None,
            };
            let sorted = |row: Option<Vec<(Name, Value)>>| {
                row.map(|mut row| {
                    row.sort_by_key(|(name, _)| *name);
                    row
                })
            };
            assert_eq!(sorted(folded), sorted(row), "case {case}: {ops:?}");
        }
        assert!(failed > 500 && several > 200, "failing ops tried: {failed}, of several deltas: {several}");
    }

    #[test]
    fn stale_versions_are_dropped_and_integers_overflow_into_floats() {
        let mut newer = merge(0, &[("a", Value::Int(2))]);
        newer.version = Some(5);
        let mut stale = merge(1, &[("a", Value::Int(1))]);
        stale.version = Some(4);
        let ops = [newer, stale];
        let (net, _) = fold_keys(&ops);
        assert_eq!(net[0].effect, patch(vec![("a", Value::Int(2))], vec![]));
        assert_eq!(net[0].version, Some(5));
        assert_eq!(add(&Value::Int(i64::MAX), &Value::Int(1)), Some(Value::Float(i64::MAX as f64 + 1.0)));
        assert_eq!(add(&Value::Null, &Value::Int(3)), Some(Value::Int(3)));
        assert_eq!(add(&Value::Bool(true), &Value::Int(3)), None);
    }

    fn versioned(mut op: WriteOp, version: i64) -> WriteOp {
        op.version = Some(version);
        op
    }

    #[test]
    fn a_stale_version_changes_nothing_whatever_the_state_and_the_op() {
        let a = || ("a", Value::Int(1));
        let b = || ("b", Value::from("x"));
        // Each state of the table, then each op at an older version: the
        // state stays, and the net op keeps its versions.
        let states: Vec<(Vec<WriteOp>, Effect<'static>)> = vec![
            (vec![versioned(up(0, &[a()]), 5)], replace(vec![a()])),
            (vec![versioned(merge(0, &[a()]), 5)], patch(vec![a()], vec![])),
            (vec![versioned(inc(0, "a", 1), 5)], patch(vec![], vec![a()])),
            (vec![versioned(del(0), 5)], Effect::Delete),
        ];
        let stale_ops = [up(1, &[b()]), merge(1, &[b()]), inc(1, "a", 7), del(1)];
        for (state, expected) in &states {
            for stale in &stale_ops {
                for version in [4, 5] {
                    let mut ops = state.clone();
                    ops.push(versioned(stale.clone(), version));
                    let (net_ops, errors) = fold_keys(&ops);
                    assert!(errors.is_empty());
                    assert_eq!(&net_ops[0].effect, expected, "{:?} then {:?} at v{version}", state[0].kind, stale.kind);
                    assert_eq!((net_ops[0].first_version, net_ops[0].version), (Some(5), Some(5)));
                    assert_eq!((net_ops[0].first_offset, net_ops[0].last_offset), (0, 1), "a stale op is covered");
                }
            }
        }
        // A newer version after a stale one still folds.
        let ops = [versioned(up(0, &[a()]), 2), versioned(up(1, &[b()]), 1), versioned(merge(2, &[b()]), 3)];
        let (net_ops, _) = fold_keys(&ops);
        assert_eq!(net_ops[0].effect, replace(vec![a(), b()]));
        assert_eq!((net_ops[0].first_version, net_ops[0].version), (Some(2), Some(3)));
    }

    #[test]
    fn grouped_by_partition_a_key_folds_once_per_partition_and_members_say_where_each_op_went() {
        let mut elsewhere = inc(2, "a", 5);
        elsewhere.position.partition = 1;
        let mut other = inc(3, "a", 1);
        other.key = smallvec::smallvec![Value::from("other")];
        let ops =
            [inc(0, "a", 1), inc(1, "x", 2), elsewhere, other, up(4, &[("a", Value::Bool(true))]), inc(5, "a", 1)];
        let by_key = fold(&ops, &[], GroupBy::Key);
        assert_eq!(by_key.net.len(), 2);
        assert_eq!(by_key.net[0].partition, None);
        let by_partition = fold(&ops, &key_hashes(&ops), GroupBy::KeyAndPartition);
        assert_eq!(by_partition.net.len(), 3);
        assert_eq!(by_partition.members, vec![0, 0, 1, 2, 0, Folded::FAILED]);
        assert_eq!(by_partition.members_of_each(), vec![vec![0, 1, 4], vec![2], vec![3]]);
        assert_eq!(by_partition.net[0].partition, Some(("t", 0)));
        assert_eq!((by_partition.net[0].first_offset, by_partition.net[0].last_offset), (0, 4));
        assert_eq!(by_partition.net[1].partition, Some(("t", 1)));
        assert_eq!(by_partition.net[1].effect, patch(vec![], vec![("a", Value::Int(5))]));
        assert_eq!(by_partition.errors.len(), 1, "adding to a bool");
        assert_eq!(by_partition.errors[0].op, 5);
    }

    #[test]
    fn a_net_op_meets_a_stored_guard_whole_one_by_one_or_not_at_all() {
        let ops = [versioned(up(10, &[]), 3), versioned(merge(11, &[]), 4), versioned(merge(12, &[]), 6)];
        let (net_ops, _) = fold_keys(&ops);
        let net_op = &net_ops[0];
        assert_eq!(net_op.against(None, None), Against::Whole);
        assert_eq!(net_op.against(Some(9), Some(2)), Against::Whole);
        assert_eq!(net_op.against(Some(10), None), Against::OneByOne, "a replay from inside the run");
        assert_eq!(net_op.against(Some(11), Some(4)), Against::OneByOne);
        assert_eq!(net_op.against(None, Some(3)), Against::OneByOne, "a newer version stored by another writer");
        assert_eq!(net_op.against(Some(12), None), Against::Applied);
        assert_eq!(net_op.against(Some(40), None), Against::Applied);
        assert_eq!(net_op.against(None, Some(6)), Against::Applied, "a duplicate at new offsets");
        // A delete without a version (a Kafka tombstone's) then a stale
        // upsert: only each op's own version tells which is stale.
        let mixed = [del(5), versioned(up(6, &[]), 3)];
        let (net_ops, _) = fold_keys(&mixed);
        assert_eq!((net_ops[0].first_version, net_ops[0].version), (None, Some(3)));
        assert_eq!(net_ops[0].against(None, Some(4)), Against::OneByOne);
        assert_eq!(net_ops[0].against(None, None), Against::Whole);
        assert_eq!(net_ops[0].against(Some(6), Some(4)), Against::Applied, "the offsets say so");
    }

    /// A row as a reference holds it: the fields, and the guards a sink
    /// stores beside them.
    #[derive(Debug, Clone, Default, PartialEq)]
    struct Stored {
        row: Option<Vec<(Name, Value)>>,
        offset: Option<i64>,
        version: Option<i64>,
    }

    impl Stored {
        fn put(&mut self, effect: &Effect, offset: i64, version: Option<i64>) {
            match effect {
                Effect::Replace(fields) => self.row = Some(fields.to_vec()),
                Effect::Patch { set, add } => {
                    let mut row = self.row.take().unwrap_or_default();
                    overlay(&mut row, set);
                    add_deltas(None, &mut row, add, Position { topic: "t", partition: 0, offset })
                        .expect("numbers only");
                    self.row = Some(row);
                }
                Effect::Delete => self.row = None,
            }
            self.offset = Some(offset);
            self.version = self.version.max(version);
        }

        /// One event, as the log says: the reference.
        fn apply_one(&mut self, op: &WriteOp) {
            let stale = matches!((op.version, self.version), (Some(mine), Some(stored)) if mine <= stored);
            if self.offset.is_some_and(|at| op.position.offset <= at) || stale {
                return;
            }
            self.put(&Effect::of(op.kind, &op.fields), op.position.offset, op.version);
        }

        /// A net op, as a sink applies it.
        fn apply_net(&mut self, net: &NetOp, members: &[&WriteOp]) {
            match net.against(self.offset, self.version) {
                Against::Applied => {}
                Against::Whole => self.put(&net.effect, net.last_offset, net.version),
                Against::OneByOne => members.iter().for_each(|op| self.apply_one(op)),
            }
        }
    }

    /// A random log of one partition: a few keys, every kind of op, and
    /// (when `versions`) a version per key that mostly grows, with late
    /// duplicates and stale events at new offsets.
    fn random_log(rng: &mut impl rand::Rng, events: usize, versions: bool) -> Vec<WriteOp> {
        let mut log: Vec<WriteOp> = Vec::with_capacity(events);
        let mut next_version = [0i64; 3];
        for offset in 0..events as i64 {
            let key = rng.random_range(0..3usize);
            if versions && !log.is_empty() && rng.random_bool(0.2) {
                // A duplicate or a stale event: an earlier one, again.
                let mut again = log[rng.random_range(0..log.len())].clone();
                again.position.offset = offset;
                log.push(again);
                continue;
            }
            let field = ["a", "b"][rng.random_range(0..2usize)];
            let number = Value::Int(rng.random_range(-5..10));
            let (kind, fields) = match rng.random_range(0..10) {
                0 | 1 => (OpKind::Upsert, vec![("a", number), ("s", Value::from("u"))]),
                2 | 3 => (OpKind::Merge, vec![(field, number)]),
                4..=7 => (OpKind::Increment, vec![(field, number)]),
                _ => (OpKind::Delete, vec![]),
            };
            // Half the deletes have no version (a Kafka tombstone's).
            let unversioned = kind == OpKind::Delete && rng.random_bool(0.5);
            let version = (versions && !unversioned).then(|| {
                next_version[key] += rng.random_range(1..3);
                next_version[key]
            });
            log.push(WriteOp {
                key: smallvec::smallvec![Value::Int(key as i64)],
                kind,
                fields: fields.into(),
                version,
                position: Position { topic: "t", partition: 0, offset },
            });
        }
        log
    }

    fn apply_batch(store: &mut [Stored; 3], batch: &[WriteOp]) {
        let folded = fold(batch, &key_hashes(batch), GroupBy::KeyAndPartition);
        assert!(folded.errors.is_empty(), "{:?}", folded.errors);
        for (net_op, members) in folded.net.iter().zip(folded.members_of_each()) {
            let Value::Int(key) = net_op.key[0] else { unreachable!("keys are ints") };
            let members: Vec<&WriteOp> = members.iter().map(|&m| &batch[m]).collect();
            store[key as usize].apply_net(net_op, &members);
        }
    }

    /// Whatever the batching, the replays from an earlier position and the
    /// duplicates: applied as the sinks apply net ops, the rows equal the log
    /// applied one event at a time, and a replay of events already applied
    /// never changes a row, not even in passing.
    #[test]
    fn net_ops_equal_the_log_one_event_at_a_time_for_every_cut_and_replay() {
        use rand::{Rng, SeedableRng};
        for case in 0..3000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(case);
            let events = rng.random_range(1..40);
            let log = random_log(&mut rng, events, case % 2 == 0);
            let mut reference: [Stored; 3] = Default::default();
            for op in &log {
                let key = match op.key[0] {
                    Value::Int(key) => key as usize,
                    _ => unreachable!("keys are ints"),
                };
                reference[key].apply_one(op);
            }
            // Fields in name order: a row is a set of columns.
            let rows = |store: &[Stored; 3]| {
                let sorted = |row: &Vec<(Name, Value)>| {
                    let mut row = row.clone();
                    row.sort_by_key(|(name, _)| *name);
                    row
                };
                store.iter().map(|s| s.row.as_ref().map(sorted)).collect::<Vec<_>>()
            };
            let mut store: [Stored; 3] = Default::default();
            // `applied`: the events written so far; `from`: where the
            // consumer reads next (a crash sends it back to a committed
            // offset, anywhere at or below what was written).
            let (mut applied, mut from) = (0usize, 0usize);
            while from < log.len() {
                let to = rng.random_range(from + 1..=log.len());
                let before = rows(&store);
                apply_batch(&mut store, &log[from..to]);
                if to <= applied {
                    assert_eq!(rows(&store), before, "case {case}: a replay of {from}..{to} changed a row");
                }
                applied = applied.max(to);
                from = if rng.random_bool(0.2) { rng.random_range(0..=to) } else { to };
            }
            assert_eq!(rows(&store), rows(&reference), "case {case}: {log:#?}");
        }
    }
}
