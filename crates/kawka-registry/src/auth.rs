//! Who may do what: users (HTTP basic auth, as Confluent's clients send it
//! with `basic.auth.user.info`) and bearer tokens, each with a [`Role`];
//! and the audit log of every request that changes something.
//!
//! The credentials file (`--auth-file`, or its text in `KAWKA_REGISTRY_AUTH`):
//!
//! ```yaml
//! users:
//!   - { name: kawka, role: read, password_hash: "$argon2id$v=19$m=19456,t=2,p=1$…" }
//! tokens:
//!   - { name: ci, role: write, sha256: "9f86d081884c7d65…" }
//! ```
//!
//! Passwords are stored as argon2 hashes (`kawka registry hash-password`);
//! tokens, long random strings, as their SHA-256 (`kawka registry
//! hash-token`). Checking an argon2 hash costs tens of milliseconds by
//! design, so a verified user/password pair is remembered (by its SHA-256,
//! never in clear) for [`VERIFIED_FOR`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do. Each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Every `GET`, schema lookups and compatibility checks.
    Read,
    /// Registering schemas; a subject's compatibility and mode.
    Write,
    /// Deleting subjects and versions; the global compatibility and mode.
    Admin,
}

impl Role {
    fn operation(self) -> &'static str {
        match self {
            Role::Read => "Read",
            Role::Write => "Write",
            Role::Admin => "Admin",
        }
    }
}

/// The role a request needs, by its method and (percent-encoded) path.
pub fn required_role(method: &Method, path: &str) -> Role {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET" | "HEAD", _) => Role::Read,
        // Lookups and compatibility checks change nothing.
        ("POST", ["subjects", _]) | ("POST", ["compatibility", ..]) => Role::Read,
        ("PUT", ["config"] | ["mode"]) => Role::Admin,
        ("POST" | "PUT", _) => Role::Write,
        ("DELETE", ["config", _] | ["mode", _]) => Role::Write,
        _ => Role::Admin,
    }
}

/// The credentials file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    /// Users of HTTP basic auth.
    #[serde(default)]
    users: Vec<UserEntry>,
    /// Bearer tokens.
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    /// The user name clients send.
    name: String,
    /// What the user may do.
    role: Role,
    /// The password's argon2 hash in PHC form (`$argon2id$…`).
    password_hash: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    /// Who holds the token (shown in the audit log).
    name: String,
    /// What the token may do.
    role: Role,
    /// SHA-256 of the token, 64 hex digits.
    sha256: String,
}

/// A credentials file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct AuthFileError {
    origin: String,
    message: String,
}

struct User {
    role: Role,
    password_hash: String,
}

struct Token {
    name: String,
    role: Role,
    sha256: [u8; 32],
}

/// How long a verified user/password pair is trusted without hashing it
/// again (a removed user stays removed: the file is read at start only).
pub const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Pairs remembered at most; the memory is cleared when full.
const VERIFIED_MAX: usize = 4096;

/// Password checks run at once at most: each takes argon2's ~19 MiB and
/// tens of milliseconds of a core, and anyone can ask for one (a wrong
/// password costs as much as a right one). More wait their turn.
const CHECKS_AT_ONCE: usize = 2;

/// The users and tokens of a registry.
pub struct Authenticator {
    users: HashMap<String, User>,
    tokens: Vec<Token>,
    /// Places for password checks ([`CHECKS_AT_ONCE`]); a check holds its
    /// place until it ends, even when its client has gone.
    checks: Arc<tokio::sync::Semaphore>,
    /// Checked for unknown users, so that a wrong user name takes as long
    /// as a wrong password: a real user's hash (same cost settings).
    decoy: String,
    /// SHA-256 of `user \0 password` → (user, role, when verified).
    verified: Mutex<HashMap<[u8; 32], (String, Role, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut users: Vec<_> = self.users.keys().collect();
        users.sort();
        let tokens: Vec<_> = self.tokens.iter().map(|t| &t.name).collect();
        f.debug_struct("Authenticator").field("users", &users).field("tokens", &tokens).finish_non_exhaustive()
    }
}

