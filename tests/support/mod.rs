//! Helpers shared by the integration tests: where the local stack is, unique
//! names so tests run in parallel, the Confluent Python producer, a registry
//! of the test's own.
//!
//! The stack is started by `deploy/local/up.sh` (README's test command does
//! it); a test that cannot reach a service fails with a message saying so.
#![allow(dead_code)]

pub mod registry_api;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::TopicPartitionList;
use serde_json::Value as Json;

use kawka_registry::{RegistryServerSettings, RunningRegistry};

pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

pub fn elasticsearch_url() -> String {
    std::env::var("ELASTICSEARCH_URL").unwrap_or_else(|_| "http://127.0.0.1:9200".to_string())
}

pub fn database_url() -> String {
    std::env::var("KAWKA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/kawka_test".to_string())
}

/// The Python of the stack's virtualenv (with the Confluent client).
pub fn python() -> PathBuf {
    if let Ok(path) = std::env::var("KAWKA_PYTHON") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_string());
    PathBuf::from(home).join(".cache/kawka/venv/bin/python")
}

/// Runs `tests/py/<script>` with the stack's Python and reads the one JSON
/// object it prints. On a blocking thread: the registry the script talks
/// to may be served by the calling test's runtime.
pub async fn python_json(script: &str, args: Vec<String>) -> Json {
    let script = project_root().join("tests/py").join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python()).arg(&script).args(args).output().expect("python runs")
    })
    .await
    .expect("the client's thread");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A name no other test (or earlier run) uses: lowercase, digits and `_`.
pub fn unique(prefix: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{prefix}_{}_{:06x}", std::process::id(), (nanos as u64 ^ rand::random::<u64>()) & 0xff_ffff)
}

/// A registry of this test's own, on a free port, with its tables in a
/// Postgres schema of its own (so global config changes stay in the test).
pub async fn start_registry() -> RunningRegistry {
    start_registry_with(registry_settings()).await
}

/// Settings of a test registry: a free loopback port, its own schema.
pub fn registry_settings() -> RegistryServerSettings {
    let mut settings = RegistryServerSettings::new("127.0.0.1:0".parse().expect("valid address"), database_url());
    settings.schema = Some(unique("registry"));
    settings
}

pub async fn start_registry_with(settings: RegistryServerSettings) -> RunningRegistry {
    kawka_registry::start(settings).await.unwrap_or_else(|e| {
        panic!("cannot start a registry on {} (is the stack up? deploy/local/up.sh): {e:#}", database_url())
    })
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create().expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {name} on {} (is the stack up?): {e}", kafka_bootstrap()));
    for result in results {
        result.unwrap_or_else(|(topic, error)| panic!("cannot create topic {topic}: {error}"));
    }
}

/// What `tests/py/produce.py` reports.
#[derive(Debug, serde::Deserialize)]
pub struct Produced {
    pub produced: usize,
    pub ids: std::collections::HashMap<String, u32>,
}

/// Produces `records` with the Confluent Python client (AvroSerializer).
/// `spec` is the first line of `produce.py`'s input (see the script).
///
/// Runs on a blocking thread: the registry the script talks to may be
/// served by this very test's runtime.
pub async fn produce_with_python(spec: &Json, records: Vec<Json>) -> Produced {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || produce_blocking(&spec, records)).await.expect("producer thread")
}

fn produce_blocking(spec: &Json, records: Vec<Json>) -> Produced {
    let mut child = Command::new(python())
        .arg(project_root().join("tests/py/produce.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {} (deploy/local/install.sh installs it): {e}", python().display()));
    {
        let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("piped stdin"));
        writeln!(stdin, "{spec}").expect("write spec");
        for record in records {
            writeln!(stdin, "{record}").expect("write record");
        }
    }
    let output = child.wait_with_output().expect("producer finishes");
    assert!(
        output.status.success(),
        "produce.py failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("unreadable produce.py output {:?}: {e}", String::from_utf8_lossy(&output.stdout)))
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Reads `count` records of `topic` from the beginning of all its partitions
/// (fewer if `timeout` passes first).
pub async fn consume(topic: &str, count: usize, timeout: Duration) -> Vec<Consumed> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consume_blocking(&topic, count, timeout)).await.expect("consumer thread")
}

