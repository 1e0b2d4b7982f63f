//! Ops built straight from a record's decoded fields (issue 27): for a rule
//! whose expressions are top-level fields, literals and record metadata,
//! the decoder reads each field it needs into a slot and the op takes its
//! values from the slots; no payload record, event or path lookup is built
//! for it.
//!
//! Contract: [`Direct::op`] gives the op [`RulesProjection`]'s own path
//! gives for the same event, or `None` whenever that path would fail or do
//! anything else (a null key part, a version or a delta of the wrong kind):
//! the caller then takes the full path, which says why. A plan exists only
//! for events that reach the projection as decoded (no upcaster, no
//! resolution: the caller checks), so the slots hold what the payload
//! would.

use super::expr::{Expr, Meta};
use super::{delta, KeyValues, OpFields, OpKind, RulesProjection, WriteOp};
use crate::event::Position;
use crate::value::{Kinds, Name, Value};

/// What the values of a plan's ops can be ([`Direct::shape`]): the key
/// parts' and the fields', in the op's order, the fields with their names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpShape {
    pub key: Vec<Kinds>,
    pub fields: Vec<(Name, Kinds)>,
}

/// Where one value of the op comes from.
#[derive(Debug, Clone)]
enum Source {
    /// A top-level field of the record, by its slot.
    Slot(usize),
    Literal(Value),
    Meta(Meta),
}

/// How the ops of one writer schema's events are built from its fields.
#[derive(Debug, Clone)]
pub struct Direct {
    event_type: Name,
    /// Per field of the writer's record, in its order: its slot (`None`:
    /// nobody reads it; the decoder skips it).
    slot_of: Box<[Option<usize>]>,
    /// Per slot, how many of the op's values read it: one moves it.
    uses: Box<[u8]>,
    kind: OpKind,
    key: Box<[Source]>,
    version: Option<Source>,
    fields: Box<[(Name, Source)]>,
    /// Whether any of the op's values is the record's key (`$key`).
    reads_key: bool,
}

impl Direct {
    /// The plan of events of `event_type` whose record has `fields` (the
    /// writer's, in order), if every expression of its rule can read them
    /// so; `None`: the full path.
    pub(super) fn new(projection: &RulesProjection, event_type: Name, fields: &[Name]) -> Option<Direct> {
        let rule = projection.rule(event_type)?;
        let mut slot_of: Vec<Option<usize>> = vec![None; fields.len()];
        let mut uses: Vec<u8> = Vec::new();
        let mut source = |expr: &Expr| -> Option<Source> {
            match expr {
                Expr::Literal(value) => Some(Source::Literal(value.clone())),
                Expr::Meta(meta) => Some(Source::Meta(*meta)),
                Expr::Field(path) if path.len() == 1 => {
                    // Absent from this schema: the full path says so.
                    let at = fields.iter().position(|field| *field == path[0])?;
                    let slot = *slot_of[at].get_or_insert_with(|| {
                        uses.push(0);
                        uses.len() - 1
                    });
                    uses[slot] = uses[slot].saturating_add(1);
                    Some(Source::Slot(slot))
                }
                _ => None,
            }
        };
        let key = projection.key.iter().map(|(_, expr)| source(expr)).collect::<Option<Box<[Source]>>>()?;
        let version = match &projection.version {
            Some(expr) => Some(source(expr)?),
            None => None,
        };
        let fields: Box<[(Name, Source)]> =
            rule.fields.iter().map(|(name, expr)| Some((*name, source(expr)?))).collect::<Option<_>>()?;
        let is_key = |source: &Source| matches!(source, Source::Meta(Meta::Key));
        let reads_key = key.iter().chain(&version).chain(fields.iter().map(|(_, source)| source)).any(is_key);
        Some(Direct {
            event_type,
            slot_of: slot_of.into_boxed_slice(),
            uses: uses.into_boxed_slice(),
            kind: rule.kind,
            key,
            version,
            fields,
            reads_key,
        })
    }

    /// The event type of the records it reads.
    pub fn event_type(&self) -> Name {
        self.event_type
    }

    /// Per field of the writer's record: its slot, `None` when skipped.
    pub fn slot_of(&self) -> &[Option<usize>] {
        &self.slot_of
    }

    /// Whether the op reads the record's key (`$key`): when not, the
    /// decoder need not build it.
    pub fn reads_key(&self) -> bool {
        self.reads_key
    }

    /// How many slots the decoder fills.
    pub fn slots(&self) -> usize {
        self.uses.len()
    }

    /// What the values of its ops can be, given what each field of the
    /// writer's record decodes to (`field_kinds`, in the order of the
    /// fields it was planned for): per key part and per field, in the op's
    /// order, of the ops [`Direct::op`] gives. A literal is its own kind,
    /// metadata anything.
    pub fn shape(&self, field_kinds: &[Kinds]) -> OpShape {
        let kinds = |source: &Source| match source {
            Source::Slot(slot) => self
                .slot_of
                .iter()
                .zip(field_kinds)
                .find_map(|(of, kinds)| (*of == Some(*slot)).then_some(*kinds))
                .unwrap_or(Kinds::ANY),
            Source::Literal(value) => Kinds::of(value),
            Source::Meta(_) => Kinds::ANY,
        };
        // A delta that is not an error is the number it was.
        let numbers = match self.kind {
            OpKind::Increment | OpKind::Decrement => Kinds::INT.or(Kinds::FLOAT),
            _ => Kinds::ANY,
        };
        OpShape {
            // A null key part makes no op.
            key: self.key.iter().map(|source| kinds(source).without(Kinds::NULL)).collect(),
            fields: self.fields.iter().map(|(name, source)| (*name, kinds(source).and(numbers))).collect(),
        }
    }

    /// The op of the event whose fields are in `slots` (which it empties
    /// of what it moves), with the record's key, position and timestamp;
    /// `None` when the full path would not give one (see the module).
    pub fn op(&self, slots: &mut [Value], key: &Value, position: Position, timestamp: Option<i64>) -> Option<WriteOp> {
        let mut value = |source: &Source| -> Value {
            match source {
                Source::Slot(slot) if self.uses[*slot] == 1 => std::mem::take(&mut slots[*slot]),
                Source::Slot(slot) => slots[*slot].clone(),
                Source::Literal(literal) => literal.clone(),
                Source::Meta(meta) => meta.value(self.event_type, key, position, timestamp),
            }
        };
        let mut parts = KeyValues::new();
        for source in &self.key {
            match value(source) {
                Value::Null => return None,
                part => parts.push(part),
            }
        }
        let version = match self.version.as_ref().map(&mut value) {
            None | Some(Value::Null) => None,
            Some(Value::Int(version)) => Some(version),
            Some(Value::Time(time)) => Some(time.value),
            Some(_) => return None,
        };
        let mut fields = OpFields::with_capacity(self.fields.len());
        for (name, source) in &self.fields {
            let field = match self.kind {
                OpKind::Increment | OpKind::Decrement => delta(self.kind, name, value(source)).ok()?,
                _ => value(source),
            };
            fields.push((*name, field));
        }
        let kind = if self.kind == OpKind::Decrement { OpKind::Increment } else { self.kind };
        Some(WriteOp { key: parts, kind, fields, version, position })
    }
}
