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

use super::progress::CopyProgress;
use super::verify::{FailureSlot, Verify};
use super::{BlobOutcome, BlobRequest, BlobState, Engine, TransferError};
use super::{chunked, watchdog};
use crate::registry::digest::Hasher;
use crate::registry::{BlobStream, Mount, MountOutcome, UploadSession};

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
        let dst = &req.destination;
        let _permit = engine.mount_permit(dst.host()).await;
        let mount = Mount {
            digest: &req.digest,
            from,
        };
        match dst
            .clone()
            .begin_upload(&req.destination_repo, Some(mount))
            .await
        {
            Ok(MountOutcome::Mounted) => return Ok(BlobOutcome::Mounted),
            Ok(MountOutcome::Upload(session)) => {
                // Refused: copy the bytes under the usual limits, without asking again.
                session.cancel().await;
                mount_from = None;
            }
            Err(e) if !e.is_retryable() => mount_from = None,
            // Transient: the attempts below try the mount again under the retry policy.
            Err(_) => {}
        }
    }
    // Outlives the attempts, so a chunked upload can continue in the next one; dropped with
    // this future when the transfer is aborted, which cancels the session.
    let session = Mutex::new(Session::default());
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
            let source = req
                .source
                .get_blob(&req.source_repo, &req.digest, 0, req.size);
            let (opened, source) = tokio::join!(open_session(req, mount_from), source);
            let source = source.map_err(|e| TransferError::source(req, e));
            (opened?, Some(source))
        } else {
            (open_session(req, mount_from).await?, None)
        };
        let upload = match opened {
            MountOutcome::Mounted => return Ok(BlobOutcome::Mounted),
            MountOutcome::Upload(upload) => session.open(upload),
        };
        let result = put_whole(req, upload, source, sent, tx).await;
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
                MountOutcome::Mounted => return Ok(BlobOutcome::Mounted),
                MountOutcome::Upload(upload) => session.open(upload),
            };
            0
        }
    };
    chunked::upload(req, session, offset, chunk, sent, tx).await
}

/// Mounts from `mount_from` when given, else (or when the registry will not) opens a session.
async fn open_session(
    req: &BlobRequest,
    mount_from: Option<&str>,
) -> Result<MountOutcome, TransferError> {
    let (dst, repo) = (&req.destination, req.destination_repo.as_str());
    let mount = mount_from.map(|from| Mount {
        digest: &req.digest,
        from,
    });
    let begun = match dst.clone().begin_upload(repo, mount).await {
        // A mount the registry will not do (no read access to `from`, say) is not the
        // blob's failure: copy it instead.
        Err(e) if mount.is_some() && !e.is_retryable() => {
            dst.clone().begin_upload(repo, None).await
        }
        begun => begun,
    };
    begun.map_err(|e| TransferError::destination(req, e))
}

/// Streams the whole blob through a verifying hash into one PUT; `source` when already asked for.
async fn put_whole(
    req: &BlobRequest,
    upload: &mut dyn UploadSession,
    source: Option<Result<BlobStream, TransferError>>,
    sent: &Arc<AtomicU64>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, TransferError> {
    let digest = req.digest.as_str();
    let mut progress = CopyProgress::start(sent, tx, 0, req.size);
    let source = match source {
        Some(source) => source?,
        None => req
            .source
            .get_blob(&req.source_repo, digest, 0, req.size)
            .await
            .map_err(|e| TransferError::source(req, e))?,
    };
    let failure = FailureSlot::default();
    let body = Verify::new(source, digest, req.size, Hasher::new(), failure.clone())
        .on_bytes(move |n| progress.add(n))
        .boxed();
    match upload.finish(digest, Some((req.size, body))).await {
        Ok(()) => Ok(BlobOutcome::Copied {
            bytes_sent: sent.load(Ordering::Relaxed),
        }),
        // The verifier's finding explains the failed upload better than the upload's error.
        Err(e) => {
            Err(chunked::take(req, &failure).unwrap_or_else(|| TransferError::destination(req, e)))
        }
    }
}

/// Our upload session at the destination, if one is open, and what it is known to hold.
/// Dropped while open (the transfer was aborted), it is DELETEd in the background.
#[derive(Default)]
pub(super) struct Session {
    open: Option<Open>,
}

pub(super) struct Open {
    /// The registry's session; it follows the locations the registry gives.
    pub(super) upload: Box<dyn UploadSession>,
    /// Hash of the bytes the session is known to hold; its length is their count.
    pub(super) held: Hasher,
}

impl Session {
    /// Keeps a new, empty session; returns it.
    pub(super) fn open(&mut self, upload: Box<dyn UploadSession>) -> &mut dyn UploadSession {
        let open = self.open.insert(Open {
            upload,
            held: Hasher::new(),
        });
        open.upload.as_mut()
    }

    /// The open session, if any.
    pub(super) fn current(&mut self) -> Option<&mut Open> {
        self.open.as_mut()
    }

    /// Hash of the bytes the session is known to hold (empty when none is open).
    pub(super) fn held(&self) -> Hasher {
        self.open
            .as_ref()
            .map(|o| o.held.clone())
            .unwrap_or_default()
    }

    /// The blob was committed: the session is gone, nothing to cancel.
    pub(super) fn close(&mut self) {
        self.open = None;
    }

    /// DELETEs the session now (best effort).
    pub(super) async fn cancel(&mut self) {
        if let Some(o) = self.open.take() {
            o.upload.cancel().await;
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
        tracing::debug!("cancelling the upload session of an aborted transfer");
        runtime.spawn(open.upload.cancel());
    }
}
