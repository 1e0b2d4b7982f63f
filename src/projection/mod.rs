//! Projections: what each event does to the read model.
//!
//! * [`expr`]: the expression language of connector files (pure).
//! * [`fold`]: the one fold: the ops of one key within a batch into one net op,
//!   and the rule a sink applies it by (pure); both sinks write what it folds.
//! * [`ProjectionSettings`]: what a [`RulesProjection`] is built from.
//! * [`Direct`]: a rule's op built straight from a record's decoded fields.
//!
//! A projection turns one current event into zero or more [`WriteOp`]s. The
//! connector files give [`RulesProjection`]; library users may implement
//! [`Projection`] in Rust instead.

mod direct;
pub mod expr;
pub mod fold;
mod settings;

use std::fmt;

use crate::event::{Event, Position};
use crate::value::{intern, name_position, Name, Value};
pub use direct::{Direct, OpShape};
use expr::{EvalError, Expr};
pub use settings::{EventRule, OpKind, OpTemplate, ProjectionSettings, TombstonePolicy, UnknownEventPolicy};

/// A key's values: inline for up to two parts (most keys: an id, or a
/// pair such as store and item), which saves an allocation per op and its
/// free when the batch settles.
pub type KeyValues = smallvec::SmallVec<[Value; 2]>;

/// An op's fields: inline for one (a counter's delta, a status), which
/// saves the allocation per op that the decode thread made and the worker
/// freed on another thread, glibc's slow path both ways (issue 27: about
/// 380 instructions per inventory record); more spill to the heap as a
/// `Vec` would.
pub type OpFields = smallvec::SmallVec<[(Name, Value); 1]>;

/// One change to one row or document of the read model.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOp {
    /// Values of the key parts, in the connector's key order.
    pub key: KeyValues,
    pub kind: OpKind,
    /// Target columns or document fields and their values. For
    /// `increment` the values are the deltas (`decrement` is already negated).
    pub fields: OpFields,
    /// The domain version of the event, when the connector names one.
    pub version: Option<i64>,
    /// The event it came from: ops of one key apply in this order.
    pub position: Position,
}

/// Why an event could not be projected: a permanent error of that event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProjectionError {
    #[error("key `{part}`: {error}")]
    Key { part: String, error: EvalError },
    #[error("key `{part}` is null")]
    NullKey { part: String },
    #[error("field `{field}`: {error}")]
    Field { field: String, error: EvalError },
    #[error("{kind} of `{field}` needs a number, found {found}")]
    NotANumber { kind: &'static str, field: String, found: String },
    #[error("version: {0}")]
    Version(EvalError),
    #[error("version must be an integer, found {0}")]
    VersionNotInteger(String),
    #[error("event type `{0}` has no rule in this connector")]
    UnknownEvent(String),
    #[error("a tombstone gives no key: {0}")]
    TombstoneKey(Box<ProjectionError>),
    #[error("{0}")]
    Custom(String),
}

/// What a projection did with one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Projected {
    Ops(Vec<WriteOp>),
    /// The connector has no rule for this event type and skips it (counted).
    Skipped,
}

/// What library users implement to project in Rust.
///
/// Called on the connector's decode thread, ahead of the writes, for
/// records that may then not be written (their key parked, their
/// partition moved): a projection should be a function of its event,
/// without effects of its own.
pub trait Projection: Send + Sync + fmt::Debug {
    /// The ops of one event, at the newest version of its type.
    fn project(&self, event: &Event) -> Result<Projected, ProjectionError>;

    /// The same, given the event to keep: its values may move into the ops
    /// rather than be copied (the pipeline has no use for an event once it
    /// is projected). The default borrows.
    fn project_owned(&self, event: Event) -> Result<Projected, ProjectionError> {
        self.project(&event)
    }

