//! `kawka run` end to end into Postgres, against the real stack: events
//! from the Confluent Python producer, every op, a consumer group split
//! over two processes, and `kill -9` crashes that must not lose or repeat
//! an effect.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value as Json};
use sqlx::Row;

use kawka::event::{Claim, PartitionOffset};
use support::{eventually, Project};

fn ops_schemas() -> Json {
    let record = |name: &str, fields: Json| support::record_schema("test.ops", name, fields);
    json!({
        "created": record("Created", json!([{"name": "id", "type": "string"}, {"name": "name", "type": "string"}, {"name": "email", "type": "string"}])),
        "renamed": record("Renamed", json!([{"name": "id", "type": "string"}, {"name": "new_name", "type": "string"}])),
        "visited": record("Visited", json!([{"name": "id", "type": "string"}, {"name": "count", "type": "int"}])),
        "unvisited": record("Unvisited", json!([{"name": "id", "type": "string"}, {"name": "count", "type": "int"}])),
        "removed": record("Removed", json!([{"name": "id", "type": "string"}])),
        "ignored": record("Ignored", json!([{"name": "id", "type": "string"}])),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_lands_with_the_right_values() {
    let registry = support::start_registry().await;
    let topic = support::unique("ops");
    let table = support::unique("ops");
    support::create_topic(&topic, 1).await;
    let connector = format!(
        r#"name: {table}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink:
  to: readdb
  table: {table}
  columns: {{ id: text, name: text, email: text, visits: bigint, created_at: timestamptz, last_offset: bigint }}
  primary_key: [id]
key: {{ id: $key }}
tombstones: delete
events:
  test.ops.Created:   {{ upsert: {{ name: name, email: lower(email), visits: 0, created_at: $timestamp, last_offset: $offset }} }}
  test.ops.Renamed:   {{ merge: {{ name: new_name, last_offset: $offset }} }}
  test.ops.Visited:   {{ increment: {{ visits: count }} }}
  test.ops.Unvisited: {{ decrement: {{ visits: count }} }}
  test.ops.Removed:   {{ delete: {{}} }}
"#
    );
    let project = Project::new(&registry.url(), &[(&table, &connector)]);
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": ops_schemas()});
    let event = |schema: &str, id: &str, value: Json| json!({"schema": schema, "key": id, "value": value});
    let first = vec![
        event("created", "a", json!({"id": "a", "name": "Ann", "email": "ANN@X.COM"})),
        event("visited", "a", json!({"id": "a", "count": 3})),
        event("visited", "a", json!({"id": "a", "count": 2})),
        event("unvisited", "a", json!({"id": "a", "count": 1})),
        event("created", "b", json!({"id": "b", "name": "Bob", "email": "b@x"})),
        event("visited", "c", json!({"id": "c", "count": 5})),
        event("created", "d", json!({"id": "d", "name": "Dee", "email": "d@x"})),
        json!({"key": "d", "value": null}),
        event("removed", "e", json!({"id": "e"})),
        event("ignored", "g", json!({"id": "g"})),
    ];
    support::produce_with_python(&spec, first).await;
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    let offsets_query = "SELECT next_offset FROM kawka_offsets WHERE connector = $1 AND topic = $2 AND partition = 0";
    let next_offset = || async {
        let next: Option<Option<i64>> =
            sqlx::query_scalar(offsets_query).bind(&table).bind(&topic).fetch_optional(&pool).await.ok().flatten();
        next.flatten()
    };
    eventually(Duration::from_secs(60), "the first events to be written", || async {
        (next_offset().await == Some(10)).then_some(())
    })
    .await;
    // A second round while kawka runs: ops on rows written by earlier batches.
    let second = vec![
        event("renamed", "a", json!({"id": "a", "new_name": "Annie"})),
        event("removed", "b", json!({"id": "b"})),
        event("renamed", "e", json!({"id": "e", "new_name": "Eve"})),
        event("created", "f", json!({"id": "f", "name": "Fay", "email": "f@x"})),
        event("renamed", "f", json!({"id": "f", "new_name": "Fiona"})),
        event("visited", "f", json!({"id": "f", "count": 7})),
        event("created", "f", json!({"id": "f", "name": "Fay2", "email": "F2@X"})),
    ];
    support::produce_with_python(&spec, second).await;
    eventually(Duration::from_secs(60), "the second events to be written", || async {
        (next_offset().await == Some(17)).then_some(())
    })
    .await;
    let rows = sqlx::query(&format!(
        "SELECT id, name, email, visits, created_at IS NOT NULL AND created_at > now() - interval '1 hour' AS fresh, \
         last_offset FROM \"{table}\" ORDER BY id"
    ))
    .fetch_all(&pool)
    .await
    .expect("read the table");
    type Row6 = (String, Option<String>, Option<String>, Option<i64>, Option<bool>, Option<i64>);
    let table_rows: Vec<Row6> =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))).collect();
    let s = |t: &str| Some(t.to_string());
    assert_eq!(
        table_rows,
        vec![
            // upsert, increments, decrement, then a merge in a later batch
            ("a".into(), s("Annie"), s("ann@x.com"), Some(4), Some(true), Some(10)),
            // increment of a missing row creates it with the delta
            ("c".into(), None, None, Some(5), Some(false), None),
            // delete then merge: the row starts again from nothing
            ("e".into(), s("Eve"), None, None, Some(false), Some(12)),
            // upsert, merge, increment, upsert: the last upsert replaces all
            ("f".into(), s("Fay2"), s("f2@x"), Some(0), Some(true), Some(16)),
        ],
        "b deleted by an event, d by a tombstone, g's event type is not in the connector"
    );
    assert_eq!(kawka.terminate().await, Some(0), "SIGTERM drains and exits 0; log:\n{}", kawka.log());
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

/// Inventory events: (topic, key, store, item, signed quantity).
fn inventory_events(count: usize, stores: usize, items: usize) -> Vec<(bool, String, String, i64)> {
    let mut rng = rand::rng();
    (0..count)
        .map(|_| {
            let store = format!("s{}", rng.random_range(0..stores));
            let item = format!("i{}", rng.random_range(0..items));
            let shipment = rng.random_bool(0.5);
            (shipment, store, item, rng.random_range(1..20))
        })
        .collect()
}

fn inventory_records(events: &[(bool, String, String, i64)], first_id: usize) -> (Vec<Json>, Vec<Json>) {
    let (mut shipments, mut sales) = (Vec::new(), Vec::new());
    for (n, (shipment, store, item, quantity)) in events.iter().enumerate() {
        let id = format!("e{}", first_id + n);
        let key = format!("{store}:{item}");
        if *shipment {
            shipments.push(json!({"schema": "shipment", "key": key, "value": {"shipment_id": id, "store_id": store,
                "item_id": item, "quantity": quantity, "received_at": 1_700_000_000_000i64}}));
        } else {
            sales.push(json!({"schema": "sale", "key": key, "value": {"sale_id": id, "store_id": store,
                "item_id": item, "quantity": quantity, "sold_at": 1_700_000_000_000i64}}));
        }
    }
    (shipments, sales)
}

/// Shipments minus sales per (store, item): the fold the table must equal.
fn expected_on_hand(events: &[(bool, String, String, i64)]) -> BTreeMap<(String, String), i64> {
    let mut expected = BTreeMap::new();
    for (shipment, store, item, quantity) in events {
        *expected.entry((store.clone(), item.clone())).or_insert(0) += if *shipment { *quantity } else { -quantity };
    }
    expected
}

fn inventory_connector(name: &str, table: &str, shipments: &str, sales: &str, max_events: usize) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [{shipments}, {sales}], start: earliest, properties: {{ session.timeout.ms: "6000", heartbeat.interval.ms: "1000" }} }}
sink:
  to: readdb
  table: {table}
  columns: {{ store_id: text, item_id: text, on_hand: bigint }}
  primary_key: [store_id, item_id]
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_events: {max_events}, max_wait: 100ms }}
events:
  com.example.retail.ShipmentReceived: {{ increment: {{ on_hand: quantity }} }}
  com.example.retail.ItemSold:         {{ decrement: {{ on_hand: quantity }} }}
"#
    )
}

async fn produce_inventory(registry: &str, shipments: &str, sales: &str, records: (Vec<Json>, Vec<Json>)) {
    let schemas = |name: &str, event_type: &str| json!({ name: support::catalogue_schema(event_type, 1) });
    let shipment_spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry, "topic": shipments,
        "schemas": schemas("shipment", "com.example.retail.ShipmentReceived")});
    let sale_spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry, "topic": sales,
        "schemas": schemas("sale", "com.example.retail.ItemSold")});
    let (a, b) = tokio::join!(
        support::produce_with_python(&shipment_spec, records.0),
        support::produce_with_python(&sale_spec, records.1)
    );
    assert!(a.produced + b.produced > 0);
}

