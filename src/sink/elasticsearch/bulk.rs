//! Bulk requests and their responses (pure).
//!
//! A batch's ops are folded by [`crate::projection::fold::fold`], per
//! document and source partition; each net op becomes one bulk action,
//! guarded so that a replay, a duplicate or a stale event changes nothing:
//!
//! * a scripted update ([`SCRIPT`]) with `scripted_upsert`. The document
//!   keeps the last applied offset of each partition
//!   (`kawka.pos["topic/partition"]`) and, when the connector names a
//!   domain version, the highest applied version (`kawka.v`). The script
//!   follows [`crate::projection::fold::NetOp::against`]: when none of the
//!   net op's events was applied it applies the net effect
//!   (`params.whole`), otherwise each event's own effect (`params.steps`),
//!   skipping those at or below the stored offset or version. When nothing
//!   applies the update is a noop: the document, its version and its
//!   sequence number stay as they were. Guards per partition hold whatever
//!   partition a key's events are in (a key moved by added partitions, an
//!   id from an event field, a dead letter replayed at its original place).
//! * a net op that leaves a whole document is first sent as a `create` of
//!   it with the guards the script would store (what the script makes of a
//!   new document, at the cost of an `index`); when the document exists, or
//!   a tombstone says it was deleted, the update goes instead.
//! * a net op that deletes also records the document's guards in the
//!   tombstones' index ([`TOMBSTONE_SCRIPT`]): the sink reads them back
//!   into the update of a missing document.

use std::io::Write as _;

use serde::Serialize;

use crate::error::{classify_http_status, ErrorClass};
use crate::projection::fold::{fold, Effect, GroupBy, NetOp};
use crate::projection::{OpKind, WriteOp};
use crate::value::{Name, Value};

/// Field of every document that holds kawka's guards; not indexed.
pub const GUARD_FIELD: &str = "kawka";

/// The Painless script of guarded updates (see the module doc). Written
/// for value semantics too (some ES-API servers copy maps on read): nested
/// maps are written back explicitly. A delete clears the document, so what
/// follows it in the same update starts from nothing, as the fold says. A
/// document that is missing starts from its tombstone's guards
/// (`params._t`, put in by the sink when the document was deleted before).
pub const SCRIPT: &str = "\
def kawka = ctx._source.kawka;
if (kawka == null) { kawka = new HashMap(); }
boolean missing = kawka.containsKey('missing');
kawka.remove('missing');
def pos = kawka.pos;
if (pos == null) { pos = new HashMap(); }
def version = kawka.v;
if (missing && params._t != null) { for (def tp : params._t.pos.keySet()) { pos[tp] = params._t.pos[tp]; } version = params._t.v; }
def applied = pos.containsKey(params.tp) ? pos[params.tp] : -1;
def first = params.whole[0];
def todo = params.steps;
if (first.b > applied && (version == null || (first.w != null && first.w > version) || (first.w == null && first.v == null))) { todo = params.whole; }
def last = applied;
boolean changed = false;
boolean del = false;
for (def step : todo) {
  if (step.o <= applied) { continue; }
  if (step.v != null && version != null && step.v <= version) { continue; }
  if (step.k == 'r') { ctx._source.clear(); ctx._source.putAll(step.f); del = false; }
  else if (step.k == 'p') { ctx._source.putAll(step.f); for (def name : step.a.keySet()) { def cur = ctx._source[name]; ctx._source[name] = (cur == null ? 0 : cur) + step.a[name]; } del = false; }
  else if (step.k == 'd') { ctx._source.clear(); del = true; }
  if (step.v != null) { version = step.v; }
  last = step.o;
  changed = true;
}
if (!changed || (del && missing)) { ctx.op = 'noop'; }
else if (del) { ctx.op = 'delete'; }
else { pos[params.tp] = last; kawka.pos = pos; if (version != null) { kawka.v = version; } ctx._source.kawka = kawka; }";

/// One bulk action: its NDJSON lines and the ops it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub doc_id: String,
    /// Indexes of the ops (in the batch) this action applies.
    pub ops: Vec<usize>,
    /// Header line and (except for delete) body line, each ending in `\n`.
    pub lines: Vec<u8>,
    /// A scripted update's: where in `lines` the `null` of its tombstone
    /// parameter stands; a tombstone's: where the `null` of the live
    /// document's guards stands ([`Action::with_tombstone`]).
    pub tombstone_slot: Option<usize>,
    /// Whether it records a delete's tombstone (beside the delete; not an
    /// event's own write).
    pub records_tombstone: bool,
    /// For a `create` of a whole document: the guarded update sent
    /// instead when the document exists, or has a tombstone.
    pub otherwise: Option<Box<Action>>,
    /// An update's: where in `lines` the `""` stands that the script's text
    /// ([`script_json`]) replaces when the request is sent.
    pub script_slot: Option<usize>,
}