/// The decoy when there is no user to borrow one from (argon2's default
/// settings, which `hash-password` uses).
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$a2F3a2EtZGVjb3k$0ZpMj6D4NN1wJMaR2fKx3YE9Z+ZsGjVvqkkWgmeBv8Y";

impl Authenticator {
    /// Reads a credentials file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Authenticator, AuthFileError> {
        let error = |message: String| AuthFileError { origin: origin.to_string(), message };
        let file: AuthFile = serde_yaml::from_str(text).map_err(|e| error(e.to_string()))?;
        if file.users.is_empty() && file.tokens.is_empty() {
            return Err(error("names no user and no token".to_string()));
        }
        let mut users = HashMap::new();
        for (i, user) in file.users.into_iter().enumerate() {
            if user.name.is_empty() || user.name.contains(':') {
                return Err(error(format!("users[{i}].name must be non-empty and without ':'")));
            }
            if let Err(e) = PasswordHash::new(&user.password_hash) {
                return Err(error(format!(
                    "users[{i}] ({}).password_hash is not an argon2 hash in PHC form ({e}); make one with `kawka registry hash-password`",
                    user.name
                )));
            }
            if users.insert(user.name.clone(), User { role: user.role, password_hash: user.password_hash }).is_some() {
                return Err(error(format!("user {} is named twice", user.name)));
            }
        }
        let mut tokens: Vec<Token> = Vec::new();
        for (i, token) in file.tokens.into_iter().enumerate() {
            let sha256 = decode_hex(&token.sha256).ok_or_else(|| {
                error(format!(
                    "tokens[{i}] ({}).sha256 must be 64 hex digits; make it with `kawka registry hash-token`",
                    token.name
                ))
            })?;
            if let Some(other) = tokens.iter().find(|t| t.sha256 == sha256) {
                return Err(error(format!("tokens[{i}] ({}) is the same token as {}", token.name, other.name)));
            }
            tokens.push(Token { name: token.name, role: token.role, sha256 });
        }
        let decoy = users.values().next().map_or_else(|| DECOY_HASH.to_string(), |u| u.password_hash.clone());
        Ok(Authenticator {
            users,
            tokens,
            checks: Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE)),
            decoy,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Who sent `headers`, or why they are not believed.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Who, Unauthenticated> {
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(Unauthenticated { claimed: None });
        };
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.bearer(credentials.trim());
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(Unauthenticated { claimed: None });
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let Some((name, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return Err(Unauthenticated { claimed: None });
        };
        self.basic(name, password).await
    }

    fn bearer(&self, token: &str) -> Result<Who, Unauthenticated> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every token is compared, each in constant time.
        let mut found = None;
        for candidate in &self.tokens {
            if bool::from(candidate.sha256.ct_eq(&digest)) {
                found = Some(candidate);
            }
        }
        found
            .map(|t| Who { name: t.name.clone(), role: t.role })
            .ok_or(Unauthenticated { claimed: Some("bearer token".to_string()) })
    }

    async fn basic(&self, name: &str, password: &str) -> Result<Who, Unauthenticated> {
        let mut hasher = Sha256::new();
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(password.as_bytes());
        let key: [u8; 32] = hasher.finalize().into();
        {
            let verified = self.verified.lock().expect("the verified map's lock is never poisoned");
            if let Some((user, role, at)) = verified.get(&key) {
                if at.elapsed() < VERIFIED_FOR {
                    return Ok(Who { name: user.clone(), role: *role });
                }
            }
        }
        let user = self.users.get(name);
        let hash = user.map_or(self.decoy.as_str(), |u| u.password_hash.as_str()).to_string();
        let password = password.to_string();
        let place = self.checks.clone().acquire_owned().await.expect("the checks' semaphore is never closed");
        // argon2 is slow on purpose: off the async threads, holding one of
        // CHECKS_AT_ONCE places to the end (also when the client has gone).
        let matches = tokio::task::spawn_blocking(move || {
            let _place = place;
            PasswordHash::new(&hash)
                .is_ok_and(|hash| Argon2::default().verify_password(password.as_bytes(), &hash).is_ok())
        })
        .await
        .unwrap_or(false);
        match user {
            Some(user) if matches => {
                let mut verified = self.verified.lock().expect("the verified map's lock is never poisoned");
                if verified.len() >= VERIFIED_MAX {
                    verified.clear();
                }
                verified.insert(key, (name.to_string(), user.role, Instant::now()));
                Ok(Who { name: name.to_string(), role: user.role })
            }
            // An unknown name is not logged: it may be a password typed
            // into the user field.
            Some(_) => Err(Unauthenticated { claimed: Some(name.to_string()) }),
            None => Err(Unauthenticated { claimed: Some("unknown user".to_string()) }),
        }
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The argon2id hash (PHC form) of a password, for the credentials file.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt)?.to_string())
}

