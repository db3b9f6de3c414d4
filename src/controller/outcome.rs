//! The one place that says how every way a reconcile can end early shows on the object:
//! which conditions, which reason, whether and when it is retried. No reconcile error ends
//! without a status saying what happened, except a failed status write itself.

use std::time::Duration;

use crate::api::condition_reasons as reasons;
use crate::mirror::SyncError;

use super::secrets::SecretError;

/// When a missing or unusable Secret is looked at again (its watch usually wakes us sooner).
pub const SECRET_RECHECK: Duration = Duration::from_secs(300);
/// Longest backoff between retries of errors that are not the registry's.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a reconcile ended early.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The object has no namespace (the CRD is namespaced; this cannot come from a real API).
    #[error("ImageMirror {0} has no namespace")]
    NoNamespace(String),
    /// The spec cannot be acted on; the message names the field.
    #[error("{0}")]
    InvalidSpec(String),
    /// The spec names something only the CLI can do (an OCI layout transport).
    #[error("{0}")]
    InClusterUnsupported(String),
    /// A referenced Secret cannot be read or used.
    #[error(transparent)]
    Secret(Box<SecretError>),
    /// The sync as a whole failed (the tag list could not be read).
    #[error(transparent)]
    Sync(Box<SyncError>),
    /// The controller panicked while reconciling this object; contained, retried with backoff.
    #[error("internal error (please report it): {0}")]
    Panicked(String),
    /// The sync was cancelled because the spec changed or the object was deleted.
    #[error("sync cancelled: the spec changed or the object was deleted")]
    Cancelled,
    /// Writing status failed: nothing else can be said on the object, so kube-runtime retries.
    #[error("writing status of {name}: {source}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl From<SecretError> for ReconcileError {
    fn from(e: SecretError) -> Self {
        ReconcileError::Secret(Box::new(e))
    }
}

impl From<SyncError> for ReconcileError {
    fn from(e: SyncError) -> Self {
        ReconcileError::Sync(Box::new(e))
    }
}

impl ReconcileError {
    /// Bounded reason, for conditions, Events and the `result` metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::NoNamespace(_) => "InvalidObject",
            ReconcileError::InvalidSpec(_) => reasons::INVALID_SPEC,
            ReconcileError::InClusterUnsupported(_) => crate::layout::IN_CLUSTER_REASON,
            ReconcileError::Secret(e) => e.reason(),
            ReconcileError::Sync(e) => e.reason(),
            ReconcileError::Panicked(_) => reasons::INTERNAL_ERROR,
            ReconcileError::Cancelled => "Cancelled",
            ReconcileError::Status { .. } => "StatusWriteFailed",
        }
    }
}

/// Which conditions a failure sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Cannot progress without a change: Ready=False, Reconciling=False, Stalled=True.
    Stalled,
    /// Transient, being retried: Ready=False, Reconciling=True, Stalled=False.
    Retrying,
    /// A sync ran and failed as a whole: Ready=False, Reconciling=False, times set (Stalled
    /// only when credentials were refused).
    SyncFailed,
}

/// When a failed reconcile is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Only when the object changes.
    OnChange,
    /// After this long (or sooner when a watched Secret changes).
    After(Duration),
    /// Per-object exponential backoff capped at this.
    Backoff(Duration),
}

/// How one failure shows on the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The condition (and Event) reason.
    pub reason: &'static str,
    /// The condition (and Event) message.
    pub message: String,
    /// Which conditions.
    pub shape: Shape,
    /// When to try again.
    pub retry: Retry,
}

/// The mapping. `None`: nothing to write (a cancelled sync, or status cannot be written).
/// `interval` caps the backoff of failed syncs: a failing mirror is never tried less often
/// than a healthy one.
pub fn failure(err: &ReconcileError, interval: Duration) -> Option<Failure> {
    let (shape, retry) = match err {
        ReconcileError::NoNamespace(_)
        | ReconcileError::Cancelled
        | ReconcileError::Status { .. } => return None,
        ReconcileError::InvalidSpec(_) | ReconcileError::InClusterUnsupported(_) => {
            (Shape::Stalled, Retry::OnChange)
        }
        ReconcileError::Secret(e) => match **e {
            SecretError::NotFound { .. } | SecretError::Invalid { .. } => {
                (Shape::Stalled, Retry::After(SECRET_RECHECK))
            }
            // RBAC is not watched: look again with backoff, so a fixed Role is noticed.
            SecretError::Forbidden { .. } => (Shape::Stalled, Retry::Backoff(MAX_BACKOFF)),
            SecretError::Unavailable { .. } => (Shape::Retrying, Retry::Backoff(MAX_BACKOFF)),
        },
        ReconcileError::Sync(_) => (Shape::SyncFailed, Retry::Backoff(interval.min(MAX_BACKOFF))),
        ReconcileError::Panicked(_) => (Shape::Retrying, Retry::Backoff(MAX_BACKOFF)),
    };
    Some(Failure {
        reason: err.reason(),
        message: err.to_string(),
        shape,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: "boom".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn every_secret_failure_says_which_secret_and_how_it_is_retried() {
        let forbidden = ReconcileError::from(SecretError::Forbidden {
            namespace: "team".into(),
            name: "hub-creds".into(),
            field: "source.credentialsSecret".into(),
        });
        let f = failure(&forbidden, Duration::from_secs(3600)).unwrap();
        assert_eq!(f.reason, "SecretForbidden");
        assert_eq!(f.shape, Shape::Stalled);
        assert!(matches!(f.retry, Retry::Backoff(_)));
        for needle in ["team/hub-creds", "`get` on secrets", "namespace team"] {
            assert!(
                f.message.contains(needle),
                "{needle} missing: {}",
                f.message
            );
        }
        let unavailable = ReconcileError::from(SecretError::Unavailable {
            namespace: "team".into(),
            name: "hub-creds".into(),
            field: "source.credentialsSecret".into(),
            source: api_error(503),
        });
        let f = failure(&unavailable, Duration::from_secs(3600)).unwrap();
        assert_eq!(f.reason, "SecretUnavailable");
        assert_eq!(f.shape, Shape::Retrying);
        assert!(f.message.contains("team/hub-creds"), "{}", f.message);
    }

    #[test]
    fn only_cancellation_and_status_writes_leave_no_status() {
        let silent = [
            ReconcileError::Cancelled,
            ReconcileError::Status {
                name: "x".into(),
                source: api_error(500),
            },
        ];
        for e in &silent {
            assert_eq!(failure(e, Duration::from_secs(60)), None, "{e}");
        }
        let shown = [
            ReconcileError::InvalidSpec("spec.interval: bad".into()),
            ReconcileError::Panicked("index out of bounds".into()),
        ];
        for e in &shown {
            let f = failure(e, Duration::from_secs(60)).unwrap();
            assert!(!f.message.is_empty());
        }
    }
}
