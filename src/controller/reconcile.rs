//! Reconcile one ImageMirror: read Secrets → validate → decide whether a sync is due → run it
//! on the shared engine (progress patched at most every 5 s) → write status with server-side
//! apply on the status subresource. Failures that need a change become conditions and Events.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use rand::Rng;

use super::Context;
use super::secrets::{SecretError, read_side};
use super::status::{self, condition};
use crate::api::condition_reasons as reasons;
use crate::api::condition_types as types;
use crate::api::{ImageMirror, ImageMirrorStatus, TagState};
use crate::mirror::{self, Counters, ItemOutcome, snapshot};
use crate::transfer::{BlobOutcome, BlobProgress, BlobState, ProgressSink};

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "imagemirror";
/// How often a long sync patches its progress, at most.
pub const PROGRESS_PERIOD: Duration = Duration::from_secs(5);
/// When a Secret is missing: look again after this long (its watch usually triggers sooner).
const SECRET_RECHECK: Duration = Duration::from_secs(300);

/// A reconcile that must be retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The object has no namespace (the CRD is namespaced; this cannot come from a real API).
    #[error("ImageMirror {0} has no namespace")]
    NoNamespace(String),
    /// Writing status failed.
    #[error("writing status of {name}: {source}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Reading a Secret failed at the API (not a missing Secret: that is a condition).
    #[error(transparent)]
    Secret(SecretError),
    /// The sync as a whole failed (tag list unreadable); status says why.
    #[error("sync of {name} failed: {reason}")]
    Sync { name: String, reason: &'static str },
}

impl ReconcileError {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ReconcileError::NoNamespace(_) => "InvalidObject",
            ReconcileError::Status { .. } => "StatusWriteFailed",
            ReconcileError::Secret(e) => e.reason(),
            ReconcileError::Sync { reason, .. } => reason,
        }
    }
}

/// The requeue after a successful sync: the interval with ±10% jitter, so a thousand
/// mirrors created together do not resync together.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..=1.1))
}

/// `now + d`, rounded up to a whole second: status times are serialised with second
/// precision, and a `nextSyncTime` that reads earlier than the requeue would make the next
/// wake-up look early and sync twice.
fn add(now: Timestamp, d: Duration) -> Timestamp {
    let t = now.checked_add(d).unwrap_or(now);
    let whole = Timestamp::from_second(t.as_second()).unwrap_or(t);
    if whole < t {
        whole.checked_add(Duration::from_secs(1)).unwrap_or(t)
    } else {
        whole
    }
}

/// The requeue that wakes us exactly at `at`.
fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or_default()
}

async fn write_status(
    api: &Api<ImageMirror>,
    name: &str,
    status: &ImageMirrorStatus,
) -> Result<(), ReconcileError> {
    let patch = serde_json::json!({
        "apiVersion": "imagemirror.dev/v1alpha1",
        "kind": "ImageMirror",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|source| ReconcileError::Status {
        name: name.to_string(),
        source,
    })
}

async fn event(ctx: &Context, obj: &ImageMirror, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        // Events cap notes at 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an Event failed");
    }
}

/// A mirror that cannot progress until something changes.
struct Stall<'a> {
    api: &'a Api<ImageMirror>,
    name: &'a str,
    prev: &'a ImageMirrorStatus,
    generation: Option<i64>,
    now: Timestamp,
}

impl Stall<'_> {
    /// Writes Stalled=True with `reason` and a Warning Event, unless status already says so
    /// (a stalled mirror is looked at again and again; that must not write each time).
    async fn write(
        &self,
        ctx: &Context,
        obj: &ImageMirror,
        reason: &str,
        message: String,
    ) -> Result<(), ReconcileError> {
        let s = status::stalled(self.prev, self.generation, reason, &message, self.now);
        if s != *self.prev {
            write_status(self.api, self.name, &s).await?;
            event(ctx, obj, EventType::Warning, reason, message).await;
        }
        Ok(())
    }
}

/// The reconciler kube-runtime calls.
pub async fn reconcile(obj: Arc<ImageMirror>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let name = obj.name_any();
    let ns = obj
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let key = format!("{ns}/{name}");
    let result = reconcile_inner(&obj, &ctx, &ns, &name, &key).await;
    let label = match &result {
        Ok(_) => "success",
        Err(e) => e.reason(),
    };
    ctx.metrics
        .reconciles
        .get_or_create(&super::metrics::ResultLabel {
            result: label.into(),
        })
        .inc();
    result
}

