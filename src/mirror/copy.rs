//! Copy one mirror's plan: per item, index → child manifests → blobs, written in the safe
//! order (blobs, then child manifests, then the index, the tag last).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};

use super::filtered;
use super::plan::Item;
use super::referrers::{self, ReferrerError, ReferrersOptions, ReferrersOutcome, Top};
use crate::registry::manifest::is_index;
use crate::registry::{Manifest, Parsed, Registry, RegistryError, Repository};
use crate::transfer::{
    BlobOutcome, BlobProgress, BlobRequest, BlobState, Engine, ProgressSink, TransferError,
};

/// Nested indexes deeper than this are refused (real images have one level).
const MAX_DEPTH: usize = 3;

/// A job with at least this many tags asks the destination for its tag list once: a tag the
/// list lacks needs no HEAD, which saves a request per new tag for one request per job.
const TAG_LIST_MIN: usize = 8;
/// The list is used only when it fits in this many pages (of 1000 tags); a destination with
/// more tags than that is cheaper to ask per tag.
const TAG_LIST_PAGES: usize = 1;

/// A registry client and the repository on it.
#[derive(Clone)]
pub struct Endpoint {
    /// The client.
    pub registry: Arc<dyn Registry>,
    /// The repository.
    pub repo: Repository,
}

/// Everything needed to copy one mirror's items.
#[derive(Clone)]
pub struct MirrorJob {
    /// Read side.
    pub source: Endpoint,
    /// Write side.
    pub destination: Endpoint,
    /// `os/arch[/variant]` to keep from indexes; empty keeps all, byte-identical.
    pub platforms: Vec<String>,
    /// Whether an existing destination tag pointing elsewhere may be moved.
    pub overwrite: bool,
    /// Tags and digests to copy.
    pub items: Vec<Item>,
    /// Items copied at once. Blobs are bounded by the engine's own limits.
    pub concurrency: usize,
    /// Copy signatures, attestations and SBOMs too; `None`: not asked.
    pub referrers: Option<ReferrersOptions>,
}

/// Why one item failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MirrorError {
    /// The registry side failed; its error names the object.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A blob transfer failed; its error names the blob and the step.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// `overwrite: false` and the destination tag points at other content.
    #[error("destination tag {tag} points at {existing}, not {wanted}, and overwrite is false")]
    TagConflict {
        tag: String,
        existing: String,
        wanted: String,
    },
    /// Indexes nested deeper than we follow.
    #[error("manifest {0} nests indexes more than {MAX_DEPTH} deep")]
    TooDeep(String),
    /// A referrer (signature, attestation, SBOM) or the fallback index could not be copied.
    #[error(transparent)]
    Referrer(#[from] ReferrerError),
}

impl MirrorError {
    /// The destination says a blob it was believed to hold is not there (see
    /// [`RegistryError::is_blob_unknown`]).
    pub fn is_blob_unknown(&self) -> bool {
        match self {
            MirrorError::Registry(e) => e.is_blob_unknown(),
            MirrorError::Transfer(e) => e.is_blob_unknown(),
            _ => false,
        }
    }

    /// A short CamelCase reason for status, Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            MirrorError::Registry(e) => e.reason(),
            MirrorError::Transfer(e) => e.reason(),
            MirrorError::TagConflict { .. } => "TagConflict",
            MirrorError::TooDeep(_) => "ManifestInvalid",
            MirrorError::Referrer(_) => "ReferrerFailed",
        }
    }
}

/// How an item that did not fail ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Source and destination already agreed; nothing was written.
    UpToDate,
    /// Content and the tag were written.
    Copied,
}

/// The result for one item.
#[derive(Clone, Debug)]
pub struct ItemResult {
    /// The tag or digest.
    pub item: Item,
    /// What the source points at, when it was learnt.
    pub source_digest: Option<String>,
    /// What the destination points at now (differs when platforms were filtered).
    pub destination_digest: Option<String>,
    /// Success or the reason for failure.
    pub result: Result<ItemOutcome, MirrorError>,
    /// Referrers mirrored with the item, when asked for and the item itself succeeded.
    pub referrers: Option<ReferrersOutcome>,
}

/// Blob and byte counters of one run, updated as blobs finish.
#[derive(Debug, Default)]
pub struct Counters {
    /// Blobs requested.
    pub blobs_total: AtomicU64,
    /// Blobs present (copied, skipped or mounted).
    pub blobs_done: AtomicU64,
    /// Blobs that were already there.
    pub blobs_skipped: AtomicU64,
    /// Blobs mounted from a sibling repository.
    pub blobs_mounted: AtomicU64,
    /// Bytes of requested blobs.
    pub bytes_total: AtomicU64,
    /// Bytes actually sent.
    pub bytes_done: AtomicU64,
}

