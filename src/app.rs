//! The daemon: settings → connectors → spawn → wait for a signal → drain.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::codec::registry::RegistryClient;
use crate::codec::Codec;
use crate::config::Settings;
use crate::pipeline::dead_letter::DeadLetters;
use crate::pipeline::{ConnectorRuntime, ConnectorStats, Halt};
use crate::projection::{Projection, RulesProjection};
use crate::sink::Sink;

/// Builds every connector's runtime without reaching any service.
pub fn connectors(settings: &Settings) -> anyhow::Result<Vec<ConnectorRuntime>> {
    let registry = Arc::new(RegistryClient::new(&settings.schema_registry)?);
    let dead_letters = DeadLetters::new(&settings.kafka).context("creating the dead-letter producer")?;
    settings
        .connectors
        .iter()
        .map(|connector| {
            let connection = settings.sinks.get(&connector.connection).with_context(|| {
                format!("connector {}: no sink connection {}", connector.name, connector.connection)
            })?;
            let sink = Sink::new(connection, connector).with_context(|| format!("connector {}", connector.name))?;
            let projection: Arc<dyn Projection> = Arc::new(RulesProjection::new(connector));
            Ok(ConnectorRuntime {
                settings: Arc::new(connector.clone()),
                kafka: settings.kafka.clone(),
                codec: Codec::new(registry.clone(), connector.source.key_format),
                projection,
                sink,
                dead_letters: dead_letters.clone(),
                stats: Arc::new(ConnectorStats::default()),
            })
        })
        .collect()
}

/// Runs every connector until `shutdown` completes, then drains them:
/// each finishes or abandons its in-flight batch, commits what is durable
/// and leaves its consumer group.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let runtimes = connectors(&settings)?;
    let (stop, stopping) = watch::channel(false);
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
    Ok(())
}