fn consume_blocking(topic: &str, count: usize, timeout: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        assignment.add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning).expect("add partition");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = std::time::Instant::now() + timeout;
    let mut records = Vec::with_capacity(count);
    while records.len() < count && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                use rdkafka::message::Headers;
                let headers = message
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
                    .unwrap_or_default();
                records.push(Consumed {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    value: message.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            Some(Err(error)) => panic!("consume {topic}: {error}"),
            None => {}
        }
    }
    records
}

/// A throwaway project directory: `config/kawka.yaml` pointing at the stack
/// (and at `registry_url`), `connectors/` with the given files, and the
/// shipped `schemas/`.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(registry_url: &str, connectors: &[(&str, &str)]) -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("config")).expect("mkdir config");
        std::fs::create_dir_all(root.join("connectors")).expect("mkdir connectors");
        std::fs::create_dir_all(root.join("schemas")).expect("mkdir schemas");
        let config = format!(
            "kafka:\n  bootstrap_servers: {}\n  properties: {{}}\nschema_registry:\n  url: {registry_url}\n\
             sinks:\n  readdb: {{ type: postgres, url: \"{}\" }}\n  search: {{ type: elasticsearch, url: \"{}\" }}\n\
             http:\n  listen: 127.0.0.1:0\nconnectors: connectors/\nschemas: schemas/\nlog:\n  level: info\n",
            kafka_bootstrap(),
            database_url(),
            elasticsearch_url()
        );
        std::fs::write(root.join("config/kawka.yaml"), config).expect("write config");
        for (name, text) in connectors {
            std::fs::write(root.join("connectors").join(format!("{name}.yaml")), text).expect("write connector");
        }
        copy_dir(&project_root().join("schemas"), &root.join("schemas"));
        Project { dir }
    }

    /// `kawka <args>` in the project; must exit 0. Returns its stdout.
    pub fn kawka(&self, args: &[&str]) -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
            .args(args)
            .current_dir(self.root())
            .env_remove("KAWKA_CONFIG")
            .output()
            .expect("kawka runs");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "kawka {args:?} exited {}:\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("kawka {args:?}:\n{stdout}");
        stdout
    }

    pub fn root(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Starts `kawka run` here; its log goes to `kawka-<n>.log`.
    pub fn start(&self, n: usize) -> Kawka {
        let log_path = self.root().join(format!("kawka-{n}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kawka"))
            .args(["run", "--config", "config/kawka.yaml"])
            .current_dir(self.root())
            .env_remove("KAWKA_CONFIG")
            .env("KAWKA_LOG", "info,kawka=debug")
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("kawka run starts");
        Kawka { child: Some(child), log_path }
    }
}

/// The sinks of a project's connectors (by connector name), built as `kawka
/// run` builds them, for tests that write through a sink directly.
pub fn sinks(project: &Project) -> Vec<kawka::sink::Sink> {
    // Directories in the config are relative to the working directory,
    // which is the repository's here: make them absolute.
    let config = project.root().join("config/kawka.yaml");
    let text = std::fs::read_to_string(&config).expect("config").replace(
        "connectors: connectors/\nschemas: schemas/",
        &format!("connectors: {0}/connectors/\nschemas: {0}/schemas/", project.root().display()),
    );
    std::fs::write(&config, text).expect("config");
    let settings = kawka::config::load(&config).expect("config");
    let mut runtimes = kawka::app::connectors(&settings).expect("runtime");
    runtimes.sort_by(|a, b| a.settings.name.cmp(&b.settings.name));
    runtimes.into_iter().map(|runtime| runtime.sink).collect()
}

