//! Bulk requests and their responses (pure).
//!
//! The ops of a batch are grouped by document and source partition, in
//! order. Each group becomes one bulk action, guarded so that a replay or a
//! duplicate changes nothing:
//!
//! * a group that leaves a whole document whatever was stored (it ends in
//!   an upsert, or has an upsert or a delete followed by anything but a
//!   delete: its ops fold to a replacement), on a connector reading one
//!   topic with no domain version, is an `index` of the folded document
//!   with `version_type=external` and version = last offset + 1: a replay
//!   of any part of the group carries a version that is not higher than the
//!   stored one and gets a conflict (a duplicate, counted as done).
//!   Scripted updates raise a document's version by one per applied action,
//!   and each applied action covers at least one new offset, so a stored
//!   version never exceeds the last applied offset + 1;
//! * a group that ends in a delete, likewise, is a `delete` with an external version;
//! * anything else is a scripted update ([`SCRIPT`]) with `scripted_upsert`,
//!   whose steps carry their offsets: the script skips the steps at or below
//!   the position stored in the document (`kawka.pos["topic/partition"]`)
//!   and, when the connector names a domain version, the steps at or below
//!   the stored version (`kawka.v`): that also makes a duplicate event at a
//!   new offset change nothing. When no step applies the update is a noop:
//!   the document, its version and its sequence number stay as they were.
//!
//! Runs of set ops (upsert, merge, delete) within a group fold into one step
//! by the compaction rules: re-applying a folded run of set ops is
//! idempotent, so it is correct even when the stored position falls inside
//! the run. Increments are not idempotent and stay one step per event.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write as _;

use serde::Serialize;

use crate::error::{classify_http_status, ErrorClass};
use crate::projection::compact::{compact, Effect};
use crate::projection::OpKind;
use crate::projection::WriteOp;
use crate::value::{Name, Value};

/// Field of every document that holds kawka's guards; not indexed.
pub const GUARD_FIELD: &str = "kawka";

/// The Painless script of guarded updates. Written for value semantics
/// too (some ES-API servers copy maps on read): nested maps are written
/// back explicitly.
pub const SCRIPT: &str = "\
def kawka = ctx._source.kawka;
if (kawka == null) { kawka = new HashMap(); }
boolean missing = kawka.containsKey('missing');
kawka.remove('missing');
def pos = kawka.pos;
if (pos == null) { pos = new HashMap(); }
def applied = pos.containsKey(params.tp) ? pos[params.tp] : -1;
def version = kawka.v;
def last = applied;
boolean changed = false;
boolean del = false;
for (def step : params.steps) {
  if (step.o <= applied) { continue; }
  if (step.v != null && version != null && step.v <= version) { continue; }
  if (step.k == 'r') { ctx._source.clear(); ctx._source.putAll(step.f); del = false; }
  else if (step.k == 'm') { ctx._source.putAll(step.f); del = false; }
  else if (step.k == 'i') { for (def name : step.f.keySet()) { def cur = ctx._source[name]; ctx._source[name] = (cur == null ? 0 : cur) + step.f[name]; } del = false; }
  else if (step.k == 'd') { del = true; }
  if (step.v != null) { version = step.v; }
  last = step.o;
  changed = true;
}
if (!changed || (del && missing)) { ctx.op = 'noop'; }
else if (del) { ctx.op = 'delete'; }
else { pos[params.tp] = last; kawka.pos = pos; if (version != null) { kawka.v = version; } ctx._source.kawka = kawka; }";

/// How writes are guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardMode {
    /// Upserts and deletes use external versions (one topic, no domain version).
    ExternalVersions,
    /// Every write is a guarded script.
    Scripted,
}

/// One bulk action: its NDJSON lines and the ops it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub doc_id: String,
    /// Indexes of the ops (in the batch) this action applies.
    pub ops: Vec<usize>,
    /// Header line and (except for delete) body line, each ending in `\n`.
    pub lines: Vec<u8>,
}

/// The document id of a key: one part as text, several joined by `|`.
pub fn doc_id(key: &[Value]) -> Result<String, String> {
    let mut id = String::new();
    for (n, part) in key.iter().enumerate() {
        if n > 0 {
            id.push('|');
        }
        match part {
            Value::Null => return Err("the document id is null".into()),
            Value::Str(s) => id.push_str(s),
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => id.push_str(&part.to_string()),
            other => id.push_str(&other.to_json().to_string()),
        }
    }
    if id.is_empty() || id.len() > 512 {
        return Err(format!("a document id must be 1 to 512 bytes, this one is {}", id.len()));
    }
    Ok(id)
}

