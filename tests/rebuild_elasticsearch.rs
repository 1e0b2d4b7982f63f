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

/// A proxy in front of the Elasticsearch API: it forwards every request,
/// and plays its part in a cut-over test.
#[derive(Clone, Default)]
struct Proxy {
    upstream: String,
    bulks: Arc<std::sync::atomic::AtomicUsize>,
    /// Ahead of the n-th `_bulk` request, a cut-over of this alias (block
    /// v1, then a moment later move the alias to v2 and lift the block).
    cut_over_at: Option<(usize, String)>,
    /// That cut-over's task: its failures show where it is awaited.
    cut_over: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// A request that sets a write block is held: `arrived` is notified,
    /// and it goes on once `release` is.
    hold_blocks: Option<(Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>,
}

impl Proxy {
    /// Serves it on a free port; returns its URL.
    async fn serve(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let app = axum::Router::new().fallback(forward).with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }
}

/// `config/<file>` of `project`: its own config with Elasticsearch reached
/// through `proxy_url` (with time for a request the proxy holds).
fn proxied_config(project: &Project, file: &str, proxy_url: &str) {
    let text = std::fs::read_to_string(project.root().join("config/kawka.yaml"))
        .expect("config")
        .replace(&format!("\"{}\"", support::elasticsearch_url()), &format!("\"{proxy_url}\", timeout: 600s"));
    std::fs::write(project.root().join("config").join(file), text).expect("config");
}

async fn forward(
    axum::extract::State(proxy): axum::extract::State<Proxy>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, [(axum::http::HeaderName, String); 1], Vec<u8>) {
    if let Some((arrived, release)) = &proxy.hold_blocks {
        let sets = serde_json::from_slice::<Json>(&body).ok().map(|b| b["index"]["blocks"]["write"] == json!(true));
        if method == axum::http::Method::PUT && uri.path().ends_with("/_settings") && sets == Some(true) {
            arrived.notify_one();
            release.notified().await;
        }
    }
    let client = reqwest::Client::new();
    let bulk = uri.path().ends_with("/_bulk").then(|| proxy.bulks.fetch_add(1, Ordering::SeqCst) + 1);
    if let Some((_, alias)) = proxy.cut_over_at.as_ref().filter(|(at, _)| Some(*at) == bulk) {
        // The cut-over's order: block the live index (this request then
        // meets the block), a moment later move the alias, then lift it.
        let (live, next) = (format!("{alias}-v1"), format!("{alias}-v2"));
        let put = client
            .put(format!("{}/{live}/_settings", proxy.upstream))
            .json(&json!({"index": {"blocks": {"write": true}}}))
            .send()
            .await
            .expect("block");
        assert!(put.status().is_success(), "block: {}", put.text().await.unwrap_or_default());
        let (client, upstream, alias) = (client.clone(), proxy.upstream.clone(), alias.clone());
        let task = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let actions = json!({"actions": [{"remove": {"index": live, "alias": alias}},
                {"add": {"index": next, "alias": alias, "is_write_index": true}}]});
            let moved = client.post(format!("{upstream}/_aliases")).json(&actions).send().await.expect("alias");
            assert!(moved.status().is_success(), "alias: {}", moved.text().await.unwrap_or_default());
            let lifted = client
                .put(format!("{upstream}/{live}/_settings"))
                .json(&json!({"index": {"blocks": {"write": false}}}))
                .send()
                .await
                .expect("lift");
            assert!(lifted.status().is_success(), "lift: {}", lifted.text().await.unwrap_or_default());
        });
        *proxy.cut_over.lock().expect("not poisoned") = Some(task);
    }
    let url = format!("{}{}", proxy.upstream, uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut request = client.request(method, url).body(body);
    if let Some(kind) = headers.get(axum::http::header::CONTENT_TYPE) {
        request = request.header(axum::http::header::CONTENT_TYPE, kind);
    }
    let response = request.send().await.expect("upstream");
    let status = axum::http::StatusCode::from_u16(response.status().as_u16()).expect("a status");
    let kind = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    (status, [(axum::http::header::CONTENT_TYPE, kind)], response.bytes().await.expect("body").to_vec())
}

