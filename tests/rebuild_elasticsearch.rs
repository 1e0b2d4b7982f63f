//! `kawka rebuild` of an Elasticsearch read model with merges and
//! increments (order-sensitive, position-guarded writes): `<alias>-v2` is
//! built beside `<alias>-v1` while a reader counts documents through the
//! alias and a producer keeps writing; the alias moves in one call; after
//! cut-over the documents equal the fold of the whole log; rollback moves
//! the alias back once v1 has caught up; cleanup drops v2.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use support::{eventually, Project};

fn stats_connector(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "1000" }} }}
sink: {{ to: search, index: {name}, mappings: {{ properties: {{ email: {{ type: keyword }} }} }} }}
key: $key
batch: {{ max_events: 1000, max_wait: 100ms }}
events:
  test.stats.Registered:   {{ upsert: {{ name: name, email: email, logins: 0 }} }}
  test.stats.EmailChanged: {{ merge: {{ email: email }} }}
  test.stats.LoggedIn:     {{ increment: {{ logins: count }} }}
"#
    )
}

async fn alias_targets(alias: &str) -> String {
    reqwest::get(format!("{}/_alias/{alias}", support::elasticsearch_url()))
        .await
        .expect("alias")
        .text()
        .await
        .expect("text")
}

async fn count(index: &str) -> Result<u64, String> {
    let reply: Json = reqwest::get(format!("{}/{index}/_count", support::elasticsearch_url()))
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    reply["count"].as_u64().ok_or_else(|| format!("no count in {reply}"))
}

async fn assert_fold(index: &str, expected: &BTreeMap<String, Json>, when: &str) {
    let actual = support::es_documents(index, 10_000).await;
    let wrong: Vec<_> = expected.iter().filter(|(id, doc)| actual.get(*id) != Some(doc)).take(5).collect();
    assert!(wrong.is_empty(), "{when}: documents differ from the fold of the log (expected side shown): {wrong:?}");
    assert_eq!(actual.len(), expected.len(), "{when}");
}

