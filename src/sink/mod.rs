//! Writing read models.
//!
//! * [`postgres`]: exactly-once effects (positions stored with the rows).
//! * [`elasticsearch`]: idempotent effects (guards stored in the documents;
//!   positions in Kafka's committed offsets).
//!
//! A [`Sink`] is one of a closed set, dispatched by an enum. The pipeline
//! hands it the ops of some events and the positions those events end at;
//! [`Sink::plan`] folds them (the one fold, [`crate::projection::fold`])
//! and turns the net ops into the sink's own writes. What a sink can do
//! that decides how the pipeline drives it is its [`Capabilities`].

pub mod elasticsearch;
pub mod postgres;
mod settings;

use std::time::Duration;

use crate::error::classify_http_status;
use crate::error::{classify_sqlx, ErrorClass};
use crate::event::{Claim, PartitionOffset};
use crate::parked::{Change, ParkedKey};
use crate::projection::{OpShape, WriteOp};
use crate::value::Name;
use elasticsearch::ElasticsearchSink;
use postgres::PostgresSink;
pub use settings::{SinkConnection, SinkSettings, Target};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("postgres: {}", postgres::database_message(.0))]
    Postgres(sqlx::Error),
    /// Another consumer owns one of the batch's partitions now.
    #[error("fenced: another consumer took over a partition of this batch")]
    Fenced,
    /// Values that do not fit the read model; which op is unknown.
    #[error("{0}")]
    Rejected(String),
    /// These ops (indexes into the batch) were refused, with the reason;
    /// the rest of the batch may have been applied (idempotently).
    #[error("{} op(s) refused, first: {}", .0.len(), .0.first().map_or("", |(_, m)| m.as_str()))]
    RejectedOps(Vec<(usize, String)>),
    #[error("elasticsearch: {message}")]
    Elasticsearch { status: Option<u16>, message: String },
    /// The index is write-blocked (a rebuild's cut-over, or an operator):
    /// the batch is written again whole once the block is lifted, through
    /// the alias, so that none of it stays in an index the alias has left.
    #[error("elasticsearch: write-blocked (a rebuild's cut-over?), the batch is written again whole once lifted: {0}")]
    WriteBlocked(String),
    /// The sink cannot be used as configured (bad URL, a bare index).
    #[error("{0}")]
    Setup(String),
    /// A batch written ahead of this one, of one of its partitions, did not
    /// commit: this one was rolled back, to be written again after it.
    #[error("an earlier batch of a partition of this batch was not written")]
    Predecessor,
    /// The database did not answer within [`WRITE_TIMEOUT`] (a half-open
    /// connection, a server that hangs): the write is abandoned (its
    /// transaction never commits) and made again.
    #[error("no answer from the sink within {0:?}; writing again")]
    TimedOut(Duration),
}

/// The longest a Postgres write (its transaction, statements and commit)
/// may wait for the server. sqlx has no TCP keepalive: without a bound, a
/// connection whose server vanished would hang a write, its connector and
/// the drain at shutdown. Long enough for any batch a healthy server
/// writes; the server-side `idle_in_transaction_session_timeout` frees the
/// locks of a client that vanished the other way.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(120);

impl SinkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Postgres(error) => classify_sqlx(error),
            // Fencing is handled by restarting the connector's consumer.
            SinkError::Fenced => ErrorClass::Transient,
            SinkError::Rejected(_) | SinkError::RejectedOps(_) => ErrorClass::Permanent,
            // Without a status the server was not reached: retry.
            SinkError::Elasticsearch { status, .. } => match status {
                Some(status) if *status >= 400 && *status < 500 && *status != 408 && *status != 429 => {
                    match classify_http_status(*status) {
                        // A whole request refused is not one event's fault.
                        ErrorClass::Permanent => ErrorClass::Config,
                        other => other,
                    }
                }
                _ => ErrorClass::Transient,
            },
            SinkError::Setup(_) => ErrorClass::Config,
            SinkError::Predecessor | SinkError::TimedOut(_) | SinkError::WriteBlocked(_) => ErrorClass::Transient,
        }
    }
}

