//! The reading side of the referrers pass (see `referrers.rs`): what each side lists for a
//! subject, by the referrers API (probed once per side and job) or the fallback tag's index,
//! and each side's tags, listed once per job.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::copy::{Ctx, Endpoint};
use crate::registry::manifest::is_index;
use crate::registry::referrers::{Referrer, fallback_tag, parse_referrers_index};
use crate::registry::{Manifest, ReferrerList, RegistryError};

/// Pages (of 1000 tags) of a tag list read for the referrers pass; beyond that, each fallback
/// and cosign tag is asked for instead.
const TAG_PAGES: usize = 10;
/// Whether a side serves the referrers API: not known yet (the default), yes, no.
pub(super) const UNKNOWN: u8 = 0;
pub(super) const SERVED: u8 = 1;
pub(super) const ABSENT: u8 = 2;

/// What the destination holds for one subject.
pub(super) struct DestinationReferrers {
    /// It serves the referrers API.
    pub(super) api: bool,
    /// Referrers it lists (API) or its fallback index lists.
    pub(super) listed: HashSet<String>,
}

impl Ctx<'_> {
    /// The source's referrers of `subject`: the API, else the fallback tag's index.
    pub(super) async fn source_referrers(
        &self,
        subject: &str,
    ) -> Result<Vec<Referrer>, RegistryError> {
        let kept = self
            .referrers
            .probe_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(subject);
        if let Some(list) = kept {
            return Ok(list);
        }
        // Unfiltered answers are filtered by the caller; filtered ones pass through it.
        if let Some(list) = self.api_listing(true, subject).await? {
            return Ok(list.referrers);
        }
        let tags = self.tags(true).await;
        self.fallback_index(&self.source, subject, tags.as_deref())
            .await
            .map(|(_, list)| list)
    }

    /// The referrers API's answer on one side; `None` when that side does not serve it (learnt
    /// once per job: its first request is made alone, the others wait for what it learns).
    pub(super) async fn api_listing(
        &self,
        source: bool,
        subject: &str,
    ) -> Result<Option<ReferrerList>, RegistryError> {
        let j = &self.referrers;
        let (state, probe, side) = if source {
            (&j.source_api, &j.source_probe, &self.source)
        } else {
            (&j.destination_api, &j.destination_probe, &self.destination)
        };
        // Only the source is asked to filter: the destination's whole list decides what it has.
        let filter = match self
            .job
            .referrers
            .as_ref()
            .map(|o| o.artifact_types.as_slice())
        {
            Some([one]) if source => Some(one.as_str()),
            _ => None,
        };
        let _probing = if state.load(Ordering::Acquire) == UNKNOWN {
            Some(probe.lock().await)
        } else {
            None
        };
        if state.load(Ordering::Acquire) == ABSENT {
            return Ok(None);
        }
        let listed = self
            .engine
            .config()
            .retry
            .run(
                |_| side.registry.referrers(side.repo.path(), subject, filter),
                |_, _, _| {},
            )
            .await?;
        let learnt = if listed.is_some() { SERVED } else { ABSENT };
        state.store(learnt, Ordering::Release);
        Ok(listed)
    }

    /// True when the source is known to have nothing that could refer to any manifest: no
    /// referrers API and no `sha256-…` tag at all (fallback or cosign). Learns whether it
    /// serves the API by asking about `digest` when not known yet (the answer is kept).
    pub(super) async fn nothing_attached(&self, digest: &str) -> Result<bool, RegistryError> {
        if self.referrers.source_api.load(Ordering::Acquire) == UNKNOWN
            && let Some(list) = self.api_listing(true, digest).await?
        {
            self.referrers
                .probe_answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(digest.to_string(), list.referrers);
        }
        if self.referrers.source_api.load(Ordering::Acquire) != ABSENT {
            return Ok(false);
        }
        let tags = self.tags(true).await;
        Ok(tags.is_some_and(|t| !t.iter().any(|t| t.starts_with("sha256-"))))
    }

    /// What the destination holds for `subject`.
    pub(super) async fn destination_referrers(
        &self,
        subject: &str,
    ) -> Result<DestinationReferrers, RegistryError> {
        if let Some(list) = self.api_listing(false, subject).await? {
            return Ok(DestinationReferrers {
                api: true,
                listed: list.referrers.into_iter().map(|r| r.digest).collect(),
            });
        }
        let tags = self.tags(false).await;
        let (_, list) = self
            .fallback_index(&self.destination, subject, tags.as_deref())
            .await?;
        Ok(DestinationReferrers {
            api: false,
            listed: list.into_iter().map(|r| r.digest).collect(),
        })
    }

    /// The fallback tag's index of `subject` on `side` (its bytes and entries), when the tag
    /// exists; `tags`, when known, saves asking for a tag that is not there.
    pub(super) async fn fallback_index(
        &self,
        side: &Endpoint,
        subject: &str,
        tags: Option<&HashSet<String>>,
    ) -> Result<(Option<Manifest>, Vec<Referrer>), RegistryError> {
        let Some(tag) = fallback_tag(subject) else {
            return Ok((None, Vec::new()));
        };
        if tags.is_some_and(|t| !t.contains(&tag)) {
            return Ok((None, Vec::new()));
        }
        let got = self
            .engine
            .config()
            .retry
            .run(
                |_| side.registry.get_manifest(side.repo.path(), &tag),
                |_, _, _| {},
            )
            .await;
        let manifest = match got {
            Ok(m) => m,
            Err(RegistryError::NotFound { .. }) => return Ok((None, Vec::new())),
            Err(e) => return Err(e),
        };
        let what = format!("{}:{tag}", side.repo);
        if !is_index(&manifest.media_type) {
            return Err(RegistryError::ManifestInvalid {
                what,
                detail: format!(
                    "the referrers tag holds a {}, not an index",
                    manifest.media_type
                ),
            });
        }
        let list = parse_referrers_index(&what, &manifest.bytes)?;
        Ok((Some(manifest), list))
    }

    /// A side's tags, listed once per job; `None` when not known.
    pub(super) async fn tags(&self, source: bool) -> Option<Arc<HashSet<String>>> {
        let (cell, side) = if source {
            (&self.referrers.source_tags, &self.source)
        } else {
            (&self.referrers.destination_tags, &self.destination)
        };
        cell.get_or_init(|| async {
            let given = if source {
                self.job.referrers.as_ref().and_then(|o| o.source_tags.clone())
            } else {
                self.destination_tags.clone().map(Arc::new)
            };
            if given.is_some() {
                return given;
            }
            let listed = self
                .engine
                .config()
                .retry
                .run(
                    |_| side.registry.list_tags(side.repo.path(), TAG_PAGES),
                    |_, _, _| {},
                )
                .await;
            match listed {
                Ok(list) if list.complete => Some(Arc::new(list.tags.into_iter().collect())),
                Ok(_) => None,
                Err(RegistryError::NotFound { .. }) if !source => Some(Arc::default()),
                Err(e) => {
                    tracing::debug!(repo = %side.repo, error = %e, "tag list failed; asking per tag");
                    None
                }
            }
        })
        .await
        .clone()
    }
}
