//! Connectors change while the daemon runs: a changed file restarts only
//! its connector, a removed one drains and stops, a new one starts and
//! catches up, a broken one changes nothing and says where it is broken,
//! a ConfigMap-style symlink swap reloads once, `kawka validate --against`
//! shows the plan without applying it; Postgres effects stay exact.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value as Json};

use support::{eventually, Project};

fn shipment(n: usize) -> Json {
    let (store, item) = (format!("s{}", n % 7), format!("i{}", n % 11));
    json!({"schema": "received", "key": format!("{store}:{item}"), "value": {"shipment_id": format!("r{n}"),
        "store_id": store, "item_id": item, "quantity": (n % 5 + 1) as i64, "received_at": 0}})
}

fn fold(events: std::ops::Range<usize>) -> i64 {
    events.map(|n| (n % 5 + 1) as i64).sum()
}

fn connector(name: &str, topic: &str, max_wait: &str, op: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: 200, max_wait: {max_wait} }}
events:
  com.example.retail.ShipmentReceived: {{ {op}: {{ on_hand: quantity }} }}
"#
    )
}

struct Stack {
    registry: kawka_registry::RunningRegistry,
    pool: sqlx::PgPool,
}

impl Stack {
    async fn new() -> Stack {
        Stack { registry: support::start_registry().await, pool: support::postgres().await }
    }

    fn spec(&self, topic: &str) -> Json {
        json!({"bootstrap": support::kafka_bootstrap(), "registry": self.registry.url(), "topic": topic,
            "schemas": {"received": support::catalogue_schema("com.example.retail.ShipmentReceived", 1)}})
    }

    async fn produce(&self, topic: &str, events: std::ops::Range<usize>) {
        support::produce_with_python(&self.spec(topic), events.map(shipment).collect()).await;
    }

