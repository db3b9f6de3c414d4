//! Deleting prune candidates from the destination, safely (the decisions are in `prune.rs`).
//!
//! 1. HEAD each candidate: gone already → forgotten; pointing elsewhere → not ours, kept.
//! 2. Learn how the registry deletes, with DELETEs of objects that cannot exist: a random tag
//!    (404: tags can be deleted) and then the all-zero digest (404: digests can be deleted;
//!    405/UNSUPPORTED: no deletes at all). A dry run does the same, so it lists exactly what a
//!    run would delete.
//! 3. By tag: `DELETE /v2/<name>/manifests/<tag>`. By digest (CNCF distribution 2.x): only
//!    digests no other tag, index, pinned digest or selected item uses, which needs the
//!    destination's tag list (at most [`MAX_CHECKED_TAGS`]) and a HEAD of each tag.
//! 4. With `spec.referrers.enabled`, the referrers this mirror copied for each deleted
//!    manifest go too (`prune_referrers.rs`), by the same inventory of the destination's tags.

use std::collections::{BTreeSet, HashMap};

use futures_util::StreamExt;

use super::Endpoint;
use super::prune::{Candidate, RetainReason, Retained, by_digest};
use super::prune_referrers::{Cleanup, Deleted, ReferrerScope};
use crate::registry::manifest::is_index;
use crate::registry::{Parsed, RegistryError};
use crate::transfer::Engine;

/// A digest delete is considered only when the destination repository has at most this many
/// tags, since every one of them is checked first.
pub const MAX_CHECKED_TAGS: usize = 2000;
/// Requests at once while checking the other tags.
const CHECK_CONCURRENCY: usize = 8;
/// A digest no manifest has, for probing whether digest deletes are allowed.
const ZERO_DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// What pruning did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Tags deleted (a dry run: that would be deleted), sorted.
    pub pruned: Vec<String>,
    /// Candidates kept, and why.
    pub retained: Vec<Retained>,
    /// Candidates already absent from the destination.
    pub gone: Vec<String>,
    /// Set when the registry refuses deletes (or the credentials may not delete): a warning,
    /// not a failure of the sync.
    pub warning: Option<String>,
    /// Referrers of deleted manifests deleted with them (a dry run: that would be), each
    /// named with the tag it belonged to: cosign tags, referrer manifests, fallback indexes.
    pub referrers_pruned: Vec<String>,
    /// Referrers of deleted manifests that were kept although this mirror copied them, and
    /// why (still used, the delete failed, the source could not be asked).
    pub referrers_kept: Vec<String>,
}

impl PruneOutcome {
    /// Adds `w` to the warning.
    pub(super) fn warn(&mut self, w: String) {
        self.warning = Some(match self.warning.take() {
            Some(before) => format!("{before}; {w}"),
            None => w,
        });
    }

    /// Tags to drop from the record: deleted, gone, or no longer ours.
    pub fn forgotten(&self) -> impl Iterator<Item = &String> {
        self.pruned.iter().chain(&self.gone).chain(
            self.retained
                .iter()
                .filter(|r| r.reason.forgets())
                .map(|r| &r.tag),
        )
    }
}

/// How the destination deletes.
enum Mode {
    Tag,
    Digest,
    Refused(String),
}

