//! The bucket and the 429 pause, on tokio's paused clock: time only moves when every task
//! waits, so the timings below are exact, not hoped for.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

fn limit(per_second: f64, burst: u32) -> Option<RateLimit> {
    Some(RateLimit { per_second, burst })
}

/// Milliseconds since `start`, for readable assertions.
fn ms(start: Instant) -> u128 {
    (Instant::now() - start).as_millis()
}

#[tokio::test(start_paused = true)]
async fn a_burst_goes_at_once_then_the_steady_rate_spaces_requests() {
    let bucket = Bucket::new(limit(10.0, 3), Duration::from_secs(30));
    let start = Instant::now();
    let mut at = Vec::new();
    for _ in 0..6 {
        bucket.acquire().await;
        at.push(ms(start));
    }
    assert_eq!(at, [0, 0, 0, 100, 200, 300]);
    // Idle long enough to refill the whole burst.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = Instant::now();
    for _ in 0..3 {
        bucket.acquire().await;
    }
    assert_eq!(ms(again), 0);
}

#[tokio::test(start_paused = true)]
async fn concurrent_waiters_are_served_one_slot_each() {
    let bucket = Arc::new(Bucket::new(limit(4.0, 1), Duration::from_secs(30)));
    let start = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let b = bucket.clone();
            tokio::spawn(async move {
                b.acquire().await;
                ms(start)
            })
        })
        .collect();
    let mut at = Vec::new();
    for t in tasks {
        at.push(t.await.unwrap());
    }
    at.sort();
    assert_eq!(at, [0, 250, 500, 750]);
}

#[tokio::test(start_paused = true)]
async fn without_a_rate_a_pause_holds_only_the_throttled_requests() {
    let bucket = Bucket::new(None, Duration::from_secs(30));
    let start = Instant::now();
    for _ in 0..100 {
        bucket.acquire().await;
    }
    assert_eq!(ms(start), 0);
    let until = bucket.pause(Duration::from_secs(5));
    assert_eq!((until - start).as_millis(), 5000);
    bucket.acquire().await;
    assert_eq!(ms(start), 0, "others go on");
    // A pause longer than the cap is cut to the cap; one in effect is shared.
    assert_eq!(
        (bucket.pause(Duration::from_secs(3600)) - start).as_millis(),
        30_000
    );
    assert_eq!(
        (bucket.pause(Duration::from_secs(1)) - start).as_millis(),
        30_000
    );
    bucket.until_unpaused().await;
    assert_eq!(ms(start), 30_000);
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_requests_already_waiting_and_resumes_at_the_steady_rate() {
    let bucket = Arc::new(Bucket::new(limit(1.0, 1), Duration::from_secs(30)));
    let start = Instant::now();
    bucket.acquire().await;
    let b = bucket.clone();
    let waiter = tokio::spawn(async move {
        b.acquire().await;
        ms(start)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    bucket.pause(Duration::from_secs(3));
    assert_eq!(waiter.await.unwrap(), 3500, "held past its slot at 1 s");
    bucket.acquire().await;
    assert_eq!(
        ms(start),
        4500,
        "one second after the first request past the pause"
    );
}

/// A registry whose blob HEADs in repository `limited` answer 429.
struct Fake {
    retry_after: Option<Duration>,
    calls: AtomicU32,
}

fn unused<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T>> {
    async {
        Err(RegistryError::Config {
            what: "fake".into(),
            detail: "not used by this test".into(),
        })
    }
    .boxed()
}

impl Registry for Fake {
    fn host(&self) -> &str {
        "fake.example:5000"
    }
    fn head_manifest<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>> {
        unused()
    }
    fn get_manifest<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<Manifest>> {
        unused()
    }
    fn put_manifest<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>> {
        unused()
    }
    fn list_tags<'a>(&'a self, _: &'a str, _: usize) -> BoxFuture<'a, Result<TagList>> {
        unused()
    }
    fn blob_size<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let retry_after = self.retry_after;
        async move {
            if repo == "limited" {
                Err(RegistryError::RateLimited {
                    what: format!("fake/{repo}@{digest}"),
                    retry_after,
                })
            } else {
                Ok(Some(1))
            }
        }
        .boxed()
    }
    fn get_blob<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: u64,
        _: u64,
    ) -> BoxFuture<'a, Result<BlobStream>> {
        unused()
    }
    fn begin_upload<'a>(
        self: Arc<Self>,
        _: &'a str,
        _: Option<Mount<'a>>,
    ) -> BoxFuture<'a, Result<MountOutcome>> {
        unused()
    }
}

#[tokio::test(start_paused = true)]
async fn without_patience_a_429_goes_to_the_caller_and_holds_no_one_else() {
    for retry_after in [Some(Duration::from_secs(2)), None] {
        let bucket = Arc::new(Bucket::new(None, Duration::from_secs(30)));
        let fake = Arc::new(Fake {
            retry_after,
            calls: AtomicU32::new(0),
        });
        let a = RateLimited::new(fake.clone(), bucket.clone());
        let b = RateLimited::new(fake.clone(), bucket.clone());
        let start = Instant::now();
        let err = a.blob_size("limited", "sha256:aa").await.unwrap_err();
        assert_eq!(err.reason(), "RateLimited");
        assert_eq!(b.blob_size("other", "sha256:bb").await.unwrap(), Some(1));
        assert_eq!(ms(start), 0);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn throttled_requests_wait_in_place_for_one_shared_pause_until_patience_runs_out() {
    let bucket =
        Arc::new(Bucket::new(None, Duration::from_secs(30)).with_patience(Duration::from_secs(10)));
    let fake = Arc::new(Fake {
        retry_after: Some(Duration::from_secs(2)),
        calls: AtomicU32::new(0),
    });
    // Two clients of one host throttled at once come back together, once.
    let a = RateLimited::new(fake.clone(), bucket.clone());
    let b = RateLimited::new(fake.clone(), bucket.clone());
    let start = Instant::now();
    let (x, y) = tokio::join!(
        a.blob_size("limited", "sha256:aa"),
        b.blob_size("limited", "sha256:bb")
    );
    assert_eq!(x.unwrap_err().reason(), "RateLimited");
    assert_eq!(y.unwrap_err().reason(), "RateLimited");
    // Asked at 0, 2, 4, 6 and 8 s; the pause after the one at 8 s would end past the
    // 10 s of patience, so the error stands then.
    assert_eq!(ms(start), 8000);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 10);
}

#[tokio::test(start_paused = true)]
async fn the_wrapper_paces_every_request() {
    let bucket = Arc::new(Bucket::new(limit(2.0, 1), Duration::from_secs(30)));
    let fake = Arc::new(Fake {
        retry_after: None,
        calls: AtomicU32::new(0),
    });
    let a = RateLimited::new(fake, bucket);
    let start = Instant::now();
    for _ in 0..5 {
        a.blob_size("other", "sha256:bb").await.unwrap();
    }
    assert_eq!(ms(start), 2000);
}

#[tokio::test(start_paused = true)]
async fn absurd_rates_do_not_overflow() {
    for rate in [1e-20, f64::MIN_POSITIVE, 1e300] {
        let bucket = Bucket::new(limit(rate, u32::MAX), Duration::from_secs(30));
        bucket.pause(Duration::MAX);
        tokio::time::timeout(Duration::from_secs(7200), bucket.acquire())
            .await
            .unwrap();
    }
}
