//! The Confluent Schema Registry HTTP API (Avro schemas), over [`store`].
//!
//! Error bodies, codes and texts follow Confluent (`Errors.java`):
//! `{"error_code": 40401, "message": "…"}` with 40401 subject, 40402
//! version, 40403 schema not found, 40404/40406 soft-deleted, 40405/40407
//! not soft-deleted first, 40408 no subject-level config, 40409 no
//! subject-level mode, 409 incompatible, 42201 invalid schema, 42202
//! invalid version, 42203 invalid compatibility level, 42204 invalid mode,
//! 42205 read-only, 42206 referenced, 50001 store; routes, methods and
//! media types it does not serve get the HTTP status as the code.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value as Json};
use sqlx::PgConnection;

use crate::canonical::normalize;
use crate::compat::{self, Level};
use crate::resolution::Parsed;
use crate::store::{self, Setting, Store, StoredSchema, StoredVersion};
use crate::wire::{SchemaReference, CONTENT_TYPE};

const DEFAULT_LEVEL: Level = Level::Backward;

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
}

/// The routes behind content negotiation, then access control (and the
/// audit log), then the server's limits (outermost: counted first).
pub fn router(store: Store, access: Arc<crate::auth::Access>, limits: &kawka_http::Limits) -> Router {
    let routes = Router::new()
        .route("/", get(|| async { reply(json!({})) }))
        .route("/mode", get(get_global_mode).put(put_global_mode))
        .route("/mode/{subject}", get(get_subject_mode).put(put_subject_mode).delete(delete_subject_mode))
        .route("/schemas", get(list_schemas))
        .route("/schemas/types", get(|| async { reply(json!(["AVRO"])) }))
        // One context, the default one (Confluent's clients ask).
        .route("/contexts", get(|| async { reply(json!(["."])) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(versions_of_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_of_id))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(get_version_schema))
        .route("/subjects/{subject}/versions/{version}/referencedby", get(referenced_by))
        .route("/config", get(get_global_config).put(put_global_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config).delete(delete_subject_config))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(check_compatibility))
        .route("/compatibility/subjects/{subject}/versions", post(check_compatibility_all))
        .fallback(|| async { ApiError::http(StatusCode::NOT_FOUND) })
        .method_not_allowed_fallback(|| async { ApiError::http(StatusCode::METHOD_NOT_ALLOWED) })
        .layer(axum::middleware::from_fn(negotiate))
        // The body is bounded by `read_bodies` below; a Latin-1 body
        // converted to UTF-8 may grow to twice its size.
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes.saturating_mul(2)))
        .with_state(Arc::new(ApiState { store }));
    // Outermost first: the cap, then who is asking, then their body.
    let routes = kawka_http::read_bodies(routes, limits, refusal)
        .layer(axum::middleware::from_fn_with_state(access, crate::auth::access));
    kawka_http::cap(routes, limits, refusal)
}

/// A refusal of the server's limits, in Confluent's error body.
fn refusal(status: StatusCode, message: &'static str) -> Response {
    ApiError::new(status, i64::from(status.as_u16()), message).into_response()
}

/// The media types the API speaks, best first.
const MEDIA_TYPES: [&str; 3] = [CONTENT_TYPE, "application/vnd.schemaregistry+json", "application/json"];

/// Content negotiation as Confluent's server does it: the response's type
/// is the acceptable one the client weighs highest (`Accept` with
/// q-values; none acceptable: 406); a request body must be JSON in one
/// of the API's types (or `application/octet-stream`, which Confluent's
/// clients have sent), else 415; a charset other than UTF-8 (or its
/// ASCII subset, or Latin-1, converted) is refused.
async fn negotiate(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    // An empty `Accept` is no preference, as a missing one.
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(str::to_string);
    let chosen = match accept.as_deref().map(choose_media_type) {
        None => CONTENT_TYPE,
        Some(Some(chosen)) => chosen,
        Some(None) => return ApiError::http(StatusCode::NOT_ACCEPTABLE).into_response(),
    };
    let request = match request_body_type(&request) {
        Ok(BodyCharset::Utf8) => request,
        Ok(BodyCharset::Latin1) => {
            let (parts, body) = request.into_parts();
            // Already read, and bounded, by `kawka_http::read_bodies` (outside).
            let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
                return ApiError::http(StatusCode::PAYLOAD_TOO_LARGE).into_response();
            };
            let text: String = bytes.iter().map(|&b| char::from(b)).collect();
            axum::extract::Request::from_parts(parts, axum::body::Body::from(text))
        }
        Err(status) => return ApiError::http(status).into_response(),
    };
    let mut response = next.run(request).await;
    if let Ok(value) = header::HeaderValue::from_str(chosen) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

