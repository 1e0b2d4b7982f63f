//! `kawka run` into the Elasticsearch API server of the stack: the profile
//! read model, replays and duplicates that change nothing, and `kill -9`
//! crashes that end in documents equal to a fold of the log.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value as Json};

use support::{eventually, Project};

fn profiles_connector(name: &str, topic: &str, group: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, group: {group}, properties: {{ session.timeout.ms: "6000" }} }}
sink:
  to: search
  index: {name}
  mappings:
    properties:
      name: {{ type: text }}
      email: {{ type: keyword }}
      country: {{ type: keyword }}
      registered_at: {{ type: date, format: epoch_millis }}
key: $key
version: seq
dead_letter_topic: {name}.dlq
tombstones: delete
batch: {{ max_wait: 100ms }}
events:
  com.example.users.UserRegistered:   {{ upsert: {{ name: name, email: lower(email), country: country, registered_at: $timestamp }} }}
  com.example.users.UserEmailChanged: {{ merge: {{ email: lower(new_email) }} }}
  com.example.users.UserDeleted:      {{ delete: {{}} }}
"#
    )
}

fn profile_schemas() -> Json {
    json!({
        "registered": support::catalogue_schema("com.example.users.UserRegistered", 2),
        "email": support::catalogue_schema("com.example.users.UserEmailChanged", 1),
        "deleted": support::catalogue_schema("com.example.users.UserDeleted", 1),
    })
}

fn registered(id: &str, seq: i64, name: &str, email: &str, country: &str) -> Json {
    json!({"schema": "registered", "key": id,
        "value": {"user_id": id, "seq": seq, "name": name, "email": email, "country": country}})
}

