//! The `ImageMirror` custom resource: types only, no IO.
//!
//! The doc comments on these types become the CRD's field descriptions, so they are written for
//! the user reading `kubectl explain imagemirror.spec`.

mod referrers;
mod status;
pub mod validation;

use kube::CustomResource;
use kube::KubeSchema;
use kube::core::crd::CustomResourceExt;
use schemars::Schema;
use serde::{Deserialize, Serialize};

pub use referrers::ReferrersSpec;
use validation::{
    DIGEST_PATTERN, INTERVAL_MESSAGE, INTERVAL_PATTERN, INTERVAL_RULE, PLATFORM_PATTERN,
    SECRET_NAME_PATTERN, SELECTOR_MESSAGE, SELECTOR_RULE, TAG_PATTERN, limits,
};

pub use status::{
    ImageMirrorStatus, Progress, PruneStatus, Summary, TagState, TagStatus, condition_reasons,
    condition_types,
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
#[x_kube(validation = Rule::new(SELECTOR_RULE).message(SELECTOR_MESSAGE))]
#[schemars(transform = signed_integer_formats)]
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
    /// Manifests pinned by digest (`sha256:<64 hex>`), copied by digest without a tag. At most
    /// 1000.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::DIGESTS), inner(regex(pattern = DIGEST_PATTERN)))]
    pub digests: Vec<String>,
    /// Platforms to keep from multi-platform indexes, as `os/arch` or `os/arch/variant`
    /// (e.g. `linux/amd64`, `linux/arm/v7`); at most 64. Empty: all platforms, and indexes are
    /// copied byte-identical. When set, the destination gets a new index with only these
    /// platforms, annotated with the source index it was built from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::PLATFORMS),
        inner(length(max = limits::PLATFORM), regex(pattern = PLATFORM_PATTERN))
    )]
    pub platforms: Vec<String>,
    /// Resync period, a duration like `30m`, `1h` or `1h30m` (units `ms`, `s`, `m`, `h`),
    /// between 30s and 8760h (one year). Each resync re-resolves moving tags. Default `1h`.
    #[serde(default = "default_interval")]
    #[schemars(length(max = limits::INTERVAL), regex(pattern = INTERVAL_PATTERN))]
    #[x_kube(validation = Rule::new(INTERVAL_RULE).message(INTERVAL_MESSAGE))]
    pub interval: String,
    /// When false, a destination tag that already points at other content is never moved
    /// (the tag is reported as Failed with reason TagConflict). Default true.
    #[serde(default = "default_true")]
    pub overwrite: bool,
    /// Signatures, attestations and SBOMs copied with the images (OCI 1.1 referrers and
    /// cosign tags). Off by default.
    #[serde(default, skip_serializing_if = "ReferrersSpec::is_default")]
    pub referrers: ReferrersSpec,
    /// When true, a destination tag that this ImageMirror wrote and that the selection no
    /// longer selects is deleted after a sync in which every item succeeded. Only tags this
    /// mirror copied are candidates (the controller records them in the annotation
    /// `imagemirror.dev/prune-record`); tags pushed by anyone else, tags that moved since, pinned
    /// `digests`, and a tag whose digest another tag still uses (on registries that delete only
    /// by digest) are kept. A failed or partial sync, or one selecting no tag, prunes nothing.
    /// Deleting the ImageMirror deletes no images. Default false.
    #[serde(default)]
    pub prune: bool,
    /// When true the controller does not sync this mirror. Default false.
    #[serde(default)]
    pub suspend: bool,
}

/// A repository in a registry, and how to reach it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RepositorySpec {
    /// Repository by the docker reference rules, without tag or digest:
    /// `nginx` is `docker.io/library/nginx`; `registry.internal:5000/mirror/nginx`. At most 512
    /// characters.
    #[schemars(length(min = 1, max = limits::REPOSITORY))]
    pub repository: String,
    /// Name of a `kubernetes.io/dockerconfigjson` Secret in the same namespace with credentials
    /// for this registry. Unset: anonymous access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = limits::SECRET_NAME), regex(pattern = SECRET_NAME_PATTERN))]
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
    #[schemars(length(min = 1, max = limits::SECRET_NAME), regex(pattern = SECRET_NAME_PATTERN))]
    pub ca_secret: Option<String>,
}

/// Which tags to mirror.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TagSelector {
    /// Exact tag names (at most 1000). A listed tag missing from the source is reported as
    /// Failed (NotFound).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::TAG_NAMES),
        inner(length(max = limits::TAG), regex(pattern = TAG_PATTERN))
    )]
    pub names: Vec<String>,
    /// Glob patterns (`*`, `?`, `[abc]`) selecting source tags, e.g. `1.27.*`. At most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::PATTERNS),
        inner(length(min = 1, max = limits::PATTERN))
    )]
    pub include: Vec<String>,
    /// Glob patterns removing tags selected by `names`, `include` or `semver`, e.g. `*-rc*`.
    /// At most 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = limits::PATTERNS),
        inner(length(min = 1, max = limits::PATTERN))
    )]
    pub exclude: Vec<String>,
    /// A semver range such as `>=1.25.0, <2`. Tags are parsed leniently (`v1.2`, `1.2`, `1`);
    /// tags that do not parse are not selected by this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::SEMVER))]
    pub semver: Option<String>,
    /// Keep only the newest N (semver order) of the tags selected by `include`/`semver`, after
    /// `exclude`; tags that are not versions sort oldest. `names` are not counted. Between 1
    /// and 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = limits::LATEST))]
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

/// Kubernetes knows the integer formats `int32` and `int64` only; `kubectl apply` warns about
/// the `uint32`/`uint64` that schemars writes for unsigned fields. Each becomes the signed
/// format that holds the values the API admits (bounds come from `minimum`/`maximum`).
pub(crate) fn signed_integer_formats(schema: &mut Schema) {
    schemars::transform::transform_subschemas(&mut signed_integer_formats, schema);
    let signed = match schema.get("format").and_then(|f| f.as_str()) {
        Some("uint8" | "uint16" | "int8" | "int16" | "uint32") => "int32",
        Some("uint64" | "uint" | "uint128" | "int128" | "int") => "int64",
        _ => return,
    };
    schema.insert("format".into(), signed.into());
    if schema.get("minimum").is_none() {
        schema.insert("minimum".into(), 0.into());
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
