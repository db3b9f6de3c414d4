//! OCI layouts under stress: a killed export, a cut archive, referrers, and the controller's
//! refusal.

use std::process::Command;

use imagemirror::registry::digest::sha256_digest;

use crate::support::layout::*;
use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc_sides};

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
    use crate::support::controller::{Fixture, Running, cond, config, message, wait_event};
    use crate::support::kube_api::TestCluster;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(60);
    let src = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let cluster = TestCluster::start().await;
    let ns = cluster.fresh_namespace("im").await;
    let running = Running::start(cluster.client(), config(&ns));
    let destination = format!("oci:{}", layout.display());
    Fixture::new(&ns, "export", &format!("{}/app", src.host()), &destination)
        .tags(&["v1"])
        .with(|s| s.destination.plain_http = false)
        .apply(&cluster.client())
        .await;
    let stalled = cluster
        .wait_for(&ns, "export", WAIT, |m| {
            cond(m, "Stalled").is_some_and(|(s, _)| s == "True")
        })
        .await;
    assert_eq!(cond(&stalled, "Stalled").unwrap().1, "UnsupportedTransport");
    let msg = message(&stalled, "Stalled");
    assert!(msg.contains("spec.destination.repository"), "{msg}");
    let (t, note) = wait_event(
        &cluster.client(),
        &ns,
        "export",
        "UnsupportedTransport",
        WAIT,
    )
    .await;
    assert_eq!(t, "Warning");
    assert!(note.contains("spec.destination.repository"), "{note}");
    assert!(!layout.exists(), "the controller touched the local disk");
    running.stop().await;
    cluster.delete_namespace(&ns).await;
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
