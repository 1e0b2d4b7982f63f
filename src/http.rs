//! The daemon's HTTP port: health, readiness, Prometheus metrics, and
//! connector status and control.
//!
//! | path | |
//! |---|---|
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | every connector joined its group and none is stopped or retrying past [`crate::status::STUCK_AFTER`] |
//! | `GET /metrics` | Prometheus text |
//! | `GET /connectors`, `GET /connectors/{name}` | state, partitions, positions, lag, last error, counters |
//! | `POST /connectors/{name}/pause`, `/resume` | stop / start taking events (control) |
//! | `POST /connectors/{name}/rebuild` | start `kawka rebuild` inside the daemon (202); progress shows under `rebuild` in `GET /connectors/{name}` (control) |
//! | `POST /connectors/{name}/rebuild/rollback`, `/rebuild/cleanup` | `kawka rebuild --rollback` / `--cleanup` (control) |
//! | `GET /connectors?expand=status,info` | Kafka Connect's shape: `{name: {status, info}}` |
//! | `GET /connectors/{name}/config` | the effective settings (secrets as `***`) and their fingerprint |
//! | `POST /connectors/{name}/restart` | drain the connector and start it again (control) |
//! | `GET /reload`, `POST /reload` | the last reload attempt; reload the files now (control) |
//! | `GET /connectors/{name}/applied?position=T:P:O&timeout=2s` | read your writes: 200 once the events at those positions are in the read model (searchable, for Elasticsearch), 202 with the positions reached when the timeout passes |
//!
//! Control endpoints act only on a `POST` that [`control_gate`] lets
//! through: with `http.token` set, one carrying `Authorization: Bearer
//! <token>`; without it (loopback only, or `http.insecure`), one no
//! browser could have been made to send. Each is written to the audit log
//! (target `kawka::audit`) once, with its outcome. No CORS headers are ever
//! sent. Read endpoints stay open for probes and Prometheus.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::codec::registry::RegistryClient;
use crate::rebuild::{Rebuilds, StartError};
use crate::reload::Reloads;
use crate::secret::Secret;
use crate::status::{ConnectorStatus, Connectors};

/// What the HTTP port serves from.
#[derive(Debug)]
pub struct Daemon {
    /// The running connectors (reloads change them).
    pub connectors: Connectors,
    pub registry: Option<Arc<RegistryClient>>,
    pub token: Option<Secret>,
    /// Whether the port listens on a loopback address only: then, without
    /// a token, control requests must name a loopback host (a page a
    /// browser loaded from elsewhere cannot rebind its name to us).
    pub loopback: bool,
    /// Rebuilds over HTTP; `None` where the daemon offers none.
    pub rebuilds: Option<Rebuilds>,
    /// Reloads and restarts; `None` where the daemon offers none.
    pub reloads: Option<Arc<Reloads>>,
    /// The running connectors' runtimes (read-your-writes waits read
    /// their sinks).
    pub runtimes: crate::pipeline::Runtimes,
}

impl Daemon {
    fn connector(&self, name: &str) -> Option<Arc<ConnectorStatus>> {
        self.connectors.get(name)
    }
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    let control = Router::new()
        .route("/connectors/{name}/pause", post(pause))
        .route("/connectors/{name}/resume", post(resume))
        .route("/connectors/{name}/rebuild", post(rebuild))
        .route("/connectors/{name}/rebuild/rollback", post(rebuild_rollback))
        .route("/connectors/{name}/rebuild/cleanup", post(rebuild_cleanup))
        .route("/connectors/{name}/restart", post(restart))
        .route("/reload", post(reload))
        .route_layer(axum::middleware::from_fn_with_state(daemon.clone(), control_gate));
    let routes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/connectors", get(list))
        .route("/connectors/{name}", get(one))
        .route("/connectors/{name}/config", get(config))
        .route("/reload", get(last_reload))
        .merge(control)
        .with_state(daemon.clone());
    // Read-your-writes waits are long polls that hold a request for up to
    // their timeout while costing a parked task: they have a cap of their
    // own, so that thousands of waiters neither take the places of status
    // and control requests nor are turned away by them.
    let waits = Router::new().route("/connectors/{name}/applied", get(applied)).with_state(daemon);
    // No endpoint reads a body: `read_bodies` is not used, so a body that
    // never arrives holds nothing (the response does not wait for it).
    let waiting = kawka_http::Limits { max_in_flight: MAX_WAITS, ..limits() };
    kawka_http::cap(routes, &limits(), refusal).merge(kawka_http::cap(waits, &waiting, refusal))
}

