//! Per-key compaction: the ops of one key within a batch, folded in
//! partition order into one net op, so that a batch touches a row or a
//! document once and a replay of a long history writes each key few times.
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

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use crate::event::Position;
use crate::projection::OpKind;
use crate::value::{Name, Value};

use super::WriteOp;

/// Fields of a net effect: those of the op they came from, borrowed, until
/// a fold changes them (a batch's keys mostly have one op, and copying
/// every value once more was a good part of a batch's cost).
pub type Fields<'a> = Cow<'a, [(Name, Value)]>;

/// The net effect on one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect<'a> {
    Replace(Fields<'a>),
    Patch { set: Fields<'a>, add: Fields<'a> },
    Delete,
}

/// The folded ops of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct NetOp<'a> {
    pub key: Cow<'a, [Value]>,
    pub effect: Effect<'a>,
    /// The highest domain version among the folded ops.
    pub version: Option<i64>,
    /// The partition of the events folded in (stale ones included, those
    /// that failed to fold not), `None` when they came from several: a
    /// key's net op goes in its partition's transaction, unless it cannot
    /// be split. Only the partition, not every position: a batch's net ops
    /// are written and moved for each key, and their size showed.
    pub partition: Option<(Name, i32)>,
}

/// An op that cannot be folded: adding to a value that is not a number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot add {delta} to field `{field}` holding {found}")]
pub struct CompactError {
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
                (a @ (Value::Array(_) | Value::Map(_) | Value::Record(_)), b) => {
                    std::mem::discriminant(a) == std::mem::discriminant(b) && a.to_json() == b.to_json()
                }
                _ => false,
            })
    }
}

impl Eq for KeyRef<'_> {}

/// A key with its hash, computed once ([`key_hashes`]).
struct Hashed<'a> {
    hash: u64,
    key: KeyRef<'a>,
}

impl Hash for Hashed<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Hashed<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
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

/// The hash of every op's key, in op order: compaction indexes keys by
/// them, and the pipeline compares a batch's keys with those of the
/// batches in flight (see [`compact_hashed`]). Hashed with one seed for
/// the process, so hashes compare across batches, drawn at random so a
/// producer cannot choose keys that collide.
pub fn key_hashes(ops: &[WriteOp]) -> Vec<u64> {
    static HASHER: std::sync::OnceLock<foldhash::fast::FixedState> = std::sync::OnceLock::new();
    let hasher = HASHER.get_or_init(|| {
        let seed = foldhash::fast::RandomState::default().hash_one(0u8);
        foldhash::fast::FixedState::with_seed(seed)
    });
    ops.iter().map(|op| hasher.hash_one(KeyRef(&op.key))).collect()
}

/// Folds `ops` (in partition order per key) into one net op per key, in the
/// order keys first appear. Ops that cannot be folded are returned apart,
/// each with its error; the other ops of their key still fold. The net ops
/// borrow keys and values from `ops` where no fold changed them.
///
/// With a domain version, an op whose version is not above the highest seen
/// for its key in this batch is stale and dropped.
pub fn compact(ops: &[WriteOp]) -> (Vec<NetOp<'_>>, Vec<CompactError>) {
    compact_hashed(ops, &key_hashes(ops))
}

/// [`compact`] with the ops' [`key_hashes`], when the caller has them
/// already: hashing each key was a visible part of a batch's cost, and
/// the pipeline needs them too. A list of another length than `ops` is
/// not used (the keys are hashed here).
pub fn compact_hashed<'a>(ops: &'a [WriteOp], hashes: &[u64]) -> (Vec<NetOp<'a>>, Vec<CompactError>) {
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
    let mut errors = Vec::new();
    for ((op_index, op), &hash) in ops.iter().enumerate().zip(hashes) {
        // One lookup per op: the entry is found and, for a new key, filled.
        let at = match index.entry(Hashed { hash, key: KeyRef(&op.key) }) {
            Entry::Occupied(entry) => Some(*entry.get()),
            Entry::Vacant(entry) => {
                entry.insert(net.len());
                None
            }
        };
        match at {
            None => {
                net.push(NetOp {
                    key: Cow::Borrowed(&op.key),
                    effect: first(op.kind, &op.fields),
                    version: op.version,
                    partition: Some((op.position.topic, op.position.partition)),
                });
            }
            Some(at) => {
                let current = &mut net[at];
                let stale = matches!((current.version, op.version), (Some(seen), Some(version)) if version <= seen);
                if !stale {
                    current.version = current.version.max(op.version);
                    if let Err(mut error) = fold(&mut current.effect, op.kind, &op.fields, op.position) {
                        error.op = op_index;
                        errors.push(error);
                        continue;
                    }
                }
                if current.partition != Some((op.position.topic, op.position.partition)) {
                    current.partition = None;
                }
            }
        }
    }
    (net, errors)
}