fn email_changed(id: &str, seq: i64, email: &str) -> Json {
    json!({"schema": "email", "key": id, "value": {"user_id": id, "seq": seq, "new_email": email}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_searchable_and_replays_and_duplicates_change_nothing() {
    let registry = support::start_registry().await;
    let topic = support::unique("users");
    let name = support::unique("profiles");
    support::create_topic(&topic, 2).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": profile_schemas()});
    let events = vec![
        registered("u1", 1, "Ann", "Ann@Example.com", "PL"),
        email_changed("u1", 2, "ANN.NEW@example.com"),
        registered("u2", 1, "Bob", "bob@example.com", "DE"),
        json!({"schema": "deleted", "key": "u2", "value": {"user_id": "u2", "seq": 2}}),
        registered("u3", 1, "Cy", "cy@example.com", "FR"),
        email_changed("u3", 2, "cy2@example.com"),
        email_changed("u3", 3, "cy3@example.com"),
        registered("u4", 1, "Dee", "dee@example.com", "IT"),
        json!({"key": "u4", "value": null}),
        // a stale event (an older sequence number) changes nothing
        email_changed("u3", 2, "stale@example.com"),
    ];
    let total = events.len() as i64;
    support::produce_with_python(&spec, events).await;

    let live_group = format!("kawka.{name}");
    let live = Project::new(&registry.url(), &[(&name, &profiles_connector(&name, &topic, &live_group))]);
    let mut kawka = live.start(0);
    let topics = vec![topic.clone()];
    eventually(Duration::from_secs(60), "every event to be committed", || async {
        (support::committed_total(&live_group, &topics).await == total).then_some(())
    })
    .await;
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());

    let u1 = support::es_source(&name, "u1").await.expect("u1 exists");
    assert_eq!(
        (u1["name"].as_str(), u1["email"].as_str(), u1["country"].as_str()),
        (Some("Ann"), Some("ann.new@example.com"), Some("PL"))
    );
    assert!(u1["registered_at"].as_i64().is_some_and(|t| t > 1_600_000_000_000), "{u1}");
    let u3 = support::es_source(&name, "u3").await.expect("u3 exists");
    assert_eq!(u3["email"], "cy3@example.com", "the stale change was ignored: {u3}");
    assert_eq!(support::es_source(&name, "u2").await, None, "deleted by an event");
    assert_eq!(support::es_source(&name, "u4").await, None, "deleted by a tombstone");
    assert_eq!(
        support::es_search_ids(&name, json!({"term": {"email": "ann.new@example.com"}})).await,
        vec!["u1".to_string()],
        "a search for the changed email finds the user"
    );
    assert!(support::es_search_ids(&name, json!({"term": {"email": "ann@example.com"}})).await.is_empty());
    let (status, index_info) = {
        let response = reqwest::get(format!("{}/_alias/{name}", support::elasticsearch_url())).await.expect("alias");
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    };
    assert_eq!(status, 200);
    assert!(index_info.contains(&format!("{name}-v1")), "the alias points at a versioned index: {index_info}");

    let ids = ["u1", "u2", "u3", "u4"];
    let mut before = Vec::new();
    for id in ids {
        before.push(support::es_get_raw(&name, id).await);
    }

    // A replay of the whole topic from offset 0, by a new consumer group.
    let replay_group = format!("kawka.{name}.replay");
    let replay = Project::new(&registry.url(), &[(&name, &profiles_connector(&name, &topic, &replay_group))]);
    let mut replaying = replay.start(0);
    eventually(Duration::from_secs(60), "the replay to be committed", || async {
        (support::committed_total(&replay_group, &topics).await == total).then_some(())
    })
    .await;
    for (id, earlier) in ids.iter().zip(&before) {
        assert_eq!(&support::es_get_raw(&name, id).await, earlier, "{id} changed by the replay");
    }

    // Duplicates injected into the topic: new offsets, same events.
    let duplicates = vec![
        registered("u1", 1, "Ann", "Ann@Example.com", "PL"),
        email_changed("u1", 2, "ANN.NEW@example.com"),
        email_changed("u3", 3, "cy3@example.com"),
    ];
    support::produce_with_python(&spec, duplicates).await;
    eventually(Duration::from_secs(60), "the duplicates to be committed", || async {
        (support::committed_total(&replay_group, &topics).await == total + 3).then_some(())
    })
    .await;
    for (id, earlier) in ids.iter().zip(&before) {
        assert_eq!(&support::es_get_raw(&name, id).await, earlier, "{id} changed by a duplicate");
    }
    assert_eq!(replaying.terminate().await, Some(0), "clean exit; log:\n{}", replaying.log());
    let _ = registry.stop().await; // cleanup only
}

fn stats_connector(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "1000" }} }}
sink: {{ to: search, index: {name}, mappings: {{ properties: {{ email: {{ type: keyword }} }} }}, bulk: {{ max_actions: 200 }} }}
key: $key
batch: {{ max_events: 100, max_wait: 100ms }}
events:
  test.stats.Registered:   {{ upsert: {{ name: name, email: email, logins: 0 }} }}
  test.stats.EmailChanged: {{ merge: {{ email: email }} }}
  test.stats.LoggedIn:     {{ increment: {{ logins: count }} }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_run_with_merges_and_increments_ends_in_the_fold_of_the_log() {
    const EVENTS: usize = 50_000;
    const USERS: usize = 1000;
    const KILLS: usize = 10;
    let registry = support::start_registry().await;
    let topic = support::unique("stats");
    let name = support::unique("stats");
    support::create_topic(&topic, 3).await;
    // The log, and its fold computed here: per user, in order.
    let records = support::stats::log(EVENTS, USERS);
    let expected = support::stats::fold(&records);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::stats::schemas()});
    support::produce_with_python(&spec, records).await;

    let project = Project::new(&registry.url(), &[(&name, &stats_connector(&name, &topic))]);
    let group = format!("kawka.{name}");
    let topics = vec![topic.clone()];
    let total = EVENTS as i64;
    let mut progress_at_kills = Vec::new();
    let mut before = 0;
    for round in 0..KILLS {
        let mut kawka = project.start(round);
        let started = eventually(Duration::from_secs(60), "kawka to commit after a restart", || async {
            let now = support::committed_total(&group, &topics).await;
            (now > before).then_some(now)
        })
        .await;
        assert!(started < total, "round {round}: the run finished before the kill; make it longer");
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..300))).await;
        kawka.kill9();
        before = support::committed_total(&group, &topics).await;
        progress_at_kills.push(before);
    }
    assert!(
        progress_at_kills.iter().all(|&p| p > 0 && p < total),
        "every kill must land mid-run: committed at kills {progress_at_kills:?} of {total}"
    );
    let mut last = project.start(KILLS);
    eventually(Duration::from_secs(240), "every event to be committed after the last restart", || async {
        (support::committed_total(&group, &topics).await == total).then_some(())
    })
    .await;
    assert_eq!(last.terminate().await, Some(0), "clean exit; log:\n{}", last.log());

    let actual = support::es_documents(&name, 10_000).await;
    let wrong: Vec<_> = expected.iter().filter(|(id, doc)| actual.get(*id) != Some(doc)).take(5).collect();
    assert!(wrong.is_empty(), "documents differ from the fold of the log (expected side shown): {wrong:?}");
    assert_eq!(actual.len(), expected.len());
    eprintln!("{KILLS} kills, committed at each kill: {progress_at_kills:?}");
    let _ = registry.stop().await; // cleanup only
}

