//! The compaction-friendly runs (issue 27): a retail inventory, shipments
//! in and sales out over 1,000 store/item keys on two topics of 3
//! partitions each, folded into few rows (`increment` / `decrement`), as in
//! `connectors/inventory.yaml`. The sink writes little after per-key
//! compaction, so kawka's own cost per event sets the pace:
//!
//! * the bare consumer reading both topics (the baseline);
//! * `kawka run` of the read model, from its first commit to its last;
//! * `kawka rebuild` of the same read model once the live run is done, from
//!   the process's start to its exit (group join and cut-over included).
//!
//! Both kawka runs are checked against the reference fold of the events
//! (one event at a time), and their row writes (`pg_stat_user_tables`)
//! against the events they folded.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use kawka::codec::framing;
use rdkafka::producer::Producer as _;
use serde_json::json;

use super::{cpu_of, producer, send, Run};

const SHIPPED: &str = r#"{"type":"record","name":"ShipmentReceived","namespace":"bench.retail","fields":[
 {"name":"store_id","type":"string"},{"name":"item_id","type":"string"},{"name":"quantity","type":"int"},
 {"name":"supplier","type":"string"},{"name":"received_at","type":"long"}]}"#;
const SOLD: &str = r#"{"type":"record","name":"ItemSold","namespace":"bench.retail","fields":[
 {"name":"store_id","type":"string"},{"name":"item_id","type":"string"},{"name":"quantity","type":"int"},
 {"name":"price_cents","type":"long"},{"name":"sold_at","type":"long"},{"name":"channel","type":"string"}]}"#;
const STORES: usize = 20;
const ITEMS: usize = 50;

/// One stock movement: two in five are shipments (10–50 units), the rest
/// sales (1–3 units); keys are spread over the 1,000 store/item pairs.
struct Movement {
    store: String,
    item: String,
    quantity: i64,
    shipment: bool,
    at: i64,
}

fn movement(n: usize) -> Movement {
    let key = (n * 7919) % (STORES * ITEMS);
    let shipment = n % 5 < 2;
    Movement {
        store: format!("store-{:02}", key % STORES),
        item: format!("item-{:03}", key / STORES),
        quantity: if shipment { 10 + (n % 41) as i64 } else { 1 + (n % 3) as i64 },
        shipment,
        at: 1_700_000_000_000 + n as i64,
    }
}

fn encode(m: &Movement, shipped: &super::Writer, sold: &super::Writer) -> Vec<u8> {
    let text = |s: &str| AvroValue::String(s.to_string());
    let common =
        [("store_id", text(&m.store)), ("item_id", text(&m.item)), ("quantity", AvroValue::Int(m.quantity as i32))];
    let ((writer, id), rest) = if m.shipment {
        (shipped, vec![("supplier", text("acme")), ("received_at", AvroValue::Long(m.at))])
    } else {
        (
            sold,
            vec![("price_cents", AvroValue::Long(199)), ("sold_at", AvroValue::Long(m.at)), ("channel", text("till"))],
        )
    };
    let fields = common.into_iter().chain(rest).map(|(name, value)| (name.to_string(), value)).collect();
    let body = writer.write_value_to_vec(AvroValue::Record(fields)).expect("a movement matches its schema");
    let mut out = Vec::with_capacity(body.len() + 5);
    framing::frame_into(*id, &body, &mut out);
    out
}

fn connector(name: &str, topics: &[String; 2], properties: &[(String, String)]) -> String {
    let extra = super::yaml_properties(properties);
    let batch = super::arg("--inventory-batch", 10_000);
    format!(
        r#"name: {name}
source: {{ topics: [{}, {}], start: earliest, properties: {{ session.timeout.ms: "6000"{extra} }} }}
sink:
  to: readdb
  table: {name}
  columns: {{ store_id: text, item_id: text, on_hand: bigint }}
  primary_key: [store_id, item_id]
  fillfactor: 70
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: {batch}, max_wait: 500ms }}
events:
  bench.retail.ShipmentReceived: {{ increment: {{ on_hand: quantity }} }}
  bench.retail.ItemSold:         {{ decrement: {{ on_hand: quantity }} }}
