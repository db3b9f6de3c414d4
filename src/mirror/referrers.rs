//! The referrers pass: after an item is mirrored, copy what refers to its manifests
//! (signatures, attestations, SBOMs), discovered by the OCI 1.1 referrers API, else the
//! referrers tag schema (`sha256-<hex>`), plus cosign's `sha256-<hex>.sig/.att/.sbom` tags.
//! This file holds the options, results, errors and pure parts; `referrers_copy.rs` does the IO.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU8;

use bytes::Bytes;
use tokio::sync::OnceCell;

use super::copy::MirrorError;
use crate::api::ReferrersSpec;
use crate::registry::digest::sha256_digest;
use crate::registry::manifest::OCI_INDEX;
use crate::registry::referrers::{Referrer, parse_referrers_index};
use crate::registry::{Manifest, RegistryError};

/// Referrers of referrers are followed this many levels below the image (image → SBOM →
/// signature on the SBOM is 2).
pub const MAX_REFERRER_DEPTH: usize = 3;
/// Referrers followed for one item, over all levels; more fail the item.
pub const MAX_REFERRERS_PER_ITEM: u32 = 1000;
/// Config media types that say nothing about what an artifact is.
const GENERIC_CONFIGS: [&str; 3] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.empty.v1+json",
];

/// What the referrers pass of a job is asked to do.
#[derive(Clone, Debug, Default)]
pub struct ReferrersOptions {
    /// Copy only these artifact types, at every level; empty: all.
    pub artifact_types: Vec<String>,
    /// The source's tags when the plan already listed them (saves a request).
    pub source_tags: Option<Arc<HashSet<String>>>,
}

impl ReferrersOptions {
    /// The options for `spec.referrers`; `None` when referrers are not enabled.
    pub fn from_spec(
        spec: &ReferrersSpec,
        source_tags: Option<Arc<HashSet<String>>>,
    ) -> Option<Self> {
        spec.enabled.then(|| ReferrersOptions {
            artifact_types: spec.artifact_types.clone(),
            source_tags,
        })
    }

    /// Whether a referrer of this artifact type is wanted.
    pub fn wants(&self, artifact_type: Option<&str>) -> bool {
        self.artifact_types.is_empty()
            || artifact_type.is_some_and(|t| self.artifact_types.iter().any(|w| w == t))
    }
}

/// What the referrers pass did for one item.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferrersOutcome {
    /// Referrers the destination holds for the item after the sync (copied now or already
    /// there), at every level, cosign tags included.
    pub count: u32,
    /// Something the user should know, e.g. that platform filtering left the source index's
    /// signatures behind.
    pub note: Option<String>,
}

/// Why a referrer could not be mirrored; fails the item.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReferrerError {
    /// Copying one referrer failed.
    #[error("referrer {digest} ({artifact_type}) of {subject}: {cause}")]
    Copy {
        digest: String,
        artifact_type: String,
        subject: String,
        cause: Box<MirrorError>,
    },
    /// Copying a cosign tag failed.
    #[error("cosign tag {tag} ({artifact_type}{digest}): {cause}")]
    CosignTag {
        tag: String,
        artifact_type: String,
        /// `, sha256:…` when known.
        digest: String,
        cause: Box<MirrorError>,
    },
    /// Listing the referrers of a manifest failed.
    #[error("listing referrers of {subject}: {cause}")]
    Discover {
        subject: String,
        cause: Box<MirrorError>,
    },
    /// More referrers than an item may have.
    #[error("{subject}: more than {limit} referrers over all levels; refusing to follow more")]
    TooMany { subject: String, limit: u32 },
    /// Updating the destination's fallback index failed.
    #[error("referrers index {tag} at the destination: {cause}")]
    Index {
        tag: String,
        cause: Box<MirrorError>,
    },
}

/// What one job learnt about its registries, shared by its items.
#[derive(Default)]
pub(super) struct JobState {
    /// Whether each side serves the referrers API.
    pub(super) source_api: AtomicU8,
    pub(super) destination_api: AtomicU8,
    /// Held while a side's first API request learns whether it serves the API, so the items
    /// running at once do not all ask.
    pub(super) source_probe: tokio::sync::Mutex<()>,
    pub(super) destination_probe: tokio::sync::Mutex<()>,
    /// The source's API answers that taught it, kept for their subject.
    pub(super) probe_answers: std::sync::Mutex<HashMap<String, Vec<Referrer>>>,
    /// Each side's tags; `None` inside: not known (the list failed or was too long).
    pub(super) source_tags: OnceCell<Option<Arc<HashSet<String>>>>,
    pub(super) destination_tags: OnceCell<Option<Arc<HashSet<String>>>>,
    /// Subjects already handled in this job, with their referrer counts.
    pub(super) done: std::sync::Mutex<HashMap<String, u32>>,
}

/// How the item's top manifest ended, for the referrers pass.
#[derive(Default)]
pub(super) struct Top {
    /// Its media type, when known.
    pub(super) media_type: Option<String>,
    /// The manifest as written to the destination, when it was fetched.
    pub(super) manifest: Option<Manifest>,
    /// True when platforms were filtered out of the index.
    pub(super) filtered: bool,
}

/// The artifact type of a manifest as the referrers API reports it (`artifactType`, else the
/// config's media type), except that a generic image config gives way to the first layer's
/// media type: that is what tells a cosign signature
/// (`application/vnd.dev.cosign.simplesigning.v1+json`) from an attestation.
pub fn artifact_type_of(bytes: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let text = |v: &serde_json::Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
    if let Some(t) = doc.get("artifactType").and_then(text) {
        return Some(t);
    }
    let config = doc.pointer("/config/mediaType").and_then(text);
    match config {
        Some(c) if !GENERIC_CONFIGS.contains(&c.as_str()) => Some(c),
        _ => doc.pointer("/layers/0/mediaType").and_then(text).or(config),
    }
}

