//! Upcasting: every event reaches its projection at the newest catalogue
//! version of its type.
//!
//! * [`catalogue`]: `schemas/<type>/v<N>.avsc`, writer schema → version.
//! * [`steps`]: declarative upcasters from `schemas/upcasters.yaml`.
//! * [`online`]: `kawka schemas check` against the registry.
//!
//! An [`Upcaster`] moves one (type, version) one step on; Rust upcasters
//! (registered on the daemon's builder, `kawka::app::Builder`) and declarative ones share the
//! trait, and a Rust upcaster replaces a declarative one for the same
//! (type, version). The chain runs until every event is at its type's
//! newest version.

pub mod catalogue;
pub mod online;
pub mod steps;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::codec::registry::WriterSchema;
use crate::event::{Event, Events};
use crate::value::Name;
use catalogue::{resolve_value, Catalogue, Resolution};

/// Turns events of one (type, version) into events one step newer.
pub trait Upcaster: Send + Sync + fmt::Debug {
    /// The event type it reads.
    fn event_type(&self) -> &str;
    /// The version it reads.
    fn reads_version(&self) -> u32;
    /// The events this one becomes (each with its type and version set).
    fn upcast(&self, event: Event) -> Result<Vec<Event>, String>;
    /// The (type, version) pairs it writes; for the offline path check.
    fn targets(&self) -> Vec<(String, u32)> {
        vec![(self.event_type().to_string(), self.reads_version() + 1)]
    }
}

impl Upcaster for steps::Declared {
    fn event_type(&self) -> &str {
        &self.event_type
    }

    fn reads_version(&self) -> u32 {
        self.from
    }

    fn upcast(&self, event: Event) -> Result<Vec<Event>, String> {
        self.apply(event)
    }

    fn targets(&self) -> Vec<(String, u32)> {
        steps::Declared::targets(self)
    }
}

/// An upcaster from a closure, for the builder.
pub struct FnUpcaster<F> {
    pub event_type: String,
    pub from: u32,
    pub function: F,
}

impl<F> fmt::Debug for FnUpcaster<F> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FnUpcaster({} v{})", self.event_type, self.from)
    }
}

impl<F> Upcaster for FnUpcaster<F>
where
    F: Fn(Event) -> Result<Vec<Event>, String> + Send + Sync,
{
    fn event_type(&self) -> &str {
        &self.event_type
    }

    fn reads_version(&self) -> u32 {
        self.from
    }

    fn upcast(&self, event: Event) -> Result<Vec<Event>, String> {
        (self.function)(event)
    }
}

/// Why an event could not be brought to the newest version: a permanent
/// error of that event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UpcastError {
    #[error("{0}")]
    Unreadable(String),
    #[error("{event_type} v{version} has no upcaster to v{newest}")]
    NoPath { event_type: String, version: u32, newest: u32 },
    #[error("upcasting {event_type} v{version}: {message}")]
    Failed { event_type: String, version: u32, message: String },
    #[error("resolving against the newest schema: {0}")]
    Resolution(String),
}

/// The upcast stage: the catalogue, the chain, and the resolution of each
/// writer schema (computed once per schema id and event type).
#[derive(Debug)]
pub struct Upcasting {
    catalogue: Arc<Catalogue>,
    chain: HashMap<(String, u32), Arc<dyn Upcaster>>,
    /// Shared, not cloned: a resolved reader schema is a whole schema tree.
    /// Looked up for every event: foldhash rather than SipHash.
    resolutions: Mutex<HashMap<(u32, Name), Arc<Resolution>, foldhash::fast::RandomState>>,
}

/// The resolutions one thread has looked up (issue 27: the decode thread
/// resolves every event it prepares; the shared map costs a lock and a
/// hash each time). Few writer schemas are live at once: a short list,
/// compared by schema id and interned type name, started over when it
/// would pass [`Resolutions::MAX`] entries.
#[derive(Debug, Default)]
pub struct Resolutions {
    seen: Vec<(u32, Name, Arc<Resolution>)>,
}

impl Resolutions {
    const MAX: usize = 16;

    fn get_or_insert(&mut self, id: u32, event_type: Name, resolve: impl FnOnce() -> Arc<Resolution>) -> &Resolution {
        // A type name not interned (a Rust upcaster's literal) only misses here.
        let found = self.seen.iter().position(|(seen, name, _)| *seen == id && std::ptr::eq(*name, event_type));
        let index = match found {
            Some(index) => index,
            None => {
                if self.seen.len() >= Self::MAX {
                    self.seen.clear();
                }
                self.seen.push((id, event_type, resolve()));
                self.seen.len() - 1
            }
        };
        &self.seen[index].2
    }
}