fn versioned_profiles_connector(name: &str, topic: &str, group: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, group: {group}, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "1000" }} }}
sink: {{ to: search, index: {name}, mappings: {{ properties: {{ email: {{ type: keyword }} }} }}, bulk: {{ max_actions: 200 }} }}
key: $key
batch: {{ max_events: 200, max_wait: 100ms }}
{}"#,
        support::profiles::RULES
    )
}

/// Two processes of one connector, killed with SIGKILL and restarted at
/// random moments (each kill and start a rebalance that moves partitions
/// between them, replaying what was written but not committed), over a
/// versioned profile log with merges and increments on shared documents,
/// late duplicates, deletes and re-registrations: every document ends
/// equal to the log folded one event at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_killed_and_rebalanced_end_in_the_fold_of_a_log_with_duplicates_and_deletes() {
    const EVENTS: usize = 30_000;
    const USERS: usize = 500;
    const KILLS: usize = 6;
    let registry = support::start_registry().await;
    let topic = support::unique("profiles");
    let name = support::unique("profiles");
    support::create_topic(&topic, 3).await;
    let records = support::profiles::log(EVENTS, USERS);
    let expected = support::profiles::fold(&records);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::profiles::schemas()});
    support::produce_with_python(&spec, records).await;

    let group = format!("kawka.{name}");
    let project = Project::new(&registry.url(), &[(&name, &versioned_profiles_connector(&name, &topic, &group))]);
    let topics = vec![topic.clone()];
    let total = EVENTS as i64;
    let mut processes = [project.start(0), project.start(1)];
    let mut progress_at_kills = Vec::new();
    let mut before = 0;
    for round in 0..KILLS {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        let now = loop {
            let now = support::committed_total(&group, &topics).await;
            if now > before {
                break now;
            }
            if std::time::Instant::now() > deadline {
                let tail = |log: String| log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
                panic!(
                    "round {round}: no progress past {before} in 90 s; logs (newest first):\n{}\n---\n{}",
                    tail(processes[0].log()),
                    tail(processes[1].log())
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert!(now < total, "round {round}: the run finished before the kill; make it longer");
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..500))).await;
        let victim = rand::rng().random_range(0..2);
        processes[victim].kill9();
        before = support::committed_total(&group, &topics).await;
        progress_at_kills.push(before);
        processes[victim] = project.start(2 + round);
    }
    eventually(Duration::from_secs(300), "every event to be committed", || async {
        (support::committed_total(&group, &topics).await == total).then_some(())
    })
    .await;
    for process in &mut processes {
        assert_eq!(process.terminate().await, Some(0), "clean exit; log:\n{}", process.log());
    }
    let what = format!("{EVENTS} events, {KILLS} kills (committed at each: {progress_at_kills:?})");
    assert_documents_equal_the_fold(&name, &expected, &what).await;
    let _ = registry.stop().await; // cleanup only
}

