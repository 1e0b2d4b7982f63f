//! Fault tests against the real stack: bad input of every kind goes to the
//! dead-letter topic with its reasons while the good events around it are
//! written; a registry outage and a Postgres outage lose nothing, apply
//! nothing twice, and the connector resumes by itself.
//!
//! These tests stop shared services, so they run one at a time.

mod support;

use std::time::Duration;

use serde_json::{json, Value as Json};
use sqlx::Row;

use support::{eventually, Project};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Avro binary of an ItemSold v1 (the catalogue's schema).
fn item_sold_body(sale: &str, store: &str, item: &str, quantity: i32) -> Vec<u8> {
    use apache_avro::types::Value;
    let schema = apache_avro::Schema::parse(&support::catalogue_schema("com.example.retail.ItemSold", 1))
        .expect("the catalogue's ItemSold v1");
    let record = Value::Record(vec![
        ("sale_id".into(), Value::String(sale.into())),
        ("store_id".into(), Value::String(store.into())),
        ("item_id".into(), Value::String(item.into())),
        ("quantity".into(), Value::Int(quantity)),
        ("sold_at".into(), Value::TimestampMillis(1_700_000_000_000)),
    ]);
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .and_then(|writer| writer.write_value_to_vec(record))
        .expect("an ItemSold v1")
}

fn sold(n: usize, quantity: i64) -> Json {
    json!({"schema": "sold", "key": "s1:i1", "value": {"sale_id": format!("sale{n}"), "store_id": "s1",
        "item_id": "i1", "quantity": quantity, "sold_at": 1_700_000_000_000i64}})
}

fn connector(name: &str, topic: &str, extra_events: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, max_record_bytes: 1KiB, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
dead_letter_topic: {name}.dlq
batch: {{ max_events: 50, max_wait: 50ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
{extra_events}"#
    )
}

/// Waits until the connector's HTTP status shows it retrying; returns it.
async fn retrying(base: &str, name: &str) -> Json {
    eventually(Duration::from_secs(30), "the connector to show its retries", || async {
        let status: Json = reqwest::get(format!("{base}/connectors/{name}")).await.ok()?.json().await.ok()?;
        (status["state"] == "retrying").then_some(status)
    })
    .await
}

async fn position(pool: &sqlx::PgPool, name: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(next_offset)::bigint FROM kawka_offsets WHERE connector = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

async fn on_hand(pool: &sqlx::PgPool, name: &str) -> Option<i64> {
    sqlx::query(&format!("SELECT on_hand FROM \"{name}\" WHERE store_id = 's1' AND item_id = 'i1'"))
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_poison_is_dead_lettered_and_its_neighbours_are_written() {
    let _serial = SERIAL.lock().await;
    let registry = support::start_registry().await;
    let topic = support::unique("poison");
    let name = support::unique("poison");
    support::create_topic(&topic, 1).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let record = |name: &str, fields: Json| support::record_schema("test.poison", name, fields);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
    "subject_strategy": "topic_record", "schemas": {
        "sold": support::catalogue_schema("com.example.retail.ItemSold", 1),
        "loose": record("Loose", json!([{"name": "store_id", "type": ["null", "string"]}, {"name": "item_id", "type": "string"}, {"name": "quantity", "type": "int"}])),
        "counted": record("Counted", json!([{"name": "store_id", "type": "string"}, {"name": "item_id", "type": "string"}, {"name": "label", "type": "string"}])),
    }});
    // Offset 0: a good event, which also registers the ItemSold schema.
    let id = support::produce_with_python(&spec, vec![sold(0, 1)]).await.ids["sold"];
    let body = item_sold_body("x", "s1", "i1", 5);
    let poison: Vec<(Json, &str, &str)> = vec![
        (json!({"key": "s1:i1", "raw_value_hex": ""}), "decode", "empty value"),
        (sold(2, 2), "", "good"),
        (
            json!({"key": "s1:i1", "raw_value_hex": format!("01{}", &support::framed_hex(id, &body)[2..])}),
            "decode",
            "wrong magic byte",
        ),
        (
            json!({"key": "s1:i1", "raw_value_hex": support::framed_hex(id, &body[..body.len() - 3])}),
            "decode",
            "truncated Avro",
        ),
        (
            json!({"key": "s1:i1", "raw_value_hex": support::framed_hex(1_000_000, &body)}),
            "decode",
            "unknown schema id",
        ),
        (
            json!({"key": "s1:i1", "raw_value_hex": support::framed_hex(id, &[0xff; 12])}),
            "decode",
            "value not matching its schema",
        ),
        (
            json!({"schema": "loose", "key": "s1:i1", "value": {"store_id": null, "item_id": "i1", "quantity": 1}}),
            "projection",
            "missing key field",
        ),
        (
            json!({"schema": "counted", "key": "s1:i1", "value": {"store_id": "s1", "item_id": "i1", "label": "many"}}),
            "sink",
            "wrong type for a column",
        ),
        (
            json!({"key": "s1:i1", "raw_value_hex": support::framed_hex(id, &vec![0u8; 2000])}),
            "source",
            "oversized message",
        ),
        (json!({"key": "s1:i1", "value": null}), "projection", "tombstone without key"),
        (
            json!({"raw_key_hex": "fffe", "schema": "sold", "value": {"sale_id": "k", "store_id": "s1", "item_id": "i1", "quantity": 7, "sold_at": 0}}),
            "decode",
            "invalid UTF-8 key",
        ),
        (sold(12, 3), "", "good"),
    ];
    let records: Vec<Json> = poison.iter().map(|(r, _, _)| r.clone()).collect();
    support::produce_with_python(&spec, records).await;
    let total = 1 + poison.len() as i64;
    let extra = "  test.poison.Loose: { decrement: { on_hand: quantity } }\n  test.poison.Counted: { upsert: { on_hand: label } }\n";
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, extra))]);
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    eventually(Duration::from_secs(60), "every record to be consumed", || async {
        (position(&pool, &name).await == total).then_some(())
    })
    .await;
    assert_eq!(on_hand(&pool, &name).await, Some(-6), "the three good events (1 + 2 + 3) are written");
    let bad: Vec<(i64, &str, &str)> = poison
        .iter()
        .enumerate()
        .filter(|(_, (_, stage, _))| !stage.is_empty())
        .map(|(n, (_, stage, what))| (n as i64 + 1, *stage, *what))
        .collect();
    assert!(bad.len() >= 10, "at least ten kinds of bad input");
    let dead = support::consume(&format!("{name}.dlq"), bad.len(), Duration::from_secs(30)).await;
    assert_eq!(dead.len(), bad.len(), "one dead letter per bad record");
    let produced = support::consume(&topic, total as usize, Duration::from_secs(30)).await;
    for (letter, (offset, stage, what)) in dead.iter().zip(&bad) {
        let header = |key: &str| {
            letter
                .headers
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.clone())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        assert_eq!(header("kawka.error.offset"), Some(offset.to_string()), "{what}: dead letters keep log order");
        assert_eq!(header("kawka.error.stage").as_deref(), Some(*stage), "{what}: {:?}", header("kawka.error.message"));
        assert_eq!(header("kawka.error.class").as_deref(), Some("permanent"), "{what}");
        assert_eq!(header("kawka.error.connector").as_deref(), Some(name.as_str()), "{what}");
        assert_eq!(header("kawka.error.topic").as_deref(), Some(topic.as_str()), "{what}");
        assert_eq!(header("kawka.error.partition").as_deref(), Some("0"), "{what}");
        assert!(header("kawka.error.timestamp").is_some_and(|t| t.parse::<i64>().is_ok()), "{what}");
        assert!(header("kawka.error.message").is_some_and(|m| !m.is_empty()), "{what}");
        let original = &produced[*offset as usize];
        assert_eq!((&letter.key, &letter.value), (&original.key, &original.value), "{what}: the original bytes");
        eprintln!("{what:32} -> {stage:10} {}", header("kawka.error.message").unwrap_or_default());
    }
    let status =
        reqwest::get(format!("http://{}/connectors/{name}", support::http_address(&kawka.log()).expect("address")))
            .await
            .expect("status")
            .json::<Json>()
            .await
            .expect("json");
    assert_eq!(status["counters"]["dead_lettered"], bad.len(), "{status}");
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_lets_cached_ids_flow_and_new_ids_wait() {
    let _serial = SERIAL.lock().await;
    let port = support::free_port();
    let registry_schema = support::unique("registry");
    let registry = support::start_registry_on(port, &registry_schema).await;
    let url = registry.url();
    let topic = support::unique("outage");
    let name = support::unique("regout");
    support::create_topic(&topic, 1).await;
    let v1 = support::catalogue_schema("com.example.retail.ItemSold", 1);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": url, "topic": topic,
        "subject_strategy": "topic_record", "schemas": {"sold": v1.clone()}});
    let id1 = support::produce_with_python(&spec, (0..50).map(|n| sold(n, 1)).collect()).await.ids["sold"];
    let project = Project::new(&url, &[(&name, &connector(&name, &topic, ""))]);
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    eventually(Duration::from_secs(60), "the first 50 events", || async {
        (position(&pool, &name).await == 50).then_some(())
    })
    .await;
    // A writer schema kawka has not seen: registered now, used after the outage began.
    let mut v1b = v1.clone();
    v1b["fields"].as_array_mut().expect("fields").push(json!({"name": "note", "type": "string", "default": ""}));
    let subject = format!("{topic}-com.example.retail.ItemSold");
    let client = reqwest::Client::new();
    client.put(format!("{url}/config/{subject}")).json(&json!({"compatibility": "NONE"})).send().await.expect("config");
    let id2 = support::register(&url, &subject, &v1b).await;
    assert_ne!(id1, id2);

    registry.stop().await.expect("registry stops");
    // Cached id first, then the new id, in one partition: the first flow,
    // the second wait (and so does everything behind them).
    let cached: Vec<Json> = (50..80)
        .map(|n| {
            json!({"schema": "sold", "key": "s1:i1", "schema_id": id1,
        "value": {"sale_id": format!("sale{n}"), "store_id": "s1", "item_id": "i1", "quantity": 1, "sold_at": 0}})
        })
        .collect();
    let new: Vec<Json> = (80..100).map(|n| json!({"schema": "sold_b", "key": "s1:i1", "schema_id": id2,
        "value": {"sale_id": format!("sale{n}"), "store_id": "s1", "item_id": "i1", "quantity": 1, "sold_at": 0, "note": "n"}})).collect();
    let offline = json!({"bootstrap": support::kafka_bootstrap(), "registry": "http://127.0.0.1:9", "topic": topic,
        "schemas": {"sold": v1, "sold_b": v1b}});
    support::produce_with_python(&offline, cached.into_iter().chain(new).collect()).await;
    eventually(Duration::from_secs(60), "the events with the cached id", || async {
        (position(&pool, &name).await == 80).then_some(())
    })
    .await;
    let base = format!("http://{}", support::http_address(&kawka.log()).expect("address"));
    let status = retrying(&base, &name).await;
    assert_eq!(status["last_error"]["stage"], "decode", "{status}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(position(&pool, &name).await, 80, "the new id waits");
    assert_eq!(status["counters"]["dead_lettered"], 0);

    let registry = support::start_registry_on(port, &registry_schema).await;
    eventually(Duration::from_secs(60), "the events with the new id after the registry returns", || async {
        (position(&pool, &name).await == 100).then_some(())
    })
    .await;
    assert_eq!(on_hand(&pool, &name).await, Some(-100), "every event applied once");
    let status: Json =
        reqwest::get(format!("{base}/connectors/{name}")).await.expect("status").json().await.expect("json");
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["counters"]["dead_lettered"], 0, "nothing dead-lettered: {status}");
    assert!(support::consume(&format!("{name}.dlq"), 1, Duration::from_secs(2)).await.is_empty());
    eprintln!("registry outage: sent 100, written 100, dead-lettered 0, duplicated 0, lost 0");
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_of_30_seconds_loses_nothing_and_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let registry = support::start_registry().await;
    let topic = support::unique("pgdown");
    let name = support::unique("pgdown");
    support::create_topic(&topic, 2).await;
    let v1 = support::catalogue_schema("com.example.retail.ItemSold", 1);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {"sold": v1.clone()}});
    let id = support::produce_with_python(&spec, (0..2000).map(|n| sold(n, 1)).collect()).await.ids["sold"];
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, ""))]);
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    eventually(Duration::from_secs(60), "the first 2000 events", || async {
        (position(&pool, &name).await == 2000).then_some(())
    })
    .await;
    pool.close().await;

    let mut outage = support::PostgresOutage::begin();
    let started = std::time::Instant::now();
    // Events keep arriving while Postgres is down (framed by hand: the
    // registry stores its schemas in Postgres too).
    let offline = json!({"bootstrap": support::kafka_bootstrap(), "registry": "http://127.0.0.1:9", "topic": topic,
        "schemas": {"sold": v1}});
    let more: Vec<Json> = (2000..4000).map(|n| json!({"schema": "sold", "key": format!("s1:i{}", n % 2), "schema_id": id,
        "value": {"sale_id": format!("sale{n}"), "store_id": "s1", "item_id": format!("i{}", n % 2), "quantity": 1, "sold_at": 0}})).collect();
    support::produce_with_python(&offline, more).await;
    let base = format!("http://{}", support::http_address(&kawka.log()).expect("address"));
    let status = retrying(&base, &name).await;
    assert_eq!(status["last_error"]["class"], "transient", "{status}");
    let metrics = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(
        metrics.contains(&format!("kawka_retries_total{{connector=\"{name}\",stage=\"sink\",class=\"transient\"}}")),
        "{metrics}"
    );
    if let Some(rest) = Duration::from_secs(30).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    outage.end();

    let pool = support::postgres().await;
    eventually(Duration::from_secs(90), "every event after Postgres returns", || async {
        (position(&pool, &name).await == 4000).then_some(())
    })
    .await;
    let total: i64 = sqlx::query_scalar(&format!("SELECT sum(on_hand)::bigint FROM \"{name}\""))
        .fetch_one(&pool)
        .await
        .expect("sum");
    assert_eq!(total, -4000, "4000 sales of one item each: every effect exactly once");
    let status: Json =
        reqwest::get(format!("{base}/connectors/{name}")).await.expect("status").json().await.expect("json");
    assert_eq!(status["state"], "running", "resumed by itself: {status}");
    assert_eq!(status["counters"]["dead_lettered"], 0, "{status}");
    eprintln!(
        "postgres outage of {:?}: sent 4000, written 4000, dead-lettered 0, duplicated 0, lost 0",
        started.elapsed()
    );
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elasticsearch_outage_loses_nothing_and_duplicates_have_no_visible_effect() {
    let _serial = SERIAL.lock().await;
    let registry = support::start_registry().await;
    let topic = support::unique("esdown");
    let name = support::unique("esdown");
    support::create_topic(&topic, 2).await;
    let login = json!({"type": "record", "name": "LoggedIn", "namespace": "test.esdown",
        "fields": [{"name": "user_id", "type": "string"}, {"name": "count", "type": "int"}]});
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {"login": login}});
    let events = |range: std::ops::Range<usize>| -> Vec<Json> {
        range.map(|n| json!({"schema": "login", "key": format!("u{}", n % 50), "value": {"user_id": format!("u{}", n % 50), "count": 1}})).collect()
    };
    support::produce_with_python(&spec, events(0..2000)).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: search, index: {name} }}
