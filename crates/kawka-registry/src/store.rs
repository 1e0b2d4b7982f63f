//! Postgres storage of the registry: schemas (global ids), subject versions
//! and compatibility settings.
//!
//! Ids are global and stable: a schema's id is found by its identity (type,
//! references and JSON-normalized text), and schema rows are never deleted,
//! so an id read from an old event still resolves after its subject is
//! deleted. Registrations of one subject are serialized with a transaction
//! advisory lock; registrations of the same schema under different subjects
//! meet at the unique identity and get one id.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::canonical::identity_text;
use crate::wire::SchemaReference;

/// A stored schema.
#[derive(Debug, Clone)]
pub struct StoredSchema {
    pub id: i32,
    pub schema_type: String,
    pub schema: String,
    pub references: Vec<SchemaReference>,
}

/// One version of a subject.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub subject: String,
    pub version: i32,
    pub deleted: bool,
    pub schema: StoredSchema,
}

const INIT: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS kawka_registry_schemas (
        id integer PRIMARY KEY,
        schema_type text NOT NULL,
        schema text NOT NULL,
        refs jsonb NOT NULL,
        identity text NOT NULL UNIQUE
    )",
    "CREATE SEQUENCE IF NOT EXISTS kawka_registry_schema_ids",
    "CREATE TABLE IF NOT EXISTS kawka_registry_versions (
        subject text NOT NULL,
        version integer NOT NULL,
        schema_id integer NOT NULL REFERENCES kawka_registry_schemas (id),
        deleted boolean NOT NULL DEFAULT false,
        PRIMARY KEY (subject, version)
    )",
    "CREATE INDEX IF NOT EXISTS kawka_registry_versions_by_schema ON kawka_registry_versions (schema_id)",
    "CREATE TABLE IF NOT EXISTS kawka_registry_config (
        subject text PRIMARY KEY,
        compatibility text NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS kawka_registry_mode (
        subject text PRIMARY KEY,
        mode text NOT NULL
    )",
];

/// The key under which concurrent starts serialize table creation.
const INIT_LOCK: i64 = 0x6b61_776b_6172_6567; // "kawkareg"

#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects, using `schema` as the search path when given, and creates
    /// the tables when missing.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Store, sqlx::Error> {
        let mut options: PgConnectOptions = url.parse()?;
        if let Some(schema) = schema {
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new().max_connections(8).connect_with(options).await?;
        let store = Store { pool };
        store.init(schema).await?;
        Ok(store)
    }

    async fn init(&self, schema: Option<&str>) -> Result<(), sqlx::Error> {
        let mut connection = self.pool.acquire().await?;
        let mut transaction = connection.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(INIT_LOCK).execute(&mut *transaction).await?;
        if let Some(schema) = schema {
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", schema.replace('"', "\"\"")))
                .execute(&mut *transaction)
                .await?;
        }
        for statement in INIT {
            sqlx::query(statement).execute(&mut *transaction).await?;
        }
        // Identities stored by an earlier release (of the JSON text) are
        // made again the way this one computes them, so a schema registered
        // again after an upgrade keeps its id. Where two stored schemas now
        // have one identity the older keeps it.
        let rows = sqlx::query("SELECT id, schema_type, schema, refs FROM kawka_registry_schemas ORDER BY id")
            .fetch_all(&mut *transaction)
            .await?;
        let mut ids = Vec::with_capacity(rows.len());
        let mut identities = Vec::with_capacity(rows.len());
        for row in &rows {
            let stored = schema_from_row(row)?;
            ids.push(stored.id);
            identities.push(identity(&stored.schema_type, &stored.schema, &stored.references).1);
        }
        // One query finds the rows whose identity changed (usually none);
        // only those are updated, one by one, so that two of them meeting
        // at one identity leave the older with it instead of failing.
        let changed: Vec<(i32, String)> = sqlx::query_as(
            "SELECT u.id, u.identity FROM UNNEST($1::integer[], $2::text[]) AS u(id, identity)
             JOIN kawka_registry_schemas s ON s.id = u.id WHERE s.identity <> md5(u.identity) ORDER BY u.id",
        )
        .bind(&ids)
        .bind(&identities)
        .fetch_all(&mut *transaction)
        .await?;
        for (id, identity) in &changed {
            sqlx::query(
                "UPDATE kawka_registry_schemas SET identity = md5($2) WHERE id = $1
                 AND NOT EXISTS (SELECT 1 FROM kawka_registry_schemas WHERE identity = md5($2))",
            )
            .bind(id)
            .bind(identity)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await
    }

    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn schema_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredSchema, sqlx::Error> {
    let refs: serde_json::Value = row.try_get("refs")?;
    Ok(StoredSchema {
        id: row.try_get("id")?,
        schema_type: row.try_get("schema_type")?,
        schema: row.try_get("schema")?,
        references: serde_json::from_value(refs).unwrap_or_default(),
    })
}

/// Serializes registrations of `subject` until the transaction ends.
pub async fn lock_subject(connection: &mut PgConnection, subject: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('kawka_registry:' || $1, 0))")
        .bind(subject)
        .execute(connection)
        .await?;
    Ok(())
}

