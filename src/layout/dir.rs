//! A layout directory: reads straight from `blobs/sha256/`, writes through temporary files
//! renamed into place, and `index.json` replaced atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};
use tokio::sync::OnceCell;

use super::index::{Index, MAX_INDEX_SIZE, OCI_LAYOUT, Target};
use super::{digest_hex, io_error, read_stream};
use crate::registry::{BlobStream, RegistryError};

/// Where this crate keeps its own files inside a layout: the writer lock and partial blobs.
/// Other tools ignore it (the layout spec only names `oci-layout`, `index.json` and `blobs/`).
pub const STATE_DIR: &str = ".imagemirror";

/// Write buffer per blob being written: few, large writes to the file.
const WRITE_BUFFER: usize = 1024 * 1024;

/// What a writer holds while it writes: the lock keeps a second process out.
struct Writer {
    _lock: std::fs::File,
}

/// A layout directory.
pub struct DirStore {
    root: PathBuf,
    /// `index.json` as last read or written; `None` inside when the file does not exist.
    index: tokio::sync::Mutex<Option<Option<Index>>>,
    writer: OnceCell<Writer>,
    /// Open upload sessions: temporary file name → bytes written.
    sessions: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
}

impl DirStore {
    /// The layout at `root` (absolute). Nothing is touched yet.
    pub fn new(root: PathBuf) -> Self {
        DirStore {
            root,
            index: tokio::sync::Mutex::new(None),
            writer: OnceCell::new(),
            sessions: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }

    /// `blobs/sha256/<hex>` of a digest.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, RegistryError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR).join("tmp")
    }

    fn tmp_path(&self, location: &str) -> Result<PathBuf, RegistryError> {
        let known = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(location);
        if !known {
            return Err(RegistryError::NotFound {
                what: format!("upload session {location} of {}", self.root.display()),
            });
        }
        Ok(self.tmp_dir().join(location))
    }

    /// Reads `index.json` once; later calls see what this process wrote.
    async fn with_index<T>(&self, f: impl FnOnce(Option<&Index>) -> T) -> Result<T, RegistryError> {
        let mut cached = self.index.lock().await;
        if cached.is_none() {
            *cached = Some(self.read_index().await?);
        }
        Ok(f(cached.as_ref().and_then(Option::as_ref)))
    }

