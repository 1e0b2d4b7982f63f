//! Read your writes: produce an event, wait on its delivery report's
//! position, and the read model shows it, every time (Postgres by SQL,
//! Elasticsearch by `_search`, which sees only refreshed documents); waits
//! for dead-lettered events return and say so; timeouts, unknown topics,
//! a paused connector, a partition another replica owns.

mod support;

use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value as Json};

use support::{eventually, Project};

struct Producer {
    producer: FutureProducer,
    topic: String,
    id: u32,
    schema: apache_avro::Schema,
}

impl Producer {
    /// Registers `schema` under the topic's value subject and produces with it.
    async fn new(registry: &str, topic: &str, schema: Json) -> Producer {
        let api = support::registry_api::Api { http: reqwest::Client::new(), base: registry.to_string() };
        let (status, body) =
            api.post(&format!("/subjects/{topic}-value/versions"), json!({"schema": schema.to_string()})).await;
        assert_eq!(status, 200, "{body}");
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", support::kafka_bootstrap())
            .set("linger.ms", "0")
            .create()
            .expect("producer");
        let schema = apache_avro::Schema::parse_str(&schema.to_string()).expect("schema");
        Producer { producer, topic: topic.to_string(), id: body["id"].as_u64().expect("id") as u32, schema }
    }

    /// Produces one event; its position from the delivery report.
    async fn send(&self, key: &str, fields: Vec<(&str, Avro)>, partition: Option<i32>) -> String {
        let record = Avro::Record(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        let body = apache_avro::writer::datum::GenericDatumWriter::builder(&self.schema)
            .build()
            .and_then(|writer| writer.write_value_to_vec(record))
            .expect("avro");
        self.raw(key, &support::framed(self.id, &body), partition).await
    }

    async fn raw(&self, key: &str, value: &[u8], partition: Option<i32>) -> String {
        let mut record = FutureRecord::to(&self.topic).key(key).payload(value);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let delivery = self.producer.send(record, Duration::from_secs(10)).await.expect("delivered");
        format!("{}:{}:{}", self.topic, delivery.partition, delivery.offset)
    }
}

async fn wait(base: &str, connector: &str, positions: &[&str], timeout: &str) -> (u16, Json) {
    let mut query: Vec<(&str, &str)> = positions.iter().map(|p| ("position", *p)).collect();
    query.push(("timeout", timeout));
    let response = reqwest::Client::new()
        .get(format!("{base}/connectors/{connector}/applied"))
        .query(&query)
        .send()
        .await
        .expect("wait");
    (response.status().as_u16(), response.json().await.unwrap_or(Json::Null))
}

fn percentiles(mut waits: Vec<Duration>) -> (Duration, Duration) {
    waits.sort();
    (waits[waits.len() / 2], waits[waits.len() * 99 / 100])
}

async fn daemon(project: &Project, n: usize) -> (support::Kawka, String) {
    let kawka = project.start(n);
    let address =
        eventually(Duration::from_secs(30), "the http address", || async { support::http_address(&kawka.log()) }).await;
    (kawka, format!("http://{address}"))
}

/// An inventory of sales (decrements) in Postgres, written every 5 ms.
fn sales_connector(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "500", fetch.wait.max.ms: "20" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_wait: 5ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
"#
    )
}