/// The document id of a key: one part as text, several joined by `|`, each
/// part's `\` and `|` escaped with a `\` so that two keys never share an id
/// (`("a|b", "c")` is `a\|b|c`, `("a", "b|c")` is `a|b\|c`). One part is
/// never escaped: ids of single-part keys are the part as it is.
pub fn doc_id(key: &[Value]) -> Result<String, String> {
    let mut id = String::new();
    let escape = key.len() > 1;
    for (n, part) in key.iter().enumerate() {
        if n > 0 {
            id.push('|');
        }
        let text = match part {
            Value::Null => return Err("the document id is null".into()),
            Value::Str(s) => std::borrow::Cow::Borrowed(s.as_str()),
            // A date/time as its ISO text (as in the document).
            Value::Int(_) | Value::Float(_) | Value::Bool(_) | Value::Time(_) => part.to_string().into(),
            other => other.to_json().to_string().into(),
        };
        if escape {
            for c in text.chars() {
                if matches!(c, '\\' | '|') {
                    id.push('\\');
                }
                id.push(c);
            }
        } else {
            id.push_str(&text);
        }
    }
    if id.is_empty() || id.len() > 512 {
        return Err(format!("a document id must be 1 to 512 bytes, this one is {}", id.len()));
    }
    Ok(id)
}

/// One step of a scripted update: an effect and where its events end.
#[derive(Serialize)]
struct Step<'a> {
    /// The last offset of its events.
    o: i64,
    /// The domain version of its last event.
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<i64>,
    /// For the whole net op only: its first offset and first version.
    #[serde(skip_serializing_if = "Option::is_none")]
    b: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    w: Option<i64>,
    /// `r` replace with `f`, `p` set `f` and add `a`, `d` delete.
    k: &'static str,
    f: FieldMap<'a>,
    a: FieldMap<'a>,
}

impl<'a> Step<'a> {
    fn new(effect: &'a Effect, o: i64, v: Option<i64>) -> Step<'a> {
        let none = FieldMap(&[]);
        let (k, f, a) = match effect {
            Effect::Replace(fields) => ("r", FieldMap(fields), none),
            Effect::Patch { set, add } => ("p", FieldMap(set), FieldMap(add)),
            Effect::Delete => ("d", none, FieldMap(&[])),
        };
        Step { o, v, b: None, w: None, k, f, a }
    }
}

/// Fields as a JSON object.
struct FieldMap<'a>(&'a [(Name, Value)]);

impl Serialize for FieldMap<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// The tombstone of a deleted document: its guards, kept in an index of
/// their own (a deleted document has no `kawka` field to keep them in):
/// the delete's own, and those the live document had (`params.live`, put
/// in by the sink, which reads them before the delete is sent), so that a
/// delete without a version, or of a document with events in several
/// partitions, forgets nothing.
pub const TOMBSTONE_SCRIPT: &str = "\
def pos = ctx._source.pos;
if (pos == null) { pos = new HashMap(); }
if (params.live != null) {
  if (params.live.pos != null) { for (def tp : params.live.pos.keySet()) { if (!pos.containsKey(tp) || pos[tp] < params.live.pos[tp]) { pos[tp] = params.live.pos[tp]; } } }
  if (params.live.v != null && (ctx._source.v == null || ctx._source.v < params.live.v)) { ctx._source.v = params.live.v; }
}
if (!pos.containsKey(params.tp) || pos[params.tp] < params.o) { pos[params.tp] = params.o; }
ctx._source.pos = pos;
if (params.v != null && (ctx._source.v == null || ctx._source.v < params.v)) { ctx._source.v = params.v; }
ctx._source.at = params.at;";

/// The body of a tombstone's update; `live` at a known place
/// ([`LIVE_SLOT`]).
#[derive(Serialize)]
struct TombstoneBody {
    script: TombstoneScript,
    scripted_upsert: bool,
    upsert: serde_json::Value,
}

#[derive(Serialize)]
struct TombstoneScript {
    params: TombstoneParams,
    source: &'static str,
    lang: &'static str,
}

#[derive(Serialize)]
struct TombstoneParams {
    /// Always `null` when planned: the sink puts the live document's
    /// guards in its place before sending.
    live: Option<()>,
    tp: String,
    o: i64,
    v: Option<i64>,
    at: i64,
}

