//! Locked by default (README "Security"), tried against real servers:
//! the registry's users, tokens and roles (with Confluent's Python client
//! and kawka's own registry client, over TLS), the daemon's control gate,
//! the limits both servers put on one client, the audit log, and no secret
//! in any output of `kawka` at trace level.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use kawka_registry::auth::{hash_password, hash_token, Authenticator};
use serde_json::{json, Value as Json};

use support::eventually;

/// Every log line of this test binary (the registry and the daemon's HTTP
/// port run in-process): the audit log is read from here.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Sink(writer.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().expect("log buffer")).into_owned()
}

/// The audit lines that mention `needle`.
fn audit_lines(needle: &str) -> Vec<String> {
    log_text().lines().filter(|l| l.contains("kawka::audit") && l.contains(needle)).map(str::to_string).collect()
}

struct Users {
    tag: String,
    reader: (String, String),
    writer: (String, String),
    admin: (String, String),
    token: String,
}

impl Users {
    fn new() -> Users {
        let tag = support::unique("u");
        let pair = |role: &str| (format!("{role}-{tag}"), format!("pw of {role} {tag}!")); // spaces and ':' are fine
        Users {
            reader: pair("reader"),
            writer: pair("writer"),
            admin: pair("admin"),
            token: format!("token-{tag}-0123456789abcdef0123456789"),
            tag,
        }
    }

    fn file(&self) -> String {
        let user = |(name, password): &(String, String), role: &str| {
            format!(
                "  - {{ name: {name}, role: {role}, password_hash: \"{}\" }}\n",
                hash_password(password).expect("hash")
            )
        };
        format!(
            "users:\n{}{}{}tokens:\n  - {{ name: ci-{}, role: admin, sha256: {} }}\n",
            user(&self.reader, "read"),
            user(&self.writer, "write"),
            user(&self.admin, "admin"),
            self.tag,
            hash_token(&self.token)
        )
    }

    fn authenticator(&self) -> Authenticator {
        Authenticator::parse(&self.file(), "test").expect("auth file")
    }
}

