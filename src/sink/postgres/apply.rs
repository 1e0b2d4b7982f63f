//! One planned statement run: an upsert's rows go in by `COPY` while its
//! keys are expected to be new, and by the upsert otherwise or when a
//! `COPY` meets a key.

use std::borrow::Cow;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{Arguments, Executor, Postgres};

use super::arrays::ColumnArray;
use super::copy::{copy_buffer, copy_rows};
use super::statements::{Insert, Statement};
use super::PostgresSink;
use crate::sink::SinkError;

impl PostgresSink {
    /// Runs one statement; an upsert's new keys go in by `COPY`.
    ///
    /// Every path touches the statement's rows in one pass, in the order of
    /// their keys (see `TableSql::plan_rendering`): `COPY` of all of them,
    /// or the upsert. Writers of the same rows (replicas whose partitions
    /// share keys) then wait for each other in that one order and queue
    /// instead of deadlocking. (An `UPDATE` of the keys that exist and then
    /// a `COPY` of the rest took two passes: a writer holding an updated row
    /// could wait, in its `COPY`, for a key another writer had inserted
    /// while that one waited for the updated row.)
    pub(super) async fn apply(&self, tx: &mut sqlx::PgConnection, statement: &Statement) -> Result<(), SinkError> {
        let Some(insert) = &statement.insert else { return execute(tx, &statement.sql, &statement.arrays).await };
        if self.guess_new_keys(&insert.copy) {
            let rendered = match &insert.rendered {
                Some(rendered) => Cow::Borrowed(rendered.as_slice()),
                None => Cow::Owned(copy_text(&statement.arrays, insert, 0..statement.rows.len())),
            };
            let went_in = self.copy_new(tx, insert, &rendered).await?;
            self.copied(insert, went_in);
            if went_in {
                return Ok(());
            }
        }
        // Rows planned into `COPY` text alone are read back into arrays: the
        // text is this sink's own, so not reading is a bug, not bad data.
        let arrays = statement.bound_arrays().map_err(|error| {
            SinkError::Setup(format!("bug: the planned COPY text of {} does not read back: {error}", insert.copy))
        })?;
        execute(tx, &statement.sql, &arrays).await?;
        self.upserted(insert);
        Ok(())
    }

    /// Whether an upsert of this shape should try `COPY` of all its rows:
    /// yes until one meets an existing key, then once every
    /// [`COPY_AGAIN_EVERY`] upserts (the keys may be new again: a run of
    /// new ids after updates), and yes again once a `COPY` goes in.
    pub(super) fn guess_new_keys(&self, copy: &str) -> bool {
        let hints = self.new_keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        hints.get(copy).is_none_or(|&since| since >= COPY_AGAIN_EVERY)
    }

    /// Notes how an upsert's `COPY` went: in (new keys: try it next time
    /// too) or into an existing key (upserts from now on, counted).
    fn copied(&self, insert: &Insert, went_in: bool) {
        let mut hints = self.new_keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if went_in {
            hints.remove(&insert.copy);
        } else {
            hints.insert(insert.copy.clone(), 0);
        }
    }

    /// Counts an upsert run without a `COPY` tried first.
    fn upserted(&self, insert: &Insert) {
        let mut hints = self.new_keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(since) = hints.get_mut(&insert.copy) {
            *since = since.saturating_add(1);
        }
    }

    /// `COPY` of a statement's rows in a savepoint: `false` when a key
    /// exists (unique violation), the copy undone.
    async fn copy_new(&self, tx: &mut sqlx::PgConnection, insert: &Insert, data: &[u8]) -> Result<bool, SinkError> {
        tx.execute("SAVEPOINT kawka_copy").await.map_err(SinkError::Postgres)?;
        let copied = async {
            let mut copy = tx.copy_in_raw(&insert.copy).await?;
            copy.send(data).await?;
            copy.finish().await
        }
        .await;
        match copied {
            Ok(_) => {
                tx.execute("RELEASE SAVEPOINT kawka_copy").await.map_err(SinkError::Postgres)?;
                Ok(true)
            }
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                tx.execute("ROLLBACK TO SAVEPOINT kawka_copy; RELEASE SAVEPOINT kawka_copy")
                    .await
                    .map_err(SinkError::Postgres)?;
                Ok(false)
            }
            Err(error) => Err(SinkError::Postgres(error)),
        }
    }
}

/// The `COPY` text of `rows` of an upsert's arrays.
fn copy_text(arrays: &[ColumnArray], insert: &Insert, rows: impl IntoIterator<Item = usize>) -> Vec<u8> {
    let rows = rows.into_iter();
    let mut data = copy_buffer(rows.size_hint().0, arrays.len());
    copy_rows(arrays, &insert.types, rows, &mut data);
    data
}

/// Runs a statement's SQL (for an upsert: `INSERT … ON CONFLICT`) with its arrays.
async fn execute(tx: &mut sqlx::PgConnection, sql: &str, arrays: &[ColumnArray]) -> Result<(), SinkError> {
    bind(sql, arrays).execute(&mut *tx).await.map(drop).map_err(SinkError::Postgres)
}

/// While upserts of a shape find existing keys, one in this many tries
/// `COPY` first again: a `COPY` that meets a key stops there and is rolled
/// back, so the tries cost a small share of the upserts' time.
const COPY_AGAIN_EVERY: u32 = 8;

/// SQLSTATE of a unique violation: a `COPY` met an existing key.
const UNIQUE_VIOLATION: &str = "23505";

pub(super) fn bind<'q>(sql: &'q str, arrays: &'q [ColumnArray]) -> Query<'q, Postgres, PgArguments> {
    let mut arguments = PgArguments::default();
    for array in arrays {
        // Adding an array of a supported type cannot fail; the error type
        // exists for encoders that can.
        let added = match array {
            ColumnArray::Int(values) => arguments.add(values),
            ColumnArray::Float(values) => arguments.add(values),
            ColumnArray::Bool(values) => arguments.add(values),
            ColumnArray::Bytes(values) => arguments.add(values),
            ColumnArray::Text(values) => arguments.add(values.iter().collect::<Vec<Option<&str>>>()),
        };
        debug_assert!(added.is_ok(), "binding an array of a built-in type");
    }
    sqlx::query_with(sql, arguments)
}
