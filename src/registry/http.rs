//! The reqwest clients behind every registry client: TLS settings, timeouts, redirects, and
//! which HTTP version carries which kind of request.
//!
//! By default (`auto`) a request is routed by the blob bytes it carries. Blob bodies (GET,
//! upload PUT/PATCH) of more than [`SMALL_BLOB`] (1 MiB, the size known from the blob's
//! descriptor) go over HTTP/1.1, one transfer per connection from a keep-alive pool, even when
//! the registry offers HTTP/2. Measured over TLS on loopback (docs/performance.md),
//! multiplexing every blob of a registry over one HTTP/2 connection cost imagemirror +3.3
//! CPU-seconds, the destination registry +4 and 50 % more wall time for 1.49 GiB: all streams
//! share one TCP connection, one TLS session and one reader/writer goroutine pair in the Go
//! registry, flow-control WINDOW_UPDATEs interleave with the data, and distribution's HTTP/2
//! server frames every 16 KiB. Separate HTTP/1.1 connections let the kernel and both processes
//! work on the streams in parallel. Everything else, blob bodies of at most 1 MiB included, is
//! small and many: it goes over HTTP/2 where the registry offers it (one connection and one
//! handshake per registry: over a WAN each new connection costs TCP + TLS round trips), and
//! HTTP/1.1 keep-alive otherwise. Small blobs behave like small requests: on 200 tags of
//! 100 KiB blobs over TLS, everything on HTTP/2 took 4.19 s, 0.6 CPU-s and 16 MiB over 1
//! connection per registry, where small blobs on the HTTP/1.1 pool took 4.37 s, 0.7 CPU-s and
//! 20 MiB over 17. Blob GETs over HTTP/1.1 take a client of our own with smaller buffers
//! (bulk.rs) unless a proxy is configured.

use std::time::Duration;

use super::bulk::BulkClient;

/// Which HTTP version carries which requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HttpMode {
    /// Blob bodies over [`SMALL_BLOB`] over HTTP/1.1; everything else (smaller blob bodies
    /// too) over HTTP/2 when the registry offers it (ALPN), HTTP/1.1 otherwise. Default.
    #[default]
    Auto,
    /// Everything over HTTP/1.1.
    Http1,
    /// Everything over HTTP/2 when the registry offers it (ALPN over TLS; plain-HTTP
    /// registries stay on HTTP/1.1), with windows sized for bulk transfer.
    Http2,
}

/// Blob bodies of at most this many bytes go over the client of requests without a blob body
/// (HTTP/2 where offered) under [`HttpMode::Auto`]; bigger ones over the HTTP/1.1 pool. The
/// transfer engine's small-blob limit units use the same size.
pub const SMALL_BLOB: u64 = 1024 * 1024;

/// The two clients of one TLS setting: `meta` for requests without a blob body, `blob` for
/// blob GETs and uploads. Clones share the connection pools.
#[derive(Clone)]
pub(crate) struct ClientPair {
    pub(crate) meta: reqwest::Client,
    pub(crate) blob: reqwest::Client,
    /// Carries the blob GETs `blob` would, with smaller buffers (bulk.rs); `None` under
    /// [`HttpMode::Http2`] or when a proxy is configured.
    bulk: Option<BulkClient>,
    /// Blob bodies up to this many bytes take `meta`; see [`ClientPair::for_body`].
    small_body_max: u64,
}

/// HTTP/2 stream window for bulk transfer: 8 MiB covers 80 MB/s at 100 ms of round trip per
/// stream (the default 64 KiB would cap a stream at 6.5 MB/s there).
const H2_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 connection window: room for several bulk streams at once.
const H2_CONN_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame the server may send us: fewer frames (and headers to parse) per MiB.
const H2_MAX_FRAME: u32 = 1 << 20;