/// Read-your-writes waits in flight at once; more get 503 (Retry-After).
pub const MAX_WAITS: usize = 4000;

/// The port's limits: no endpoint reads a body, so a small one is plenty;
/// 64 requests in flight besides the waits, and a connection for each wait.
pub fn limits() -> kawka_http::Limits {
    kawka_http::Limits {
        max_body_bytes: 64 << 10,
        max_in_flight: 64,
        max_connections: MAX_WAITS + 256,
        ..kawka_http::Limits::default()
    }
}

fn refusal(status: StatusCode, message: &'static str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, shutdown: impl Future<Output = ()> + Send + 'static) {
    kawka_http::serve(listener, router(daemon), &limits(), None, shutdown).await;
}

/// Who may act, and the audit line of every control request.
///
/// With a token configured, a request acts only with `Authorization:
/// Bearer <token>` (compared in constant time); a browser cannot add that
/// header to a request another site makes it send without a CORS
/// preflight, which is never granted. Without a token, a request that
/// carries a browser's marks (`Origin`, `Sec-Fetch-*`) is refused, and on
/// a loopback port so is one whose `Host` is not a loopback name (DNS
/// rebinding).
async fn control_gate(State(daemon): State<Arc<Daemon>>, request: Request, next: Next) -> Response {
    if request.method() != axum::http::Method::POST {
        // 405 from the router: nothing is acted on, nothing to audit.
        return next.run(request).await;
    }
    let peer = request.extensions().get::<kawka_http::Peer>().map(|p| p.0.to_string()).unwrap_or_default();
    let path = request.uri().path().to_string();
    let (who, refused) = match &daemon.token {
        Some(_) if authorized(&daemon, request.headers()) => ("token holder", None),
        Some(_) => ("anonymous", Some(unauthorized())),
        None => match browser_marks(request.headers(), daemon.loopback) {
            Some(reason) => ("anonymous", Some(forbidden(reason))),
            None => ("anonymous (no token configured)", None),
        },
    };
    let response = match refused {
        Some(response) => response,
        None => next.run(request).await,
    };
    let status = response.status();
    let outcome = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "denied",
        status if status.is_success() => "done",
        _ => "refused",
    };
    tracing::info!(target: "kawka::audit", who, method = "POST", path, peer, status = status.as_u16(), outcome,
        "control request");
    response
}

/// Why a request without a token looks like one a browser was made to send.
fn browser_marks(headers: &HeaderMap, loopback: bool) -> Option<&'static str> {
    if headers.contains_key(header::ORIGIN) || headers.keys().any(|k| k.as_str().starts_with("sec-fetch-")) {
        return Some("a browser's request (Origin or Sec-Fetch headers) cannot control connectors without a token");
    }
    if loopback {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(name, _)| name),
        };
        let is_loopback =
            name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !is_loopback {
            return Some("without a token, control requests must be addressed to a loopback host");
        }
    }
    None
}

fn forbidden(reason: &'static str) -> Response {
    (StatusCode::FORBIDDEN, Json(serde_json::json!({ "error": reason }))).into_response()
}

async fn readyz(State(daemon): State<Arc<Daemon>>) -> Response {
    let not_ready: Vec<serde_json::Value> = daemon
        .connectors
        .snapshot()
        .iter()
        .filter(|c| !c.is_ready())
        .map(|c| {
            serde_json::json!({"connector": c.name, "state": c.state(), "joined": c.has_joined(),
            "retrying_for_seconds": c.retrying_for().map(|d| d.as_secs_f64()), "last_error": c.last_error()})
        })
        .collect();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"ready": false, "connectors": not_ready})))
            .into_response()
    }
}

