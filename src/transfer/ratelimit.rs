//! Request pacing per registry host: a token bucket shared by every client of the host, and a
//! pause of the whole host when it answers `429` with `Retry-After`, so the other requests in
//! flight stop asking too instead of each collecting its own 429.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::registry::{
    BlobStream, Manifest, ManifestHead, MountOutcome, ReferrerList, Registry, RegistryError,
    Result, TagList,
};

/// A request rate for one registry host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second. Values at or below zero mean no limit.
    pub per_second: f64,
    /// Requests allowed at once after an idle spell (the bucket's size, at least 1).
    pub burst: u32,
}

/// The pause after a 429 that does not say how long to wait.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// Longest gap pacing puts between two requests to one host.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// A token bucket for one host, kept as the time the next request is due ("virtual scheduling":
/// each request reserves the next free slot under the lock, so waiters go in order and do not
/// wake together).
pub(crate) struct Bucket {
    /// Time between two requests; `None` when the rate is unlimited.
    interval: Option<Duration>,
    /// How far ahead of the steady rate a burst may run.
    tolerance: Duration,
    /// Longest pause a `Retry-After` may impose.
    max_pause: Duration,
    state: Mutex<Slots>,
}

struct Slots {
    /// When the bucket would next be empty at the steady rate (the GCRA's "theoretical
    /// arrival time").
    due: Instant,
    /// No request goes out before this (set by a 429 with Retry-After).
    paused_until: Option<Instant>,
}

