//! Reloading the files while the daemon runs: what changed, what a reload
//! would do, what the last one did.
//!
//! A reload reads and validates the whole configuration as `kawka
//! validate` does; if anything is wrong nothing changes. Otherwise each
//! connector's [`fingerprint`] decides: a new name starts, a missing one
//! drains and stops, a changed fingerprint drains and starts again with
//! the new settings, the rest are not touched ([`plan`]). The fingerprint
//! covers what a connector runs with: its own settings, the Kafka and
//! registry settings, its sink connection, and the catalogue versions and
//! upcasters of the event types it handles; so a new upcaster restarts
//! only the connectors of its event type. (Secrets are not in it: they
//! print as `***`; a changed password takes `POST
//! /connectors/{name}/restart`.)
//!
//! The daemon's supervisor (`app`) applies plans; this module is what it
//! and the HTTP API share: [`Reloads`], the handle requests go through,
//! the last [`Report`], and the outcome counts for
//! `kawka_config_reload_total`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ConnectorSettings, Settings};

/// What a connector runs with, hashed: equal fingerprints, nothing to
/// restart.
pub fn fingerprint(settings: &Settings, connector: &ConnectorSettings) -> String {
    let mut own = connector.clone();
    // Where the file is does not change what runs (a checkout and a pod
    // mount the same files at different paths).
    own.file = PathBuf::new();
    let mut hasher = Sha256::new();
    hasher.update(format!("{own:?}"));
    hasher.update(format!("{:?}{:?}", settings.kafka, settings.schema_registry));
    hasher.update(format!("{:?}", settings.sinks.get(&connector.connection)));
    let mut types: Vec<&str> = connector.events.iter().map(|e| e.event_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    for event_type in types {
        for version in settings.catalogue.versions(event_type) {
            hasher.update(format!("{event_type}/{}/{:x};", version.version, version.fingerprint));
        }
        for upcaster in settings.upcasters.iter().filter(|u| u.event_type == event_type) {
            hasher.update(format!("{event_type}/{}/{:?};", upcaster.from, upcaster.steps));
        }
    }
    hasher.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// What a connector's rows are made of: a change here leaves the rows
/// already written by the old rules (a rebuild applies the new ones).
pub fn projection_fingerprint(connector: &ConnectorSettings) -> String {
    format!("{:?}{:?}", connector.projection_settings(), connector.target)
}

/// What a reload does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub start: Vec<String>,
    pub stop: Vec<String>,
    pub restart: Vec<String>,
    pub unchanged: Vec<String>,
}

impl Plan {
    pub fn changes_nothing(&self) -> bool {
        self.start.is_empty() && self.stop.is_empty() && self.restart.is_empty()
    }

    /// One line per connector: `start x`, `stop y`, `restart z`, `unchanged w`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (word, names) in
            [("start", &self.start), ("stop", &self.stop), ("restart", &self.restart), ("unchanged", &self.unchanged)]
        {
            lines.extend(names.iter().map(|name| format!("{word:<9} {name}")));
        }
        lines
    }
}

/// The plan from the running connectors' fingerprints to the next ones'.
pub fn plan(running: &BTreeMap<String, String>, next: &BTreeMap<String, String>) -> Plan {
    let mut plan = Plan::default();
    for (name, fingerprint) in next {
        match running.get(name) {
            None => plan.start.push(name.clone()),
            Some(was) if was != fingerprint => plan.restart.push(name.clone()),
            Some(_) => plan.unchanged.push(name.clone()),
        }
    }
    plan.stop = running.keys().filter(|name| !next.contains_key(*name)).cloned().collect();
    plan
}

/// Every connector's fingerprint.
pub fn fingerprints(settings: &Settings) -> BTreeMap<String, String> {
    settings.connectors.iter().map(|c| (c.name.clone(), fingerprint(settings, c))).collect()
}

/// The outcome of one reload attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub at_ms: i64,
    /// `file change`, `SIGHUP` or `POST /reload`.
    pub trigger: String,
    /// `applied`, `unchanged` or `invalid` (nothing changed).
    pub outcome: String,
    /// Each problem with its file and line (`invalid`), or what could not
    /// be applied without a process restart.
    pub problems: Vec<String>,
    pub plan: Option<Plan>,
}

