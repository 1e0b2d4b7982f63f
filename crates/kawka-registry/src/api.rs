//! The Confluent Schema Registry HTTP API (Avro schemas), over [`store`].
//!
//! Error bodies and codes follow Confluent: `{"error_code": 40401,
//! "message": "…"}` with 40401 subject, 40402 version, 40403 schema not
//! found, 40404/40406 soft-deleted, 40405/40407 not soft-deleted first,
//! 40408 no subject-level config, 409 incompatible, 42201 invalid schema,
//! 42202 invalid version, 42203 invalid compatibility level, 50001 store.

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

use crate::compat::{self, Level};
use crate::store::{self, Store, StoredSchema, StoredVersion};
use crate::wire::{SchemaReference, CONTENT_TYPE};

const DEFAULT_LEVEL: Level = Level::Backward;

#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
}

pub fn router(store: Store) -> Router {
    Router::new()
        .route("/", get(|| async { reply(json!({})) }))
        .route("/mode", get(|| async { reply(json!({"mode": "READWRITE"})) }))
        .route("/schemas/types", get(|| async { reply(json!(["AVRO"])) }))
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
        .with_state(Arc::new(ApiState { store }))
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

    fn version_not_found(subject: &str, version: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 40402, format!("Version {version} not found for subject '{subject}'."))
    }

    fn schema_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 40403, "Schema not found")
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
    schema: Schema,
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

fn parse_id(text: &str) -> Result<i32, ApiError> {
    text.parse().map_err(|_| ApiError::schema_not_found())
}

/// Object keys sorted recursively, compact.
fn normalize(json: &Json) -> String {
    fn sorted(json: &Json) -> Json {
        match json {
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut out = serde_json::Map::new();
                for (key, value) in entries {
                    out.insert(key.clone(), sorted(value));
                }
                Json::Object(out)
            }
            Json::Array(items) => Json::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    // serde_json keeps insertion order when some crate enables
    // `preserve_order`, so sort explicitly rather than rely on BTreeMap.
    sorted(json).to_string()
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

async fn parse_with_references(
    connection: &mut PgConnection,
    text: &str,
    references: &[SchemaReference],
) -> Result<Schema, ApiError> {
    if references.is_empty() {
        return Schema::parse_str(text).map_err(ApiError::invalid_schema);
    }
    let mut texts = Vec::new();
    resolve_references(connection, references, &mut texts, 0).await?;
    Schema::parse_str_with_list(text, &texts).map(|(schema, _)| schema).map_err(ApiError::invalid_schema)
}

async fn prepare(connection: &mut PgConnection, body: &Bytes) -> Result<Candidate, ApiError> {
    let request: SchemaRequest = serde_json::from_slice(body).map_err(ApiError::invalid_schema)?;
    if let Some(kind) = request.schema_type.as_deref().filter(|k| !k.eq_ignore_ascii_case("AVRO")) {
        return Err(ApiError::invalid_schema(format!(
            "schema type {kind} is not supported; this registry stores Avro"
        )));
    }
    let text = request.schema.ok_or_else(|| ApiError::invalid_schema("the request has no `schema`"))?;
    let json: Json = serde_json::from_str(&text).map_err(ApiError::invalid_schema)?;
    let schema = parse_with_references(connection, &text, &request.references).await?;
    Ok(Candidate { normalized: normalize(&json), schema, references: request.references })
}

async fn level_of(connection: &mut PgConnection, subject: &str) -> Result<Level, ApiError> {
    let level = match store::compatibility(connection, subject).await? {
        Some(level) => Some(level),
        None => store::compatibility(connection, "").await?,
    };
    Ok(level.and_then(|l| l.parse().ok()).unwrap_or(DEFAULT_LEVEL))
}

async fn parse_stored(connection: &mut PgConnection, stored: &StoredSchema) -> Result<Schema, ApiError> {
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
    let stored = store::schema_by_id(&mut connection, id).await?.ok_or_else(ApiError::schema_not_found)?;
    Ok(reply(Json::Object(schema_body(&stored))))
}

async fn raw_schema_by_id(State(state): Shared, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    let stored = store::schema_by_id(&mut connection, id).await?.ok_or_else(ApiError::schema_not_found)?;
    Ok(reply(serde_json::from_str(&stored.schema).unwrap_or(Json::String(stored.schema))))
}

async fn versions_of_id(State(state): Shared, Path(id): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    store::schema_by_id(&mut connection, id).await?.ok_or_else(ApiError::schema_not_found)?;
    let usages = store::usages(&mut connection, id, flags.get("deleted")).await?;
    Ok(reply(json!(usages.iter().map(|(s, v)| json!({"subject": s, "version": v})).collect::<Vec<_>>())))
}

async fn subjects_of_id(State(state): Shared, Path(id): Path<String>, Query(flags): Query<Flags>) -> ApiResult {
    let id = parse_id(&id)?;
    let mut connection = state.store.pool().acquire().await?;
    store::schema_by_id(&mut connection, id).await?.ok_or_else(ApiError::schema_not_found)?;
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
    if all.is_empty() {
        return Err(ApiError::subject_not_found(subject));
    }
    let visible = all.into_iter().filter(|v| include_deleted || !v.deleted);
    let found = match wanted {
        VersionSelector::Latest => visible.max_by_key(|v| v.version),
        VersionSelector::Number(number) => visible.into_iter().find(|v| v.version == number),
    };
    found.ok_or_else(|| ApiError::version_not_found(subject, selector))
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
    if let Some(found) = existing.iter().find(|v| Some(v.schema.id) == known) {
        return Ok(reply(json!({"id": found.schema.id, "subject": subject, "version": found.version})));
    }
    let level = level_of(&mut transaction, &subject).await?;
    if level != Level::None && !existing.is_empty() {
        let mut schemas = Vec::with_capacity(existing.len());
        for version in &existing {
            schemas.push(parse_stored(&mut transaction, &version.schema).await?);
        }
        if let Err(reasons) = compat::check(level, &candidate.schema, &schemas) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject}\" ({level}), details: [{}]",
                    reasons.join("; ")
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
    let all = store::versions(&mut transaction, &subject, true).await?;
    if all.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
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
        store::delete_compatibility(&mut transaction, &subject).await?;
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
    let found = find_version(&mut transaction, &subject, &version, true).await?;
    if flags.get("permanent") {
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
    let invalid = |text: &str| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42203, format!("Invalid compatibility level: {text}"))
    };
    let request: ConfigRequest = serde_json::from_slice(body).map_err(|_| invalid("unreadable request"))?;
    let text = request.compatibility.or(request.compatibility_level).unwrap_or_default();
    text.parse().map_err(|_| invalid(&text))
}

async fn get_global_config(State(state): Shared) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let level = store::compatibility(&mut connection, "").await?.unwrap_or_else(|| DEFAULT_LEVEL.name().to_string());
    Ok(reply(json!({"compatibilityLevel": level})))
}

