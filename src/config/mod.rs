//! Configuration: the daemon file, the connector files, and their validation.
//!
//! Loading goes file → YAML tree with positions ([`crate::yaml`]) → `${VAR}`
//! interpolation → serde structs ([`files`]) → validation → [`Settings`].
//! Every step collects problems instead of stopping, so `kawka validate`
//! lists them all, each with file, line and field.
//!
//! Config sits above the stages: it builds each stage's settings (defined in
//! that stage, e.g. [`crate::source::SourceSettings`]); no stage imports it.
//!
//! * `mod.rs`: [`load`], [`Problem`]s, the catalogue and upcast path checks.
//! * [`files`]: the shape of the files, as serde reads them.
//! * `interpolate.rs`: `${VAR}` interpolation ([`interpolate()`]).
//! * `validate/mod.rs`: files → settings; the daemon file and its `sinks:`.
//! * `validate/connector.rs`: one connector file: source, target, key, ops.
//! * `settings.rs`: [`Settings`] and [`ConnectorSettings`], made of the stages' settings.
//! * `units.rs`: durations and sizes ([`parse_duration`], [`parse_size`]).
//! * `tests.rs`: one test per kind of configuration mistake, on real files.

pub mod files;
mod interpolate;
mod settings;
mod units;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use interpolate::interpolate;
pub use settings::*;
pub use units::{parse_duration, parse_size};
pub use validate::valid_connector_name;

