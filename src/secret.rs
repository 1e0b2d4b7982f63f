//! Secrets in settings: [`Secret`] and [`SecretUrl`] print as `***` (or
//! with the password hidden) in `Debug`, `Display` and `serde`, and
//! [`Properties`] hide the values of librdkafka's secret settings, so that
//! no log line, error, HTTP response or `kawka validate` shows them. A
//! leaf: settings of every stage hold them.

use std::collections::BTreeMap;
use std::fmt;

/// A secret value: printed as `***` by `Debug`, `Display` and `Serialize`;
/// read from config as a plain string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

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

/// Where a URL's user information is: (its start, the `:` before the
/// password or the `@` when there is none, the `@`). A password may hold an
/// unencoded `/` (base64 ones do): the user information ends at the last
/// `@` before the query, not at the first `/` (a path with an `@` is then
/// taken for one too: redacted too much, never too little).
fn userinfo(url: &str) -> Option<(usize, usize, usize)> {
    let start = url.find("://")? + 3;
    let before_query = url[start..].find(['?', '#']).map_or(url.len(), |i| start + i);
    let at = start + url[start..before_query].rfind('@')?;
    let colon = url[start..at].find(':').map_or(at, |i| start + i);
    Some((start, colon, at))
}

/// `scheme://user:password@host/…` → (`scheme://host/…`, the user and
/// password, percent-decoded); a URL without them comes back as it is.
/// Clients take credentials this way so that their errors, which print
/// URLs, cannot show them.
pub fn split_credentials(url: &str) -> (String, Option<(String, Secret)>) {
    let Some((start, colon, at)) = userinfo(url) else { return (url.to_string(), None) };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let password = if colon < at { &url[colon + 1..at] } else { "" };
    let base = format!("{}{}", &url[..start], &url[at + 1..]);
    (base, Some((decode(&url[start..colon]), Secret::new(decode(password)))))
}

/// Hides the password of `scheme://user:password@host…` and the values of
/// query parameters that hold secrets (`?password=…`, `sslpassword`, …).
pub fn redact_url(url: &str) -> String {
    let mut out = match userinfo(url) {
        Some((_, colon, at)) if colon < at => format!("{}***{}", &url[..colon + 1], &url[at..]),
        _ => url.to_string(),
    };
    if let Some(query_start) = out.find('?') {
        let (head, query) = out.split_at(query_start + 1);
        let (query, fragment) = query.split_once('#').map_or((query, None), |(q, f)| (q, Some(f)));
        let redacted: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        let mut rebuilt = format!("{head}{}", redacted.join("&"));
        if let Some(fragment) = fragment {
            rebuilt.push('#');
            rebuilt.push_str(fragment);
        }
        out = rebuilt;
    }
    out
}

/// Whether a setting's name says it holds a secret: librdkafka's
/// `sasl.password`, `ssl.key.password`, `sasl.oauthbearer.client.secret`,
/// `sasl.jaas.config`, `ssl.key.pem`, …, a URL's `password` or `sslpassword`.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "credential", "oauthbearer.config", "key.pem", "keystore.key", "private"]
        .iter()
        .any(|word| key.contains(word))
}

/// librdkafka settings (`kafka.properties`, `source.properties`): `Debug`
/// hides the values of the secret ones ([`is_secret_key`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Properties(BTreeMap<String, String>);

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl From<BTreeMap<String, String>> for Properties {
    fn from(map: BTreeMap<String, String>) -> Properties {
        Properties(map)
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, if is_secret_key(k) { "***" } else { v.as_str() })))
            .finish()
    }
}

impl<'de> serde::Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<SecretUrl, D::Error> {
        String::deserialize(deserializer).map(SecretUrl)
    }
}

impl serde::Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
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
        assert_eq!(
            redact_url("postgres://db/x?user=k&password=s3cret&sslmode=require#f"),
            "postgres://db/x?user=k&password=***&sslmode=require#f"
        );
        assert_eq!(redact_url("postgres://k:p@db/x?sslpassword=pw"), "postgres://k:***@db/x?sslpassword=***");
        // Characters a password should encode, but may not.
        assert_eq!(redact_url("http://elastic:ab/cd+ef==@es:9200"), "http://elastic:***@es:9200");
        assert_eq!(redact_url("http://elastic:a@b@es:9200/x"), "http://elastic:***@es:9200/x");
        let (base, credentials) = split_credentials("https://ann:p%40ss@registry:8081/x");
        assert_eq!(base, "https://registry:8081/x");
        let (user, password) = credentials.expect("credentials");
        assert_eq!((user.as_str(), password.expose()), ("ann", "p@ss"));
        let (base, credentials) = split_credentials("https://ann:p%40ss/w==@registry:8081/x");
        assert_eq!(base, "https://registry:8081/x");
        let (user, password) = credentials.expect("credentials");
        assert_eq!((user.as_str(), password.expose()), ("ann", "p@ss/w=="));
        assert_eq!(split_credentials("http://registry:8081"), ("http://registry:8081".to_string(), None));
        assert_eq!(serde_json::to_string(&Secret::new("pw")).expect("serializes"), "\"***\"");
        let secret: Secret = serde_json::from_str("\"pw\"").expect("deserializes");
        assert_eq!(secret.expose(), "pw");
    }

    /// Random passwords (every printable ASCII character a user might leave
    /// unencoded but `@`, which ends the user information, plus encoded
    /// forms) in random URLs: never in the redacted text; taken out whole.
    #[test]
    fn no_password_survives_redaction_whatever_it_holds() {
        let mut seed: u64 = 0x5eed_cafe;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let alphabet: Vec<char> = (33u8..127).map(char::from).filter(|c| !matches!(c, '@' | '?' | '#')).collect();
        for case in 0..5_000 {
            let password: String = (0..4 + next(20)).map(|_| alphabet[next(alphabet.len() as u64) as usize]).collect();
            let marked = format!("Q{case}Z{password}");
            let path = ["", "/", "/db", "/a/b?sslmode=require", "/x#frag"][next(5) as usize];
            let url = format!("postgres://user{case}:{marked}@host{}:5432{path}", next(9));
            let redacted = redact_url(&url);
            assert!(!redacted.contains(&marked), "{url} -> {redacted}");
            let (bare, credentials) = split_credentials(&url);
            assert!(!bare.contains(&marked), "{url} -> {bare}");
            let (user, taken) = credentials.expect("credentials");
            assert_eq!(user, format!("user{case}"));
            // Percent-decoding may change what was taken; the raw text is
            // what must be gone, and it is gone as one piece.
            assert_eq!(taken.expose(), percent_encoding::percent_decode_str(&marked).decode_utf8_lossy());
            let query = format!("postgres://h/db?user=u&password={marked}&sslmode=require");
            assert!(!redact_url(&query).contains(&marked), "{query}");
        }
    }

    #[test]
    fn secret_properties_are_hidden() {
        let properties = Properties::from(BTreeMap::from([
            ("sasl.password".to_string(), "pw1".to_string()),
            ("ssl.key.password".to_string(), "pw2".to_string()),
            ("sasl.oauthbearer.client.secret".to_string(), "pw3".to_string()),
            ("sasl.jaas.config".to_string(), "pw4".to_string()),
            ("sasl.username".to_string(), "ann".to_string()),
            ("fetch.max.bytes".to_string(), "1048576".to_string()),
        ]));
        let printed = format!("{properties:?}");
        for secret in ["pw1", "pw2", "pw3", "pw4"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("\"sasl.username\": \"ann\"") && printed.contains("1048576"), "{printed}");
    }
}
