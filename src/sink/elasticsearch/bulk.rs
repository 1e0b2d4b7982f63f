//! Bulk requests and their responses (pure).
//!
//! A batch's ops are folded by [`crate::projection::fold::fold`], per
//! document and source partition; each net op becomes one bulk action,
//! guarded so that a replay or a duplicate changes nothing:
//!
//! * with [`GuardMode::ExternalVersions`], a net op that replaces the whole
//!   document is an `index` with `version_type=external` and version = its
//!   last offset + 1, and one that deletes it a `delete` likewise: a replay
//!   carries a version that is not higher than the stored one and gets a
//!   conflict (already applied);
//! * anything else is a scripted update ([`SCRIPT`]) with `scripted_upsert`.
//!   The document keeps the last applied offset of each partition
//!   (`kawka.pos["topic/partition"]`) and, when the connector names a domain
//!   version, the highest applied version (`kawka.v`). The script follows
//!   [`crate::projection::fold::NetOp::against`]: when none of the net
//!   op's events was applied it applies the net effect (`params.whole`),
//!   otherwise each event's own effect (`params.steps`), skipping those at
//!   or below the stored offset or version. When nothing applies the
//!   update is a noop: the document, its version and its sequence number
//!   stay as they were.

use std::io::Write as _;

use serde::Serialize;

use crate::error::{classify_http_status, ErrorClass};
use crate::projection::fold::{fold, Effect, GroupBy, NetOp};
use crate::projection::WriteOp;
use crate::value::{Name, Value};

/// Field of every document that holds kawka's guards; not indexed.
pub const GUARD_FIELD: &str = "kawka";

/// The Painless script of guarded updates (see the module doc). Written
/// for value semantics too (some ES-API servers copy maps on read): nested
/// maps are written back explicitly. A delete clears the document, so what
/// follows it in the same update starts from nothing, as the fold says.
pub const SCRIPT: &str = "\
def kawka = ctx._source.kawka;
if (kawka == null) { kawka = new HashMap(); }
boolean missing = kawka.containsKey('missing');
kawka.remove('missing');
def pos = kawka.pos;
if (pos == null) { pos = new HashMap(); }
def applied = pos.containsKey(params.tp) ? pos[params.tp] : -1;
def version = kawka.v;
def first = params.whole[0];
def todo = params.steps;
if (first.b > applied && (first.w == null || version == null || first.w > version)) { todo = params.whole; }
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
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => part.to_string().into(),
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

/// Builds the actions of a batch from its net ops. `hashes` are the ops'
/// [`crate::projection::fold::key_hashes`] when the caller has them.
/// Ops that cannot be written (no document id, a fold error) are returned
/// apart with the reason.
pub fn plan(ops: &[WriteOp], hashes: &[u64], index: &str, mode: GuardMode) -> (Vec<Action>, Vec<(usize, String)>) {
    let folded = fold(ops, hashes, GroupBy::KeyAndPartition);
    let mut rejected: Vec<(usize, String)> = folded.errors.iter().map(|error| (error.op, error.to_string())).collect();
    let mut actions = Vec::with_capacity(folded.net.len());
    for (net, members) in folded.net.iter().zip(folded.members_of_each()) {
        match doc_id(&net.key) {
            Ok(doc_id) => actions.push(action(ops, index, mode, doc_id, net, members)),
            Err(message) => rejected.extend(members.into_iter().map(|op| (op, message.clone()))),
        }
    }
    (actions, rejected)
}