    /// The same, appending the ops to `ops` (the pipeline gathers a chunk
    /// of records' ops in one vector rather than one per event); `false`
    /// when skipped. On an error nothing is appended. The default goes
    /// through [`Projection::project_owned`].
    fn project_into(&self, event: Event, ops: &mut Vec<WriteOp>) -> Result<bool, ProjectionError> {
        match self.project_owned(event)? {
            Projected::Ops(mine) => {
                ops.extend(mine);
                Ok(true)
            }
            Projected::Skipped => Ok(false),
        }
    }

    /// The ops of a tombstone (a record with a null value) with this key.
    fn tombstone(&self, key: &Value, position: Position) -> Result<Projected, ProjectionError>;

    /// The top-level payload fields read of events of `event_type`, if the
    /// projection knows them: the pipeline then skips the others when it
    /// decodes (they are never built). `None` (the default): any.
    fn fields_read(&self, _event_type: Name) -> Option<Vec<Name>> {
        None
    }

    /// How the ops of events of `event_type` whose record has `fields`
    /// (top level, in order) are built straight from those fields, when
    /// the projection can say (events that reach it as decoded): the
    /// pipeline then decodes them into the op. `None` (the default): from
    /// the event, through [`Projection::project_into`].
    fn direct(&self, _event_type: Name, _fields: &[Name]) -> Option<Direct> {
        None
    }
}

/// The projection a connector file declares in `events:`.
#[derive(Debug, Clone)]
pub struct RulesProjection {
    key: Vec<(String, Expr)>,
    version: Option<Expr>,
    /// Looked up for every event, by its interned type name: a few
    /// pointer compares rather than hashing the name.
    rules: Vec<(Name, Rule)>,
    tombstones: TombstonePolicy,
    unknown_events: UnknownEventPolicy,
}

#[derive(Debug, Clone)]
struct Rule {
    kind: OpKind,
    fields: Vec<(Name, Expr)>,
    /// Aligned with `fields`: whether the field's value is an event field
    /// as it is, which an owned event moves into the op (no two moved
    /// fields overlap, so one never takes what another reads; every other
    /// expression is evaluated before anything moves).
    moved: Vec<bool>,
}

impl Rule {
    fn new(kind: OpKind, fields: Vec<(Name, Expr)>) -> Rule {
        let mut moved = vec![false; fields.len()];
        // Deltas are checked and negated as they are evaluated: never moved.
        if !matches!(kind, OpKind::Increment | OpKind::Decrement) {
            for index in 0..fields.len() {
                let Expr::Field(path) = &fields[index].1 else { continue };
                // `a` and `a.b` overlap: taking either changes the other.
                let overlaps = |other: &[Name]| other.iter().zip(path).all(|(x, y)| x == y);
                moved[index] = !(0..index).any(|earlier| moved[earlier] && overlaps(moved_path(&fields[earlier].1)));
            }
        }
        Rule { kind, fields, moved }
    }

    /// The moved fields: index into the op's fields, and the event path.
    fn moves(&self) -> impl Iterator<Item = (usize, &[Name])> {
        self.fields
            .iter()
            .enumerate()
            .filter(|(index, _)| self.moved[*index])
            .map(|(index, (_, expr))| (index, moved_path(expr)))
    }
}

/// The path of a moved field's expression (always a plain field).
fn moved_path(expr: &Expr) -> &[Name] {
    match expr {
        Expr::Field(path) => path,
        _ => &[],
    }
}

impl RulesProjection {
    pub fn new(settings: &ProjectionSettings) -> RulesProjection {
        let mut rules: Vec<(Name, Rule)> = Vec::with_capacity(settings.events.len());
        for rule in &settings.events {
            let fields = rule.op.fields.iter().map(|(name, expr)| (intern(name), expr.clone())).collect();
            let (event_type, rule) = (intern(&rule.event_type), Rule::new(rule.op.kind, fields));
            // A type listed twice (refused in connector files): the later rule.
            match name_position(&rules, event_type) {
                Some(index) => rules[index].1 = rule,
                None => rules.push((event_type, rule)),
            }
        }
        RulesProjection {
            key: settings.key.clone(),
            version: settings.version.clone(),
            rules,
            tombstones: settings.tombstones,
            unknown_events: settings.unknown_events,
        }
    }