fn sale(n: usize) -> Vec<(&'static str, Avro)> {
    vec![
        ("sale_id", Avro::String(format!("s{n}"))),
        ("store_id", Avro::String("s1".into())),
        ("item_id", Avro::String("i1".into())),
        ("quantity", Avro::Int(1)),
        ("sold_at", Avro::TimestampMillis(1_700_000_000_000)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_shows_each_write_after_its_wait() {
    const ROUNDS: usize = 1000;
    let registry = support::start_registry().await;
    let topic = support::unique("ryw_sales");
    let name = support::unique("ryw");
    support::create_topic(&topic, 2).await;
    let project = Project::new(&registry.url(), &[(&name, &sales_connector(&name, &topic))]);
    let (daemon, base) = daemon(&project, 0).await;
    let producer =
        Producer::new(&registry.url(), &topic, support::catalogue_schema("com.example.retail.ItemSold", 1)).await;
    let pool = support::postgres().await;

    let mut waits = Vec::with_capacity(ROUNDS);
    for n in 0..ROUNDS {
        let position = producer.send("s1:i1", sale(n), None).await;
        let started = Instant::now();
        let (status, answer) = wait(&base, &name, &[&position], "30s").await;
        waits.push(started.elapsed());
        assert_eq!(status, 200, "round {n}: {answer}");
        assert_eq!(answer["positions"][0]["outcome"], "applied", "{answer}");
        let on_hand: i64 =
            sqlx::query_scalar(&format!("SELECT on_hand FROM \"{name}\"")).fetch_one(&pool).await.expect("the row");
        assert_eq!(on_hand, -(n as i64 + 1), "round {n}: the write is visible after the wait");
    }
    let (p50, p99) = percentiles(waits);
    println!("postgres: {ROUNDS} produce → wait → read rounds, wait p50 {p50:?}, p99 {p99:?}");

    // A dead-lettered event is processed too: the wait returns and says so.
    let bad = producer.raw("s1:i1", b"not avro at all", None).await;
    let (status, answer) = wait(&base, &name, &[&bad], "30s").await;
    assert_eq!((status, answer["positions"][0]["outcome"].clone()), (200, json!("dead_lettered")), "{answer}");

    // Several positions at once.
    let one = producer.send("s1:i1", sale(ROUNDS), Some(0)).await;
    let two = producer.send("s1:i1", sale(ROUNDS + 1), Some(1)).await;
    let (status, answer) = wait(&base, &name, &[&one, &two], "30s").await;
    assert_eq!(status, 200, "{answer}");

    // Unknown topics, bad positions.
    assert_eq!(wait(&base, &name, &["nope:0:1"], "1s").await.0, 404);
    assert_eq!(wait(&base, &name, &["nope:x:1"], "1s").await.0, 400);
    assert_eq!(wait(&base, "no-such-connector", &[&one], "1s").await.0, 404);

    // A paused connector: the wait times out with where things stand, and
    // returns once it resumes.
    let client = reqwest::Client::new();
    client.post(format!("{base}/connectors/{name}/pause")).send().await.expect("pause");
    let held = producer.send("s1:i1", sale(ROUNDS + 2), None).await;
    let (status, answer) = wait(&base, &name, &[&held], "500ms").await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!((answer["applied"].clone(), answer["state"].clone()), (json!(false), json!("paused")), "{answer}");
    assert_eq!(answer["positions"][0]["outcome"], "pending");
    client.post(format!("{base}/connectors/{name}/resume")).send().await.expect("resume");

    // The CLI waits the same way.
    let output = tokio::task::spawn_blocking({
        let (name, base, held) = (name.clone(), base.clone(), held.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kawka"))
                .args(["wait", &name, "--position", &held, "--timeout", "30s", "--url", &base])
                .output()
                .expect("kawka wait")
        }
    })
    .await
    .expect("thread");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"applied\":true"));

    let metrics = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    let count: u64 = metrics
        .lines()
        .find(|l| l.starts_with(&format!("kawka_applied_wait_seconds_count{{connector=\"{name}\"}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("the wait histogram");
    assert!(count >= ROUNDS as u64 + 3, "{count}");
    assert!(metrics.contains(&format!("kawka_applied_timeouts_total{{connector=\"{name}\"}} 1")), "{metrics}");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_searches_see_each_write_after_its_wait() {
    const ROUNDS: usize = 1000;
    let registry = support::start_registry().await;
    let topic = support::unique("ryw_users");
    let name = support::unique("ryw-profiles");
    support::create_topic(&topic, 1).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", fetch.wait.max.ms: "20" }} }}
sink: {{ to: search, index: {name}, mappings: {{ properties: {{ email: {{ type: keyword }} }} }} }}
key: $key
batch: {{ max_wait: 5ms }}
events:
  com.example.users.UserRegistered: {{ upsert: {{ name: name, email: email }} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let (_daemon, base) = daemon(&project, 0).await;
    let producer =
        Producer::new(&registry.url(), &topic, support::catalogue_schema("com.example.users.UserRegistered", 2)).await;
    let search = reqwest::Client::new();
    let mut waits = Vec::with_capacity(ROUNDS);
    for n in 0..ROUNDS {
        let id = format!("u{n}");
        let fields = vec![
            ("user_id", Avro::String(id.clone())),
            ("seq", Avro::Long(1)),
            ("name", Avro::String(format!("User {n}"))),
            ("email", Avro::String(format!("u{n}@example.com"))),
            ("country", Avro::String("nl".into())),
        ];
        let position = producer.send(&id, fields, None).await;
        let started = Instant::now();
        let (status, answer) = wait(&base, &name, &[&position], "30s").await;
        waits.push(started.elapsed());
        assert_eq!(status, 200, "round {n}: {answer}");
        assert_eq!(answer["searchable"], true, "{answer}");
        // A search (not a get): it sees only refreshed documents.
        let hits: Json = search
            .post(format!("{}/{name}/_search", support::elasticsearch_url()))
            .json(&json!({"query": {"term": {"email": format!("u{n}@example.com")}}}))
            .send()
            .await
            .expect("search")
            .json()
            .await
            .expect("json");
        assert_eq!(hits["hits"]["hits"][0]["_id"], json!(id), "round {n}: searchable after the wait: {hits}");
    }
    let (p50, p99) = percentiles(waits);
    println!("elasticsearch: {ROUNDS} produce → wait → search rounds, wait p50 {p50:?}, p99 {p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_partition_another_replica_owns_is_answered() {
    let registry = support::start_registry().await;
    let topic = support::unique("ryw_split");
    let name = support::unique("ryw_split");
    support::create_topic(&topic, 2).await;
    let project = Project::new(&registry.url(), &[(&name, &sales_connector(&name, &topic))]);
    let (_first, first) = daemon(&project, 0).await;
    let (_second, second) = daemon(&project, 1).await;
    // Wait until the group has split the two partitions between them.
    eventually(Duration::from_secs(60), "one partition each", || async {
        (partitions_owned(&first, &name).await == 1 && partitions_owned(&second, &name).await == 1).then_some(())
    })
    .await;
    let producer =
        Producer::new(&registry.url(), &topic, support::catalogue_schema("com.example.retail.ItemSold", 1)).await;
    let zero = producer.send("s1:i1", sale(0), Some(0)).await;
    let one = producer.send("s1:i1", sale(1), Some(1)).await;
    // Each process answers for both partitions, one of them owned by the other.
    for base in [&first, &second] {
        let (status, answer) = wait(base, &name, &[&zero, &one], "30s").await;
        assert_eq!(status, 200, "{answer}");
    }
}

/// How many partitions of `name` the daemon at `base` owns.
async fn partitions_owned(base: &str, name: &str) -> usize {
    let (_, status) = get_json(&format!("{base}/connectors/{name}")).await;
    status["partitions"].as_array().map_or(0, Vec::len)
}

async fn get_json(url: &str) -> (u16, Json) {
    let response = reqwest::get(url).await.expect("get");
    (response.status().as_u16(), response.json().await.unwrap_or(Json::Null))
}

/// A waiter on one replica while the group rebalances: the partition of
/// one of its positions moves to a second replica, which applies it, while
/// the first replica (paused) keeps the other. The waiter stays pending
/// (no false 200) until both are applied, the moved one known only from
/// the new owner's stored progress, then answers 200 for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_across_a_rebalance_is_answered_by_the_new_owners_progress() {
    let registry = support::start_registry().await;
    let topic = support::unique("ryw_rebalance");
    let name = support::unique("ryw_rebalance");
    support::create_topic(&topic, 2).await;
    let project = Project::new(&registry.url(), &[(&name, &sales_connector(&name, &topic))]);
    let (_first, first) = daemon(&project, 0).await;
    eventually(Duration::from_secs(60), "the first replica to own both partitions", || async {
        (partitions_owned(&first, &name).await == 2).then_some(())
    })
    .await;
    let client = reqwest::Client::new();
    let paused = client.post(format!("{first}/connectors/{name}/pause")).send().await.expect("pause");
    assert_eq!(paused.status().as_u16(), 200);
    let producer =
        Producer::new(&registry.url(), &topic, support::catalogue_schema("com.example.retail.ItemSold", 1)).await;
    let zero = producer.send("s1:i1", sale(0), Some(0)).await;
    let one = producer.send("s1:i1", sale(1), Some(1)).await;
    let waiter = tokio::spawn({
        let (first, name, zero, one) = (first.clone(), name.clone(), zero.clone(), one.clone());
        async move {
            let started = Instant::now();
            let answer = wait(&first, &name, &[&zero, &one], "90s").await;
            (answer, started.elapsed())
        }
    });
    // A second replica joins: the group gives it one of the partitions.
    let (_second, second) = daemon(&project, 1).await;
    eventually(Duration::from_secs(60), "one partition each", || async {
        (partitions_owned(&first, &name).await == 1 && partitions_owned(&second, &name).await == 1).then_some(())
    })
    .await;
    let pool = support::postgres().await;
    let on_hand = || async {
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT on_hand FROM \"{name}\" WHERE store_id = 's1' AND item_id = 'i1'"
        ))
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten()
    };
    eventually(Duration::from_secs(60), "the second replica to apply its partition's sale", || async {
        (on_hand().await == Some(-1)).then_some(())
    })
    .await;
    // The first replica's partition is still paused: no answer yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished(), "the waiter must not answer while one of its positions is pending");
    let resumed = client.post(format!("{first}/connectors/{name}/resume")).send().await.expect("resume");
    assert_eq!(resumed.status().as_u16(), 200);
    let ((status, answer), waited) = waiter.await.expect("the waiter");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["applied"], json!(true), "{answer}");
    let outcomes: Vec<&Json> =
        answer["positions"].as_array().expect("positions").iter().map(|p| &p["outcome"]).collect();
    assert_eq!(outcomes, [&json!("applied"), &json!("applied")], "{answer}");
    assert!(waited < Duration::from_secs(90), "answered before its timeout: {waited:?}");
    assert_eq!(on_hand().await, Some(-2), "both sales applied once");
}

/// Many waiters at once (more than the 64 places of other requests): each
/// is answered, none turned away; the status endpoint still answers while
/// they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_waiters_are_each_answered() {
    const WAITERS: usize = 300;
    let registry = support::start_registry().await;
    let topic = support::unique("ryw_many");
    let name = support::unique("ryw_many");
    support::create_topic(&topic, 1).await;
    let project = Project::new(&registry.url(), &[(&name, &sales_connector(&name, &topic))]);
    let (_daemon, base) = daemon(&project, 0).await;
    eventually(Duration::from_secs(60), "the partition", || async {
        (partitions_owned(&base, &name).await == 1).then_some(())
    })
    .await;
    let client = reqwest::Client::new();
    client.post(format!("{base}/connectors/{name}/pause")).send().await.expect("pause");
    let producer =
        Producer::new(&registry.url(), &topic, support::catalogue_schema("com.example.retail.ItemSold", 1)).await;
    let position = producer.send("s1:i1", sale(0), None).await;
    let many = |timeout: &'static str| {
        let mut waits = tokio::task::JoinSet::new();
        for _ in 0..WAITERS {
            let (base, name, position) = (base.clone(), name.clone(), position.clone());
            waits.spawn(async move { wait(&base, &name, &[&position], timeout).await.0 });
        }
        waits
    };
    // Paused: every waiter times out with 202, none is refused (503).
    let mut paused = many("2s");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = get_json(&format!("{base}/connectors/{name}")).await;
    assert_eq!(status, 200, "status answers while {WAITERS} waits are held");
    let mut answers = std::collections::BTreeMap::new();
    while let Some(status) = paused.join_next().await {
        *answers.entry(status.expect("a waiter")).or_insert(0) += 1;
    }
    assert_eq!(answers, [(202u16, WAITERS)].into(), "while paused");
    // Resumed while they wait: every waiter gets 200.
    let mut resumed = many("30s");
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.post(format!("{base}/connectors/{name}/resume")).send().await.expect("resume");
    let mut answers = std::collections::BTreeMap::new();
    while let Some(status) = resumed.join_next().await {
        *answers.entry(status.expect("a waiter")).or_insert(0) += 1;
    }
    assert_eq!(answers, [(200u16, WAITERS)].into(), "after the resume");
}