/// Deletes (or with `dry_run` only decides) `candidates` at `destination`. `protected`: digests
/// that must survive whatever happens (pinned digests, the selected items' digests).
/// `referrers`: set when the mirror copies referrers; they are pruned with their manifests.
pub async fn prune(
    engine: &Engine,
    destination: &Endpoint,
    candidates: &[Candidate],
    protected: &BTreeSet<String>,
    referrers: Option<&ReferrerScope<'_>>,
    dry_run: bool,
) -> PruneOutcome {
    let mut out = PruneOutcome::default();
    if candidates.is_empty() {
        return out;
    }
    let dst = Endpoint {
        registry: engine.rate_limited(destination.registry.clone()),
        repo: destination.repo.clone(),
    };
    let retry = &engine.config().retry;
    let repo = dst.repo.path();
    let mut live = Vec::new();
    // The platforms of a live index, read before it is deleted: their referrers go with it.
    let mut children: HashMap<String, Vec<String>> = HashMap::new();
    for c in candidates {
        let head = retry
            .run(|_| dst.registry.head_manifest(repo, &c.tag), |_, _, _| {})
            .await;
        match head {
            Ok(None) => out.gone.push(c.tag.clone()),
            Ok(Some(h)) if h.digest.as_deref() == Some(c.digest.as_str()) => {
                if referrers.is_some() && h.media_type.as_deref().is_some_and(is_index) {
                    match index_children(engine, &dst, &c.digest).await {
                        Ok(list) => {
                            children.insert(c.digest.clone(), list);
                        }
                        Err(e) => out.referrers_kept.push(format!(
                            "referrers of the platforms of {} kept: reading the index failed: {e}",
                            c.tag
                        )),
                    }
                }
                live.push(c.clone())
            }
            Ok(Some(h)) => out.retained.push(Retained {
                tag: c.tag.clone(),
                reason: RetainReason::ChangedElsewhere,
                message: format!(
                    "now points at {}, not {} as this mirror wrote it",
                    h.digest.as_deref().unwrap_or("an unknown digest"),
                    c.digest
                ),
            }),
            Err(e) => out.retained.push(check_failed(&c.tag, &e)),
        }
    }
    if live.is_empty() {
        return out;
    }
    match probe(engine, &dst).await {
        Err(e) => {
            for c in &live {
                out.retained.push(Retained {
                    tag: c.tag.clone(),
                    reason: RetainReason::DeleteFailed,
                    message: e.to_string(),
                });
            }
        }
        Ok(Mode::Refused(why)) => {
            for c in &live {
                out.retained.push(Retained {
                    tag: c.tag.clone(),
                    reason: RetainReason::DeleteRefused,
                    message: why.clone(),
                });
            }
            out.warning = Some(format!(
                "{} tag(s) not pruned: {} refuses deletes: {why}",
                live.len(),
                dst.repo
            ));
        }
        Ok(Mode::Tag) => {
            let mut inventory = None;
            if referrers.is_some() {
                let skip: BTreeSet<&str> = live.iter().map(|c| c.tag.as_str()).collect();
                // Read before the deletes: tag deletes leave the manifests, so this is what
                // stays, minus the candidates.
                inventory = Some(self::inventory(engine, &dst, &skip).await);
            }
            for c in &live {
                let deleted = if dry_run {
                    Ok(())
                } else {
                    retry
                        .run(|_| dst.registry.delete_manifest(repo, &c.tag), |_, _, _| {})
                        .await
                };
                match deleted {
                    Ok(()) => out.pruned.push(c.tag.clone()),
                    Err(RegistryError::NotFound { .. }) => out.gone.push(c.tag.clone()),
                    Err(e) => out.retained.push(Retained {
                        tag: c.tag.clone(),
                        reason: RetainReason::DeleteFailed,
                        message: e.to_string(),
                    }),
                }
            }
            if let (Some(scope), Some(inventory)) = (referrers, inventory) {
                let mode = (true, dry_run);
                with_referrers(
                    engine, &dst, scope, inventory, protected, mode, &live, &children, &mut out,
                )
                .await;
            }
        }
        Ok(Mode::Digest) => {
            let inventory =
                by_digest_guarded(engine, &dst, &live, protected, dry_run, &mut out).await;
            if let (Some(scope), Some(inventory)) = (referrers, inventory) {
                let mode = (false, dry_run);
                with_referrers(
                    engine,
                    &dst,
                    scope,
                    Ok(inventory),
                    protected,
                    mode,
                    &live,
                    &children,
                    &mut out,
                )
                .await;
            }
        }
    }
    out.pruned.sort();
    out
}

