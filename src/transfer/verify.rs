//! A stream adapter that hashes bytes on their way through and refuses to finish when the
//! content is not what the descriptor promised.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;

use crate::registry::digest::Hasher;
use crate::registry::{BlobStream, RegistryError};

/// Where a verifying stream leaves the reason it failed, so the caller can report the blob's
/// own error rather than the upload's "body stream failed".
pub type FailureSlot = Arc<Mutex<Option<RegistryError>>>;

/// Hashes and counts bytes; holds back the last chunk until the digest is known to be right,
/// so a destination never receives the complete body of content that lied.
pub struct Verify {
    inner: BlobStream,
    hasher: Option<Hasher>,
    held: Option<Bytes>,
    digest: String,
    size: u64,
    on_bytes: Option<Box<dyn FnMut(u64) + Send>>,
    failure: FailureSlot,
    done: bool,
}

impl Verify {
    /// Verifies `inner` against `digest` and `size`, continuing a hash already fed with the
    /// bytes before this stream's start (`hasher`, for resumed transfers).
    pub fn new(
        inner: BlobStream,
        digest: &str,
        size: u64,
        hasher: Hasher,
        failure: FailureSlot,
    ) -> Self {
        Verify {
            inner,
            hasher: Some(hasher),
            held: None,
            digest: digest.to_string(),
            size,
            on_bytes: None,
            failure,
            done: false,
        }
    }

    /// Calls `f(n)` for every `n` bytes released downstream.
    pub fn on_bytes(mut self, f: impl FnMut(u64) + Send + 'static) -> Self {
        self.on_bytes = Some(Box::new(f));
        self
    }

    fn fail(&mut self, actual: String, actual_size: u64) -> RegistryError {
        self.done = true;
        let err = RegistryError::DigestMismatch {
            digest: self.digest.clone(),
            actual,
            expected_size: self.size,
            actual_size,
        };
        if let Ok(mut slot) = self.failure.lock() {
            *slot = Some(err.clone());
        }
        err
    }

    fn release(&mut self, chunk: Bytes) -> Poll<Option<Result<Bytes, RegistryError>>> {
        if let Some(f) = self.on_bytes.as_mut() {
            f(chunk.len() as u64);
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

impl Stream for Verify {
    type Item = Result<Bytes, RegistryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    // A source that found its own content bad (a layout blob that does not
                    // match its name) explains the failure better than the upload's error.
                    if !e.is_retryable()
                        && let Ok(mut slot) = this.failure.lock()
                    {
                        *slot = Some(e.clone());
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    let Some(hasher) = this.hasher.as_mut() else {
                        return Poll::Ready(None);
                    };
                    hasher.update(&chunk);
                    let seen = hasher.len();
                    if seen > this.size {
                        // More bytes than promised: stop before sending them on.
                        return Poll::Ready(Some(Err(
                            this.fail("(longer than its descriptor)".into(), seen)
                        )));
                    }
                    if let Some(prev) = this.held.replace(chunk) {
                        return this.release(prev);
                    }
                }
                Poll::Ready(None) => {
                    let Some(hasher) = this.hasher.take() else {
                        return Poll::Ready(None);
                    };
                    let seen = hasher.len();
                    let actual = hasher.finish();
                    if actual != this.digest || seen != this.size {
                        return Poll::Ready(Some(Err(this.fail(actual, seen))));
                    }
                    this.done = this.held.is_none();
                    return match this.held.take() {
                        Some(last) => {
                            this.done = true;
                            this.release(last)
                        }
                        None => Poll::Ready(None),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::digest::sha256_digest;
    use futures_util::StreamExt;

    fn chunks(parts: &[&'static [u8]]) -> BlobStream {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
        .boxed()
    }

    #[tokio::test]
    async fn passes_good_content_through() {
        let digest = sha256_digest(b"hello world");
        let slot = FailureSlot::default();
        let counted = Arc::new(Mutex::new(0u64));
        let c = counted.clone();
        let out: Vec<_> = Verify::new(
            chunks(&[b"hello", b" ", b"world"]),
            &digest,
            11,
            Hasher::new(),
            slot.clone(),
        )
        .on_bytes(move |n| *c.lock().unwrap() += n)
        .collect()
        .await;
        let bytes: Vec<u8> = out.into_iter().flat_map(|r| r.unwrap().to_vec()).collect();
        assert_eq!(bytes, b"hello world");
        assert_eq!(*counted.lock().unwrap(), 11);
        assert!(slot.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn withholds_the_last_chunk_of_lying_content() {
        let digest = sha256_digest(b"hello world");
        let slot = FailureSlot::default();
        let out: Vec<_> = Verify::new(
            chunks(&[b"hello", b" ", b"wOrld"]),
            &digest,
            11,
            Hasher::new(),
            slot.clone(),
        )
        .collect()
        .await;
        let released: usize = out
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|b| b.len())
            .sum();
        assert!(released < 11, "the full body must never go out");
        let err = out.into_iter().find_map(Result::err).unwrap();
        assert_eq!(err.reason(), "DigestMismatch");
        assert!(err.to_string().contains(&digest));
        assert_eq!(
            slot.lock().unwrap().as_ref().unwrap().reason(),
            "DigestMismatch"
        );
    }

    #[tokio::test]
    async fn refuses_extra_and_missing_bytes() {
        let digest = sha256_digest(b"abc");
        let out: Vec<_> = Verify::new(
            chunks(&[b"abcd"]),
            &digest,
            3,
            Hasher::new(),
            FailureSlot::default(),
        )
        .collect()
        .await;
        assert!(out.iter().all(|r| r.is_err()));
        let out: Vec<_> = Verify::new(
            chunks(&[b"ab"]),
            &digest,
            3,
            Hasher::new(),
            FailureSlot::default(),
        )
        .collect()
        .await;
        assert!(out.last().unwrap().is_err());
    }

    #[tokio::test]
    async fn continues_a_resumed_hash() {
        let digest = sha256_digest(b"abcdef");
        let mut h = Hasher::new();
        h.update(b"abc");
        let out: Vec<_> = Verify::new(
            chunks(&[b"de", b"f"]),
            &digest,
            6,
            h,
            FailureSlot::default(),
        )
        .collect()
        .await;
        assert!(out.iter().all(|r| r.is_ok()));
    }
}