/// A request to the supervisor.
#[derive(Debug)]
pub enum Request {
    Reload { trigger: &'static str, reply: oneshot::Sender<Report> },
    Restart { connector: String, reply: oneshot::Sender<Result<(), String>> },
}

/// What a running connector was started with (for `GET
/// /connectors/{name}/config`).
#[derive(Debug, Clone)]
pub struct Info {
    pub fingerprint: String,
    pub file: PathBuf,
    /// The effective settings, secrets shown as `***`.
    pub effective: String,
}

/// The handle the HTTP API and signals reach the supervisor through.
#[derive(Debug)]
pub struct Reloads {
    requests: mpsc::Sender<Request>,
    last: Mutex<Option<Report>>,
    outcomes: Mutex<BTreeMap<String, u64>>,
    infos: Mutex<BTreeMap<String, Info>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Reloads {
    /// The handle, and the requests the supervisor reads.
    pub fn new() -> (Reloads, mpsc::Receiver<Request>) {
        // Requests wait their turn; a handful is plenty (each waits for
        // its answer).
        let (requests, receiver) = mpsc::channel(16);
        let reloads = Reloads { requests, last: Mutex::default(), outcomes: Mutex::default(), infos: Mutex::default() };
        (reloads, receiver)
    }

    /// Asks for a reload and waits for its report.
    pub async fn reload(&self, trigger: &'static str) -> Option<Report> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Reload { trigger, reply }).await.ok()?;
        answer.await.ok()
    }

    /// Asks for a connector to drain and start again.
    pub async fn restart(&self, connector: &str) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Restart { connector: connector.to_string(), reply })
            .await
            .map_err(|_| "the daemon is shutting down".to_string())?;
        answer.await.map_err(|_| "the daemon is shutting down".to_string())?
    }

    /// Records a finished attempt (the last one, and its outcome's count).
    pub fn record(&self, report: &Report) {
        *lock(&self.outcomes).entry(report.outcome.clone()).or_default() += 1;
        *lock(&self.last) = Some(report.clone());
    }

    pub fn last(&self) -> Option<Report> {
        lock(&self.last).clone()
    }

    /// Attempts by outcome, for `kawka_config_reload_total{outcome}`.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        lock(&self.outcomes).clone()
    }

    pub fn set_info(&self, name: &str, info: Option<Info>) {
        let mut infos = lock(&self.infos);
        match info {
            Some(info) => infos.insert(name.to_string(), info),
            None => infos.remove(name),
        };
    }

    pub fn info(&self, name: &str) -> Option<Info> {
        lock(&self.infos).get(name).cloned()
    }
}

/// A digest of the files a reload reads: the daemon file and every file
/// under the connector and schema directories (following symlinks, so a
/// Kubernetes ConfigMap update, which swaps a `..data` symlink, changes
/// it once). Files that cannot be read count as their error.
pub fn files_digest(config_file: &Path, dirs: &[&Path]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut add = |path: &Path| {
        hasher.update(path.as_os_str().as_encoded_bytes());
        match std::fs::read(path) {
            Ok(bytes) => hasher.update(&bytes),
            Err(error) => hasher.update(error.to_string()),
        }
    };
    add(config_file);
    for dir in dirs {
        let mut files = Vec::new();
        collect_files(dir, &mut files, 0);
        files.sort();
        for file in files {
            add(&file);
        }
    }
    hasher.finalize().into()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    // ConfigMap mounts nest a few levels (`..data/`, timestamped dirs).
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        // The `..data` and `..<timestamp>` entries of a ConfigMap mount are
        // the same files again: read the visible names only.
        if name.to_string_lossy().starts_with("..") {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out, depth + 1);
        } else {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_starts_stops_restarts_and_leaves_alone() {
        let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let plan = plan(&map(&[("a", "1"), ("b", "2"), ("c", "3")]), &map(&[("a", "1"), ("b", "9"), ("d", "4")]));
        assert_eq!(
            plan,
            Plan {
                start: vec!["d".into()],
                stop: vec!["c".into()],
                restart: vec!["b".into()],
                unchanged: vec!["a".into()]
            }
        );
        assert!(!plan.changes_nothing());
        assert_eq!(plan.lines(), vec!["start     d", "stop      c", "restart   b", "unchanged a"]);
        assert!(super::plan(&map(&[("a", "1")]), &map(&[("a", "1")])).changes_nothing());
    }

    #[test]
    fn the_digest_follows_contents_and_symlink_swaps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (data1, data2) = (dir.path().join("..2026_1"), dir.path().join("..2026_2"));
        std::fs::create_dir(&data1).expect("mkdir");
        std::fs::create_dir(&data2).expect("mkdir");
        std::fs::write(data1.join("a.yaml"), "one").expect("write");
        std::fs::write(data2.join("a.yaml"), "two").expect("write");
        std::os::unix::fs::symlink(&data1, dir.path().join("..data")).expect("link");
        std::os::unix::fs::symlink(dir.path().join("..data/a.yaml"), dir.path().join("a.yaml")).expect("link");
        let config = dir.path().join("a.yaml");
        let first = files_digest(&config, &[dir.path()]);
        assert_eq!(first, files_digest(&config, &[dir.path()]), "stable while nothing changes");
        // Kubernetes' swap: a new `..data` link renamed over the old one.
        std::os::unix::fs::symlink(&data2, dir.path().join("..data_tmp")).expect("link");
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");
        assert_ne!(first, files_digest(&config, &[dir.path()]));
    }
}