/// Every document of `index` equals the fold, none missing and none extra;
/// says how many of each there were.
async fn assert_documents_equal_the_fold(index: &str, expected: &BTreeMap<String, Json>, what: &str) {
    let actual = support::es_documents(index, 10_000).await;
    let wrong: Vec<_> = expected.iter().filter(|(id, doc)| actual.get(*id) != Some(doc)).collect();
    let extra: Vec<_> = actual.keys().filter(|id| !expected.contains_key(*id)).collect();
    eprintln!("{what}: {} documents, {} wrong or missing, {} extra", expected.len(), wrong.len(), extra.len());
    assert!(
        wrong.is_empty(),
        "{what}: documents differ from the fold (expected side shown): {:?}",
        &wrong[..wrong.len().min(5)]
    );
    assert!(extra.is_empty(), "{what}: documents the fold deleted: {extra:?}");
}

/// A replay of a whole log already applied (a new consumer group from
/// offset 0, deletes and re-registrations included) leaves every document
/// as it was, also while it runs: a reader polling `_count` and every
/// document each 50 ms never sees a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_the_beginning_changes_no_read_while_it_runs() {
    const EVENTS: usize = 20_000;
    let registry = support::start_registry().await;
    let topic = support::unique("profiles");
    let name = support::unique("profiles");
    support::create_topic(&topic, 3).await;
    let records = support::profiles::log(EVENTS, 400);
    let expected = support::profiles::fold(&records);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::profiles::schemas()});
    support::produce_with_python(&spec, records).await;
    let topics = vec![topic.clone()];
    let (live_group, replay_group) = (format!("kawka.{name}"), format!("kawka.{name}.replay"));
    let live = Project::new(&registry.url(), &[(&name, &versioned_profiles_connector(&name, &topic, &live_group))]);
    support::run_until_committed(&live, &live_group, &topics, EVENTS as i64).await;
    let before = support::es_documents(&name, 10_000).await;
    assert_eq!(before, expected, "the first run ends in the fold of the log");

    let replay = Project::new(&registry.url(), &[(&name, &versioned_profiles_connector(&name, &topic, &replay_group))]);
    let mut replaying = replay.start(0);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn({
        let (name, before) = (name.clone(), before.clone());
        async move {
            let mut reads = 0usize;
            while !*stopping.borrow() {
                let count = support::es_count(&name).await;
                assert_eq!(count, before.len(), "_count moved during the replay (read {reads})");
                let now = support::es_documents(&name, 10_000).await;
                let changed: Vec<_> = now.iter().filter(|(id, doc)| before.get(*id) != Some(doc)).take(3).collect();
                assert!(changed.is_empty() && now.len() == before.len(), "read {reads} differs: {changed:?}");
                reads += 2;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            reads
        }
    });
    eventually(Duration::from_secs(120), "the replay to be committed", || async {
        (support::committed_total(&replay_group, &topics).await == EVENTS as i64).then_some(())
    })
    .await;
    let _ = stop.send(true);
    let reads = reader.await.expect("every read equals the state before the replay");
    assert_eq!(replaying.terminate().await, Some(0), "clean exit; log:\n{}", replaying.log());
    assert_eq!(support::es_documents(&name, 10_000).await, before);
    eprintln!(
        "{EVENTS} events replayed over {} documents: {reads} reads during the replay, none differed",
        before.len()
    );
    assert!(reads >= 4, "the reader read during the replay ({reads} reads)");
    let _ = registry.stop().await; // cleanup only
}

