//! A layout in one tar file. Read without unpacking: one scan of the headers finds every
//! blob's offset, and blobs stream from there. Written by appending: each blob streams
//! straight into the archive as one entry (its size is known up front), and `index.json` is
//! appended after every append, so the archive is a complete layout between appends. The next
//! append overwrites that trailing `index.json`, so the file holds one. Blobs big enough for chunked
//! uploads are staged in a directory beside the archive and appended once whole.
//!
//! A killed writer leaves an archive that ends inside an entry; the next run cuts that entry
//! off, keeps every complete blob and carries on. Appends take turns (one tail).

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncSeekExt, AsyncWriteExt, BufWriter};
use tokio::sync::OnceCell;

use super::dir::DirStore;
use super::index::{Index, MAX_INDEX_SIZE, OCI_LAYOUT, Target};
use super::tar::{self, BLOCK, Entry};
use super::{digest_hex, io_error, read_stream};
use crate::registry::{BlobStream, RegistryError};

/// Write buffer of the archive's tail.
const WRITE_BUFFER: usize = 1024 * 1024;

/// What is known of the archive's content.
#[derive(Default)]
struct Contents {
    files: HashMap<String, Entry>,
    index: Option<Index>,
}

/// The archive's tail, owned by one append at a time.
struct Tail {
    file: tokio::fs::File,
    /// Where the next entry's header goes.
    end: u64,
    /// The header offset of a trailing `index.json`, replaced by the next append.
    index_at: Option<u64>,
}

/// An OCI archive.
pub struct ArchiveStore {
    path: PathBuf,
    contents: OnceCell<Mutex<Contents>>,
    tail: OnceCell<tokio::sync::Mutex<Tail>>,
    /// Chunked uploads are staged here (and its lock keeps a second writer out).
    staging: DirStore,
}

fn blob_name(digest: &str) -> Result<String, RegistryError> {
    Ok(format!("blobs/sha256/{}", digest_hex(digest)?))
}

impl ArchiveStore {
    /// The archive at `path` (absolute). Nothing is touched yet.
    pub fn new(path: PathBuf) -> Self {
        let mut staging = path.clone().into_os_string();
        staging.push(".imagemirror");
        ArchiveStore {
            staging: DirStore::new(PathBuf::from(staging)),
            path,
            contents: OnceCell::new(),
            tail: OnceCell::new(),
        }
    }

    fn what(&self) -> String {
        self.path.display().to_string()
    }

    /// Scans the archive once (an absent file is an empty archive).
    async fn contents(&self) -> Result<&Mutex<Contents>, RegistryError> {
        self.contents
            .get_or_try_init(|| async {
                let (files, _) = self.scan().await?;
                let mut c = Contents {
                    files: files.files,
                    index: None,
                };
                if let Some(e) = c.files.get("index.json").copied() {
                    if e.size > MAX_INDEX_SIZE {
                        return Err(RegistryError::ManifestTooLarge {
                            what: format!("{}:index.json", self.what()),
                            size: e.size,
                            limit: MAX_INDEX_SIZE,
                        });
                    }
                    let bytes = self.read_entry(e).await?;
                    c.index = Some(Index::parse(
                        &format!("{}:index.json", self.what()),
                        &bytes,
                    )?);
                }
                Ok(Mutex::new(c))
            })
            .await
    }

