//! The Elasticsearch sink: idempotent effects through the `_bulk` API.
//!
//! A connector writes to an alias over a versioned index (`<alias>-v<N>`),
//! created with the connector's mappings and settings when missing. Every
//! write is guarded (see [`bulk`]), so positions can live in Kafka's
//! committed offsets: after a crash the events since the last commit are
//! applied again and change nothing.
//!
//! * [`bulk`]: actions, the update script, item results (pure).
//! * `parked.rs`: parked keys (`on_error: park`) in the `kawka-parked` index.

pub mod bulk;
mod parked;
mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elasticsearch::auth::Credentials;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use elasticsearch::http::Url;
use elasticsearch::indices::{IndicesCreateParts, IndicesExistsAliasParts, IndicesExistsParts};
use elasticsearch::{BulkParts, DeleteByQueryParts, Elasticsearch, MgetParts};
use futures::future::join_all;

use super::{SinkError, Written};
use crate::error::Backoff;
use crate::projection::WriteOp;
use bulk::{Action, ItemOutcome, Tombstones};
pub use parked::{MOST_PARKED, PARKED_INDEX};
pub use settings::{ElasticsearchConnection, ElasticsearchTarget};

/// Retries of failed items inside one write, before the pipeline's own
/// retry of the batch takes over (which also watches for shutdown).
const ITEM_ATTEMPTS: u32 = 6;

#[derive(Debug, Clone)]
pub struct ElasticsearchSink {
    client: Elasticsearch,
    target: ElasticsearchTarget,
    /// Whether the documents written lately were mostly new: then a whole
    /// document goes as a `create` first (see [`bulk`]).
    seen: Arc<Seen>,
    /// Writes go straight to an index a rebuild made, not through the alias.
    concrete: bool,
    /// Whether the connector parks keys (`kawka-parked` is created).
    parks: bool,
}

/// Whether [`ElasticsearchSink::create_index`] made the index.
enum Created {
    Now,
    /// It existed (the server's answer).
    Before(String),
}

/// A batch planned for Elasticsearch: its bulk actions, the ops that
/// cannot be written (with the reason, reported once the rest is) and the
/// ops the fold found stale.
#[derive(Debug)]
pub struct ElasticsearchPlan(bulk::Planned);

impl ElasticsearchSink {
    pub fn new(
        connection: &ElasticsearchConnection,
        target: &ElasticsearchTarget,
        parks: bool,
    ) -> Result<ElasticsearchSink, SinkError> {
        // Credentials in the URL become basic auth, and leave the URL: the
        // client's errors print the URL.
        let (bare, in_url) = crate::secret::split_credentials(connection.url.expose());
        let url =
            Url::parse(&bare).map_err(|e| SinkError::Setup(format!("elasticsearch url {}: {e}", connection.url)))?;
        let mut builder =
            TransportBuilder::new(SingleNodeConnectionPool::new(url)).timeout(connection.timeout).disable_proxy();
        if let (Some(user), Some(password)) = (&connection.username, &connection.password) {
            builder = builder.auth(Credentials::Basic(user.clone(), password.expose().to_string()));
        } else if let Some((user, password)) = in_url {
            builder = builder.auth(Credentials::Basic(user, password.expose().to_string()));
        }
        if let Some(key) = &connection.api_key {
            let (id, secret) = key
                .expose()
                .split_once(':')
                .ok_or_else(|| SinkError::Setup("elasticsearch api_key must be `id:secret`".to_string()))?;
            builder = builder.auth(Credentials::ApiKey(id.to_string(), secret.to_string()));
        }
        let transport = builder.build().map_err(|e| SinkError::Setup(format!("elasticsearch client: {e}")))?;
        Ok(ElasticsearchSink {
            client: Elasticsearch::new(transport),
            target: target.clone(),
            seen: Arc::default(),
            concrete: false,
            parks,
        })
    }

    pub fn client(&self) -> &Elasticsearch {
        &self.client
    }