/// Writes `ops` as one live batch through a sink sending at most
/// `max_actions` actions a bulk request (one request at a time), with a
/// cut-over (block v1, move the alias to v2, lift the block) played just
/// before its `block_at`-th request, and written again whole while it
/// fails, as the pipeline does. Returns the alias and the number of bulk
/// requests sent, once the write went through and the cut-over ended.
async fn write_through_a_cut_over(
    ops: &[kawka::projection::WriteOp],
    max_actions: usize,
    block_at: usize,
) -> (String, usize) {
    let name = support::unique("split-batch");
    let connector = format!(
        "name: {name}\nsource: {{ topics: [unused-split-batch] }}\nsink:\n  to: search\n  index: {name}\n  \
         mappings: {{ properties: {{ a: {{ type: long }} }} }}\n  bulk: {{ max_actions: {max_actions}, in_flight: 1 }}\n\
         key: $key\nevents:\n  com.example.users.UserRegistered: {{ upsert: {{ a: seq }} }}\n"
    );
    let project = Project::new("http://127.0.0.1:9", &[(&name, &connector)]);
    let proxy = Proxy {
        upstream: support::elasticsearch_url(),
        cut_over_at: Some((block_at, name.clone())),
        ..Proxy::default()
    };
    let proxy_url = proxy.clone().serve().await;
    proxied_config(&project, "kawka.yaml", &proxy_url);
    let sink = support::sinks(&project).remove(0);
    sink.prepare().await.expect("prepare: v1 behind the alias");
    // The new version, as a rebuild leaves it just before the cut-over.
    let upstream = support::elasticsearch_url();
    let mapping: Json =
        reqwest::get(format!("{upstream}/{name}-v1/_mapping")).await.expect("mapping").json().await.expect("json");
    let created = reqwest::Client::new()
        .put(format!("{upstream}/{name}-v2"))
        .json(&json!({"mappings": mapping[format!("{name}-v1")]["mappings"]}))
        .send()
        .await
        .expect("v2");
    assert!(created.status().is_success(), "v2: {}", created.text().await.unwrap_or_default());

    // The pipeline's loop: a batch that failed is written again whole.
    let (mut failures, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(60));
    while let Err(error) = sink.write(ops, &[]).await {
        assert!(matches!(error, kawka::sink::SinkError::WriteBlocked(_)), "{error}");
        assert_eq!(error.class(), kawka::error::ErrorClass::Transient);
        failures.push(error.to_string());
        assert!(Instant::now() < deadline, "still failing: {failures:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_over = proxy.cut_over.lock().expect("not poisoned").take().expect("the proxy played the cut-over");
    cut_over.await.expect("the proxy's cut-over (block, alias, lift)");
    assert!(alias_targets(&name).await.contains(&format!("{name}-v2")), "the alias moved");
    (name, proxy.bulks.load(Ordering::SeqCst))
}

/// An op on document `id` at `offset` of the test topic.
fn doc_op(id: &str, kind: kawka::projection::OpKind, a: i64, offset: i64) -> kawka::projection::WriteOp {
    use kawka::value::{intern, Value};
    kawka::projection::WriteOp {
        key: smallvec::smallvec![Value::from(id)],
        kind,
        fields: smallvec::smallvec![(intern("a"), Value::Int(a))],
        version: None,
        position: kawka::event::Position { topic: intern("unused-split-batch"), partition: 0, offset },
    }
}

/// A live batch sent in several bulk requests, of which the second meets
/// the cut-over's write block: the requests before it landed in the old
/// index only. Sending the blocked items again alone would put them in
/// the new index once the alias moved, and the batch would count as
/// written while the new index lacks its first documents (what a loaded
/// CI run once showed). The block must fail the batch whole, so that it
/// is written again, all of it, where the alias points then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_batch_split_by_the_cut_overs_block_is_written_again_whole_behind_the_moved_alias() {
    let ops: Vec<_> = (0..20).map(|i| doc_op(&format!("d{i:02}"), kawka::projection::OpKind::Upsert, i, i)).collect();
    let (name, bulks) = write_through_a_cut_over(&ops, 5, 2).await;
    assert!(bulks > 4, "the block was met: the batch was sent again");
    let documents = support::es_documents(&name, 100).await;
    let missing: Vec<String> = (0..20).map(|i| format!("d{i:02}")).filter(|id| !documents.contains_key(id)).collect();
    assert!(missing.is_empty(), "the index the alias points to lacks {missing:?}");
    for (id, doc) in &documents {
        assert_eq!(doc["a"], json!(id[1..].parse::<i64>().expect("dNN")), "{id}");
    }
}

/// The same, cut anywhere: random batches of upserts and increments over
/// a few documents (several ops of one document go in several rounds of
/// requests), random request sizes, the block met at a random request.
/// Whatever landed in the old index before the block, the index the alias
/// points to afterwards equals the fold of the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_batch_cut_anywhere_by_the_block_ends_whole_in_the_new_index() {
    use kawka::projection::OpKind;
    use rand::{Rng, SeedableRng};

    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let documents = rng.random_range(2..=12);
        let ops: Vec<_> = (0..rng.random_range(documents..=3 * documents))
            .map(|offset| {
                let id = format!("d{:02}", rng.random_range(0..documents));
                let kind = if rng.random_bool(0.3) { OpKind::Upsert } else { OpKind::Increment };
                doc_op(&id, kind, rng.random_range(1..=9), offset as i64)
            })
            .collect();
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        for op in &ops {
            let (id, a) = (op.key[0].to_string(), op.fields[0].1.as_i64().expect("an integer"));
            match op.kind {
                OpKind::Upsert => expected.insert(id, a),
                _ => expected.insert(id.clone(), expected.get(&id).copied().unwrap_or(0) + a),
            };
        }
        // The first round alone (an action per document) takes this many
        // requests: the block is met within it or a later round.
        let max_actions = rng.random_range(1..=4);
        let block_at = rng.random_range(1..=expected.len().div_ceil(max_actions));
        let (name, _) = write_through_a_cut_over(&ops, max_actions, block_at).await;
        let actual: BTreeMap<String, i64> = support::es_documents(&name, 100)
            .await
            .into_iter()
            .map(|(id, doc)| (id, doc["a"].as_i64().expect("a number")))
            .collect();
        assert_eq!(
            actual,
            expected,
            "seed {seed}: {} ops, {max_actions} actions a request, blocked at request {block_at}",
            ops.len()
        );
    }
}

