//! The monitoring kawka ships: the alert rules (`deploy/prometheus/`), the
//! same rules as a PrometheusRule in the production overlay, and the Grafana
//! dashboard (`deploy/grafana/kawka.json`).
//!
//! promtool checks the rules and runs their unit tests; a real Prometheus
//! (Debian's `prometheus`, which deploy/local/install.sh installs) scrapes a
//! kawka under load and answers every query of the dashboard with data, and
//! `promtool check metrics` reads kawka's exposition.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;

use support::{eventually, Project};

fn rules_path() -> PathBuf {
    support::project_root().join("deploy/prometheus/kawka-rules.yml")
}

fn dashboard() -> Json {
    let path = support::project_root().join("deploy/grafana/kawka.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `promtool <args>` (with `stdin` piped in, if any): whether it
/// succeeded, and what it printed.
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (deploy/local/install.sh --tests installs it): {e}"));
    {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().expect("piped stdin");
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).expect("write to promtool");
        }
    }
    let output = child.wait_with_output().expect("promtool finishes");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// The alerting rules of a rules file's groups.
fn alerts(groups: &Yaml) -> Vec<&Yaml> {
    groups.as_sequence().expect("groups").iter().flat_map(|g| g["rules"].as_sequence().expect("rules")).collect()
}

#[test]
fn the_rules_pass_promtool_and_every_rule_has_a_firing_and_a_quiet_unit_test() {
    let rules = rules_path();
    let (ok, report) = promtool(&["check", "rules", rules.to_str().expect("utf-8 path")], None);
    assert!(ok, "promtool check rules:\n{report}");
    let groups = yaml(&rules)["groups"].clone();
    let alerts = alerts(&groups);
    assert!(report.contains(&format!("SUCCESS: {} rules found", alerts.len())), "{report}");

    let tests = support::project_root().join("deploy/prometheus/kawka-rules.test.yml");
    let (ok, report) = promtool(&["test", "rules", tests.to_str().expect("utf-8 path")], None);
    assert!(ok, "promtool test rules:\n{report}");

    let cases = yaml(&tests);
    let (mut firing, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for test in cases["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            match case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()) {
                true => firing.insert(name),
                false => quiet.insert(name),
            };
        }
    }
    for alert in alerts {
        let name = alert["alert"].as_str().expect("an alerting rule");
        assert!(firing.contains(name) && quiet.contains(name), "{name}: a firing and a quiet case in {tests:?}");
        assert!(alert["for"].as_str().is_some(), "{name} has a `for`");
        assert!(
            ["critical", "warning"].contains(&alert["labels"]["severity"].as_str().unwrap_or_default()),
            "{name} has a severity"
        );
        for annotation in ["summary", "description"] {
            let text = alert["annotations"][annotation].as_str().unwrap_or_default();
            assert!(text.contains("{{ $labels.connector }}"), "{name}'s {annotation} names the connector: {text}");
        }
    }
}

