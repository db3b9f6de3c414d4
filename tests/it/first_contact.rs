//! The first-contact gate of an HTTPS registry (src/registry/first_contact.rs): requests that
//! start together share one HTTP/2 connection, and none of them waits for another's answer.
//!
//! The registry here is a small HTTP/2 server over TLS (h2 + tokio-rustls) that counts the
//! TLS connections it accepts and holds its answer to the first request until every request
//! has arrived: a client that sent the others only after the first answer would never get
//! it, so the server gives up after a deadline and the test fails on what it recorded, not
//! on how long anything took.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use imagemirror::registry::{HttpClients, RegistryClient, RegistryOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::support::tls::TestCa;

/// How long the first answer is held at most, waiting for the other requests; a client that
/// does not send them meanwhile has failed by then.
const HOLD_DEADLINE: Duration = Duration::from_secs(30);

/// What the server saw.
#[derive(Default)]
struct Seen {
    /// TLS connections accepted (handshake completed).
    connections: AtomicUsize,
    /// Requests received, over all connections.
    requests: AtomicUsize,
    /// Requests received when the first answer was sent.
    arrived_before_first_answer: AtomicUsize,
}

/// Serves HEAD manifest requests over HTTP/2 (ALPN `h2` only) until dropped; the first answer
/// waits until `expected` requests have arrived, or [`HOLD_DEADLINE`].
async fn h2_registry(
    ca: &TestCa,
    expected: usize,
) -> (String, Arc<Seen>, tokio::task::JoinHandle<()>) {
    let cert = ca.server_cert("127.0.0.1");
    let certs = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).expect("cert PEM")];
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key PEM");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    let seen = Arc::new(Seen::default());
    // How many requests have arrived, for the held first answer to wait on.
    let (arrived_tx, arrived_rx) = watch::channel(0usize);
    let arrived_tx = Arc::new(arrived_tx);
    let server_seen = seen.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), server_seen.clone());
            let (arrived_tx, arrived_rx) = (arrived_tx.clone(), arrived_rx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    let n = seen.requests.fetch_add(1, Ordering::SeqCst) + 1;
                    arrived_tx.send_replace(n);
                    let (seen, mut arrived) = (seen.clone(), arrived_rx.clone());
                    tokio::spawn(async move {
                        if n == 1 {
                            let all = arrived.wait_for(|a| *a >= expected);
                            let _ = tokio::time::timeout(HOLD_DEADLINE, all).await;
                            seen.arrived_before_first_answer
                                .store(seen.requests.load(Ordering::SeqCst), Ordering::SeqCst);
                        }
                        let tag = request.uri().path().rsplit('/').next().unwrap_or("");
                        let digest = format!("sha256:{:0>64}", tag.len());
                        let answer = http::Response::builder()
                            .status(200)
                            .header("docker-content-digest", digest)
                            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                            .body(())
                            .expect("response");
                        let _ = respond.send_response(answer, true);
                    });
                }
            });
        }
    });
    (addr, seen, server)
}

/// 31 HEADs that start together (a warm resync's first round): one TLS connection, and every
/// request reaches the registry while the first one's answer is still outstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_starting_together_share_one_connection_without_waiting_for_an_answer() {
    imagemirror::install_crypto_provider();
    const N: usize = 31;
    let ca = TestCa::new("first-contact CA");
    let (addr, seen, server) = h2_registry(&ca, N).await;
    let options = RegistryOptions {
        ca_pem: Some(ca.cert_pem.clone().into_bytes()),
        ..RegistryOptions::default()
    };
    let client =
        RegistryClient::with_http(&addr, &options, &HttpClients::default()).expect("client");
    let tags: Vec<String> = (0..N).map(|i| format!("t{i}")).collect();
    let heads =
        futures_util::future::join_all(tags.iter().map(|t| client.head_manifest("app", t))).await;
    for (tag, head) in tags.iter().zip(&heads) {
        let head = head.as_ref().unwrap_or_else(|e| panic!("HEAD {tag}: {e}"));
        assert!(
            head.as_ref().and_then(|h| h.digest.as_ref()).is_some(),
            "HEAD {tag} answered without a digest"
        );
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), N);
    assert_eq!(
        seen.arrived_before_first_answer.load(Ordering::SeqCst),
        N,
        "the other requests must go out while the first answer is outstanding, not after it"
    );
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "requests that start together share the registry's HTTP/2 connection"
    );
    server.abort();
}
