//! Avro logical types keep their meaning in both read models: every date,
//! time, timestamp (each unit), local timestamp, uuid, duration and decimal
//! written by apache-avro lands in Postgres columns of the matching type
//! and in Elasticsearch documents with the value it meant, checked against
//! Postgres' own arithmetic and an independent calendar (chrono).
//!
//! The bug this guards: integers of `timestamp-micros` read as milliseconds
//! land 1,000 times in the future, without an error.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value as Json};
use sqlx::Row;

const RECORDS: usize = 300;

fn schema() -> Json {
    let logical = |ty: &str, logical: &str| json!({"type": ty, "logicalType": logical});
    support::record_schema(
        "test.logical",
        "Times",
        json!([
            {"name": "id", "type": "string"},
            {"name": "day", "type": logical("int", "date")},
            {"name": "t_ms", "type": logical("int", "time-millis")},
            {"name": "t_us", "type": logical("long", "time-micros")},
            {"name": "ts_ms", "type": logical("long", "timestamp-millis")},
            {"name": "ts_us", "type": logical("long", "timestamp-micros")},
            {"name": "ts_ns", "type": logical("long", "timestamp-nanos")},
            {"name": "local_ms", "type": logical("long", "local-timestamp-millis")},
            {"name": "local_us", "type": logical("long", "local-timestamp-micros")},
            {"name": "local_ns", "type": logical("long", "local-timestamp-nanos")},
            {"name": "uid", "type": logical("string", "uuid")},
            {"name": "uid_fixed", "type": {"type": "fixed", "name": "Uuid16", "size": 16, "logicalType": "uuid"}},
            {"name": "span", "type": {"type": "fixed", "name": "Span", "size": 12, "logicalType": "duration"}},
            {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
            {"name": "amount", "type": {"type": "fixed", "name": "Amount", "size": 8, "logicalType": "decimal", "precision": 18, "scale": 4}},
            {"name": "maybe_ts", "type": ["null", logical("long", "timestamp-micros")], "default": null}
        ]),
    )
}

/// One event's values, as integers and text the test computes itself.
#[derive(Debug, Clone)]
struct Written {
    id: String,
    day: i32,
    t_ms: i32,
    t_us: i64,
    ts_ms: i64,
    ts_us: i64,
    ts_ns: i64,
    local_ms: i64,
    local_us: i64,
    local_ns: i64,
    uid: u128,
    uid_fixed: u128,
    span: (u32, u32, u32),
    price: i64,
    amount: i64,
    maybe_ts: Option<i64>,
}

const MS_PER_DAY: i64 = 86_400_000;
/// 0001-01-01 and 9999-12-31T23:59:59.999 in milliseconds.
const FIRST_MS: i64 = -62_135_596_800_000;
const LAST_MS: i64 = 253_402_300_799_999;

fn rows(seed: u64) -> Vec<Written> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows: Vec<Written> = (0..RECORDS)
        .map(|i| Written {
            id: format!("r{i}"),
            day: rng.random_range(-719_162..2_932_897),
            t_ms: rng.random_range(0..MS_PER_DAY as i32),
            t_us: rng.random_range(0..MS_PER_DAY * 1000),
            ts_ms: rng.random_range(FIRST_MS..LAST_MS),
            ts_us: rng.random_range(FIRST_MS * 1000..LAST_MS * 1000),
            // Elasticsearch's date_nanos holds 1970 to 2262 only.
            ts_ns: rng.random_range(0..i64::MAX),
            local_ms: rng.random_range(FIRST_MS..LAST_MS),
            local_us: rng.random_range(FIRST_MS * 1000..LAST_MS * 1000),
            local_ns: rng.random_range(0..i64::MAX),
            uid: rng.random(),
            uid_fixed: rng.random(),
            span: (rng.random_range(0..2400), rng.random_range(0..400), rng.random_range(0..100_000_000)),
            price: rng.random_range(-99_999_999_999..99_999_999_999),
            amount: rng.random(),
            maybe_ts: rng.random_bool(0.5).then(|| rng.random_range(0..LAST_MS * 1000)),
        })
        .collect();
    // The case of the bug: a timestamp-micros of today.
    rows[0].ts_us = 1_733_400_000_123_456;
    rows[0].maybe_ts = Some(1_733_400_000_123_456);
    rows[1].ts_us = -1;
    rows[1].t_us = MS_PER_DAY * 1000 - 1;
    rows
}

