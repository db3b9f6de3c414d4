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

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    auths: HashMap<String, RawAuth>,
}

#[derive(Deserialize)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl DockerConfig {
    /// Parses dockerconfigjson. Keys may be hosts, `host:port` or URLs
    /// (`https://index.docker.io/v1/`); Docker Hub's aliases all mean one registry.
    pub fn parse(json: &[u8]) -> Result<Self, DockerConfigError> {
        // serde_json's message names the position, never the value, so it is safe to show.
        let raw: RawConfig =
            serde_json::from_slice(json).map_err(|e| DockerConfigError::Json(e.to_string()))?;
        let mut by_host = HashMap::new();
        for (key, entry) in raw.auths {
            let creds = match (entry.auth, entry.username, entry.password) {
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
                (_, Some(username), Some(password)) => Credentials { username, password },
                _ => continue,
            };
            by_host.insert(normalise_host(&key).to_string(), creds);
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

/// The token endpoint's answer.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
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

impl Token {
    /// Builds a token from the endpoint's answer; the distribution spec's default lifetime is 60 s.
    pub(crate) fn from_response(resp: TokenResponse) -> Option<Token> {
        let value = resp.token.or(resp.access_token).filter(|t| !t.is_empty())?;
        let lifetime = Duration::from_secs(resp.expires_in.unwrap_or(60).max(1));
        // Renew a little early so a token never expires mid-request.
        let margin = Duration::from_secs(5).min(lifetime / 2);
        Some(Token {
            value,
            expires: Instant::now() + lifetime - margin,
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
