//! OCI layouts (`oci:<dir>`, `oci-archive:<file>`) as source and destination, checked against
//! skopeo as the reference reader and writer, between real registries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use imagemirror::registry::digest::sha256_digest;

use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc_sides, side};

/// A side that is a layout, not a registry.
fn local(repository: &str) -> String {
    format!("    repository: {repository}\n")
}

fn plain(host: &str, repo: &str) -> String {
    side(host, repo, &["plainHTTP: true"])
}

fn tags(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("  tags:\n    names: [{}]\n", quoted.join(", "))
}

/// Runs skopeo; (success, stdout, stderr).
fn skopeo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo (scripts/install-deps.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn skopeo_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = skopeo(args);
    assert!(ok, "skopeo {args:?} failed: {stderr}");
    stdout
}

/// The layout's tags: ref name → manifest digest.
fn index_tags(dir: &Path) -> BTreeMap<String, String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json"))
            .unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str()?;
            Some((name.to_string(), m["digest"].as_str()?.to_string()))
        })
        .collect()
}

fn blob_file(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The digest of a tag at a registry (of its exact bytes).
async fn registry_digest(host: &str, repo: &str, tag: &str) -> Option<String> {
    let (_, bytes) = Seeder::new(host).get_manifest(repo, tag).await?;
    Some(sha256_digest(&bytes))
}

fn json_rows(stdout: &str) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
        .as_array()
        .unwrap()
        .clone()
}

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

/// File name → (inode, size) of the layout's blobs.
fn blob_files(layout: &Path) -> BTreeMap<String, (u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (m.ino(), m.len()),
            )
        })
        .collect()
}