pub async fn schema_by_id(connection: &mut PgConnection, id: i32) -> Result<Option<StoredSchema>, sqlx::Error> {
    let row = sqlx::query("SELECT id, schema_type, schema, refs FROM kawka_registry_schemas WHERE id = $1")
        .bind(id)
        .fetch_optional(connection)
        .await?;
    row.as_ref().map(schema_from_row).transpose()
}

/// What makes two registrations the same schema: its type, references and
/// the schema as Avro reads it ([`crate::canonical`]), not its text.
fn identity(schema_type: &str, schema: &str, references: &[SchemaReference]) -> (serde_json::Value, String) {
    let refs = serde_json::to_value(references).unwrap_or_default();
    let canonical = serde_json::from_str(schema).map_or_else(|_| schema.to_string(), |json| identity_text(&json));
    let identity = format!("{schema_type}\n{refs}\n{canonical}");
    (refs, identity)
}

/// The id of an already stored schema.
pub async fn find_schema(
    connection: &mut PgConnection,
    schema_type: &str,
    schema: &str,
    references: &[SchemaReference],
) -> Result<Option<i32>, sqlx::Error> {
    let (_, identity) = identity(schema_type, schema, references);
    sqlx::query_scalar("SELECT id FROM kawka_registry_schemas WHERE identity = md5($1)")
        .bind(&identity)
        .fetch_optional(connection)
        .await
}

/// The id of the schema with this identity, inserting it when new.
pub async fn find_or_insert_schema(
    connection: &mut PgConnection,
    schema_type: &str,
    schema: &str,
    references: &[SchemaReference],
) -> Result<i32, sqlx::Error> {
    let (refs, identity) = identity(schema_type, schema, references);
    let inserted: Option<i32> = sqlx::query_scalar(
        "INSERT INTO kawka_registry_schemas (id, schema_type, schema, refs, identity)
         VALUES (nextval('kawka_registry_schema_ids'), $1, $2, $3, md5($4))
         ON CONFLICT (identity) DO NOTHING
         RETURNING id",
    )
    .bind(schema_type)
    .bind(schema)
    .bind(&refs)
    .bind(&identity)
    .fetch_optional(&mut *connection)
    .await?;
    match inserted {
        Some(id) => Ok(id),
        // Another registration inserted it first (it committed before our
        // insert returned, or we would still be waiting on the index).
        None => find_schema(connection, schema_type, schema, references).await?.ok_or(sqlx::Error::RowNotFound),
    }
}

const VERSION_COLUMNS: &str = "v.subject, v.version, v.deleted, s.id, s.schema_type, s.schema, s.refs";

fn version_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredVersion, sqlx::Error> {
    Ok(StoredVersion {
        subject: row.try_get("subject")?,
        version: row.try_get("version")?,
        deleted: row.try_get("deleted")?,
        schema: schema_from_row(row)?,
    })
}

/// Versions of `subject`, oldest first.
pub async fn versions(
    connection: &mut PgConnection,
    subject: &str,
    include_deleted: bool,
) -> Result<Vec<StoredVersion>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM kawka_registry_versions v JOIN kawka_registry_schemas s ON s.id = v.schema_id
         WHERE v.subject = $1 AND ($2 OR NOT v.deleted) ORDER BY v.version"
    ))
    .bind(subject)
    .bind(include_deleted)
    .fetch_all(connection)
    .await?;
    rows.iter().map(version_from_row).collect()
}

pub async fn insert_version(connection: &mut PgConnection, subject: &str, schema_id: i32) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO kawka_registry_versions (subject, version, schema_id)
         SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM kawka_registry_versions WHERE subject = $1
         RETURNING version",
    )
    .bind(subject)
    .bind(schema_id)
    .fetch_one(connection)
    .await
}

pub async fn subjects(connection: &mut PgConnection, include_deleted: bool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT DISTINCT subject FROM kawka_registry_versions WHERE $1 OR NOT deleted ORDER BY subject")
        .bind(include_deleted)
        .fetch_all(connection)
        .await
}

/// `(subject, version)` pairs that use schema `id`.
pub async fn usages(
    connection: &mut PgConnection,
    id: i32,
    include_deleted: bool,
) -> Result<Vec<(String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subject, version FROM kawka_registry_versions WHERE schema_id = $1 AND ($2 OR NOT deleted)
         ORDER BY subject, version",
    )
    .bind(id)
    .bind(include_deleted)
    .fetch_all(connection)
    .await
}