/// The SHA-256 of a token in hex, for the credentials file.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    pub role: Role,
}

/// Credentials missing or wrong; `claimed` is the user name sent, if any
/// (for the audit log; never the password).
#[derive(Debug)]
pub struct Unauthenticated {
    claimed: Option<String>,
}

/// What the access middleware holds.
pub struct Access {
    /// `None`: no credentials configured, every request may do anything
    /// (only allowed on loopback or with `--insecure`).
    pub authenticator: Option<Authenticator>,
}

/// Confluent's body for a request without valid credentials.
fn unauthorized() -> Response {
    let mut response = error_body(StatusCode::UNAUTHORIZED, 401, "Unauthorized");
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"kawka-registry\""));
    response
}

fn forbidden(who: &Who, needed: Role, path: &str) -> Response {
    let message = format!("User {} is denied operation {} on {path}", who.name, needed.operation());
    error_body(StatusCode::FORBIDDEN, 40301, &message)
}

/// Confluent's error body (the negotiation middleware, inside, never sees
/// these: the content type is set here).
fn error_body(status: StatusCode, code: i64, message: &str) -> Response {
    let body = serde_json::json!({"error_code": code, "message": message}).to_string();
    (status, [(header::CONTENT_TYPE, crate::wire::CONTENT_TYPE)], body).into_response()
}

/// Authenticates and authorises every request (except `GET /`, the
/// probes' path), and writes the audit log line of every request that
/// needs more than [`Role::Read`], whatever its outcome.
pub async fn access(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let needed = required_role(&method, &path);
    let peer = request.extensions().get::<kawka_http::Peer>().map(|p| p.0.to_string()).unwrap_or_default();
    if method == Method::GET && path == "/" {
        return next.run(request).await;
    }
    let who = match &access.authenticator {
        None => Who { name: "anonymous".to_string(), role: Role::Admin },
        Some(authenticator) => match authenticator.authenticate(request.headers()).await {
            Ok(who) => who,
            Err(Unauthenticated { claimed }) => {
                let response = unauthorized();
                let who = claimed.unwrap_or_else(|| "anonymous".to_string());
                audit(needed, &who, &method, &path, &peer, response.status(), "unauthenticated");
                return response;
            }
        },
    };
    let response = if who.role >= needed { next.run(request).await } else { forbidden(&who, needed, &path) };
    let outcome = match response.status() {
        StatusCode::FORBIDDEN if who.role < needed => "forbidden",
        status if status.is_success() => "done",
        _ => "refused",
    };
    audit(needed, &who.name, &method, &path, &peer, response.status(), outcome);
    response
}