/// Where the `null` of `live` stands in a tombstone body's line.
const LIVE_SLOT: usize = r#"{"script":{"params":{"live":"#.len();

/// The body of a scripted update. Its fields are written in this order,
/// so that the tombstone parameter (`_t`) stands at a known place: where
/// [`Action::tombstone_slot`] says.
#[derive(Serialize)]
struct UpdateBody<'a> {
    script: Script<'a>,
    scripted_upsert: bool,
    upsert: serde_json::Value,
}

#[derive(Serialize)]
struct Script<'a> {
    params: Params<'a>,
    lang: &'static str,
    /// Written as `""`: the script's text is put in when the request is
    /// sent ([`Action::script_slot`]), so that a batch's planned actions do
    /// not each hold a copy of it.
    source: &'static str,
}

/// What follows the script text's `""` in an update body's line.
const AFTER_SCRIPT: &str = r#"},"scripted_upsert":true,"upsert":{"kawka":{"missing":true}}}"#;

/// [`SCRIPT`] as a JSON string, as it goes into a request.
pub fn script_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| serde_json::Value::from(SCRIPT).to_string())
}

#[derive(Serialize)]
struct Params<'a> {
    /// Always `null` when planned: the sink puts a deleted document's
    /// tombstone in its place before sending.
    _t: Option<()>,
    tp: &'a str,
    whole: [Step<'a>; 1],
    steps: Vec<Step<'a>>,
}

/// Where the `null` of `_t` stands in an update body's line.
const TOMBSTONE_SLOT: usize = r#"{"script":{"params":{"_t":"#.len();

/// Where tombstones go: the index, and when the deletes were written
/// (milliseconds since the epoch, for their retention).
#[derive(Debug, Clone, Copy)]
pub struct Tombstones<'a> {
    pub index: &'a str,
    pub at_millis: i64,
}

/// Builds the actions of a batch from its net ops. `hashes` are the ops'
/// [`crate::projection::fold::key_hashes`] when the caller has them.
/// Ops that cannot be written (no document id, a fold error) are returned
/// apart with the reason. Each net op that deletes a document also
/// records its guards in `tombstones`. A whole document is tried as a
/// `create` first when `creates` (most of a batch's documents are new).
pub fn plan(ops: &[WriteOp], hashes: &[u64], index: &str, tombstones: Tombstones, creates: bool) -> Planned {
    let folded = fold(ops, hashes, GroupBy::KeyAndPartition);
    let mut rejected: Vec<(usize, String)> = folded.errors.iter().map(|error| (error.op, error.to_string())).collect();
    let mut actions = Vec::with_capacity(folded.net.len());
    for (net, members) in folded.net.iter().zip(folded.members_of_each()) {
        match doc_id(&net.key) {
            Ok(doc_id) => {
                // Any delete among its events may be where the document
                // ends (the others stale, or applied before): its guards
                // are kept. A tombstone of a document that exists is only
                // read once it is gone.
                let deletes =
                    matches!(net.effect, Effect::Delete) || members.iter().any(|&at| ops[at].kind == OpKind::Delete);
                let action = action(ops, index, doc_id, net, members, creates);
                let tombstone = deletes.then(|| tombstone(&action, net, tombstones));
                actions.push(action);
                actions.extend(tombstone);
            }
            Err(message) => rejected.extend(members.into_iter().map(|op| (op, message.clone()))),
        }
    }
    Planned { actions, rejected, stale: folded.stale }
}

/// A batch's bulk actions.
#[derive(Debug, Default)]
pub struct Planned {
    pub actions: Vec<Action>,
    /// Ops that cannot be written, with the reason.
    pub rejected: Vec<(usize, String)>,
    /// Ops the fold left out as stale: superseded.
    pub stale: Vec<usize>,
}

/// The action that records a delete's guards in the tombstones' index:
/// the highest offset of each partition and the highest version deleted.
fn tombstone(deleting: &Action, net: &NetOp, tombstones: Tombstones) -> Action {
    let (topic, partition) = net.partition.expect("ops grouped by partition have one");
    let mut lines = Vec::with_capacity(256);
    write_line(&mut lines, &serde_json::json!({"update": {"_index": tombstones.index, "_id": deleting.doc_id}}));
    let body = TombstoneBody {
        script: TombstoneScript {
            params: TombstoneParams {
                live: None,
                tp: format!("{topic}/{partition}"),
                o: net.last_offset,
                v: net.version,
                at: tombstones.at_millis,
            },
            source: TOMBSTONE_SCRIPT,
            lang: "painless",
        },
        scripted_upsert: true,
        upsert: serde_json::json!({}),
    };
    let body_starts = lines.len();
    write_line(&mut lines, &body);
    let slot = body_starts + LIVE_SLOT;
    debug_assert_eq!(lines.get(slot..slot + 4), Some(&b"null"[..]), "the live guards' slot");
    Action {
        doc_id: deleting.doc_id.clone(),
        ops: deleting.ops.clone(),
        lines,
        // For a tombstone: where the live document's guards go.
        tombstone_slot: Some(slot),
        records_tombstone: true,
        otherwise: None,
        script_slot: None,
    }
}

