//! `on_error: park`: when an event of a key fails for good, the key is held
//! behind it. That event and every later one of the key go to the
//! dead-letter topic in order (`kawka.parked.behind` names the first),
//! nothing of the key reaches the read model, other keys flow on, and the
//! parked set lives in the sink (`kawka_parked`, `kawka-parked`) across
//! restarts, kills and rebalances. Once the cause is fixed, `kawka dlq
//! replay` applies each parked key's events in their original order and
//! releases it; the read model then equals the log folded one event at a
//! time. `park.max_keys` bounds the set: past it the connector stops or
//! dead-letters plainly.
//!
//! The key's failure here is a registration written by an older producer
//! (`fullName`) that the project's catalogue cannot read; the fix is the
//! catalogue version of that writer schema and its upcaster.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value as Json};

use support::{eventually, Consumed, Kawka, Project};

/// The key whose registration fails.
const PARKED: &str = "user3";
const USERS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Elasticsearch,
}

// ---------------------------------------------------------------------------
// The log

/// The registration as the older producer wrote it: `fullName`, no `name`.
fn old_registration_schema() -> Json {
    support::record_schema(
        "test.stats",
        "Registered",
        json!([{"name": "user_id", "type": "string"}, {"name": "fullName", "type": "string"},
            {"name": "email", "type": "string"}]),
    )
}

/// An event type no connector of these tests has a rule for.
fn banned_schema() -> Json {
    support::record_schema("test.stats", "Banned", json!([{"name": "user_id", "type": "string"}]))
}

fn spec(registry: &str, topic: &str) -> Json {
    let mut schemas = support::stats::schemas();
    schemas["registered_old"] = old_registration_schema();
    schemas["banned"] = banned_schema();
    json!({"bootstrap": support::kafka_bootstrap(), "registry": registry, "topic": topic,
        "subject_strategy": "topic_record", "schemas": schemas})
}

/// Both registration schemas go under one subject: an event log keeps
/// versions no reader could be given, so compatibility checks are off.
async fn allow_any_registration_schema(registry: &str, topic: &str) {
    let response = reqwest::Client::new()
        .put(format!("{registry}/config/{topic}-test.stats.Registered"))
        .json(&json!({"compatibility": "NONE"}))
        .send()
        .await
        .expect("set compatibility");
    assert!(response.status().is_success(), "set compatibility: {}", response.status());
}

fn email(user: &str, tag: &str) -> Json {
    json!({"schema": "email", "key": user, "value": {"user_id": user, "email": format!("{user}.{tag}@example.com")}})
}

fn login(user: &str, count: i64) -> Json {
    json!({"schema": "login", "key": user, "value": {"user_id": user, "count": count}})
}

fn registered(user: &str, name: &str) -> Json {
    json!({"schema": "registered", "key": user,
        "value": {"user_id": user, "name": name, "email": format!("{user}@example.com")}})
}

/// A stats log in which the parked key's registration cannot be read.
struct ParkedLog {
    /// What is produced, in order.
    records: Vec<Json>,
    /// The same log as the fold reads it: the old registration as a current one.
    reference: Vec<Json>,
    /// Index of the parked key's failing registration.
    failed_at: usize,
}

impl ParkedLog {
    /// A random stats log of `events` over [`USERS`] users; at `fail_at`
    /// of it the parked key's registration in the old schema, then an email
    /// change and a login of the key, and `burst` more events of the key
    /// (logins, some email changes) spread over the rest of the log.
    fn new(events: usize, fail_at: f64, burst: usize) -> ParkedLog {
        let mut rng = rand::rng();
        let mut reference = support::stats::log(events, USERS);
        let failed_at = (events as f64 * fail_at) as usize;
        let mut tail = reference.split_off(failed_at);
        let (full_name, address) = ("Parked Name", format!("{PARKED}.parked@example.com"));
        reference.push(json!({"schema": "registered", "key": PARKED,
            "value": {"user_id": PARKED, "name": full_name, "email": address}}));
        reference.push(email(PARKED, "after-failure"));
        reference.push(login(PARKED, 7));
        let mut burst: Vec<Json> = (0..burst)
            .map(|n| {
                if rng.random_range(0..10) == 0 {
                    email(PARKED, &format!("burst{n}"))
                } else {
                    login(PARKED, rng.random_range(1..5))
                }
            })
            .collect();
        // Merge the burst into the tail at random, each keeping its order.
        burst.reverse();
        tail.reverse();
        while !burst.is_empty() || !tail.is_empty() {
            let from_burst =
                !burst.is_empty() && (tail.is_empty() || rng.random_range(0..burst.len() + tail.len()) < burst.len());
            reference.push(if from_burst { burst.pop() } else { tail.pop() }.expect("a record"));
        }
        let mut records = reference.clone();
        records[failed_at] = json!({"schema": "registered_old", "key": PARKED,
            "value": {"user_id": PARKED, "fullName": full_name, "email": address}});
        ParkedLog { records, reference, failed_at }
    }

    /// What the read model must hold once everything applied.
    fn fold(&self) -> BTreeMap<String, Json> {
        support::stats::fold(&self.reference)
    }

    /// The parked key's state before its failure (`None`: it had no events).
    fn parked_before(&self) -> Option<Json> {
        support::stats::fold(&self.reference[..self.failed_at]).remove(PARKED)
    }

    /// Events of the parked key before the failing one.
    fn parked_events_before(&self) -> usize {
        self.reference[..self.failed_at].iter().filter(|r| r["key"] == PARKED).count()
    }
}

/// Where the log's records are, once produced.
struct Produced {
    /// The parked key's records, in offset order (= log order: one partition).
    parked_key: Vec<Consumed>,
    /// Index in `parked_key` of the failed one.
    failed: usize,
    partition_ends: BTreeMap<i32, i64>,
}

