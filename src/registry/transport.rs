//! HTTP transport for one registry: TLS settings, authentication and status mapping.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::sync::Mutex;

use super::auth::{Challenge, Credentials, Token, TokenResponse};
use super::bulk::BulkClient;
use super::error::{RegistryError, Result};
use super::first_contact::Gate;
use super::http::{ClientPair, HttpClients, HttpMode};

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
    /// Delete manifests of one repository (distribution's token servers grant `delete`
    /// separately from `push`).
    Delete(String),
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
            Access::Delete(r) => vec![format!("repository:{r}:delete")],
        }
    }
}

#[derive(Default)]
struct AuthState {
    /// Learnt from the first 401 of the registry itself; until then requests go out anonymous.
    challenge: Option<Challenge>,
    /// Tokens per scope; expired ones are dropped whenever one is added, and the map is
    /// bounded (a long-running controller touches many repositories).
    tokens: HashMap<Access, Token>,
}

/// Scopes whose tokens one client keeps at most.
const MAX_TOKENS: usize = 256;

/// Error bodies are read up to this many bytes; the rest is never read.
pub(crate) const MAX_ERROR_BODY: usize = 4096;
/// Largest token answer read (JWTs with many scopes run to a few KiB).
pub(crate) const MAX_TOKEN_BODY: usize = 256 * 1024;

