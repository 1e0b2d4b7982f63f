//! A sink's positions in `kawka_offsets`: partitions claimed, ownership
//! checked, and positions moved forward under the owner's epoch.

use sqlx::Row;

use super::PostgresSink;
use crate::event::{Claim, PartitionOffset};
use crate::sink::SinkError;
use crate::value::{intern, Name};

impl PostgresSink {
    /// Takes ownership of partitions: bumps their epochs and returns the
    /// stored positions to start from.
    pub async fn claim(&self, partitions: &[(Name, i32)]) -> Result<Vec<Claim>, SinkError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| *t).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let rows = sqlx::query(&self.table.claim())
            .bind(&self.connector)
            .bind(&topics)
            .bind(&numbers)
            .fetch_all(&self.pool)
            .await
            .map_err(SinkError::Postgres)?;
        rows.iter()
            .map(|row| {
                Ok(Claim {
                    topic: intern(row.try_get::<&str, _>(0).map_err(SinkError::Postgres)?),
                    partition: row.try_get(1).map_err(SinkError::Postgres)?,
                    next_offset: row.try_get(2).map_err(SinkError::Postgres)?,
                    epoch: Some(row.try_get(3).map_err(SinkError::Postgres)?),
                })
            })
            .collect()
    }

    /// The positions stored for `connector`: per partition, the next offset
    /// whose effect is not in the table (`None`: claimed, nothing written).
    pub async fn positions(&self, connector: &str) -> Result<Vec<(String, i32, Option<i64>)>, SinkError> {
        let rows = sqlx::query(&format!(
            "SELECT topic, partition, next_offset FROM {} WHERE connector = $1",
            self.table.offsets_table
        ))
        .bind(connector)
        .fetch_all(&self.pool)
        .await
        .map_err(SinkError::Postgres)?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(SinkError::Postgres)
    }

    /// Whether these partitions still carry these epochs (no other owner,
    /// no rebuild cut-over or rollback moved them since the claim).
    pub async fn owns(&self, epochs: &[(Name, i32, i64)]) -> Result<bool, SinkError> {
        if epochs.is_empty() {
            return Ok(true);
        }
        let topics: Vec<&str> = epochs.iter().map(|e| e.0).collect();
        let partitions: Vec<i32> = epochs.iter().map(|e| e.1).collect();
        let values: Vec<i64> = epochs.iter().map(|e| e.2).collect();
        let held: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {t} AS o JOIN UNNEST($2::text[], $3::int[], $4::bigint[]) AS u(topic, partition, epoch) \
             ON o.topic = u.topic AND o.partition = u.partition AND o.epoch = u.epoch WHERE o.connector = $1",
            t = self.table.offsets_table
        ))
        .bind(&self.connector)
        .bind(&topics)
        .bind(&partitions)
        .bind(&values)
        .fetch_one(&self.pool)
        .await
        .map_err(SinkError::Postgres)?;
        Ok(held == epochs.len() as i64)
    }

    /// Moves the positions of one transaction's partitions: `false` when
    /// the batch committed before (every position already there; the
    /// caller rolls back), `Fenced` when another owner took one over.
    pub(super) async fn advance(
        &self,
        tx: &mut sqlx::PgConnection,
        offsets: &[PartitionOffset],
    ) -> Result<bool, SinkError> {
        if offsets.is_empty() {
            return Ok(true);
        }
        let topics: Vec<&str> = offsets.iter().map(|o| o.topic).collect();
        let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
        let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
        let epochs: Vec<Option<i64>> = offsets.iter().map(|o| o.epoch).collect();
        let updated = sqlx::query(&self.table.advance())
            .bind(&self.connector)
            .bind(&topics)
            .bind(&partitions)
            .bind(&next)
            .bind(&epochs)
            .execute(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?
            .rows_affected();
        if updated == offsets.len() as u64 {
            return Ok(true);
        }
        // A transaction moves all its positions or none: the batch committed
        // before if every one is already there (later batches may have
        // moved some further). Anything else means another owner.
        if updated == 0 && self.reached_all(tx, offsets).await? {
            return Ok(false);
        }
        Err(SinkError::Fenced)
    }

    /// Whether every one of these positions is already there ([`PostgresSink::reached`]).
    pub(super) async fn reached_all(
        &self,
        tx: &mut sqlx::PgConnection,
        offsets: &[PartitionOffset],
    ) -> Result<bool, SinkError> {
        for offset in offsets {
            if !self.reached(tx, offset).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Of each of these positions, whether it is already there: the share
    /// of a batch that committed, written per partition, while another
    /// share of it failed.
    pub async fn reached_each(&self, offsets: &[PartitionOffset]) -> Result<Vec<bool>, SinkError> {
        let mut connection = self.pool.acquire().await.map_err(SinkError::Postgres)?;
        let mut reached = Vec::with_capacity(offsets.len());
        for offset in offsets {
            reached.push(self.reached(&mut connection, offset).await?);
        }
        Ok(reached)
    }

    /// Whether a partition's stored position is at or past `offset` under
    /// the same epoch: the batch ending there committed before.
    pub(super) async fn reached(
        &self,
        tx: &mut sqlx::PgConnection,
        offset: &PartitionOffset,
    ) -> Result<bool, SinkError> {
        let stored: Option<(i64, Option<i64>)> = sqlx::query_as(&self.table.position_of())
            .bind(&self.connector)
            .bind(offset.topic)
            .bind(offset.partition)
            .fetch_optional(&mut *tx)
            .await
            .map_err(SinkError::Postgres)?;
        Ok(matches!(stored, Some((epoch, Some(next))) if Some(epoch) == offset.epoch && next >= offset.next_offset))
    }

    /// The position stored for a partition: the next offset whose effect
    /// is not in the table yet, whichever process wrote it (for
    /// read-your-writes waits on partitions another replica owns).
    pub async fn stored_position(&self, topic: &str, partition: i32) -> Result<Option<i64>, SinkError> {
        let stored: Option<(i64, Option<i64>)> = sqlx::query_as(&self.table.position_of())
            .bind(&self.connector)
            .bind(topic)
            .bind(partition)
            .fetch_optional(&self.pool)
            .await
            .map_err(SinkError::Postgres)?;
        Ok(stored.and_then(|(_, next)| next))
    }
}
