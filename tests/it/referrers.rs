//! Signatures, attestations and SBOMs travel with the image (`spec.referrers`): real
//! distribution 2.8 has no referrers API, so the referrers tag schema (`sha256-<hex>`) and
//! cosign's tags are used for real; the API itself is tested against the proxy's emulation.

use crate::support::artifacts::{
    Artifact, IN_TOTO, NOTATION, SPDX, attach, cosign_signature, fallback_tag, listed_digests,
    push_fallback_index,
};
use std::sync::atomic::Ordering;

use crate::support::image::Pushed;
use crate::support::proxy::FaultProxy;
use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc, set, tag_set};

/// An image with everything real tools attach to it.
struct Attached {
    image: Pushed,
    /// cosign signature, under `sig_tag`.
    sig: Pushed,
    sig_tag: String,
    /// Direct referrers of the image, listed in its fallback index.
    sbom: Artifact,
    attestation: Artifact,
    /// A signature whose subject is the SBOM, listed in the SBOM's fallback index.
    sbom_sig: Artifact,
}

async fn seed_attached(host: &str, repo: &str) -> Attached {
    let s = Seeder::new(host);
    let image = s
        .push_image(repo, Some("v1"), 41, &[20_000], Flavor::Oci)
        .await;
    let (sig, sig_tag) = cosign_signature(&s, repo, &format!("{host}/{repo}"), &image).await;
    let sbom = attach(&s, repo, &image, SPDX, br#"{"spdxVersion":"SPDX-2.3"}"#).await;
    let attestation = attach(&s, repo, &image, IN_TOTO, br#"{"_type":"in-toto"}"#).await;
    let sbom_sig = attach(&s, repo, &sbom.pushed, NOTATION, b"notation signature").await;
    push_fallback_index(&s, repo, &image.digest, &[&sbom, &attestation]).await;
    push_fallback_index(&s, repo, &sbom.pushed.digest, &[&sbom_sig]).await;
    Attached {
        image,
        sig,
        sig_tag,
        sbom,
        attestation,
        sbom_sig,
    }
}

fn doc(src: &str, dst: &str, referrers: &str) -> String {
    mirror_doc(
        "app",
        src,
        "app",
        dst,
        "app",
        &format!("  tags:\n    names: [v1]\n{referrers}"),
    )
}

const ALL: &str = "  referrers:\n    enabled: true\n";

/// Runs the CLI with JSON output; the rows.
fn mirror_json(dir: &std::path::Path, doc: &str) -> Vec<serde_json::Value> {
    let (code, stdout, stderr) = mirror_cli(dir, doc, &["--output", "json"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    serde_json::from_str::<serde_json::Value>(&stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn manifest_writes(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|r| r.starts_with("PUT ") && r.contains("/manifests/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_attestations_and_sboms_travel_byte_identical_through_the_tag_schema() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let a = seed_attached(src.host(), "app").await;
    let dir = tempfile::tempdir().unwrap();
    let rows = mirror_json(dir.path(), &doc(src.host(), dst.host(), ALL));
    assert_eq!(rows[0]["state"], "Copied", "{rows:?}");
    // SBOM, attestation, the signature on the SBOM, and the cosign signature.
    assert_eq!(rows[0]["referrers"], 4, "{rows:?}");

    let d = Seeder::new(dst.host());
    d.assert_copy_of("app", "v1", &a.image).await;
    d.assert_copy_of("app", &a.sig_tag, &a.sig).await;
    for art in [&a.sbom, &a.attestation, &a.sbom_sig] {
        d.assert_copy_of("app", &art.pushed.digest, &art.pushed)
            .await;
    }
    let (_, index) = d
        .get_manifest("app", &fallback_tag(&a.image.digest))
        .await
        .expect("the destination has the image's fallback index");
    let mut listed = listed_digests(&index);
    listed.sort();
    let mut direct = vec![
        a.sbom.pushed.digest.clone(),
        a.attestation.pushed.digest.clone(),
    ];
    direct.sort();
    assert_eq!(listed, direct, "both direct referrers are listed");
    let (_, index) = d
        .get_manifest("app", &fallback_tag(&a.sbom.pushed.digest))
        .await
        .expect("the destination has the SBOM's fallback index");
    assert_eq!(
        listed_digests(&index),
        vec![a.sbom_sig.pushed.digest.clone()]
    );

    // The signature's payload names the digest the destination tag resolves to.
    let (_, v1) = d.get_manifest("app", "v1").await.unwrap();
    let v1_digest = imagemirror::registry::digest::sha256_digest(&v1);
    let sig: serde_json::Value = serde_json::from_slice(&a.sig.bytes).unwrap();
    let payload_digest = sig["layers"][0]["digest"].as_str().unwrap();
    let payload = reqwest::get(format!(
        "http://{}/v2/app/blobs/{payload_digest}",
        dst.host()
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        v1_digest.as_str()
    );

    // A resync with nothing new writes nothing and costs at most one more request per
    // manifest on each side than a resync without referrers (5 manifests here: the image,
    // the cosign signature, the SBOM, the attestation and the signature on the SBOM).
    let count = |doc: &str| {
        let (s0, d0) = (src.requests().len(), dst.requests().len());
        let rows = mirror_json(dir.path(), doc);
        assert_eq!(rows[0]["state"], "UpToDate", "{rows:?}");
        let (s, d) = (src.requests()[s0..].to_vec(), dst.requests()[d0..].to_vec());
        assert!(
            manifest_writes(&d).is_empty(),
            "a no-op resync wrote: {d:?}"
        );
        (rows, s, d)
    };
    let (_, src_plain, dst_plain) = count(&doc(src.host(), dst.host(), ""));
    let (rows, src_refs, dst_refs) = count(&doc(src.host(), dst.host(), ALL));
    assert_eq!(rows[0]["referrers"], 4, "{rows:?}");
    eprintln!(
        "no-op resync requests: source {} without referrers, {} with; destination {} without, {} with\nsource: {src_refs:?}\ndestination: {dst_refs:?}",
        src_plain.len(),
        src_refs.len(),
        dst_plain.len(),
        dst_refs.len()
    );
    let manifests = 5;
    assert!(
        src_refs.len() <= src_plain.len() + manifests,
        "source: {src_plain:?} vs {src_refs:?}"
    );
    assert!(
        dst_refs.len() <= dst_plain.len() + manifests,
        "destination: {dst_plain:?} vs {dst_refs:?}"
    );
    assert!(
        !dst_refs.iter().any(|r| r.contains("/blobs/")),
        "nothing re-copied: {dst_refs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_type_filter_copies_only_the_sbom() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let a = seed_attached(src.host(), "app").await;
    let dir = tempfile::tempdir().unwrap();
    let only_sbom = format!("  referrers:\n    enabled: true\n    artifactTypes: [{SPDX}]\n");
    let rows = mirror_json(dir.path(), &doc(src.host(), dst.host(), &only_sbom));
    assert_eq!(rows[0]["referrers"], 1, "{rows:?}");
    let d = Seeder::new(dst.host());
    d.assert_copy_of("app", &a.sbom.pushed.digest, &a.sbom.pushed)
        .await;
    for absent in [
        &a.attestation.pushed.digest,
        &a.sbom_sig.pushed.digest,
        &a.sig_tag,
        &fallback_tag(&a.sbom.pushed.digest),
    ] {
        assert!(
            d.get_manifest("app", absent).await.is_none(),
            "{absent} must not be copied"
        );
    }
    let (_, index) = d
        .get_manifest("app", &fallback_tag(&a.image.digest))
        .await
        .unwrap();
    assert_eq!(listed_digests(&index), vec![a.sbom.pushed.digest.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_referrer_in_the_destination_index_is_kept() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let a = seed_attached(src.host(), "app").await;
    // Someone else signed the image at the destination and listed their signature there.
    let d = Seeder::new(dst.host());
    let foreign = attach(&d, "app", &a.image, NOTATION, b"someone else's signature").await;
    let before = push_fallback_index(&d, "app", &a.image.digest, &[&foreign]).await;
    let dir = tempfile::tempdir().unwrap();
    mirror_json(dir.path(), &doc(src.host(), dst.host(), ALL));
    let (_, index) = d
        .get_manifest("app", &fallback_tag(&a.image.digest))
        .await
        .unwrap();
    let listed = listed_digests(&index);
    assert_eq!(
        listed,
        [
            foreign.pushed.digest.clone(),
            a.sbom.pushed.digest.clone(),
            a.attestation.pushed.digest.clone()
        ]
    );
    // The foreign entry is kept as its owner wrote it.
    let entry = |bytes: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(bytes).unwrap()["manifests"][0].clone()
    };
    assert_eq!(entry(&index), entry(&before));
    d.assert_copy_of("app", &foreign.pushed.digest, &foreign.pushed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_referrers_api_is_used_where_served_as_emulated_by_the_proxy() {
    // No registry serving the referrers API can be installed here: the proxies EMULATE it in
    // front of distribution 2.8, answering `/v2/<name>/referrers/<digest>` from their own
    // record of the manifests pushed through them with a `subject`, and answering those pushes
    // with `OCI-Subject`.
    let (src, dst, dst2) = (
        TestRegistry::start(),
        TestRegistry::start(),
        TestRegistry::start(),
    );
    let sp = FaultProxy::start(src.host()).await;
    let dp = FaultProxy::start(dst.host()).await;
    let dp2 = FaultProxy::start(dst2.host()).await;
    for p in [&sp, &dp, &dp2] {
        p.faults.referrers_api.enabled.store(true, Ordering::SeqCst);
    }
    let s = Seeder::new(sp.host());
    let image = s
        .push_image("app", Some("v1"), 43, &[10_000], Flavor::Oci)
        .await;
    let sbom = attach(&s, "app", &image, SPDX, br#"{"spdxVersion":"SPDX-2.3"}"#).await;
    let attestation = attach(&s, "app", &image, IN_TOTO, br#"{"_type":"in-toto"}"#).await;
    let sbom_sig = attach(&s, "app", &sbom.pushed, NOTATION, b"notation signature").await;
    // Only the API knows them: the source has no fallback tags.
    assert!(tag_set(src.host(), "app").await.iter().all(|t| t == "v1"));

    let dir = tempfile::tempdir().unwrap();
    let rows = mirror_json(dir.path(), &doc(sp.host(), dp.host(), ALL));
    assert_eq!(rows[0]["referrers"], 3, "{rows:?}");
    let d = Seeder::new(dst.host());
    for art in [&sbom, &attestation, &sbom_sig] {
        d.assert_copy_of("app", &art.pushed.digest, &art.pushed)
            .await;
    }
    let mut listed = dp.faults.referrers_api.listed("app", &image.digest);
    listed.sort();
    let mut direct = vec![
        sbom.pushed.digest.clone(),
        attestation.pushed.digest.clone(),
    ];
    direct.sort();
    assert_eq!(
        listed, direct,
        "the destination indexed both direct referrers"
    );
    assert_eq!(
        dp.faults.referrers_api.listed("app", &sbom.pushed.digest),
        vec![sbom_sig.pushed.digest.clone()]
    );
    // The destination answered OCI-Subject: no fallback tag was written there, and the source
    // was asked through the API, never for a fallback tag.
    assert_eq!(tag_set(dst.host(), "app").await, set(&["v1"]));
    assert!(
        !src.requests()
            .iter()
            .any(|r| r.contains("/manifests/sha256-")),
        "{:?}",
        src.requests()
    );

    // With one artifact type asked for, the registry filters (OCI-Filters-Applied).
    let only_sbom = format!("  referrers:\n    enabled: true\n    artifactTypes: [{SPDX}]\n");
    let rows = mirror_json(dir.path(), &doc(sp.host(), dp2.host(), &only_sbom));
    assert_eq!(rows[0]["referrers"], 1, "{rows:?}");
    assert_eq!(
        dp2.faults.referrers_api.listed("app", &image.digest),
        vec![sbom.pushed.digest.clone()]
    );
    // A resync with nothing new: one referrers API request per manifest on the source (the
    // image and its three referrers), one per manifest with referrers on the destination (the
    // image and the SBOM), and no manifest written.
    let answered = |p: &FaultProxy| p.faults.referrers_api.answered.lock().unwrap().len();
    let (s0, d0, dl0) = (answered(&sp), answered(&dp), dst.requests().len());
    let rows = mirror_json(dir.path(), &doc(sp.host(), dp.host(), ALL));
    assert_eq!(rows[0]["state"], "UpToDate", "{rows:?}");
    assert_eq!(rows[0]["referrers"], 3, "{rows:?}");
    let (src_api, dst_api) = (answered(&sp) - s0, answered(&dp) - d0);
    let dst_log = dst.requests()[dl0..].to_vec();
    eprintln!(
        "no-op resync through the emulated API: source {src_api} referrers requests, destination {dst_api}; destination registry {dst_log:?}"
    );
    assert!(src_api <= 4 && dst_api <= 4, "{src_api} {dst_api}");
    assert!(manifest_writes(&dst_log).is_empty(), "{dst_log:?}");

    let asked = sp.faults.referrers_api.answered.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|q| q.contains(&image.digest)
                && q.contains("artifactType=application%2Fspdx%2Bjson")),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referrer_that_cannot_be_copied_fails_the_tag_naming_its_digest_and_type() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let image = s
        .push_image("app", Some("v1"), 44, &[5_000], Flavor::Oci)
        .await;
    let attestation = attach(&s, "app", &image, IN_TOTO, b"{}").await;
    let missing = attach(&s, "app", &image, SPDX, br#"{"spdxVersion":"SPDX-2.3"}"#).await;
    push_fallback_index(&s, "app", &image.digest, &[&attestation, &missing]).await;
    // The index lists a referrer the source no longer has (deleted after it was listed).
    let deleted = reqwest::Client::new()
        .delete(format!(
            "http://{}/v2/app/manifests/{}",
            src.host(),
            missing.pushed.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &doc(src.host(), dst.host(), ALL),
        &["--output", "json"],
    );
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["state"], "Failed", "{row}");
    assert_eq!(row["reason"], "ReferrerFailed", "{row}");
    let message = row["message"].as_str().unwrap();
    assert!(
        message.contains(&missing.pushed.digest) && message.contains(SPDX),
        "{message}"
    );
    // Referrers go before the tag: the tag was not moved onto an image whose referrers did not
    // all arrive.
    assert!(
        Seeder::new(dst.host())
            .get_manifest("app", "v1")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_platforms_filtered_the_kept_children_keep_their_signatures_and_the_index_loses_its() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let (index, children) = s
        .push_index(
            "app",
            "v1",
            45,
            &["linux/amd64", "linux/arm64"],
            Flavor::Oci,
        )
        .await;
    let reference = format!("{}/app", src.host());
    let (_, index_sig) = cosign_signature(&s, "app", &reference, &index).await;
    let (amd64_sig, amd64_sig_tag) = cosign_signature(&s, "app", &reference, &children[0]).await;
    let (_, arm64_sig) = cosign_signature(&s, "app", &reference, &children[1]).await;
    // A pinned digest brings its referrers too.
    let (pinned, _) = s
        .push_index("app", "other", 46, &["linux/amd64"], Flavor::Oci)
        .await;
    let pinned_sbom = attach(&s, "app", &pinned, SPDX, b"{}").await;
    push_fallback_index(&s, "app", &pinned.digest, &[&pinned_sbom]).await;

    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "  tags:\n    names: [v1]\n  digests: [\"{}\"]\n  platforms: [linux/amd64]\n{ALL}",
        pinned.digest
    );
    let rows = mirror_json(
        dir.path(),
        &mirror_doc("app", src.host(), "app", dst.host(), "app", &spec),
    );
    let v1 = rows.iter().find(|r| r["item"] == "v1").unwrap();
    assert_eq!(v1["referrers"], 1, "{v1}");
    let note = v1["message"].as_str().unwrap_or_default();
    assert!(
        note.contains("do not apply") && note.contains(&index.digest),
        "the status message says the index's signatures stay behind: {v1}"
    );
    let d = Seeder::new(dst.host());
    d.assert_copy_of("app", &amd64_sig_tag, &amd64_sig).await;
    for absent in [&index_sig, &arm64_sig] {
        assert!(d.get_manifest("app", absent).await.is_none(), "{absent}");
    }
    let pinned_row = rows.iter().find(|r| r["item"] == pinned.digest).unwrap();
    assert_eq!(pinned_row["referrers"], 1, "{pinned_row}");
    d.assert_copy_of("app", &pinned_sbom.pushed.digest, &pinned_sbom.pushed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reports_referrer_counts_and_referrer_failures_on_status() {
    use crate::support::controller::{Fixture, Running, config};
    use crate::support::kube_api::TestCluster;
    use imagemirror::api::TagState;

    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    seed_attached(src.host(), "app").await;
    // "broken": its fallback index lists a referrer the source no longer has.
    let s = Seeder::new(src.host());
    let image = s
        .push_image("broken", Some("v1"), 47, &[5_000], Flavor::Oci)
        .await;
    let gone = attach(&s, "broken", &image, SPDX, b"{}").await;
    push_fallback_index(&s, "broken", &image.digest, &[&gone]).await;
    let deleted = reqwest::Client::new()
        .delete(format!(
            "http://{}/v2/broken/manifests/{}",
            src.host(),
            gone.pushed.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);

    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("refs").await;
    let running = Running::start(cluster.client(), config(&ns));
    for repo in ["app", "broken"] {
        let (from, to) = (
            format!("{}/{repo}", src.host()),
            format!("{}/{repo}", dst.host()),
        );
        Fixture::new(&ns, repo, &from, &to)
            .tags(&["v1"])
            .with(|s| s.referrers.enabled = true)
            .apply(&cluster.client())
            .await;
    }
    let wait = std::time::Duration::from_secs(90);
    let synced = |m: &imagemirror::api::ImageMirror| {
        m.status
            .as_ref()
            .is_some_and(|s| s.observed_generation.is_some() && s.tags.len() == 1)
    };
    let app = cluster.wait_for(&ns, "app", wait, synced).await;
    let tag = &app.status.as_ref().unwrap().tags[0];
    assert_eq!(tag.state, TagState::Synced, "{tag:?}");
    assert_eq!(tag.referrers, Some(4), "{tag:?}");

    let broken = cluster.wait_for(&ns, "broken", wait, synced).await;
    let tag = &broken.status.as_ref().unwrap().tags[0];
    assert_eq!(tag.state, TagState::Failed, "{tag:?}");
    assert_eq!(tag.reason.as_deref(), Some("ReferrerFailed"), "{tag:?}");
    let message = tag.message.as_deref().unwrap_or_default();
    assert!(
        message.contains(&gone.pushed.digest) && message.contains(SPDX),
        "{message}"
    );
    running.stop().await;
    cluster.delete_namespace(&ns).await;
}
