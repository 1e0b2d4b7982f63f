//! Decoding ahead of the worker: a task per connector takes the source's
//! chunks of records and turns each record into what the worker needs of
//! it (its ops, or the failure the error policy gets), so that decoding,
//! upcasting and projecting run on another core than the worker's
//! batching, folding and writing (issue 27: on a read model that folds
//! many events into few rows, kawka's own work per event sets the pace).
//!
//! Contracts:
//! * Order: one task, chunks handed on in the order read, each chunk's
//!   records in their order; the worker sees exactly what the source sent.
//! * Nothing here has an effect: no dead letter, no count, no retry. A
//!   record that cannot be prepared without waiting (a writer schema not
//!   cached yet, a transient error) or that a replay reads (its event keeps
//!   the position of its dead letter's headers) is left to the worker,
//!   which processes it as before ([`Prepared`] is `None`).
//! * Straight: a record of a writer schema with a [`Direct`] plan is
//!   decoded into its op, without its event; whatever the plan does not
//!   carry through (a null key part, a value the sink refuses, a record
//!   that does not decode so) takes the full path, so a record becomes
//!   the same ops, or the same failure, either way.
//! * A record prepared ahead and then held (its key parked) is dropped by
//!   the worker: the work is lost, never the record.
//! * Memory: [`AHEAD_CHUNKS`] prepared chunks wait at most, and their
//!   records stay counted in the source's fetch-ahead budget until the
//!   worker is done with them (`Held`), so the budget bounds them too.

use tokio::sync::{mpsc, oneshot};

use super::ConnectorRuntime;
use crate::codec::registry::WriterSchema;
use crate::codec::{Decoded, Reading};
use crate::error::{ErrorClass, Failure};
use crate::event::{Events, Position};
use crate::projection::{Direct, Projected, Projection, WriteOp};
use crate::sink::CheckPlan;
use crate::source::{Chunk, Held, RawRecord, RecordsReceiver};
use crate::upcast::Resolutions;
use crate::value::{Name, Value};

/// Prepared chunks waiting for the worker: two keep it fed while the task
/// prepares the next, without holding much more than a batch's records.
const AHEAD_CHUNKS: usize = 2;

/// The event type counted for tombstones and undecodable records.
pub(super) const TOMBSTONE: Name = "(tombstone)";
pub(super) const UNDECODABLE: Name = "(undecodable)";
pub(super) const OVERSIZED: Name = "(oversized)";

/// What one record became: the event type it is counted under, and what
/// its projection gave (checked against the sink) or the failure its error
/// policy is given.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) event_type: Name,
    pub(super) result: Result<Effect, Failure>,
}

/// What a record's projection gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// This many ops: the next ones in the ops gathered with it.
    Ops(usize),
    /// No rule for its type (counted, skipped).
    Skipped,
}

impl Prepared {
    /// How many of the gathered ops are this record's.
    pub(super) fn ops(&self) -> usize {
        match self.result {
            Ok(Effect::Ops(n)) => n,
            _ => 0,
        }
    }
}

/// A chunk of records, what each became (aligned with them; `None`: the
/// worker processes it itself) and their ops in one vector, in record order.
pub(super) struct PreparedChunk {
    pub(super) generation: u64,
    pub(super) records: Vec<RawRecord>,
    pub(super) prepared: Vec<Option<Prepared>>,
    pub(super) ops: Vec<WriteOp>,
    /// The records' bytes stay in the source's fetch-ahead budget until
    /// the worker is done with them.
    pub(super) _held: Held,
}

/// The worker's end of the stage.
pub(super) struct Ahead {
    rx: mpsc::Receiver<PreparedChunk>,
    /// The source's channel, given back when the thread ends.
    given_back: oneshot::Receiver<RecordsReceiver>,
}

