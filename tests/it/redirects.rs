//! Blob GETs redirected to storage on another origin, as Docker Hub, GHCR and Quay do (to S3 or
//! a CDN): the bytes arrive, and the registry's credentials stay with the registry. Big blobs
//! take the bulk client (src/registry/bulk.rs), small ones reqwest's: both are covered.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine;
use futures_util::TryStreamExt;

use crate::support::{Flavor, RegistryConfig, Seeder, TestRegistry, mirror_cli, mirror_doc, serve};

const USER: &str = "puller";
const PASS: &str = "s3cret-pull";

/// What the storage origin saw: (method, path, HTTP version, Authorization header if any).
type Seen = Arc<Mutex<Vec<(String, String, String, Option<String>)>>>;

struct Front {
    /// The real registry behind the front.
    registry: String,
    /// The storage origin blob GETs are sent to.
    storage: String,
    /// Redirect only this blob's GETs; `None`: every blob's.
    only: Option<String>,
    http: reqwest::Client,
}

/// Sends `req`'s method, path, `Range` and `Authorization` to `url` and answers with what came
/// back, streamed.
async fn forward(
    http: &reqwest::Client,
    url: String,
    req: Request,
    auth: Option<&str>,
) -> Response {
    let mut out = http.request(req.method().clone(), url);
    if let Some(range) = req.headers().get("range") {
        out = out.header("range", range);
    }
    if let Some(auth) = auth {
        out = out.header("authorization", auth);
    }
    for accept in req.headers().get_all("accept") {
        out = out.header("accept", accept);
    }
    drop(req);
    let resp = out.send().await.unwrap();
    let mut b = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        b = b.header(k, v);
    }
    b.body(Body::from_stream(
        resp.bytes_stream().map_err(std::io::Error::other),
    ))
    .unwrap()
}

/// The registry's origin: everything is passed to the real registry, but a blob GET that
/// carries credentials is redirected to the storage origin.
async fn front(State(f): State<Arc<Front>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let redirected = f.only.as_ref().is_none_or(|d| path.ends_with(d.as_str()));
    if req.method() == "GET" && path.contains("/blobs/sha256:") && auth.is_some() && redirected {
        return Response::builder()
            .status(307)
            .header(
                "Location",
                format!("http://{}/storage{path}?sig=abc", f.storage),
            )
            .body(Body::empty())
            .unwrap();
    }
    let url = format!("http://{}{}", f.registry, req.uri());
    forward(&f.http, url, req, auth.as_deref()).await
}

/// Storage: serves blobs of the real registry with credentials of its own, and notes what each
/// request carried.
async fn storage(State((f, seen)): State<(Arc<Front>, Seen)>, req: Request) -> Response {
    note(&seen, &req);
    let path = req.uri().path().to_string();
    let own = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    );
    let url = format!(
        "http://{}{}",
        f.registry,
        path.trim_start_matches("/storage")
    );
    forward(&f.http, url, req, Some(&own)).await
}

/// The real registry: htpasswd, with [`USER`] and [`PASS`].
fn source() -> TestRegistry {
    TestRegistry::start_with(RegistryConfig {
        htpasswd: Some((USER.into(), PASS.into())),
        ..RegistryConfig::default()
    })
}

/// Notes what reached a storage origin.
fn note(seen: &Seen, req: &Request) {
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    seen.lock().unwrap().push((
        req.method().to_string(),
        req.uri().path().to_string(),
        format!("{:?}", req.version()),
        auth,
    ));
}

