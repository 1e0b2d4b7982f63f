//! Limits that hold whatever the input and the group do, against the real
//! stack: memory stays under the fetch-ahead cap with large records, a
//! paused replica does not hold up its group's rebalance, and two replicas
//! writing the same rows queue for them instead of deadlocking.

mod support;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value as Json};
use sqlx::Row;

use support::{eventually, Kawka, Project};

/// Produces framed records as they are: (partition, key, value).
async fn produce_raw(topic: &str, records: impl IntoIterator<Item = (i32, String, Vec<u8>)>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", support::kafka_bootstrap())
        .set("message.max.bytes", "10000000")
        .set("linger.ms", "5")
        .create()
        .expect("a producer");
    let mut sends = Vec::new();
    for (partition, key, value) in records {
        let producer = producer.clone();
        let topic = topic.to_string();
        sends.push(async move {
            let record = FutureRecord::to(&topic).partition(partition).key(&key).payload(&value);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("produced");
        });
        if sends.len() == 200 {
            futures::future::join_all(std::mem::take(&mut sends)).await;
        }
    }
    futures::future::join_all(sends).await;
}

/// Avro binary of a record of strings, in field order.
fn strings_body(values: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for value in values {
        let n = value.len() as i64;
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The peak resident set of a process so far (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_stay_within_the_fetch_ahead_cap() {
    let registry = support::start_registry().await;
    let topic = support::unique("large");
    let name = support::unique("large");
    support::create_topic(&topic, 2).await;
    let schema = support::record_schema(
        "test.limits",
        "Blob",
        json!([{"name": "id", "type": "string"}, {"name": "blob", "type": "string"}]),
    );
    let id = support::register(&registry.url(), &format!("{topic}-test.limits.Blob"), &schema).await;
    // 2,000 records of 100 KB: a 200 MB backlog, three times the cap.
    const RECORDS: usize = 2000;
    const SIZE: usize = 100_000;
    let blob: String = (0..SIZE).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
    produce_raw(
        &topic,
        (0..RECORDS).map(|n| {
            let key = format!("b{n}");
            (n as i32 % 2, key.clone(), support::framed(id, &strings_body(&[&key, &blob])))
        }),
    )
    .await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest }}
sink: {{ to: readdb, table: {name}, columns: {{ id: text, blob: text }}, primary_key: [id] }}
key: {{ id: id }}
batch: {{ max_bytes: 1MiB }}
events:
  test.limits.Blob: {{ upsert: {{ blob: blob }} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    eventually(Duration::from_secs(240), "every large record", || async {
        (support::stored_positions(&pool, &name).await == RECORDS as i64).then_some(())
    })
    .await;
    let peak = peak_rss(kawka.pid());
    let written: i64 = sqlx::query(&format!("SELECT count(*) FROM \"{name}\" WHERE length(blob) = {SIZE}"))
        .fetch_one(&pool)
        .await
        .expect("count")
        .get(0);
    assert_eq!(written, RECORDS as i64);
    // README's bound: the fetch-ahead cap (64 MiB: half in librdkafka's
    // queue, half in the records channel), plus the batch being built and
    // the batches in flight (here 2 partitions x 2 + 1), each up to 4 x
    // batch.max_bytes (its records, their decoded values, the COPY text
    // and the client's copy of it) and the chunk its first records came
    // in (a chunk's values share one buffer: 1/16 of the cap), over a
    // process of 80 MiB. Without the cap in bytes this run peaked at 233 MiB.
    let cap: u64 = 64 << 20;
    let bound = cap + 5 * (4 * (1 << 20) + cap / 16) + (80 << 20);
    eprintln!("large records: {RECORDS} x {SIZE} bytes, peak RSS {} MiB (bound {} MiB)", peak >> 20, bound >> 20);
    assert!(peak < bound, "peak RSS {} MiB over the bound {} MiB", peak >> 20, bound >> 20);
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only
}

/// An inventory connector over `topic` whose Kafka key is not the row key:
/// events of one row come from every partition.
fn inventory(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "500" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: 400, max_wait: 20ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
"#
    )
}

/// `events` ItemSold records over `items` rows, spread over `partitions`
/// partitions at random; returns them and each row's expected on_hand.
fn sales(events: usize, items: usize, partitions: i32) -> (Vec<Json>, std::collections::BTreeMap<String, i64>) {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut expected = std::collections::BTreeMap::new();
    let records = (0..events)
        .map(|n| {
            let item = format!("i{}", rng.random_range(0..items));
            let quantity = rng.random_range(1..5);
            *expected.entry(item.clone()).or_insert(0) -= quantity;
            json!({"schema": "sold", "key": format!("sale{n}"), "partition": rng.random_range(0..partitions),
                "value": {"sale_id": format!("sale{n}"), "store_id": "s1", "item_id": item, "quantity": quantity,
                "sold_at": 1_700_000_000_000i64}})
        })
        .collect();
    (records, expected)
}

async fn on_hand(pool: &sqlx::PgPool, name: &str) -> std::collections::BTreeMap<String, i64> {
    sqlx::query(&format!("SELECT item_id, on_hand FROM \"{name}\""))
        .fetch_all(pool)
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The base URL of a running kawka's HTTP port.
async fn base(kawka: &Kawka) -> String {
    let address =
        eventually(Duration::from_secs(30), "the http address", || async { support::http_address(&kawka.log()) }).await;
    format!("http://{address}")
}

/// Retries of the sink stage in a kawka's metrics.
async fn sink_retries(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with("kawka_retries_total{") && l.contains("stage=\"sink\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_does_not_hold_up_its_groups_rebalance() {
    let registry = support::start_registry().await;
    let topic = support::unique("paused");
    let name = support::unique("paused");
    support::create_topic(&topic, 4).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record",
        "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    let (records, expected) = sales(40_000, 50, 4);
    let (first, rest) = records.split_at(2_000);
    support::produce_with_python(&spec, first.to_vec()).await;
    let project = Project::new(&registry.url(), &[(&name, &inventory(&name, &topic))]);
    let pool = support::postgres().await;
    let mut a = project.start(0);
    let a_base = base(&a).await;
    eventually(Duration::from_secs(60), "the first replica to start writing", || async {
        (support::stored_positions(&pool, &name).await > 0).then_some(())
    })
    .await;
    let paused = reqwest::Client::new().post(format!("{a_base}/connectors/{name}/pause")).send().await.expect("pause");
    assert!(paused.status().is_success(), "{paused:?}");
    // A backlog the paused replica's channel fills with.
    support::produce_with_python(&spec, rest.to_vec()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = support::stored_positions(&pool, &name).await;
    let mut b = project.start(1);
    // The second replica gets its partitions and writes them while the
    // first stays paused: the rebalance did not wait for it.
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(45), "the second replica to write while the first is paused", || async {
        (support::stored_positions(&pool, &name).await > held + 1000).then_some(())
    })
    .await;
    let took = started.elapsed();
    eprintln!("rebalance with a paused replica: the new one wrote after {took:?}");
    // Served, not timed out: the revoke's wait for a flush is 10 s.
    assert!(took < kawka::source::kafka::REVOKE_WAIT, "the rebalance waited {took:?}");
    assert!(!a.log().contains("did not flush before the revoke"), "the paused replica served its revoke");
    let resumed =
        reqwest::Client::new().post(format!("{a_base}/connectors/{name}/resume")).send().await.expect("resume");
    assert!(resumed.status().is_success());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while support::stored_positions(&pool, &name).await != 40_000 {
        if std::time::Instant::now() > deadline {
            let b_base = base(&b).await;
            for base in [&a_base, &b_base] {
                let status = reqwest::get(format!("{base}/connectors/{name}")).await.expect("status").text().await;
                eprintln!("{base}: {status:?}");
            }
            let tail = |log: String| log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!("not every event after 120 s; a:\n{}\nb:\n{}", tail(a.log()), tail(b.log()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(on_hand(&pool, &name).await, expected, "every sale applied once");
    assert_eq!(a.terminate().await, Some(0), "clean exit; log:\n{}", a.log());
    assert_eq!(b.terminate().await, Some(0), "clean exit; log:\n{}", b.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_writing_the_same_rows_queue_instead_of_deadlocking() {
    let registry = support::start_registry().await;
    let topic = support::unique("overlap");
    let name = support::unique("overlap");
    support::create_topic(&topic, 4).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record",
        "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    // Every batch of every partition touches most of the 300 rows.
    let (records, expected) = sales(60_000, 300, 4);
    let project = Project::new(&registry.url(), &[(&name, &inventory(&name, &topic))]);
    let pool = support::postgres().await;
    let mut a = project.start(0);
    let mut b = project.start(1);
    let (a_base, b_base) = (base(&a).await, base(&b).await);
    // Both have joined before the events come, so both write from the start.
    eventually(Duration::from_secs(60), "both replicas to hold partitions", || async {
        let mut holding = 0;
        for base in [&a_base, &b_base] {
            let status: Json = reqwest::get(format!("{base}/connectors/{name}")).await.ok()?.json().await.ok()?;
            holding += usize::from(status["partitions"].as_array().is_some_and(|p| !p.is_empty()));
        }
        (holding == 2).then_some(())
    })
    .await;
    support::produce_with_python(&spec, records).await;
    eventually(Duration::from_secs(180), "every event", || async {
        (support::stored_positions(&pool, &name).await == 60_000).then_some(())
    })
    .await;
    assert_eq!(on_hand(&pool, &name).await, expected, "every sale applied once");
    let retries = (sink_retries(&a_base).await, sink_retries(&b_base).await);
    let deadlocks = a.log().matches("deadlock detected").count() + b.log().matches("deadlock detected").count();
    eprintln!("two replicas on 300 shared rows: sink retries {retries:?}, deadlocks in the logs {deadlocks}");
    for line in a.log().lines().chain(b.log().lines()).filter(|l| l.contains("deadlock")).take(5) {
        eprintln!("  {line}");
    }
    assert_eq!(deadlocks, 0, "no deadlock between the replicas");
    assert_eq!(retries, (0, 0), "no sink retries");
    assert_eq!(a.terminate().await, Some(0), "clean exit; log:\n{}", a.log());
    assert_eq!(b.terminate().await, Some(0), "clean exit; log:\n{}", b.log());
    let _ = registry.stop().await; // cleanup only
}
