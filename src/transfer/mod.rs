//! The transfer manager: keyed, shared blob transfers under global and per-registry limits,
//! with retries and progress. Knows nothing of Kubernetes.
//!
//! A blob copy is keyed by (destination registry, repository, digest). A second request for a
//! key in flight joins it and watches its progress; the work is cancelled only when every
//! watcher has gone. A request for the same digest to another repository of the same registry
//! waits for the first and then mounts instead of copying the bytes again.

mod adaptive;
mod blob;
mod chunked;
mod error;
mod keyed_lock;
mod permits;
mod progress;
mod ratelimit;
mod retry;
mod verify;
mod watchdog;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;

use crate::registry::Registry;
use permits::Lane;

pub use error::TransferError;
pub use progress::{BlobOutcome, BlobProgress, BlobState, ProgressSink, no_progress};
pub use ratelimit::{RateLimit, RateLimited};
pub use retry::{RetryClass, RetryPolicy, Retryable};
pub use verify::{FailureSlot, Verify};
pub use watchdog::StallWatchdog;

/// Limits and policies of the engine. One engine serves every mirror in the process.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Blob transfers running at once across all registries. Default 8. A blob of at most
    /// [`SMALL_BLOB`] bytes counts a quarter: four times as many of those run at once.
    pub max_concurrent: usize,
    /// Blob transfers running at once against any one registry (source or destination): the
    /// cap of the adaptive limit, or the fixed limit when `adaptive` is off. Default 4. Small
    /// blobs count a quarter, as for `max_concurrent`.
    pub max_per_registry: usize,
    /// Where each registry's adaptive limit starts (clamped to `[1, max_per_registry]`);
    /// `None` starts at the cap. Default `None`.
    pub initial_per_registry: Option<usize>,
    /// Adapt each registry's limit within `[1, max_per_registry]` to its goodput and
    /// push-back (see `adaptive.rs`); off: fixed at `max_per_registry`. Default false here,
    /// so a limit set in code is exact; `imagemirror mirror` and the controller turn it on
    /// (`--adaptive-concurrency`): 429s no longer shrink it (the shared pause handles them),
    /// so under 20% 429s it runs as the fixed limit does (tests/it/hostile.rs).
    pub adaptive: bool,
    /// Retry policy for blob transfers. Default: 5 attempts, 500 ms base, 30 s cap. Its cap
    /// also bounds how long a `429` with `Retry-After` pauses a registry.
    pub retry: RetryPolicy,
    /// Blobs larger than this many bytes go up in chunks (PATCH) that can be resumed after a
    /// failure; smaller ones in one streaming PUT, which costs the registry fewer requests.
    /// Default 64 MiB: losing a smaller blob's upload costs less than a second on a fast link.
    pub chunked_threshold: u64,
    /// Bytes per chunk of a chunked upload (at least 64 KiB). Default 16 MiB: a failure loses at
    /// most one chunk on registries that can resume, and a 1 GiB blob costs 64 requests.
    pub chunk_size: u64,
    /// Requests per second to any one registry host, shared by every mirror in the process;
    /// `None` does not pace. Either way a `429` with `Retry-After` pauses the throttled requests to
    /// that host for that long (capped by `retry.max_delay`). Default `None`.
    pub rate_limit: Option<RateLimit>,
    /// Blobs up to this many bytes that are [`BlobRequest::likely_absent`] are uploaded
    /// without asking the destination first (POST + PUT instead of HEAD + POST + PUT): on
    /// registries that charge per request, a wasted re-upload of a small blob that was there
    /// after all costs less than a HEAD for every one that was not. Default 1 MiB; 0 always asks.
    pub blind_upload_max: u64,
    /// Abandons (and retries) a transfer attempt whose bytes stop moving; `None` disables.
    /// Default: under 1 KiB in 60 s.
    pub stall: Option<StallWatchdog>,
    /// Which HTTP version carries blob bodies and other requests (registry clients built
    /// through a `ClientPool` made with it). Default: HTTP/1.1 for blob bodies over
    /// [`SMALL_BLOB`], HTTP/2 where offered for the rest.
    pub http: crate::registry::HttpMode,
}