/// The connectors: a list of statuses, or with `?expand=status` and/or
/// `?expand=info` Kafka Connect's map `{name: {status, info}}`.
async fn list(
    State(daemon): State<Arc<Daemon>>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
) -> Json<serde_json::Value> {
    let connectors = daemon.connectors.snapshot();
    let expand: Vec<&str> =
        query.iter().filter(|(k, _)| k == "expand").flat_map(|(_, v)| v.split(',')).map(str::trim).collect();
    if expand.is_empty() {
        return Json(serde_json::Value::Array(connectors.iter().map(|c| c.to_json()).collect()));
    }
    let mut out = serde_json::Map::new();
    for c in &connectors {
        let mut entry = serde_json::Map::new();
        if expand.contains(&"status") {
            entry.insert("status".into(), c.to_json());
        }
        if expand.contains(&"info") {
            entry.insert("info".into(), info_json(&daemon, &c.name));
        }
        out.insert(c.name.clone(), serde_json::Value::Object(entry));
    }
    Json(serde_json::Value::Object(out))
}

fn info_json(daemon: &Daemon, name: &str) -> serde_json::Value {
    match daemon.reloads.as_ref().and_then(|r| r.info(name)) {
        Some(info) => serde_json::json!({"name": name, "fingerprint": info.fingerprint,
            "file": info.file.display().to_string(), "config": info.effective}),
        None => serde_json::json!({"name": name}),
    }
}

async fn config(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    match daemon.connector(&name) {
        Some(_) => Json(info_json(&daemon, &name)).into_response(),
        None => not_found(&name),
    }
}

/// Read your writes (see [`crate::applied`]): `position=T:P:O` (repeated
/// for several), or `topic`, `partition` and `offset`; `timeout` (default
/// 5 s, at most 60 s).
async fn applied(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
) -> Response {
    let bad = |message: String| (StatusCode::BAD_REQUEST, Json(serde_json::json!({"error": message}))).into_response();
    let Some(runtime) = daemon.runtimes.get(&name) else { return not_found(&name) };
    let value = |key: &str| query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let mut wanted = Vec::new();
    for (_, position) in query.iter().filter(|(k, _)| k == "position") {
        match position.parse::<crate::applied::Wanted>() {
            Ok(position) => wanted.push(position),
            Err(message) => return bad(message),
        }
    }
    if let (Some(topic), Some(partition), Some(offset)) = (value("topic"), value("partition"), value("offset")) {
        match format!("{topic}:{partition}:{offset}").parse::<crate::applied::Wanted>() {
            Ok(position) => wanted.push(position),
            Err(message) => return bad(message),
        }
    }
    let timeout = match value("timeout").map(crate::config::parse_duration) {
        None => std::time::Duration::from_secs(5),
        Some(Ok(timeout)) => timeout,
        Some(Err(message)) => return bad(format!("timeout: {message}")),
    };
    match crate::applied::wait(&runtime, &wanted, timeout).await {
        Ok(answer) => {
            let status = if answer.applied { StatusCode::OK } else { StatusCode::ACCEPTED };
            (status, Json(serde_json::json!(answer))).into_response()
        }
        Err(error @ crate::applied::WaitError::UnknownTopic { .. }) => {
            (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": error.to_string()}))).into_response()
        }
        Err(error) => bad(error.to_string()),
    }
}

async fn last_reload(State(daemon): State<Arc<Daemon>>) -> Response {
    match &daemon.reloads {
        Some(reloads) => Json(serde_json::json!({"last": reloads.last()})).into_response(),
        None => not_offered("reloads"),
    }
}

fn not_offered(what: &str) -> Response {
    (StatusCode::NOT_IMPLEMENTED, Json(serde_json::json!({"error": format!("this daemon offers no {what}")})))
        .into_response()
}

async fn reload(State(daemon): State<Arc<Daemon>>) -> Response {
    let Some(reloads) = &daemon.reloads else { return not_offered("reloads") };
    match reloads.reload("POST /reload").await {
        Some(report) => {
            let status = if report.outcome == "invalid" { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
            (status, Json(serde_json::json!(report))).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "the daemon is shutting down"})))
            .into_response(),
    }
}

