//! OCI image layouts on disk, as a source or destination of mirrors (CLI only): `oci:<dir>` is a
//! layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`), `oci-archive:<file.tar>` the
//! same layout in one tar file. Both plug into the engine as a [`Registry`], so the transfer
//! manager, limits, retries, progress, `--dry-run` and JSON output work unchanged.
//!
//! Tags are the `org.opencontainers.image.ref.name` annotations of `index.json`, as skopeo
//! writes them. A repository may name a prefix, `oci:<dir>:<prefix>`: its tags are then the
//! annotations `<prefix>:<tag>` (skopeo reads them as `oci:<dir>:<prefix>:<tag>`). That is how
//! several mirrors share one layout, and so one `blobs/` in which every blob is stored once:
//! a digest names a file, so a blob two mirrors need is written by the first and found
//! present by the second.
//!
//! Crash safety (directories): blobs are written to a temporary file and renamed into
//! `blobs/sha256/` once the engine's verifier passed them; a manifest is written only after
//! everything it refers to, and `index.json` is replaced atomically (temporary file + rename)
//! after the tag's manifest is there. A killed export leaves a valid layout holding what
//! finished; a re-run finds it and writes only what is missing.

mod adapter;
mod archive;
mod dir;
mod index;
mod tar;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

pub use adapter::Layout;

use crate::api::ImageMirrorSpec;
use crate::registry::digest::Hasher;
use crate::registry::reference::is_path_component;
use crate::registry::{BlobStream, RegistryError};

/// The prefix of a layout directory reference.
pub const OCI: &str = "oci:";
/// The prefix of a layout archive reference.
pub const OCI_ARCHIVE: &str = "oci-archive:";

/// The annotation holding a tag in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Why the controller refuses a spec naming a layout.
pub const IN_CLUSTER_REASON: &str = "UnsupportedTransport";

/// Which kind of layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A tar file.
    Archive,
}

/// A parsed `oci:`/`oci-archive:` reference: the file system path and the tag prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Directory or archive.
    pub kind: Kind,
    /// The path as given.
    pub path: PathBuf,
    /// The prefix of the tags' ref names (`""`: plain tags, as skopeo writes them).
    pub prefix: String,
}

/// True when a repository's registry part names a layout rather than a registry.
pub fn is_local(registry: &str) -> bool {
    registry.starts_with(OCI) || registry.starts_with(OCI_ARCHIVE)
}

/// Splits `oci:<path>[:<prefix>]` into (`oci:<path>`, prefix) for [`crate::registry::Repository`];
/// `None` when `input` names no layout. Like skopeo, the path ends at the first `:`.
pub fn parse_repository(input: &str) -> Option<Result<(String, String), RegistryError>> {
    let (scheme, rest) = if let Some(rest) = input.strip_prefix(OCI) {
        (OCI, rest)
    } else {
        (OCI_ARCHIVE, input.strip_prefix(OCI_ARCHIVE)?)
    };
    let invalid = |detail: &str| RegistryError::InvalidReference {
        what: input.to_string(),
        detail: detail.to_string(),
    };
    let (path, prefix) = rest.split_once(':').unwrap_or((rest, ""));
    if path.is_empty() {
        return Some(Err(invalid(&format!(
            "give a path after {scheme}, like {scheme}/srv/export"
        ))));
    }
    if !prefix.is_empty() && !prefix.split('/').all(is_path_component) {
        return Some(Err(invalid(
            "the part after the path is a repository-like prefix (lowercase, a/b); select tags in spec.tags",
        )));
    }
    Some(Ok((format!("{scheme}{path}"), prefix.to_string())))
}

impl Location {
    /// The layout a repository names, if it names one.
    pub fn of(repo: &crate::registry::Repository) -> Option<Location> {
        let registry = repo.registry();
        let (kind, path) = match registry.strip_prefix(OCI) {
            Some(p) => (Kind::Dir, p),
            None => (Kind::Archive, registry.strip_prefix(OCI_ARCHIVE)?),
        };
        Some(Location {
            kind,
            path: PathBuf::from(path),
            prefix: repo.path().to_string(),
        })
    }
}

/// The controller has no local disk to speak of: a spec naming a layout is refused with a
/// message saying where layouts work. Returns the message.
pub fn refuse_in_cluster(spec: &ImageMirrorSpec) -> Result<(), String> {
    for (field, repo) in [
        ("source", &spec.source.repository),
        ("destination", &spec.destination.repository),
    ] {
        let repo = repo.trim();
        if repo.starts_with(OCI) || repo.starts_with(OCI_ARCHIVE) {
            return Err(format!(
                "spec.{field}.repository {repo:?} is an OCI layout on local disk, which the controller does not have: \
                 use `imagemirror mirror -f` on a machine holding the layout (air-gapped export and import)"
            ));
        }
    }
    Ok(())
}

/// Layouts by path, shared by every mirror of one process so that they share one index and
/// one writer lock per layout.
#[derive(Default)]
pub struct Layouts {
    open: Mutex<HashMap<(Kind, PathBuf), Arc<Layout>>>,
}