    async fn total(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, Option<i64>>(&format!("SELECT sum(on_hand)::bigint FROM \"{table}\""))
            .fetch_one(&self.pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

/// Reloads every 200 ms of looking.
fn watch_quickly(project: &Project) {
    let config = project.root().join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{text}reload: {{ interval: 200ms }}\n")).expect("config");
}

async fn get(base: &str, path: &str) -> (u16, Json) {
    let response = reqwest::get(format!("{base}{path}")).await.expect("get");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Json::Null))
}

/// Waits for the reload after `previous` (its `at_ms`), and returns it.
async fn next_reload(base: &str, previous: i64) -> Json {
    eventually(Duration::from_secs(60), "a reload", || async {
        let (_, body) = get(base, "/reload").await;
        let last = body["last"].clone();
        (last["at_ms"].as_i64().unwrap_or(0) > previous).then_some(last)
    })
    .await
}

async fn started_at(base: &str, name: &str) -> i64 {
    get(base, &format!("/connectors/{name}")).await.1["started_at_ms"].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_are_added_changed_and_removed_without_touching_the_others() {
    let stack = Stack::new().await;
    let tag = support::unique("rl");
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|x| format!("{tag}_{x}"));
    for name in [&a, &b, &c, &d] {
        support::create_topic(name, 1).await;
        stack.produce(name, 0..500).await;
    }
    let project = Project::new(
        &stack.registry.url(),
        &[
            (&a, &connector(&a, &a, "50ms", "increment")),
            (&b, &connector(&b, &b, "50ms", "increment")),
            (&c, &connector(&c, &c, "50ms", "increment")),
        ],
    );
    watch_quickly(&project);
    let daemon = project.start(0);
    let address =
        eventually(Duration::from_secs(30), "the http address", || async { support::http_address(&daemon.log()) })
            .await;
    let base = format!("http://{address}");
    for name in [&a, &b, &c] {
        eventually(Duration::from_secs(120), "the first events", || async {
            (support::stored_positions(&stack.pool, name).await == 500).then_some(())
        })
        .await;
    }
    let before: BTreeMap<String, i64> =
        futures::future::join_all([&a, &b, &c].map(|n| async { (n.clone(), started_at(&base, n).await) }))
            .await
            .into_iter()
            .collect();

    // Events keep coming to every topic while the files change.
    let producer = {
        let (specs, topics) = ([&a, &b, &c, &d].map(|t| stack.spec(t)), [&a, &b, &c, &d].map(String::clone));
        tokio::spawn(async move {
            for round in 0..6 {
                for (spec, _topic) in specs.iter().zip(&topics) {
                    let range = 500 + round * 100..600 + round * 100;
                    support::produce_with_python(spec, range.map(shipment).collect()).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let dir = project.root().join("connectors");

    // 1. b changes (how it batches, not what it writes): b alone restarts.
    std::fs::write(dir.join(format!("{b}.yaml")), connector(&b, &b, "60ms", "increment")).expect("write");
    let reload = next_reload(&base, 0).await;
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert_eq!(reload["plan"]["restart"], json!([b]), "{reload}");
    assert_eq!(reload["trigger"], "file change");
    assert_eq!(started_at(&base, &a).await, before[&a], "a untouched");
    assert_eq!(started_at(&base, &c).await, before[&c], "c untouched");
    assert_ne!(started_at(&base, &b).await, before[&b], "b restarted");
    assert!(get(&base, &format!("/connectors/{b}")).await.1["rebuild_suggested"].is_null());

    // 2. c removed: it drains and stops; its offsets are its durable writes.
    std::fs::remove_file(dir.join(format!("{c}.yaml"))).expect("remove");
    let reload = next_reload(&base, reload["at_ms"].as_i64().expect("at")).await;
    assert_eq!(reload["plan"]["stop"], json!([c]), "{reload}");
    assert_eq!(get(&base, &format!("/connectors/{c}")).await.0, 404);
    let stored = support::stored_positions(&stack.pool, &c).await;
    let committed = support::committed_total(&format!("kawka.{c}"), std::slice::from_ref(&c)).await;
    assert_eq!(committed, stored, "the drain committed exactly what is durable");
    assert_eq!(stack.total(&c).await, fold(0..stored as usize), "c holds the fold of what it wrote");

    // 3. d added: it starts and catches up.
    std::fs::write(dir.join(format!("{d}.yaml")), connector(&d, &d, "50ms", "increment")).expect("write");
    let reload = next_reload(&base, reload["at_ms"].as_i64().expect("at")).await;
    assert_eq!(reload["plan"]["start"], json!([d]), "{reload}");

    // 4. A broken file changes nothing and says where it is broken; fixed, it applies.
    let b_started = started_at(&base, &b).await;
    std::fs::write(dir.join(format!("{b}.yaml")), connector(&b, &b, "soon", "increment")).expect("write");
    let broken = next_reload(&base, reload["at_ms"].as_i64().expect("at")).await;
    assert_eq!(broken["outcome"], "invalid", "{broken}");
    let problems = broken["problems"].to_string();
    assert!(problems.contains(&format!("{b}.yaml:5")) && problems.contains("batch.max_wait"), "{problems}");
    assert_eq!(started_at(&base, &b).await, b_started, "nothing changed");
    let (_, metrics) = {
        let text = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
        (0, text)
    };
    assert!(metrics.contains("kawka_config_reload_total{outcome=\"invalid\"} 1"), "{metrics}");
    std::fs::write(dir.join(format!("{b}.yaml")), connector(&b, &b, "70ms", "increment")).expect("write");
    let fixed = next_reload(&base, broken["at_ms"].as_i64().expect("at")).await;
    assert_eq!((fixed["outcome"].clone(), fixed["plan"]["restart"].clone()), (json!("applied"), json!([b])));

    // Everything produced is written exactly once where it is still read.
    producer.await.expect("producer");
    for name in [&a, &b, &d] {
        eventually(Duration::from_secs(120), "every event", || async {
            (support::stored_positions(&stack.pool, name).await == 1100).then_some(())
        })
        .await;
        assert_eq!(stack.total(name).await, fold(0..1100), "{name}: the fold of its log, once");
    }
    assert_eq!(started_at(&base, &a).await, before[&a], "a was never touched");

    // 5. POST /reload with nothing changed; restart over the API.
    let report: Json =
        reqwest::Client::new().post(format!("{base}/reload")).send().await.expect("post").json().await.expect("json");
    assert_eq!(report["outcome"], "unchanged", "{report}");
    let a_started = started_at(&base, &a).await;
    let restarted =
        reqwest::Client::new().post(format!("{base}/connectors/{a}/restart")).send().await.expect("post").status();
    assert_eq!(restarted.as_u16(), 200);
    assert_ne!(started_at(&base, &a).await, a_started);
    let (_, config) = get(&base, &format!("/connectors/{a}/config")).await;
    assert!(
        config["fingerprint"].is_string()
            && config["config"].as_str().is_some_and(|c| c.to_lowercase().contains("increment") && c.contains(&a)),
        "{config}"
    );

    // 6. `validate --against`: the plan of a changed copy, nothing applied.
    let copy = tempfile::tempdir().expect("temp dir");
    support::copy_dir(project.root(), copy.path());
    std::fs::write(copy.path().join(format!("connectors/{c}.yaml")), connector(&c, &c, "50ms", "increment"))
        .expect("write");
    std::fs::write(copy.path().join(format!("connectors/{d}.yaml")), connector(&d, &d, "90ms", "increment"))
        .expect("write");
    let last = get(&base, "/reload").await.1["last"]["at_ms"].as_i64();
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["validate", "--config", "config/kawka.yaml", "--against", &base])
        .current_dir(copy.path())
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka validate");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    for line in [format!("start     {c}"), format!("restart   {d}"), format!("unchanged {a}"), format!("unchanged {b}")]
    {
        assert!(text.contains(&line), "{line:?} in\n{text}");
    }
    assert_eq!(get(&base, "/reload").await.1["last"]["at_ms"].as_i64(), last, "validate changed nothing");

    // 7. A's projection changes: it restarts, and a rebuild is suggested.
    std::fs::write(dir.join(format!("{a}.yaml")), connector(&a, &a, "50ms", "decrement")).expect("write");
    let reload = next_reload(&base, last.unwrap_or(0)).await;
    assert_eq!(reload["plan"]["restart"], json!([a]), "{reload}");
    let suggestion = get(&base, &format!("/connectors/{a}")).await.1["rebuild_suggested"].clone();
    assert!(suggestion.as_str().is_some_and(|s| s.contains("kawka rebuild")), "{suggestion}");
    assert!(daemon.log().contains("rebuild suggested"));
}

/// Kubernetes updates a ConfigMap volume by writing a new timestamped
/// directory and renaming a `..data` symlink over the old one; the files
/// are symlinks through `..data`.
fn configmap_update(dir: &Path, generation: u32, files: &[(&str, String)]) {
    let data = dir.join(format!("..2026_12_05_{generation}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    for (name, text) in files {
        std::fs::write(data.join(name), text).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&data, &tmp).expect("link");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("link");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_swap_reloads_once() {
    let stack = Stack::new().await;
    let tag = support::unique("cm");
    let [x, y] = ["x", "y"].map(|n| format!("{tag}_{n}"));
    for name in [&x, &y] {
        support::create_topic(name, 1).await;
        stack.produce(name, 0..200).await;
    }
    let project = Project::new(&stack.registry.url(), &[]);
    watch_quickly(&project);
    let dir = project.root().join("connectors");
    configmap_update(&dir, 1, &[(&format!("{x}.yaml"), connector(&x, &x, "50ms", "increment"))]);
    let daemon = project.start(0);
    let address =
        eventually(Duration::from_secs(30), "the http address", || async { support::http_address(&daemon.log()) })
            .await;
    let base = format!("http://{address}");
    eventually(Duration::from_secs(120), "x's events", || async {
        (support::stored_positions(&stack.pool, &x).await == 200).then_some(())
    })
    .await;

    configmap_update(
        &dir,
        2,
        &[
            (&format!("{x}.yaml"), connector(&x, &x, "60ms", "increment")),
            (&format!("{y}.yaml"), connector(&y, &y, "50ms", "increment")),
        ],
    );
    let reload = next_reload(&base, 0).await;
    assert_eq!(reload["plan"]["restart"], json!([x]), "{reload}");
    assert_eq!(reload["plan"]["start"], json!([y]), "{reload}");
    eventually(Duration::from_secs(120), "y's events", || async {
        (support::stored_positions(&stack.pool, &y).await == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    let reloads: Vec<&str> = metrics.lines().filter(|l| l.starts_with("kawka_config_reload_total{")).collect();
    assert_eq!(reloads, vec!["kawka_config_reload_total{outcome=\"applied\"} 1"], "one swap, one reload");
    assert_eq!(stack.total(&y).await, fold(0..200));
}