    async fn scan(&self) -> Result<(tar::Scan, u64), RegistryError> {
        let path = self.path.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok((tar::Scan::default(), 0));
                }
                Err(e) => return Err(io_error(&path, e)),
            };
            let len = file.metadata().map_err(|e| io_error(&path, e))?.len();
            let scan = tar::scan(std::io::BufReader::new(file), len).map_err(|detail| {
                RegistryError::Storage {
                    what: path.display().to_string(),
                    detail: format!("not a tar archive: {detail}"),
                }
            })?;
            Ok((scan, len))
        })
        .await;
        scanned.map_err(|e| RegistryError::Storage {
            what: self.what(),
            detail: e.to_string(),
        })?
    }

    async fn read_entry(&self, e: Entry) -> Result<Vec<u8>, RegistryError> {
        let mut out = Vec::new();
        let mut s = self.open_entry(e, 0, None).await?;
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    async fn open_entry(
        &self,
        e: Entry,
        offset: u64,
        check: Option<(String, PathBuf)>,
    ) -> Result<BlobStream, RegistryError> {
        let mut file = tokio::fs::File::open(&self.path)
            .await
            .map_err(|err| io_error(&self.path, err))?;
        file.seek(SeekFrom::Start(e.data + offset.min(e.size)))
            .await
            .map_err(|err| io_error(&self.path, err))?;
        Ok(read_stream(file, e.size.saturating_sub(offset), check))
    }

    fn entry(&self, c: &Mutex<Contents>, name: &str) -> Option<Entry> {
        c.lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .get(name)
            .copied()
    }

    /// What the ref name points at.
    pub async fn find(&self, name: &str) -> Result<Option<Target>, RegistryError> {
        let c = self.contents().await?;
        let c = c.lock().unwrap_or_else(|p| p.into_inner());
        Ok(c.index.as_ref().and_then(|i| i.find(name)))
    }

    /// The tags under `prefix`; `NotFound` when the archive has no index.
    pub async fn tags(&self, prefix: &str) -> Result<Vec<String>, RegistryError> {
        let c = self.contents().await?;
        let c = c.lock().unwrap_or_else(|p| p.into_inner());
        c.index
            .as_ref()
            .map(|i| i.tags(prefix))
            .ok_or_else(|| RegistryError::NotFound {
                what: format!("{}:index.json", self.what()),
            })
    }

    /// The size of a blob, `None` when absent.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, RegistryError> {
        let name = blob_name(digest)?;
        Ok(self.entry(self.contents().await?, &name).map(|e| e.size))
    }

    /// Streams a blob from `offset`, verified against its name when read whole.
    pub async fn get_blob(&self, digest: &str, offset: u64) -> Result<BlobStream, RegistryError> {
        let name = blob_name(digest)?;
        let e =
            self.entry(self.contents().await?, &name)
                .ok_or_else(|| RegistryError::NotFound {
                    what: format!("{}:{name}", self.what()),
                })?;
        let check = (offset == 0).then(|| (digest.to_string(), self.path.join(&name)));
        self.open_entry(e, offset, check).await
    }

    /// A whole small blob (a manifest), refused over `limit` bytes before it is read.
    pub async fn read_small(&self, digest: &str, limit: u64) -> Result<Bytes, RegistryError> {
        let name = blob_name(digest)?;
        let e =
            self.entry(self.contents().await?, &name)
                .ok_or_else(|| RegistryError::NotFound {
                    what: format!("{}:{name}", self.what()),
                })?;
        if e.size > limit {
            return Err(RegistryError::ManifestTooLarge {
                what: format!("{}:{name}", self.what()),
                size: e.size,
                limit,
            });
        }
        self.read_entry(e).await.map(Bytes::from)
    }

    /// The tail, opened once: the writer lock taken, a cut-off last entry dropped, and a new
    /// archive started with `oci-layout`.
    async fn tail(&self) -> Result<&tokio::sync::Mutex<Tail>, RegistryError> {
        self.tail
            .get_or_try_init(|| async {
                // The staging area's lock is the archive's writer lock.
                self.staging.writable().await?;
                self.contents().await?;
                let (scan, _) = self.scan().await?;
                if scan.truncated {
                    tracing::warn!(archive = %self.what(), "the archive ends inside an entry (an earlier run was killed); cutting it off");
                }
                let file = tokio::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.path)
                    .await
                    .map_err(|e| io_error(&self.path, e))?;
                let index_at = match scan.last.as_deref() {
                    Some("index.json") => scan.files.get("index.json").map(|e| e.header),
                    _ => None,
                };
                let mut tail = Tail {
                    file,
                    end: scan.end,
                    index_at,
                };
                if scan.end == 0 {
                    append(&mut tail, "blobs/", tar::DIR, &[]).await?;
                    append(&mut tail, "blobs/sha256/", tar::DIR, &[]).await?;
                    append(&mut tail, "oci-layout", tar::FILE, OCI_LAYOUT).await?;
                    finish_tail(&mut tail).await.map_err(|e| io_error(&self.path, e))?;
                }
                Ok(tokio::sync::Mutex::new(tail))
            })
            .await
    }

    fn record(&self, name: String, e: Entry) {
        if let Some(c) = self.contents.get() {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .files
                .insert(name, e);
        }
    }

    /// Appends a blob of `size` bytes streamed from `body`, unless present. On any failure
    /// the archive is cut back to where it was.
    pub async fn put_blob(
        &self,
        digest: &str,
        size: u64,
        mut body: BlobStream,
    ) -> Result<(), RegistryError> {
        let name = blob_name(digest)?;
        let mut tail = self.tail().await?.lock().await;
        if self.entry(self.contents().await?, &name).is_some() {
            return Ok(());
        }
        drop_index(&mut tail);
        let start = tail.end;
        let err = |e| io_error(&self.path, e);
        tail.file.seek(SeekFrom::Start(start)).await.map_err(err)?;
        let written = async {
            let mut out = BufWriter::with_capacity(WRITE_BUFFER, &mut tail.file);
            out.write_all(&tar::header(&name, size, tar::FILE))
                .await
                .map_err(err)?;
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                n = n.saturating_add(chunk.len() as u64);
                if n > size {
                    break;
                }
                out.write_all(&chunk).await.map_err(err)?;
            }
            if n != size {
                return Err(RegistryError::Storage {
                    what: format!("{}:{name}", self.what()),
                    detail: format!("the upload sent {n} bytes, not the {size} announced"),
                });
            }
            out.write_all(&vec![0u8; tar::padding(size) as usize])
                .await
                .map_err(err)?;
            out.flush().await.map_err(err)
        }
        .await;
        if let Err(e) = written {
            // Cut the failed entry off; the archive is as it was.
            let _ = tail.file.set_len(start).await;
            let _ = self.restore_index(&mut tail).await;
            return Err(e);
        }
        let entry = Entry {
            header: start,
            data: start + BLOCK,
            size,
        };
        tail.end = start + BLOCK + size + tar::padding(size);
        self.record(name, entry);
        self.restore_index(&mut tail).await
    }

    /// Appends `index.json` again after an append took its place, so the archive is a whole
    /// layout between appends (a run that ends in a failed tag still leaves the others).
    async fn restore_index(&self, tail: &mut Tail) -> Result<(), RegistryError> {
        let index = self
            .contents()
            .await?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .index
            .clone();
        match index {
            Some(index) => self.write_index(tail, &index).await,
            None => finish_tail(tail).await.map_err(|e| io_error(&self.path, e)),
        }
    }

    /// Appends `index` as `index.json` in place of the trailing one and ends the archive.
    async fn write_index(&self, tail: &mut Tail, index: &Index) -> Result<(), RegistryError> {
        let bytes = index.to_bytes();
        drop_index(tail);
        let start = tail.end;
        append(tail, "index.json", tar::FILE, &bytes)
            .await
            .map_err(|e| match e {
                RegistryError::Storage { detail, .. } => RegistryError::Storage {
                    what: self.what(),
                    detail,
                },
                other => other,
            })?;
        tail.index_at = Some(start);
        finish_tail(tail)
            .await
            .map_err(|e| io_error(&self.path, e))?;
        let entry = Entry {
            header: start,
            data: start + BLOCK,
            size: bytes.len() as u64,
        };
        self.record("index.json".into(), entry);
        Ok(())
    }

    /// Points `name` at a manifest already in the archive and appends the new `index.json`.
    pub async fn tag(
        &self,
        name: &str,
        media_type: &str,
        digest: &str,
        size: u64,
    ) -> Result<(), RegistryError> {
        let mut tail = self.tail().await?.lock().await;
        let contents = self.contents().await?;
        let mut index = {
            let c = contents.lock().unwrap_or_else(|p| p.into_inner());
            c.index.clone().unwrap_or_default()
        };
        index.set(name, media_type, digest, size);
        self.write_index(&mut tail, &index).await?;
        // The commit point of the tag: on disk before we say it is done.
        tail.file
            .sync_data()
            .await
            .map_err(|e| io_error(&self.path, e))?;
        contents.lock().unwrap_or_else(|p| p.into_inner()).index = Some(index);
        Ok(())
    }

    /// The staging directory of chunked uploads.
    pub fn staging(&self) -> &DirStore {
        &self.staging
    }

    /// Appends a blob staged whole in [`ArchiveStore::staging`], then removes it there.
    pub async fn append_staged(&self, digest: &str) -> Result<(), RegistryError> {
        let path = self.staging.blob_path(digest)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error(&path, e))?;
        let size = file.metadata().await.map_err(|e| io_error(&path, e))?.len();
        let body = read_stream(file, size, None);
        let result = self.put_blob(digest, size, body).await;
        let _ = tokio::fs::remove_file(&path).await;
        result
    }
}