    async fn read_index(&self) -> Result<Option<Index>, RegistryError> {
        let path = self.root.join("index.json");
        let meta = match tokio::fs::metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path, e)),
        };
        if meta.len() > MAX_INDEX_SIZE {
            return Err(RegistryError::ManifestTooLarge {
                what: path.display().to_string(),
                size: meta.len(),
                limit: MAX_INDEX_SIZE,
            });
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        Index::parse(&path.display().to_string(), &bytes).map(Some)
    }

    /// What the ref name points at, `None` when the layout or the name is absent.
    pub async fn find(&self, name: &str) -> Result<Option<Target>, RegistryError> {
        self.with_index(|i| i.and_then(|i| i.find(name))).await
    }

    /// The tags under `prefix`; `NotFound` when there is no layout.
    pub async fn tags(&self, prefix: &str) -> Result<Vec<String>, RegistryError> {
        let tags = self.with_index(|i| i.map(|i| i.tags(prefix))).await?;
        tags.ok_or_else(|| RegistryError::NotFound {
            what: self.root.join("index.json").display().to_string(),
        })
    }

    /// The size of a blob, `None` when absent.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, RegistryError> {
        let path = self.blob_path(digest)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Streams a blob from `offset`, verified against its name when read whole.
    pub async fn get_blob(&self, digest: &str, offset: u64) -> Result<BlobStream, RegistryError> {
        let path = self.blob_path(digest)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        let len = file.metadata().await.map_err(|e| io_error(&path, e))?.len();
        if offset > 0 {
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| io_error(&path, e))?;
        }
        let check = (offset == 0).then(|| (digest.to_string(), path));
        Ok(read_stream(file, len.saturating_sub(offset), check))
    }

    /// A whole small blob (a manifest), refused over `limit` bytes before it is read.
    pub async fn read_small(&self, digest: &str, limit: u64) -> Result<Bytes, RegistryError> {
        let path = self.blob_path(digest)?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        if meta.len() > limit {
            return Err(RegistryError::ManifestTooLarge {
                what: path.display().to_string(),
                size: meta.len(),
                limit,
            });
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        Ok(Bytes::from(bytes))
    }

    /// Creates the layout when needed and takes the writer lock, once per process.
    pub async fn writable(&self) -> Result<(), RegistryError> {
        self.writer
            .get_or_try_init(|| async {
                let root = self.root.clone();
                let tmp = self.tmp_dir();
                tokio::task::spawn_blocking(move || open_writer(&root, &tmp))
                    .await
                    .map_err(|e| RegistryError::Storage {
                        what: self.root.display().to_string(),
                        detail: e.to_string(),
                    })?
            })
            .await
            .map(|_| ())
    }

    /// Opens an upload session: a temporary file.
    pub async fn start_upload(&self) -> Result<String, RegistryError> {
        self.writable().await?;
        let location = format!(
            "upload-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.tmp_dir().join(&location);
        tokio::fs::File::create(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(location.clone(), 0);
        Ok(location)
    }

    /// Appends `body` at `offset` of a session (cutting off what a failed write left beyond it);
    /// at most `max` bytes. Returns the new length.
    pub async fn write_upload(
        &self,
        location: &str,
        offset: u64,
        max: u64,
        mut body: BlobStream,
    ) -> Result<u64, RegistryError> {
        let path = self.tmp_path(location)?;
        let err = |e| io_error(&path, e);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .await
            .map_err(err)?;
        file.set_len(offset).await.map_err(err)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(err)?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            written = written.saturating_add(chunk.len() as u64);
            if written > max {
                return Err(RegistryError::Storage {
                    what: path.display().to_string(),
                    detail: format!("the upload sent more than the {max} bytes announced"),
                });
            }
            out.write_all(&chunk).await.map_err(err)?;
        }
        out.flush().await.map_err(err)?;
        let len = offset + written;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(location.to_string(), len);
        Ok(len)
    }

    /// How far a session got.
    pub fn upload_len(&self, location: &str) -> Result<u64, RegistryError> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(location)
            .copied()
            .ok_or_else(|| RegistryError::NotFound {
                what: format!("upload session {location} of {}", self.root.display()),
            })
    }

    /// Moves a finished session's file to its blob name (the engine verified the bytes on
    /// their way in; a lying blob never reaches this point).
    pub async fn finish_upload(&self, location: &str, digest: &str) -> Result<(), RegistryError> {
        let path = self.tmp_path(location)?;
        let target = self.blob_path(digest)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        // Data on disk before the name that vouches for it.
        file.sync_data().await.map_err(|e| io_error(&path, e))?;
        tokio::fs::rename(&path, &target)
            .await
            .map_err(|e| io_error(&target, e))?;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(location);
        Ok(())
    }

    /// Abandons a session (best effort).
    pub async fn cancel_upload(&self, location: &str) {
        if let Ok(path) = self.tmp_path(location) {
            let _ = tokio::fs::remove_file(path).await;
        }
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(location);
    }

    /// Writes a whole small blob (a manifest) unless present.
    pub async fn put_small(&self, digest: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        self.writable().await?;
        let target = self.blob_path(digest)?;
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            return Ok(());
        }
        let location = self.start_upload().await?;
        let body = futures_util::stream::iter([Ok(Bytes::copy_from_slice(bytes))]).boxed();
        let done = async {
            self.write_upload(&location, 0, bytes.len() as u64, body)
                .await?;
            self.finish_upload(&location, digest).await
        }
        .await;
        if done.is_err() {
            self.cancel_upload(&location).await;
        }
        done
    }

    /// Points `name` at a manifest already in `blobs/` and replaces `index.json` atomically.
    pub async fn tag(
        &self,
        name: &str,
        media_type: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), RegistryError> {
        self.writable().await?;
        let mut cached = self.index.lock().await;
        let mut index = match cached.take() {
            Some(index) => index.unwrap_or_default(),
            None => self.read_index().await?.unwrap_or_default(),
        };
        index.set(name, media_type, digest, size);
        let written = replace_file(&self.root, "index.json", index.to_bytes()).await;
        // The cache follows the file: on failure it is read again next time.
        *cached = written.is_ok().then_some(Some(index));
        written
    }
}

/// Creates the layout skeleton, takes the writer lock and clears partial blobs a killed run
/// left behind.
fn open_writer(root: &Path, tmp: &Path) -> Result<Writer, RegistryError> {
    std::fs::create_dir_all(root.join("blobs/sha256")).map_err(|e| io_error(root, e))?;
    std::fs::create_dir_all(tmp).map_err(|e| io_error(tmp, e))?;
    let lock_path = root.join(STATE_DIR).join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_error(&lock_path, e))?;
    if let Err(e) = lock.try_lock() {
        return Err(RegistryError::Storage {
            what: root.display().to_string(),
            detail: format!("another process is writing this layout ({e})"),
        });
    }
    for entry in std::fs::read_dir(tmp)
        .map_err(|e| io_error(tmp, e))?
        .flatten()
    {
        let _ = std::fs::remove_file(entry.path());
    }
    let layout = root.join("oci-layout");
    if !layout.exists() {
        replace_file_sync(root, "oci-layout", OCI_LAYOUT)?;
    }
    Ok(Writer { _lock: lock })
}

/// Replaces `root/name` atomically: a temporary file, synced, renamed over it.
async fn replace_file(root: &Path, name: &str, bytes: Vec<u8>) -> Result<(), RegistryError> {
    let (root, name) = (root.to_path_buf(), name.to_string());
    tokio::task::spawn_blocking(move || replace_file_sync(&root, &name, &bytes))
        .await
        .map_err(|e| RegistryError::Storage {
            what: "index.json".into(),
            detail: e.to_string(),
        })?
}

fn replace_file_sync(root: &Path, name: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    use std::io::Write;
    let target = root.join(name);
    let tmp = root
        .join(STATE_DIR)
        .join(format!("{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_error(&tmp, e))?;
    f.sync_data().map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| io_error(&target, e))?;
    Ok(())
}