fn first(kind: OpKind, fields: &[(Name, Value)]) -> Effect<'_> {
    let none = || Cow::Borrowed(&[][..]);
    match kind {
        OpKind::Upsert => Effect::Replace(Cow::Borrowed(fields)),
        OpKind::Merge => Effect::Patch { set: Cow::Borrowed(fields), add: none() },
        OpKind::Increment | OpKind::Decrement => Effect::Patch { set: none(), add: Cow::Borrowed(fields) },
        OpKind::Delete => Effect::Delete,
    }
}

/// Applies one more op to a net effect. On error the effect is unchanged.
fn fold<'a>(
    effect: &mut Effect<'a>,
    kind: OpKind,
    fields: &'a [(Name, Value)],
    position: Position,
) -> Result<(), CompactError> {
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
            let mut next = row.to_vec();
            add_into(&mut next, fields, position)?;
            *row = Cow::Owned(next);
        }
        (OpKind::Increment | OpKind::Decrement, Effect::Patch { set, add }) => {
            let (mut next_set, mut next_add) = (set.to_vec(), add.to_vec());
            for delta in fields {
                let target = if next_set.iter().any(|(n, _)| *n == delta.0) { &mut next_set } else { &mut next_add };
                add_into(target, std::slice::from_ref(delta), position)?;
            }
            (*set, *add) = (Cow::Owned(next_set), Cow::Owned(next_add));
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

/// Adds each delta to the field of the same name (missing or null = 0).
fn add_into(target: &mut Vec<(Name, Value)>, deltas: &[(Name, Value)], position: Position) -> Result<(), CompactError> {
    for (name, delta) in deltas {
        match target.iter_mut().find(|(n, _)| n == name) {
            None => target.push((name, delta.clone())),
            Some(slot) => {
                slot.1 = add(&slot.1, delta).ok_or_else(|| CompactError {
                    op: 0,
                    position,
                    field: name.to_string(),
                    delta: delta.to_string(),
                    found: format!("a {}", slot.1.kind()),
                })?;
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
            fields: fields.to_vec(),
            version: None,
            position: Position { topic: "t", partition: 0, offset },
        }
    }

    fn net(ops: Vec<WriteOp>) -> Effect<'static> {
        let (mut net, errors) = compact(&ops);
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
        let (net, errors) = compact(&ops);
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
        let (net, errors) = compact_hashed(&ops, &key_hashes(&ops[..1]));
        assert!(errors.is_empty());
        assert_eq!(net.len(), 2, "no op dropped");
    }

    #[test]
    fn adding_to_text_is_an_error_of_that_op_only() {
        let mut failing = inc(1, "a", 1);
        failing.position.partition = 1;
        let ops = [up(0, &[("a", Value::from("text"))]), failing, inc(2, "b", 1)];
        let (net, errors) = compact(&ops);
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].op, errors[0].position.offset), (1, 1));
        assert_eq!(net[0].effect, replace(vec![("a", Value::from("text")), ("b", Value::Int(1))]));
        // The op that failed is not part of the net op, nor its partition.
        assert_eq!(net[0].partition, Some(("t", 0)));
    }

    #[test]
    fn stale_versions_are_dropped_and_integers_overflow_into_floats() {
        let mut newer = merge(0, &[("a", Value::Int(2))]);
        newer.version = Some(5);
        let mut stale = merge(1, &[("a", Value::Int(1))]);
        stale.version = Some(4);
        let ops = [newer, stale];
        let (net, _) = compact(&ops);
        assert_eq!(net[0].effect, patch(vec![("a", Value::Int(2))], vec![]));
        assert_eq!(net[0].version, Some(5));
        assert_eq!(add(&Value::Int(i64::MAX), &Value::Int(1)), Some(Value::Float(i64::MAX as f64 + 1.0)));
        assert_eq!(add(&Value::Null, &Value::Int(3)), Some(Value::Int(3)));
        assert_eq!(add(&Value::Bool(true), &Value::Int(3)), None);
    }
}
