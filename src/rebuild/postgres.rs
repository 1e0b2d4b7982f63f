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
//! * What users hung on the live table moves with its name ([`swap`]):
//!   owner, grants (table and column), comments, row-level security and
//!   its policies, triggers; dependent views are replaced over the new
//!   table (keeping their own grants), materialized views recreated. A
//!   table in a publication is refused: subscribers would be left on the
//!   old one.
//! * The swap never stalls readers: it takes its locks with a short
//!   `lock_timeout` ([`CUTOVER_LOCK_TIMEOUT`]) and tries again with backoff
//!   (the progress says how many sessions it waits for). It locks the
//!   table before the positions, as live writes do, so the two cannot
//!   deadlock. A failed rebuild keeps its table and positions: the next
//!   run resumes them (`--restart` starts from nothing).

use std::time::Duration;

use anyhow::{bail, Context as _};
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::watch;

use super::{
    caught_up, follow, furthest, rebuild_settings, runtime_with, Follower, LogStarts, Position, RebuildReport, Started,
};
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
    restart: bool,
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
    refuse_publications(&pool, &names).await?;
    let resumed = !restart && resumable(&pool, &names, &new_table).await?;
    if resumed {
        tracing::info!(connector = %names.connector, table = %new_table,
            "resuming the rebuild: the table and positions of the unfinished one are kept (--restart starts anew)");
    } else {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", names.qualified(&new_table))).execute(&pool).await?;
        sqlx::query(&format!("DELETE FROM {} WHERE connector = $1", names.offsets()))
            .bind(&names.rebuild_connector)
            .execute(&pool)
            .await
            .ok();
    }

    let mut settings = rebuild_settings(&runtime, &names.rebuild_connector, i64::from(version) + 1, |target| {
        if let Target::Postgres(target) = target {
            target.table = new_table.clone();
            target.create = true;
        }
    });
    // One rebuild at a time, its positions in `kawka_offsets` (claimed with
    // epochs, which fence any other): it reads every partition without
    // joining a group, so it starts without the broker's join delay.
    settings.source.assign_all = true;
    let Target::Postgres(target) = &settings.target else { bail!("{} is not a Postgres connector", names.connector) };
    let sink = Sink::Postgres(live.beside(&settings.sink_settings(), target));
    let rebuild_runtime = runtime_with(&runtime, settings, sink);
    let starts = LogStarts::of(&rebuild_runtime.kafka, &rebuild_runtime.settings.source).await?;

    let started = Started::now();
    loop {
        let follower = Follower::start(&rebuild_runtime);
        let followed = follow(&shutdown, &started, &mut progress, || async {
            let live = positions(&pool, &names, &names.connector).await?;
            let done = starts.floor(positions(&pool, &names, &names.rebuild_connector).await?, &live).await;
            Ok((live, done))
        })
        .await;
        follower.stop().await;
        followed.context("the live table is unchanged; run the rebuild again (it resumes where this one stopped)")?;
        match cut_over_patiently(
            &pool,
            &names,
            (&new_table, &previous_table, version + 1),
            &starts.last(),
            &started,
            &shutdown,
            &mut progress,
        )
        .await
        .context("the live table is unchanged and the rebuilt one kept; run the rebuild again to resume")?
        {
            CutOver::Done => {
                let events = positions(&pool, &names, &names.connector).await?.iter().map(|r| r.2 as u64).sum();
                return Ok(started.report(&rebuild_runtime, events, names.table.clone(), previous_table));
            }
            // The live connector moved on meanwhile: catch up again.
            CutOver::Behind => {}
        }
    }
}

/// Whether an unfinished rebuild into `new_table` can go on: the table is
/// there and so are its positions.
async fn resumable(pool: &PgPool, names: &Names, new_table: &str) -> anyhow::Result<bool> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(names.qualified(new_table))
        .fetch_one(pool)
        .await?;
    Ok(exists && !positions(pool, names, &names.rebuild_connector).await?.is_empty())
}

/// A table in a publication is not swapped: logical-replication
/// subscribers would go on with the old table, silently.
async fn refuse_publications(pool: &PgPool, names: &Names) -> anyhow::Result<()> {
    let publications: Vec<String> = sqlx::query_scalar(
        "SELECT p.pubname::text FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
         WHERE r.prrelid = to_regclass($1) ORDER BY 1",
    )
    .bind(names.qualified(&names.table))
    .fetch_all(pool)
    .await?;
    if !publications.is_empty() {
        bail!(
            "{} is in publication(s) {}: a swap would leave their subscribers on the old table. Take it out \
             (ALTER PUBLICATION … DROP TABLE …), rebuild, and add the new table",
            names.qualified(&names.table),
            publications.join(", ")
        );
    }
    Ok(())
}