fn encode(schema: &Schema, row: &Written) -> Vec<u8> {
    let value = Avro::Record(vec![
        ("id".into(), Avro::String(row.id.clone())),
        ("day".into(), Avro::Date(row.day)),
        ("t_ms".into(), Avro::TimeMillis(row.t_ms)),
        ("t_us".into(), Avro::TimeMicros(row.t_us)),
        ("ts_ms".into(), Avro::TimestampMillis(row.ts_ms)),
        ("ts_us".into(), Avro::TimestampMicros(row.ts_us)),
        ("ts_ns".into(), Avro::TimestampNanos(row.ts_ns)),
        ("local_ms".into(), Avro::LocalTimestampMillis(row.local_ms)),
        ("local_us".into(), Avro::LocalTimestampMicros(row.local_us)),
        ("local_ns".into(), Avro::LocalTimestampNanos(row.local_ns)),
        ("uid".into(), Avro::Uuid(apache_avro::Uuid::from_u128(row.uid))),
        ("uid_fixed".into(), Avro::Uuid(apache_avro::Uuid::from_u128(row.uid_fixed))),
        (
            "span".into(),
            Avro::Duration(apache_avro::Duration::new(
                apache_avro::Months::new(row.span.0),
                apache_avro::Days::new(row.span.1),
                apache_avro::Millis::new(row.span.2),
            )),
        ),
        ("price".into(), Avro::Decimal(apache_avro::Decimal::from(minimal_be(row.price)))),
        ("amount".into(), Avro::Decimal(apache_avro::Decimal::from(row.amount.to_be_bytes().to_vec()))),
        (
            "maybe_ts".into(),
            match row.maybe_ts {
                Some(micros) => Avro::Union(1, Box::new(Avro::TimestampMicros(micros))),
                None => Avro::Union(0, Box::new(Avro::Null)),
            },
        ),
    ]);
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|writer| writer.write_value_to_vec(value))
        .expect("the row matches its schema")
}

/// The shortest big-endian two's complement of `n` (what a decimal's bytes are).
fn minimal_be(n: i64) -> Vec<u8> {
    let bytes = n.to_be_bytes();
    let mut start = 0;
    while start < 7 {
        let (byte, next) = (bytes[start], bytes[start + 1]);
        if (byte == 0 && next & 0x80 == 0) || (byte == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    bytes[start..].to_vec()
}

fn decimal(unscaled: i64, scale: u32) -> String {
    let divisor = 10i128.pow(scale);
    let n = i128::from(unscaled);
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{}.{:0width$}", n.abs() / divisor, n.abs() % divisor, width = scale as usize)
}

fn uuid(n: u128) -> String {
    apache_avro::Uuid::from_u128(n).hyphenated().to_string()
}

/// Registers the schema, produces every row framed with its id.
async fn produce(registry: &str, topic: &str, rows: &[Written]) {
    let api = support::registry_api::Api { http: reqwest::Client::new(), base: registry.to_string() };
    let (status, reply) = api.register(&format!("{topic}-value"), &schema()).await;
    assert_eq!(status, 200, "{reply}");
    let id = reply["id"].as_u64().unwrap_or_else(|| panic!("no id in {reply}")) as u32;
    let parsed = Schema::parse_str(&schema().to_string()).expect("a valid schema");
    let records = rows
        .iter()
        .map(|row| json!({"key": row.id, "raw_value_hex": support::framed_hex(id, &encode(&parsed, row))}))
        .collect();
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry, "topic": topic, "schemas": {}});
    support::produce_with_python(&spec, records).await;
}

