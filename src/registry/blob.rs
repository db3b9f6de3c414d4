//! Blob reads: existence checks and streaming GETs (with Range for resume).

use futures_util::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::RANGE;

use super::error::{RegistryError, Result};
use super::transport::{Access, check};
use super::{BlobStream, RegistryClient};

impl RegistryClient {
    /// HEAD a blob: its size when present, `None` when not.
    pub async fn blob_size(&self, repo: &str, digest: &str) -> Result<Option<u64>> {
        let what = self.what(repo, digest);
        let url = self.t.url(&format!("/v2/{repo}/blobs/{digest}"));
        let resp = self
            .t
            .send(&what, &Access::Pull(repo.into()), || self.t.http.head(&url))
            .await?;
        match check(&what, resp).await {
            // On a HEAD, reqwest's content_length() is the empty body's: read the header.
            Ok(resp) => Ok(Some(
                resp.headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0),
            )),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Streams a blob of `size` bytes (its descriptor's) from byte `offset` on. The stream
    /// yields the registry's chunks as they arrive; nothing is buffered beyond them. `size`
    /// only picks the connection (see [`super::HttpMode`]); the caller verifies the bytes.
    pub async fn get_blob(
        &self,
        repo: &str,
        digest: &str,
        offset: u64,
        size: u64,
    ) -> Result<BlobStream> {
        let what = self.what(repo, digest);
        let url = self.t.url(&format!("/v2/{repo}/blobs/{digest}"));
        let bytes = size.saturating_sub(offset);
        let resp = self
            .t
            .send_blob_get(&what, &Access::Pull(repo.into()), bytes, |http| {
                let req = http.get(&url);
                if offset > 0 {
                    req.header(RANGE, format!("bytes={offset}-"))
                } else {
                    req
                }
            })
            .await?;
        let resp = check(&what, resp).await?;
        if offset > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(RegistryError::RangeIgnored {
                what,
                offset,
                status: resp.status().as_u16(),
            });
        }
        let stream = resp
            .bytes_stream()
            .map_err(move |e| RegistryError::transport(what.clone(), &e));
        Ok(stream.boxed())
    }
}
