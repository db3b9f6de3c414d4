//! A fault-injecting HTTP proxy in front of a real registry: connection resets mid-blob,
//! 5xx bursts, 429 with Retry-After, byte flips in blobs, an oversized manifest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;

/// Faults to inject; counters count down as they fire.
#[derive(Default)]
pub struct Faults {
    /// The next N requests answer 503.
    pub unavailable: AtomicU32,
    /// The next N requests answer 429 with `Retry-After: 1`.
    pub rate_limited: AtomicU32,
    /// The next N blob GETs are cut (connection reset) after 8 KiB.
    pub reset_blob_gets: AtomicU32,
    /// Flip a byte in every blob GET body.
    pub corrupt_blobs: AtomicBool,
    /// Answer manifest GETs with a 5 MiB document.
    pub giant_manifests: AtomicBool,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    host: String,
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

struct Ctx {
    upstream: String,
    me: String,
    http: reqwest::Client,
    faults: Arc<Faults>,
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 (ephemeral port) forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let host = listener.local_addr().unwrap().to_string();
        let faults = Arc::new(Faults::default());
        let ctx = Arc::new(Ctx {
            upstream: upstream.to_string(),
            me: host.clone(),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            faults: faults.clone(),
        });
        let app = axum::Router::new().fallback(forward).with_state(ctx);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy { host, faults, task }
    }

    /// `127.0.0.1:port` of the proxy.
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status(code: u16, extra: Option<(&str, &str)>) -> Response {
    let mut b = Response::builder().status(code);
    if let Some((k, v)) = extra {
        b = b.header(k, v);
    }
    b.body(Body::from(format!(
        "{{\"errors\":[{{\"code\":\"INJECTED\",\"message\":\"fault {code}\"}}]}}"
    )))
    .unwrap()
}

async fn forward(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let f = &ctx.faults;
    if take(&f.unavailable) {
        return status(503, None);
    }
    if take(&f.rate_limited) {
        return status(429, Some(("Retry-After", "1")));
    }
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let is_blob_get = method == axum::http::Method::GET && path.contains("/blobs/sha256:");
    if method == axum::http::Method::GET
        && path.contains("/manifests/")
        && f.giant_manifests.load(Ordering::SeqCst)
    {
        let filler = "x".repeat(5 * 1024 * 1024);
        let body = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"annotations\":{{\"x\":\"{filler}\"}}}}"
        );
        return Response::builder()
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(Body::from(body))
            .unwrap();
    }
    let mut up = ctx
        .http
        .request(method, format!("http://{}{path}", ctx.upstream));
    for (k, v) in req.headers() {
        if k != axum::http::header::HOST {
            up = up.header(k, v);
        }
    }
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream());
    let resp = match up.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return status(
                502,
                Some(("X-Proxy-Error", &e.to_string().replace(['\r', '\n'], " "))),
            );
        }
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if k == reqwest::header::LOCATION {
            let loc = v.to_str().unwrap_or("").replace(&ctx.upstream, &ctx.me);
            out = out.header(k.as_str(), loc);
        } else {
            out = out.header(k.as_str(), v.as_bytes());
        }
    }
    let reset = is_blob_get && take(&f.reset_blob_gets);
    let corrupt = is_blob_get && f.corrupt_blobs.load(Ordering::SeqCst);
    let mut sent = 0usize;
    let stream = resp.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        let start = sent;
        sent += chunk.len();
        if reset && sent > 8 * 1024 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ));
        }
        if corrupt && start <= 100 && sent > 100 {
            let mut v = chunk.to_vec();
            v[100 - start] ^= 0xff;
            return Ok(Bytes::from(v));
        }
        Ok(chunk)
    });
    out.body(Body::from_stream(stream)).unwrap()
}
