//! Per-blob progress states, as the reference designs show them ("Waiting", "Already exists",
//! "Mounted", "Copying n/m bytes", "Retrying in 3s", "Done").

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::TransferError;

/// How a blob came to be present at the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobOutcome {
    /// It was there already.
    Exists,
    /// Linked from another repository of the same registry.
    Mounted,
    /// Bytes were copied.
    Copied {
        /// Bytes sent to the destination, counting any re-sent after a failure.
        bytes_sent: u64,
    },
}

/// Where one blob transfer stands.
#[derive(Clone, Debug)]
pub enum BlobState {
    /// Queued behind a concurrency limit, or behind a transfer of the same digest.
    Waiting,
    /// Bytes moving.
    Copying {
        /// Bytes at the destination so far.
        done: u64,
        /// Size of the blob.
        total: u64,
    },
    /// An attempt failed; the next starts after `delay`.
    Retrying {
        /// The attempt that failed (from 1).
        attempt: u32,
        /// Wait before the next.
        delay: Duration,
        /// Why it failed.
        reason: &'static str,
    },
    /// Finished: the blob is present, or the transfer failed for good.
    Finished(Result<BlobOutcome, TransferError>),
}

impl fmt::Display for BlobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobState::Waiting => write!(f, "Waiting"),
            BlobState::Copying { done, total } => write!(f, "Copying {done}/{total} bytes"),
            BlobState::Retrying { delay, reason, .. } => {
                write!(f, "Retrying in {}s ({reason})", delay.as_secs_f32().ceil())
            }
            BlobState::Finished(Ok(BlobOutcome::Exists)) => write!(f, "Already exists"),
            BlobState::Finished(Ok(BlobOutcome::Mounted)) => write!(f, "Mounted"),
            BlobState::Finished(Ok(BlobOutcome::Copied { .. })) => write!(f, "Done"),
            BlobState::Finished(Err(e)) => write!(f, "Failed ({})", e.reason()),
        }
    }
}

/// One progress report: which blob, for which destination repository, in which state.
#[derive(Clone, Debug)]
pub struct BlobProgress {
    /// Destination repository (`host/path`).
    pub repository: String,
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Current state.
    pub state: BlobState,
}

/// Receives progress reports. Called often (per chunk): keep it cheap.
pub type ProgressSink = Arc<dyn Fn(&BlobProgress) + Send + Sync>;

/// A sink that drops everything.
pub fn no_progress() -> ProgressSink {
    Arc::new(|_| {})
}
