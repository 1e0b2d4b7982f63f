//! Old event versions reach projections as current ones: catalogue
//! matching by fingerprint, declarative upcasters, resolution of writer
//! schemas outside the catalogue, and the offline and online checks.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use support::Project;

fn kawka(dir: &std::path::Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(args)
        .current_dir(dir)
        .env_remove("KAWKA_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kawka runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), stdin.as_bytes()).expect("write stdin");
    let output = child.wait_with_output().expect("kawka ends");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn profiles(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: search, index: {name} }}
key: $key
version: seq
dead_letter_topic: {name}.dlq
batch: {{ max_wait: 100ms }}
events:
  com.example.users.UserRegistered:   {{ upsert: {{ name: name, email: lower(email), country: country }} }}
  com.example.users.UserEmailChanged: {{ merge: {{ email: lower(new_email) }} }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_events_in_one_topic_reach_the_read_model_uniformly() {
    let registry = support::start_registry().await;
    let topic = support::unique("users");
    let name = support::unique("uniform");
    support::create_topic(&topic, 1).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let v2 = support::catalogue_schema("com.example.users.UserRegistered", 2);
    // A writer schema in no catalogue version that v2 can read (an extra
    // field, no country: the default applies).
    let mut extra = v2.clone();
    extra["fields"] = json!([{"name": "user_id", "type": "string"}, {"name": "seq", "type": "long"},
        {"name": "name", "type": "string"}, {"name": "email", "type": "string"}, {"name": "referrer", "type": "string"}]);
    // One that v2 cannot read: no name, no email, no defaults.
    let mut unreadable = v2.clone();
    unreadable["fields"] = json!([{"name": "user_id", "type": "string"}, {"name": "seq", "type": "long"}]);
    // Every writer schema goes under the topic's subject, with compatibility
    // checks off: an event log keeps versions no reader could be given.
    for (schema, records) in [
        (
            support::catalogue_schema("com.example.users.UserRegistered", 1),
            vec![
                json!({"schema": "s", "key": "u1", "value": {"user_id": "u1", "seq": 1, "fullName": "Old Timer", "email": "OLD@x.org"}}),
            ],
        ),
        (
            v2.clone(),
            vec![
                json!({"schema": "s", "key": "u2", "value": {"user_id": "u2", "seq": 1, "name": "New Comer", "email": "new@x.org", "country": "PL"}}),
            ],
        ),
        (
            extra,
            vec![
                json!({"schema": "s", "key": "u3", "value": {"user_id": "u3", "seq": 1, "name": "Resolved", "email": "r@x.org", "referrer": "ad"}}),
            ],
        ),
        (unreadable, vec![json!({"schema": "s", "key": "u4", "value": {"user_id": "u4", "seq": 1}})]),
    ] {
        let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
            "subject_strategy": "topic", "schemas": {"s": schema}});
        let _ = reqwest::Client::new()
            .put(format!("{}/config/{topic}-value", registry.url()))
            .json(&json!({"compatibility": "NONE"}))
            .send()
            .await
            .expect("set compatibility");
        support::produce_with_python(&spec, records).await;
    }
    let project = Project::new(&registry.url(), &[(&name, &profiles(&name, &topic))]);
    support::run_until_committed(&project, &format!("kawka.{name}"), std::slice::from_ref(&topic), 4).await;
    let doc = |id: &'static str| support::es_document(&name, id);
    assert_eq!(
        doc("u1").await,
        Some(json!({"name": "Old Timer", "email": "old@x.org", "country": "unknown"})),
        "v1 upcast"
    );
    assert_eq!(doc("u2").await, Some(json!({"name": "New Comer", "email": "new@x.org", "country": "PL"})), "v2 as is");
    assert_eq!(
        doc("u3").await,
        Some(json!({"name": "Resolved", "email": "r@x.org", "country": "unknown"})),
        "resolved"
    );
    assert_eq!(doc("u4").await, None, "unreadable: dead-lettered");
    let dead = support::consume(&format!("{name}.dlq"), 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let header = |key: &str| {
        dead[0]
            .headers
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.clone())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    assert_eq!(header("kawka.error.stage").as_deref(), Some("upcast"));
    assert_eq!(dead[0].key.as_deref(), Some(b"u4".as_slice()));
    assert!(
        header("kawka.error.message").is_some_and(|m| m.contains("cannot read")),
        "{:?}",
        header("kawka.error.message")
    );

    // The registry side: `kawka schemas check` finds the unreadable one.
    let (code, stdout, stderr) = kawka(project.root(), &["schemas", "check", "--config", "config/kawka.yaml"], "");
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 3, "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("BAD")).count(), 1, "{stdout}");
    assert!(stdout.contains(": v1") && stdout.contains(": v2") && stdout.contains("read as v2"), "{stdout}");
    let _ = registry.stop().await; // cleanup only
}

#[test]
fn kawka_upcast_prints_the_newest_version() {
    let (code, stdout, stderr) = kawka(
        &support::project_root(),
        &["upcast", "com.example.users.UserRegistered", "--from", "1"],
        r#"{"user_id": "u1", "seq": 3, "fullName": "Ada", "email": "ada@x"}"#,
    );
    assert_eq!(code, 0, "{stderr}");
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(out["type"], "com.example.users.UserRegistered");
    assert_eq!(out["version"], 2);
    assert_eq!(out["event"], json!({"user_id": "u1", "seq": 3, "name": "Ada", "email": "ada@x", "country": "unknown"}));
    let (code, _, stderr) =
        kawka(&support::project_root(), &["upcast", "com.example.users.UserRegistered", "--from", "7"], "{}");
    assert_eq!(code, 2);
    assert!(stderr.contains("no v7"), "{stderr}");
}

#[test]
fn validate_proves_upcasters_fit_and_every_version_has_a_path() {
    let project = tempfile::tempdir().expect("temp dir");
    for sub in ["config", "connectors", "schemas"] {
        support::copy_dir(&support::project_root().join(sub), &project.path().join(sub));
    }
    let upcasters = project.path().join("schemas/upcasters.yaml");
    let shipped = std::fs::read_to_string(&upcasters).expect("read");
    let line = shipped.lines().position(|l| l.starts_with("- event:")).expect("an upcaster") + 1;

    std::fs::write(&upcasters, shipped.replace("fullName: name", "full_name: name")).expect("write");
    let (code, _, stderr) = kawka(project.path(), &["validate"], "");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("schemas/upcasters.yaml:{line}:")), "{stderr}");
    assert!(stderr.contains("rename: no field `full_name`"), "{stderr}");

    std::fs::write(&upcasters, shipped.replace("country: \"unknown\"", "country: 7")).expect("write");
    let (code, _, stderr) = kawka(project.path(), &["validate"], "");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("the default 7 of `country` does not fit"), "{stderr}");

    std::fs::write(&upcasters, "[]\n").expect("write");
    let (code, _, stderr) = kawka(project.path(), &["validate"], "");
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("com.example.users.UserRegistered/v1.avsc:1:1: upcast path: com.example.users.UserRegistered v1 has no upcast path"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_v2_and_v3_events_project_like_events_written_at_v3() {
    let registry = support::start_registry().await;
    let topic = support::unique("users3");
    let name = support::unique("three");
    support::create_topic(&topic, 1).await;
    let v2 = support::catalogue_schema("com.example.users.UserRegistered", 2);
    let mut v3 = v2.clone();
    v3["fields"].as_array_mut().expect("fields").push(json!({"name": "locale", "type": "string", "default": "en"}));
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: search, index: {name} }}
key: $key
batch: {{ max_wait: 100ms }}
events:
  com.example.users.UserRegistered: {{ upsert: {{ name: name, email: email, country: country, locale: locale, seq: seq }} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    // This project's catalogue has a v3, and an upcaster from v2.
    std::fs::write(project.root().join("schemas/com.example.users.UserRegistered/v3.avsc"), v3.to_string())
        .expect("v3");
    let upcasters = project.root().join("schemas/upcasters.yaml");
    let mut text = std::fs::read_to_string(&upcasters).expect("upcasters");
    text.push_str("- event: com.example.users.UserRegistered\n  from: 2\n  steps:\n    - add: { locale: en }\n");
    std::fs::write(&upcasters, text).expect("write upcasters");

    let _ = reqwest::Client::new()
        .put(format!("{}/config/{topic}-value", registry.url()))
        .json(&json!({"compatibility": "NONE"}))
        .send()
        .await
        .expect("set compatibility");
    let v1 = support::catalogue_schema("com.example.users.UserRegistered", 1);
    for (schema, records) in [
        (
            v1,
            vec![
                json!({"schema": "s", "key": "a", "value": {"user_id": "a", "seq": 1, "fullName": "Ann", "email": "a@x"}}),
            ],
        ),
        (
            v2,
            vec![
                json!({"schema": "s", "key": "b", "value": {"user_id": "b", "seq": 1, "name": "Bob", "email": "b@x", "country": "unknown"}}),
            ],
        ),
        (
            v3.clone(),
            vec![
                json!({"schema": "s", "key": "c", "value": {"user_id": "c", "seq": 1, "name": "Cy", "email": "c@x", "country": "unknown", "locale": "en"}}),
                // The same users, written at v3: what the others must become.
                json!({"schema": "s", "key": "ref-a", "value": {"user_id": "a", "seq": 1, "name": "Ann", "email": "a@x", "country": "unknown", "locale": "en"}}),
                json!({"schema": "s", "key": "ref-b", "value": {"user_id": "b", "seq": 1, "name": "Bob", "email": "b@x", "country": "unknown", "locale": "en"}}),
                json!({"schema": "s", "key": "ref-c", "value": {"user_id": "c", "seq": 1, "name": "Cy", "email": "c@x", "country": "unknown", "locale": "en"}}),
            ],
        ),
    ] {
        let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
            "subject_strategy": "topic", "schemas": {"s": schema}});
        support::produce_with_python(&spec, records).await;
    }
    let versions: Vec<i32> = reqwest::get(format!("{}/subjects/{topic}-value/versions", registry.url()))
        .await
        .expect("versions")
        .json()
        .await
        .expect("json");
    assert_eq!(versions, vec![1, 2, 3], "each version is registered");
    support::run_until_committed(&project, &format!("kawka.{name}"), std::slice::from_ref(&topic), 6).await;
    let doc = |id: String| {
        let name = name.clone();
        async move { support::es_document(&name, &id).await.unwrap_or_else(|| panic!("{id} is missing")) }
    };
    for id in ["a", "b", "c"] {
        let (upcast, reference) = (doc(id.to_string()).await, doc(format!("ref-{id}")).await);
        assert_eq!(upcast, reference, "{id} reaches the projection as v3");
        assert_eq!(upcast["locale"], "en");
    }
    let _ = registry.stop().await; // cleanup only
}
