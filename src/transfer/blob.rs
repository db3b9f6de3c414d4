//! One blob transfer: HEAD the destination, mount from a sibling, or stream from the source
//! through a verifying hash into an upload session; retried as the policy says.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use tokio::sync::watch;

use super::verify::{FailureSlot, Verify};
use super::{BlobOutcome, BlobRequest, BlobState, Engine};
use crate::registry::digest::Hasher;
use crate::registry::{MountOutcome, RegistryError};

/// Runs the transfer under the engine's limits and retry policy.
pub(super) async fn run(
    engine: &Engine,
    req: &BlobRequest,
    mount_from: Option<&str>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, RegistryError> {
    let _permits = engine
        .permits(req.source.host(), req.destination.host())
        .await;
    engine
        .config()
        .retry
        .run(
            |_| attempt(req, mount_from, tx),
            |attempt, delay, err| {
                tracing::debug!(digest = %req.digest, attempt, ?delay, error = %err, "blob transfer failed, retrying");
                tx.send_replace(BlobState::Retrying {
                    attempt,
                    delay,
                    reason: err.reason(),
                });
            },
        )
        .await
}

async fn attempt(
    req: &BlobRequest,
    mount_from: Option<&str>,
    tx: &Arc<watch::Sender<BlobState>>,
) -> Result<BlobOutcome, RegistryError> {
    let dst = &req.destination;
    let repo = req.destination_repo.as_str();
    let digest = req.digest.as_str();
    if dst.blob_size(repo, digest).await?.is_some() {
        return Ok(BlobOutcome::Exists);
    }
    let location = match mount_from {
        Some(from) => match dst.mount_blob(repo, digest, from).await {
            Ok(MountOutcome::Mounted) => return Ok(BlobOutcome::Mounted),
            Ok(MountOutcome::Upload(location)) => location,
            // A mount the registry will not do (no read access to `from`, say) is not the
            // blob's failure: copy it instead.
            Err(e) if !e.is_retryable() => dst.start_upload(repo).await?,
            Err(e) => return Err(e),
        },
        None => dst.start_upload(repo).await?,
    };
    tx.send_replace(BlobState::Copying {
        done: 0,
        total: req.size,
    });
    let source = match req.source.get_blob(&req.source_repo, digest, 0).await {
        Ok(s) => s,
        Err(e) => {
            dst.cancel_upload(repo, &location).await;
            return Err(e);
        }
    };
    let failure = FailureSlot::default();
    let sent = Arc::new(AtomicU64::new(0));
    let (counter, progress, total) = (sent.clone(), tx.clone(), req.size);
    let body = Verify::new(source, digest, req.size, Hasher::new(), failure.clone())
        .on_bytes(move |n| {
            let done = counter.fetch_add(n, Ordering::Relaxed) + n;
            progress.send_replace(BlobState::Copying { done, total });
        })
        .boxed();
    match dst
        .put_upload(repo, &location, digest, req.size, body)
        .await
    {
        Ok(()) => Ok(BlobOutcome::Copied {
            bytes_sent: sent.load(Ordering::Relaxed),
        }),
        Err(e) => {
            dst.cancel_upload(repo, &location).await;
            // The verifier's finding explains the failed upload better than the upload's error.
            let found = failure.lock().ok().and_then(|mut s| s.take());
            Err(found.unwrap_or(e))
        }
    }
}
