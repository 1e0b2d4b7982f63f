//! Secrets in settings: [`Secret`] and [`SecretUrl`] print as `***` (or
//! with the password hidden) in `Debug` and `Display`, so that neither logs
//! nor `kawka validate` show them. A leaf: settings of every stage hold them.

use std::fmt;

/// A secret value: printed as `***` by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("***")
    }
}

/// A URL that may carry a password: `Debug`/`Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any `user:password@` password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// Hides the password of `scheme://user:password@host…`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => {
                format!("{}{}:***{}", &url[..authority_start], &authority[..colon], &url[authority_start + at..])
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://kawka:s3cret@db:5432/x"), "postgres://kawka:***@db:5432/x");
        assert_eq!(redact_url("postgres://kawka@db/x"), "postgres://kawka@db/x");
        assert_eq!(redact_url("http://host:9200"), "http://host:9200");
        assert_eq!(format!("{:?}", Secret::new("pw")), "***");
        assert_eq!(SecretUrl::new("http://a:b@c/d?e=f@g").to_string(), "http://a:***@c/d?e=f@g");
    }
}
