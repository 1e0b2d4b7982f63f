//! `kawka registry`: a Confluent Schema Registry-compatible server for Avro
//! schemas, stored in Postgres.
//!
//! No registry server can be installed on every machine kawka runs on, and
//! teams without one get a light registry this way. It answers the
//! Confluent API for Avro as Confluent's server does (subjects, versions,
//! ids, references, compatibility, config, mode, content negotiation),
//! with its status codes, error codes and texts.
//!
//! This crate is the server only: it does not depend on the `kawka` daemon,
//! whose pipeline talks to any registry (this one or Confluent's) over HTTP.
//! The `kawka` binary runs it as `kawka registry` through [`serve`].
//!
//! # Layout
//!
//! * `api`: the HTTP routes, Confluent's error bodies and codes, reference
//!   resolution and schema normalization.
//! * [`canonical`]: schema identity (what makes two registrations one schema).
//! * [`compat`]: compatibility levels, each check made of [`resolution`].
//! * [`resolution`]: Avro's schema-resolution rules: can a reader schema
//!   read what a writer schema wrote, and why not.
//! * [`store`]: the Postgres tables (global schema ids, subject versions,
//!   compatibility settings) and their queries.
//! * [`wire`]: the Confluent API's content type and schema references.
//! * `lib.rs`: [`start`] and [`serve`], with [`RegistryServerSettings`] and
//!   [`RunningRegistry`].

mod api;
pub mod canonical;
pub mod compat;
pub mod resolution;
pub mod store;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

pub use store::Store;

/// Settings of `kawka registry`.
#[derive(Debug, Clone)]
pub struct RegistryServerSettings {
    pub listen: SocketAddr,
    pub database_url: String,
    /// Postgres schema of the registry's tables (default: the search path).
    pub schema: Option<String>,
}

/// A registry bound to its port and serving in the background.
pub struct RunningRegistry {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl RunningRegistry {
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops accepting, finishes in-flight requests and waits.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// Connects to Postgres (creating the tables), binds, and serves in the
/// background. With port 0 the address says which port was taken.
pub async fn start(settings: &RegistryServerSettings) -> anyhow::Result<RunningRegistry> {
    let store = Store::connect(&settings.database_url, settings.schema.as_deref()).await?;
    let listener = TcpListener::bind(settings.listen).await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(store);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%address, "schema registry listening");
    Ok(RunningRegistry { address, task, stop })
}

/// Serves until `shutdown` completes.
pub async fn serve(settings: &RegistryServerSettings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(settings).await?;
    shutdown.await;
    tracing::info!("schema registry stopping");
    running.stop().await?;
    Ok(())
}