#[test]
fn the_production_overlay_holds_the_same_rules_as_a_prometheus_rule() {
    let built = support::yaml_documents(&support::kustomize("production"));
    let rules: Vec<&Yaml> = built.iter().filter(|d| d["kind"].as_str() == Some("PrometheusRule")).collect();
    assert_eq!(rules.len(), 1, "one PrometheusRule in the production overlay");
    assert_eq!(rules[0]["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(
        rules[0]["spec"]["groups"],
        yaml(&rules_path())["groups"],
        "the PrometheusRule differs from deploy/prometheus/kawka-rules.yml: run deploy/prometheus/prometheus-rule.sh"
    );
}

/// Every panel's queries (with rows' nested panels): (panel title, expression).
fn panel_queries(dashboard: &Json) -> Vec<(String, String)> {
    fn walk(panels: &Json, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            walk(&panel["panels"], out);
            for target in panel["targets"].as_array().into_iter().flatten() {
                let title = panel["title"].as_str().unwrap_or_default().to_string();
                out.push((title, target["expr"].as_str().expect("a PromQL target").to_string()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[test]
fn the_dashboard_is_a_grafana_10_dashboard_over_kawkas_metrics() {
    let dashboard = dashboard();
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 38), "Grafana 10 reads schemaVersion 38+");
    let variables = dashboard["templating"]["list"].as_array().expect("variables");
    let variable =
        |name: &str| variables.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name} variable"));
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    let connector = variable("connector");
    assert_eq!(connector["type"], "query");
    assert_eq!(connector["definition"], "label_values(kawka_events_total, connector)");
    assert_eq!(connector["query"]["query"], "label_values(kawka_events_total, connector)");

    let mut ids = BTreeSet::new();
    let mut walk = vec![&dashboard["panels"]];
    while let Some(panels) = walk.pop() {
        for panel in panels.as_array().expect("panels") {
            assert!(ids.insert(panel["id"].as_u64().expect("an id")), "panel ids are unique: {}", panel["id"]);
            if panel["type"] == "row" {
                walk.push(&panel["panels"]);
                continue;
            }
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
            for target in panel["targets"].as_array().expect("targets") {
                assert_eq!(target["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
            }
        }
    }
    let queries = panel_queries(&dashboard);
    // The daemon-wide families have no connector label; every other query
    // follows the $connector choice.
    for (title, expr) in &queries {
        let daemon_wide = expr.contains("kawka_registry_cache_") || expr.contains("kawka_config_reload_total");
        assert!(daemon_wide || expr.contains("connector=~\"$connector\""), "{title}: {expr}");
    }
    let all = queries.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("\n");
    for family in [
        "kawka_events_total",
        "kawka_consumer_lag",
        "kawka_position",
        "kawka_freshness_seconds",
        "histogram_quantile(0.99, sum by (connector, le) (rate(kawka_batch_events_bucket",
        "histogram_quantile(0.99, sum by (connector, le) (rate(kawka_sink_write_seconds_bucket",
        "kawka_retries_total",
        "outcome=\"dead_lettered\"",
        "kawka_rebuild_done_ratio",
        "kawka_rebuild_events_per_second",
        "kawka_connector_ready",
        "kawka_duplicates_total",
    ] {
        assert!(all.contains(family), "a panel shows {family}");
    }
}

/// A Prometheus server of the test's own: a free port, storage in a temp
/// dir, kawka's rules loaded, one scrape job on `target` every second.
/// Killed when dropped.
struct Prometheus {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: kawka\n    static_configs:\n      - targets: ['{target}']\n",
            rules = rules_path().display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write the config");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let port = support::free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run prometheus (deploy/local/install.sh --tests installs it): {e}"));
        Prometheus { child, base: format!("http://127.0.0.1:{port}"), dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<Json> {
        let response = reqwest::Client::new().get(format!("{}{path}", self.base)).query(query).send().await.ok()?;
        response.json().await.ok()
    }

    /// An instant query's answer (`status`, `data.result`, ...).
    async fn query(&self, expr: &str) -> Json {
        self.get("/api/v1/query", &[("query", expr)])
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {expr}; its log:\n{}", self.log()))
    }

    /// The samples of an instant query (none while it has no data).
    async fn samples(&self, expr: &str) -> Vec<Json> {
        self.query(expr).await["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sold(n: usize) -> Json {
    let store = format!("s{}", n % 20);
    json!({"schema": "sold", "key": store, "value": {"sale_id": format!("s{n}"), "store_id": store,
        "item_id": "i1", "quantity": 1, "sold_at": 1_700_000_000_000i64}})
}

/// A record `produce.py` frames with `schema_id` itself (no registry call).
fn framed_with(mut record: Json, schema_id: u32) -> Json {
    record["schema_id"] = json!(schema_id);
    record
}

/// `promtool check metrics` findings on kawka's exposition that are known
/// and accepted for now (the exposition is src/http.rs's): none.
const ACCEPTED_METRICS_LINT: &[&str] = &[];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_kawka_under_load_answers_every_dashboard_query() {
    // The registry goes away and comes back on the same port and storage.
    let (registry_port, registry_schema) = (support::free_port(), support::unique("registry"));
    let registry = support::start_registry_on(registry_port, &registry_schema).await;
    let topic = support::unique("monitored");
    let name = support::unique("monitored");
    support::create_topic(&topic, 2).await;
    support::create_topic(&format!("{name}.dlq"), 1).await;
    let connector = format!(
        r#"name: {name}
source: {{ topics: [{topic}], start: earliest, properties: {{ session.timeout.ms: "6000" }} }}
sink: {{ to: readdb, table: {name}, columns: {{ store_id: text, item_id: text, on_hand: bigint }}, primary_key: [store_id, item_id] }}
key: {{ store_id: store_id, item_id: item_id }}
on_error: dead_letter
dead_letter_topic: {name}.dlq
batch: {{ max_wait: 50ms }}
events:
  com.example.retail.ItemSold: {{ decrement: {{ on_hand: quantity }} }}
"#
    );
    let spec = json!({"bootstrap": support::kafka_bootstrap(), "registry": registry.url(), "topic": topic,
        "schemas": {"sold": support::catalogue_schema("com.example.retail.ItemSold", 1)}});
    // The first event goes through the serializer, which registers the
    // schema; the rest are framed with its id (no registry needed).
    let schema_id = support::produce_with_python(&spec, vec![sold(0)]).await.ids["sold"];

    let project = Project::new(&registry.url(), &[(&name, &connector)]);
    let mut kawka = project.start(0);
    let address =
        eventually(Duration::from_secs(30), "the http address", || async { support::http_address(&kawka.log()) }).await;
    let base = format!("http://{address}");
    let prometheus = Prometheus::start(&address);
    eventually(Duration::from_secs(30), "prometheus to be ready", || async {
        let ready = reqwest::get(format!("{}/-/ready", prometheus.base)).await.ok()?;
        ready.status().is_success().then_some(())
    })
    .await;

    // Load for the whole test: batches framed with the known id.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (producing, spec) = (producing.clone(), spec.clone());
        tokio::spawn(async move {
            let mut n = 1;
            while producing.load(Ordering::Relaxed) {
                support::produce_with_python(&spec, (n..n + 500).map(|n| framed_with(sold(n), schema_id)).collect())
                    .await;
                n += 500;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            n - 1
        })
    };
    let client = reqwest::Client::new();
    let status = || {
        let (client, url) = (client.clone(), format!("{base}/connectors/{name}"));
        async move { client.get(url).send().await.ok()?.json::<Json>().await.ok() }
    };
    eventually(Duration::from_secs(60), "kawka to write the load", || async {
        (status().await?["counters"]["written"].as_u64()? >= 500).then_some(())
    })
    .await;

    // A record that is not Confluent-framed: dead-lettered.
    support::produce_with_python(&spec, vec![json!({"key": "bad", "raw_value_hex": "ff00"})]).await;
    // The registry goes away while a record of a schema id kawka has never
    // seen waits: decoding retries (the registry alert's signal) until the
    // registry is back and says the id does not exist: dead-lettered.
    registry.stop().await.expect("the registry stops");
    support::produce_with_python(&spec, vec![framed_with(sold(0), 999_999)]).await;
    let decode_retries = format!("increase(kawka_retries_total{{connector=\"{name}\",stage=\"decode\"}}[1m]) > 0");
    eventually(Duration::from_secs(60), "prometheus to see decoding retries", || async {
        (!prometheus.samples(&decode_retries).await.is_empty()).then_some(())
    })
    .await;
    let registry = support::start_registry_on(registry_port, &registry_schema).await;
    eventually(Duration::from_secs(60), "both bad records to be dead-lettered", || async {
        (status().await?["counters"]["dead_lettered"].as_u64()? >= 2).then_some(())
    })
    .await;

    // The rules Prometheus loaded evaluate, and those two alerts are on
    // (pending: their `for` has not passed yet, or firing).
    eventually(Duration::from_secs(30), "the alerts of the dead letters and the registry", || async {
        let active: Vec<Json> = prometheus.get("/api/v1/alerts", &[]).await?["data"]["alerts"].as_array()?.clone();
        let on =
            |alert: &str| active.iter().any(|a| a["labels"]["alertname"] == alert && a["labels"]["connector"] == name);
        (on("KawkaDeadLetters") && on("KawkaRegistryUnreachable")).then_some(())
    })
    .await;
    let rules = prometheus.get("/api/v1/rules", &[]).await.expect("rules");
    let loaded: Vec<&Json> = rules["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect();
    assert_eq!(loaded.len(), alerts(&yaml(&rules_path())["groups"]).len(), "{rules}");
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    // A rebuild, for the rebuild panels, and a reload, for the reload panel.
    let started = client.post(format!("{base}/connectors/{name}/rebuild")).send().await.expect("rebuild");
    assert_eq!(started.status(), 202, "{}", started.text().await.unwrap_or_default());
    let rebuild = eventually(Duration::from_secs(240), "the rebuild to end", || async {
        let rebuild = status().await?["rebuild"].clone();
        (rebuild["state"] == "done" || rebuild["state"] == "failed").then_some(rebuild)
    })
    .await;
    assert_eq!(rebuild["state"], "done", "{rebuild}");
    let reloaded = client.post(format!("{base}/reload")).send().await.expect("reload");
    assert_eq!(reloaded.status(), 200, "{}", reloaded.text().await.unwrap_or_default());
    // A few scrapes with all of it, inside every query's 30 s window.
    eventually(Duration::from_secs(30), "prometheus to scrape the reload and the rebuild", || async {
        let seen = prometheus.samples("count_over_time(kawka_config_reload_total[30s]) >= 3").await;
        let done = prometheus.samples(&format!("kawka_rebuild_done_ratio{{connector=\"{name}\"}} == 1")).await;
        (!seen.is_empty() && !done.is_empty()).then_some(())
    })
    .await;

    // Every panel, as Grafana would ask for it for this connector. The
    // cut-over fenced the live consumer, which restarts and joins its group
    // again (about 4 s on tansu): until then it owns no partition and
    // reports no lag, and a scrape then ends the series, so each panel gets
    // a while to answer.
    let mut answered = 0;
    for (title, expr) in panel_queries(&dashboard()) {
        let expr = expr.replace("${connector}", &name).replace("$connector", &name).replace("$__rate_interval", "30s");
        assert!(!expr.contains('$'), "{title}: a variable left in {expr}");
        eventually(Duration::from_secs(30), &format!("{title}: a number for {expr}"), || async {
            let answer = prometheus.query(&expr).await;
            assert_eq!(answer["status"], "success", "{title}: {expr}: {answer}");
            let result = answer["data"]["result"].as_array().cloned().unwrap_or_default();
            result
                .iter()
                .any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite))
                .then_some(())
        })
        .await;
        answered += 1;
    }
    eprintln!("{answered} dashboard queries answered with data");

    // kawka's exposition through promtool's linter: the classic text
    // format, what a scraper gets that does not ask for OpenMetrics.
    let classic = client.get(format!("{base}/metrics")).send().await.expect("metrics");
    assert!(classic.headers()[reqwest::header::CONTENT_TYPE].to_str().is_ok_and(|t| t.starts_with("text/plain")));
    let metrics = classic.text().await.expect("text");
    // What Prometheus asks for (and scraped above): OpenMetrics.
    let openmetrics = client
        .get(format!("{base}/metrics"))
        .header(reqwest::header::ACCEPT, "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .expect("metrics");
    let kind = openmetrics.headers()[reqwest::header::CONTENT_TYPE].to_str().expect("ascii").to_string();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(openmetrics.text().await.expect("text").ends_with("# EOF\n"));
    // It prints one line per problem (and exits non-zero); none may be new.
    let (ok, report) = promtool(&["check", "metrics"], Some(&metrics));
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| !ACCEPTED_METRICS_LINT.iter().any(|accepted| line.contains(accepted)))
        .collect();
    assert!(unexpected.is_empty(), "promtool check metrics (exit ok: {ok}):\n{report}\non:\n{metrics}");

    producing.store(false, Ordering::Relaxed);
    let produced = producer.await.expect("the producer");
    eprintln!("{produced} events produced under load; the rebuild: {}", rebuild["message"]);
    assert_eq!(kawka.terminate().await, Some(0), "clean exit; log:\n{}", kawka.log());
    drop(prometheus);
    let _ = registry.stop().await; // cleanup only
}