enum BodyCharset {
    Utf8,
    Latin1,
}

/// The charset of a request's body, if its type is one the API reads.
fn request_body_type(request: &axum::extract::Request) -> Result<BodyCharset, StatusCode> {
    let Some(content_type) = request.headers().get(header::CONTENT_TYPE) else { return Ok(BodyCharset::Utf8) };
    let content_type = content_type.to_str().map_err(|_| StatusCode::UNSUPPORTED_MEDIA_TYPE)?;
    let mut parts = content_type.split(';').map(str::trim);
    let essence = parts.next().unwrap_or_default().to_ascii_lowercase();
    if !MEDIA_TYPES.contains(&essence.as_str()) && essence != "application/octet-stream" {
        return Err(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let charset = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
        .map(|(_, v)| v.trim().trim_matches('"').to_ascii_lowercase());
    match charset.as_deref() {
        None | Some("utf-8" | "utf8" | "us-ascii" | "ascii") => Ok(BodyCharset::Utf8),
        Some("iso-8859-1" | "latin1" | "latin-1") => Ok(BodyCharset::Latin1),
        Some(_) => Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
    }
}

/// The media type to answer in for an `Accept` header: the acceptable one
/// with the highest q-value (ties: the API's preference); `None` when the
/// client accepts none of them.
fn choose_media_type(accept: &str) -> Option<&'static str> {
    // Each of our types gets the q-value of the most specific range that
    // names it (exact, then `application/*`, then `*/*`), as RFC 9110 says.
    let mut weights: [Option<(u8, f32)>; MEDIA_TYPES.len()] = [None; MEDIA_TYPES.len()];
    for item in accept.split(',') {
        let mut parts = item.split(';').map(str::trim);
        let range = parts.next().unwrap_or_default().to_ascii_lowercase();
        let mut q = 1.0;
        for (key, value) in parts.filter_map(|p| p.split_once('=')) {
            if key.trim().eq_ignore_ascii_case("q") {
                // A q-value that does not read is no weight at all.
                q = value.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q)).unwrap_or(0.0);
            }
        }
        for (index, media_type) in MEDIA_TYPES.iter().enumerate() {
            let specificity = match range.as_str() {
                "*/*" => 0,
                "application/*" => 1,
                exact if exact == *media_type => 2,
                _ => continue,
            };
            if weights[index].is_none_or(|(known, _)| specificity > known) {
                weights[index] = Some((specificity, q));
            }
        }
    }
    let mut best: Option<(f32, usize)> = None;
    for (index, weight) in weights.iter().enumerate() {
        if let Some((_, q)) = *weight {
            if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, index));
            }
        }
    }
    best.map(|(_, index)| MEDIA_TYPES[index])
}

type Shared = State<Arc<ApiState>>;
type ApiResult = Result<Response, ApiError>;

/// A Confluent error reply.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: i64,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: i64, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    fn subject_not_found(subject: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."))
    }

    fn version_not_found(version: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 40402, format!("Version {version} not found."))
    }

    fn schema_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 40403, "Schema not found")
    }

    fn schema_id_not_found(id: i32) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found"))
    }

    /// What Confluent's server answers for a route, method or media type
    /// it does not serve: the HTTP status as the error code.
    fn http(status: StatusCode) -> ApiError {
        let reason = status.canonical_reason().unwrap_or("Error");
        ApiError::new(status, i64::from(status.as_u16()), format!("HTTP {} {reason}", status.as_u16()))
    }

    fn read_only(subject: &str) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42205, format!("Subject {subject} is in read-only mode"))
    }

    fn referenced(subject: &str, version: i32) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42206,
            format!("One or more references exist to the schema {{magic=1,keytype=SCHEMA,subject={subject},version={version}}}."),
        )
    }

    fn invalid_schema(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42201, format!("Invalid schema: {message}"))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        tracing::error!(%error, "registry store failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, 50001, "Error in the backend data store")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        with_status(self.status, json!({"error_code": self.code, "message": self.message}))
    }
}

fn reply(body: Json) -> Response {
    with_status(StatusCode::OK, body)
}

fn with_status(status: StatusCode, body: Json) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