/// A connector whose document id is an event field (not the Kafka key),
/// over a topic whose partitions are added to mid-run, so that the users'
/// later events land in other partitions, at lower offsets than their
/// earlier ones: every document equals the fold of the log, with a
/// domain version and without one (whole documents only: offsets alone
/// order them). (tansu has no
/// CreatePartitions: the topic has its 5 partitions from the start, and the
/// producer puts each user's events in partition `user % 2` before the
/// "growth" and `user % 5` after, as a key's hash would move them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_keyed_by_an_event_field_stay_exact_when_partitions_are_added() {
    const EVENTS: usize = 6_000;
    let registry = support::start_registry().await;
    let topic = support::unique("profiles");
    let name = support::unique("profiles");
    support::create_topic(&topic, 5).await;
    let records = support::profiles::log(EVENTS, 300);
    let expected = support::profiles::fold(&records);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::profiles::schemas()});
    let group = format!("kawka.{name}");
    let connector = versioned_profiles_connector(&name, &topic, &group).replace("key: $key", "key: user_id");
    assert!(connector.contains("key: user_id"), "{connector}");
    // The same log into a second index, without a version: registrations
    // and deletes only, the last one of a user wins.
    let (whole, whole_group) = (format!("{name}_whole"), format!("kawka.{name}_whole"));
    let whole_connector = format!(
        "name: {whole}\nsource: {{ topics: [{topic}], start: earliest, group: {whole_group}, \
         properties: {{ session.timeout.ms: \"6000\" }} }}\nsink: {{ to: search, index: {whole} }}\nkey: user_id\n\
         batch: {{ max_events: 200, max_wait: 100ms }}\nevents:\n\
         \x20 test.profiles.Registered: {{ upsert: {{ name: name, email: email }} }}\n\
         \x20 test.profiles.Deleted: {{ delete: {{}} }}\n"
    );
    let mut expected_whole: BTreeMap<String, Json> = BTreeMap::new();
    for record in &records {
        let user = record["key"].as_str().expect("a user").to_string();
        match record["schema"].as_str() {
            Some("registered") => {
                let value = &record["value"];
                expected_whole.insert(user, json!({"name": value["name"], "email": value["email"]}));
            }
            Some("deleted") => {
                expected_whole.remove(&user);
            }
            _ => {}
        }
    }
    let project = Project::new(&registry.url(), &[(&name, &connector), (&whole, &whole_connector)]);
    let topics = vec![topic.clone()];
    let partitioned = |records: &[Json], partitions: u64| -> Vec<Json> {
        let mut records = records.to_vec();
        for record in &mut records {
            let user: u64 =
                record["key"].as_str().and_then(|k| k.trim_start_matches("user").parse().ok()).expect("a user");
            record["partition"] = json!(user % partitions);
        }
        records
    };
    let (first, second) = records.split_at(EVENTS / 2);
    support::produce_with_python(&spec, partitioned(first, 2)).await;
    let mut kawka = project.start(0);
    eventually(Duration::from_secs(90), "the first half to be committed", || async {
        let done = support::committed_total(&group, &topics).await == first.len() as i64
            && support::committed_total(&whole_group, &topics).await == first.len() as i64;
        done.then_some(())
    })
    .await;
    support::produce_with_python(&spec, partitioned(second, 5)).await;
    eventually(Duration::from_secs(120), "every event to be committed", || async {
        let done = support::committed_total(&group, &topics).await == EVENTS as i64
            && support::committed_total(&whole_group, &topics).await == EVENTS as i64;
        done.then_some(())
    })
    .await;
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    assert_documents_equal_the_fold(&name, &expected, &format!("{EVENTS} events, 2 then 5 partitions")).await;
    assert_documents_equal_the_fold(&whole, &expected_whole, "the same without a version").await;
    let _ = registry.stop().await; // cleanup only
}