/// Prunes the referrers of the manifests `out.pruned` deleted. `mode`: (by tag, dry run).
#[allow(clippy::too_many_arguments)]
async fn with_referrers(
    engine: &Engine,
    dst: &Endpoint,
    scope: &ReferrerScope<'_>,
    inventory: Result<Vec<TagUse>, (RetainReason, String)>,
    protected: &BTreeSet<String>,
    (by_tag, dry_run): (bool, bool),
    live: &[Candidate],
    children: &HashMap<String, Vec<String>>,
    out: &mut PruneOutcome,
) {
    let pruned: BTreeSet<&str> = out.pruned.iter().map(String::as_str).collect();
    let deleted: Vec<Deleted> = live
        .iter()
        .filter(|c| pruned.contains(c.tag.as_str()))
        .map(|c| Deleted {
            tag: c.tag.clone(),
            digest: c.digest.clone(),
            children: children.get(&c.digest).cloned().unwrap_or_default(),
        })
        .collect();
    if deleted.is_empty() {
        return;
    }
    let inventory = match inventory {
        Ok(i) => i,
        Err((_, message)) => {
            out.referrers_kept
                .push(format!("referrers of the pruned tags kept: {message}"));
            return;
        }
    };
    let cleanup = Cleanup {
        engine,
        dst,
        scope,
        inventory: &inventory,
        protected,
        by_tag,
        dry_run,
    };
    cleanup.run(deleted, out).await;
}

/// The digests an index at the destination lists.
async fn index_children(
    engine: &Engine,
    dst: &Endpoint,
    digest: &str,
) -> Result<Vec<String>, RegistryError> {
    let what = format!("{}@{digest}", dst.repo);
    let m = engine
        .config()
        .retry
        .run(
            |_| dst.registry.get_manifest(dst.repo.path(), digest),
            |_, _, _| {},
        )
        .await?;
    match m.parse(&what)? {
        Parsed::Index { manifests } => Ok(manifests.into_iter().map(|m| m.digest).collect()),
        Parsed::Image { .. } => Ok(Vec::new()),
    }
}

fn check_failed(tag: &str, e: &RegistryError) -> Retained {
    Retained {
        tag: tag.to_string(),
        reason: RetainReason::CheckFailed,
        message: e.to_string(),
    }
}

/// Whether an error means "you may not delete here" rather than "something broke".
fn refused(e: &RegistryError) -> bool {
    e.refuses_delete()
        || matches!(
            e,
            RegistryError::AuthFailed { .. } | RegistryError::Denied { .. }
        )
}

