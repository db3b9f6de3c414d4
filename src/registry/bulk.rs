//! The HTTP/1.1 client for big blob GETs: hyper with 64 KiB read buffers.
//!
//! Why not reqwest: reqwest leaves hyper's HTTP/1 read buffer at its default maximum, 408 KiB,
//! and on a fast connection every read fills it (tokio-rustls' client read loops until the
//! buffer is full). Each piece of body hyper hands out is a slice of that buffer and keeps all
//! 408 KiB alive while it waits in the upload's write queue, so a transfer pinned 2–3 of them
//! and a TLS sync of the standard set peaked at 25–27 MiB, 7.6 MiB of it these buffers
//! (docs/performance.md). With a 64 KiB maximum for blob GETs the same run peaks at 21–22 MiB
//! at the same tool CPU (once progress stopped waking its watchers for every piece, see
//! `CopyProgress`): the bytes still arrive as TLS records of 16 KiB.
//!
//! It is a plain hyper-util client over the same rustls configuration (same roots, CA file and
//! verification setting) and keeps reqwest's behaviour where a registry could tell:
//! User-Agent and Accept, connect timeout, a read timeout on the connection, keep-alive pool,
//! and redirects followed as [`next_hop`] says (the Authorization header is dropped when the
//! origin changes; https → http is refused). Requests and answers stay reqwest types, so the
//! code that reads an answer cannot tell which client carried it. It is not used when a proxy
//! is configured in the environment: reqwest honours those, this client does not.

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::header::{
    ACCEPT, AUTHORIZATION, COOKIE, HeaderMap, HeaderValue, LOCATION, USER_AGENT,
};
use reqwest::{Method, ResponseBuilderExt, StatusCode, Url};

use super::transport::same_origin;

type Connector = hyper_timeout::TimeoutConnector<hyper_rustls::HttpsConnector<HttpConnector>>;

/// Largest HTTP/1 buffer hyper keeps per connection (read, and write queue): 64 KiB holds four
/// TLS records, so a read still drains what a fast connection delivers at once.
const MAX_BUF: usize = 64 * 1024;

/// Redirects followed before giving up (reqwest's policy in http.rs allows as many).
const MAX_REDIRECTS: usize = 5;