async fn read_on_hand(pool: &sqlx::PgPool, table: &str) -> BTreeMap<(String, String), i64> {
    sqlx::query(&format!("SELECT store_id, item_id, on_hand FROM \"{table}\""))
        .fetch_all(pool)
        .await
        .map(|rows| rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_in_one_group_split_the_partitions_and_agree_with_one() {
    let registry = support::start_registry().await;
    let (shipments, sales) = (support::unique("shipments"), support::unique("sales"));
    support::create_topic(&shipments, 3).await;
    support::create_topic(&sales, 3).await;
    let events = inventory_events(6000, 5, 20);
    produce_inventory(&registry.url(), &shipments, &sales, inventory_records(&events, 0)).await;
    let expected = expected_on_hand(&events);

    let (pair, single) = (support::unique("pair"), support::unique("single"));
    let pair_project =
        Project::new(&registry.url(), &[(&pair, &inventory_connector(&pair, &pair, &shipments, &sales, 500))]);
    let single_project =
        Project::new(&registry.url(), &[(&single, &inventory_connector(&single, &single, &shipments, &sales, 500))]);
    let mut first = pair_project.start(0);
    let mut second = pair_project.start(1);
    let mut alone = single_project.start(0);
    let pool = support::postgres().await;
    eventually(Duration::from_secs(120), "both tables to hold every event", || async {
        (support::stored_positions(&pool, &pair).await == 6000
            && support::stored_positions(&pool, &single).await == 6000)
            .then_some(())
    })
    .await;
    assert_eq!(read_on_hand(&pool, &pair).await, expected, "two processes: shipments minus sales");
    assert_eq!(read_on_hand(&pool, &single).await, expected, "one process: shipments minus sales");
    for (n, process) in [&first, &second].iter().enumerate() {
        let log = process.log();
        assert!(
            log.lines().any(|line| line.contains("partitions assigned") && line.contains(&format!("{shipments}/"))
                || line.contains("partitions assigned") && line.contains(&format!("{sales}/"))),
            "process {n} never got a partition:\n{log}"
        );
    }
    for process in [&mut first, &mut second, &mut alone] {
        assert_eq!(process.terminate().await, Some(0), "clean exit; log:\n{}", process.log());
    }
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 10_000;
    let registry = support::start_registry().await;
    let (shipments, sales) = (support::unique("shipments"), support::unique("sales"));
    support::create_topic(&shipments, 3).await;
    support::create_topic(&sales, 3).await;
    let name = support::unique("crash");
    // Small batches: many commits for the kills to fall between.
    let project = Project::new(&registry.url(), &[(&name, &inventory_connector(&name, &name, &shipments, &sales, 50))]);
    let pool = support::postgres().await;
    let all_events = inventory_events(ROUNDS * PER_ROUND, 20, 50);
    produce_inventory(&registry.url(), &shipments, &sales, inventory_records(&all_events, 0)).await;
    let total = (ROUNDS * PER_ROUND) as i64;
    // Each round starts kawka, waits until it has written something new,
    // then kills it at a random moment of its writing.
    let mut kills = 0;
    let mut progress_at_kills = Vec::new();
    let mut before = 0;
    for round in 0..ROUNDS {
        let mut kawka = project.start(round);
        // Polled closely: the kill must come while this run is writing.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let started = loop {
            let now = support::stored_positions(&pool, &name).await;
            if now > before {
                break now;
            }
            assert!(std::time::Instant::now() < deadline, "round {round}: kawka wrote nothing after a restart");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(started < total, "round {round}: the run finished before the kill; make it longer");
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..300))).await;
        kawka.kill9();
        kills += 1;
        before = support::stored_positions(&pool, &name).await;
        progress_at_kills.push(before);
    }
    assert!(
        progress_at_kills.iter().all(|&p| p > 0 && p < total),
        "every kill must land mid-run: positions at kills {progress_at_kills:?} of {total}"
    );
    let mut last = project.start(ROUNDS);
    eventually(Duration::from_secs(180), "every event to be written after the last restart", || async {
        (support::stored_positions(&pool, &name).await == total).then_some(())
    })
    .await;
    assert_eq!(last.terminate().await, Some(0), "clean exit; log:\n{}", last.log());
    let expected = expected_on_hand(&all_events);
    let actual = read_on_hand(&pool, &name).await;
    let wrong: Vec<_> = expected.iter().filter(|(key, value)| actual.get(*key) != Some(value)).take(5).collect();
    assert!(wrong.is_empty(), "after {kills} kills, rows differ from shipments minus sales: {wrong:?}");
    assert_eq!(actual.len(), expected.len());
    eprintln!("{kills} kills, positions at each kill: {progress_at_kills:?}");
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

/// A batch whose partitions committed only in part (a crash, or one
/// partition's transaction failing) is written again by the retry: the
/// shares that committed are skipped, the others applied, nothing twice;
/// and a batch from a fenced owner changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_partial_commit_applies_each_partition_once() {
    use kawka::event::PartitionOffset;
    use kawka::event::Position;
    use kawka::projection::OpKind;
    use kawka::projection::WriteOp;
    use kawka::sink::SinkError;
    use kawka::value::{intern, Value};

    let name = support::unique("partial");
    let connector = inventory_connector(&name, &name, "unused-shipments", "unused-sales", 100);
    let project = Project::new("http://127.0.0.1:9", &[(&name, &connector)]);
    let sink = postgres_sinks(&project).remove(0);
    sink.prepare().await.expect("prepare");
    let topic = intern("shipments");
    let claims = sink.claim(&[(topic, 0), (topic, 1)]).await.expect("claim");
    let epoch = |partition: i32| claims.iter().find(|c| c.partition == partition).and_then(|c| c.epoch);
    // Five increments of one key per partition.
    let ops: Vec<WriteOp> = (0..10)
        .map(|n| WriteOp {
            key: vec![Value::from(format!("s{}", n % 2)), Value::Str("i".into())].into(),
            kind: OpKind::Increment,
            fields: smallvec::smallvec![(intern("on_hand"), Value::Int(1))],
            version: None,
            position: Position { topic, partition: n % 2, offset: i64::from(n / 2) },
        })
        .collect();
    let offsets: Vec<PartitionOffset> =
        (0..2).map(|p| PartitionOffset { topic, partition: p, next_offset: 5, epoch: epoch(p) }).collect();
    sink.write(&ops, &offsets).await.expect("first write");

    // Partition 1's share "did not commit": undo its effect and position.
    let pool = support::postgres().await;
    sqlx::query(&format!("DELETE FROM \"{name}\" WHERE store_id = 's1'")).execute(&pool).await.expect("undo rows");
    sqlx::query("UPDATE kawka_offsets SET next_offset = NULL WHERE connector = $1 AND partition = 1")
        .bind(&name)
        .execute(&pool)
        .await
        .expect("undo position");
    // The retry must not even try partition 0's share again: a check that
    // its second application would break does not refuse the batch.
    let cap = format!("ALTER TABLE \"{name}\" ADD CONSTRAINT at_most_five CHECK (on_hand <= 5)");
    sqlx::query(&cap).execute(&pool).await.expect("add the check");
    sink.write(&ops, &offsets).await.expect("the retry");
    assert_eq!(
        read_on_hand(&pool, &name).await,
        BTreeMap::from([(("s0".into(), "i".into()), 5), (("s1".into(), "i".into()), 5)]),
        "each partition's increments applied once"
    );
    let uncap = format!("ALTER TABLE \"{name}\" DROP CONSTRAINT at_most_five");
    sqlx::query(&uncap).execute(&pool).await.expect("drop the check");

    // Another owner claims partition 0: this owner's next batch is refused whole.
    sink.claim(&[(topic, 0)]).await.expect("a new owner");
    let later: Vec<PartitionOffset> =
        (0..2).map(|p| PartitionOffset { topic, partition: p, next_offset: 10, epoch: epoch(p) }).collect();
    let mut more = ops.clone();
    more.iter_mut().for_each(|op| op.position.offset += 5);
    assert!(matches!(sink.write(&more, &later).await, Err(SinkError::Fenced)));
    let s0: i64 = sqlx::query_scalar(&format!("SELECT on_hand FROM \"{name}\" WHERE store_id = 's0'"))
        .fetch_one(&pool)
        .await
        .expect("s0");
    assert_eq!(s0, 5, "the fenced partition's share was not applied");
    let s1: i64 = sqlx::query_scalar(&format!("SELECT on_hand FROM \"{name}\" WHERE store_id = 's1'"))
        .fetch_one(&pool)
        .await
        .expect("s1");
    assert_eq!(s1, 10, "the partition still owned went on");
}

