//! Hostile and flaky registries: rate limiting on both sides, corrupting and trickling sources,
//! a registry double that answers with absurd numbers, giant bodies, endless lists and URLs to
//! another origin, a destination that loses blobs, and a soak with rotating credentials.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::image::Pushed;
use crate::support::proxy::FaultProxy;
use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc};

mod endpoint;
mod soak;
mod throttled;

/// Four repositories of two tags each on `src` (tags `a` and `b` of `app-{i}`), every image
/// with its own layers of the given sizes; returns the images by (repo, tag).
async fn eight_tags(src: &str, layers: &[usize]) -> Vec<(String, String, Pushed)> {
    let pushes = (0..8u64).map(|n| async move {
        let s = Seeder::new(src);
        let (i, tag) = (n / 2, ["a", "b"][n as usize % 2]);
        let repo = format!("app-{i}");
        let seed = 500 + i * 10 + n % 2;
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "seed": seed});
        let config = s.push_blob(&repo, config.to_string().as_bytes()).await;
        // Streamed layers: the seeded RNG of a debug build takes seconds per megabyte.
        let mut blobs = Vec::new();
        for (k, size) in layers.iter().enumerate() {
            blobs.push(
                s.push_blob_stream(&repo, *size as u64, seed * 1000 + k as u64)
                    .await,
            );
        }
        let image = s
            .push_manifest_for(&repo, Some(tag), config, blobs, Flavor::Oci)
            .await;
        (repo, tag.to_string(), image)
    });
    futures_util::future::join_all(pushes).await
}

