//! The IO of the referrers pass (see `referrers.rs`).
//!
//! Cheap when nothing changed: each side's tag list is read once per job and tells which
//! fallback and cosign tags exist, and whether a registry serves the referrers API is learnt by
//! one request per side and job; a source with neither the API nor any `sha256-` tag costs
//! nothing more, and a subject with referrers costs one discovery request per side (plus one per
//! cosign tag).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::copy::{Ctx, ItemResult, MirrorError};
use super::plan::Item;
use super::referrers::{
    MAX_REFERRER_DEPTH, MAX_REFERRERS_PER_ITEM, ReferrerError, ReferrersOutcome, Top,
    artifact_type_of, merge_fallback_index,
};
use crate::registry::manifest::is_index;
use crate::registry::referrers::{Referrer, fallback_tag};
use crate::registry::{Parsed, RegistryError};

/// cosign's tag suffixes, on `sha256-<hex>`.
const COSIGN_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

fn boxed(e: impl Into<MirrorError>) -> Box<MirrorError> {
    Box::new(e.into())
}

impl Ctx<'_> {
    /// The referrers pass for one item whose manifest at the destination is (or is about to
    /// be, once its tag is pushed) `digest`.
    pub(super) async fn item_referrers(
        &self,
        item: &Item,
        out: &ItemResult,
        digest: &str,
        top: &Top,
    ) -> Result<ReferrersOutcome, MirrorError> {
        let digest = digest.to_string();
        let mut subjects = Vec::new();
        let mut note = None;
        if top.filtered {
            note = Some(format!(
                "platforms filtered: the destination index {digest} is new, so referrers of the \
                 source index {} (signatures on it) do not apply and were not copied; referrers \
                 of the kept platforms' manifests were",
                out.source_digest.as_deref().unwrap_or("?")
            ));
        } else {
            subjects.push(digest.clone());
        }
        let nothing =
            self.nothing_attached(&digest)
                .await
                .map_err(|e| ReferrerError::Discover {
                    subject: format!("{}@{digest}", self.job.source.repo),
                    cause: boxed(e),
                })?;
        if nothing {
            return Ok(ReferrersOutcome { count: 0, note });
        }
        let index = match (&top.manifest, &top.media_type) {
            (Some(m), _) => is_index(&m.media_type).then(|| m.clone()),
            (None, Some(t)) if !is_index(t) => None,
            // Up to date by HEAD: the children of an index are read off the destination's copy
            // (the same bytes; destination reads cost no source pull quota).
            (None, _) => {
                let dst = &self.destination;
                let m = self
                    .engine
                    .config()
                    .retry
                    .run(
                        |_| dst.registry.get_manifest(dst.repo.path(), &digest),
                        |_, _, _| {},
                    )
                    .await?;
                is_index(&m.media_type).then_some(m)
            }
        };
        if let Some(index) = index {
            let what = format!("{}:{}", self.destination.repo, item.name());
            if let Parsed::Index { manifests } = index.parse(&what)? {
                subjects.extend(manifests.into_iter().map(|d| d.digest));
            }
        }
        let mut count = 0u32;
        let budget = Arc::new(AtomicU32::new(0));
        for s in subjects {
            let n = self
                .subject_referrers(s, 0, Vec::new(), budget.clone())
                .await?;
            count = count.saturating_add(n);
        }
        Ok(ReferrersOutcome { count, note })
    }

    /// Mirrors the referrers of `subject` (and theirs, below `MAX_REFERRER_DEPTH`) and its
    /// cosign tags; the number the destination holds.
    fn subject_referrers(
        &self,
        subject: String,
        depth: usize,
        mut path: Vec<String>,
        budget: Arc<AtomicU32>,
    ) -> BoxFuture<'_, Result<u32, MirrorError>> {
        async move {
            let Some(opts) = &self.job.referrers else {
                return Ok(0);
            };
            let dst = &self.destination;
            // One at a time per subject and destination, in this process: two items (or two
            // mirrors) sharing a manifest must not both rewrite its fallback index.
            let _turn = self
                .engine
                .manifest_turn(
                    dst.registry.host(),
                    dst.repo.path(),
                    &format!("referrers-of-{subject}"),
                )
                .await;
            if let Some(n) = self.lock_done().get(&subject) {
                return Ok(*n);
            }
            let discover = |cause: Box<MirrorError>| ReferrerError::Discover {
                subject: format!("{}@{subject}", self.job.source.repo),
                cause,
            };
            let wanted: Vec<Referrer> = self
                .source_referrers(&subject)
                .await
                .map_err(|e| discover(boxed(e)))?
                .into_iter()
                .filter(|r| opts.wants(r.artifact_type.as_deref()))
                .filter(|r| r.digest != subject && !path.contains(&r.digest))
                .collect();
            // A registry listing thousands of referrers at every level must not make one item
            // copy millions of manifests.
            let seen = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
            let total = budget
                .fetch_add(seen, Ordering::Relaxed)
                .saturating_add(seen);
            if total > MAX_REFERRERS_PER_ITEM {
                return Err(ReferrerError::TooMany {
                    subject: format!("{}@{subject}", self.job.source.repo),
                    limit: MAX_REFERRERS_PER_ITEM,
                }
                .into());
            }
            let mut count = 0u32;
            let mut unindexed = Vec::new();
            if !wanted.is_empty() {
                let at_dst = self
                    .destination_referrers(&subject)
                    .await
                    .map_err(|e| discover(boxed(e)))?;
                path.push(subject.clone());
                for r in &wanted {
                    if !at_dst.listed.contains(&r.digest) {
                        let indexed =
                            self.copy_referrer(r)
                                .await
                                .map_err(|cause| ReferrerError::Copy {
                                    digest: r.digest.clone(),
                                    artifact_type: r
                                        .artifact_type
                                        .clone()
                                        .unwrap_or_else(|| "no artifactType".into()),
                                    subject: subject.clone(),
                                    cause: Box::new(cause),
                                })?;
                        if !indexed && !at_dst.api {
                            unindexed.push(r.clone());
                        }
                    }
                    count = count.saturating_add(1);
                    if depth + 1 < MAX_REFERRER_DEPTH {
                        let below = self
                            .subject_referrers(
                                r.digest.clone(),
                                depth + 1,
                                path.clone(),
                                budget.clone(),
                            )
                            .await?;
                        count = count.saturating_add(below);
                    }
                }
            }
            if !unindexed.is_empty() {
                self.update_fallback_index(&subject, &unindexed).await?;
            }
            for suffix in COSIGN_SUFFIXES {
                count = count.saturating_add(self.cosign_tag(&subject, suffix).await?);
            }
            self.lock_done().insert(subject, count);
            Ok(count)
        }
        .boxed()
    }

    fn lock_done(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.referrers
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Copies one referrer by digest; true when the destination indexed its subject
    /// (`OCI-Subject`), false when it needs the fallback index (or was already there).
    async fn copy_referrer(&self, r: &Referrer) -> Result<bool, MirrorError> {
        let (src, dst) = (&self.source, &self.destination);
        let retry = &self.engine.config().retry;
        let _turn = self
            .engine
            .manifest_turn(dst.registry.host(), dst.repo.path(), &r.digest)
            .await;
        let present = retry
            .run(
                |_| dst.registry.head_manifest(dst.repo.path(), &r.digest),
                |_, _, _| {},
            )
            .await?;
        if present.is_some() {
            return Ok(false);
        }
        let m = retry
            .run(
                |_| src.registry.get_manifest(src.repo.path(), &r.digest),
                |_, _, _| {},
            )
            .await?;
        self.copy_children(&m, 0, true).await?;
        let indexed = retry
            .run(
                |_| {
                    dst.registry
                        .put_manifest_with_subject(dst.repo.path(), &r.digest, &m)
                },
                |_, _, _| {},
            )
            .await?;
        Ok(indexed)
    }

    /// Adds `new` to the destination's fallback index of `subject`, keeping what it lists.
    async fn update_fallback_index(
        &self,
        subject: &str,
        new: &[Referrer],
    ) -> Result<(), MirrorError> {
        let dst = &self.destination;
        let Some(tag) = fallback_tag(subject) else {
            return Ok(());
        };
        let failed = |cause: Box<MirrorError>| ReferrerError::Index {
            tag: format!("{}:{tag}", dst.repo),
            cause,
        };
        // Read again right before writing (not from the job's tag list): whatever someone
        // else listed since must survive.
        let (existing, _) = self
            .fallback_index(dst, subject, None)
            .await
            .map_err(|e| failed(boxed(e)))?;
        let what = format!("{}:{tag}", dst.repo);
        let merged = merge_fallback_index(&what, existing.as_ref().map(|m| &m.bytes[..]), new)
            .map_err(|e| failed(boxed(e)))?;
        if let Some(index) = merged {
            self.engine
                .config()
                .retry
                .run(
                    |_| dst.registry.put_manifest(dst.repo.path(), &tag, &index),
                    |_, _, _| {},
                )
                .await
                .map_err(|e| failed(boxed(e)))?;
        }
        Ok(())
    }

    /// Mirrors cosign's tag `sha256-<hex><suffix>` of `subject` when the source has it; 1 when
    /// the destination holds it afterwards.
    async fn cosign_tag(&self, subject: &str, suffix: &str) -> Result<u32, MirrorError> {
        let Some(base) = fallback_tag(subject) else {
            return Ok(0);
        };
        let tag = format!("{base}{suffix}");
        let mut known = (String::new(), None::<String>);
        let result = self.cosign_tag_inner(&tag, &mut known).await;
        result.map_err(|cause| {
            let kind = match suffix {
                ".sig" => "cosign signature",
                ".att" => "cosign attestation",
                _ => "cosign SBOM",
            };
            let (artifact_type, digest) = known;
            MirrorError::Referrer(ReferrerError::CosignTag {
                tag: format!("{}:{tag}", self.job.source.repo),
                artifact_type: if artifact_type.is_empty() {
                    kind.to_string()
                } else {
                    artifact_type
                },
                digest: digest.map(|d| format!(", {d}")).unwrap_or_default(),
                cause: Box::new(cause),
            })
        })
    }

    /// `known`: (artifact type, digest) learnt on the way, for the error message.
    async fn cosign_tag_inner(
        &self,
        tag: &str,
        known: &mut (String, Option<String>),
    ) -> Result<u32, MirrorError> {
        let Some(opts) = &self.job.referrers else {
            return Ok(0);
        };
        let (src, dst) = (&self.source, &self.destination);
        let retry = &self.engine.config().retry;
        let source_tags = self.tags(true).await;
        if source_tags.as_ref().is_some_and(|t| !t.contains(tag)) {
            return Ok(0);
        }
        // A HEAD tells the digest without a pull; the filter needs the document itself.
        let mut manifest = None;
        let source_digest = if opts.artifact_types.is_empty() {
            let head = retry
                .run(
                    |_| src.registry.head_manifest(src.repo.path(), tag),
                    |_, _, _| {},
                )
                .await?;
            match head {
                None => return Ok(0),
                Some(h) => h.digest,
            }
        } else {
            let got = retry
                .run(
                    |_| src.registry.get_manifest(src.repo.path(), tag),
                    |_, _, _| {},
                )
                .await;
            let m = match got {
                Ok(m) => m,
                Err(RegistryError::NotFound { .. }) => return Ok(0),
                Err(e) => return Err(e.into()),
            };
            let kind = artifact_type_of(&m.bytes);
            known.0 = kind.clone().unwrap_or_default();
            if !opts.wants(kind.as_deref()) {
                return Ok(0);
            }
            let d = m.digest.clone();
            manifest = Some(m);
            Some(d)
        };
        known.1 = source_digest.clone();
        let dst_tags = self.tags(false).await;
        let at_dst = if dst_tags.as_ref().is_some_and(|t| !t.contains(tag)) {
            None
        } else {
            retry
                .run(
                    |_| dst.registry.head_manifest(dst.repo.path(), tag),
                    |_, _, _| {},
                )
                .await?
                .and_then(|h| h.digest)
        };
        if at_dst.is_some() && at_dst == source_digest {
            return Ok(1);
        }
        let m = match manifest {
            Some(m) => m,
            None => {
                // By digest when the HEAD told it: the tag may move between the two requests.
                let reference = source_digest.as_deref().unwrap_or(tag);
                retry
                    .run(
                        |_| src.registry.get_manifest(src.repo.path(), reference),
                        |_, _, _| {},
                    )
                    .await?
            }
        };
        known.0 = artifact_type_of(&m.bytes).unwrap_or_default();
        known.1 = Some(m.digest.clone());
        if let (Some(existing), false) = (&at_dst, self.job.overwrite) {
            return Err(MirrorError::TagConflict {
                tag: format!("{}:{tag}", dst.repo),
                existing: existing.clone(),
                wanted: m.digest.clone(),
            });
        }
        self.copy_children(&m, 0, at_dst.is_none()).await?;
        let _turn = self
            .engine
            .manifest_turn(dst.registry.host(), dst.repo.path(), &m.digest)
            .await;
        retry
            .run(
                |_| dst.registry.put_manifest(dst.repo.path(), tag, &m),
                |_, _, _| {},
            )
            .await?;
        Ok(1)
    }
}