async fn restart(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    let Some(reloads) = &daemon.reloads else { return not_offered("restarts") };
    if daemon.connector(&name).is_none() {
        return not_found(&name);
    }
    match reloads.restart(&name).await {
        Ok(()) => Json(serde_json::json!({"connector": name, "restarted": true})).into_response(),
        Err(error) => (StatusCode::CONFLICT, Json(serde_json::json!({"error": error}))).into_response(),
    }
}

async fn one(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    match daemon.connector(&name) {
        Some(connector) => Json(connector.to_json()).into_response(),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": format!("no connector named {name}")}))).into_response()
}

/// Whether the request carries the configured bearer token (if any).
fn authorized(daemon: &Daemon, headers: &HeaderMap) -> bool {
    let Some(token) = &daemon.token else { return true };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Constant time: no early exit on the first difference (only the length shows).
    given.is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())))
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"error": "a valid bearer token is required"}))).into_response()
}

fn start_error(error: StartError) -> Response {
    let status = match error {
        StartError::NotFound(_) => StatusCode::NOT_FOUND,
        StartError::Running(_) => StatusCode::CONFLICT,
    };
    (status, Json(serde_json::json!({"error": error.to_string()}))).into_response()
}

/// The rebuilds a request may start, or the response refusing it.
fn rebuilds_for(daemon: &Daemon) -> Result<&Rebuilds, Box<Response>> {
    daemon.rebuilds.as_ref().ok_or_else(|| {
        Box::new(
            (StatusCode::NOT_IMPLEMENTED, Json(serde_json::json!({"error": "this daemon offers no rebuilds"})))
                .into_response(),
        )
    })
}

async fn rebuild(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    let rebuilds = match rebuilds_for(&daemon) {
        Ok(rebuilds) => rebuilds,
        Err(response) => return *response,
    };
    match rebuilds.start(&name) {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(
                serde_json::json!({"connector": name, "rebuild": "started", "progress": format!("/connectors/{name}")}),
            ),
        )
            .into_response(),
        Err(error) => start_error(error),
    }
}

async fn rebuild_rollback(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    rebuild_step(&daemon, &name, true).await
}

async fn rebuild_cleanup(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    rebuild_step(&daemon, &name, false).await
}

async fn rebuild_step(daemon: &Daemon, name: &str, rollback: bool) -> Response {
    let rebuilds = match rebuilds_for(daemon) {
        Ok(rebuilds) => rebuilds,
        Err(response) => return *response,
    };
    let outcome = if rollback { rebuilds.rollback(name).await } else { rebuilds.cleanup(name).await };
    match outcome {
        Ok(Ok(message)) => Json(serde_json::json!({"connector": name, "result": message})).into_response(),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({"error": format!("{error:#}")})))
            .into_response(),
        Err(error) => start_error(error),
    }
}

async fn pause(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    set_paused(&daemon, &name, true)
}

async fn resume(State(daemon): State<Arc<Daemon>>, Path(name): Path<String>) -> Response {
    set_paused(&daemon, &name, false)
}

fn set_paused(daemon: &Daemon, name: &str, paused: bool) -> Response {
    let Some(connector) = daemon.connector(name) else { return not_found(name) };
    connector.pause(paused);
    tracing::info!(connector = name, paused, "connector {}", if paused { "paused" } else { "resumed" });
    Json(connector.to_json()).into_response()
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), the
/// classic text format otherwise.
async fn metrics(State(daemon): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    let text = render(&daemon);
    if crate::metrics::wants_openmetrics(headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok())) {
        ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
    } else {
        ([(header::CONTENT_TYPE, crate::metrics::CLASSIC_CONTENT_TYPE)], crate::metrics::classic(&text)).into_response()
    }
}

