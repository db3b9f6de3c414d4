//! One blob transfer: mount from a sibling (tried first, under the mount limit rather than the
//! transfer limits), or HEAD the destination (skipped on the first attempt for a small blob of a
//! manifest the destination lacked) and stream from the source into an upload session (one
//! verifying PUT for small blobs, resumable chunks for large ones); retried as the policy says.
//! A session that is left open, because the transfer failed for good or was aborted when every
//! watcher left, is DELETEd.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use tokio::sync::{Mutex, watch};

use super::verify::{FailureSlot, Verify};
use super::{BlobOutcome, BlobRequest, BlobState, Engine, TransferError};
use super::{chunked, watchdog};
use crate::registry::digest::Hasher;
use crate::registry::{BlobStream, MountOutcome, Registry, RegistryError};

/// Runs the transfer under the engine's limits and retry policy.
pub(super) async fn run(
    engine: &Engine,
    req: &BlobRequest,
    mount_from: Option<&str>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, TransferError> {
    let mut mount_from = mount_from;
    if let Some(from) = mount_from {
        // A mount is one request that moves no bytes: tried before queueing for transfer
        // permits, so a tag whose layers a sibling holds does not wait behind byte copies.
        // No HEAD first: mounting a blob the repository already has succeeds too.
        let (dst, repo) = (&req.destination, req.destination_repo.as_str());
        let _permit = engine.mount_permit(dst.host()).await;
        match dst.mount_blob(repo, &req.digest, from).await {
            Ok(MountOutcome::Mounted) => return Ok(BlobOutcome::Mounted),
            Ok(MountOutcome::Upload(location)) => {
                // Refused: copy the bytes under the usual limits, without asking again.
                dst.cancel_upload(repo, &location).await;
                mount_from = None;
            }
            Err(e) if !e.is_retryable() => mount_from = None,
            // Transient: the attempts below try the mount again under the retry policy.
            Err(_) => {}
        }
    }
    // Outlives the attempts, so a chunked upload can continue in the next one; dropped with
    // this future when the transfer is aborted, which cancels the session.
    let session = Mutex::new(Session::new(req.destination.clone(), &req.destination_repo));
    let sent = Arc::new(AtomicU64::new(0));
    let chunk = (req.size > engine.config().chunked_threshold).then(|| engine.chunk_size());
    let blind = req.likely_absent
        && mount_from.is_none()
        && chunk.is_none()
        && req.size <= engine.config().blind_upload_max;
    let result = engine
        .config()
        .retry
        .run(
            |n| {
                let (session, sent) = (&session, &sent);
                async move {
                    let started = std::time::Instant::now();
                    let work = attempt(
                        engine,
                        req,
                        mount_from,
                        chunk,
                        blind && n == 1,
                        session,
                        sent,
                        tx,
                    );
                    let result = watchdog::guard(engine.config().stall, &req.digest, sent, tx, work).await;
                    if let Err(e @ TransferError::Stalled { .. }) = &result {
                        // The watchdog dropped the attempt and its permits: tell the limits.
                        engine.note_failure(req.source.host(), req.destination.host(), started, e);
                    }
                    result
                }
            },
            |attempt, delay, err| {
                tracing::debug!(digest = %req.digest, attempt, ?delay, error = %err, "blob transfer failed, retrying");
                tx.send_replace(BlobState::Retrying {
                    attempt,
                    delay,
                    reason: err.reason(),
                });
            },
        )
        .await;
    // Failed for good: free what the registry holds for us now rather than from Drop.
    session.lock().await.cancel().await;
    result
}

/// One attempt. Transfer permits are taken only once the destination is known to lack the
/// blob and released when the attempt ends, so HEADs, backoff sleeps and rate-limit waits
/// between attempts leave the slots to transfers that move bytes.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    engine: &Engine,
    req: &BlobRequest,
    mount_from: Option<&str>,
    chunk: Option<u64>,
    blind: bool,
    session: &Mutex<Session>,
    sent: &Arc<AtomicU64>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, TransferError> {
    let mut session = session.lock().await;
    let dst = &req.destination;
    // A blind first attempt skips the question; a retry asks, since the last answer may have
    // been lost after the blob was stored.
    if !blind
        && dst
            .blob_size(&req.destination_repo, &req.digest)
            .await
            .map_err(|e| TransferError::destination(req, e))?
            .is_some()
    {
        // Someone else finished it, or our last attempt's answer was lost.
        session.cancel().await;
        return Ok(BlobOutcome::Exists);
    }
    let permits = engine
        .permits(req.source.host(), req.destination.host(), req.size)
        .await;
    let before = sent.load(Ordering::Relaxed);
    let result = move_bytes(req, mount_from, chunk, blind, &mut session, sent, tx).await;
    // Feeds the registries' adaptive limits: bytes moved, or push-back.
    permits.finish(&result, sent.load(Ordering::Relaxed).saturating_sub(before));
    result
}

/// The part of an attempt that holds the transfer permits.
async fn move_bytes(
    req: &BlobRequest,
    mount_from: Option<&str>,
    chunk: Option<u64>,
    blind: bool,
    session: &mut Session,
    sent: &Arc<AtomicU64>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, TransferError> {
    let Some(chunk) = chunk else {
        // Blind, nothing can make the source's bytes unneeded: ask for them while the session
        // opens, one round trip fewer per small blob.
        let (opened, source) = if blind {
            let source = req.source.get_blob(&req.source_repo, &req.digest, 0);
            let (opened, source) = tokio::join!(open_session(req, mount_from), source);
            let source = source.map_err(|e| TransferError::source(req, e));
            (opened?, Some(source))
        } else {
            (open_session(req, mount_from).await?, None)
        };
        let location = match opened {
            Opened::Mounted => return Ok(BlobOutcome::Mounted),
            Opened::Session(location) => location,
        };
        session.open(location.clone());
        let result = put_whole(req, &location, source, sent, tx).await;
        // A PUT cut short cannot be continued: its session goes either way.
        match result {
            Ok(_) => session.close(),
            Err(_) => session.cancel().await,
        }
        return result;
    };
    let offset = match chunked::resume_offset(req, session).await? {
        Some(offset) => offset,
        None => {
            match open_session(req, mount_from).await? {
                Opened::Mounted => return Ok(BlobOutcome::Mounted),
                Opened::Session(location) => session.open(location),
            }
            0
        }
    };
    chunked::upload(req, session, offset, chunk, sent, tx).await
}

enum Opened {
    Mounted,
    Session(String),
}

/// Mounts from `mount_from` when given, else (or when the registry will not) opens a session.
async fn open_session(
    req: &BlobRequest,
    mount_from: Option<&str>,
) -> Result<Opened, TransferError> {
    open_or_mount(req, mount_from)
        .await
        .map_err(|e| TransferError::destination(req, e))
}

async fn open_or_mount(
    req: &BlobRequest,
    mount_from: Option<&str>,
) -> Result<Opened, RegistryError> {
    let (dst, repo) = (&req.destination, req.destination_repo.as_str());
    let location = match mount_from {
        Some(from) => match dst.mount_blob(repo, &req.digest, from).await {
            Ok(MountOutcome::Mounted) => return Ok(Opened::Mounted),
            Ok(MountOutcome::Upload(location)) => location,
            // A mount the registry will not do (no read access to `from`, say) is not the
            // blob's failure: copy it instead.
            Err(e) if !e.is_retryable() => dst.start_upload(repo).await?,
            Err(e) => return Err(e),
        },
        None => dst.start_upload(repo).await?,
    };
    Ok(Opened::Session(location))
}

/// Streams the whole blob through a verifying hash into one PUT; `source` when already asked for.
async fn put_whole(
    req: &BlobRequest,
    location: &str,
    source: Option<Result<BlobStream, TransferError>>,
    sent: &Arc<AtomicU64>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, TransferError> {
    let digest = req.digest.as_str();
    tx.send_replace(BlobState::Copying {
        done: 0,
        total: req.size,
    });
    let source = match source {
        Some(source) => source?,
        None => req
            .source
            .get_blob(&req.source_repo, digest, 0)
            .await
            .map_err(|e| TransferError::source(req, e))?,
    };
    let failure = FailureSlot::default();
    let (counter, progress, total) = (sent.clone(), tx.clone(), req.size);
    let mut done = 0;
    let body = Verify::new(source, digest, req.size, Hasher::new(), failure.clone())
        .on_bytes(move |n| {
            counter.fetch_add(n, Ordering::Relaxed);
            done += n;
            progress.send_replace(BlobState::Copying { done, total });
        })
        .boxed();
    match req
        .destination
        .put_upload(&req.destination_repo, location, digest, req.size, body)
        .await
    {
        Ok(()) => Ok(BlobOutcome::Copied {
            bytes_sent: sent.load(Ordering::Relaxed),
        }),
        // The verifier's finding explains the failed upload better than the upload's error.
        Err(e) => {
            Err(chunked::take(req, &failure).unwrap_or_else(|| TransferError::destination(req, e)))
        }
    }
}

/// Our upload session at the destination, if one is open: where it is and what it is known
/// to hold. Dropped while open (the transfer was aborted), it is DELETEd in the background.
pub(super) struct Session {
    dst: Arc<dyn Registry>,
    repo: String,
    open: Option<Open>,
}

struct Open {
    /// The latest location the registry gave: distribution signs the session's offset into it
    /// and refuses older ones.
    location: String,
    /// Hash of the bytes the session is known to hold; its length is their count.
    held: Hasher,
}

impl Session {
    fn new(dst: Arc<dyn Registry>, repo: &str) -> Self {
        Session {
            dst,
            repo: repo.to_string(),
            open: None,
        }
    }

    /// Records a new, empty session.
    pub(super) fn open(&mut self, location: String) {
        self.open = Some(Open {
            location,
            held: Hasher::new(),
        });
    }

    /// The session's current location, when one is open.
    pub(super) fn location(&self) -> Option<&str> {
        self.open.as_ref().map(|o| o.location.as_str())
    }

    /// Hash of the bytes the session is known to hold (empty when none is open).
    pub(super) fn held(&self) -> Hasher {
        self.open
            .as_ref()
            .map(|o| o.held.clone())
            .unwrap_or_default()
    }

    /// The session holds the bytes `held` has seen and now lives at `location`.
    pub(super) fn advance(&mut self, location: String, held: Hasher) {
        self.open = Some(Open { location, held });
    }

    /// The session moved to `location` (a status answer), holding what it held.
    pub(super) fn relocate(&mut self, location: String) {
        if let Some(o) = self.open.as_mut() {
            o.location = location;
        }
    }

    /// The blob was committed: the session is gone, nothing to cancel.
    pub(super) fn close(&mut self) {
        self.open = None;
    }

    /// DELETEs the session now (best effort).
    pub(super) async fn cancel(&mut self) {
        if let Some(o) = self.open.take() {
            self.dst.cancel_upload(&self.repo, &o.location).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        // Drop cannot wait: hand the DELETE to the runtime. Without one (process exit) the
        // registry's upload purging reclaims the session eventually.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (dst, repo) = (self.dst.clone(), std::mem::take(&mut self.repo));
        tracing::debug!(repository = %repo, "cancelling the upload session of an aborted transfer");
        runtime.spawn(async move { dst.cancel_upload(&repo, &open.location).await });
    }
}
