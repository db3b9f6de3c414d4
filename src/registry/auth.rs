//! Credentials, dockerconfigjson parsing, `WWW-Authenticate` challenges and bearer tokens.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::reference::endpoint_for;

/// A username and password (or token) for one registry. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The value of a `Basic` Authorization header.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", BASE64.encode(raw))
    }
}

/// Why a docker config could not be used. Never carries the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum DockerConfigError {
    /// Not JSON, or not the dockerconfigjson shape.
    #[error("not a docker config JSON document: {0}")]
    Json(String),
    /// An `auth` entry that is not base64 of `user:password`.
    #[error("auths[{0:?}].auth is not base64 of \"user:password\"")]
    BadAuth(String),
    /// An entry (or one of its fields) of the wrong JSON type. Names the key, never the value.
    #[error("auths[{key:?}]{} is not {}", field.map(|f| format!(".{f}")).unwrap_or_default(), if field.is_some() { "a string" } else { "an object" })]
    Field {
        /// The registry key of the entry.
        key: String,
        /// The field, or `None` when the entry itself is not an object.
        field: Option<&'static str>,
    },
}

/// serde_json's error as its category and position only, so no part of the input shows.
pub(crate) fn syntax_only(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected JSON content",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

/// Credentials per registry, from a `~/.docker/config.json` or a `kubernetes.io/dockerconfigjson`
/// Secret. `Debug` lists only the registry names.
#[derive(Clone, Default)]
pub struct DockerConfig {
    by_host: HashMap<String, Credentials>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hosts: Vec<_> = self.by_host.keys().collect();
        hosts.sort();
        f.debug_struct("DockerConfig")
            .field("registries", &hosts)
            .finish()
    }
}

impl DockerConfig {
    /// Parses dockerconfigjson. Keys may be hosts, `host:port` or URLs
    /// (`https://index.docker.io/v1/`); Docker Hub's aliases all mean one registry.
    ///
    /// The document is walked by hand rather than deserialised into structs: serde's type
    /// errors quote the offending value (`invalid type: string "<base64 of user:password>"`),
    /// and these messages reach logs, status and Events. Errors here name the key only.
    pub fn parse(json: &[u8]) -> Result<Self, DockerConfigError> {
        // serde_json's syntax errors name the position, never the value, so they are safe.
        let doc: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| DockerConfigError::Json(syntax_only(&e)))?;
        let serde_json::Value::Object(doc) = doc else {
            return Err(DockerConfigError::Json(
                "the document is not a JSON object".into(),
            ));
        };
        let auths = match doc.get("auths") {
            None | Some(serde_json::Value::Null) => return Ok(DockerConfig::default()),
            Some(serde_json::Value::Object(a)) => a,
            Some(_) => return Err(DockerConfigError::Json("\"auths\" is not an object".into())),
        };
        let mut by_host = HashMap::new();
        for (key, entry) in auths {
            let serde_json::Value::Object(entry) = entry else {
                return Err(DockerConfigError::Field {
                    key: key.clone(),
                    field: None,
                });
            };
            let field = |name: &'static str| -> Result<Option<&str>, DockerConfigError> {
                match entry.get(name) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                    Some(_) => Err(DockerConfigError::Field {
                        key: key.clone(),
                        field: Some(name),
                    }),
                }
            };
            let (auth, username, password) =
                (field("auth")?, field("username")?, field("password")?);
            let creds = match (auth, username, password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = BASE64
                        .decode(auth.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .ok_or_else(|| DockerConfigError::BadAuth(key.clone()))?;
                    let (u, p) = decoded
                        .split_once(':')
                        .ok_or_else(|| DockerConfigError::BadAuth(key.clone()))?;
                    Credentials {
                        username: u.to_string(),
                        password: p.to_string(),
                    }
                }
                (_, Some(username), Some(password)) => Credentials {
                    username: username.to_string(),
                    password: password.to_string(),
                },
                _ => continue,
            };
            by_host.insert(normalise_host(key).to_string(), creds);
        }
        Ok(DockerConfig { by_host })
    }

    /// Credentials for a registry (as named in references, or its API endpoint).
    pub fn get(&self, registry: &str) -> Option<&Credentials> {
        let host = normalise_host(registry);
        self.by_host.get(host)
    }

    /// Number of registries with credentials.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// True when there are no credentials at all.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// Reduces a docker config key or registry name to the API endpoint host it means.
fn normalise_host(key: &str) -> &str {
    let no_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = no_scheme.split('/').next().unwrap_or(no_scheme);
    endpoint_for(host)
}

/// A parsed `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="..."`.
    Basic,
    /// `Bearer realm="...",service="...",scope="..."`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// The `service` parameter for the token request.
        service: Option<String>,
    },
}

impl Challenge {
    /// Parses the header; unknown schemes give `None`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(rest);
        let realm = params.get("realm")?.clone();
        Some(Challenge::Bearer {
            realm,
            service: params.get("service").cloned(),
        })
    }
}

