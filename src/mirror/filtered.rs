//! Indexes rebuilt for `platforms` remember what they were built from, so a resync of an
//! up-to-date tag costs one HEAD on each side, as it does without `platforms`.
//!
//! A filtered index is a new document: its digest differs from the source's, so digests alone
//! cannot tell whether it is up to date. Each one carries two annotations of this project's:
//! [`SOURCE_DIGEST`] (the source index it was built from) and [`PLATFORMS`] (the platforms it
//! kept, as [`platforms_key`] writes them). A resync HEADs the destination tag (digest D) and
//! the source tag (digest S); when D's annotations say "built from S for these platforms", the
//! tag is up to date and the source manifest is not fetched (a GET counts against Docker Hub's
//! pull limit; a HEAD does not).
//!
//! Reading D's annotations needs D's bytes, so what D says is kept in a process-wide memo: a
//! digest names its bytes, so "D was built from S for P" never goes stale and needs no
//! invalidation, whichever registry or mirror asked. A process learns it when it builds D, or
//! with one GET of D on the destination (not the source) the first time it meets D.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use serde_json::Value;

use super::copy::Ctx;
use crate::registry::digest::sha256_digest;
use crate::registry::manifest::is_index;
use crate::registry::{Manifest, ManifestHead, RegistryError};

/// Annotation on a filtered index: the digest of the source index it was built from.
pub const SOURCE_DIGEST: &str = "dev.imagemirror.source.digest";
/// Annotation on a filtered index: the platforms it kept ([`platforms_key`]).
pub const PLATFORMS: &str = "dev.imagemirror.platforms";

/// Entries of the memo; past this an arbitrary one goes, so memory stays bounded (about
/// 250 bytes each) and a forgotten index costs one destination GET.
const MEMO_CAP: usize = 8192;

/// Where a filtered index came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// Digest of the source index.
    pub source_digest: String,
    /// The platforms kept ([`platforms_key`]).
    pub platforms: String,
}

/// The platforms as the annotation records them: sorted, without duplicates, comma-separated,
/// so reordering `spec.platforms` does not rebuild anything.
pub fn platforms_key(platforms: &[String]) -> String {
    let mut p: Vec<&str> = platforms.iter().map(String::as_str).collect();
    p.sort_unstable();
    p.dedup();
    p.join(",")
}

/// Adds the provenance annotations to a filtered index (keeping its other annotations), and
/// remembers them under the new digest.
pub fn annotate(index: Manifest, what: &str, from: &Provenance) -> Result<Manifest, RegistryError> {
    let invalid = |detail: String| RegistryError::ManifestInvalid {
        what: what.to_string(),
        detail,
    };
    let mut doc: Value =
        serde_json::from_slice(&index.bytes).map_err(|e| invalid(e.to_string()))?;
    let root = doc
        .as_object_mut()
        .ok_or_else(|| invalid("an index is a JSON object".into()))?;
    let annotations = root
        .entry("annotations")
        .or_insert_with(|| Value::Object(Default::default()));
    let Some(annotations) = annotations.as_object_mut() else {
        return Err(invalid("annotations is not an object".into()));
    };
    annotations.insert(SOURCE_DIGEST.into(), from.source_digest.clone().into());
    annotations.insert(PLATFORMS.into(), from.platforms.clone().into());
    let bytes = Bytes::from(serde_json::to_vec_pretty(&doc).map_err(|e| invalid(e.to_string()))?);
    let digest = sha256_digest(&bytes);
    remember(&digest, from.clone());
    Ok(Manifest {
        media_type: index.media_type,
        digest,
        bytes,
    })
}

/// What an index's annotations say it was built from; `None` for an index this project did
/// not filter (or one that does not parse). Remembered under its digest.
pub fn read(index: &Manifest) -> Option<Provenance> {
    let doc: Value = serde_json::from_slice(&index.bytes).ok()?;
    let a = doc.get("annotations")?;
    let p = Provenance {
        source_digest: a.get(SOURCE_DIGEST)?.as_str()?.to_string(),
        platforms: a.get(PLATFORMS)?.as_str()?.to_string(),
    };
    remember(&index.digest, p.clone());
    Some(p)
}

