//! Rebuilds of Postgres read models: replay the whole log into the next
//! version of the table beside the live one, then swap them atomically.
//!
//! * The rebuild is the connector's own runtime with another table
//!   (`<table>_v<N+1>`), another consumer group and its own rows in
//!   `kawka_offsets` (`<connector>.rebuild`), in large batches.
//! * Cut-over, in one transaction, once the rebuild's positions have caught
//!   up with the live connector's (read from `kawka_offsets`, not from the
//!   broker's high watermarks): lock the live rows, rename the live table
//!   to `<table>_v<N>` and the new one to `<table>`, move the live
//!   positions to the rebuild's and bump their epochs. The live connector's
//!   next write is fenced; it restarts, claims, and goes on from the new
//!   positions into the new table. Readers see one table or the other.
//! * `--rollback` swaps back the same way and returns the live positions to
//!   where the previous table stopped, so the events since the cut-over are
//!   applied to it again; `--cleanup` drops the previous table.

use anyhow::{bail, Context as _};
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use super::{caught_up, follow, rebuild_settings, runtime_with, Follower, RebuildReport, Started};
use crate::pipeline::ConnectorRuntime;
use crate::sink::postgres::quote;
use crate::sink::postgres::PostgresSink;
use crate::sink::Sink;
use crate::sink::Target;
use crate::status::RebuildProgress;

struct Names {
    schema: String,
    table: String,
    connector: String,
    rebuild_connector: String,
}

impl Names {
    fn qualified(&self, table: &str) -> String {
        format!("{}.{}", quote(&self.schema), quote(table))
    }

    fn offsets(&self) -> String {
        format!("{}.kawka_offsets", quote(&self.schema))
    }

    fn rebuilds(&self) -> String {
        format!("{}.kawka_rebuilds", quote(&self.schema))
    }
}

fn names(runtime: &ConnectorRuntime) -> anyhow::Result<Names> {
    let Target::Postgres(target) = &runtime.settings.target else {
        bail!("kawka rebuild handles Postgres connectors; {} writes to Elasticsearch", runtime.settings.name)
    };
    Ok(Names {
        schema: target.schema.clone(),
        table: target.table.clone(),
        connector: runtime.settings.name.clone(),
        rebuild_connector: format!("{}.rebuild", runtime.settings.name),
    })
}

fn live_sink(runtime: &ConnectorRuntime) -> anyhow::Result<&PostgresSink> {
    match &runtime.sink {
        Sink::Postgres(sink) => Ok(sink),
        Sink::Elasticsearch(_) => bail!("kawka rebuild handles Postgres connectors"),
    }
}

async fn ensure_state(pool: &PgPool, names: &Names) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {} (connector text PRIMARY KEY, version integer NOT NULL, \
         previous_table text, previous_positions jsonb, swapped_at timestamptz)",
        names.rebuilds()
    ))
    .execute(pool)
    .await?;
    Ok(())
}

