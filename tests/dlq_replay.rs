//! `kawka dlq replay`: dead letters go back through the connector once the
//! cause is fixed; a dry run writes nothing; a second replay finds nothing
//! new; events that still fail are dead-lettered again.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use support::{eventually, Project};

fn connector(name: &str, topic: &str, with_shipments: bool) -> String {
    let shipments = if with_shipments {
        "  com.example.retail.ShipmentReceived: { increment: { on_hand: quantity } }\n"
    } else {
        ""
    };
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
dead_letter_topic: {name}.dlq
unknown_events: error
batch: {{ max_wait: 50ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
{shipments}"#
    )
}

fn replay(project: &Project, name: &str, dry_run: bool) -> String {
    let mut args = vec!["dlq", "replay", name, "--idle", "4s"];
    if dry_run {
        args.push("--dry-run");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(&args)
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka dlq replay");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_replayed_once_the_cause_is_fixed() {
    let registry = support::start_registry().await;
    let topic = support::unique("retail");
    let name = support::unique("replay");
    support::create_topic(&topic, 1).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {
            "sold": support::catalogue_schema("com.example.retail.ItemSold", 1),
            "received": support::catalogue_schema("com.example.retail.ShipmentReceived", 1)}});
    let sold = |n: i64| json!({"schema": "sold", "key": "k", "value": {"sale_id": format!("s{n}"), "store_id": "s1", "item_id": "i1", "quantity": n, "sold_at": 0}});
    let received = |n: i64| json!({"schema": "received", "key": "k", "value": {"shipment_id": format!("r{n}"), "store_id": "s1", "item_id": "i1", "quantity": n * 10, "received_at": 0}});
    // Shipments have no rule yet and `unknown_events: error`: dead letters.
    // One record is bad for good (empty value): it stays a dead letter.
    let records =
        vec![sold(1), received(1), sold(2), received(2), json!({"key": "k", "raw_value_hex": ""}), received(3)];
    support::produce_with_python(&spec, records).await;

    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic, false))]);
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    let on_hand = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT on_hand FROM \"{name}\" WHERE store_id = 's1'"))
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
    };
    eventually(Duration::from_secs(60), "the sales to be written", || async {
        (on_hand().await == Some(-3)).then_some(())
    })
    .await;
    let dead = support::consume(&format!("{name}.dlq"), 4, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 4, "three shipments and the empty value");
    assert_eq!(kawka.terminate().await, Some(0));

    // The cause is fixed: the connector now has a rule for shipments.
    std::fs::write(project.root().join(format!("connectors/{name}.yaml")), connector(&name, &topic, true))
        .expect("write");
    let dry = replay(&project, &name, true);
    assert!(dry.contains("4 dead letter(s), 3 would be written, 1 would fail again"), "{dry}");
    assert_eq!(dry.lines().filter(|l| l.contains("would write 1 op(s)")).count(), 3, "{dry}");
    assert_eq!(on_hand().await, Some(-3), "a dry run writes nothing");

    let first = replay(&project, &name, false);
    assert!(first.contains("read 4, written 3, superseded 0"), "{first}");
    assert!(first.contains("failed again 1"), "{first}");
    assert_eq!(on_hand().await, Some(-3 + 10 + 20 + 30), "the shipments are applied");
    let dead = support::consume(&format!("{name}.dlq"), 5, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 5, "the empty value is dead-lettered again");
    let again = &dead[4];
    assert!(again.headers.iter().any(|(k, _)| k == "kawka.replay.run"), "{:?}", again.headers);
    assert_eq!(again.headers.iter().filter(|(k, _)| k == "kawka.error.stage").count(), 1, "fresh error headers only");

    // A second replay applies nothing twice: only the re-dead-lettered one is new.
    let second = replay(&project, &name, false);
    assert!(second.contains("read 1, written 0, superseded 0"), "{second}");
    assert!(second.contains("failed again 1"), "{second}");
    assert_eq!(on_hand().await, Some(57), "nothing applied twice");
    let _ = registry.stop().await; // cleanup only
}

fn profiles(name: &str, topic: &str, with_email: bool) -> String {
    let email = if with_email { "  com.example.users.UserEmailChanged: { merge: { email: new_email } }\n" } else { "" };
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: search, index: {name} }}
key: $key
dead_letter_topic: {name}.dlq
unknown_events: error
batch: {{ max_wait: 50ms }}
events:
  com.example.users.UserRegistered: {{ upsert: {{ name: name, email: email }} }}
{email}"#
    )
}

/// Replayed into Elasticsearch, a dead letter is applied where it was in
/// the log: a fixed event lands once, and one that a newer event of its
/// document overtook is reported superseded, never written over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letters_keep_their_place_in_the_log_in_elasticsearch() {
    let registry = support::start_registry().await;
    let topic = support::unique("users");
    let name = support::unique("replayed");
    support::create_topic(&topic, 1).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {
            "registered": support::catalogue_schema("com.example.users.UserRegistered", 2),
            "email": support::catalogue_schema("com.example.users.UserEmailChanged", 1)}});
    let registered = |id: &str, name: &str| {
        json!({"schema": "registered", "key": id, "value":
        {"user_id": id, "seq": 1, "name": name, "email": format!("{name}@old"), "country": "PL"}})
    };
    let changed = |id: &str, email: &str| {
        json!({"schema": "email", "key": id, "value":
        {"user_id": id, "seq": 2, "new_email": email}})
    };
    // Email changes have no rule yet (`unknown_events: error`): dead letters.
    // u2 registers again after its change: the change is overtaken.
    let records = vec![
        registered("u1", "ann"),
        changed("u1", "ann@new"),
        registered("u2", "bob"),
        changed("u2", "bob@new"),
        registered("u2", "bob2"),
    ];
    support::produce_with_python(&spec, records).await;
    let project = Project::new(&registry.url(), &[(&name, &profiles(&name, &topic, false))]);
    let mut kawka = project.start(0);
    let dead = support::consume(&format!("{name}.dlq"), 2, Duration::from_secs(60)).await;
    assert_eq!(dead.len(), 2, "the two email changes");
    eventually(Duration::from_secs(30), "the registrations to be written", || async {
        (support::es_document(&name, "u2").await? == json!({"name": "bob2", "email": "bob2@old"})).then_some(())
    })
    .await;
    assert_eq!(kawka.terminate().await, Some(0));

    // The cause is fixed: email changes have a rule now.
    std::fs::write(project.root().join(format!("connectors/{name}.yaml")), profiles(&name, &topic, true))
        .expect("write");
    let first = replay(&project, &name, false);
    assert!(first.contains("read 2, written 1, superseded 1"), "{first}");
    assert_eq!(support::es_document(&name, "u1").await, Some(json!({"name": "ann", "email": "ann@new"})));
    assert_eq!(
        support::es_document(&name, "u2").await,
        Some(json!({"name": "bob2", "email": "bob2@old"})),
        "the change the re-registration overtook is not written over it"
    );
    let second = replay(&project, &name, false);
    assert!(second.contains("read 0, written 0, superseded 0"), "{second}");
    assert_eq!(support::es_document(&name, "u1").await, Some(json!({"name": "ann", "email": "ann@new"})));
    let _ = registry.stop().await; // cleanup only
}