impl Produced {
    async fn read(topic: &str, total: usize, log: &ParkedLog) -> Produced {
        let records = support::consume(topic, total, Duration::from_secs(60)).await;
        assert_eq!(records.len(), total, "the produced log reads back");
        let mut parked_key: Vec<Consumed> =
            records.iter().filter(|r| r.key.as_deref() == Some(PARKED.as_bytes())).cloned().collect();
        parked_key.sort_by_key(|r| r.offset);
        let mut partition_ends = BTreeMap::new();
        for record in &records {
            let end = partition_ends.entry(record.partition).or_insert(0);
            *end = (*end).max(record.offset + 1);
        }
        Produced { parked_key, failed: log.parked_events_before(), partition_ends }
    }

    fn failed(&self) -> &Consumed {
        &self.parked_key[self.failed]
    }

    /// `<topic>/<partition>@<offset>` of the failed event.
    fn behind(&self, topic: &str) -> String {
        format!("{topic}/{}@{}", self.failed().partition, self.failed().offset)
    }

    /// The parked key's records from the failed one on.
    fn parked(&self) -> &[Consumed] {
        &self.parked_key[self.failed..]
    }
}

// ---------------------------------------------------------------------------
// The project

fn connector(name: &str, topic: &str, store: Store, policy: &str, max_events: usize) -> String {
    let (sink, key) = match store {
        Store::Postgres => (
            format!(
                "{{ to: readdb, table: {name}, columns: {{ id: text, name: text, email: text, logins: bigint }}, primary_key: [id] }}"
            ),
            "{ id: $key }",
        ),
        Store::Elasticsearch => (
            format!("{{ to: search, index: {name}, mappings: {{ properties: {{ email: {{ type: keyword }} }} }} }}"),
            "$key",
        ),
    };
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "1000" }} }}
sink: {sink}
key: {key}
{policy}
dead_letter_topic: {name}.dlq
unknown_events: error
batch: {{ max_events: {max_events}, max_wait: 50ms }}
events:
  test.stats.Registered:   {{ upsert: {{ name: name, email: email, logins: 0 }} }}
  test.stats.EmailChanged: {{ merge: {{ email: email }} }}
  test.stats.LoggedIn:     {{ increment: {{ logins: count }} }}
"#
    )
}

/// The project's catalogue knows the current registration only: one
/// written with `fullName` cannot be read as it (stage `upcast`).
fn catalogue_without_the_old_version(project: &Project) {
    let dir = project.root().join("schemas/test.stats.Registered");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let current = &support::stats::schemas()["registered"];
    std::fs::write(dir.join("v1.avsc"), current.to_string()).expect("write v1");
}

/// The fix: the old writer schema is v1, the current one v2, and an
/// upcaster renames `fullName`.
fn catalogue_with_the_old_version(project: &Project) {
    let dir = project.root().join("schemas/test.stats.Registered");
    std::fs::write(dir.join("v1.avsc"), old_registration_schema().to_string()).expect("write v1");
    std::fs::write(dir.join("v2.avsc"), support::stats::schemas()["registered"].to_string()).expect("write v2");
    let upcasters = project.root().join("schemas/upcasters.yaml");
    let mut text = std::fs::read_to_string(&upcasters).expect("upcasters");
    text.push_str("- event: test.stats.Registered\n  from: 1\n  steps:\n    - rename: { fullName: name }\n");
    std::fs::write(&upcasters, text).expect("write upcasters");
}

// ---------------------------------------------------------------------------
// What the sink, the daemon and the dead-letter topic say

/// Every row or document of the read model, null fields left out.
async fn read_model(store: Store, pool: &sqlx::PgPool, name: &str) -> BTreeMap<String, Json> {
    match store {
        Store::Postgres => support::stats::rows(pool, name).await,
        Store::Elasticsearch => support::es_documents(name, 10_000).await,
    }
}

fn assert_others_equal_the_fold(got: &BTreeMap<String, Json>, want: &BTreeMap<String, Json>, when: &str) {
    let wrong = support::differences(got, want, Some(PARKED));
    assert!(wrong.is_empty(), "{when}: {} other key(s) differ from the fold:\n{}", wrong.len(), wrong.join("\n"));
}

/// Events made durable: stored positions (Postgres) or committed offsets.
async fn consumed(store: Store, pool: &sqlx::PgPool, name: &str, topic: &str) -> i64 {
    match store {
        Store::Postgres => support::stored_positions(pool, name).await,
        Store::Elasticsearch => support::committed_total(&format!("kawka.{name}"), &[topic.to_string()]).await,
    }
}

