//! `imagemirror mirror --prune` against real distribution registries (deletes enabled, as the
//! harness configures them, unless a test turns them off).

use std::collections::BTreeSet;
use std::path::Path;

use crate::support::{
    Flavor, RegistryConfig, Seeder, TestRegistry, mirror_doc, run_cli, set, tag_set,
};

/// Writes `doc` to `dir/mirrors.yaml` (the same file every time, so the default state file
/// beside it carries over) and runs `imagemirror mirror -f` on it with `--output json`.
fn run(dir: &Path, doc: &str, extra: &[&str]) -> (i32, Vec<serde_json::Value>, String) {
    let file = dir.join("mirrors.yaml");
    std::fs::write(&file, doc).unwrap();
    let mut args = vec!["mirror", "-f", file.to_str().unwrap(), "--output", "json"];
    args.extend_from_slice(extra);
    let out = run_cli(dir, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let rows: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    (
        out.status.code().unwrap_or(-1),
        rows.as_array().cloned().unwrap_or_default(),
        stderr,
    )
}

/// The items of `rows` in `state`.
fn items(rows: &[serde_json::Value], state: &str) -> BTreeSet<String> {
    rows.iter()
        .filter(|r| r["state"] == state)
        .map(|r| r["item"].as_str().unwrap().to_string())
        .collect()
}

fn doc(src: &TestRegistry, dst: &TestRegistry, spec: &str) -> String {
    mirror_doc("app", src.host(), "app", dst.host(), "mirror/app", spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_two_moves_on_and_what_others_pushed_stays() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    for (i, t) in ["1.0", "1.1", "1.2", "1.3"].iter().enumerate() {
        s.push_image("app", Some(t), 10 + i as u64, &[2000], Flavor::Oci)
            .await;
    }
    // Someone else's tags in the destination: one the mirror never selects, one it selected
    // once but found already there (so it never wrote it).
    let d = Seeder::new(dst.host());
    d.push_image("mirror/app", Some("theirs"), 99, &[1000], Flavor::Oci)
        .await;
    // The same content as the source's 1.3 (seed 13): found up to date, never written.
    d.push_image("mirror/app", Some("1.3"), 13, &[2000], Flavor::Oci)
        .await;
    let spec = "  tags:\n    include: [\"1.*\"]\n    latest: 2\n";
    let dir = tempfile::tempdir().unwrap();
    let (code, rows, stderr) = run(dir.path(), &doc(&src, &dst, spec), &["--prune"]);
    assert_eq!(code, 0, "{rows:?}\n{stderr}");
    assert_eq!(items(&rows, "Copied"), set(&["1.2"]));
    assert_eq!(items(&rows, "UpToDate"), set(&["1.3"]));
    assert!(items(&rows, "Pruned").is_empty(), "{rows:?}");
    assert!(
        dir.path().join("mirrors.prune-state.json").exists(),
        "the state file goes beside the YAML"
    );

    for (i, t) in ["1.4", "1.5"].iter().enumerate() {
        s.push_image("app", Some(t), 20 + i as u64, &[2000], Flavor::Oci)
            .await;
    }
    let (code, rows, stderr) = run(dir.path(), &doc(&src, &dst, spec), &["--prune"]);
    assert_eq!(code, 0, "{rows:?}\n{stderr}");
    assert_eq!(items(&rows, "Pruned"), set(&["1.2"]), "{rows:?}");
    assert_eq!(
        tag_set(dst.host(), "mirror/app").await,
        set(&["1.3", "1.4", "1.5", "theirs"])
    );
    // A third run has nothing left to prune and deletes nothing.
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, spec), &["--prune"]);
    assert_eq!(code, 0);
    assert!(items(&rows, "Pruned").is_empty(), "{rows:?}");
    let deletes = dst
        .responses()
        .into_iter()
        .filter(|r| r.request.starts_with("DELETE") && r.status == 202)
        .count();
    assert_eq!(
        deletes, 1,
        "one digest delete for the one pruned tag, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deselected_name_goes_with_prune_true_and_stays_with_prune_false() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("app", Some("a"), 1, &[1000], Flavor::Oci)
        .await;
    s.push_image("app", Some("b"), 2, &[1000], Flavor::Docker)
        .await;
    let dir = tempfile::tempdir().unwrap();
    // spec.prune alone turns pruning on; no flag.
    let both = "  prune: true\n  tags:\n    names: [a, b]\n";
    let (code, _, stderr) = run(dir.path(), &doc(&src, &dst, both), &[]);
    assert_eq!(code, 0, "{stderr}");

    // prune: false keeps the deselected tag.
    let kept = "  prune: false\n  tags:\n    names: [a]\n";
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, kept), &[]);
    assert_eq!(code, 0);
    assert!(items(&rows, "Pruned").is_empty(), "{rows:?}");
    assert_eq!(tag_set(dst.host(), "mirror/app").await, set(&["a", "b"]));

    // prune: true deletes it: the record from the first run still knows it wrote b.
    let pruned = "  prune: true\n  tags:\n    names: [a]\n";
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, pruned), &[]);
    assert_eq!(code, 0);
    assert_eq!(items(&rows, "Pruned"), set(&["b"]), "{rows:?}");
    assert_eq!(tag_set(dst.host(), "mirror/app").await, set(&["a"]));
    let state = std::fs::read_to_string(dir.path().join("mirrors.prune-state.json")).unwrap();
    assert!(
        state.contains("\"a\"") && !state.contains("\"b\""),
        "{state}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tags_at_one_digest_one_deselected_the_other_still_resolves() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    let img = s
        .push_image("app", Some("1.0"), 3, &[1000], Flavor::Oci)
        .await;
    s.put_manifest("app", "1.0.0", &img.media_type, &img.bytes)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let state = state.to_str().unwrap();
    let spec = "  tags:\n    names: [\"1.0\", \"1.0.0\"]\n";
    let (code, _, stderr) = run(
        dir.path(),
        &doc(&src, &dst, spec),
        &["--prune", "--state", state],
    );
    assert_eq!(code, 0, "{stderr}");
    let spec = "  tags:\n    names: [\"1.0\"]\n";
    let (code, rows, _) = run(
        dir.path(),
        &doc(&src, &dst, spec),
        &["--prune", "--state", state],
    );
    assert_eq!(code, 0);
    // Distribution 2.x deletes only by digest, which would take 1.0 too: 1.0.0 is kept, and
    // the summary says why.
    assert!(items(&rows, "Pruned").is_empty(), "{rows:?}");
    let kept: Vec<_> = rows.iter().filter(|r| r["state"] == "Retained").collect();
    assert_eq!(kept.len(), 1, "{rows:?}");
    assert_eq!(kept[0]["item"], "1.0.0");
    assert_eq!(kept[0]["reason"], "DigestShared");
    assert!(
        kept[0]["message"].as_str().unwrap().contains("tag 1.0"),
        "{kept:?}"
    );
    let d = Seeder::new(dst.host());
    d.assert_copy_of("mirror/app", "1.0", &img).await;
    assert_eq!(
        tag_set(dst.host(), "mirror/app").await,
        set(&["1.0", "1.0.0"])
    );
    assert!(
        !dst.requests()
            .iter()
            .any(|r| r.starts_with("DELETE") && r.contains(&img.digest)),
        "the shared digest was never deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_a_failing_tag_prunes_nothing() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    s.push_image("app", Some("a"), 4, &[1000], Flavor::Oci)
        .await;
    s.push_image("app", Some("b"), 5, &[1000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = "  prune: true\n  tags:\n    names: [a, b]\n";
    assert_eq!(run(dir.path(), &doc(&src, &dst, spec), &[]).0, 0);
    // b is deselected, but "gone" does not exist: the sync is partial, nothing is pruned.
    let spec = "  prune: true\n  tags:\n    names: [a, gone]\n";
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, spec), &[]);
    assert_eq!(code, 1, "the missing tag fails the run");
    assert!(items(&rows, "Pruned").is_empty(), "{rows:?}");
    let note: Vec<_> = rows.iter().filter(|r| r["state"] == "NotPruned").collect();
    assert_eq!(note.len(), 1, "{rows:?}");
    assert!(note[0]["message"].as_str().unwrap().contains("failed"));
    assert_eq!(tag_set(dst.host(), "mirror/app").await, set(&["a", "b"]));
    assert!(!dst.requests().iter().any(|r| r.starts_with("DELETE")));
    // Once the selection is whole again, b goes.
    let spec = "  prune: true\n  tags:\n    names: [a]\n";
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, spec), &[]);
    assert_eq!(code, 0);
    assert_eq!(items(&rows, "Pruned"), set(&["b"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_exactly_what_the_next_run_deletes() {
    let (src, dst) = (TestRegistry::start(), TestRegistry::start());
    let s = Seeder::new(src.host());
    for (i, t) in ["1", "2", "3", "4"].iter().enumerate() {
        s.push_image("app", Some(t), 30 + i as u64, &[1000], Flavor::Oci)
            .await;
    }
    // 3b shares its digest with 3, so deselecting 3 must keep it.
    let three = s.get_manifest("app", "3").await.unwrap();
    s.put_manifest("app", "3b", &three.0, &three.1).await;
    let dir = tempfile::tempdir().unwrap();
    let all = "  tags:\n    names: [\"1\", \"2\", \"3\", \"3b\", \"4\"]\n";
    assert_eq!(run(dir.path(), &doc(&src, &dst, all), &["--prune"]).0, 0);
    let fewer = "  tags:\n    names: [\"3b\", \"4\"]\n";
    let (code, rows, stderr) = run(
        dir.path(),
        &doc(&src, &dst, fewer),
        &["--prune", "--dry-run"],
    );
    assert_eq!(code, 0, "{stderr}");
    let would = items(&rows, "WouldPrune");
    assert_eq!(would, set(&["1", "2"]), "{rows:?}");
    assert_eq!(items(&rows, "Retained"), set(&["3"]), "{rows:?}");
    // The dry run deleted nothing (the probes ask about objects that do not exist).
    assert_eq!(
        tag_set(dst.host(), "mirror/app").await,
        set(&["1", "2", "3", "3b", "4"])
    );
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, fewer), &["--prune"]);
    assert_eq!(code, 0);
    assert_eq!(items(&rows, "Pruned"), would);
    assert_eq!(items(&rows, "Retained"), set(&["3"]));
    assert_eq!(
        tag_set(dst.host(), "mirror/app").await,
        set(&["3", "3b", "4"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_refusing_deletes_is_a_warning_not_a_failure() {
    let src = TestRegistry::start();
    let dst = TestRegistry::start_with(RegistryConfig {
        deletes_disabled: true,
        ..Default::default()
    });
    let s = Seeder::new(src.host());
    s.push_image("app", Some("a"), 6, &[1000], Flavor::Oci)
        .await;
    s.push_image("app", Some("b"), 7, &[1000], Flavor::Oci)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = "  prune: true\n  tags:\n    names: [a, b]\n";
    assert_eq!(run(dir.path(), &doc(&src, &dst, spec), &[]).0, 0);
    let spec = "  prune: true\n  tags:\n    names: [a]\n";
    let (code, rows, _) = run(dir.path(), &doc(&src, &dst, spec), &[]);
    assert_eq!(code, 0, "a refused delete does not fail the run: {rows:?}");
    let kept: Vec<_> = rows.iter().filter(|r| r["state"] == "Retained").collect();
    assert_eq!(kept.len(), 1, "{rows:?}");
    assert_eq!(kept[0]["reason"], "DeleteRefused");
    let note: Vec<_> = rows.iter().filter(|r| r["state"] == "NotPruned").collect();
    assert!(
        note[0]["message"]
            .as_str()
            .unwrap()
            .contains("refuses deletes"),
        "{note:?}"
    );
    assert_eq!(tag_set(dst.host(), "mirror/app").await, set(&["a", "b"]));
}