/// Ids of schemas whose references name `subject` at `version`.
pub async fn referenced_by(
    connection: &mut PgConnection,
    subject: &str,
    version: i32,
) -> Result<Vec<i32>, sqlx::Error> {
    let needle = serde_json::json!([{ "subject": subject, "version": version }]);
    sqlx::query_scalar("SELECT id FROM kawka_registry_schemas WHERE refs @> $1 ORDER BY id")
        .bind(needle)
        .fetch_all(connection)
        .await
}

pub async fn set_deleted(
    connection: &mut PgConnection,
    subject: &str,
    version: Option<i32>,
) -> Result<Vec<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE kawka_registry_versions SET deleted = true
         WHERE subject = $1 AND ($2::integer IS NULL OR version = $2) AND NOT deleted RETURNING version",
    )
    .bind(subject)
    .bind(version)
    .fetch_all(connection)
    .await
    .map(sorted)
}

pub async fn delete_permanently(
    connection: &mut PgConnection,
    subject: &str,
    version: Option<i32>,
) -> Result<Vec<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "DELETE FROM kawka_registry_versions
         WHERE subject = $1 AND ($2::integer IS NULL OR version = $2) RETURNING version",
    )
    .bind(subject)
    .bind(version)
    .fetch_all(connection)
    .await
    .map(sorted)
}

fn sorted(mut versions: Vec<i32>) -> Vec<i32> {
    versions.sort_unstable();
    versions
}

/// A setting kept per subject (`""`: the registry's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// The compatibility level (`/config`).
    Compatibility,
    /// READWRITE or READONLY (`/mode`).
    Mode,
}

impl Setting {
    /// Its table and column (constants: no input reaches the SQL text).
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Setting::Compatibility => ("kawka_registry_config", "compatibility"),
            Setting::Mode => ("kawka_registry_mode", "mode"),
        }
    }
}

/// The value of `setting` for `subject`, if set.
pub async fn setting(
    connection: &mut PgConnection,
    setting: Setting,
    subject: &str,
) -> Result<Option<String>, sqlx::Error> {
    let (table, column) = setting.table();
    sqlx::query_scalar(&format!("SELECT {column} FROM {table} WHERE subject = $1"))
        .bind(subject)
        .fetch_optional(connection)
        .await
}

pub async fn set_setting(
    connection: &mut PgConnection,
    setting: Setting,
    subject: &str,
    value: &str,
) -> Result<(), sqlx::Error> {
    let (table, column) = setting.table();
    sqlx::query(&format!(
        "INSERT INTO {table} (subject, {column}) VALUES ($1, $2) ON CONFLICT (subject) DO UPDATE SET {column} = EXCLUDED.{column}"
    ))
    .bind(subject)
    .bind(value)
    .execute(connection)
    .await?;
    Ok(())
}

/// Removes `setting` of `subject`; returns what it was.
pub async fn delete_setting(
    connection: &mut PgConnection,
    setting: Setting,
    subject: &str,
) -> Result<Option<String>, sqlx::Error> {
    let (table, column) = setting.table();
    sqlx::query_scalar(&format!("DELETE FROM {table} WHERE subject = $1 RETURNING {column}"))
        .bind(subject)
        .fetch_optional(connection)
        .await
}

/// Every version of every subject, by subject then version.
pub async fn all_versions(
    connection: &mut PgConnection,
    include_deleted: bool,
) -> Result<Vec<StoredVersion>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM kawka_registry_versions v JOIN kawka_registry_schemas s ON s.id = v.schema_id
         WHERE $1 OR NOT v.deleted ORDER BY v.subject, v.version"
    ))
    .bind(include_deleted)
    .fetch_all(connection)
    .await?;
    rows.iter().map(version_from_row).collect()
}

/// Whether a version of another subject uses a schema that references
/// `subject` at `version` (soft-deleted referrers count with
/// `deleted_referrers`: a permanent delete must not orphan them either).
pub async fn is_referenced(
    connection: &mut PgConnection,
    subject: &str,
    version: i32,
    deleted_referrers: bool,
) -> Result<bool, sqlx::Error> {
    let needle = serde_json::json!([{ "subject": subject, "version": version }]);
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM kawka_registry_schemas s JOIN kawka_registry_versions v ON v.schema_id = s.id
         WHERE s.refs @> $1 AND v.subject <> $2 AND ($3 OR NOT v.deleted))",
    )
    .bind(needle)
    .bind(subject)
    .bind(deleted_referrers)
    .fetch_one(connection)
    .await
}