async fn wait_consumed(store: Store, pool: &sqlx::PgPool, name: &str, topic: &str, total: i64, logs: &[&Kawka]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = consumed(store, pool, name, topic).await;
        if now == total {
            return;
        }
        if Instant::now() > deadline {
            let tails: Vec<String> = logs.iter().map(|k| tail(&k.log(), 40)).collect();
            panic!("{name}: {now} of {total} events durable after 90 s; logs:\n{}", tails.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the sink holds parked for `connector`: each key (as text) and the
/// whole stored row or document (as text).
async fn parked_keys(store: Store, pool: &sqlx::PgPool, connector: &str) -> Vec<(String, String)> {
    match store {
        Store::Postgres => {
            let rows: Vec<(Vec<u8>, String)> =
                sqlx::query_as("SELECT key, entry::text FROM kawka_parked WHERE connector = $1 ORDER BY key")
                    .bind(connector)
                    .fetch_all(pool)
                    .await
                    .unwrap_or_else(|e| panic!("read kawka_parked: {e}"));
            rows.into_iter().map(|(key, entry)| (String::from_utf8_lossy(&key).into_owned(), entry)).collect()
        }
        Store::Elasticsearch => {
            let hits = support::es_search("kawka-parked", json!({"match_all": {}}), 10_000).await;
            hits.into_iter()
                .filter(|hit| hit["_source"]["connector"] == connector)
                .map(|hit| {
                    let key = hit["_source"]["key"].as_str().unwrap_or_default().to_string();
                    (key, hit.to_string())
                })
                .collect()
        }
    }
}

/// Whether a parked entry is that of `key`: its key field, or the key
/// spelled as text, base64 or hex in what was stored.
fn is_entry_of(entry: &(String, String), key: &str) -> bool {
    use base64::Engine;
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    entry.0 == key
        || entry.0 == base64::engine::general_purpose::STANDARD.encode(key)
        || entry.1.contains(&format!("\"{key}\""))
        || entry.1.contains(&base64::engine::general_purpose::STANDARD.encode(key))
        || entry.1.contains(&hex)
}

async fn assert_parked_exactly(store: Store, pool: &sqlx::PgPool, name: &str, keys: &[&str], when: &str) {
    let parked = parked_keys(store, pool, name).await;
    assert_eq!(parked.len(), keys.len(), "{when}: the sink's parked set of {name} holds {parked:?}, expected {keys:?}");
    for key in keys {
        assert!(
            parked.iter().any(|entry| is_entry_of(entry, key)),
            "{when}: {key} is not in the parked set {parked:?}"
        );
    }
}

async fn base_url(kawka: &Kawka) -> String {
    let address = eventually(Duration::from_secs(30), "kawka's HTTP address in its log", || async {
        support::http_address(&kawka.log())
    })
    .await;
    format!("http://{address}")
}

async fn status(kawka: &Kawka, name: &str) -> Json {
    let url = format!("{}/connectors/{name}", base_url(kawka).await);
    reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}")).json().await.expect("status JSON")
}

async fn metrics(kawka: &Kawka) -> String {
    let url = format!("{}/metrics", base_url(kawka).await);
    reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}")).text().await.expect("metrics text")
}

/// The sum of a metric's samples having all of `labels` (`None`: no sample).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let samples: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|l| l.trim() == format!("{k}=\"{v}\"")))
                .then(|| value.split_whitespace().next()?.parse::<f64>().ok())
                .flatten()
        })
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

fn header(letter: &Consumed, key: &str) -> Option<String> {
    letter
        .headers
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.clone())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Every record of a topic (its size read from the broker first).
async fn consume_all(topic: &str) -> Vec<Consumed> {
    let size = support::topic_size(topic).await;
    let records = support::consume(topic, size as usize, Duration::from_secs(60)).await;
    assert_eq!(records.len(), size as usize, "{topic} holds {size} records");
    records
}

/// The dead letters must be the parked key's events from the failed one
/// on, each once, in order, with their original bytes and positions, all
/// behind the failed one; the failed one with its own stage.
fn assert_parked_letters(letters: &[Consumed], parked: &[Consumed], behind: &str, first_stage: &str) {
    let offsets: Vec<Option<String>> = letters.iter().map(|l| header(l, "kawka.error.offset")).collect();
    assert_eq!(
        letters.len(),
        parked.len(),
        "one dead letter per parked event (original offsets of the letters: {offsets:?})"
    );
    for (n, (letter, original)) in letters.iter().zip(parked).enumerate() {
        let what = format!("dead letter #{n} (original offset {})", original.offset);
        assert_eq!(header(letter, "kawka.error.offset"), Some(original.offset.to_string()), "{what}: log order");
        assert_eq!(header(letter, "kawka.error.partition"), Some(original.partition.to_string()), "{what}");
        assert_eq!((&letter.key, &letter.value), (&original.key, &original.value), "{what}: the original bytes");
        assert_eq!(header(letter, "kawka.parked.behind").as_deref(), Some(behind), "{what}: parked behind");
        let stage = if n == 0 { first_stage } else { "park" };
        assert_eq!(
            header(letter, "kawka.error.stage").as_deref(),
            Some(stage),
            "{what}: stage; message {:?}",
            header(letter, "kawka.error.message")
        );
        assert_eq!(header(letter, "kawka.error.class").as_deref(), Some("permanent"), "{what}");
    }
    let message = header(&letters[0], "kawka.error.message").unwrap_or_default();
    assert!(message.contains("cannot read"), "the failed event's message is its real cause: {message:?}");
}