/// `write` bounded by [`WRITE_TIMEOUT`]; dropping it on expiry rolls its
/// transaction back (or closes its connection).
async fn bounded<T>(write: impl std::future::Future<Output = Result<T, SinkError>>) -> Result<T, SinkError> {
    tokio::time::timeout(WRITE_TIMEOUT, write).await.unwrap_or(Err(SinkError::TimedOut(WRITE_TIMEOUT)))
}

/// What a durable write found beside what it applied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Writes a guard found applied before (replays, duplicates).
    pub duplicates: u64,
    /// The ops (indexes into the batch) whose writes a guard found applied
    /// or overtaken by newer ones: their events are superseded, not written.
    pub superseded: Vec<usize>,
}

impl Written {
    /// A write whose guards found `ops` applied or overtaken.
    pub fn superseded(ops: Vec<usize>) -> Written {
        Written { duplicates: ops.len() as u64, superseded: ops }
    }
}

/// Whether one step of a write in flight succeeded (its statements ran,
/// or it committed: [`Follows`] says which), read by the writes that
/// follow it (see [`Sink::write_planned`]), with the write's [`TxLocks`].
/// A one-shot.
#[derive(Debug, Clone)]
pub struct StepDone(tokio::sync::watch::Receiver<Option<bool>>, TxLocks);

/// The sending side of [`StepDone`]: dropped unsent (a task that ended
/// early), it reads as failed.
#[derive(Debug)]
pub struct StepSignal(tokio::sync::watch::Sender<Option<bool>>, TxLocks);

impl StepDone {
    pub fn channel() -> (StepSignal, StepDone) {
        StepDone::channel_of(TxLocks::default())
    }

    /// A step of the write whose transactions' locks are `locks` (a
    /// write's steps share them).
    pub fn channel_of(locks: TxLocks) -> (StepSignal, StepDone) {
        let (sender, receiver) = tokio::sync::watch::channel(None);
        (StepSignal(sender, locks.clone()), StepDone(receiver, locks))
    }

    /// Waits until the step is over: whether it succeeded.
    pub async fn wait(&self) -> bool {
        let mut receiver = self.0.clone();
        matches!(receiver.wait_for(Option::is_some).await.map(|seen| *seen), Ok(Some(true)))
    }

    /// Whether the step is over and failed, without waiting.
    pub fn failed(&self) -> bool {
        // Closed first: a value sent just after reading `None` closes it.
        let closed = self.0.has_changed().is_err();
        let sent = *self.0.borrow();
        match sent {
            Some(succeeded) => !succeeded,
            // The signal dropped unsent: the write ended early.
            None => closed,
        }
    }

    pub fn locks(&self) -> &TxLocks {
        &self.1
    }
}

impl StepSignal {
    pub fn send(self, succeeded: bool) {
        // Nobody left to tell is fine: no write follows this one.
        let _ = self.0.send(Some(succeeded));
    }

    pub fn locks(&self) -> &TxLocks {
        &self.1
    }
}

/// The locks a write in flight's transactions hold while they live (a
/// Postgres advisory lock each, taken as it begins, named by a token
/// unique to it), and, weakly, those of the writes it waits for to commit:
/// a write that waits for others to commit, holding its rows, waits for
/// these in the database too, where its deadlock detector sees the wait
/// (see `PostgresSink::committed_before`).
#[derive(Debug, Clone, Default)]
pub struct TxLocks(std::sync::Arc<TxLocksOf>);

#[derive(Debug, Default)]
struct TxLocksOf {
    tokens: std::sync::Mutex<Vec<(i32, i32)>>,
    /// Weak: a chain of writes, each waiting for the one before, must not
    /// keep alive every write since the first.
    waits_for: Vec<std::sync::Weak<TxLocksOf>>,
}

impl TxLocks {
    /// Of a write that waits for `writes` to commit.
    pub fn waiting_for(writes: &[StepDone]) -> TxLocks {
        let waits_for = writes.iter().map(|write| std::sync::Arc::downgrade(&write.1 .0)).collect();
        TxLocks(std::sync::Arc::new(TxLocksOf { tokens: Default::default(), waits_for }))
    }

