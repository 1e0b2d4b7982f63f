//! `kawka rebuild` of a Postgres connector with `on_error: park` holds back
//! the keys the live connector has parked: in the new table version a
//! parked key's events from its failed one on are skipped (the key is where
//! the live table has it), every other key is the fold; what a replay
//! applied to a parked key before the rebuild is applied by the rebuild
//! too. After the cut-over, `kawka dlq replay` (once the causes are fixed)
//! applies the parked keys' events to the new live version: every key is
//! then the fold of the whole log, and nothing is parked any more.
//!
//! Three parked keys, each a case:
//! * `user3`: parked behind an old registration A; after A's fix a replay
//!   applies its events up to a later unreadable email change B, where it
//!   stays parked (the entry records what the replay applied).
//! * `user5`: parked behind an old registration and never replayed before
//!   the rebuild: the rebuild can read that event (its cause is fixed by
//!   then) but must hold it back.
//! * `user7`: parked behind an old registration, replayed and released,
//!   then parked again behind a new unreadable email change.
//!
//! Then keys that fail while a rebuild runs: parked by the live connector
//! after the rebuild read the parked keys, or not yet read by the live
//! connector when the cut-over moves its positions to the rebuild's. They
//! too must be held back in the new version (and their failures parked),
//! so that the replay after the cut-over ends in the fold.
//!
//! The failures are events written by older producers that the project's
//! catalogue cannot read (stage `upcast`); the fixes are the catalogue
//! versions of those writer schemas and their upcasters. The reference is
//! the log folded one event at a time (`support::stats::fold`).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use support::{eventually, Consumed, Kawka, Project};

const USERS: usize = 20;
/// Partially replayed before the rebuild.
const PARTIAL: &str = "user3";
/// Never replayed before the rebuild.
const UNTOUCHED: &str = "user5";
/// Replayed and released, then parked again.
const AGAIN: &str = "user7";
const PARKED_KEYS: [&str; 3] = [PARTIAL, UNTOUCHED, AGAIN];

// ---------------------------------------------------------------------------
// The log

/// The registration as an older producer wrote it: `fullName`, no `name`.
fn old_registration_schema() -> Json {
    support::record_schema(
        "test.stats",
        "Registered",
        json!([{"name": "user_id", "type": "string"}, {"name": "fullName", "type": "string"},
            {"name": "email", "type": "string"}]),
    )
}

/// The email change as an older producer wrote it: `mail`, no `email`.
fn old_email_schema() -> Json {
    support::record_schema(
        "test.stats",
        "EmailChanged",
        json!([{"name": "user_id", "type": "string"}, {"name": "mail", "type": "string"}]),
    )
}

fn spec(registry: &str, topic: &str) -> Json {
    let mut schemas = support::stats::schemas();
    schemas["registered_old"] = old_registration_schema();
    schemas["email_old"] = old_email_schema();
    json!({"bootstrap": support::kafka_bootstrap(), "registry": registry, "topic": topic,
        "subject_strategy": "topic_record", "schemas": schemas})
}

/// Old and current schemas go under one subject: an event log keeps
/// versions no reader could be given, so compatibility checks are off.
async fn allow_any_schema(registry: &str, topic: &str) {
    for record in ["Registered", "EmailChanged"] {
        let response = reqwest::Client::new()
            .put(format!("{registry}/config/{topic}-test.stats.{record}"))
            .json(&json!({"compatibility": "NONE"}))
            .send()
            .await
            .expect("set compatibility");
        assert!(response.status().is_success(), "set compatibility: {}", response.status());
    }
}

fn login(user: &str, count: i64) -> Json {
    json!({"schema": "login", "key": user, "value": {"user_id": user, "count": count}})
}

/// One event: as produced, and as the fold reads it (the same but for an
/// old writer schema, read as the current one).
#[derive(Clone)]
struct Event {
    produced: Json,
    reference: Json,
}

impl Event {
    fn plain(record: Json) -> Event {
        Event { produced: record.clone(), reference: record }
    }

    /// A registration written with `fullName`.
    fn old_registration(user: &str, tag: &str) -> Event {
        let (name, email) = (format!("Old {tag}"), format!("{user}.old{tag}@example.com"));
        Event {
            produced: json!({"schema": "registered_old", "key": user,
                "value": {"user_id": user, "fullName": name, "email": email}}),
            reference: json!({"schema": "registered", "key": user,
                "value": {"user_id": user, "name": name, "email": email}}),
        }
    }

