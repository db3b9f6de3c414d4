//! `spec.referrers`: signatures, attestations and SBOMs copied with the image.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::validation::limits;

/// Copy the artifacts that refer to the mirrored manifests: signatures, attestations and SBOMs.
/// Discovered, for every manifest copied (each tag's manifest or index, each kept child of an
/// index, each pinned digest), through the OCI 1.1 referrers API, else the referrers tag schema
/// (tag `sha256-<hex>`), plus cosign's tags `sha256-<hex>.sig`, `.att` and `.sbom`; referrers of
/// referrers (a signature on an SBOM) are followed 3 levels deep. Cost: per sync, one referrers
/// API request and one tag list on the source (all it costs when the source has neither the API
/// nor any `sha256-` tag); where anything is attached, per manifest one discovery request on
/// each side (the referrers API, or the fallback tag) plus one per cosign tag present.
/// When `platforms` filters an index, the rebuilt index has a new digest: signatures on the
/// source index do not apply to it and are not copied; its children keep theirs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReferrersSpec {
    /// Copy referrers. Default false.
    #[serde(default)]
    pub enabled: bool,
    /// Copy only referrers of these artifact types (e.g. `application/spdx+json`,
    /// `application/vnd.dev.cosign.simplesigning.v1+json` for cosign signatures), at every
    /// level. Empty: all types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::ARTIFACT_TYPES),
        inner(length(min = 1, max = limits::ARTIFACT_TYPE))
    )]
    pub artifact_types: Vec<String>,
}

impl ReferrersSpec {
    /// True when nothing is set (the default): not written out.
    pub fn is_default(&self) -> bool {
        *self == ReferrersSpec::default()
    }
}