/// The Postgres sinks of a project's connectors, built as `kawka run` does.
fn postgres_sinks(project: &Project) -> Vec<kawka::sink::postgres::PostgresSink> {
    support::sinks(project)
        .into_iter()
        .map(|sink| match sink {
            kawka::sink::Sink::Postgres(sink) => sink,
            _ => panic!("a postgres connector"),
        })
        .collect()
}

fn typed_connector(name: &str) -> String {
    format!(
        r#"name: {name}
source: {{ topics: [unused-typed] }}
sink:
  to: readdb
  table: {name}
  columns: {{ id: text, label: text, n: bigint, small: smallint, ratio: double precision, r: real, flag: boolean, blob: bytea, at: timestamptz, born: date, doc: jsonb, amount: numeric }}
  primary_key: [id]
key: {{ id: id }}
events:
  test.Typed: {{ upsert: {{ label: label, n: n, small: small, ratio: ratio, r: r, flag: flag, blob: blob, at: at, born: born, doc: doc, amount: amount }} }}
  test.Counted: {{ increment: {{ n: n }} }}
"#
    )
}

/// New keys go in by `COPY`, and a `COPY` that meets a key falls back to
/// the upsert: both paths give the same rows, and an increment lands once
/// whichever path wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_and_upserted_rows_are_the_same() {
    use kawka::event::PartitionOffset;
    use kawka::event::Position;
    use kawka::projection::OpKind;
    use kawka::projection::WriteOp;
    use kawka::value::{intern, Value};

    let (fresh, existing) = (support::unique("typed_fresh"), support::unique("typed_existing"));
    let project = Project::new(
        "http://127.0.0.1:9",
        &[(&fresh, &typed_connector(&fresh)), (&existing, &typed_connector(&existing))],
    );
    let sinks = postgres_sinks(&project);
    let topic = intern("unused-typed");
    for sink in &sinks {
        sink.prepare().await.expect("prepare");
        sink.claim(&[(topic, 0)]).await.expect("claim");
    }
    let pool = support::postgres().await;
    let text = |s: &str| Value::from(s);
    let row = |id: &str, label: Value, ratio: f64, r: f64, blob: &[u8], doc: Value| -> Vec<(&'static str, Value)> {
        vec![
            ("label", label),
            ("n", Value::Int(-9_007_199_254_740_993)),
            ("small", Value::Int(7)),
            ("ratio", Value::Float(ratio)),
            ("r", Value::Float(r)),
            ("flag", Value::Bool(id.ends_with('1'))),
            ("blob", Value::Bytes(blob.to_vec())),
            ("at", Value::Int(1_700_000_000_123)),
            ("born", Value::Int(19_723)),
            ("doc", doc),
            ("amount", Value::Float(0.1)),
        ]
    };
    let mut rows = [
        ("k0", row("k0", text("tab\there\nnew line\\ back\\slash \\N"), 0.1, 0.1, b"\x00\\\t\xff", text("x"))),
        (
            "k1",
            row(
                "k1",
                text("caf\u{e9} \u{1f600}"),
                f64::NAN,
                3.4e38,
                b"",
                Value::Array(vec![Value::Int(1), text("a\nb")]),
            ),
        ),
        ("k2", row("k2", Value::Null, f64::NEG_INFINITY, 1.000_000_1, b"\\N", Value::Null)),
        ("k3", row("k3", text(""), 1e-310, -0.0, b"x", text("\\"))),
    ];
    rows[3].1.retain(|(name, _)| *name != "small"); // an unlisted column is null
    let ops: Vec<WriteOp> = rows
        .iter()
        .enumerate()
        .map(|(n, (id, fields))| WriteOp {
            key: vec![text(id)].into(),
            kind: OpKind::Upsert,
            fields: fields.iter().map(|(name, value)| (intern(name), value.clone())).collect(),
            version: None,
            position: Position { topic, partition: 0, offset: n as i64 },
        })
        .collect();
    let offsets = |next: i64| [PartitionOffset { topic, partition: 0, next_offset: next, epoch: Some(1) }];
    // The second table has the keys already (with other values): its copy
    // meets them and its rows are upserted, the first table's copied.
    sqlx::query(&format!(
        "INSERT INTO \"{existing}\" (id, label, n) SELECT 'k' || i, 'old', 1 FROM generate_series(0, 3) i"
    ))
    .execute(&pool)
    .await
    .expect("existing keys");
    for sink in &sinks {
        sink.write(&ops, &offsets(4)).await.expect("write");
    }
    let read = |table: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT string_agg(row_to_json(t)::text, E'\\n' ORDER BY id) FROM \"{table}\" AS t"
            ))
            .fetch_one(&pool)
            .await
            .expect("read")
        }
    };
    let copied = read(fresh.clone()).await;
    assert_eq!(copied, read(existing.clone()).await, "copied and upserted rows differ");
    let expected = [
        r#"{"id":"k0","label":"tab\there\nnew line\\ back\\slash \\N","n":-9007199254740993,"small":7,"ratio":0.1,"r":0.1,"flag":false,"blob":"\\x005c09ff","at":"2023-11-14T22:13:20.123+00:00","born":"2024-01-01","doc":"x","amount":0.1}"#,
        r#"{"id":"k1","label":"café 😀","n":-9007199254740993,"small":7,"ratio":"NaN","r":3.4e+38,"flag":true,"blob":"\\x","at":"2023-11-14T22:13:20.123+00:00","born":"2024-01-01","doc":[1, "a\nb"],"amount":0.1}"#,
        r#"{"id":"k2","label":null,"n":-9007199254740993,"small":7,"ratio":"-Infinity","r":1.0000001,"flag":false,"blob":"\\x5c4e","at":"2023-11-14T22:13:20.123+00:00","born":"2024-01-01","doc":null,"amount":0.1}"#,
        r#"{"id":"k3","label":"","n":-9007199254740993,"small":null,"ratio":1e-310,"r":-0,"flag":false,"blob":"\\x78","at":"2023-11-14T22:13:20.123+00:00","born":"2024-01-01","doc":"\\","amount":0.1}"#,
    ];
    assert_eq!(copied, expected.join("\n"));

    // Increments: k0 exists, k9 is new. The first table's sink expects new
    // keys, tries COPY, meets k0 and runs the upsert (the next writes of
    // this shape run the upsert without trying COPY).
    let count = |id: &str, n: i64, offset: i64| WriteOp {
        key: vec![text(id)].into(),
        kind: OpKind::Increment,
        fields: smallvec::smallvec![(intern("n"), Value::Int(n))],
        version: None,
        position: Position { topic, partition: 0, offset },
    };
    let sink = sinks.iter().find(|s| s.table().target().table == fresh).expect("the fresh table's sink");
    sink.write(&[count("k0", 10, 4), count("k9", 5, 5)], &offsets(6)).await.expect("increments");
    // A row whose update its trigger skips: the upsert (no COPY now) skips
    // it as well, and applies the other rows once.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION \"{fresh}_skip\"() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$; \
         INSERT INTO \"{fresh}\" (id, n) VALUES ('k8', 100); \
         CREATE TRIGGER skip BEFORE UPDATE ON \"{fresh}\" FOR EACH ROW WHEN (OLD.id = 'k8') EXECUTE FUNCTION \"{fresh}_skip\"()"
    ))
    .execute(&pool)
    .await
    .expect("trigger");
    sink.write(&[count("k0", 1, 6), count("k8", 1, 7), count("k7", 2, 8)], &offsets(9)).await.expect("fallback");
    let counts: Vec<(String, Option<i64>)> =
        sqlx::query_as(&format!("SELECT id, n FROM \"{fresh}\" WHERE id IN ('k0', 'k7', 'k8', 'k9') ORDER BY id"))
            .fetch_all(&pool)
            .await
            .expect("counts");
    let base = -9_007_199_254_740_993;
    assert_eq!(
        counts,
        vec![("k0".into(), Some(base + 11)), ("k7".into(), Some(2)), ("k8".into(), Some(100)), ("k9".into(), Some(5))],
        "each increment once; k8's update skipped by its trigger"
    );
}