/// Boolean query flags (`deleted`, `permanent`, `verbose`,
/// `defaultToGlobal`). Read leniently: clients send `true`, `True` or `1`.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
struct Flags(HashMap<String, String>);

impl Flags {
    fn get(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }
}

/// The body of register, lookup and compatibility requests. Unknown fields
/// (`metadata`, `ruleSet`) are accepted and ignored.
#[derive(Debug, Deserialize)]
struct SchemaRequest {
    schema: Option<String>,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<SchemaReference>,
}

/// A requested schema, checked and normalized.
struct Candidate {
    /// The JSON text with object keys sorted and no whitespace: two
    /// spellings of one schema get one id.
    normalized: String,
    schema: Parsed,
    references: Vec<SchemaReference>,
}

enum VersionSelector {
    Latest,
    Number(i32),
}

fn parse_version(text: &str) -> Result<VersionSelector, ApiError> {
    match text {
        "latest" | "-1" => Ok(VersionSelector::Latest),
        other => match other.parse::<i32>() {
            Ok(number) if number > 0 => Ok(VersionSelector::Number(number)),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                42202,
                format!(
                    "The specified version '{other}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
                ),
            )),
        },
    }
}

/// A schema id from a path; not an integer: the route does not exist
/// (Confluent's server answers its plain 404).
fn parse_id(text: &str) -> Result<i32, ApiError> {
    text.parse().map_err(|_| ApiError::http(StatusCode::NOT_FOUND))
}

/// Texts of `references` and their own references, dependencies first.
fn resolve_references<'a>(
    connection: &'a mut PgConnection,
    references: &'a [SchemaReference],
    out: &'a mut Vec<String>,
    depth: usize,
) -> BoxFuture<'a, Result<(), ApiError>> {
    Box::pin(async move {
        if depth > 32 {
            return Err(ApiError::invalid_schema("schema references nest too deep"));
        }
        for reference in references {
            // Inside a registration's transaction, the referenced subject
            // stays as it is until the registration commits (a delete of
            // the referenced version waits, then sees the referrer).
            store::lock_subject(connection, &reference.subject).await?;
            let versions = store::versions(connection, &reference.subject, false).await?;
            let Some(found) = versions.into_iter().find(|v| v.version == reference.version) else {
                return Err(ApiError::invalid_schema(format!(
                    "reference {} to subject '{}' version {} not found",
                    reference.name, reference.subject, reference.version
                )));
            };
            resolve_references(connection, &found.schema.references, out, depth + 1).await?;
            if !out.contains(&found.schema.schema) {
                out.push(found.schema.schema);
            }
        }
        Ok(())
    })
}

/// A schema with the schemas it references (compatibility resolves the
/// references through them).
async fn parse_with_references(
    connection: &mut PgConnection,
    text: &str,
    references: &[SchemaReference],
) -> Result<Parsed, ApiError> {
    if references.is_empty() {
        let schema = Schema::parse_str(text).map_err(ApiError::invalid_schema)?;
        return Ok(Parsed { schema, references: Vec::new() });
    }
    let mut texts = Vec::new();
    resolve_references(connection, references, &mut texts, 0).await?;
    let (schema, references) = Schema::parse_str_with_list(text, &texts).map_err(ApiError::invalid_schema)?;
    Ok(Parsed { schema, references })
}

async fn prepare(connection: &mut PgConnection, body: &Bytes) -> Result<Candidate, ApiError> {
    let request: SchemaRequest = serde_json::from_slice(body).map_err(ApiError::invalid_schema)?;
    if let Some(kind) = request.schema_type.as_deref().filter(|k| !k.eq_ignore_ascii_case("AVRO")) {
        return Err(ApiError::invalid_schema(format!(
            "schema type {kind} is not supported; this registry stores Avro"
        )));
    }
    let text = request.schema.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Empty schema"));
    }
    let json: Json = serde_json::from_str(&text).map_err(ApiError::invalid_schema)?;
    check_shape(&json, 0).map_err(ApiError::invalid_schema)?;
    let schema = parse_with_references(connection, &text, &request.references).await?;
    // Stored as sent (keys sorted); identity is computed from it by the
    // store (`canonical`): one schema however spelled.
    Ok(Candidate { normalized: normalize(&json), schema, references: request.references })
}

/// How deep schemas may nest (a record's field of a record's field …,
/// arrays, maps and unions counting too): real schemas nest a few levels;
/// parsers and decoders recurse once per level.
pub const MAX_SCHEMA_DEPTH: usize = 64;