/// Learns how the destination deletes with DELETEs of objects that cannot exist.
async fn probe(engine: &Engine, dst: &Endpoint) -> Result<Mode, RegistryError> {
    let retry = &engine.config().retry;
    let repo = dst.repo.path();
    let tag = format!("imagemirror-delete-probe-{:032x}", rand::random::<u128>());
    let by_tag = retry
        .run(|_| dst.registry.delete_manifest(repo, &tag), |_, _, _| {})
        .await;
    match by_tag {
        Ok(()) | Err(RegistryError::NotFound { .. }) => return Ok(Mode::Tag),
        Err(e) if refused(&e) => {}
        Err(e) => return Err(e),
    }
    let by_digest = retry
        .run(
            |_| dst.registry.delete_manifest(repo, ZERO_DIGEST),
            |_, _, _| {},
        )
        .await;
    match by_digest {
        Ok(()) | Err(RegistryError::NotFound { .. }) => Ok(Mode::Digest),
        Err(e) if refused(&e) => Ok(Mode::Refused(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Digest deletes for the live candidates whose digest nothing else uses. The inventory of
/// the other tags, when it could be read.
async fn by_digest_guarded(
    engine: &Engine,
    dst: &Endpoint,
    live: &[Candidate],
    protected: &BTreeSet<String>,
    dry_run: bool,
    out: &mut PruneOutcome,
) -> Option<Vec<TagUse>> {
    let skip: BTreeSet<&str> = live.iter().map(|c| c.tag.as_str()).collect();
    let inventory = match inventory(engine, dst, &skip).await {
        Ok(i) => i,
        Err((reason, message)) => {
            for c in live {
                out.retained.push(Retained {
                    tag: c.tag.clone(),
                    reason,
                    message: message.clone(),
                });
            }
            return None;
        }
    };
    let users = users_of(&inventory, protected);
    let (deletes, kept) = by_digest(live, &users);
    out.retained.extend(kept);
    let retry = &engine.config().retry;
    let repo = dst.repo.path();
    for (digest, tags) in deletes {
        let deleted = if dry_run {
            Ok(())
        } else {
            retry
                .run(
                    |_| dst.registry.delete_manifest(repo, &digest),
                    |_, _, _| {},
                )
                .await
        };
        match deleted {
            Ok(()) => out.pruned.extend(tags),
            Err(RegistryError::NotFound { .. }) => out.gone.extend(tags),
            Err(e) => {
                for tag in tags {
                    out.retained.push(Retained {
                        tag,
                        reason: RetainReason::DeleteFailed,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    Some(inventory)
}

/// One destination tag outside the candidates: the digest it points at and, for an index,
/// the digests it lists.
#[derive(Clone, Debug)]
pub(super) struct TagUse {
    pub(super) tag: String,
    pub(super) digest: String,
    pub(super) children: Vec<String>,
}

/// Digest → who else uses it: every tag of `inventory`, the children of the indexes those
/// tags point at, and `protected`.
fn users_of(inventory: &[TagUse], protected: &BTreeSet<String>) -> HashMap<String, String> {
    let mut users: HashMap<String, String> = HashMap::new();
    for u in inventory {
        users
            .entry(u.digest.clone())
            .or_insert(format!("tag {}", u.tag));
    }
    // A digest delete must not break an index that lists the manifest as a platform.
    for u in inventory {
        for c in &u.children {
            users
                .entry(c.clone())
                .or_insert(format!("the index of tag {}", u.tag));
        }
    }
    // Named last, so a message names the tag that uses the digest when there is one.
    for d in protected {
        users
            .entry(d.clone())
            .or_insert_with(|| "a selected item or pinned digest".to_string());
    }
    users
}

/// Every tag of the destination repository except `skip`, with what it points at.
async fn inventory(
    engine: &Engine,
    dst: &Endpoint,
    skip: &BTreeSet<&str>,
) -> Result<Vec<TagUse>, (RetainReason, String)> {
    let retry = &engine.config().retry;
    let repo = dst.repo.path();
    let pages = MAX_CHECKED_TAGS.div_ceil(1000);
    let list = retry
        .run(|_| dst.registry.list_tags(repo, pages), |_, _, _| {})
        .await
        .map_err(|e| (RetainReason::CheckFailed, e.to_string()))?;
    if !list.complete || list.tags.len() > MAX_CHECKED_TAGS {
        return Err((
            RetainReason::TooManyTags,
            format!(
                "{} has more than {MAX_CHECKED_TAGS} tags, too many to prove no other tag uses the digest",
                dst.repo
            ),
        ));
    }
    let others: Vec<String> = list
        .tags
        .into_iter()
        .filter(|t| !skip.contains(t.as_str()))
        .collect();
    let heads: Vec<(String, Result<_, RegistryError>)> = futures_util::stream::iter(others)
        .map(|tag| async move {
            let head = retry
                .run(|_| dst.registry.head_manifest(repo, &tag), |_, _, _| {})
                .await;
            (tag, head)
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .collect()
        .await;
    let mut found = Vec::new();
    let mut indexes = Vec::new();
    for (tag, head) in heads {
        match head {
            // Deleted meanwhile: uses nothing.
            Ok(None) => {}
            Ok(Some(h)) => {
                let Some(digest) = h.digest else {
                    return Err((
                        RetainReason::CheckFailed,
                        format!("{}:{tag} answered without Docker-Content-Digest", dst.repo),
                    ));
                };
                if h.media_type.as_deref().is_some_and(is_index) {
                    indexes.push((tag, digest));
                } else {
                    found.push(TagUse {
                        tag,
                        digest,
                        children: Vec::new(),
                    });
                }
            }
            Err(e) => return Err((RetainReason::CheckFailed, e.to_string())),
        }
    }
    let listed: Vec<_> = futures_util::stream::iter(indexes)
        .map(|(tag, digest)| async move {
            let got = index_children(engine, dst, &digest).await;
            (tag, digest, got)
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .collect()
        .await;
    for (tag, digest, got) in listed {
        let children = got.map_err(|e| (RetainReason::CheckFailed, e.to_string()))?;
        found.push(TagUse {
            tag,
            digest,
            children,
        });
    }
    // Deterministic messages ("tag x uses the digest") whatever order the answers came in.
    found.sort_by(|a, b| a.tag.cmp(&b.tag));
    Ok(found)
}

#[cfg(test)]
#[path = "prune_run_tests.rs"]
mod tests;
