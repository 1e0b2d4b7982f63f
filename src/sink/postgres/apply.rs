//! One planned statement run: an upsert's rows go in by `COPY` while its
//! keys are expected to be new, and by the upsert otherwise or when a
//! `COPY` meets a key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{Arguments, Executor, Postgres};

use super::arrays::ColumnArray;
use super::copy::{copy_buffer, copy_rows};
use super::statements::{CopyFormat, Insert, Statement};
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
        if self.new_keys.try_copy(&insert.copy) {
            let (format, data) = match &insert.rendered {
                Some(rendered) => (rendered.format, Cow::Borrowed(rendered.bytes.as_slice())),
                None => (CopyFormat::Text, Cow::Owned(copy_text(&statement.arrays, insert, 0..statement.rows.len()))),
            };
            let went_in = self.copy_new(tx, &insert.copy_sql(format), &data).await?;
            self.new_keys.copied(&insert.copy, went_in);
            if went_in {
                return Ok(());
            }
        }
        // Rows planned into `COPY` data alone are read back into arrays: the
        // data is this sink's own, so not reading is a bug, not bad data.
        let arrays = statement.bound_arrays().map_err(|error| {
            SinkError::Setup(format!("bug: the planned COPY data of {} does not read back: {error}", insert.copy))
        })?;
        execute(tx, &statement.sql, &arrays).await?;
        self.new_keys.upserted(&insert.copy);
        Ok(())
    }

    /// `copy` of a statement's rows (`data`) in a savepoint: `false` when a key
    /// exists (unique violation), the copy undone.
    async fn copy_new(&self, tx: &mut sqlx::PgConnection, copy: &str, data: &[u8]) -> Result<bool, SinkError> {
        tx.execute("SAVEPOINT kawka_copy").await.map_err(SinkError::Postgres)?;
        let copied = async {
            let mut copy = tx.copy_in_raw(copy).await?;
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

/// Per upsert shape (its `COPY` statement): whether the next upsert of it
/// tries `COPY` of all its rows first. Yes until one meets an existing key,
/// then once every [`COPY_AGAIN_EVERY`] upserts (the keys may be new again:
/// a run of new ids after updates), and yes again once a `COPY` goes in.
/// Per shape, since an event type that creates rows and one that changes
/// them are written by different statements (one guess for both would flip
/// at every batch).
#[derive(Debug, Default)]
pub(super) struct CopyGuesses {
    /// Upserts run since a `COPY` of the shape met a key; absent: none did,
    /// or the last `COPY` went in.
    since_met: Mutex<HashMap<String, u32>>,
}

impl CopyGuesses {
    pub(super) fn try_copy(&self, copy: &str) -> bool {
        self.lock().get(copy).is_none_or(|&since| since >= COPY_AGAIN_EVERY)
    }

    /// How a `COPY` went: in (new keys: try it next time too) or into an
    /// existing key (upserts from now on, counted).
    pub(super) fn copied(&self, copy: &str, went_in: bool) {
        let mut since_met = self.lock();
        if went_in {
            since_met.remove(copy);
        } else {
            since_met.insert(copy.to_string(), 0);
        }
    }

    /// Counts an upsert that ran.
    pub(super) fn upserted(&self, copy: &str) {
        if let Some(since) = self.lock().get_mut(copy) {
            *since = since.saturating_add(1);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // The map is whole after any panic (each change is one call).
        self.since_met.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_tries_copy_until_one_meets_a_key_then_one_upsert_in_eight() {
        let guesses = CopyGuesses::default();
        let (orders, lines) = ("COPY orders", "COPY lines");
        assert!(guesses.try_copy(orders), "new shapes expect new keys");
        guesses.copied(orders, true);
        assert!(guesses.try_copy(orders), "a COPY that went in: again");
        // Statements of a shape whose keys exist, as `apply` runs them: a
        // `COPY` tried meets a key, then the upsert runs.
        let tried: Vec<usize> = (0..25)
            .filter(|_| {
                let tries = guesses.try_copy(orders);
                if tries {
                    guesses.copied(orders, false);
                }
                guesses.upserted(orders);
                tries
            })
            .collect();
        assert_eq!(tried, vec![0, 8, 16, 24], "one statement in {COPY_AGAIN_EVERY} tries COPY again");
        assert!(guesses.try_copy(lines), "each shape has its own guess");
        guesses.copied(orders, true);
        assert!(guesses.try_copy(orders), "a COPY that went in: new keys again");
    }
}
