//! Blob uploads: an [`UploadSession`] owns one session at the registry (containerd's
//! `content.Writer`): chunks (PATCH), status for resume, the committing PUT (with the whole
//! body, or closing a chunked session) and cancel (DELETE). Mounts open one when refused.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};

use super::error::{RegistryError, Result};
use super::transport::{Access, check};
use super::{BlobStream, RegistryClient};

/// A blob to link from another repository of the same registry instead of uploading it.
#[derive(Clone, Copy, Debug)]
pub struct Mount<'a> {
    /// The blob's digest.
    pub digest: &'a str,
    /// The repository that holds it.
    pub from: &'a str,
}

/// What [`super::Registry::begin_upload`] got.
pub enum MountOutcome {
    /// The registry linked the blob (a mount was asked for); nothing to upload.
    Mounted,
    /// An upload session is open (no mount was asked for, or the registry declined it).
    Upload(Box<dyn UploadSession>),
}

impl std::fmt::Debug for MountOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountOutcome::Mounted => f.write_str("Mounted"),
            MountOutcome::Upload(s) => f.debug_tuple("Upload").field(&s.location()).finish(),
        }
    }
}

/// One open upload session: the bytes of one blob on their way into a repository. It follows
/// the location the registry gives with each answer (distribution signs the session's offset
/// into it and refuses older ones). Dropping it leaves the session to the registry's purge:
/// call [`UploadSession::cancel`] to free it now.
pub trait UploadSession: Send + Sync {
    /// Where the session is now, for messages.
    fn location(&self) -> &str;
    /// Sends `len` bytes of `body` that start at `offset` of the blob (PATCH).
    fn patch(&mut self, offset: u64, len: u64, body: BlobStream) -> BoxFuture<'_, Result<()>>;
    /// How many bytes the session holds, asked of the registry (for resuming).
    fn status(&mut self) -> BoxFuture<'_, Result<u64>>;
    /// Commits the session as `digest`: with `body` (its length and bytes), the whole blob in
    /// one PUT; without, closing a session whose bytes went up in chunks. On an error the
    /// session may still be open.
    fn finish<'a>(
        &'a mut self,
        digest: &'a str,
        body: Option<(u64, BlobStream)>,
    ) -> BoxFuture<'a, Result<()>>;
    /// Abandons the session so the registry can free what it holds (best effort).
    fn cancel(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// An upload session of a [`RegistryClient`].
struct ClientUpload {
    client: Arc<RegistryClient>,
    repo: String,
    location: String,
}

impl UploadSession for ClientUpload {
    fn location(&self) -> &str {
        &self.location
    }
    fn patch(&mut self, offset: u64, len: u64, body: BlobStream) -> BoxFuture<'_, Result<()>> {
        async move {
            self.location = self
                .client
                .patch_upload(&self.repo, &self.location, offset, len, body)
                .await?;
            Ok(())
        }
        .boxed()
    }
    fn status(&mut self) -> BoxFuture<'_, Result<u64>> {
        async move {
            let (held, next) = self
                .client
                .upload_status(&self.repo, &self.location)
                .await?;
            self.location = next;
            Ok(held)
        }
        .boxed()
    }
    fn finish<'a>(
        &'a mut self,
        digest: &'a str,
        body: Option<(u64, BlobStream)>,
    ) -> BoxFuture<'a, Result<()>> {
        let (client, repo, location) = (&self.client, &self.repo, &self.location);
        match body {
            Some((size, body)) => client
                .put_upload(repo, location, digest, size, body)
                .boxed(),
            None => client.finish_upload(repo, location, digest).boxed(),
        }
    }
    fn cancel(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move { self.client.cancel_upload(&self.repo, &self.location).await }.boxed()
    }
}

impl RegistryClient {
    /// Opens an upload session in `repo`, mounting `mount` instead when the registry will.
    pub async fn begin_upload(
        self: Arc<Self>,
        repo: &str,
        mount: Option<Mount<'_>>,
    ) -> Result<MountOutcome> {
        let location = match mount {
            Some(m) => match self.mount_blob(repo, m.digest, m.from).await? {
                Some(location) => location,
                None => return Ok(MountOutcome::Mounted),
            },
            None => self.start_upload(repo).await?,
        };
        Ok(MountOutcome::Upload(Box::new(ClientUpload {
            client: self,
            repo: repo.to_string(),
            location,
        })))
    }

