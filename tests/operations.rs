//! Operating a running daemon over HTTP: health, readiness, metrics,
//! connector status, pause and resume behind a token, and `kawka status`.

mod support;

use std::time::Duration;

use serde_json::{json, Value as Json};

use support::{eventually, Project};

fn sold(n: usize, store: &str) -> Json {
    json!({"schema": "sold", "key": store, "value": {"sale_id": format!("s{n}"), "store_id": store,
        "item_id": "i1", "quantity": 1, "sold_at": 1_700_000_000_000i64}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_status_and_pause_resume_over_http() {
    let registry = support::start_registry().await;
    let topic = support::unique("sales");
    let name = support::unique("ops");
    support::create_topic(&topic, 1).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_wait: 50ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let config = project.root().join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("  listen: 127.0.0.1:0\n", "  listen: 127.0.0.1:0\n  token: t0ken\n"))
        .expect("write config");
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    support::produce_with_python(&spec, (0..20).map(|n| sold(n, "s1")).collect()).await;

    let mut kawka = project.start(0);
    let address = eventually(Duration::from_secs(30), "the http address in the log", || async {
        support::http_address(&kawka.log())
    })
    .await;
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let get = |path: &str| {
        let (client, url) = (client.clone(), format!("{base}{path}"));
        async move { client.get(url).send().await.expect("http request") }
    };
    assert_eq!(get("/healthz").await.status(), 200);
    eventually(Duration::from_secs(60), "the 20 events to be written", || async {
        let status: Json = get(&format!("/connectors/{name}")).await.json().await.ok()?;
        (status["counters"]["written"] == 20).then_some(())
    })
    .await;
    assert_eq!(get("/readyz").await.status(), 200, "joined and not retrying: ready");
    let status: Json = get(&format!("/connectors/{name}")).await.json().await.expect("json");
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["partitions"][0]["topic"], topic.as_str(), "{status}");
    assert_eq!(status["partitions"][0]["position"], 20, "{status}");
    assert_eq!(status["counters"]["consumed"], 20, "{status}");
    let metrics = get("/metrics").await.text().await.expect("metrics");
    let written = format!(
        "kawka_events_total{{connector=\"{name}\",event_type=\"com.example.retail.ItemSold\",outcome=\"written\"}} 20"
    );
    assert!(metrics.contains(&written), "{metrics}");
    assert!(metrics.contains(&format!("kawka_position{{connector=\"{name}\",topic=\"{topic}\",partition=\"0\"}} 20")));
    assert!(metrics.contains(&format!("kawka_batch_events_count{{connector=\"{name}\"}}")), "{metrics}");
    assert!(metrics.contains("kawka_registry_cache_hits_total"), "{metrics}");
    assert!(metrics.contains(&format!("kawka_freshness_seconds{{connector=\"{name}\"}}")), "{metrics}");

    // Control needs the token.
    let pause = format!("{base}/connectors/{name}/pause");
    assert_eq!(client.post(&pause).send().await.expect("post").status(), 401);
    let paused = client.post(&pause).bearer_auth("t0ken").send().await.expect("post");
    assert_eq!(paused.status(), 200);
    assert_eq!(paused.json::<Json>().await.expect("json")["state"], "paused");
    support::produce_with_python(&spec, (20..30).map(|n| sold(n, "s1")).collect()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pool = support::postgres().await;
    let on_hand = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT on_hand FROM \"{name}\" WHERE store_id = 's1'"))
            .fetch_one(&pool)
            .await
            .expect("row")
    };
    assert_eq!(on_hand().await, -20, "paused: nothing new is written");
    let resumed =
        client.post(format!("{base}/connectors/{name}/resume")).bearer_auth("t0ken").send().await.expect("post");
    assert_eq!(resumed.status(), 200);
    eventually(Duration::from_secs(30), "the events produced while paused", || async {
        (on_hand().await == -30).then_some(())
    })
    .await;

    // `kawka status` reads the same API.
    let status_url = base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kawka")).args(["status", "--url", &status_url]).output()
    })
    .await
    .expect("thread")
    .expect("kawka status");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    let row = table.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("no row for {name}:\n{table}"));
    assert!(row.contains("running") && row.contains("postgres"), "{row}");
    assert!(!kawka.log().contains("t0ken"), "the token is never logged");
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_run_exits_0_with_the_durable_positions_committed() {
    let registry = support::start_registry().await;
    let topic = support::unique("drain");
    let name = support::unique("drain");
    support::create_topic(&topic, 2).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: 200, max_wait: 50ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
"#
    );
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    let total = 60_000;
    support::produce_with_python(&spec, (0..total).map(|n| sold(n, &format!("s{}", n % 40))).collect()).await;
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    let positions = || async {
        sqlx::query_scalar::<_, Option<i64>>("SELECT sum(next_offset)::bigint FROM kawka_offsets WHERE connector = $1")
            .bind(&name)
            .fetch_one(&pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(60), "kawka to be writing", || async { (positions().await > 0).then_some(()) })
        .await;
    let signalled = std::time::Instant::now();
    let code = kawka.terminate().await;
    let drained_in = signalled.elapsed();
    assert_eq!(code, Some(0), "exit 0 on SIGTERM; log:\n{}", kawka.log());
    assert!(drained_in < Duration::from_secs(30), "drained within the grace period: {drained_in:?}");
    let durable = positions().await;
    assert!(durable > 0 && durable < total as i64, "stopped mid-run: {durable} of {total}");
    let group = format!("kawka.{name}");
    let committed = support::committed_total(&group, std::slice::from_ref(&topic)).await;
    assert_eq!(committed, durable, "the last durable positions are committed to Kafka too");
    let on_hand: i64 = sqlx::query_scalar(&format!("SELECT COALESCE(sum(on_hand), 0)::bigint FROM \"{name}\""))
        .fetch_one(&pool)
        .await
        .expect("sum");
    assert_eq!(on_hand, -durable, "exactly the events below the positions are applied");
    assert!(kawka.log().contains("connector drained"), "{}", kawka.log());
    eprintln!("SIGTERM after {durable} of {total} events: drained in {drained_in:?}, exit 0");
    let _ = registry.stop().await; // cleanup only
}
