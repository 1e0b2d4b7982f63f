//! More poison, against the real stack: values at the edges of what
//! Postgres holds, rows the database refuses for reasons of their own
//! (index size, a user's trigger), records at and above the size limits,
//! runs of unknown schema ids and a user projection that panics. Each sits
//! between good events: the poison is dead-lettered with its headers, or
//! written faithfully; the good events are exact; the connector keeps
//! consuming what comes after.

mod support;

use std::time::Duration;

use apache_avro::types::Value as Avro;
use serde_json::{json, Value as Json};
use sqlx::Row;

use support::{eventually, Project};

/// The schema of the test's events.
fn thing_schema() -> Json {
    support::record_schema(
        "test.poison",
        "Thing",
        json!([
            {"name": "id", "type": "string"},
            {"name": "label", "type": "string"},
            {"name": "amount", "type": "double"},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "n", "type": "long"}
        ]),
    )
}

/// Avro binary of a Thing.
fn thing_body(id: &str, label: &str, amount: f64, at: i64, n: i64) -> Vec<u8> {
    let schema = apache_avro::Schema::parse(&thing_schema()).expect("the Thing schema");
    let record = Avro::Record(vec![
        ("id".into(), Avro::String(id.into())),
        ("label".into(), Avro::String(label.into())),
        ("amount".into(), Avro::Double(amount)),
        ("at".into(), Avro::TimestampMillis(at)),
        ("n".into(), Avro::Long(n)),
    ]);
    apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .and_then(|writer| writer.write_value_to_vec(record))
        .expect("a Thing")
}

/// A record of a Thing, framed with `id`, keyed by its id.
fn thing(id_of_schema: u32, id: &str, label: &str, amount: f64, at: i64, n: i64) -> Json {
    json!({"key": id, "raw_value_hex": support::framed_hex(id_of_schema, &thing_body(id, label, amount, at, n))})
}

const AT: i64 = 1_700_000_000_000;

/// A good event: id `g<n>`, label `good <n>`, amount n/4, n.
fn good(id_of_schema: u32, n: i64) -> Json {
    thing(id_of_schema, &format!("g{n}"), &format!("good {n}"), n as f64 / 4.0, AT + n, n)
}

fn connector(name: &str, topic: &str) -> String {
    // The source's limits are the defaults: 1 MiB records.
    format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink:
  to: readdb
  table: {name}
  columns: {{ id: text, label: text, note: text, amount: numeric, at: timestamptz, n: integer }}
  primary_key: [id]
key: {{ id: id }}
on_error: dead_letter
dead_letter_topic: {name}.dlq
batch: {{ max_events: 50, max_wait: 50ms }}
events:
  test.poison.Thing: {{ upsert: {{ label: label, note: amount, amount: amount, at: at, n: n }} }}
"#
    )
}

async fn position(pool: &sqlx::PgPool, name: &str) -> i64 {
    support::stored_positions(pool, name).await
}

