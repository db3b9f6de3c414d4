//! OCI layouts (`oci:<dir>`, `oci-archive:<file>`) as source and destination, checked against
//! skopeo as the reference reader and writer, between real registries.

use std::path::Path;

use imagemirror::registry::digest::sha256_digest;

use crate::support::layout::*;
use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc_sides};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layout_skopeo_wrote_imports_with_the_same_digests() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("team/app", Some("1.0"), 1, &[200_000, 3000], Flavor::Oci)
        .await;
    s.push_index(
        "team/app",
        "multi",
        2,
        &["linux/amd64", "linux/arm64"],
        Flavor::Oci,
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    for tag in ["1.0", "multi"] {
        skopeo_ok(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{}/team/app:{tag}", src.host()),
            &format!("oci:{}:{tag}", layout.display()),
        ]);
    }
    let written = index_tags(&layout);
    let doc = mirror_doc_sides(
        "import",
        &local(&format!("oci:{}", layout.display())),
        &plain(dst.host(), "mirror/app"),
        "  tags:\n    include: [\"*\"]\n",
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &doc, &["--output", "json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(json_rows(&stdout).len(), 2, "{stdout}");
    for (tag, digest) in &written {
        assert_eq!(
            registry_digest(dst.host(), "mirror/app", tag)
                .await
                .as_deref(),
            Some(digest.as_str()),
            "{tag}"
        );
        let (_, bytes) = Seeder::new(dst.host())
            .get_manifest("mirror/app", tag)
            .await
            .unwrap();
        assert_eq!(bytes, std::fs::read(blob_file(&layout, digest)).unwrap());
    }
    // The same from an archive skopeo wrote (one image per archive, as skopeo writes them).
    let archive = tmp.path().join("skopeo.tar");
    skopeo_ok(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/team/app:multi", src.host()),
        &format!("oci-archive:{}:multi", archive.display()),
    ]);
    let doc = mirror_doc_sides(
        "import-archive",
        &local(&format!("oci-archive:{}", archive.display())),
        &plain(dst.host(), "mirror/fromtar"),
        &tags(&["multi"]),
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &doc, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(
        registry_digest(dst.host(), "mirror/fromtar", "multi").await,
        Some(written["multi"].clone())
    );
    // skopeo reads back what we pushed, whole.
    skopeo_ok(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/mirror/app:multi", dst.host()),
        &format!("oci:{}:check", tmp.path().join("check").display()),
    ]);
}

