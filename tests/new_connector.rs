//! `kawka new connector` against the local registry: from two event types
//! registered for a topic (logical types included) it writes catalogue
//! entries and a connector that `kawka validate` accepts, and that, run
//! as written, fills its table with the events' values.

mod support;

use std::process::Command;
use std::time::Duration;

use apache_avro::types::Value as Avro;
use serde_json::{json, Value as Json};

fn opened() -> Json {
    support::record_schema(
        "test.bank",
        "AccountOpened",
        json!([
            {"name": "account_id", "type": "string"},
            {"name": "owner", "type": ["null", "string"], "default": null},
            {"name": "opened_at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "balance", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
            {"name": "opened_on", "type": {"type": "int", "logicalType": "date"}},
            {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}}
        ]),
    )
}

fn closed() -> Json {
    support::record_schema(
        "test.bank",
        "AccountClosed",
        json!([
            {"name": "account_id", "type": "string"},
            {"name": "closed_at", "type": {"type": "long", "logicalType": "timestamp-nanos"}}
        ]),
    )
}

fn kawka(root: &std::path::Path, args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(args)
        .args(["--config", "config/kawka.yaml"])
        .current_dir(root)
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka runs");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_written_from_the_registry_validates_and_runs() {
    let registry = support::start_registry().await;
    let topic = support::unique("accounts");
    let name = topic.clone();
    support::create_topic(&topic, 1).await;
    let api = support::registry_api::Api { http: reqwest::Client::new(), base: registry.url() };
    let mut ids = Vec::new();
    for schema in [opened(), closed()] {
        let record =
            format!("{}.{}", schema["namespace"].as_str().expect("ns"), schema["name"].as_str().expect("name"));
        let (status, body) = api.register(&format!("{topic}-{record}"), &schema).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].as_u64().expect("id") as u32);
    }
    // Another topic whose name starts with this one's: not read.
    let archived = support::record_schema("test.bank", "Archived", json!([{"name": "account_id", "type": "string"}]));
    let (status, body) = api.register(&format!("{topic}-archive-value"), &archived).await;
    assert_eq!(status, 200, "{body}");
    let project = support::Project::new(&registry.url(), &[]);
    let root = project.root();
    // The stack's broker joins a group in half the session timeout (23 s
    // with librdkafka's default): shorter for every client of the daemon,
    // so that the connector file stays as written.
    let config = root.join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config");
    let faster = text.replace("properties: {}", "properties: { session.timeout.ms: \"6000\" }");
    assert_ne!(text, faster, "the test config has kafka properties to set");
    std::fs::write(&config, faster).expect("config");

    let (code, out) = kawka(root, &["new", "connector", &name, "--topic", &topic, "--sink", "readdb"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 event type(s)"), "{out}");
    let connector = std::fs::read_to_string(root.join("connectors").join(format!("{name}.yaml"))).expect("written");
    assert!(!connector.contains("Archived"), "the other topic's type is not this one's:\n{connector}");
    for line in [
        "    opened_at: timestamptz",
        "    balance: numeric",
        "    opened_on: date",
        "    ref: uuid",
        "    closed_at: timestamptz",
        "  primary_key: [account_id]",
    ] {
        assert!(connector.lines().any(|l| l == line), "{line:?} in\n{connector}");
    }
    for record in ["test.bank.AccountOpened", "test.bank.AccountClosed"] {
        let file = root.join("schemas").join(record).join("v1.avsc");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(text.contains("logicalType"), "{text}");
    }
    let (code, out) = kawka(root, &["validate"]);
    assert_eq!(code, 0, "the written connector validates: {out}\n{connector}");
    // Not over an existing file, unless asked.
    let (code, out) = kawka(root, &["new", "connector", &name, "--topic", &topic, "--sink", "readdb"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--force"), "{out}");
    // For Elasticsearch: mappings, and it validates too.
    let es_name = format!("{name}_es");
    let (code, out) = kawka(root, &["new", "connector", &es_name, "--topic", &topic, "--sink", "search"]);
    assert_eq!(code, 0, "{out}");
    let es = std::fs::read_to_string(root.join("connectors").join(format!("{es_name}.yaml"))).expect("written");
    assert!(es.contains("      closed_at: { type: date_nanos }"), "{es}");
    assert!(es.contains("      balance: { type: scaled_float, scaling_factor: 100 }"), "{es}");
    // The types are catalogued now: nothing new to write for them.
    assert!(!out.contains("v2.avsc"), "{out}");
    std::fs::remove_file(root.join("connectors").join(format!("{es_name}.yaml"))).expect("remove");
    let (code, out) = kawka(root, &["validate"]);
    assert_eq!(code, 0, "{out}");

    // Run as written: an account opened, then closed.
    let writer = |schema: &Json, fields: Vec<(&str, Avro)>| {
        let schema = apache_avro::Schema::parse_str(&schema.to_string()).expect("schema");
        let record = Avro::Record(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .and_then(|writer| writer.write_value_to_vec(record))
            .expect("avro")
    };
    let opened_body = writer(
        &opened(),
        vec![
            ("account_id", Avro::String("a1".into())),
            ("owner", Avro::Union(1, Box::new(Avro::String("Ada".into())))),
            ("opened_at", Avro::TimestampMicros(1_733_400_000_123_456)),
            ("balance", Avro::Decimal(apache_avro::Decimal::from(vec![0x30, 0x39]))),
            ("opened_on", Avro::Date(20_062)),
            ("ref", Avro::Uuid(apache_avro::Uuid::from_u128(7))),
        ],
    );
    let closed_body = writer(
        &closed(),
        vec![("account_id", Avro::String("a1".into())), ("closed_at", Avro::TimestampNanos(1_733_500_000_000_000_001))],
    );
    let records = vec![
        json!({"key": "a1", "raw_value_hex": support::framed_hex(ids[0], &opened_body)}),
        json!({"key": "a1", "raw_value_hex": support::framed_hex(ids[1], &closed_body)}),
    ];
    let spec =
        json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic, "schemas": {}});
    support::produce_with_python(&spec, records).await;
    let mut daemon = project.start(0);
    let pool = support::postgres().await;
    let query = format!(
        "SELECT owner, to_char(opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), balance::text, \
         opened_on::text, ref::text, to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
         FROM \"{name}\" WHERE account_id = 'a1'"
    );
    type Row = (String, String, String, String, String, Option<String>);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let row: Row = loop {
        let row: Option<Row> = sqlx::query_as(&query).fetch_optional(&pool).await.ok().flatten();
        if let Some(row) = row.filter(|r| r.5.is_some()) {
            break row;
        }
        if std::time::Instant::now() > deadline {
            let address = support::http_address(&daemon.log()).unwrap_or_default();
            let status = reqwest::get(format!("http://{address}/connectors/{name}")).await.expect("status");
            let status = status.text().await.unwrap_or_default();
            panic!("no closed account after 60 s; status {status}\nconnector:\n{connector}\nlog:\n{}", daemon.log());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        row,
        (
            "Ada".to_string(),
            "2024-12-05 12:00:00.123456".to_string(),
            "123.45".to_string(),
            "2024-12-05".to_string(),
            "00000000-0000-0000-0000-000000000007".to_string(),
            Some("2024-12-06 15:46:40.000000".to_string()),
        ),
        "{}",
        daemon.log()
    );
    daemon.terminate().await;
}