/// Smallest chunk the engine sends: below it the per-request cost dominates.
const MIN_CHUNK: u64 = 64 * 1024;

/// Blobs up to this size hold one unit of the limits, bigger ones [`BIG_UNITS`]. The limits
/// are set in big transfers, which hold stream buffers and bandwidth; a small one is bound by
/// round trips (and registry write latency) instead, so four times as many overlap for the
/// same memory, and a tag's config blob does not wait for a slot a layer stream would fill.
/// Four rather than two: at 50 ms of round trip a small blob's slot is mostly waiting, and
/// the many-small-tags benchmark over TLS is bound by how many of them are in flight
/// (docs/performance.md).
/// The same size picks the HTTP client of a blob body ([`crate::registry::SMALL_BLOB`]).
pub const SMALL_BLOB: u64 = crate::registry::SMALL_BLOB;
const BIG_UNITS: u32 = 4;

/// Units of the limits a transfer of `size` bytes holds.
fn units(size: u64) -> u32 {
    if size <= SMALL_BLOB { 1 } else { BIG_UNITS }
}

/// A limit of `transfers` big transfers, in units.
fn limit(transfers: usize) -> Semaphore {
    let units = transfers.max(1).saturating_mul(BIG_UNITS as usize);
    Semaphore::new(units.min(Semaphore::MAX_PERMITS))
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrent: 8,
            max_per_registry: 4,
            initial_per_registry: None,
            adaptive: false,
            retry: RetryPolicy::default(),
            chunked_threshold: 64 * 1024 * 1024,
            chunk_size: 16 * 1024 * 1024,
            rate_limit: None,
            blind_upload_max: 1024 * 1024,
            stall: Some(StallWatchdog::default()),
            http: crate::registry::HttpMode::default(),
        }
    }
}

/// One blob to make present at a destination repository.
#[derive(Clone)]
pub struct BlobRequest {
    /// Where the bytes come from.
    pub source: Arc<dyn Registry>,
    /// Source repository path.
    pub source_repo: String,
    /// Where they go.
    pub destination: Arc<dyn Registry>,
    /// Destination repository path.
    pub destination_repo: String,
    /// The blob's digest.
    pub digest: String,
    /// The blob's size, from its descriptor.
    pub size: u64,
    /// The destination most likely lacks the blob (the manifest referring to it was absent):
    /// when it is small (see [`EngineConfig::blind_upload_max`]) the first attempt uploads it
    /// without a HEAD. Retries, mounts and chunked uploads always ask first.
    pub likely_absent: bool,
}

/// (destination registry, repository, digest).
type Key = (String, String, String);

