//! A fault-injecting HTTP proxy in front of a real registry: connection resets mid-blob,
//! 5xx bursts, 429 with Retry-After, byte flips in blobs, an oversized manifest, upload PATCHes
//! cut before or after the registry saw them, blob GETs that never answer; and counters of the
//! upload bytes that crossed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;

use super::cut::{Cut, CuttableListener};

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
    /// Upload PATCH number N (from 1) is cut like a buffering front proxy (nginx's default)
    /// losing the client: `cut_patch_after` bytes of its body are read, nothing reaches the
    /// registry, the connection drops without an answer. 0: never.
    pub cut_patch: AtomicU32,
    /// Body bytes read from the cut PATCH before the connection drops.
    pub cut_patch_after: AtomicU64,
    /// Upload PATCH number N (from 1) reaches the registry whole, but the connection drops
    /// before its answer gets back. 0: never.
    pub lose_patch_answer: AtomicU32,
    /// Upload PATCH number N (from 1) answers 404 `BLOB_UPLOAD_UNKNOWN` without reaching the
    /// registry, as for a session the registry purged. 0: never.
    pub gone_patch: AtomicU32,
    /// Blob GETs get no answer at all (until the client gives up).
    pub hold_blob_gets: AtomicBool,
    /// Upload POSTs lose their `mount` and `from` parameters, so the registry opens a session
    /// instead of mounting, as a registry that does not mount across repositories does.
    pub refuse_mounts: AtomicBool,
    /// Percent (0-100) of all requests answered 429 with `Retry-After: 1`, at random.
    pub rate_limit_percent: AtomicU32,
    /// Percent (0-100) of blob GETs whose body gets a byte flipped. Which ones is decided by
    /// hashing the path with how many times it was asked for, so a run is reproducible while
    /// each re-fetch of a blob gets a fresh draw.
    pub corrupt_percent: AtomicU32,
    /// Blob GETs send their body one byte every 10 s.
    pub trickle_blob_gets: AtomicBool,
    /// 429s answered because of `rate_limit_percent`.
    pub rate_limited_sent: AtomicU32,
    /// Blob GETs corrupted because of `corrupt_percent`.
    pub corrupted_sent: AtomicU32,
    /// Times each blob path was asked for, for `corrupt_percent`'s draws.
    pub blob_gets: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Upload PATCHes seen (counting cut ones).
    pub patches_seen: AtomicU32,
    /// Blob GETs that are being held.
    pub held_gets: AtomicU32,
    /// Upload body bytes (PATCH and PUT) forwarded to the registry.
    pub upload_bytes_forwarded: AtomicU64,
    /// Upload body bytes read from clients and never forwarded (cut or refused PATCHes).
    pub upload_bytes_dropped: AtomicU64,
    /// An emulation of the OCI 1.1 referrers API (off unless enabled).
    pub referrers_api: super::referrers_api::ReferrersApi,
    /// Bytes per second of the link behind the proxy, per direction (0: unlimited). Every
    /// request and response body through the proxy shares it, as streams share one WAN link.
    pub link_bytes_per_sec: AtomicU64,
    /// When the link is next free, per direction (to the registry, from it).
    link_free: std::sync::Mutex<[Option<tokio::time::Instant>; 2]>,
}

/// How far behind schedule the link may catch up (see [`Faults::cross_link`]).
const LINK_SLACK: std::time::Duration = std::time::Duration::from_millis(50);

/// A direction through the proxy's link.
#[derive(Clone, Copy)]
enum Way {
    Up = 0,
    Down = 1,
}