/// The HTTP side of a registry client.
pub(crate) struct Transport {
    /// For requests without a blob body: manifests, HEADs, tag lists, upload sessions.
    pub(crate) http: reqwest::Client,
    /// For blob bodies (GET, upload PUT/PATCH), by size: see [`Transport::blob_http`].
    clients: ClientPair,
    /// `https://host:port` or `http://host:port`.
    pub(crate) base: String,
    /// The host, for messages.
    pub(crate) host: String,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    /// Until an HTTPS registry's first connection is up, its requests go one at a time (see
    /// [`Gate`]). `None`: no gate (plain HTTP, or HTTP/1.1 only).
    gate: Option<Gate>,
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
        let pair = match shared {
            Some(clients) => clients.get(options),
            None => ClientPair::build(options, HttpMode::default()),
        }
        .map_err(config_err)?;
        let scheme = if options.plain_http { "http" } else { "https" };
        let mode = shared.map_or(HttpMode::default(), HttpClients::mode);
        let gated = !options.plain_http && mode != HttpMode::Http1;
        Ok(Transport {
            http: pair.meta.clone(),
            clients: pair,
            base: format!("{scheme}://{host}"),
            host: host.to_string(),
            credentials: options.credentials.clone(),
            auth: Mutex::new(AuthState::default()),
            gate: gated.then(Gate::new),
        })
    }

    /// The client for a request carrying `bytes` bytes of blob: under [`HttpMode::Auto`] the
    /// HTTP/1.1 pool for bodies over [`super::http::SMALL_BLOB`], else the one of requests
    /// without a body (HTTP/2 where offered).
    pub(crate) fn blob_http(&self, bytes: u64) -> &reqwest::Client {
        self.clients.for_body(bytes)
    }

    /// An absolute URL for a path under the registry (one we built).
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A URL the registry sent (`Location`, `Link`), resolved against its origin. One on
    /// another origin (scheme, host, port) is refused: requests to it would carry the
    /// registry's credentials somewhere else, and following it without them would fail the
    /// same way later, with a less clear message.
    pub(crate) fn resolve(&self, what: &str, location: &str) -> Result<String> {
        let bad = |detail: String| RegistryError::BadLocation {
            what: what.to_string(),
            detail,
        };
        let base = url::Url::parse(&self.base).map_err(|e| bad(e.to_string()))?;
        let url = base
            .join(location)
            .map_err(|e| bad(format!("{:?} is not a URL: {e}", shorten(location))))?;
        if !same_origin(&base, &url) {
            return Err(bad(format!(
                "the registry pointed to another origin ({}), which is refused so that credentials stay with {}",
                origin(&url),
                origin(&base)
            )));
        }
        Ok(url.to_string())
    }

    fn is_own(&self, url: &reqwest::Url) -> bool {
        url::Url::parse(&self.base).is_ok_and(|b| same_origin(&b, url))
    }

    /// Sends a request built by `make`, authenticating as the registry demands. `make` is called
    /// again after a 401 challenge; bodies that cannot be rebuilt must only be sent once auth is
    /// known (a preceding request with the same access settles it).
    pub(crate) async fn send(
        &self,
        what: &str,
        access: &Access,
        make: impl FnMut() -> RequestBuilder,
    ) -> Result<Response> {
        self.send_on(what, access, None, make).await
    }

    /// Sends a blob GET of `bytes` bytes built by `make` on the client for that size (see
    /// [`Transport::blob_http`]) as [`Transport::send`] does, over the bulk client when it
    /// carries such GETs.
    pub(crate) async fn send_blob_get(
        &self,
        what: &str,
        access: &Access,
        bytes: u64,
        make: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response> {
        let client = self.blob_http(bytes);
        self.send_on(what, access, self.clients.bulk_for(bytes), || make(client))
            .await
    }

    async fn send_on(
        &self,
        what: &str,
        access: &Access,
        bulk: Option<&BulkClient>,
        mut make: impl FnMut() -> RequestBuilder,
    ) -> Result<Response> {
        let header = self.auth_header(what, access, false).await?;
        let resp = self.dispatch(what, make(), header.as_deref(), bulk).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        if !self.is_own(resp.url()) {
            // A redirect target's challenge is not the registry's: learning it would send the
            // registry's credentials to whatever realm a third party names.
            return Err(RegistryError::AuthFailed {
                what: what.to_string(),
                detail: format!(
                    "{} (a redirect target, not the registry) demanded credentials; none are sent there",
                    origin(resp.url())
                ),
            });
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
        let resp = self.dispatch(what, make(), header.as_deref(), bulk).await?;
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
        bulk: Option<&BulkClient>,
    ) -> Result<Response> {
        let req = match auth {
            Some(h) => req.header(AUTHORIZATION, h),
            None => req,
        };
        // A registry's first requests go through the gate (and reqwest's connector) until it
        // opens; a blob GET comes after its manifest, so in practice the gate is open by then.
        if let Some(bulk) = bulk.filter(|_| self.gate.as_ref().is_none_or(Gate::is_open)) {
            let req = req
                .build()
                .map_err(|e| RegistryError::transport(what, &e))?;
            return bulk
                .execute(req)
                .await
                .map_err(|e| RegistryError::transport(what, &e));
        }
        let resp = match &self.gate {
            Some(gate) => gate.send(req).await,
            None => req.send().await,
        };
        resp.map_err(|e| RegistryError::transport(what, &e))
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
                self.check_realm(what, &realm)?;
                let token = self
                    .fetch_token(what, &realm, service.as_deref(), access)
                    .await?;
                let header = format!("Bearer {}", token.value);
                state.tokens.retain(|_, t| t.is_fresh());
                if state.tokens.len() >= MAX_TOKENS {
                    state.tokens.clear();
                }
                state.tokens.insert(access.clone(), token);
                Ok(Some(header))
            }
        }
    }

    /// The realm gets the credentials: it must be a URL, and not plain HTTP when the registry
    /// itself is reached over HTTPS.
    fn check_realm(&self, what: &str, realm: &str) -> Result<()> {
        let refused = |detail: String| RegistryError::AuthFailed {
            what: what.to_string(),
            detail,
        };
        let url = url::Url::parse(realm).map_err(|e| {
            refused(format!(
                "the token realm {:?} is not a URL: {e}",
                shorten(realm)
            ))
        })?;
        match url.scheme() {
            "https" => Ok(()),
            "http" if self.base.starts_with("http://") => Ok(()),
            scheme => Err(refused(format!(
                "the token realm {} uses {scheme}:// for an https registry; credentials are not sent there",
                origin(&url)
            ))),
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
        let bad = |detail: String| RegistryError::AuthFailed {
            what: what.to_string(),
            detail: format!(
                "the token service {realm} answered something that is not a token: {detail}"
            ),
        };
        let body = match read_capped(resp, MAX_TOKEN_BODY).await {
            Ok(Capped::Whole(b)) => b,
            Ok(Capped::Cut(_)) => return Err(bad(format!("over {MAX_TOKEN_BODY} bytes"))),
            Err(e) => return Err(RegistryError::transport(realm, &e)),
        };
        let body = TokenResponse::parse(&body).map_err(bad)?;
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

/// `Retry-After` from the headers (see [`parse_retry_after`]).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after(
        headers.get(RETRY_AFTER)?.to_str().ok()?,
        std::time::SystemTime::now(),
    )
}

