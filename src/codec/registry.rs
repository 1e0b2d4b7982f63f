//! Client of a Confluent-compatible schema registry, with the writer-schema
//! cache.
//!
//! Schema ids are immutable, so a fetched schema is cached for the life of
//! the process, compiled once into its decoder. Only a definite "not found"
//! (HTTP 404 with error code 40403) or a schema that cannot be parsed is
//! permanent; everything else (connection refused, timeouts, 5xx, auth) is
//! transient, so a registry outage never dead-letters an event.
//!
//! Permanent answers are cached too, briefly and boundedly (the negative
//! cache): a run of records with unknown ids costs one registry call per id
//! per [`NEGATIVE_TTL`], not one per record. Transient errors are never
//! cached, so an outage is retried as soon as the registry answers again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use super::avro::Decoder;
use crate::codec::RegistryClientSettings;
use crate::error::ErrorClass;
use crate::secret::Secret;

/// The content type of the Confluent API.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A writer schema fetched by id, parsed and compiled.
#[derive(Debug)]
pub struct WriterSchema {
    pub id: u32,
    /// The schema text as the registry returned it.
    pub text: String,
    pub schema: Schema,
    /// Schemas named by reference, parsed.
    pub references: Vec<Schema>,
    pub decoder: Decoder,
    /// CRC-64-AVRO (Rabin) fingerprint of the Parsing Canonical Form, with
    /// references inlined: what the event catalogue matches versions by.
    pub fingerprint: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("schema id {0} is not in the registry (40403)")]
    NotFound(u32),
    #[error("schema id {id} cannot be used: {message}")]
    Invalid { id: u32, message: String },
    #[error("schema registry unreachable: {0}")]
    Unreachable(String),
    #[error("schema registry answered HTTP {status}: {message}")]
    Status { status: u16, code: Option<i64>, message: String },
}

impl RegistryError {
    pub fn class(&self) -> ErrorClass {
        match self {
            RegistryError::NotFound(_) | RegistryError::Invalid { .. } => ErrorClass::Permanent,
            RegistryError::Unreachable(_) | RegistryError::Status { .. } => ErrorClass::Transient,
        }
    }
}

/// A schema reference as the Confluent API spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SchemaReference {
    pub name: String,
    pub subject: String,
    pub version: i32,
}

#[derive(Debug, Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(default)]
    references: Vec<SchemaReference>,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
}

/// One registered version of a subject.
#[derive(Debug, Clone, Deserialize)]
pub struct SubjectVersion {
    pub subject: String,
    pub version: i32,
    pub id: u32,
    pub schema: String,
    #[serde(default)]
    pub references: Vec<SchemaReference>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    username: Option<String>,
    password: Option<Secret>,
    /// Read for every record: foldhash rather than SipHash.
    cache: RwLock<HashMap<u32, Arc<WriterSchema>, foldhash::fast::RandomState>>,
    cache_hits: std::sync::atomic::AtomicU64,
    cache_misses: std::sync::atomic::AtomicU64,
    /// Ids the registry answered permanently about, for a short while.
    missing: Mutex<NegativeCache>,
}

/// How long a permanent answer about an id is trusted: long enough that a
/// burst of records with one unknown id costs a call every few seconds,
/// short enough that an id a lagging registry replica learns late costs
/// few dead letters of good events.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// At most this many ids are remembered as missing; the oldest go first.
const NEGATIVE_CAPACITY: usize = 4096;

/// How often the log tells of ids found missing (the dead letters tell of
/// every record; the log only of the run of them).
const MISSING_LOG_EVERY: Duration = Duration::from_secs(10);

/// Permanent registry answers by id, bounded and expiring.
#[derive(Debug, Default)]
struct NegativeCache {
    entries: HashMap<u32, (Instant, RegistryError)>,
    /// Insertion order, for eviction; an id appears once (re-inserted only
    /// after its entry expired and was removed).
    order: VecDeque<u32>,
    /// When the log last told of missing ids, and how many were found since.
    last_log: Option<Instant>,
    unlogged: u64,
}

impl NegativeCache {
    fn get(&mut self, id: u32, now: Instant) -> Option<RegistryError> {
        let (at, error) = self.entries.get(&id)?;
        if now.duration_since(*at) < NEGATIVE_TTL {
            return Some(error.clone());
        }
        self.entries.remove(&id);
        self.order.retain(|other| *other != id);
        None
    }

