//! A hostile registry double and a port that records what reaches it. The double speaks just
//! enough of the distribution API to draw the engine in, then answers with what a broken or
//! malicious registry might: a token that never expires (`expires_in` = u64::MAX), a 100 MiB
//! error body, an endless tag list, an upload session claiming `Range: 0-<u64::MAX>`, and
//! `Location` / `Link` URLs pointing at the recording port.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use base64::Engine;

use crate::support::{Flavor, Seeder, TestRegistry, mirror_doc, serve};

/// Requests the recording port saw, headers included.
#[derive(Default)]
struct Recorded(Mutex<Vec<String>>);

async fn record(State(rec): State<Arc<Recorded>>, req: Request) -> Response {
    let mut line = format!("{} {}", req.method(), req.uri());
    for (k, v) in req.headers() {
        line.push_str(&format!("\n{k}: {}", String::from_utf8_lossy(v.as_bytes())));
    }
    rec.0.lock().unwrap().push(line);
    // Try to learn credentials: a challenge naming this port as the realm.
    Response::builder()
        .status(401)
        .header(
            "WWW-Authenticate",
            "Bearer realm=\"http://127.0.0.1:1/steal\",service=\"evil\"",
        )
        .body(Body::empty())
        .unwrap()
}

struct Double {
    me: String,
    recorder: String,
    /// Bytes of the giant error body the double produced (the client stops reading early).
    error_bytes_sent: AtomicU64,
    /// Upload status requests answered with `Range: 0-<u64::MAX>`.
    status_asked: AtomicU64,
}

const GIANT: u64 = 100 << 20;
const PIECE: usize = 64 << 10;

fn answer(status: u16, headers: &[(&str, String)], body: Body) -> Response {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body).unwrap()
}

