//! Wiring: the runtime of each connector, its stages built from the
//! settings (no service is reached).

use std::sync::Arc;

use anyhow::Context as _;

use super::dead_letter::DeadLetters;
use super::ConnectorRuntime;
use crate::codec::registry::RegistryClient;
use crate::codec::Codec;
use crate::config::Settings;
use crate::projection::{Projection, RulesProjection};
use crate::sink::Sink;
use crate::status::ConnectorStatus;
use crate::upcast::{Upcaster, Upcasting};

/// The upcast stage: the declared upcasters, then `extra` (Rust ones,
/// which replace a declared one of the same type and version).
pub fn upcasting(settings: &Settings, extra: &[Arc<dyn Upcaster>]) -> Arc<Upcasting> {
    let mut chain: Vec<Arc<dyn Upcaster>> =
        settings.upcasters.iter().map(|d| Arc::new(d.clone()) as Arc<dyn Upcaster>).collect();
    chain.extend(extra.iter().cloned());
    Arc::new(Upcasting::new(settings.catalogue.clone(), chain))
}

/// Every connector's runtime: `projections` (by connector name) replace
/// the rules of the connector files.
pub fn connectors(
    settings: &Settings,
    upcasting: Arc<Upcasting>,
    projections: &[(String, Arc<dyn Projection>)],
) -> anyhow::Result<Vec<ConnectorRuntime>> {
    let registry = Arc::new(RegistryClient::new(&settings.schema_registry)?);
    // The dead letters take any record a connector's source accepts.
    let largest = settings.connectors.iter().map(|c| c.source.max_record_bytes).max().unwrap_or(0);
    let dead_letters = DeadLetters::new(&settings.kafka, largest).context("creating the dead-letter producer")?;
    settings
        .connectors
        .iter()
        .map(|connector| {
            let connection = settings.sinks.get(&connector.connection).with_context(|| {
                format!("connector {}: no sink connection {}", connector.name, connector.connection)
            })?;
            let custom = projections.iter().find(|(name, _)| *name == connector.name);
            let sink = Sink::new(connection, &connector.sink_settings())
                .with_context(|| format!("connector {}", connector.name))?;
            let status = Arc::new(ConnectorStatus::new(&connector.name, sink.kind()));
            let projection: Arc<dyn Projection> = match custom {
                Some((_, projection)) => projection.clone(),
                None => Arc::new(RulesProjection::new(&connector.projection_settings())),
            };
            Ok(ConnectorRuntime {
                settings: Arc::new(connector.clone()),
                kafka: settings.kafka.clone(),
                codec: Codec::new(registry.clone(), connector.key_format),
                upcasting: upcasting.clone(),
                projection,
                sink,
                dead_letters: dead_letters.clone(),
                status,
                replay: None,
                holds_parked_of: None,
            })
        })
        .collect()
}
