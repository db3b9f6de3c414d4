//! Errors of the registry client, named for what failed and carrying what they failed on.

use std::time::Duration;

/// What went wrong talking to a registry. `what` names the object: a reference, a blob digest
/// or a registry host.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RegistryError {
    /// The object does not exist (HTTP 404, or an unknown tag).
    #[error("{what}: not found")]
    NotFound { what: String },
    /// The registry refused our credentials, or we have none and it wants some.
    #[error("{what}: authentication failed: {detail}")]
    AuthFailed { what: String, detail: String },
    /// Authenticated, but not allowed (HTTP 403).
    #[error("{what}: access denied: {detail}")]
    Denied { what: String, detail: String },
    /// HTTP 429; `retry_after` is the registry's `Retry-After`, when it sent one.
    #[error("{what}: rate limited by the registry")]
    RateLimited {
        what: String,
        retry_after: Option<Duration>,
    },
    /// Any other unexpected HTTP status.
    #[error("{what}: registry answered HTTP {status}: {detail}")]
    Status {
        what: String,
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// The connection failed, timed out or was reset.
    #[error("{what}: {detail}")]
    Transport { what: String, detail: String },
    /// A manifest over the size limit; refused before it is read.
    #[error("manifest {what} is {size} bytes, over the {limit} byte limit")]
    ManifestTooLarge { what: String, size: u64, limit: u64 },
    /// A manifest that cannot be used: bad JSON, unknown media type, missing fields.
    #[error("manifest {what} is invalid: {detail}")]
    ManifestInvalid { what: String, detail: String },
    /// Docker schema1 manifests are deprecated and unsupported.
    #[error(
        "manifest {what} is Docker schema1 ({media_type}), which is not supported: push it again with a current Docker or buildkit"
    )]
    Schema1 { what: String, media_type: String },
    /// Content did not hash (or measure) to what its descriptor says.
    #[error(
        "blob {digest}: content has digest {actual} and {actual_size} bytes, expected {digest} and {expected_size} bytes"
    )]
    DigestMismatch {
        digest: String,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
    /// A repository or reference that does not parse.
    #[error("invalid reference {what:?}: {detail}")]
    InvalidReference { what: String, detail: String },
    /// The client could not be configured (bad CA certificate, ...).
    #[error("{what}: {detail}")]
    Config { what: String, detail: String },
}

impl RegistryError {
    /// A short CamelCase reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::NotFound { .. } => "NotFound",
            RegistryError::AuthFailed { .. } => "AuthFailed",
            RegistryError::Denied { .. } => "AccessDenied",
            RegistryError::RateLimited { .. } => "RateLimited",
            RegistryError::Status { .. } => "RegistryError",
            RegistryError::Transport { .. } => "NetworkError",
            RegistryError::ManifestTooLarge { .. } => "ManifestTooLarge",
            RegistryError::ManifestInvalid { .. } => "ManifestInvalid",
            RegistryError::Schema1 { .. } => "UnsupportedSchema1",
            RegistryError::DigestMismatch { .. } => "DigestMismatch",
            RegistryError::InvalidReference { .. } => "InvalidReference",
            RegistryError::Config { .. } => "InvalidConfig",
        }
    }

    /// Whether another attempt could succeed. Errors that cannot improve (4xx other than
    /// 408/429, digest mismatch, bad manifests) are not retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::RateLimited { .. } | RegistryError::Transport { .. } => true,
            RegistryError::Status { status, .. } => *status == 408 || *status >= 500,
            _ => false,
        }
    }

    /// How long the registry asked us to wait before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::RateLimited { retry_after, .. }
            | RegistryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn transport(what: impl Into<String>, err: &reqwest::Error) -> Self {
        // reqwest's Display omits the cause chain, which is where "connection reset" lives.
        let mut detail = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        RegistryError::Transport {
            what: what.into(),
            detail,
        }
    }
}

/// Result alias for registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