key: $key
batch: {{ max_events: 100, max_wait: 50ms }}
events:
  test.esdown.LoggedIn: {{ increment: {{ logins: count }} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let mut kawka = project.start(0);
    let group = format!("kawka.{name}");
    let topics = vec![topic.clone()];
    eventually(Duration::from_secs(60), "the first 2000 events", || async {
        (support::committed_total(&group, &topics).await == 2000).then_some(())
    })
    .await;
    // noida-db snapshots its data 1-10 s after writes: let it, so the
    // restart below tests kawka, not the server's own durability.
    tokio::time::sleep(Duration::from_secs(11)).await;
    tokio::task::spawn_blocking(support::stop_elasticsearch).await.expect("stop");
    let started = std::time::Instant::now();
    support::produce_with_python(&spec, events(2000..4000)).await;
    let base = format!("http://{}", support::http_address(&kawka.log()).expect("address"));
    let status = retrying(&base, &name).await;
    assert_eq!(status["last_error"]["class"], "transient", "{status}");
    if let Some(rest) = Duration::from_secs(20).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    assert_eq!(support::committed_total(&group, &topics).await, 2000, "no offset moves while the sink is down");
    tokio::task::spawn_blocking(support::start_elasticsearch_keeping_data).await.expect("start");
    eventually(Duration::from_secs(90), "every event after the server returns", || async {
        (support::committed_total(&group, &topics).await == 4000).then_some(())
    })
    .await;
    let documents = support::es_documents(&name, 100).await;
    assert_eq!(documents.len(), 50);
    for (id, document) in &documents {
        assert_eq!(document["logins"], 80, "80 logins per user, each counted once: {id} {document}");
    }
    let status: Json =
        reqwest::get(format!("{base}/connectors/{name}")).await.expect("status").json().await.expect("json");
    assert_eq!(status["state"], "running", "resumed by itself: {status}");
    eprintln!(
        "elasticsearch outage of {:?}: sent 4000, written 4000, dead-lettered {}, visible duplicates 0, lost 0",
        started.elapsed(),
        status["counters"]["dead_lettered"]
    );
    assert_eq!(status["counters"]["dead_lettered"], 0);
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_with_persistent_storage_resumes_consumption() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let _serial = SERIAL.lock().await;
    let mut broker = tokio::task::spawn_blocking(support::PersistentBroker::start).await.expect("broker");
    let bootstrap = broker.bootstrap();
    let registry = support::start_registry().await;
    let topic = support::unique("brk");
    let name = support::unique("brk");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::config::ClientConfig::new().set("bootstrap.servers", &bootstrap).create().expect("admin");
    for result in admin
        .create_topics([&NewTopic::new(&topic, 2, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("create topic")
    {
        result.expect("topic created");
    }
    let spec = json!({"bootstrap": bootstrap, "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    let first = 20_000;
    support::produce_with_python(&spec, (0..first).map(|n| sold(n, 1)).collect()).await;
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, ""))]);
    let config = project.root().join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace(&support::kafka_bootstrap(), &bootstrap)).expect("write config");
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    let at_stop = eventually(Duration::from_secs(60), "kawka to be consuming", || async {
        let now = position(&pool, &name).await;
        (now > 0).then_some(now)
    })
    .await;
    broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        std::thread::sleep(Duration::from_secs(10));
        broker.restart();
        broker
    })
    .await
    .expect("restart");
    let second = 1_000;
    support::produce_with_python(&spec, (first..first + second).map(|n| sold(n, 1)).collect()).await;
    let total = (first + second) as i64;
    eventually(Duration::from_secs(120), "every event after the broker restart", || async {
        (position(&pool, &name).await == total).then_some(())
    })
    .await;
    let sum: i64 = sqlx::query_scalar(&format!("SELECT sum(on_hand)::bigint FROM \"{name}\""))
        .fetch_one(&pool)
        .await
        .expect("sum");
    assert_eq!(sum, -total, "every event applied once across the restart");
    let base = format!("http://{}", support::http_address(&kawka.log()).expect("address"));
    let status: Json =
        reqwest::get(format!("{base}/connectors/{name}")).await.expect("status").json().await.expect("json");
    assert_eq!(status["counters"]["dead_lettered"], 0, "{status}");
    eprintln!(
        "broker restart (at {at_stop} of {first}): sent {total}, written {total}, dead-lettered 0, duplicated 0, lost 0"
    );
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    drop(broker);
    let _ = registry.stop().await; // cleanup only
}
