//! Plan and copy one `ImageMirror`: validate the spec, build the (pure) plan, run it on the
//! shared engine, report per item. Knows nothing of Kubernetes.

mod clients;
mod copy;
pub mod filtered;
pub mod plan;
pub mod prune;
mod prune_referrers;
mod prune_run;
mod referrers;
mod referrers_copy;
mod referrers_discover;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use clients::{ClientPool, EndpointAccess};
pub use copy::{Counters, Endpoint, ItemOutcome, ItemResult, MirrorError, MirrorJob, run};
pub use plan::{Item, Plan, PlanError};
pub use prune::{PruneRecord, RetainReason, Retained, Skip};
pub use prune_run::{MAX_CHECKED_TAGS, PruneOutcome};
pub use referrers::{ReferrerError, ReferrersOptions, ReferrersOutcome};

use crate::api::validation::{self, FieldError, validate_spec};
use crate::api::{ImageMirrorSpec, Progress};
use crate::registry::manifest::ALL_TAG_PAGES;
use crate::registry::{RegistryError, Repository};
use crate::transfer::{Engine, ProgressSink};

pub use crate::api::validation::parse_duration;

/// Why a spec cannot be acted on, naming the field.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SpecError {
    /// A field breaks one of the CRD's rules (the API server would have refused it).
    #[error(transparent)]
    Field(#[from] FieldError),
    /// `source.repository` or `destination.repository` does not parse.
    #[error("spec.{field}.repository: {source}")]
    Repository {
        field: &'static str,
        #[source]
        source: RegistryError,
    },
    /// The tag selection does not parse.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// A spec that passed validation, with its parts parsed.
#[derive(Clone, Debug)]
pub struct ValidSpec {
    /// Parsed source repository.
    pub source: Repository,
    /// Parsed destination repository.
    pub destination: Repository,
    /// Parsed resync interval, within the CRD's bounds.
    pub interval: Duration,
}

/// Checks everything that can be checked without IO: first the CRD's own rules
/// ([`validate_spec`], the one implementation the CLI and the controller share), then what only
/// code can check (references, globs, semver ranges).
pub fn validate(spec: &ImageMirrorSpec) -> Result<ValidSpec, SpecError> {
    validate_spec(spec)?;
    let interval = validation::interval(&spec.interval)?;
    let source =
        Repository::parse(&spec.source.repository).map_err(|source| SpecError::Repository {
            field: "source",
            source,
        })?;
    let destination = Repository::parse(&spec.destination.repository).map_err(|source| {
        SpecError::Repository {
            field: "destination",
            source,
        }
    })?;
    plan::validate(spec)?;
    Ok(ValidSpec {
        source,
        destination,
        interval,
    })
}

/// Why a whole sync (not one item) failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SyncError {
    /// Listing the source's tags failed.
    #[error("listing tags of {repository}: {source}")]
    TagList {
        repository: String,
        #[source]
        source: RegistryError,
    },
    /// The plan could not be built.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl SyncError {
    /// A short CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SyncError::TagList { source, .. } => source.reason(),
            SyncError::Plan(_) => "InvalidSpec",
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// One result per planned item, in plan order.
    pub items: Vec<ItemResult>,
    /// Blob and byte counts.
    pub progress: Progress,
}

impl SyncReport {
    /// Items that failed.
    pub fn failed(&self) -> usize {
        self.items.iter().filter(|i| i.result.is_err()).count()
    }
}

