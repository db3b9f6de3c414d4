//! Chunked uploads against a real distribution registry behind the fault proxy: what resumes,
//! what cannot (and starts over in a new session), and sessions deleted when a transfer is
//! abandoned.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use imagemirror::registry::{Registry, RegistryClient, RegistryOptions};
use imagemirror::transfer::{
    BlobOutcome, BlobRequest, Engine, EngineConfig, StallWatchdog, no_progress,
};

use crate::support::proxy::FaultProxy;
use crate::support::registry::Answered;
use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc};

const MIB: u64 = 1 << 20;

fn client(host: &str) -> Arc<dyn Registry> {
    let options = RegistryOptions {
        plain_http: true,
        ..RegistryOptions::default()
    };
    Arc::new(RegistryClient::new(host, &options).expect("client"))
}

/// An engine that uploads blobs over 16 MiB in 8 MiB chunks.
fn chunking_engine() -> Engine {
    Engine::new(EngineConfig {
        chunked_threshold: 16 * MIB,
        chunk_size: 8 * MIB,
        ..EngineConfig::default()
    })
}

fn request(src: &str, dst: &str, digest: &str, size: u64) -> BlobRequest {
    BlobRequest {
        source: client(src),
        source_repo: "big".into(),
        destination: client(dst),
        destination_repo: "big".into(),
        digest: digest.into(),
        size,
        likely_absent: false,
    }
}

/// Copies blob `digest` (`size` bytes) of repository `big` from `from` to `to` (one of them a
/// fault proxy) with the chunking engine; the copy must succeed and arrive whole at `dst`.
async fn copy_verified(
    from: &str,
    to: &str,
    dst: &TestRegistry,
    digest: &str,
    size: u64,
) -> BlobOutcome {
    let outcome = chunking_engine()
        .copy_blob(request(from, to, digest, size), &no_progress())
        .await
        .expect("copied");
    Seeder::new(dst.host())
        .assert_blob("big", digest, size)
        .await;
    outcome
}

/// The upload session id in `METHOD /v2/<repo>/blobs/uploads/<id>?_state=...`.
fn session_of(request: &str) -> Option<&str> {
    let rest = request.split("/blobs/uploads/").nth(1)?;
    let id = rest.split('?').next()?;
    (!id.is_empty()).then_some(id)
}