    /// Publishes the keys of a lock one of the write's transactions holds.
    pub fn add(&self, token: (i32, i32)) {
        // (Never held across an await; poisoned only by a panic while pushing.)
        self.0.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(token);
    }

    /// The locks of `writes` and of the writes they wait for,
    /// transitively (those still in flight). A lock whose transaction
    /// ended is held by nobody: waiting for it ends at once.
    pub fn of_all(writes: &[StepDone]) -> Vec<(i32, i32)> {
        let mut tokens = Vec::new();
        let mut seen: Vec<*const TxLocksOf> = Vec::new();
        let mut next: Vec<std::sync::Arc<TxLocksOf>> = writes.iter().map(|write| write.1 .0.clone()).collect();
        while let Some(write) = next.pop() {
            if seen.contains(&std::sync::Arc::as_ptr(&write)) {
                continue;
            }
            seen.push(std::sync::Arc::as_ptr(&write));
            tokens.extend(write.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().copied());
            next.extend(write.waits_for.iter().filter_map(std::sync::Weak::upgrade));
        }
        tokens
    }
}

/// Waits for the signals of the writes `after`: `Predecessor` unless every
/// one succeeded (committed, or for [`Follows::ran`], ran its statements).
pub async fn succeeded_all(after: &[StepDone]) -> Result<(), SinkError> {
    for write in after {
        if !write.wait().await {
            return Err(SinkError::Predecessor);
        }
    }
    Ok(())
}

/// The writes in flight a write follows (see [`Sink::write_planned`]).
#[derive(Debug, Default)]
pub struct Follows {
    /// Writes it shares a key with: its statements start only once theirs
    /// have run. Its row locks then wait in Postgres for their commits,
    /// while they never wait for it: two transactions that took the same
    /// rows in different orders would deadlock, one of them waiting in
    /// kawka where Postgres cannot see it.
    pub ran: Vec<StepDone>,
    /// Writes of its partitions or keys: it commits only once they have,
    /// so positions move in order and one that fails is written again
    /// before this one's effects on a shared key.
    pub committed: Vec<StepDone>,
}

/// A batch planned for its sink (see [`Sink::plan`]).
#[derive(Debug)]
pub enum Plan {
    Postgres(postgres::PostgresPlan),
    Elasticsearch(elasticsearch::ElasticsearchPlan),
}

impl Plan {
    /// How many connections its write holds at once.
    pub fn connections(&self) -> usize {
        match self {
            Plan::Postgres(postgres::PostgresPlan::PerPartition(shares)) => shares.len().max(1),
            Plan::Postgres(postgres::PostgresPlan::Whole(..) | postgres::PostgresPlan::Versioned(..))
            | Plan::Elasticsearch(_) => 1,
        }
    }
}

/// What a sink can do, which decides how the pipeline drives it; one
/// value per sink ([`Sink::capabilities`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Positions live in the sink, written with the effects: assignments
    /// are claimed ([`Sink::claim`]) and start from the stored positions,
    /// and Kafka's committed offsets are only for monitoring. (Postgres.)
    pub stores_positions: bool,
    /// A batch may be written while an earlier batch of one of its
    /// partitions still is: the sink commits it only once the writes it
    /// follows have ([`Sink::write_planned`] with their [`StepDone`]),
    /// positions being stored in the same transactions. (Postgres.)
    pub chains_writes: bool,
    /// How many connections the writes in flight may hold together, each
    /// holding [`Plan::connections`]. Postgres: its pool, each share of a
    /// batch is its own transaction. Elasticsearch: one batch at a time;
    /// the sink spreads a batch over concurrent bulk requests itself.
    pub concurrent_writes: usize,
}

/// The sinks kawka has.
#[derive(Debug, Clone)]
pub enum Sink {
    Postgres(PostgresSink),
    Elasticsearch(ElasticsearchSink),
}