    fn rule(&self, event_type: &str) -> Option<&Rule> {
        name_position(&self.rules, event_type).map(|index| &self.rules[index].1)
    }

    fn key(&self, event: &Event) -> Result<KeyValues, ProjectionError> {
        // A loop, not a collect into a `Result`: this runs for every event,
        // and the adapters a collect goes through cost more than the key.
        let mut key = KeyValues::new();
        for (part, expr) in &self.key {
            match expr.eval(event) {
                Ok(Value::Null) => return Err(ProjectionError::NullKey { part: part.clone() }),
                Ok(value) => key.push(value),
                Err(error) => return Err(ProjectionError::Key { part: part.clone(), error }),
            }
        }
        Ok(key)
    }
}

impl RulesProjection {
    /// The op of `event`, but for the fields its rule moves, which are left
    /// null (checked to exist): the caller fills them, by copy or by move.
    fn op_but_moves<'r>(&'r self, event: &Event) -> Result<Option<(&'r Rule, WriteOp)>, ProjectionError> {
        let Some(rule) = self.rule(event.event_type) else {
            return match self.unknown_events {
                UnknownEventPolicy::Skip => Ok(None),
                UnknownEventPolicy::Error => Err(ProjectionError::UnknownEvent(event.event_type.to_string())),
            };
        };
        let key = self.key(event)?;
        let version = match &self.version {
            None => None,
            Some(expr) => match expr.eval(event).map_err(ProjectionError::Version)? {
                Value::Int(version) => Some(version),
                // A timestamp as the version: its integer, in its unit.
                Value::Time(time) => Some(time.value),
                Value::Null => None,
                other => return Err(ProjectionError::VersionNotInteger(other.kind().to_string())),
            },
        };
        let mut fields = OpFields::with_capacity(rule.fields.len());
        for ((name, expr), &moved) in rule.fields.iter().zip(&rule.moved) {
            let field_error = |error| ProjectionError::Field { field: name.to_string(), error };
            if moved {
                let path = moved_path(expr);
                if event.payload.path(path).is_none() {
                    return Err(field_error(EvalError::MissingField(path.join("."))));
                }
                fields.push((*name, Value::Null));
                continue;
            }
            let value = expr.eval(event).map_err(field_error)?;
            let value = match rule.kind {
                OpKind::Increment | OpKind::Decrement => delta(rule.kind, name, value)?,
                _ => value,
            };
            fields.push((*name, value));
        }
        let kind = if rule.kind == OpKind::Decrement { OpKind::Increment } else { rule.kind };
        Ok(Some((rule, WriteOp { key, kind, fields, version, position: event.position })))
    }
}

impl RulesProjection {
    /// The op of an event that is spent: the values moved, not copied.
    fn op_owned(&self, mut event: Event) -> Result<Option<WriteOp>, ProjectionError> {
        let Some((rule, mut op)) = self.op_but_moves(&event)? else { return Ok(None) };
        for (index, path) in rule.moves() {
            op.fields[index].1 = event.payload.path_mut(path).map(std::mem::take).unwrap_or_default();
        }
        Ok(Some(op))
    }
}

impl Projection for RulesProjection {
    fn project(&self, event: &Event) -> Result<Projected, ProjectionError> {
        let Some((rule, mut op)) = self.op_but_moves(event)? else { return Ok(Projected::Skipped) };
        for (index, path) in rule.moves() {
            // Checked to exist by `op_but_moves`.
            op.fields[index].1 = event.payload.path(path).cloned().unwrap_or_default();
        }
        Ok(Projected::Ops(vec![op]))
    }

    fn project_owned(&self, event: Event) -> Result<Projected, ProjectionError> {
        Ok(self.op_owned(event)?.map_or(Projected::Skipped, |op| Projected::Ops(vec![op])))
    }

    fn project_into(&self, event: Event, ops: &mut Vec<WriteOp>) -> Result<bool, ProjectionError> {
        let op = self.op_owned(event)?;
        Ok(op.map(|op| ops.push(op)).is_some())
    }

