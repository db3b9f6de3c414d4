//! Helpers for the OCI layout tests: layout sides of ImageMirror documents, skopeo, and
//! reading a layout's index and blobs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use imagemirror::registry::digest::sha256_digest;

use super::{Seeder, side};

/// A side that is a layout, not a registry.
pub fn local(repository: &str) -> String {
    format!("    repository: {repository}\n")
}

/// A registry side over plain HTTP.
pub fn plain(host: &str, repo: &str) -> String {
    side(host, repo, &["plainHTTP: true"])
}

/// `tags.names` of a spec.
pub fn tags(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("  tags:\n    names: [{}]\n", quoted.join(", "))
}

/// Runs skopeo; (success, stdout, stderr).
pub fn skopeo(args: &[&str]) -> (bool, String, String) {
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

/// Runs skopeo, which must succeed; its stdout.
pub fn skopeo_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = skopeo(args);
    assert!(ok, "skopeo {args:?} failed: {stderr}");
    stdout
}

/// The layout's tags: ref name → manifest digest.
pub fn index_tags(dir: &Path) -> BTreeMap<String, String> {
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

/// `blobs/sha256/<hex>` of a layout.
pub fn blob_file(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The digest of a tag at a registry (of its exact bytes).
pub async fn registry_digest(host: &str, repo: &str, tag: &str) -> Option<String> {
    let (_, bytes) = Seeder::new(host).get_manifest(repo, tag).await?;
    Some(sha256_digest(&bytes))
}

/// The rows of `--output json`.
pub fn json_rows(stdout: &str) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
        .as_array()
        .unwrap()
        .clone()
}

/// File name → (inode, size) of the layout's blobs.
pub fn blob_files(layout: &Path) -> BTreeMap<String, (u64, u64)> {
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
pub fn partial_bytes(layout: &Path) -> u64 {
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

/// The names in a tar file, in order (GNU tar).
pub fn tar_names(archive: &Path) -> Vec<String> {
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
