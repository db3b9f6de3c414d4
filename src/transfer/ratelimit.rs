//! Request pacing per registry host: a token bucket shared by every client of the host, and a
//! shared pause when it answers `429` (or `503` with `Retry-After`). Requests throttled while a
//! pause is in effect wait for its end together and ask again in place (429/503 are flow
//! control: they cost no retry attempt and no progress); requests that were not throttled go
//! on, because a registry that refuses some requests at random (a proxy, a sharded backend)
//! would otherwise hold the whole host in pauses. With a configured rate, a pause also pushes
//! the pacing schedule back, so every request to the host slows down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::registry::{
    BlobStream, Manifest, ManifestHead, Mount, MountOutcome, ReferrerList, Registry, RegistryError,
    Result, TagList, UploadSession,
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
    /// How long a request that can be sent again keeps waiting out 429/503 answers in place
    /// before the error goes to the caller (see [`RateLimited`]). Zero: never in place.
    patience: Duration,
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
            patience: Duration::ZERO,
            state: Mutex::new(Slots {
                due: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// Lets re-sendable requests wait out throttling in place for up to `patience`.
    pub(crate) fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
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
                // Without a configured rate, a pause holds only the requests that were
                // throttled themselves (see `paced_again`); with one, every request.
                match st.paused_until {
                    Some(p) if p > now && self.interval.is_some() => slot = p,
                    Some(p) if p > now => {}
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
            let paused = self.interval.is_some()
                && self.lock().paused_until.is_some_and(|p| p > Instant::now());
            if !paused {
                return;
            }
        }
    }

    /// Returns once no pause is in effect, without taking a turn.
    #[cfg(test)]
    pub(crate) async fn until_unpaused(&self) {
        loop {
            let until = self.lock().paused_until.filter(|p| *p > Instant::now());
            match until {
                Some(p) => tokio::time::sleep_until(p).await,
                None => return,
            }
        }
    }

    /// Holds every request to this host for `delay` (capped), then lets them go at the steady
    /// rate rather than in a burst.
    /// Returns when the pause ends (a pause already in effect may end later).
    pub(crate) fn pause(&self, delay: Duration) -> Instant {
        let until = Instant::now() + delay.min(self.max_pause);
        let mut st = self.lock();
        let until = st
            .paused_until
            .filter(|p| *p > Instant::now())
            .map_or(until, |p| p.max(until));
        st.paused_until = Some(until);
        if self.interval.is_some() {
            st.due = st.due.max(until + self.tolerance);
        }
        until
    }
}

/// A [`Registry`] whose every request first takes a turn from its host's bucket, and whose
/// throttled requests wait out the host's shared pause and ask again (see the module doc).
pub struct RateLimited<R: Registry + ?Sized> {
    inner: Arc<R>,
    bucket: Arc<Bucket>,
}

impl<R: Registry + ?Sized> RateLimited<R> {
    pub(crate) fn new(inner: Arc<R>, bucket: Arc<Bucket>) -> Self {
        RateLimited { inner, bucket }
    }

    /// Runs one request in its turn and learns from a 429 (see [`Bucket::learn`]).
    fn paced<'a, T: Send + 'a>(
        &'a self,
        request: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        self.bucket.paced(self.inner.host(), request)
    }

    /// Like [`Self::paced`] for a request that can be sent again (no streamed body): a `429`
    /// or `503` is waited out and the same request asked again, for up to the bucket's
    /// patience, so a throttled step does not cost the transfer around it its progress.
    fn paced_again<'a, T: Send + 'a>(
        &'a self,
        make: impl Fn() -> BoxFuture<'a, Result<T>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T>> {
        async move {
            let mut again = Again::new();
            loop {
                self.bucket.acquire().await;
                let result = make().await;
                match again.until(&self.bucket, self.inner.host(), &result) {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => return result,
                }
            }
        }
        .boxed()
    }
}

impl Bucket {
    /// Runs one request in its turn and learns from a 429 (see [`Bucket::learn`]).
    fn paced<'a, T: Send + 'a>(
        &'a self,
        host: &'a str,
        request: BoxFuture<'a, Result<T>>,
    ) -> BoxFuture<'a, Result<T>> {
        async move {
            self.acquire().await;
            let result = request.await;
            self.learn(host, &result, 1);
            result
        }
        .boxed()
    }
}

/// The throttled answers of one request that is sent again (see `paced_again`).
struct Again {
    started: Instant,
    throttled: u32,
}

impl Again {
    fn new() -> Self {
        Again {
            started: Instant::now(),
            throttled: 0,
        }
    }

    /// Learns from `result`; when it was throttled and the bucket's patience allows, the
    /// moment to send the request again. `None`: `result` stands.
    fn until<T>(&mut self, bucket: &Bucket, host: &str, result: &Result<T>) -> Option<Instant> {
        self.throttled += 1;
        // Requests throttled together wait for the same moment, the end of the pause in
        // effect when their 429 came; later 429s do not hold them longer.
        bucket
            .learn(host, result, self.throttled)
            .filter(|until| *until < self.started + bucket.patience)
    }
}