/// Copies a directory tree (the shipped catalogue into a test project).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    let Ok(entries) = std::fs::read_dir(from) else { return };
    for entry in entries {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

/// A `kawka run` child process; killed when dropped.
pub struct Kawka {
    child: Option<std::process::Child>,
    pub log_path: PathBuf,
}

impl Kawka {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// `kill -9`: no chance to flush or commit.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        tokio::task::spawn_blocking(move || child.wait().ok().and_then(|s| s.code())).await.ok().flatten()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Kawka {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn postgres() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("cannot reach {} (is the stack up? deploy/local/up.sh): {e}", database_url()))
}

/// The sum of a Postgres connector's stored positions: events made durable.
pub async fn stored_positions(pool: &sqlx::PgPool, connector: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM kawka_offsets WHERE connector = $1",
    )
    .bind(connector)
    .fetch_one(pool)
    .await
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// The Confluent framing of `body` under schema `id`.
pub fn framed(id: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    kawka::codec::framing::frame_into(id, body, &mut bytes);
    bytes
}

/// [`framed`] as hex, for `produce.py`'s `raw_value_hex`.
pub fn framed_hex(id: u32, body: &[u8]) -> String {
    framed(id, body).iter().map(|b| format!("{b:02x}")).collect()
}

/// An Avro record schema, as JSON.
pub fn record_schema(namespace: &str, name: &str, fields: Json) -> Json {
    serde_json::json!({"type": "record", "name": name, "namespace": namespace, "fields": fields})
}

/// A schema of the shipped catalogue, as JSON.
pub fn catalogue_schema(event_type: &str, version: u32) -> Json {
    let path = project_root().join("schemas").join(event_type).join(format!("v{version}.avsc"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("catalogue schema is JSON")
}

/// Polls `check` every 250 ms until it returns `Some`, or panics with
/// `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sum over the partitions of `topics` of the offsets `group` committed.
pub async fn committed_total(group: &str, topics: &[String]) -> i64 {
    let (group, topics) = (group.to_string(), topics.to_vec());
    let kafka = kawka::source::KafkaSettings { bootstrap_servers: kafka_bootstrap(), properties: Default::default() };
    tokio::task::spawn_blocking(move || {
        kawka::source::kafka::committed_offsets(&kafka, &group, &topics)
            .map_or(0, |offsets| offsets.iter().map(|(_, _, next)| next).sum())
    })
    .await
    .expect("committed offsets thread")
}

/// The raw text of `GET <index>/_doc/<id>` (status, body): byte-for-byte
/// comparisons of documents use it.
pub async fn es_get_raw(index: &str, id: &str) -> (u16, String) {
    let url = format!("{}/{index}/_doc/{id}", elasticsearch_url());
    let response = reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url} (is the stack up?): {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// `_source` of a document, `None` when missing.
pub async fn es_source(index: &str, id: &str) -> Option<Json> {
    let (status, body) = es_get_raw(index, id).await;
    if status == 404 {
        return None;
    }
    let doc: Json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {index}/{id}: {e}: {body}"));
    doc.get("_source").cloned()
}

/// Runs a search (after a refresh) and returns the hits.
pub async fn es_search(index: &str, query: Json, size: usize) -> Vec<Json> {
    let client = reqwest::Client::new();
    let base = elasticsearch_url();
    let _ = client.post(format!("{base}/{index}/_refresh")).send().await;
    let reply: Json = client
        .post(format!("{base}/{index}/_search"))
        .json(&serde_json::json!({"query": query, "size": size}))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("search reply");
    reply["hits"]["hits"].as_array().cloned().unwrap_or_default()
}

/// `_count` of an index, without a refresh (what a reader sees).
pub async fn es_count(index: &str) -> usize {
    let url = format!("{}/{index}/_count", elasticsearch_url());
    let reply: Json = reqwest::get(&url).await.expect("count").json().await.expect("count reply");
    reply["count"].as_u64().unwrap_or_else(|| panic!("GET {url}: {reply}")) as usize
}

/// The sorted ids of a search's hits.
pub async fn es_search_ids(index: &str, query: Json) -> Vec<String> {
    let mut ids: Vec<String> =
        es_search(index, query, 1000).await.iter().filter_map(|h| h["_id"].as_str().map(str::to_string)).collect();
    ids.sort();
    ids
}

/// Every document of an index (up to `size`) by id, without kawka's guard field.
pub async fn es_documents(index: &str, size: usize) -> std::collections::BTreeMap<String, Json> {
    es_search(index, serde_json::json!({"match_all": {}}), size)
        .await
        .into_iter()
        .map(|hit| (hit["_id"].as_str().expect("an id").to_string(), without_guard(hit["_source"].clone())))
        .collect()
}

/// One document's `_source` without kawka's guard field, `None` when missing.
pub async fn es_document(index: &str, id: &str) -> Option<Json> {
    es_source(index, id).await.map(without_guard)
}

fn without_guard(mut source: Json) -> Json {
    if let Some(object) = source.as_object_mut() {
        object.remove("kawka");
    }
    source
}

/// Runs `kawka run` in `project` until `group` has committed `total`
/// offsets on `topics`, then stops it, which must exit 0.
pub async fn run_until_committed(project: &Project, group: &str, topics: &[String], total: i64) {
    let mut kawka = project.start(0);
    eventually(Duration::from_secs(60), "every event to be committed", || async {
        (committed_total(group, topics).await == total).then_some(())
    })
    .await;
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
}

/// Registers `schema` under `subject` of the registry at `url`; returns its id.
pub async fn register(url: &str, subject: &str, schema: &Json) -> u32 {
    let registered: Json = reqwest::Client::new()
        .post(format!("{url}/subjects/{subject}/versions"))
        .json(&serde_json::json!({"schema": schema.to_string()}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("an id");
    registered["id"].as_u64().expect("an id") as u32
}

/// A port that was free a moment ago (for services that must come back on
/// the same address after a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A registry on a given address and Postgres schema: restarting it with
/// the same arguments serves the same ids.
pub async fn start_registry_on(port: u16, schema: &str) -> RunningRegistry {
    let mut settings =
        RegistryServerSettings::new(format!("127.0.0.1:{port}").parse().expect("valid address"), database_url());
    settings.schema = Some(schema.to_string());
    kawka_registry::start(settings).await.unwrap_or_else(|e| panic!("cannot start a registry on port {port}: {e:#}"))
}

/// The machine's Postgres cluster, stopped for a fault test and started
/// again when this is dropped (also when the test fails).
pub struct PostgresOutage {
    version: String,
}

fn pg_ctl(version: &str, action: &str) -> bool {
    let mut args = vec!["--skip-systemctl-redirect", version, "main", action];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    let direct = Command::new("pg_ctlcluster").args(&args).status().is_ok_and(|s| s.success());
    direct || Command::new("sudo").arg("-n").arg("pg_ctlcluster").args(&args).status().is_ok_and(|s| s.success())
}

impl PostgresOutage {
    pub fn begin() -> PostgresOutage {
        let version = std::fs::read_dir("/etc/postgresql")
            .expect("a Debian Postgres cluster")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
            .expect("a Postgres version");
        assert!(pg_ctl(&version, "stop"), "cannot stop Postgres {version}");
        PostgresOutage { version }
    }

    /// Starts Postgres again and waits until it accepts connections.
    pub fn end(&mut self) {
        if self.version.is_empty() {
            return;
        }
        assert!(pg_ctl(&self.version, "start"), "cannot start Postgres {} again", self.version);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect("127.0.0.1:5432").is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        self.version.clear();
    }
}

impl Drop for PostgresOutage {
    fn drop(&mut self) {
        if !self.version.is_empty() {
            let _ = pg_ctl(&self.version, "start");
        }
    }
}

/// The address `kawka run` logged for its HTTP port.
pub fn http_address(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("http listening"))
        .and_then(|l| l.split("address=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap_or_default().to_string())
}

/// Runs a bash snippet with the stack's `env.sh` sourced.
pub fn stack_shell(script: &str) {
    let env = project_root().join("deploy/local/env.sh");
    let status = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source '{}'; {script}", env.display()))
        .status()
        .expect("bash");
    assert!(status.success(), "stack command failed: {script}");
}

/// Stops the stack's Elasticsearch API server (waiting for it to exit).
pub fn stop_elasticsearch() {
    stack_shell("stop_service noida");
}

/// Starts it again on the same data.
pub fn start_elasticsearch_keeping_data() {
    stack_shell("KAWKA_NOIDA_KEEP_DATA=1 \"$KAWKA_ROOT/deploy/local/up.sh\" >/dev/null");
}

/// A tansu broker of the test's own with sqlite storage: it keeps its
/// records across a restart (the stack's broker keeps them in memory).
pub struct PersistentBroker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PersistentBroker {
    pub fn start() -> PersistentBroker {
        let mut broker =
            PersistentBroker { dir: tempfile::tempdir().expect("temp dir"), port: free_port(), child: None };
        broker.restart();
        broker
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same storage and waits until it listens.
    pub fn restart(&mut self) {
        let binary = std::env::var("KAWKA_TANSU_PERSISTENT").unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_string());
            format!("{home}/.cache/kawka/tansu-0.6.0/bin/tansu")
        });
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("tansu.log")).expect("log");
        let child = Command::new(&binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // The sqlite path is relative to the working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} (deploy/local/install.sh --tests builds it; test.sh does): {e}")
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and waits for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for PersistentBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The "stats" read model of the Elasticsearch tests: registrations (full
/// replaces), email changes (merges) and logins (increments), whose order
/// matters, over a few users.
/// Every key whose row or document differs from the expected one,
/// described (`except`: a key left out).
pub fn differences<V: PartialEq + std::fmt::Debug>(
    got: &std::collections::BTreeMap<String, V>,
    want: &std::collections::BTreeMap<String, V>,
    except: Option<&str>,
) -> Vec<String> {
    let mut keys: Vec<&String> = got.keys().chain(want.keys()).filter(|k| Some(k.as_str()) != except).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|key| got.get(*key) != want.get(*key))
        .map(|key| format!("{key}: read model {:?}, expected {:?}", got.get(key), want.get(key)))
        .collect()
}

pub mod stats {
    use std::collections::{BTreeMap, BTreeSet};

    use rand::Rng;
    use serde_json::{json, Value as Json};

    /// The producer's schemas of the three events.
    pub fn schemas() -> Json {
        let record = |name: &str, fields: Json| super::record_schema("test.stats", name, fields);
        json!({
            "registered": record("Registered", json!([{"name": "user_id", "type": "string"}, {"name": "name", "type": "string"}, {"name": "email", "type": "string"}])),
            "email": record("EmailChanged", json!([{"name": "user_id", "type": "string"}, {"name": "email", "type": "string"}])),
            "login": record("LoggedIn", json!([{"name": "user_id", "type": "string"}, {"name": "count", "type": "int"}])),
        })
    }

    /// A random log of `events` over `users` users (Kafka key = user).
    pub fn log(events: usize, users: usize) -> Vec<Json> {
        log_from(&mut rand::rng(), events, users)
    }

    /// [`log`] drawn from `rng`: a seeded one gives the same log again.
    pub fn log_from(rng: &mut impl Rng, events: usize, users: usize) -> Vec<Json> {
        let mut registered = BTreeSet::new();
        (0..events)
            .map(|n| {
                let user = format!("user{}", rng.random_range(0..users));
                let roll = rng.random_range(0..10);
                if roll == 0 || !registered.contains(&user) && roll < 3 {
                    registered.insert(user.clone());
                    let (full_name, email) = (format!("Name {n}"), format!("{user}.{n}@example.com"));
                    json!({"schema": "registered", "key": user, "value": {"user_id": user, "name": full_name, "email": email}})
                } else if roll < 4 {
                    let email = format!("{user}.changed{n}@example.com");
                    json!({"schema": "email", "key": user, "value": {"user_id": user, "email": email}})
                } else {
                    json!({"schema": "login", "key": user, "value": {"user_id": user, "count": rng.random_range(1..5)}})
                }
            })
            .collect()
    }

    /// Every row of a Postgres table of these events (`id`, `name`,
    /// `email`, `logins`), null columns left out, as [`fold`] writes them.
    pub async fn rows(pool: &sqlx::PgPool, table: &str) -> BTreeMap<String, Json> {
        type Row = (String, Option<String>, Option<String>, Option<i64>);
        let rows: Vec<Row> = sqlx::query_as(&format!("SELECT id, name, email, logins FROM \"{table}\""))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("read table {table}: {e}"));
        rows.into_iter()
            .map(|(id, name, email, logins)| {
                let mut row = serde_json::Map::new();
                for (column, value) in [("name", json!(name)), ("email", json!(email)), ("logins", json!(logins))] {
                    if !value.is_null() {
                        row.insert(column.to_string(), value);
                    }
                }
                (id, Json::Object(row))
            })
            .collect()
    }

    /// The documents a log must end in, folded here in order.
    pub fn fold(records: &[Json]) -> BTreeMap<String, Json> {
        let mut fold: BTreeMap<String, Json> = BTreeMap::new();
        for record in records {
            let (user, value) = (record["key"].as_str().expect("key").to_string(), &record["value"]);
            let doc = fold.entry(user).or_insert_with(|| json!({}));
            match record["schema"].as_str() {
                Some("registered") => *doc = json!({"name": value["name"], "email": value["email"], "logins": 0}),
                Some("email") => doc["email"] = value["email"].clone(),
                _ => {
                    doc["logins"] = json!(doc["logins"].as_i64().unwrap_or(0) + value["count"].as_i64().expect("count"))
                }
            }
        }
        fold
    }
}

/// A versioned profile log (`version: seq`): registrations, email changes,
/// logins (increments), deletes followed by re-registrations, and late
/// duplicates (an earlier event of the user again, with its `seq`).
pub mod profiles {
    use std::collections::{BTreeMap, BTreeSet};

    use rand::Rng;
    use serde_json::{json, Value as Json};

    /// The producer's schemas of the four events.
    pub fn schemas() -> Json {
        let record = |name: &str, fields: Json| super::record_schema("test.profiles", name, fields);
        let id_seq = |more: Json| {
            let mut fields = vec![json!({"name": "user_id", "type": "string"}), json!({"name": "seq", "type": "long"})];
            fields.extend(more.as_array().cloned().unwrap_or_default());
            Json::Array(fields)
        };
        json!({
            "registered": record("Registered", id_seq(json!([{"name": "name", "type": "string"}, {"name": "email", "type": "string"}]))),
            "email": record("EmailChanged", id_seq(json!([{"name": "email", "type": "string"}]))),
            "login": record("LoggedIn", id_seq(json!([{"name": "count", "type": "int"}]))),
            "deleted": record("Deleted", id_seq(json!([]))),
        })
    }

    /// The connector's rules for these events (with `version: seq`).
    pub const RULES: &str = "version: seq
events:
  test.profiles.Registered:   { upsert: { name: name, email: email, logins: 0 } }
  test.profiles.EmailChanged: { merge: { email: email } }
  test.profiles.LoggedIn:     { increment: { logins: count } }
  test.profiles.Deleted:      { delete: {} }
";

    /// A random log of `events` over `users` users (Kafka key = user).
    pub fn log(events: usize, users: usize) -> Vec<Json> {
        let mut rng = rand::rng();
        let mut registered = BTreeSet::new();
        let mut seqs: BTreeMap<String, i64> = BTreeMap::new();
        let mut by_user: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut log: Vec<Json> = Vec::with_capacity(events);
        for n in 0..events {
            let user = format!("user{}", rng.random_range(0..users));
            let earlier = by_user.entry(user.clone()).or_default();
            let roll = rng.random_range(0..100);
            if roll < 4 && !earlier.is_empty() {
                // A late duplicate: the same event (and seq) again.
                let again = log[earlier[rng.random_range(0..earlier.len())]].clone();
                earlier.push(log.len());
                log.push(again);
                continue;
            }
            let seq = {
                let seq = seqs.entry(user.clone()).or_default();
                *seq += 1;
                *seq
            };
            let record = if roll < 12 || !registered.contains(&user) && roll < 40 {
                registered.insert(user.clone());
                let (full_name, email) = (format!("Name {n}"), format!("{user}.{n}@example.com"));
                json!({"schema": "registered", "key": user,
                    "value": {"user_id": user, "seq": seq, "name": full_name, "email": email}})
            } else if roll < 17 && registered.contains(&user) {
                registered.remove(&user);
                json!({"schema": "deleted", "key": user, "value": {"user_id": user, "seq": seq}})
            } else if roll < 30 {
                let email = format!("{user}.changed{n}@example.com");
                json!({"schema": "email", "key": user, "value": {"user_id": user, "seq": seq, "email": email}})
            } else {
                let count = rng.random_range(1..5);
                json!({"schema": "login", "key": user, "value": {"user_id": user, "seq": seq, "count": count}})
            };
            earlier.push(log.len());
            log.push(record);
        }
        log
    }

    /// The documents a log must end in, folded here one event at a time: an
    /// event whose seq is not above the highest applied for its user (also
    /// across a delete) changes nothing.
    pub fn fold(records: &[Json]) -> BTreeMap<String, Json> {
        let mut docs: BTreeMap<String, Json> = BTreeMap::new();
        let mut applied: BTreeMap<String, i64> = BTreeMap::new();
        for record in records {
            let (user, value) = (record["key"].as_str().expect("key").to_string(), &record["value"]);
            let seq = value["seq"].as_i64().expect("seq");
            let highest = applied.entry(user.clone()).or_insert(0);
            if seq <= *highest {
                continue;
            }
            *highest = seq;
            match record["schema"].as_str() {
                Some("registered") => {
                    docs.insert(user, json!({"name": value["name"], "email": value["email"], "logins": 0}));
                }
                Some("deleted") => {
                    docs.remove(&user);
                }
                Some("email") => {
                    docs.entry(user).or_insert_with(|| json!({}))["email"] = value["email"].clone();
                }
                _ => {
                    let doc = docs.entry(user).or_insert_with(|| json!({}));
                    doc["logins"] =
                        json!(doc["logins"].as_i64().unwrap_or(0) + value["count"].as_i64().expect("count"));
                }
            }
        }
        docs
    }
}

/// The text `kubectl kustomize` (or `kustomize build`) makes of the
/// Kubernetes overlay `overlay` (under `deploy/k8s/overlays/`).
pub fn kustomize(overlay: &str) -> String {
    let dir = project_root().join("deploy/k8s/overlays").join(overlay);
    let built = Command::new("kubectl")
        .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(&dir)
        .output()
        .or_else(|_| {
            Command::new("kustomize").args(["build", "--load-restrictor", "LoadRestrictionsNone"]).arg(&dir).output()
        })
        .expect("kubectl (or kustomize) is on the PATH");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    String::from_utf8_lossy(&built.stdout).into_owned()
}

/// The documents of a multi-document YAML text.
pub fn yaml_documents(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text).map(|doc| serde::Deserialize::deserialize(doc).expect("yaml")).collect()
}

/// How many records `topic` holds: the sum of its partitions' high
/// watermarks (the tests' topics are never compacted or truncated).
pub async fn topic_size(topic: &str) -> i64 {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", kafka_bootstrap()).create().expect("consumer");
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("topic metadata");
        metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("watermarks of {topic}/{}: {e}", p.id()));
                high
            })
            .sum()
    })
    .await
    .expect("watermarks thread")
}
