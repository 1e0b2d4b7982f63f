//! The daemon: settings → connectors → spawn → wait for a signal → drain.
//!
//! [`Builder`] is the library's entry point for a custom daemon: it adds
//! Rust upcasters and projections to what the files declare.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::{Problems, Settings};
use crate::event::Event;
use crate::http::Daemon;
use crate::pipeline::{build, ConnectorRuntime, Halt};
use crate::projection::Projection;
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
        run_connectors(&settings, runtimes, shutdown).await
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
    settings: &Settings,
    runtimes: Vec<ConnectorRuntime>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (stop, stopping) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("http.listen {}", settings.http.listen))?;
    let address = listener.local_addr()?;
    let rebuilds = crate::rebuild::Rebuilds::new(runtimes.clone(), stopping.clone());
    let daemon = Arc::new(Daemon {
        connectors: runtimes.iter().map(|r| r.status.clone()).collect(),
        registry: runtimes.first().map(|r| r.codec.registry().clone()),
        token: settings.http.token.clone(),
        loopback: settings.http.listen.ip().is_loopback(),
        rebuilds: Some(rebuilds.clone()),
    });
    let mut http_stopping = stopping.clone();
    let http = tokio::spawn(crate::http::serve(listener, daemon, async move {
        let _ = http_stopping.wait_for(|stop| *stop).await;
    }));
    tracing::info!(%address, "http listening");
    // Write blocks a killed cut-over left on a live index: lifted once
    // their lease has run out (see `rebuild::elasticsearch`).
    for runtime in &runtimes {
        if let crate::sink::Sink::Elasticsearch(sink) = &runtime.sink {
            let (sink, name, mut stopping) = (sink.clone(), runtime.settings.name.clone(), stopping.clone());
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
    }
    let mut tasks = tokio::task::JoinSet::new();
    for runtime in runtimes {
        let name = runtime.settings.name.clone();
        tracing::info!(connector = %name, sink = runtime.sink.kind(), topics = ?runtime.settings.source.topics,
            "connector starting");
        let stopping = stopping.clone();
        tasks.spawn(async move { (name, runtime.run(stopping).await) });
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            done = tasks.join_next() => match done {
                // Stopped connectors stay stopped; the others keep running.
                Some(Ok((name, halt))) => tracing::info!(connector = %name, ?halt, "connector ended"),
                Some(Err(error)) => tracing::error!(%error, "connector task failed"),
                None => {
                    tracing::warn!("no connector is running");
                    shutdown.as_mut().await;
                    break;
                }
            },
        }
    }
    tracing::info!("shutting down");
    let _ = stop.send(true);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((name, Halt::Shutdown)) => tracing::info!(connector = %name, "connector drained"),
            Ok((name, halt)) => tracing::info!(connector = %name, ?halt, "connector ended"),
            Err(error) => tracing::error!(%error, "connector task failed"),
        }
    }
    rebuilds.finish().await;
    let _ = http.await;
    Ok(())
}
