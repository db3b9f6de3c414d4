//! The `ImageMirror` custom resource: types only, no IO.
//!
//! The doc comments on these types become the CRD's field descriptions, so they are written for
//! the user reading `kubectl explain imagemirror.spec`.

mod referrers;
mod status;

use kube::CustomResource;
use kube::KubeSchema;
use kube::core::crd::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub use referrers::ReferrersSpec;
pub use status::{
    ImageMirrorStatus, Progress, Summary, TagState, TagStatus, condition_reasons, condition_types,
};

/// API group of the CRD.
pub const GROUP: &str = "imagemirror.dev";
/// API version of the CRD.
pub const VERSION: &str = "v1alpha1";
/// Default resync interval when `spec.interval` is not set.
pub const DEFAULT_INTERVAL: &str = "1h";

/// Keeps the selected tags of a source repository mirrored into a destination repository.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "imagemirror.dev",
    version = "v1alpha1",
    kind = "ImageMirror",
    namespaced,
    status = "ImageMirrorStatus",
    shortname = "imgmirror",
    doc = "ImageMirror keeps the selected tags of a source repository mirrored into a destination repository.",
    category = "all",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source.repository"}"#,
    printcolumn = r#"{"name":"Destination","type":"string","jsonPath":".spec.destination.repository"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.summary.ratio"}"#,
    printcolumn = r#"{"name":"Last Sync","type":"date","jsonPath":".status.lastSyncTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new(
    "(has(self.tags) && ((has(self.tags.names) && size(self.tags.names) > 0) || (has(self.tags.include) && size(self.tags.include) > 0) || has(self.tags.semver))) || (has(self.digests) && size(self.digests) > 0)"
).message("at least one of spec.tags.names, spec.tags.include, spec.tags.semver or spec.digests is required"))]
#[serde(rename_all = "camelCase")]
pub struct ImageMirrorSpec {
    /// Where images are read from.
    pub source: RepositorySpec,
    /// Where images are written to.
    pub destination: RepositorySpec,
    /// Which tags of the source repository to mirror. `names` are always taken (unless
    /// excluded); `include` and `semver` select from the source's tags (a tag must match both
    /// when both are set); `exclude` removes; `latest` keeps the newest N of the tags selected by
    /// `include`/`semver`.
    #[serde(default, skip_serializing_if = "TagSelector::is_empty")]
    pub tags: TagSelector,
    /// Manifests pinned by digest (`sha256:<64 hex>`), copied by digest without a tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^sha256:[a-f0-9]{64}$")))]
    pub digests: Vec<String>,
    /// Platforms to keep from multi-platform indexes, as `os/arch` or `os/arch/variant`
    /// (e.g. `linux/amd64`, `linux/arm/v7`). Empty: all platforms, and indexes are copied
    /// byte-identical. When set, the destination gets a new index with only these platforms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9.]+)?$")))]
    pub platforms: Vec<String>,
    /// Resync period, a duration like `30m`, `1h` or `1h30m`. Each resync re-resolves moving
    /// tags. Default `1h`.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub interval: String,
    /// When false, a destination tag that already points at other content is never moved
    /// (the tag is reported as Failed with reason TagConflict). Default true.
    #[serde(default = "default_true")]
    pub overwrite: bool,
    /// Signatures, attestations and SBOMs copied with the images (OCI 1.1 referrers and
    /// cosign tags). Off by default.
    #[serde(default, skip_serializing_if = "ReferrersSpec::is_default")]
    pub referrers: ReferrersSpec,
    /// When true the controller does not sync this mirror. Default false.
    #[serde(default)]
    pub suspend: bool,
}

/// A repository in a registry, and how to reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    /// Repository by the docker reference rules, without tag or digest:
    /// `nginx` is `docker.io/library/nginx`; `registry.internal:5000/mirror/nginx`.
    #[schemars(length(min = 1))]
    pub repository: String,
    /// Name of a `kubernetes.io/dockerconfigjson` Secret in the same namespace with credentials
    /// for this registry. Unset: anonymous access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Talk plain `http://` instead of `https://`. Default false.
    #[serde(default, rename = "plainHTTP")]
    pub plain_http: bool,
    /// Do not verify the registry's TLS certificate. Default false.
    #[serde(default, rename = "insecureSkipTLSVerify")]
    pub insecure_skip_tls_verify: bool,
    /// Name of a Secret in the same namespace whose `ca.crt` key holds PEM certificates to trust
    /// for this registry, for private CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<String>,
}

/// Which tags to mirror.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TagSelector {
    /// Exact tag names. A listed tag missing from the source is reported as Failed (NotFound).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Glob patterns (`*`, `?`, `[abc]`) selecting source tags, e.g. `1.27.*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Glob patterns removing tags selected by `names`, `include` or `semver`, e.g. `*-rc*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// A semver range such as `>=1.25.0, <2`. Tags are parsed leniently (`v1.2`, `1.2`, `1`);
    /// tags that do not parse are not selected by this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semver: Option<String>,
    /// Keep only the newest N (semver order) of the tags selected by `include`/`semver`, after
    /// `exclude`; tags that are not versions sort oldest. `names` are not counted. At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub latest: Option<u32>,
}

impl TagSelector {
    /// True when no rule is set at all.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
            && self.include.is_empty()
            && self.exclude.is_empty()
            && self.semver.is_none()
            && self.latest.is_none()
    }
}

fn default_interval() -> String {
    DEFAULT_INTERVAL.to_string()
}

fn default_true() -> bool {
    true
}

/// The CRD as YAML, exactly as checked in at `crds/imagemirror.yaml`.
pub fn crd_yaml() -> String {
    let crd = ImageMirror::crd();
    // Serialising a CRD we built ourselves cannot fail; a failure here is a programming error.
    serde_yaml::to_string(&crd).expect("the CRD serialises to YAML")
}