impl Bucket {
    /// A bucket for `limit` (`None`: no pacing, only pauses), pausing at most `max_pause`.
    pub(crate) fn new(limit: Option<RateLimit>, max_pause: Duration) -> Self {
        let limit = limit.filter(|l| l.per_second > 0.0 && l.per_second.is_finite());
        // Clamped, so absurd rates (1e-20/s) cannot overflow a Duration: at least one request
        // per MAX_INTERVAL.
        let interval = limit.map(|l| {
            Duration::try_from_secs_f64(1.0 / l.per_second)
                .unwrap_or(MAX_INTERVAL)
                .min(MAX_INTERVAL)
        });
        let burst = limit.map_or(1, |l| l.burst.max(1));
        Bucket {
            interval,
            tolerance: interval
                .unwrap_or_default()
                .checked_mul(burst - 1)
                .unwrap_or(MAX_INTERVAL)
                .min(MAX_INTERVAL),
            max_pause,
            state: Mutex::new(Slots {
                due: Instant::now(),
                paused_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this request's turn.
    pub(crate) async fn acquire(&self) {
        loop {
            let slot = {
                let mut st = self.lock();
                let now = Instant::now();
                let mut slot = now;
                match st.paused_until {
                    Some(p) if p > now => slot = p,
                    _ => st.paused_until = None,
                }
                if let Some(interval) = self.interval {
                    let earliest = st.due.checked_sub(self.tolerance).unwrap_or(now);
                    slot = slot.max(earliest);
                    st.due = st.due.max(slot) + interval;
                }
                slot
            };
            tokio::time::sleep_until(slot).await;
            // A pause that began while this request waited holds it too: take a new slot.
            let paused = self.lock().paused_until.is_some_and(|p| p > Instant::now());
            if !paused {
                return;
            }
        }
    }

    /// Holds every request to this host for `delay` (capped), then lets them go at the steady
    /// rate rather than in a burst.
    pub(crate) fn pause(&self, delay: Duration) {
        let until = Instant::now() + delay.min(self.max_pause);
        let mut st = self.lock();
        let until = st.paused_until.map_or(until, |p| p.max(until));
        st.paused_until = Some(until);
        if self.interval.is_some() {
            st.due = st.due.max(until + self.tolerance);
        }
    }
}

/// A [`Registry`] whose every request first takes a turn from its host's bucket, and whose
/// `429` answers with `Retry-After` pause the whole host.
pub struct RateLimited<R: Registry + ?Sized> {
    inner: Arc<R>,
    bucket: Arc<Bucket>,
}

impl<R: Registry + ?Sized> RateLimited<R> {
    pub(crate) fn new(inner: Arc<R>, bucket: Arc<Bucket>) -> Self {
        RateLimited { inner, bucket }
    }

    /// Runs one request in its turn and learns from a 429.
    fn paced<'a, T: Send + 'a>(
        &'a self,
        request: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        async move {
            self.bucket.acquire().await;
            let result = request.await;
            // Every request to the host waits out one pause, instead of each collecting its
            // own 429: a 429 pauses for its Retry-After (else a second), a 503 only when it
            // says for how long.
            let pause = match &result {
                Err(RegistryError::RateLimited { retry_after, .. }) => {
                    Some(retry_after.unwrap_or(DEFAULT_PAUSE))
                }
                Err(RegistryError::Status {
                    status: 503,
                    retry_after: Some(delay),
                    ..
                }) => Some(*delay),
                _ => None,
            };
            if let Some(delay) = pause {
                tracing::debug!(
                    host = self.inner.host(),
                    ?delay,
                    "registry asked to slow down"
                );
                self.bucket.pause(delay);
            }
            result
        }
        .boxed()
    }
}

impl<R: Registry + ?Sized> Registry for RateLimited<R> {
    fn host(&self) -> &str {
        self.inner.host()
    }
    fn head_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>> {
        self.paced(self.inner.head_manifest(repo, reference))
    }
    fn get_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Manifest>> {
        self.paced(self.inner.get_manifest(repo, reference))
    }
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>> {
        self.paced(self.inner.put_manifest(repo, reference, manifest))
    }
    fn list_tags<'a>(&'a self, repo: &'a str, max_pages: usize) -> BoxFuture<'a, Result<TagList>> {
        self.paced(self.inner.list_tags(repo, max_pages))
    }
    fn blob_size<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>>> {
        self.paced(self.inner.blob_size(repo, digest))
    }
    fn get_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, Result<BlobStream>> {
        self.paced(self.inner.get_blob(repo, digest, offset))
    }
    fn start_upload<'a>(&'a self, repo: &'a str) -> BoxFuture<'a, Result<String>> {
        self.paced(self.inner.start_upload(repo))
    }
    fn mount_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        from: &'a str,
    ) -> BoxFuture<'a, Result<MountOutcome>> {
        self.paced(self.inner.mount_blob(repo, digest, from))
    }
    fn put_upload<'a>(
        &'a self,
        repo: &'a str,
        location: &'a str,
        digest: &'a str,
        size: u64,
        body: BlobStream,
    ) -> BoxFuture<'a, Result<()>> {
        self.paced(self.inner.put_upload(repo, location, digest, size, body))
    }
    fn patch_upload<'a>(
        &'a self,
        repo: &'a str,
        location: &'a str,
        offset: u64,
        len: u64,
        body: BlobStream,
    ) -> BoxFuture<'a, Result<String>> {
        self.paced(self.inner.patch_upload(repo, location, offset, len, body))
    }
    fn upload_status<'a>(
        &'a self,
        repo: &'a str,
        location: &'a str,
    ) -> BoxFuture<'a, Result<(u64, String)>> {
        self.paced(self.inner.upload_status(repo, location))
    }
    fn finish_upload<'a>(
        &'a self,
        repo: &'a str,
        location: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.paced(self.inner.finish_upload(repo, location, digest))
    }
    fn cancel_upload<'a>(&'a self, repo: &'a str, location: &'a str) -> BoxFuture<'a, ()> {
        async move {
            self.bucket.acquire().await;
            self.inner.cancel_upload(repo, location).await;
        }
        .boxed()
    }
    fn referrers<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        artifact_type: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<ReferrerList>>> {
        self.paced(self.inner.referrers(repo, digest, artifact_type))
    }
    fn put_manifest_with_subject<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<bool>> {
        self.paced(
            self.inner
                .put_manifest_with_subject(repo, reference, manifest),
        )
    }
    fn delete_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        self.paced(self.inner.delete_manifest(repo, reference))
    }
}

#[cfg(test)]
#[path = "ratelimit_tests.rs"]
mod tests;
