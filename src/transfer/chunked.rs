//! Chunked, resumable uploads for large blobs: one streaming GET from the source is cut into
//! chunk-sized PATCH bodies (streamed, never held) and hashed on the way; the digest is checked
//! before the final PUT. After a failure the session is asked how far it got and the upload
//! continues from there, with a Range GET on the source and the hash state of the last chunk
//! the registry acknowledged.
//!
//! What the reference registry (distribution 2.8) allows, found by experiment: a session's
//! location carries an HMAC-signed `_state` holding the offset the registry last reported,
//! and a request whose `_state` offset is not the stored size is refused with 404
//! `BLOB_UPLOAD_INVALID` (status and DELETE included). Content-Range is not checked: a PATCH
//! appends whatever arrives, and a PATCH cut mid-body keeps the bytes that got in. So a
//! session continues when the failed request left nothing behind (a connection lost between
//! chunks, a gateway error, a buffering front proxy that never forwarded the cut body); after
//! a PATCH cut mid-body or one whose answer was lost, the session is unusable and the upload
//! starts over in a new one. Registries without that check may report an offset past the last
//! chunk we saw acknowledged: the gap is then read from the source and hashed, not sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{oneshot, watch};

use super::blob::Session;
use super::progress::CopyProgress;
use super::verify::FailureSlot;
use super::{BlobOutcome, BlobRequest, BlobState, TransferError, error};
use crate::registry::digest::Hasher;
use crate::registry::{BlobStream, Registry, RegistryError};

/// Times one source read may reconnect (Range GET at its offset) before the error stands.
const MAX_REOPENS: u32 = 3;

/// The verifier's or source's own error, when it left one.
pub(super) fn take(req: &BlobRequest, slot: &FailureSlot) -> Option<TransferError> {
    let e = slot.lock().ok().and_then(|mut s| s.take())?;
    Some(TransferError::source(req, e))
}

/// Where the open session stands, asked of the registry: `Some(offset)` to continue from, or
/// `None` when no session is open or it cannot continue (it is then cancelled).
pub(super) async fn resume_offset(
    req: &BlobRequest,
    session: &mut Session,
) -> Result<Option<u64>, TransferError> {
    let Some(open) = session.current() else {
        return Ok(None);
    };
    let known = open.held.len();
    match open.upload.status().await {
        Ok(offset) if offset <= req.size => {
            tracing::debug!(digest = %req.digest, offset, known, "resuming the upload session");
            Ok(Some(offset))
        }
        Ok(offset) => {
            tracing::debug!(digest = %req.digest, offset, size = req.size, "upload session holds more than the blob; starting over");
            session.cancel().await;
            Ok(None)
        }
        // Could not ask: keep the session for the next attempt.
        Err(e) if e.is_retryable() => Err(TransferError::destination(req, e)),
        Err(e) => {
            tracing::debug!(digest = %req.digest, error = %e, "upload session cannot be resumed; starting a new one");
            session.cancel().await;
            Ok(None)
        }
    }
}