/// Copies every item of `job`; one item's failure never stops the others. Results come back in
/// plan order.
pub async fn run(
    engine: &Engine,
    job: &MirrorJob,
    progress: ProgressSink,
    counters: Arc<Counters>,
) -> Vec<ItemResult> {
    // Manifest requests take their turn in the registries' request buckets like the engine's
    // blob requests do; the raw endpoints go into blob requests, which the engine paces itself.
    let paced = |e: &Endpoint| Endpoint {
        registry: engine.rate_limited(e.registry.clone()),
        repo: e.repo.clone(),
    };
    let destination = paced(&job.destination);
    let ctx = Ctx {
        engine,
        job,
        source: paced(&job.source),
        destination_tags: destination_tags(engine, job, &destination).await,
        destination,
        progress,
        counters,
        referrers: referrers::JobState::default(),
    };
    let ctx = &ctx;
    // Owned items: a closure over borrowed ones is not general enough for the Send bound of
    // a spawned reconcile.
    let mut results: Vec<(usize, ItemResult)> =
        futures_util::stream::iter(job.items.clone().into_iter().enumerate())
            .map(|(i, item)| async move { (i, ctx.copy_item(&item).await) })
            .buffer_unordered(job.concurrency.max(1))
            .collect()
            .await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The destination's tags, when the job is worth the question and the answer came; `None`
/// means unknown, so every tag is asked for. `overwrite: false` always asks, so a conflict is
/// judged on the tag itself rather than on a list that may lag behind it.
async fn destination_tags(
    engine: &Engine,
    job: &MirrorJob,
    destination: &Endpoint,
) -> Option<HashSet<String>> {
    let tags = job.items.iter().filter(|i| matches!(i, Item::Tag(_)));
    if !job.overwrite || tags.count() < TAG_LIST_MIN {
        return None;
    }
    let repo = destination.repo.path();
    let listed = engine
        .config()
        .retry
        .run(
            |_| destination.registry.list_tags(repo, TAG_LIST_PAGES),
            |_, _, _| {},
        )
        .await;
    match listed {
        Ok(list) if list.complete => Some(list.tags.into_iter().collect()),
        Ok(_) => None,
        // A repository that does not exist yet has no tags.
        Err(RegistryError::NotFound { .. }) => Some(HashSet::new()),
        Err(e) => {
            tracing::debug!(repo, error = %e, "destination tag list failed; asking per tag");
            None
        }
    }
}

pub(super) struct Ctx<'a> {
    pub(super) engine: &'a Engine,
    pub(super) job: &'a MirrorJob,
    /// The job's endpoints, rate-limited, for manifest requests.
    pub(super) source: Endpoint,
    pub(super) destination: Endpoint,
    /// See [`destination_tags`].
    pub(super) destination_tags: Option<HashSet<String>>,
    progress: ProgressSink,
    counters: Arc<Counters>,
    /// What the referrers pass learnt during this job (see `referrers.rs`).
    pub(super) referrers: referrers::JobState,
}

