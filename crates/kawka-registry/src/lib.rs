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
//! * [`auth`]: users, tokens and roles; the audit log of changes.
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
//!   [`RunningRegistry`]. Serving itself (TLS, body and time limits, the
//!   cap on requests in flight) is `kawka_http`'s, shared with the daemon.

mod api;
pub mod auth;
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
pub struct RegistryServerSettings {
    pub listen: SocketAddr,
    /// Never printed: it may hold a password.
    pub database_url: String,
    /// Postgres schema of the registry's tables (default: the search path).
    pub schema: Option<String>,
    /// Users and tokens; `None`: anyone may do anything, which [`start`]
    /// allows only on a loopback address or with `insecure`.
    pub auth: Option<auth::Authenticator>,
    /// Listen with TLS.
    pub tls: Option<kawka_http::TlsAcceptor>,
    /// Serve without credentials beyond loopback (the operator's choice).
    pub insecure: bool,
    /// What one client may take of the server.
    pub limits: kawka_http::Limits,
}

impl std::fmt::Debug for RegistryServerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryServerSettings")
            .field("listen", &self.listen)
            .field("database_url", &"***")
            .field("schema", &self.schema)
            .field("auth", &self.auth)
            .field("tls", &self.tls.is_some())
            .field("insecure", &self.insecure)
            .field("limits", &self.limits)
            .finish()
    }
}

impl RegistryServerSettings {
    /// Settings for `listen` and a database, open (no credentials), TLS
    /// off, default limits.
    pub fn new(listen: SocketAddr, database_url: impl Into<String>) -> RegistryServerSettings {
        RegistryServerSettings {
            listen,
            database_url: database_url.into(),
            schema: None,
            auth: None,
            tls: None,
            insecure: false,
            limits: default_limits(),
        }
    }
}

/// The registry's limits: a request body (a schema with its envelope) of
/// 2 MiB at most; Confluent's own registry keeps schemas in a Kafka topic
/// whose records are about 1 MB at most.
pub fn default_limits() -> kawka_http::Limits {
    kawka_http::Limits { max_body_bytes: 2 << 20, ..kawka_http::Limits::default() }
}

/// Refused settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "refusing to listen on {0} without credentials: anyone who reaches it could register and delete schemas; \
         give --auth-file (or KAWKA_REGISTRY_AUTH), listen on a loopback address, or pass --insecure"
    )]
    OpenBeyondLoopback(SocketAddr),
}

/// A registry bound to its port and serving in the background.
pub struct RunningRegistry {
    pub address: SocketAddr,
    tls: bool,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl RunningRegistry {
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.address)
    }

    /// Stops accepting, finishes in-flight requests and waits.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        self.task.await.map_err(std::io::Error::other)
    }
}

/// Connects to Postgres (creating the tables), binds, and serves in the
/// background. With port 0 the address says which port was taken.
pub async fn start(settings: RegistryServerSettings) -> anyhow::Result<RunningRegistry> {
    if settings.auth.is_none() && !settings.insecure && !settings.listen.ip().is_loopback() {
        return Err(SettingsError::OpenBeyondLoopback(settings.listen).into());
    }
    let store = Store::connect(&settings.database_url, settings.schema.as_deref()).await?;
    let listener = TcpListener::bind(settings.listen).await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let access = std::sync::Arc::new(auth::Access { authenticator: settings.auth });
    let app = api::router(store, access, &settings.limits);
    let tls = settings.tls.is_some();
    let limits = settings.limits;
    let acceptor = settings.tls;
    let task = tokio::spawn(async move {
        kawka_http::serve(listener, app, &limits, acceptor, async {
            let _ = stopped.await;
        })
        .await;
    });
    tracing::info!(%address, tls, "schema registry listening");
    Ok(RunningRegistry { address, tls, task, stop })
}

/// Serves until `shutdown` completes.
pub async fn serve(settings: RegistryServerSettings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let running = start(settings).await?;
    shutdown.await;
    tracing::info!("schema registry stopping");
    running.stop().await?;
    Ok(())
}