async fn reconcile_inner(
    obj: &ImageMirror,
    ctx: &Context,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<Action, ReconcileError> {
    let api: Api<ImageMirror> = Api::namespaced(ctx.client.clone(), ns);
    let prev = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;
    let now = Timestamp::now();

    if obj.spec.suspend {
        let already = prev.observed_generation == generation
            && condition(&prev, types::RECONCILING).is_some_and(|c| c.reason == reasons::SUSPENDED);
        if !already {
            let mut s = prev.clone();
            s.observed_generation = generation;
            status::set_condition(
                &mut s.conditions,
                types::RECONCILING,
                "False",
                reasons::SUSPENDED,
                "spec.suspend is true",
                generation,
                now,
            );
            write_status(&api, name, &s).await?;
        }
        return Ok(Action::await_change());
    }

    // OCI layouts are local files: a CLI feature, refused here before anything is read.
    let valid = match crate::layout::refuse_in_cluster(&obj.spec)
        .map_err(|m| (crate::layout::IN_CLUSTER_REASON, m))
        .and_then(|()| {
            mirror::validate(&obj.spec).map_err(|e| (reasons::INVALID_SPEC, e.to_string()))
        }) {
        Ok(v) => v,
        Err((reason, message)) => {
            let stall = Stall {
                api: &api,
                name,
                prev: &prev,
                generation,
                now,
            };
            stall.write(ctx, obj, reason, message).await?;
            return Ok(Action::await_change());
        }
    };

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let extra = ctx.extra_ca.as_deref();
    let sides = async {
        let s = read_side(
            &secrets,
            ns,
            "source",
            &obj.spec.source,
            &valid.source,
            extra,
        )
        .await?;
        let d = read_side(
            &secrets,
            ns,
            "destination",
            &obj.spec.destination,
            &valid.destination,
            extra,
        )
        .await?;
        Ok::<_, SecretError>((s, d))
    }
    .await;
    let (src, dst) = match sides {
        Ok(v) => v,
        Err(e @ SecretError::Api { .. }) => return Err(ReconcileError::Secret(e)),
        Err(e) => {
            let stall = Stall {
                api: &api,
                name,
                prev: &prev,
                generation,
                now,
            };
            stall.write(ctx, obj, e.reason(), e.to_string()).await?;
            return Ok(Action::requeue(SECRET_RECHECK));
        }
    };

    let mut versions = src.versions.clone();
    versions.extend(dst.versions.iter().cloned());
    // What this process scheduled wins over status: the object a reconcile is handed can lag
    // behind our own last write, and must not make us sync the same generation twice.
    let scheduled = ctx.scheduled(key, generation);
    let first_visit = scheduled.is_none()
        && (prev.observed_generation != generation || prev.conditions.is_empty());
    let next_due = scheduled.or(prev.next_sync_time.as_ref().map(|t| t.0));
    let secrets_changed = ctx.secret_versions(key).as_ref() != Some(&versions);
    // Failed syncs set nextSyncTime to their backoff, so "not Ready" alone is no reason to
    // sync again: that would turn every status write (ours included) into a retry storm.
    let due = first_visit || secrets_changed || next_due.is_none_or(|t| t <= now);
    if !due {
        // Woken by our own status write or a resync of the watch: nothing to do yet.
        let wait = next_due.map(|t| until(now, t)).unwrap_or(valid.interval);
        return Ok(Action::requeue(wait.max(Duration::from_millis(100))));
    }

    ctx.set_secret_versions(key, versions);
    let mut base = prev.clone();
    if first_visit {
        base = status::progressing(&prev, generation, now);
        write_status(&api, name, &base).await?;
        event(
            ctx,
            obj,
            EventType::Normal,
            "SyncStarted",
            format!("syncing {} to {}", valid.source, valid.destination),
        )
        .await;
    }

    let endpoints = ctx
        .pool
        .endpoint("source", &obj.spec.source, src.access)
        .and_then(|s| {
            Ok((
                s,
                ctx.pool
                    .endpoint("destination", &obj.spec.destination, dst.access)?,
            ))
        });
    let (source, destination) = match endpoints {
        Ok(v) => v,
        Err(e) => {
            let stall = Stall {
                api: &api,
                name,
                prev: &base,
                generation,
                now,
            };
            stall
                .write(ctx, obj, reasons::INVALID_SPEC, e.to_string())
                .await?;
            return Ok(Action::await_change());
        }
    };

    let counters = Arc::new(Counters::default());
    let started = std::time::Instant::now();
    let sync = mirror::sync(
        &ctx.engine,
        &obj.spec,
        source,
        destination,
        ctx.item_concurrency,
        metrics_sink(ctx),
        counters.clone(),
    );
    let ticker = async {
        let mut last = None;
        loop {
            tokio::time::sleep(PROGRESS_PERIOD).await;
            let p = snapshot(&counters);
            if last.as_ref() != Some(&p) {
                let s = status::syncing(&base, generation, p.clone(), Timestamp::now());
                if let Err(e) = write_status(&api, name, &s).await {
                    tracing::warn!(mirror = key, error = %e, "progress write failed");
                }
                last = Some(p);
            }
        }
    };
    let report = tokio::select! {
        r = sync => r,
        _ = ticker => unreachable!("the progress ticker never ends"),
    };
    ctx.metrics
        .sync_duration
        .observe(started.elapsed().as_secs_f64());

    let now = Timestamp::now();
    let next_in = jittered(valid.interval);
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let reason = e.reason();
            let next_at = add(now, retry_delay(ctx, key, valid.interval));
            ctx.schedule(key, generation, next_at);
            let s = status::failed(&base, generation, reason, &e.to_string(), now, next_at);
            write_status(&api, name, &s).await?;
            event(ctx, obj, EventType::Warning, "SyncFailed", e.to_string()).await;
            return Err(ReconcileError::Sync {
                name: key.to_string(),
                reason,
            });
        }
    };
    let next_in = if report.failed() > 0 {
        retry_delay(ctx, key, valid.interval)
    } else {
        ctx.reset_backoff(key);
        next_in
    };
    let next_at = add(now, next_in);
    ctx.schedule(key, generation, next_at);
    let new = status::synced(&base, generation, &report, now, next_at);
    // Events only for what changed, so a steady mirror does not fill the event log.
    for item in &report.items {
        if let Err(e) = &item.result {
            let was = prev.tags.iter().find(|t| t.name == item.item.name());
            let same = was.is_some_and(|t| {
                t.state == TagState::Failed && t.reason.as_deref() == Some(e.reason())
            });
            if !same {
                event(
                    ctx,
                    obj,
                    EventType::Warning,
                    "TagFailed",
                    format!("{}: {} ({})", item.item.name(), e, e.reason()),
                )
                .await;
            }
        }
    }
    let copied = report
        .items
        .iter()
        .filter(|i| matches!(i.result, Ok(ItemOutcome::Copied)))
        .count();
    if copied > 0 {
        event(
            ctx,
            obj,
            EventType::Normal,
            reasons::SYNCED,
            format!(
                "synced {copied} of {} tags, {} bytes copied",
                report.items.len(),
                report.progress.bytes_done
            ),
        )
        .await;
    }
    let failed = report.failed() as i64;
    ctx.metrics
        .set_mirror_tags(key, Some((report.items.len() as i64 - failed, failed)));
    write_status(&api, name, &new).await?;
    Ok(Action::requeue(until(now, next_at)))
}