/// The largest precision (and so scale) of a `decimal`: a decoder writes
/// up to that many digits for every value.
pub const MAX_DECIMAL_PRECISION: u64 = 1000;

/// Refuses what a parser or decoder should not be asked to hold: nesting
/// past [`MAX_SCHEMA_DEPTH`], decimals past [`MAX_DECIMAL_PRECISION`].
fn check_shape(json: &Json, depth: usize) -> Result<(), String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!("schema nests deeper than {MAX_SCHEMA_DEPTH} levels"));
    }
    match json {
        Json::Array(branches) => branches.iter().try_for_each(|b| check_shape(b, depth + 1)),
        Json::Object(object) => {
            if object.get("logicalType").and_then(Json::as_str) == Some("decimal") {
                for key in ["precision", "scale"] {
                    let too_large = match object.get(key) {
                        Some(Json::Number(n)) => n.as_u64().is_none_or(|n| n > MAX_DECIMAL_PRECISION),
                        _ => false,
                    };
                    if too_large {
                        return Err(format!("decimal {key} must be a whole number up to {MAX_DECIMAL_PRECISION}"));
                    }
                }
            }
            for key in ["type", "items", "values"] {
                if let Some(inner) = object.get(key).filter(|v| !v.is_string()) {
                    check_shape(inner, depth + 1)?;
                }
            }
            for field in object.get("fields").and_then(Json::as_array).into_iter().flatten() {
                if let Some(inner) = field.get("type") {
                    check_shape(inner, depth + 1)?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn level_of(connection: &mut PgConnection, subject: &str) -> Result<Level, ApiError> {
    let level = match store::setting(connection, Setting::Compatibility, subject).await? {
        Some(level) => Some(level),
        None => store::setting(connection, Setting::Compatibility, "").await?,
    };
    Ok(level.and_then(|l| l.parse().ok()).unwrap_or(DEFAULT_LEVEL))
}

async fn parse_stored(connection: &mut PgConnection, stored: &StoredSchema) -> Result<Parsed, ApiError> {
    parse_with_references(connection, &stored.schema, &stored.references).await.map_err(|error| {
        tracing::error!(id = stored.id, message = %error.message, "stored schema no longer parses");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, 50001, "Error in the backend data store")
    })
}

fn schema_body(stored: &StoredSchema) -> serde_json::Map<String, Json> {
    let mut body = serde_json::Map::new();
    body.insert("schema".into(), json!(stored.schema));
    if !stored.references.is_empty() {
        body.insert("references".into(), json!(stored.references));
    }
    if stored.schema_type != "AVRO" {
        body.insert("schemaType".into(), json!(stored.schema_type));
    }
    body
}

fn version_body(version: &StoredVersion) -> Json {
    let mut body = schema_body(&version.schema);
    body.insert("subject".into(), json!(version.subject));
    body.insert("version".into(), json!(version.version));
    body.insert("id".into(), json!(version.schema.id));
    Json::Object(body)
}

async fn schema_by_id(State(state): Shared, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    let stored = store::schema_by_id(&mut connection, id).await?.ok_or(ApiError::schema_id_not_found(id))?;
    Ok(reply(Json::Object(schema_body(&stored))))
}

async fn raw_schema_by_id(State(state): Shared, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    let stored = store::schema_by_id(&mut connection, id).await?.ok_or(ApiError::schema_id_not_found(id))?;
    Ok(reply(serde_json::from_str(&stored.schema).unwrap_or(Json::String(stored.schema))))
}

async fn versions_of_id(State(state): Shared, Path(id): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    store::schema_by_id(&mut connection, id).await?.ok_or(ApiError::schema_id_not_found(id))?;
    let usages = store::usages(&mut connection, id, flags.get("deleted")).await?;
    Ok(reply(json!(usages.iter().map(|(s, v)| json!({"subject": s, "version": v})).collect::<Vec<_>>())))
}

async fn subjects_of_id(State(state): Shared, Path(id): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    store::schema_by_id(&mut connection, id).await?.ok_or(ApiError::schema_id_not_found(id))?;
    let mut subjects: Vec<String> =
        store::usages(&mut connection, id, flags.get("deleted")).await?.into_iter().map(|(s, _)| s).collect();
    subjects.dedup();
    Ok(reply(json!(subjects)))
}

async fn list_subjects(State(state): Shared, Query(flags): Query<Flags>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    Ok(reply(json!(store::subjects(&mut connection, flags.get("deleted")).await?)))
}

async fn list_versions(State(state): Shared, Path(subject): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let versions = store::versions(&mut connection, &subject, flags.get("deleted")).await?;
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    Ok(reply(json!(versions.iter().map(|v| v.version).collect::<Vec<_>>())))
}

/// The version a selector names, with Confluent's not-found errors.
async fn find_version(
    connection: &mut PgConnection,
    subject: &str,
    selector: &str,
    include_deleted: bool,
) -> Result<StoredVersion, ApiError> {
    let wanted = parse_version(selector)?;
    let all = store::versions(connection, subject, true).await?;
    // A subject whose versions are all soft-deleted is not found.
    if all.is_empty() || !include_deleted && all.iter().all(|v| v.deleted) {
        return Err(ApiError::subject_not_found(subject));
    }
    let visible = all.into_iter().filter(|v| include_deleted || !v.deleted);
    let found = match wanted {
        VersionSelector::Latest => visible.max_by_key(|v| v.version),
        VersionSelector::Number(number) => visible.into_iter().find(|v| v.version == number),
    };
    found.ok_or_else(|| ApiError::version_not_found(selector))
}

async fn get_version(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let found = find_version(&mut connection, &subject, &version, flags.get("deleted")).await?;
    Ok(reply(version_body(&found)))
}

async fn get_version_schema(State(state): Shared, Path((subject, version)): Path<(String, String)>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let found = find_version(&mut connection, &subject, &version, false).await?;
    Ok(reply(serde_json::from_str(&found.schema.schema).unwrap_or(Json::String(found.schema.schema))))
}

async fn referenced_by(State(state): Shared, Path((subject, version)): Path<(String, String)>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let found = find_version(&mut connection, &subject, &version, false).await?;
    Ok(reply(json!(store::referenced_by(&mut connection, &subject, found.version).await?)))
}

async fn register(State(state): Shared, Path(subject): Path<String>, body: Bytes) -> ApiResult {
    let mut transaction = state.store.begin().await?;
    store::lock_subject(&mut transaction, &subject).await?;
    let candidate = prepare(&mut transaction, &body).await?;
    let existing = store::versions(&mut transaction, &subject, false).await?;
    let known = store::find_schema(&mut transaction, "AVRO", &candidate.normalized, &candidate.references).await?;
    // Registered already: its id, read-only or not (producers register on
    // every start).
    if let Some(found) = existing.iter().find(|v| Some(v.schema.id) == known) {
        return Ok(reply(json!({"id": found.schema.id, "subject": subject, "version": found.version})));
    }
    if read_only(&mut transaction, &subject).await? {
        return Err(ApiError::read_only(&subject));
    }
    let level = level_of(&mut transaction, &subject).await?;
    if level != Level::None && !existing.is_empty() {
        let mut schemas = Vec::with_capacity(existing.len());
        for version in &existing {
            schemas.push(parse_stored(&mut transaction, &version.schema).await?);
        }
        if let Err(refusals) = compat::check(level, &candidate.schema, &schemas) {
            let details = compat::messages(level, &refusals, |i| (existing[i].version, &existing[i].schema.schema));
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]",
                    details.join(", ")
                ),
            ));
        }
    }
    let id =
        store::find_or_insert_schema(&mut transaction, "AVRO", &candidate.normalized, &candidate.references).await?;
    let version = store::insert_version(&mut transaction, &subject, id).await?;
    transaction.commit().await?;
    tracing::info!(subject = %subject, id, version, "schema registered");
    Ok(reply(json!({"id": id, "subject": subject, "version": version})))
}

