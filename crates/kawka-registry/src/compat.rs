//! Compatibility levels and checks, by the Avro schema-resolution rules.

use std::fmt;
use std::str::FromStr;

use crate::resolution::{can_read, Incompatibility, New, Parsed};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    pub const ALL: [Level; 7] = [
        Level::None,
        Level::Backward,
        Level::BackwardTransitive,
        Level::Forward,
        Level::ForwardTransitive,
        Level::Full,
        Level::FullTransitive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    pub fn is_transitive(self) -> bool {
        matches!(self, Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive)
    }

    fn backward(self) -> bool {
        matches!(self, Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive)
    }

    fn forward(self) -> bool {
        matches!(self, Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(text: &str) -> Result<Level, String> {
        Level::ALL
            .into_iter()
            .find(|level| level.name().eq_ignore_ascii_case(text))
            .ok_or_else(|| format!("Invalid compatibility level: {text}"))
    }
}

/// Why a schema was refused: what it broke against which existing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Index into the `existing` schemas checked.
    pub against: usize,
    pub found: Vec<Incompatibility>,
}

/// Checks `new` against `existing` (oldest first) at `level`: non-transitive
/// levels look at the newest existing schema only.
pub fn check(level: Level, new: &Parsed, existing: &[Parsed]) -> Result<(), Vec<Refusal>> {
    let first = if level.is_transitive() { 0 } else { existing.len().saturating_sub(1) };
    let mut refusals = Vec::new();
    for (against, old) in existing.iter().enumerate().skip(first) {
        let mut found = Vec::new();
        // BACKWARD: the new schema reads the old one's data; FORWARD: the
        // old one reads the new one's.
        if level.backward() {
            found.extend(can_read(old, new, New::Reader).err().unwrap_or_default());
        }
        if level.forward() {
            found.extend(can_read(new, old, New::Writer).err().unwrap_or_default());
        }
        if !found.is_empty() {
            refusals.push(Refusal { against, found });
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(refusals)
    }
}

/// The messages Confluent's registry gives for refusals (in `verbose`
/// compatibility answers and in a 409's details): each incompatibility,
/// then the old schema's version and text, then the level.
/// `existing(i)` is the version number and text of the i-th existing schema.
pub fn messages<'a>(level: Level, refusals: &[Refusal], existing: impl Fn(usize) -> (i32, &'a str)) -> Vec<String> {
    let mut out = Vec::new();
    for refusal in refusals {
        out.extend(refusal.found.iter().map(ToString::to_string));
        let (version, text) = existing(refusal.against);
        out.push(format!("{{oldSchemaVersion: {version}}}"));
        out.push(format!("{{oldSchema: '{text}'}}"));
    }
    if !refusals.is_empty() {
        out.push(format!("{{validateFields: 'false', compatibility: '{level}'}}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Parsed {
        apache_avro::Schema::parse_str(&format!(r#"{{"type": "record", "name": "User", "fields": [{fields}]}}"#))
            .unwrap()
            .into()
    }

    #[test]
    fn levels_parse_in_any_case() {
        assert_eq!("full_transitive".parse::<Level>(), Ok(Level::FullTransitive));
        assert_eq!("BACKWARD".parse::<Level>(), Ok(Level::Backward));
        assert!("SIDEWAYS".parse::<Level>().is_err());
    }

    #[test]
    fn adding_a_field_with_a_default_is_fully_compatible() {
        let v1 = schema(r#"{"name": "id", "type": "string"}"#);
        let v2 = schema(r#"{"name": "id", "type": "string"}, {"name": "country", "type": "string", "default": "?"}"#);
        for level in Level::ALL {
            assert_eq!(check(level, &v2, std::slice::from_ref(&v1)), Ok(()), "{level}");
        }
    }

    #[test]
    fn adding_a_field_without_default_breaks_backward_only() {
        let v1 = schema(r#"{"name": "id", "type": "string"}"#);
        let v2 = schema(r#"{"name": "id", "type": "string"}, {"name": "age", "type": "int"}"#);
        assert!(check(Level::Backward, &v2, std::slice::from_ref(&v1)).is_err());
        assert!(check(Level::Full, &v2, std::slice::from_ref(&v1)).is_err());
        assert_eq!(check(Level::Forward, &v2, std::slice::from_ref(&v1)), Ok(()));
        assert_eq!(check(Level::None, &v2, &[v1]), Ok(()));
    }

    #[test]
    fn removing_a_field_without_default_breaks_forward_only() {
        let v1 = schema(r#"{"name": "id", "type": "string"}, {"name": "age", "type": "int"}"#);
        let v2 = schema(r#"{"name": "id", "type": "string"}"#);
        assert_eq!(check(Level::Backward, &v2, std::slice::from_ref(&v1)), Ok(()));
        assert!(check(Level::Forward, &v2, &[v1]).is_err());
    }

    #[test]
    fn transitive_levels_look_at_every_version() {
        let v1 = schema(r#"{"name": "id", "type": "string"}"#);
        let v2 = schema(r#"{"name": "id", "type": "string"}, {"name": "age", "type": "int", "default": 0}"#);
        // v3 drops the default: it can read v2 data but not v1 data.
        let v3 = schema(r#"{"name": "id", "type": "string"}, {"name": "age", "type": "int"}"#);
        assert_eq!(check(Level::Backward, &v3, &[v1.clone(), v2.clone()]), Ok(()));
        assert!(check(Level::BackwardTransitive, &v3, &[v1, v2]).is_err());
    }

    #[test]
    fn type_changes_follow_promotion_rules() {
        let int = schema(r#"{"name": "n", "type": "int"}"#);
        let long = schema(r#"{"name": "n", "type": "long"}"#);
        assert_eq!(check(Level::Backward, &long, std::slice::from_ref(&int)), Ok(()), "int promotes to long");
        assert!(check(Level::Backward, &int, &[long]).is_err(), "long does not demote to int");
    }
}
