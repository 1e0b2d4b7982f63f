//! `kawka schemas check`: every schema registered under a connector's
//! subjects must reach the catalogue (by fingerprint, or by resolution
//! against the newest version).

use crate::codec::registry::{records, topic_subject};

use super::catalogue::{Catalogue, Resolution};
use crate::codec::registry::{RegistryClient, RegistryError};

/// What one registered schema is to the catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub subject: String,
    pub version: i32,
    pub id: u32,
    pub event_type: String,
    /// `v1`, `resolved as v2`, or why it cannot be read.
    pub verdict: String,
    pub ok: bool,
}

/// What connectors read: the topics they consume and the event types they
/// handle (a type or topic may repeat).
#[derive(Debug, Clone, Default)]
pub struct Consumed {
    pub topics: Vec<String>,
    pub event_types: Vec<String>,
}

/// The subjects the connectors' events may be registered under: the topic
/// strategies (`<topic>-value`, `<topic>-<record>`) and the record strategy.
fn subjects_of(consumed: &Consumed, all: &[String]) -> Vec<String> {
    let mut wanted = Vec::new();
    for topic in &consumed.topics {
        wanted.extend(all.iter().filter(|s| topic_subject(s, topic).is_some()).cloned());
    }
    for event_type in &consumed.event_types {
        if all.contains(event_type) {
            wanted.push(event_type.clone());
        }
    }
    wanted.sort();
    wanted.dedup();
    wanted
}

/// Checks every version of every subject of the connectors.
pub async fn check(
    catalogue: &Catalogue,
    consumed: &Consumed,
    client: &RegistryClient,
) -> Result<Vec<Finding>, RegistryError> {
    let subjects = subjects_of(consumed, &client.subjects().await?);
    let mut findings = Vec::new();
    for subject in subjects {
        for version in client.subject_versions(&subject).await? {
            let registered = client.subject_version(&subject, &version.to_string()).await?;
            let writer = client.writer_schema(registered.id).await?;
            for event_type in records(&writer.schema).into_iter().map(|r| r.name.fullname(None)) {
                let (verdict, ok) = match catalogue.resolve(&writer.schema, &writer.references, &event_type) {
                    Resolution::Version(v) => (format!("v{v}"), true),
                    Resolution::Resolved { version, .. } => (format!("not in the catalogue; read as v{version}"), true),
                    Resolution::Uncatalogued => ("not in the catalogue (passes as written)".to_string(), true),
                    Resolution::Unreadable(message) => (message, false),
                };
                findings.push(Finding {
                    subject: subject.clone(),
                    version,
                    id: registered.id,
                    event_type,
                    verdict,
                    ok,
                });
            }
        }
    }
    Ok(findings)
}