async fn lookup(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let candidate = prepare(&mut connection, &body).await?;
    let versions = store::versions(&mut connection, &subject, flags.get("deleted")).await?;
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let known = store::find_schema(&mut connection, "AVRO", &candidate.normalized, &candidate.references).await?;
    let found = versions.iter().rev().find(|v| Some(v.schema.id) == known).ok_or_else(ApiError::schema_not_found)?;
    Ok(reply(version_body(found)))
}

async fn delete_subject(State(state): Shared, Path(subject): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let mut transaction = state.store.begin().await?;
    store::lock_subject(&mut transaction, &subject).await?;
    if read_only(&mut transaction, &subject).await? {
        return Err(ApiError::read_only(&subject));
    }
    let all = store::versions(&mut transaction, &subject, true).await?;
    if all.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    let permanent = flags.get("permanent");
    for version in all.iter().filter(|v| permanent || !v.deleted) {
        if store::is_referenced(&mut transaction, &subject, version.version, permanent).await? {
            return Err(ApiError::referenced(&subject, version.version));
        }
    }
    let live = all.iter().any(|v| !v.deleted);
    let deleted = if flags.get("permanent") {
        if live {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40405,
                format!("Subject '{subject}' was not deleted first before being permanently deleted"),
            ));
        }
        store::delete_setting(&mut transaction, Setting::Compatibility, &subject).await?;
        store::delete_setting(&mut transaction, Setting::Mode, &subject).await?;
        store::delete_permanently(&mut transaction, &subject, None).await?
    } else {
        if !live {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40404,
                format!("Subject '{subject}' was soft deleted.Set permanent=true to delete permanently"),
            ));
        }
        store::set_deleted(&mut transaction, &subject, None).await?
    };
    transaction.commit().await?;
    Ok(reply(json!(deleted)))
}