/// Steps a chain may take before it is declared a loop.
const MAX_STEPS: usize = 1000;

impl Upcasting {
    /// Later upcasters replace earlier ones for the same (type, version).
    pub fn new(catalogue: Arc<Catalogue>, upcasters: Vec<Arc<dyn Upcaster>>) -> Upcasting {
        let chain = upcasters.into_iter().map(|u| ((u.event_type().to_string(), u.reads_version()), u)).collect();
        Upcasting { catalogue, chain, resolutions: Mutex::default() }
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// Sets the event's catalogue version from its writer schema, then
    /// upcasts it to the newest version.
    pub fn upcast(&self, event: Event, writer: &WriterSchema) -> Result<Events, UpcastError> {
        let resolution = self.resolution(writer, event.event_type);
        self.upcast_resolved(event, &resolution)
    }

    /// [`Upcasting::upcast`], looking the writer schema's resolution up in
    /// `memo` first: one thread's own, without the shared lock.
    pub fn upcast_remembering(
        &self,
        event: Event,
        writer: &WriterSchema,
        memo: &mut Resolutions,
    ) -> Result<Events, UpcastError> {
        let resolution = memo.get_or_insert(writer.id, event.event_type, || self.resolution(writer, event.event_type));
        self.upcast_resolved(event, resolution)
    }

    fn upcast_resolved(&self, mut event: Event, resolution: &Resolution) -> Result<Events, UpcastError> {
        match resolution {
            Resolution::Uncatalogued => return Ok(Events::from_buf([event])),
            Resolution::Unreadable(message) => return Err(UpcastError::Unreadable(message.clone())),
            Resolution::Version(version) => event.version = *version,
            Resolution::Resolved { version, reader } => {
                event.payload =
                    resolve_value(std::mem::take(&mut event.payload), reader).map_err(UpcastError::Resolution)?;
                event.version = *version;
            }
        }
        self.to_newest(event)
    }

    /// How events of `event_type` written with `writer` reach the catalogue.
    fn resolution(&self, writer: &WriterSchema, event_type: Name) -> Arc<Resolution> {
        let mut resolutions = self.resolutions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        resolutions
            .entry((writer.id, event_type))
            .or_insert_with(|| Arc::new(self.catalogue.resolve(&writer.schema, &writer.references, event_type)))
            .clone()
    }

    /// Whether events of `event_type` written with `writer` leave this
    /// stage as they were decoded (uncatalogued, or at the newest version:
    /// no resolution, no upcaster): then a field the projection does not
    /// read is read by nobody, and need not be decoded.
    pub fn passes_through(&self, writer: &WriterSchema, event_type: Name) -> bool {
        match self.resolution(writer, event_type).as_ref() {
            Resolution::Uncatalogued => true,
            Resolution::Version(version) => {
                self.catalogue.newest(event_type).is_some_and(|newest| newest.version == *version)
            }
            Resolution::Resolved { .. } | Resolution::Unreadable(_) => false,
        }
    }

    /// Runs the chain from the event's version to the newest of its type
    /// (and of every type it becomes).
    pub fn to_newest(&self, event: Event) -> Result<Events, UpcastError> {
        // Most events are written at the newest version: no allocation.
        if self.behind(&event).is_none() {
            return Ok(Events::from_buf([event]));
        }
        let mut done = self.run_chain(event)?;
        // What upcasters wrote as plain integers reads as the newest
        // schema's date/time types, as a writer's values would.
        for event in &mut done {
            if let Some(newest) = self.catalogue.newest(event.event_type) {
                catalogue::type_times(&mut event.payload, &newest.schema);
            }
        }
        Ok(done)
    }

    fn run_chain(&self, event: Event) -> Result<Events, UpcastError> {
        let mut done = Events::new();
        let mut work = vec![event];
        let mut steps = 0;
        while let Some(event) = work.pop() {
            let Some(newest) = self.behind(&event) else {
                done.push(event);
                continue;
            };
            steps += 1;
            let (event_type, version) = (event.event_type.to_string(), event.version);
            let Some(upcaster) = self.chain.get(&(event_type.clone(), version)) else {
                return Err(UpcastError::NoPath { event_type, version, newest });
            };
            if steps > MAX_STEPS {
                return Err(UpcastError::Failed { event_type, version, message: "the chain loops".into() });
            }
            let mut next = upcaster.upcast(event).map_err(|message| UpcastError::Failed {
                event_type: event_type.clone(),
                version,
                message,
            })?;
            // Keep the order of split outputs: the work list is a stack.
            next.reverse();
            work.extend(next);
        }
        Ok(done)
    }

    /// The newest version of the event's type when the event is older
    /// (`None`: at the newest, or a type the catalogue does not know).
    fn behind(&self, event: &Event) -> Option<u32> {
        let newest = self.catalogue.newest(event.event_type)?.version;
        (event.version < newest).then_some(newest)
    }

    /// Proves offline that every catalogue version of `event_types` has a
    /// path to the newest. Returns the catalogue file and message of each gap.
    pub fn check_paths<'a>(&self, event_types: impl IntoIterator<Item = &'a str>) -> Vec<(PathBuf, String)> {
        let mut problems = Vec::new();
        for event_type in event_types {
            for start in self.catalogue.versions(event_type) {
                let mut seen = HashSet::new();
                let mut work = vec![(event_type.to_string(), start.version)];
                while let Some((current, version)) = work.pop() {
                    let Some(newest) = self.catalogue.newest(&current) else {
                        problems.push((start.file.clone(), format!("{current} is not in the catalogue")));
                        continue;
                    };
                    if version >= newest.version || !seen.insert((current.clone(), version)) {
                        continue;
                    }
                    match self.chain.get(&(current.clone(), version)) {
                        Some(upcaster) => work.extend(upcaster.targets()),
                        None => problems.push((
                            start.file.clone(),
                            format!(
                                "{event_type} v{} has no upcast path to the newest version: no upcaster for {current} v{version}",
                                start.version
                            ),
                        )),
                    }
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use crate::value::{intern, Value};

    fn catalogue(versions: &[u32]) -> (tempfile::TempDir, Arc<Catalogue>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let type_dir = dir.path().join("t.E");
        std::fs::create_dir_all(&type_dir).expect("mkdir");
        for v in versions {
            let schema =
                format!(r#"{{"type":"record","name":"E","namespace":"t","fields":[{{"name":"f{v}","type":"int"}}]}}"#);
            std::fs::write(type_dir.join(format!("v{v}.avsc")), schema).expect("write");
        }
        let catalogue = Arc::new(Catalogue::load(dir.path()).expect("loads"));
        (dir, catalogue)
    }

    fn rename(from: u32) -> Arc<dyn Upcaster> {
        Arc::new(FnUpcaster {
            event_type: "t.E".into(),
            from,
            function: move |mut event: Event| {
                if let Some(record) = event.payload.as_record_mut() {
                    record.rename(&format!("f{from}"), intern(&format!("f{}", from + 1)));
                }
                event.version = from + 1;
                Ok(vec![event])
            },
        })
    }

    fn event(version: u32) -> Event {
        Event {
            event_type: "t.E",
            version,
            payload: Value::from_json(&serde_json::json!({ format!("f{version}"): 7 })),
            key: Value::Null,
            position: Position { topic: "t", partition: 0, offset: 0 },
            timestamp: None,
        }
    }

    #[test]
    fn the_chain_runs_to_the_newest_version() {
        let (_dir, catalogue) = catalogue(&[1, 2, 3]);
        let upcasting = Upcasting::new(catalogue, vec![rename(1), rename(2)]);
        let out = upcasting.to_newest(event(1)).expect("upcasts");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].version, 3);
        assert_eq!(out[0].payload.to_json(), serde_json::json!({"f3": 7}));
        assert_eq!(upcasting.to_newest(event(3)).expect("current").len(), 1);
        assert!(upcasting.check_paths(["t.E"]).is_empty());
    }

    #[test]
    fn a_gap_is_an_error_of_the_event_and_a_problem_offline() {
        let (_dir, catalogue) = catalogue(&[1, 2, 3]);
        let upcasting = Upcasting::new(catalogue, vec![rename(1)]);
        assert_eq!(
            upcasting.to_newest(event(1)),
            Err(UpcastError::NoPath { event_type: "t.E".into(), version: 2, newest: 3 })
        );
        let problems = upcasting.check_paths(["t.E"]);
        assert_eq!(problems.len(), 2, "v1 and v2 both lack a path: {problems:?}");
        assert!(problems[0].0.ends_with("t.E/v1.avsc"));
        assert!(problems[0].1.contains("no upcaster for t.E v2"), "{problems:?}");
    }

    /// The decode thread's own memo of resolutions gives what the shared
    /// map gives, for every writer schema and across its starting over
    /// (more schemas than it keeps): catalogued at an old version (upcast),
    /// at the newest (as written), unreadable, and a type not catalogued.
    #[test]
    fn a_threads_memo_upcasts_as_the_shared_map() {
        let (_dir, catalogue) = catalogue(&[1, 2]);
        let upcasting = Upcasting::new(catalogue, vec![rename(1)]);
        let text = |field: &str, kind: &str, name: &str| {
            format!(
                r#"{{"type":"record","name":"{name}","namespace":"t","fields":[{{"name":"{field}","type":"{kind}"}}]}}"#
            )
        };
        let kinds =
            [text("f1", "int", "E"), text("f2", "int", "E"), text("f1", "string", "E"), text("f1", "int", "Other")];
        let mut memo = Resolutions::default();
        // More ids than the memo keeps, met twice over in turn.
        for round in 0..2 {
            for id in 0..(3 * Resolutions::MAX as u32) {
                let kind = &kinds[id as usize % kinds.len()];
                let writer = crate::codec::registry::compile(id, kind.clone(), &[]).expect("compiles");
                let mut event = event(1 + u32::from(kind.contains("f2")));
                event.event_type = writer.decoder.type_name();
                let shared = upcasting.upcast(event.clone(), &writer);
                let remembered = upcasting.upcast_remembering(event, &writer, &mut memo);
                assert_eq!(remembered, shared, "round {round}, schema {id}: {kind}");
            }
        }
        assert!(memo.seen.len() <= Resolutions::MAX, "the memo stays bounded: {}", memo.seen.len());
        let outcomes: Vec<_> = (0..4)
            .map(|id| {
                let writer = crate::codec::registry::compile(id, kinds[id as usize].clone(), &[]).expect("compiles");
                let mut event = event(1);
                event.event_type = writer.decoder.type_name();
                upcasting.upcast_remembering(event, &writer, &mut memo).map(|out| out[0].version)
            })
            .collect();
        assert!(matches!(outcomes[..], [Ok(2), Ok(2), Err(UpcastError::Unreadable(_)), Ok(1)]), "{outcomes:?}");
    }

    /// An upcaster adds a timestamp-micros field as a plain integer (what a
    /// declarative `add` writes): the event leaves the chain with it typed
    /// as the newest schema says, micros, not read later as milliseconds.
    #[test]
    fn integers_an_upcaster_adds_read_as_the_newest_schemas_date_time_types() {
        let dir = tempfile::tempdir().expect("temp dir");
        let type_dir = dir.path().join("t.E");
        std::fs::create_dir_all(&type_dir).expect("mkdir");
        std::fs::write(
            type_dir.join("v1.avsc"),
            r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"f1","type":"int"}]}"#,
        )
        .expect("write");
        std::fs::write(
            type_dir.join("v2.avsc"),
            r#"{"type":"record","name":"E","namespace":"t","fields":[{"name":"f1","type":"int"},
                {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
                {"name":"maybe","type":["null",{"type":"int","logicalType":"date"}]},
                {"name":"count","type":["null","long"]}]}"#,
        )
        .expect("write");
        let catalogue = Arc::new(Catalogue::load(dir.path()).expect("loads"));
        let add = Arc::new(FnUpcaster {
            event_type: "t.E".into(),
            from: 1,
            function: |mut event: Event| {
                if let Some(record) = event.payload.as_record_mut() {
                    record.push(intern("at"), Value::Int(1_733_400_000_123_456));
                    record.push(intern("maybe"), Value::Int(3));
                    record.push(intern("count"), Value::Int(4));
                }
                event.version = 2;
                Ok(vec![event])
            },
        });
        let upcasting = Upcasting::new(catalogue, vec![add]);
        let mut out = upcasting.to_newest(event(1)).expect("upcasts");
        let record = out.pop().expect("one event").payload;
        assert_eq!(
            record.to_json(),
            serde_json::json!({"f1": 7, "at": "2024-12-05T12:00:00.123456Z", "maybe": "1970-01-04", "count": 4})
        );
    }
}