/// How long the swap waits for a lock before it lets readers go and tries
/// again: readers queue behind a waiting `ACCESS EXCLUSIVE` request, so
/// this bounds how long any of them waits for the cut-over.
pub const CUTOVER_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

enum CutOver {
    Done,
    /// The live connector moved past the rebuild: nothing changed.
    Behind,
}

/// [`cut_over`], tried again (with backoff) while locks are held by
/// others: a long report query, or a live write.
async fn cut_over_patiently(
    pool: &PgPool,
    names: &Names,
    (new_table, previous_table, version): (&str, &str, i32),
    starts: &[Position],
    started: &Started,
    shutdown: &watch::Receiver<bool>,
    progress: &mut impl FnMut(&RebuildProgress),
) -> anyhow::Result<CutOver> {
    let mut attempt: u32 = 0;
    loop {
        match cut_over(pool, names, (new_table, previous_table, version), starts).await {
            Ok(true) => return Ok(CutOver::Done),
            Ok(false) => return Ok(CutOver::Behind),
            Err(error) if waits_on_locks(&error) => {
                attempt += 1;
                let holders: i64 = sqlx::query_scalar(
                    "SELECT count(DISTINCT pid) FROM pg_locks WHERE relation = to_regclass($1) AND granted \
                     AND pid <> pg_backend_pid()",
                )
                .bind(names.qualified(&names.table))
                .fetch_one(pool)
                .await
                .unwrap_or(0);
                let message = format!(
                    "cutting over: waiting for {holders} session(s) using {} (attempt {attempt}: {error:#})",
                    names.qualified(&names.table),
                );
                tracing::info!(connector = %names.connector, holders, attempt, "{message}");
                let sum = |positions: Vec<(String, i32, i64)>| positions.iter().map(|p| p.2.max(0) as u64).sum::<u64>();
                let done = sum(positions(pool, names, &names.rebuild_connector).await.unwrap_or_default());
                let target = sum(positions(pool, names, &names.connector).await.unwrap_or_default());
                let mut report = RebuildProgress::new(done, target, 0.0, started.at_ms);
                report.message = Some(message);
                progress(&report);
                if *shutdown.borrow() {
                    bail!("interrupted while cutting over");
                }
                // 0.1 s, doubling, at most 5 s: readers get the table back
                // between attempts.
                let delay = Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5));
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Lock timeouts (55P03), deadlocks (40P01) and serialization failures:
/// waiting can fix them.
fn waits_on_locks(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code())
            .is_some_and(|code| matches!(code.as_ref(), "55P03" | "40P01" | "40001"))
    })
}

/// The swap. Returns false (and changes nothing) when the live positions
/// moved past the rebuild's since it stopped. `starts`: where the logs
/// start, a floor under the rebuild's positions (see `LogStarts`).
async fn cut_over(
    pool: &PgPool,
    names: &Names,
    (new_table, previous_table, version): (&str, &str, i32),
    starts: &[Position],
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    lock_for_swap(&mut tx, names, new_table).await?;
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
    // Raised to where the logs start (see `LogStarts`).
    let committed = positions_in(&mut tx, names, &names.rebuild_connector).await?;
    let rebuilt = furthest(&committed, starts);
    let live_known: Vec<(String, i32, i64)> =
        live.iter().filter_map(|(t, p, n)| n.map(|n| (t.clone(), *p, n))).collect();
    if !caught_up(&live_known, &rebuilt) {
        tx.rollback().await?;
        return Ok(false);
    }
    let previous_positions = serde_json::to_value(&live_known)?;
    swap(&mut tx, names, new_table, previous_table).await?;
    // Where a start raised the rebuild's position the live one stays (it
    // is at most that start: nothing lies between): the live connector
    // goes on from positions it or the rebuild reached by reading.
    let moved: Vec<Position> = committed.into_iter().filter(|position| rebuilt.contains(position)).collect();
    move_positions(&mut tx, names, &moved).await?;
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

/// Locks the live table and `incoming` for a swap, table first: the
/// positions are locked after it, the order live writes take them in
/// (rows, then their positions), so the two never deadlock. A live write
/// in progress finishes first; none starts until the swap commits (then it
/// is fenced). Bounded by [`CUTOVER_LOCK_TIMEOUT`]: readers queue behind a
/// waiting lock.
async fn lock_for_swap(tx: &mut PgConnection, names: &Names, incoming: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("SET LOCAL lock_timeout = '{}ms'", CUTOVER_LOCK_TIMEOUT.as_millis()))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE",
        names.qualified(&names.table),
        names.qualified(incoming)
    ))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Puts `incoming` in the live table's place (the live table becomes
