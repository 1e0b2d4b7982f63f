//! `on_error: park` when the sink refuses events, under any batching:
//! Postgres refuses rows whose email is "poison" (a CHECK constraint), in
//! a random log cut into small batches written in the background, several
//! at once per partition; some events also fail before batching (an event
//! type without a rule), so a key may be parked behind a later event
//! before an earlier one of it is refused. Whatever the batching, each key must end in one
//! of two states: never refused, and then its row is the fold of all its
//! events; or parked behind its first failed event, and then its row is
//! the fold of its events before that one and the dead-letter topic holds
//! exactly its events from that one on (none missing, none of another
//! key). Once the constraint is dropped and the rule added, `kawka dlq
//! replay` makes every row the fold of the whole log. (A poison email that a later email of
//! the same key overwrites within one batch never reaches the table:
//! which keys get parked depends on the batching, what they hold does not.)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};

use support::Project;

/// The rule the fix adds: a `Banned` event counts like a login.
const BANNED_RULE: &str = "  test.stats.Banned:       { increment: { logins: count } }\n";

fn connector(name: &str, topic: &str, max_events: usize) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, create: false, columns: {{ id: text, name: text, email: text, logins: bigint }}, primary_key: [id] }}
key: {{ id: $key }}
on_error: park
unknown_events: error
dead_letter_topic: {name}.dlq
batch: {{ max_events: {max_events}, max_wait: 20ms }}
events:
  test.stats.Registered:   {{ upsert: {{ name: name, email: email, logins: 0 }} }}
  test.stats.EmailChanged: {{ merge: {{ email: email }} }}
  test.stats.LoggedIn:     {{ increment: {{ logins: count }} }}
"#
    )
}

/// A topic of 3 partitions, its dead-letter topic of `dlq_partitions` and
/// a table of the stats events that refuses "poison" emails (a CHECK
/// constraint): (topic, table and connector name).
async fn refusing_table(pool: &sqlx::PgPool, prefix: &str, dlq_partitions: i32) -> (String, String) {
    let (topic, name) = (support::unique(prefix), support::unique(prefix));
    support::create_topic(&topic, 3).await;
    support::create_topic(&format!("{name}.dlq"), dlq_partitions).await;
    sqlx::query(&format!(
        "CREATE TABLE \"{name}\" (id text PRIMARY KEY, name text, email text, logins bigint, \
         CONSTRAINT no_poison CHECK (email NOT LIKE '%poison%'))"
    ))
    .execute(pool)
    .await
    .expect("create the table");
    (topic, name)
}

/// The lines of a kawka log that name `key` (and not a longer key it
/// begins: `user2` is not `user28`).
fn lines_about(log: &str, key: &str) -> String {
    let names = |line: &&str| {
        line.match_indices(key).any(|(at, _)| !line[at + key.len()..].starts_with(|c: char| c.is_ascii_alphanumeric()))
    };
    log.lines().filter(names).collect::<Vec<_>>().join("\n")
}

fn header<'c>(letter: &'c support::Consumed, name: &str) -> Option<&'c str> {
    letter.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
}

