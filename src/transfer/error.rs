//! Errors of a blob transfer, named for the step that failed and carrying the blob's digest
//! and the repository involved. What the registries answered stays a [`RegistryError`] inside.

use std::time::Duration;

use super::BlobRequest;
use super::retry::{RetryClass, Retryable};
use crate::registry::RegistryError;

/// Why a blob transfer failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading the blob from the source failed.
    #[error("reading blob {digest} from {repo}: {source}")]
    Source {
        digest: String,
        /// `host/repository` of the source.
        repo: String,
        source: RegistryError,
    },
    /// The destination failed a check, mount or upload of the blob.
    #[error("writing blob {digest} to {repo}: {source}")]
    Destination {
        digest: String,
        /// `host/repository` of the destination.
        repo: String,
        source: RegistryError,
    },
    /// The content did not hash (or measure) to what its descriptor says.
    #[error(
        "blob {digest}: content has digest {actual} and {actual_size} bytes, expected {digest} and {expected_size} bytes"
    )]
    DigestMismatch {
        digest: String,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
    /// The bytes stopped moving (see the stall watchdog).
    #[error(
        "blob {digest}: stalled: {moved} bytes moved in {window:?}, fewer than the {min_bytes} the stall watchdog asks for"
    )]
    Stalled {
        digest: String,
        moved: u64,
        window: Duration,
        min_bytes: u64,
    },
    /// The destination no longer knows our upload session (purged, or refused as stale); a
    /// new session is opened on the next attempt.
    #[error("blob {digest}: the upload session at {repo} was lost ({detail}); starting a new one")]
    UploadSessionLost {
        digest: String,
        /// `host/repository` of the destination.
        repo: String,
        detail: String,
    },
    /// The destination acknowledged a chunk before it had read all of its bytes.
    #[error("blob {digest}: {repo} accepted the chunk at offset {offset} before reading all of it")]
    ChunkNotConsumed {
        digest: String,
        /// `host/repository` of the destination.
        repo: String,
        offset: u64,
    },
    /// Every mirror waiting for the transfer went away, and it was stopped.
    #[error("blob {digest}: the transfer was cancelled")]
    Cancelled { digest: String },
}

impl TransferError {
    /// A short CamelCase reason for conditions, Events and metric labels: the registry's own
    /// reason when a registry request failed, else the transfer's.
    pub fn reason(&self) -> &'static str {
        match self {
            TransferError::Source { source, .. } | TransferError::Destination { source, .. } => {
                source.reason()
            }
            TransferError::DigestMismatch { .. } => "DigestMismatch",
            TransferError::Stalled { .. } => "Stalled",
            TransferError::UploadSessionLost { .. } => "UploadSessionLost",
            TransferError::ChunkNotConsumed { .. } => "ChunkNotConsumed",
            TransferError::Cancelled { .. } => "Cancelled",
        }
    }

    /// Whether another attempt could succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.retry_class(), RetryClass::Final)
    }

    /// The destination says a blob it was expected to hold is not there (see
    /// [`RegistryError::is_blob_unknown`]).
    pub fn is_blob_unknown(&self) -> bool {
        matches!(self, TransferError::Destination { source, .. } if source.is_blob_unknown())
    }

    /// The registry's error behind this one, when a registry request failed.
    pub fn registry_error(&self) -> Option<&RegistryError> {
        match self {
            TransferError::Source { source, .. } | TransferError::Destination { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }

    /// `e` from a request to the source of `req`. Content that did not verify is the blob's
    /// failure, whichever side found it.
    pub(super) fn source(req: &BlobRequest, e: RegistryError) -> Self {
        Self::mismatch(e).unwrap_or_else(|e| TransferError::Source {
            digest: req.digest.clone(),
            repo: format!("{}/{}", req.source.host(), req.source_repo),
            source: e,
        })
    }

    /// `e` from a request to the destination of `req`.
    pub(super) fn destination(req: &BlobRequest, e: RegistryError) -> Self {
        Self::mismatch(e).unwrap_or_else(|e| TransferError::Destination {
            digest: req.digest.clone(),
            repo: destination(req),
            source: e,
        })
    }

    fn mismatch(e: RegistryError) -> Result<Self, RegistryError> {
        match e {
            RegistryError::DigestMismatch {
                digest,
                actual,
                expected_size,
                actual_size,
            } => Ok(TransferError::DigestMismatch {
                digest,
                actual,
                expected_size,
                actual_size,
            }),
            e => Err(e),
        }
    }
}

/// `host/repository` of the destination of `req`.
pub(super) fn destination(req: &BlobRequest) -> String {
    format!("{}/{}", req.destination.host(), req.destination_repo)
}

impl Retryable for TransferError {
    fn retry_class(&self) -> RetryClass {
        match self {
            TransferError::Source { source, .. } | TransferError::Destination { source, .. } => {
                source.retry_class()
            }
            TransferError::DigestMismatch { .. } => RetryClass::Corrupt,
            TransferError::Stalled { .. }
            | TransferError::UploadSessionLost { .. }
            | TransferError::ChunkNotConsumed { .. } => RetryClass::Transient,
            TransferError::Cancelled { .. } => RetryClass::Final,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        self.registry_error().and_then(RegistryError::retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(status: u16) -> RegistryError {
        RegistryError::Status {
            what: "r.example/a@sha256:1".into(),
            status,
            detail: "BLOB_UNKNOWN".into(),
            retry_after: Some(Duration::from_secs(2)),
        }
    }

    #[test]
    fn registry_failures_keep_the_registrys_reason_and_retry_class() {
        let e = TransferError::Destination {
            digest: "sha256:1".into(),
            repo: "r.example/a".into(),
            source: registry(503),
        };
        assert_eq!(e.reason(), "RegistryError");
        assert_eq!(e.retry_class(), RetryClass::Throttled);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        assert!(e.is_blob_unknown());
        assert!(e.to_string().contains("r.example/a"), "{e}");
        let source = TransferError::Source {
            digest: "sha256:1".into(),
            repo: "r.example/a".into(),
            source: registry(404),
        };
        assert_eq!(source.retry_class(), RetryClass::Final);
        // Only the destination's answer evicts what was believed present there.
        assert!(!source.is_blob_unknown());
    }

    #[test]
    fn the_transfers_own_failures_are_named_and_classed() {
        let lost = TransferError::UploadSessionLost {
            digest: "sha256:1".into(),
            repo: "r.example/a".into(),
            detail: "404".into(),
        };
        assert_eq!(lost.reason(), "UploadSessionLost");
        assert!(lost.is_retryable());
        let cancelled = TransferError::Cancelled {
            digest: "sha256:1".into(),
        };
        assert_eq!(cancelled.reason(), "Cancelled");
        assert!(!cancelled.is_retryable());
        let mismatch = TransferError::DigestMismatch {
            digest: "sha256:1".into(),
            actual: "sha256:2".into(),
            expected_size: 1,
            actual_size: 1,
        };
        assert_eq!(mismatch.retry_class(), RetryClass::Corrupt);
    }
}