fn on_sessions<'a>(log: &'a [Answered], method: &str) -> Vec<&'a Answered> {
    log.iter()
        .filter(|a| a.request.starts_with(method) && session_of(&a.request).is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_cut_at_sixty_percent_resumes_at_the_destinations_offset() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let layer = s.push_blob_stream("big", 64 * MIB, 31).await;
    let config = s
        .push_blob("big", br#"{"architecture":"amd64","os":"linux"}"#)
        .await;
    let image = s
        .push_manifest_for(
            "big",
            Some("v1"),
            config.clone(),
            vec![layer.clone()],
            Flavor::Oci,
        )
        .await;
    let proxy = FaultProxy::start(dst.host()).await;
    // Chunks of 8 MiB: PATCH 5 carries bytes 32..40 MiB. A buffering front proxy reads 6 MiB
    // of it (the client is at 38 MiB, 59 %) and loses the connection; the registry saw none.
    let chunk = 8 * MIB;
    proxy.faults.cut_patch.store(5, Ordering::SeqCst);
    proxy
        .faults
        .cut_patch_after
        .store(6 * MIB, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "big",
        src.host(),
        "big",
        proxy.host(),
        "big",
        "  tags:\n    names: [v1]\n",
    );
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &doc,
        &["--chunk-size", "8MiB", "--chunked-threshold", "32MiB"],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    Seeder::new(dst.host())
        .assert_copy_of("big", "v1", &image)
        .await;

    let f = &proxy.faults;
    let forwarded = f.upload_bytes_forwarded.load(Ordering::SeqCst);
    let dropped = f.upload_bytes_dropped.load(Ordering::SeqCst);
    assert!(
        dropped >= 6 * MIB,
        "the cut PATCH was read for 6 MiB: {dropped}"
    );
    // Everything the client sent: each byte once, plus what the cut PATCH carried before the
    // cut. The registry itself received every byte exactly once.
    let resent = forwarded + dropped - layer.1 - config.1;
    eprintln!("re-sent after the cut: {resent} bytes (chunk {chunk})");
    assert!(resent < chunk, "re-sent {resent} bytes, a chunk is {chunk}");
    assert_eq!(
        forwarded,
        layer.1 + config.1,
        "the registry got each byte once"
    );

    // One session for the layer, continued after asking where it stood.
    let log = dst.responses();
    let patches = on_sessions(&log, "PATCH");
    assert_eq!(
        patches.len(),
        8,
        "8 chunks reached the registry: {patches:?}"
    );
    let session = session_of(&patches[0].request).unwrap();
    assert!(
        patches
            .iter()
            .all(|p| session_of(&p.request) == Some(session) && p.status == 202),
        "all in one session: {patches:?}"
    );
    let status: Vec<_> = on_sessions(&log, "GET");
    assert_eq!(status.len(), 1, "one status request: {status:?}");
    assert_eq!(status[0].status, 204);
    assert!(on_sessions(&log, "DELETE").is_empty());
    let commits: Vec<_> = on_sessions(&log, "PUT")
        .into_iter()
        .filter(|p| session_of(&p.request) == Some(session))
        .collect();
    assert_eq!(commits.len(), 1);
    assert!(commits[0].request.contains(&layer.0.replace(':', "%3A")));
    // The source was read once from the start and once from the destination's offset.
    let layer_gets: Vec<_> = src
        .responses()
        .into_iter()
        .filter(|a| a.request.starts_with("GET") && a.request.ends_with(&layer.0))
        .collect();
    assert_eq!(layer_gets.len(), 2, "{layer_gets:?}");
    assert_eq!(layer_gets[1].status, 206);
    assert_eq!(layer_gets[1].bytes, 32 * MIB, "Range GET from 32 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_patch_answer_cannot_resume_on_distribution_so_a_new_session_finishes() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let (digest, size) = Seeder::new(src.host())
        .push_blob_stream("big", 24 * MIB, 32)
        .await;
    let proxy = FaultProxy::start(dst.host()).await;
    // PATCH 2 lands whole; its answer (with the new signed offset) never comes back.
    proxy.faults.lose_patch_answer.store(2, Ordering::SeqCst);
    let outcome = copy_verified(src.host(), proxy.host(), &dst, &digest, size).await;
    assert_eq!(
        outcome,
        BlobOutcome::Copied {
            bytes_sent: 16 * MIB + size
        }
    );
    let log = dst.responses();
    // Asking the old location where the session stands is refused: its signed offset (8 MiB)
    // is not what the session holds (16 MiB).
    let status = on_sessions(&log, "GET");
    assert_eq!(status.len(), 1, "{status:?}");
    assert_eq!(status[0].status, 404);
    let patches = on_sessions(&log, "PATCH");
    let first = session_of(&patches[0].request).unwrap();
    let (old, new): (Vec<&Answered>, Vec<&Answered>) = patches
        .iter()
        .copied()
        .partition(|p| session_of(&p.request) == Some(first));
    assert_eq!((old.len(), new.len()), (2, 3), "{patches:?}");
    assert_eq!(
        proxy.faults.upload_bytes_forwarded.load(Ordering::SeqCst),
        16 * MIB + size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_reset_inside_a_chunk_is_healed_inside_the_chunk() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let (digest, size) = Seeder::new(src.host())
        .push_blob_stream("big", 24 * MIB, 33)
        .await;
    let proxy = FaultProxy::start(src.host()).await;
    // The first GET and the first reconnection are each cut after 8 KiB.
    proxy.faults.reset_blob_gets.store(2, Ordering::SeqCst);
    let outcome = copy_verified(proxy.host(), dst.host(), &dst, &digest, size).await;
    // Nothing was sent twice: the chunk in flight went on with bytes from a Range GET.
    assert_eq!(outcome, BlobOutcome::Copied { bytes_sent: size });
    assert_eq!(proxy.faults.reset_blob_gets.load(Ordering::SeqCst), 0);
    let gets: Vec<_> = src
        .responses()
        .into_iter()
        .filter(|a| a.request.starts_with("GET") && a.request.ends_with(&digest))
        .collect();
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert!(gets[1..].iter().all(|g| g.status == 206), "{gets:?}");
    let log = dst.responses();
    assert_eq!(on_sessions(&log, "PATCH").len(), 3);
    assert!(on_sessions(&log, "GET").is_empty(), "no resume was needed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_vanished_is_replaced_not_fatal() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let (digest, size) = Seeder::new(src.host())
        .push_blob_stream("big", 24 * MIB, 35)
        .await;
    let proxy = FaultProxy::start(dst.host()).await;
    proxy.faults.gone_patch.store(2, Ordering::SeqCst);
    // A lost session is retried in a new one.
    let outcome = copy_verified(src.host(), proxy.host(), &dst, &digest, size).await;
    assert_eq!(
        outcome,
        BlobOutcome::Copied {
            bytes_sent: 16 * MIB + size
        }
    );
    let log = dst.responses();
    let sessions: std::collections::BTreeSet<_> = on_sessions(&log, "PATCH")
        .iter()
        .filter_map(|p| session_of(&p.request))
        .collect();
    assert_eq!(sessions.len(), 2, "{log:?}");
    // The first session took chunk 1; chunk 2 was refused whole; the second took them all.
    assert_eq!(
        proxy.faults.upload_bytes_forwarded.load(Ordering::SeqCst),
        8 * MIB + size
    );
    assert_eq!(
        proxy.faults.upload_bytes_dropped.load(Ordering::SeqCst),
        8 * MIB
    );
    // The abandoned session was given back (the registry had never seen the failed PATCH).
    let deletes = on_sessions(&log, "DELETE");
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].status, 204);
}

/// Waits for `check` to hold, up to `limit`.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_every_watcher_left_deletes_its_upload_session() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let (digest, size) = Seeder::new(src.host())
        .push_blob_stream("big", 20 * MIB, 34)
        .await;
    let proxy = FaultProxy::start(src.host()).await;
    proxy.faults.hold_blob_gets.store(true, Ordering::SeqCst);
    // One PUT upload (threshold above the size) and one chunked upload.
    for (threshold, repo) in [(64 * MIB, "put"), (16 * MIB, "chunked")] {
        let engine = Engine::new(EngineConfig {
            chunked_threshold: threshold,
            chunk_size: 8 * MIB,
            ..EngineConfig::default()
        });
        let mut req = request(proxy.host(), dst.host(), &digest, size);
        req.destination_repo = repo.into();
        let held_before = proxy.faults.held_gets.load(Ordering::SeqCst);
        let progress = no_progress();
        // Boxed, so that dropping it below really drops the future.
        let mut copy = Box::pin(engine.copy_blob(req, &progress));
        // The session is open and the source GET hangs in the proxy: the transfer is mid-way.
        let faults = proxy.faults.clone();
        let started = tokio::select! {
            r = &mut copy => panic!("{repo}: finished while its source was held: {r:?}"),
            started = eventually(Duration::from_secs(20), || {
                faults.held_gets.load(Ordering::SeqCst) > held_before
            }) => started,
        };
        assert!(started, "{repo}: the source GET never started");
        // The only watcher leaves; the transfer is aborted and must give its session back.
        drop(copy);
        let deleted = format!("DELETE /v2/{repo}/blobs/uploads/");
        let found = eventually(Duration::from_secs(10), || {
            dst.requests().iter().any(|r| r.starts_with(&deleted))
        })
        .await;
        assert!(
            found,
            "{repo}: no DELETE of the session: {:?}",
            dst.requests()
        );
        let delete = dst
            .responses()
            .into_iter()
            .find(|a| a.request.starts_with(&deleted))
            .unwrap();
        assert_eq!(delete.status, 204, "{repo}: {delete:?}");
        // The session is gone, not merely refused.
        let location = delete.request.trim_start_matches("DELETE ");
        let resp = reqwest::get(format!("http://{}{location}", dst.host()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let body = resp.text().await.unwrap();
        assert!(body.contains("BLOB_UPLOAD_UNKNOWN"), "{repo}: {body}");
    }
}

/// The other half of the seeds' rule: a transfer that two watchers share goes on when one of
/// them leaves (a deleted mirror cancels only what it alone was waiting for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_transfer_goes_on_when_one_of_its_watchers_leaves() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let (digest, size) = Seeder::new(src.host())
        .push_blob_stream("big", 4 * MIB, 35)
        .await;
    let proxy = FaultProxy::start(src.host()).await;
    proxy.faults.hold_blob_gets.store(true, Ordering::SeqCst);
    // A held GET is abandoned and retried after the window, once the hold is lifted.
    let engine = Engine::new(EngineConfig {
        stall: Some(StallWatchdog {
            window: Duration::from_secs(5),
            min_bytes: 1,
        }),
        ..EngineConfig::default()
    });
    let req = || request(proxy.host(), dst.host(), &digest, size);
    let progress = no_progress();
    let faults = proxy.faults.clone();
    let held = || faults.held_gets.load(Ordering::SeqCst);
    let mut first = Box::pin(engine.copy_blob(req(), &progress));
    let started = tokio::select! {
        r = &mut first => panic!("finished while its source was held: {r:?}"),
        started = eventually(Duration::from_secs(20), || held() == 1) => started,
    };
    assert!(started, "the source GET never started");
    let mut second = Box::pin(engine.copy_blob(req(), &progress));
    tokio::select! {
        r = &mut second => panic!("finished while its source was held: {r:?}"),
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    assert_eq!(
        held(),
        1,
        "the second watcher started a transfer of its own"
    );
    // The first watcher leaves; the transfer goes on for the second.
    drop(first);
    faults.hold_blob_gets.store(false, Ordering::SeqCst);
    let outcome = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the shared transfer finished within 60 s");
    assert!(outcome.is_ok(), "{outcome:?}");
    Seeder::new(dst.host())
        .assert_blob("big", &digest, size)
        .await;
    assert!(
        !dst.requests()
            .iter()
            .any(|r| r.starts_with("DELETE /v2/big/blobs/uploads/")),
        "the shared transfer was aborted: {:?}",
        dst.requests()
    );
}
