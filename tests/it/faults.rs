//! The engine against a fault-injecting proxy in front of a real source registry.

use std::sync::atomic::Ordering;

use crate::support::proxy::FaultProxy;
use crate::support::{
    Flavor, Seeder, SharedBase, TestRegistry, app_v1_doc, apps_sharing_a_base, mirror_cli,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_5xx_bursts_and_429s_are_retried_and_every_digest_verifies() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let image = Seeder::new(src.host())
        .push_image(
            "app",
            Some("v1"),
            21,
            &[200_000, 150_000, 90_000],
            Flavor::Oci,
        )
        .await;
    let proxy = FaultProxy::start(src.host()).await;
    proxy.faults.unavailable.store(2, Ordering::SeqCst);
    proxy.faults.rate_limited.store(1, Ordering::SeqCst);
    proxy.faults.reset_blob_gets.store(3, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let doc = app_v1_doc(proxy.host(), dst.host());
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // Every injected fault fired, and the copy still verifies byte for byte.
    assert_eq!(proxy.faults.unavailable.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.faults.rate_limited.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.faults.reset_blob_gets.load(Ordering::SeqCst), 0);
    Seeder::new(dst.host())
        .assert_copy_of("app", "v1", &image)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_source_gives_digest_mismatch_naming_the_blob_and_no_tag() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let image = Seeder::new(src.host())
        .push_image("app", Some("v1"), 22, &[120_000], Flavor::Docker)
        .await;
    let proxy = FaultProxy::start(src.host()).await;
    proxy.faults.corrupt_blobs.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let doc = app_v1_doc(proxy.host(), dst.host());
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--output", "json"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["reason"], "DigestMismatch", "{row}");
    let message = row["message"].as_str().unwrap();
    assert!(
        image
            .blobs
            .iter()
            .any(|(d, _)| message.contains(d.as_str())),
        "the message must name the blob that lied: {message}"
    );
    let d = Seeder::new(dst.host());
    assert!(
        d.get_manifest("app", "v1").await.is_none(),
        "the tag must not be written"
    );
    let layer = &image.blobs[1];
    let head = reqwest::Client::new()
        .head(format!("http://{}/v2/app/blobs/{}", dst.host(), layer.0))
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.status(),
        404,
        "corrupted content must not land at the destination"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_mib_manifest_is_refused() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    Seeder::new(src.host())
        .push_image("app", Some("v1"), 23, &[1000], Flavor::Oci)
        .await;
    let proxy = FaultProxy::start(src.host()).await;
    proxy.faults.giant_manifests.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let doc = app_v1_doc(proxy.host(), dst.host());
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--output", "json"]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows[0]["reason"], "ManifestTooLarge", "{stdout}");
    assert!(
        Seeder::new(dst.host())
            .get_manifest("app", "v1")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_will_not_mount_gets_the_layer_uploaded_instead() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let base = crate::support::image::random_bytes(77, 300_000);
    let proxy = FaultProxy::start(dst.host()).await;
    proxy.faults.refuse_mounts.store(true, Ordering::SeqCst);
    let SharedBase {
        docs,
        images,
        base_digest,
    } = apps_sharing_a_base(src.host(), proxy.host(), 3, &base).await;
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = mirror_cli(dir.path(), &docs.join("---\n"), &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let d = Seeder::new(dst.host());
    for (i, image) in images.iter().enumerate() {
        d.assert_copy_of(&format!("dst/app-{i}"), "v1", image).await;
    }
    // Two mounts were tried and refused: their sessions were given back, and the layer was
    // read from the source for every repository.
    let log = dst.requests();
    let cancelled = log
        .iter()
        .filter(|r| r.starts_with("DELETE ") && r.contains("/blobs/uploads/"))
        .count();
    assert_eq!(cancelled, 2, "{log:#?}");
    let base_gets = src
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && r.ends_with(&format!("/blobs/{base_digest}")))
        .count();
    assert_eq!(base_gets, 3);
}