/// `outgoing`), carrying over what users hung on the live table: Postgres
/// attaches those to the table object, not its name, so a bare rename
/// would leave views reading the outgoing table (stale) and roles without
/// their grants on the incoming one. Runs in the caller's transaction,
/// with both tables locked.
async fn swap(tx: &mut PgConnection, names: &Names, incoming: &str, outgoing: &str) -> anyhow::Result<()> {
    let live = names.qualified(&names.table);
    let incoming_name = names.qualified(incoming);
    // Read before the renames: definitions name the live table by the
    // name the incoming one is about to take.
    let attached = attachments(tx, &live, &live).await?;
    let dependents = dependent_views(tx, &live).await?;
    // The incoming table starts bare (on a rollback it still holds what it
    // had when it was swapped out).
    for statement in strip(tx, &incoming_name).await? {
        sqlx::query(&statement).execute(&mut *tx).await.with_context(|| statement.clone())?;
    }
    sqlx::query(&format!("ALTER TABLE {live} RENAME TO {}", quote(outgoing))).execute(&mut *tx).await?;
    sqlx::query(&format!("ALTER TABLE {incoming_name} RENAME TO {}", quote(&names.table))).execute(&mut *tx).await?;
    for statement in attached.iter().chain(dependents.iter()) {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("carrying over to the new {live}: {statement}"))?;
    }
    Ok(())
}