    fn fields_read(&self, event_type: Name) -> Option<Vec<Name>> {
        // An event without a rule is skipped or refused: nothing of it is read.
        let Some(rule) = self.rule(event_type) else { return Some(Vec::new()) };
        let exprs =
            self.key.iter().map(|(_, expr)| expr).chain(&self.version).chain(rule.fields.iter().map(|(_, e)| e));
        let mut read: Vec<Name> = exprs.flat_map(Expr::fields).filter_map(|path| path.first().copied()).collect();
        read.sort_unstable();
        read.dedup();
        Some(read)
    }

    fn direct(&self, event_type: Name, fields: &[Name]) -> Option<Direct> {
        Direct::new(self, event_type, fields)
    }

    fn tombstone(&self, key: &Value, position: Position) -> Result<Projected, ProjectionError> {
        if self.tombstones == TombstonePolicy::Ignore {
            return Ok(Projected::Skipped);
        }
        // Key expressions run against an event with an empty payload: `$key`
        // keys work, keys taken from payload fields cannot.
        let event = Event {
            event_type: "",
            version: 0,
            payload: Value::Record(Default::default()),
            key: key.clone(),
            position,
            timestamp: None,
        };
        let key = self.key(&event).map_err(|error| ProjectionError::TombstoneKey(Box::new(error)))?;
        Ok(Projected::Ops(vec![WriteOp {
            key,
            kind: OpKind::Delete,
            fields: OpFields::new(),
            version: None,
            position,
        }]))
    }
}

