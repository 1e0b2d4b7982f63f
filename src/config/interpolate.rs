//! `${VAR}` interpolation in configuration values.
//!
//! * `${NAME}`: the variable; unset is an error.
//! * `${NAME:-default}`: the default when unset or empty.
//! * `${NAME-default}`: the default when unset.
//! * `$${`: a literal `${`.
//!
//! A lone `$` is left alone, so projection expressions such as `$key` need no
//! escaping. Interpolation runs on the parsed tree, after YAML syntax, so a
//! variable's content can never change the structure of the file.

/// Expands `text`, asking `lookup` for variables.
pub fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let end = body.find('}').ok_or_else(|| format!("unterminated `${{` in `{text}`"))?;
            out.push_str(&expand(&body[..end], lookup)?);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expand(body: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default, empty_is_unset) = match body.find([':', '-']) {
        Some(at) if body[at..].starts_with(":-") => (&body[..at], Some(&body[at + 2..]), true),
        Some(at) if body[at..].starts_with('-') => (&body[..at], Some(&body[at + 1..]), false),
        Some(_) => {
            return Err(format!("`${{{body}}}`: expected `${{NAME}}`, `${{NAME:-default}}` or `${{NAME-default}}`"))
        }
        None => (body, None, false),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("`${{{body}}}`: `{name}` is not a variable name"));
    }
    match (lookup(name), default) {
        (Some(value), Some(default)) if empty_is_unset && value.is_empty() => Ok(default.to_string()),
        (Some(value), _) => Ok(value),
        (None, Some(default)) => Ok(default.to_string()),
        (None, None) => {
            Err(format!("environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.local".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(interpolate("postgres://${HOST}:5432", &env), Ok("postgres://db.local:5432".into()));
        assert_eq!(interpolate("${MISSING:-127.0.0.1:9092}", &env), Ok("127.0.0.1:9092".into()));
        assert_eq!(interpolate("${EMPTY:-fallback}", &env), Ok("fallback".into()));
        assert_eq!(interpolate("${EMPTY-fallback}", &env), Ok(String::new()));
        assert_eq!(interpolate("${MISSING-x}", &env), Ok("x".into()));
        assert_eq!(interpolate("${MISSING:-}", &env), Ok(String::new()));
    }

    #[test]
    fn leaves_expressions_and_escapes_alone() {
        assert_eq!(interpolate("$key", &env), Ok("$key".into()));
        assert_eq!(interpolate("concat($topic, '$')", &env), Ok("concat($topic, '$')".into()));
        assert_eq!(interpolate("$${HOST}", &env), Ok("${HOST}".into()));
    }

    #[test]
    fn reports_mistakes() {
        assert!(interpolate("${MISSING}", &env).unwrap_err().contains("`MISSING` is not set"));
        assert!(interpolate("${HOST", &env).unwrap_err().contains("unterminated"));
        assert!(interpolate("${HO ST}", &env).unwrap_err().contains("not a variable name"));
        assert!(interpolate("${HOST:x}", &env).unwrap_err().contains("expected"));
    }
}
