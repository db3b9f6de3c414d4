//! Which HTTP version carries which request (`--http`), read from what TLS registries offering
//! HTTP/2 (ALPN) logged for each request they answered.

use crate::support::registry::Answered;
use crate::support::tls::TestCa;
use crate::support::{
    Flavor, RegistryConfig, Seeder, TestRegistry, mirror_cli, mirror_doc_sides, side,
};

const H1: &str = "HTTP/1.1";
const H2: &str = "HTTP/2.0";
/// `imagemirror::registry::SMALL_BLOB`: the largest blob body that `auto` sends over HTTP/2.
const SMALL: u64 = 1024 * 1024;

/// The protocol of the one answered request that `matches`.
fn protocol_of(log: &[Answered], what: &str, matches: impl Fn(&Answered) -> bool) -> String {
    let hits: Vec<&Answered> = log.iter().filter(|a| matches(a)).collect();
    assert_eq!(hits.len(), 1, "{what}: {hits:#?}");
    hits[0].protocol.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sends_blobs_up_to_1mib_over_http2_and_bigger_ones_over_http1() {
    let ca = TestCa::new("imagemirror test CA");
    let tls = || RegistryConfig {
        tls: Some(ca.server_cert("127.0.0.1")),
        ..RegistryConfig::default()
    };
    let src = TestRegistry::start_with(tls());
    // Both sides of the limit, and one big layer well past it. The config blob is small.
    let sizes = [100_000, SMALL as usize, SMALL as usize + 1, 3 << 20];
    let image = Seeder::new(src.host())
        .with_ca(&ca.cert_pem)
        .push_image("app", Some("v1"), 41, &sizes, Flavor::Oci)
        .await;
    assert_eq!(image.blobs.len(), 5, "config and four layers");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();

    for mode in ["auto", "http1", "http2"] {
        // A fresh destination per mode: every blob is uploaded, none mounted or skipped.
        let dst = TestRegistry::start_with(tls());
        let before = src.responses().len();
        let doc = mirror_doc_sides(
            mode,
            &side(src.host(), "app", &["plainHTTP: false"]),
            &side(dst.host(), "app", &["plainHTTP: false"]),
            "  tags:\n    names: [v1]\n",
        );
        let args = ["--ca-file", ca_file.to_str().unwrap(), "--http", mode];
        let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &args);
        assert_eq!(code, 0, "{mode}: {stdout}\n{stderr}");
        Seeder::new(dst.host())
            .with_ca(&ca.cert_pem)
            .assert_copy_of("app", "v1", &image)
            .await;

        let got = src.responses().split_off(before);
        let put = dst.responses();
        for (digest, size) in &image.blobs {
            let want = match mode {
                "http1" => H1,
                "http2" => H2,
                _ if *size <= SMALL => H2,
                _ => H1,
            };
            let get = format!("GET /v2/app/blobs/{digest}");
            let proto = protocol_of(&got, &get, |a| a.request == get);
            assert_eq!(proto, want, "{mode}: {get} ({size} bytes)");
            // The committing PUT carries the body (below the chunked threshold); its query
            // names the digest, URL-encoded or not.
            let hex = digest.trim_start_matches("sha256:");
            let what = format!("upload PUT of {digest}");
            let proto = protocol_of(&put, &what, |a| {
                a.request.starts_with("PUT /v2/app/blobs/uploads/") && a.request.contains(hex)
            });
            assert_eq!(proto, want, "{mode}: {what} ({size} bytes)");
        }
        // Requests without a blob body keep HTTP/2 unless told http1.
        let meta = if mode == "http1" { H1 } else { H2 };
        let manifest_put = protocol_of(&put, "manifest PUT", |a| {
            a.request == "PUT /v2/app/manifests/v1"
        });
        assert_eq!(manifest_put, meta, "{mode}: manifest PUT");
    }
}