/// A transfer in flight. Watchers hold it by `Arc`; the last one to let go aborts the work.
struct Transfer {
    state: watch::Receiver<BlobState>,
    repo: String,
    abort: AbortHandle,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

/// What the engine knows: transfers in flight and digests known present.
#[derive(Default)]
struct Book {
    in_flight: HashMap<Key, Weak<Transfer>>,
    /// In-flight transfers by (registry, digest), to find a sibling repository to mount from.
    by_digest: HashMap<(String, String), Weak<Transfer>>,
    /// Digests known to exist per (registry, repository): the v2 pusher's `layersPushed`.
    known: HashSet<Key>,
    /// A repository per (registry, digest) known to hold it, to mount from.
    holder: HashMap<(String, String), String>,
    /// `in_flight` and `by_digest` are swept of dead entries (transfers aborted before they
    /// could remove themselves) when they reach this size.
    sweep_at: usize,
}

/// Per-host maps (request buckets, registry limits) are swept of unused entries beyond this.
const HOSTS_KEPT: usize = 256;

/// Smallest size at which the in-flight maps are swept.
const SWEEP_MIN: usize = 1024;

impl Book {
    /// Drops entries of transfers that no longer exist, when the maps have grown enough for it
    /// to be worth a pass; the threshold follows the live count, so sweeps stay amortised.
    fn sweep(&mut self) {
        if self.in_flight.len() + self.by_digest.len() < self.sweep_at.max(SWEEP_MIN) {
            return;
        }
        self.in_flight.retain(|_, w| w.strong_count() > 0);
        self.by_digest.retain(|_, w| w.strong_count() > 0);
        self.sweep_at = 2 * (self.in_flight.len() + self.by_digest.len());
    }
}

/// Bound on the remembered digests so a long-running controller's memory stays flat.
const KNOWN_LIMIT: usize = 200_000;

struct Inner {
    config: EngineConfig,
    manifests: keyed_lock::KeyedLocks,
    global: Arc<Semaphore>,
    /// Per registry host: the mount limit.
    per_registry: Mutex<HashMap<(String, Lane), Arc<Semaphore>>>,
    /// Per registry host: the (adaptive) transfer limit.
    transfer_limits: Mutex<HashMap<String, Arc<adaptive::AdaptiveLimit>>>,
    /// Request pacing per registry host.
    buckets: Mutex<HashMap<String, Arc<ratelimit::Bucket>>>,
    state: Mutex<Book>,
}

/// The process-wide transfer engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// An engine with the given limits.
    pub fn new(config: EngineConfig) -> Self {
        let global = Arc::new(limit(config.max_concurrent));
        Engine {
            inner: Arc::new(Inner {
                config,
                manifests: keyed_lock::KeyedLocks::default(),
                global,
                per_registry: Mutex::new(HashMap::new()),
                transfer_limits: Mutex::new(HashMap::new()),
                buckets: Mutex::new(HashMap::new()),
                state: Mutex::new(Book::default()),
            }),
        }
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Waits until no one else writes manifest `digest` to `repo` of `host`; holds the turn
    /// until the guard drops.
    pub async fn manifest_turn(
        &self,
        host: &str,
        repo: &str,
        digest: &str,
    ) -> keyed_lock::KeyedGuard {
        self.inner
            .manifests
            .lock(format!("{host}/{repo}@{digest}"))
            .await
    }

    /// Blob transfers currently in flight (each counted once however many watch it).
    pub fn in_flight(&self) -> usize {
        self.lock()
            .in_flight
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    fn registry_limit(&self, host: &str, lane: Lane) -> Arc<Semaphore> {
        let mut map = self
            .inner
            .per_registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map.len() >= HOSTS_KEPT && !map.contains_key(&(host.to_string(), lane)) {
            // Unused: nobody holds the semaphore, so no permit is out either.
            map.retain(|_, s| Arc::strong_count(s) > 1);
        }
        map.entry((host.to_string(), lane))
            .or_insert_with(|| Arc::new(limit(self.inner.config.max_per_registry)))
            .clone()
    }

    /// `registry` with its host's request pacing: every request waits its turn in the host's
    /// bucket, and throttled requests wait out one pause shared by every client of it. The
    /// engine applies this to the registries of every [`BlobRequest`]; callers wrap the ones
    /// they use for other requests (manifests, tag lists). Do not wrap twice.
    pub fn rate_limited(&self, registry: Arc<dyn Registry>) -> Arc<dyn Registry> {
        let bucket = self.bucket(registry.host());
        Arc::new(RateLimited::new(registry, bucket))
    }

    /// The request bucket of `host`. Buckets nobody holds are dropped once there are many
    /// (a controller serving many tenants meets many hosts).
    fn bucket(&self, host: &str) -> Arc<ratelimit::Bucket> {
        let mut map = self.inner.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= HOSTS_KEPT && !map.contains_key(host) {
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        let config = &self.inner.config;
        map.entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(
                    ratelimit::Bucket::new(config.rate_limit, config.retry.max_delay)
                        .with_patience(config.retry.throttle_deadline),
                )
            })
            .clone()
    }

    /// The chunk size in effect (the configured one, at least [`MIN_CHUNK`]).
    fn chunk_size(&self) -> u64 {
        self.inner.config.chunk_size.max(MIN_CHUNK)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that `digest` exists in a destination repository.
    fn remember(&self, host: &str, repo: &str, digest: &str) {
        let mut st = self.lock();
        if st.known.len() >= KNOWN_LIMIT {
            st.known.clear();
        }
        if st.holder.len() >= KNOWN_LIMIT {
            st.holder.clear();
        }
        st.known
            .insert((host.to_string(), repo.to_string(), digest.to_string()));
        st.holder
            .insert((host.to_string(), digest.to_string()), repo.to_string());
    }

    /// Forgets every digest believed present in `repo` of `host`: the registry said one of
    /// them is not there (deleted and garbage-collected, say), so all are asked again.
    pub fn forget_present(&self, host: &str, repo: &str) {
        let mut st = self.lock();
        st.known.retain(|(h, r, _)| !(h == host && r == repo));
        st.holder.retain(|(h, _), r| !(h == host && r == repo));
    }

    /// Entries of the engine's maps, for tests that check they stay bounded: (in flight,
    /// in flight by digest, known present, mount holders).
    pub fn book_sizes(&self) -> (usize, usize, usize, usize) {
        let st = self.lock();
        (
            st.in_flight.len(),
            st.by_digest.len(),
            st.known.len(),
            st.holder.len(),
        )
    }

    /// Makes one blob present at the destination: skipped when known or present, mounted
    /// when a sibling repository of the same registry has it, copied otherwise. Joins a
    /// transfer of the same key already in flight.
    pub async fn copy_blob(
        &self,
        req: BlobRequest,
        progress: &ProgressSink,
    ) -> Result<BlobOutcome, TransferError> {
        let host = req.destination.host().to_string();
        let key: Key = (
            host.clone(),
            req.destination_repo.clone(),
            req.digest.clone(),
        );
        let report = |state: BlobState| {
            progress(&BlobProgress {
                repository: format!("{host}/{}", req.destination_repo),
                digest: req.digest.clone(),
                size: req.size,
                state,
            })
        };
        let transfer = {
            let mut st = self.lock();
            if st.known.contains(&key) {
                drop(st);
                report(BlobState::Finished(Ok(BlobOutcome::Exists)));
                return Ok(BlobOutcome::Exists);
            }
            let joined = st.in_flight.get(&key).and_then(Weak::upgrade);
            match joined {
                Some(t) => t,
                None => {
                    let digest_key = (host.clone(), req.digest.clone());
                    let sibling = st
                        .by_digest
                        .get(&digest_key)
                        .and_then(Weak::upgrade)
                        .filter(|t| t.repo != req.destination_repo);
                    let holder = st
                        .holder
                        .get(&digest_key)
                        .filter(|r| **r != req.destination_repo)
                        .cloned();
                    let paced = BlobRequest {
                        source: self.rate_limited(req.source.clone()),
                        destination: self.rate_limited(req.destination.clone()),
                        ..req.clone()
                    };
                    let t = self.spawn(paced, key.clone(), sibling, holder);
                    st.sweep();
                    st.in_flight.insert(key.clone(), Arc::downgrade(&t));
                    st.by_digest.insert(digest_key, Arc::downgrade(&t));
                    t
                }
            }
        };
        watch_until_done(&transfer, &req.digest, &report).await
    }

    fn spawn(
        &self,
        req: BlobRequest,
        key: Key,
        sibling: Option<Arc<Transfer>>,
        holder: Option<String>,
    ) -> Arc<Transfer> {
        let (tx, rx) = watch::channel(BlobState::Waiting);
        let tx = Arc::new(tx);
        let engine = self.clone();
        let repo = req.destination_repo.clone();
        let handle = tokio::spawn(async move {
            let mut mount_from = holder;
            if let Some(sib) = sibling {
                // Same digest on its way into a sibling repository: wait, then mount from it.
                let _ = tx.send(BlobState::Waiting);
                if watch_until_done(&sib, &req.digest, &|_| {}).await.is_ok() {
                    mount_from = Some(sib.repo.clone());
                }
            }
            let result = blob::run(&engine, &req, mount_from.as_deref(), &tx).await;
            if result.is_ok() {
                engine.remember(&key.0, &key.1, &key.2);
            }
            engine.forget(&key);
            // Receivers may all be gone; that is fine.
            let _ = tx.send(BlobState::Finished(result));
        });
        Arc::new(Transfer {
            state: rx,
            repo,
            abort: handle.abort_handle(),
        })
    }

    /// Drops the in-flight entries of a finished transfer.
    fn forget(&self, key: &Key) {
        let mut st = self.lock();
        st.in_flight.remove(key);
        let digest_key = (key.0.clone(), key.2.clone());
        if st
            .by_digest
            .get(&digest_key)
            .and_then(Weak::upgrade)
            .is_none_or(|t| t.repo == key.1)
        {
            st.by_digest.remove(&digest_key);
        }
    }
}

/// Forwards a transfer's states to `report` until it finishes.
async fn watch_until_done(
    transfer: &Transfer,
    digest: &str,
    report: &(dyn Fn(BlobState) + Sync),
) -> Result<BlobOutcome, TransferError> {
    let mut rx = transfer.state.clone();
    loop {
        let state = rx.borrow_and_update().clone();
        report(state.clone());
        if let BlobState::Finished(result) = state {
            return result;
        }
        if rx.changed().await.is_err() {
            // The sender is gone without a final state: the task was aborted or panicked.
            let last = rx.borrow().clone();
            if let BlobState::Finished(result) = last {
                return result;
            }
            return Err(TransferError::Cancelled {
                digest: digest.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    const BIG: u64 = 64 << 20;
    const SMALL: u64 = 100 << 10;

    fn engine(max_concurrent: usize, max_per_registry: usize) -> Engine {
        Engine::new(EngineConfig {
            max_concurrent,
            max_per_registry,
            ..EngineConfig::default()
        })
    }

    #[tokio::test]
    async fn a_registry_runs_its_limit_of_big_transfers_or_four_times_as_many_small_ones() {
        let e = engine(8, 2);
        let first = e.permits("src:1", "dst:1", BIG).await;
        let _second = e.permits("src:1", "dst:1", BIG).await;
        assert!(e.permits("src:1", "dst:1", BIG).now_or_never().is_none());
        assert!(
            e.permits("dst:1", "other:1", SMALL)
                .now_or_never()
                .is_none()
        );
        // Other registries are not held up by these two.
        let _elsewhere = e.permits("a:1", "b:1", BIG).await;
        drop(first);
        let mut small = Vec::new();
        for _ in 0..4 {
            small.push(e.permits("src:1", "dst:1", SMALL).await);
        }
        assert!(e.permits("src:1", "dst:1", SMALL).now_or_never().is_none());
    }

    #[tokio::test]
    async fn the_global_limit_counts_the_same_units() {
        let e = engine(1, 4);
        let big = e.permits("a:1", "b:1", BIG).await;
        assert!(e.permits("c:1", "d:1", SMALL).now_or_never().is_none());
        drop(big);
        let mut small = Vec::new();
        for i in 0..4 {
            small.push(
                e.permits(&format!("s{i}:1"), &format!("d{i}:1"), SMALL)
                    .await,
            );
        }
        assert!(e.permits("g:1", "h:1", SMALL).now_or_never().is_none());
    }

    #[tokio::test]
    async fn mounts_do_not_wait_for_transfers_and_have_a_bound_of_their_own() {
        let e = engine(8, 1);
        let _big = e.permits("src:1", "dst:1", BIG).await;
        // As many mounts as small transfers: four per big-transfer slot.
        let mut mounts = Vec::new();
        for _ in 0..4 {
            mounts.push(e.mount_permit("dst:1").await);
        }
        assert!(e.mount_permit("dst:1").now_or_never().is_none());
    }

    #[test]
    fn absurd_limits_do_not_overflow_the_semaphore() {
        let e = engine(usize::MAX, usize::MAX);
        assert_eq!(e.inner.global.available_permits(), Semaphore::MAX_PERMITS);
    }
}