    /// Makes every write so far searchable (`_refresh` of the alias).
    pub async fn refresh(&self) -> Result<(), SinkError> {
        let response = self
            .client
            .indices()
            .refresh(elasticsearch::indices::IndicesRefreshParts::Index(&[self.alias()]))
            .send()
            .await
            .map_err(transport_error)?;
        if !response.status_code().is_success() {
            return Err(SinkError::Setup(format!("refreshing {}: HTTP {}", self.alias(), response.status_code())));
        }
        Ok(())
    }

    pub fn alias(&self) -> &str {
        &self.target.alias
    }

    pub fn target(&self) -> &ElasticsearchTarget {
        &self.target
    }

    /// The same sink writing straight to `index`, which must exist (a
    /// rebuild's new version, or the previous one during a rollback).
    pub fn writing_to(&self, index: &str) -> ElasticsearchSink {
        let mut sink = self.clone();
        sink.target.alias = index.to_string();
        sink.concrete = true;
        sink
    }

    /// Creates `<alias>-v1` with the alias when the alias is missing.
    /// Refuses a concrete index that has the alias's name: kawka never
    /// writes to a bare index behind the user's back.
    pub async fn prepare(&self) -> Result<(), SinkError> {
        self.prepare_tombstones().await?;
        if self.parks {
            self.prepare_parked().await?;
        }
        if self.concrete {
            return Ok(());
        }
        let alias = self.target.alias.as_str();
        if self.alias_exists(alias).await? {
            return Ok(());
        }
        let exists = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[alias]))
            .send()
            .await
            .map_err(transport_error)?
            .status_code()
            .as_u16();
        if exists == 200 {
            return Err(SinkError::Setup(format!(
                "`{alias}` is an index, not an alias; kawka writes through an alias over `{alias}-v<N>` \
                 (reindex it into `{alias}-v1` and add the alias, or pick another index name)"
            )));
        }
        let index = format!("{alias}-v1");
        match self.create_index(&index, create_body(&self.target, alias)).await? {
            Created::Now => {
                tracing::info!(index = %index, alias, "index created");
                Ok(())
            }
            // Another daemon created it meanwhile: fine if the alias is there now.
            Created::Before(_) if self.alias_exists(alias).await? => Ok(()),
            Created::Before(text) => {
                Err(SinkError::Elasticsearch { status: Some(400), message: format!("creating {index}: {text}") })
            }
        }
    }

    /// Creates `index` with `body`, unless it exists.
    async fn create_index(&self, index: &str, body: serde_json::Value) -> Result<Created, SinkError> {
        let response = self
            .client
            .indices()
            .create(IndicesCreateParts::Index(index))
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status_code().as_u16();
        if status == 200 {
            return Ok(Created::Now);
        }
        let text = response.text().await.unwrap_or_default();
        if text.contains("resource_already_exists_exception") {
            return Ok(Created::Before(text));
        }
        Err(SinkError::Elasticsearch { status: Some(status), message: format!("creating {index}: {text}") })
    }

    async fn alias_exists(&self, alias: &str) -> Result<bool, SinkError> {
        let response = self
            .client
            .indices()
            .exists_alias(IndicesExistsAliasParts::Name(&[alias]))
            .send()
            .await
            .map_err(transport_error)?;
        Ok(response.status_code().as_u16() == 200)
    }

    /// The CPU part of a write: the batch folded into its bulk actions.
    /// `hashes` are the ops' [`crate::projection::fold::key_hashes`]
    /// when the caller has them.
    pub fn plan(&self, ops: &[WriteOp], hashes: &[u64]) -> ElasticsearchPlan {
        let index = self.tombstones();
        let tombstones = Tombstones { index: &index, at_millis: now_millis() };
        ElasticsearchPlan(bulk::plan(ops, hashes, &self.target.alias, tombstones, self.seen.mostly_new()))
    }

    /// The index of deleted documents' guards (`<alias>.kawka-deleted`).
    pub fn tombstones(&self) -> String {
        format!("{}.kawka-deleted", self.target.alias)
    }

    /// Creates the tombstones' index when missing and forgets the
    /// tombstones older than the retention.
    async fn prepare_tombstones(&self) -> Result<(), SinkError> {
        let index = self.tombstones();
        let body = serde_json::json!({"mappings": {"dynamic": false,
            "properties": {"at": {"type": "date", "format": "epoch_millis"}}}});
        self.create_index(&index, body).await?;
        let before = now_millis() - self.target.tombstone_retention.as_millis() as i64;
        let response = self
            .client
            .delete_by_query(DeleteByQueryParts::Index(&[&index]))
            .body(serde_json::json!({"query": {"range": {"at": {"lt": before}}}}))
            .send()
            .await;
        succeeded(response, &format!("expiring {index}")).await.map(drop)
    }

    /// The actions of `actions` (by index) that guards read now complete:
    /// an update (or a create's update) of a document with a tombstone, with
    /// the tombstone put in; a delete's tombstone, with the guards the live
    /// document has before the delete. One `_mget` for both.
    async fn with_tombstones(&self, actions: &[&Action]) -> Result<Vec<(usize, Action)>, SinkError> {
        let index = self.tombstones();
        let unique = |tombstones: bool| -> Vec<&str> {
            actions
                .iter()
                .filter(|a| a.records_tombstone == tombstones && (a.tombstone_slot.is_some() || a.otherwise.is_some()))
                .map(|a| a.doc_id.as_str())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let (missing, deleting) = (unique(false), unique(true));
        if missing.is_empty() && deleting.is_empty() {
            return Ok(Vec::new());
        }
        // The reply lists the documents in this order: tombstones, then live ones.
        let mut docs: Vec<serde_json::Value> =
            missing.iter().map(|id| serde_json::json!({"_index": index, "_id": id})).collect();
        docs.extend(
            deleting
                .iter()
                .map(|id| serde_json::json!({"_index": self.target.alias, "_id": id, "_source": [bulk::GUARD_FIELD]})),
        );
        let response = self.client.mget(MgetParts::None).body(serde_json::json!({"docs": docs})).send().await;
        let response = succeeded(response, &format!("reading {index}")).await?;
        let reply: serde_json::Value = response.json().await.map_err(transport_error)?;
        let replied = reply.get("docs").and_then(|d| d.as_array()).cloned().unwrap_or_default();
        let found = |doc: &serde_json::Value| {
            (doc.get("found").and_then(|f| f.as_bool()) == Some(true)).then(|| doc.get("_source").cloned()).flatten()
        };
        let mut tombstones: HashMap<&str, serde_json::Value> = HashMap::new();
        let mut live: HashMap<&str, serde_json::Value> = HashMap::new();
        for (id, doc) in missing.iter().zip(&replied) {
            if let Some(source) = found(doc) {
                tombstones.insert(id, source);
            }
        }
        for (id, doc) in deleting.iter().zip(replied.iter().skip(missing.len())) {
            if let Some(guards) = found(doc).and_then(|source| source.get(bulk::GUARD_FIELD).cloned()) {
                live.insert(id, guards);
            }
        }
        Ok(actions
            .iter()
            .enumerate()
            .filter_map(|(at, action)| {
                let from = if action.records_tombstone { &live } else { &tombstones };
                let guards = from.get(action.doc_id.as_str())?;
                Some((at, action.with_tombstone(guards)?))
            })
            .collect())
    }

    /// Applies the ops of a batch ([`ElasticsearchSink::plan`], then
    /// [`ElasticsearchSink::write_plan`]).
    pub async fn write(&self, ops: &[WriteOp]) -> Result<Written, SinkError> {
        self.write_plan(&self.plan(ops, &[])).await
    }

    /// Sends a planned batch. Documents are spread over `in_flight` lanes
    /// by id, so one document's actions stay in order in one lane; lanes
    /// run concurrently, each sending its requests one after another.
    pub async fn write_plan(&self, plan: &ElasticsearchPlan) -> Result<Written, SinkError> {
        let mut counts = Written { duplicates: 0, superseded: plan.0.stale.clone() };
        let mut rejected = plan.0.rejected.clone();
        for round in rounds(&plan.0.actions) {
            let (round_counts, round_rejected) = self.write_round(&round).await?;
            counts.duplicates += round_counts.duplicates;
            counts.superseded.extend(round_counts.superseded);
            rejected.extend(round_rejected);
        }
        if !rejected.is_empty() {
            return Err(SinkError::RejectedOps(rejected));
        }
        Ok(counts)
    }

    /// Sends actions of which no two are of one document (but a delete's
    /// tombstone, right after it): the tombstones of their documents read
    /// first, then lanes of requests.
    async fn write_round(&self, actions: &[&Action]) -> Result<(Written, Vec<(usize, String)>), SinkError> {
        let lanes = self.target.in_flight.max(1);
        let mut by_lane: Vec<Vec<&Action>> = (0..lanes).map(|_| Vec::new()).collect();
        let tombstoned = self.with_tombstones(actions).await?;
        let mut tombstoned = tombstoned.iter().peekable();
        for (at, &action) in actions.iter().enumerate() {
            let action = match tombstoned.peek() {
                Some((with, replaced)) if *with == at => {
                    tombstoned.next();
                    replaced
                }
                _ => action,
            };
            by_lane[lane_of(&action.doc_id, lanes)].push(action);
        }
        let results = join_all(by_lane.into_iter().map(|actions| self.write_lane(actions))).await;
        let mut counts = Written::default();
        let mut rejected = Vec::new();
        let mut failure = None;
        for result in results {
            match result {
                Ok((lane_counts, lane_rejected)) => {
                    counts.duplicates += lane_counts.duplicates;
                    counts.superseded.extend(lane_counts.superseded);
                    rejected.extend(lane_rejected);
                }
                Err(error) => failure = Some(error),
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok((counts, rejected)),
        }
    }

    async fn write_lane(&self, actions: Vec<&Action>) -> Result<(Written, Vec<(usize, String)>), SinkError> {
        let mut counts = Written::default();
        let mut rejected = Vec::new();
        let mut start = 0;
        while start < actions.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < actions.len()
                && (end == start
                    || (end - start < self.target.max_bulk_actions
                        && bytes + actions[end].sent_len() <= self.target.max_bulk_bytes))
            {
                bytes += actions[end].sent_len();
                end += 1;
            }
            let (chunk_counts, chunk_rejected) = self.send_with_retries(&actions[start..end]).await?;
            counts.duplicates += chunk_counts.duplicates;
            counts.superseded.extend(chunk_counts.superseded);
            rejected.extend(chunk_rejected);
            start = end;
        }
        Ok((counts, rejected))
    }

    /// Sends one request; items that failed transiently are sent again
    /// (alone) with backoff. An item refused by a write block fails the
    /// whole batch instead (see [`ItemOutcome::Blocked`]).
    async fn send_with_retries(&self, actions: &[&Action]) -> Result<(Written, Vec<(usize, String)>), SinkError> {
        let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(3) };
        let mut counts = Written::default();
        let mut rejected = Vec::new();
        let mut pending: Vec<&Action> = actions.to_vec();
        let mut attempt = 0;
        loop {
            let outcomes = self.send(&pending).await?;
            let mut retry = Vec::new();
            let mut last_reason = String::new();
            let mut blocked = None;
            // Updates sent at once in place of creates that met a document.
            let mut instead = Vec::new();
            for (action, outcome) in pending.iter().zip(outcomes) {
                match outcome {
                    // A tombstone is not an event's write: not counted.
                    ItemOutcome::Applied | ItemOutcome::Duplicate if action.records_tombstone => {}
                    ItemOutcome::Applied => {}
                    ItemOutcome::Duplicate => {
                        counts.duplicates += 1;
                        counts.superseded.extend(&action.ops);
                    }
                    ItemOutcome::Exists => match &action.otherwise {
                        Some(update) => instead.push(&**update),
                        None => rejected.extend(action.ops.iter().map(|&op| (op, "the document exists".to_string()))),
                    },
                    ItemOutcome::Reject(reason) => rejected.extend(action.ops.iter().map(|&op| (op, reason.clone()))),
                    ItemOutcome::Retry(reason) => {
                        last_reason = reason;
                        retry.push(*action);
                    }
                    ItemOutcome::Blocked(reason) => blocked = Some(reason),
                }
            }
            if let Some(reason) = blocked {
                return Err(SinkError::WriteBlocked(reason));
            }
            if retry.is_empty() && instead.is_empty() {
                return Ok((counts, rejected));
            }
            if !retry.is_empty() {
                if attempt + 1 >= ITEM_ATTEMPTS {
                    return Err(SinkError::Elasticsearch {
                        status: None,
                        message: format!("{} item(s) still failing: {last_reason}", retry.len()),
                    });
                }
                tracing::debug!(items = retry.len(), reason = %last_reason, "retrying bulk items");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
            instead.extend(retry);
            pending = instead;
        }
    }

    async fn send(&self, actions: &[&Action]) -> Result<Vec<ItemOutcome>, SinkError> {
        let mut body = Vec::with_capacity(actions.iter().map(|a| a.sent_len()).sum());
        for action in actions {
            action.write_to(&mut body);
        }
        let response =
            self.client.bulk(BulkParts::None).body(vec![Bytes::from(body)]).send().await.map_err(transport_error)?;
        let status = response.status_code().as_u16();
        if !(200..300).contains(&status) {
            let text = response.text().await.unwrap_or_default();
            return Err(SinkError::Elasticsearch { status: Some(status), message: truncate(&text) });
        }
        let reply: serde_json::Value = response.json().await.map_err(transport_error)?;
        let items = reply.get("items").and_then(|i| i.as_array()).cloned().unwrap_or_default();
        if items.len() != actions.len() {
            return Err(SinkError::Elasticsearch {
                status: Some(status),
                message: format!("bulk reply has {} items for {} actions", items.len(), actions.len()),
            });
        }
        Ok(items
            .iter()
            .zip(actions)
            .map(|(item, action)| {
                let Some((kind, result)) = item.as_object().and_then(|o| o.iter().next()) else {
                    return ItemOutcome::Retry("unreadable bulk item".to_string());
                };
                let outcome = bulk::classify_item(kind, result);
                if !action.records_tombstone {
                    self.seen.saw(&outcome, result.get("result").and_then(|r| r.as_str()));
                }
                outcome
            })
            .collect())
    }
}