async fn hostile(State(d): State<Arc<Double>>, headers: HeaderMap, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/token" {
        return answer(
            200,
            &[("Content-Type", "application/json".into())],
            Body::from(r#"{"token":"good","expires_in":18446744073709551615}"#),
        );
    }
    if path == "/v2/"
        || headers
            .get("authorization")
            .is_none_or(|v| v != "Bearer good")
    {
        return answer(
            401,
            &[(
                "WWW-Authenticate",
                format!("Bearer realm=\"http://{}/token\",service=\"hostile\"", d.me),
            )],
            Body::empty(),
        );
    }
    let not_found = || answer(404, &[], Body::from(r#"{"errors":[{"code":"NOT_FOUND"}]}"#));
    match (method, path.as_str()) {
        (Method::GET, "/v2/src/tags/list") => {
            // Endless: every page names the next.
            let page: u64 = req
                .uri()
                .query()
                .and_then(|q| q.split("last=p").nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let tags: Vec<String> = (0..1000).map(|i| format!("t{page}-{i}")).collect();
            answer(
                200,
                &[(
                    "Link",
                    format!(
                        "</v2/src/tags/list?n=1000&last=p{}>; rel=\"next\"",
                        page + 1
                    ),
                )],
                Body::from(serde_json::json!({ "name": "src", "tags": tags }).to_string()),
            )
        }
        (Method::GET, "/v2/linky/tags/list") => answer(
            200,
            &[(
                "Link",
                format!(
                    "<http://{}/v2/linky/tags/list?last=a>; rel=\"next\"",
                    d.recorder
                ),
            )],
            Body::from(r#"{"name":"linky","tags":["a"]}"#),
        ),
        (Method::GET, p) if p.starts_with("/v2/src/manifests/") => {
            let d = d.clone();
            let giant = futures_util::stream::unfold(0u64, move |sent| {
                let d = d.clone();
                async move {
                    (sent < GIANT).then(|| {
                        d.error_bytes_sent.fetch_add(PIECE as u64, Ordering::SeqCst);
                        (
                            Ok::<_, std::io::Error>(vec![b'x'; PIECE]),
                            sent + PIECE as u64,
                        )
                    })
                }
            });
            answer(500, &[], Body::from_stream(giant))
        }
        (Method::POST, "/v2/dst/blobs/uploads/") => answer(
            202,
            &[(
                "Location",
                format!("http://{}/v2/dst/blobs/uploads/s1", d.recorder),
            )],
            Body::empty(),
        ),
        (Method::POST, "/v2/big/blobs/uploads/") => answer(
            202,
            &[("Location", "/v2/big/blobs/uploads/s1".into())],
            Body::empty(),
        ),
        (Method::PATCH, "/v2/big/blobs/uploads/s1") => {
            // Read the chunk first, so the client gets the answer rather than a broken pipe.
            let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
            answer(500, &[], Body::from("no"))
        }
        // Small blobs (the config) go up in one PUT, which is taken.
        (Method::PUT, "/v2/big/blobs/uploads/s1") => answer(201, &[], Body::empty()),
        (Method::GET, "/v2/big/blobs/uploads/s1") => {
            d.status_asked.fetch_add(1, Ordering::SeqCst);
            answer(
                204,
                &[
                    ("Range", "0-18446744073709551615".into()),
                    ("Location", "/v2/big/blobs/uploads/s1".into()),
                ],
                Body::empty(),
            )
        }
        (Method::DELETE, _) => answer(204, &[], Body::empty()),
        _ => not_found(),
    }
}

/// Peak `VmHWM` and peak `RssAnon` (KiB) of the binary run with `args`, and its exit code and
/// stderr.
fn run_measured(dir: &Path, args: &[&str]) -> (i32, String, String, u64, u64) {
    let (out, err) = (dir.join("stdout.txt"), dir.join("stderr.txt"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagemirror"))
        .args(args)
        .env("DOCKER_CONFIG", dir)
        .env("IMAGEMIRROR_LOG_LEVEL", "warn")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (mut hwm, mut anon) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            let field = |name: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0)
            };
            hwm = hwm.max(field("VmHWM:"));
            anon = anon.max(field("RssAnon:"));
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the mirror run did not end");
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(out).unwrap(),
        std::fs::read_to_string(err).unwrap(),
        hwm,
        anon,
    )
}

/// What a row of the JSON summary says for a mirror.
fn row(rows: &serde_json::Value, mirror: &str) -> serde_json::Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["mirror"] == format!("test/{mirror}"))
        .cloned()
        .unwrap_or_else(|| panic!("no row for {mirror}: {rows}"))
}

/// Anonymous memory the run may use at its peak, whatever the double sends.
const ANON_BOUND_KIB: u64 = 32 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_registry_cannot_panic_exhaust_memory_or_draw_credentials_away() {
    let rec = Arc::new(Recorded::default());
    let recorder = serve(axum::Router::new().fallback(record).with_state(rec.clone())).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = listener.local_addr().unwrap().to_string();
    let double = Arc::new(Double {
        me: me.clone(),
        recorder: recorder.clone(),
        error_bytes_sent: AtomicU64::new(0),
        status_asked: AtomicU64::new(0),
    });
    let app = axum::Router::new()
        .fallback(hostile)
        .with_state(double.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("small", Some("v1"), 81, &[20_000], Flavor::Oci)
        .await;
    s.push_image("large", Some("v1"), 82, &[300_000], Flavor::Oci)
        .await;
    let tags = |t: &str| format!("  tags:\n    include: [\"{t}\"]\n");
    let docs = [
        // An endless tag list, then a 100 MiB error body for the manifest.
        mirror_doc("endless", &me, "src", dst.host(), "a", &tags("t0-1")),
        // A tag-list Link to another port.
        mirror_doc("linky", &me, "linky", dst.host(), "b", &tags("*")),
        // An upload Location to another port.
        mirror_doc("located", src.host(), "small", &me, "dst", &tags("v1")),
        // A chunked upload whose session claims to hold u64::MAX + 1 bytes.
        mirror_doc("ranged", src.host(), "large", &me, "big", &tags("v1")),
    ]
    .join("---\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirrors.yaml");
    std::fs::write(&file, docs).unwrap();
    let auth = format!(
        r#"{{"auths":{{"{me}":{{"auth":"{}"}}}}}}"#,
        base64::engine::general_purpose::STANDARD.encode("user:hunter2")
    );
    let auth_file = dir.path().join("auth.json");
    std::fs::write(&auth_file, auth).unwrap();
    let (code, stdout, stderr, hwm, anon) = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            run_measured(
                &dir,
                &[
                    "mirror",
                    "-f",
                    file.to_str().unwrap(),
                    "--auth-file",
                    auth_file.to_str().unwrap(),
                    "--output",
                    "json",
                    "--chunked-threshold",
                    "64KiB",
                    "--chunk-size",
                    "64KiB",
                ],
            )
        }
    })
    .await
    .unwrap();
    let error_bytes = double.error_bytes_sent.load(Ordering::SeqCst);
    println!(
        "hostile registry: peak VmHWM {} MiB, peak RssAnon {} MiB (bound {} MiB); {} KiB of the 100 MiB error bodies produced; {} requests reached the recording port",
        hwm >> 10,
        anon >> 10,
        ANON_BOUND_KIB >> 10,
        error_bytes >> 10,
        rec.0.lock().unwrap().len()
    );
    assert_eq!(code, 1, "failures, not a panic (101): {stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let endless = row(&rows, "endless");
    assert_eq!(endless["reason"], "RegistryError", "{rows}");
    assert!(
        endless["message"].to_string().contains("HTTP 500"),
        "{endless}"
    );
    for (mirror, reason) in [("linky", "MirrorFailed"), ("located", "BadLocation")] {
        let r = row(&rows, mirror);
        assert_eq!(r["reason"], reason, "{rows}");
        assert!(r["message"].to_string().contains("another origin"), "{r}");
    }
    let ranged = row(&rows, "ranged");
    assert_eq!(ranged["reason"], "RegistryError", "{rows}");
    assert!(
        ranged["message"].to_string().contains("HTTP 500"),
        "{ranged}"
    );
    assert!(
        double.status_asked.load(Ordering::SeqCst) > 0,
        "the engine asked the session how far it got, and survived the answer"
    );
    assert!(anon < ANON_BOUND_KIB, "RssAnon peaked at {anon} KiB");
    // Each 500 was read for at most its first 4 KiB; what the double produced beyond that
    // sat in socket buffers. Far from the 100 MiB × attempts an unbounded read would pull.
    assert!(
        error_bytes < 40 << 20,
        "{error_bytes} bytes of error body produced"
    );
    let seen = rec.0.lock().unwrap().clone();
    for r in &seen {
        let lower = r.to_ascii_lowercase();
        assert!(
            !lower.contains("authorization")
                && !lower.contains("hunter2")
                && !lower.contains("good"),
            "credentials reached the recording port: {r}"
        );
    }
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
}