/// Dead letters' keys and headers, one per line, for failure messages.
fn describe_letters(letters: &[Consumed]) -> String {
    letters
        .iter()
        .map(|letter| {
            let headers: Vec<String> = letter
                .headers
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_deref().map(String::from_utf8_lossy).unwrap_or_default()))
                .collect();
            format!("key {:?}: {}", letter.key.as_deref().map(String::from_utf8_lossy), headers.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The lines of a replay's output about one parked key each.
fn parked_key_lines(output: &str) -> Vec<&str> {
    output.lines().filter(|line| line.starts_with("parked key ")).collect()
}

/// `kawka dlq <args>` in the project; must exit 0. Returns its stdout.
fn dlq(project: &Project, args: &[&str]) -> String {
    project.kawka(&[&["dlq"], args].concat())
}

// ---------------------------------------------------------------------------
// 1. Park, then replay, in Postgres and Elasticsearch

async fn a_parked_key_waits_for_its_fix_and_replays_in_order(store: Store) {
    const EVENTS: usize = 1200;
    let registry = support::start_registry().await;
    let topic = support::unique("parkfeed");
    let name = support::unique("park");
    support::create_topic(&topic, 3).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    allow_any_registration_schema(&registry.url(), &topic).await;
    let log = ParkedLog::new(EVENTS, 0.4, 0);
    let spec = spec(&registry.url(), &topic);
    support::produce_with_python(&spec, log.records.clone()).await;
    let total = log.records.len();
    let produced = Produced::read(&topic, total, &log).await;
    let behind = produced.behind(&topic);
    let parked_count = produced.parked().len();

    let connector = connector(&name, &topic, store, "on_error: park", 50);
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    catalogue_without_the_old_version(&project);
    let pool = support::postgres().await;
    let mut kawka = project.start(0);
    wait_consumed(store, &pool, &name, &topic, total as i64, &[&kawka]).await;

    // Every other key is the fold; the parked key stays as it was before its failure.
    let fold = log.fold();
    let before = log.parked_before();
    let model = read_model(store, &pool, &name).await;
    assert_others_equal_the_fold(&model, &fold, "while parked");
    assert_eq!(model.get(PARKED), before.as_ref(), "nothing of {PARKED} is applied after its failure");
    assert_ne!(fold.get(PARKED), before.as_ref(), "the test needs the parked events to change {PARKED}");

    let letters = consume_all(&format!("{name}.dlq")).await;
    assert_parked_letters(&letters, produced.parked(), &behind, "upcast");
    assert_parked_exactly(store, &pool, &name, &[PARKED], "while parked").await;

    let seen = status(&kawka, &name).await;
    let parked = &seen["parked"];
    assert_eq!(parked["keys"], 1, "{seen}");
    assert_eq!(parked["limit"], 10_000, "the default limit: {seen}");
    // Checked at the end, so that a wrong count does not hide the rest.
    let mut late_failures = Vec::new();
    if parked["events"] != parked_count {
        late_failures.push(format!(
            "GET /connectors/{name}: parked.events is {} for {parked_count} parked events: {seen}",
            parked["events"]
        ));
    }
    assert_eq!(parked["oldest"]["key"], PARKED, "{seen}");
    assert_eq!(parked["oldest"]["behind"], behind.as_str(), "{seen}");
    let since = parked["oldest"]["since"].as_str().unwrap_or_default();
    assert!(chrono::DateTime::parse_from_rfc3339(since).is_ok(), "oldest.since is RFC 3339: {seen}");
    let exposition = metrics(&kawka).await;
    let of_connector = [("connector", name.as_str())];
    assert_eq!(metric(&exposition, "kawka_parked_keys", &of_connector), Some(1.0), "{exposition}");
    assert_eq!(metric(&exposition, "kawka_parked_keys_limit", &of_connector), Some(10_000.0), "{exposition}");
    let parked_events = metric(&exposition, "kawka_events_total", &[("connector", &name), ("outcome", "parked")]);
    // The failed event may count as dead-lettered rather than parked.
    assert!(
        parked_events.is_some_and(|n| n as usize == parked_count || n as usize == parked_count - 1),
        "kawka_events_total{{outcome=\"parked\"}} {parked_events:?} for {parked_count} parked events"
    );
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", tail(&kawka.log(), 40));

    // The cause is fixed; the daemon restarts and still holds the key.
    catalogue_with_the_old_version(&project);
    let mut kawka = project.start(1);
    eventually(Duration::from_secs(60), "the restarted daemon to run with the key parked", || async {
        let seen = status(&kawka, &name).await;
        (seen["state"] == "running" && seen["parked"]["keys"] == 1).then_some(())
    })
    .await;

    let dry = dlq(&project, &["replay", &name, "--dry-run", "--idle", "4s"]);
    let would = format!("parked key {PARKED}: would replay {parked_count} event(s) and release");
    assert!(dry.contains(&would), "the dry run says {would:?}:\n{dry}");
    assert_eq!(read_model(store, &pool, &name).await.get(PARKED), before.as_ref(), "a dry run writes nothing");
    assert_parked_exactly(store, &pool, &name, &[PARKED], "after the dry run").await;

    let first = dlq(&project, &["replay", &name, "--idle", "4s"]);
    let released = format!("parked key {PARKED}: replayed {parked_count} event(s), released");
    assert!(first.contains(&released), "the replay says {released:?}:\n{first}");
    let model = read_model(store, &pool, &name).await;
    assert_eq!(model.get(PARKED), fold.get(PARKED), "{PARKED} is the fold of all its events once replayed");
    assert_others_equal_the_fold(&model, &fold, "after the replay");
    assert_parked_exactly(store, &pool, &name, &[], "after the replay").await;

    // Released: the key's next events, produced at once, apply as they come
    // (and are not parked: the daemon learns of the release in time).
    let later = vec![email(PARKED, "released"), login(PARKED, 2), login("user1", 1), login(PARKED, 3)];
    support::produce_with_python(&spec, later.clone()).await;
    wait_consumed(store, &pool, &name, &topic, (total + later.len()) as i64, &[&kawka]).await;
    let all: Vec<Json> = log.reference.iter().chain(&later).cloned().collect();
    let fold = support::stats::fold(&all);
    let model = read_model(store, &pool, &name).await;
    let wrong = support::differences(&model, &fold, None);
    assert!(wrong.is_empty(), "after the release, rows differ from the fold:\n{}", wrong.join("\n"));
    let letters = consume_all(&format!("{name}.dlq")).await;
    if letters.len() != parked_count {
        late_failures.push(format!(
            "{} dead letter(s) after the release, of events that were also applied:\n{}",
            letters.len() - parked_count,
            describe_letters(&letters[parked_count.min(letters.len())..])
        ));
    }

    let second = dlq(&project, &["replay", &name, "--idle", "4s"]);
    assert!(parked_key_lines(&second).is_empty(), "a second replay finds no parked key:\n{second}");
    assert_eq!(read_model(store, &pool, &name).await, model, "a second replay changes nothing");
    eventually(Duration::from_secs(30), "the daemon to show nothing parked", || async {
        (status(&kawka, &name).await["parked"]["keys"] == 0).then_some(())
    })
    .await;
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", tail(&kawka.log(), 40));
    assert!(late_failures.is_empty(), "{}", late_failures.join("\n"));
    eprintln!(
        "{store:?}: {total} events over {USERS} users, {} of {PARKED} ({parked_count} parked behind {behind}), \
         {} keys equal to the fold",
        produced.parked_key.len(),
        fold.len()
    );
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_parks_a_failed_key_and_replays_it_in_order_once_fixed() {
    a_parked_key_waits_for_its_fix_and_replays_in_order(Store::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_parks_a_failed_key_and_replays_it_in_order_once_fixed() {
    a_parked_key_waits_for_its_fix_and_replays_in_order(Store::Elasticsearch).await;
}

// ---------------------------------------------------------------------------
// 2. kill -9 while parking and while replaying

async fn partition_position(pool: &sqlx::PgPool, name: &str, topic: &str, partition: i32) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT next_offset FROM kawka_offsets WHERE connector = $1 AND topic = $2 AND partition = $3",
    )
    .bind(name)
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// Whether another session has a transaction open whose statement writes
/// `table` (the replay's, once it writes: nothing else writes it then).
async fn writing_into(pool: &sqlx::PgPool, table: &str) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL \
         AND query LIKE $1 AND query !~* '^\\s*(create|select)'",
    )
    .bind(format!("%\"{table}\"%"))
    .fetch_one(pool)
    .await
    .is_ok_and(|n| n > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_parking_and_while_replaying_ends_in_the_fold() {
    const EVENTS: usize = 1000;
    const BURST: usize = 6000;
    const KILLS: usize = 2;
    let store = Store::Postgres;
    let registry = support::start_registry().await;
    let topic = support::unique("parkkill");
    let name = support::unique("parkkill");
    support::create_topic(&topic, 2).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    allow_any_registration_schema(&registry.url(), &topic).await;
    let log = ParkedLog::new(EVENTS, 0.1, BURST);
    support::produce_with_python(&spec(&registry.url(), &topic), log.records.clone()).await;
    let total = log.records.len();
    let produced = Produced::read(&topic, total, &log).await;
    let behind = produced.behind(&topic);
    let partition = produced.failed().partition;
    let partition_end = produced.partition_ends[&partition];

    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, store, "on_error: park", 50))]);
    catalogue_without_the_old_version(&project);
    let pool = support::postgres().await;

    // Killed while it parks the burst: past the failed event, before the
    // end of its partition.
    let mut at_kills = Vec::new();
    let mut past = produced.failed().offset + 1;
    for round in 0..KILLS {
        let mut kawka = project.start(round);
        let deadline = Instant::now() + Duration::from_secs(60);
        let now = loop {
            let now = partition_position(&pool, &name, &topic, partition).await;
            if now > past {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no progress past {past} in 60 s:\n{}",
                tail(&kawka.log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if round > 0 && now >= partition_end {
            break; // The first kill did land mid-burst; this run just finished first.
        }
        assert!(now < partition_end, "round {round}: the burst was parked before the kill; make it longer");
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..200))).await;
        kawka.kill9();
        past = partition_position(&pool, &name, &topic, partition).await;
        at_kills.push(past);
    }
    assert!(
        at_kills.first().is_some_and(|&p| p > produced.failed().offset && p < partition_end),
        "the first kill must land while the burst is parked: positions at kills {at_kills:?}, failed at {}, \
         partition end {partition_end}",
        produced.failed().offset
    );
    let mut kawka = project.start(KILLS);
    wait_consumed(store, &pool, &name, &topic, total as i64, &[&kawka]).await;

    // Before the replay: the key is still parked, nothing of it applied.
    let fold = log.fold();
    let before = log.parked_before();
    let model = read_model(store, &pool, &name).await;
    assert_others_equal_the_fold(&model, &fold, "after the kills");
    assert_eq!(model.get(PARKED), before.as_ref(), "nothing of {PARKED} is applied after its failure, kills or not");
    assert_parked_exactly(store, &pool, &name, &[PARKED], "after the kills").await;
    assert_eq!(status(&kawka, &name).await["parked"]["keys"], 1, "the restarted daemon loaded the parked key");
    // Dead letters: every parked event, in order; a kill may repeat some
    // (dead-lettered, not yet committed), never lose or reorder one.
    let letters = consume_all(&format!("{name}.dlq")).await;
    let parked_offsets: Vec<i64> = produced.parked().iter().map(|r| r.offset).collect();
    let (mut first_seen, mut seen) = (Vec::new(), std::collections::HashSet::new());
    for letter in &letters {
        assert_eq!(letter.key.as_deref(), Some(PARKED.as_bytes()), "only the parked key is dead-lettered");
        assert_eq!(header(letter, "kawka.parked.behind").as_deref(), Some(behind.as_str()), "parked behind");
        let offset: i64 = header(letter, "kawka.error.offset").and_then(|o| o.parse().ok()).expect("an offset header");
        if seen.insert(offset) {
            first_seen.push(offset);
        }
    }
    assert_eq!(first_seen, parked_offsets, "each parked event dead-lettered, first seen in log order");
    let repeated = letters.len() - first_seen.len();
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", tail(&kawka.log(), 40));

    // The replay, killed at a random moment (as soon as it has written
    // anything, at the latest), then run to the end.
    catalogue_with_the_old_version(&project);
    let replay_log = project.root().join("replay-killed.log");
    let output = std::fs::File::create(&replay_log).expect("replay log");
    let mut replay = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["dlq", "replay", &name, "--idle", "4s"])
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .stdout(output.try_clone().expect("log handle"))
        .stderr(output)
        .spawn()
        .expect("kawka dlq replay starts");
    let started = Instant::now();
    // A replay reads the dead letters until they are idle (4 s), then
    // writes: killed while a transaction of it writes the read model, else
    // at a random moment of either.
    let kill_after = Duration::from_millis(rand::rng().random_range(6000..14_000));
    let moment = loop {
        if replay.try_wait().expect("replay status").is_some() {
            break "after it ended";
        }
        if writing_into(&pool, &name).await {
            break "while it wrote";
        }
        if read_model(store, &pool, &name).await.get(PARKED) != before.as_ref() {
            break "once it had written";
        }
        if started.elapsed() > kill_after {
            break "at its random moment";
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _ = replay.kill();
    let _ = replay.wait();
    let killed_at = started.elapsed();
    // Whatever the kill left: the key's state is its fold up to some event,
    // and the key is released only once all of them applied.
    let parked_key: Vec<Json> = log.reference.iter().filter(|r| r["key"] == PARKED).cloned().collect();
    let prefixes: Vec<Option<Json>> =
        (0..=parked_key.len()).map(|n| support::stats::fold(&parked_key[..n]).remove(PARKED)).collect();
    let mid = read_model(store, &pool, &name).await.remove(PARKED);
    let applied = prefixes.iter().rposition(|p| *p == mid);
    assert!(
        applied.is_some_and(|n| n >= produced.failed),
        "after the replay's kill, {PARKED} is {mid:?}: not the fold of any prefix of its events from the failure on"
    );
    let still_parked = !parked_keys(store, &pool, &name).await.is_empty();
    assert!(
        still_parked || applied == Some(parked_key.len()),
        "{PARKED} was released with only {applied:?} of its {} events applied",
        parked_key.len()
    );
    eprintln!(
        "replay killed {moment} ({killed_at:?}): {PARKED} at {applied:?} of {} events, still parked: {still_parked}\n{}",
        parked_key.len(),
        std::fs::read_to_string(&replay_log).unwrap_or_default()
    );

    let finishing = Instant::now();
    let finish = dlq(&project, &["replay", &name, "--idle", "4s"]);
    let finished_in = finishing.elapsed();
    if still_parked {
        let line = finish.lines().find(|l| l.starts_with(&format!("parked key {PARKED}: replayed ")));
        assert!(line.is_some_and(|l| l.ends_with("event(s), released")), "the second run releases {PARKED}:\n{finish}");
    } else {
        assert!(parked_key_lines(&finish).is_empty(), "nothing left to replay:\n{finish}");
    }
    let model = read_model(store, &pool, &name).await;
    let wrong = support::differences(&model, &fold, None);
    assert!(wrong.is_empty(), "after the replays, rows differ from the fold:\n{}", wrong.join("\n"));
    assert_parked_exactly(store, &pool, &name, &[], "after the replays").await;
    let again = dlq(&project, &["replay", &name, "--idle", "4s"]);
    assert!(parked_key_lines(&again).is_empty(), "a last replay finds nothing:\n{again}");
    assert_eq!(read_model(store, &pool, &name).await, model, "a last replay changes nothing");
    eprintln!(
        "{total} events, {} of {PARKED} parked behind {behind}; daemon killed at positions {at_kills:?} of \
         {partition_end}; {} dead letters ({repeated} repeated); replay killed {moment} after {killed_at:?}, \
         still parked: {still_parked}; the next replay took {finished_in:?}; {} keys equal to the fold",
        parked_offsets.len(),
        letters.len(),
        fold.len()
    );
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

// ---------------------------------------------------------------------------
// 3. A rebalance moves a parked key's partition

fn assigned(status: &Json, topic: &str, partition: i32) -> bool {
    status["partitions"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["topic"] == topic && p["partition"] == partition))
}

fn partition_count(status: &Json) -> usize {
    status["partitions"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_key_stays_parked_when_its_partition_moves_to_another_process() {
    const EVENTS: usize = 600;
    let store = Store::Postgres;
    let registry = support::start_registry().await;
    let topic = support::unique("parkmove");
    let name = support::unique("parkmove");
    support::create_topic(&topic, 2).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    allow_any_registration_schema(&registry.url(), &topic).await;
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, store, "on_error: park", 50))]);
    catalogue_without_the_old_version(&project);
    let pool = support::postgres().await;
    let mut processes = vec![project.start(0), project.start(1)];
    eventually(Duration::from_secs(60), "both processes to hold a partition", || async {
        let (a, b) = (status(&processes[0], &name).await, status(&processes[1], &name).await);
        (partition_count(&a) == 1 && partition_count(&b) == 1).then_some(())
    })
    .await;

    let log = ParkedLog::new(EVENTS, 0.3, 0);
    let spec = spec(&registry.url(), &topic);
    support::produce_with_python(&spec, log.records.clone()).await;
    let total = log.records.len();
    let produced = Produced::read(&topic, total, &log).await;
    let behind = produced.behind(&topic);
    let partition = produced.failed().partition;
    wait_consumed(store, &pool, &name, &topic, total as i64, &[&processes[0], &processes[1]]).await;
    let before = log.parked_before();
    assert_eq!(read_model(store, &pool, &name).await.get(PARKED), before.as_ref(), "{PARKED} is parked");
    assert_parked_exactly(store, &pool, &name, &[PARKED], "parked by the owner").await;

    // The owner of the key's partition leaves; the other takes it over.
    let mut owner = None;
    for (n, process) in processes.iter().enumerate() {
        if assigned(&status(process, &name).await, &topic, partition) {
            owner = Some(n);
        }
    }
    let owner = owner.expect("a process owns the parked key's partition");
    let seen = status(&processes[owner], &name).await;
    assert_eq!(seen["parked"]["keys"], 1, "the owner shows the key parked: {seen}");
    let mut leaving = processes.remove(owner);
    assert_eq!(leaving.terminate().await, Some(0), "clean exit; log:\n{}", tail(&leaving.log(), 40));
    let survivor = processes.remove(0);
    eventually(Duration::from_secs(60), "the other process to take the parked key's partition", || async {
        assigned(&status(&survivor, &name).await, &topic, partition).then_some(())
    })
    .await;

    // More events of the key, and of others: the key's are parked too.
    let later = vec![
        email(PARKED, "moved"),
        login(PARKED, 4),
        login("user1", 2),
        registered("user2", "Again"),
        login(PARKED, 1),
    ];
    support::produce_with_python(&spec, later.clone()).await;
    let all_records = total + later.len();
    wait_consumed(store, &pool, &name, &topic, all_records as i64, &[&survivor]).await;
    let all: Vec<Json> = log.reference.iter().chain(&later).cloned().collect();
    let fold = support::stats::fold(&all);
    let model = read_model(store, &pool, &name).await;
    assert_others_equal_the_fold(&model, &fold, "after the rebalance");
    assert_eq!(model.get(PARKED), before.as_ref(), "the events after the rebalance are parked, not applied");
    assert_parked_exactly(store, &pool, &name, &[PARKED], "after the rebalance").await;
    let seen = status(&survivor, &name).await;
    assert_eq!(seen["parked"]["keys"], 1, "the new owner loaded the parked key: {seen}");
    let produced = Produced::read(&topic, all_records, &log).await;
    let letters = consume_all(&format!("{name}.dlq")).await;
    assert_parked_letters(&letters, produced.parked(), &behind, "upcast");
    let parked_count = produced.parked().len();
    let mut survivor = survivor;
    assert_eq!(survivor.terminate().await, Some(0), "clean exit; log:\n{}", tail(&survivor.log(), 40));

    catalogue_with_the_old_version(&project);
    let out = dlq(&project, &["replay", &name, "--idle", "4s"]);
    let released = format!("parked key {PARKED}: replayed {parked_count} event(s), released");
    assert!(out.contains(&released), "the replay says {released:?}:\n{out}");
    let model = read_model(store, &pool, &name).await;
    let wrong = support::differences(&model, &fold, None);
    assert!(wrong.is_empty(), "after the replay, rows differ from the fold:\n{}", wrong.join("\n"));
    assert_parked_exactly(store, &pool, &name, &[], "after the replay").await;
    eprintln!(
        "{all_records} events, {parked_count} of {PARKED} parked behind {behind} (3 after process {owner} left), \
         {} keys equal to the fold",
        fold.len()
    );
    let _ = registry.stop().await; // cleanup only
}