/// How many of the documents written lately were new and how many existed.
#[derive(Debug, Default)]
struct Seen {
    new: AtomicU64,
    existing: AtomicU64,
    /// The last count found mostly existing documents (kept while nothing
    /// is seen; at first, documents are taken to be new).
    existing_lately: AtomicBool,
}

impl Seen {
    fn saw(&self, outcome: &ItemOutcome, result: Option<&str>) {
        match (outcome, result) {
            (ItemOutcome::Applied, Some("created")) => self.new.fetch_add(1, Ordering::Relaxed),
            (ItemOutcome::Exists | ItemOutcome::Duplicate, _) | (ItemOutcome::Applied, Some(_)) => {
                self.existing.fetch_add(1, Ordering::Relaxed)
            }
            _ => 0,
        };
    }

    /// Whether most documents written since the last call were new.
    fn mostly_new(&self) -> bool {
        let (new, existing) = (self.new.swap(0, Ordering::Relaxed), self.existing.swap(0, Ordering::Relaxed));
        if new + existing > 0 {
            self.existing_lately.store(existing > new, Ordering::Relaxed);
        }
        !self.existing_lately.load(Ordering::Relaxed)
    }
}

/// The body that creates `<alias>-v<N>`: the connector's mappings with the
/// guard field added (stored, never indexed), its settings, the alias.
pub fn create_body(target: &ElasticsearchTarget, alias: &str) -> serde_json::Value {
    let mut mappings = target.mappings.clone().unwrap_or_else(|| serde_json::json!({}));
    if let Some(object) = mappings.as_object_mut() {
        let properties = object.entry("properties").or_insert_with(|| serde_json::json!({}));
        if let Some(properties) = properties.as_object_mut() {
            properties.insert(bulk::GUARD_FIELD.to_string(), serde_json::json!({"type": "object", "enabled": false}));
        }
    }
    let mut body = serde_json::json!({
        "mappings": mappings,
        "aliases": { alias: { "is_write_index": true } },
    });
    if let Some(settings) = &target.settings {
        body["settings"] = settings.clone();
    }
    body
}