/// What of an op of a known shape its check looks at ([`Sink::check_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckPlan {
    /// All of it, as [`Sink::check`] does.
    Whole,
    /// Only the fields at these places in the op: the key and every other
    /// field always pass in an op of `key` parts and `fields` fields (one
    /// of another size is checked whole).
    Fields { key: usize, fields: usize, checked: Box<[usize]> },
}

impl Sink {
    /// Builds the sink of a connector without reaching it.
    pub fn new(connection: &SinkConnection, connector: &SinkSettings) -> Result<Sink, SinkError> {
        match (connection, &connector.target) {
            (SinkConnection::Postgres(connection), Target::Postgres(target)) => {
                Ok(Sink::Postgres(PostgresSink::new(connection, connector, target)?))
            }
            (SinkConnection::Elasticsearch(connection), Target::Elasticsearch(target)) => {
                Ok(Sink::Elasticsearch(ElasticsearchSink::new(connection, target, connector.parks)?))
            }
            _ => Err(SinkError::Setup(format!(
                "connector {} targets a {} sink through connection `{}`",
                connector.name,
                match connector.target {
                    Target::Postgres(_) => "postgres",
                    Target::Elasticsearch(_) => "elasticsearch",
                },
                connector.connection
            ))),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Postgres(_) => "postgres",
            Sink::Elasticsearch(_) => "elasticsearch",
        }
    }

    /// Creates what is missing (tables, indices).
    pub async fn prepare(&self) -> Result<(), SinkError> {
        match self {
            Sink::Postgres(sink) => sink.prepare().await,
            Sink::Elasticsearch(sink) => sink.prepare().await,
        }
    }

    /// What the sink can do (see [`Capabilities`]).
    pub fn capabilities(&self) -> Capabilities {
        match self {
            Sink::Postgres(sink) => {
                Capabilities { stores_positions: true, chains_writes: true, concurrent_writes: sink.max_connections() }
            }
            Sink::Elasticsearch(_) => {
                Capabilities { stores_positions: false, chains_writes: false, concurrent_writes: 1 }
            }
        }
    }

    /// Claims partitions for a sink that stores positions (no claim
    /// otherwise: every partition starts from Kafka's committed offset).
    pub async fn claim(&self, partitions: &[(Name, i32)]) -> Result<Vec<Claim>, SinkError> {
        match self {
            Sink::Postgres(sink) => sink.claim(partitions).await,
            Sink::Elasticsearch(_) => Ok(partitions
                .iter()
                .map(|&(topic, partition)| Claim { topic, partition, next_offset: None, epoch: None })
                .collect()),
        }
    }

    /// For sinks that store positions: whether this owner still holds the
    /// partitions it claimed (checked while idle, so a cut-over or rollback
    /// by `kawka rebuild` is noticed without waiting for the next write).
    pub async fn owns(&self, epochs: &[(Name, i32, i64)]) -> Result<bool, SinkError> {
        match self {
            Sink::Postgres(sink) => sink.owns(epochs).await,
            Sink::Elasticsearch(_) => Ok(true),
        }
    }

    /// Writes the ops of a batch; on `Ok` their effects (and, for sinks
    /// that store them, the positions) are durable. Returns how many writes
    /// were found already applied (replays, duplicates).
    pub async fn write(&self, ops: &[WriteOp], offsets: &[PartitionOffset]) -> Result<Written, SinkError> {
        match self {
            Sink::Postgres(sink) => bounded(sink.write(ops, offsets)).await.map(Written::superseded),
            Sink::Elasticsearch(sink) => sink.write(ops).await,
        }
    }

    /// The CPU part of a write, done before it: the batch folded and turned
    /// into the sink's writes (statements, bulk actions). The pipeline
    /// plans a batch while the writes it must wait for run. `hashes` are
    /// the ops' [`crate::projection::fold::key_hashes`] when the caller
    /// has them (they are computed otherwise).
    pub fn plan(&self, ops: &[WriteOp], hashes: &[u64], offsets: &[PartitionOffset]) -> Result<Plan, SinkError> {
        match self {
            Sink::Postgres(sink) => sink.plan(ops, hashes, offsets).map(Plan::Postgres),
            Sink::Elasticsearch(sink) => Ok(Plan::Elasticsearch(sink.plan(ops, hashes))),
        }
    }