/// Parses `k="v", k2=v2` auth parameters; quoted values may contain commas.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// The token endpoint's answer: `token` or `access_token`, and `expires_in` seconds.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    /// Any JSON number (or nothing): a registry's odd value must not fail the login.
    #[serde(default)]
    pub expires_in: Option<serde_json::Number>,
}

impl TokenResponse {
    /// Parses a token answer. The error tells what is wrong and where, never the bytes (they
    /// may hold the token).
    pub(crate) fn parse(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| syntax_only(&e))
    }
}

/// A bearer token with its expiry. `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct Token {
    pub value: String,
    pub expires: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// Longest a token is trusted, whatever its `expires_in` says: a registry's `u64::MAX` would
/// overflow the clock, and a token kept for days outlives rotated credentials.
pub(crate) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

impl Token {
    /// Builds a token from the endpoint's answer; the distribution spec's default lifetime is
    /// 60 s. Lifetimes are clamped to 1 s ..= [`MAX_TOKEN_LIFETIME`].
    pub(crate) fn from_response(resp: TokenResponse) -> Option<Token> {
        let value = resp.token.or(resp.access_token).filter(|t| !t.is_empty())?;
        let secs = match resp.expires_in {
            None => 60,
            Some(n) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.is_finite() && *f > 0.0)
                        .map(|f| f as u64)
                })
                .unwrap_or(60),
        };
        let lifetime = Duration::from_secs(secs.max(1)).min(MAX_TOKEN_LIFETIME);
        // Renew a little early so a token never expires mid-request.
        let margin = Duration::from_secs(5).min(lifetime / 2);
        let now = Instant::now();
        Some(Token {
            value,
            expires: now.checked_add(lifetime - margin).unwrap_or(now),
        })
    }

    /// Still usable.
    pub(crate) fn is_fresh(&self) -> bool {
        Instant::now() < self.expires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_reads_auth_and_aliases() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},
            "registry.internal:5000":{"username":"u2","password":"p:2"},
            "empty.example":{}
        }}"#;
        let cfg = DockerConfig::parse(json).unwrap();
        assert_eq!(cfg.len(), 2);
        let hub = cfg.get("docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pass")
        );
        assert_eq!(cfg.get("registry-1.docker.io"), Some(hub));
        assert_eq!(cfg.get("registry.internal:5000").unwrap().password, "p:2");
        assert!(cfg.get("other.example").is_none());
    }

    #[test]
    fn docker_config_errors_do_not_leak_and_name_the_key() {
        let err = DockerConfig::parse(br#"{"auths":{"r.example":{"auth":"!!!"}}}"#).unwrap_err();
        assert!(err.to_string().contains("r.example"));
        assert!(DockerConfig::parse(b"nope").is_err());
        // base64 of user:hunter2 where an object belongs, or of the wrong type in a field.
        for (doc, named) in [
            (
                r#"{"auths":{"127.0.0.1:1":"dXNlcjpodW50ZXIy"}}"#,
                "127.0.0.1:1",
            ),
            (
                r#"{"auths":{"r.example":{"auth":["dXNlcjpodW50ZXIy"]}}}"#,
                ".auth",
            ),
            (
                r#"{"auths":{"r.example":{"username":"u","password":77777}}}"#,
                ".password",
            ),
            (r#"{"auths":"dXNlcjpodW50ZXIy"}"#, "auths"),
            (
                r#"{"auths":{"r.example":{"auth":"dXNlcjpodW50ZXIy"#,
                "line 1",
            ),
        ] {
            let err = DockerConfig::parse(doc.as_bytes()).unwrap_err().to_string();
            assert!(
                !err.contains("dXNlcjpodW50ZXIy") && !err.contains("77777"),
                "{err}"
            );
            assert!(err.contains(named), "{err}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let cfg =
            DockerConfig::parse(br#"{"auths":{"r.example":{"auth":"YTpodW50ZXIy"}}}"#).unwrap();
        let shown = format!("{cfg:?}");
        assert!(shown.contains("r.example") && !shown.contains("hunter2"));
        let t = Token {
            value: "secret-token".into(),
            expires: Instant::now(),
        };
        assert!(!format!("{t:?}").contains("secret-token"));
    }

    #[test]
    fn token_lifetimes_are_clamped_and_errors_hide_the_body() {
        let parse = |s: &str| Token::from_response(TokenResponse::parse(s.as_bytes()).unwrap());
        let far = parse(r#"{"token":"t","expires_in":18446744073709551615}"#).unwrap();
        assert!(far.expires <= Instant::now() + MAX_TOKEN_LIFETIME);
        for odd in ["-5", "1e308", "0", "0.5"] {
            let t = parse(&format!(r#"{{"token":"t","expires_in":{odd}}}"#)).unwrap();
            assert!(t.expires <= Instant::now() + MAX_TOKEN_LIFETIME, "{odd}");
        }
        assert!(parse(r#"{"token":""}"#).is_none());
        let err = TokenResponse::parse(br#"{"token":["s3cr3t"]}"#)
            .err()
            .unwrap();
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }
}
