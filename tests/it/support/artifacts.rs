//! Artifacts in the formats real tools write, built by the harness's own code: a cosign
//! signature (simple-signing payload under `sha256-<hex>.sig`), OCI 1.1 artifacts with a
//! `subject` (SBOMs, attestations, Notation-style signatures), and the referrers tag schema's
//! fallback index (`sha256-<hex>`).

use serde_json::json;

use imagemirror::registry::digest::sha256_digest;
use imagemirror::registry::manifest::{OCI_INDEX, OCI_MANIFEST};

use super::image::{Pushed, Seeder};

/// cosign's simple-signing payload layer.
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation carrying a cosign signature.
pub const COSIGN_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// SPDX SBOMs.
pub const SPDX: &str = "application/spdx+json";
/// in-toto attestations.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// Notation signatures.
pub const NOTATION: &str = "application/vnd.cncf.notary.signature";
/// OCI 1.1's empty config.
const EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// An OCI 1.1 artifact as pushed, with its artifact type.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub pushed: Pushed,
    pub artifact_type: String,
}

impl Artifact {
    /// Its descriptor as a referrers index lists it.
    pub fn descriptor(&self) -> serde_json::Value {
        json!({
            "mediaType": self.pushed.media_type,
            "digest": self.pushed.digest,
            "size": self.pushed.bytes.len(),
            "artifactType": self.artifact_type,
            "annotations": {"org.opencontainers.image.created": "2026-12-02T07:00:00Z"},
        })
    }
}

/// `sha256:<hex>` → `sha256-<hex>`.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

/// The simple-signing payload cosign signs for `digest`.
pub fn simple_signing_payload(docker_reference: &str, digest: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
    .unwrap()
}

/// Pushes a cosign signature of `subject` to `repo` under `sha256-<hex>.sig`, as `cosign
/// sign` does: an OCI manifest whose one layer is the simple-signing payload, annotated with
/// the (here: made-up, base64) signature. Returns it and its tag.
pub async fn cosign_signature(
    s: &Seeder,
    repo: &str,
    docker_reference: &str,
    subject: &Pushed,
) -> (Pushed, String) {
    let payload = simple_signing_payload(docker_reference, &subject.digest);
    let layer = s.push_blob(repo, &payload).await;
    let config = json!({
        "architecture": "", "os": "", "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "rootfs": {"type": "layers", "diff_ids": [layer.0]},
    })
    .to_string();
    let config = s.push_blob(repo, config.as_bytes()).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": [{
            "mediaType": SIMPLE_SIGNING, "digest": layer.0, "size": layer.1,
            "annotations": {COSIGN_SIGNATURE: "MEUCIQDx0dGVzdC1zaWduYXR1cmUtbm90LXJlYWwAIhAKaGFybmVzcw=="},
        }],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let tag = format!("{}.sig", fallback_tag(&subject.digest));
    s.put_manifest(repo, &tag, OCI_MANIFEST, &bytes).await;
    let pushed = Pushed {
        digest: sha256_digest(&bytes),
        media_type: OCI_MANIFEST.into(),
        bytes,
        blobs: vec![config, layer],
    };
    (pushed, tag)
}

/// Pushes an OCI 1.1 artifact of `artifact_type` (empty config, one layer `payload`) whose
/// `subject` is `subject`, by digest, as `oras attach` does.
pub async fn attach(
    s: &Seeder,
    repo: &str,
    subject: &Pushed,
    artifact_type: &str,
    payload: &[u8],
) -> Artifact {
    let empty = s.push_blob(repo, b"{}").await;
    let layer = s.push_blob(repo, payload).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY, "digest": empty.0, "size": empty.1},
        "layers": [{"mediaType": artifact_type, "digest": layer.0, "size": layer.1}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.bytes.len()},
        "annotations": {"org.opencontainers.image.created": "2026-12-02T07:00:00Z"},
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = sha256_digest(&bytes);
    s.put_manifest(repo, &digest, OCI_MANIFEST, &bytes).await;
    Artifact {
        pushed: Pushed {
            digest,
            media_type: OCI_MANIFEST.into(),
            bytes,
            blobs: vec![empty, layer],
        },
        artifact_type: artifact_type.into(),
    }
}

/// Pushes the referrers tag schema's index for `subject` listing `referrers` (what a client
/// does against a registry without the referrers API).
pub async fn push_fallback_index(
    s: &Seeder,
    repo: &str,
    subject: &str,
    referrers: &[&Artifact],
) -> Vec<u8> {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": referrers.iter().map(|a| a.descriptor()).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    s.put_manifest(repo, &fallback_tag(subject), OCI_INDEX, &bytes)
        .await;
    bytes
}

/// The digests a fallback index (or referrers answer) lists.
pub fn listed_digests(index: &[u8]) -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_slice(index).expect("index is JSON");
    doc["manifests"]
        .as_array()
        .expect("index lists manifests")
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect()
}
