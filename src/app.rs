//! The daemon: settings → connectors → spawn → serve reloads until a
//! signal → drain. A reload (`SIGHUP`, `POST /reload`, a file change)
//! validates every file first and then starts, drains or restarts only the
//! connectors whose fingerprint changed (see [`crate::reload`]).
//!
//! [`Builder`] is the library's entry point for a custom daemon: it adds
//! Rust upcasters and projections to what the files declare.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use crate::config::{Problems, Settings};
use crate::event::Event;
use crate::http::Daemon;
use crate::pipeline::{build, ConnectorRuntime, Halt};
use crate::projection::Projection;
use crate::reload::{Info, Reloads, Report, Request};
use crate::status::Connectors;
use crate::upcast::{FnUpcaster, Upcaster, Upcasting};

/// A daemon with Rust upcasters and projections of its own.
///
/// ```no_run
/// # async fn example() -> anyhow::Result<()> {
/// let builder = kawka::app::Builder::new().upcast_fn("com.example.Old", 1, |mut event| {
///     event.version = 2;
///     Ok(vec![event])
/// });
/// let settings = builder.load(std::path::Path::new("config/kawka.yaml"))?;
/// builder.run(settings, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
#[derive(Default)]
pub struct Builder {
    upcasters: Vec<Arc<dyn Upcaster>>,
    projections: Vec<(String, Arc<dyn Projection>)>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Adds an upcaster; it replaces a declarative one for the same
    /// (event type, version).
    pub fn upcaster(mut self, upcaster: impl Upcaster + 'static) -> Builder {
        self.upcasters.push(Arc::new(upcaster));
        self
    }

    /// Adds an upcaster from a closure that turns an event of `event_type`
    /// at version `from` into events one version newer (setting `version`).
    pub fn upcast_fn<F>(self, event_type: &str, from: u32, function: F) -> Builder
    where
        F: Fn(Event) -> Result<Vec<Event>, String> + Send + Sync + 'static,
    {
        self.upcaster(FnUpcaster { event_type: event_type.to_string(), from, function })
    }

    /// Replaces the `events:` rules of one connector with Rust code.
    pub fn projection(mut self, connector: &str, projection: impl Projection + 'static) -> Builder {
        self.projections.push((connector.to_string(), Arc::new(projection)));
        self
    }

    /// Loads and validates the files, counting this builder's upcasters in
    /// the upcast path check.
    pub fn load(&self, config_file: &Path) -> Result<Settings, Problems> {
        crate::config::load_with_upcasters(config_file, &crate::config::process_env, &self.upcasters)
    }

    /// The upcast stage: declared upcasters, then this builder's.
    pub fn upcasting(&self, settings: &Settings) -> Arc<Upcasting> {
        build::upcasting(settings, &self.upcasters)
    }

    /// Builds every connector's runtime without reaching any service.
    pub fn connectors(&self, settings: &Settings) -> anyhow::Result<Vec<ConnectorRuntime>> {
        build::connectors(settings, self.upcasting(settings), &self.projections)
    }

    /// Runs every connector until `shutdown` completes, then drains.
    pub async fn run(self, settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let runtimes = self.connectors(&settings)?;
        run_connectors(Arc::new(self), settings, runtimes, shutdown).await
    }
}

/// Builds every connector's runtime from the files alone.
pub fn connectors(settings: &Settings) -> anyhow::Result<Vec<ConnectorRuntime>> {
    Builder::new().connectors(settings)
}

/// Runs every connector until `shutdown` completes, then drains them:
/// each finishes or abandons its in-flight batch, commits what is durable
/// and leaves its consumer group.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    Builder::new().run(settings, shutdown).await
}

async fn run_connectors(
    builder: Arc<Builder>,
    settings: Settings,
    runtimes: Vec<ConnectorRuntime>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop, stopping) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("http.listen {}", settings.http.listen))?;
    let address = listener.local_addr()?;
    let shared = crate::pipeline::Runtimes::new(runtimes.clone());
    let rebuilds = crate::rebuild::Rebuilds::new(shared.clone(), stopping.clone());
    let (reloads, requests) = Reloads::new();
    let reloads = Arc::new(reloads);
    let daemon = Arc::new(Daemon {
        connectors: Connectors::default(),
        registry: runtimes.first().map(|r| r.codec.registry().clone()),
        token: settings.http.token.clone(),
        loopback: settings.http.listen.ip().is_loopback(),
        rebuilds: Some(rebuilds.clone()),
        reloads: Some(reloads.clone()),
        runtimes: shared.clone(),
    });
    let mut http_stopping = stopping.clone();
    let http = tokio::spawn(crate::http::serve(listener, daemon.clone(), async move {
        let _ = http_stopping.wait_for(|stop| *stop).await;
    }));
    tracing::info!(%address, "http listening");

    let mut supervisor = Supervisor { builder, settings, running: BTreeMap::new(), daemon, runtimes: shared, reloads };
    for runtime in runtimes {
        supervisor.spawn(runtime, None);
    }
    supervisor.publish();
    supervisor.watch(requests, shutdown).await;

    tracing::info!("shutting down");
    let _ = stop.send(true);
    supervisor.stop_all().await;
    rebuilds.finish().await;
    let _ = http.await;
    Ok(())
}