/// The signed delta of an increment (`decrement` negates).
fn delta(kind: OpKind, field: &str, value: Value) -> Result<Value, ProjectionError> {
    let negate = kind == OpKind::Decrement;
    match value {
        Value::Int(i) if negate => i.checked_neg().map(Value::Int).ok_or_else(|| ProjectionError::NotANumber {
            kind: kind.name(),
            field: field.to_string(),
            found: "an integer too large to negate".to_string(),
        }),
        Value::Float(x) if negate => Ok(Value::Float(-x)),
        value @ (Value::Int(_) | Value::Float(_)) => Ok(value),
        other => Err(ProjectionError::NotANumber {
            kind: kind.name(),
            field: field.to_string(),
            found: format!("a {}", other.kind()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{Kinds, Record};

    /// (event type, op, [(field, expression)])
    type RuleSpec<'a> = (&'a str, OpKind, &'a [(&'a str, &'a str)]);

    fn connector(key: &[(&str, &str)], rules: &[RuleSpec]) -> ProjectionSettings {
        ProjectionSettings {
            key: key.iter().map(|(n, e)| (n.to_string(), expr::parse(e).expect("test key parses"))).collect(),
            version: None,
            tombstones: TombstonePolicy::Delete,
            unknown_events: UnknownEventPolicy::Skip,
            events: rules
                .iter()
                .map(|(event_type, kind, fields)| EventRule {
                    event_type: event_type.to_string(),
                    op: OpTemplate {
                        kind: *kind,
                        fields: fields
                            .iter()
                            .map(|(n, e)| (n.to_string(), expr::parse(e).expect("test field parses")))
                            .collect(),
                    },
                })
                .collect(),
        }
    }

    fn event(event_type: &'static str, fields: &[(&str, Value)]) -> Event {
        Event {
            event_type,
            version: 1,
            payload: Value::Record(fields.iter().map(|(n, v)| (intern(n), v.clone())).collect::<Record>()),
            key: Value::Str("k1".into()),
            position: Position { topic: "t", partition: 0, offset: 7 },
            timestamp: Some(1000),
        }
    }

    /// Rules are looked up by pointer first: a type name that is not the
    /// interned one (a Rust upcaster's literal) still finds its rule, and
    /// of a type listed twice the later rule holds, as it did in a map.
    #[test]
    fn a_rule_is_found_by_its_type_interned_or_not_and_the_later_of_two_holds() {
        let projection = RulesProjection::new(&connector(
            &[("id", "id")],
            &[
                ("Sold", OpKind::Upsert, &[("n", "a")]),
                ("Other", OpKind::Upsert, &[("n", "a")]),
                ("Sold", OpKind::Upsert, &[("n", "b")]),
            ],
        ));
        let fields = [("id", Value::Int(1)), ("a", Value::Int(10)), ("b", Value::Int(20))];
        let literal: &'static str = "Sold";
        assert!(!std::ptr::eq(literal, intern("Sold")), "the literal is not the interned name");
        for event_type in [intern("Sold"), literal] {
            let Projected::Ops(ops) = projection.project(&event(event_type, &fields)).expect("projects") else {
                panic!("{event_type} has a rule")
            };
            assert_eq!(ops[0].fields.as_slice(), [("n", Value::Int(20))], "the later rule");
        }
        assert_eq!(projection.project(&event("Nope", &fields)), Ok(Projected::Skipped));
        assert_eq!(projection.fields_read(intern("Sold")), Some(vec!["b", "id"]));
    }

    /// A rule's op built straight from the fields ([`Direct`]) is the op
    /// of the event's own path, and nothing exactly where that path fails;
    /// whatever the values (nulls, wrong kinds, shared fields,
    /// literals, metadata, versions), over random events of every kind of
    /// rule, with and without a version; the record's key given only to
    /// plans that read it, as the decoder gives it.
    #[test]
    fn a_direct_op_is_the_events_op_or_none_where_that_fails() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = std::env::var("KAWKA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        eprintln!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let writer: Vec<Name> = ["store", "item", "qty", "name", "seq", "unread"].into_iter().map(intern).collect();
        let rules: &[RuleSpec] = &[
            ("Inc", OpKind::Increment, &[("n", "qty")]),
            ("Dec", OpKind::Decrement, &[("n", "qty"), ("m", "seq")]),
            (
                "Up",
                OpKind::Upsert,
                &[("name", "name"), ("again", "name"), ("s", "store"), ("lit", "'x'"), ("t", "$topic")],
            ),
            ("Merge", OpKind::Merge, &[("name", "name"), ("at", "$offset"), ("k", "$key")]),
            ("Del", OpKind::Delete, &[]),
            ("Nested", OpKind::Upsert, &[("c", "name.city")]),
            ("Called", OpKind::Upsert, &[("c", "lower(name)")]),
            ("Absent", OpKind::Upsert, &[("c", "nowhere")]),
        ];
        let keys: [&[(&str, &str)]; 3] =
            [&[("store", "store"), ("item", "item")], &[("id", "$key")], &[("s", "store")]];
        let values = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..9) {
            0 => Value::Null,
            1 => Value::Str("".into()),
            2 | 3 => Value::Str(format!("v{}", rng.random_range(0..5)).into()),
            4 | 5 => Value::Int(rng.random_range(-3..4)),
            6 => Value::Int(i64::MIN),
            7 => Value::Float(1.5),
            _ => Value::Bool(true),
        };
        let (mut direct, mut both, mut keyless, mut exact) = (0, 0, 0, 0);
        for round in 0..400 {
            let mut settings = connector(keys[round % keys.len()], rules);
            if round % 2 == 1 {
                settings.version = Some(expr::parse("seq").expect("parses"));
            }
            let projection = RulesProjection::new(&settings);
            let (event_type, _, _) = rules[rng.random_range(0..rules.len())];
            let Some(plan) = projection.direct(intern(event_type), &writer) else {
                assert!(
                    ["Nested", "Called", "Absent"].contains(&event_type),
                    "{event_type}: plain fields, literals and metadata have a plan"
                );
                continue;
            };
            let fields: Vec<(&str, Value)> = writer.iter().map(|name| (*name, values(&mut rng))).collect();
            let mut event = event(intern(event_type), &fields);
            event.key = values(&mut rng);
            // The slots as the decoder fills them: each field read, in its slot.
            let mut slots = vec![Value::Str("stale".into()); plan.slots() + 2];
            for (at, slot) in plan.slot_of().iter().enumerate() {
                if let Some(slot) = slot {
                    slots[*slot] = fields[at].1.clone();
                }
            }
            // The key as the decoder gives it: built only when the plan reads it.
            let key = if plan.reads_key() { event.key.clone() } else { Value::Null };
            keyless += usize::from(!plan.reads_key());
            let straight = plan.op(&mut slots, &key, event.position, event.timestamp);
            // Its values are of the kinds its shape says, given this
            // record's (a field's kind as the writer schema would say it).
            let kinds: Vec<Kinds> = fields.iter().map(|(_, value)| Kinds::of(value)).collect();
            if let Some(op) = &straight {
                let shape = plan.shape(&kinds);
                assert_eq!((shape.key.len(), shape.fields.len()), (op.key.len(), op.fields.len()));
                for (part, kinds) in op.key.iter().zip(&shape.key) {
                    assert!(Kinds::of(part).within(*kinds), "key {part:?} not among {kinds:?} (seed {seed})");
                }
                for ((name, value), (shaped, kinds)) in op.fields.iter().zip(&shape.fields) {
                    assert_eq!(name, shaped);
                    assert!(Kinds::of(value).within(*kinds), "{name}: {value:?} not among {kinds:?} (seed {seed})");
                    exact += usize::from(*kinds != Kinds::ANY);
                }
            }
            let whole = projection.op_owned(event.clone());
            match (&straight, whole) {
                (Some(op), Ok(Some(expected))) => {
                    assert_eq!(op, &expected, "round {round} (seed {seed}): {event:?}");
                    both += 1;
                }
                (None, Err(_)) => {}
                (None, Ok(op)) => panic!("round {round} (seed {seed}): no direct op where the event gives {op:?}"),
                (Some(op), other) => panic!("round {round} (seed {seed}): {op:?} where the event gives {other:?}"),
            }
            direct += 1;
        }
        assert!(both > 40, "many rounds with a plan give an op both ways ({both} of {direct})");
        assert!(direct < 400, "some rules have no plan");
        assert!(keyless > 40 && keyless < direct - 40, "plans with and without `$key` ({keyless} of {direct} without)");
        assert!(exact > 100, "fields of a known kind ({exact})");
    }

    #[test]
    fn decrement_becomes_a_negative_increment_with_a_composite_key() {
        let projection = RulesProjection::new(&connector(
            &[("store_id", "store_id"), ("item_id", "item_id")],
            &[("Sold", OpKind::Decrement, &[("on_hand", "quantity")])],
        ));
        let sold = event("Sold", &[("store_id", "s1".into()), ("item_id", "i1".into()), ("quantity", Value::Int(3))]);
        let Projected::Ops(ops) = projection.project(&sold).expect("projects") else { panic!("skipped") };
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].key[..], [Value::from("s1"), Value::from("i1")]);
        assert_eq!(ops[0].kind, OpKind::Increment);
        assert_eq!(ops[0].fields.as_slice(), [("on_hand", Value::Int(-3))]);
    }

    #[test]
    fn an_event_cut_to_the_fields_read_projects_as_the_whole_event() {
        let mut settings = connector(
            &[("store_id", "store_id"), ("day", "$topic")],
            &[
                ("Sold", OpKind::Upsert, &[("who", "lower(buyer.name)"), ("n", "coalesce(quantity, 0)")]),
                ("Counted", OpKind::Increment, &[("n", "quantity")]),
            ],
        );
        settings.version = Some(expr::parse("revision").expect("parses"));
        let projection = RulesProjection::new(&settings);
        assert_eq!(projection.fields_read("Sold"), Some(vec!["buyer", "quantity", "revision", "store_id"]));
        assert_eq!(projection.fields_read("Counted"), Some(vec!["quantity", "revision", "store_id"]));
        assert_eq!(projection.fields_read("Other"), Some(vec![]));
        let buyer =
            Value::Record([(intern("name"), Value::from("ADA")), (intern("age"), Value::Int(3))].into_iter().collect());
        let whole = [
            ("store_id", Value::from("s1")),
            ("supplier", Value::from("acme")),
            ("buyer", buyer),
            ("quantity", Value::Int(4)),
            ("revision", Value::Int(9)),
            ("note", Value::Null),
        ];
        for event_type in ["Sold", "Counted", "Other"] {
            let read = projection.fields_read(event_type).expect("a rules projection knows what it reads");
            let cut: Vec<(&str, Value)> = whole.iter().filter(|(n, _)| read.contains(n)).cloned().collect();
            assert_eq!(
                projection.project(&event(event_type, &cut)),
                projection.project(&event(event_type, &whole)),
                "{event_type}"
            );
        }
    }

    #[test]
    fn unknown_events_are_skipped_or_errors_and_bad_values_are_errors() {
        let mut settings = connector(&[("id", "$key")], &[("Known", OpKind::Increment, &[("n", "quantity")])]);
        let projection = RulesProjection::new(&settings);
        assert_eq!(projection.project(&event("Other", &[])), Ok(Projected::Skipped));
        let text = event("Known", &[("quantity", "many".into())]);
        assert!(matches!(projection.project(&text), Err(ProjectionError::NotANumber { .. })));
        let missing = event("Known", &[]);
        assert!(matches!(projection.project(&missing), Err(ProjectionError::Field { .. })));
        settings.unknown_events = UnknownEventPolicy::Error;
        let strict = RulesProjection::new(&settings);
        assert!(matches!(strict.project(&event("Other", &[])), Err(ProjectionError::UnknownEvent(_))));
    }

    #[test]
    fn an_owned_event_moves_its_values_and_projects_as_a_borrowed_one() {
        let projection = RulesProjection::new(&connector(
            &[("id", "id")],
            &[(
                "Placed",
                OpKind::Upsert,
                // `id` is the key and a field; `name` twice; `address` and
                // `address.zip` overlap; `upper(name)` reads a moved field.
                &[
                    ("id", "id"),
                    ("name", "name"),
                    ("again", "name"),
                    ("address", "address"),
                    ("zip", "address.zip"),
                    ("shout", "upper(name)"),
                ],
            )],
        ));
        let address: Record = [(intern("zip"), Value::from("12345"))].into_iter().collect();
        let placed = event(
            "Placed",
            &[("id", "p1".into()), ("name", "ada".into()), ("address", Value::Record(address.clone()))],
        );
        let borrowed = projection.project(&placed).expect("projects");
        let owned = projection.project_owned(placed.clone()).expect("projects");
        assert_eq!(owned, borrowed);
        let Projected::Ops(ops) = owned else { panic!("skipped") };
        assert_eq!(ops[0].key[..], [Value::from("p1")]);
        assert_eq!(
            ops[0].fields.to_vec(),
            vec![
                ("id", Value::from("p1")),
                ("name", Value::from("ada")),
                ("again", Value::from("ada")),
                ("address", Value::Record(address)),
                ("zip", Value::from("12345")),
                ("shout", Value::from("ADA")),
            ]
        );
        // A field that a moved value would come from must still exist.
        let missing = event("Placed", &[("id", "p1".into()), ("address", Value::Null)]);
        assert!(matches!(projection.project_owned(missing), Err(ProjectionError::Field { .. })));
    }

    #[test]
    fn tombstones_delete_by_key_or_fail_without_one() {
        let position = Position { topic: "t", partition: 0, offset: 1 };
        let by_key = RulesProjection::new(&connector(&[("_id", "$key")], &[]));
        let Projected::Ops(ops) = by_key.tombstone(&Value::from("u1"), position).expect("deletes") else {
            panic!("skipped")
        };
        assert_eq!(ops[0].kind, OpKind::Delete);
        assert_eq!(ops[0].key[..], [Value::from("u1")]);
        assert!(matches!(by_key.tombstone(&Value::Null, position), Err(ProjectionError::TombstoneKey(_))));
        let by_field = RulesProjection::new(&connector(&[("store_id", "store_id")], &[]));
        assert!(by_field.tombstone(&Value::from("x"), position).is_err());
    }
}
