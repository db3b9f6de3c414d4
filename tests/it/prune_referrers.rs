//! `mirror --prune` with `referrers.enabled` against real distribution 2.8 (deletes by digest
//! only, no referrers API: cosign tags and the referrers tag schema are used for real): the
//! referrers the mirror copied go with a pruned manifest; foreign ones and those of the tags
//! that stay remain.

use std::collections::BTreeSet;
use std::path::Path;

use crate::support::artifacts::{
    Artifact, NOTATION, SPDX, attach, cosign_signature, fallback_tag, listed_digests,
    push_fallback_index,
};
use crate::support::image::Pushed;
use crate::support::{Flavor, Seeder, TestRegistry, mirror_doc, run_cli};

/// An image at the source with a cosign signature, an SBOM (listed in its fallback index) and
/// a signature on the SBOM.
struct Signed {
    image: Pushed,
    sig: Pushed,
    sig_tag: String,
    sbom: Artifact,
    sbom_sig: Artifact,
}

async fn seed_signed(s: &Seeder, host: &str, tag: &str, seed: u64) -> Signed {
    let image = s
        .push_image("app", Some(tag), seed, &[3000], Flavor::Oci)
        .await;
    let (sig, sig_tag) = cosign_signature(s, "app", &format!("{host}/app"), &image).await;
    let payload = format!(r#"{{"spdxVersion":"SPDX-2.3","name":"{tag}"}}"#);
    let sbom = attach(s, "app", &image, SPDX, payload.as_bytes()).await;
    let sbom_sig = attach(s, "app", &sbom.pushed, NOTATION, tag.as_bytes()).await;
    push_fallback_index(s, "app", &image.digest, &[&sbom]).await;
    push_fallback_index(s, "app", &sbom.pushed.digest, &[&sbom_sig]).await;
    Signed {
        image,
        sig,
        sig_tag,
        sbom,
        sbom_sig,
    }
}

/// Runs `imagemirror mirror -f dir/mirrors.yaml --prune --output json`; the rows.
fn run(dir: &Path, doc: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let file = dir.join("mirrors.yaml");
    std::fs::write(&file, doc).unwrap();
    let mut args = vec![
        "mirror",
        "-f",
        file.to_str().unwrap(),
        "--prune",
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = run_cli(dir, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    serde_json::from_str::<serde_json::Value>(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\n{stderr}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn items(rows: &[serde_json::Value], state: &str) -> BTreeSet<String> {
    rows.iter()
        .filter(|r| r["state"] == state)
        .map(|r| r["item"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_tag_takes_its_copied_referrers_and_leaves_everything_else() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let old = seed_signed(&s, src.host(), "1.0", 10).await;
    let kept = seed_signed(&s, src.host(), "2.0", 20).await;

    // Someone else's referrers at the destination: one on the manifest that will be pruned
    // (listed in its fallback index beside ours), one on an image of their own.
    let d = Seeder::new(dst.host());
    let foreign_on_old = attach(&d, "app", &old.image, NOTATION, b"their signature").await;
    push_fallback_index(&d, "app", &old.image.digest, &[&foreign_on_old]).await;
    let theirs = d
        .push_image("app", Some("theirs"), 99, &[1000], Flavor::Oci)
        .await;
    let foreign_on_theirs = attach(&d, "app", &theirs, SPDX, b"their sbom").await;
    push_fallback_index(&d, "app", &theirs.digest, &[&foreign_on_theirs]).await;

    let dir = tempfile::tempdir().unwrap();
    let spec = |names: &str| {
        let extra = format!("  tags:\n    names: [{names}]\n  referrers:\n    enabled: true\n");
        mirror_doc("app", src.host(), "app", dst.host(), "app", &extra)
    };
    let rows = run(dir.path(), &spec("\"1.0\", \"2.0\""), &[]);
    assert_eq!(
        items(&rows, "Copied"),
        BTreeSet::from(["1.0".into(), "2.0".into()])
    );
    for a in [&old, &kept] {
        d.assert_copy_of("app", &a.sig_tag, &a.sig).await;
        d.assert_copy_of("app", &a.sbom.pushed.digest, &a.sbom.pushed)
            .await;
        d.assert_copy_of("app", &a.sbom_sig.pushed.digest, &a.sbom_sig.pushed)
            .await;
    }

    // The dry run lists exactly the referrer deletes the run then makes, and deletes nothing.
    let dry = run(dir.path(), &spec("\"2.0\""), &["--dry-run"]);
    assert_eq!(items(&dry, "WouldPrune"), BTreeSet::from(["1.0".into()]));
    let would = items(&dry, "WouldPruneReferrer");
    assert!(
        d.get_manifest("app", &old.sig_tag).await.is_some(),
        "a dry run deletes nothing"
    );

    let rows = run(dir.path(), &spec("\"2.0\""), &[]);
    assert_eq!(
        items(&rows, "Pruned"),
        BTreeSet::from(["1.0".into()]),
        "{rows:?}"
    );
    let pruned = items(&rows, "PrunedReferrer");
    eprintln!("PRUNED {pruned:#?}");
    assert_eq!(pruned, would, "{rows:?}");
    assert!(
        !rows.iter().any(|r| r["state"] == "RetainedReferrer"),
        "{rows:?}"
    );
    for part in [
        old.sig_tag.as_str(),
        &old.sbom.pushed.digest,
        &old.sbom_sig.pushed.digest,
        &fallback_tag(&old.sbom.pushed.digest),
    ] {
        assert!(
            pruned.iter().any(|p| p.contains(part)),
            "{part} not listed: {pruned:?}"
        );
    }

    // Gone: the image, its cosign signature, its SBOM and the signature on the SBOM, and the
    // SBOM's fallback index.
    for gone in [
        old.image.digest.as_str(),
        &old.sig_tag,
        &old.sig.digest,
        &old.sbom.pushed.digest,
        &old.sbom_sig.pushed.digest,
        &fallback_tag(&old.sbom.pushed.digest),
    ] {
        assert!(
            d.get_manifest("app", gone).await.is_none(),
            "{gone} must be pruned"
        );
    }
    // The foreign referrer of the pruned image stays, alone in its rewritten index.
    d.assert_copy_of("app", &foreign_on_old.pushed.digest, &foreign_on_old.pushed)
        .await;
    let (_, index) = d
        .get_manifest("app", &fallback_tag(&old.image.digest))
        .await
        .expect("the index still lists the foreign referrer");
    assert_eq!(
        listed_digests(&index),
        vec![foreign_on_old.pushed.digest.clone()]
    );
    // Someone else's image and referrer are untouched.
    d.assert_copy_of("app", "theirs", &theirs).await;
    d.assert_copy_of(
        "app",
        &foreign_on_theirs.pushed.digest,
        &foreign_on_theirs.pushed,
    )
    .await;
    let (_, index) = d
        .get_manifest("app", &fallback_tag(&theirs.digest))
        .await
        .unwrap();
    assert_eq!(
        listed_digests(&index),
        vec![foreign_on_theirs.pushed.digest.clone()]
    );
    // The remaining tag keeps all of its referrers.
    d.assert_copy_of("app", "2.0", &kept.image).await;
    d.assert_copy_of("app", &kept.sig_tag, &kept.sig).await;
    d.assert_copy_of("app", &kept.sbom.pushed.digest, &kept.sbom.pushed)
        .await;
    d.assert_copy_of("app", &kept.sbom_sig.pushed.digest, &kept.sbom_sig.pushed)
        .await;
    for subject in [&kept.image.digest, &kept.sbom.pushed.digest] {
        assert!(
            d.get_manifest("app", &fallback_tag(subject))
                .await
                .is_some(),
            "the fallback index of {subject} stays"
        );
    }

    // Nothing left to prune: a further run deletes nothing.
    let before = dst.requests().len();
    let rows = run(dir.path(), &spec("\"2.0\""), &[]);
    assert!(items(&rows, "PrunedReferrer").is_empty(), "{rows:?}");
    assert!(
        !dst.requests()[before..]
            .iter()
            .any(|r| r.starts_with("DELETE")),
        "nothing deleted on a no-op run"
    );
}