    /// An email change written with `mail`.
    fn old_email(user: &str, tag: &str) -> Event {
        let email = format!("{user}.oldmail{tag}@example.com");
        Event {
            produced: json!({"schema": "email_old", "key": user, "value": {"user_id": user, "mail": email}}),
            reference: json!({"schema": "email", "key": user, "value": {"user_id": user, "email": email}}),
        }
    }

    fn key(&self) -> &str {
        self.reference["key"].as_str().expect("a key")
    }
}

/// Index of the first event of `user` at or after `from`.
fn first_of(events: &[Event], user: &str, from: usize) -> usize {
    (from..events.len()).find(|&n| events[n].key() == user).unwrap_or_else(|| panic!("no event of {user} after {from}"))
}

/// The first part of the log: each parked key's registration at some point
/// is an old one; a later email change of `PARTIAL` is an old one too.
/// Returns the events and the indexes of those failures (A of each key, B
/// of `PARTIAL`).
fn first_part(events: usize) -> (Vec<Event>, BTreeMap<&'static str, usize>, usize) {
    let mut log: Vec<Event> = support::stats::log(events, USERS).into_iter().map(Event::plain).collect();
    let mut failed = BTreeMap::new();
    for (user, at) in [(AGAIN, 0.15), (PARTIAL, 0.25), (UNTOUCHED, 0.35)] {
        let n = first_of(&log, user, (events as f64 * at) as usize);
        log[n] = Event::old_registration(user, &format!("a{n}"));
        failed.insert(user, n);
    }
    let b = first_of(&log, PARTIAL, (events as f64 * 0.6) as usize);
    log[b] = Event::old_email(PARTIAL, &format!("b{b}"));
    (log, failed, b)
}

/// The second part, produced before the rebuild: random events, and
/// `AGAIN` (released by then): a login, an old email change, a login.
/// Returns the events and the index of the failing one.
fn second_part(events: usize) -> (Vec<Event>, usize) {
    let mut log: Vec<Event> = support::stats::log(events, USERS).into_iter().map(Event::plain).collect();
    let b = events / 2;
    log.insert(events * 4 / 5, Event::plain(login(AGAIN, 3)));
    log.insert(b, Event::old_email(AGAIN, "b"));
    log.insert(events / 5, Event::plain(login(AGAIN, 2)));
    (log, b + 1)
}

/// The third part, produced after the cut-over: random events and one
/// login of each parked key.
fn third_part(events: usize) -> Vec<Event> {
    let mut log: Vec<Event> = support::stats::log(events, USERS).into_iter().map(Event::plain).collect();
    for (n, user) in PARKED_KEYS.iter().enumerate() {
        log.insert(events * (n + 1) / 4, Event::plain(login(user, 4)));
    }
    log
}

fn references(events: &[Event]) -> Vec<Json> {
    events.iter().map(|e| e.reference.clone()).collect()
}

/// The fold of `events`, but for each key of `held` nothing from its index
/// (into `events`) on: what a read model holding those keys back must be.
fn fold_holding(events: &[Event], held: &[(&str, usize)]) -> BTreeMap<String, Json> {
    let kept: Vec<Json> = events
        .iter()
        .enumerate()
        .filter(|(n, e)| !held.iter().any(|(user, from)| e.key() == *user && n >= from))
        .map(|(_, e)| e.reference.clone())
        .collect();
    support::stats::fold(&kept)
}

/// How many events of `user` are in `events[from..to]`.
fn count_of(events: &[Event], user: &str, from: usize, to: usize) -> usize {
    events[from..to].iter().filter(|e| e.key() == user).count()
}

/// Where each event of `user` is (partition, offset), in log order (one
/// partition per key: offset order is log order).
async fn positions_of(topic: &str, total: usize, user: &str) -> Vec<(i32, i64)> {
    let records: Vec<Consumed> = support::consume(topic, total, Duration::from_secs(60)).await;
    assert_eq!(records.len(), total, "the produced log reads back");
    let mut mine: Vec<(i32, i64)> =
        records.iter().filter(|r| r.key.as_deref() == Some(user.as_bytes())).map(|r| (r.partition, r.offset)).collect();
    mine.sort_by_key(|&(_, offset)| offset);
    let partitions: std::collections::BTreeSet<i32> = mine.iter().map(|&(p, _)| p).collect();
    assert_eq!(partitions.len(), 1, "{user}'s events are in one partition: {partitions:?}");
    mine
}

