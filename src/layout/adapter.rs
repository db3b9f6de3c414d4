//! A layout behind the engine's [`Registry`] trait. The "repository" of every call is the
//! layout's tag prefix; uploads are temporary files (directories) or appends (archives).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::archive::ArchiveStore;
use super::dir::DirStore;
use super::index::{Target, ref_name};
use super::{Kind, OCI, OCI_ARCHIVE};
use crate::registry::digest::sha256_digest;
use crate::registry::manifest::MAX_MANIFEST_SIZE;
use crate::registry::reference::is_valid_digest;
use crate::registry::{
    BlobStream, Manifest, ManifestHead, Mount, MountOutcome, Registry, RegistryError, Result,
    TagList, UploadSession,
};

// One per layout for the life of the process: size does not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Dir(DirStore),
    Archive(ArchiveStore),
}

/// An OCI layout directory or archive, as the engine sees registries.
pub struct Layout {
    host: String,
    backend: Backend,
    /// Bytes of blobs and manifests written to the layout by this process.
    written: AtomicU64,
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout").field("host", &self.host).finish()
    }
}

impl Layout {
    /// The layout at `path` (absolute).
    pub fn new(kind: Kind, path: PathBuf) -> Self {
        let (scheme, backend) = match kind {
            Kind::Dir => (OCI, Backend::Dir(DirStore::new(path.clone()))),
            Kind::Archive => (
                OCI_ARCHIVE,
                Backend::Archive(ArchiveStore::new(path.clone())),
            ),
        };
        Layout {
            host: format!("{scheme}{}", path.display()),
            backend,
            written: AtomicU64::new(0),
        }
    }

    /// Bytes of content this process wrote into the layout (skipped blobs count nothing).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// `oci:/dir:prefix:tag` or `oci:/dir@digest`, as skopeo names them.
    fn what(&self, prefix: &str, reference: &str) -> String {
        if is_valid_digest(reference) {
            format!("{}@{reference}", self.host)
        } else {
            format!("{}:{}", self.host, ref_name(prefix, reference))
        }
    }

    /// The store chunked uploads and sessions live in.
    fn sessions(&self) -> &DirStore {
        match &self.backend {
            Backend::Dir(d) => d,
            Backend::Archive(a) => a.staging(),
        }
    }

    async fn find(&self, name: &str) -> Result<Option<Target>> {
        match &self.backend {
            Backend::Dir(d) => d.find(name).await,
            Backend::Archive(a) => a.find(name).await,
        }
    }