const FIELDS: &str = "day: day, t_ms: t_ms, t_us: t_us, ts_ms: ts_ms, ts_us: ts_us, ts_ns: ts_ns, \
    local_ms: local_ms, local_us: local_us, local_ns: local_ns, uid: uid, uid_fixed: uid_fixed, span: span, \
    price: price, amount: amount, maybe_ts: maybe_ts";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_logical_type_lands_in_postgres_with_its_meaning() {
    let registry = support::start_registry().await;
    let topic = support::unique("logical_pg");
    let table = topic.clone();
    support::create_topic(&topic, 2).await;
    let connector = format!(
        r#"name: {table}
source: {{ topics: [{topic}], start: earliest }}
sink:
  to: readdb
  table: {table}
  columns: {{ id: text, day: date, t_ms: time, t_us: "time without time zone", ts_ms: timestamptz, ts_us: timestamptz,
             ts_ns: timestamptz, local_ms: timestamp, local_us: timestamp, local_ns: timestamp, uid: uuid,
             uid_fixed: uuid, span: interval, price: numeric, amount: numeric, maybe_ts: timestamptz,
             ts_us_raw: bigint, ts_us_text: text, day_of_ts: date, time_of_ts: time, doc: jsonb }}
  primary_key: [id]
key: {{ id: id }}
events:
  test.logical.Times: {{ upsert: {{ {FIELDS}, ts_us_raw: ts_us, ts_us_text: ts_us, day_of_ts: ts_us,
                                     time_of_ts: ts_us, doc: ts_ns }} }}
"#
    );
    let project = support::Project::new(&registry.url(), &[(&table, &connector)]);
    let rows = rows(0x0106_1ca1);
    produce(&registry.url(), &topic, &rows).await;
    let mut kawka = project.start(0);
    let pool = support::postgres().await;
    let count_query = format!("SELECT count(*) FROM \"{table}\"");
    support::eventually(Duration::from_secs(90), "every row in Postgres", || async {
        let count: i64 = sqlx::query_scalar(&count_query).fetch_one(&pool).await.unwrap_or(0);
        (count == RECORDS as i64).then_some(())
    })
    .await;

    // Postgres' own arithmetic reads each column back to the integer
    // written (extract(epoch) is exact numeric since Postgres 14).
    let query = format!(
        "SELECT id, (day - date '1970-01-01')::bigint AS day,
           (extract(epoch from t_ms) * 1000)::bigint AS t_ms, (extract(epoch from t_us) * 1000000)::bigint AS t_us,
           (extract(epoch from ts_ms) * 1000)::bigint AS ts_ms, (extract(epoch from ts_us) * 1000000)::bigint AS ts_us,
           (extract(epoch from ts_ns) * 1000000)::bigint AS ts_ns_us,
           (extract(epoch from local_ms) * 1000)::bigint AS local_ms,
           (extract(epoch from local_us) * 1000000)::bigint AS local_us,
           (extract(epoch from local_ns) * 1000000)::bigint AS local_ns_us,
           uid::text AS uid, uid_fixed::text AS uid_fixed,
           (extract(year from span) * 12 + extract(month from span))::bigint AS months,
           extract(day from span)::bigint AS days,
           (extract(epoch from span - make_interval(months => (extract(year from span) * 12 + extract(month from span))::int,
                                                    days => extract(day from span)::int)) * 1000)::bigint AS span_ms,
           price::text AS price, amount::text AS amount,
           (extract(epoch from maybe_ts) * 1000000)::bigint AS maybe_ts,
           ts_us_raw, ts_us_text, (day_of_ts - date '1970-01-01')::bigint AS day_of_ts,
           (extract(epoch from time_of_ts) * 1000000)::bigint AS time_of_ts, doc #>> '{{}}' AS doc
         FROM \"{table}\""
    );
    let stored = sqlx::query(&query).fetch_all(&pool).await.expect("read the table");
    let by_id: BTreeMap<String, &sqlx::postgres::PgRow> =
        stored.iter().map(|row| (row.get::<String, _>("id"), row)).collect();
    let mut checked = 0;
    for row in &rows {
        let got = by_id.get(&row.id).unwrap_or_else(|| panic!("{} missing", row.id));
        let int = |column: &str| got.get::<Option<i64>, _>(column);
        let text = |column: &str| got.get::<Option<String>, _>(column);
        let at = &row.id;
        assert_eq!(int("day"), Some(i64::from(row.day)), "{at} date");
        assert_eq!(int("t_ms"), Some(i64::from(row.t_ms)), "{at} time-millis");
        assert_eq!(int("t_us"), Some(row.t_us), "{at} time-micros");
        assert_eq!(int("ts_ms"), Some(row.ts_ms), "{at} timestamp-millis");
        assert_eq!(int("ts_us"), Some(row.ts_us), "{at} timestamp-micros");
        assert_eq!(int("ts_ns_us"), Some(micros_as_postgres_rounds(row.ts_ns)), "{at} timestamp-nanos");
        assert_eq!(int("local_ms"), Some(row.local_ms), "{at} local-timestamp-millis");
        assert_eq!(int("local_us"), Some(row.local_us), "{at} local-timestamp-micros");
        assert_eq!(int("local_ns_us"), Some(micros_as_postgres_rounds(row.local_ns)), "{at} local-timestamp-nanos");
        assert_eq!(text("uid"), Some(uuid(row.uid)), "{at} uuid");
        assert_eq!(text("uid_fixed"), Some(uuid(row.uid_fixed)), "{at} fixed uuid");
        assert_eq!(int("months"), Some(i64::from(row.span.0)), "{at} duration months");
        assert_eq!(int("days"), Some(i64::from(row.span.1)), "{at} duration days");
        assert_eq!(int("span_ms"), Some(i64::from(row.span.2)), "{at} duration milliseconds");
        assert_eq!(text("price"), Some(decimal(row.price, 2)), "{at} decimal bytes");
        assert_eq!(text("amount"), Some(decimal(row.amount, 4)), "{at} decimal fixed");
        assert_eq!(int("maybe_ts"), row.maybe_ts, "{at} timestamp-micros in a union");
        assert_eq!(int("ts_us_raw"), Some(row.ts_us), "{at} a bigint column takes the integer written");
        assert_eq!(text("ts_us_text"), Some(iso_micros(row.ts_us)), "{at} a text column takes ISO 8601");
        assert_eq!(int("day_of_ts"), Some(row.ts_us.div_euclid(MS_PER_DAY * 1000)), "{at} the date of a timestamp");
        assert_eq!(int("time_of_ts"), Some(row.ts_us.rem_euclid(MS_PER_DAY * 1000)), "{at} the time of a timestamp");
        assert_eq!(text("doc"), Some(iso_nanos(row.ts_ns)), "{at} jsonb holds ISO 8601");
        checked += 1;
    }
    assert_eq!(checked, RECORDS);
    // The case of the bug, spelled out: today, not 1,000 times later.
    let today: String = sqlx::query_scalar(&format!(
        "SELECT to_char(ts_us AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM \"{table}\" WHERE id = 'r0'"
    ))
    .fetch_one(&pool)
    .await
    .expect("r0");
    assert_eq!(today, "2024-12-05 12:00:00.123456");
    kawka.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_logical_type_lands_in_elasticsearch_with_its_meaning() {
    let registry = support::start_registry().await;
    let topic = support::unique("logical_es");
    let index = topic.clone();
    support::create_topic(&topic, 2).await;
    let connector = format!(
        r#"name: {index}
source: {{ topics: [{topic}], start: earliest }}
sink:
  to: search
  index: {index}
  mappings:
    dynamic: strict
    properties:
      day: {{ type: date }}
      t_ms: {{ type: keyword }}
      t_us: {{ type: keyword }}
      ts_ms: {{ type: date }}
      ts_us: {{ type: date }}
      ts_ns: {{ type: date_nanos }}
      local_ms: {{ type: date }}
      local_us: {{ type: date }}
      local_ns: {{ type: date_nanos }}
      uid: {{ type: keyword }}
      uid_fixed: {{ type: keyword }}
      span: {{ type: keyword }}
      price: {{ type: scaled_float, scaling_factor: 100 }}
      amount: {{ type: keyword }}
      maybe_ts: {{ type: date }}
key: id
events:
  test.logical.Times: {{ upsert: {{ {FIELDS} }} }}
"#
    );
    let project = support::Project::new(&registry.url(), &[(&index, &connector)]);
    let rows = rows(0x00e5_1061);
    produce(&registry.url(), &topic, &rows).await;
    let mut kawka = project.start(0);
    let documents = support::eventually(Duration::from_secs(90), "every document in Elasticsearch", || async {
        let documents = support::es_documents(&index, RECORDS + 10).await;
        (documents.len() == RECORDS).then_some(documents)
    })
    .await;
    for row in &rows {
        let expected = json!({
            "day": (NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch") + chrono::Duration::days(i64::from(row.day)))
                .format("%Y-%m-%d").to_string(),
            "t_ms": time_of_day(i64::from(row.t_ms) * 1_000_000, "%.3f"),
            "t_us": time_of_day(row.t_us * 1000, "%.6f"),
            "ts_ms": DateTime::from_timestamp_millis(row.ts_ms).expect("in range").to_rfc3339_opts(SecondsFormat::Millis, true),
            "ts_us": iso_micros(row.ts_us),
            "ts_ns": iso_nanos(row.ts_ns),
            "local_ms": DateTime::from_timestamp_millis(row.local_ms).expect("in range").naive_utc().format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            "local_us": DateTime::from_timestamp_micros(row.local_us).expect("in range").naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
            "local_ns": DateTime::from_timestamp_nanos(row.local_ns).naive_utc().format("%Y-%m-%dT%H:%M:%S%.9f").to_string(),
            "uid": uuid(row.uid),
            "uid_fixed": uuid(row.uid_fixed),
            "span": format!("P{}M{}DT{}.{:03}S", row.span.0, row.span.1, row.span.2 / 1000, row.span.2 % 1000),
            "price": decimal(row.price, 2),
            "amount": decimal(row.amount, 4),
            "maybe_ts": row.maybe_ts.map(iso_micros),
        });
        assert_eq!(documents.get(&row.id), Some(&expected), "{}", row.id);
    }
    // The mapping read the text as dates: a range over the day of r0.
    let hits = support::es_search_ids(
        &index,
        json!({"range": {"ts_us": {"gte": "2024-12-05T00:00:00Z", "lt": "2024-12-06T00:00:00Z"}}}),
    )
    .await;
    assert!(hits.contains(&"r0".to_string()), "a range query on the date field finds r0: {hits:?}");
    kawka.terminate().await;
}

/// What Postgres keeps of nanoseconds: microseconds, the fraction rounded
/// half to even (`rint`).
fn micros_as_postgres_rounds(nanos: i64) -> i64 {
    let (seconds, sub) = (nanos.div_euclid(1_000_000_000), nanos.rem_euclid(1_000_000_000));
    let (micros, rest) = (sub / 1000, sub % 1000);
    let rounded = if rest > 500 || (rest == 500 && micros % 2 == 1) { micros + 1 } else { micros };
    seconds * 1_000_000 + rounded
}

fn iso_micros(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros).expect("in range").to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn iso_nanos(nanos: i64) -> String {
    DateTime::from_timestamp_nanos(nanos).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn time_of_day(nanos: i64, fraction: &str) -> String {
    let seconds = u32::try_from(nanos / 1_000_000_000).expect("within a day");
    let sub = u32::try_from(nanos % 1_000_000_000).expect("below a second");
    NaiveTime::from_num_seconds_from_midnight_opt(seconds, sub)
        .expect("a time of day")
        .format(&format!("%H:%M:%S{fraction}"))
        .to_string()
}