async fn positions(pool: &PgPool, names: &Names, connector: &str) -> anyhow::Result<Vec<(String, i32, i64)>> {
    let rows = sqlx::query(&format!(
        "SELECT topic, partition, next_offset FROM {} WHERE connector = $1 AND next_offset IS NOT NULL ORDER BY 1, 2",
        names.offsets()
    ))
    .bind(connector)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// Runs a rebuild of `runtime`'s table and cuts over. `progress` is told
/// where it is about four times a second.
pub async fn rebuild(
    runtime: ConnectorRuntime,
    shutdown: watch::Receiver<bool>,
    mut progress: impl FnMut(&RebuildProgress),
) -> anyhow::Result<RebuildReport> {
    let names = names(&runtime)?;
    let live = live_sink(&runtime)?;
    let pool = live.pool().clone();
    ensure_state(&pool, &names).await?;
    let version: i32 = sqlx::query_scalar(&format!("SELECT version FROM {} WHERE connector = $1", names.rebuilds()))
        .bind(&names.connector)
        .fetch_optional(&pool)
        .await?
        .unwrap_or(1);
    let new_table = format!("{}_v{}", names.table, version + 1);
    let previous_table = format!("{}_v{}", names.table, version);
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", names.qualified(&new_table))).execute(&pool).await?;
    sqlx::query(&format!("DELETE FROM {} WHERE connector = $1", names.offsets()))
        .bind(&names.rebuild_connector)
        .execute(&pool)
        .await
        .ok();

    let settings = rebuild_settings(&runtime, &names.rebuild_connector, i64::from(version) + 1, |target| {
        if let Target::Postgres(target) = target {
            target.table = new_table.clone();
            target.create = true;
        }
    });
    let Target::Postgres(target) = &settings.target else { bail!("{} is not a Postgres connector", names.connector) };
    let sink = Sink::Postgres(live.beside(&settings.sink_settings(), target));
    let rebuild_runtime = runtime_with(&runtime, settings, sink);

    let started = Started::now();
    loop {
        let follower = Follower::start(&rebuild_runtime);
        let followed = follow(&shutdown, &started, &mut progress, || async {
            Ok((
                positions(&pool, &names, &names.connector).await?,
                positions(&pool, &names, &names.rebuild_connector).await?,
            ))
        })
        .await;
        follower.stop().await;
        followed.context("the live table is unchanged; run the rebuild again")?;
        if cut_over(&pool, &names, &new_table, &previous_table, version + 1).await? {
            let events = positions(&pool, &names, &names.connector).await?.iter().map(|r| r.2 as u64).sum();
            return Ok(started.report(&rebuild_runtime, events, names.table.clone(), previous_table));
        }
        // The live connector moved on meanwhile: catch up again.
    }
}

/// The swap. Returns false (and changes nothing) when the live positions
/// moved past the rebuild's since it stopped.
async fn cut_over(
    pool: &PgPool,
    names: &Names,
    new_table: &str,
    previous_table: &str,
    version: i32,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    // Row locks on the live positions: a live write in progress finishes
    // first, and none starts until this commits (then it is fenced).
    let live: Vec<(String, i32, Option<i64>)> = sqlx::query(&format!(
        "SELECT topic, partition, next_offset FROM {} WHERE connector = $1 FOR UPDATE",
        names.offsets()
    ))
    .bind(&names.connector)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    let rebuilt = positions_in(&mut tx, names, &names.rebuild_connector).await?;
    let live_known: Vec<(String, i32, i64)> =
        live.iter().filter_map(|(t, p, n)| n.map(|n| (t.clone(), *p, n))).collect();
    if !caught_up(&live_known, &rebuilt) {
        tx.rollback().await?;
        return Ok(false);
    }
    let previous_positions = serde_json::to_value(&live_known)?;
    sqlx::query(&format!("ALTER TABLE {} RENAME TO {}", names.qualified(&names.table), quote(previous_table)))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("ALTER TABLE {} RENAME TO {}", names.qualified(new_table), quote(&names.table)))
        .execute(&mut *tx)
        .await?;
    move_positions(&mut tx, names, &rebuilt).await?;
    sqlx::query(&format!("DELETE FROM {} WHERE connector = $1", names.offsets()))
        .bind(&names.rebuild_connector)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO {} (connector, version, previous_table, previous_positions, swapped_at) VALUES ($1, $2, $3, $4, now()) \
         ON CONFLICT (connector) DO UPDATE SET version = $2, previous_table = $3, previous_positions = $4, swapped_at = now()",
        names.rebuilds()
    ))
    .bind(&names.connector)
    .bind(version)
    .bind(previous_table)
    .bind(previous_positions)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