impl ClientPair {
    pub(crate) fn build(
        options: &super::RegistryOptions,
        mode: HttpMode,
    ) -> std::result::Result<Self, String> {
        // One verifier (one copy of the roots) for both clients.
        let tls = super::roots::client_config(options)?;
        let meta = build(tls.clone(), mode != HttpMode::Http1)?;
        let (blob, bulk) = match mode {
            HttpMode::Http2 => (meta.clone(), None),
            HttpMode::Auto | HttpMode::Http1 => {
                (build(tls.clone(), false)?, BulkClient::build(tls))
            }
        };
        // http1 keeps its own pool for blob bodies of any size, as before; under http2 both
        // clients are one.
        let small_body_max = if mode == HttpMode::Auto {
            SMALL_BLOB
        } else {
            0
        };
        Ok(ClientPair {
            meta,
            blob,
            bulk,
            small_body_max,
        })
    }

    /// The client for a request that carries `bytes` bytes of blob (GET body, PUT or PATCH).
    pub(crate) fn for_body(&self, bytes: u64) -> &reqwest::Client {
        if bytes <= self.small_body_max {
            &self.meta
        } else {
            &self.blob
        }
    }

    /// The client for a blob GET of `bytes` bytes, if it is not `for_body`'s.
    pub(crate) fn bulk_for(&self, bytes: u64) -> Option<&BulkClient> {
        self.bulk.as_ref().filter(|_| bytes > self.small_body_max)
    }
}

/// HTTP clients by TLS settings, for registry clients to share: each TLS setting has its own
/// verifier (a copy of the system's roots, see roots.rs), and clones share one connection pool, which
/// keys connections by host anyway. Use one per runtime (pooled connections belong to the
/// runtime that opened them).
#[derive(Default)]
pub struct HttpClients {
    mode: HttpMode,
    clients: std::sync::Mutex<Vec<(HttpKey, ClientPair)>>,
}

/// (skip verification, extra CA PEM).
type HttpKey = (bool, Option<Vec<u8>>);

impl HttpClients {
    /// Clients that carry requests as `mode` says.
    pub fn with_mode(mode: HttpMode) -> Self {
        HttpClients {
            mode,
            clients: Default::default(),
        }
    }

    /// Which HTTP version carries which requests.
    pub(crate) fn mode(&self) -> HttpMode {
        self.mode
    }

    /// The clients for `options`' TLS settings, built on first use.
    pub(crate) fn get(
        &self,
        options: &super::RegistryOptions,
    ) -> std::result::Result<ClientPair, String> {
        let key: HttpKey = (options.insecure_skip_tls_verify, options.ca_pem.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = clients.iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let pair = ClientPair::build(options, self.mode)?;
        // Distinct CA bundles are few; bounded all the same for a long-running controller.
        if clients.len() >= 64 {
            clients.clear();
        }
        clients.push((key, pair.clone()));
        Ok(pair)
    }
}

/// One reqwest client over `tls`; `h2`: offer HTTP/2 in ALPN (with bulk-sized windows), else
/// HTTP/1.1 only.
fn build(mut tls: rustls::ClientConfig, h2: bool) -> std::result::Result<reqwest::Client, String> {
    tls.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(15))
        // A stalled connection must fail so the retry can start; a slow but moving blob must not.
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("imagemirror/", env!("CARGO_PKG_VERSION")))
        // reqwest drops Authorization when a redirect changes host or port; refusing
        // https -> http as well keeps credentials (and content) off plain text.
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let downgrade = attempt.url().scheme() == "http"
                && attempt.previous().iter().any(|u| u.scheme() == "https");
            if downgrade {
                attempt.error("refusing a redirect from https to http")
            } else if attempt.previous().len() > 5 {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        }))
        // Tells each registry's first request when its connection is up (first_contact.rs).
        .connector_layer(super::first_contact::ConnectWatchLayer);
    builder = if h2 {
        builder
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONN_WINDOW)
            .http2_max_frame_size(H2_MAX_FRAME)
    } else {
        builder.http1_only()
    };
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}