fn action(ops: &[WriteOp], index: &str, doc_id: String, net: &NetOp, members: Vec<usize>, creates: bool) -> Action {
    let (topic, partition) = net.partition.expect("ops grouped by partition have one");
    let tp = format!("{topic}/{partition}");
    let mut lines = Vec::with_capacity(256);
    write_line(&mut lines, &serde_json::json!({"update": {"_index": index, "_id": doc_id}}));
    let mut whole = Step::new(&net.effect, net.last_offset, net.version);
    (whole.b, whole.w) = (Some(net.first_offset), net.first_version);
    // One event: its effect is the net op's, and the script never needs it
    // apart.
    let effects: Vec<(Effect, &WriteOp)> = match members.as_slice() {
        [_] => Vec::new(),
        _ => members.iter().map(|&at| (Effect::of(ops[at].kind, &ops[at].fields), &ops[at])).collect(),
    };
    let steps: Vec<Step> =
        effects.iter().map(|(effect, op)| Step::new(effect, op.position.offset, op.version)).collect();
    let body = UpdateBody {
        script: Script { params: Params { _t: None, tp: &tp, whole: [whole], steps }, lang: "painless", source: "" },
        scripted_upsert: true,
        // Marks a document that did not exist: deleting it is a noop.
        upsert: serde_json::json!({GUARD_FIELD: {"missing": true}}),
    };
    let body_starts = lines.len();
    write_line(&mut lines, &body);
    let slot = body_starts + TOMBSTONE_SLOT;
    debug_assert_eq!(lines.get(slot..slot + 4), Some(&b"null"[..]), "the tombstone slot");
    // The line ends in `""` + AFTER_SCRIPT + `\n`.
    let script_slot = lines.len() - 1 - AFTER_SCRIPT.len() - 2;
    debug_assert_eq!(lines.get(script_slot..script_slot + 2), Some(&b"\"\""[..]), "the script slot");
    let update = Action {
        doc_id,
        ops: members,
        lines,
        tombstone_slot: Some(slot),
        records_tombstone: false,
        otherwise: None,
        script_slot: Some(script_slot),
    };
    match &net.effect {
        Effect::Replace(fields) if creates => create(index, &tp, fields, net, update),
        _ => update,
    }
}

/// A `create` of the document a net op replaces, with the guards the
/// script would store; `update` is sent instead when it exists.
fn create(index: &str, tp: &str, fields: &[(Name, Value)], net: &NetOp, update: Action) -> Action {
    let mut lines = Vec::with_capacity(update.lines.len());
    write_line(&mut lines, &serde_json::json!({"create": {"_index": index, "_id": update.doc_id}}));
    let mut doc = serde_json::Map::new();
    for (name, value) in fields {
        doc.insert(name.to_string(), value.to_json());
    }
    let mut guards = serde_json::json!({"pos": {tp: net.last_offset}});
    if let Some(version) = net.version {
        guards["v"] = serde_json::json!(version);
    }
    doc.insert(GUARD_FIELD.into(), guards);
    write_line(&mut lines, &doc);
    Action {
        doc_id: update.doc_id.clone(),
        ops: update.ops.clone(),
        lines,
        tombstone_slot: None,
        records_tombstone: false,
        otherwise: Some(Box::new(update)),
        script_slot: None,
    }
}

impl Action {
    /// The action's lines as they are sent: the script's text put in.
    pub fn write_to(&self, body: &mut Vec<u8>) {
        match self.script_slot {
            Some(slot) => {
                body.extend_from_slice(&self.lines[..slot]);
                body.extend_from_slice(script_json().as_bytes());
                body.extend_from_slice(&self.lines[slot + 2..]);
            }
            None => body.extend_from_slice(&self.lines),
        }
    }

    /// How many bytes [`Action::write_to`] writes.
    pub fn sent_len(&self) -> usize {
        self.lines.len() + self.script_slot.map_or(0, |_| script_json().len() - 2)
    }

