//! `platforms`: a resync of an up-to-date tag keeps to HEADs, counted at the registries'
//! access logs. The rebuilt index carries the source index digest it was built from
//! (`dev.imagemirror.source.digest`) and the platforms it kept (`dev.imagemirror.platforms`).

use std::sync::Arc;

use imagemirror::api::ImageMirror;
use imagemirror::mirror::{self, ClientPool, Counters, EndpointAccess, filtered};
use imagemirror::transfer::{Engine, EngineConfig};

use crate::support::{Flavor, Seeder, TestRegistry, mirror_cli, mirror_doc};

const TAGS: [&str; 3] = ["oci", "docker", "single"];

fn count(log: &[String], method: &str, part: &str) -> usize {
    log.iter()
        .filter(|r| r.starts_with(method) && r.contains(part))
        .count()
}

/// The requests each registry answered while `f` ran.
async fn logged<F: std::future::Future<Output = ()>>(
    src: &TestRegistry,
    dst: &TestRegistry,
    f: F,
) -> (Vec<String>, Vec<String>) {
    let (s, d) = (src.requests().len(), dst.requests().len());
    f.await;
    // Leave out the logs' own sentinel requests.
    let clean = |log: Vec<String>, from: usize| -> Vec<String> {
        log[from..]
            .iter()
            .filter(|r| !r.contains("sentinel="))
            .cloned()
            .collect()
    };
    (clean(src.requests(), s), clean(dst.requests(), d))
}

fn doc(src: &TestRegistry, dst: &TestRegistry, platforms: &str) -> String {
    mirror_doc(
        "arm",
        src.host(),
        "multi",
        dst.host(),
        "arm",
        &format!("  tags:\n    names: [oci, docker, single]\n  platforms: [{platforms}]\n"),
    )
}