/// `<topic>/<partition>@<offset>` of the `nth` event of `user`.
async fn spot(topic: &str, total: usize, user: &str, nth: usize) -> String {
    let (partition, offset) = positions_of(topic, total, user).await[nth];
    format!("{topic}/{partition}@{offset}")
}

// ---------------------------------------------------------------------------
// The project

fn connector(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "1000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ id: text, name: text, email: text, logins: bigint }}, primary_key: [id] }}
key: {{ id: $key }}
on_error: park
dead_letter_topic: {name}.dlq
unknown_events: error
batch: {{ max_events: 50, max_wait: 50ms }}
events:
  test.stats.Registered:   {{ upsert: {{ name: name, email: email, logins: 0 }} }}
  test.stats.EmailChanged: {{ merge: {{ email: email }} }}
  test.stats.LoggedIn:     {{ increment: {{ logins: count }} }}
"#
    )
}

/// The project's catalogue knows the current registration and email
/// change only: the old writers' events cannot be read as them.
fn catalogue_without_the_old_versions(project: &Project) {
    let current = support::stats::schemas();
    for (event, schema) in [("Registered", "registered"), ("EmailChanged", "email")] {
        let dir = project.root().join(format!("schemas/test.stats.{event}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("v1.avsc"), current[schema].to_string()).expect("write v1");
    }
}

/// A fix: the old writer schema of `event` is v1, the current one v2, and
/// an upcaster renames the old field.
fn catalogue_with_the_old_version(project: &Project, event: &str, old: Json, current: &str, rename: &str) {
    let dir = project.root().join(format!("schemas/test.stats.{event}"));
    std::fs::write(dir.join("v1.avsc"), old.to_string()).expect("write v1");
    std::fs::write(dir.join("v2.avsc"), support::stats::schemas()[current].to_string()).expect("write v2");
    let upcasters = project.root().join("schemas/upcasters.yaml");
    let mut text = std::fs::read_to_string(&upcasters).expect("upcasters");
    text.push_str(&format!("- event: test.stats.{event}\n  from: 1\n  steps:\n    - rename: {{ {rename} }}\n"));
    std::fs::write(&upcasters, text).expect("write upcasters");
}

// ---------------------------------------------------------------------------
// What the sink, the daemon and the commands say

fn assert_model(got: &BTreeMap<String, Json>, want: &BTreeMap<String, Json>, when: &str) {
    let wrong = support::differences(got, want, None);
    assert!(wrong.is_empty(), "{when}: {} key(s) differ:\n{}", wrong.len(), wrong.join("\n"));
}

/// The keys `kawka_parked` holds for `connector`.
async fn parked_keys(pool: &sqlx::PgPool, connector: &str) -> Vec<String> {
    let keys: Vec<Vec<u8>> = sqlx::query_scalar("SELECT key FROM kawka_parked WHERE connector = $1 ORDER BY key")
        .bind(connector)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("read kawka_parked: {e}"));
    keys.into_iter().map(|k| String::from_utf8_lossy(&k).into_owned()).collect()
}

async fn assert_parked(pool: &sqlx::PgPool, connector: &str, keys: &[&str], when: &str) {
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(parked_keys(pool, connector).await, want, "{when}: the keys kawka_parked holds for {connector}");
}

async fn wait_consumed(pool: &sqlx::PgPool, name: &str, total: usize, kawka: &Kawka) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = support::stored_positions(pool, name).await;
        if now == total as i64 {
            return;
        }
        if Instant::now() > deadline {
            panic!("{name}: {now} of {total} events durable after 60 s; log:\n{}", tail(&kawka.log(), 40));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn status(kawka: &Kawka, name: &str) -> Json {
    let address = eventually(Duration::from_secs(30), "kawka's HTTP address in its log", || async {
        support::http_address(&kawka.log())
    })
    .await;
    let url = format!("http://{address}/connectors/{name}");
    reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}")).json().await.expect("status JSON")
}

/// Waits for the daemon to restart the connector after a catalogue change
/// (a reload restarts the connectors of the changed event type), running
/// with all `partitions`.
async fn wait_restarted(kawka: &Kawka, name: &str, started_before: i64, partitions: usize) {
    eventually(Duration::from_secs(60), "the connector to restart with the new catalogue", || async {
        let seen = status(kawka, name).await;
        (seen["started_at_ms"].as_i64().is_some_and(|at| at > started_before)
            && seen["state"] == "running"
            && seen["partitions"].as_array().is_some_and(|p| p.len() == partitions))
        .then_some(())
    })
    .await;
}

/// The line a replay printed about `key`.
fn line_of<'a>(output: &'a str, key: &str) -> &'a str {
    let prefix = format!("parked key {key}: ");
    output.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no line about {key}:\n{output}"))
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_holds_back_parked_keys_with_what_replays_applied_and_a_replay_after_it_ends_in_the_fold() {
    const FIRST: usize = 880;
    const SECOND: usize = 100;
    const THIRD: usize = 30;
    let started = Instant::now();
    let registry = support::start_registry().await;
    let topic = support::unique("rbpark");
    let name = support::unique("rbpark");
    support::create_topic(&topic, 3).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    allow_any_schema(&registry.url(), &topic).await;
    let spec = spec(&registry.url(), &topic);

    let (mut log, failed, partial_b) = first_part(FIRST);
    let produced = |events: &[Event]| events.iter().map(|e| e.produced.clone()).collect::<Vec<_>>();
    support::produce_with_python(&spec, produced(&log)).await;
    let (a_partial, a_untouched, a_again) = (failed[PARTIAL], failed[UNTOUCHED], failed[AGAIN]);

    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic))]);
    catalogue_without_the_old_versions(&project);
    let pool = support::postgres().await;
    let daemon = project.start(0);
    wait_consumed(&pool, &name, log.len(), &daemon).await;

    // 1. Parked: each key where it was before its failure, the others the fold.
    let whole_first = support::stats::fold(&references(&log));
    let parked_first = [(PARTIAL, a_partial), (UNTOUCHED, a_untouched), (AGAIN, a_again)];
    let want = fold_holding(&log, &parked_first);
    for (user, _) in parked_first {
        assert_ne!(want.get(user), whole_first.get(user), "the test needs {user}'s parked events to change it");
    }
    assert_model(&support::stats::rows(&pool, &name).await, &want, "parked by the live connector");
    assert_parked(&pool, &name, &PARKED_KEYS, "parked by the live connector").await;
    let before_a_partial = want.get(PARTIAL).cloned();

    // 2. The registrations are fixed. PARTIAL is replayed up to its old
    //    email change, where it stays parked; AGAIN is replayed and released.
    let started_at = status(&daemon, &name).await["started_at_ms"].as_i64().unwrap_or(0);
    catalogue_with_the_old_version(&project, "Registered", old_registration_schema(), "registered", "fullName: name");
    wait_restarted(&daemon, &name, started_at, 3).await;
    let nth = |user: &str, at: usize| count_of(&log, user, 0, at);
    let partial_behind = spot(&topic, log.len(), PARTIAL, nth(PARTIAL, partial_b)).await;
    let out = project.kawka(&["dlq", "replay", &name, "--key", PARTIAL, "--idle", "4s"]);
    let applied = count_of(&log, PARTIAL, a_partial, partial_b);
    let said = format!("parked key {PARTIAL}: replayed {applied} event(s), stays parked behind {partial_behind}: ");
    assert!(line_of(&out, PARTIAL).starts_with(&said), "the replay says {said:?}:\n{out}");
    let want = fold_holding(&log, &[(PARTIAL, partial_b), (UNTOUCHED, a_untouched), (AGAIN, a_again)]);
    assert_ne!(want.get(PARTIAL), before_a_partial.as_ref(), "the test needs the replay to change {PARTIAL}");
    assert_ne!(want.get(PARTIAL), whole_first.get(PARTIAL), "the test needs {PARTIAL} to stay held back");
    assert_model(&support::stats::rows(&pool, &name).await, &want, "after the partial replay");
    assert_parked(&pool, &name, &PARKED_KEYS, "after the partial replay").await;

    let out = project.kawka(&["dlq", "replay", &name, "--key", AGAIN, "--idle", "4s"]);
    let replayed = count_of(&log, AGAIN, a_again, log.len());
    let said = format!("parked key {AGAIN}: replayed {replayed} event(s), released");
    assert_eq!(line_of(&out, AGAIN), said, "the replay of {AGAIN}:\n{out}");
    let want = fold_holding(&log, &[(PARTIAL, partial_b), (UNTOUCHED, a_untouched)]);
    assert_model(&support::stats::rows(&pool, &name).await, &want, "after AGAIN's replay");
    assert_parked(&pool, &name, &[PARTIAL, UNTOUCHED], "after AGAIN's replay").await;

    // 3. More events: AGAIN (released) applies a login, then is parked again
    //    behind an old email change; the others' events are held or applied.
    let (second, again_b) = second_part(SECOND);
    support::produce_with_python(&spec, produced(&second)).await;
    let again_b = log.len() + again_b;
    log.extend(second);
    wait_consumed(&pool, &name, log.len(), &daemon).await;
    let held = [(PARTIAL, partial_b), (UNTOUCHED, a_untouched), (AGAIN, again_b)];
    let want = fold_holding(&log, &held);
    let whole = support::stats::fold(&references(&log));
    for (user, _) in held {
        assert_ne!(want.get(user), whole.get(user), "the test needs {user}'s held events to change it");
    }
    assert_ne!(
        want.get(AGAIN),
        fold_holding(&log, &[(AGAIN, a_again)]).get(AGAIN),
        "the test needs {AGAIN}'s replayed events to change it"
    );
    let held_events: usize = held.iter().map(|(user, from)| count_of(&log, user, *from, log.len())).sum();
    let held_summary: Vec<String> = held
        .iter()
        .map(|(user, from)| {
            format!("{user} {} of {}", count_of(&log, user, *from, log.len()), count_of(&log, user, 0, log.len()))
        })
        .collect();
    let live_before = support::stats::rows(&pool, &name).await;
    assert_model(&live_before, &want, "parked again, before the rebuild");
    assert_parked(&pool, &name, &PARKED_KEYS, "before the rebuild").await;
    let before_rebuild = started.elapsed();

    // 4. The rebuild: the new version holds the parked keys back as the live
    //    table does, with what the replays applied; the others are the fold.
    let rebuild_started = Instant::now();
    let rebuilt_says = project.kawka(&["rebuild", &name]);
    let rebuild_took = rebuild_started.elapsed();
    assert!(rebuilt_says.contains(&format!("previous version is kept as {name}_v1")), "{rebuilt_says}");
    let rebuilt = support::stats::rows(&pool, &name).await;
    assert_model(&rebuilt, &want, "the rebuilt version");
    assert_model(&support::stats::rows(&pool, &format!("{name}_v1")).await, &live_before, "the previous version");
    assert_parked(&pool, &name, &PARKED_KEYS, "after the cut-over").await;

    // 5. The live connector goes on in the new version and keeps holding
    //    the parked keys.
    let third = third_part(THIRD);
    support::produce_with_python(&spec, produced(&third)).await;
    log.extend(third);
    wait_consumed(&pool, &name, log.len(), &daemon).await;
    let want = fold_holding(&log, &held);
    assert_model(&support::stats::rows(&pool, &name).await, &want, "after the cut-over, more events");
    assert_parked(&pool, &name, &PARKED_KEYS, "after the cut-over, more events").await;

    // 6. The email changes are fixed; the replay applies every parked key's
    //    events to the new version: every key is the fold of the whole log.
    let started_at = status(&daemon, &name).await["started_at_ms"].as_i64().unwrap_or(0);
    catalogue_with_the_old_version(&project, "EmailChanged", old_email_schema(), "email", "mail: email");
    wait_restarted(&daemon, &name, started_at, 3).await;
    let out = project.kawka(&["dlq", "replay", &name, "--idle", "4s"]);
    for (user, from) in held {
        let said = format!("parked key {user}: replayed {} event(s), released", count_of(&log, user, from, log.len()));
        assert_eq!(line_of(&out, user), said, "the last replay of {user}:\n{out}");
    }
    let fold = support::stats::fold(&references(&log));
    let model = support::stats::rows(&pool, &name).await;
    assert_model(&model, &fold, "after the replay into the new version");
    assert_parked(&pool, &name, &[], "after the replay into the new version").await;
    assert_model(
        &support::stats::rows(&pool, &format!("{name}_v1")).await,
        &live_before,
        "the previous version, untouched",
    );

    eprintln!(
        "{} events over {USERS} users in 3 partitions; held by the rebuild: {} events ({}); {rebuild_took:?} for \
         the rebuild ({}); {} keys equal to the fold after the replay; {before_rebuild:?} before the rebuild, \
         {:?} in all",
        log.len(),
        held_events,
        held_summary.join(", "),
        rebuilt_says.trim(),
        fold.len(),
        started.elapsed(),
    );
    drop(daemon);
    let _ = registry.stop().await; // cleanup only
}