async fn positions_in(
    tx: &mut sqlx::PgConnection,
    names: &Names,
    connector: &str,
) -> anyhow::Result<Vec<(String, i32, i64)>> {
    let rows = sqlx::query(&format!(
        "SELECT topic, partition, next_offset FROM {} WHERE connector = $1 AND next_offset IS NOT NULL",
        names.offsets()
    ))
    .bind(connector)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// Sets the live connector's positions and bumps its epochs: whoever owns
/// the partitions now is fenced and starts again from these.
async fn move_positions(tx: &mut sqlx::PgConnection, names: &Names, to: &[(String, i32, i64)]) -> anyhow::Result<()> {
    for (topic, partition, next) in to {
        sqlx::query(&format!(
            "INSERT INTO {} AS o (connector, topic, partition, next_offset, epoch) VALUES ($1, $2, $3, $4, 1) \
             ON CONFLICT (connector, topic, partition) DO UPDATE SET next_offset = $4, epoch = o.epoch + 1, updated_at = now()",
            names.offsets()
        ))
        .bind(&names.connector)
        .bind(topic)
        .bind(partition)
        .bind(next)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Swaps back to the previous table; the live connector goes on from where
/// that table stopped. The rolled-out table is kept until `--cleanup` (a
/// second rollback is refused: there is nothing to roll forward to).
pub async fn rollback(runtime: &ConnectorRuntime) -> anyhow::Result<String> {
    let names = names(runtime)?;
    let pool = live_sink(runtime)?.pool().clone();
    ensure_state(&pool, &names).await?;
    let row = sqlx::query(&format!(
        "SELECT version, previous_table, previous_positions FROM {} WHERE connector = $1",
        names.rebuilds()
    ))
    .bind(&names.connector)
    .fetch_optional(&pool)
    .await?;
    let Some(row) = row else { bail!("{} has never been rebuilt", names.connector) };
    let (version, previous, positions): (i32, Option<String>, Option<serde_json::Value>) =
        (row.get(0), row.get(1), row.get(2));
    let (Some(previous_table), Some(positions)) = (previous, positions) else {
        bail!("no previous version of {} to roll back to (rolled back already, or cleaned up)", names.table)
    };
    let positions: Vec<(String, i32, i64)> = serde_json::from_value(positions).context("stored positions")?;
    let rolled_out = format!("{}_v{}", names.table, version);
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("SELECT 1 FROM {} WHERE connector = $1 FOR UPDATE", names.offsets()))
        .bind(&names.connector)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("ALTER TABLE {} RENAME TO {}", names.qualified(&names.table), quote(&rolled_out)))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("ALTER TABLE {} RENAME TO {}", names.qualified(&previous_table), quote(&names.table)))
        .execute(&mut *tx)
        .await?;
    move_positions(&mut tx, &names, &positions).await?;
    sqlx::query(&format!(
        "UPDATE {} SET version = version - 1, previous_table = $2, previous_positions = NULL WHERE connector = $1",
        names.rebuilds()
    ))
    .bind(&names.connector)
    .bind(&rolled_out)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rolled_out)
}

/// Drops the previous version kept for rollback.
pub async fn cleanup(runtime: &ConnectorRuntime) -> anyhow::Result<Option<String>> {
    let names = names(runtime)?;
    let pool = live_sink(runtime)?.pool().clone();
    ensure_state(&pool, &names).await?;
    let previous: Option<Option<String>> =
        sqlx::query_scalar(&format!("SELECT previous_table FROM {} WHERE connector = $1", names.rebuilds()))
            .bind(&names.connector)
            .fetch_optional(&pool)
            .await?;
    let Some(Some(previous)) = previous else { return Ok(None) };
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", names.qualified(&previous))).execute(&pool).await?;
    sqlx::query(&format!(
        "UPDATE {} SET previous_table = NULL, previous_positions = NULL WHERE connector = $1",
        names.rebuilds()
    ))
    .bind(&names.connector)
    .execute(&pool)
    .await?;
    Ok(Some(previous))
}
