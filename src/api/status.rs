//! Status of an `ImageMirror`: kstatus conditions, per-tag results and progress.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types written on every `ImageMirror`.
pub mod condition_types {
    /// True when every selected tag is mirrored.
    pub const READY: &str = "Ready";
    /// True while a sync runs (abnormal-true, kstatus).
    pub const RECONCILING: &str = "Reconciling";
    /// True when the mirror cannot progress without a change (abnormal-true, kstatus).
    pub const STALLED: &str = "Stalled";
}

/// Reasons used on conditions, Events and metric labels. CamelCase, bounded.
pub mod condition_reasons {
    /// All selected tags are mirrored.
    pub const SYNCED: &str = "Synced";
    /// A sync is running.
    pub const SYNCING: &str = "Syncing";
    /// Some tags failed; the others are mirrored.
    pub const PARTIALLY_SYNCED: &str = "PartiallySynced";
    /// The controller has not looked at this generation yet.
    pub const PROGRESSING: &str = "Progressing";
    /// A referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// A referenced Secret exists but cannot be used.
    pub const SECRET_INVALID: &str = "SecretInvalid";
    /// The controller may not read a referenced Secret (RBAC).
    pub const SECRET_FORBIDDEN: &str = "SecretForbidden";
    /// Reading a referenced Secret failed for a reason that may pass (5xx, timeout); retried.
    pub const SECRET_UNAVAILABLE: &str = "SecretUnavailable";
    /// The controller failed in a way it did not expect (a bug); retried with backoff.
    pub const INTERNAL_ERROR: &str = "InternalError";
    /// The spec cannot be acted on.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A registry refused the credentials.
    pub const AUTH_FAILED: &str = "AuthFailed";
    /// `spec.suspend` is true.
    pub const SUSPENDED: &str = "Suspended";
    /// Nothing is wrong.
    pub const NONE: &str = "AsExpected";
}

/// Observed state of an `ImageMirror`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(transform = super::signed_integer_formats)]
#[serde(rename_all = "camelCase")]
pub struct ImageMirrorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Reconciling and Stalled, following the Kubernetes API conventions and kstatus.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the last sync finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// When the next sync is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_time: Option<Time>,
    /// Counts over all selected tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// Per-tag results, failures first, at most 100 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub tags: Vec<TagStatus>,
    /// Blob and byte counts of the current or last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// What the last sync pruned, when `spec.prune` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneStatus>,
}

/// The outcome of pruning after the last sync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PruneStatus {
    /// Destination tags deleted by the last sync (named in `tags` with state Pruned while they
    /// fit).
    pub pruned: u32,
    /// Deselected tags this mirror wrote that were kept (state Retained in `tags`; the reason
    /// says why, e.g. DigestShared: another tag points at the same digest on a registry that
    /// deletes only by digest).
    pub retained: u32,
    /// Tags in this mirror's record of what it wrote (the `imagemirror.dev/prune-record`
    /// annotation).
    pub recorded: u32,
    /// Why nothing was pruned, or what kept tags (e.g. the registry refuses deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Counts over all selected tags.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Tags (and pinned digests) selected by the spec.
    pub tags_selected: u32,
    /// Selected tags whose destination matches the source.
    pub tags_synced: u32,
    /// Selected tags that failed in the last sync.
    pub tags_failed: u32,
    /// `tagsSynced/tagsSelected`, for the Synced printer column.
    #[serde(default)]
    pub ratio: String,
}

/// Result for one tag (or pinned digest).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TagStatus {
    /// The tag, or the digest for entries of `spec.digests`.
    pub name: String,
    /// Digest of the manifest or index the source tag points at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    /// Digest written to the destination; differs from sourceDigest when platforms were filtered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_digest: Option<String>,
    /// Synced, Pending or Failed.
    pub state: TagState,
    /// Why the tag failed (AuthFailed, NotFound, RateLimited, DigestMismatch, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With `spec.referrers.enabled`: the referrers (signatures, attestations, SBOMs, cosign
    /// tags, referrers of referrers) the destination holds for this tag after the sync,
    /// copied now or already there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrers: Option<u32>,
}

/// State of one tag.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TagState {
    /// The destination matches the source.
    Synced,
    /// Not synced yet.
    Pending,
    /// The last attempt failed.
    Failed,
    /// No longer selected; deleted from the destination by the last sync (`spec.prune`).
    Pruned,
    /// No longer selected, but kept at the destination; the reason says why.
    Retained,
}

/// Blob and byte counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Blobs the sync has to make present.
    pub blobs_total: u64,
    /// Blobs present at the destination so far (copied, skipped or mounted).
    pub blobs_done: u64,
    /// Blobs that were already present.
    pub blobs_skipped: u64,
    /// Blobs mounted from another repository of the destination registry.
    pub blobs_mounted: u64,
    /// Bytes to copy.
    pub bytes_total: u64,
    /// Bytes copied so far.
    pub bytes_done: u64,
}
