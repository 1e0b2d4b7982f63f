//! Parked keys in the `kawka-parked` index (see [`crate::parked`]): a
//! document per connector and key, changed with optimistic concurrency
//! (`if_seq_no`). A replay's writes go first, then the document: a replay
//! that dies between them writes its events again next time, which the
//! documents' guards find applied (idempotent, as every write here).

use elasticsearch::indices::IndicesRefreshParts;
use elasticsearch::{CreateParts, DeleteParts, GetParts, IndexParts, SearchParts};
use serde_json::json;

use super::{succeeded, transport_error, ElasticsearchSink};
use crate::parked::{hex, Change, ParkedKey};
use crate::projection::WriteOp;
use crate::sink::{SinkError, Written};

/// The index of every connector's parked keys.
pub const PARKED_INDEX: &str = "kawka-parked";

/// Most keys read back: `park.max_keys` is at most this (one page of a search).
pub const MOST_PARKED: usize = 10_000;

/// How many times a change is decided again after another writer changed
/// the key's document in between.
const CONFLICT_RETRIES: u32 = 20;

/// A parked key's document id: the connector and the key's bytes in hex
/// (a long key by its SHA-256: ids are at most 512 bytes).
fn doc_id(connector: &str, key: &[u8]) -> String {
    let id = format!("{connector}/{}", hex(key));
    if id.len() <= 512 {
        return id;
    }
    use sha2::Digest as _;
    format!("{connector}/sha256-{}", hex(&sha2::Sha256::digest(key)))
}

impl ElasticsearchSink {
    pub(super) async fn prepare_parked(&self) -> Result<(), SinkError> {
        let body = json!({"mappings": {"dynamic": false, "properties": {"connector": {"type": "keyword"}}}});
        self.create_index(PARKED_INDEX, body).await.map(drop)
    }

    /// Every key `connector` has parked.
    pub async fn parked_keys(&self, connector: &str) -> Result<Vec<(Vec<u8>, ParkedKey)>, SinkError> {
        // Searches see what a refresh made visible: the keys parked just
        // before (by another replica) included.
        let refreshed = self.client.indices().refresh(IndicesRefreshParts::Index(&[PARKED_INDEX])).send().await;
        // No connector has parked a key yet (a rebuild reads the live
        // connector's keys before it ever ran).
        if refreshed.as_ref().is_ok_and(|r| r.status_code().as_u16() == 404) {
            return Ok(Vec::new());
        }
        succeeded(refreshed, "refreshing kawka-parked").await?;
        let response = self
            .client
            .search(SearchParts::Index(&[PARKED_INDEX]))
            .body(json!({"query": {"term": {"connector": connector}}, "size": MOST_PARKED, "track_total_hits": true}))
            .send()
            .await;
        let reply: serde_json::Value =
            succeeded(response, "reading kawka-parked").await?.json().await.map_err(transport_error)?;
        let hits = reply.pointer("/hits/hits").and_then(|h| h.as_array()).cloned().unwrap_or_default();
        // Replicas each check `park.max_keys` against what they know, so
        // together they can park more: never hold only some of them.
        let total = reply.pointer("/hits/total/value").and_then(|t| t.as_u64()).unwrap_or(hits.len() as u64);
        if total > hits.len() as u64 {
            return Err(SinkError::Setup(format!(
                "{connector} has {total} keys in {PARKED_INDEX}, more than the {MOST_PARKED} one read holds: \
                 replay or release some (kawka dlq replay)"
            )));
        }
        hits.iter().map(|hit| read_doc(hit.get("_source").unwrap_or(&serde_json::Value::Null))).collect()
    }

