//! Attempts with exponential backoff and full jitter, capped; `Retry-After` wins.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::registry::RegistryError;

/// How often and how patiently to retry. Defaults: 5 attempts, 500 ms base, 30 s cap, 10 min
/// of waiting out rate limits, 2 re-fetches after a digest mismatch.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, including the first, for errors that may be transient (connection
    /// resets, 5xx other than 503, 408). Default 5.
    pub max_attempts: u32,
    /// Backoff before the second attempt (doubled each time, then jittered). Default 500 ms.
    pub base_delay: Duration,
    /// Upper bound of any one backoff, also for `Retry-After`. Default 30 s.
    pub max_delay: Duration,
    /// `429` and `503` are flow control, not failures: they never use up `max_attempts`, and
    /// are waited out (for `Retry-After`, else a backoff) until this much time has passed
    /// since the operation (one blob transfer, one manifest or tag-list request) began.
    /// Default 10 min.
    pub throttle_deadline: Duration,
    /// Times content that did not match its digest is fetched again before the error stands:
    /// a byte flipped in transit should cost a re-fetch, not the tag. Default 2.
    pub digest_refetches: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            throttle_deadline: Duration::from_secs(600),
            digest_refetches: 2,
        }
    }
}

/// How the retry policy treats an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryClass {
    /// `429`, `503`: wait and ask again, without counting an attempt.
    Throttled,
    /// The content lied: fetch it again, a bounded number of times.
    Corrupt,
    /// May improve: counts an attempt.
    Transient,
    /// Cannot improve.
    Final,
}

/// Errors the retry policy can classify.
pub trait Retryable {
    /// How the policy treats this error.
    fn retry_class(&self) -> RetryClass;
    /// How long the registry asked us to wait before the next attempt.
    fn retry_after(&self) -> Option<Duration>;
}

impl Retryable for RegistryError {
    fn retry_class(&self) -> RetryClass {
        match self {
            RegistryError::RateLimited { .. } | RegistryError::Status { status: 503, .. } => {
                RetryClass::Throttled
            }
            RegistryError::DigestMismatch { .. } => RetryClass::Corrupt,
            e if e.is_retryable() => RetryClass::Transient,
            _ => RetryClass::Final,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        RegistryError::retry_after(self)
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (`attempt` counts from 1). Full jitter: a random
    /// point in `[0, min(cap, base * 2^(attempt-1))]`, so clients that failed together do not
    /// come back together. A `Retry-After` from the registry replaces it (capped).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_delay);
        }
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_delay);
        let millis = u64::try_from(exp.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    /// Runs `op` until it succeeds, fails with an error that cannot improve, or its budget
    /// runs out: `max_attempts` for transient errors, `digest_refetches` more tries for
    /// content that did not verify, `throttle_deadline` for `429`/`503`. `op` is given the
    /// attempt number (from 1; every try counts, so a first-attempt shortcut is taken once).
    /// `on_retry(attempt, delay, error)` is told before each wait; the wait holds nothing the
    /// caller does not hold across `op`.
    pub async fn run<T, E, F, Fut>(
        &self,
        mut op: F,
        mut on_retry: impl FnMut(u32, Duration, &E),
    ) -> Result<T, E>
    where
        E: Retryable + std::fmt::Display,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = tokio::time::Instant::now();
        let (mut tries, mut failures, mut throttled, mut refetches) = (1u32, 1u32, 0u32, 0u32);
        loop {
            let e = match op(tries).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let delay = match e.retry_class() {
                RetryClass::Throttled => {
                    let left = self.throttle_deadline.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(e);
                    }
                    throttled = throttled.saturating_add(1);
                    self.delay(throttled, e.retry_after()).min(left)
                }
                RetryClass::Corrupt if refetches < self.digest_refetches => {
                    refetches += 1;
                    tracing::warn!(error = %e, refetch = refetches, "content did not verify; fetching it again");
                    Duration::ZERO
                }
                RetryClass::Transient if failures < self.max_attempts.max(1) => {
                    let d = self.delay(failures, e.retry_after());
                    failures += 1;
                    d
                }
                _ => return Err(e),
            };
            on_retry(tries, delay, &e);
            tokio::time::sleep(delay).await;
            tries = tries.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(8),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn delays_are_jittered_within_the_exponential_bound() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for attempt in 1..8 {
            let bound = (100u64 << (attempt - 1)).min(1000);
            let d = p.delay(attempt, None);
            assert!(
                d <= Duration::from_millis(bound),
                "attempt {attempt}: {d:?}"
            );
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(5))),
            Duration::from_millis(1000)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_millis(200))),
            Duration::from_millis(200)
        );
        // Full jitter spreads: 50 draws are not all equal.
        let draws: std::collections::HashSet<_> = (0..50).map(|_| p.delay(4, None)).collect();
        assert!(draws.len() > 1);
    }

    #[tokio::test]
    async fn retries_transient_errors_then_succeeds() {
        let mut retries = 0;
        let out = policy()
            .run(
                |attempt| async move {
                    if attempt < 3 {
                        Err(RegistryError::Status {
                            what: "x".into(),
                            status: 503,
                            detail: String::new(),
                            retry_after: None,
                        })
                    } else {
                        Ok(attempt)
                    }
                },
                |_, _, _| retries += 1,
            )
            .await;
        assert_eq!(out.unwrap(), 3);
        assert_eq!(retries, 2);
    }

    #[tokio::test]
    async fn does_not_retry_what_cannot_improve_and_stops_at_the_limit() {
        let mut calls = 0;
        let out: Result<(), _> = policy()
            .run(
                |_| {
                    calls += 1;
                    async { Err(RegistryError::NotFound { what: "x".into() }) }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out.unwrap_err().reason(), "NotFound");
        assert_eq!(calls, 1);
        let mut calls = 0;
        let out: Result<(), _> = policy()
            .run(
                |_| {
                    calls += 1;
                    async {
                        Err(RegistryError::Transport {
                            what: "x".into(),
                            detail: "reset".into(),
                        })
                    }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out.unwrap_err().reason(), "NetworkError");
        assert_eq!(calls, 4);
    }

    fn throttled() -> RegistryError {
        RegistryError::RateLimited {
            what: "x".into(),
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_do_not_use_up_attempts_until_the_deadline() {
        let p = RetryPolicy {
            throttle_deadline: Duration::from_secs(60),
            ..policy()
        };
        // 20 throttled answers, far more than the 4 attempts, then success.
        let mut calls = 0;
        let out = p
            .run(
                |n| {
                    calls += 1;
                    async move { if n <= 20 { Err(throttled()) } else { Ok(n) } }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out.unwrap(), 21);
        // Forever throttled: gives up once the deadline passed, not before.
        let start = tokio::time::Instant::now();
        let out: Result<(), _> = p.run(|_| async { Err(throttled()) }, |_, _, _| {}).await;
        assert_eq!(out.unwrap_err().reason(), "RateLimited");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(62),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_digest_mismatch_is_fetched_again_twice() {
        let mismatch = || RegistryError::DigestMismatch {
            digest: "sha256:a".into(),
            actual: "sha256:b".into(),
            expected_size: 1,
            actual_size: 1,
        };
        let mut calls = 0;
        let out: Result<(), _> = policy()
            .run(
                |_| {
                    calls += 1;
                    let e = mismatch();
                    async move { Err(e) }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out.unwrap_err().reason(), "DigestMismatch");
        assert_eq!(calls, 3);
        let out = policy()
            .run(
                |n| {
                    let e = mismatch();
                    async move { if n < 3 { Err(e) } else { Ok(n) } }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out.unwrap(), 3);
    }
}