/// A batch's actions in rounds, each sent once the one before it is: the
/// k-th action of a document (its events of the k-th partition it met) in
/// round k, a delete's tombstone beside the delete. A document's actions
/// then never overtake each other (a create met by an existing document
/// is followed by its update before the document's next action goes), and
/// each reads the tombstone the one before it left. Most batches have one
/// action a document: one round.
fn rounds(actions: &[Action]) -> Vec<Vec<&Action>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut rounds: Vec<Vec<&Action>> = Vec::new();
    for action in actions {
        let count = seen.entry(action.doc_id.as_str()).or_insert(0);
        // A tombstone follows its delete, in its round.
        let round = if action.records_tombstone { count.saturating_sub(1) } else { *count };
        if !action.records_tombstone {
            *count += 1;
        }
        if rounds.len() <= round {
            rounds.resize_with(round + 1, Vec::new);
        }
        rounds[round].push(action);
    }
    rounds
}

/// A response of a 2xx status, or the error of `what` with the body.
async fn succeeded(
    response: Result<elasticsearch::http::response::Response, elasticsearch::Error>,
    what: &str,
) -> Result<elasticsearch::http::response::Response, SinkError> {
    let response = response.map_err(transport_error)?;
    let status = response.status_code().as_u16();
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    Err(SinkError::Elasticsearch { status: Some(status), message: format!("{what}: {}", truncate(&text)) })
}

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn lane_of(doc_id: &str, lanes: usize) -> usize {
    // FNV-1a: stable and cheap; any stable hash keeps a document in one lane.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in doc_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % lanes as u64) as usize
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(500) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn transport_error(error: elasticsearch::Error) -> SinkError {
    SinkError::Elasticsearch { status: error.status_code().map(|s| s.as_u16()), message: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_gets_the_guard_field_and_the_alias() {
        let target = ElasticsearchTarget {
            alias: "profiles".into(),
            mappings: Some(serde_json::json!({"dynamic": "strict", "properties": {"email": {"type": "keyword"}}})),
            settings: Some(serde_json::json!({"number_of_shards": 1})),
            max_bulk_bytes: 5 << 20,
            max_bulk_actions: 1000,
            in_flight: 2,
            tombstone_retention: std::time::Duration::from_secs(60),
        };
        let body = create_body(&target, "profiles");
        assert_eq!(body["mappings"]["dynamic"], "strict");
        assert_eq!(body["mappings"]["properties"]["kawka"], serde_json::json!({"type": "object", "enabled": false}));
        assert_eq!(body["mappings"]["properties"]["email"]["type"], "keyword");
        assert_eq!(body["aliases"]["profiles"]["is_write_index"], true);
        assert_eq!(body["settings"]["number_of_shards"], 1);
    }

    #[test]
    fn a_documents_actions_go_in_rounds_with_a_deletes_tombstone_beside_it() {
        use crate::event::Position;
        use crate::projection::{OpKind, WriteOp};
        use crate::value::Value;
        let op = |key: &str, partition: i32, offset: i64, kind: OpKind| WriteOp {
            key: smallvec::smallvec![Value::from(key)],
            kind,
            fields: Default::default(),
            version: None,
            position: Position { topic: "t", partition, offset },
        };
        let ops = [
            op("a", 0, 0, OpKind::Upsert),
            op("b", 0, 1, OpKind::Upsert),
            op("a", 1, 0, OpKind::Delete),
            op("a", 2, 0, OpKind::Merge),
        ];
        let tombstones = Tombstones { index: "t.kawka-deleted", at_millis: 0 };
        let planned = bulk::plan(&ops, &[], "t", tombstones, true);
        let rounds: Vec<Vec<(&str, bool)>> = rounds(&planned.actions)
            .iter()
            .map(|round| round.iter().map(|a| (a.doc_id.as_str(), a.records_tombstone)).collect())
            .collect();
        assert_eq!(
            rounds,
            vec![vec![("a", false), ("b", false)], vec![("a", false), ("a", true)], vec![("a", false)]],
            "one action of a document a round, its tombstone beside its delete"
        );
    }

    #[test]
    fn a_document_always_lands_in_the_same_lane() {
        assert_eq!(lane_of("user-1", 4), lane_of("user-1", 4));
        let lanes: std::collections::HashSet<usize> = (0..100).map(|n| lane_of(&format!("u{n}"), 4)).collect();
        assert_eq!(lanes.len(), 4, "ids spread over every lane");
    }
}