// ---------------------------------------------------------------------------
// 4. The bound on parked keys

fn banned(user: Option<&str>) -> Json {
    json!({"schema": "banned", "key": user, "value": {"user_id": user.unwrap_or("nobody")}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_keys_the_connector_stops_or_dead_letters_plainly() {
    let store = Store::Postgres;
    let registry = support::start_registry().await;
    let topic = support::unique("parkbound");
    let base = support::unique("parkbound");
    let (stopping, lettering) = (format!("{base}_stop"), format!("{base}_dl"));
    support::create_topic(&topic, 1).await;
    for name in [&stopping, &lettering] {
        support::create_topic(&format!("{name}.dlq"), 1).await;
    }
    // Banned events have no rule (`unknown_events: error`): each fails its key.
    let records = vec![
        registered("a", "Ann"), // 0
        banned(None),           // 1: no key to hold: dead-lettered plainly
        banned(Some("k1")),     // 2: k1 parked
        login("b", 2),          // 3
        banned(Some("k2")),     // 4: k2 parked (the limit)
        login("k1", 5),         // 5: behind k1
        email("c", "c1"),       // 6
        banned(Some("k3")),     // 7: a third key: over the limit
        registered("d", "Dee"), // 8
        banned(Some("k4")),     // 9: a fourth
        login("e", 1),          // 10
    ];
    let spec = spec(&registry.url(), &topic);
    support::produce_with_python(&spec, records.clone()).await;
    let policy = |fallback: &str| format!("on_error: park\npark: {{ max_keys: 2, fallback: {fallback} }}");
    let project = Project::new(
        &registry.url(),
        &[
            (&stopping, &connector(&stopping, &topic, store, &policy("stop"), 50)),
            (&lettering, &connector(&lettering, &topic, store, &policy("dead_letter"), 50)),
        ],
    );
    let pool = support::postgres().await;
    let mut kawka = project.start(0);

    // fallback stop: halted at the third key, naming the limit.
    let seen = eventually(Duration::from_secs(60), "the stop connector to stop", || async {
        let seen = status(&kawka, &stopping).await;
        (seen["state"] == "stopped").then_some(seen)
    })
    .await;
    let error = seen["last_error"]["message"].as_str().unwrap_or_default();
    assert!(error.contains("max_keys") || error.contains("limit"), "the error names the limit: {seen}");
    assert!(error.contains('2'), "the error says the limit is 2: {seen}");
    assert_eq!(seen["parked"]["keys"], 2, "{seen}");
    assert_eq!(seen["parked"]["limit"], 2, "{seen}");
    assert_parked_exactly(store, &pool, &stopping, &["k1", "k2"], "stop fallback").await;
    let rows = read_model(store, &pool, &stopping).await;
    let ids: Vec<&String> = rows.keys().collect();
    assert_eq!(ids, ["a", "b", "c"], "applied up to the third failing key, nothing from it on");
    assert_eq!(support::stored_positions(&pool, &stopping).await, 7, "the position stays at k3's event");

    // fallback dead_letter: the third and fourth keys' failures are plain dead letters.
    let total = records.len() as i64;
    eventually(Duration::from_secs(60), "the dead_letter connector to consume the log", || async {
        (support::stored_positions(&pool, &lettering).await == total).then_some(())
    })
    .await;
    let letters = consume_all(&format!("{lettering}.dlq")).await;
    let summary: Vec<(Option<String>, Option<String>, Option<String>)> = letters
        .iter()
        .map(|l| (header(l, "kawka.error.offset"), header(l, "kawka.error.stage"), header(l, "kawka.parked.behind")))
        .collect();
    let offsets: Vec<&str> = summary.iter().map(|(o, _, _)| o.as_deref().unwrap_or("?")).collect();
    assert_eq!(offsets, ["1", "2", "4", "5", "7", "9"], "dead letters, in log order: {summary:?}");
    let behind = |offset: i64| Some(format!("{topic}/0@{offset}"));
    let behinds: Vec<Option<String>> = summary.iter().map(|(_, _, b)| b.clone()).collect();
    assert_eq!(
        behinds,
        [None, behind(2), behind(4), behind(2), None, None],
        "parked letters name what they wait behind; the null key's and the overflowing ones do not"
    );
    assert_eq!(summary[3].1.as_deref(), Some("park"), "k1's later event is parked: {summary:?}");
    assert!(
        summary.iter().enumerate().all(|(n, (_, stage, _))| n == 3 || stage.as_deref() != Some("park")),
        "{summary:?}"
    );
    assert_parked_exactly(store, &pool, &lettering, &["k1", "k2"], "dead_letter fallback").await;
    let seen = status(&kawka, &lettering).await;
    assert_eq!(seen["state"], "running", "{seen}");
    assert_eq!(seen["parked"]["keys"], 2, "{seen}");

    let exposition = metrics(&kawka).await;
    for name in [&stopping, &lettering] {
        let of = [("connector", name.as_str())];
        assert_eq!(metric(&exposition, "kawka_parked_keys", &of), Some(2.0), "{name}:\n{exposition}");
        assert_eq!(metric(&exposition, "kawka_parked_keys_limit", &of), Some(2.0), "{name}:\n{exposition}");
    }
    let overflow = metric(&exposition, "kawka_park_overflow_total", &[("connector", &lettering)]);
    assert!(overflow.is_some_and(|n| n >= 1.0), "kawka_park_overflow_total of {lettering}: {overflow:?}");

    // It keeps running: later events are applied.
    support::produce_with_python(&spec, vec![registered("f", "Fay"), login("a", 3)]).await;
    eventually(Duration::from_secs(60), "the dead_letter connector to go on", || async {
        let rows = read_model(store, &pool, &lettering).await;
        (rows.get("f").is_some_and(|f| f["name"] == "Fay") && rows.get("a").is_some_and(|a| a["logins"] == 3))
            .then_some(())
    })
    .await;
    let rows = read_model(store, &pool, &lettering).await;
    assert!(!rows.contains_key("k1") && !rows.contains_key("k2"), "parked keys stay out: {rows:?}");

    // One key at a time: k2's event still has no rule, so it stays parked.
    let dry = dlq(&project, &["replay", &stopping, "--key", "k2", "--dry-run", "--idle", "2s"]);
    let fails = format!("parked key k2: would replay 0 event(s), then fails at {topic}/0@4: projection: ");
    assert!(dry.contains(&fails), "the dry run says {fails:?}:\n{dry}");
    assert_eq!(parked_key_lines(&dry).len(), 1, "--key k2 looks at k2 only:\n{dry}");
    let again = dlq(&project, &["replay", &stopping, "--key", "k2", "--idle", "2s"]);
    let stays = format!("parked key k2: replayed 0 event(s), stays parked behind {topic}/0@4: projection: ");
    assert!(again.contains(&stays), "the replay says {stays:?}:\n{again}");
    assert_eq!(parked_key_lines(&again).len(), 1, "--key k2 replays k2 only:\n{again}");
    assert_parked_exactly(store, &pool, &stopping, &["k1", "k2"], "after a replay that fails again").await;

    // Released without a replay, k1's later events apply as they come.
    let released = dlq(&project, &["release", &lettering, "--key", "k1"]);
    assert!(released.contains("released parked key k1: "), "the release says so:\n{released}");
    // Checked at the end, so that a wrong count does not hide the rest.
    let mut late_failures = Vec::new();
    let said = "released parked key k1: 2 parked event(s) left unapplied";
    if !released.contains(said) {
        late_failures.push(format!("the release says {said:?}:\n{released}"));
    }
    assert_parked_exactly(store, &pool, &lettering, &["k2"], "after the release").await;
    support::produce_with_python(&spec, vec![login("k1", 4)]).await;
    eventually(Duration::from_secs(30), "k1's event after its release to apply", || async {
        let rows = read_model(store, &pool, &lettering).await;
        rows.get("k1").is_some_and(|k1| *k1 == json!({"logins": 4})).then_some(())
    })
    .await;
    let letters = consume_all(&format!("{lettering}.dlq")).await;
    if letters.len() != 6 {
        late_failures.push(format!(
            "{} dead letter(s) after the release, of events that were also applied:\n{}",
            letters.len() - 6,
            describe_letters(&letters[6.min(letters.len())..])
        ));
    }
    let stopped_overflow = metric(&exposition, "kawka_park_overflow_total", &[("connector", &stopping)]);
    eprintln!(
        "stop: parked k1, k2, stopped at offset 7 ({error}); dead_letter: 6 dead letters {summary:?}, overflow {overflow:?} \
         (stop's {stopped_overflow:?})"
    );
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", tail(&kawka.log(), 40));
    assert!(late_failures.is_empty(), "{}", late_failures.join("\n"));
    let _ = registry.stop().await; // cleanup only
}