fn dlq_replay(project: &Project, name: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["dlq", "replay", name, "--idle", "10s"])
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka dlq replay runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_park_their_keys_in_read_order_under_any_batching() {
    let registry = support::start_registry().await;
    let pool = support::postgres().await;
    // The log and the batching are drawn from a seed, printed: a failure
    // is tried again with KAWKA_TEST_SEED=<seed> (its timing may differ).
    let first_seed: u64 =
        std::env::var("KAWKA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    for round in 0..2 {
        let seed = first_seed.wrapping_add(round);
        eprintln!("round {round}: seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let (topic, name) = refusing_table(&pool, "parkrefused", 2).await;

        // A random log; some email changes are poison, some logins are
        // `Banned` events, which have no rule yet (the fold counts them as
        // logins: the rule the fix adds).
        let mut log = support::stats::log_from(&mut rng, 2_500, 40);
        let (mut poisoned, mut banned) = (0, 0);
        for (n, record) in log.iter_mut().enumerate() {
            let user = record["key"].as_str().expect("key").to_string();
            if record["schema"] == "email" && rng.random_range(0..100) < 6 {
                record["value"]["email"] = json!(format!("{user}.poison{n}@example.com"));
                poisoned += 1;
            } else if record["schema"] == "login" && rng.random_range(0..100) < 2 {
                record["schema"] = json!("banned");
                banned += 1;
            }
        }
        let mut schemas = support::stats::schemas();
        schemas["banned"] = support::record_schema(
            "test.stats",
            "Banned",
            json!([{"name": "user_id", "type": "string"}, {"name": "count", "type": "int"}]),
        );
        let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
            "subject_strategy": "topic_record", "schemas": schemas});
        support::produce_with_python(&spec, log.clone()).await;
        let total = log.len() as i64;

        let max_events = rng.random_range(2..40);
        let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, max_events))]);
        let mut kawka = project.start(0);
        support::eventually(Duration::from_secs(120), "every event to be durable", || async {
            (support::stored_positions(&pool, &name).await == total).then_some(())
        })
        .await;

        // Each key's events, in offset order (one partition per key, in
        // the order they were produced: the log's).
        let records = support::consume(&topic, log.len(), Duration::from_secs(60)).await;
        assert_eq!(records.len(), log.len());
        let mut offsets: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for record in &records {
            let key = String::from_utf8(record.key.clone().expect("a key")).expect("utf-8 key");
            offsets.entry(key).or_default().push(record.offset);
        }
        offsets.values_mut().for_each(|o| o.sort_unstable());
        let mut events: BTreeMap<String, Vec<Json>> = BTreeMap::new();
        for record in &log {
            events.entry(record["key"].as_str().expect("key").to_string()).or_default().push(record.clone());
        }

        let letters = support::consume(&format!("{name}.dlq"), 100_000, Duration::from_secs(5)).await;
        let mut parked: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for letter in &letters {
            let key = String::from_utf8(letter.key.clone().expect("a letter keeps its key")).expect("utf-8 key");
            assert!(header(letter, "kawka.parked.behind").is_some(), "{key}: a letter of a parked key says so");
            let offset: i64 = header(letter, "kawka.error.offset").and_then(|o| o.parse().ok()).expect("its offset");
            parked.entry(key).or_default().insert(offset);
        }
        let table = support::stats::rows(&pool, &name).await;
        let mut report = Vec::new();
        for (key, mine) in &events {
            let row = table.get(key);
            match parked.get(key) {
                None => {
                    let want = support::stats::fold(mine).remove(key);
                    assert_eq!(row, want.as_ref(), "{key}: never refused, its row is the fold of all its events");
                }
                Some(letter_offsets) => {
                    let first = *letter_offsets.first().expect("one letter at least");
                    let all = &offsets[key];
                    let at = all.iter().position(|&o| o == first).expect("a letter is of one of the key's events");
                    let suffix: BTreeSet<i64> = all[at..].iter().copied().collect();
                    assert_eq!(
                        letter_offsets, &suffix,
                        "{key}: the dead letters are exactly its events from the first refused one on"
                    );
                    let behind = letters
                        .iter()
                        .find(|l| {
                            l.key.as_deref() == Some(key.as_bytes())
                                && header(l, "kawka.error.offset") == Some(first.to_string().as_str())
                        })
                        .expect("the first letter");
                    let poison = mine[at]["value"]["email"].as_str().is_some_and(|e| e.contains("poison"));
                    let stage = header(behind, "kawka.error.stage");
                    match mine[at]["schema"].as_str() {
                        Some("banned") => assert_eq!(stage, Some("projection"), "{key}: behind its unruled event"),
                        _ => assert!(poison && stage == Some("sink"), "{key}: behind a refused row ({stage:?})"),
                    }
                    let want = support::stats::fold(&mine[..at]).remove(key);
                    assert_eq!(
                        row,
                        want.as_ref(),
                        "{key}: its row is the fold of its events before the failed one (seed {seed}, event {at} of {}; \
                         the log of the run about it:\n{})",
                        all.len(),
                        lines_about(&kawka.log(), key)
                    );
                    if mine[..at].iter().any(|e| e["schema"] == "banned") {
                        panic!("{key}: an unruled event before the one it is parked behind was applied");
                    }
                    report.push(format!("{key}: {} of {} events parked", suffix.len(), all.len()));
                }
            }
        }
        let stored: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT key FROM kawka_parked WHERE connector = $1")
            .bind(&name)
            .fetch_all(&pool)
            .await
            .expect("read kawka_parked");
        let stored: BTreeSet<String> =
            stored.into_iter().map(|(k,)| String::from_utf8(k.clone()).expect("utf-8")).collect();
        assert_eq!(stored, parked.keys().cloned().collect(), "kawka_parked holds the parked keys");
        eprintln!(
            "round {round}: {} events, {poisoned} poison, {banned} unruled, batches of {max_events}: {} key(s) parked, \
             {} letters\n{}",
            log.len(),
            parked.len(),
            letters.len(),
            report.join("\n")
        );

        // The fix: the constraint goes, the rule comes; the replay gives
        // the fold of all.
        sqlx::query(&format!("ALTER TABLE \"{name}\" DROP CONSTRAINT no_poison")).execute(&pool).await.expect("drop");
        let file = project.root().join(format!("connectors/{name}.yaml"));
        let fixed = connector(&name, &topic, max_events) + BANNED_RULE;
        std::fs::write(&file, fixed).expect("add the rule");
        let replayed = dlq_replay(&project, &name);
        assert!(!replayed.contains("stays parked"), "{replayed}");
        let want = support::stats::fold(&log);
        let table = support::stats::rows(&pool, &name).await;
        let wrong: Vec<String> = want
            .keys()
            .chain(table.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| table.get(*k) != want.get(*k))
            .map(|k| format!("{k}: row {:?}, fold {:?}", table.get(k), want.get(k)))
            .collect();
        assert!(wrong.is_empty(), "after the replay, rows differ from the fold:\n{}\n{replayed}", wrong.join("\n"));
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM kawka_parked WHERE connector = $1")
            .bind(&name)
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(left, 0, "every key released: {replayed}");
        kawka.terminate().await;
    }
}

