//! The checked-in CRD must be what the Rust types generate.

use std::path::Path;

const REGENERATE: &str = "cargo run -q -- crd > crds/imagemirror.yaml && cp crds/imagemirror.yaml charts/imagemirror/crds/imagemirror.yaml";

#[test]
fn checked_in_crds_match_the_types() {
    let generated = imagemirror::api::crd_yaml();
    for path in [
        "crds/imagemirror.yaml",
        "charts/imagemirror/crds/imagemirror.yaml",
    ] {
        let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let on_disk = std::fs::read_to_string(&full).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{path} differs from what the Rust types generate; regenerate with:\n  {REGENERATE}"
        );
    }
}

#[test]
fn crd_carries_the_validation_rules() {
    let crd = imagemirror::api::crd_yaml();
    for needle in [
        "x-kubernetes-validations",
        "at least one of spec.tags.names",
        "minimum: 1",
        "minLength: 1",
        r"pattern: ^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$",
        "shortNames:\n    - imgmirror",
        "subresources:\n      status: {}",
        "insecureSkipTLSVerify",
        "plainHTTP",
    ] {
        assert!(crd.contains(needle), "CRD lacks {needle:?}");
    }
}

#[test]
fn examples_parse_and_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = imagemirror::cli::parse_documents(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        for d in docs.iter().filter(|d| d.metadata.name.is_some()) {
            imagemirror::mirror::validate(&d.spec)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected at least two example ImageMirrors, found {seen}"
    );
}

#[test]
fn non_imagemirror_documents_are_refused_by_position() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n";
    let err = imagemirror::cli::parse_documents("f.yaml", text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("f.yaml, document 1") && err.contains("ConfigMap"),
        "{err}"
    );
    let text = "apiVersion: imagemirror.dev/v1alpha1\nkind: ImageMirror\nmetadata: {name: x}\nspec: {source: {}}\n";
    let err = imagemirror::cli::parse_documents("f.yaml", text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("repository") || err.contains("destination"),
        "{err}"
    );
}