    fn location(&self, what: &str, resp: &reqwest::Response) -> Result<String> {
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::BadLocation {
                what: what.to_string(),
                detail: format!(
                    "HTTP {} upload answer without a readable Location header",
                    resp.status().as_u16()
                ),
            })?;
        self.t.resolve(what, location)
    }

    /// Opens an upload session; returns its location.
    async fn start_upload(&self, repo: &str) -> Result<String> {
        let what = format!("{}/{repo} (upload)", self.t.host);
        let url = self.t.url(&format!("/v2/{repo}/blobs/uploads/"));
        let resp = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                self.t.http.post(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = check(&what, resp).await?;
        self.location(&what, &resp)
    }

    /// Asks the registry to link `digest` from repository `from` of the same registry; `None`
    /// when it did, else the location of the session it opened instead.
    async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> Result<Option<String>> {
        let what = self.what(repo, digest);
        let url = self.t.url(&format!("/v2/{repo}/blobs/uploads/"));
        let access = Access::Mount {
            to: repo.into(),
            from: from.into(),
        };
        let resp = self
            .t
            .send(&what, &access, || {
                self.t
                    .http
                    .post(&url)
                    .query(&[("mount", digest), ("from", from)])
                    .header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = check(&what, resp).await?;
        if resp.status() == StatusCode::CREATED {
            Ok(None)
        } else {
            Ok(Some(self.location(&what, &resp)?))
        }
    }

    /// Uploads `size` bytes of `body` and closes the session under `digest` in one PUT.
    async fn put_upload(
        &self,
        repo: &str,
        location: &str,
        digest: &str,
        size: u64,
        body: BlobStream,
    ) -> Result<()> {
        let what = self.what(repo, digest);
        let url = with_digest(location, digest, &what)?;
        let mut body = Some(reqwest::Body::wrap_stream(body));
        let resp = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                let req = self
                    .t
                    .blob_http(size)
                    .put(&url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size);
                // The stream can be sent once; after a 401 the retry goes out empty and the
                // registry refuses it, which surfaces as the auth error it is.
                match body.take() {
                    Some(b) => req.body(b),
                    None => req,
                }
            })
            .await?;
        check(&what, resp).await?;
        Ok(())
    }

    /// Sends one chunk of `len` bytes starting at `offset`; returns the session's next location.
    async fn patch_upload(
        &self,
        repo: &str,
        location: &str,
        offset: u64,
        len: u64,
        body: BlobStream,
    ) -> Result<String> {
        let what = format!("{}/{repo} (upload chunk at {offset})", self.t.host);
        let mut body = Some(reqwest::Body::wrap_stream(body));
        let end = offset.saturating_add(len).saturating_sub(1);
        let resp = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                let req = self
                    .t
                    .blob_http(len)
                    .patch(location)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, format!("{offset}-{end}"))
                    .header(CONTENT_LENGTH, len);
                match body.take() {
                    Some(b) => req.body(b),
                    None => req,
                }
            })
            .await?;
        let resp = check(&what, resp).await?;
        self.location(&what, &resp)
    }

    /// How many bytes the session holds (from its `Range: 0-N`), and its current location.
    async fn upload_status(&self, repo: &str, location: &str) -> Result<(u64, String)> {
        let what = format!("{}/{repo} (upload status)", self.t.host);
        let resp = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                self.t.http.get(location)
            })
            .await?;
        let resp = check(&what, resp).await?;
        let offset = resp
            .headers()
            .get(RANGE)
            .and_then(|v| v.to_str().ok())
            .map(held_bytes)
            .unwrap_or(0);
        let next = self
            .location(&what, &resp)
            .unwrap_or_else(|_| location.to_string());
        Ok((offset, next))
    }

    /// Closes a chunked session under `digest` (PUT without body).
    async fn finish_upload(&self, repo: &str, location: &str, digest: &str) -> Result<()> {
        let what = self.what(repo, digest);
        let url = with_digest(location, digest, &what)?;
        let resp = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                self.t.http.put(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        check(&what, resp).await?;
        Ok(())
    }

    /// Abandons a session so the registry can free what it holds. Best effort.
    async fn cancel_upload(&self, repo: &str, location: &str) {
        let what = format!("{}/{repo} (cancel upload)", self.t.host);
        let result = self
            .t
            .send(&what, &Access::Push(repo.into()), || {
                self.t.http.delete(location)
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "cancelling an upload session failed");
        }
    }
}

/// Bytes a session holds, from its `Range: 0-<last byte>` header. Distribution answers `0-0`
/// for an empty session (it cannot tell one byte from none), which is read as 0: an empty
/// session is what a client meets, one holding a single byte is not. Anything unreadable is 0
/// (start over), and so is a last byte of `u64::MAX`, which no session can hold.
pub fn held_bytes(range: &str) -> u64 {
    let range = range.trim().trim_start_matches("bytes=");
    match range.split_once('-') {
        Some((_, end)) => match end.trim().parse::<u64>() {
            Ok(0) | Err(_) => 0,
            Ok(last) => last.checked_add(1).unwrap_or(0),
        },
        None => 0,
    }
}

/// The session location with `digest=` added to its query.
fn with_digest(location: &str, digest: &str, what: &str) -> Result<String> {
    let mut url = url::Url::parse(location).map_err(|e| RegistryError::BadLocation {
        what: what.to_string(),
        detail: format!("upload location is not a URL: {e}"),
    })?;
    url.query_pairs_mut().append_pair("digest", digest);
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ranges() {
        assert_eq!(held_bytes("0-0"), 0);
        assert_eq!(held_bytes("0-999"), 1000);
        assert_eq!(held_bytes("bytes=0-8388607"), 8 * 1024 * 1024);
        assert_eq!(held_bytes("0--1"), 0);
        assert_eq!(held_bytes("garbage"), 0);
        assert_eq!(held_bytes("0-18446744073709551615"), 0);
        assert_eq!(held_bytes("0-18446744073709551614"), u64::MAX);
    }
}