async fn put_global_config(State(state): Shared, body: Bytes) -> ApiResult {
    let level = requested_level(&body)?;
    let mut connection = state.store.pool().acquire().await?;
    store::set_compatibility(&mut connection, "", level.name()).await?;
    Ok(reply(json!({"compatibility": level.name()})))
}

async fn get_subject_config(
    State(state): Shared,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let level = match store::compatibility(&mut connection, &subject).await? {
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
    store::set_compatibility(&mut connection, &subject, level.name()).await?;
    Ok(reply(json!({"compatibility": level.name()})))
}

async fn delete_subject_config(State(state): Shared, Path(subject): Path<String>) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    match store::delete_compatibility(&mut connection, &subject).await? {
        Some(level) => Ok(reply(json!({"compatibilityLevel": level}))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )),
    }
}

async fn check_compatibility(
    State(state): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
    body: Bytes,
) -> ApiResult {
    let mut connection = state.store.pool().acquire().await?;
    let candidate = prepare(&mut connection, &body).await?;
    let level = level_of(&mut connection, &subject).await?;
    let against: Vec<StoredVersion> = match parse_version(&version)? {
        VersionSelector::Latest if level.is_transitive() => {
            let versions = store::versions(&mut connection, &subject, false).await?;
            if versions.is_empty() {
                return Err(ApiError::subject_not_found(&subject));
            }
            versions
        }
        _ => vec![find_version(&mut connection, &subject, &version, false).await?],
    };
    let mut schemas = Vec::with_capacity(against.len());
    for version in &against {
        schemas.push(parse_stored(&mut connection, &version.schema).await?);
    }
    let result = compat::check(level, &candidate.schema, &schemas);
    let mut body = json!({"is_compatible": result.is_ok()});
    if flags.get("verbose") {
        body["messages"] = json!(result.err().unwrap_or_default());
    }
    Ok(reply(body))
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
    fn versions_parse_like_confluent() {
        assert!(matches!(parse_version("latest"), Ok(VersionSelector::Latest)));
        assert!(matches!(parse_version("-1"), Ok(VersionSelector::Latest)));
        assert!(matches!(parse_version("3"), Ok(VersionSelector::Number(3))));
        assert_eq!(parse_version("0").err().map(|e| e.code), Some(42202));
        assert_eq!(parse_version("first").err().map(|e| e.code), Some(42202));
    }
}