async fn delete_version(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let mut transaction = state.store.begin().await?;
    store::lock_subject(&mut transaction, &subject).await?;
    if read_only(&mut transaction, &subject).await? {
        return Err(ApiError::read_only(&subject));
    }
    // `latest` of a soft delete is the latest live version; a number may
    // name a soft-deleted one (to say so, or to delete it for good).
    let permanent = flags.get("permanent");
    let live_only = matches!(parse_version(&version)?, VersionSelector::Latest);
    let found = find_version(&mut transaction, &subject, &version, !live_only).await?;
    if store::is_referenced(&mut transaction, &subject, found.version, permanent).await? {
        return Err(ApiError::referenced(&subject, found.version));
    }
    if permanent {
        if !found.deleted {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40407,
                format!(
                    "Subject '{subject}' Version {} was not deleted first before being permanently deleted",
                    found.version
                ),
            ));
        }
        store::delete_permanently(&mut transaction, &subject, Some(found.version)).await?;
    } else {
        if found.deleted {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40406,
                format!(
                    "Subject '{subject}' Version {} was soft deleted.Set permanent=true to delete permanently",
                    found.version
                ),
            ));
        }
        store::set_deleted(&mut transaction, &subject, Some(found.version)).await?;
    }
    transaction.commit().await?;
    Ok(reply(json!(found.version)))
}

#[derive(Debug, Deserialize)]
struct ConfigRequest {
    compatibility: Option<String>,
    #[serde(rename = "compatibilityLevel")]
    compatibility_level: Option<String>,
}

fn requested_level(body: &Bytes) -> Result<Level, ApiError> {
    let invalid = || {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, \
             backward_transitive, forward_transitive, and full_transitive",
        )
    };
    let request: ConfigRequest = serde_json::from_slice(body).map_err(|_| invalid())?;
    let text = request.compatibility.or(request.compatibility_level).unwrap_or_default();
    text.parse().map_err(|_| invalid())
}

async fn get_global_config(State(state): Shared) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let level = store::setting(&mut connection, Setting::Compatibility, "")
        .await?
        .unwrap_or_else(|| DEFAULT_LEVEL.name().to_string());
    Ok(reply(json!({"compatibilityLevel": level})))
}

async fn put_global_config(State(state): Shared, body: Bytes) -> ApiResult {
    let level = requested_level(&body)?;
    let mut connection = state.store.pool().acquire().await?;
    store::set_setting(&mut connection, Setting::Compatibility, "", level.name()).await?;
    Ok(reply(json!({"compatibility": level.name()})))
}

async fn get_subject_config(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let level = match store::setting(&mut connection, Setting::Compatibility, &subject).await? {
        Some(level) => level,
        None if flags.get("defaultToGlobal") => level_of(&mut connection, &subject).await?.name().to_string(),
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                40408,
                format!("Subject '{subject}' does not have subject-level compatibility configured"),
            ))
        }
    };
    Ok(reply(json!({"compatibilityLevel": level})))
}

async fn put_subject_config(State(state): Shared, Path(subject): Path<String>, body: Bytes) -> ApiResult {
    let level = requested_level(&body)?;
    let mut connection = state.store.pool().acquire().await?;
    if read_only(&mut connection, &subject).await? {
        return Err(ApiError::read_only(&subject));
    }
    store::set_setting(&mut connection, Setting::Compatibility, &subject, level.name()).await?;
    Ok(reply(json!({"compatibility": level.name()})))
}