fn memo() -> &'static Mutex<HashMap<String, Provenance>> {
    static MEMO: std::sync::OnceLock<Mutex<HashMap<String, Provenance>>> =
        std::sync::OnceLock::new();
    MEMO.get_or_init(Default::default)
}

fn remember(digest: &str, p: Provenance) {
    // A panic elsewhere while holding the lock leaves a map that is still consistent.
    let mut m = memo().lock().unwrap_or_else(PoisonError::into_inner);
    if m.len() >= MEMO_CAP
        && !m.contains_key(digest)
        && let Some(k) = m.keys().next().cloned()
    {
        m.remove(&k);
    }
    m.insert(digest.to_string(), p);
}

/// What this process knows of the filtered index `digest`.
pub fn recall(digest: &str) -> Option<Provenance> {
    let m = memo().lock().unwrap_or_else(PoisonError::into_inner);
    m.get(digest).cloned()
}

impl Ctx<'_> {
    /// Whether the destination tag (digest `dst`, media type `dst_type`) is what filtering the
    /// source tag (as its HEAD `src` describes it) would write, judged without the source
    /// manifest: `Some(filtered)` when it is up to date, `None` when the source must be read.
    pub(super) async fn filtered_up_to_date(
        &self,
        src: &ManifestHead,
        dst: &str,
        dst_type: Option<&str>,
    ) -> Option<bool> {
        let s = src.digest.as_deref()?;
        if s == dst {
            // A single-platform image is copied as it is; an index equal to the source's was
            // written before `platforms` was set and must be rebuilt.
            return src
                .media_type
                .as_deref()
                .is_some_and(|t| !is_index(t))
                .then_some(false);
        }
        let known = match recall(dst) {
            Some(p) => p,
            None if dst_type.is_none_or(is_index) => {
                let d = &self.destination;
                let index = self
                    .engine
                    .config()
                    .retry
                    .run(
                        |_| d.registry.get_manifest(d.repo.path(), dst),
                        |_, _, _| {},
                    )
                    .await
                    .inspect_err(
                        |e| tracing::debug!(error = %e, "reading the destination index failed"),
                    )
                    .ok()?;
                read(&index)?
            }
            None => return None,
        };
        let wanted = Provenance {
            source_digest: s.to_string(),
            platforms: platforms_key(&self.job.platforms),
        };
        (known == wanted).then_some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(json: &str) -> Manifest {
        let bytes = Bytes::from(json.to_string());
        Manifest {
            media_type: crate::registry::manifest::OCI_INDEX.into(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    #[test]
    fn annotations_round_trip_and_are_remembered() {
        let from = Provenance {
            source_digest: format!("sha256:{}", "1".repeat(64)),
            platforms: platforms_key(&[
                "linux/arm64".into(),
                "linux/amd64".into(),
                "linux/arm64".into(),
            ]),
        };
        assert_eq!(from.platforms, "linux/amd64,linux/arm64");
        let plain = index(r#"{"schemaVersion":2,"manifests":[],"annotations":{"keep":"me"}}"#);
        let a = annotate(plain.clone(), "x", &from).unwrap();
        assert_ne!(a.digest, plain.digest);
        assert_eq!(recall(&a.digest), Some(from.clone()));
        let doc: Value = serde_json::from_slice(&a.bytes).unwrap();
        assert_eq!(doc["annotations"]["keep"], "me");
        // Rebuilding from the same source gives the same bytes: no needless push.
        assert_eq!(
            annotate(plain.clone(), "x", &from).unwrap().digest,
            a.digest
        );
        // Read back by a process that did not build it.
        let fresh = index(std::str::from_utf8(&a.bytes).unwrap());
        assert_eq!(read(&fresh), Some(from));
        assert_eq!(read(&plain), None);
    }

    #[test]
    fn the_memo_stays_bounded() {
        for i in 0..MEMO_CAP + 10 {
            remember(
                &format!("sha256:bounded-{i}"),
                Provenance {
                    source_digest: String::new(),
                    platforms: String::new(),
                },
            );
        }
        assert!(memo().lock().unwrap().len() <= MEMO_CAP);
    }
}