/// The SQL that gives `target` what `source` has: owner, grants (table and
/// column), comments, row-level security with its policies, triggers.
/// (Generated by Postgres itself: identifiers and literals quoted by
/// `format`'s `%I` and `%L`.)
async fn attachments(tx: &mut PgConnection, source: &str, target: &str) -> anyhow::Result<Vec<String>> {
    const SQL: &str = r#"
WITH t AS (SELECT oid, relowner, relacl, relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = $1::regclass),
grantee AS (SELECT 0::oid AS oid, 'PUBLIC' AS name UNION ALL SELECT oid, quote_ident(rolname) FROM pg_roles)
SELECT 1 AS o, format('ALTER TABLE %s OWNER TO %I', $2, pg_get_userbyid(t.relowner)) FROM t
UNION ALL
SELECT 2, format('GRANT %s ON %s TO %s%s', a.privilege_type, $2, g.name,
       CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
  FROM t, aclexplode(t.relacl) a JOIN grantee g ON g.oid = a.grantee WHERE a.grantee <> t.relowner
UNION ALL
SELECT 3, format('GRANT %s (%I) ON %s TO %s%s', a.privilege_type, att.attname, $2, g.name,
       CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
  FROM t JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped,
       aclexplode(att.attacl) a JOIN grantee g ON g.oid = a.grantee WHERE a.grantee <> t.relowner
UNION ALL
SELECT 4, format('COMMENT ON TABLE %s IS %L', $2, obj_description(t.oid, 'pg_class'))
  FROM t WHERE obj_description(t.oid, 'pg_class') IS NOT NULL
UNION ALL
SELECT 5, format('COMMENT ON COLUMN %s.%I IS %L', $2, att.attname, col_description(t.oid, att.attnum))
  FROM t JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped
 WHERE col_description(t.oid, att.attnum) IS NOT NULL
UNION ALL
SELECT 6, format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', $2) FROM t WHERE t.relrowsecurity
UNION ALL
SELECT 7, format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', $2) FROM t WHERE t.relforcerowsecurity
UNION ALL
SELECT 8, format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', p.polname, $2,
       CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
       CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
       (SELECT string_agg(g.name, ', ') FROM unnest(p.polroles) r JOIN grantee g ON g.oid = r),
       COALESCE(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', ''),
       COALESCE(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', ''))
  FROM t JOIN pg_policy p ON p.polrelid = t.oid
UNION ALL
SELECT 9, pg_get_triggerdef(tg.oid) FROM t JOIN pg_trigger tg ON tg.tgrelid = t.oid AND NOT tg.tgisinternal
ORDER BY 1"#;
    let rows = sqlx::query(SQL).bind(source).bind(target).fetch_all(&mut *tx).await?;
    let mut statements: Vec<String> = rows.iter().map(|r| r.get::<String, _>(1)).collect();
    // Trigger definitions name the source; the target is the same name
    // after the swap (both are the live name), so they apply as they are.
    statements.retain(|s| !s.is_empty());
    Ok(statements)
}

/// The SQL that takes from `table` what [`attachments`] would give it:
/// grants to others, policies, triggers (its owner's rights stay).
async fn strip(tx: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    const SQL: &str = r#"
WITH t AS (SELECT oid, relowner, relacl FROM pg_class WHERE oid = $1::regclass),
grantee AS (SELECT 0::oid AS oid, 'PUBLIC' AS name UNION ALL SELECT oid, quote_ident(rolname) FROM pg_roles)
SELECT DISTINCT format('REVOKE ALL ON %s FROM %s', $1, g.name)
  FROM t, aclexplode(t.relacl) a JOIN grantee g ON g.oid = a.grantee WHERE a.grantee <> t.relowner
UNION ALL
SELECT DISTINCT format('REVOKE ALL (%I) ON %s FROM %s', att.attname, $1, g.name)
  FROM t JOIN pg_attribute att ON att.attrelid = t.oid AND att.attnum > 0 AND NOT att.attisdropped,
       aclexplode(att.attacl) a JOIN grantee g ON g.oid = a.grantee WHERE a.grantee <> t.relowner
UNION ALL
SELECT format('DROP POLICY %I ON %s', p.polname, $1) FROM t JOIN pg_policy p ON p.polrelid = t.oid
UNION ALL
SELECT format('DROP TRIGGER %I ON %s', tg.tgname, $1) FROM t JOIN pg_trigger tg ON tg.tgrelid = t.oid AND NOT tg.tgisinternal
UNION ALL
SELECT format('ALTER TABLE %s NO FORCE ROW LEVEL SECURITY', $1) FROM t
UNION ALL
SELECT format('ALTER TABLE %s DISABLE ROW LEVEL SECURITY', $1) FROM t"#;
    let rows = sqlx::query(SQL).bind(table).fetch_all(&mut *tx).await?;
    Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
}

/// The SQL that points the views over `table` at whatever holds its name
/// after the swap: plain views are replaced (`CREATE OR REPLACE` keeps
/// their own grants, comments and owner); materialized views are dropped
/// and created again with their data, indexes, grants, comments and owner.
async fn dependent_views(tx: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    let views = sqlx::query(
        "SELECT DISTINCT v.oid::regclass::text, v.relkind::text, pg_get_viewdef(v.oid),                 COALESCE(array_to_string(v.reloptions, ', '), '')            FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class           WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass             AND d.refobjid = $1::regclass AND v.oid <> $1::regclass           ORDER BY 1",
    )
    .bind(table)
    .fetch_all(&mut *tx)
    .await?;
    let mut statements = Vec::new();
    for view in &views {
        let (name, kind, definition, options): (String, String, String, String) =
            (view.get(0), view.get(1), view.get(2), view.get(3));
        let definition = definition.trim().trim_end_matches(';');
        let with = if options.is_empty() { String::new() } else { format!(" WITH ({options})") };
        if kind == "v" {
            statements.push(format!("CREATE OR REPLACE VIEW {name}{with} AS {definition}"));
            continue;
        }
        // A materialized view: what is hung on it is read now, by name.
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1::regclass ORDER BY indexrelid",
        )
        .bind(&name)
        .fetch_all(&mut *tx)
        .await?;
        let own = attachments(tx, &name, &name).await?;
        statements.push(format!("DROP MATERIALIZED VIEW {name}"));
        statements.push(format!("CREATE MATERIALIZED VIEW {name}{with} AS {definition} WITH DATA"));
        statements.extend(indexes);
        // Owner, grants and comments, in the materialized view's words;
        // it has no policies or triggers.
        statements.extend(own.into_iter().map(|s| {
            s.replacen("ALTER TABLE ", "ALTER MATERIALIZED VIEW ", 1).replacen(
                "COMMENT ON TABLE ",
                "COMMENT ON MATERIALIZED VIEW ",
                1,
            )
        }));
    }
    Ok(statements)
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
    lock_for_swap(&mut tx, &names, &previous_table)
        .await
        .context("the live table is busy (a long reader or a write); try again")?;
    sqlx::query(&format!("SELECT 1 FROM {} WHERE connector = $1 FOR UPDATE", names.offsets()))
        .bind(&names.connector)
        .execute(&mut *tx)
        .await?;
    swap(&mut tx, &names, &previous_table, &rolled_out).await?;
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
