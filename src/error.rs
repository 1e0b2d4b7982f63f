//! The one error taxonomy: every failure is config, transient or permanent,
//! and the decisions for errors of the libraries we use live here.
//!
//! | class | what happens |
//! |---|---|
//! | config | `kawka validate`/`run` exit 2 listing every problem; met at run time (a table lost a column), retried like transient and reported, since the fix is outside kawka |
//! | transient | retried with capped exponential backoff and jitter, forever; no offset moves |
//! | permanent | an error of one event: the connector's `on_error` policy (dead letter, skip, stop) |

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    Config,
    Transient,
    Permanent,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Config => "config",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }

    /// Whether the failed work is tried again (as opposed to handing the
    /// event to the error policy).
    pub fn is_retried(self) -> bool {
        !matches!(self, ErrorClass::Permanent)
    }
}

/// Why one event could not be written: what the error policy, the
/// dead-letter headers and the connector's status report.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub class: ErrorClass,
    /// `decode`, `upcast`, `projection` or `sink`.
    pub stage: &'static str,
    pub message: String,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Classifies a Postgres error by its SQLSTATE.
pub fn classify_sqlx(error: &sqlx::Error) -> ErrorClass {
    match error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => classify_sqlstate(&code),
            None => ErrorClass::Transient,
        },
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => ErrorClass::Config,
        // Row/column decoding errors mean kawka's own statement disagrees
        // with the table: a setup problem, not one event's.
        sqlx::Error::ColumnNotFound(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::TypeNotFound { .. } => {
            ErrorClass::Config
        }
        // Io, Protocol, PoolTimedOut, PoolClosed, WorkerCrashed and anything
        // new: retrying is the choice that never loses an event.
        _ => ErrorClass::Transient,
    }
}

/// Classifies a SQLSTATE code. Transient are only the classes about the
/// server, the connection or a lock, which waiting can fix; config the
/// ones that say the table does not match the connector. Every other
/// class (data exceptions, constraints, a row too large for an index
/// (54), a trigger's `RAISE` (P0), a cardinality violation (21), …) is
/// permanent: the batch is then isolated op by op, and what fails alone
/// while its neighbours succeed is that op's error, whatever its code.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    // The server ended a transaction left idle too long (the sink's
    // `idle_in_transaction_session_timeout`): the connection is gone.
    if code == "25P03" {
        return ErrorClass::Transient;
    }
    match code.get(..2) {
        // syntax error or access rule violation, invalid schema or
        // authorization: the table does not match the connector (a dropped
        // column, missing privileges).
        Some("42") | Some("3F") | Some("28") => ErrorClass::Config,
        // connection exceptions, transaction rollbacks (serialization
        // failures, deadlocks), insufficient resources, objects in use or
        // locks not available, operator intervention, system errors,
        // internal errors.
        Some("08") | Some("40") | Some("53") | Some("55") | Some("57") | Some("58") | Some("XX") => {
            ErrorClass::Transient
        }
        // An unreadable code: the server said something kawka does not
        // know; isolation tells whether one op causes it.
        _ => ErrorClass::Permanent,
    }
}

/// Classifies an HTTP status of an Elasticsearch item or request.
pub fn classify_http_status(status: u16) -> ErrorClass {
    match status {
        // 408 timeout, 429 backpressure (never an error to drop), 5xx.
        408 | 429 | 500..=599 => ErrorClass::Transient,
        401 | 403 => ErrorClass::Config,
        400..=499 => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// Capped exponential backoff with full jitter: attempt 0 waits up to
/// `base`, each attempt doubles it, never past `cap`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The ceiling of the wait before retry number `attempt` (from 0).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait between half the ceiling and the ceiling: jitter spreads
    /// retries of many connectors, the floor keeps the backoff meaningful.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rand::random::<f64>())
    }
}

/// The message a panic carries (`panic!` gives a `&str` or a `String`).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(classify_sqlstate("23505"), ErrorClass::Permanent, "unique violation");
        assert_eq!(classify_sqlstate("22P02"), ErrorClass::Permanent, "invalid text representation");
        assert_eq!(classify_sqlstate("40001"), ErrorClass::Transient, "serialization failure");
        assert_eq!(classify_sqlstate("40P01"), ErrorClass::Transient, "deadlock");
        assert_eq!(classify_sqlstate("57P01"), ErrorClass::Transient, "admin shutdown");
        assert_eq!(classify_sqlstate("08006"), ErrorClass::Transient, "connection failure");
        assert_eq!(classify_sqlstate("42703"), ErrorClass::Config, "undefined column");
        assert_eq!(classify_sqlstate("55P03"), ErrorClass::Transient, "lock not available");
        assert_eq!(classify_sqlstate("53300"), ErrorClass::Transient, "too many connections");
        assert_eq!(classify_sqlstate("54000"), ErrorClass::Permanent, "index row too large");
        assert_eq!(classify_sqlstate("25P03"), ErrorClass::Transient, "idle transaction ended by the server");
        assert_eq!(classify_sqlstate("25P02"), ErrorClass::Permanent, "a statement failed before in the transaction");
        assert_eq!(classify_sqlstate("P0001"), ErrorClass::Permanent, "a trigger's RAISE EXCEPTION");
        assert_eq!(classify_sqlstate("21000"), ErrorClass::Permanent, "cardinality violation");
    }

    #[test]
    fn http_statuses() {
        assert_eq!(classify_http_status(429), ErrorClass::Transient);
        assert_eq!(classify_http_status(503), ErrorClass::Transient);
        assert_eq!(classify_http_status(400), ErrorClass::Permanent);
        assert_eq!(classify_http_status(403), ErrorClass::Config);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let backoff = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(2) };
        assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(10), Duration::from_secs(2));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(2));
        for attempt in 0..12 {
            let delay = backoff.delay(attempt);
            assert!(delay <= backoff.ceiling(attempt) && delay >= backoff.ceiling(attempt) / 2);
        }
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let text = std::panic::catch_unwind(|| panic!("static")).expect_err("panics");
        assert_eq!(panic_message(&*text), "static");
        let formatted = std::panic::catch_unwind(|| panic!("{}", 42)).expect_err("panics");
        assert_eq!(panic_message(&*formatted), "42");
    }
}