async fn delete_subject_config(State(state): Shared, Path(subject): Path<String>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    if read_only(&mut connection, &subject).await? {
        return Err(ApiError::read_only(&subject));
    }
    match store::delete_setting(&mut connection, Setting::Compatibility, &subject).await? {
        Some(level) => Ok(reply(json!({"compatibilityLevel": level}))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )),
    }
}

/// `POST /compatibility/subjects/{s}/versions/{v}`: against that version
/// alone, whatever the level (a missing subject or version is not found,
/// except `latest` of a missing subject: compatible, nothing to break).
async fn check_compatibility(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    compatibility(&state, &subject, Some(&version), &flags, &body).await
}

/// `POST /compatibility/subjects/{s}/versions`: against the versions the
/// subject's level names (every live one when transitive, else the latest).
async fn check_compatibility_all(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    compatibility(&state, &subject, None, &flags, &body).await
}

async fn compatibility(
    state: &ApiState,
    subject: &str,
    version: Option<&str>,
    flags: &Flags,
    body: &Bytes,
) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let candidate = prepare(&mut connection, body).await?;
    let level = level_of(&mut connection, subject).await?;
    let live = store::versions(&mut connection, subject, false).await?;
    let against: Vec<StoredVersion> = match version.map(parse_version).transpose()? {
        // Every version the level reads (`check` keeps the latest of a
        // non-transitive level).
        None => live,
        Some(VersionSelector::Latest) => live.into_iter().last().into_iter().collect(),
        // (Confluent answers a missing version of a missing subject with 40402 too.)
        Some(VersionSelector::Number(number)) => match live.into_iter().find(|v| v.version == number) {
            Some(found) => vec![found],
            None => return Err(ApiError::version_not_found(&number.to_string())),
        },
    };
    let mut schemas = Vec::with_capacity(against.len());
    for version in &against {
        schemas.push(parse_stored(&mut connection, &version.schema).await?);
    }
    let result = compat::check(level, &candidate.schema, &schemas);
    let mut body = json!({"is_compatible": result.is_ok()});
    if flags.get("verbose") {
        let refusals = result.err().unwrap_or_default();
        let messages = compat::messages(level, &refusals, |i| (against[i].version, &against[i].schema.schema));
        body["messages"] = json!(messages);
    }
    Ok(reply(body))
}

/// `GET /schemas`: every schema version, filtered and paged.
async fn list_schemas(State(state): Shared, Query(query): Query<HashMap<String, String>>) -> ApiResult {
    let flag = |name: &str| query.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let number = |name: &str, default: i64| query.get(name).and_then(|v| v.parse::<i64>().ok()).unwrap_or(default);
    let prefix = query.get("subjectPrefix").map(String::as_str).unwrap_or_default();
    let mut connection = state.store.pool().acquire().await?;
    let mut versions: Vec<StoredVersion> = store::all_versions(&mut connection, flag("deleted"))
        .await?
        .into_iter()
        .filter(|v| v.subject.starts_with(prefix))
        .collect();
    if flag("latestOnly") {
        // Sorted by subject then version: the last of each subject.
        let mut latest: Vec<StoredVersion> = Vec::new();
        for version in versions {
            match latest.last_mut() {
                Some(last) if last.subject == version.subject => *last = version,
                _ => latest.push(version),
            }
        }
        versions = latest;
    }
    let offset = usize::try_from(number("offset", 0)).unwrap_or(0);
    let limit = usize::try_from(number("limit", -1)).unwrap_or(usize::MAX);
    let page: Vec<Json> = versions.iter().skip(offset).take(limit).map(version_body).collect();
    Ok(reply(json!(page)))
}

/// The modes a registry or subject can be in.
const MODES: [&str; 3] = ["READWRITE", "READONLY", "READONLY_OVERRIDE"];

/// Whether `subject` (or, without its own mode, the registry) is read-only.
async fn read_only(connection: &mut PgConnection, subject: &str) -> Result<bool, ApiError> {
    let mode = match store::setting(connection, Setting::Mode, subject).await? {
        Some(mode) => Some(mode),
        None => store::setting(connection, Setting::Mode, "").await?,
    };
    Ok(mode.is_some_and(|m| m.starts_with("READONLY")))
}