impl Ctx<'_> {
    async fn copy_item(&self, item: &Item) -> ItemResult {
        let mut out = ItemResult {
            item: item.clone(),
            source_digest: None,
            destination_digest: None,
            result: Ok(ItemOutcome::UpToDate),
            referrers: None,
        };
        let mut top = Top::default();
        out.result = self.copy_item_inner(item, &mut out, &mut top).await;
        if let Err(e) = &out.result
            && e.is_blob_unknown()
        {
            // The destination lost a blob the engine believed present (deleted and
            // garbage-collected): forget what it knew of the repository and try once more,
            // asking afresh.
            tracing::info!(item = item.name(), error = %e, "destination lacks a blob believed present; checking again");
            let dst = &self.job.destination;
            self.engine
                .forget_present(dst.registry.host(), dst.repo.path());
            top = Top::default();
            out.result = self.copy_item_inner(item, &mut out, &mut top).await;
        }
        // Items that were up to date get their referrers now (copied ones got them before
        // their tag moved).
        if let (Ok(_), Some(digest), Some(_), None) = (
            &out.result,
            out.destination_digest.clone(),
            &self.job.referrers,
            &out.referrers,
        ) {
            match self.item_referrers(item, &out, &digest, &top).await {
                Ok(r) => out.referrers = Some(r),
                Err(e) => out.result = Err(e),
            }
        }
        if let Err(e) = &out.result {
            tracing::warn!(item = item.name(), reason = e.reason(), error = %e, "item failed");
        }
        out
    }

    async fn copy_item_inner(
        &self,
        item: &Item,
        out: &mut ItemResult,
        top: &mut Top,
    ) -> Result<ItemOutcome, MirrorError> {
        let (src, dst) = (&self.source, &self.destination);
        let reference = item.name();
        let retry = &self.engine.config().retry;
        // Platform filtering rewrites indexes, so only unfiltered items (and pinned digests,
        // which are always copied as they are) can be judged by digest alone.
        let filtering = !self.job.platforms.is_empty() && matches!(item, Item::Tag(_));
        // The destination first: when it lacks the item, the source manifest is needed
        // anyway and one GET replaces the source HEAD + GET.
        let unlisted = match (item, &self.destination_tags) {
            (Item::Tag(tag), Some(listed)) => !listed.contains(tag),
            _ => false,
        };
        let dst_head = if unlisted {
            None
        } else {
            retry
                .run(
                    |_| dst.registry.head_manifest(dst.repo.path(), reference),
                    |_, _, _| {},
                )
                .await?
        };
        top.media_type = dst_head.as_ref().and_then(|h| h.media_type.clone());
        let dst_digest = dst_head.and_then(|h| h.digest);
        let absent = dst_digest.is_none();
        let mut source_ref = reference;
        if !absent {
            let head = retry
                .run(
                    |_| src.registry.head_manifest(src.repo.path(), reference),
                    |_, _, _| {},
                )
                .await?
                .ok_or_else(|| RegistryError::NotFound {
                    what: format!("{}:{reference}", src.repo),
                })?;
            out.source_digest = head.digest.clone();
            if !filtering && head.digest.is_some() && dst_digest == head.digest {
                out.destination_digest = dst_digest;
                return Ok(ItemOutcome::UpToDate);
            }
            if let (true, Some(d)) = (filtering, &dst_digest)
                && let Some(was_filtered) = self
                    .filtered_up_to_date(&head, d, top.media_type.as_deref())
                    .await
            {
                top.filtered = was_filtered;
                out.destination_digest = dst_digest;
                return Ok(ItemOutcome::UpToDate);
            }
            if let Some(d) = &out.source_digest {
                source_ref = d;
            }
        }
        let source_ref = source_ref.to_string();
        let manifest = retry
            .run(
                |_| src.registry.get_manifest(src.repo.path(), &source_ref),
                |_, _, _| {},
            )
            .await?;
        out.source_digest = Some(manifest.digest.clone());
        let manifest = if filtering && is_index(&manifest.media_type) {
            top.filtered = true;
            let what = format!("{}:{reference}", src.repo);
            let from = filtered::Provenance {
                source_digest: manifest.digest.clone(),
                platforms: filtered::platforms_key(&self.job.platforms),
            };
            let kept = manifest.filter_platforms(&what, &self.job.platforms)?;
            if !self.job.overwrite && dst_digest.as_deref() == Some(kept.digest.as_str()) {
                // Built by a version that did not annotate: the same content, and a tag that
                // must not move. (With overwrite the annotated index replaces it once.)
                out.destination_digest = dst_digest;
                return Ok(ItemOutcome::UpToDate);
            }
            filtered::annotate(kept, &what, &from)?
        } else {
            manifest
        };
        top.media_type = Some(manifest.media_type.clone());
        top.manifest = Some(manifest.clone());
        if dst_digest.as_deref() == Some(manifest.digest.as_str()) {
            out.destination_digest = dst_digest;
            return Ok(ItemOutcome::UpToDate);
        }
        if let (Item::Tag(tag), Some(existing), false) = (item, &dst_digest, self.job.overwrite) {
            return Err(MirrorError::TagConflict {
                tag: format!("{}:{tag}", dst.repo),
                existing: existing.clone(),
                wanted: manifest.digest.clone(),
            });
        }
        self.copy_children(&manifest, 0, absent).await?;
        if self.job.referrers.is_some() {
            // Signatures before the tag: a verifying cluster never sees the tag on an image
            // whose signature has not arrived, and a failed referrer leaves the tag as it was.
            out.referrers = Some(
                self.item_referrers(item, out, &manifest.digest, top)
                    .await?,
            );
        }
        let _turn = self
            .engine
            .manifest_turn(dst.registry.host(), dst.repo.path(), &manifest.digest)
            .await;
        retry
            .run(
                |_| {
                    dst.registry
                        .put_manifest(dst.repo.path(), reference, &manifest)
                },
                |_, _, _| {},
            )
            .await?;
        out.destination_digest = Some(manifest.digest.clone());
        Ok(ItemOutcome::Copied)
    }

    /// Makes everything `manifest` refers to present at the destination. `absent`: the
    /// destination lacked `manifest`, so its small blobs are uploaded without asking first.
    pub(super) fn copy_children<'a>(
        &'a self,
        manifest: &'a Manifest,
        depth: usize,
        absent: bool,
    ) -> BoxFuture<'a, Result<(), MirrorError>> {
        async move {
            let what = format!("{}@{}", self.job.source.repo, manifest.digest);
            if depth > MAX_DEPTH {
                return Err(MirrorError::TooDeep(what));
            }
            match manifest.parse(&what)? {
                // Children go through a bounded window, so a manifest naming thousands does
                // not start thousands of transfers (each a task) at once.
                Parsed::Image { config, layers } => {
                    let blobs = std::iter::once(config).chain(layers).map(Ok);
                    futures_util::stream::iter(blobs)
                        .try_for_each_concurrent(self.fan_out(), |d| async move {
                            self.copy_blob(d.digest, d.size, absent).await.map(drop)
                        })
                        .await?;
                }
                Parsed::Index { manifests } => {
                    futures_util::stream::iter(manifests.into_iter().map(Ok))
                        .try_for_each_concurrent(self.fan_out(), |d| {
                            self.copy_child_manifest(d.digest, depth)
                        })
                        .await?;
                }
            }
            Ok(())
        }
        .boxed()
    }

    /// Children of one manifest in progress at once: enough to keep the engine's transfer
    /// slots busy (small blobs count a quarter), no more.
    fn fan_out(&self) -> usize {
        self.engine
            .config()
            .max_concurrent
            .saturating_mul(4)
            .clamp(4, 256)
    }

    async fn copy_child_manifest(&self, digest: String, depth: usize) -> Result<(), MirrorError> {
        let (src, dst) = (&self.source, &self.destination);
        let retry = &self.engine.config().retry;
        // Two tags sharing an index reach the same children at once: one pushes, the other
        // then finds it present.
        let _turn = self
            .engine
            .manifest_turn(dst.registry.host(), dst.repo.path(), &digest)
            .await;
        let present = retry
            .run(
                |_| dst.registry.head_manifest(dst.repo.path(), &digest),
                |_, _, _| {},
            )
            .await?;
        if present.is_some() {
            // A manifest is only ever pushed after all it refers to, so its presence vouches
            // for its blobs.
            return Ok(());
        }
        let child = retry
            .run(
                |_| src.registry.get_manifest(src.repo.path(), &digest),
                |_, _, _| {},
            )
            .await?;
        self.copy_children(&child, depth + 1, true).await?;
        retry
            .run(
                |_| dst.registry.put_manifest(dst.repo.path(), &digest, &child),
                |_, _, _| {},
            )
            .await?;
        Ok(())
    }

    pub(super) async fn copy_blob(
        &self,
        digest: String,
        size: u64,
        likely_absent: bool,
    ) -> Result<BlobOutcome, MirrorError> {
        let c = &self.counters;
        c.blobs_total.fetch_add(1, Ordering::Relaxed);
        c.bytes_total.fetch_add(size, Ordering::Relaxed);
        let req = BlobRequest {
            source: self.job.source.registry.clone(),
            source_repo: self.job.source.repo.path().to_string(),
            destination: self.job.destination.registry.clone(),
            destination_repo: self.job.destination.repo.path().to_string(),
            digest,
            size,
            likely_absent,
        };
        let sink = self.progress.clone();
        let counters = self.counters.clone();
        let wrapped: ProgressSink = Arc::new(move |p: &BlobProgress| {
            if let BlobState::Finished(Ok(outcome)) = &p.state {
                counters.blobs_done.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    BlobOutcome::Exists => counters.blobs_skipped.fetch_add(1, Ordering::Relaxed),
                    BlobOutcome::Mounted => counters.blobs_mounted.fetch_add(1, Ordering::Relaxed),
                    BlobOutcome::Copied { bytes_sent } => counters
                        .bytes_done
                        .fetch_add(*bytes_sent, Ordering::Relaxed),
                };
            }
            sink(p)
        });
        Ok(self.engine.copy_blob(req, &wrapped).await?)
    }
}