/// Forgets a trailing `index.json`: the next entry overwrites it.
fn drop_index(tail: &mut Tail) {
    if let Some(at) = tail.index_at.take() {
        tail.end = at;
    }
}

/// Appends a small entry at the tail.
async fn append(
    tail: &mut Tail,
    name: &str,
    typeflag: u8,
    data: &[u8],
) -> Result<(), RegistryError> {
    let err = |e: std::io::Error| RegistryError::Storage {
        what: name.to_string(),
        detail: e.to_string(),
    };
    let mut block = Vec::with_capacity(BLOCK as usize * 2 + data.len());
    block.extend_from_slice(&tar::header(name, data.len() as u64, typeflag));
    block.extend_from_slice(data);
    block.resize(block.len() + tar::padding(data.len() as u64) as usize, 0);
    tail.file
        .seek(SeekFrom::Start(tail.end))
        .await
        .map_err(err)?;
    tail.file.write_all(&block).await.map_err(err)?;
    tail.file.flush().await.map_err(err)?;
    tail.end += block.len() as u64;
    Ok(())
}

/// Ends the archive after the last entry: two zero blocks, nothing after them.
async fn finish_tail(tail: &mut Tail) -> std::io::Result<()> {
    tail.file.seek(SeekFrom::Start(tail.end)).await?;
    tail.file.write_all(&[0u8; 2 * BLOCK as usize]).await?;
    tail.file.flush().await?;
    tail.file.set_len(tail.end + 2 * BLOCK).await?;
    tail.file.flush().await
}