/// A dead letter's header, as text.
fn header(letter: &support::Consumed, key: &str) -> Option<String> {
    letter
        .headers
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.clone())
        .map(|v| String::from_utf8_lossy(&v).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_edges_are_written_faithfully_or_dead_lettered_and_nothing_stalls() {
    let registry = support::start_registry().await;
    let topic = support::unique("edges");
    let name = support::unique("edges");
    support::create_topic(&topic, 1).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let pool = support::postgres().await;
    // The table exists before kawka starts, with a user's trigger that
    // refuses one label (SQLSTATE P0001).
    for statement in [
        format!(
            "CREATE TABLE \"{name}\" (id text PRIMARY KEY, label text, note text, amount numeric, at timestamptz, n integer)"
        ),
        format!(
            "CREATE FUNCTION \"{name}_guard\"() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.label = 'forbidden' THEN RAISE EXCEPTION 'label % is forbidden here', NEW.label; END IF; \
             RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER guard BEFORE INSERT OR UPDATE ON \"{name}\" FOR EACH ROW EXECUTE FUNCTION \"{name}_guard\"()"
        ),
    ] {
        sqlx::query(&statement).execute(&pool).await.expect("setup");
    }
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {"thing": thing_schema()}});
    // Offset 0: a good event through the serializer, which registers the schema.
    let first = json!({"schema": "thing", "key": "g0", "value": {"id": "g0", "label": "good 0", "amount": 0.0, "at": AT, "n": 0}});
    let id = support::produce_with_python(&spec, vec![first]).await.ids["thing"];

    // (record, expected: None = written faithfully, Some(stage) = dead-lettered, what)
    // Incompressible (Postgres compresses index entries): 3,000 bytes
    // over the B-tree's 2,704-byte limit, SQLSTATE 54000.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let long_key: String = (0..3000)
        .map(|_| {
            // xorshift: letters Postgres cannot compress much.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let big_bad = {
        // ~1,000,000 bytes that are not a Thing: framed, decodes wrong.
        let mut body = vec![0x02u8; 999_990];
        body[0] = 0xff;
        json!({"key": "big", "raw_value_hex": support::framed_hex(id, &body)})
    };
    // Keyed like a good row: replayed as a null value it would delete it.
    let huge = json!({"key": "g1000", "raw_value_hex": support::framed_hex(id, &vec![7u8; 1_500_000])});
    let mut utf8_bad = thing_body("bad-utf8", "xx", 1.0, AT, 1);
    // The label's two bytes become an invalid UTF-8 sequence.
    let at = utf8_bad.windows(2).position(|w| w == b"xx").expect("the label");
    utf8_bad[at] = 0xc3;
    utf8_bad[at + 1] = 0x28;
    let unknown_ids: Vec<Json> = (0..300)
        .map(|n| json!({"key": format!("u{n}"), "raw_value_hex": support::framed_hex(4_000_000 + (n % 3), &[0])}))
        .collect();
    let mut poison: Vec<(Json, Option<&str>, String)> = vec![
        (thing(id, "nan", "a", f64::NAN, AT, 1), None, "NaN into text and numeric".into()),
        (thing(id, "inf", "a", f64::INFINITY, AT, 1), None, "Infinity into text and numeric".into()),
        (thing(id, "-inf", "a", f64::NEG_INFINITY, AT, 1), None, "-Infinity into text and numeric".into()),
        (thing(id, "bc", "a", 1.0, -62_152_876_800_000, 1), None, "a timestamp before year 1".into()),
        (thing(id, &long_key, "a", 1.0, AT, 1), Some("sink"), "a 3,000-byte primary key".into()),
        (thing(id, "wide", "a", 1.0, AT, 1 << 40), Some("sink"), "2^40 into an integer column".into()),
        (thing(id, "nul", "a\u{0}b", 1.0, AT, 1), Some("sink"), "a NUL character in text".into()),
        (thing(id, "trigger", "forbidden", 1.0, AT, 1), Some("sink"), "a trigger's RAISE EXCEPTION".into()),
        (
            thing(id, "far", "a", 1.0, 10_000_000_000_000_000, 1),
            Some("sink"),
            "a timestamp past Postgres' range".into(),
        ),
        (
            json!({"key": "utf8", "raw_value_hex": support::framed_hex(id, &utf8_bad)}),
            Some("decode"),
            "invalid UTF-8 in an Avro string".into(),
        ),
        (big_bad, Some("decode"), "a bad record of ~1,000,000 bytes".into()),
        (huge, Some("source"), "a record of ~1.5 MB at default limits".into()),
    ];
    for (n, record) in unknown_ids.into_iter().enumerate() {
        poison.push((record, Some("decode"), format!("unknown schema id #{n}")));
    }
    let mut records = Vec::new();
    let mut expected = Vec::new(); // per offset from 1: the poison's index, or None for a good event
    let mut goods = vec![0i64];
    for (index, (record, _, _)) in poison.iter().enumerate() {
        let n = index as i64 + 1;
        records.push(good(id, n * 1000));
        goods.push(n * 1000);
        expected.push(None);
        records.push(record.clone());
        expected.push(Some(index));
    }
    support::produce_with_python(&spec, records).await;
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic))]);
    let mut kawka = project.start(0);
    let total = 1 + expected.len() as i64;
    eventually(Duration::from_secs(120), "every record to be consumed", || async {
        (position(&pool, &name).await == total).then_some(())
    })
    .await;

    // Events produced after the poison are consumed too.
    let after: Vec<Json> = (1..=20).map(|n| good(id, 1_000_000 + n)).collect();
    goods.extend((1..=20).map(|n| 1_000_000 + n));
    support::produce_with_python(&spec, after).await;
    eventually(Duration::from_secs(60), "the events after the poison", || async {
        (position(&pool, &name).await == total + 20).then_some(())
    })
    .await;

    // The good events are exact.
    for n in &goods {
        let row = sqlx::query(&format!("SELECT label, amount::float8, n, note FROM \"{name}\" WHERE id = $1"))
            .bind(format!("g{n}"))
            .fetch_optional(&pool)
            .await
            .expect("select");
        let row = row.unwrap_or_else(|| panic!("good event g{n} is missing"));
        assert_eq!(row.get::<String, _>(0), format!("good {n}"));
        assert_eq!(row.get::<f64, _>(1), *n as f64 / 4.0);
        assert_eq!(row.get::<i32, _>(2) as i64, *n);
    }
    // Written faithfully: NaN and the infinities as Postgres spells them,
    // in text and in numeric; a date before year 1 as a BC date.
    for (id, text) in [("nan", "NaN"), ("inf", "Infinity"), ("-inf", "-Infinity")] {
        let row = sqlx::query(&format!("SELECT note, amount::text FROM \"{name}\" WHERE id = $1"))
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!((row.get::<String, _>(0), row.get::<String, _>(1)), (text.to_string(), text.to_string()), "{id}");
    }
    let bc: String = sqlx::query_scalar(&format!(
        "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI BC') FROM \"{name}\" WHERE id = 'bc'"
    ))
    .fetch_one(&pool)
    .await
    .expect("the BC row");
    assert_eq!(bc, "0001-06-15 00:00 BC");

    // Everything else is dead-lettered, in log order, with its headers.
    let bad: Vec<(i64, usize)> = expected
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.filter(|&p| poison[p].1.is_some()).map(|p| (i as i64 + 1, p)))
        .collect();
    let dead = support::consume(&format!("{name}.dlq"), bad.len(), Duration::from_secs(60)).await;
    if dead.len() != bad.len() {
        let got: Vec<Option<String>> = dead.iter().map(|l| header(l, "kawka.error.offset")).collect();
        let missing: Vec<&str> = bad
            .iter()
            .filter(|(offset, _)| !got.contains(&Some(offset.to_string())))
            .map(|(_, index)| poison[*index].2.as_str())
            .collect();
        panic!("{} dead letters for {} bad records; missing: {missing:?}", dead.len(), bad.len());
    }
    let produced = support::consume(&topic, total as usize, Duration::from_secs(60)).await;
    let mut unknown_seen = 0;
    // Refused by the sink while a batch is written, a row's dead letter
    // follows those found while decoding the same batch: matched by offset.
    let by_offset: std::collections::HashMap<String, &support::Consumed> =
        dead.iter().filter_map(|l| Some((header(l, "kawka.error.offset")?, l))).collect();
    for (offset, index) in &bad {
        let (_, stage, what) = &poison[*index];
        let letter = by_offset.get(&offset.to_string()).unwrap_or_else(|| panic!("{what}: no dead letter"));
        assert_eq!(
            header(letter, "kawka.error.stage").as_deref(),
            *stage,
            "{what}: {:?}",
            header(letter, "kawka.error.message")
        );
        assert_eq!(header(letter, "kawka.error.class").as_deref(), Some("permanent"), "{what}");
        assert!(header(letter, "kawka.error.message").is_some_and(|m| !m.is_empty()), "{what}");
        let original = &produced[*offset as usize];
        assert_eq!(letter.key, original.key, "{what}: the original key");
        match header(letter, "kawka.error.value_dropped") {
            // Only what the broker cannot take goes without its value.
            Some(dropped) => {
                let value = original.value.as_deref().expect("a value");
                assert_eq!(original.key.as_deref(), Some(&b"g1000"[..]));
                assert!(value.len() > 1 << 20, "{what}: dropped a value of {} bytes", value.len());
                use sha2::Digest;
                let digest: String = sha2::Sha256::digest(value).iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(dropped, format!("{} bytes, sha256 {digest}", value.len()), "{what}");
                assert_eq!(letter.value, None, "{what}");
            }
            None => assert_eq!(letter.value, original.value, "{what}: the original bytes"),
        }
        if what.starts_with("unknown schema id") {
            unknown_seen += 1;
        } else {
            eprintln!(
                "{what:45} -> {:8} {}",
                stage.unwrap_or(""),
                header(letter, "kawka.error.message").unwrap_or_default()
            );
        }
    }
    assert_eq!(unknown_seen, 300);
    assert!(
        dead.iter().any(|l| header(l, "kawka.error.value_dropped").is_some()),
        "the 1.5 MB record's dead letter goes without its value"
    );
    assert!(
        dead.iter().any(|l| l.value.as_ref().is_some_and(|v| v.len() > 999_000)),
        "the ~1,000,000-byte record's dead letter keeps its value"
    );
    // A run of unknown ids is logged, not line by line (rate-limited).
    let log = kawka.log();
    let lines = log.matches("schema id cannot be used").count();
    assert!((1..=10).contains(&lines), "{lines} log lines for 300 unknown ids");
    let base = format!("http://{}", support::http_address(&log).expect("address"));
    let status: Json =
        reqwest::get(format!("{base}/connectors/{name}")).await.expect("status").json().await.expect("json");
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["counters"]["dead_lettered"], bad.len(), "{status}");
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());

    // Replaying the dead letters: the one written without its value is
    // refused again (stage `replay`), never read as a tombstone of its key.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["dlq", "replay", &name, "--idle", "4s"])
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka dlq replay");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let exists: Option<String> = sqlx::query_scalar(&format!("SELECT label FROM \"{name}\" WHERE id = 'g1000'"))
        .fetch_optional(&pool)
        .await
        .expect("select");
    assert_eq!(exists.as_deref(), Some("good 1000"), "the value-less dead letter deleted nothing");
    let again = support::consume(&format!("{name}.dlq"), 2 * bad.len(), Duration::from_secs(60)).await;
    let refused: Vec<&support::Consumed> =
        again[bad.len()..].iter().filter(|l| header(l, "kawka.error.stage").as_deref() == Some("replay")).collect();
    assert_eq!(refused.len(), 1, "one dead letter cannot be replayed");
    assert!(header(refused[0], "kawka.error.value_dropped").is_some(), "it still says its value was dropped");
    assert!(header(refused[0], "kawka.error.message").is_some_and(|m| m.contains("without its value")));
    let _ = registry.stop().await; // cleanup only
}