async fn annotations(dst: &TestRegistry, tag: &str) -> serde_json::Value {
    let (_, bytes) = Seeder::new(dst.host())
        .get_manifest("arm", tag)
        .await
        .expect("destination tag");
    let index: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    index["annotations"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_filtered_resync_is_one_head_per_side_per_tag() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let (oci, _) = s
        .push_index(
            "multi",
            "oci",
            21,
            &["linux/amd64", "linux/arm64", "linux/arm/v7"],
            Flavor::Oci,
        )
        .await;
    let (docker, _) = s
        .push_index(
            "multi",
            "docker",
            22,
            &["linux/amd64", "linux/arm64"],
            Flavor::Docker,
        )
        .await;
    s.push_image("multi", Some("single"), 23, &[1_000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = doc(&src, &dst, "linux/arm64");

    // First run: copies, and the rebuilt indexes say where they came from.
    let (code, out, err) = mirror_cli(dir.path(), &yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    for (tag, source) in [("oci", &oci), ("docker", &docker)] {
        let a = annotations(&dst, tag).await;
        assert_eq!(a[filtered::SOURCE_DIGEST], source.digest.as_str(), "{tag}");
        assert_eq!(a[filtered::PLATFORMS], "linux/arm64", "{tag}");
    }

    // A resync in a new process: the source sees one HEAD per tag and nothing else; the
    // destination one HEAD per tag, plus one GET per filtered index to read its annotations
    // (this process has not met them yet).
    let (src_log, dst_log) = logged(&src, &dst, async {
        let (code, out, err) = mirror_cli(dir.path(), &yaml, &[]);
        assert_eq!(code, 0, "{out}{err}");
    })
    .await;
    eprintln!("CLI resync: source {src_log:?}\ndestination {dst_log:?}");
    assert_eq!(src_log.len(), 3, "{src_log:#?}");
    for tag in TAGS {
        assert_eq!(
            count(&src_log, "HEAD ", &format!("/manifests/{tag}")),
            1,
            "{src_log:#?}"
        );
        assert_eq!(
            count(&dst_log, "HEAD ", &format!("/manifests/{tag}")),
            1,
            "{dst_log:#?}"
        );
    }
    assert_eq!(
        count(&dst_log, "GET ", "/manifests/sha256:"),
        2,
        "{dst_log:#?}"
    );
    assert_eq!(dst_log.len(), 5, "{dst_log:#?}");

    // In one process (the controller's case: one engine, many resyncs), after the first sync
    // every resync is one HEAD per side per tag and no GET at all.
    let mirror: ImageMirror = serde_yaml::from_str(&yaml).unwrap();
    let spec = &mirror.spec;
    let engine = Engine::new(EngineConfig::default());
    let pool = ClientPool::new();
    let access = || EndpointAccess {
        credentials: None,
        ca_pem: None,
    };
    let sync = || async {
        let source = pool.endpoint("source", &spec.source, access()).unwrap();
        let destination = pool
            .endpoint("destination", &spec.destination, access())
            .unwrap();
        let report = mirror::sync(
            &engine,
            spec,
            source,
            destination,
            4,
            imagemirror::transfer::no_progress(),
            Arc::new(Counters::default()),
        )
        .await
        .unwrap();
        assert_eq!(report.failed(), 0);
        assert!(
            report
                .items
                .iter()
                .all(|i| matches!(i.result, Ok(mirror::ItemOutcome::UpToDate))),
            "nothing to copy"
        );
    };
    sync().await;
    for round in 0..2 {
        let (src_log, dst_log) = logged(&src, &dst, sync()).await;
        eprintln!("in-process resync {round}: source {src_log:?}\ndestination {dst_log:?}");
        for (side, log) in [("source", &src_log), ("destination", &dst_log)] {
            assert_eq!(log.len(), 3, "{side}: {log:#?}");
            for tag in TAGS {
                assert_eq!(
                    count(log, "HEAD ", &format!("/manifests/{tag}")),
                    1,
                    "{side}: {log:#?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_source_or_changed_platforms_rebuild_the_index() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let all = ["linux/amd64", "linux/arm64"];
    s.push_index("multi", "oci", 31, &all, Flavor::Oci).await;
    s.push_index("multi", "docker", 32, &all, Flavor::Docker)
        .await;
    s.push_image("multi", Some("single"), 33, &[1_000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = mirror_cli(dir.path(), &doc(&src, &dst, "linux/arm64"), &[]);
    assert_eq!(code, 0, "{out}{err}");

    // The source tag moves: the resync reads the new index and rebuilds from it.
    let (moved, _) = s.push_index("multi", "oci", 34, &all, Flavor::Oci).await;
    let (src_log, _) = logged(&src, &dst, async {
        let (code, out, err) = mirror_cli(dir.path(), &doc(&src, &dst, "linux/arm64"), &[]);
        assert_eq!(code, 0, "{out}{err}");
    })
    .await;
    assert_eq!(
        count(&src_log, "GET ", "/manifests/"),
        1 + 1,
        "index + its kept child: {src_log:#?}"
    );
    let a = annotations(&dst, "oci").await;
    assert_eq!(a[filtered::SOURCE_DIGEST], moved.digest.as_str());

    // Other platforms (in another order, and repeated): both indexes are rebuilt, and the
    // annotation records the set, not the spelling.
    let (src_log, _) = logged(&src, &dst, async {
        let platforms = "linux/arm64, linux/amd64, linux/arm64";
        let (code, out, err) = mirror_cli(dir.path(), &doc(&src, &dst, platforms), &[]);
        assert_eq!(code, 0, "{out}{err}");
    })
    .await;
    assert_eq!(
        count(&src_log, "GET ", "/manifests/oci"),
        0,
        "read by digest: {src_log:#?}"
    );
    for tag in ["oci", "docker"] {
        let a = annotations(&dst, tag).await;
        assert_eq!(a[filtered::PLATFORMS], "linux/amd64,linux/arm64", "{tag}");
        let (_, bytes) = Seeder::new(dst.host())
            .get_manifest("arm", tag)
            .await
            .unwrap();
        let index: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{tag}");
    }
    // And the next resync is HEADs again on the source.
    let (src_log, _) = logged(&src, &dst, async {
        let platforms = "linux/amd64, linux/arm64";
        let (code, out, err) = mirror_cli(dir.path(), &doc(&src, &dst, platforms), &[]);
        assert_eq!(code, 0, "{out}{err}");
    })
    .await;
    assert!(
        src_log.iter().all(|r| r.starts_with("HEAD ")),
        "{src_log:#?}"
    );
    assert_eq!(src_log.len(), 3, "{src_log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_filtered_before_annotations_existed_is_kept_or_replaced_once() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_index(
        "multi",
        "oci",
        41,
        &["linux/amd64", "linux/arm64"],
        Flavor::Oci,
    )
    .await;
    let one_tag = |overwrite: bool| {
        mirror_doc(
            "arm",
            src.host(),
            "multi",
            dst.host(),
            "arm",
            &format!(
                "  tags:\n    names: [oci]\n  platforms: [linux/arm64]\n  overwrite: {overwrite}\n"
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = mirror_cli(dir.path(), &one_tag(true), &[]);
    assert_eq!(code, 0, "{out}{err}");
    // What an older version wrote: the same filtered index without the annotations.
    let (media_type, bytes) = s.get_manifest("multi", "oci").await.unwrap();
    let source = imagemirror::registry::Manifest {
        digest: imagemirror::registry::digest::sha256_digest(&bytes),
        media_type,
        bytes: bytes.into(),
    };
    let old = source
        .filter_platforms("old", &["linux/arm64".to_string()])
        .unwrap();
    let d = Seeder::new(dst.host());
    d.put_manifest("arm", "oci", &old.media_type, &old.bytes)
        .await;
    let tag_digest = || async {
        let (_, b) = d.get_manifest("arm", "oci").await.unwrap();
        imagemirror::registry::digest::sha256_digest(&b)
    };

    // overwrite: false must not move the tag: the content is the same.
    let (code, out, err) = mirror_cli(dir.path(), &one_tag(false), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tag_digest().await, old.digest);
    // overwrite: true replaces it once with the annotated index; then HEADs only.
    let (code, out, err) = mirror_cli(dir.path(), &one_tag(true), &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_ne!(tag_digest().await, old.digest);
    assert_eq!(
        annotations(&dst, "oci").await[filtered::SOURCE_DIGEST],
        source.digest.as_str()
    );
}