/// Mirrors `app:v1` from the front, with the registry's credentials for it, into a fresh
/// registry: that registry, and the run's exit code, stdout and stderr.
fn mirror_from(front_host: &str, name: &str) -> (TestRegistry, i32, String, String) {
    let dst = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let auth = format!(
        r#"{{"auths":{{"{front_host}":{{"auth":"{}"}}}}}}"#,
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
    );
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, auth).unwrap();
    let doc = mirror_doc(
        name,
        front_host,
        "app",
        dst.host(),
        "app",
        "  tags:\n    names: [v1]\n",
    );
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &doc,
        &["--auth-file", auth_file.to_str().unwrap()],
    );
    (dst, code, stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_blob_gets_arrive_whole_and_never_carry_the_registrys_credentials() {
    let src = source();
    // A small layer (reqwest's client) and one past imagemirror::registry::SMALL_BLOB (the
    // bulk client), big enough to take many reads.
    let image = Seeder::new(src.host())
        .with_basic(USER, PASS)
        .push_image("app", Some("v1"), 61, &[200_000, 5 << 20], Flavor::Oci)
        .await;

    let seen: Seen = Arc::default();
    let storage_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let f = Arc::new(Front {
        registry: src.host().to_string(),
        storage: storage_listener.local_addr().unwrap().to_string(),
        only: None,
        http: reqwest::Client::new(),
    });
    let storage_app = axum::Router::new()
        .fallback(storage)
        .with_state((f.clone(), seen.clone()));
    tokio::spawn(async move {
        let _ = axum::serve(storage_listener, storage_app).await;
    });
    let front_host = serve(axum::Router::new().fallback(front).with_state(f.clone())).await;

    let (dst, code, stdout, stderr) = mirror_from(&front_host, "redirected");
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    Seeder::new(dst.host())
        .assert_copy_of("app", "v1", &image)
        .await;

    let seen = seen.lock().unwrap().clone();
    // Config and both layers came from storage, each over HTTP/1.1 (plain HTTP), and none
    // carried the registry's credentials.
    for (digest, size) in &image.blobs {
        let hits: Vec<_> = seen
            .iter()
            .filter(|s| s.1.ends_with(digest.as_str()))
            .collect();
        assert!(
            !hits.is_empty(),
            "{digest} ({size} bytes) never reached storage: {seen:#?}"
        );
        for (method, path, version, auth) in hits {
            assert_eq!(method, "GET", "{path}");
            assert_eq!(version, "HTTP/1.1", "{path}");
            assert_eq!(
                auth, &None,
                "{path} ({size} bytes) carried the registry's credentials"
            );
        }
    }
    assert!(
        !stderr.contains(PASS) && !stdout.contains(PASS),
        "the password leaked: {stdout}\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_target_that_demands_credentials_fails_the_blob_and_gets_none() {
    let src = source();
    let image = Seeder::new(src.host())
        .with_basic(USER, PASS)
        .push_image("app", Some("v1"), 62, &[3 << 20], Flavor::Oci)
        .await;
    // Only the big layer (the bulk client's) is redirected; the config comes from the registry.
    let (big, _) = image
        .blobs
        .iter()
        .find(|(_, size)| *size > 1 << 20)
        .cloned()
        .unwrap();
    // Storage that answers every request with a challenge of its own.
    let seen: Seen = Arc::default();
    let demanding = serve(axum::Router::new().fallback({
        let seen = seen.clone();
        move |req: Request| async move {
            note(&seen, &req);
            Response::builder()
                .status(401)
                .header("WWW-Authenticate", "Basic realm=\"storage\"")
                .body(Body::empty())
                .unwrap()
        }
    }))
    .await;
    let f = Arc::new(Front {
        registry: src.host().to_string(),
        storage: demanding.clone(),
        only: Some(big.clone()),
        http: reqwest::Client::new(),
    });
    let front_host = serve(axum::Router::new().fallback(front).with_state(f)).await;

    let (_dst, code, stdout, stderr) = mirror_from(&front_host, "demanding");
    assert_eq!(
        code, 1,
        "the tag fails, not the process: {stdout}\n{stderr}"
    );
    let out = format!("{stdout}\n{stderr}");
    assert!(
        out.contains("a redirect target, not the registry") && out.contains(&demanding),
        "the failure names the storage origin: {out}"
    );
    assert!(!out.contains(PASS), "the password leaked: {out}");
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the big layer was never redirected");
    for (_, path, _, auth) in &seen {
        assert!(path.ends_with(big.as_str()), "{path}");
        assert_eq!(auth, &None, "{path} carried the registry's credentials");
    }
}