fn kawka(project: &Project, args: &[&str]) -> String {
    let output =
        Command::new(env!("CARGO_BIN_EXE_kawka")).args(args).current_dir(project.root()).output().expect("kawka");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "kawka {args:?}: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_is_rebuilt_beside_the_live_one_swapped_by_alias_and_rolled_back() {
    const FIRST: usize = 20_000;
    const DURING: usize = 4_000;
    const AFTER: usize = 2_000;
    const USERS: usize = 500;
    let registry = support::start_registry().await;
    let topic = support::unique("stats");
    let name = support::unique("rebuilt-stats");
    support::create_topic(&topic, 2).await;
    let records = support::stats::log(FIRST + DURING + AFTER, USERS);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::stats::schemas()});
    support::produce_with_python(&spec, records[..FIRST].to_vec()).await;

    let project = Project::new(&registry.url(), &[(&name, &stats_connector(&name, &topic))]);
    let mut live = project.start(0);
    let (group, topics) = (format!("kawka.{name}"), vec![topic.clone()]);
    let live_started = Instant::now();
    eventually(Duration::from_secs(240), "the live index to hold the first events", || async {
        (support::committed_total(&group, &topics).await == FIRST as i64).then_some(())
    })
    .await;
    let live_seconds = live_started.elapsed().as_secs_f64();
    assert!(alias_targets(&name).await.contains(&format!("{name}-v1")));

    // A reader through the alias: documents are never deleted here, so the
    // count can only grow, and the alias always answers.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, alias) = (stop.clone(), name.clone());
        tokio::spawn(async move {
            let (mut reads, mut last, mut problems) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match count(&alias).await {
                    Ok(now) if now < last => problems.push(format!("the count went down from {last} to {now}")),
                    Ok(now) => last = now,
                    Err(error) => problems.push(format!("read failed: {error}")),
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (reads, problems)
        })
    };
    let producer = {
        let (spec, during) = (spec.clone(), records[FIRST..FIRST + DURING].to_vec());
        tokio::spawn(async move {
            for chunk in during.chunks(1000) {
                support::produce_with_python(&spec, chunk.to_vec()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // A setting the user changed on the live index comes along.
    let put = reqwest::Client::new()
        .put(format!("{}/{name}-v1/_settings", support::elasticsearch_url()))
        .json(&json!({"index": {"max_result_window": 50000}}))
        .send()
        .await
        .expect("settings");
    assert!(put.status().is_success());
    let rebuild_started = Instant::now();
    let stdout = {
        let (project_root, name) = (project.root().to_path_buf(), name.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_kawka")).args(["rebuild", &name]).current_dir(project_root).output()
        })
        .await
        .expect("thread")
        .expect("kawka rebuild")
    };
    let rebuild_seconds = rebuild_started.elapsed().as_secs_f64();
    let out = String::from_utf8_lossy(&stdout.stdout).into_owned();
    assert!(stdout.status.success(), "{out}\n{}", String::from_utf8_lossy(&stdout.stderr));
    assert!(out.contains(&format!("rebuilt {name}-v2")) && out.contains(&format!("kept as {name}-v1")), "{out}");
    producer.await.expect("producer");
    let during_total = (FIRST + DURING) as i64;
    eventually(Duration::from_secs(240), "the live connector to go on after the cut-over", || async {
        (support::committed_total(&group, &topics).await == during_total).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (reads, problems) = reader.await.expect("reader");
    assert!(problems.is_empty(), "over {reads} reads: {problems:?}");
    assert!(reads > 20, "the reader kept reading: {reads}");
    let alias = alias_targets(&name).await;
    assert!(alias.contains(&format!("{name}-v2")) && !alias.contains(&format!("{name}-v1")), "{alias}");
    let expected = support::stats::fold(&records[..FIRST + DURING]);
    assert_fold(&name, &expected, "after the cut-over").await;
    let settings: Json = reqwest::get(format!("{}/{name}-v2/_settings", support::elasticsearch_url()))
        .await
        .expect("settings")
        .json()
        .await
        .expect("json");
    assert_eq!(settings[format!("{name}-v2")]["settings"]["index"]["max_result_window"], json!("50000"), "{settings}");
    eprintln!("{out}");
    eprintln!(
        "live connector: {FIRST} events in {live_seconds:.1} s ({:.0} events/s); `kawka rebuild` took {rebuild_seconds:.1} s; \
         reader: {reads} reads through the alias, none missing or shrinking",
        FIRST as f64 / live_seconds
    );

    // Events after the cut-over land in v2; the rollback brings v1 up to
    // them before the alias moves back.
    support::produce_with_python(&spec, records[FIRST + DURING..].to_vec()).await;
    let total = records.len() as i64;
    eventually(Duration::from_secs(120), "the events after the cut-over", || async {
        (support::committed_total(&group, &topics).await == total).then_some(())
    })
    .await;
    let out = kawka(&project, &["rebuild", &name, "--rollback"]);
    assert!(out.contains(&format!("kept as {name}-v2")), "{out}");
    let alias = alias_targets(&name).await;
    assert!(alias.contains(&format!("{name}-v1")) && !alias.contains(&format!("{name}-v2")), "{alias}");
    let expected = support::stats::fold(&records);
    assert_fold(&name, &expected, "after the rollback").await;
    assert_fold(&format!("{name}-v2"), &expected, "the rolled-out version").await;

    let out = kawka(&project, &["rebuild", &name, "--cleanup"]);
    assert!(out.contains(&format!("dropped {name}-v2")), "{out}");
    assert_eq!(live.terminate().await, Some(0), "clean exit; log:\n{}", live.log());
    let _ = registry.stop().await; // cleanup only
}

/// Whether `index` carries a write block.
async fn write_blocked(index: &str) -> bool {
    let settings: Json = reqwest::get(format!("{}/{index}/_settings", support::elasticsearch_url()))
        .await
        .expect("settings")
        .json()
        .await
        .expect("json");
    let block = &settings[index]["settings"]["index"]["blocks"]["write"];
    block == &json!(true) || block == &json!("true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_over_killed_while_the_live_index_is_blocked_heals_by_itself() {
    const FIRST: usize = 3_000;
    const AFTER: usize = 500;
    let registry = support::start_registry().await;
    let topic = support::unique("stats");
    let name = support::unique("healed-stats");
    support::create_topic(&topic, 2).await;
    let records = support::stats::log(FIRST + AFTER, 200);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::stats::schemas()});
    support::produce_with_python(&spec, records[..FIRST].to_vec()).await;
    let project = Project::new(&registry.url(), &[(&name, &stats_connector(&name, &topic))]);
    let live = project.start(0);
    let (group, topics) = (format!("kawka.{name}"), vec![topic.clone()]);
    eventually(Duration::from_secs(180), "the live index to hold the first events", || async {
        (support::committed_total(&group, &topics).await == FIRST as i64).then_some(())
    })
    .await;

    // A rebuild, killed (-9) as soon as its cut-over has blocked the live index.
    let mut rebuild = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["rebuild", &name])
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kawka rebuild");
    let state_url = format!("{}/kawka-rebuilds/_doc/{name}", support::elasticsearch_url());
    let blocked = eventually(Duration::from_secs(180), "the cut-over to block the live index", || async {
        let state: Json = reqwest::get(&state_url).await.ok()?.json().await.ok()?;
        state["_source"]["blocked_index"].as_str().map(str::to_string)
    })
    .await;
    rebuild.kill().expect("kill -9");
    let _ = rebuild.wait();
    assert_eq!(blocked, format!("{name}-v1"));
    assert!(write_blocked(&blocked).await, "the killed cut-over left its block");

    // Events produced now wait behind the block, then go through once the
    // daemon sees the dead cut-over's lease run out: nobody steps in.
    let killed_at = Instant::now();
    support::produce_with_python(&spec, records[FIRST..].to_vec()).await;
    eventually(Duration::from_secs(90), "the live connector to write again", || async {
        (support::committed_total(&group, &topics).await == (FIRST + AFTER) as i64).then_some(())
    })
    .await;
    println!("writes resumed {:?} after the kill", killed_at.elapsed());
    assert!(!write_blocked(&blocked).await);
    assert!(live.log().contains("lifted the write block"), "the daemon says what it did");
    let state: Json = reqwest::get(&state_url).await.expect("state").json().await.expect("json");
    assert!(state["_source"]["blocked_index"].is_null(), "{state}");
    assert_fold(&name, &support::stats::fold(&records), "after healing").await;
}
