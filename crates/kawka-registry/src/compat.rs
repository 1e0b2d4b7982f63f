//! Compatibility levels and checks, by the Avro schema-resolution rules.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;

use crate::resolution::can_read;

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

/// Checks `new` against `existing` (oldest first) at `level`: non-transitive
/// levels look at the newest existing schema only. Returns the reasons of
/// incompatibility.
pub fn check(level: Level, new: &Schema, existing: &[Schema]) -> Result<(), Vec<String>> {
    let against: &[Schema] =
        if level.is_transitive() { existing } else { existing.last().map_or(&[], std::slice::from_ref) };
    let mut reasons = Vec::new();
    for (index, old) in against.iter().enumerate() {
        let which = if level.is_transitive() {
            format!("version at position {}", index + 1)
        } else {
            "the latest version".to_string()
        };
        // BACKWARD: the new schema reads the old one's data; FORWARD: the
        // old one reads the new one's.
        if level.backward() {
            if let Err(found) = can_read(old, new) {
                for reason in found {
                    reasons.push(format!("the new schema cannot read data written with {which}: {reason}"));
                }
            }
        }
        if level.forward() {
            if let Err(found) = can_read(new, old) {
                for reason in found {
                    reasons.push(format!("{which} cannot read data written with the new schema: {reason}"));
                }
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(r#"{{"type": "record", "name": "User", "fields": [{fields}]}}"#)).unwrap()
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
