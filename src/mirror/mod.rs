//! Plan and copy one `ImageMirror`: validate the spec, build the (pure) plan, run it on the
//! shared engine, report per item. Knows nothing of Kubernetes.

mod clients;
mod copy;
pub mod plan;
mod referrers;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use clients::{ClientPool, EndpointAccess};
pub use copy::{Counters, Endpoint, ItemOutcome, ItemResult, MirrorError, MirrorJob, run};
pub use plan::{Item, Plan, PlanError};
pub use referrers::{ReferrerError, ReferrersOptions, ReferrersOutcome};

use crate::api::{ImageMirrorSpec, Progress};
use crate::registry::manifest::ALL_TAG_PAGES;
use crate::registry::{RegistryError, Repository};
use crate::transfer::{Engine, ProgressSink};

/// Why a spec cannot be acted on, naming the field.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SpecError {
    /// `source.repository` or `destination.repository` does not parse.
    #[error("spec.{field}.repository: {source}")]
    Repository {
        field: &'static str,
        #[source]
        source: RegistryError,
    },
    /// `interval` is not a duration.
    #[error("spec.interval: {0:?} is not a duration like 30m or 1h")]
    Interval(String),
    /// A platform that is not `os/arch[/variant]`.
    #[error("spec.platforms: {0:?} is not os/arch or os/arch/variant")]
    Platform(String),
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
    /// Parsed resync interval.
    pub interval: Duration,
}

/// Checks everything that can be checked without IO.
pub fn validate(spec: &ImageMirrorSpec) -> Result<ValidSpec, SpecError> {
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
    let interval =
        parse_duration(&spec.interval).ok_or_else(|| SpecError::Interval(spec.interval.clone()))?;
    for p in &spec.platforms {
        let parts: Vec<&str> = p.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|s| s.is_empty()) {
            return Err(SpecError::Platform(p.clone()));
        }
    }
    plan::validate(spec)?;
    Ok(ValidSpec {
        source,
        destination,
        interval,
    })
}

/// Parses Go-style durations as Kubernetes users write them: `30s`, `5m`, `1h30m`, `1.5h`,
/// `500ms`. Zero is refused.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * secs;
        rest = &rest[unit_end..];
    }
    (total > 0.0 && total.is_finite()).then(|| Duration::from_secs_f64(total))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "0s", "1d", "h", "5", "-1h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