#[derive(Serialize)]
struct Step<'a> {
    o: i64,
    k: &'static str,
    f: FieldMap<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<i64>,
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

/// Builds the actions of a batch. Ops whose key is no document id are
/// returned apart with the reason.
pub fn plan(ops: &[WriteOp], index: &str, mode: GuardMode) -> (Vec<Action>, Vec<(usize, String)>) {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut by_group: HashMap<(String, Name, i32), usize> = HashMap::new();
    let mut rejected = Vec::new();
    for (at, op) in ops.iter().enumerate() {
        let id = match doc_id(&op.key) {
            Ok(id) => id,
            Err(message) => {
                rejected.push((at, message));
                continue;
            }
        };
        let group_key = (id.clone(), op.position.topic, op.position.partition);
        match by_group.get(&group_key) {
            Some(&group) => groups[group].1.push(at),
            None => {
                by_group.insert(group_key, groups.len());
                groups.push((id, vec![at]));
            }
        }
    }
    let actions = groups.into_iter().map(|(doc_id, members)| action(ops, index, mode, doc_id, members)).collect();
    (actions, rejected)
}

fn action(ops: &[WriteOp], index: &str, mode: GuardMode, doc_id: String, members: Vec<usize>) -> Action {
    let last = &ops[*members.last().expect("a group has at least one op")];
    let tp = format!("{}/{}", last.position.topic, last.position.partition);
    let mut lines = Vec::with_capacity(256);
    let version = last.position.offset + 1;
    let replaced = match mode {
        GuardMode::ExternalVersions => replacement(ops, &members),
        GuardMode::Scripted => None,
    };
    match (mode, last.kind, replaced) {
        (GuardMode::ExternalVersions, _, Some(fields)) => {
            let header = serde_json::json!({"index": {"_index": index, "_id": doc_id, "version": version, "version_type": "external"}});
            write_line(&mut lines, &header);
            let mut doc = serde_json::Map::new();
            for (name, value) in fields.iter() {
                doc.insert(name.to_string(), value.to_json());
            }
            doc.insert(GUARD_FIELD.into(), serde_json::json!({"pos": {tp: last.position.offset}}));
            write_line(&mut lines, &doc);
        }
        (GuardMode::ExternalVersions, OpKind::Delete, None) => {
            let header = serde_json::json!({"delete": {"_index": index, "_id": doc_id, "version": version, "version_type": "external"}});
            write_line(&mut lines, &header);
        }
        _ => {
            let header = serde_json::json!({"update": {"_index": index, "_id": doc_id}});
            write_line(&mut lines, &header);
            let steps = steps(ops, &members);
            let body = serde_json::json!({
                "script": {"source": SCRIPT, "lang": "painless", "params": {"tp": tp, "steps": steps}},
                "scripted_upsert": true,
                // Marks a document that did not exist: deleting it is a noop.
                "upsert": {GUARD_FIELD: {"missing": true}},
            });
            write_line(&mut lines, &body);
        }
    }
    Action { doc_id, ops: members, lines }
}

/// The whole document a group leaves, when it leaves one whatever was
/// there before (an upsert, or a delete, then anything but a delete): the
/// group is then one `index` at its last offset, applied whole or, on a
/// replay of any part of it, not at all.
fn replacement<'a>(ops: &'a [WriteOp], members: &[usize]) -> Option<Cow<'a, [(Name, Value)]>> {
    // What came before the last upsert or delete cannot show in the document.
    let from = members.iter().rposition(|&at| matches!(ops[at].kind, OpKind::Upsert | OpKind::Delete))?;
    match &members[from..] {
        [only] if ops[*only].kind == OpKind::Upsert => Some(Cow::Borrowed(&ops[*only].fields)),
        // A delete last is an external-version delete.
        [_] => None,
        tail => {
            let tail: Vec<WriteOp> = tail.iter().map(|&at| ops[at].clone()).collect();
            let (mut net, errors) = compact(&tail);
            match (errors.is_empty(), net.pop().map(|n| n.effect)) {
                (true, Some(Effect::Replace(fields))) => Some(Cow::Owned(fields.into_owned())),
                _ => None,
            }
        }
    }
}

