//! Pruning the referrers of pruned manifests, when the mirror copies referrers
//! (`spec.referrers.enabled`): cosign's `sha256-<hex>.sig/.att/.sbom` tags, the referrer
//! manifests the destination lists for the digest (fallback index `sha256-<hex>` or the
//! referrers API), and that fallback index itself.
//!
//! Which referrers are this mirror's: those the SOURCE lists for the same subject now (same
//! digest; for cosign tags, the source's tag points at the same digest as the destination's),
//! of an artifact type `spec.referrers.artifactTypes` selects. The referrers pass copies
//! exactly those, byte-identical, so anything else at the destination was put there by
//! someone else and stays. The price of needing no record: referrers the source has already
//! deleted are not recognised as ours and stay too.
//!
//! Never deleted: a referrer of a manifest that stays (another tag, an index that lists it,
//! a pinned or selected digest), nor one any tag outside the pruned manifests' own referrer
//! tags points at or lists. Referrers of referrers go too, down to [`MAX_REFERRER_DEPTH`].

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use bytes::Bytes;

use super::Endpoint;
use super::prune_run::{PruneOutcome, TagUse};
use super::referrers::{MAX_REFERRER_DEPTH, ReferrersOptions, artifact_type_of};
use crate::registry::digest::sha256_digest;
use crate::registry::manifest::{OCI_INDEX, is_index};
use crate::registry::referrers::{Referrer, fallback_tag, parse_referrers_index};
use crate::registry::{Manifest, RegistryError};
use crate::transfer::Engine;

/// cosign's tag suffixes, on `sha256-<hex>`.
const COSIGN_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

/// Where the mirror's referrers come from and which it copies.
pub struct ReferrerScope<'a> {
    /// The mirror's source: what it lists for a subject decides what is ours.
    pub source: &'a Endpoint,
    /// `spec.referrers`.
    pub options: &'a ReferrersOptions,
}

/// A manifest prune deleted (a dry run: would delete).
pub(super) struct Deleted {
    /// The tag it was pruned under, to name its referrers by.
    pub(super) tag: String,
    pub(super) digest: String,
    /// For an index, the manifests it listed: their referrers go too.
    pub(super) children: Vec<String>,
}

/// One cleanup after the deletes.
pub(super) struct Cleanup<'a> {
    pub(super) engine: &'a Engine,
    pub(super) dst: &'a Endpoint,
    pub(super) scope: &'a ReferrerScope<'a>,
    /// The destination's tags outside the pruned ones.
    pub(super) inventory: &'a [TagUse],
    pub(super) protected: &'a BTreeSet<String>,
    /// The registry deletes tags (else only digests).
    pub(super) by_tag: bool,
    pub(super) dry_run: bool,
}

/// Whether `tag` is a referrer tag (fallback or cosign) of a subject in `subjects`.
pub(super) fn is_referrer_tag_of(tag: &str, subjects: &HashSet<String>) -> bool {
    let Some(hex) = tag.strip_prefix("sha256-") else {
        return false;
    };
    let (hex, suffix) = hex.split_at(hex.len().min(64));
    (suffix.is_empty() || COSIGN_SUFFIXES.contains(&suffix))
        && subjects.contains(&format!("sha256:{hex}"))
}

/// The fallback index `bytes` without the entries in `gone`, foreign entries kept verbatim;
/// `None` when nothing would remain.
pub(super) fn without_entries(
    what: &str,
    bytes: &[u8],
    gone: &HashSet<String>,
) -> Result<Option<Manifest>, RegistryError> {
    let invalid = |detail: String| RegistryError::ManifestInvalid {
        what: what.to_string(),
        detail,
    };
    let mut doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let Some(entries) = doc.get_mut("manifests").and_then(|m| m.as_array_mut()) else {
        return Err(invalid("manifests is not a list".into()));
    };
    entries.retain(|e| {
        e.get("digest")
            .and_then(|d| d.as_str())
            .is_none_or(|d| !gone.contains(d))
    });
    if entries.is_empty() {
        return Ok(None);
    }
    let bytes = Bytes::from(serde_json::to_vec(&doc).map_err(|e| invalid(e.to_string()))?);
    Ok(Some(Manifest {
        media_type: OCI_INDEX.to_string(),
        digest: sha256_digest(&bytes),
        bytes,
    }))
}