"#,
        topics[0], topics[1]
    )
}

/// The table's rows against the reference fold; panics on a difference
/// (a fast wrong answer is no result).
async fn check(pool: &sqlx::PgPool, table: &str, expected: &HashMap<(String, String), i64>, what: &str) {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as(&format!("SELECT store_id, item_id, on_hand FROM {table}")).fetch_all(pool).await.expect("rows");
    let found: HashMap<(String, String), i64> = rows.into_iter().map(|(s, i, n)| ((s, i), n)).collect();
    assert_eq!(found.len(), expected.len(), "{what}: {} rows, the fold has {}", found.len(), expected.len());
    for (key, on_hand) in expected {
        assert_eq!(found.get(key), Some(on_hand), "{what}: {key:?}");
    }
}

/// Rows inserted and updated in `table` (the server's statistics, flushed
/// when the writers' sessions end): what the sink wrote after compaction.
async fn row_writes(pool: &sqlx::PgPool, table: &str) -> i64 {
    let mut last = -1;
    // The statistics of a session arrive when it ends; wait until they stand still.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0)::bigint FROM pg_stat_user_tables WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("pg_stat_user_tables");
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    last
}

/// `kawka rebuild <connector>` timed from its start to its exit; its CPU and
/// peak RSS read from `/proc` while it runs (the last reading before it exits).
fn rebuild(project: &Path, connector: &str) -> (Run, f64, f64, String) {
    let binary = super::binary();
    let started = Instant::now();
    let mut child = std::process::Command::new(&binary)
        .args(["rebuild", connector, "--config", "config/kawka.yaml"])
        // Its phases (group join, catching up, cut-over) in its log, kept
        // in target/bench-rebuild.log.
        .env("RUST_LOG", "info")
        .current_dir(project)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kawka rebuild");
    let pid = child.id().to_string();
    let (mut cpu, mut peak_kb) = (0.0, 0u64);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if let Some((_, seconds)) = cpu_of(&pid) {
            cpu = seconds;
        }
        peak_kb = peak_kb.max(super::peak_rss_kb(&pid));
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = started.elapsed().as_secs_f64();
    let output = child.wait_with_output().expect("output");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let log = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-rebuild.log");
    let _ = std::fs::write(log, &text);
    assert!(status.success(), "kawka rebuild failed ({status}):\n{text}");
    let report = text.lines().rev().find(|l| l.contains("rebuilt ")).unwrap_or_default().trim().to_string();
    (Run { events: 0, seconds, server_cpu_seconds: 0.0 }, cpu, peak_kb as f64 / 1024.0, report)
}

/// What the inventory runs need of the main harness.
pub struct Context<'a> {
    pub bootstrap: &'a str,
    pub registry: &'a str,
    pub client: &'a kawka::codec::registry::RegistryClient,
    pub pool: &'a sqlx::PgPool,
    pub properties: &'a [(String, String)],
    pub tag: &'a str,
}