    /// Changes a parked key as `decide` says from what is stored now
    /// (`None`: change nothing), after writing `ops` (idempotently). A
    /// change that meets another writer's is decided again.
    pub async fn change_parked(
        &self,
        connector: &str,
        key: &[u8],
        ops: &[WriteOp],
        decide: &(dyn Fn(Option<&ParkedKey>) -> Option<Change> + Send + Sync),
    ) -> Result<Option<(Change, Vec<usize>)>, SinkError> {
        let id = doc_id(connector, key);
        let mut written: Option<Written> = None;
        for _ in 0..CONFLICT_RETRIES {
            let response =
                self.client.get(GetParts::IndexId(PARKED_INDEX, &id)).send().await.map_err(transport_error)?;
            let stored = if response.status_code().as_u16() == 404 {
                None
            } else {
                let doc: serde_json::Value =
                    succeeded(Ok(response), "reading kawka-parked").await?.json().await.map_err(transport_error)?;
                let seq =
                    (doc.get("_seq_no").and_then(|s| s.as_i64()), doc.get("_primary_term").and_then(|s| s.as_i64()));
                let (Some(seq_no), Some(term)) = seq else {
                    return Err(SinkError::Elasticsearch { status: None, message: "kawka-parked: no _seq_no".into() });
                };
                let (_, entry) = read_doc(doc.get("_source").unwrap_or(&serde_json::Value::Null))?;
                Some((entry, seq_no, term))
            };
            let Some(change) = decide(stored.as_ref().map(|(entry, ..)| entry)) else { return Ok(None) };
            if written.is_none() && !ops.is_empty() {
                written = Some(self.write(ops).await?);
            }
            let response = match (&change, &stored) {
                (Change::Put(entry), Some((_, seq_no, term))) => {
                    self.client
                        .index(IndexParts::IndexId(PARKED_INDEX, &id))
                        .if_seq_no(*seq_no)
                        .if_primary_term(*term)
                        .body(to_doc(connector, key, entry))
                        .send()
                        .await
                }
                (Change::Put(entry), None) => {
                    self.client
                        .create(CreateParts::IndexId(PARKED_INDEX, &id))
                        .body(to_doc(connector, key, entry))
                        .send()
                        .await
                }
                (Change::Delete, Some((_, seq_no, term))) => {
                    self.client
                        .delete(DeleteParts::IndexId(PARKED_INDEX, &id))
                        .if_seq_no(*seq_no)
                        .if_primary_term(*term)
                        .send()
                        .await
                }
                (Change::Delete, None) => return Ok(Some((change, written.map(|w| w.superseded).unwrap_or_default()))),
            };
            let response = response.map_err(transport_error)?;
            if response.status_code().as_u16() == 409 {
                continue;
            }
            succeeded(Ok(response), "writing kawka-parked").await?;
            return Ok(Some((change, written.map(|w| w.superseded).unwrap_or_default())));
        }
        Err(SinkError::Elasticsearch {
            status: Some(409),
            message: format!("kawka-parked: the document of a key kept changing ({CONFLICT_RETRIES} tries)"),
        })
    }
}

fn to_doc(connector: &str, key: &[u8], entry: &ParkedKey) -> serde_json::Value {
    json!({"connector": connector, "key": hex(key), "entry": entry})
}

fn read_doc(source: &serde_json::Value) -> Result<(Vec<u8>, ParkedKey), SinkError> {
    let bad = |what: String| SinkError::Setup(format!("a document of kawka-parked does not read: {what}"));
    let key = source.get("key").and_then(|k| k.as_str()).ok_or_else(|| bad("no key".into()))?;
    let key = unhex(key).ok_or_else(|| bad(format!("key `{key}` is not hex")))?;
    let entry =
        serde_json::from_value(source.get("entry").cloned().unwrap_or_default()).map_err(|e| bad(e.to_string()))?;
    Ok((key, entry))
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_connector_and_stay_short() {
        assert_eq!(doc_id("profiles", b"u1"), "profiles/7531");
        let long = doc_id("profiles", &[7u8; 400]);
        assert!(long.starts_with("profiles/sha256-") && long.len() < 100, "{long}");
        assert_eq!(unhex("7531"), Some(b"u1".to_vec()));
        assert_eq!(unhex("753"), None);
    }
}