impl Ahead {
    /// Starts preparing the records `records` hands over, on a thread of
    /// its own: a task would share the worker's thread (tokio runs a task
    /// woken by a send next on the sender's thread, where no other thread
    /// can steal it), and the two would take turns instead of overlapping.
    pub(super) fn start(runtime: &ConnectorRuntime, mut records: RecordsReceiver) -> std::io::Result<Ahead> {
        let (tx, rx) = mpsc::channel(AHEAD_CHUNKS);
        let (give_back, given_back) = oneshot::channel();
        let runtime = runtime.clone();
        let handle = tokio::runtime::Handle::current();
        std::thread::Builder::new().name(format!("decode-{}", runtime.settings.name)).spawn(move || {
            // Driven here, outside the runtime's workers: waiting on the
            // channels is all it does besides preparing.
            handle.block_on(async {
                let mut reading = Reading::default();
                let mut resolutions = Resolutions::default();
                let mut straight = Straight::default();
                loop {
                    let chunk = tokio::select! {
                        chunk = records.recv_held() => chunk,
                        // The worker is gone: give the source's channel back.
                        _ = tx.closed() => break,
                    };
                    // The source ended: the worker learns it from this end closing.
                    let Some((Chunk { generation, records: chunk, .. }, held)) = chunk else { break };
                    let mut ops = Vec::with_capacity(chunk.len());
                    let prepared: Vec<Option<Prepared>> = if runtime.replay.is_some() {
                        chunk.iter().map(|_| None).collect()
                    } else {
                        // A panic outside the per-record guards (a sink's
                        // check): the chunk is left to the worker, where
                        // it panics again and stops the connector visibly.
                        let preparing = std::panic::AssertUnwindSafe(|| {
                            let mut memo =
                                Memo { reading: &mut reading, resolutions: &mut resolutions, straight: &mut straight };
                            chunk.iter().map(|record| ahead(&runtime, &mut memo, record, &mut ops)).collect()
                        });
                        std::panic::catch_unwind(preparing).unwrap_or_else(|_| {
                            ops.clear();
                            chunk.iter().map(|_| None).collect()
                        })
                    };
                    let prepared = PreparedChunk { generation, records: chunk, prepared, ops, _held: held };
                    if tx.send(prepared).await.is_err() {
                        break;
                    }
                }
            });
            let _ = give_back.send(records);
        })?;
        Ok(Ahead { rx, given_back })
    }

    /// The next chunk; `None` once the source has ended.
    pub(super) async fn recv(&mut self) -> Option<PreparedChunk> {
        self.rx.recv().await
    }

    /// Stops the thread; the source's channel back, to be drained while the
    /// consumer closes (`None` if the thread panicked: the channel is then
    /// closed, which the consumer thread also copes with).
    pub(super) async fn stop(self) -> Option<RecordsReceiver> {
        drop(self.rx);
        self.given_back.await.ok()
    }
}

/// What the decode thread learns of the writer schemas it meets, used
/// for every later record of theirs.
struct Memo<'m> {
    reading: &'m mut Reading,
    resolutions: &'m mut Resolutions,
    straight: &'m mut Straight,
}

/// A writer schema's [`Direct`] plan and what the sink's check looks at
/// in the ops it gives.
type Planned = (Direct, CheckPlan);

/// The writer schemas whose events the decode thread decodes straight
/// into their op ([`Direct`]), and the slots it decodes them into.
#[derive(Default)]
struct Straight {
    /// By schema id, learned with the schema (`None`: the full path), with
    /// what the sink's check looks at in its ops.
    plans: std::collections::HashMap<u32, Option<Planned>, foldhash::fast::RandomState>,
    /// As many as the largest plan fills: every plan fills each of its
    /// own on every record it decodes, so what another left is never read.
    slots: Vec<Value>,
    /// Whether any schema has a plan: if none (a user's projection, every
    /// type upcast), records go to the full path without a look.
    any: bool,
}

impl Straight {
    fn learn(&mut self, id: u32, plan: Option<Planned>) {
        if let Some((plan, _)) = &plan {
            self.any = true;
            if plan.slots() > self.slots.len() {
                self.slots.resize(plan.slots(), Value::Null);
            }
        }
        self.plans.insert(id, plan);
    }
}

