//! Parked keys in `kawka_parked` (see [`crate::parked`]): one row per
//! connector and key, changed under its row lock, and by a replay in the
//! same transaction as the writes it releases (exactly once: a replay that
//! dies before its commit applied nothing and moved nothing).

use sqlx::Row;

use super::write::PostgresPlan;
use super::PostgresSink;
use crate::parked::{Change, ParkedKey};
use crate::projection::fold::key_hashes;
use crate::projection::WriteOp;
use crate::sink::SinkError;

impl PostgresSink {
    /// `"schema"."kawka_parked"`, beside `kawka_offsets`.
    fn parked_table(&self) -> String {
        format!("{}.kawka_parked", super::quote(&self.table.target().schema))
    }

    pub(super) fn create_parked_table(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (connector text NOT NULL, key bytea NOT NULL, entry jsonb NOT NULL, \
             updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (connector, key))",
            self.parked_table()
        )
    }

    /// Every key `connector` has parked.
    pub async fn parked_keys(&self, connector: &str) -> Result<Vec<(Vec<u8>, ParkedKey)>, SinkError> {
        let rows = sqlx::query(&format!("SELECT key, entry::text FROM {} WHERE connector = $1", self.parked_table()))
            .bind(connector)
            .fetch_all(&self.pool)
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            // No connector has parked a key in this schema yet (a rebuild
            // reads the live connector's keys before it ever ran).
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P01") => return Ok(Vec::new()),
            Err(error) => return Err(SinkError::Postgres(error)),
        };
        rows.iter()
            .map(|row| {
                let key: Vec<u8> = row.try_get(0).map_err(SinkError::Postgres)?;
                let entry: String = row.try_get(1).map_err(SinkError::Postgres)?;
                Ok((key, parse_entry(&entry)?))
            })
            .collect()
    }

    /// Changes a parked key as `decide` says from what is stored now (under
    /// the row's lock; `None`: change nothing), applying `ops` in the same
    /// transaction. Returns the change made and the ops a version guard
    /// found stale.
    pub async fn change_parked(
        &self,
        connector: &str,
        key: &[u8],
        ops: &[WriteOp],
        decide: &(dyn Fn(Option<&ParkedKey>) -> Option<Change> + Send + Sync),
    ) -> Result<Option<(Change, Vec<usize>)>, SinkError> {
        let table = self.parked_table();
        // A key parked for the first time has no row to lock: two writers
        // creating it at once meet at the insert, and the one that finds
        // the row there decides again, from it.
        loop {
            let mut tx = self.pool.begin().await.map_err(SinkError::Postgres)?;
            let stored: Option<String> = sqlx::query_scalar(&format!(
                "SELECT entry::text FROM {table} WHERE connector = $1 AND key = $2 FOR UPDATE"
            ))
            .bind(connector)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?;
            let existed = stored.is_some();
            let stored = stored.as_deref().map(parse_entry).transpose()?;
            let Some(change) = decide(stored.as_ref()) else {
                tx.rollback().await.map_err(SinkError::Postgres)?;
                return Ok(None);
            };
            let superseded = self.apply_in(&mut tx, ops).await?;
            let changed = match &change {
                Change::Put(entry) => {
                    let sql = if existed {
                        format!("UPDATE {table} SET entry = $3::jsonb, updated_at = now() WHERE connector = $1 AND key = $2")
                    } else {
                        format!(
                            "INSERT INTO {table} (connector, key, entry) VALUES ($1, $2, $3::jsonb) \
                             ON CONFLICT (connector, key) DO NOTHING"
                        )
                    };
                    let entry = serde_json::to_string(entry).expect("a parked key serializes: plain fields");
                    sqlx::query(&sql).bind(connector).bind(key).bind(entry).execute(&mut *tx).await
                }
                Change::Delete => {
                    let sql = format!("DELETE FROM {table} WHERE connector = $1 AND key = $2");
                    sqlx::query(&sql).bind(connector).bind(key).execute(&mut *tx).await
                }
            };
            let changed = changed.map_err(SinkError::Postgres)?.rows_affected();
            if changed == 0 && !existed && matches!(change, Change::Put(_)) {
                // Created meanwhile by another writer: decide again from its row.
                tx.rollback().await.map_err(SinkError::Postgres)?;
                continue;
            }
            tx.commit().await.map_err(SinkError::Postgres)?;
            return Ok(Some((change, superseded)));
        }
    }

    /// Applies ops, folded, inside a transaction of the caller's, without
    /// positions: the stale ops of a versioned table are returned.
    async fn apply_in(&self, tx: &mut sqlx::PgConnection, ops: &[WriteOp]) -> Result<Vec<usize>, SinkError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        match self.plan(ops, &key_hashes(ops), &[])? {
            PostgresPlan::Versioned(_) => {
                let (statements, superseded) = self.plan_against_stored(tx, ops).await?;
                for statement in &statements {
                    self.apply(tx, statement).await?;
                }
                Ok(superseded)
            }
            PostgresPlan::Whole(statements, _) => {
                for statement in &statements {
                    self.apply(tx, statement).await?;
                }
                Ok(Vec::new())
            }
            // No positions: never split by partition.
            PostgresPlan::PerPartition(_) => Err(SinkError::Setup("bug: a plan without positions was split".into())),
        }
    }
}

fn parse_entry(entry: &str) -> Result<ParkedKey, SinkError> {
    serde_json::from_str(entry).map_err(|e| SinkError::Setup(format!("a row of kawka_parked does not read: {e}")))
}