/// `on_error: stop` with the bad event found by Postgres itself (a check
/// constraint), while the next batch is already built: the events before
/// the bad one are written, nothing from it on, and the position stays at
/// the bad event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_commits_nothing_past_an_event_postgres_refuses() {
    let registry = support::start_registry().await;
    let topic = support::unique("stop");
    let table = support::unique("stop");
    support::create_topic(&topic, 1).await;
    let pool = support::postgres().await;
    sqlx::query(&format!("CREATE TABLE \"{table}\" (id text PRIMARY KEY, n bigint CHECK (n < 1000))"))
        .execute(&pool)
        .await
        .expect("create the table with its check");
    let connector = id_n_connector(&table, &topic, "on_error: stop", 2, "test.stop.Set: { upsert: { n: n } }");
    let project = Project::new(&registry.url(), &[(&table, &connector)]);
    let spec = id_n_spec(&registry.url(), &topic, "test.stop", "Set");
    // Offsets 0..10; offset 3 breaks the check. With batches of two, the
    // batch after [2, 3] is built while [2, 3] is being written.
    let events: Vec<Json> = (0..10)
        .map(|i| {
            let n = if i == 3 { 5000 } else { i };
            json!({"schema": "event", "key": format!("k{i}"), "value": {"id": format!("k{i}"), "n": n}})
        })
        .collect();
    support::produce_with_python(&spec, events).await;
    let mut kawka = project.start(0);
    // One partition: the stored positions are its next offset.
    eventually(Duration::from_secs(60), "the events before the bad one", || async {
        (support::stored_positions(&pool, &table).await == 3).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "the connector to stop", || async {
        kawka.log().contains("connector stopped").then_some(())
    })
    .await;
    let ids: Vec<String> = sqlx::query_scalar(&format!("SELECT id FROM \"{table}\" ORDER BY id"))
        .fetch_all(&pool)
        .await
        .expect("read the table");
    assert_eq!(ids, ["k0", "k1", "k2"], "nothing from the bad event on; log:\n{}", kawka.log());
    assert_eq!(support::stored_positions(&pool, &table).await, 3, "the position stays at the bad event");
    let _ = kawka.terminate().await;
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

/// Consecutive batches of one partition are written concurrently, each
/// committing after the one before it. When one of them fails (Postgres
/// refuses an event), the batches chained to it roll back and are written
/// again after it: every other event is applied exactly once.
#[tokio::test]
async fn a_batch_chained_to_one_that_fails_is_written_after_it_exactly_once() {
    let registry = support::start_registry().await;
    let topic = support::unique("chain");
    let table = support::unique("chain");
    support::create_topic(&topic, 1).await;
    let pool = support::postgres().await;
    // Refuses a large n as a check would, but only after half a second:
    // the batches after the bad one are cut and chained to its write
    // before it fails.
    id_n_table(
        &pool,
        &table,
        "IF NEW.n >= 1000 THEN PERFORM pg_sleep(0.5); \
           RAISE EXCEPTION 'n is too large' USING ERRCODE = 'check_violation'; END IF;",
    )
    .await;
    let policy = format!("on_error: dead_letter\ndead_letter_topic: {topic}.dlq");
    let connector = id_n_connector(&table, &topic, &policy, 5, "test.chain.Add: { increment: { n: n } }");
    let project = Project::new(&registry.url(), &[(&table, &connector)]);
    let spec = id_n_spec(&registry.url(), &topic, "test.chain", "Add");
    // 200 keys, one event each (batches share no key, so they chain);
    // offset 12 breaks the check, in the third batch of five.
    let total = 200;
    let events: Vec<Json> = (0..total)
        .map(|i| {
            let n = if i == 12 { 5000 } else { 1 };
            json!({"schema": "event", "key": format!("k{i:03}"), "value": {"id": format!("k{i:03}"), "n": n}})
        })
        .collect();
    let (mut kawka, rows) = write_all_and_read(&project, &spec, events, &pool, &table).await;
    let expected: Vec<(String, i64)> = (0..total).filter(|&i| i != 12).map(|i| (format!("k{i:03}"), 1)).collect();
    assert_eq!(rows, expected, "each good event once, the bad one not at all; log:\n{}", kawka.log());
    let dead = support::consume(&format!("{topic}.dlq"), 1, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 1, "the refused event is dead-lettered");
    // The batches written behind the failed one did fail, and were written
    // again: the test did exercise the chaining it is about.
    assert!(
        kawka.log().contains("an earlier batch of a partition of this batch was not written"),
        "no batch followed the failed one; log:\n{}",
        kawka.log()
    );
    let _ = kawka.terminate().await;
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_batches_sharing_keys_apply_in_order_without_deadlocks() {
    let registry = support::start_registry().await;
    let topic = support::unique("share");
    let table = support::unique("share");
    support::create_topic(&topic, 1).await;
    let pool = support::postgres().await;
    // Every row write takes a while, so each batch is still running its
    // statements when the next one, which writes the same two keys in the
    // other order, is handed to the sink.
    id_n_table(&pool, &table, "PERFORM pg_sleep(0.02);").await;
    let connector = id_n_connector(&table, &topic, "on_error: stop", 2, "test.share.Set: { upsert: { n: n } }");
    let project = Project::new(&registry.url(), &[(&table, &connector)]);
    let spec = id_n_spec(&registry.url(), &topic, "test.share", "Set");
    // Batch j (two events) sets a and b, in the other order from batch j - 1.
    let total = 40;
    let events: Vec<Json> = (0..total)
        .map(|i| {
            let first = if (i / 2) % 2 == 0 { "a" } else { "b" };
            let key = if i % 2 == 0 {
                first
            } else if first == "a" {
                "b"
            } else {
                "a"
            };
            json!({"schema": "event", "key": key, "value": {"id": key, "n": i}})
        })
        .collect();
    let (mut kawka, rows) = write_all_and_read(&project, &spec, events, &pool, &table).await;
    // The last batch (19) wrote b = 38, then a = 39: the newest values won.
    assert_eq!(rows, vec![("a".to_string(), 39), ("b".to_string(), 38)], "log:\n{}", kawka.log());
    // A batch that ran its statements beside the one before it would lock
    // the rows in the other order: Postgres would find a deadlock and
    // abort one, and the batch would be written again.
    let log = kawka.log();
    assert!(!log.contains("deadlock") && !log.contains("writing it again"), "log:\n{log}");
    let _ = kawka.terminate().await;
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

/// A batch split by partition writes each share in a transaction of its
/// own. A share that has run its statements commits without waiting for
/// the others to run theirs: otherwise another writer of the same rows (a
/// replica whose partitions share keys with these) could wait in Postgres
/// for one share while the other waited for that writer, a deadlock that
/// Postgres cannot see (one of its waits is inside kawka), held until the
/// idle share's connection timed out (2 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_that_ran_commits_without_waiting_for_the_others() {
    let pool = support::postgres().await;
    // Writing row a takes a second: the share that writes a and then j
    // reaches j only after the other writer has taken it.
    let slow_a = "IF NEW.id = 'a' AND NEW.n > 0 THEN PERFORM pg_sleep(1); END IF;";
    let (table, topic, mut sinks) = slow_row_replicas(&pool, "shares", slow_a, &["a", "j", "k"], 2, "").await;
    let (a, b) = (sinks.remove(0), sinks.remove(0));
    let a_claims = a.claim(&[(topic, 0), (topic, 1)]).await.expect("claim");
    let b_claims = b.claim(&[(topic, 2)]).await.expect("claim");
    let add = |id, n, partition, offset| increment(topic, id, n, partition, offset);
    let at = |claims: &[Claim], partition, next_offset| position(claims, topic, partition, next_offset);
    // Writer a: partition 0 adds to k, partition 1 to a (slow) then j: two
    // shares. Writer b, a moment later: j then k, one transaction. b takes
    // j and waits for k (held by a's first share, which has run); a's
    // second share then waits for j.
    let a_batch = [add("k", 1, 0, 0), add("a", 1, 1, 0), add("j", 1, 1, 1)];
    let b_batch = [add("j", 10, 2, 0), add("k", 10, 2, 1)];
    let (a_offsets, b_offsets) = ([at(&a_claims, 0, 1), at(&a_claims, 1, 2)], [at(&b_claims, 2, 2)]);
    let writes = async {
        tokio::join!(a.write(&a_batch, &a_offsets), async {
            sleeping(&pool, &table).await;
            b.write(&b_batch, &b_offsets).await
        })
    };
    let (written_a, written_b) = tokio::time::timeout(Duration::from_secs(30), writes)
        .await
        .expect("both writes end within 30 s: none waits for a share that waits for it");
    written_a.expect("writer a");
    written_b.expect("writer b");
    let rows = id_n_rows(&pool, &table).await;
    assert_eq!(rows, vec![("a".into(), 1), ("j".into(), 11), ("k".into(), 11)]);
}

/// A batch whose statements ran waits, holding its rows, for the batch
/// before it (same partition) to commit. If that one waits in Postgres for
/// another replica that waits for these rows, the three wait in a cycle
/// Postgres could not see (one wait was in kawka only): it held until the
/// idle connection's timeout (2 minutes). The waiting batch now also waits
/// for the one before in Postgres (its transaction's advisory lock), so
/// Postgres finds the deadlock and fails one of the three (40P01), which
/// is written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_through_a_batch_waiting_for_the_one_before_is_a_deadlock_postgres_breaks() {
    use kawka::sink::Follows;

    let pool = support::postgres().await;
    // Writer b's update of y takes two seconds, holding y, before it
    // reaches z (an update: a `COPY` tried first holds no row it fails on).
    let slow_y = "IF TG_OP = 'UPDATE' AND NEW.id = 'y' AND NEW.n = 10 THEN PERFORM pg_sleep(2); END IF;";
    let (table, topic, mut sinks) = slow_row_replicas(&pool, "giveway", slow_y, &["y", "z"], 2, "").await;
    let (a, b) = (sinks.remove(0), sinks.remove(0));
    let a_claims = a.claim(&[(topic, 0)]).await.expect("claim");
    let b_claims = b.claim(&[(topic, 1)]).await.expect("claim");
    let add = |id, n, partition, offset| increment(topic, id, n, partition, offset);
    let at = |claims: &[Claim], partition, next_offset| position(claims, topic, partition, next_offset);
    // Writer a's two batches of partition 0, chained as the pipeline
    // chains them: the second (z) runs beside the first (y) and commits
    // after it. Writer b: y (slow) then z, one transaction, started first.
    let (first, second) = ([add("y", 1, 0, 0)], [add("z", 1, 0, 1)]);
    let (first_at, second_at) = ([at(&a_claims, 0, 1)], [at(&a_claims, 0, 2)]);
    let b_batch = [add("y", 10, 1, 0), add("z", 10, 1, 1)];
    let b_at = [at(&b_claims, 1, 2)];
    let first_plan = a.plan(&first, &[], &first_at).expect("plan");
    let second_plan = a.plan(&second, &[], &second_at).expect("plan");
    // As the pipeline makes them: a write's two steps share its
    // transactions' locks, and the second write's name the first's.
    let first_steps = steps(&[]);
    let (first_ran, first_committed) = (first_steps.ran, first_steps.committed);
    let after_first = Follows { ran: Vec::new(), committed: vec![first_steps.committed_seen] };
    let second_ran = steps(&after_first.committed).ran;
    let writes = async {
        tokio::join!(b.write(&b_batch, &b_at), async {
            // b holds y (its trigger sleeps) when a's batches start: the
            // first waits for y, the second takes z, then b waits for z.
            sleeping(&pool, &table).await;
            tokio::join!(
                async {
                    let written = a.write_planned(&first_plan, &first, &Follows::default(), first_ran).await;
                    first_committed.send(written.is_ok());
                    written
                },
                a.write_planned(&second_plan, &second, &after_first, second_ran)
            )
        })
    };
    let (written_b, (written_first, written_second)) = tokio::time::timeout(Duration::from_secs(30), writes)
        .await
        .expect("all three writes end within 30 s: Postgres sees the cycle");
    // Postgres failed one of the cycle (the one whose deadlock check ran
    // first); the second batch fails with the first if that was the one.
    let failed: Vec<String> = [&written_b, &written_first, &written_second]
        .iter()
        .filter_map(|written| written.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.iter().any(|f| f.contains("40P01")) && failed.len() <= 2,
        "Postgres broke the cycle as a deadlock: {failed:?}"
    );
    // Written again, oldest first, as the pipeline does with failed writes.
    if written_b.is_err() {
        b.write(&b_batch, &b_at).await.expect("writer b, again");
    }
    if written_first.is_err() {
        a.write(&first, &first_at).await.expect("the first batch, again");
    }
    if written_second.is_err() {
        a.write(&second, &second_at).await.expect("the second batch, again");
    }
    let rows = id_n_rows(&pool, &table).await;
    assert_eq!(rows, vec![("y".into(), 11), ("z".into(), 11)]);
}

/// A sink with one connection writes a batch of several partitions in one
/// transaction: split per partition, the first share held the connection
/// (its commit waits for every share to run) while the next waited for
/// one, until the pool timed out, on every retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_writes_batches_of_several_partitions() {
    let registry = support::start_registry().await;
    let topic = support::unique("onecon");
    let table = support::unique("onecon");
    support::create_topic(&topic, 3).await;
    let pool = support::postgres().await;
    id_n_table(&pool, &table, "").await;
    // One batch of every event: flushed by its deadline, after the source
    // has handed over the records of all three partitions.
    let connector = id_n_connector(&table, &topic, "on_error: stop", 1000, "test.onecon.Set: { upsert: { n: n } }");
    let project = Project::new(&registry.url(), &[(&table, &connector)]);
    let config = project.root().join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    let one = text.replacen("type: postgres, url: ", "type: postgres, max_connections: 1, url: ", 1);
    assert_ne!(one, text, "the sink's line is where this test expects it");
    std::fs::write(&config, one).expect("config");
    let spec = id_n_spec(&registry.url(), &topic, "test.onecon", "Set");
    let events: Vec<Json> = (0..60)
        .map(|i| json!({"schema": "event", "key": format!("k{i}"), "value": {"id": format!("k{i}"), "n": i}}))
        .collect();
    let (mut kawka, rows) = write_all_and_read(&project, &spec, events, &pool, &table).await;
    assert_eq!(rows.len(), 60, "log:\n{}", kawka.log());
    let partitions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kawka_offsets WHERE connector = $1 AND next_offset > 0")
            .bind(&table)
            .fetch_one(&pool)
            .await
            .expect("positions");
    assert_eq!(partitions, 3, "the events were spread over the three partitions");
    // Split per partition, the write failed with the pool's timeout and was
    // retried, committing one partition's share a time.
    let log = kawka.log();
    assert!(!log.contains("retrying") && !log.contains("writing it again"), "log:\n{log}");
    let _ = kawka.terminate().await;
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

/// The rows of an `(id, n)` table, by id.
async fn id_n_rows(pool: &sqlx::PgPool, table: &str) -> Vec<(String, i64)> {
    sqlx::query_as(&format!("SELECT id, n FROM \"{table}\" ORDER BY id")).fetch_all(pool).await.expect("rows")
}

/// A table `(id, n)` of `rows` (each 0) whose `BEFORE` trigger runs
/// `slow` (what makes a test's write slow), and `replicas` sinks of one
/// connector of it, prepared (the positions' table, on a database no
/// other test has used yet). The connector's topic is never read: the
/// tests write through the sinks, whose URL ends with `url_query`
/// (settings of their sessions; empty for none).
async fn slow_row_replicas(
    pool: &sqlx::PgPool,
    prefix: &str,
    slow: &str,
    rows: &[&str],
    replicas: usize,
    url_query: &str,
) -> (String, kawka::value::Name, Vec<kawka::sink::postgres::PostgresSink>) {
    let table = support::unique(prefix);
    id_n_table(pool, &table, slow).await;
    let values: Vec<String> = rows.iter().map(|id| format!("('{id}', 0)")).collect();
    sqlx::query(&format!("INSERT INTO \"{table}\" (id, n) VALUES {}", values.join(", ")))
        .execute(pool)
        .await
        .expect("rows");
    let topic = format!("unused-{table}");
    let connector = id_n_connector(&table, &topic, "on_error: stop", 100, "test.Add: { increment: { n: n } }");
    let sinks: Vec<_> = (0..replicas)
        .map(|_| {
            let project = Project::new("http://127.0.0.1:9", &[(&table, &connector)]);
            let config = project.root().join("config/kawka.yaml");
            let text = std::fs::read_to_string(&config).expect("config");
            let url = support::database_url();
            let with_query = text.replacen(&format!("url: \"{url}\""), &format!("url: \"{url}{url_query}\""), 1);
            assert!(url_query.is_empty() || with_query != text, "the sink's URL is where this test expects it");
            std::fs::write(&config, with_query).expect("config");
            postgres_sinks(&project).remove(0)
        })
        .collect();
    sinks[0].prepare().await.expect("prepare");
    (table, kawka::value::intern(&topic), sinks)
}

/// An op adding `n` to row `id`, at `offset` of `partition`.
fn increment(topic: kawka::value::Name, id: &str, n: i64, partition: i32, offset: i64) -> kawka::projection::WriteOp {
    kawka::projection::WriteOp {
        key: vec![kawka::value::Value::from(id)].into(),
        kind: kawka::projection::OpKind::Increment,
        fields: smallvec::smallvec![(kawka::value::intern("n"), kawka::value::Value::Int(n))],
        version: None,
        position: kawka::event::Position { topic, partition, offset },
    }
}

/// The position a batch ends at in `partition`, under its claim.
fn position(claims: &[Claim], topic: kawka::value::Name, partition: i32, next_offset: i64) -> PartitionOffset {
    let epoch = claims.iter().find(|c| c.partition == partition).expect("claimed").epoch;
    PartitionOffset { topic, partition, next_offset, epoch }
}

/// A write's two steps as the pipeline makes them (see
/// `pipeline::write`): `ran` and `committed`, each a signal and what the
/// writes after it see; they share the write's transactions' locks, which
/// name those of the writes it waits for (`after`).
struct Steps {
    ran: kawka::sink::StepSignal,
    ran_seen: kawka::sink::StepDone,
    committed: kawka::sink::StepSignal,
    committed_seen: kawka::sink::StepDone,
}

fn steps(after: &[kawka::sink::StepDone]) -> Steps {
    use kawka::sink::{StepDone, TxLocks};
    let locks = TxLocks::waiting_for(after);
    let (ran, ran_seen) = StepDone::channel_of(locks.clone());
    let (committed, committed_seen) = StepDone::channel_of(locks);
    Steps { ran, ran_seen, committed, committed_seen }
}

/// Waits until a statement writing `table` sleeps in its trigger
/// (`pg_sleep`; other tests' may sleep at the same time).
async fn sleeping(pool: &sqlx::PgPool, table: &str) {
    eventually(Duration::from_secs(10), "a statement sleeping in its trigger", || async {
        let asleep: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND strpos(query, $1) > 0",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("activity");
        (asleep > 0).then_some(())
    })
    .await;
}

/// A batch waiting for a slow one before it to commit, while a write that
/// follows it (another partition, a key in common) waits in Postgres for
/// its rows, is no cycle: it waits for the slow one in Postgres too (seen
/// there), and no write fails (a failure would cost it, and the write
/// behind it, their statements again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waited_for_by_its_own_follower_keeps_waiting() {
    use kawka::sink::Follows;

    let pool = support::postgres().await;
    // Updating w takes 2 s: the first batch is slow, blocked by no one.
    let slow_w = "IF TG_OP = 'UPDATE' AND NEW.id = 'w' THEN PERFORM pg_sleep(2); END IF;";
    let (table, topic, mut sinks) = slow_row_replicas(&pool, "follower", slow_w, &["w", "x"], 1, "").await;
    let a = sinks.remove(0);
    let claims = a.claim(&[(topic, 0), (topic, 1)]).await.expect("claim");
    let add = |id, partition, offset| increment(topic, id, 1, partition, offset);
    let at = |partition, next_offset| position(&claims, topic, partition, next_offset);
    // Partition 0: the slow batch (w), then x, committing after it.
    // Partition 1: x again, after the second batch's statements.
    let batches = [[add("w", 0, 0)], [add("x", 0, 1)], [add("x", 1, 0)]];
    let offsets = [[at(0, 1)], [at(0, 2)], [at(1, 1)]];
    let plans: Vec<_> = batches.iter().zip(&offsets).map(|(b, o)| a.plan(b, &[], o).expect("plan")).collect();
    let first = steps(&[]);
    let (first_ran, first_committed) = (first.ran, first.committed);
    let after_first = Follows { ran: Vec::new(), committed: vec![first.committed_seen] };
    let second = steps(&after_first.committed);
    let (second_ran, second_committed_signal) = (second.ran, second.committed);
    // The third shares a key with the second: statements after its own.
    let after_second = Follows { ran: vec![second.ran_seen], committed: vec![second.committed_seen] };
    let third_ran = steps(&after_second.committed).ran;
    let started = std::time::Instant::now();
    // Whether a transaction was seen waiting for an advisory lock held by
    // one writing this table (the slow first batch, in its trigger).
    let waits_on_the_first = async {
        let query = "SELECT count(*) FROM pg_stat_activity AS waiting WHERE waiting.wait_event = 'advisory' \
                     AND EXISTS (SELECT FROM pg_stat_activity AS holder \
                       WHERE holder.pid = ANY (pg_blocking_pids(waiting.pid)) AND strpos(holder.query, $1) > 0)";
        for _ in 0..40 {
            let seen: i64 = sqlx::query_scalar(query).bind(&table).fetch_one(&pool).await.expect("activity");
            if seen > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let written = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(
            waits_on_the_first,
            async {
                let written = a.write_planned(&plans[0], &batches[0], &Follows::default(), first_ran).await;
                first_committed.send(written.is_ok());
                written
            },
            async {
                let written = a.write_planned(&plans[1], &batches[1], &after_first, second_ran).await;
                second_committed_signal.send(written.is_ok());
                written
            },
            a.write_planned(&plans[2], &batches[2], &after_second, third_ran)
        )
    })
    .await
    .expect("the writes end");
    let (seen_waiting, first, second, third) = written;
    assert!(seen_waiting, "the second batch waited for the first in Postgres (its advisory lock)");
    first.expect("the slow batch");
    second.expect("the batch waiting for it, waited for by the third: it kept waiting");
    third.expect("the third, after the second");
    assert!(started.elapsed() >= Duration::from_secs(2), "the second waited for the slow first (2 s)");
    let rows = id_n_rows(&pool, &table).await;
    assert_eq!(rows, vec![("w".into(), 1), ("x".into(), 2)]);
}

