//! The stall watchdog: a transfer attempt whose bytes stop moving (a source trickling one byte
//! a minute, a destination that stops reading) is abandoned, so it neither holds transfer
//! slots forever nor keeps the transfers that joined it waiting. The attempt's error is
//! retryable: the next attempt may find a faster path (a new connection, a healed server).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::{BlobState, TransferError};

/// When a transfer counts as stalled: fewer than `min_bytes` moved in the last `window`
/// while it was copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallWatchdog {
    /// How long bytes are measured over. Default 60 s.
    pub window: Duration,
    /// Bytes that must move in every `window`. Default 1 KiB (1 KiB/s over 60 s would be
    /// 60 KiB; this is deliberately lenient: it catches stalls, not slow links).
    pub min_bytes: u64,
}

impl Default for StallWatchdog {
    fn default() -> Self {
        StallWatchdog {
            window: Duration::from_secs(60),
            min_bytes: 1024,
        }
    }
}

/// Samples per window: a stall is noticed at most a quarter window late.
const SAMPLES: usize = 4;

/// Runs `work`, failing it with [`TransferError::Stalled`] when, while `state` says it is
/// copying, the `moved` counter grows by less than `config.min_bytes` over `config.window`.
/// Time spent before the bytes start (waiting for a session, a HEAD) is not measured.
pub(super) async fn guard<T>(
    config: Option<StallWatchdog>,
    digest: &str,
    moved: &AtomicU64,
    state: &watch::Sender<BlobState>,
    work: impl Future<Output = Result<T, TransferError>>,
) -> Result<T, TransferError> {
    let Some(config) = config.filter(|c| !c.window.is_zero()) else {
        return work.await;
    };
    let tick = config.window / SAMPLES as u32;
    let watch = async {
        let mut samples: VecDeque<u64> = VecDeque::with_capacity(SAMPLES + 1);
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        loop {
            interval.tick().await;
            if !matches!(*state.borrow(), BlobState::Copying { .. }) {
                samples.clear();
                continue;
            }
            samples.push_back(moved.load(Ordering::Relaxed));
            if samples.len() > SAMPLES {
                let oldest = samples.pop_front().unwrap_or_default();
                let newest = samples.back().copied().unwrap_or_default();
                if newest.saturating_sub(oldest) < config.min_bytes {
                    return TransferError::Stalled {
                        digest: digest.to_string(),
                        moved: newest.saturating_sub(oldest),
                        window: config.window,
                        min_bytes: config.min_bytes,
                    };
                }
            }
        }
    };
    tokio::select! {
        result = work => result,
        stalled = watch => Err(stalled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Option<StallWatchdog> {
        Some(StallWatchdog {
            window: Duration::from_secs(4),
            min_bytes: 100,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_abandoned_and_a_steady_flow_is_not() {
        let (tx, _rx) = watch::channel(BlobState::Copying { done: 0, total: 1 });
        let moved = AtomicU64::new(0);
        let trickle = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                moved.fetch_add(1, Ordering::Relaxed);
            }
        };
        let start = tokio::time::Instant::now();
        let err = guard::<()>(config(), "sha256:x", &moved, &tx, trickle)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "Stalled");
        assert!(err.to_string().contains("blob sha256:x"), "{err}");
        assert!(
            start.elapsed() <= Duration::from_secs(6),
            "{:?}",
            start.elapsed()
        );

        let steady = async {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                moved.fetch_add(50, Ordering::Relaxed);
            }
            Ok(7)
        };
        assert_eq!(
            guard(config(), "sha256:y", &moved, &tx, steady)
                .await
                .unwrap(),
            7
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_before_the_bytes_start_is_not_a_stall() {
        let (tx, _rx) = watch::channel(BlobState::Waiting);
        let moved = AtomicU64::new(0);
        let slow_start = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(1)
        };
        assert_eq!(
            guard(config(), "sha256:z", &moved, &tx, slow_start)
                .await
                .unwrap(),
            1
        );
    }
}
