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
    /// TLS failed in a way another attempt cannot fix: the certificate is not trusted (unknown
    /// CA, expired, wrong name) or the server does not speak TLS at all.
    #[error("{what}: TLS failed: {detail}")]
    Tls { what: String, detail: String },
    /// A read from `offset` on was answered with something other than `206 Partial Content`
    /// (typically the whole blob): the registry does not serve ranges.
    #[error("{what}: asked for bytes from {offset} on, got HTTP {status} instead of 206")]
    RangeIgnored {
        what: String,
        offset: u64,
        status: u16,
    },
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
    /// A `Location` or `Link` the registry sent that is not a URL, or points to another
    /// origin (refused so that credentials stay with the registry).
    #[error("{what}: unusable location: {detail}")]
    BadLocation { what: String, detail: String },
    /// An answer larger than the engine reads (error bodies, tokens, tag pages, indexes).
    #[error("{what}: the registry's answer is over the {limit} limit")]
    TooLarge { what: String, limit: String },
    /// The client could not be configured (bad CA certificate, ...).
    #[error("{what}: {detail}")]
    Config { what: String, detail: String },
    /// A local file of an OCI layout or archive could not be read or written; `what` names it.
    #[error("{what}: {detail}")]
    Storage { what: String, detail: String },
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
            RegistryError::Tls { .. } => "TLSError",
            RegistryError::RangeIgnored { .. } => "RangeIgnored",
            RegistryError::ManifestTooLarge { .. } => "ManifestTooLarge",
            RegistryError::ManifestInvalid { .. } => "ManifestInvalid",
            RegistryError::Schema1 { .. } => "UnsupportedSchema1",
            RegistryError::DigestMismatch { .. } => "DigestMismatch",
            RegistryError::InvalidReference { .. } => "InvalidReference",
            RegistryError::BadLocation { .. } => "BadLocation",
            RegistryError::TooLarge { .. } => "AnswerTooLarge",
            RegistryError::Config { .. } => "InvalidConfig",
            RegistryError::Storage { .. } => "StorageError",
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

    /// The registry says a blob it was expected to hold is not there (`BLOB_UNKNOWN`,
    /// `MANIFEST_BLOB_UNKNOWN`): what was believed present should be asked again.
    pub fn is_blob_unknown(&self) -> bool {
        match self {
            RegistryError::Status { detail, .. } => detail.contains("BLOB_UNKNOWN"),
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

    pub(crate) fn transport(
        what: impl Into<String>,
        err: &(dyn std::error::Error + 'static),
    ) -> Self {
        // reqwest's Display omits the cause chain, which is where "connection reset" lives.
        let mut detail = err.to_string();
        let mut source = std::error::Error::source(err);
        let mut tls = None;
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            tls = tls.or_else(|| rustls_cause(s));
            source = s.source();
        }
        let what = what.into();
        // A certificate nobody vouches for, or a plain-HTTP server, stays that way: retrying
        // only delays the message the user needs, so these get their own, final, error.
        let hint = match tls {
            Some(
                rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::UnsupportedNameType,
            ) => {
                "; the registry's certificate is not trusted: give its CA (caSecret, or --ca-file on the CLI) or set insecureSkipTLSVerify"
            }
            Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                "; the registry did not answer in TLS: if it serves plain HTTP, set plainHTTP: true"
            }
            // Anything else (a bad record mid-stream, an alert) may be the network's doing.
            _ => return RegistryError::Transport { what, detail },
        };
        RegistryError::Tls {
            what,
            detail: format!("{detail}{hint}"),
        }
    }
}

/// The rustls error behind `err`, if that is what it is. TLS errors reach us wrapped in
/// `io::Error`s (one inside another), whose `source()` skips what they wrap, so look inside
/// explicitly.
fn rustls_cause<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut err = err;
    // Bounded: a handful of layers is all any stack adds.
    for _ in 0..8 {
        if let Some(e) = err.downcast_ref::<rustls::Error>() {
            return Some(e);
        }
        err = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
    None
}

/// Result alias for registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_are_found_inside_nested_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let nested = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            tls.clone(),
        ));
        assert_eq!(rustls_cause(&nested), Some(&tls));
        assert_eq!(rustls_cause(&tls), Some(&tls));
        let plain = std::io::Error::other("connection reset");
        assert_eq!(rustls_cause(&plain), None);
    }

    #[test]
    fn tls_failures_are_final() {
        let e = RegistryError::Tls {
            what: "r.example".into(),
            detail: "invalid peer certificate".into(),
        };
        assert!(!e.is_retryable());
        assert_eq!(e.reason(), "TLSError");
    }
}
