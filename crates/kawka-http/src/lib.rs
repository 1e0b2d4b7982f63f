//! Hardened HTTP serving, shared by kawka's two servers: the daemon's port
//! (health, metrics, connector control) and `kawka registry`.
//!
//! Both face clients they do not control, so both bound what clients can
//! take: the time to send headers and a body, the size of a body, the
//! requests handled at once and the connections held open (caps shared by
//! all clients: there is no per-client quota, and no write timeout for a
//! client that stops reading). Serving can be over TLS. Each server words
//! its refusals in its own error body ([`Refusal`]).
//!
//! # Layout
//!
//! * [`serve`]: the accept loop. TLS handshakes run off the accept path
//!   (a slow handshake holds only its own connection); every connection
//!   gets the header timeout; [`Peer`] is put in each request's extensions;
//!   shutdown lets requests in flight finish.
//! * [`cap`]: the outer middleware: a cap on requests in flight (503) and
//!   on the declared body size (413). [`read_bodies`]: an inner one (under
//!   the server's authentication, so no body is read for a stranger): the
//!   whole body of a `POST`, `PUT` or `PATCH` read up front within the size
//!   (413) and a deadline (408); other methods' bodies are never read.
//! * [`tls_acceptor`]: a rustls acceptor from PEM files.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
pub use tokio_rustls::TlsAcceptor;

/// What one client may take of a server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body read; a larger one gets 413.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers (and a TLS
    /// handshake); the connection is closed after it.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body; 408 after it.
    pub body_timeout: Duration,
    /// Requests handled at once; more get 503 at once.
    pub max_in_flight: usize,
    /// Connections open at once; more wait in the kernel's listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_in_flight: 256,
            max_connections: 1024,
        }
    }
}

/// The address of the client that sent a request (in its extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

impl Peer {
    /// Whether the client is on this machine.
    pub fn is_loopback(&self) -> bool {
        self.0.ip().is_loopback()
    }
}

/// How a server words a refusal of [`guard`]: its error body for a status.
pub type Refusal = fn(StatusCode, &'static str) -> Response;

struct Guard {
    in_flight: Arc<Semaphore>,
    max_body_bytes: usize,
    body_timeout: Duration,
    refuse: Refusal,
}

impl Guard {
    fn new(limits: &Limits, refuse: Refusal) -> Arc<Guard> {
        Arc::new(Guard {
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            max_body_bytes: limits.max_body_bytes,
            body_timeout: limits.body_timeout,
            refuse,
        })
    }
}

/// `router` behind the cap on requests in flight and on declared body sizes.
pub fn cap(router: Router, limits: &Limits, refuse: Refusal) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Guard::new(limits, refuse), capped))
}

/// `router` with the bodies of `POST`, `PUT` and `PATCH` read up front,
/// within the size and the deadline of `limits`.
pub fn read_bodies(router: Router, limits: &Limits, refuse: Refusal) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Guard::new(limits, refuse), read_body))
}

async fn capped(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    // Held until the response: a slow body holds a place, so slow clients
    // cannot take more than the cap, each for the body timeout at most.
    let Ok(_place) = guard.in_flight.clone().try_acquire_owned() else {
        let mut response = (guard.refuse)(StatusCode::SERVICE_UNAVAILABLE, "too many requests in flight");
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > guard.max_body_bytes as u64) {
        return (guard.refuse)(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    next.run(request).await
}

async fn read_body(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    use axum::http::Method;
    if !matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH) {
        // Never read: a GET that announces a body it never sends costs nothing.
        let (parts, _) = request.into_parts();
        return next.run(Request::from_parts(parts, Body::empty())).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(guard.body_timeout, axum::body::to_bytes(body, guard.max_body_bytes)).await {
        Err(_) => return (guard.refuse)(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"),
        Ok(Err(error)) => {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>())
                || error.to_string().contains("length limit");
            return if too_large {
                (guard.refuse)(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            } else {
                (guard.refuse)(StatusCode::BAD_REQUEST, "the request body could not be read")
            };
        }
        Ok(Ok(bytes)) => bytes,
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// A TLS certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{cert} and {key}: {source}")]
    Config {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

/// An acceptor serving the certificate chain in `cert_file` with the
/// private key in `key_file` (PEM), TLS 1.2 and 1.3, HTTP/1.1.
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let file_error = |path: &Path, message: String| TlsError::File { path: path.display().to_string(), message };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| file_error(cert_file, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error(cert_file, "holds no PEM certificate".to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| file_error(key_file, e.to_string()))?;
    let config_error = |source| TlsError::Config {
        cert: cert_file.display().to_string(),
        key: key_file.display().to_string(),
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` (with TLS when `tls` is given) until
/// `shutdown` completes, then lets requests in flight finish (10 s at most).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut shutdown = pin!(shutdown);
    loop {
        let place = tokio::select! {
            place = connections.clone().acquire_owned() => place.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _place = place;
            match tls {
                None => serve_connection(stream, peer, router, header_timeout, watcher).await,
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, peer, router, header_timeout, watcher).await,
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("requests still in flight after the shutdown grace"),
    }
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    header_timeout: Duration,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(Peer(peer));
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, request).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}