/// `Retry-After` as delay-seconds or an HTTP-date (a date in the past is no wait). Callers cap
/// the result; anything unreadable is `None`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// What [`read_capped`] read.
pub(crate) enum Capped {
    /// The whole body.
    Whole(Bytes),
    /// The first `cap` bytes of a longer body; the rest was not read.
    Cut(Bytes),
}

/// Reads a body up to `cap` bytes; a longer one is cut there (and its connection dropped), so
/// no answer can make us hold more than `cap`.
pub(crate) async fn read_capped(
    mut resp: Response,
    cap: usize,
) -> std::result::Result<Capped, reqwest::Error> {
    let mut body = BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok(Capped::Cut(body.freeze()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Capped::Whole(body.freeze()))
}

/// Scheme, host and port (the default port made explicit) are the same.
pub(super) fn same_origin(a: &url::Url, b: &url::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// `scheme://host:port` of a URL, for messages: no path or query, which may carry signatures.
fn origin(url: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// At most 100 characters of a remote string, for messages.
fn shorten(s: &str) -> String {
    s.chars().take(100).collect()
}

/// The registry's error message, from the distribution error JSON when there is one.
async fn error_detail(resp: Response) -> String {
    let body = match read_capped(resp, MAX_ERROR_BODY).await {
        Ok(Capped::Whole(b) | Capped::Cut(b)) => b,
        Err(_) => Bytes::new(),
    };
    let body = &body[..];
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

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(plain: bool) -> Transport {
        let options = RegistryOptions {
            plain_http: plain,
            ..RegistryOptions::default()
        };
        Transport::new("r.example:5000", &options, None).unwrap()
    }

    #[test]
    fn locations_stay_on_the_registry_origin() {
        let t = transport(false);
        assert_eq!(
            t.resolve("w", "/v2/a/blobs/uploads/x?_state=s").unwrap(),
            "https://r.example:5000/v2/a/blobs/uploads/x?_state=s"
        );
        assert_eq!(
            t.resolve("w", "https://r.example:5000/v2/a/tags/list?last=b")
                .unwrap(),
            "https://r.example:5000/v2/a/tags/list?last=b"
        );
        for foreign in [
            "https://r.example:5001/v2/a/blobs/uploads/x",
            "http://r.example:5000/v2/a/blobs/uploads/x",
            "https://evil.example:5000/x",
            "//evil.example/x",
        ] {
            let err = t.resolve("upload of a", foreign).unwrap_err();
            assert_eq!(err.reason(), "BadLocation", "{foreign}");
            assert!(err.to_string().contains("upload of a"), "{err}");
        }
    }

    #[test]
    fn realms_must_not_downgrade() {
        let t = transport(false);
        assert!(t.check_realm("w", "https://auth.example/token").is_ok());
        for bad in ["http://auth.example/token", "ftp://x/", "not a url"] {
            let err = t.check_realm("w", bad).unwrap_err();
            assert_eq!(err.reason(), "AuthFailed", "{bad}");
        }
        assert!(
            transport(true)
                .check_realm("w", "http://auth.example/token")
                .is_ok()
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
