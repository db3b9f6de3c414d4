//! Shared harness: real registries, image seeding, running the binary.

pub mod artifacts;
pub mod controller;
pub mod controller_proc;
pub mod cut;
pub mod image;
pub mod kube_api;
pub mod layout;
pub mod proxy;
pub mod referrers_api;
pub mod registry;
pub mod tls;
pub mod token;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

pub use image::{Flavor, Seeder};
pub use registry::{RegistryConfig, TestRegistry};

/// An ImageMirror document copying `names` from `src/srepo` to `dst/drepo` over plain HTTP.
pub fn mirror_doc(
    name: &str,
    src: &str,
    srepo: &str,
    dst: &str,
    drepo: &str,
    extra_spec: &str,
) -> String {
    let plain = ["plainHTTP: true"];
    mirror_doc_sides(
        name,
        &side(src, srepo, &plain),
        &side(dst, drepo, &plain),
        extra_spec,
    )
}

/// The common case: tag `v1` of `src/app` to `dst/app`, over plain HTTP.
pub fn app_v1_doc(src: &str, dst: &str) -> String {
    mirror_doc("app", src, "app", dst, "app", "  tags:\n    names: [v1]\n")
}

/// One side of an ImageMirror spec: `repository: host/repo` and settings such as
/// `plainHTTP: false` or `insecureSkipTLSVerify: true`, one per line.
pub fn side(host: &str, repo: &str, settings: &[&str]) -> String {
    let mut out = format!("    repository: {host}/{repo}\n");
    for s in settings {
        out.push_str(&format!("    {s}\n"));
    }
    out
}

/// An ImageMirror document from two [`side`]s.
pub fn mirror_doc_sides(name: &str, source: &str, destination: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata:\n  name: {name}\n  namespace: test\nspec:\n  source:\n{source}  destination:\n{destination}{extra_spec}"
    )
}

/// Serves `app` on an ephemeral loopback port until the test ends; returns its `host:port`.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    host
}

/// Runs the real binary with `args` and an empty docker config unless `--auth-file` is given.
pub fn run_cli(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_imagemirror"))
        .args(args)
        .env("DOCKER_CONFIG", dir)
        // IMAGEMIRROR_TEST_LOG_LEVEL=debug shows the binary's debug log when a test fails.
        .env(
            "IMAGEMIRROR_LOG_LEVEL",
            std::env::var("IMAGEMIRROR_TEST_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .expect("run imagemirror")
}

/// Writes `docs` to a file in `dir` and runs `imagemirror mirror -f` on it plus `extra` args.
pub fn mirror_cli(dir: &Path, docs: &str, extra: &[&str]) -> (i32, String, String) {
    let file = dir.join(format!("mirror-{}.yaml", rand::random::<u32>()));
    std::fs::write(&file, docs).expect("write mirror yaml");
    let mut args = vec!["mirror", "-f", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = run_cli(dir, &args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Images in repositories `src/app-{i}` that share one base layer, and the documents that
/// mirror each of them to `dst/app-{i}`.
pub struct SharedBase {
    /// One ImageMirror document per image (join them with `---`).
    pub docs: Vec<String>,
    /// The images, in repository order.
    pub images: Vec<image::Pushed>,
    /// The digest of the shared layer.
    pub base_digest: String,
}

/// Pushes `n` images tagged `v1` to `src`, each with the layer `base` and a small layer of its
/// own, and writes the documents mirroring `src/app-{i}` to `dst/app-{i}` on `dst`.
pub async fn apps_sharing_a_base(src: &str, dst: &str, n: u64, base: &[u8]) -> SharedBase {
    let s = Seeder::new(src);
    let mut out = SharedBase {
        docs: Vec::new(),
        images: Vec::new(),
        base_digest: String::new(),
    };
    for i in 0..n {
        let repo = format!("src/app-{i}");
        let (d, size) = s.push_blob(&repo, base).await;
        out.base_digest = d.clone();
        let own = s
            .push_blob(&repo, &image::random_bytes(200 + i, 1000))
            .await;
        let config = s
            .push_blob(&repo, format!("{{\"app\":{i}}}").as_bytes())
            .await;
        let image = s
            .push_manifest_for(&repo, Some("v1"), config, vec![(d, size), own], Flavor::Oci)
            .await;
        out.images.push(image);
        out.docs.push(mirror_doc(
            &format!("app-{i}"),
            src,
            &repo,
            dst,
            &format!("dst/app-{i}"),
            "  tags:\n    names: [v1]\n",
        ));
    }
    out
}

/// The tags of `repo` at `host` (plain HTTP, anonymous), asked of the registry directly.
pub async fn tag_set(host: &str, repo: &str) -> BTreeSet<String> {
    let v: serde_json::Value = reqwest::get(format!("http://{host}/v2/{repo}/tags/list"))
        .await
        .expect("GET the tag list")
        .json()
        .await
        .expect("a JSON tag list");
    v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str().map(String::from))
        .collect()
}

/// `names` as a set, to compare with [`tag_set`].
pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}
