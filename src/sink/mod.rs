//! Writing read models.
//!
//! * [`postgres`]: exactly-once effects (positions stored with the rows).
//!
//! A [`Sink`] is one of a closed set, dispatched by an enum. The pipeline
//! hands it a [`Batch`]: the compacted ops of some events and the positions
//! those events end at.

pub mod postgres;

use crate::config::{ConnectorSettings, SinkConnection, Target};
use crate::error::{classify_sqlx, ErrorClass};
use crate::projection::compact::NetOp;
use crate::projection::WriteOp;
use crate::value::{Name, Value};
use postgres::PostgresSink;

/// Where one partition ends after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffset {
    pub topic: Name,
    pub partition: i32,
    /// Offset of the first record not covered: every record below it was
    /// written, dead-lettered or skipped (last processed + 1).
    pub next_offset: i64,
    /// The owner's fencing epoch (Postgres), from its claim.
    pub epoch: Option<i64>,
}

/// A claimed partition: where to start and the fencing epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub topic: Name,
    pub partition: i32,
    /// `None` when nothing was ever written from this partition.
    pub next_offset: Option<i64>,
    pub epoch: Option<i64>,
}

/// What one write covers.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub ops: Vec<WriteOp>,
    pub offsets: Vec<PartitionOffset>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("postgres: {}", postgres::database_message(.0))]
    Postgres(sqlx::Error),
    /// Another consumer owns one of the batch's partitions now.
    #[error("fenced: another consumer took over a partition of this batch")]
    Fenced,
    /// Values that do not fit the read model.
    #[error("{0}")]
    Rejected(String),
    #[error("sink `{0}` is not available in this build")]
    Unsupported(&'static str),
}

impl SinkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Postgres(error) => classify_sqlx(error),
            // Fencing is handled by restarting the connector's consumer.
            SinkError::Fenced => ErrorClass::Transient,
            SinkError::Rejected(_) => ErrorClass::Permanent,
            SinkError::Unsupported(_) => ErrorClass::Config,
        }
    }
}

/// The sinks kawka has.
#[derive(Debug, Clone)]
pub enum Sink {
    Postgres(PostgresSink),
}

impl Sink {
    /// Builds the sink of a connector without reaching it.
    pub fn new(connection: &SinkConnection, connector: &ConnectorSettings) -> Result<Sink, SinkError> {
        match (connection, &connector.target) {
            (SinkConnection::Postgres(connection), Target::Postgres(target)) => {
                Ok(Sink::Postgres(PostgresSink::new(connection, connector, target)?))
            }
            _ => Err(SinkError::Unsupported("elasticsearch")),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Postgres(_) => "postgres",
        }
    }

    /// Creates what is missing (tables, indices).
    pub async fn prepare(&self) -> Result<(), SinkError> {
        match self {
            Sink::Postgres(sink) => sink.prepare().await,
        }
    }

    /// Whether positions live in the sink (then assignments start from
    /// them, and Kafka's committed offsets are only for monitoring).
    pub fn stores_positions(&self) -> bool {
        matches!(self, Sink::Postgres(_))
    }

    pub async fn claim(&self, partitions: &[(Name, i32)]) -> Result<Vec<Claim>, SinkError> {
        match self {
            Sink::Postgres(sink) => sink.claim(partitions).await,
        }
    }

    /// Writes a batch; on `Ok` its effects and positions are durable.
    pub async fn write(&self, batch: &Batch, net: &[NetOp]) -> Result<(), SinkError> {
        match self {
            Sink::Postgres(sink) => sink.write(batch, net).await,
        }
    }

    /// After a permanent error of a batch: which ops the sink refuses.
    pub async fn find_rejected(&self, ops: &[WriteOp]) -> Result<Vec<(usize, String)>, SinkError> {
        match self {
            Sink::Postgres(sink) => sink.find_rejected(ops).await,
        }
    }

    /// Checks one op against the read model before it joins a batch.
    pub fn check(&self, op: &WriteOp) -> Result<(), String> {
        match self {
            Sink::Postgres(sink) => {
                let target = sink.table().target();
                for (part, name) in op.key.iter().zip(&target.primary_key) {
                    if part.is_null() {
                        return Err(format!("key column `{name}` is null"));
                    }
                    check_column(target, name, part)?;
                }
                for (name, value) in &op.fields {
                    check_column(target, name, value)?;
                }
                Ok(())
            }
        }
    }
}

fn check_column(target: &crate::config::PostgresTarget, name: &str, value: &Value) -> Result<(), String> {
    match target.column(name) {
        Some(column) => {
            postgres::sql::check_value(column.ty, value).map_err(|message| format!("column `{name}`: {message}"))
        }
        None => Err(format!("column `{name}` is not in table {}", target.table)),
    }
}
