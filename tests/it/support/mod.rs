//! Shared harness: real registries, image seeding, running the binary.

pub mod cut;
pub mod image;
pub mod kube_api;
pub mod proxy;
pub mod registry;
pub mod tls;
pub mod token;

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

/// Runs the real binary with `args` and an empty docker config unless `--auth-file` is given.
pub fn run_cli(dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_imagemirror"))
        .args(args)
        .env("DOCKER_CONFIG", dir)
        .env("IMAGEMIRROR_LOG_LEVEL", "warn")
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