/// The script steps of a group: runs of set ops folded, increments one by one.
fn steps(ops: &[WriteOp], members: &[usize]) -> Vec<serde_json::Value> {
    let mut steps = Vec::new();
    let mut run: Vec<WriteOp> = Vec::new();
    let flush = |run: &mut Vec<WriteOp>, steps: &mut Vec<serde_json::Value>| {
        if run.is_empty() {
            return;
        }
        let (net, _) = compact(run);
        let last = run.last().expect("run is not empty");
        let (o, v) = (last.position.offset, net[0].version);
        let step = match &net[0].effect {
            Effect::Replace(fields) => Step { o, k: "r", f: FieldMap(fields), v },
            Effect::Patch { set, .. } => Step { o, k: "m", f: FieldMap(set), v },
            Effect::Delete => Step { o, k: "d", f: FieldMap(&[]), v },
        };
        steps.push(serde_json::to_value(&step).unwrap_or(serde_json::Value::Null));
        run.clear();
    };
    for &at in members {
        let op = &ops[at];
        if matches!(op.kind, OpKind::Increment | OpKind::Decrement) {
            flush(&mut run, &mut steps);
            let step = Step { o: op.position.offset, k: "i", f: FieldMap(&op.fields), v: op.version };
            steps.push(serde_json::to_value(&step).unwrap_or(serde_json::Value::Null));
        } else {
            run.push(op.clone());
        }
    }
    flush(&mut run, &mut steps);
    steps
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
    /// Backpressure (429), a server error or a timeout: send it again.
    Retry(String),
    /// The document was refused (mapping or parsing): an error of its events.
    Reject(String),
}