/// Produces the inventory, runs the bare consumer, kawka's live run and its
/// rebuild; prints them and returns their JSON.
pub async fn run(ctx: &Context<'_>, total: usize) -> serde_json::Value {
    let shipped_id = ctx.client.register("bench.retail.ShipmentReceived", SHIPPED, &[]).await.expect("register");
    let sold_id = ctx.client.register("bench.retail.ItemSold", SOLD, &[]).await.expect("register");
    let topics = [format!("bench_shipments_{}", ctx.tag), format!("bench_sales_{}", ctx.tag)];
    eprintln!("producing {total} inventory events to {} and {}…", topics[0], topics[1]);
    for topic in &topics {
        super::create_topic(ctx.bootstrap, topic).await;
    }
    let producer = producer(ctx.bootstrap);
    let schemas = [SHIPPED, SOLD].map(|text| Schema::parse_str(text).expect("an inventory schema"));
    let (shipped, sold) = (super::writer(&schemas[0], shipped_id), super::writer(&schemas[1], sold_id));
    let mut fold: HashMap<(String, String), i64> = HashMap::new();
    for n in 0..total {
        let m = movement(n);
        let key = format!("{}/{}", m.store, m.item);
        let topic = if m.shipment { &topics[0] } else { &topics[1] };
        send(&producer, topic, key.as_bytes(), &encode(&m, &shipped, &sold));
        *fold.entry((m.store, m.item)).or_insert(0) += if m.shipment { m.quantity } else { -m.quantity };
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
    drop(producer);

    let bare = super::bare_consumer(ctx.bootstrap, &[&topics[0], &topics[1]], total, ctx.properties);
    let name = format!("bench_inventory_{}", ctx.tag);
    let project = super::project(ctx.registry, &connector(&name, &topics, ctx.properties));
    let (live, _) =
        super::run_kawka(project.path(), "inventory", "postgres", total, None, super::progress(ctx.pool, &name)).await;
    check(ctx.pool, &name, &fold, "the live run").await;
    let live_writes = row_writes(ctx.pool, &name).await;

    let (mut rebuilt, rebuild_cpu, rebuild_rss, report) = rebuild(project.path(), &name);
    rebuilt.events = total;
    // The rebuilt table is now the live name; the previous one `<name>_v1`.
    check(ctx.pool, &name, &fold, "the rebuild").await;
    let rebuild_writes = row_writes(ctx.pool, &name).await;

    let ratio = |run: &Run| run.rate() / bare.rate();
    println!("\ninventory: {total} events over {} keys, 2 topics × {} partitions", fold.len(), super::PARTITIONS);
    println!(
        "{:<34} {:>10} {:>9.2} s {:>12.0} /s",
        "bare consumer, both topics",
        bare.events,
        bare.seconds,
        bare.rate()
    );
    println!(
        "{:<34} {:>10} {:>9.2} s {:>12.0} /s {:>7.2}× {:>7.0} MB",
        "kawka → postgres, inventory",
        live.run.events,
        live.run.seconds,
        live.run.rate(),
        ratio(&live.run),
        live.peak_rss_mb
    );
    println!(
        "{:<34} {:>10} {:>9.2} s {:>12.0} /s {:>7.2}× {:>7.0} MB",
        "kawka rebuild, inventory",
        rebuilt.events,
        rebuilt.seconds,
        rebuilt.rate(),
        ratio(&rebuilt),
        rebuild_rss
    );
    println!("    {}", super::cpu_line(&live, "postgres"));
    println!("    {}", super::threads_line(&live));
    println!(
        "  live run: {:.0} batches, sink writes {:.2} s of {:.2} s ({:.0}%), {:.1} ms per batch",
        live.batches,
        live.sink_seconds,
        live.run.seconds,
        100.0 * live.sink_seconds / live.run.seconds,
        1000.0 * live.sink_seconds / live.batches.max(1.0)
    );
    println!(
        "  live run: {total} events → {live_writes} row writes ({} saved by compaction, {:.1} events per row write)",
        total as i64 - live_writes,
        total as f64 / live_writes.max(1) as f64
    );
    println!(
        "  rebuild: {total} events → {rebuild_writes} row writes ({} saved, {:.1} events per row write); \
         kawka CPU {:.2} µs per event over the whole process; {report}",
        total as i64 - rebuild_writes,
        total as f64 / rebuild_writes.max(1) as f64,
        rebuilt.per_event(rebuild_cpu),
    );
    for table in [name.clone(), format!("{name}_v1")] {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}")).execute(ctx.pool).await;
    }
    json!({
        "events": total,
        "keys": fold.len(),
        "bare_consumer": {"seconds": bare.seconds, "per_second": bare.rate()},
        "live": {"seconds": live.run.seconds, "per_second": live.run.rate(), "ratio_to_bare": ratio(&live.run),
                 "kawka_us_per_event": live.run.per_event(live.cpu_seconds), "peak_rss_mb": live.peak_rss_mb,
                 "row_writes": live_writes, "threads": live.threads},
        "rebuild": {"seconds": rebuilt.seconds, "per_second": rebuilt.rate(), "ratio_to_bare": ratio(&rebuilt),
                    "kawka_us_per_event": rebuilt.per_event(rebuild_cpu), "peak_rss_mb": rebuild_rss,
                    "row_writes": rebuild_writes, "report": report},
    })
}