/// A batch of several partitions is written a transaction per partition:
/// when one partition's share is refused, the others commit. The write
/// made again must not then find, among the committed shares' events, a
/// value that a later event of its key replaced in the share (refused
/// alone, it never reached the table): its key would be parked, and its
/// applied events dead-lettered, to be applied a second time by a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_share_of_a_refused_batch_parks_nothing() {
    let registry = support::start_registry().await;
    let pool = support::postgres().await;
    let (topic, name) = refusing_table(&pool, "parkshares", 1).await;
    // Every user's poison email is replaced by a good one in the same
    // batch, but one user's, which stays: its partition's share is refused.
    let users: Vec<String> = (0..12).map(|n| format!("user{n}")).collect();
    let mut log = Vec::new();
    for (n, user) in users.iter().enumerate() {
        let email = |what: &str| json!({"user_id": user, "email": format!("{user}.{what}@example.com")});
        log.push(json!({"schema": "registered", "key": user,
            "value": {"user_id": user, "name": format!("Name {n}"), "email": format!("{user}@example.com")}}));
        log.push(json!({"schema": "email", "key": user, "value": email("poison")}));
        if n > 0 {
            log.push(json!({"schema": "email", "key": user, "value": email("good")}));
        }
        log.push(json!({"schema": "login", "key": user, "value": {"user_id": user, "count": 2}}));
    }
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::stats::schemas()});
    support::produce_with_python(&spec, log.clone()).await;
    let records = support::consume(&topic, log.len(), Duration::from_secs(60)).await;
    let partition_of: BTreeMap<String, i32> = records
        .iter()
        .map(|r| (String::from_utf8(r.key.clone().expect("a key")).expect("utf-8"), r.partition))
        .collect();
    let refused = partition_of["user0"];
    assert!(partition_of.values().any(|&p| p != refused), "the users are spread over the partitions: {partition_of:?}");

    // One batch of everything: the records are in the topic before the start.
    let connector = connector(&name, &topic, 1000).replace("max_wait: 20ms", "max_wait: 3s");
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let mut kawka = project.start(0);
    support::eventually(Duration::from_secs(120), "every event to be durable", || async {
        (support::stored_positions(&pool, &name).await == log.len() as i64).then_some(())
    })
    .await;
    let run_log = kawka.log();
    let letters = support::consume(&format!("{name}.dlq"), 1000, Duration::from_secs(5)).await;
    let parked: BTreeSet<String> =
        letters.iter().map(|l| String::from_utf8(l.key.clone().expect("a key")).expect("utf-8")).collect();
    let table = support::stats::rows(&pool, &name).await;
    for user in &users {
        let mine: Vec<Json> = log.iter().filter(|e| e["key"] == json!(user)).cloned().collect();
        if partition_of[user] != refused {
            assert!(!parked.contains(user), "{user}: its share committed, nothing of it is parked:\n{run_log}");
            let want = support::stats::fold(&mine).remove(user);
            assert_eq!(table.get(user), want.as_ref(), "{user}: its row is the fold of all its events");
        } else if parked.contains(user) {
            // Refused with its partition's share: parked behind its poison
            // (found refused alone) whether or not a later email replaced it.
            let want = support::stats::fold(&mine[..1]).remove(user);
            assert_eq!(table.get(user), want.as_ref(), "{user}: parked behind its poison");
        }
    }
    assert!(parked.contains("user0"), "the poison no email replaced is parked: {parked:?}");
    // Else the test proved nothing: one batch, a share committed.
    assert!(
        run_log.contains("part of a failed batch had committed"),
        "the batch spanned the partitions and one share committed:\n{run_log}"
    );
    kawka.terminate().await;
}