/// The `/metrics` text (OpenMetrics) of everything the daemon runs.
pub fn render(daemon: &Daemon) -> String {
    crate::metrics::render(crate::metrics::Scrape {
        connectors: daemon.connectors.snapshot(),
        reloads: daemon.reloads.as_ref().map(|reloads| reloads.outcomes().into_iter().collect()),
        registry_cache: daemon.registry.as_ref().map(|registry| registry.cache_counts()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Outcome;

    fn daemon(token: Option<&str>) -> Daemon {
        let status = Arc::new(ConnectorStatus::new("inv\"entory", "postgres"));
        status.count("com.example.Sold", Outcome::Written);
        status.count("com.example.Sold", Outcome::Written);
        status.assigned(&[("sales", 0, Some(3))]);
        status.high_watermarks(&[("sales", 0, 10)]);
        status.batch_written(2, 2, 0, 0.003, None);
        status.set_rebuild(crate::status::RebuildProgress::new(25, 100, 1000.0, 0));
        Daemon {
            connectors: Connectors::new(vec![status]),
            registry: None,
            token: token.map(Secret::new),
            loopback: true,
            rebuilds: None,
            reloads: None,
            runtimes: Default::default(),
        }
    }

    #[test]
    fn metrics_are_prometheus_text_with_escaped_labels() {
        let text = render(&daemon(None));
        assert!(text.contains("# TYPE kawka_events counter"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains(
                "kawka_events_total{connector=\"inv\\\"entory\",event_type=\"com.example.Sold\",outcome=\"written\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("kawka_consumer_lag{connector=\"inv\\\"entory\",topic=\"sales\",partition=\"0\"} 7"),
            "{text}"
        );
        assert!(text.contains("kawka_sink_write_seconds_bucket{le=\"0.005\",connector=\"inv\\\"entory\"} 1"), "{text}");
        assert!(text.contains("kawka_batch_events_count{connector=\"inv\\\"entory\"} 1"), "{text}");
        assert!(text.contains("kawka_rebuild_done_ratio{connector=\"inv\\\"entory\"} 0.25"), "{text}");
        assert!(text.contains("kawka_applied_timeouts_total{connector=\"inv\\\"entory\"} 0"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().expect("a value");
            assert!(value.parse::<f64>().is_ok(), "not a sample line: {line}");
        }
    }

    #[test]
    fn the_token_guards_control() {
        let mut headers = HeaderMap::new();
        assert!(authorized(&daemon(None), &headers));
        assert!(!authorized(&daemon(Some("s3cret")), &headers));
        headers.insert(header::AUTHORIZATION, "Bearer s3cre".parse().expect("header"));
        assert!(!authorized(&daemon(Some("s3cret")), &headers));
        headers.insert(header::AUTHORIZATION, "Bearer s3creT".parse().expect("header"));
        assert!(!authorized(&daemon(Some("s3cret")), &headers));
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().expect("header"));
        assert!(authorized(&daemon(Some("s3cret")), &headers));
    }

    #[test]
    fn without_a_token_browser_requests_are_refused() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(header::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
            }
            map
        };
        assert_eq!(browser_marks(&headers(&[("host", "127.0.0.1:8080")]), true), None);
        assert_eq!(browser_marks(&headers(&[("host", "localhost")]), true), None);
        assert_eq!(browser_marks(&headers(&[("host", "[::1]:8080")]), true), None);
        assert!(
            browser_marks(&headers(&[("host", "127.0.0.1:8080"), ("origin", "http://evil.example")]), true).is_some()
        );
        assert!(
            browser_marks(&headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]), true).is_some()
        );
        assert!(browser_marks(&headers(&[("host", "evil.example:8080")]), true).is_some());
        assert!(browser_marks(&headers(&[]), true).is_some(), "no host on a loopback port");
        assert_eq!(browser_marks(&headers(&[("host", "kawka:8080")]), false), None, "insecure, beyond loopback");
    }
}