/// Exports `names` of `src/team/app` with imagemirror to `target` (an `oci:`/`oci-archive:`
/// reference), then checks that skopeo inspects each of `readable` with the source's digest
/// and copies it to `dst` keeping that digest.
async fn export_then_skopeo_reads(
    src: &TestRegistry,
    dst: &TestRegistry,
    tmp: &Path,
    target: &str,
    names: &[&str],
    readable: &[&str],
) {
    let doc = mirror_doc_sides(
        "export",
        &plain(src.host(), "team/app"),
        &local(target),
        &tags(names),
    );
    let (code, stdout, stderr) = mirror_cli(tmp, &doc, &["--output", "json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for row in json_rows(&stdout) {
        assert_eq!(row["state"], "Copied", "{row}");
        assert_eq!(row["sourceDigest"], row["destinationDigest"], "{row}");
    }
    for tag in readable {
        let source = registry_digest(src.host(), "team/app", tag).await.unwrap();
        let inspected = skopeo_ok(&["inspect", "--raw", &format!("{target}:{tag}")]);
        assert_eq!(
            sha256_digest(inspected.as_bytes()),
            source,
            "skopeo inspect --raw {target}:{tag}"
        );
        skopeo_ok(&["inspect", &format!("{target}:{tag}")]);
        skopeo_ok(&[
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("{target}:{tag}"),
            &format!("docker://{}/back/app:{tag}", dst.host()),
        ]);
        assert_eq!(
            registry_digest(dst.host(), "back/app", tag).await,
            Some(source),
            "{tag} after skopeo copied it from {target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_layout_and_archive_are_read_by_skopeo_with_the_same_digests() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("team/app", Some("oci"), 3, &[150_000], Flavor::Oci)
        .await;
    s.push_image("team/app", Some("docker"), 4, &[120_000], Flavor::Docker)
        .await;
    s.push_index(
        "team/app",
        "index",
        5,
        &["linux/amd64", "linux/arm64"],
        Flavor::Oci,
    )
    .await;
    s.push_index(
        "team/app",
        "list",
        6,
        &["linux/amd64", "linux/arm/v7"],
        Flavor::Docker,
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    // Docker-typed tags are exported byte-identical too (the round trips below prove it), but
    // skopeo 1.9 skips index.json entries that are not OCI types, so it reads the OCI ones.
    let names = ["oci", "docker", "index", "list"];
    let readable = ["oci", "index"];
    let dir = format!("oci:{}", tmp.path().join("layout").display());
    export_then_skopeo_reads(&src, &dst, tmp.path(), &dir, &names, &readable).await;
    let archive = format!("oci-archive:{}", tmp.path().join("out.tar").display());
    export_then_skopeo_reads(&src, &dst, tmp.path(), &archive, &names, &readable).await;
}

/// Registry → layout → registry with imagemirror both ways: byte-identical, and `platforms`
/// filters as it does between registries.
async fn round_trip(via: &str) {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let (index, _) = s
        .push_index(
            "team/app",
            "index",
            7,
            &["linux/amd64", "linux/arm64"],
            Flavor::Oci,
        )
        .await;
    let (list, _) = s
        .push_index(
            "team/app",
            "list",
            8,
            &["linux/amd64", "linux/arm64"],
            Flavor::Docker,
        )
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let out = mirror_doc_sides(
        "out",
        &plain(src.host(), "team/app"),
        &local(via),
        &tags(&["index", "list"]),
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &out, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let back = mirror_doc_sides(
        "in",
        &local(via),
        &plain(dst.host(), "team/app"),
        &tags(&["index", "list"]),
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &back, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let d = Seeder::new(dst.host());
    d.assert_copy_of("team/app", "index", &index).await;
    d.assert_copy_of("team/app", "list", &list).await;
    // A second import finds everything in place.
    let (code, stdout, _) = mirror_cli(tmp.path(), &back, &["--output", "json"]);
    assert_eq!(code, 0);
    assert!(
        json_rows(&stdout).iter().all(|r| r["state"] == "UpToDate"),
        "{stdout}"
    );
    // `platforms` filters out of a layout as out of a registry: a new index of one platform.
    let filtered = mirror_doc_sides(
        "filtered",
        &local(via),
        &plain(dst.host(), "team/amd64"),
        &format!("{}  platforms: [linux/amd64]\n", tags(&["index"])),
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &filtered, &["--output", "json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let row = &json_rows(&stdout)[0];
    assert_eq!(row["sourceDigest"], index.digest.as_str());
    assert_ne!(row["destinationDigest"], index.digest.as_str());
    let (_, bytes) = d.get_manifest("team/amd64", "index").await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_and_a_manifest_list_survive_a_layout_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    round_trip(&format!("oci:{}", tmp.path().join("layout").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_and_a_manifest_list_survive_an_archive_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    round_trip(&format!(
        "oci-archive:{}",
        tmp.path().join("out.tar").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_layout_blob_fails_that_tag_naming_the_file() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let bad = s
        .push_image("team/app", Some("bad"), 9, &[100_000], Flavor::Oci)
        .await;
    let good = s
        .push_image("team/app", Some("good"), 10, &[90_000], Flavor::Oci)
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let via = format!("oci:{}", layout.display());
    let out = mirror_doc_sides(
        "out",
        &plain(src.host(), "team/app"),
        &local(&via),
        &tags(&["bad", "good"]),
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &out, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let (layer, _) = &bad.blobs[1];
    let file = blob_file(&layout, layer);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5000] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let back = mirror_doc_sides(
        "in",
        &local(&via),
        &plain(dst.host(), "team/app"),
        &tags(&["bad", "good"]),
    );
    let (code, stdout, _) = mirror_cli(tmp.path(), &back, &["--output", "json"]);
    assert_ne!(code, 0, "{stdout}");
    let rows = json_rows(&stdout);
    let row = |item: &str| rows.iter().find(|r| r["item"] == item).unwrap().clone();
    assert_eq!(row("bad")["reason"], "DigestMismatch", "{stdout}");
    let message = row("bad")["message"].as_str().unwrap().to_string();
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert_eq!(row("good")["state"], "Copied", "{stdout}");
    let d = Seeder::new(dst.host());
    d.assert_copy_of("team/app", "good", &good).await;
    assert!(d.get_manifest("team/app", "bad").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mirrors_into_one_layout_store_each_blob_once() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let base = crate::support::image::random_bytes(77, 300_000);
    let shared = crate::support::apps_sharing_a_base(src.host(), dst.host(), 20, &base).await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let docs: Vec<String> = (0..20)
        .map(|i| {
            mirror_doc_sides(
                &format!("app-{i}"),
                &plain(src.host(), &format!("src/app-{i}")),
                &local(&format!("oci:{}:apps/app-{i}", layout.display())),
                &tags(&["v1"]),
            )
        })
        .collect();
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &docs.join("---\n"), &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let tags = index_tags(&layout);
    assert_eq!(tags.len(), 20, "{tags:?}");
    let mut wanted: std::collections::BTreeSet<String> = Default::default();
    for (i, image) in shared.images.iter().enumerate() {
        assert_eq!(tags[&format!("apps/app-{i}:v1")], image.digest);
        wanted.insert(image.digest.clone());
        wanted.extend(image.blobs.iter().map(|(d, _)| d.clone()));
    }
    // One file per distinct digest: the base layer once, not twenty times.
    let files: std::collections::BTreeSet<String> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(files, wanted);
    assert!(files.contains(&shared.base_digest));
    let raw = skopeo_ok(&[
        "inspect",
        "--raw",
        &format!("oci:{}:apps/app-7:v1", layout.display()),
    ]);
    assert_eq!(sha256_digest(raw.as_bytes()), shared.images[7].digest);
}