    /// Puts a deleted document's tombstone (its `_source`: `pos`, `v`) in
    /// a scripted update, which then starts from those guards when the
    /// document is missing.
    pub fn with_tombstone(&self, tombstone: &serde_json::Value) -> Option<Action> {
        if let Some(update) = &self.otherwise {
            return update.with_tombstone(tombstone);
        }
        let slot = self.tombstone_slot?;
        let guards = serde_json::json!({"pos": tombstone.get("pos").cloned().unwrap_or_else(|| serde_json::json!({})),
            "v": tombstone.get("v").cloned().unwrap_or(serde_json::Value::Null)});
        let mut lines = Vec::with_capacity(self.lines.len() + 64);
        lines.extend_from_slice(&self.lines[..slot]);
        // Serializing a JSON value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut lines, &guards);
        let grown = lines.len() - slot;
        lines.extend_from_slice(&self.lines[slot + "null".len()..]);
        let script_slot = self.script_slot.map(|at| at + grown - "null".len());
        Some(Action { lines, script_slot, ..self.clone() })
    }
}

fn write_line(out: &mut Vec<u8>, value: &impl Serialize) {
    // Serializing JSON values and our own maps into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    let _ = out.write_all(b"\n");
}

/// What one bulk item's result means.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Applied,
    /// A guarded write that was applied before (a replay or a duplicate).
    Duplicate,
    /// A `create` whose document exists: its guarded update goes instead.
    Exists,
    /// Backpressure (429), a server error or a timeout: send it again.
    Retry(String),
    /// The index is write-blocked (`index.blocks.write`: a rebuild's
    /// cut-over, or an operator). Not the document's fault, but not sent
    /// again alone either: the cut-over moves the alias before it lifts the
    /// block, so this item would land in the new index while the batch's
    /// items sent before the block are in the old one only. The whole batch
    /// is written again instead (see `SinkError::WriteBlocked`).
    Blocked(String),
    /// The document was refused (mapping or parsing): an error of its events.
    Reject(String),
}

