//! HTTP transport for one registry: TLS settings, authentication and status mapping.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::sync::Mutex;

use super::auth::{Challenge, Credentials, Token, TokenResponse};
use super::error::{RegistryError, Result};

/// How to reach one registry. Every field defaults to the safe choice.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// Talk `http://` instead of `https://`. Default false.
    pub plain_http: bool,
    /// Skip TLS certificate verification. Default false.
    pub insecure_skip_tls_verify: bool,
    /// Extra PEM certificates to trust (private CAs). Default none.
    pub ca_pem: Option<Vec<u8>>,
    /// Credentials; `None` is anonymous. Default none.
    pub credentials: Option<Credentials>,
}

impl fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("plain_http", &self.plain_http)
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// What a request needs access to, as token scopes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    /// Read one repository.
    Pull(String),
    /// Read and write one repository.
    Push(String),
    /// Write one repository and read another (cross-repository mount).
    Mount { to: String, from: String },
}

impl Access {
    fn scopes(&self) -> Vec<String> {
        match self {
            Access::Pull(r) => vec![format!("repository:{r}:pull")],
            Access::Push(r) => vec![format!("repository:{r}:pull,push")],
            Access::Mount { to, from } => vec![
                format!("repository:{to}:pull,push"),
                format!("repository:{from}:pull"),
            ],
        }
    }
}

#[derive(Default)]
struct AuthState {
    /// Learnt from the first 401; until then requests go out anonymous.
    challenge: Option<Challenge>,
    tokens: HashMap<Access, Token>,
}

/// HTTP clients by TLS settings, for registry clients to share: building one loads and parses
/// the system's root certificates (~5 ms each), and clones share one connection pool, which
/// keys connections by host anyway. Use one per runtime (pooled connections belong to the
/// runtime that opened them).
#[derive(Default)]
pub struct HttpClients {
    clients: std::sync::Mutex<Vec<(HttpKey, reqwest::Client)>>,
}

/// (skip verification, extra CA PEM).
type HttpKey = (bool, Option<Vec<u8>>);

impl HttpClients {
    /// The client for `options`' TLS settings, built on first use.
    pub(crate) fn get(
        &self,
        options: &RegistryOptions,
    ) -> std::result::Result<reqwest::Client, String> {
        let key: HttpKey = (options.insecure_skip_tls_verify, options.ca_pem.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = clients.iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let client = build_http_client(options)?;
        // Distinct CA bundles are few; bounded all the same for a long-running controller.
        if clients.len() >= 64 {
            clients.clear();
        }
        clients.push((key, client.clone()));
        Ok(client)
    }
}

fn build_http_client(options: &RegistryOptions) -> std::result::Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        // A stalled connection must fail so the retry can start; a slow but moving blob must not.
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("imagemirror/", env!("CARGO_PKG_VERSION")))
        .tls_danger_accept_invalid_certs(options.insecure_skip_tls_verify);
    if let Some(pem) = &options.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("CA certificates do not parse: {e}"))?;
        if certs.is_empty() {
            return Err("CA bundle holds no certificate".into());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}

/// The HTTP side of a registry client.
pub(crate) struct Transport {
    pub(crate) http: reqwest::Client,
    /// `https://host:port` or `http://host:port`.
    pub(crate) base: String,
    /// The host, for messages.
    pub(crate) host: String,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
}

