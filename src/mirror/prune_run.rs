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

use std::collections::{BTreeSet, HashMap};

use futures_util::StreamExt;

use super::Endpoint;
use super::prune::{Candidate, RetainReason, Retained, by_digest};
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
}

impl PruneOutcome {
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
pub async fn prune(
    engine: &Engine,
    destination: &Endpoint,
    candidates: &[Candidate],
    protected: &BTreeSet<String>,
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
    for c in candidates {
        let head = retry
            .run(|_| dst.registry.head_manifest(repo, &c.tag), |_, _, _| {})
            .await;
        match head {
            Ok(None) => out.gone.push(c.tag.clone()),
            Ok(Some(h)) if h.digest.as_deref() == Some(c.digest.as_str()) => live.push(c.clone()),
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
        }
        Ok(Mode::Digest) => {
            by_digest_guarded(engine, &dst, &live, protected, dry_run, &mut out).await
        }
    }
    out.pruned.sort();
    out
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

/// Digest deletes for the live candidates whose digest nothing else uses.
async fn by_digest_guarded(
    engine: &Engine,
    dst: &Endpoint,
    live: &[Candidate],
    protected: &BTreeSet<String>,
    dry_run: bool,
    out: &mut PruneOutcome,
) {
    let keep_all = |out: &mut PruneOutcome, reason: RetainReason, message: String| {
        for c in live {
            out.retained.push(Retained {
                tag: c.tag.clone(),
                reason,
                message: message.clone(),
            });
        }
    };
    let users = match digest_users(engine, dst, live, protected).await {
        Ok(u) => u,
        Err((reason, message)) => return keep_all(out, reason, message),
    };
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
}

/// Digest → who else uses it: every tag of the repository that is not a live candidate, the
/// children of the indexes those tags point at, and `protected`.
async fn digest_users(
    engine: &Engine,
    dst: &Endpoint,
    live: &[Candidate],
    protected: &BTreeSet<String>,
) -> Result<HashMap<String, String>, (RetainReason, String)> {
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
    let mut users: HashMap<String, String> = HashMap::new();
    let candidates: BTreeSet<&str> = live.iter().map(|c| c.tag.as_str()).collect();
    let others: Vec<String> = list
        .tags
        .into_iter()
        .filter(|t| !candidates.contains(t.as_str()))
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
                    indexes.push((tag.clone(), digest.clone()));
                }
                users.entry(digest).or_insert(format!("tag {tag}"));
            }
            Err(e) => return Err((RetainReason::CheckFailed, e.to_string())),
        }
    }
    // A digest delete must not break an index that lists the manifest as a platform.
    let children: Vec<_> = futures_util::stream::iter(indexes)
        .map(|(tag, digest)| async move {
            let what = format!("{}@{digest}", dst.repo);
            let got = retry
                .run(|_| dst.registry.get_manifest(repo, &digest), |_, _, _| {})
                .await
                .and_then(|m| m.parse(&what));
            (tag, got)
        })
        .buffer_unordered(CHECK_CONCURRENCY)
        .collect()
        .await;
    for (tag, got) in children {
        match got {
            Ok(Parsed::Index { manifests }) => {
                for m in manifests {
                    users
                        .entry(m.digest)
                        .or_insert(format!("the index of tag {tag}"));
                }
            }
            Ok(Parsed::Image { .. }) => {}
            Err(e) => return Err((RetainReason::CheckFailed, e.to_string())),
        }
    }
    // Named last, so a message names the tag that uses the digest when there is one.
    for d in protected {
        users
            .entry(d.clone())
            .or_insert_with(|| "a selected item or pinned digest".to_string());
    }
    Ok(users)
}

#[cfg(test)]
#[path = "prune_run_tests.rs"]
mod tests;
