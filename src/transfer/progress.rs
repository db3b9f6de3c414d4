//! Per-blob progress states, as the reference designs show them ("Waiting", "Already exists",
//! "Mounted", "Copying n/m bytes", "Retrying in 3s", "Done").

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

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

/// Publish [`BlobState::Copying`] after at least this many bytes...
const PUBLISH_BYTES: u64 = 1 << 20;
/// ...or this long since the last time, whichever comes first.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// The bytes of one copy as they go out: every byte counts in `sent` (the stall watchdog and
/// the outcome read it), while [`BlobState::Copying`] is published at most every
/// [`PUBLISH_BYTES`] or [`PUBLISH_INTERVAL`] and at the last byte. Every publish wakes each task
/// that watches the transfer; per piece of body (16–64 KiB) that was ~25,000 wakeups per GiB.
pub(super) struct CopyProgress {
    sent: Arc<AtomicU64>,
    state: Arc<watch::Sender<BlobState>>,
    done: u64,
    total: u64,
    published: u64,
    published_at: Instant,
}

impl CopyProgress {
    /// Progress of a copy of `total` bytes of which `done` are at the destination; publishes
    /// that.
    pub(super) fn start(
        sent: &Arc<AtomicU64>,
        state: &Arc<watch::Sender<BlobState>>,
        done: u64,
        total: u64,
    ) -> Self {
        state.send_replace(BlobState::Copying { done, total });
        CopyProgress {
            sent: sent.clone(),
            state: state.clone(),
            done,
            total,
            published: done,
            published_at: Instant::now(),
        }
    }

    /// `n` more bytes went out.
    pub(super) fn add(&mut self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.done = self.done.saturating_add(n);
        let due = self.done >= self.total
            || self.done - self.published >= PUBLISH_BYTES
            || self.published_at.elapsed() >= PUBLISH_INTERVAL;
        if due {
            self.published = self.done;
            self.published_at = Instant::now();
            self.state.send_replace(BlobState::Copying {
                done: self.done,
                total: self.total,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_progress_counts_every_byte_but_publishes_per_mebibyte_and_at_the_end() {
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = watch::channel(BlobState::Waiting);
        let tx = Arc::new(tx);
        let total = 3 * PUBLISH_BYTES + 10;
        let mut p = CopyProgress::start(&sent, &tx, 0, total);
        let copying = |rx: &mut watch::Receiver<BlobState>| match *rx.borrow_and_update() {
            BlobState::Copying { done, .. } => done,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(copying(&mut rx), 0);
        let mut publishes = 0;
        let mut moved = 0;
        while moved < total {
            let n = (16 * 1024).min(total - moved);
            p.add(n);
            moved += n;
            if rx.has_changed().unwrap() {
                publishes += 1;
                assert_eq!(copying(&mut rx), moved);
            }
        }
        assert_eq!(sent.load(Ordering::Relaxed), total);
        assert_eq!(copying(&mut rx), total, "the last byte is published");
        // 3 MiB steps + the end, plus any the 250 ms clock added on a slow machine.
        assert!(
            (4..=total / (16 * 1024)).contains(&publishes),
            "{publishes}"
        );
        assert!(
            publishes < 40,
            "published {publishes} times for {} pieces",
            total / (16 * 1024)
        );
    }
}
