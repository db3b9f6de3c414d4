//! Attempts with exponential backoff and full jitter, capped; `Retry-After` wins.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::registry::RegistryError;

/// How often and how patiently to retry. Defaults: 5 attempts, 500 ms base, 30 s cap.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, including the first. Default 5.
    pub max_attempts: u32,
    /// Backoff before the second attempt (doubled each time, then jittered). Default 500 ms.
    pub base_delay: Duration,
    /// Upper bound of any one backoff, also for `Retry-After`. Default 30 s.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
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

    /// Runs `op` until it succeeds, fails with an error that cannot improve, or attempts run
    /// out. `on_retry(attempt, delay, error)` is told before each wait.
    pub async fn run<T, F, Fut>(
        &self,
        mut op: F,
        mut on_retry: impl FnMut(u32, Duration, &RegistryError),
    ) -> Result<T, RegistryError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < self.max_attempts.max(1) => {
                    let delay = self.delay(attempt, e.retry_after());
                    on_retry(attempt, delay, &e);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
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
        }
    }

    #[test]
    fn delays_are_jittered_within_the_exponential_bound() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
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
}