    /// [`Sink::write`] of a planned batch: `ops` are the ones it was
    /// planned from (a versioned Postgres batch is planned in its write). It runs its statements once every write
    /// in `follows.ran` has run its own, then sends `ran` (true once every
    /// statement ran), and commits only once every write in
    /// `follows.committed` has. If one of them fails, so does this one,
    /// with [`SinkError::Predecessor`], having changed nothing.
    pub async fn write_planned(
        &self,
        plan: &Plan,
        ops: &[WriteOp],
        follows: &Follows,
        ran: StepSignal,
    ) -> Result<Written, SinkError> {
        match (self, plan) {
            (Sink::Postgres(sink), Plan::Postgres(plan)) => {
                bounded(sink.write_planned(plan, ops, follows, ran)).await.map(Written::superseded)
            }
            (Sink::Elasticsearch(sink), Plan::Elasticsearch(plan)) => {
                // Sinks that do not chain writes are never given any to follow.
                debug_assert!(
                    follows.ran.is_empty() && follows.committed.is_empty(),
                    "only chaining sinks follow writes in flight"
                );
                let result = sink.write_plan(plan).await;
                ran.send(result.is_ok());
                result
            }
            // A plan is written by the sink that made it.
            _ => {
                ran.send(false);
                Err(SinkError::Setup(format!("a batch planned for another sink than {}", self.kind())))
            }
        }
    }

    /// After a permanent error of a batch without a culprit: which ops the
    /// sink refuses, found without writing anything.
    pub async fn find_rejected(&self, ops: &[WriteOp]) -> Result<Vec<(usize, String)>, SinkError> {
        match self {
            Sink::Postgres(sink) => sink.find_rejected(ops).await,
            Sink::Elasticsearch(_) => Ok(Vec::new()),
        }
    }

    /// Of each position of a batch, whether the sink holds it already: a
    /// batch a sink writes per partition may have committed some shares
    /// before another failed (their events are applied). Elasticsearch
    /// writes no shares: none.
    pub async fn reached_each(&self, offsets: &[PartitionOffset]) -> Result<Vec<bool>, SinkError> {
        match self {
            Sink::Postgres(sink) => bounded(sink.reached_each(offsets)).await,
            Sink::Elasticsearch(_) => Ok(vec![false; offsets.len()]),
        }
    }

    /// For sinks that store positions, `connector`'s: per partition, the
    /// next offset whose effect is not durable (`None` for Elasticsearch,
    /// whose positions are the group's committed offsets in Kafka).
    pub async fn stored_positions(
        &self,
        connector: &str,
    ) -> Result<Option<Vec<(String, i32, Option<i64>)>>, SinkError> {
        match self {
            Sink::Postgres(sink) => bounded(sink.positions(connector)).await.map(Some),
            Sink::Elasticsearch(_) => Ok(None),
        }
    }

    /// Every key `connector` has parked (`on_error: park`).
    pub async fn parked_keys(&self, connector: &str) -> Result<Vec<(Vec<u8>, ParkedKey)>, SinkError> {
        match self {
            Sink::Postgres(sink) => bounded(sink.parked_keys(connector)).await,
            Sink::Elasticsearch(sink) => sink.parked_keys(connector).await,
        }
    }

    /// Changes a parked key as `decide` says from what is stored now
    /// (`None`: nothing changes, nothing is written), writing `ops` with
    /// it: in one transaction (Postgres), or first and idempotently
    /// (Elasticsearch). Returns the change and the ops found superseded.
    pub async fn change_parked(
        &self,
        connector: &str,
        key: &[u8],
        ops: &[WriteOp],
        decide: &(dyn Fn(Option<&ParkedKey>) -> Option<Change> + Send + Sync),
    ) -> Result<Option<(Change, Vec<usize>)>, SinkError> {
        match self {
            Sink::Postgres(sink) => bounded(sink.change_parked(connector, key, ops, decide)).await,
            Sink::Elasticsearch(sink) => sink.change_parked(connector, key, ops, decide).await,
        }
    }

