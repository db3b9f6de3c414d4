//! OCI distribution client: references, auth, transport, manifests, blobs and uploads.
//!
//! The engine depends on the [`Registry`] trait; [`RegistryClient`] is the HTTP implementation.

pub mod auth;
mod blob;
mod bulk;
mod delete;
pub mod digest;
mod error;
mod first_contact;
mod http;
pub mod manifest;
pub mod reference;
pub mod referrers;
mod roots;
mod transport;
mod upload;

#[cfg(test)]
mod parser_props;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

pub use auth::{Credentials, DockerConfig};
pub use error::{RegistryError, Result};
pub use http::{HttpClients, HttpMode, SMALL_BLOB};
pub use manifest::{Descriptor, Manifest, ManifestHead, Parsed, TagList};
pub use reference::Repository;
pub use referrers::{Referrer, ReferrerList};
pub use roots::preload as preload_root_certificates;
pub use transport::RegistryOptions;
pub use upload::{Mount, MountOutcome, UploadSession};

/// A stream of blob bytes.
pub type BlobStream = BoxStream<'static, Result<Bytes>>;

/// What the engine needs from a registry. Repository paths are relative to the registry
/// (`library/nginx`); references are tags or digests.
pub trait Registry: Send + Sync {
    /// The registry host, for messages and transfer keys.
    fn host(&self) -> &str;
    /// HEAD a manifest; `None` when absent.
    fn head_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>>;
    /// GET a manifest (size-capped, digest-verified when fetched by digest).
    fn get_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Manifest>>;
    /// PUT a manifest under a tag or digest.
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>>;
    /// The tags of a repository, reading at most `max_pages` pages of the registry's list.
    fn list_tags<'a>(&'a self, repo: &'a str, max_pages: usize) -> BoxFuture<'a, Result<TagList>>;
    /// HEAD a blob: its size, or `None` when absent.
    fn blob_size<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>>>;
    /// Stream a blob from `offset` on. `size` is the blob's size from its descriptor: a hint
    /// for how to carry it (the HTTP client sends small ones over HTTP/2 where offered, see
    /// [`HttpMode`]), not checked here; the caller verifies what arrives.
    fn get_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        offset: u64,
        size: u64,
    ) -> BoxFuture<'a, Result<BlobStream>>;
    /// Opens an upload session in `repo`. With `mount`, asks first to link the blob from
    /// another repository of the same registry: [`MountOutcome::Mounted`] when it did, else
    /// the session it opened instead. Takes the registry by `Arc` because the session lives
    /// on its own (a transfer keeps it across attempts, and cancels it when dropped).
    fn begin_upload<'a>(
        self: Arc<Self>,
        repo: &'a str,
        mount: Option<Mount<'a>>,
    ) -> BoxFuture<'a, Result<MountOutcome>>;
    /// The referrers of `digest` by the OCI 1.1 referrers API, filtered by `artifact_type`
    /// when the registry applies filters; `None` when the registry does not serve the API.
    /// The default is a registry without the API.
    fn referrers<'a>(
        &'a self,
        _repo: &'a str,
        _digest: &'a str,
        _artifact_type: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<ReferrerList>>> {
        async { Ok(None) }.boxed()
    }
    /// PUT a manifest that names a `subject`; true when the registry answered `OCI-Subject`.
    /// The default PUTs it plainly and reports no `OCI-Subject`.
    fn put_manifest_with_subject<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<bool>> {
        async move {
            self.put_manifest(repo, reference, manifest)
                .await
                .map(|()| false)
        }
        .boxed()
    }
    /// DELETE a manifest by tag or digest (`DELETE /v2/<name>/manifests/<reference>`). A
    /// registry that refuses answers 405 / UNSUPPORTED (see [`RegistryError::refuses_delete`]);
    /// CNCF distribution 2.x refuses tags with 400 DIGEST_INVALID and, given a digest, deletes
    /// every tag pointing at it. The default refuses, for implementations that cannot delete.
    fn delete_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let what = format!("{}/{repo}:{reference}", self.host());
        async move {
            Err(RegistryError::Status {
                what,
                status: 405,
                detail: "UNSUPPORTED deletes are not implemented by this client".into(),
                retry_after: None,
            })
        }
        .boxed()
    }
}

/// An HTTP client for one registry with its own TLS settings, credentials and token cache.
pub struct RegistryClient {
    t: transport::Transport,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.t.base)
            .finish()
    }
}

impl RegistryClient {
    /// A client for the registry at `host` (`host[:port]`, the API endpoint).
    pub fn new(host: &str, options: &RegistryOptions) -> Result<Self> {
        Ok(RegistryClient {
            t: transport::Transport::new(host, options, None)?,
        })
    }

    /// Like [`RegistryClient::new`], with the HTTP client (TLS settings, connection pool) taken
    /// from `http`, shared with the other clients built from it.
    pub fn with_http(host: &str, options: &RegistryOptions, http: &HttpClients) -> Result<Self> {
        Ok(RegistryClient {
            t: transport::Transport::new(host, options, Some(http))?,
        })
    }

    /// `host/repo:tag` or `host/repo@digest`, for messages.
    fn what(&self, repo: &str, reference: &str) -> String {
        let sep = if reference.contains(':') { '@' } else { ':' };
        format!("{}/{repo}{sep}{reference}", self.t.host)
    }
}

impl Registry for RegistryClient {
    fn host(&self) -> &str {
        &self.t.host
    }
    fn head_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>> {
        RegistryClient::head_manifest(self, repo, reference).boxed()
    }
    fn get_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Manifest>> {
        RegistryClient::get_manifest(self, repo, reference).boxed()
    }
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>> {
        RegistryClient::put_manifest(self, repo, reference, manifest).boxed()
    }
    fn list_tags<'a>(&'a self, repo: &'a str, max_pages: usize) -> BoxFuture<'a, Result<TagList>> {
        RegistryClient::list_tags(self, repo, max_pages).boxed()
    }
    fn blob_size<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>>> {
        RegistryClient::blob_size(self, repo, digest).boxed()
    }
    fn get_blob<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        offset: u64,
        size: u64,
    ) -> BoxFuture<'a, Result<BlobStream>> {
        RegistryClient::get_blob(self, repo, digest, offset, size).boxed()
    }
    fn begin_upload<'a>(
        self: Arc<Self>,
        repo: &'a str,
        mount: Option<Mount<'a>>,
    ) -> BoxFuture<'a, Result<MountOutcome>> {
        RegistryClient::begin_upload(self, repo, mount).boxed()
    }
    fn referrers<'a>(
        &'a self,
        repo: &'a str,
        digest: &'a str,
        artifact_type: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<ReferrerList>>> {
        RegistryClient::referrers(self, repo, digest, artifact_type).boxed()
    }
    fn put_manifest_with_subject<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<bool>> {
        RegistryClient::put_manifest_with_subject(self, repo, reference, manifest).boxed()
    }
    fn delete_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        RegistryClient::delete_manifest(self, repo, reference).boxed()
    }
}