/// Classifies one bulk item (`kind`: its action; `item`: its result, with
/// `status`, `result` and `error`).
pub fn classify_item(kind: &str, item: &serde_json::Value) -> ItemOutcome {
    let status = item.get("status").and_then(serde_json::Value::as_u64).unwrap_or(500) as u16;
    let error = item.get("error");
    let describe = || match error {
        Some(error) => {
            let kind = error.get("type").and_then(|t| t.as_str()).unwrap_or("error");
            let reason = error.get("reason").and_then(|r| r.as_str()).unwrap_or("");
            let cause = error
                .get("caused_by")
                .and_then(|c| c.get("reason"))
                .and_then(|r| r.as_str())
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            format!("{kind}: {reason}{cause} [status {status}]")
        }
        None => format!("status {status}"),
    };
    match status {
        // A guarded update that found nothing to apply: every event of it
        // was applied before, or overtaken by newer ones (a dead letter
        // replayed late).
        200..=299 if kind == "update" && item.get("result").and_then(|r| r.as_str()) == Some("noop") => {
            ItemOutcome::Duplicate
        }
        200..=299 => ItemOutcome::Applied,
        // Deleting what is not there: the effect holds.
        404 if kind == "delete" => ItemOutcome::Applied,
        // An update's conflict is another writer's update landing between
        // its read and its write: nothing of it was applied, and it is sent
        // again (its guards then see what the other wrote). A create's
        // means the document exists: its update goes instead.
        409 if kind == "update" => ItemOutcome::Retry(format!("{} (another writer)", describe())),
        409 if kind == "create" => ItemOutcome::Exists,
        409 => ItemOutcome::Duplicate,
        403 if error.and_then(|e| e.get("type")).and_then(|t| t.as_str()) == Some("cluster_block_exception") => {
            ItemOutcome::Blocked(describe())
        }
        _ => match classify_http_status(status) {
            ErrorClass::Permanent => ItemOutcome::Reject(describe()),
            // Auth failures are not this document's fault: retried, reported.
            ErrorClass::Transient | ErrorClass::Config => ItemOutcome::Retry(describe()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    fn op(key: &str, partition: i32, offset: i64, kind: OpKind, fields: &[(Name, Value)]) -> WriteOp {
        WriteOp {
            key: smallvec::smallvec![Value::from(key)],
            kind,
            fields: fields.into(),
            version: None,
            position: Position { topic: "users", partition, offset },
        }
    }

    /// The guarded update of an action: itself, or the one sent instead of
    /// its create when the document exists.
    fn update_of(action: &Action) -> &Action {
        action.otherwise.as_deref().unwrap_or(action)
    }

    fn lines(action: &Action) -> Vec<serde_json::Value> {
        let mut sent = Vec::new();
        action.write_to(&mut sent);
        assert_eq!(sent.len(), action.sent_len());
        std::str::from_utf8(&sent)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    const TOMBSTONES: Tombstones<'static> = Tombstones { index: "p.kawka-deleted", at_millis: 1000 };

    #[test]
    fn a_whole_document_is_a_create_with_its_guards_and_the_update_for_when_it_exists() {
        let ops = vec![
            op("u1", 0, 4, OpKind::Upsert, &[("name", "Ann".into()), ("visits", Value::Int(1))]),
            op("u1", 0, 6, OpKind::Merge, &[("email", "ann@x".into())]),
            op("u1", 0, 7, OpKind::Increment, &[("visits", Value::Int(2))]),
            op("u2", 0, 5, OpKind::Delete, &[]),
            op("u2", 0, 8, OpKind::Merge, &[("name", "Bo".into())]),
            op("u3", 0, 9, OpKind::Merge, &[("name", "Cy".into())]),
            op("u3", 0, 10, OpKind::Increment, &[("visits", Value::Int(1))]),
        ];
        let Planned { actions, rejected, .. } = plan(&ops, &[], "profiles", TOMBSTONES, true);
        assert!(rejected.is_empty());
        assert_eq!(actions.len(), 4, "u1, u2 and its tombstone (it had a delete), u3");
        assert_eq!(actions[0].ops, vec![0, 1, 2]);
        assert_eq!(
            lines(&actions[0]),
            vec![
                serde_json::json!({"create": {"_index": "profiles", "_id": "u1"}}),
                serde_json::json!({"name": "Ann", "visits": 3, "email": "ann@x", "kawka": {"pos": {"users/0": 7}}}),
            ]
        );
        assert!(actions[0].lines.ends_with(b"\n"));
        let update = lines(update_of(&actions[0]));
        assert_eq!(update[0], serde_json::json!({"update": {"_index": "profiles", "_id": "u1"}}));
        assert_eq!(update[1]["scripted_upsert"], true);
        assert_eq!(lines(&actions[1])[0]["create"]["_id"], "u2", "a delete then a merge leaves a whole document");
        assert!(actions[2].records_tombstone, "the delete's guards are kept");
        assert!(
            lines(&actions[3])[0].get("update").is_some(),
            "without an upsert or delete it depends on the stored one"
        );
        // Most documents existed last time: no creates.
        let Planned { actions, .. } = plan(&ops, &[], "profiles", TOMBSTONES, false);
        assert!(actions.iter().all(|a| a.otherwise.is_none() && lines(a)[0].get("update").is_some()));
    }

    #[test]
    fn a_delete_is_a_scripted_update_beside_its_tombstone() {
        let ops = vec![op("u1", 0, 2, OpKind::Upsert, &[]), op("u1", 0, 3, OpKind::Delete, &[])];
        let Planned { actions, .. } = plan(&ops, &[], "p", TOMBSTONES, true);
        let lines_of = lines(&actions[0]);
        assert_eq!(lines_of[0], serde_json::json!({"update": {"_index": "p", "_id": "u1"}}));
        assert_eq!(lines_of[1]["scripted_upsert"], true);
        assert_eq!(lines_of[1]["params"]["tp"], serde_json::Value::Null, "params live inside script");
        let params = &lines_of[1]["script"]["params"];
        assert_eq!(params["tp"], "users/0");
        // upsert then delete folds into one delete at the last offset; each
        // event's own effect rides along for a replay from inside the run.
        assert_eq!(params["whole"], serde_json::json!([{"o": 3, "b": 2, "k": "d", "f": {}, "a": {}}]));
        assert_eq!(
            params["steps"],
            serde_json::json!([{"o": 2, "k": "r", "f": {}, "a": {}}, {"o": 3, "k": "d", "f": {}, "a": {}}])
        );
        assert!(actions[1].records_tombstone);
    }

    #[test]
    fn a_document_gets_its_net_op_whole_and_each_event_apart() {
        let ops = vec![
            op("u1", 0, 1, OpKind::Upsert, &[("n", Value::Int(0)), ("a", "x".into())]),
            op("u1", 0, 2, OpKind::Merge, &[("a", "y".into())]),
            op("u1", 0, 3, OpKind::Increment, &[("n", Value::Int(2))]),
            op("u1", 0, 4, OpKind::Increment, &[("n", Value::Int(-1))]),
            op("u1", 0, 5, OpKind::Merge, &[("b", Value::Bool(true))]),
            op("u2", 1, 6, OpKind::Merge, &[("b", Value::Bool(false))]),
            op("u1", 1, 7, OpKind::Increment, &[("n", Value::Int(5))]),
        ];
        let Planned { actions, .. } = plan(&ops, &[], "p", TOMBSTONES, true);
        assert_eq!(
            actions.iter().map(|a| (a.doc_id.as_str(), a.ops.clone())).collect::<Vec<_>>(),
            vec![("u1", vec![0, 1, 2, 3, 4]), ("u2", vec![5]), ("u1", vec![6]),]
        );
        let first = &lines(update_of(&actions[0]))[1]["script"]["params"];
        assert_eq!(
            first["whole"],
            serde_json::json!([{"o": 5, "b": 1, "k": "r", "f": {"n": 1, "a": "y", "b": true}, "a": {}}])
        );
        assert_eq!(first["steps"].as_array().map(Vec::len), Some(5));
        assert_eq!(first["steps"][2], serde_json::json!({"o": 3, "k": "p", "f": {}, "a": {"n": 2}}));
        let third = &lines(&actions[2])[1]["script"]["params"];
        assert_eq!(third["tp"], "users/1");
        assert_eq!(third["whole"], serde_json::json!([{"o": 7, "b": 7, "k": "p", "f": {}, "a": {"n": 5}}]));
        assert_eq!(third["steps"], serde_json::json!([]), "one event: its effect is the whole");
    }

    #[test]
    fn stale_versions_are_folded_out_but_sent_apart_with_their_versions() {
        // The issue's sequence: Registered(seq 1), PointsEarned(seq 2), a
        // duplicate Registered(seq 1), EmailChanged(seq 3).
        let mut ops = vec![
            op("u1", 0, 0, OpKind::Upsert, &[("name", "Ann".into()), ("points", Value::Int(0))]),
            op("u1", 0, 1, OpKind::Increment, &[("points", Value::Int(10))]),
            op("u1", 0, 2, OpKind::Upsert, &[("name", "Ann".into()), ("points", Value::Int(0))]),
            op("u1", 0, 3, OpKind::Merge, &[("email", "a@x".into())]),
        ];
        for (op, version) in ops.iter_mut().zip([1, 2, 1, 3]) {
            op.version = Some(version);
        }
        let Planned { actions, stale, .. } = plan(&ops, &[], "p", TOMBSTONES, true);
        assert_eq!(stale, vec![2], "the duplicate Registered(seq 1) is superseded");
        let create = lines(&actions[0]);
        assert_eq!(
            create[1]["kawka"],
            serde_json::json!({"pos": {"users/0": 3}, "v": 3}),
            "the guards the script keeps"
        );
        let params = &lines(update_of(&actions[0]))[1]["script"]["params"];
        assert_eq!(
            params["whole"],
            serde_json::json!([{"o": 3, "v": 3, "b": 0, "w": 1, "k": "r",
                "f": {"name": "Ann", "points": 10, "email": "a@x"}, "a": {}}])
        );
        assert_eq!(params["steps"][2]["v"], 1, "the duplicate keeps its version, for the script to skip");
    }

    #[test]
    fn a_delete_records_its_tombstone_and_a_tombstone_goes_into_the_update() {
        let mut ops = vec![op("u1", 0, 4, OpKind::Merge, &[("a", Value::Int(1))]), op("u1", 0, 5, OpKind::Delete, &[])];
        ops[1].version = Some(9);
        let Planned { actions, .. } = plan(&ops, &[], "p", TOMBSTONES, true);
        assert_eq!(actions.len(), 2);
        assert!(!actions[0].records_tombstone && actions[1].records_tombstone);
        let tombstone = lines(&actions[1]);
        assert_eq!(tombstone[0], serde_json::json!({"update": {"_index": "p.kawka-deleted", "_id": "u1"}}));
        assert_eq!(
            tombstone[1]["script"]["params"],
            serde_json::json!({"live": null, "tp": "users/0", "o": 5, "v": 9, "at": 1000})
        );
        // The live document's guards go into its tombstone before it is sent.
        let live = serde_json::json!({"pos": {"users/1": 40}, "v": 11});
        let with = actions[1].with_tombstone(&live).expect("a tombstone's slot");
        assert_eq!(lines(&with)[1]["script"]["params"]["live"], live);
        assert_eq!(lines(&with)[1]["script"]["params"]["o"], 5);
        assert_eq!(lines(&actions[0])[1]["script"]["params"]["_t"], serde_json::Value::Null);
        let stored = serde_json::json!({"pos": {"users/0": 7}, "v": 12, "at": 1});
        let with = actions[0].with_tombstone(&stored).expect("a scripted update");
        assert_eq!(lines(&with)[1]["script"]["params"]["_t"], serde_json::json!({"pos": {"users/0": 7}, "v": 12}));
        assert_eq!(lines(&with)[1]["script"]["params"]["whole"], lines(&actions[0])[1]["script"]["params"]["whole"]);
        // A create goes as its update when the document has a tombstone.
        let upsert = [op("u1", 0, 8, OpKind::Upsert, &[("a", Value::Int(2))])];
        let Planned { actions, .. } = plan(&upsert, &[], "p", TOMBSTONES, true);
        assert_eq!(actions.len(), 1, "without a delete, no tombstone");
        let with = actions[0].with_tombstone(&stored).expect("the create's update");
        assert!(lines(&with)[0].get("update").is_some());
        assert_eq!(lines(&with)[1]["script"]["params"]["_t"]["v"], 12);
    }

    #[test]
    fn composite_ids_join_and_null_ids_are_refused() {
        assert_eq!(doc_id(&[Value::from("a"), Value::Int(7)]), Ok("a|7".to_string()));
        let day = Value::Time(crate::value::Temporal::new(crate::value::TimeKind::Date, 19_697));
        assert_eq!(doc_id(&[day]), Ok("2023-12-06".to_string()), "a date key is its ISO text, unquoted");
        assert_eq!(doc_id(&[Value::from("a|b")]), Ok("a|b".to_string()), "one part: as it is");
        let ids = [
            doc_id(&[Value::from("a|b"), Value::from("c")]),
            doc_id(&[Value::from("a"), Value::from("b|c")]),
            doc_id(&[Value::from("a\\"), Value::from("|c")]),
            doc_id(&[Value::from("a\\|"), Value::from("c")]),
        ];
        assert_eq!(ids[0], Ok("a\\|b|c".to_string()));
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        let mut bad = op("x", 0, 0, OpKind::Upsert, &[]);
        bad.key = smallvec::smallvec![Value::Null];
        let Planned { actions, rejected, .. } = plan(&[bad], &[], "p", TOMBSTONES, true);
        assert!(actions.is_empty());
        assert_eq!(rejected, vec![(0, "the document id is null".to_string())]);
    }

    fn item(status: u16, error: Option<&serde_json::Value>) -> serde_json::Value {
        let mut item = serde_json::json!({"status": status});
        if let Some(error) = error {
            item["error"] = error.clone();
        }
        item
    }

    #[test]
    fn every_status_class_of_an_item() {
        let noop = serde_json::json!({"status": 200, "result": "noop"});
        assert_eq!(classify_item("update", &noop), ItemOutcome::Duplicate, "a guard applied nothing");
        let mapping = serde_json::json!({"type": "mapper_parsing_exception", "reason": "failed to parse field [age]",
            "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"x\""}});
        assert_eq!(classify_item("index", &item(201, None)), ItemOutcome::Applied);
        assert_eq!(classify_item("update", &item(200, None)), ItemOutcome::Applied);
        assert_eq!(classify_item("delete", &item(404, None)), ItemOutcome::Applied);
        assert_eq!(classify_item("index", &item(409, None)), ItemOutcome::Duplicate);
        assert_eq!(classify_item("delete", &item(409, None)), ItemOutcome::Duplicate);
        assert_eq!(classify_item("create", &item(409, None)), ItemOutcome::Exists);
        assert!(
            matches!(classify_item("update", &item(409, None)), ItemOutcome::Retry(_)),
            "a lost race is not applied"
        );
        assert!(matches!(classify_item("index", &item(429, None)), ItemOutcome::Retry(_)));
        assert!(matches!(classify_item("index", &item(503, None)), ItemOutcome::Retry(_)));
        assert!(matches!(classify_item("index", &item(408, None)), ItemOutcome::Retry(_)));
        assert!(matches!(classify_item("index", &item(403, None)), ItemOutcome::Retry(_)));
        let blocked = serde_json::json!({"type": "cluster_block_exception",
            "reason": "index [p-v1] blocked by: [FORBIDDEN/8/index write (api)];"});
        match classify_item("update", &item(403, Some(&blocked))) {
            ItemOutcome::Blocked(message) => assert!(message.contains("index write (api)"), "{message}"),
            other => panic!("a write block is the whole batch's: {other:?}"),
        }
        match classify_item("index", &item(400, Some(&mapping))) {
            ItemOutcome::Reject(message) => {
                assert!(message.starts_with("mapper_parsing_exception: failed to parse field [age]"), "{message}");
                assert!(message.contains("For input string"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(classify_item("update", &item(404, None)), ItemOutcome::Reject(_)),
            "update of a missing index"
        );
    }
}