/// Forwards blob outcomes to the metrics.
fn metrics_sink(ctx: &Context) -> ProgressSink {
    let metrics = ctx.metrics.clone();
    Arc::new(move |p: &BlobProgress| {
        if let BlobState::Finished(result) = &p.state {
            match result {
                Ok(BlobOutcome::Exists) => metrics.blob("skipped"),
                Ok(BlobOutcome::Mounted) => metrics.blob("mounted"),
                Ok(BlobOutcome::Copied { bytes_sent }) => {
                    metrics.blob("copied");
                    metrics.bytes_copied.inc_by(*bytes_sent);
                }
                Err(_) => metrics.blob("failed"),
            }
        }
    })
}

/// Backoff for the `n`th consecutive failure (from 0): 5 s doubling, capped at `cap` and at
/// 5 min, with jitter.
fn backoff(n: u32, cap: Duration) -> Duration {
    let d = Duration::from_secs(5).saturating_mul(1 << n.min(6));
    jittered(d.min(cap).min(Duration::from_secs(300)))
}

/// When to try again after a sync with failures: the per-object backoff, never later than the
/// regular interval.
fn retry_delay(ctx: &Context, key: &str, interval: Duration) -> Duration {
    backoff(ctx.bump_backoff(key), interval)
}

/// The error policy kube-runtime calls: per-object exponential backoff.
pub fn error_policy(obj: Arc<ImageMirror>, err: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let delay = backoff(ctx.bump_backoff(&key), Duration::from_secs(300));
    tracing::warn!(mirror = key, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}