/// Waiting in Postgres for the batch before it is a wait of kawka's own,
/// not bounded by the role's `lock_timeout` (or `statement_timeout`): a
/// batch whose predecessor is merely slower than that does not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_for_a_slow_one_before_it_outlasts_a_short_lock_timeout() {
    use kawka::sink::Follows;

    let pool = support::postgres().await;
    let slow_w = "IF TG_OP = 'UPDATE' AND NEW.id = 'w' THEN PERFORM pg_sleep(2); END IF;";
    let lock_timeout = "?options=-c%20lock_timeout%3D500";
    let (table, topic, mut sinks) = slow_row_replicas(&pool, "locktimeout", slow_w, &["w", "x"], 1, lock_timeout).await;
    let a = sinks.remove(0);
    let claims = a.claim(&[(topic, 0)]).await.expect("claim");
    let batches = [[increment(topic, "w", 1, 0, 0)], [increment(topic, "x", 1, 0, 1)]];
    let offsets = [[position(&claims, topic, 0, 1)], [position(&claims, topic, 0, 2)]];
    let plans: Vec<_> = batches.iter().zip(&offsets).map(|(b, o)| a.plan(b, &[], o).expect("plan")).collect();
    let first = steps(&[]);
    let after_first = Follows { ran: Vec::new(), committed: vec![first.committed_seen] };
    let second_ran = steps(&after_first.committed).ran;
    let (first_ran, first_committed) = (first.ran, first.committed);
    let (written_first, written_second) = tokio::join!(
        async {
            let written = a.write_planned(&plans[0], &batches[0], &Follows::default(), first_ran).await;
            first_committed.send(written.is_ok());
            written
        },
        a.write_planned(&plans[1], &batches[1], &after_first, second_ran)
    );
    written_first.expect("the slow batch");
    written_second.expect("the batch waiting 2 s for it, past a 0.5 s lock_timeout");
    let rows = id_n_rows(&pool, &table).await;
    assert_eq!(rows, vec![("w".into(), 1), ("x".into(), 1)]);
}