    fn insert(&mut self, id: u32, error: RegistryError, now: Instant) {
        if self.entries.insert(id, (now, error)).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > NEGATIVE_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.entries.remove(&oldest);
            }
        }
    }

    /// Counts one more missing id; says how many to log when a log line is due.
    fn log_due(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self.last_log.is_some_and(|last| now.duration_since(last) < MISSING_LOG_EVERY) {
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl RegistryClient {
    pub fn new(settings: &RegistryClientSettings) -> anyhow::Result<RegistryClient> {
        let mut builder = reqwest::Client::builder().timeout(settings.timeout).pool_idle_timeout(None);
        if let Some(ca_file) = &settings.ca_file {
            let pem = std::fs::read(ca_file)
                .map_err(|e| anyhow::anyhow!("cannot read registry CA file {}: {e}", ca_file.display()))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        // Credentials in the URL become basic auth, and leave the URL:
        // errors and logs print the URL.
        let (base, in_url) = crate::secret::split_credentials(settings.url.trim_end_matches('/'));
        let (username, password) = match (&settings.username, in_url) {
            (Some(user), _) => (Some(user.clone()), settings.password.clone()),
            (None, Some((user, password))) => (Some(user), Some(password)),
            (None, None) => (None, settings.password.clone()),
        };
        Ok(RegistryClient {
            http: builder.build()?,
            base,
            username,
            password,
            cache: RwLock::default(),
            cache_hits: Default::default(),
            cache_misses: Default::default(),
            missing: Mutex::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// The cached writer schema of `id`, if it was fetched before (counted
    /// as a hit; a miss is counted by the fetch that follows).
    pub fn cached(&self, id: u32) -> Option<Arc<WriterSchema>> {
        let found = self.peek(id);
        if found.is_some() {
            self.count_hits(1);
        }
        found
    }

    /// The cached writer schema of `id`, not counted.
    pub fn peek(&self, id: u32) -> Option<Arc<WriterSchema>> {
        // A poisoned lock means a panic while inserting; the map is intact.
        self.cache.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Counts `n` lookups served from the cache.
    pub fn count_hits(&self, n: u64) {
        self.cache_hits.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Caches a writer schema (one fetched, or compiled by a caller that
    /// has its text); the one cached first for an id stays.
    pub fn remember(&self, writer: Arc<WriterSchema>) -> Arc<WriterSchema> {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.entry(writer.id).or_insert(writer).clone()
    }

    /// Cache hits and misses so far.
    pub fn cache_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (self.cache_hits.load(Ordering::Relaxed), self.cache_misses.load(Ordering::Relaxed))
    }

    /// The writer schema of `id`, from the cache or the registry.
    pub async fn writer_schema(&self, id: u32) -> Result<Arc<WriterSchema>, RegistryError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        self.fetch_writer_schema_cached(id).await
    }

    /// The writer schema of `id` from the registry (an id just missed in
    /// the cache, counted as a miss), cached; a permanent error is remembered a while (the
    /// negative cache) so that a bad id does not cost a request per record.
    pub async fn fetch_writer_schema_cached(&self, id: u32) -> Result<Arc<WriterSchema>, RegistryError> {
        self.cache_misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(error) = self.negative().get(id, Instant::now()) {
            return Err(error);
        }
        match self.fetch_writer_schema(id).await {
            Ok(writer) => Ok(self.remember(writer)),
            Err(error) if error.class() == ErrorClass::Permanent => {
                let now = Instant::now();
                let mut missing = self.negative();
                missing.insert(id, error.clone(), now);
                if let Some(count) = missing.log_due(now) {
                    drop(missing);
                    tracing::warn!(schema_id = id, ids_since_last_log = count, error = %error, "schema id cannot be used");
                }
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    /// The negative cache; a poisoned lock means a panic while inserting,
    /// and the map is intact.
    fn negative(&self) -> std::sync::MutexGuard<'_, NegativeCache> {
        self.missing.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn fetch_writer_schema(&self, id: u32) -> Result<Arc<WriterSchema>, RegistryError> {
        let response: SchemaResponse = self.get(&format!("/schemas/ids/{id}"), Some(id)).await?;
        if let Some(kind) = response.schema_type.as_deref().filter(|k| *k != "AVRO") {
            return Err(RegistryError::Invalid { id, message: format!("schema type {kind} is not Avro") });
        }
        let mut texts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.collect_references(&response.references, &mut texts, &mut seen, id, 0).await?;
        Ok(Arc::new(compile(id, response.schema, &texts)?))
    }

    /// Fetches the texts of `references` and of theirs, depth first, so that
    /// each schema comes after the ones it needs.
    fn collect_references<'a>(
        &'a self,
        references: &'a [SchemaReference],
        texts: &'a mut Vec<String>,
        seen: &'a mut std::collections::HashSet<SchemaReference>,
        id: u32,
        depth: usize,
    ) -> futures::future::BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            if depth > 32 {
                return Err(RegistryError::Invalid { id, message: "schema references nest too deep".into() });
            }
            for reference in references {
                if !seen.insert(reference.clone()) {
                    continue;
                }
                let version = self.subject_version(&reference.subject, &reference.version.to_string()).await?;
                self.collect_references(&version.references, texts, seen, id, depth + 1).await?;
                texts.push(version.schema);
            }
            Ok(())
        })
    }

    /// `GET /subjects/{subject}/versions/{version}` (`version` may be `latest`).
    pub async fn subject_version(&self, subject: &str, version: &str) -> Result<SubjectVersion, RegistryError> {
        self.get(&format!("/subjects/{}/versions/{version}", encode(subject)), None).await
    }

    /// `GET /subjects/{subject}/versions`.
    pub async fn subject_versions(&self, subject: &str) -> Result<Vec<i32>, RegistryError> {
        self.get(&format!("/subjects/{}/versions", encode(subject)), None).await
    }

    /// `GET /subjects`.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        self.get("/subjects", None).await
    }

    /// Registers `schema` under `subject` and returns its id.
    pub async fn register(
        &self,
        subject: &str,
        schema: &str,
        references: &[SchemaReference],
    ) -> Result<u32, RegistryError> {
        #[derive(Deserialize)]
        struct Registered {
            id: u32,
        }
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO", "references": references });
        let request = self.http.post(format!("{}/subjects/{}/versions", self.base, encode(subject))).json(&body);
        let registered: Registered = self.send(request, None).await?;
        Ok(registered.id)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str, id: Option<u32>) -> Result<T, RegistryError> {
        self.send(self.http.get(format!("{}{path}", self.base)), id).await
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        id: Option<u32>,
    ) -> Result<T, RegistryError> {
        let mut request = request.header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some(user) = &self.username {
            request = request.basic_auth(user, self.password.as_ref().map(Secret::expose));
        }
        let response = request.send().await.map_err(|e| RegistryError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| RegistryError::Unreachable(error_chain(&e)))?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| RegistryError::Status {
                status: status.as_u16(),
                code: None,
                message: format!("unreadable response: {e}"),
            });
        }
        let error: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let code = error.as_ref().and_then(|e| e.error_code);
        if let (404, Some(40403), Some(id)) = (status.as_u16(), code, id) {
            return Err(RegistryError::NotFound(id));
        }
        let message =
            error.and_then(|e| e.message).unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        Err(RegistryError::Status { status: status.as_u16(), code, message })
    }
}

/// Parses and compiles a writer schema with the texts of its references.
pub fn compile(id: u32, text: String, references: &[String]) -> Result<WriterSchema, RegistryError> {
    let invalid = |message: String| RegistryError::Invalid { id, message };
    let (schema, references) = if references.is_empty() {
        (Schema::parse_str(&text).map_err(|e| invalid(e.to_string()))?, Vec::new())
    } else {
        Schema::parse_str_with_list(&text, references).map_err(|e| invalid(e.to_string()))?
    };
    let decoder = Decoder::compile(&schema, &references).map_err(|e| invalid(e.to_string()))?;
    let fingerprint = fingerprint(&schema, &references).map_err(invalid)?;
    Ok(WriterSchema { id, text, schema, references, decoder, fingerprint })
}

/// The Rabin fingerprint of the Parsing Canonical Form, references inlined.
pub fn fingerprint(schema: &Schema, references: &[Schema]) -> Result<u64, String> {
    let digest = if references.is_empty() {
        schema.fingerprint::<Rabin>()
    } else {
        let mut inlined = schema.clone();
        inlined.denormalize(references).map_err(|e| e.to_string())?;
        inlined.fingerprint::<Rabin>()
    };
    // Rabin's digest is the 8-byte little-endian form of the fingerprint.
    let bytes: [u8; 8] = digest.bytes.as_slice().try_into().expect("a Rabin digest is 8 bytes");
    Ok(u64::from_le_bytes(bytes))
}

/// What stays as it is in a path segment: RFC 3986's unreserved characters.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Percent-encodes a subject for a URL path.
fn encode(subject: &str) -> String {
    utf8_percent_encode(subject, PATH_SEGMENT).to_string()
}

/// An error with its causes, for messages: reqwest hides the useful part
/// (connection refused, timeout) in the source chain.
/// What a subject holds for `topic` under the topic strategies:
/// `Some(None)` for `<topic>-value` (any record), `Some(Some(record))` for
/// `<topic>-<record>`; `None` for another topic's subject, also one whose
/// name starts with this topic's (`orders-archive-value` is not `orders`':
/// a record's full name has no `-`) and for key subjects.
pub fn topic_subject<'s>(subject: &'s str, topic: &str) -> Option<Option<&'s str>> {
    match subject.strip_prefix(topic)?.strip_prefix('-')? {
        "value" => Some(None),
        "key" => None,
        record if !record.contains('-') => Some(Some(record)),
        _ => None,
    }
}

/// The records a schema writes: itself, or the branches of a top-level union.
pub fn records(schema: &Schema) -> Vec<&apache_avro::schema::RecordSchema> {
    match schema {
        Schema::Record(record) => vec![record],
        Schema::Union(union) => union.variants().iter().flat_map(records).collect(),
        _ => Vec::new(),
    }
}

pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_belongs_to_its_topic_only() {
        assert_eq!(topic_subject("orders-value", "orders"), Some(None));
        assert_eq!(topic_subject("orders-com.x.Placed", "orders"), Some(Some("com.x.Placed")));
        assert_eq!(topic_subject("orders-archive-value", "orders"), None);
        assert_eq!(topic_subject("orders-archive-com.x.Placed", "orders"), None);
        assert_eq!(topic_subject("orders-key", "orders"), None);
        assert_eq!(topic_subject("ordersvalue", "orders"), None);
        assert_eq!(topic_subject("orders-archive-value", "orders-archive"), Some(None));
    }

    #[test]
    fn fingerprints_ignore_formatting_and_docs() {
        let a = Schema::parse_str(r#"{"type":"record","name":"A","fields":[{"name":"x","type":"long","doc":"hi"}]}"#)
            .unwrap();
        let b = Schema::parse_str(
            "{\n \"name\": \"A\", \"type\": \"record\",\n \"fields\": [{\"type\": \"long\", \"name\": \"x\"}]}",
        )
        .unwrap();
        let c = Schema::parse_str(r#"{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}"#).unwrap();
        assert_eq!(fingerprint(&a, &[]), fingerprint(&b, &[]));
        assert_ne!(fingerprint(&a, &[]), fingerprint(&c, &[]));
    }

    #[test]
    fn fingerprints_are_crc_64_avro_with_references_inlined() {
        // The Avro project's published fingerprint of `"int"` (share/test/data/schema-tests.txt).
        assert_eq!(fingerprint(&Schema::Int, &[]), Ok(8_247_732_601_305_521_295));
        let a = r#"{"type":"record","name":"A","fields":[{"name":"x","type":"long"}]}"#;
        // What the catalogue holds: a change here would orphan every stored fingerprint.
        assert_eq!(fingerprint(&Schema::parse_str(a).unwrap(), &[]), Ok(0x643a_5d29_3ad1_7708));
        let (b, references) =
            Schema::parse_str_with_list(r#"{"type":"record","name":"B","fields":[{"name":"a","type":"A"}]}"#, [a])
                .unwrap();
        let inlined =
            Schema::parse_str(&format!(r#"{{"type":"record","name":"B","fields":[{{"name":"a","type":{a}}}]}}"#))
                .unwrap();
        assert_eq!(fingerprint(&b, &references), Ok(0x6801_936b_b8be_ae87));
        assert_eq!(fingerprint(&b, &references), fingerprint(&inlined, &[]));
    }

    #[test]
    fn subjects_are_encoded_for_paths() {
        assert_eq!(encode("users-value"), "users-value");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn permanent_answers_are_remembered_briefly_and_boundedly() {
        let mut cache = NegativeCache::default();
        let start = Instant::now();
        cache.insert(7, RegistryError::NotFound(7), start);
        assert!(matches!(cache.get(7, start + Duration::from_secs(1)), Some(RegistryError::NotFound(7))));
        assert!(cache.get(7, start + NEGATIVE_TTL).is_none(), "expired");
        assert!(cache.entries.is_empty() && cache.order.is_empty());
        for id in 0..(NEGATIVE_CAPACITY as u32 + 10) {
            cache.insert(id, RegistryError::NotFound(id), start);
        }
        assert_eq!(cache.entries.len(), NEGATIVE_CAPACITY);
        assert!(cache.get(0, start).is_none(), "the oldest went first");
        assert!(cache.get(NEGATIVE_CAPACITY as u32 + 9, start).is_some());
    }

    #[test]
    fn missing_ids_are_logged_once_per_interval_with_their_count() {
        let mut cache = NegativeCache::default();
        let start = Instant::now();
        assert_eq!(cache.log_due(start), Some(1));
        assert_eq!(cache.log_due(start + Duration::from_secs(1)), None);
        assert_eq!(cache.log_due(start + Duration::from_secs(2)), None);
        assert_eq!(cache.log_due(start + MISSING_LOG_EVERY + Duration::from_secs(1)), Some(3));
    }

    #[test]
    fn only_definite_answers_are_permanent() {
        assert_eq!(RegistryError::NotFound(3).class(), ErrorClass::Permanent);
        assert_eq!(RegistryError::Unreachable("refused".into()).class(), ErrorClass::Transient);
        let status = RegistryError::Status { status: 404, code: Some(40401), message: String::new() };
        assert_eq!(status.class(), ErrorClass::Transient);
    }
}
