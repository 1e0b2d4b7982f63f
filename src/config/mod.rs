//! Configuration: the daemon file, the connector files, and their validation.
//!
//! Loading goes file → YAML tree with positions → `${VAR}` interpolation →
//! serde structs ([`files`]) → [`validate`](settings::validate) → [`Settings`].
//! Every step collects problems instead of stopping, so `kawka validate`
//! lists them all, each with file, line and field.

pub mod files;
mod interpolate;
mod settings;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use interpolate::interpolate;
pub use settings::*;

use files::{ConnectorFile, DaemonFile};
use yaml::{Mark, Node};

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
        Some(daemon) => settings::validate(config_file, daemon, connectors),
        None => {
            let sinks = daemon_node
                .as_ref()
                .and_then(|(node, _)| node.get("sinks"))
                .and_then(|node| yaml::from_node::<files::OrderedMap<yaml::Spanned<files::SinkConfig>>>(node).ok());
            Err(Problems(settings::check_connectors(config_file, sinks, connectors)))
        }
    };
    match validated {
        Ok(settings) if problems.is_empty() => Ok(settings),
        Ok(_) => Err(Problems(problems)),
        Err(Problems(more)) => {
            problems.extend(more);
            Err(Problems(problems))
        }
    }
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
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) => {
            problems.push(problem(Mark::default(), "", format!("cannot read: {error}")));
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