impl Faults {
    /// Waits until `len` bytes have crossed the link in direction `way` (immediately when
    /// the link is unlimited): each chunk takes the next free slot of the link, so streams
    /// share its rate and a stream that waits (a 429'd one) leaves it to the others.
    async fn cross_link(&self, way: Way, len: usize) {
        let rate = self.link_bytes_per_sec.load(Ordering::SeqCst);
        if rate == 0 || len == 0 {
            return;
        }
        let done = {
            let mut free = self.link_free.lock().unwrap();
            // A chunk may start up to LINK_SLACK in the past: a waiter the scheduler wakes late
            // (a loaded machine) does not lower the link's rate.
            let now = tokio::time::Instant::now();
            let earliest = now.checked_sub(LINK_SLACK).unwrap_or(now);
            let start = free[way as usize].map_or(now, |t| t.max(earliest));
            let done = start + std::time::Duration::from_secs_f64(len as f64 / rate as f64);
            free[way as usize] = Some(done);
            done
        };
        tokio::time::sleep_until(done).await;
    }
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
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(ctx)
            .into_make_service_with_connect_info::<Cut>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(CuttableListener(listener), app).await;
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

/// Whether this GET of `path` is one of the `corrupt_percent` to corrupt.
fn corrupt_draw(f: &Faults, path: &str) -> bool {
    let percent = f.corrupt_percent.load(Ordering::SeqCst);
    if percent == 0 {
        return false;
    }
    let nth = {
        let mut gets = f.blob_gets.lock().unwrap();
        let n = gets.entry(path.to_string()).or_default();
        *n += 1;
        *n
    };
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (path, nth).hash(&mut h);
    let hit = h.finish() % 100 < u64::from(percent);
    if hit {
        f.corrupted_sent.fetch_add(1, Ordering::SeqCst);
    }
    hit
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

async fn forward(
    State(ctx): State<Arc<Ctx>>,
    ConnectInfo(cut): ConnectInfo<Cut>,
    req: Request,
) -> Response {
    let f = &ctx.faults;
    let req = match super::referrers_api::intercept(&f.referrers_api, &ctx.http, &ctx.upstream, req)
        .await
    {
        Ok(answer) => return answer,
        Err(req) => req,
    };
    if take(&f.unavailable) {
        return status(503, None);
    }
    if take(&f.rate_limited) {
        return status(429, Some(("Retry-After", "1")));
    }
    let percent = f.rate_limit_percent.load(Ordering::SeqCst);
    if percent > 0 && rand::random_range(0..100) < percent {
        f.rate_limited_sent.fetch_add(1, Ordering::SeqCst);
        return status(429, Some(("Retry-After", "1")));
    }
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let is_blob_get = method == axum::http::Method::GET && path.contains("/blobs/sha256:");
    let is_upload = (method == axum::http::Method::PATCH || method == axum::http::Method::PUT)
        && path.contains("/blobs/uploads/");
    let patch_number = (method == axum::http::Method::PATCH && is_upload)
        .then(|| f.patches_seen.fetch_add(1, Ordering::SeqCst) + 1);
    if patch_number.is_some_and(|n| n == f.cut_patch.load(Ordering::SeqCst)) {
        let limit = f.cut_patch_after.load(Ordering::SeqCst);
        let mut body = req.into_body().into_data_stream();
        let mut read = 0u64;
        while read < limit {
            match body.next().await {
                Some(Ok(chunk)) => read += chunk.len() as u64,
                _ => break,
            }
        }
        f.upload_bytes_dropped.fetch_add(read, Ordering::SeqCst);
        cut.cut();
        return status(502, None);
    }
    if patch_number.is_some_and(|n| n == f.gone_patch.load(Ordering::SeqCst)) {
        // Read the whole body first, so the client gets the answer rather than a broken pipe.
        let mut body = req.into_body().into_data_stream();
        while let Some(Ok(chunk)) = body.next().await {
            f.upload_bytes_dropped
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        return Response::builder()
            .status(404)
            .header("Content-Type", "application/json")
            .body(Body::from(
                r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"blob upload unknown to registry"}]}"#,
            ))
            .unwrap();
    }
    if is_blob_get && f.hold_blob_gets.load(Ordering::SeqCst) {
        f.held_gets.fetch_add(1, Ordering::SeqCst);
        return std::future::pending().await;
    }
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
    let path = if method == axum::http::Method::POST
        && path.contains("mount=")
        && f.refuse_mounts.load(Ordering::SeqCst)
    {
        path.split_once('?')
            .map_or(path.clone(), |(p, _)| p.to_string())
    } else {
        path
    };
    let mut up = ctx
        .http
        .request(method, format!("http://{}{path}", ctx.upstream));
    for (k, v) in req.headers() {
        if k != axum::http::header::HOST {
            up = up.header(k, v);
        }
    }
    let faults = ctx.faults.clone();
    let body = reqwest::Body::wrap_stream(req.into_body().into_data_stream().then(move |c| {
        let faults = faults.clone();
        async move {
            if let Ok(chunk) = &c {
                faults.cross_link(Way::Up, chunk.len()).await;
                if is_upload {
                    faults
                        .upload_bytes_forwarded
                        .fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            }
            c
        }
    }));
    let resp = match up.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return status(
                502,
                Some(("X-Proxy-Error", &e.to_string().replace(['\r', '\n'], " "))),
            );
        }
    };
    if patch_number.is_some_and(|n| n == f.lose_patch_answer.load(Ordering::SeqCst)) {
        // The registry took the whole chunk; its answer dies with the connection.
        let _ = resp.bytes().await;
        cut.cut();
        return status(502, None);
    }
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
    let drawn = is_blob_get && corrupt_draw(f, &path);
    let corrupt = is_blob_get && (f.corrupt_blobs.load(Ordering::SeqCst) || drawn);
    if is_blob_get && f.trickle_blob_gets.load(Ordering::SeqCst) {
        let body = resp.bytes().await.unwrap_or_default();
        let trickle = futures_util::stream::unfold(0usize, move |i| {
            let body = body.clone();
            async move {
                if i >= body.len() {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                }
                Some((Ok::<_, std::io::Error>(body.slice(i..i + 1)), i + 1))
            }
        });
        return out.body(Body::from_stream(trickle)).unwrap();
    }
    let mut sent = 0usize;
    let faults = ctx.faults.clone();
    let paced = resp.bytes_stream().then(move |c| {
        let faults = faults.clone();
        async move {
            if let Ok(chunk) = &c {
                faults.cross_link(Way::Down, chunk.len()).await;
            }
            c
        }
    });
    let stream = paced.map(move |chunk| {
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