/// Classifies one bulk item from its `status` and `error`.
pub fn classify_item(kind: &str, status: u16, error: Option<&serde_json::Value>) -> ItemOutcome {
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
        200..=299 => ItemOutcome::Applied,
        // Deleting what is not there: the effect holds.
        404 if kind == "delete" => ItemOutcome::Applied,
        409 => ItemOutcome::Duplicate,
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
            fields: fields.to_vec(),
            version: None,
            position: Position { topic: "users", partition, offset },
        }
    }

    fn lines(action: &Action) -> Vec<serde_json::Value> {
        std::str::from_utf8(&action.lines)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn an_upsert_last_is_an_external_version_index_with_the_position() {
        let ops = vec![
            op("u1", 0, 4, OpKind::Merge, &[("email", "old@x".into())]),
            op("u1", 0, 9, OpKind::Upsert, &[("name", "Ann".into())]),
        ];
        let (actions, rejected) = plan(&ops, "profiles", GuardMode::ExternalVersions);
        assert!(rejected.is_empty());
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].ops, vec![0, 1]);
        let lines = lines(&actions[0]);
        assert_eq!(
            lines[0],
            serde_json::json!({"index": {"_index": "profiles", "_id": "u1", "version": 10, "version_type": "external"}})
        );
        assert_eq!(lines[1], serde_json::json!({"name": "Ann", "kawka": {"pos": {"users/0": 9}}}));
        assert!(actions[0].lines.ends_with(b"\n"));
    }

    #[test]
    fn a_group_that_leaves_a_whole_document_is_one_index_at_its_last_offset() {
        let ops = vec![
            op("u1", 0, 4, OpKind::Upsert, &[("name", "Ann".into()), ("visits", Value::Int(1))]),
            op("u1", 0, 6, OpKind::Merge, &[("email", "ann@x".into())]),
            op("u1", 0, 7, OpKind::Increment, &[("visits", Value::Int(2))]),
            op("u2", 0, 5, OpKind::Delete, &[]),
            op("u2", 0, 8, OpKind::Merge, &[("name", "Bo".into())]),
            op("u3", 0, 9, OpKind::Merge, &[("name", "Cy".into())]),
            op("u3", 0, 10, OpKind::Increment, &[("visits", Value::Int(1))]),
        ];
        let (actions, _) = plan(&ops, "profiles", GuardMode::ExternalVersions);
        let u1 = lines(&actions[0]);
        assert_eq!(u1[0]["index"]["version"], 8, "version = last offset + 1");
        assert_eq!(
            u1[1],
            serde_json::json!({"name": "Ann", "visits": 3, "email": "ann@x", "kawka": {"pos": {"users/0": 7}}})
        );
        assert_eq!(lines(&actions[1])[1], serde_json::json!({"name": "Bo", "kawka": {"pos": {"users/0": 8}}}));
        assert!(
            lines(&actions[2])[0].get("update").is_some(),
            "without an upsert or delete it depends on the stored document"
        );
        let (scripted, _) = plan(&ops[..3], "profiles", GuardMode::Scripted);
        assert!(lines(&scripted[0])[0].get("update").is_some(), "domain versions: always the script");
    }

    #[test]
    fn deletes_last_are_external_version_deletes_and_scripted_mode_scripts_everything() {
        let ops = vec![op("u1", 0, 2, OpKind::Upsert, &[]), op("u1", 0, 3, OpKind::Delete, &[])];
        let (actions, _) = plan(&ops, "p", GuardMode::ExternalVersions);
        let lines_of = lines(&actions[0]);
        assert_eq!(lines_of.len(), 1);
        assert_eq!(lines_of[0]["delete"]["version"], 4);
        let (actions, _) = plan(&ops, "p", GuardMode::Scripted);
        let lines_of = lines(&actions[0]);
        assert_eq!(lines_of[0], serde_json::json!({"update": {"_index": "p", "_id": "u1"}}));
        assert_eq!(lines_of[1]["scripted_upsert"], true);
        assert_eq!(lines_of[1]["params"]["tp"], serde_json::Value::Null, "params live inside script");
        assert_eq!(lines_of[1]["script"]["params"]["tp"], "users/0");
        // upsert then delete folds into one delete step at the last offset
        assert_eq!(lines_of[1]["script"]["params"]["steps"], serde_json::json!([{"o": 3, "k": "d", "f": {}}]));
    }

    #[test]
    fn set_runs_fold_and_increments_keep_their_offsets() {
        let ops = vec![
            op("u1", 0, 1, OpKind::Upsert, &[("n", Value::Int(0)), ("a", "x".into())]),
            op("u1", 0, 2, OpKind::Merge, &[("a", "y".into())]),
            op("u1", 0, 3, OpKind::Increment, &[("n", Value::Int(2))]),
            op("u1", 0, 4, OpKind::Increment, &[("n", Value::Int(-1))]),
            op("u1", 0, 5, OpKind::Merge, &[("b", Value::Bool(true))]),
            op("u2", 1, 6, OpKind::Merge, &[("b", Value::Bool(false))]),
            op("u1", 1, 7, OpKind::Increment, &[("n", Value::Int(5))]),
        ];
        // Scripted: with external versions u1's first group is one `index`.
        let (actions, _) = plan(&ops, "p", GuardMode::Scripted);
        assert_eq!(
            actions.iter().map(|a| (a.doc_id.as_str(), a.ops.clone())).collect::<Vec<_>>(),
            vec![("u1", vec![0, 1, 2, 3, 4]), ("u2", vec![5]), ("u1", vec![6]),]
        );
        let first = lines(&actions[0]);
        assert_eq!(
            first[1]["script"]["params"]["steps"],
            serde_json::json!([
                {"o": 2, "k": "r", "f": {"n": 0, "a": "y"}},
                {"o": 3, "k": "i", "f": {"n": 2}},
                {"o": 4, "k": "i", "f": {"n": -1}},
                {"o": 5, "k": "m", "f": {"b": true}},
            ])
        );
        assert_eq!(lines(&actions[2])[1]["script"]["params"]["tp"], "users/1");
        assert!(SCRIPT.contains("step.o <= applied"));
    }

    #[test]
    fn composite_ids_join_and_null_ids_are_refused() {
        assert_eq!(doc_id(&[Value::from("a"), Value::Int(7)]), Ok("a|7".to_string()));
        let mut bad = op("x", 0, 0, OpKind::Upsert, &[]);
        bad.key = smallvec::smallvec![Value::Null];
        let (actions, rejected) = plan(&[bad], "p", GuardMode::Scripted);
        assert!(actions.is_empty());
        assert_eq!(rejected, vec![(0, "the document id is null".to_string())]);
    }

    #[test]
    fn every_status_class_of_an_item() {
        let mapping = serde_json::json!({"type": "mapper_parsing_exception", "reason": "failed to parse field [age]",
            "caused_by": {"type": "illegal_argument_exception", "reason": "For input string: \"x\""}});
        assert_eq!(classify_item("index", 201, None), ItemOutcome::Applied);
        assert_eq!(classify_item("update", 200, None), ItemOutcome::Applied);
        assert_eq!(classify_item("delete", 404, None), ItemOutcome::Applied);
        assert_eq!(classify_item("index", 409, None), ItemOutcome::Duplicate);
        assert!(matches!(classify_item("index", 429, None), ItemOutcome::Retry(_)));
        assert!(matches!(classify_item("index", 503, None), ItemOutcome::Retry(_)));
        assert!(matches!(classify_item("index", 408, None), ItemOutcome::Retry(_)));
        assert!(matches!(classify_item("index", 403, None), ItemOutcome::Retry(_)));
        match classify_item("index", 400, Some(&mapping)) {
            ItemOutcome::Reject(message) => {
                assert!(message.starts_with("mapper_parsing_exception: failed to parse field [age]"), "{message}");
                assert!(message.contains("For input string"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify_item("update", 404, None), ItemOutcome::Reject(_)), "update of a missing index");
    }
}