/// Environment variables reqwest reads proxies from; when one is set, reqwest carries blob
/// GETs as well so that they take the proxy.
const PROXY_VARS: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Why a request over the bulk client failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BulkError {
    /// The request could not be turned into an HTTP request (a body of the wrong kind).
    #[error("cannot send the request: {0}")]
    Request(String),
    /// Connecting, TLS, or the exchange failed.
    #[error("request failed")]
    Send(#[from] hyper_util::client::legacy::Error),
    /// A redirect that is not followed.
    #[error("redirect refused: {0}")]
    Redirect(String),
}

/// A pool of HTTP/1.1 connections with small buffers. Clones share the pool.
#[derive(Clone)]
pub(crate) struct BulkClient {
    client: Client<Connector, reqwest::Body>,
    user_agent: HeaderValue,
}

impl BulkClient {
    /// A client over `tls` (offering HTTP/1.1 only), or `None` when the environment
    /// names a proxy.
    pub(crate) fn build(mut tls: rustls::ClientConfig) -> Option<Self> {
        if proxy_configured(|v| std::env::var_os(v)) {
            return None;
        }
        // hyper-rustls sets ALPN from the protocols enabled below (HTTP/1.1 only), and refuses
        // a configuration that already names some.
        tls.alpn_protocols.clear();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(15)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let mut connector = hyper_timeout::TimeoutConnector::new(https);
        // As reqwest's read_timeout: a stalled connection must fail so the retry can start.
        connector.set_read_timeout(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http1_max_buf_size(MAX_BUF)
            .build(connector);
        Some(BulkClient {
            client,
            user_agent: HeaderValue::from_static(concat!(
                "imagemirror/",
                env!("CARGO_PKG_VERSION")
            )),
        })
    }

    /// Sends `req`, following redirects of a request without a body as [`next_hop`] allows.
    pub(crate) async fn execute(
        &self,
        req: reqwest::Request,
    ) -> Result<reqwest::Response, BulkError> {
        let follows = req.body().is_none() && matches!(*req.method(), Method::GET | Method::HEAD);
        let (method, mut url, mut headers) = (
            req.method().clone(),
            req.url().clone(),
            req.headers().clone(),
        );
        let mut request: http::Request<reqwest::Body> = req
            .try_into()
            .map_err(|e: reqwest::Error| BulkError::Request(e.to_string()))?;
        let mut hops = 0;
        loop {
            let h = request.headers_mut();
            h.entry(USER_AGENT)
                .or_insert_with(|| self.user_agent.clone());
            h.entry(ACCEPT).or_insert(HeaderValue::from_static("*/*"));
            let resp = self.client.request(request).await?;
            let location = resp.headers().get(LOCATION).and_then(|l| l.to_str().ok());
            let next = match location {
                Some(loc) if follows && is_redirect(resp.status()) => {
                    next_hop(&url, loc, hops).map_err(BulkError::Redirect)?
                }
                _ => return Ok(into_reqwest(resp, url)),
            };
            hops += 1;
            if !same_origin(&url, &next) {
                // As reqwest does: credentials belong to the origin they were given for.
                headers.remove(AUTHORIZATION);
                headers.remove(COOKIE);
            }
            url = next;
            request = get_request(&method, &url, &headers)?;
        }
    }
}

/// Whether `var` names a proxy in any of [`PROXY_VARS`].
fn proxy_configured(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    PROXY_VARS
        .iter()
        .any(|v| var(v).is_some_and(|s| !s.is_empty()))
}

/// A request without a body.
fn get_request(
    method: &Method,
    url: &Url,
    headers: &HeaderMap,
) -> Result<http::Request<reqwest::Body>, BulkError> {
    let mut req = http::Request::builder()
        .method(method.clone())
        .uri(url.as_str())
        .body(reqwest::Body::from(Vec::new()))
        .map_err(|e| BulkError::Request(e.to_string()))?;
    *req.headers_mut() = headers.clone();
    Ok(req)
}

/// The answer as reqwest's, with the URL it came from (for the transport's origin checks).
fn into_reqwest(resp: http::Response<hyper::body::Incoming>, url: Url) -> reqwest::Response {
    let (mut parts, body) = resp.into_parts();
    if let Ok(with_url) = http::Response::builder().url(url).body(()) {
        parts.extensions.extend(with_url.into_parts().0.extensions);
    }
    reqwest::Response::from(http::Response::from_parts(parts, reqwest::Body::wrap(body)))
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Where a redirect from `from` to `location` leads, after `hops` redirects already followed:
/// refused past [`MAX_REDIRECTS`], from https to http, and to anything but http(s).
pub(crate) fn next_hop(from: &Url, location: &str, hops: usize) -> Result<Url, String> {
    if hops >= MAX_REDIRECTS {
        return Err("too many redirects".into());
    }
    let next = from
        .join(location)
        // Not echoed: a storage Location carries signatures in its query.
        .map_err(|e| format!("the Location does not parse as a URL: {e}"))?;
    match (from.scheme(), next.scheme()) {
        ("https", "http") => Err("refusing a redirect from https to http".into()),
        (_, "http" | "https") => Ok(next),
        (_, other) => Err(format!("refusing a redirect to a {other}: URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn any_proxy_variable_set_and_not_empty_counts() {
        let env = |set: Vec<(&'static str, &'static str)>| {
            move |k: &str| {
                set.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert!(!proxy_configured(env(vec![])));
        assert!(!proxy_configured(env(vec![
            ("HTTPS_PROXY", ""),
            ("NO_PROXY", "*")
        ])));
        for var in PROXY_VARS {
            assert!(
                proxy_configured(env(vec![(var, "http://proxy:3128")])),
                "{var}"
            );
        }
    }

    #[test]
    fn redirects_resolve_relative_locations_and_refuse_downgrades_and_loops() {
        let from = url("https://reg.example:5000/v2/a/blobs/sha256:1");
        assert_eq!(
            next_hop(&from, "/blob/1?sig=x", 0).unwrap().as_str(),
            "https://reg.example:5000/blob/1?sig=x"
        );
        assert_eq!(
            next_hop(&from, "https://cdn.example/b", 4)
                .unwrap()
                .as_str(),
            "https://cdn.example/b"
        );
        assert!(
            next_hop(&from, "https://cdn.example/b", 5)
                .unwrap_err()
                .contains("too many")
        );
        assert!(
            next_hop(&from, "http://cdn.example/b", 0)
                .unwrap_err()
                .contains("https to http")
        );
        assert!(
            next_hop(&from, "file:///etc/passwd", 0)
                .unwrap_err()
                .contains("file:")
        );
        let bad = next_hop(&from, "https://cdn.example:99999/b?sig=SECRET", 0).unwrap_err();
        assert!(
            bad.contains("does not parse") && !bad.contains("SECRET"),
            "{bad}"
        );
        let plain = url("http://reg.example/v2/");
        assert_eq!(
            next_hop(&plain, "https://cdn.example/b", 0)
                .unwrap()
                .as_str(),
            "https://cdn.example/b"
        );
    }
}