// ---------------------------------------------------------------------------
// Keys that fail while the rebuild runs

/// A key of its own failing while the rebuild runs: registered (applied),
/// an unreadable email change (parks it), a login (parked behind it).
fn late_key(n: usize) -> (String, Vec<Event>) {
    let user = format!("late{n}");
    let registered = json!({"schema": "registered", "key": user,
        "value": {"user_id": user, "name": format!("Late {n}"), "email": format!("{user}@example.com")}});
    let events = vec![Event::plain(registered), Event::old_email(&user, "late"), Event::plain(login(&user, 5))];
    (user, events)
}

/// The dead letters' (key, original offset) pairs.
async fn letters(topic: &str) -> Vec<(String, String)> {
    let size = support::topic_size(topic).await as usize;
    let records = support::consume(topic, size, Duration::from_secs(60)).await;
    assert_eq!(records.len(), size, "{topic} reads back");
    records
        .iter()
        .map(|r| {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let offset = r
                .headers
                .iter()
                .find(|(k, _)| k == "kawka.error.offset")
                .and_then(|(_, v)| v.as_deref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            (key, offset)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_parked_while_the_rebuild_runs_are_held_back_in_the_new_version_too() {
    const FIRST: usize = 1000;
    const CHUNK: usize = 20;
    const MAX_CHUNKS: usize = 25;
    let started = Instant::now();
    let registry = support::start_registry().await;
    let topic = support::unique("rblate");
    let name = support::unique("rblate");
    support::create_topic(&topic, 3).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    allow_any_schema(&registry.url(), &topic).await;
    let spec = spec(&registry.url(), &topic);
    let produced = |events: &[Event]| events.iter().map(|e| e.produced.clone()).collect::<Vec<_>>();

    // A log in which one key (PARTIAL) is parked behind an unreadable email change.
    let mut log: Vec<Event> = support::stats::log(FIRST, USERS).into_iter().map(Event::plain).collect();
    let b = first_of(&log, PARTIAL, FIRST / 2);
    log[b] = Event::old_email(PARTIAL, "b");
    support::produce_with_python(&spec, produced(&log)).await;
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic))]);
    catalogue_without_the_old_versions(&project);
    let pool = support::postgres().await;
    let daemon = project.start(0);
    wait_consumed(&pool, &name, log.len(), &daemon).await;
    let mut held: Vec<(String, usize)> = vec![(PARTIAL.to_string(), b)];
    let holding = |log: &[Event], held: &[(String, usize)]| {
        let held: Vec<(&str, usize)> = held.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        fold_holding(log, &held)
    };
    assert_model(&support::stats::rows(&pool, &name).await, &holding(&log, &held), "before the rebuild");
    assert_parked(&pool, &name, &[PARTIAL], "before the rebuild").await;

    // The rebuild, while a producer writes chunks of events, each with a
    // new key that fails, until the rebuild has ended (and one more).
    let rebuild_log = std::fs::File::create(project.root().join("rebuild.log")).expect("rebuild log");
    let mut rebuild = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["rebuild", &name])
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(rebuild_log)
        .spawn()
        .expect("kawka rebuild");
    let mut chunks = 0;
    let mut during = 0;
    loop {
        let ended = rebuild.try_wait().expect("rebuild status").is_some();
        let mut chunk: Vec<Event> = support::stats::log(CHUNK, USERS).into_iter().map(Event::plain).collect();
        let (user, events) = late_key(chunks);
        for (n, event) in events.into_iter().enumerate() {
            chunk.insert(CHUNK * (n + 1) / 4, event);
        }
        let failing = log.len() + CHUNK / 2;
        assert_eq!(chunk[CHUNK / 2].produced["schema"], "email_old", "the failing event's index");
        support::produce_with_python(&spec, produced(&chunk)).await;
        log.extend(chunk);
        held.push((user, failing));
        chunks += 1;
        if !ended {
            during += 1;
        }
        if ended || chunks == MAX_CHUNKS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = tokio::task::spawn_blocking(move || rebuild.wait_with_output()).await.expect("thread").expect("wait");
    let rebuilt_says = String::from_utf8_lossy(&output.stdout).into_owned();
    let rebuild_stderr = std::fs::read_to_string(project.root().join("rebuild.log")).unwrap_or_default();
    assert!(output.status.success(), "the rebuild failed:\n{rebuilt_says}\n{}", tail(&rebuild_stderr, 30));
    assert!(rebuilt_says.contains(&format!("previous version is kept as {name}_v1")), "{rebuilt_says}");
    wait_consumed(&pool, &name, log.len(), &daemon).await;

    // Every key that failed is parked (its failure dead-lettered by the
    // live connector), and the new version holds each back from its failure.
    let dead_letters = letters(&format!("{name}.dlq")).await;
    let mut lost = Vec::new();
    for (user, _) in &held {
        if !dead_letters.iter().any(|(key, _)| key == user) {
            lost.push(user.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} key(s) failed with no dead letter and were never parked: {lost:?} (of {} failing keys, {during} of \
         {chunks} chunks produced while the rebuild ran); rebuild: {}",
        lost.len(),
        held.len(),
        rebuilt_says.trim()
    );
    let keys: Vec<&str> = held.iter().map(|(k, _)| k.as_str()).collect();
    assert_parked(&pool, &name, &keys, "after the rebuild").await;
    let want = holding(&log, &held);
    let whole = support::stats::fold(&references(&log));
    for (user, _) in &held {
        assert_ne!(want.get(user), whole.get(user), "the test needs {user}'s held events to change it");
    }
    // Checked after the replay too, so that a wrong row here shows what the replay makes of it.
    let mut late_failures = Vec::new();
    let wrong = support::differences(&support::stats::rows(&pool, &name).await, &want, None);
    if !wrong.is_empty() {
        late_failures.push(format!(
            "after the rebuild ({during} of {chunks} chunks produced while it ran), {} key(s) differ from the live \
             connector's holding (others: the fold; parked keys: before their failure):\n{}\nrebuild: {}",
            wrong.len(),
            wrong.join("\n"),
            rebuilt_says.trim()
        ));
    }

    // Fixed and replayed: every key is the fold of the whole log.
    let started_at = status(&daemon, &name).await["started_at_ms"].as_i64().unwrap_or(0);
    catalogue_with_the_old_version(&project, "EmailChanged", old_email_schema(), "email", "mail: email");
    wait_restarted(&daemon, &name, started_at, 3).await;
    let out = project.kawka(&["dlq", "replay", &name, "--idle", "4s"]);
    for (user, from) in &held {
        let said = format!("parked key {user}: replayed {} event(s), released", count_of(&log, user, *from, log.len()));
        if line_of(&out, user) != said {
            late_failures.push(format!("the replay of {user} says {:?}, not {said:?}", line_of(&out, user)));
        }
    }
    let fold = support::stats::fold(&references(&log));
    let wrong = support::differences(&support::stats::rows(&pool, &name).await, &fold, None);
    if !wrong.is_empty() {
        late_failures.push(format!(
            "after the replay into the new version, {} key(s) differ from the fold:\n{}",
            wrong.len(),
            wrong.join("\n")
        ));
    }
    let said: Vec<String> = daemon
        .log()
        .lines()
        .filter(|l| ["parked", "Fenced"].iter().any(|w| l.contains(w)))
        .map(str::to_string)
        .collect();
    assert!(
        late_failures.is_empty(),
        "{}\nrebuild log:\n{}\ndaemon:\n{}",
        late_failures.join("\n\n"),
        tail(&rebuild_stderr, 20),
        said.join("\n")
    );
    assert_parked(&pool, &name, &[], "after the replay").await;
    eprintln!(
        "{} events, {} failing keys ({during} of {chunks} chunks produced while the rebuild ran); {}; {:?} in all",
        log.len(),
        held.len(),
        rebuilt_says.trim(),
        started.elapsed()
    );
    drop(daemon);
    let _ = registry.stop().await; // cleanup only
}

// ---------------------------------------------------------------------------
// A failure the live connector has not read yet at the cut-over

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_past_the_live_position_at_the_cut_over_is_still_parked() {
    const FIRST: usize = 300;
    let registry = support::start_registry().await;
    let topic = support::unique("rbahead");
    let name = support::unique("rbahead");
    support::create_topic(&topic, 2).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    allow_any_schema(&registry.url(), &topic).await;
    let spec = spec(&registry.url(), &topic);
    let produced = |events: &[Event]| events.iter().map(|e| e.produced.clone()).collect::<Vec<_>>();
    let mut log: Vec<Event> = support::stats::log(FIRST, USERS).into_iter().map(Event::plain).collect();
    support::produce_with_python(&spec, produced(&log)).await;
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic))]);
    catalogue_without_the_old_versions(&project);
    let pool = support::postgres().await;
    let daemon = project.start(0);
    wait_consumed(&pool, &name, log.len(), &daemon).await;

    // The live connector is paused (an operator's pause, or simply behind)
    // while a key fails; the rebuild reads past it.
    let address = support::http_address(&daemon.log()).expect("http address");
    let client = reqwest::Client::new();
    let paused = client.post(format!("http://{address}/connectors/{name}/pause")).send().await.expect("pause");
    assert!(paused.status().is_success(), "pause: {}", paused.status());
    let (user, late) = late_key(0);
    let failing = log.len() + 1;
    support::produce_with_python(&spec, produced(&late)).await;
    log.extend(late);
    let rebuilt_says = project.kawka(&["rebuild", &name]);
    // An idle live connector notices the cut-over's fencing within 3 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let resumed = client.post(format!("http://{address}/connectors/{name}/resume")).send().await.expect("resume");
    assert!(resumed.status().is_success(), "resume: {}", resumed.status());
    wait_consumed(&pool, &name, log.len(), &daemon).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Checked at the end, so that each step's outcome shows.
    let mut late_failures = Vec::new();
    let dead_letters = letters(&format!("{name}.dlq")).await;
    let parked = parked_keys(&pool, &name).await;
    if !dead_letters.iter().any(|(key, _)| *key == user) || parked != [user.clone()] {
        late_failures.push(format!(
            "{user}'s email change fails: it must be dead-lettered and {user} parked: dead letters \
             {dead_letters:?}, parked {parked:?}"
        ));
    }
    let want = fold_holding(&log, &[(&user, failing)]);
    let wrong = support::differences(&support::stats::rows(&pool, &name).await, &want, None);
    if !wrong.is_empty() {
        late_failures.push(format!("after the cut-over, {user} is held back from its failure:\n{}", wrong.join("\n")));
    }

    let started_at = status(&daemon, &name).await["started_at_ms"].as_i64().unwrap_or(0);
    catalogue_with_the_old_version(&project, "EmailChanged", old_email_schema(), "email", "mail: email");
    wait_restarted(&daemon, &name, started_at, 2).await;
    let out = project.kawka(&["dlq", "replay", &name, "--idle", "4s"]);
    let fold = support::stats::fold(&references(&log));
    let wrong = support::differences(&support::stats::rows(&pool, &name).await, &fold, None);
    if !wrong.is_empty() {
        late_failures
            .push(format!("after the replay, keys differ from the fold:\n{}\nreplay:\n{out}", wrong.join("\n")));
    }
    let said: Vec<String> = daemon
        .log()
        .lines()
        .filter(|l| ["paused", "resumed", "parked", "Fenced"].iter().any(|w| l.contains(w)))
        .map(str::to_string)
        .collect();
    assert!(
        late_failures.is_empty(),
        "{}\nrebuild: {}\ndaemon:\n{}",
        late_failures.join("\n"),
        rebuilt_says.trim(),
        said.join("\n")
    );
    assert_parked(&pool, &name, &[], "after the replay").await;
    drop(daemon);
    let _ = registry.stop().await; // cleanup only
}