/// A batch the live connector wrote just before the cut-over's block but
/// whose commit had not landed when the positions looked final: the live
/// index holds it, the group's positions do not. The rebuild catches up to
/// the log's end read under the block, not only to those positions, so the
/// new index holds that batch too. A proxy holds the rebuild's block
/// request while the test plays that batch: produced, written by the live
/// connector, its commit then taken back (the late commit, not landed yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_the_live_index_whose_commit_comes_after_the_cut_over_is_in_the_new_index() {
    const COMMITTED: usize = 2_000;
    const LATE: usize = 400;
    let registry = support::start_registry().await;
    let topic = support::unique("stats");
    let name = support::unique("late-commit");
    support::create_topic(&topic, 1).await;
    let records = support::stats::log(COMMITTED + LATE, 150);
    let total = records.len();
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": support::stats::schemas()});
    support::produce_with_python(&spec, records[..COMMITTED].to_vec()).await;
    let project = Project::new(&registry.url(), &[(&name, &stats_connector(&name, &topic))]);
    let (arrived, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let proxy = Proxy {
        upstream: support::elasticsearch_url(),
        hold_blocks: Some((arrived.clone(), release.clone())),
        ..Proxy::default()
    };
    proxied_config(&project, "proxied.yaml", &proxy.serve().await);
    let (group, topics) = (format!("kawka.{name}"), vec![topic.clone()]);
    let committed = |n: usize| {
        let (group, topics) = (group.clone(), topics.clone());
        async move { (support::committed_total(&group, &topics).await == n as i64).then_some(()) }
    };
    let mut live = project.start(0);
    eventually(Duration::from_secs(180), "the live index to hold the first events", || committed(COMMITTED)).await;

    let rebuild = {
        let (root, name) = (project.root().to_path_buf(), name.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_kawka"))
                .args(["rebuild", "--config", "config/proxied.yaml", &name])
                .current_dir(root)
                .env_remove("KAWKA_CONFIG")
                .output()
        })
    };
    tokio::time::timeout(Duration::from_secs(240), arrived.notified()).await.expect("the cut-over to block");
    // The rebuild has reached the live positions and is about to block.
    // The last record is a batch of its own: tansu's memory storage reports
    // a log's end as its last batch's first offset + 1.
    support::produce_with_python(&spec, records[COMMITTED..total - 1].to_vec()).await;
    support::produce_with_python(&spec, records[total - 1..].to_vec()).await;
    eventually(Duration::from_secs(60), "the live connector to write the late batch", || committed(total)).await;
    assert_eq!(live.terminate().await, Some(0), "clean exit");
    let kafka =
        kawka::source::KafkaSettings { bootstrap_servers: support::kafka_bootstrap(), properties: Default::default() };
    // (A group its member has just left may refuse a commit for a moment.)
    eventually(Duration::from_secs(60), "the group's position taken back", || {
        let (kafka, moved, back) = (kafka.clone(), group.clone(), vec![(topic.clone(), 0, COMMITTED as i64)]);
        async move {
            let taken =
                tokio::task::spawn_blocking(move || kawka::source::kafka::commit_offsets(&kafka, &moved, &back));
            taken.await.expect("thread").ok()
        }
    })
    .await;
    assert_eq!(support::committed_total(&group, &topics).await, COMMITTED as i64);
    release.notify_one();

    let output = rebuild.await.expect("thread").expect("kawka rebuild");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{out}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(alias_targets(&name).await.contains(&format!("{name}-v2")), "{out}");
    assert_fold(&name, &support::stats::fold(&records), "the new index after the cut-over").await;

    // The commit that came late would have moved the group on; here the
    // live connector writes those events again: duplicates in the new index.
    let mut live = project.start(1);
    eventually(Duration::from_secs(180), "the live connector to go on", || committed(total)).await;
    assert_fold(&name, &support::stats::fold(&records), "after the live connector wrote them again").await;
    assert_eq!(live.terminate().await, Some(0), "clean exit");
    let _ = registry.stop().await; // cleanup only
}