impl Layouts {
    /// The layout at `location` (opened lazily: nothing is read or written yet).
    pub fn get(&self, location: &Location) -> Result<Arc<Layout>, RegistryError> {
        let path = std::path::absolute(&location.path).map_err(|e| io_error(&location.path, e))?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let entry = open
            .entry((location.kind, path.clone()))
            .or_insert_with(|| Arc::new(Layout::new(location.kind, path)));
        Ok(entry.clone())
    }
}

/// An IO error on `path`, as the engine's error: absence is `NotFound`, anything else a
/// storage failure naming the file.
pub(crate) fn io_error(path: &Path, e: std::io::Error) -> RegistryError {
    let what = path.display().to_string();
    if e.kind() == std::io::ErrorKind::NotFound {
        RegistryError::NotFound { what }
    } else {
        RegistryError::Storage {
            what,
            detail: e.to_string(),
        }
    }
}

/// The hex part of a `sha256:` digest, refusing anything else: digests come from manifests,
/// which may be hostile, and become file names.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, RegistryError> {
    if crate::registry::reference::is_valid_digest(digest) {
        Ok(&digest[7..])
    } else {
        Err(RegistryError::InvalidReference {
            what: digest.to_string(),
            detail: "layouts hold sha256 digests only".into(),
        })
    }
}

/// Bytes per read of a blob file.
const READ_CHUNK: usize = 256 * 1024;

/// Streams `len` bytes of `reader`. When `check` is given (a whole blob, read from its start),
/// the bytes are hashed on the way and a blob that does not match its name ends the stream with
/// a `DigestMismatch` naming the file, before the stream's end reaches the destination.
pub(crate) fn read_stream<R>(reader: R, len: u64, check: Option<(String, PathBuf)>) -> BlobStream
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    struct State<R> {
        reader: tokio::io::Take<R>,
        hasher: Option<Hasher>,
        check: Option<(String, PathBuf)>,
        done: bool,
    }
    let state = State {
        reader: reader.take(len),
        hasher: check.as_ref().map(|_| Hasher::new()),
        check,
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        match s.reader.read_buf(&mut buf).await {
            Ok(0) => {
                s.done = true;
                let (hasher, (digest, path)) = (s.hasher.take()?, s.check.take()?);
                let actual_size = hasher.len();
                let actual = hasher.finish();
                if actual == digest {
                    return None;
                }
                let err = RegistryError::DigestMismatch {
                    digest,
                    actual: format!("{actual} (file {})", path.display()),
                    expected_size: actual_size,
                    actual_size,
                };
                Some((Err(err), s))
            }
            Ok(_) => {
                if let Some(h) = s.hasher.as_mut() {
                    h.update(&buf);
                }
                let chunk: Bytes = buf.freeze();
                Some((Ok(chunk), s))
            }
            Err(e) => {
                s.done = true;
                let path = s.check.as_ref().map(|c| c.1.clone()).unwrap_or_default();
                Some((Err(io_error(&path, e)), s))
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Repository;

    #[test]
    fn layout_references_parse_like_skopeo() {
        let r = Repository::parse("oci:/srv/export").unwrap();
        assert_eq!((r.registry(), r.path()), ("oci:/srv/export", ""));
        assert_eq!(r.to_string(), "oci:/srv/export");
        let r = Repository::parse("oci-archive:out.tar:library/nginx").unwrap();
        assert_eq!(
            (r.registry(), r.path()),
            ("oci-archive:out.tar", "library/nginx")
        );
        assert_eq!(r.to_string(), "oci-archive:out.tar:library/nginx");
        let loc = Location::of(&r).unwrap();
        assert_eq!(loc.kind, Kind::Archive);
        assert_eq!(loc.path, PathBuf::from("out.tar"));
        assert_eq!(loc.prefix, "library/nginx");
        assert!(Location::of(&Repository::parse("quay.io/a/b").unwrap()).is_none());
        for bad in [
            "oci:",
            "oci::x",
            "oci:/d:UPPER",
            "oci:/d:a:b",
            "oci-archive:/f.tar:a//b",
        ] {
            assert_eq!(
                Repository::parse(bad).unwrap_err().reason(),
                "InvalidReference",
                "{bad}"
            );
        }
    }

    #[test]
    fn the_controller_refuses_layouts_naming_the_field() {
        let mut spec: ImageMirrorSpec = serde_json::from_value(serde_json::json!({
            "source": {"repository": "quay.io/a/b"},
            "destination": {"repository": "oci:/srv/export"},
            "tags": {"names": ["v1"]},
        }))
        .unwrap();
        let msg = refuse_in_cluster(&spec).unwrap_err();
        assert!(msg.contains("spec.destination.repository"), "{msg}");
        spec.destination.repository = "registry.internal/a".into();
        assert!(refuse_in_cluster(&spec).is_ok());
        spec.source.repository = "oci-archive:/x.tar".into();
        assert!(
            refuse_in_cluster(&spec)
                .unwrap_err()
                .contains("spec.source")
        );
    }

    #[test]
    fn only_sha256_digests_become_file_names() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(digest_hex(&good).unwrap(), "a".repeat(64));
        for bad in ["sha256:../../etc/passwd", "sha512:abc", "", "sha256:"] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }
}