#[derive(Clone, Copy)]
enum As<'a> {
    Nobody,
    User(&'a (String, String)),
    Password(&'a str, &'a str),
    Token(&'a str),
}

async fn call(base: &str, who: As<'_>, method: &str, path: &str, body: Option<Json>) -> (u16, Json, String) {
    let client = reqwest::Client::new();
    let mut request = client.request(method.parse().expect("method"), format!("{base}{path}"));
    request = match who {
        As::Nobody => request,
        As::User((name, password)) => request.basic_auth(name, Some(password)),
        As::Password(name, password) => request.basic_auth(name, Some(password)),
        As::Token(token) => request.bearer_auth(token),
    };
    if let Some(body) = body {
        request = request.header("content-type", "application/vnd.schemaregistry.v1+json").body(body.to_string());
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let challenge =
        response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = response.json().await.unwrap_or(Json::Null);
    (status, body, challenge)
}

fn order_schema() -> Json {
    json!({"schema": json!({"type": "record", "name": "Order", "fields": [{"name": "id", "type": "string"}]}).to_string()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_users_and_tokens_may_do_what_their_roles_allow() {
    logs();
    let users = Users::new();
    let mut settings = support::registry_settings();
    settings.auth = Some(users.authenticator());
    let registry = support::start_registry_with(settings).await;
    let base = registry.url();
    let subject = format!("{}-value", support::unique("orders"));
    let versions = format!("/subjects/{subject}/versions");
    let (reader, writer, admin) = (As::User(&users.reader), As::User(&users.writer), As::User(&users.admin));

    // (who, method, path, body, status, Confluent error code)
    type Case<'a> = (As<'a>, &'a str, String, Option<Json>, u16, Option<i64>);
    let cases: Vec<Case> = vec![
        (As::Nobody, "GET", "/subjects".into(), None, 401, Some(401)),
        (As::Password(&users.reader.0, "wrong"), "GET", "/subjects".into(), None, 401, Some(401)),
        (As::Password("nobody", "wrong"), "GET", "/subjects".into(), None, 401, Some(401)),
        (As::Token("not-a-token"), "GET", "/subjects".into(), None, 401, Some(401)),
        // The probes' path needs nothing.
        (As::Nobody, "GET", "/".into(), None, 200, None),
        (reader, "GET", "/subjects".into(), None, 200, None),
        (reader, "POST", versions.clone(), Some(order_schema()), 403, Some(40301)),
        (writer, "POST", versions.clone(), Some(order_schema()), 200, None),
        // A lookup and a compatibility check change nothing: read.
        (reader, "POST", format!("/subjects/{subject}"), Some(order_schema()), 200, None),
        (reader, "POST", format!("/compatibility/subjects/{subject}/versions/latest"), Some(order_schema()), 200, None),
        (reader, "PUT", format!("/config/{subject}"), Some(json!({"compatibility": "FULL"})), 403, Some(40301)),
        (writer, "PUT", format!("/config/{subject}"), Some(json!({"compatibility": "FULL"})), 200, None),
        (writer, "PUT", format!("/mode/{subject}"), Some(json!({"mode": "READWRITE"})), 200, None),
        (writer, "PUT", "/config".into(), Some(json!({"compatibility": "NONE"})), 403, Some(40301)),
        (writer, "DELETE", format!("/subjects/{subject}"), None, 403, Some(40301)),
        (As::Token(&users.token), "PUT", "/config".into(), Some(json!({"compatibility": "BACKWARD"})), 200, None),
        (admin, "DELETE", format!("/subjects/{subject}"), None, 200, None),
    ];
    for (who, method, path, body, status, code) in cases {
        let (got, body, challenge) = call(&base, who, method, &path, body).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        if let Some(code) = code {
            assert_eq!(body["error_code"], code, "{method} {path}: {body}");
            assert!(body["message"].is_string(), "{body}");
        }
        if status == 401 {
            assert!(challenge.starts_with("Basic"), "401 carries a challenge: {challenge:?}");
        }
    }

    // The audit log: one line per request that changes something, with
    // who, what and the outcome; reads are not in it; no password is.
    let subject_lines = audit_lines(&subject);
    let with = |who: &str, method: &str, path: &str, outcome: &str| {
        subject_lines
            .iter()
            .filter(|l| {
                l.contains(who) && l.contains(method) && l.contains(&format!("path=\"{path}\"")) && l.contains(outcome)
            })
            .count()
    };
    assert_eq!(with(&users.reader.0, "POST", &versions, "forbidden"), 1, "{subject_lines:#?}");
    assert_eq!(with(&users.writer.0, "POST", &versions, "done"), 1, "{subject_lines:#?}");
    assert_eq!(with(&users.writer.0, "DELETE", &format!("/subjects/{subject}"), "forbidden"), 1);
    assert_eq!(with(&users.admin.0, "DELETE", &format!("/subjects/{subject}"), "done"), 1);
    assert_eq!(with(&users.writer.0, "PUT", &format!("/config/{subject}"), "done"), 1);
    assert_eq!(subject_lines.iter().filter(|l| l.contains(&format!("path=\"/subjects/{subject}\""))).count(), 2);
    assert_eq!(audit_lines(&format!("ci-{}", users.tag)).len(), 1, "the token's global config change");
    assert_eq!(
        audit_lines(&users.writer.0).iter().filter(|l| l.contains("path=\"/config\"")).count(),
        1,
        "the writer's refused global config change"
    );
    assert!(subject_lines.iter().all(|l| !l.contains("GET")), "reads are not audited");
    let text = log_text();
    for (_, password) in [&users.reader, &users.writer, &users.admin] {
        assert!(!text.contains(password.as_str()), "a password is in the log");
    }
    assert!(!text.contains(&users.token));
    let _ = registry.stop().await;
}

/// A test CA and a server certificate it signed for 127.0.0.1 and
/// localhost: (dir, CA certificate, server certificate, server key).
fn certificate() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(
        path("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: Vec<Vec<String>> = vec![
        ["req", "-x509"]
            .into_iter()
            .chain(ec)
            .chain(["-days", "2", "-subj", "/CN=kawka test CA"])
            .map(String::from)
            .collect(),
        ["req"].into_iter().chain(ec).chain(["-subj", "/CN=localhost"]).map(String::from).collect(),
        ["x509", "-req", "-days", "2", "-CAcreateserial"].into_iter().map(String::from).collect(),
    ];
    let files: [&[(&str, &str)]; 3] = [
        &[("-keyout", "ca.key"), ("-out", "ca.pem")],
        &[("-keyout", "key.pem"), ("-out", "req.csr")],
        &[("-in", "req.csr"), ("-CA", "ca.pem"), ("-CAkey", "ca.key"), ("-extfile", "ext.cnf"), ("-out", "cert.pem")],
    ];
    for (args, files) in steps.iter().zip(files) {
        let mut command = Command::new("openssl");
        command.args(args);
        for (flag, file) in files {
            command.arg(flag).arg(path(file));
        }
        let output = command.output().expect("openssl runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let (ca, cert, key) = (path("ca.pem"), path("cert.pem"), path("key.pem"));
    (dir, ca, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluents_client_and_kawkas_client_authenticate_over_tls() {
    logs();
    let users = Users::new();
    let (_dir, ca, cert, key) = certificate();
    let mut settings = support::registry_settings();
    settings.auth = Some(users.authenticator());
    settings.tls = Some(kawka_http::tls_acceptor(&cert, &key).expect("tls"));
    let registry = support::start_registry_with(settings).await;
    let url = registry.url();
    assert!(url.starts_with("https://"), "{url}");

    let prefix = support::unique("tls");
    let args = vec![
        url.clone(),
        prefix.clone(),
        format!("{}:{}", users.writer.0, users.writer.1),
        format!("{}:{}", users.reader.0, users.reader.1),
        ca.display().to_string(),
    ];
    let results = support::python_json("registry_auth_client.py", args).await;
    let id = results["register"].as_i64().unwrap_or_else(|| panic!("an id: {results}"));
    assert_eq!(results["read_by_reader"], id, "{results}");
    assert_eq!(results["register_by_reader"], json!({"error_code": 40301, "http_status": 403}), "{results}");
    assert_eq!(results["wrong_password"]["http_status"], 401, "{results}");
    assert_eq!(results["anonymous"]["http_status"], 401, "{results}");

    // kawka's own client, as the daemon uses it: the CA file, basic auth.
    let client_for = |user: &str, password: &str| {
        let mut settings = kawka::codec::RegistryClientSettings::plain(url.clone());
        settings.username = Some(user.to_string());
        settings.password = Some(kawka::secret::Secret::new(password));
        settings.ca_file = Some(ca.clone());
        kawka::codec::registry::RegistryClient::new(&settings).expect("client")
    };
    let reader = client_for(&users.reader.0, &users.reader.1);
    let schema = reader.writer_schema(id as u32).await.expect("the daemon's client reads the schema");
    assert!(format!("{:?}", schema.schema).contains("Order"));
    assert!(!format!("{reader:?}").contains(&users.reader.1), "the client's Debug hides the password");
    let wrong = client_for(&users.reader.0, "wrong");
    let error = wrong.writer_schema(id as u32).await.expect_err("a wrong password is refused");
    assert!(error.to_string().contains("401"), "{error}");
    assert_eq!(
        error.class(),
        kawka::error::ErrorClass::Transient,
        "refused credentials wait (visibly) for an operator; no event is dead-lettered for them"
    );
    // Plain HTTP to the TLS port gets nothing.
    let plain = reqwest::Client::new().get(url.replace("https://", "http://") + "/").send().await;
    assert!(plain.is_err() || plain.is_ok_and(|r| !r.status().is_success()));
    let _ = registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_refuses_to_listen_beyond_loopback_without_credentials() {
    let mut settings = support::registry_settings();
    settings.listen = "0.0.0.0:0".parse().expect("address");
    let error = kawka_registry::start(settings).await.err().expect("refused").to_string();
    assert!(error.contains("without credentials") && error.contains("--insecure"), "{error}");
    let mut settings = support::registry_settings();
    settings.listen = "0.0.0.0:0".parse().expect("address");
    settings.insecure = true;
    let registry = kawka_registry::start(settings).await.expect("the operator's choice");
    let _ = registry.stop().await;
}

/// Sends raw bytes and reads until the server answers or closes:
/// (what came back, how long it took).
fn raw(address: std::net::SocketAddr, request: &[u8], wait: Duration) -> (String, Duration) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(wait)).expect("timeout");
    let started = Instant::now();
    stream.write_all(request).expect("write");
    let mut out = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buffer[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && !out.ends_with(b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
}

fn nested(depth: usize) -> Json {
    let mut schema = json!("string");
    for level in 0..depth {
        schema = json!({"type": "record", "name": format!("R{level}"), "fields": [{"name": "f", "type": schema}]});
    }
    schema
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_to_the_registry_are_refused_cleanly() {
    let mut settings = support::registry_settings();
    settings.limits.max_body_bytes = 64 << 10;
    settings.limits.header_timeout = Duration::from_secs(1);
    settings.limits.body_timeout = Duration::from_secs(2);
    settings.limits.max_in_flight = 2;
    let registry = support::start_registry_with(settings).await;
    let (base, address) = (registry.url(), registry.address);
    let subject = format!("{}-value", support::unique("hostile"));
    let versions = format!("/subjects/{subject}/versions");

    // A body beyond the limit: 413 in Confluent's body, declared or chunked.
    let big = json!({"schema": format!("\"{}\"", "x".repeat(100 << 10))});
    let (status, body, _) = call(&base, As::Nobody, "POST", &versions, Some(big)).await;
    assert_eq!((status, body["error_code"].clone()), (413, json!(413)), "{body}");
    let chunk = vec![b'x'; 70 << 10];
    let mut request = format!(
        "POST {versions} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        chunk.len()
    )
    .into_bytes();
    request.extend_from_slice(&chunk);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let (answer, _) =
        tokio::task::spawn_blocking(move || raw(address, &request, Duration::from_secs(5))).await.expect("thread");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Nesting past the limit is an invalid schema; below it, fine. Arrays
    // nest one JSON level each, records four (128 JSON levels are the
    // JSON parser's own limit, also a 42201).
    let arrays = |depth: usize| {
        (0..depth).fold(json!("string"), |items, _| json!({"type": "array", "items": items})).to_string()
    };
    let (status, body, _) = call(&base, As::Nobody, "POST", &versions, Some(json!({"schema": arrays(70)}))).await;
    assert_eq!((status, body["error_code"].clone()), (422, json!(42201)), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("nests deeper than 64")), "{body}");
    let (status, body, _) =
        call(&base, As::Nobody, "POST", &versions, Some(json!({"schema": nested(70).to_string()}))).await;
    assert_eq!((status, body["error_code"].clone()), (422, json!(42201)), "{body}");
    let (status, body, _) = call(&base, As::Nobody, "POST", &versions, Some(json!({"schema": arrays(60)}))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = call(
        &base,
        As::Nobody,
        "POST",
        &format!("/subjects/{subject}-r/versions"),
        Some(json!({"schema": nested(20).to_string()})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A decimal whose text would be huge.
    let decimal = json!({"type": "record", "name": "D", "fields": [{"name": "d",
        "type": {"type": "bytes", "logicalType": "decimal", "precision": 5000, "scale": 4000}}]});
    let (status, body, _) = call(
        &base,
        As::Nobody,
        "POST",
        &format!("/subjects/{subject}-d/versions"),
        Some(json!({"schema": decimal.to_string()})),
    )
    .await;
    assert_eq!((status, body["error_code"].clone()), (422, json!(42201)), "{body}");

    // A client that never finishes its headers is cut off.
    let (answer, took) = tokio::task::spawn_blocking(move || {
        raw(address, b"GET /subjects HTTP/1.1\r\nHost: x\r\nX-Slow: ", Duration::from_secs(10))
    })
    .await
    .expect("thread");
    assert!(took < Duration::from_secs(5), "closed after the header timeout, not {took:?}: {answer}");
    // So is one that sends nothing at all.
    let (_, took) =
        tokio::task::spawn_blocking(move || raw(address, b"", Duration::from_secs(10))).await.expect("thread");
    assert!(took < Duration::from_secs(5), "an idle connection is closed too, not after {took:?}");
    // One that never finishes its body gets 408.
    let (answer, took) = tokio::task::spawn_blocking(move || {
        raw(
            address,
            format!("POST {versions} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"sch")
                .as_bytes(),
            Duration::from_secs(10),
        )
    })
    .await
    .expect("thread");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // Two slow bodies hold both places: a third request gets 503 at once,
    // and is served again when they are gone.
    let holders: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                raw(
                    address,
                    b"POST /subjects/x/versions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
                    Duration::from_secs(10),
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = reqwest::get(format!("{base}/subjects")).await.expect("request");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    for holder in holders {
        let (answer, _) = holder.join().expect("holder");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert_eq!(reqwest::get(format!("{base}/subjects")).await.expect("request").status().as_u16(), 200);
    let _ = registry.stop().await;
}

fn daemon(token: Option<&str>, name: &str) -> Arc<kawka::http::Daemon> {
    Arc::new(kawka::http::Daemon {
        connectors: kawka::status::Connectors::new(vec![Arc::new(kawka::status::ConnectorStatus::new(
            name, "postgres",
        ))]),
        registry: None,
        token: token.map(kawka::secret::Secret::new),
        loopback: true,
        rebuilds: None,
        reloads: None,
        runtimes: Default::default(),
    })
}

async fn serve_daemon(daemon: Arc<kawka::http::Daemon>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(kawka::http::serve(listener, daemon, std::future::pending()));
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_acts_only_on_requests_it_can_trust() {
    logs();
    let name = support::unique("ctl");
    let token = format!("tok-{name}-0123456789");
    let address = serve_daemon(daemon(Some(&token), &name)).await;
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let pause = format!("{base}/connectors/{name}/pause");
    // A client that never finishes its headers is cut off here too (after
    // the port's 10 s), while the rest of the test runs.
    let slow =
        std::thread::spawn(move || raw(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", Duration::from_secs(30)));

    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(client.post(&pause).send().await.expect("post")), 401, "no token, no action");
    assert_eq!(status(client.post(&pause).bearer_auth("tok-wrong").send().await.expect("post")), 401);
    assert_eq!(status(client.get(&pause).bearer_auth(&token).send().await.expect("get")), 405, "POST only");
    // A browser's preflight is never granted: no CORS headers, no action.
    let preflight = client
        .request(reqwest::Method::OPTIONS, &pause)
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("options");
    assert!(!preflight.status().is_success(), "{}", preflight.status());
    assert!(preflight.headers().keys().all(|k| !k.as_str().starts_with("access-control-")));
    let state = |client: reqwest::Client, url: String| async move {
        let body: Json = client.get(url).send().await.expect("get").json().await.expect("json");
        body["state"].clone()
    };
    assert_ne!(state(client.clone(), format!("{base}/connectors/{name}")).await, "paused");
    let response = client.post(&pause).bearer_auth(&token).send().await.expect("post");
    assert_eq!(status(response), 200);
    assert_eq!(state(client.clone(), format!("{base}/connectors/{name}")).await, "paused");
    // Read endpoints stay open for probes and Prometheus.
    for path in ["/healthz", "/metrics", "/connectors"] {
        assert_eq!(status(client.get(format!("{base}{path}")).send().await.expect("get")), 200, "{path}");
    }
    // Bodies are bounded here too.
    let response = client.post(&pause).bearer_auth(&token).body(vec![b'x'; 100 << 10]).send().await.expect("post");
    assert_eq!(status(response), 413);

    // Without a token (loopback): what a browser could have been made to send is refused.
    let open_name = support::unique("ctl_open");
    let open = serve_daemon(daemon(None, &open_name)).await;
    let resume = format!("http://{open}/connectors/{open_name}/resume");
    let response = client.post(&resume).header("origin", "http://evil.example").send().await.expect("post");
    assert_eq!(status(response), 403);
    let response = client.post(&resume).header("sec-fetch-site", "cross-site").send().await.expect("post");
    assert_eq!(status(response), 403);
    let response = client.post(&resume).header("host", "evil.example:8080").send().await.expect("post");
    assert_eq!(status(response), 403, "a rebound name is not a loopback host");
    assert_eq!(status(client.post(&resume).send().await.expect("post")), 200, "a local tool's request");

    let lines = audit_lines(&format!("/connectors/{name}/pause"));
    assert_eq!(lines.iter().filter(|l| l.contains("denied")).count(), 2, "{lines:#?}");
    assert_eq!(lines.iter().filter(|l| l.contains("done") && l.contains("token holder")).count(), 1, "{lines:#?}");
    assert_eq!(audit_lines(&format!("/connectors/{open_name}/resume")).len(), 4);
    assert!(!log_text().contains(&token), "the token is never logged");
    let (answer, took) = slow.join().expect("slow client");
    assert!(took < Duration::from_secs(20), "cut off after the header timeout, not {took:?}: {answer}");
}

fn validate(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("connectors")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("schemas")).expect("mkdir");
    std::fs::write(dir.path().join("kawka.yaml"), config).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["validate", "--config", "kawka.yaml"])
        .current_dir(dir.path())
        .env_remove("KAWKA_CONFIG")
        .output()
        .expect("kawka validate");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn the_daemon_refuses_an_open_control_plane_beyond_loopback() {
    let head = "kafka: { bootstrap_servers: 127.0.0.1:9092 }\nschema_registry: { url: \"http://127.0.0.1:8081\" }\n";
    let (ok, text) = validate(&format!("{head}http:\n  listen: 0.0.0.0:8080\n"));
    assert!(
        !ok && text.contains("kawka.yaml:4") && text.contains("http.listen") && text.contains("http.token"),
        "{text}"
    );
    let (ok, text) = validate(&format!("{head}http:\n  listen: 0.0.0.0:8080\n  token: \"\"\n"));
    assert!(!ok, "an empty token is no token: {text}");
    let (ok, text) = validate(&format!("{head}http:\n  listen: 0.0.0.0:8080\n  token: s3cret-token\n"));
    assert!(ok, "{text}");
    let (ok, text) = validate(&format!("{head}http:\n  listen: 0.0.0.0:8080\n  insecure: true\n"));
    assert!(ok, "{text}");
    let (ok, text) = validate(&format!("{head}http:\n  listen: 127.0.0.1:8080\n"));
    assert!(ok, "{text}");
}

/// Credentials set everywhere kawka takes one; the daemon, `validate`,
/// `status`, `rebuild` and failing connections run at trace level; not one
/// of the secrets (nor the base64 of a basic-auth header) may appear in a
/// log line, an error, an HTTP response or a `Debug` output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output() {
    let tag = support::unique("s");
    let secret = |what: &str| format!("{what}Secret{}", tag.replace('_', ""));
    let (registry_pw, pg_pw, pg_query_pw, es_pw, es_key, kafka_pw, ssl_pw, token, url_pw) = (
        secret("Registry"),
        secret("Postgres"),
        secret("PgQuery"),
        secret("Elastic"),
        secret("ApiKey"),
        secret("Sasl"),
        secret("SslKey"),
        secret("Token"),
        secret("UrlPw"),
    );
    let mut settings = support::registry_settings();
    settings.auth = Some(
        Authenticator::parse(
            &format!(
                "users:\n  - {{ name: kawka, role: write, password_hash: \"{}\" }}\n",
                hash_password(&registry_pw).expect("hash")
            ),
            "test",
        )
        .expect("auth"),
    );
    let registry = support::start_registry_with(settings).await;
    let topic = support::unique("sec_sales");
    let name = support::unique("sec");
    support::create_topic(&topic, 1).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000", sasl.password: {ssl_pw} }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
batch: {{ max_wait: 50ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
"#
    );
    let project = support::Project::new(&registry.url(), &[(&name, &connector)]);
    let database = support::database_url();
    let with_password = database.replacen("postgres://postgres@", &format!("postgres://postgres:{pg_pw}@"), 1);
    assert_ne!(with_password, database, "the test database URL has the expected form");
    let config = |registry_url: &str, database_url: &str| {
        format!(
            "kafka:\n  bootstrap_servers: {}\n  properties: {{ sasl.username: kawka, sasl.password: {kafka_pw} }}\n\
             schema_registry:\n  url: {registry_url}\n  username: kawka\n  password: {registry_pw}\n\
             sinks:\n  readdb: {{ type: postgres, url: \"{database_url}\" }}\n\
             \x20 search: {{ type: elasticsearch, url: \"{}\", username: elastic, password: {es_pw}, api_key: \"id:{es_key}\" }}\n\
             http:\n  listen: 127.0.0.1:0\n  token: {token}\nconnectors: connectors/\nschemas: schemas/\nlog:\n  level: trace\n",
            support::kafka_bootstrap(),
            support::elasticsearch_url(),
        )
    };
    std::fs::write(project.root().join("config/kawka.yaml"), config(&registry.url(), &with_password)).expect("config");
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "registry_user_info": format!("kawka:{registry_pw}"),
        "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    let sold = |n: usize| {
        json!({"schema": "sold", "key": "s1", "value": {"sale_id": format!("s{n}"), "store_id": "s1",
            "item_id": "i1", "quantity": 1, "sold_at": 1_700_000_000_000i64}})
    };
    support::produce_with_python(&spec, (0..5).map(sold).collect()).await;

    let kawka = |args: &[&str], root: &std::path::Path| {
        let (args, root) = (args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), root.to_path_buf());
        async move {
            tokio::task::spawn_blocking(move || {
                let output = Command::new(env!("CARGO_BIN_EXE_kawka"))
                    .args(&args)
                    .current_dir(&root)
                    .env_remove("KAWKA_CONFIG")
                    .env("RUST_LOG", "trace")
                    .output()
                    .expect("kawka runs");
                let text =
                    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
                (output.status.success(), text)
            })
            .await
            .expect("thread")
        }
    };
    let mut outputs: Vec<(String, String)> = Vec::new();
    let (ok, text) = kawka(&["validate", "--config", "config/kawka.yaml"], project.root()).await;
    assert!(ok, "{text}");
    outputs.push(("validate".into(), text));

    // The daemon at trace level (RUST_LOG wins over the config's level).
    let log_path = project.root().join("daemon.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kawka"))
        .args(["run", "--config", "config/kawka.yaml"])
        .current_dir(project.root())
        .env_remove("KAWKA_CONFIG")
        .env("RUST_LOG", "trace")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("kawka run");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let address = eventually(Duration::from_secs(30), "the http address in the log", || async {
        support::http_address(&read_log())
    })
    .await;
    let base = format!("http://{address}");
    let pool = support::postgres().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let on_hand: Option<i64> = sqlx::query_scalar(&format!("SELECT on_hand FROM {name} WHERE store_id = 's1'"))
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten();
        if on_hand == Some(-5) {
            break;
        }
        if Instant::now() > deadline {
            let log = read_log();
            let notable: Vec<&str> =
                log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains(" INFO ")).collect();
            panic!("the 5 sales were not written through the authenticated registry:\n{}", notable.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = reqwest::Client::new();
    for path in ["/connectors".to_string(), format!("/connectors/{name}"), "/metrics".into(), "/readyz".into()] {
        let text = client.get(format!("{base}{path}")).send().await.expect("get").text().await.expect("text");
        outputs.push((format!("GET {path}"), text));
    }
    for (path, auth) in [("pause", None), ("pause", Some(&token)), ("resume", Some(&token))] {
        let mut request = client.post(format!("{base}/connectors/{name}/{path}"));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("post");
        outputs
            .push((format!("POST {path}"), format!("{} {}", response.status(), response.text().await.expect("text"))));
    }
    let (ok, text) = kawka(&["status", "--url", &base], project.root()).await;
    assert!(ok && text.contains(&name), "{text}");
    outputs.push(("status".into(), text));
    let (ok, text) = kawka(&["rebuild", &name, "--config", "config/kawka.yaml"], project.root()).await;
    assert!(ok, "{text}");
    outputs.push(("rebuild".into(), text));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let daemon_log = read_log();
    assert!(daemon_log.contains("TRACE"), "the daemon logged at trace level");
    outputs.push(("daemon log".into(), daemon_log));

    // Failing connections: a database and a registry that are not there,
    // with the password in the URL (as user:password@ and as ?password=).
    let closed = support::free_port();
    std::fs::write(
        project.root().join("config/broken.yaml"),
        config(
            &format!("http://kawka:{url_pw}@127.0.0.1:{closed}"),
            &format!("postgres://postgres@127.0.0.1:{closed}/x?password={pg_query_pw}&sslmode=disable"),
        ),
    )
    .expect("config");
    let (ok, text) = kawka(&["rebuild", &name, "--config", "config/broken.yaml"], project.root()).await;
    assert!(!ok, "{text}");
    outputs.push(("rebuild against nothing".into(), text));
    let (ok, text) = kawka(&["schemas", "check", "--config", "config/broken.yaml"], project.root()).await;
    assert!(!ok, "{text}");
    outputs.push(("schemas check against nothing".into(), text));
    let (ok, text) =
        kawka(&["status", "--url", &format!("http://kawka:{url_pw}@127.0.0.1:{closed}")], project.root()).await;
    assert!(!ok, "{text}");
    outputs.push(("status against nothing".into(), text));

    // Debug of the settings and the clients built from them.
    for file in ["config/kawka.yaml", "config/broken.yaml"] {
        let root = project.root().to_path_buf();
        let text = std::fs::read_to_string(root.join(file)).expect("config").replace(
            "connectors: connectors/\nschemas: schemas/",
            &format!("connectors: {0}/connectors/\nschemas: {0}/schemas/", root.display()),
        );
        let absolute = root.join(format!("{file}.abs"));
        std::fs::write(&absolute, text).expect("config");
        let settings = kawka::config::load(&absolute).expect("loads");
        let client = kawka::codec::registry::RegistryClient::new(&settings.schema_registry).expect("client");
        outputs.push((format!("Debug of {file}"), format!("{settings:?}\n{client:?}")));
    }

    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let forbidden = [
        registry_pw.clone(),
        pg_pw,
        pg_query_pw,
        es_pw.clone(),
        es_key,
        kafka_pw,
        ssl_pw,
        token,
        url_pw.clone(),
        b64(format!("kawka:{registry_pw}")),
        b64(format!("elastic:{es_pw}")),
        b64(format!("kawka:{url_pw}")),
    ];
    for (what, text) in &outputs {
        assert!(!text.is_empty(), "{what} printed nothing");
        for secret in &forbidden {
            assert!(!text.contains(secret.as_str()), "{what} shows a secret ({secret}):\n{text}");
        }
    }
    let _ = registry.stop().await;
}