/// An upload session whose every request takes its turn in the host's bucket, as the
/// [`RateLimited`] registry that opened it: chunks and whole-blob PUTs (streamed bodies) once,
/// status and the closing PUT again after a throttled answer.
struct PacedUpload {
    inner: Box<dyn UploadSession>,
    bucket: Arc<Bucket>,
    host: String,
}

impl UploadSession for PacedUpload {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn patch(&mut self, offset: u64, len: u64, body: BlobStream) -> BoxFuture<'_, Result<()>> {
        self.bucket
            .paced(&self.host, self.inner.patch(offset, len, body))
    }
    fn status(&mut self) -> BoxFuture<'_, Result<u64>> {
        async move {
            let mut again = Again::new();
            loop {
                self.bucket.acquire().await;
                let result = self.inner.status().await;
                match again.until(&self.bucket, &self.host, &result) {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => return result,
                }
            }
        }
        .boxed()
    }
    fn finish<'a>(
        &'a mut self,
        digest: &'a str,
        body: Option<(u64, BlobStream)>,
    ) -> BoxFuture<'a, Result<()>> {
        match body {
            body @ Some(_) => self
                .bucket
                .paced(&self.host, self.inner.finish(digest, body)),
            None => async move {
                let mut again = Again::new();
                loop {
                    self.bucket.acquire().await;
                    let result = self.inner.finish(digest, None).await;
                    match again.until(&self.bucket, &self.host, &result) {
                        Some(until) => tokio::time::sleep_until(until).await,
                        None => return result,
                    }
                }
            }
            .boxed(),
        }
    }
    fn cancel(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            self.bucket.acquire().await;
            self.inner.cancel().await;
        }
        .boxed()
    }
}

impl Bucket {
    /// Learns from an answer. Every request to the host waits out one pause, instead of each
    /// collecting its own 429: a 429 pauses the host for its Retry-After (else a second), a
    /// 503 only when it says for how long. Returns how long the request itself should wait
    /// before asking again when it was throttled (`n`: times in a row, for the backoff when
    /// the registry gave no Retry-After): when the host's pause ends, or its own backoff.
    fn learn<T>(&self, host: &str, result: &Result<T>, n: u32) -> Option<Instant> {
        let (pause, retry_after) = match result {
            Err(RegistryError::RateLimited { retry_after, .. }) => {
                (Some(retry_after.unwrap_or(DEFAULT_PAUSE)), *retry_after)
            }
            Err(RegistryError::Status {
                status: 503,
                retry_after,
                ..
            }) => (*retry_after, *retry_after),
            _ => return None,
        };
        if let Some(delay) = pause {
            tracing::debug!(host, ?delay, "registry asked to slow down");
            return Some(self.pause(delay));
        }
        let backoff = DEFAULT_PAUSE.saturating_mul(1 << n.saturating_sub(1).min(5));
        Some(Instant::now() + retry_after.unwrap_or(backoff).min(self.max_pause))
    }
}

impl<R: Registry + ?Sized + 'static> Registry for RateLimited<R> {
    fn host(&self) -> &str {
        self.inner.host()
    }
    fn head_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>> {
        self.paced_again(move || self.inner.head_manifest(repo, reference))
    }
    fn get_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Manifest>> {
        self.paced_again(move || self.inner.get_manifest(repo, reference))
    }
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>> {
        self.paced_again(move || self.inner.put_manifest(repo, reference, manifest))
    }
    fn list_tags<'a>(&'a self, repo: &'a str, max_pages: usize) -> BoxFuture<'a, Result<TagList>> {
        self.paced_again(move || self.inner.list_tags(repo, max_pages))
    }
    fn blob_size<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>>> {
        self.paced_again(move || self.inner.blob_size(repo, digest))
    }
    fn get_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        offset: u64,
        size: u64,
    ) -> BoxFuture<'a, Result<BlobStream>> {
        self.paced_again(move || self.inner.get_blob(repo, digest, offset, size))
    }
    fn begin_upload<'a>(
        self: Arc<Self>,
        repo: &'a str,
        mount: Option<Mount<'a>>,
    ) -> BoxFuture<'a, Result<MountOutcome>> {
        async move {
            let begun = self
                .paced_again(|| self.inner.clone().begin_upload(repo, mount))
                .await?;
            Ok(match begun {
                MountOutcome::Upload(inner) => MountOutcome::Upload(Box::new(PacedUpload {
                    inner,
                    bucket: self.bucket.clone(),
                    host: self.inner.host().to_string(),
                })),
                MountOutcome::Mounted => MountOutcome::Mounted,
            })
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