/// A user's Rust projection with a bug: it panics on one label.
#[derive(Debug)]
struct Panicky;

impl kawka::projection::Projection for Panicky {
    fn project(
        &self,
        event: &kawka::event::Event,
    ) -> Result<kawka::projection::Projected, kawka::projection::ProjectionError> {
        use kawka::value::{intern, Value};
        let record = event.payload.as_record().expect("a Thing is a record");
        let label = record.get("label").cloned().unwrap_or(Value::Null);
        if label == Value::from("boom") {
            panic!("a user's projection met label {label}");
        }
        let id = record.get("id").cloned().unwrap_or(Value::Null);
        Ok(kawka::projection::Projected::Ops(vec![kawka::projection::WriteOp {
            key: std::iter::once(id).collect(),
            kind: kawka::projection::OpKind::Upsert,
            fields: smallvec::smallvec![(intern("label"), label)],
            version: None,
            position: event.position,
        }]))
    }

    fn tombstone(
        &self,
        _key: &kawka::value::Value,
        _position: kawka::event::Position,
    ) -> Result<kawka::projection::Projected, kawka::projection::ProjectionError> {
        Ok(kawka::projection::Projected::Skipped)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_projection_that_panics_dead_letters_its_event_and_the_connector_goes_on() {
    let registry = support::start_registry().await;
    let topic = support::unique("panics");
    let name = support::unique("panics");
    support::create_topic(&topic, 1).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "subject_strategy": "topic_record", "schemas": {"thing": thing_schema()}});
    let value = |id: &str, label: &str| json!({"schema": "thing", "key": id, "value": {"id": id, "label": label, "amount": 1.0, "at": AT, "n": 1}});
    let records =
        vec![value("a", "first"), value("b", "boom"), value("c", "third"), value("b", "boom"), value("d", "fifth")];
    support::produce_with_python(&spec, records).await;
    let project = Project::new(&registry.url(), &[(&name, &connector(&name, &topic))]);
    // In this process, as a custom daemon runs: the config's directories made absolute.
    let config = project.root().join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config").replace(
        "connectors: connectors/\nschemas: schemas/",
        &format!("connectors: {0}/connectors/\nschemas: {0}/schemas/", project.root().display()),
    );
    std::fs::write(&config, text).expect("config");
    let builder = kawka::app::Builder::new().projection(&name, Panicky);
    let settings = builder.load(&config).expect("the project loads");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(builder.run(settings, async move {
        let _ = stopped.await;
    }));
    let pool = support::postgres().await;
    eventually(Duration::from_secs(60), "the five events", || async {
        (position(&pool, &name).await == 5).then_some(())
    })
    .await;
    // Produced after the panics: consumed too.
    support::produce_with_python(&spec, vec![value("e", "after")]).await;
    eventually(Duration::from_secs(60), "the event after the panics", || async {
        (position(&pool, &name).await == 6).then_some(())
    })
    .await;
    let rows: Vec<(String, String)> =
        sqlx::query_as(&format!("SELECT id, label FROM \"{name}\" ORDER BY id")).fetch_all(&pool).await.expect("rows");
    let expected: Vec<(String, String)> = [("a", "first"), ("c", "third"), ("d", "fifth"), ("e", "after")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(rows, expected, "the neighbours are written, the panicking events are not");
    let dead = support::consume(&format!("{name}.dlq"), 2, Duration::from_secs(30)).await;
    assert_eq!(dead.len(), 2, "both panicking events are dead-lettered");
    for (letter, offset) in dead.iter().zip(["1", "3"]) {
        assert_eq!(header(letter, "kawka.error.offset").as_deref(), Some(offset));
        assert_eq!(header(letter, "kawka.error.stage").as_deref(), Some("projection"));
        let message = header(letter, "kawka.error.message").unwrap_or_default();
        assert!(message.contains("panicked: a user's projection met label boom"), "{message}");
    }
    let _ = stop.send(());
    daemon.await.expect("the daemon task").expect("the daemon ends cleanly");
    let _ = registry.stop().await; // cleanup only
}