use crate::yaml::{self, Mark, Node};
use files::{ConnectorFile, DaemonFile};

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no line (a missing file).
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `sink.columns.on_hand`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found; the error of [`load`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let count = self.0.len();
        writeln!(f, "{count} problem{} in the configuration:", if count == 1 { "" } else { "s" })?;
        for problem in &self.0 {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

/// Where variables come from: the process environment, or a map in tests.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Loads and validates the daemon file and every connector file it points at.
pub fn load(config_file: &Path) -> Result<Settings, Problems> {
    load_with(config_file, &process_env)
}

pub fn load_with(config_file: &Path, lookup: Lookup) -> Result<Settings, Problems> {
    load_with_upcasters(config_file, lookup, &[])
}

/// Like [`load_with`], with the Rust upcasters of a custom daemon taken
/// into account by the upcast path check.
pub fn load_with_upcasters(
    config_file: &Path,
    lookup: Lookup,
    rust_upcasters: &[std::sync::Arc<dyn crate::upcast::Upcaster>],
) -> Result<Settings, Problems> {
    let mut problems = Vec::new();
    let daemon_node = read_tree(config_file, lookup, &mut problems);
    let daemon = match &daemon_node {
        Some((node, true)) => deserialize::<DaemonFile>(config_file, node, &mut problems),
        _ => None,
    };

    // Even when the daemon file is broken, check the connectors too: the
    // directory comes from whatever the file says, or the default.
    let connectors_dir = match &daemon {
        Some(daemon) => PathBuf::from(&daemon.connectors.value),
        None => daemon_node
            .as_ref()
            .and_then(|(node, _)| node.get("connectors"))
            .and_then(Node::as_str)
            .map_or_else(|| PathBuf::from("connectors/"), PathBuf::from),
    };
    let mut connectors = Vec::new();
    for file in connector_files(&connectors_dir, config_file, &mut problems) {
        if let Some((node, true)) = read_tree(&file, lookup, &mut problems) {
            if let Some(connector) = deserialize::<ConnectorFile>(&file, &node, &mut problems) {
                connectors.push((file, connector));
            }
        }
    }

    let validated = match daemon {
        Some(daemon) => validate::validate(config_file, daemon, connectors),
        None => {
            let sinks = daemon_node
                .as_ref()
                .and_then(|(node, _)| node.get("sinks"))
                .and_then(|node| yaml::from_node::<yaml::OrderedMap<yaml::Spanned<files::SinkConfig>>>(node).ok());
            Err(Problems(validate::check_connectors(config_file, sinks, connectors)))
        }
    };
    let validated = validated.and_then(|settings| load_catalogue(settings, rust_upcasters));
    match validated {
        Ok(settings) if problems.is_empty() => Ok(settings),
        Ok(_) => Err(Problems(problems)),
        Err(Problems(more)) => {
            problems.extend(more);
            Err(Problems(problems))
        }
    }
}

/// Loads the catalogue and the declarative upcasters, and proves that each
/// upcaster fits the schemas it runs between and that every catalogue
/// version of every event a connector handles reaches the newest.
fn load_catalogue(
    mut settings: Settings,
    rust_upcasters: &[std::sync::Arc<dyn crate::upcast::Upcaster>],
) -> Result<Settings, Problems> {
    use crate::upcast::{catalogue::Catalogue, steps, Upcaster, Upcasting};
    let at_file = |file: PathBuf, line: usize, column: usize, field: &str, message: String| Problem {
        file,
        line,
        column,
        field: field.to_string(),
        message,
    };
    let catalogue = Catalogue::load(&settings.schemas_dir)
        .map_err(|found| Problems(found.into_iter().map(|p| at_file(p.file, 0, 0, "schema", p.message)).collect()))?;
    let upcasters = steps::load(&settings.schemas_dir.join("upcasters.yaml")).map_err(|found| {
        Problems(found.into_iter().map(|p| at_file(p.file, p.mark.line, p.mark.column, &p.field, p.message)).collect())
    })?;
    let mut problems: Vec<Problem> = Vec::new();
    for declared in &upcasters {
        // A Rust upcaster for the same step replaces the declared one.
        if rust_upcasters.iter().any(|r| r.event_type() == declared.event_type && r.reads_version() == declared.from) {
            continue;
        }
        problems.extend(
            declared
                .check(&catalogue)
                .into_iter()
                .map(|p| at_file(p.file, p.mark.line, p.mark.column, &p.field, p.message)),
        );
    }
    let catalogue = std::sync::Arc::new(catalogue);
    let mut chain: Vec<std::sync::Arc<dyn Upcaster>> =
        upcasters.iter().map(|d| std::sync::Arc::new(d.clone()) as std::sync::Arc<dyn Upcaster>).collect();
    chain.extend(rust_upcasters.iter().cloned());
    let upcasting = Upcasting::new(catalogue.clone(), chain);
    let mut handled: Vec<&str> =
        settings.connectors.iter().flat_map(|c| c.events.iter().map(|e| e.event_type.as_str())).collect();
    handled.sort_unstable();
    handled.dedup();
    problems.extend(
        upcasting.check_paths(handled).into_iter().map(|(file, message)| at_file(file, 1, 1, "upcast path", message)),
    );
    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    settings.catalogue = catalogue;
    settings.upcasters = upcasters;
    Ok(settings)
}

/// The `*.yaml` and `*.yml` files of a directory, sorted by name.
fn connector_files(dir: &Path, config_file: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            problems.push(Problem {
                file: config_file.to_path_buf(),
                line: 0,
                column: 0,
                field: "connectors".to_string(),
                message: format!("cannot read connector directory {}: {error}", dir.display()),
            });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// Reads, parses and interpolates one file. The flag says whether every
/// variable expanded; the tree is returned either way, so that a broken
/// daemon file still tells where the connectors are.
fn read_tree(file: &Path, lookup: Lookup, problems: &mut Vec<Problem>) -> Option<(Node, bool)> {
    let problem = |mark: Mark, field: &str, message: String| Problem {
        file: file.to_path_buf(),
        line: mark.line,
        column: mark.column,
        field: field.to_string(),
        message,
    };
    let text = match read_bounded(file) {
        Ok(text) => text,
        Err(message) => {
            problems.push(problem(Mark { line: 1, column: 1 }, "", message));
            return None;
        }
    };
    let mut node = match yaml::parse(&text) {
        Ok(node) => node,
        Err(error) => {
            problems.push(problem(error.mark, "", format!("not valid YAML: {}", error.message)));
            return None;
        }
    };
    let before = problems.len();
    node.visit_scalars_mut(&mut |text, mark| match interpolate(text, lookup) {
        Ok(expanded) => *text = expanded,
        Err(message) => problems.push(problem(mark, "", message)),
    });
    let expanded = problems.len() == before;
    Some((node, expanded))
}

/// The largest config file read: connector and daemon files are a few KiB;
/// a file of many MiB is a mistake (or an attack) the parser need not hold.
pub const MAX_CONFIG_FILE_BYTES: u64 = 4 << 20;

/// A config file's text, refused beyond [`MAX_CONFIG_FILE_BYTES`] (read
/// through a cap, so a file that grows while read is bounded too).
fn read_bounded(file: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let handle = std::fs::File::open(file).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    handle.take(MAX_CONFIG_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_FILE_BYTES {
        return Err(format!("larger than {} MiB: not read", MAX_CONFIG_FILE_BYTES >> 20));
    }
    String::from_utf8(bytes).map_err(|e| format!("cannot read: not UTF-8 ({e})"))
}

fn deserialize<T: serde::de::DeserializeOwned>(file: &Path, node: &Node, problems: &mut Vec<Problem>) -> Option<T> {
    match yaml::from_node::<T>(node) {
        Ok(value) => Some(value),
        Err(found) => {
            problems.extend(found.into_iter().map(|p| Problem {
                file: file.to_path_buf(),
                line: p.mark.line,
                column: p.mark.column,
                field: p.field,
                message: p.message,
            }));
            None
        }
    }
}

#[cfg(test)]
mod tests;
