//! What a codec is built from: how record keys are read, and the registry
//! client's connection (`config` fills them in from the files).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// How record keys are read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    /// UTF-8 text.
    #[default]
    String,
    /// Confluent-framed Avro.
    Avro,
    /// Ignored: every key is null.
    None,
}

/// The schema registry client's connection.
#[derive(Debug, Clone)]
pub struct RegistryClientSettings {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl RegistryClientSettings {
    /// Settings for a registry at `url` with no auth and default timeouts.
    pub fn plain(url: impl Into<String>) -> RegistryClientSettings {
        RegistryClientSettings {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(10),
        }
    }
}