/// Lists tags when needed, plans, and copies every item on `engine`.
pub async fn sync(
    engine: &Engine,
    spec: &ImageMirrorSpec,
    source: Endpoint,
    destination: Endpoint,
    concurrency: usize,
    progress: ProgressSink,
    counters: Arc<Counters>,
) -> Result<SyncReport, SyncError> {
    let listed = plan::needs_tag_list(&spec.tags);
    let tags = if listed {
        let registry = engine.rate_limited(source.registry.clone());
        engine
            .config()
            .retry
            .run(
                |_| registry.list_tags(source.repo.path(), ALL_TAG_PAGES),
                |_, _, _| {},
            )
            .await
            .map(|list| list.tags)
            .map_err(|e| SyncError::TagList {
                repository: source.repo.to_string(),
                source: e,
            })?
    } else {
        Vec::new()
    };
    let plan = plan::plan(spec, &tags)?;
    // The referrers pass reads the source's fallback and cosign tags off this list.
    let source_tags = listed.then(|| Arc::new(tags.into_iter().collect()));
    let job = MirrorJob {
        source,
        destination,
        platforms: spec.platforms.clone(),
        overwrite: spec.overwrite,
        items: plan.items,
        concurrency,
        referrers: ReferrersOptions::from_spec(&spec.referrers, source_tags),
    };
    let items = run(engine, &job, progress, counters.clone()).await;
    Ok(SyncReport {
        items,
        progress: snapshot(&counters),
    })
}

/// What pruning after one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Set when nothing was pruned because of the sync itself (failed items, empty selection).
    pub skipped: Option<Skip>,
    /// Deleted, kept and gone tags.
    pub outcome: PruneOutcome,
    /// Tags this sync copied that did not fit the record's bound: they will never be pruned.
    pub unrecorded: usize,
}

impl PruneReport {
    /// One line for status and the CLI, when something is worth saying.
    pub fn message(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(s) = &self.skipped {
            parts.push(s.message());
        }
        if let Some(w) = &self.outcome.warning {
            parts.push(w.clone());
        }
        if let Some(r) = self.outcome.referrers_kept.first() {
            parts.push(format!(
                "{} referrer(s) of pruned tags kept, e.g. {r}",
                self.outcome.referrers_kept.len()
            ));
        }
        if let Some(r) = self.outcome.retained.first() {
            parts.push(format!(
                "{} tag(s) kept, e.g. {}: {} ({})",
                self.outcome.retained.len(),
                r.tag,
                r.message,
                r.reason.reason()
            ));
        }
        if self.unrecorded > 0 {
            parts.push(format!(
                "{} copied tag(s) not recorded (the record is full) and never pruned",
                self.unrecorded
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// After a sync: records what `report` wrote in `record`, then deletes (with `dry_run`: only
/// decides) the recorded tags the selection no longer selects, by the rules of [`prune`], and
/// forgets what is gone. With `spec.referrers.enabled`, the referrers it copied from `source`
/// for a deleted manifest go too. Never called for a sync that failed as a whole.
pub async fn prune_after_sync(
    engine: &Engine,
    spec: &ImageMirrorSpec,
    source: &Endpoint,
    destination: &Endpoint,
    record: &mut PruneRecord,
    report: &SyncReport,
    dry_run: bool,
) -> PruneReport {
    let unrecorded = record.record(&destination.repo.to_string(), report);
    let decision = prune::decide(record, report);
    let mut protected = prune::selected_digests(report);
    protected.extend(spec.digests.iter().cloned());
    let options = ReferrersOptions::from_spec(&spec.referrers, None);
    let scope = options
        .as_ref()
        .map(|options| prune_referrers::ReferrerScope { source, options });
    let outcome = prune_run::prune(
        engine,
        destination,
        &decision.candidates,
        &protected,
        scope.as_ref(),
        dry_run,
    )
    .await;
    record.forget(outcome.forgotten());
    PruneReport {
        skipped: decision.skipped,
        outcome,
        unrecorded,
    }
}

/// The counters as a status `Progress`.
pub fn snapshot(c: &Counters) -> Progress {
    Progress {
        blobs_total: c.blobs_total.load(Ordering::Relaxed),
        blobs_done: c.blobs_done.load(Ordering::Relaxed),
        blobs_skipped: c.blobs_skipped.load(Ordering::Relaxed),
        blobs_mounted: c.blobs_mounted.load(Ordering::Relaxed),
        bytes_total: c.bytes_total.load(Ordering::Relaxed),
        bytes_done: c.bytes_done.load(Ordering::Relaxed),
    }
}