/// A write that fails once (a serialization failure) is written again, and
/// so is the write chained behind it, which rolled back with it: the batch
/// after them waits for both rather than follow the doomed one, which made
/// every later batch fail once and be written twice for as long as batches
/// kept coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failed_write_costs_the_writes_chained_behind_it_not_every_later_one() {
    let registry = support::start_registry().await;
    let topic = support::unique("cascade");
    let table = support::unique("cascade");
    support::create_topic(&topic, 1).await;
    let pool = support::postgres().await;
    // The 600th row written fails, once (a sequence is not rolled back).
    sqlx::query(&format!("CREATE SEQUENCE \"{table}_rows\"")).execute(&pool).await.expect("sequence");
    let fail_once =
        format!("IF nextval('\"{table}_rows\"') = 600 THEN RAISE EXCEPTION 'once' USING ERRCODE = '40001'; END IF;");
    id_n_table(&pool, &table, &fail_once).await;
    let connector = id_n_connector(&table, &topic, "on_error: stop", 50, "test.cascade.Set: { upsert: { n: n } }");
    let project = Project::new(&registry.url(), &[(&table, &connector)]);
    let spec = id_n_spec(&registry.url(), &topic, "test.cascade", "Set");
    let events: Vec<Json> = (0..4000)
        .map(|i| json!({"schema": "event", "key": format!("k{i}"), "value": {"id": format!("k{i}"), "n": i}}))
        .collect();
    let (mut kawka, rows) = write_all_and_read(&project, &spec, events, &pool, &table).await;
    assert_eq!(rows.len(), 4000, "log:\n{}", kawka.log());
    assert!(rows.iter().all(|(id, n)| id == &format!("k{n}")), "every row holds its event's value");
    let log = kawka.log();
    let failed = log.matches("a batch write failed; writing it again").count();
    let written: i64 =
        sqlx::query_scalar(&format!("SELECT last_value FROM \"{table}_rows\"")).fetch_one(&pool).await.expect("rows");
    println!("{failed} failed writes, {written} rows written for 4000");
    assert!((1..=2).contains(&failed), "the failed write and the one behind it: {failed} failed\n{log}");
    let _ = kawka.terminate().await;
    let _ = registry.stop().await; // cleanup only: killed clients may leave it an error
}