fn action(ops: &[WriteOp], index: &str, mode: GuardMode, doc_id: String, net: &NetOp, members: Vec<usize>) -> Action {
    let (topic, partition) = net.partition.expect("ops grouped by partition have one");
    let tp = format!("{topic}/{partition}");
    let mut lines = Vec::with_capacity(256);
    let version = net.last_offset + 1;
    match (mode, &net.effect) {
        (GuardMode::ExternalVersions, Effect::Replace(fields)) => {
            let header = serde_json::json!({"index": {"_index": index, "_id": doc_id, "version": version, "version_type": "external"}});
            write_line(&mut lines, &header);
            let mut doc = serde_json::Map::new();
            for (name, value) in fields.iter() {
                doc.insert(name.to_string(), value.to_json());
            }
            doc.insert(GUARD_FIELD.into(), serde_json::json!({"pos": {tp: net.last_offset}}));
            write_line(&mut lines, &doc);
        }
        (GuardMode::ExternalVersions, Effect::Delete) => {
            let header = serde_json::json!({"delete": {"_index": index, "_id": doc_id, "version": version, "version_type": "external"}});
            write_line(&mut lines, &header);
        }
        _ => {
            let header = serde_json::json!({"update": {"_index": index, "_id": doc_id}});
            write_line(&mut lines, &header);
            let mut whole = Step::new(&net.effect, net.last_offset, net.version);
            (whole.b, whole.w) = (Some(net.first_offset), net.first_version);
            // One event: its effect is the net op's, and the script never
            // needs it apart.
            let effects: Vec<(Effect, &WriteOp)> = match members.as_slice() {
                [_] => Vec::new(),
                _ => members.iter().map(|&at| (Effect::of(ops[at].kind, &ops[at].fields), &ops[at])).collect(),
            };
            let steps: Vec<Step> =
                effects.iter().map(|(effect, op)| Step::new(effect, op.position.offset, op.version)).collect();
            let body = serde_json::json!({
                "script": {"source": SCRIPT, "lang": "painless", "params": {"tp": tp, "whole": [whole], "steps": steps}},
                "scripted_upsert": true,
                // Marks a document that did not exist: deleting it is a noop.
                "upsert": {GUARD_FIELD: {"missing": true}},
            });
            write_line(&mut lines, &body);
        }
    }
    Action { doc_id, ops: members, lines }
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
        // A scripted update's conflict is another writer's update landing
        // between its read and its write: nothing of it was applied, and it
        // is sent again (its guards then see what the other wrote). Only an
        // external version's conflict says "already applied".
        409 if kind == "update" => ItemOutcome::Retry(format!("{} (another writer)", describe())),
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
    use crate::projection::OpKind;

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
        let (actions, rejected) = plan(&ops, &[], "profiles", GuardMode::ExternalVersions);
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
        let (actions, _) = plan(&ops, &[], "profiles", GuardMode::ExternalVersions);
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
        let (scripted, _) = plan(&ops[..3], &[], "profiles", GuardMode::Scripted);
        assert!(lines(&scripted[0])[0].get("update").is_some(), "domain versions: always the script");
    }

    #[test]
    fn deletes_last_are_external_version_deletes_and_scripted_mode_scripts_everything() {
        let ops = vec![op("u1", 0, 2, OpKind::Upsert, &[]), op("u1", 0, 3, OpKind::Delete, &[])];
        let (actions, _) = plan(&ops, &[], "p", GuardMode::ExternalVersions);
        let lines_of = lines(&actions[0]);
        assert_eq!(lines_of.len(), 1);
        assert_eq!(lines_of[0]["delete"]["version"], 4);
        let (actions, _) = plan(&ops, &[], "p", GuardMode::Scripted);
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
        let (actions, _) = plan(&ops, &[], "p", GuardMode::Scripted);
        assert_eq!(
            actions.iter().map(|a| (a.doc_id.as_str(), a.ops.clone())).collect::<Vec<_>>(),
            vec![("u1", vec![0, 1, 2, 3, 4]), ("u2", vec![5]), ("u1", vec![6]),]
        );
        let first = &lines(&actions[0])[1]["script"]["params"];
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
        let (actions, _) = plan(&ops, &[], "p", GuardMode::Scripted);
        let params = &lines(&actions[0])[1]["script"]["params"];
        assert_eq!(
            params["whole"],
            serde_json::json!([{"o": 3, "v": 3, "b": 0, "w": 1, "k": "r",
                "f": {"name": "Ann", "points": 10, "email": "a@x"}, "a": {}}])
        );
        assert_eq!(params["steps"][2]["v"], 1, "the duplicate keeps its version, for the script to skip");
    }

    #[test]
    fn composite_ids_join_and_null_ids_are_refused() {
        assert_eq!(doc_id(&[Value::from("a"), Value::Int(7)]), Ok("a|7".to_string()));
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
        let (actions, rejected) = plan(&[bad], &[], "p", GuardMode::Scripted);
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
        assert_eq!(classify_item("delete", 409, None), ItemOutcome::Duplicate);
        assert!(matches!(classify_item("update", 409, None), ItemOutcome::Retry(_)), "a lost race is not applied");
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