/// Prepares one record without waiting, its ops appended to `ops`, or
/// `None` (see the module's contracts). Decodes only the fields the
/// connector reads of schemas the memo knows, and learns those of the
/// others as they come.
fn ahead(runtime: &ConnectorRuntime, memo: &mut Memo, record: &RawRecord, ops: &mut Vec<WriteOp>) -> Option<Prepared> {
    if let Some(oversized) = oversized(runtime, record) {
        return Some(oversized);
    }
    // A panic on the way is the full path's to meet (and make the record's error).
    let straight = std::panic::AssertUnwindSafe(|| straight(runtime, memo, record, &mut *ops));
    if let Ok(Some(event_type)) = std::panic::catch_unwind(straight) {
        return Some(Prepared { event_type, result: Ok(Effect::Ops(1)) });
    }
    let reading = &mut *memo.reading;
    let decoding = std::panic::AssertUnwindSafe(|| runtime.codec.decode_cached(record, reading));
    let decoded = match std::panic::catch_unwind(decoding) {
        Ok(None) => return None,
        Ok(Some(Ok(decoded))) => {
            if let Decoded::Event { writer, .. } = &decoded {
                if !reading.knows(writer.id) {
                    // A panic here (a user's projection, the catalogue's
                    // resolution) is no record's: its schema decodes whole.
                    let learning = std::panic::AssertUnwindSafe(|| learn(runtime, writer));
                    let (read, plan) = std::panic::catch_unwind(learning).unwrap_or((None, None));
                    reading.set(writer.clone(), read);
                    memo.straight.learn(writer.id, plan);
                }
            }
            Ok(decoded)
        }
        Ok(Some(Err(error))) if error.class() == ErrorClass::Permanent => {
            Err(Failure { class: ErrorClass::Permanent, stage: "decode", message: error.to_string() })
        }
        Ok(Some(Err(_))) => return None,
        Err(panic) => Err(decoder_panicked(&*panic)),
    };
    Some(prepare(runtime, decoded, record.position, ops, Some(memo.resolutions)))
}

/// The op of a record whose writer schema has a [`Direct`] plan, decoded
/// straight into it and appended to `ops`, and its event type; `None`:
/// nothing appended, the full path (no plan, or the record does not
/// decode, project or pass the sink's check so, which the full path then
/// says). Appended here, as the last step, rather than returned: an op is
/// a couple of hundred bytes, copied at each level it is returned through.
fn straight(runtime: &ConnectorRuntime, memo: &mut Memo, record: &RawRecord, ops: &mut Vec<WriteOp>) -> Option<Name> {
    let Straight { plans, slots, any } = &mut *memo.straight;
    if !*any {
        return None;
    }
    let mut plan = None;
    let slot_of = |id| {
        let found = plans.get(&id)?.as_ref()?;
        plan = Some(found);
        Some((found.0.slot_of(), found.0.reads_key()))
    };
    let key = runtime.codec.decode_slots(record, memo.reading, slot_of, slots)?;
    let (plan, check) = plan?;
    let op = plan.op(slots, &key, record.position, record.timestamp)?;
    runtime.sink.check_as(&op, check).ok()?;
    // What the full path counts for a schema found without the registry.
    runtime.codec.registry().count_hits(1);
    ops.push(op);
    Some(plan.event_type())
}

/// What the decode thread learns of a writer schema it meets, for events
/// that reach the projection as decoded (no resolution, no upcaster runs
/// on them): which of the record's fields the connector reads, when not
/// all (the same events then project to the same ops, with less decoded),
/// and how they are decoded straight into their op, when the projection
/// can say, with what of those ops the sink's check must look at (decided
/// from what the writer's fields decode to). Nothing for any other schema:
/// its events decode whole.
fn learn(runtime: &ConnectorRuntime, writer: &WriterSchema) -> (Option<Box<[bool]>>, Option<Planned>) {
    let Some(fields) = writer.decoder.record_fields() else { return (None, None) };
    let event_type = writer.decoder.type_name();
    if !runtime.upcasting.passes_through(writer, event_type) {
        return (None, None);
    }
    let read = runtime.projection.fields_read(event_type).and_then(|read| {
        let mask: Box<[bool]> = fields.iter().map(|field| read.contains(field)).collect();
        mask.contains(&false).then_some(mask)
    });
    let direct = runtime.projection.direct(event_type, &fields).map(|direct| {
        let check = match writer.decoder.record_field_kinds() {
            Some(kinds) => runtime.sink.check_plan(&direct.shape(&kinds)),
            None => CheckPlan::Whole,
        };
        (direct, check)
    });
    (read, direct)
}

/// The failure of a record larger than `source.max_record_bytes`, if it is.
pub(super) fn oversized(runtime: &ConnectorRuntime, record: &RawRecord) -> Option<Prepared> {
    let limit = runtime.settings.source.max_record_bytes;
    (record.size() > limit).then(|| {
        let message = format!("a record of {} bytes exceeds source.max_record_bytes ({limit})", record.size());
        Prepared {
            event_type: OVERSIZED,
            result: Err(Failure { class: ErrorClass::Permanent, stage: "source", message }),
        }
    })
}