/// Produces `events`, runs kawka until every one's position is stored, and
/// reads the `(id, n)` table by id.
async fn write_all_and_read(
    project: &Project,
    spec: &Json,
    events: Vec<Json>,
    pool: &sqlx::PgPool,
    table: &str,
) -> (support::Kawka, Vec<(String, i64)>) {
    let total = events.len() as i64;
    support::produce_with_python(spec, events).await;
    let kawka = project.start(0);
    eventually(Duration::from_secs(90), "every event", || async {
        (support::stored_positions(pool, table).await == total).then_some(())
    })
    .await;
    (kawka, id_n_rows(pool, table).await)
}

/// Creates `table (id text PRIMARY KEY, n bigint)` with a trigger that
/// runs `body` (PL/pgSQL) before each row is inserted or updated.
async fn id_n_table(pool: &sqlx::PgPool, table: &str, body: &str) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE \"{table}\" (id text PRIMARY KEY, n bigint); \
         CREATE FUNCTION \"{table}_before\"() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           {body} RETURN NEW; END $$; \
         CREATE TRIGGER before_write BEFORE INSERT OR UPDATE ON \"{table}\" \
           FOR EACH ROW EXECUTE FUNCTION \"{table}_before\"();"
    ))
    .execute(pool)
    .await
    .expect("create the table and its trigger");
}

/// A connector of `topic` into `table (id text, n bigint)` keyed by the
/// Kafka key: `policy` is its error lines, `rule` its one event rule.
fn id_n_connector(table: &str, topic: &str, policy: &str, max_events: usize, rule: &str) -> String {
    format!(
        r#"name: {table}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink:
  to: readdb
  table: {table}
  columns: {{ id: text, n: bigint }}
  primary_key: [id]
key: {{ id: $key }}
{policy}
batch: {{ max_events: {max_events}, max_wait: 5s }}
events:
  {rule}
"#
    )
}

/// The producer spec of that connector's topic: schema `event` is the
/// record `<namespace>.<name>` of `id` and `n`.
fn id_n_spec(registry: &str, topic: &str, namespace: &str, name: &str) -> Json {
    let schemas = json!({"event": support::record_schema(namespace, name,
        json!([{"name": "id", "type": "string"}, {"name": "n", "type": "long"}]))});
    json!({"bootstrap": support::kafka_bootstrap(), "registry": registry, "topic": topic,
        "subject_strategy": "topic_record", "schemas": schemas})
}

/// The format of each `COPY` a sink plans for `ops` (a batch whose keys it
/// expects to be new); none when a value does not fit (the write says why).
fn copy_formats(
    sink: &kawka::sink::postgres::PostgresSink,
    ops: &[kawka::projection::WriteOp],
    offsets: &[PartitionOffset],
) -> Vec<String> {
    use kawka::sink::postgres::PostgresPlan;
    let Ok(plan) = sink.plan(ops, &kawka::projection::fold::key_hashes(ops), offsets) else { return Vec::new() };
    let statements: Vec<_> = match &plan {
        PostgresPlan::PerPartition(shares) => shares.iter().flat_map(|(_, s)| s).collect(),
        PostgresPlan::Whole(statements, _) => statements.iter().collect(),
        PostgresPlan::Versioned(_) => panic!("no version here"),
    };
    statements
        .iter()
        .filter_map(|s| s.insert.as_ref()?.rendered.as_ref())
        .map(|data| format!("{:?}", data.format))
        .collect()
}

/// The columns of [`binary_test_connector`]: every type with a binary form.
const BINARY_COLUMNS: [(&str, &str); 15] = [
    ("big", "bigint"),
    ("int", "integer"),
    ("small", "smallint"),
    ("dbl", "double precision"),
    ("r", "real"),
    ("flag", "boolean"),
    ("blob", "bytea"),
    ("label", "text"),
    ("at", "timestamptz"),
    ("local", "timestamp"),
    ("day", "date"),
    ("tod", "time"),
    ("doc", "jsonb"),
    ("raw", "json"),
    ("id2", "uuid"),
];

/// A table of [`BINARY_COLUMNS`], plus `extra` columns.
fn binary_test_connector(name: &str, extra: &str) -> String {
    let columns: Vec<String> = BINARY_COLUMNS.iter().map(|(c, ty)| format!("{c}: {ty}")).collect();
    format!(
        r#"name: {name}
source: {{ topics: [unused-binary] }}
sink:
  to: readdb
  table: {name}
  columns: {{ id: text, {}{extra} }}
  primary_key: [id]
key: {{ id: id }}
events:
  test.Typed: {{ upsert: {{ label: label }} }}
"#,
        columns.join(", ")
    )
}

/// Values for every column type, many at the edges of the binary forms
/// (ranges, fractions of a microsecond, years 1 and 9999, UUID spellings,
/// strings Postgres parses as dates), some of which a column refuses.
fn values_at_the_edges() -> Vec<kawka::value::Value> {
    use kawka::value::{Record, Temporal, TimeKind, Unit, Value};
    let time = |kind, value| Value::Time(Temporal::new(kind, value));
    let year_1 = -62_135_596_800_000_000;
    let mut record = Record::new();
    record.push("k", Value::from("v\t\"w\""));
    let mut values = vec![Value::Null, Value::Bool(true), Value::Bool(false), Value::Bytes(vec![0, 0x5c, 0xff])];
    values.extend(
        [
            0,
            -1,
            7,
            1_700_000_000_123,
            32_767,
            32_768,
            -32_768,
            -32_769,
            2_147_483_647,
            2_147_483_648,
            i64::MIN,
            i64::MAX,
        ]
        .map(Value::Int),
    );
    values.extend(
        [
            0.1,
            -0.0,
            1.5,
            1e300,
            1e-50,
            1e-40,
            3.4e38,
            1e-310,
            1.000_000_1,
            2.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ]
        .map(Value::Float),
    );
    values.extend(
        [
            "",
            "x",
            "tab\there\nnew line\\ back\\slash \\N",
            "caf\u{e9} \u{1f600}",
            " 12 ",
            "true",
            "2026-12-07",
            "2026-12-07T10:00:00+02:00",
            "12:34:56.5",
            "123e4567-e89b-12d3-a456-426614174000",
            "123E4567-E89B-12D3-A456-42661417400F",
            "{123e4567-e89b-12d3-a456-426614174000}",
            "123e4567e89b12d3a456426614174000",
            "123e4567-e89b-12d3-a456-42661417400g",
            "{\"a\": [1, 2.5]}",
            // Refused by every text type's input, binary and text alike.
            "a\u{0}b",
        ]
        .map(Value::from),
    );
    values.push(Value::Array(vec![Value::Int(1), Value::from("a\nb"), Value::Float(0.5)]));
    values.push(Value::Record(record));
    for unit in [Unit::Millis, Unit::Micros, Unit::Nanos] {
        for value in [0, -1, 1_700_000_000_123_456_789 / (1_000_000_000 / unit.per_second())] {
            values.push(time(TimeKind::Timestamp(unit), value));
            values.push(time(TimeKind::LocalTimestamp(unit), value));
        }
        if unit != Unit::Nanos {
            // The first and the last microsecond of the years 1 to 9999, and past them.
            let last = 253_402_300_799_999_999;
            let ends = [year_1, year_1 - 1, last, last + 1]
                .map(|micros: i64| micros.div_euclid(1_000_000 / unit.per_second()));
            values.extend(ends.map(|value| time(TimeKind::Timestamp(unit), value)));
        }
        values.push(time(TimeKind::TimeOfDay(unit), unit.per_day() - 1));
        values.push(time(TimeKind::TimeOfDay(unit), 1));
    }
    values.extend([-719_162, -719_163, 2_932_896, 2_932_897, 0, 19_723].map(|day| time(TimeKind::Date, day)));
    values
}