/// One line per request that changes something (or tried to): who, what,
/// from where, and the outcome. Read requests are not audited.
fn audit(needed: Role, who: &str, method: &Method, path: &str, peer: &str, status: StatusCode, outcome: &str) {
    if needed == Role::Read {
        return;
    }
    tracing::info!(
        target: "kawka::audit",
        who,
        method = method.as_str(),
        path,
        peer,
        status = status.as_u16(),
        outcome,
        "registry request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_what_a_request_changes() {
        let cases = [
            ("GET", "/subjects", Role::Read),
            ("GET", "/config", Role::Read),
            ("POST", "/subjects/orders-value", Role::Read),
            ("POST", "/compatibility/subjects/orders-value/versions/latest", Role::Read),
            ("POST", "/subjects/orders-value/versions", Role::Write),
            ("PUT", "/config/orders-value", Role::Write),
            ("PUT", "/mode/orders-value", Role::Write),
            ("DELETE", "/config/orders-value", Role::Write),
            ("PUT", "/config", Role::Admin),
            ("PUT", "/mode", Role::Admin),
            ("DELETE", "/subjects/orders-value", Role::Admin),
            ("DELETE", "/subjects/orders-value/versions/1", Role::Admin),
            ("PATCH", "/subjects", Role::Admin),
        ];
        for (method, path, role) in cases {
            assert_eq!(required_role(&method.parse().expect("method"), path), role, "{method} {path}");
        }
    }

    #[tokio::test]
    async fn users_and_tokens_are_checked_against_their_hashes() {
        let hash = hash_password("s3cret pass").expect("hash");
        let text = format!(
            "users:\n  - {{ name: ann, role: write, password_hash: \"{hash}\" }}\ntokens:\n  - {{ name: ci, role: admin, sha256: {} }}\n",
            hash_token("tok-0123456789")
        );
        let auth = Authenticator::parse(&text, "auth.yaml").expect("parses");
        let basic = |user: &str, password: &str| {
            let mut headers = HeaderMap::new();
            let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            headers.insert(header::AUTHORIZATION, format!("Basic {value}").parse().expect("header"));
            headers
        };
        assert_eq!(
            auth.authenticate(&basic("ann", "s3cret pass")).await.ok(),
            Some(Who { name: "ann".into(), role: Role::Write })
        );
        // Remembered, and still only for the right password.
        assert!(auth.authenticate(&basic("ann", "s3cret pass")).await.is_ok());
        assert!(auth.authenticate(&basic("ann", "s3cret pasS")).await.is_err());
        assert!(auth.authenticate(&basic("bob", "s3cret pass")).await.is_err());
        assert!(auth.authenticate(&HeaderMap::new()).await.is_err());
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer tok-0123456789".parse().expect("header"));
        assert_eq!(auth.authenticate(&headers).await.ok(), Some(Who { name: "ci".into(), role: Role::Admin }));
        headers.insert(header::AUTHORIZATION, "Bearer tok-012345678".parse().expect("header"));
        assert!(auth.authenticate(&headers).await.is_err());
        assert!(!format!("{auth:?}").contains("argon2"), "{auth:?}");
    }

    #[test]
    fn the_decoy_hash_is_a_hash() {
        let hash = PasswordHash::new(DECOY_HASH).expect("parses");
        assert!(Argon2::default().verify_password(b"anything", &hash).is_err());
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let cases = [
            ("{}", "names no user"),
            ("users: [{ name: a, role: read, password_hash: plain }]", "not an argon2 hash"),
            ("users: [{ name: a, role: reader, password_hash: x }]", "unknown variant"),
            ("tokens: [{ name: t, role: read, sha256: abc }]", "64 hex digits"),
            ("users: [{ name: a, role: read, password: x }]", "unknown field"),
            (
                "tokens: [{ name: a, role: read, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }, \
                 { name: b, role: admin, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }]",
                "the same token as a",
            ),
        ];
        for (text, expected) in cases {
            let error = Authenticator::parse(text, "auth.yaml").expect_err(text).to_string();
            assert!(error.starts_with("auth.yaml: ") && error.contains(expected), "{text}: {error}");
        }
    }
}