    async fn blob_size(&self, digest: &str) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Dir(d) => d.blob_size(digest).await,
            Backend::Archive(a) => a.blob_size(digest).await,
        }
    }

    async fn head(&self, prefix: &str, reference: &str) -> Result<Option<ManifestHead>> {
        if is_valid_digest(reference) {
            let present = self.blob_size(reference).await?.is_some();
            return Ok(present.then(|| ManifestHead {
                digest: Some(reference.to_string()),
                media_type: None,
            }));
        }
        let target = self.find(&ref_name(prefix, reference)).await?;
        Ok(target.map(|t| ManifestHead {
            digest: Some(t.digest),
            media_type: t.media_type,
        }))
    }

    async fn get(&self, prefix: &str, reference: &str) -> Result<Manifest> {
        let what = self.what(prefix, reference);
        let (digest, media_type) = if is_valid_digest(reference) {
            (reference.to_string(), None)
        } else {
            let t = self
                .find(&ref_name(prefix, reference))
                .await?
                .ok_or_else(|| RegistryError::NotFound { what: what.clone() })?;
            (t.digest, t.media_type)
        };
        let read = match &self.backend {
            Backend::Dir(d) => d.read_small(&digest, MAX_MANIFEST_SIZE).await,
            Backend::Archive(a) => a.read_small(&digest, MAX_MANIFEST_SIZE).await,
        };
        let bytes = read.map_err(|e| match e {
            RegistryError::NotFound { what: file } => RegistryError::NotFound {
                what: format!("{what} ({file})"),
            },
            e => e,
        })?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                actual: format!(
                    "{actual} (file blobs/sha256/{} of {})",
                    &digest[7..],
                    self.host
                ),
                digest,
                expected_size: bytes.len() as u64,
                actual_size: bytes.len() as u64,
            });
        }
        Manifest::from_bytes(&what, media_type.as_deref(), bytes)
    }

    async fn put(&self, prefix: &str, reference: &str, manifest: &Manifest) -> Result<()> {
        if is_valid_digest(reference) && reference != manifest.digest {
            return Err(RegistryError::DigestMismatch {
                digest: reference.to_string(),
                actual: manifest.digest.clone(),
                expected_size: manifest.bytes.len() as u64,
                actual_size: manifest.bytes.len() as u64,
            });
        }
        let size = manifest.bytes.len() as u64;
        let present = self.blob_size(&manifest.digest).await?.is_some();
        if !present {
            match &self.backend {
                Backend::Dir(d) => d.put_small(&manifest.digest, &manifest.bytes).await?,
                Backend::Archive(a) => {
                    let body = futures_util::stream::iter([Ok(manifest.bytes.clone())]).boxed();
                    a.put_blob(&manifest.digest, size, body).await?
                }
            }
            self.written.fetch_add(size, Ordering::Relaxed);
        }
        if is_valid_digest(reference) {
            return Ok(());
        }
        let name = ref_name(prefix, reference);
        match &self.backend {
            Backend::Dir(d) => {
                d.tag(&name, &manifest.media_type, &manifest.digest, size)
                    .await
            }
            Backend::Archive(a) => {
                a.tag(&name, &manifest.media_type, &manifest.digest, size)
                    .await
            }
        }
    }

    async fn put_whole(
        &self,
        location: &str,
        digest: &str,
        size: u64,
        body: BlobStream,
    ) -> Result<()> {
        // The engine uploads small blobs without asking first (cheap for registries); here
        // asking is a stat, and a blob present is never written again.
        if self.blob_size(digest).await?.is_some() {
            self.sessions().cancel_upload(location).await;
            return Ok(());
        }
        match &self.backend {
            Backend::Dir(d) => {
                let len = d.write_upload(location, 0, size, body).await?;
                if len != size {
                    return Err(RegistryError::Storage {
                        what: format!("{}@{digest}", self.host),
                        detail: format!("the upload sent {len} bytes, not the {size} announced"),
                    });
                }
                d.finish_upload(location, digest).await?;
            }
            Backend::Archive(a) => {
                // Straight into the archive: the session only reserved a name.
                a.staging().cancel_upload(location).await;
                a.put_blob(digest, size, body).await?;
            }
        }
        self.written.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    async fn finish(&self, location: &str, digest: &str) -> Result<()> {
        let len = self.sessions().upload_len(location)?;
        match &self.backend {
            Backend::Dir(d) => d.finish_upload(location, digest).await?,
            Backend::Archive(a) => {
                a.staging().finish_upload(location, digest).await?;
                a.append_staged(digest).await?;
            }
        }
        self.written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<TagList> {
        let tags = match &self.backend {
            Backend::Dir(d) => d.tags(prefix).await?,
            Backend::Archive(a) => a.tags(prefix).await?,
        };
        Ok(TagList {
            tags,
            complete: true,
        })
    }

    /// Opens a session (a temporary file); with `mount`, a blob already present needs none:
    /// one blobs/ for every prefix, so a blob present for one is present for all.
    async fn begin(self: Arc<Self>, mount: Option<Mount<'_>>) -> Result<MountOutcome> {
        if let Some(m) = mount
            && self.blob_size(m.digest).await?.is_some()
        {
            return Ok(MountOutcome::Mounted);
        }
        let location = self.sessions().start_upload().await?;
        Ok(MountOutcome::Upload(Box::new(LayoutUpload {
            layout: self,
            location,
        })))
    }
}

/// An upload session of a layout: a temporary file in its staging directory.
struct LayoutUpload {
    layout: Arc<Layout>,
    location: String,
}

impl UploadSession for LayoutUpload {
    fn location(&self) -> &str {
        &self.location
    }
    fn patch(&mut self, offset: u64, len: u64, body: BlobStream) -> BoxFuture<'_, Result<()>> {
        async move {
            self.layout
                .sessions()
                .write_upload(&self.location, offset, len, body)
                .await?;
            Ok(())
        }
        .boxed()
    }
    fn status(&mut self) -> BoxFuture<'_, Result<u64>> {
        async move { self.layout.sessions().upload_len(&self.location) }.boxed()
    }
    fn finish<'a>(
        &'a mut self,
        digest: &'a str,
        body: Option<(u64, BlobStream)>,
    ) -> BoxFuture<'a, Result<()>> {
        match body {
            Some((size, body)) => self
                .layout
                .put_whole(&self.location, digest, size, body)
                .boxed(),
            None => self.layout.finish(&self.location, digest).boxed(),
        }
    }
    fn cancel(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move { self.layout.sessions().cancel_upload(&self.location).await }.boxed()
    }
}

use futures_util::StreamExt as _;

impl Registry for Layout {
    fn host(&self) -> &str {
        &self.host
    }
    fn head_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<ManifestHead>>> {
        self.head(repo, reference).boxed()
    }
    fn get_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Manifest>> {
        self.get(repo, reference).boxed()
    }
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a str,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<()>> {
        self.put(repo, reference, manifest).boxed()
    }
    fn list_tags<'a>(&'a self, repo: &'a str, _max_pages: usize) -> BoxFuture<'a, Result<TagList>> {
        self.list(repo).boxed()
    }
    fn blob_size<'a>(
        &'a self,
        _repo: &'a str,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>>> {
        Layout::blob_size(self, digest).boxed()
    }
    fn get_blob<'a>(
        &'a self,
        _repo: &'a str,
        digest: &'a str,
        offset: u64,
        _size: u64,
    ) -> BoxFuture<'a, Result<BlobStream>> {
        async move {
            match &self.backend {
                Backend::Dir(d) => d.get_blob(digest, offset).await,
                Backend::Archive(a) => a.get_blob(digest, offset).await,
            }
        }
        .boxed()
    }
    fn begin_upload<'a>(
        self: Arc<Self>,
        _repo: &'a str,
        mount: Option<Mount<'a>>,
    ) -> BoxFuture<'a, Result<MountOutcome>> {
        self.begin(mount).boxed()
    }
}