/// One running connector.
struct Running {
    runtime: ConnectorRuntime,
    fingerprint: String,
    /// Tells it to drain (write what is in flight, commit, leave the group).
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Halt>,
}

/// The running set of connectors, and the changes reloads make to it.
struct Supervisor {
    builder: Arc<Builder>,
    /// What the running connectors were built from.
    settings: Settings,
    running: BTreeMap<String, Running>,
    daemon: Arc<Daemon>,
    runtimes: crate::pipeline::Runtimes,
    reloads: Arc<Reloads>,
}

impl Supervisor {
    /// Waits for the shutdown, serving reloads (requests, `SIGHUP`, file
    /// changes) and restarts meanwhile.
    async fn watch(&mut self, mut requests: mpsc::Receiver<Request>, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "SIGHUP cannot be caught here: reload with POST /reload");
                None
            }
        };
        let mut digest = self.files_digest().await;
        let mut tick = tokio::time::interval(self.settings.reload.interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                request = requests.recv() => match request {
                    Some(Request::Reload { trigger, reply }) => {
                        let _ = reply.send(self.reload(trigger).await);
                        digest = self.files_digest().await;
                    }
                    Some(Request::Restart { connector, reply }) => {
                        let _ = reply.send(self.restart(&connector).await);
                    }
                    None => return,
                },
                Some(()) = async { match hangups.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    self.reload("SIGHUP").await;
                    digest = self.files_digest().await;
                }
                _ = tick.tick(), if self.settings.reload.watch => {
                    let now = self.files_digest().await;
                    if now != digest {
                        // Debounced: an editor or `kubectl` writes in steps;
                        // reload once the files have stopped changing.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let settled = self.files_digest().await;
                        if settled == now {
                            digest = settled;
                            self.reload("file change").await;
                        }
                    }
                }
            }
        }
    }

    /// The files' digest, read on a blocking thread (file reads block).
    async fn files_digest(&self) -> [u8; 32] {
        let (config, connectors, schemas) = (
            self.settings.config_file.clone(),
            self.settings.connectors_dir.clone(),
            self.settings.schemas_dir.clone(),
        );
        tokio::task::spawn_blocking(move || {
            crate::reload::files_digest(&config, &[connectors.as_path(), schemas.as_path()])
        })
        .await
        .unwrap_or_default()
    }

    fn spawn(&mut self, runtime: ConnectorRuntime, settings: Option<&Settings>) {
        let settings = settings.unwrap_or(&self.settings);
        let name = runtime.settings.name.clone();
        let fingerprint = crate::reload::fingerprint(settings, &runtime.settings);
        self.reloads.set_info(
            &name,
            Some(Info {
                fingerprint: fingerprint.clone(),
                file: runtime.settings.file.clone(),
                effective: format!("{:#?}", runtime.settings),
            }),
        );
        tracing::info!(connector = %name, sink = runtime.sink.kind(), topics = ?runtime.settings.source.topics,
            "connector starting");
        let (stop, stopping) = watch::channel(false);
        if let crate::sink::Sink::Elasticsearch(sink) = &runtime.sink {
            heal_blocks(sink.clone(), name.clone(), stopping.clone());
        }
        let task = {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                let name = runtime.settings.name.clone();
                let halt = runtime.run(stopping).await;
                match &halt {
                    Halt::Shutdown => tracing::info!(connector = %name, "connector drained"),
                    // Stopped connectors stay stopped; the others keep running.
                    halt => tracing::info!(connector = %name, ?halt, "connector ended"),
                }
                halt
            })
        };
        self.running.insert(name, Running { runtime, fingerprint, stop, task });
    }

    /// Shows the running set to the HTTP API and the rebuilds.
    fn publish(&self) {
        self.daemon.connectors.replace(self.running.values().map(|r| r.runtime.status.clone()).collect());
        self.runtimes.set(self.running.values().map(|r| r.runtime.clone()).collect());
    }

    /// Drains one connector and waits for it.
    async fn stop(&mut self, name: &str) {
        let Some(running) = self.running.remove(name) else { return };
        let _ = running.stop.send(true);
        if let Err(error) = running.task.await {
            tracing::error!(connector = %name, %error, "connector task failed");
        }
        self.reloads.set_info(name, None);
    }

    async fn stop_all(&mut self) {
        for running in self.running.values() {
            let _ = running.stop.send(true);
        }
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// Reads and validates every file; applies the difference, or nothing.
    async fn reload(&mut self, trigger: &'static str) -> Report {
        let report = self.try_reload(trigger).await;
        match report.outcome.as_str() {
            "invalid" => {
                for problem in &report.problems {
                    tracing::error!(trigger, %problem, "reload refused: nothing changed");
                }
            }
            outcome => {
                let plan = report.plan.as_ref().map(|p| p.lines().join("; ")).unwrap_or_default();
                tracing::info!(trigger, outcome, %plan, "reloaded");
                for problem in &report.problems {
                    tracing::warn!(trigger, %problem, "not applied until the process restarts");
                }
            }
        }
        self.reloads.record(&report);
        report
    }

    async fn try_reload(&mut self, trigger: &'static str) -> Report {
        let mut report = Report {
            at_ms: crate::status::now_ms(),
            trigger: trigger.to_string(),
            outcome: "invalid".to_string(),
            problems: Vec::new(),
            plan: None,
        };
        let next = match self.builder.load(&self.settings.config_file) {
            Ok(next) => next,
            Err(problems) => {
                report.problems = problems.0.iter().map(ToString::to_string).collect();
                return report;
            }
        };
        let running: BTreeMap<String, String> =
            self.running.iter().map(|(name, r)| (name.clone(), r.fingerprint.clone())).collect();
        let plan = crate::reload::plan(&running, &crate::reload::fingerprints(&next));
        // Built before anything stops: a connector that cannot be built
        // leaves everything as it was.
        let mut wanted = next.clone();
        wanted.connectors.retain(|c| plan.start.contains(&c.name) || plan.restart.contains(&c.name));
        let built = if wanted.connectors.is_empty() { Ok(Vec::new()) } else { self.builder.connectors(&wanted) };
        let built = match built {
            Ok(built) => built,
            Err(error) => {
                report.problems = vec![format!("{error:#}")];
                return report;
            }
        };
        if format!("{:?}", next.http) != format!("{:?}", self.settings.http) {
            report.problems.push("http: the new settings apply when the process restarts".to_string());
        }
        for name in plan.stop.iter().chain(&plan.restart) {
            let projection = self.running.get(name).map(|r| crate::reload::projection_fingerprint(&r.runtime.settings));
            self.stop(name).await;
            if let Some(runtime) = built.iter().find(|r| &r.settings.name == name) {
                if projection.is_some_and(|p| p != crate::reload::projection_fingerprint(&runtime.settings)) {
                    runtime.status.suggest_rebuild(format!(
                        "the projection of {name} changed: rows written before the reload follow the old rules; \
                         `kawka rebuild {name}` rewrites them all with the new ones"
                    ));
                }
            }
        }
        for runtime in built {
            self.spawn(runtime, Some(&next));
        }
        report.outcome = if plan.changes_nothing() { "unchanged" } else { "applied" }.to_string();
        report.plan = Some(plan);
        self.settings = next;
        self.publish();
        report
    }

    /// Drains one connector and starts it again from the current settings.
    async fn restart(&mut self, name: &str) -> Result<(), String> {
        if !self.running.contains_key(name) {
            return Err(format!("no connector named {name}"));
        }
        let mut one = self.settings.clone();
        one.connectors.retain(|c| c.name == name);
        let runtime = self.builder.connectors(&one).map_err(|e| format!("{e:#}"))?.into_iter().next();
        let Some(runtime) = runtime else { return Err(format!("no connector named {name}")) };
        self.stop(name).await;
        self.spawn(runtime, None);
        self.publish();
        tracing::info!(connector = %name, "connector restarted");
        Ok(())
    }
}

/// Lifts write blocks a killed cut-over left on the connector's live
/// index, once their lease has run out (see `rebuild::elasticsearch`),
/// until the connector stops.
fn heal_blocks(sink: crate::sink::elasticsearch::ElasticsearchSink, name: String, mut stopping: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            if let Err(error) = crate::rebuild::elasticsearch::heal_blocks(&sink, &name).await {
                tracing::debug!(connector = %name, error = %format!("{error:#}"),
                    "looking for a write block a cut-over left failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(crate::rebuild::elasticsearch::HEAL_EVERY) => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
        }
    });
}
