//! `kawka rebuild <connector>` for Postgres read models: replay the whole
//! log into the next version of the table beside the live one, then swap
//! them atomically.
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

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sqlx::{PgPool, Row};
use tokio::sync::watch;

use crate::config::{ErrorPolicy, Settings, Target};
use crate::pipeline::ConnectorRuntime;
use crate::sink::postgres::sql::quote;
use crate::sink::Sink;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
    pub new_table: String,
    pub previous_table: String,
}

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

fn pool(runtime: &ConnectorRuntime) -> anyhow::Result<PgPool> {
    match &runtime.sink {
        Sink::Postgres(sink) => Ok(sink.pool().clone()),
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

/// Whether the rebuild has reached the live positions on every partition.
fn caught_up(live: &[(String, i32, i64)], rebuild: &[(String, i32, i64)]) -> bool {
    live.iter().all(|(t, p, next)| rebuild.iter().any(|(rt, rp, rnext)| rt == t && rp == p && rnext >= next))
}

/// Runs a rebuild of `runtime`'s table and cuts over. `progress` gets
/// (events done, events to reach the live positions, events/s).
pub async fn rebuild(
    runtime: ConnectorRuntime,
    shutdown: watch::Receiver<bool>,
    mut progress: impl FnMut(u64, u64, f64),
) -> anyhow::Result<RebuildReport> {
    let names = names(&runtime)?;
    let pool = pool(&runtime)?;
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

    // The rebuild: the connector's projection and upcasters, another table,
    // group and positions; bulk batches; bad events were dead-lettered by
    // the live run already, so here they are skipped and counted.
    let mut settings = (*runtime.settings).clone();
    settings.name = names.rebuild_connector.clone();
    settings.source.group_id = format!("{}.rebuild-v{}", settings.source.group_id, version + 1);
    settings.source.start = crate::config::StartPosition::Earliest;
    settings.on_error = ErrorPolicy::Skip;
    settings.batch.max_events = settings.batch.max_events.max(20_000);
    settings.batch.max_bytes = settings.batch.max_bytes.max(32 << 20);
    if let Target::Postgres(target) = &mut settings.target {
        target.table = new_table.clone();
        target.create = true;
    }
    let sink = match &runtime.sink {
        Sink::Postgres(_) => {
            let crate::config::Target::Postgres(target) = &settings.target else { unreachable!("postgres target") };
            Sink::Postgres(crate::sink::postgres::PostgresSink::with_pool(pool.clone(), &settings, target))
        }
        Sink::Elasticsearch(_) => bail!("kawka rebuild handles Postgres connectors"),
    };
    let status = Arc::new(crate::status::ConnectorStatus::new(&settings.name, "postgres"));
    let rebuild_runtime = ConnectorRuntime {
        settings: Arc::new(settings),
        sink,
        status: status.clone(),
        replay: None,
        ..runtime.clone()
    };

    let started = Instant::now();
    loop {
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(rebuild_runtime.clone().run(stopping));
        // Follow until caught up with the live positions.
        loop {
            if *shutdown.borrow() {
                let _ = stop.send(true);
                let _ = task.await;
                bail!("interrupted: the live table is unchanged; run the rebuild again");
            }
            let live = positions(&pool, &names, &names.connector).await?;
            let done = positions(&pool, &names, &names.rebuild_connector).await?;
            let (done_events, target): (i64, i64) = (done.iter().map(|r| r.2).sum(), live.iter().map(|r| r.2).sum());
            let seconds = started.elapsed().as_secs_f64();
            progress(done_events.max(0) as u64, target.max(0) as u64, done_events as f64 / seconds.max(1e-3));
            if !live.is_empty() && caught_up(&live, &done) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = stop.send(true);
        let _ = task.await;
        if cut_over(&pool, &names, &new_table, &previous_table, version + 1).await? {
            let events = positions(&pool, &names, &names.connector).await?.iter().map(|r| r.2 as u64).sum();
            return Ok(RebuildReport {
                events,
                seconds: started.elapsed().as_secs_f64(),
                new_table: names.table.clone(),
                previous_table,
            });
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
/// that table stopped.
pub async fn rollback(runtime: &ConnectorRuntime) -> anyhow::Result<String> {
    let names = names(runtime)?;
    let pool = pool(runtime)?;
    ensure_state(&pool, &names).await?;
    let row = sqlx::query(&format!(
        "SELECT version, previous_table, previous_positions FROM {} WHERE connector = $1",
        names.rebuilds()
    ))
    .bind(&names.connector)
    .fetch_optional(&pool)
    .await?;
    let Some(row) = row else { bail!("{} has never been rebuilt", names.connector) };
    let (version, previous): (i32, Option<String>) = (row.get(0), row.get(1));
    let Some(previous_table) = previous else { bail!("no previous version of {} is kept (cleaned up?)", names.table) };
    let positions: Vec<(String, i32, i64)> =
        serde_json::from_value(row.get::<serde_json::Value, _>(2)).context("stored positions")?;
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
        "UPDATE {} SET version = version - 1, previous_table = NULL, previous_positions = NULL WHERE connector = $1",
        names.rebuilds()
    ))
    .bind(&names.connector)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rolled_out)
}

/// Drops the previous version kept for rollback.
pub async fn cleanup(runtime: &ConnectorRuntime) -> anyhow::Result<Option<String>> {
    let names = names(runtime)?;
    let pool = pool(runtime)?;
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

/// A progress line for a terminal: percent, events/s, ETA.
pub fn progress_line(done: u64, target: u64, rate: f64) -> String {
    let percent = if target == 0 { 0.0 } else { (done as f64 / target as f64 * 100.0).min(100.0) };
    let filled = (percent / 5.0) as usize;
    let eta = if rate > 0.0 && target > done { format!("{:.0}s", (target - done) as f64 / rate) } else { "-".into() };
    format!(
        "[{}{}] {percent:5.1}% {done}/{target} events, {rate:.0} events/s, ETA {eta}",
        "#".repeat(filled),
        " ".repeat(20 - filled.min(20))
    )
}

/// Prints progress on one terminal line.
pub fn print_progress(done: u64, target: u64, rate: f64) {
    eprint!("\r{}", progress_line(done, target, rate));
    let _ = std::io::stderr().flush();
}

/// Builds the runtime of one connector and checks it can be rebuilt.
pub fn runtime_of(settings: &Settings, connector: &str) -> anyhow::Result<ConnectorRuntime> {
    let runtime = crate::app::connectors(settings)?
        .into_iter()
        .find(|r| r.settings.name == connector)
        .with_context(|| format!("no connector named {connector}"))?;
    names(&runtime)?;
    Ok(runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_means_every_live_partition_reached() {
        let live = vec![("t".to_string(), 0, 10), ("t".to_string(), 1, 5)];
        assert!(caught_up(&live, &[("t".into(), 0, 10), ("t".into(), 1, 7)]));
        assert!(!caught_up(&live, &[("t".into(), 0, 10), ("t".into(), 1, 4)]));
        assert!(!caught_up(&live, &[("t".into(), 0, 12)]));
        assert!(progress_line(50, 100, 10.0).contains(" 50.0% 50/100 events, 10 events/s, ETA 5s"));
    }
}
