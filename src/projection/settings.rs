//! What a [`RulesProjection`](super::RulesProjection) is built from: the
//! key, version and `events:` rules of a connector file, with their
//! expressions parsed (`config` fills them in from the files).

use serde::Deserialize;

use super::expr::Expr;

/// A connector's projection.
#[derive(Debug, Clone)]
pub struct ProjectionSettings {
    /// Key columns (Postgres) or parts of the document id (Elasticsearch),
    /// with the expression of each.
    pub key: Vec<(String, Expr)>,
    pub version: Option<Expr>,
    pub tombstones: TombstonePolicy,
    pub unknown_events: UnknownEventPolicy,
    pub events: Vec<EventRule>,
}

/// What one event type does.
#[derive(Debug, Clone)]
pub struct EventRule {
    pub event_type: String,
    pub op: OpTemplate,
}

#[derive(Debug, Clone)]
pub struct OpTemplate {
    pub kind: OpKind,
    /// Target field (column or document field) and its expression.
    pub fields: Vec<(String, Expr)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Upsert,
    Merge,
    Increment,
    Decrement,
    Delete,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Upsert => "upsert",
            OpKind::Merge => "merge",
            OpKind::Increment => "increment",
            OpKind::Decrement => "decrement",
            OpKind::Delete => "delete",
        }
    }
}

/// What a record with a null value means.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TombstonePolicy {
    #[default]
    Delete,
    Ignore,
}

/// What an event type without a rule means.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownEventPolicy {
    #[default]
    Skip,
    Error,
}