/// The largest partial blob of a running export.
fn partial_bytes(layout: &Path) -> u64 {
    std::fs::read_dir(layout.join(".imagemirror/tmp"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .max()
        })
        .ok()
        .flatten()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_killed_mid_blob_leaves_a_valid_layout_and_the_rerun_writes_only_the_rest() {
    const BIG: u64 = 300 << 20;
    let (src, _dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let small = s
        .push_image("team/app", Some("small"), 11, &[50_000], Flavor::Oci)
        .await;
    let layer = s.push_blob_stream("team/app", BIG, 12).await;
    let config = s
        .push_blob("team/app", br#"{"architecture":"amd64","os":"linux"}"#)
        .await;
    let big = s
        .push_manifest_for(
            "team/app",
            Some("big"),
            config,
            vec![layer.clone()],
            Flavor::Oci,
        )
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let doc = mirror_doc_sides(
        "export",
        &plain(src.host(), "team/app"),
        &local(&format!("oci:{}", layout.display())),
        &tags(&["small", "big"]),
    );
    let file = tmp.path().join("export.yaml");
    std::fs::write(&file, &doc).unwrap();
    // Paced to a few chunks a second so the kill lands inside the big blob.
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagemirror"))
        .args([
            "mirror",
            "-f",
            file.to_str().unwrap(),
            "--rate-limit",
            "5",
            "--chunk-size",
            "4MiB",
        ])
        .env("DOCKER_CONFIG", tmp.path())
        .env("IMAGEMIRROR_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let tagged =
            layout.join("index.json").exists() && index_tags(&layout).contains_key("small");
        if tagged && partial_bytes(&layout) >= 40 << 20 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export ended before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no partial blob within 180 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Valid: skopeo reads what finished; the unfinished tag is simply not there.
    let target = format!("oci:{}", layout.display());
    let raw = skopeo_ok(&["inspect", "--raw", &format!("{target}:small")]);
    assert_eq!(sha256_digest(raw.as_bytes()), small.digest);
    skopeo_ok(&["inspect", &format!("{target}:small")]);
    assert!(!index_tags(&layout).contains_key("big"));
    assert!(
        !blob_file(&layout, &layer.0).exists(),
        "a partial blob under its final name"
    );

    let before = blob_files(&layout);
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &doc, &["--output", "json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let after = blob_files(&layout);
    for (name, (ino, _)) in &before {
        assert_eq!(after[name].0, *ino, "{name} was written again");
    }
    let new: Vec<&String> = after.keys().filter(|n| !before.contains_key(*n)).collect();
    let written: u64 = new.iter().map(|n| after[*n].1).sum();
    // Exactly what was missing: the big layer, its config and manifest (the config may have
    // finished before the kill).
    let missing: u64 = big
        .blobs
        .iter()
        .filter(|(d, _)| !before.contains_key(d.trim_start_matches("sha256:")))
        .map(|(_, s)| s)
        .sum::<u64>()
        + big.bytes.len() as u64;
    assert_eq!(written, missing, "bytes written by the re-run");
    assert!(written >= BIG);
    assert_eq!(partial_bytes(&layout), 0, "partial blobs left behind");
    let raw = skopeo_ok(&["inspect", "--raw", &format!("{target}:big")]);
    assert_eq!(sha256_digest(raw.as_bytes()), big.digest);
    let rows = json_rows(&stdout);
    let state = |item: &str| rows.iter().find(|r| r["item"] == item).unwrap()["state"].clone();
    assert_eq!(state("small"), "UpToDate", "{stdout}");
    assert_eq!(state("big"), "Copied", "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_stalls_on_a_layout_naming_the_field() {
    use crate::support::kube_api::TestCluster;
    use imagemirror::controller::ControllerConfig;
    let src = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let config = ControllerConfig {
        namespaces: vec![ns.clone()],
        ..ControllerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(imagemirror::controller::run(
        cluster.client(),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    let yaml = format!(
        "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata:\n  name: export\n  namespace: {ns}\nspec:\n  source:\n{}  destination:\n{}{}",
        plain(src.host(), "app"),
        local(&format!("oci:{}", layout.display())),
        tags(&["v1"]),
    );
    cluster.apply_imagemirror(&yaml).await;
    let stalled = cluster
        .wait_for(&ns, "export", std::time::Duration::from_secs(60), |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Stalled" && c.status == "True")
            })
        })
        .await;
    let status = stalled.status.unwrap();
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled")
        .unwrap();
    assert_eq!(c.reason, "UnsupportedTransport");
    assert!(
        c.message.contains("spec.destination.repository"),
        "{}",
        c.message
    );
    assert!(!layout.exists(), "the controller touched the local disk");
    let _ = stop.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), task).await;
    cluster.delete_namespace(&ns).await;
}

/// The names in a tar file, in order (GNU tar).
fn tar_names(archive: &Path) -> Vec<String> {
    let out = Command::new("tar")
        .arg("-tf")
        .arg(archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -tf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_cut_inside_an_entry_is_completed_by_the_next_run_and_chunks_are_staged() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let small = s
        .push_image("team/app", Some("small"), 13, &[40_000], Flavor::Oci)
        .await;
    // Over the chunked threshold used below: goes through the staging directory.
    let big = s
        .push_image("team/app", Some("big"), 14, &[3 << 20], Flavor::Docker)
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("out.tar");
    let via = format!("oci-archive:{}", archive.display());
    let export = |names: &[&str]| {
        mirror_doc_sides(
            "out",
            &plain(src.host(), "team/app"),
            &local(&via),
            &tags(names),
        )
    };
    let chunked = ["--chunked-threshold", "1MiB", "--chunk-size", "1MiB"];
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &export(&["small"]), &chunked);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // As if a writer was killed inside a blob: the end-of-archive blocks gone, a header
    // promising 1 MiB and only part of it written.
    let mut bytes = std::fs::read(&archive).unwrap();
    assert!(bytes.ends_with(&[0u8; 1024]));
    bytes.truncate(bytes.len() - 1024);
    let complete = bytes.len();
    let mut header = [0u8; 512];
    header[..30].copy_from_slice(format!("blobs/sha256/{}", "c".repeat(17)).as_bytes());
    header[124..136].copy_from_slice(b"00004000000\0");
    header[156] = b'0';
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&vec![7u8; 300_000]);
    std::fs::write(&archive, &bytes).unwrap();

    let (code, stdout, stderr) = mirror_cli(
        tmp.path(),
        &export(&["small", "big"]),
        &[&chunked[..], &["--output", "json"]].concat(),
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let rows = json_rows(&stdout);
    let state = |item: &str| rows.iter().find(|r| r["item"] == item).unwrap()["state"].clone();
    assert_eq!(state("small"), "UpToDate", "{stdout}");
    assert_eq!(state("big"), "Copied", "{stdout}");
    let after = std::fs::read(&archive).unwrap();
    assert_eq!(
        &after[..complete - 1024],
        &bytes[..complete - 1024],
        "complete entries kept as they were"
    );
    let names = tar_names(&archive);
    let mut blobs: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("blobs/sha256/") && n.len() > 13)
        .collect();
    let n = blobs.len();
    blobs.dedup();
    assert_eq!(blobs.len(), n, "a blob stored twice: {names:?}");
    assert_eq!(
        names.iter().filter(|n| *n == "index.json").count(),
        1,
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("ccccc")),
        "the cut entry survived: {names:?}"
    );
    // skopeo reads the OCI tag; imagemirror brings both back byte-identical.
    let raw = skopeo_ok(&["inspect", "--raw", &format!("{via}:small")]);
    assert_eq!(sha256_digest(raw.as_bytes()), small.digest);
    let back = mirror_doc_sides(
        "in",
        &local(&via),
        &plain(dst.host(), "team/app"),
        &tags(&["small", "big"]),
    );
    let (code, stdout, stderr) = mirror_cli(tmp.path(), &back, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let d = Seeder::new(dst.host());
    d.assert_copy_of("team/app", "small", &small).await;
    d.assert_copy_of("team/app", "big", &big).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_travel_through_a_layout_as_through_a_registry() {
    use crate::support::artifacts::{IN_TOTO, SPDX, attach, cosign_signature, push_fallback_index};
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let image = s
        .push_image("app", Some("v1"), 15, &[20_000], Flavor::Oci)
        .await;
    let (sig, sig_tag) = cosign_signature(&s, "app", &format!("{}/app", src.host()), &image).await;
    let sbom = attach(&s, "app", &image, SPDX, br#"{"spdxVersion":"SPDX-2.3"}"#).await;
    let att = attach(&s, "app", &image, IN_TOTO, br#"{"_type":"in-toto"}"#).await;
    push_fallback_index(&s, "app", &image.digest, &[&sbom, &att]).await;
    let tmp = tempfile::tempdir().unwrap();
    let via = format!("oci:{}", tmp.path().join("layout").display());
    let refs = format!("{}  referrers:\n    enabled: true\n", tags(&["v1"]));
    for (name, from, to) in [
        ("out", plain(src.host(), "app"), local(&via)),
        ("in", local(&via), plain(dst.host(), "app")),
    ] {
        let (code, stdout, stderr) = mirror_cli(
            tmp.path(),
            &mirror_doc_sides(name, &from, &to, &refs),
            &["--output", "json"],
        );
        assert_eq!(code, 0, "{stdout}\n{stderr}");
        let rows = json_rows(&stdout);
        assert_eq!(rows[0]["state"], "Copied", "{name}: {stdout}");
        assert_eq!(rows[0]["referrers"], 3, "{name}: {stdout}");
    }
    let d = Seeder::new(dst.host());
    d.assert_copy_of("app", "v1", &image).await;
    d.assert_copy_of("app", &sig_tag, &sig).await;
    for art in [&sbom, &att] {
        d.assert_copy_of("app", &art.pushed.digest, &art.pushed)
            .await;
    }
}