fn requested_mode(body: &Bytes) -> Result<&'static str, ApiError> {
    #[derive(Deserialize)]
    struct ModeRequest {
        mode: Option<String>,
    }
    let invalid = || {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42204,
            "Invalid mode. Valid values are READWRITE, READONLY, READONLY_OVERRIDE",
        )
    };
    let request: ModeRequest = serde_json::from_slice(body).map_err(|_| invalid())?;
    let mode = request.mode.unwrap_or_default().to_ascii_uppercase();
    MODES.iter().copied().find(|m| *m == mode).ok_or_else(invalid)
}

async fn get_global_mode(State(state): Shared) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let mode = store::setting(&mut connection, Setting::Mode, "").await?.unwrap_or_else(|| "READWRITE".into());
    Ok(reply(json!({"mode": mode})))
}

async fn put_global_mode(State(state): Shared, body: Bytes) -> ApiResult {
    let mode = requested_mode(&body)?;
    let mut connection = state.store.pool().acquire().await?;
    store::set_setting(&mut connection, Setting::Mode, "", mode).await?;
    Ok(reply(json!({"mode": mode})))
}

fn mode_not_configured(subject: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        40409,
        format!("Subject '{subject}' does not have subject-level mode configured"),
    )
}

async fn get_subject_mode(State(state): Shared, Path(subject): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let mode = match store::setting(&mut connection, Setting::Mode, &subject).await? {
        Some(mode) => mode,
        None if flags.get("defaultToGlobal") => {
            store::setting(&mut connection, Setting::Mode, "").await?.unwrap_or_else(|| "READWRITE".into())
        }
        None => return Err(mode_not_configured(&subject)),
    };
    Ok(reply(json!({"mode": mode})))
}

async fn put_subject_mode(State(state): Shared, Path(subject): Path<String>, body: Bytes) -> ApiResult {
    let mode = requested_mode(&body)?;
    let mut connection = state.store.pool().acquire().await?;
    store::set_setting(&mut connection, Setting::Mode, &subject, mode).await?;
    Ok(reply(json!({"mode": mode})))
}

async fn delete_subject_mode(State(state): Shared, Path(subject): Path<String>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    match store::delete_setting(&mut connection, Setting::Mode, &subject).await? {
        Some(mode) => Ok(reply(json!({"mode": mode}))),
        None => Err(mode_not_configured(&subject)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_ignores_key_order_and_spacing() {
        let a: Json =
            serde_json::from_str(r#"{"type": "record", "name": "A", "fields": [{"name": "x", "type": "int"}]}"#)
                .unwrap();
        let b: Json = serde_json::from_str(
            "{\"fields\":[{\"type\":\"int\",\"name\":\"x\"}],\n \"name\":\"A\",\"type\":\"record\"}",
        )
        .unwrap();
        assert_eq!(normalize(&a), normalize(&b));
        assert_eq!(normalize(&a), r#"{"fields":[{"name":"x","type":"int"}],"name":"A","type":"record"}"#);
    }

    #[test]
    fn the_media_type_is_the_acceptable_one_weighed_highest() {
        assert_eq!(choose_media_type("application/json"), Some("application/json"));
        assert_eq!(choose_media_type("*/*"), Some(CONTENT_TYPE));
        assert_eq!(
            choose_media_type("application/json; q=0.9, application/vnd.schemaregistry+json; q=1.0"),
            Some("application/vnd.schemaregistry+json")
        );
        assert_eq!(choose_media_type("application/vnd.schemaregistry.v1+json, application/json"), Some(CONTENT_TYPE));
        assert_eq!(choose_media_type("text/html"), None);
        assert_eq!(choose_media_type("application/json;q=0, text/plain"), None);
        // The most specific range decides: v1+json refused, the others by */*.
        assert_eq!(
            choose_media_type("application/vnd.schemaregistry.v1+json;q=0, */*"),
            Some("application/vnd.schemaregistry+json")
        );
        assert_eq!(choose_media_type("application/*;q=0.5, */*;q=0.1"), Some(CONTENT_TYPE));
        assert_eq!(choose_media_type("application/json;Q=0.5, */*;q=0.1"), Some("application/json"));
    }

    #[test]
    fn versions_parse_like_confluent() {
        assert!(matches!(parse_version("latest"), Ok(VersionSelector::Latest)));
        assert!(matches!(parse_version("-1"), Ok(VersionSelector::Latest)));
        assert!(matches!(parse_version("3"), Ok(VersionSelector::Number(3))));
        assert_eq!(parse_version("0").err().map(|e| e.code), Some(42202));
        assert_eq!(parse_version("first").err().map(|e| e.code), Some(42202));
    }
}