    /// What [`Sink::check`] must look at in ops of `shape`, decided once
    /// per writer schema: parts whose values can only be of kinds their
    /// column always takes pass on every op, and are not looked at again.
    pub fn check_plan(&self, shape: &OpShape) -> CheckPlan {
        match self {
            Sink::Postgres(sink) => sink.check_plan(shape),
            Sink::Elasticsearch(_) => CheckPlan::Whole,
        }
    }

    /// [`Sink::check`] of an op of the shape `plan` was made for: the
    /// same answer (what it skips passes on every such op, and the rest is
    /// looked at in `check`'s order, so the first error is the same).
    pub fn check_as(&self, op: &WriteOp, plan: &CheckPlan) -> Result<(), String> {
        match (self, plan) {
            (Sink::Postgres(sink), CheckPlan::Fields { key, fields, checked })
                if op.key.len() == *key && op.fields.len() == *fields =>
            {
                sink.check_fields(op, checked)
            }
            _ => self.check(op),
        }
    }

    /// Checks one op against the read model before it joins a batch.
    pub fn check(&self, op: &WriteOp) -> Result<(), String> {
        match self {
            Sink::Postgres(sink) => sink.check(op),
            Sink::Elasticsearch(_) => {
                elasticsearch::bulk::doc_id(&op.key)?;
                if op.fields.iter().any(|(name, _)| *name == elasticsearch::bulk::GUARD_FIELD) {
                    return Err(format!("field `{}` is kawka's own", elasticsearch::bulk::GUARD_FIELD));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_locks_name_the_writes_waited_for_transitively_while_they_are_in_flight() {
        let (first_signal, first) = StepDone::channel();
        first_signal.locks().add((1, 11));
        let (second_signal, second) = StepDone::channel_of(TxLocks::waiting_for(std::slice::from_ref(&first)));
        second_signal.locks().add((1, 21));
        second_signal.locks().add((1, 22));
        // A third waits for the second and, again, the first: each once.
        let third = TxLocks::waiting_for(&[second.clone(), first.clone()]);
        let (_, third) = StepDone::channel_of(third);
        let mut all = TxLocks::of_all(std::slice::from_ref(&third));
        all.sort_unstable();
        assert_eq!(all, vec![(1, 11), (1, 21), (1, 22)]);
        // The first settled (nothing holds it): only a weak link is left.
        drop((first_signal, first));
        let mut left = TxLocks::of_all(&[third]);
        left.sort_unstable();
        assert_eq!(left, vec![(1, 21), (1, 22)]);
    }

    #[test]
    fn a_step_reads_failed_once_it_failed_or_its_signal_dropped_unsent() {
        let (ok, ok_seen) = StepDone::channel();
        assert!(!ok_seen.failed(), "not over yet");
        ok.send(true);
        assert!(!ok_seen.failed());
        let (bad, bad_seen) = StepDone::channel();
        bad.send(false);
        assert!(bad_seen.failed());
        let (dropped, dropped_seen) = StepDone::channel();
        drop(dropped);
        assert!(dropped_seen.failed());
    }

    #[tokio::test]
    async fn a_write_follows_only_writes_that_committed() {
        let (first, first_committed) = StepDone::channel();
        let (second, second_committed) = StepDone::channel();
        let (third, third_committed) = StepDone::channel();
        // Waiting starts before the outcome is known.
        let waiting = tokio::spawn({
            let after = vec![first_committed.clone(), second_committed.clone()];
            async move { succeeded_all(&after).await }
        });
        first.send(true);
        second.send(true);
        assert!(waiting.await.expect("joins").is_ok());
        third.send(false);
        assert!(matches!(
            succeeded_all(&[first_committed.clone(), third_committed]).await,
            Err(SinkError::Predecessor)
        ));
        // A task that ended without saying counts as not committed.
        let (dropped, dropped_committed) = StepDone::channel();
        drop(dropped);
        assert!(!dropped_committed.wait().await);
        assert!(succeeded_all(&[]).await.is_ok());
        assert_eq!(SinkError::Predecessor.class(), ErrorClass::Transient);
    }
}