/// Binary `COPY`, text `COPY` (a `numeric` column keeps a table in text)
/// and the upsert (after a binary `COPY` met existing keys and its data
/// was read back into arrays) write the same values, and refuse the same
/// ones with the same errors: each value in each column of its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_copy_text_copy_and_the_upsert_write_the_same_values() {
    use kawka::event::Position;
    use kawka::projection::{OpKind, WriteOp};
    use kawka::value::{intern, Value};

    let tables =
        ["binary", "text", "upserted_binary", "upserted_text"].map(|name| support::unique(&format!("{name}_")));
    let connectors = [
        binary_test_connector(&tables[0], ""),
        binary_test_connector(&tables[1], ", amount: numeric"),
        binary_test_connector(&tables[2], ""),
        binary_test_connector(&tables[3], ""),
    ];
    let named: Vec<(&str, &str)> = tables.iter().zip(&connectors).map(|(t, c)| (t.as_str(), c.as_str())).collect();
    let project = Project::new("http://127.0.0.1:9", &named);
    let sinks = postgres_sinks(&project);
    let sink = |table: &str| sinks.iter().find(|s| s.table().target().table == table).expect("a sink per table");
    let (binary, text) = (sink(&tables[0]), sink(&tables[1]));
    let topic = intern("unused-binary");
    for sink in &sinks {
        sink.prepare().await.expect("prepare");
        sink.claim(&[(topic, 0)]).await.expect("claim");
    }
    let op = |id: &str, fields: Vec<(&str, Value)>, offset: i64| WriteOp {
        key: vec![Value::from(id)].into(),
        kind: OpKind::Upsert,
        fields: fields.into_iter().map(|(name, value)| (intern(name), value)).collect(),
        version: None,
        position: Position { topic, partition: 0, offset },
    };
    let offsets = |next: i64| [PartitionOffset { topic, partition: 0, next_offset: next, epoch: Some(1) }];
    let formats = |sink: &kawka::sink::postgres::PostgresSink, ops: &[WriteOp], next: i64| -> Vec<String> {
        copy_formats(sink, ops, &offsets(next))
    };
    let (mut written, mut refused, mut in_binary) = (Vec::new(), 0, 0);
    let mut offset = 0;
    for (column, _) in BINARY_COLUMNS {
        for (n, value) in values_at_the_edges().into_iter().enumerate() {
            let id = format!("{column}-{n:03}");
            let ops = [op(&id, vec![(column, value.clone())], offset)];
            offset += 1;
            let in_binary_format = formats(binary, &ops, offset).first().map(String::as_str) == Some("Binary");
            in_binary += usize::from(in_binary_format);
            assert_ne!(formats(text, &ops, offset).first().map(String::as_str), Some("Binary"));
            let outcomes = [binary.write(&ops, &offsets(offset)).await, text.write(&ops, &offsets(offset)).await];
            match outcomes {
                [Ok(_), Ok(_)] => written.push((in_binary_format, ops[0].clone())),
                [Err(binary), Err(text)] => {
                    let said = |error: kawka::sink::SinkError, table: &str| error.to_string().replace(table, "T");
                    assert_eq!(said(binary, &tables[0]), said(text, &tables[1]), "{column} = {value:?}");
                    refused += 1;
                }
                [binary, text] => panic!("{column} = {value:?}: binary {binary:?}, text {text:?}"),
            }
        }
    }
    assert!(written.len() > 500 && refused > 50, "{} written, {refused} refused", written.len());
    assert!(in_binary * 10 > written.len() * 8, "{in_binary} of {} rows in binary", written.len());

    // The last two tables have every key already: a COPY of all the rows
    // that went in binary (in the one) and of all those that went in text
    // (in the other) meets them, is read back and upserted.
    let pool = support::postgres().await;
    for (table, format, in_binary_format) in [(&tables[2], "Binary", true), (&tables[3], "Text", false)] {
        let batch: Vec<WriteOp> = written
            .iter()
            .filter(|(binary, _)| *binary == in_binary_format)
            .enumerate()
            .map(|(n, (_, op))| WriteOp { position: Position { offset: n as i64, ..op.position }, ..op.clone() })
            .collect();
        sqlx::query(&format!("INSERT INTO \"{table}\" (id, label) SELECT unnest($1::text[]), 'old'"))
            .bind(batch.iter().map(|op| op.key[0].to_string()).collect::<Vec<_>>())
            .execute(&pool)
            .await
            .expect("existing keys");
        let (upserted, next) = (sink(table), batch.len() as i64);
        assert_eq!(formats(upserted, &batch, next), [format], "one statement");
        upserted.write(&batch, &offsets(next)).await.expect("upserted");
    }
    // As JSON text (`json` columns as written: `\u0000` stays), without
    // the text table's `numeric` column.
    let columns: Vec<&str> = BINARY_COLUMNS.iter().map(|(c, _)| *c).collect();
    let columns = columns.join(", ");
    let read = |table: String| {
        let (pool, columns) = (pool.clone(), columns.clone());
        async move {
            sqlx::query_as::<_, (String, String)>(&format!(
                "SELECT id, row_to_json(v)::text FROM (SELECT id, {columns} FROM \"{table}\") AS v ORDER BY id"
            ))
            .fetch_all(&pool)
            .await
            .expect("read")
        }
    };
    // Row by row, so that a failure names the first that differs.
    let same = |what: &str, a: &[(String, String)], b: &[(String, String)]| {
        assert_eq!(a.len(), b.len(), "{what}: rows");
        for (a, b) in a.iter().zip(b) {
            assert_eq!(a, b, "{what}");
        }
    };
    let rows = read(tables[0].clone()).await;
    assert_eq!(rows.len(), written.len());
    same("binary and text COPY", &rows, &read(tables[1].clone()).await);
    let mut upserted = read(tables[2].clone()).await;
    upserted.extend(read(tables[3].clone()).await);
    upserted.sort();
    same("COPY and the upsert", &rows, &upserted);
}

/// A table made by hand with other types than the connector declares:
/// Postgres reads binary `COPY` data with the table's own types (a
/// `bigint`'s eight bytes in a `numeric` column read as 0.00000), so such
/// a table gets text `COPY`, whose values each type's input reads, and
/// the rows hold what they held before binary `COPY` existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_other_types_than_declared_gets_text_copy() {
    use kawka::event::Position;
    use kawka::projection::{OpKind, WriteOp};
    use kawka::value::{intern, Record, Value};

    let (other, same) = (support::unique("other_types"), support::unique("same_types"));
    let connector = |name: &str, create: bool| {
        format!(
            r#"name: {name}
source: {{ topics: [unused-types] }}
sink:
  to: readdb
  table: {name}
  create: {create}
  columns: {{ id: text, amount: bigint, flag: boolean, doc: jsonb, id2: uuid, small: integer }}
  primary_key: [id]
key: {{ id: id }}
events:
  test.Typed: {{ upsert: {{ amount: amount }} }}
"#
        )
    };
    let pool = support::postgres().await;
    sqlx::query(&format!(
        "CREATE TABLE \"{other}\" (id text PRIMARY KEY, amount numeric, flag text, doc text, id2 text, small bigint)"
    ))
    .execute(&pool)
    .await
    .expect("a table of other types");
    let (other_connector, same_connector) = (connector(&other, false), connector(&same, true));
    let project = Project::new("http://127.0.0.1:9", &[(&other, &other_connector), (&same, &same_connector)]);
    let sinks = postgres_sinks(&project);
    let topic = intern("unused-types");
    let mut doc = Record::new();
    doc.push("a", Value::Int(1));
    let ops = [WriteOp {
        key: vec![Value::from("k")].into(),
        kind: OpKind::Upsert,
        fields: [
            ("amount", Value::Int(5)),
            ("flag", Value::Bool(true)),
            ("doc", Value::Record(doc)),
            ("id2", Value::from("123e4567-e89b-12d3-a456-426614174000")),
            ("small", Value::Int(7)),
        ]
        .into_iter()
        .map(|(name, value)| (intern(name), value))
        .collect(),
        version: None,
        position: Position { topic, partition: 0, offset: 0 },
    }];
    let offsets = [PartitionOffset { topic, partition: 0, next_offset: 1, epoch: Some(1) }];
    for sink in &sinks {
        sink.prepare().await.expect("prepare");
        sink.claim(&[(topic, 0)]).await.expect("claim");
        let formats = copy_formats(sink, &ops, &offsets);
        let table = &sink.table().target().table;
        assert_eq!(formats, [if *table == other { "Text" } else { "Binary" }], "{table}");
        sink.write(&ops, &offsets).await.expect("write");
    }
    let read = |table: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT concat_ws('|', amount::text, flag::text, doc::text, id2::text, small::text) FROM \"{table}\""
            ))
            .fetch_one(&pool)
            .await
            .expect("read")
        }
    };
    assert_eq!(read(other).await, r#"5|t|{"a":1}|123e4567-e89b-12d3-a456-426614174000|7"#);
    assert_eq!(read(same).await, r#"5|true|{"a": 1}|123e4567-e89b-12d3-a456-426614174000|7"#);
}