/// A record whose writer schema kawka has not seen waits for the registry;
/// meanwhile the batch before it is written, and the sink refuses an
/// earlier event of the record's key, which parks the key. The record was
/// let through before that (its key was free then): once decoded it must
/// be parked behind the refused event, not applied past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_parked_while_its_next_event_waits_for_the_registry_holds_that_event() {
    let port = support::free_port();
    let registry_schema = support::unique("registry");
    let registry = support::start_registry_on(port, &registry_schema).await;
    let url = registry.url();
    let pool = support::postgres().await;
    let (topic, name) = refusing_table(&pool, "parkwait", 1).await;
    let mut schemas = support::stats::schemas();
    let mut login2 = schemas["login"].clone();
    login2["fields"].as_array_mut().expect("fields").push(json!({"name": "device", "type": "string", "default": ""}));
    schemas["login2"] = login2.clone();
    // Every schema but `login2` used once, so kawka has them cached.
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": url, "topic": topic,
        "subject_strategy": "topic_record", "schemas": schemas});
    let first = vec![
        json!({"schema": "registered", "key": "user0", "value": {"user_id": "user0", "name": "Zero", "email": "user0@example.com"}}),
        json!({"schema": "email", "key": "user0", "value": {"user_id": "user0", "email": "user0.b@example.com"}}),
        json!({"schema": "login", "key": "user0", "value": {"user_id": "user0", "count": 1}}),
    ];
    let ids = support::produce_with_python(&spec, first.clone()).await.ids;
    let subject = format!("{topic}-test.stats.LoggedIn");
    let login2_id = u64::from(support::register(&url, &subject, &login2).await);

    // Long batches: the next events wait in one until the registry fails;
    // the waiting event alone fills a batch (by its size), which is then
    // written as soon as it is decoded.
    let connector = connector(&name, &topic, 1000).replace("max_wait: 20ms", "max_wait: 4s, max_bytes: 2KiB");
    let project = Project::new(&url, &[(&name, &connector)]);
    let mut kawka = project.start(0);
    support::eventually(Duration::from_secs(60), "the first events to be durable", || async {
        (support::stored_positions(&pool, &name).await == first.len() as i64).then_some(())
    })
    .await;
    registry.stop().await.expect("the registry stops");
    // user1: registered, a login, a refused email, then a login of the
    // schema kawka has not seen (its decode waits for the registry), of
    // more than a batch's bytes.
    let framed =
        |schema: &str, id: u64, value: Json| json!({"schema": schema, "key": "user1", "schema_id": id, "value": value});
    let second = vec![
        framed(
            "registered",
            ids["registered"].into(),
            json!({"user_id": "user1", "name": "One", "email": "user1@example.com"}),
        ),
        framed("login", ids["login"].into(), json!({"user_id": "user1", "count": 1})),
        framed("email", ids["email"].into(), json!({"user_id": "user1", "email": "user1.poison@example.com"})),
        framed("login2", login2_id, json!({"user_id": "user1", "count": 5, "device": "phone ".repeat(500)})),
    ];
    let offline = json!({"bootstrap": support::kafka_bootstrap(), "registry": "http://127.0.0.1:9", "topic": topic,
        "schemas": schemas});
    support::produce_with_python(&offline, second.clone()).await;
    let base = format!("http://{}", support::http_address(&kawka.log()).expect("address"));
    support::eventually(Duration::from_secs(30), "the decode to wait for the registry", || async {
        let status: Json = reqwest::get(format!("{base}/connectors/{name}")).await.ok()?.json().await.ok()?;
        (status["state"] == "retrying" && status["last_error"]["stage"] == "decode").then_some(())
    })
    .await;
    // The events before the waiting one are made durable meanwhile: the
    // refused email parks user1.
    let letters = support::consume(&format!("{name}.dlq"), 1, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 1, "the refused email is dead-lettered while the registry is away");
    let registry = support::start_registry_on(port, &registry_schema).await;
    let total = (first.len() + second.len()) as i64;
    support::eventually(Duration::from_secs(60), "every event to be durable", || async {
        (support::stored_positions(&pool, &name).await == total).then_some(())
    })
    .await;
    let run_log = kawka.log();
    let table = support::stats::rows(&pool, &name).await;
    let before_refused: Vec<Json> = second[..2].to_vec();
    assert_eq!(
        table.get("user1"),
        support::stats::fold(&before_refused).get("user1"),
        "user1's row is the fold of its events before the refused one:\n{}",
        lines_about(&run_log, "user1")
    );
    assert_eq!(table.get("user0"), support::stats::fold(&first).get("user0"));
    let letters = support::consume(&format!("{name}.dlq"), 10, Duration::from_secs(5)).await;
    let offsets: Vec<i64> = letters.iter().filter_map(|l| header(l, "kawka.error.offset")?.parse().ok()).collect();
    let records = support::consume(&topic, total as usize, Duration::from_secs(30)).await;
    let mut user1: Vec<i64> =
        records.iter().filter(|r| r.key.as_deref() == Some(b"user1".as_slice())).map(|r| r.offset).collect();
    user1.sort_unstable();
    assert_eq!(offsets, user1[2..], "the refused email and the login behind it are parked, in order:\n{run_log}");
    assert!(letters.iter().all(|l| l.key.as_deref() == Some(b"user1".as_slice())), "only user1's events are parked");
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{run_log}");
    let _ = registry.stop().await; // cleanup only
}