impl Transport {
    /// `shared`: take the HTTP client from there instead of building one.
    pub(crate) fn new(
        host: &str,
        options: &RegistryOptions,
        shared: Option<&HttpClients>,
    ) -> Result<Self> {
        crate::install_crypto_provider();
        let config_err = |detail: String| RegistryError::Config {
            what: host.to_string(),
            detail,
        };
        let http = match shared {
            Some(clients) => clients.get(options),
            None => build_http_client(options),
        }
        .map_err(config_err)?;
        let scheme = if options.plain_http { "http" } else { "https" };
        Ok(Transport {
            http,
            base: format!("{scheme}://{host}"),
            host: host.to_string(),
            credentials: options.credentials.clone(),
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// An absolute URL for a path under the registry, or a `Location` the registry returned.
    pub(crate) fn url(&self, path_or_location: &str) -> String {
        if path_or_location.starts_with("http://") || path_or_location.starts_with("https://") {
            path_or_location.to_string()
        } else {
            format!("{}{}", self.base, path_or_location)
        }
    }

    /// Sends a request built by `make`, authenticating as the registry demands. `make` is called
    /// again after a 401 challenge; bodies that cannot be rebuilt must only be sent once auth is
    /// known (a preceding request with the same access settles it).
    pub(crate) async fn send(
        &self,
        what: &str,
        access: &Access,
        mut make: impl FnMut() -> RequestBuilder,
    ) -> Result<Response> {
        let header = self.auth_header(what, access, false).await?;
        let resp = self.dispatch(what, make(), header.as_deref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse);
        let Some(challenge) = challenge else {
            return Err(RegistryError::AuthFailed {
                what: what.to_string(),
                detail: "the registry answered 401 without a usable WWW-Authenticate challenge"
                    .into(),
            });
        };
        {
            let mut state = self.auth.lock().await;
            state.challenge = Some(challenge);
            state.tokens.remove(access);
        }
        let header = self.auth_header(what, access, true).await?;
        let resp = self.dispatch(what, make(), header.as_deref()).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(RegistryError::AuthFailed {
                what: what.to_string(),
                detail: if self.credentials.is_some() {
                    "the registry refused the credentials".into()
                } else {
                    "the registry requires credentials and none were given".into()
                },
            });
        }
        Ok(resp)
    }

    async fn dispatch(
        &self,
        what: &str,
        req: RequestBuilder,
        auth: Option<&str>,
    ) -> Result<Response> {
        let req = match auth {
            Some(h) => req.header(AUTHORIZATION, h),
            None => req,
        };
        req.send()
            .await
            .map_err(|e| RegistryError::transport(what, &e))
    }

    /// The Authorization header for `access`, fetching a token when needed. `after_challenge`
    /// means the registry just demanded auth, so having no credentials is final.
    async fn auth_header(
        &self,
        what: &str,
        access: &Access,
        after_challenge: bool,
    ) -> Result<Option<String>> {
        let mut state = self.auth.lock().await;
        match state.challenge.clone() {
            None => Ok(None),
            Some(Challenge::Basic) => match &self.credentials {
                Some(c) => Ok(Some(c.basic_header())),
                None if after_challenge => Err(RegistryError::AuthFailed {
                    what: what.to_string(),
                    detail: "the registry requires credentials and none were given".into(),
                }),
                None => Ok(None),
            },
            Some(Challenge::Bearer { realm, service }) => {
                if let Some(t) = state.tokens.get(access).filter(|t| t.is_fresh()) {
                    return Ok(Some(format!("Bearer {}", t.value)));
                }
                // Holding the lock while fetching keeps concurrent requests from stampeding
                // the token endpoint for the same scope.
                let token = self
                    .fetch_token(what, &realm, service.as_deref(), access)
                    .await?;
                let header = format!("Bearer {}", token.value);
                state.tokens.insert(access.clone(), token);
                Ok(Some(header))
            }
        }
    }

    async fn fetch_token(
        &self,
        what: &str,
        realm: &str,
        service: Option<&str>,
        access: &Access,
    ) -> Result<Token> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s.to_string()));
        }
        for scope in access.scopes() {
            query.push(("scope", scope));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(c) = &self.credentials {
            req = req.header(AUTHORIZATION, c.basic_header());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| RegistryError::transport(realm, &e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RegistryError::AuthFailed {
                what: what.to_string(),
                detail: format!(
                    "the token service {realm} refused the credentials (HTTP {status})"
                ),
            });
        }
        let resp = check(realm, resp).await?;
        let body: TokenResponse = resp.json().await.map_err(|e| RegistryError::AuthFailed {
            what: what.to_string(),
            detail: format!(
                "the token service {realm} answered something that is not a token: {e}"
            ),
        })?;
        Token::from_response(body).ok_or_else(|| RegistryError::AuthFailed {
            what: what.to_string(),
            detail: format!("the token service {realm} answered without a token"),
        })
    }
}

/// Maps a non-success status to a named error; passes success through.
pub(crate) async fn check(what: &str, resp: Response) -> Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = retry_after(resp.headers());
    let detail = error_detail(resp).await;
    let what = what.to_string();
    Err(match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound { what },
        StatusCode::UNAUTHORIZED => RegistryError::AuthFailed { what, detail },
        StatusCode::FORBIDDEN => RegistryError::Denied { what, detail },
        StatusCode::TOO_MANY_REQUESTS => RegistryError::RateLimited { what, retry_after },
        _ => RegistryError::Status {
            what,
            status: status.as_u16(),
            detail,
            retry_after,
        },
    })
}

/// `Retry-After` in seconds (the HTTP-date form is rare on registries and is ignored).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The registry's error message, from the distribution error JSON when there is one.
async fn error_detail(resp: Response) -> String {
    let body = resp.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(4096)];
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(parsed) = serde_json::from_slice::<Errors>(body)
        && !parsed.errors.is_empty()
    {
        return parsed
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
            .collect::<Vec<_>>()
            .join("; ");
    }
    let text = String::from_utf8_lossy(body).trim().to_string();
    if text.is_empty() {
        "(no message)".into()
    } else {
        text.chars().take(300).collect()
    }
}