impl Cleanup<'_> {
    /// Prunes the referrers of `deleted`, reporting into `out`.
    pub(super) async fn run(&self, deleted: Vec<Deleted>, out: &mut PruneOutcome) {
        // Subjects whose referrers go; their own referrer tags no longer count as users.
        let mut cleaned: HashSet<String> = HashSet::new();
        let mut queue = VecDeque::new();
        for d in deleted {
            if let Some(user) = self.user_of(&d.digest, &cleaned) {
                out.referrers_kept.push(format!(
                    "referrers of {} ({}) kept: {user} still uses the manifest",
                    d.tag, d.digest
                ));
                continue;
            }
            // A platform another index still lists keeps its referrers, silently: normal.
            let children: Vec<String> = d
                .children
                .into_iter()
                .filter(|c| self.user_of(c, &cleaned).is_none())
                .collect();
            for s in std::iter::once(d.digest).chain(children) {
                if cleaned.insert(s.clone()) {
                    queue.push_back((s, 0usize, d.tag.clone()));
                }
            }
        }
        while let Some((subject, depth, label)) = queue.pop_front() {
            let found = self
                .subject(&subject, &label, &mut cleaned, out)
                .await
                .unwrap_or_else(|e| {
                    out.referrers_kept
                        .push(format!("referrers of {subject} ({label}) kept: {e}"));
                    Vec::new()
                });
            if depth + 1 < MAX_REFERRER_DEPTH {
                queue.extend(found.into_iter().map(|r| (r, depth + 1, label.clone())));
            }
        }
        out.referrers_pruned.sort();
    }

    /// Who still uses `digest`, outside the referrer tags of `cleaned` subjects.
    fn user_of(&self, digest: &str, cleaned: &HashSet<String>) -> Option<String> {
        for u in self.inventory {
            if is_referrer_tag_of(&u.tag, cleaned) {
                continue;
            }
            if u.digest == digest {
                return Some(format!("tag {}", u.tag));
            }
            if u.children.iter().any(|c| c == digest) {
                return Some(format!("the index of tag {}", u.tag));
            }
        }
        self.protected
            .contains(digest)
            .then(|| "a selected item or pinned digest".to_string())
    }

    /// Prunes the referrers of one subject; the referrer manifests deleted (their own
    /// referrers are next).
    async fn subject(
        &self,
        subject: &str,
        label: &str,
        cleaned: &mut HashSet<String>,
        out: &mut PruneOutcome,
    ) -> Result<Vec<String>, RegistryError> {
        let Some(base) = fallback_tag(subject) else {
            return Ok(Vec::new());
        };
        let ours: HashMap<String, Referrer> = self
            .source_referrers(subject, &base)
            .await?
            .into_iter()
            .filter(|r| self.scope.options.wants(r.artifact_type.as_deref()))
            .map(|r| (r.digest.clone(), r))
            .collect();
        let (index, listed) = self.destination_referrers(subject, &base).await?;
        let mut deleted = Vec::new();
        for r in listed {
            let Some(src) = ours.get(&r.digest) else {
                continue;
            };
            if r.digest == subject || cleaned.contains(&r.digest) {
                continue;
            }
            let kind = src.artifact_type.as_deref().unwrap_or("no artifactType");
            let what = format!("{label}: referrer {} ({kind})", r.digest);
            if let Some(user) = self.user_of(&r.digest, cleaned) {
                out.referrers_kept
                    .push(format!("{what} kept: {user} still uses it"));
                continue;
            }
            if self.delete(&r.digest, what, out).await {
                cleaned.insert(r.digest.clone());
                deleted.push(r.digest);
            }
        }
        if let Some(index) = index
            && !deleted.is_empty()
        {
            self.shrink_index(&base, label, &index, &deleted, cleaned, out)
                .await;
        }
        for suffix in COSIGN_SUFFIXES {
            self.cosign_tag(&format!("{base}{suffix}"), label, cleaned, out)
                .await;
        }
        Ok(deleted)
    }

    /// The destination's fallback index of a subject without the deleted entries: rewritten
    /// when foreign entries remain, else deleted.
    async fn shrink_index(
        &self,
        tag: &str,
        label: &str,
        index: &Manifest,
        deleted: &[String],
        cleaned: &HashSet<String>,
        out: &mut PruneOutcome,
    ) {
        let what = format!("{}:{tag}", self.dst.repo);
        let gone: HashSet<String> = deleted.iter().cloned().collect();
        let rest = match without_entries(&what, &index.bytes, &gone) {
            Ok(rest) => rest,
            Err(e) => {
                out.referrers_kept.push(format!("{what} kept: {e}"));
                return;
            }
        };
        let Some(rest) = rest else {
            let named = format!("{label}: referrers index {tag}");
            if self.by_tag {
                self.delete(tag, named, out).await;
            } else if let Some(user) = self.user_of(&index.digest, cleaned) {
                out.referrers_kept
                    .push(format!("{named} kept: {user} uses the same digest"));
            } else {
                self.delete(&index.digest, named, out).await;
            }
            return;
        };
        out.referrers_pruned.push(format!(
            "{label}: referrers index {tag} rewritten without them ({} foreign entries kept)",
            parse_referrers_index(&what, &rest.bytes).map_or(0, |l| l.len())
        ));
        if self.dry_run {
            return;
        }
        let retry = &self.engine.config().retry;
        let dst = self.dst;
        let put = retry
            .run(
                |_| dst.registry.put_manifest(dst.repo.path(), tag, &rest),
                |_, _, _| {},
            )
            .await;
        if let Err(e) = put {
            out.referrers_pruned.pop();
            out.referrers_kept
                .push(format!("{what} kept as it was: rewriting it failed: {e}"));
        }
    }

    /// Deletes cosign's `tag` at the destination when the source's tag points at the same
    /// digest (so this mirror copied it) and nothing else uses that digest.
    async fn cosign_tag(
        &self,
        tag: &str,
        label: &str,
        cleaned: &HashSet<String>,
        out: &mut PruneOutcome,
    ) {
        let Some(at_dst) = self.inventory.iter().find(|u| u.tag == tag) else {
            return;
        };
        let what = format!("{label}: cosign tag {tag}");
        let src = self.source();
        let retry = &self.engine.config().retry;
        let opts = self.scope.options;
        let at_src = if opts.artifact_types.is_empty() {
            retry
                .run(
                    |_| src.registry.head_manifest(src.repo.path(), tag),
                    |_, _, _| {},
                )
                .await
                .map(|h| h.and_then(|h| h.digest))
        } else {
            // The filter needs the document: a type the mirror does not copy is not ours.
            match retry
                .run(
                    |_| src.registry.get_manifest(src.repo.path(), tag),
                    |_, _, _| {},
                )
                .await
            {
                Ok(m) if opts.wants(artifact_type_of(&m.bytes).as_deref()) => Ok(Some(m.digest)),
                Ok(_) | Err(RegistryError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        match at_src {
            Ok(Some(d)) if d == at_dst.digest => {}
            Ok(_) => {
                out.referrers_kept.push(format!(
                    "{what} kept: the source has no such tag at {} (not copied by this mirror)",
                    at_dst.digest
                ));
                return;
            }
            Err(e) => {
                out.referrers_kept
                    .push(format!("{what} kept: asking the source failed: {e}"));
                return;
            }
        }
        if self.by_tag {
            self.delete(tag, what, out).await;
        } else if let Some(user) = self.user_of(&at_dst.digest, cleaned) {
            out.referrers_kept
                .push(format!("{what} kept: {user} uses the same digest"));
        } else {
            self.delete(&at_dst.digest, what, out).await;
        }
    }

    fn source(&self) -> Endpoint {
        Endpoint {
            registry: self.engine.rate_limited(self.scope.source.registry.clone()),
            repo: self.scope.source.repo.clone(),
        }
    }

    /// What the source lists for `subject`: the referrers API, else its fallback index.
    async fn source_referrers(
        &self,
        subject: &str,
        tag: &str,
    ) -> Result<Vec<Referrer>, RegistryError> {
        let src = self.source();
        let retry = &self.engine.config().retry;
        let api = retry
            .run(
                |_| src.registry.referrers(src.repo.path(), subject, None),
                |_, _, _| {},
            )
            .await?;
        if let Some(list) = api {
            return Ok(list.referrers);
        }
        Ok(fallback_index(self.engine, &src, tag).await?.1)
    }

    /// The destination's fallback index of `subject`, when it has one, and everything it
    /// lists there or by the referrers API.
    async fn destination_referrers(
        &self,
        subject: &str,
        tag: &str,
    ) -> Result<(Option<Manifest>, Vec<Referrer>), RegistryError> {
        let dst = self.dst;
        let (index, mut listed) = if self.inventory.iter().any(|u| u.tag == tag) {
            fallback_index(self.engine, dst, tag).await?
        } else {
            (None, Vec::new())
        };
        let api = self
            .engine
            .config()
            .retry
            .run(
                |_| dst.registry.referrers(dst.repo.path(), subject, None),
                |_, _, _| {},
            )
            .await?;
        if let Some(list) = api {
            let known: HashSet<String> = listed.iter().map(|r| r.digest.clone()).collect();
            listed.extend(
                list.referrers
                    .into_iter()
                    .filter(|r| !known.contains(&r.digest)),
            );
        }
        Ok((index, listed))
    }

    /// Deletes `reference` (with `dry_run` only lists it); true when it is gone (or would be).
    /// A refusal is a warning, as for tags.
    async fn delete(&self, reference: &str, what: String, out: &mut PruneOutcome) -> bool {
        if self.dry_run {
            out.referrers_pruned.push(what);
            return true;
        }
        let dst = self.dst;
        let deleted = self
            .engine
            .config()
            .retry
            .run(
                |_| dst.registry.delete_manifest(dst.repo.path(), reference),
                |_, _, _| {},
            )
            .await;
        match deleted {
            Ok(()) => {
                out.referrers_pruned.push(what);
                true
            }
            // Gone already: nothing to report.
            Err(RegistryError::NotFound { .. }) => true,
            Err(e) => {
                if e.refuses_delete() {
                    out.warn(format!(
                        "{what} not pruned: {} refuses the delete",
                        dst.repo
                    ));
                }
                out.referrers_kept.push(format!("{what} kept: {e}"));
                false
            }
        }
    }
}

/// A fallback index `tag` on `side` (its manifest and entries); nothing when absent.
async fn fallback_index(
    engine: &Engine,
    side: &Endpoint,
    tag: &str,
) -> Result<(Option<Manifest>, Vec<Referrer>), RegistryError> {
    let got = engine
        .config()
        .retry
        .run(
            |_| side.registry.get_manifest(side.repo.path(), tag),
            |_, _, _| {},
        )
        .await;
    let m = match got {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Ok((None, Vec::new())),
        Err(e) => return Err(e),
    };
    let what = format!("{}:{tag}", side.repo);
    if !is_index(&m.media_type) {
        return Err(RegistryError::ManifestInvalid {
            what,
            detail: format!("the referrers tag holds a {}, not an index", m.media_type),
        });
    }
    let list = parse_referrers_index(&what, &m.bytes)?;
    Ok((Some(m), list))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn referrer_tags_are_told_by_subject() {
        let subjects = HashSet::from([d('a')]);
        let base = fallback_tag(&d('a')).unwrap();
        for t in ["", ".sig", ".att", ".sbom"] {
            assert!(is_referrer_tag_of(&format!("{base}{t}"), &subjects), "{t}");
        }
        assert!(!is_referrer_tag_of(&format!("{base}.other"), &subjects));
        assert!(!is_referrer_tag_of(
            &fallback_tag(&d('b')).unwrap(),
            &subjects
        ));
        assert!(!is_referrer_tag_of("latest", &subjects));
        assert!(!is_referrer_tag_of("sha256-ab", &subjects));
    }

    #[test]
    fn shrinking_an_index_keeps_foreign_entries_verbatim() {
        let foreign = serde_json::json!({"mediaType": "m", "digest": d('f'), "size": 1,
            "annotations": {"who": "someone else"}});
        let ours = serde_json::json!({"mediaType": "m", "digest": d('o'), "size": 1});
        let bytes = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2,
            "mediaType": OCI_INDEX, "manifests": [ours, foreign]}))
        .unwrap();
        let gone = HashSet::from([d('o')]);
        let rest = without_entries("r:t", &bytes, &gone).unwrap().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&rest.bytes).unwrap();
        assert_eq!(doc["manifests"], serde_json::json!([foreign]));
        assert_eq!(rest.digest, sha256_digest(&rest.bytes));
        let all = HashSet::from([d('o'), d('f')]);
        assert!(without_entries("r:t", &bytes, &all).unwrap().is_none());
        assert!(without_entries("r:t", b"{\"manifests\":1}", &gone).is_err());
    }
}