/// Uploads the blob from `offset` (what the open session holds) in chunks of `chunk` bytes
/// and commits it.
pub(super) async fn upload(
    req: &BlobRequest,
    session: &mut Session,
    offset: u64,
    chunk: u64,
    sent: &Arc<AtomicU64>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, TransferError> {
    let held = session.held();
    // Continue the hash of the last acknowledged chunk when the session holds at least that
    // much; the bytes past it that the session holds are read and hashed below, not sent.
    let base = if offset >= held.len() {
        held
    } else {
        Hasher::new()
    };
    let from_source = |e| TransferError::source(req, e);
    let mut source = Source::open(req, base).await.map_err(from_source)?;
    source.skip_to(offset).await.map_err(from_source)?;
    let Some(open) = session.current() else {
        return Err(TransferError::UploadSessionLost {
            digest: req.digest.clone(),
            repo: error::destination(req),
            detail: "no upload session is open".into(),
        });
    };
    open.held = source.hasher.clone();
    let total = req.size;
    let mut at = offset;
    while at < total {
        let len = chunk.min(total - at);
        let failure = FailureSlot::default();
        let mut progress = CopyProgress::start(sent, tx, at, total);
        let (body, back) = chunk_body(source, len, failure.clone(), move |n| progress.add(n));
        match open.upload.patch(at, len, body).await {
            Ok(()) => {
                // The registry took all `len` bytes, so the body handed the source back.
                source = back.await.map_err(|_| TransferError::ChunkNotConsumed {
                    digest: req.digest.clone(),
                    repo: error::destination(req),
                    offset: at,
                })?;
                at += len;
                open.held = source.hasher.clone();
            }
            // The session keeps the last acknowledged chunk for the next attempt.
            Err(e) => {
                let e = take(req, &failure).unwrap_or_else(|| TransferError::destination(req, e));
                return Err(lost_session(req, session, e).await);
            }
        }
    }
    if let Err(e) = source.finish().await.map_err(from_source) {
        if matches!(e, TransferError::DigestMismatch { .. }) {
            session.cancel().await;
        }
        return Err(e);
    }
    if let Err(e) = open.upload.finish(&req.digest, None).await {
        return Err(lost_session(req, session, TransferError::destination(req, e)).await);
    }
    session.close();
    Ok(BlobOutcome::Copied {
        bytes_sent: sent.load(Ordering::Relaxed),
    })
}

/// A 404 on a session we hold means the session is gone (purged, or refused as stale), not the
/// blob: drop it and make the error one the retry policy retries, in a new session.
async fn lost_session(req: &BlobRequest, session: &mut Session, e: TransferError) -> TransferError {
    let TransferError::Destination {
        source: source @ RegistryError::NotFound { .. },
        ..
    } = &e
    else {
        return e;
    };
    session.cancel().await;
    TransferError::UploadSessionLost {
        digest: req.digest.clone(),
        repo: error::destination(req),
        detail: source.to_string(),
    }
}

/// The source side of a chunked upload: one streaming GET, hashed as it is read. A broken
/// connection is reopened at the current offset (Range GET) inside the chunk being sent,
/// because on distribution a chunk cut short leaves the session unusable.
struct Source {
    registry: Arc<dyn Registry>,
    repo: String,
    digest: String,
    size: u64,
    stream: BlobStream,
    /// Bytes read past the end of the last chunk; not hashed yet.
    pending: Option<Bytes>,
    /// Hash of every byte handed out; its length is the offset.
    hasher: Hasher,
    reopens: u32,
}

impl Source {
    /// Opens the source at `hasher.len()`, the hash of the bytes before it.
    async fn open(req: &BlobRequest, hasher: Hasher) -> Result<Self, RegistryError> {
        let offset = hasher.len();
        let mut source = Source {
            registry: req.source.clone(),
            repo: req.source_repo.clone(),
            digest: req.digest.clone(),
            size: req.size,
            stream: futures_util::stream::empty().boxed(),
            pending: None,
            hasher,
            reopens: 0,
        };
        if offset >= req.size {
            // Everything was sent; only the digest check is left.
            return Ok(source);
        }
        match source.fetch(offset).await {
            Ok(stream) => source.stream = stream,
            Err(RegistryError::RangeIgnored { .. }) => {
                // The source ignores Range: read from the start and hash up to `offset` again.
                source.hasher = Hasher::new();
                source.stream = source.fetch(0).await?;
                source.skip_to(offset).await?;
            }
            Err(e) => return Err(e),
        }
        Ok(source)
    }

    fn fetch(
        &self,
        offset: u64,
    ) -> futures_util::future::BoxFuture<'_, Result<BlobStream, RegistryError>> {
        self.registry
            .get_blob(&self.repo, &self.digest, offset, self.size)
    }

    fn offset(&self) -> u64 {
        self.hasher.len()
    }

    /// The next bytes, at most `max`, hashed; `None` when the source has ended.
    async fn next(&mut self, max: u64) -> Result<Option<Bytes>, RegistryError> {
        let mut piece = loop {
            if let Some(p) = self.pending.take() {
                break p;
            }
            match self.stream.next().await {
                Some(Ok(b)) if b.is_empty() => {}
                Some(Ok(b)) => break b,
                Some(Err(e))
                    if e.is_retryable()
                        && self.reopens < MAX_REOPENS
                        && self.offset() < self.size =>
                {
                    self.reopens += 1;
                    tracing::debug!(digest = %self.digest, offset = self.offset(), error = %e, "source connection broke; reopening at the offset");
                    self.stream = self.fetch(self.offset()).await?;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        };
        if let Ok(max) = usize::try_from(max)
            && piece.len() > max
        {
            self.pending = Some(piece.split_off(max));
        }
        self.hasher.update(&piece);
        Ok(Some(piece))
    }

    /// Reads and hashes up to `offset` without handing the bytes to anyone.
    async fn skip_to(&mut self, offset: u64) -> Result<(), RegistryError> {
        while self.offset() < offset {
            if self.next(offset - self.offset()).await?.is_none() {
                return Err(self.mismatch("(shorter than its descriptor)".into()));
            }
        }
        Ok(())
    }

    /// Checks that the source has ended and hashes to its digest.
    async fn finish(mut self) -> Result<(), RegistryError> {
        if self.next(1).await?.is_some() {
            return Err(self.mismatch("(longer than its descriptor)".into()));
        }
        let seen = self.offset();
        let actual = self.hasher.clone().finish();
        if actual != self.digest || seen != self.size {
            return Err(self.mismatch(actual));
        }
        Ok(())
    }

    fn mismatch(&self, actual: String) -> RegistryError {
        RegistryError::DigestMismatch {
            digest: self.digest.clone(),
            actual,
            expected_size: self.size,
            actual_size: self.offset(),
        }
    }
}

/// What a chunk body carries between polls.
struct ChunkState<F> {
    source: Option<Source>,
    left: u64,
    back: Option<oneshot::Sender<Source>>,
    failure: FailureSlot,
    on_bytes: F,
}

impl<F> ChunkState<F> {
    fn fail(&mut self, e: RegistryError) -> RegistryError {
        self.source = None;
        if let Ok(mut slot) = self.failure.lock() {
            *slot = Some(e.clone());
        }
        e
    }
}

/// A PATCH body of exactly `len` bytes taken from `source` as the connection asks for them.
/// The source comes back through the receiver as soon as the last byte is taken; when the
/// body fails or is dropped early the source goes with it and the receiver errs.
fn chunk_body(
    source: Source,
    len: u64,
    failure: FailureSlot,
    on_bytes: impl FnMut(u64) + Send + 'static,
) -> (BlobStream, oneshot::Receiver<Source>) {
    let (back, rx) = oneshot::channel();
    let state = ChunkState {
        source: Some(source),
        left: len,
        back: Some(back),
        failure,
        on_bytes,
    };
    let body = futures_util::stream::unfold(state, |mut st| async move {
        let source = st.source.as_mut()?;
        let piece = match source.next(st.left).await {
            Ok(Some(piece)) => piece,
            Ok(None) => {
                let e = source.mismatch("(shorter than its descriptor)".into());
                return Some((Err(st.fail(e)), st));
            }
            Err(e) => return Some((Err(st.fail(e)), st)),
        };
        st.left -= piece.len() as u64;
        (st.on_bytes)(piece.len() as u64);
        if st.left == 0
            && let (Some(source), Some(back)) = (st.source.take(), st.back.take())
        {
            // The receiver is gone only when the upload was abandoned; nothing to do then.
            let _ = back.send(source);
        }
        Some((Ok(piece), st))
    });
    (body.boxed(), rx)
}
