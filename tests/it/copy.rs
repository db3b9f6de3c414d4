//! `imagemirror mirror` between two real registries: the first real copy.

use crate::support::{
    Flavor, RegistryConfig, Seeder, SharedBase, TestRegistry, app_v1_doc, apps_sharing_a_base,
    mirror_cli, mirror_doc,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_oci_and_docker_images_byte_identical() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let oci = s
        .push_image(
            "team/app",
            Some("1.0-oci"),
            1,
            &[300_000, 70_000],
            Flavor::Oci,
        )
        .await;
    let docker = s
        .push_image(
            "team/app",
            Some("1.0-docker"),
            2,
            &[150_000],
            Flavor::Docker,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "app",
        src.host(),
        "team/app",
        dst.host(),
        "mirror/app",
        "  tags:\n    names: [\"1.0-oci\", \"1.0-docker\"]\n",
    );
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &[]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let d = Seeder::new(dst.host());
    d.assert_copy_of("mirror/app", "1.0-oci", &oci).await;
    d.assert_copy_of("mirror/app", "1.0-docker", &docker).await;
    assert!(stdout.contains("Copied"), "{stdout}");

    // A second run finds everything in place and writes nothing.
    let (code, stdout, _) = mirror_cli(dir.path(), &doc, &["--output", "json"]);
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let states: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["UpToDate", "UpToDate"], "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_fails_by_name_and_the_others_still_copy() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let good = s
        .push_image("app", Some("good"), 3, &[50_000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "app",
        src.host(),
        "app",
        dst.host(),
        "app",
        "  tags:\n    names: [\"good\", \"gone\"]\n",
    );
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--output", "json"]);
    assert_eq!(
        code, 1,
        "a failed tag must fail the run\n{stdout}\n{stderr}"
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let gone = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["item"] == "gone")
        .expect("row for gone");
    assert_eq!(gone["state"], "Failed");
    assert_eq!(gone["reason"], "NotFound");
    assert!(
        gone["message"].as_str().unwrap().contains("app:gone"),
        "{gone}"
    );
    Seeder::new(dst.host())
        .assert_copy_of("app", "good", &good)
        .await;
    assert!(
        Seeder::new(dst.host())
            .get_manifest("app", "gone")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_indexes_copy_whole_or_filtered() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let (oci_index, _) = s
        .push_index(
            "multi",
            "oci",
            4,
            &["linux/amd64", "linux/arm64", "linux/arm/v7"],
            Flavor::Oci,
        )
        .await;
    let (docker_list, children) = s
        .push_index(
            "multi",
            "docker",
            5,
            &["linux/amd64", "linux/arm64"],
            Flavor::Docker,
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "multi",
        src.host(),
        "multi",
        dst.host(),
        "whole",
        "  tags:\n    names: [oci, docker]\n",
    );
    let filtered = mirror_doc(
        "arm",
        src.host(),
        "multi",
        dst.host(),
        "arm",
        "  tags:\n    names: [docker]\n  platforms: [linux/arm64]\n",
    );
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &format!("{doc}---\n{filtered}"),
        &["--output", "json"],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let d = Seeder::new(dst.host());
    d.assert_copy_of("whole", "oci", &oci_index).await;
    d.assert_copy_of("whole", "docker", &docker_list).await;

    let (ct, bytes) = d
        .get_manifest("arm", "docker")
        .await
        .expect("filtered index");
    assert_eq!(ct, docker_list.media_type);
    assert_ne!(
        bytes, docker_list.bytes,
        "a filtered index is a new document"
    );
    let index: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["platform"]["architecture"], "arm64");
    assert_eq!(entries[0]["digest"], children[1].digest.as_str());
    d.assert_copy_of("arm", &children[1].digest, &children[1])
        .await;
    assert!(
        d.get_manifest("arm", &children[0].digest).await.is_none(),
        "amd64 must not be copied"
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let arm = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mirror"] == "test/arm")
        .unwrap();
    assert_eq!(arm["sourceDigest"], docker_list.digest.as_str());
    assert_eq!(
        arm["destinationDigest"],
        imagemirror::registry::digest::sha256_digest(&bytes).as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_the_auth_file_and_a_named_failure_for_wrong_credentials() {
    let src = TestRegistry::start();
    let dst = TestRegistry::start_with(RegistryConfig {
        htpasswd: Some(("mirror".into(), "s3cret-pass".into())),
        ..RegistryConfig::default()
    });
    let image = Seeder::new(src.host())
        .push_image("app", Some("v1"), 6, &[10_000], Flavor::Docker)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let doc = app_v1_doc(src.host(), dst.host());
    let auth = |pass: &str| {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("mirror:{pass}"));
        format!(r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#, dst.host())
    };
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, auth("wrong")).unwrap();
    let (code, stdout, stderr) = mirror_cli(
        dir.path(),
        &doc,
        &["--output", "json", "--auth-file", bad.to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(stdout.contains("\"reason\": \"AuthFailed\""), "{stdout}");
    assert!(
        !stdout.contains("wrong") && !stderr.contains("wrong"),
        "a password leaked:\n{stdout}\n{stderr}"
    );

    let good = dir.path().join("good.json");
    std::fs::write(&good, auth("s3cret-pass")).unwrap();
    let (code, stdout, stderr) =
        mirror_cli(dir.path(), &doc, &["--auth-file", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    Seeder::new(dst.host())
        .with_basic("mirror", "s3cret-pass")
        .assert_copy_of("app", "v1", &image)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_plans_from_the_tag_list_and_writes_nothing() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    for (i, tag) in ["1.0.0", "1.1.0", "1.2.0-rc1", "2.0.0", "latest"]
        .iter()
        .enumerate()
    {
        s.push_image("app", Some(tag), 10 + i as u64, &[1000], Flavor::Oci)
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "app",
        src.host(),
        "app",
        dst.host(),
        "app",
        "  tags:\n    include: [\"1.*\"]\n    exclude: [\"*-rc*\"]\n",
    );
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &["--dry-run", "--output", "json"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let planned: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["item"].as_str().unwrap())
        .collect();
    assert_eq!(planned, ["1.0.0", "1.1.0"]);
    assert!(
        Seeder::new(dst.host())
            .get_manifest("app", "1.0.0")
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mirrors_sharing_a_base_layer_pull_it_once_and_mount_the_rest() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let base = crate::support::image::random_bytes(99, 400_000);
    let SharedBase {
        docs,
        images,
        base_digest,
    } = apps_sharing_a_base(src.host(), dst.host(), 20, &base).await;
    let before = src.requests().len();
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = mirror_cli(dir.path(), &docs.join("---\n"), &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let requests = src.requests();
    let base_gets = requests[before..]
        .iter()
        .filter(|r| r.starts_with("GET ") && r.ends_with(&format!("/blobs/{base_digest}")))
        .count();
    assert_eq!(
        base_gets,
        1,
        "the shared layer must be read from the source once:\n{:#?}",
        &requests[before..]
    );
    let mounts = dst
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("POST ")
                && r.contains(&format!("mount={}", base_digest.replace(':', "%3A")))
        })
        .count();
    assert_eq!(
        mounts, 19,
        "the other 19 repositories get the layer by mount"
    );
    let d = Seeder::new(dst.host());
    for (i, image) in images.iter().enumerate() {
        d.assert_copy_of(&format!("dst/app-{i}"), "v1", image).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_sharing_one_index_copy_together_without_racing_the_registry() {
    // distribution rewrites a manifest's links on every push; concurrent pushes of one child
    // manifest used to fail a sibling tag's index PUT with MANIFEST_BLOB_UNKNOWN.
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let (index, _) = s
        .push_index(
            "multi",
            "t0",
            7,
            &["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/s390x"],
            Flavor::Oci,
        )
        .await;
    let tags: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
    for t in &tags[1..] {
        s.put_manifest("multi", t, &index.media_type, &index.bytes)
            .await;
    }
    let names = format!("  tags:\n    names: [{}]\n", tags.join(", "));
    let docs: Vec<String> = (0..4)
        .map(|i| {
            mirror_doc(
                &format!("m{i}"),
                src.host(),
                "multi",
                dst.host(),
                &format!("copy{i}"),
                &names,
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) =
        mirror_cli(dir.path(), &docs.join("---\n"), &["--concurrency", "16"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let d = Seeder::new(dst.host());
    for i in 0..4 {
        for t in &tags {
            d.assert_copy_of(&format!("copy{i}"), t, &index).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tags_upload_small_blobs_without_asking_and_a_resync_costs_one_head_per_tag() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    // Over the 1 MiB blind-upload limit: asked for before it is copied.
    let base = s
        .push_blob("app", &crate::support::image::random_bytes(7, 1_500_000))
        .await;
    let mut images = Vec::new();
    let mut small = Vec::new();
    for i in 0..3u64 {
        let own = s
            .push_blob("app", &crate::support::image::random_bytes(300 + i, 50_000))
            .await;
        let config = s
            .push_blob("app", format!("{{\"tag\":{i}}}").as_bytes())
            .await;
        small.push(own.0.clone());
        small.push(config.0.clone());
        let image = s
            .push_manifest_for(
                "app",
                Some(&format!("t{i}")),
                config,
                vec![base.clone(), own],
                Flavor::Oci,
            )
            .await;
        images.push(image);
    }
    // One small blob is at the destination already although no tag refers to it: the blind
    // upload sends it again and the registry takes it.
    let d = Seeder::new(dst.host());
    d.push_blob(
        "mirror/app",
        &crate::support::image::random_bytes(300, 50_000),
    )
    .await;
    let (src_before, dst_before) = (src.requests().len(), dst.requests().len());
    let dir = tempfile::tempdir().unwrap();
    let doc = mirror_doc(
        "app",
        src.host(),
        "app",
        dst.host(),
        "mirror/app",
        "  tags:\n    names: [t0, t1, t2]\n",
    );
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let dst_log = dst.requests()[dst_before..].to_vec();
    let src_log = src.requests()[src_before..].to_vec();
    for (i, image) in images.iter().enumerate() {
        d.assert_copy_of("mirror/app", &format!("t{i}"), image)
            .await;
    }
    let count = |log: &[String], method: &str, part: &str| {
        log.iter()
            .filter(|r| r.starts_with(method) && r.contains(part))
            .count()
    };
    for digest in &small {
        assert_eq!(
            count(&dst_log, "HEAD ", digest),
            0,
            "a small blob of a new tag is uploaded without a HEAD:\n{dst_log:#?}"
        );
    }
    assert_eq!(
        count(&dst_log, "HEAD ", &base.0),
        1,
        "a big blob is asked for once:\n{dst_log:#?}"
    );
    // Per tag: HEAD of the tag, POST + PUT per small blob, PUT of the manifest; and the base.
    assert_eq!(count(&dst_log, "HEAD ", "/manifests/"), 3, "{dst_log:#?}");
    assert_eq!(
        count(&dst_log, "POST ", "/blobs/uploads/"),
        7,
        "{dst_log:#?}"
    );
    assert_eq!(dst_log.len(), 3 + 1 + 7 + 7 + 3, "{dst_log:#?}");
    // The destination lacked every tag: one GET per manifest, no HEAD first.
    assert_eq!(count(&src_log, "HEAD ", "/manifests/"), 0, "{src_log:#?}");
    assert_eq!(count(&src_log, "GET ", "/manifests/"), 3, "{src_log:#?}");

    // A resync asks each side once per tag and writes nothing.
    let (src_before, dst_before) = (src.requests().len(), dst.requests().len());
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let dst_log = dst.requests()[dst_before..].to_vec();
    let src_log = src.requests()[src_before..].to_vec();
    assert_eq!(dst_log.len(), 3, "{dst_log:#?}");
    assert_eq!(count(&dst_log, "HEAD ", "/manifests/"), 3, "{dst_log:#?}");
    assert_eq!(src_log.len(), 3, "{src_log:#?}");
    assert_eq!(count(&src_log, "HEAD ", "/manifests/"), 3, "{src_log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_many_tags_lists_the_destination_once_instead_of_a_head_per_new_tag() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let mut images = Vec::new();
    for i in 0..9u64 {
        let tag = format!("t{i}");
        images.push(
            s.push_image("app", Some(&tag), 40 + i, &[2_000], Flavor::Oci)
                .await,
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let names = (0..9)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let doc = |extra: &str| {
        mirror_doc(
            "app",
            src.host(),
            "app",
            dst.host(),
            "mirror/app",
            &format!("  tags:\n    names: [{names}]\n{extra}"),
        )
    };
    let count = |log: &[String], method: &str, part: &str| {
        log.iter()
            .filter(|r| r.starts_with(method) && r.contains(part))
            .count()
    };
    // One tag first: under the threshold, it is asked for with a HEAD.
    let one = mirror_doc(
        "app",
        src.host(),
        "app",
        dst.host(),
        "mirror/app",
        "  tags:\n    names: [t0]\n",
    );
    let (code, stdout, stderr) = mirror_cli(dir.path(), &one, &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");

    // Nine tags, one of them present: one tag list, one HEAD (for the listed tag).
    let before = dst.requests().len();
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc(""), &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let log = dst.requests()[before..].to_vec();
    assert_eq!(count(&log, "GET ", "/tags/list"), 1, "{log:#?}");
    assert_eq!(count(&log, "HEAD ", "/manifests/"), 1, "{log:#?}");
    assert_eq!(count(&log, "HEAD ", "/manifests/t0"), 1, "{log:#?}");
    assert_eq!(count(&log, "PUT ", "/manifests/"), 8, "{log:#?}");
    let d = Seeder::new(dst.host());
    for (i, image) in images.iter().enumerate() {
        d.assert_copy_of("mirror/app", &format!("t{i}"), image)
            .await;
    }

    // `overwrite: false` judges every tag by itself: a HEAD each, no list.
    let before = dst.requests().len();
    let (code, stdout, stderr) = mirror_cli(dir.path(), &doc("  overwrite: false\n"), &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let log = dst.requests()[before..].to_vec();
    assert_eq!(count(&log, "GET ", "/tags/list"), 0, "{log:#?}");
    assert_eq!(count(&log, "HEAD ", "/manifests/"), 9, "{log:#?}");
    assert_eq!(log.len(), 9, "nothing is written: {log:#?}");
}