/// A decoder that panics on a record panics on it again: the record's error.
pub(super) fn decoder_panicked(panic: &(dyn std::any::Any + Send)) -> Failure {
    let message = format!("the decoder panicked: {}", super::panic_message(panic));
    Failure { class: ErrorClass::Permanent, stage: "decode", message }
}

/// What a decoded record becomes: upcast, projected and checked against
/// the sink, its events at `position` (a replayed dead letter's is its
/// original one), its ops appended to `ops` (nothing on a failure). The
/// one path of the worker and of the stage ahead of it; the latter keeps
/// the writer schemas' resolutions it looked up in `resolutions`.
pub(super) fn prepare(
    runtime: &ConnectorRuntime,
    decoded: Result<Decoded, Failure>,
    position: Position,
    ops: &mut Vec<WriteOp>,
    resolutions: Option<&mut Resolutions>,
) -> Prepared {
    let start = ops.len();
    let projection = runtime.projection.as_ref();
    let (event_type, projected) = match decoded {
        Ok(Decoded::Event { mut event, writer }) => {
            event.position = position;
            let event_type = event.event_type;
            // A panic in upcasting or projecting (a user's Rust code) is
            // this event's error: it would panic again on a retry.
            let upcasting = &runtime.upcasting;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let upcast = match resolutions {
                    Some(memo) => upcasting.upcast_remembering(event, &writer, memo),
                    None => upcasting.upcast(event, &writer),
                };
                upcast.map(|events| project_all(projection, events, ops))
            }));
            match outcome {
                Ok(Ok(projected)) => (event_type, projected),
                Ok(Err(error)) => {
                    let failure = Failure { class: ErrorClass::Permanent, stage: "upcast", message: error.to_string() };
                    return Prepared { event_type, result: Err(failure) };
                }
                Err(panic) => {
                    ops.truncate(start);
                    return Prepared { event_type, result: Err(projection_panicked(&*panic)) };
                }
            }
        }
        Ok(Decoded::Tombstone { key }) => {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| projection.tombstone(&key, position))) {
                Ok(Ok(Projected::Ops(mine))) => {
                    ops.extend(mine);
                    (TOMBSTONE, Ok(true))
                }
                Ok(Ok(Projected::Skipped)) => (TOMBSTONE, Ok(false)),
                Ok(Err(error)) => (TOMBSTONE, Err(error)),
                Err(panic) => return Prepared { event_type: TOMBSTONE, result: Err(projection_panicked(&*panic)) },
            }
        }
        Err(failure) => return Prepared { event_type: UNDECODABLE, result: Err(failure) },
    };
    // Counted from what was appended, whatever a projection says: the
    // chunk's later records take their ops by these counts.
    let result = match projected {
        Ok(projected) if projected || ops.len() > start => {
            match ops[start..].iter().find_map(|op| runtime.sink.check(op).err()) {
                Some(message) => {
                    ops.truncate(start);
                    Err(Failure { class: ErrorClass::Permanent, stage: "sink", message })
                }
                None => Ok(Effect::Ops(ops.len() - start)),
            }
        }
        Ok(_) => Ok(Effect::Skipped),
        Err(error) => Err(Failure { class: ErrorClass::Permanent, stage: "projection", message: error.to_string() }),
    };
    Prepared { event_type, result }
}

fn projection_panicked(panic: &(dyn std::any::Any + Send)) -> Failure {
    let message = format!("panicked: {}", super::panic_message(panic));
    Failure { class: ErrorClass::Permanent, stage: "projection", message }
}

/// Projects the events one record became (several after a split) into
/// `ops`: all their ops, or none and the first error. `false` (skipped)
/// only if every event is. The events are spent: their values move into
/// the ops.
fn project_all(
    projection: &dyn Projection,
    events: Events,
    ops: &mut Vec<WriteOp>,
) -> Result<bool, crate::projection::ProjectionError> {
    let start = ops.len();
    let mut projected = false;
    for event in events {
        match projection.project_into(event, ops) {
            Ok(any) => projected |= any,
            Err(error) => {
                ops.truncate(start);
                return Err(error);
            }
        }
    }
    Ok(projected)
}
