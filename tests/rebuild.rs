//! `kawka rebuild`: a 200k-event Postgres read model rebuilt beside the live
//! one while a reader queries it and a producer keeps writing; atomic
//! cut-over; rollback; the same through the daemon's HTTP API, with
//! progress in `GET /connectors/{name}`, `/metrics` and `kawka status`.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};

use support::{eventually, Project};

fn shipment(n: usize) -> Json {
    let (store, item) = (format!("s{}", n % 20), format!("i{}", n % 50));
    json!({"schema": "received", "key": format!("{store}:{item}"), "value": {"shipment_id": format!("r{n}"),
        "store_id": store, "item_id": item, "quantity": (n % 5 + 1) as i64, "received_at": 0}})
}

fn expected_total(events: usize) -> i64 {
    (0..events).map(|n| (n % 5 + 1) as i64).sum()
}

fn connector_yaml(name: &str, topic: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: 2000, max_wait: 100ms }}
events:
  com.example.retail.ShipmentReceived: {{ increment: {{ on_hand: quantity }} }}
"#
    )
}

async fn sum_on_hand(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(&format!("SELECT sum(on_hand)::bigint FROM \"{table}\""))
        .fetch_one(pool)
        .await
        .expect("sum")
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_swaps_atomically_while_reads_and_writes_go_on_and_rolls_back() {
    const FIRST: usize = 200_000;
    const DURING: usize = 20_000;
    let registry = support::start_registry().await;
    let topic = support::unique("shipments");
    let name = support::unique("rebuilt");
    support::create_topic(&topic, 3).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "schemas": {"received": support::catalogue_schema("com.example.retail.ShipmentReceived", 1)}});
    support::produce_with_python(&spec, (0..FIRST).map(shipment).collect()).await;
    let connector = connector_yaml(&name, &topic);
    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let mut live = project.start(0);
    let pool = support::postgres().await;
    let live_started = Instant::now();
    eventually(Duration::from_secs(240), "the live model to hold the first events", || async {
        (support::stored_positions(&pool, &name).await == FIRST as i64).then_some(())
    })
    .await;
    let live_seconds = live_started.elapsed().as_secs_f64();

    // A reader that must never see a missing or partial model: with only
    // shipments, the total can only grow.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop, table) = (pool.clone(), stop.clone(), name.clone());
        tokio::spawn(async move {
            let (mut reads, mut last, mut problems) = (0u64, 0i64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match sqlx::query_scalar::<_, Option<i64>>(&format!("SELECT sum(on_hand)::bigint FROM \"{table}\""))
                    .fetch_one(&pool)
                    .await
                {
                    Ok(total) => {
                        let total = total.unwrap_or(0);
                        if total < last {
                            problems.push(format!("the total went down from {last} to {total}"));
                        }
                        last = total;
                    }
                    Err(error) => problems.push(format!("read failed: {error}")),
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (reads, problems)
        })
    };
    let producer = {
        let spec = spec.clone();
        tokio::spawn(async move {
            for chunk in (FIRST..FIRST + DURING).collect::<Vec<_>>().chunks(5000) {
                support::produce_with_python(&spec, chunk.iter().map(|&n| shipment(n)).collect()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let (root, connector_name) = (project.root().to_path_buf(), name.clone());
    let rebuilt = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kawka")).args(["rebuild", &connector_name]).current_dir(&root).output()
    });
    let output = rebuilt.await.expect("thread").expect("kawka rebuild");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("previous version is kept as {name}_v1")), "{stdout}");
    producer.await.expect("producer");
    let total = (FIRST + DURING) as i64;
    eventually(Duration::from_secs(240), "the live connector to go on in the new table", || async {
        (support::stored_positions(&pool, &name).await == total).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (reads, problems) = reader.await.expect("reader");
    assert!(problems.is_empty(), "over {reads} reads: {problems:?}");
    assert!(reads > 100, "the reader kept reading: {reads}");
    let expected = expected_total(FIRST + DURING);
    assert_eq!(sum_on_hand(&pool, &name).await, expected, "after cut-over: the fold of the whole log, once");
    let rows: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{name}\"")).fetch_one(&pool).await.expect("count");
    assert_eq!(rows, 100, "(n % 20, n % 50) gives 100 (store, item) pairs");
    // Row writes per table (Postgres's own counters follow the renames):
    // large compacted batches write each key far fewer times.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row_writes = |table: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables WHERE schemaname = 'public' AND relname = $1",
            )
            .bind(table)
            .fetch_one(&pool)
            .await
            .expect("table statistics")
        }
    };
    let (live_writes, rebuilt_writes) = (row_writes(format!("{name}_v1")).await, row_writes(name.clone()).await);
    assert!(
        rebuilt_writes < live_writes,
        "the rebuild wrote {rebuilt_writes} rows (with the live writes since the cut-over), the live run {live_writes}"
    );
    eprintln!("{stdout}");
    eprintln!(
        "live connector: {FIRST} events in {live_seconds:.1} s ({:.0} events/s); reader: {reads} reads, none partial; \
         row writes: live table {live_writes}, rebuilt table {rebuilt_writes} (incl. live writes after the cut-over) \
         for {} events",
        FIRST as f64 / live_seconds,
        FIRST + DURING
    );

    // Rollback: the previous table is back and catches up from where it stopped.
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["rebuild", &name, "--rollback"])
        .current_dir(project.root())
        .output()
        .expect("rollback");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("kept as {name}_v2")));
    eventually(Duration::from_secs(120), "the previous table to catch up after the rollback", || async {
        (sum_on_hand(&pool, &name).await == expected).then_some(())
    })
    .await;
    assert_eq!(sum_on_hand(&pool, &format!("{name}_v2")).await, expected, "the rebuilt version is kept");
    assert_eq!(live.terminate().await, Some(0), "clean exit; log:\n{}", live.log());
    let _ = registry.stop().await; // cleanup only
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_over_http_reports_progress_and_rolls_back() {
    const FIRST: usize = 30_000;
    const AFTER: usize = 3_000;
    let registry = support::start_registry().await;
    let topic = support::unique("shipments");
    let name = support::unique("rebuilt_http");
    support::create_topic(&topic, 2).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "schemas": {"received": support::catalogue_schema("com.example.retail.ShipmentReceived", 1)}});
    support::produce_with_python(&spec, (0..FIRST).map(shipment).collect()).await;
    let project = Project::new(&registry.url(), &[(&name, &connector_yaml(&name, &topic))]);
    let mut live = project.start(0);
    let pool = support::postgres().await;
    eventually(Duration::from_secs(120), "the live model to hold the first events", || async {
        (support::stored_positions(&pool, &name).await == FIRST as i64).then_some(())
    })
    .await;
    let address =
        eventually(Duration::from_secs(30), "the http address", || async { support::http_address(&live.log()) }).await;
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let post = |path: String| {
        let (client, url) = (client.clone(), format!("{base}{path}"));
        async move { client.post(url).send().await.expect("http request") }
    };

    let started = post(format!("/connectors/{name}/rebuild")).await;
    assert_eq!(started.status(), 202, "{}", started.text().await.unwrap_or_default());
    let again = post(format!("/connectors/{name}/rebuild")).await;
    assert_eq!(again.status(), 409, "one rebuild at a time");
    assert_eq!(post("/connectors/nope/rebuild".to_string()).await.status(), 404);

    // Progress while it runs, then the outcome.
    let mut samples: Vec<Json> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let done = loop {
        assert!(Instant::now() < deadline, "the rebuild did not end: {samples:?}");
        let status: Json =
            reqwest::get(format!("{base}/connectors/{name}")).await.expect("get").json().await.expect("json");
        let rebuild = status["rebuild"].clone();
        samples.push(rebuild.clone());
        if rebuild["state"] != "running" {
            break rebuild;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["state"], "done", "{done}");
    assert!(done["message"].as_str().is_some_and(|m| m.contains(&format!("kept as {name}_v1"))), "{done}");
    assert_eq!(done["percent"], 100.0);
    let running: Vec<&Json> = samples.iter().filter(|s| s["state"] == "running").collect();
    assert!(!running.is_empty(), "progress was reported while running: {samples:?}");
    for sample in &running {
        let percent = sample["percent"].as_f64().expect("percent");
        assert!((0.0..=100.0).contains(&percent), "{sample}");
        assert!(sample["done"].as_u64().expect("done") <= FIRST as u64, "{sample}");
    }
    assert!(
        running.iter().any(|s| s["target"] == FIRST as u64),
        "the target is the live connector's positions: {running:?}"
    );
    let metrics = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains(&format!("kawka_rebuild_done_ratio{{connector=\"{name}\"}} 1")), "{metrics}");
    let status = Command::new(env!("CARGO_BIN_EXE_kawka")).args(["status", "--url", &base]).output().expect("status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains(&format!("rebuild of {name} (done): rebuilt {name}")), "{status}");

    // The live connector, fenced by the cut-over, goes on in the new table.
    assert_eq!(sum_on_hand(&pool, &name).await, expected_total(FIRST));
    support::produce_with_python(&spec, (FIRST..FIRST + AFTER).map(shipment).collect()).await;
    let expected = expected_total(FIRST + AFTER);
    eventually(Duration::from_secs(120), "the new events in the rebuilt table", || async {
        (sum_on_hand(&pool, &name).await == expected).then_some(())
    })
    .await;

    let rolled = post(format!("/connectors/{name}/rebuild/rollback")).await;
    assert_eq!(rolled.status(), 200);
    let rolled: Json = rolled.json().await.expect("json");
    assert!(rolled["result"].as_str().is_some_and(|r| r.contains(&format!("kept as {name}_v2"))), "{rolled}");
    eventually(Duration::from_secs(120), "the previous table to catch up after the rollback", || async {
        (sum_on_hand(&pool, &name).await == expected).then_some(())
    })
    .await;
    let cleaned: Json = post(format!("/connectors/{name}/rebuild/cleanup")).await.json().await.expect("json");
    assert_eq!(cleaned["result"], format!("dropped {name}_v2"));
    assert_eq!(live.terminate().await, Some(0), "clean exit; log:\n{}", live.log());
    let _ = registry.stop().await; // cleanup only
}