/// The fallback index after adding `new` entries to `existing` (kept verbatim, foreign
/// referrers included); `None` when `existing` already lists them all.
pub fn merge_fallback_index(
    what: &str,
    existing: Option<&[u8]>,
    new: &[Referrer],
) -> Result<Option<Manifest>, RegistryError> {
    let mut doc: serde_json::Value = match existing {
        Some(bytes) => {
            // Refuse what we cannot read rather than overwrite someone's referrers.
            parse_referrers_index(what, bytes)?;
            serde_json::from_slice(bytes).map_err(|e| RegistryError::ManifestInvalid {
                what: what.to_string(),
                detail: e.to_string(),
            })?
        }
        None => serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
    };
    if doc.get("manifests").is_none() {
        doc["manifests"] = serde_json::json!([]);
    }
    let Some(entries) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) else {
        return Err(RegistryError::ManifestInvalid {
            what: what.to_string(),
            detail: "manifests is not a list".into(),
        });
    };
    let listed: HashSet<String> = entries
        .iter()
        .filter_map(|e| e.get("digest")?.as_str().map(str::to_string))
        .collect();
    let mut added = HashSet::new();
    for r in new {
        if !listed.contains(&r.digest) && added.insert(r.digest.clone()) {
            entries.push(r.raw.clone());
        }
    }
    if added.is_empty() {
        return Ok(None);
    }
    let bytes =
        Bytes::from(
            serde_json::to_vec(&doc).map_err(|e| RegistryError::ManifestInvalid {
                what: what.to_string(),
                detail: e.to_string(),
            })?,
        );
    Ok(Some(Manifest {
        media_type: OCI_INDEX.to_string(),
        digest: sha256_digest(&bytes),
        bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Parsed;
    use serde_json::json;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn referrer(c: char, artifact_type: &str) -> Referrer {
        let raw = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d(c), "size": 10, "artifactType": artifact_type});
        Referrer {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: d(c),
            size: 10,
            artifact_type: Some(artifact_type.into()),
            raw,
        }
    }

    #[test]
    fn artifact_types_of_cosign_and_oci_artifacts() {
        let sig = json!({"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json"}]});
        let sbom = json!({"schemaVersion": 2, "artifactType": "application/spdx+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json"}, "layers": []});
        let typed_config =
            json!({"config": {"mediaType": "application/vnd.cncf.notary.signature"}});
        let bare = json!({"config": {"mediaType": "application/vnd.oci.image.config.v1+json"}});
        let of = |v: serde_json::Value| artifact_type_of(&serde_json::to_vec(&v).unwrap());
        assert_eq!(
            of(sig).as_deref(),
            Some("application/vnd.dev.cosign.simplesigning.v1+json")
        );
        assert_eq!(of(sbom).as_deref(), Some("application/spdx+json"));
        assert_eq!(
            of(typed_config).as_deref(),
            Some("application/vnd.cncf.notary.signature")
        );
        assert_eq!(
            of(bare).as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert_eq!(artifact_type_of(b"not json"), None);
    }

    #[test]
    fn filters_by_artifact_type() {
        let all = ReferrersOptions::default();
        assert!(all.wants(None) && all.wants(Some("x")));
        let sbom = ReferrersOptions {
            artifact_types: vec!["application/spdx+json".into()],
            source_tags: None,
        };
        assert!(sbom.wants(Some("application/spdx+json")));
        assert!(!sbom.wants(Some("application/vnd.cncf.notary.signature")));
        assert!(!sbom.wants(None));
        let spec = ReferrersSpec::default();
        assert!(ReferrersOptions::from_spec(&spec, None).is_none());
    }

    #[test]
    fn merging_keeps_foreign_referrers_and_adds_only_what_is_missing() {
        let foreign = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d('f'), "size": 3, "artifactType": "x/foreign",
            "annotations": {"who": "someone else"}});
        let existing = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
            "annotations": {"keep": "me"}, "manifests": [foreign.clone(), referrer('a', "t").raw]}))
        .unwrap();
        let merged = merge_fallback_index(
            "r:sha256-x",
            Some(&existing),
            &[referrer('a', "t"), referrer('b', "application/spdx+json")],
        )
        .unwrap()
        .expect("b is new");
        let doc: serde_json::Value = serde_json::from_slice(&merged.bytes).unwrap();
        let entries = doc["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0], foreign);
        assert_eq!(entries[2]["digest"], d('b'));
        assert_eq!(doc["annotations"]["keep"], "me");
        assert_eq!(merged.digest, sha256_digest(&merged.bytes));
        // Everything listed already: nothing to write.
        assert!(
            merge_fallback_index("r:sha256-x", Some(&merged.bytes), &[referrer('b', "t")])
                .unwrap()
                .is_none()
        );
        // A new index from nothing.
        let fresh = merge_fallback_index("r:sha256-x", None, &[referrer('c', "t")])
            .unwrap()
            .unwrap();
        assert_eq!(fresh.media_type, OCI_INDEX);
        let fresh = Manifest::from_bytes("r", Some(OCI_INDEX), fresh.bytes).unwrap();
        assert!(
            matches!(fresh.parse("r").unwrap(), Parsed::Index { manifests } if manifests.len() == 1)
        );
    }

    #[test]
    fn an_unreadable_fallback_index_is_never_overwritten() {
        let e = merge_fallback_index(
            "dst/app:sha256-x",
            Some(b"{\"manifests\":7}"),
            &[referrer('a', "t")],
        )
        .unwrap_err();
        assert_eq!(e.reason(), "ManifestInvalid");
        assert!(e.to_string().contains("dst/app:sha256-x"), "{e}");
    }
}