/// The documents mirroring the eight tags from `src` to `dst` (`app-{i}` to `mirror/app-{i}`).
fn eight_docs(src: &str, dst: &str) -> String {
    (0..4)
        .map(|i| {
            mirror_doc(
                &format!("app-{i}"),
                src,
                &format!("app-{i}"),
                dst,
                &format!("mirror/app-{i}"),
                "  tags:\n    names: [a, b]\n",
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Runs the mirror and checks every tag was copied; returns how long it took.
async fn copy_all(
    dir: &std::path::Path,
    docs: &str,
    dst: &TestRegistry,
    images: &[(String, String, Pushed)],
) -> Duration {
    let start = Instant::now();
    let (code, stdout, stderr) = mirror_cli(dir, docs, &["--output", "json"]);
    let took = start.elapsed();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    if std::env::var("IMAGEMIRROR_TEST_LOG_LEVEL").is_ok() {
        std::fs::write(dir.join(format!("log-{}.txt", took.as_millis())), &stderr).unwrap();
        eprintln!("log: {}", dir.display());
    }
    let d = Seeder::new(dst.host());
    for (repo, tag, image) in images {
        d.assert_copy_of(&format!("mirror/{repo}"), tag, image)
            .await;
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_corrupted_source_blobs_are_fetched_again_and_every_tag_copies() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let images = eight_tags(src.host(), &[200_000, 100_000, 30_000]).await;
    let proxy = FaultProxy::start(src.host()).await;
    proxy.faults.corrupt_percent.store(30, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    copy_all(
        dir.path(),
        &eight_docs(proxy.host(), dst.host()),
        &dst,
        &images,
    )
    .await;
    // assert_copy_of checked every blob at the destination against its digest: nothing
    // unverified landed, and the corruption did happen.
    let corrupted = proxy.faults.corrupted_sent.load(Ordering::SeqCst);
    println!("{corrupted} corrupted blob GETs healed by re-fetching");
    assert!(corrupted > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_source_is_abandoned_by_the_watchdog_while_another_copy_finishes() {
    let (slow_src, dst) = (TestRegistry::start(), TestRegistry::start());
    let (src2, dst2) = (TestRegistry::start(), TestRegistry::start());
    Seeder::new(slow_src.host())
        .push_image("slow", Some("v1"), 61, &[50_000], Flavor::Oci)
        .await;
    let image = Seeder::new(src2.host())
        .push_image("fast", Some("v1"), 62, &[2 << 20, 300_000], Flavor::Oci)
        .await;
    let proxy = FaultProxy::start(slow_src.host()).await;
    proxy.faults.trickle_blob_gets.store(true, Ordering::SeqCst);
    let docs = [
        mirror_doc(
            "slow",
            proxy.host(),
            "slow",
            dst.host(),
            "slow",
            "  tags:\n    names: [v1]\n",
        ),
        mirror_doc(
            "fast",
            src2.host(),
            "fast",
            dst2.host(),
            "fast",
            "  tags:\n    names: [v1]\n",
        ),
    ]
    .join("---\n");
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    // A short window so the test is quick; the default is 1 KiB per 60 s. One global slot, so
    // a transfer held forever would also hold the other copy.
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &docs,
        &[
            "--output",
            "json",
            "--stall-window",
            "2s",
            "--concurrency",
            "1",
        ],
    );
    let took = start.elapsed();
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let row = |m: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["mirror"] == format!("test/{m}"))
            .cloned()
            .unwrap_or_else(|| panic!("no row for {m}: {stdout}\n{stderr}"))
    };
    assert_eq!(row("fast")["state"], "Copied", "{rows}");
    let slow = row("slow");
    assert_eq!(slow["reason"], "Stalled", "{rows}");
    assert!(slow["message"].to_string().contains("sha256:"), "{rows}");
    Seeder::new(dst2.host())
        .assert_copy_of("fast", "v1", &image)
        .await;
    assert!(
        Seeder::new(dst.host())
            .get_manifest("slow", "v1")
            .await
            .is_none(),
        "no tag for content that never arrived"
    );
    // The trickle alone would take 50 000 × 10 s; five watched attempts take seconds.
    println!("trickling source abandoned after {took:?}");
    assert!(took < Duration::from_secs(120), "{took:?}");
}

/// Copies `spec` in-process on `engine` (one Engine for every sync, like the controller).
async fn sync_in_process(
    engine: &imagemirror::transfer::Engine,
    pool: &imagemirror::mirror::ClientPool,
    doc: &str,
    access: imagemirror::mirror::EndpointAccess,
) -> imagemirror::mirror::SyncReport {
    let mirror: imagemirror::api::ImageMirror = serde_yaml::from_str(doc).unwrap();
    let spec = mirror.spec;
    let source = pool
        .endpoint("source", &spec.source, access.clone())
        .unwrap();
    let destination = pool
        .endpoint("destination", &spec.destination, access)
        .unwrap();
    imagemirror::mirror::sync(
        engine,
        &spec,
        source,
        destination,
        4,
        imagemirror::transfer::no_progress(),
        Default::default(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_the_destination_lost_to_garbage_collection_is_uploaded_again() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let image = Seeder::new(src.host())
        .push_image("app", Some("v1"), 71, &[120_000, 40_000], Flavor::Oci)
        .await;
    let doc = crate::support::app_v1_doc(src.host(), dst.host());
    let engine = imagemirror::transfer::Engine::new(Default::default());
    let pool = imagemirror::mirror::ClientPool::new();
    let first = sync_in_process(&engine, &pool, &doc, Default::default()).await;
    assert!(first.items[0].result.is_ok(), "{:?}", first.items[0].result);
    let d = Seeder::new(dst.host());
    d.assert_copy_of("app", "v1", &image).await;
    // The destination forgets the image: its manifest is deleted and its blobs collected.
    let http = reqwest::Client::new();
    let deleted = http
        .delete(format!(
            "http://{}/v2/app/manifests/{}",
            dst.host(),
            image.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    dst.garbage_collect();
    let (layer, _) = &image.blobs[1];
    let head = http
        .head(format!("http://{}/v2/app/blobs/{layer}", dst.host()))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404, "garbage collection removed the layer");
    // The engine still believes the blobs are there; the destination's refusal of the
    // manifest corrects it, and the same sync uploads them again.
    let before = dst.requests().len();
    let second = sync_in_process(&engine, &pool, &doc, Default::default()).await;
    assert!(
        second.items[0].result.is_ok(),
        "{:?}",
        second.items[0].result
    );
    d.assert_copy_of("app", "v1", &image).await;
    let uploads = dst.requests()[before..]
        .iter()
        .filter(|r| r.starts_with("PUT ") && r.contains("/blobs/uploads/"))
        .count();
    assert_eq!(
        uploads,
        image.blobs.len(),
        "every collected blob went up again"
    );
}
