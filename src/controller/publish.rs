//! The last step of a reconcile: status (server-side apply on the status subresource),
//! Events and metrics — for a finished sync, for every failure (through
//! [`outcome::failure`]), and for objects that cannot even be decoded.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource};

use super::Context;
use super::outcome::{self, ReconcileError, Retry, Shape};
use super::reconcile::{FIELD_MANAGER, Mirror, add, backoff, jittered, until};
use super::status::{self, condition};
use crate::api::condition_reasons as reasons;
use crate::api::condition_types as types;
use crate::api::{ImageMirror, ImageMirrorStatus, TagState};
use crate::mirror::{ItemOutcome, SyncReport};
use crate::transfer::{BlobOutcome, BlobProgress, BlobState, ProgressSink};

/// Writes `status` and remembers it as the mirror's current status.
pub(super) async fn write_status(
    m: &mut Mirror<'_>,
    status: ImageMirrorStatus,
) -> Result<(), ReconcileError> {
    write_status_only(m, &status).await?;
    m.prev = status;
    Ok(())
}

/// Writes `status` (server-side apply, forced: the controller owns status).
pub(super) async fn write_status_only(
    m: &Mirror<'_>,
    status: &ImageMirrorStatus,
) -> Result<(), ReconcileError> {
    let patch = serde_json::json!({
        "apiVersion": "imagemirror.dev/v1alpha1",
        "kind": "ImageMirror",
        "status": status,
    });
    m.api
        .patch_status(
            &m.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|source| ReconcileError::Status {
            name: format!("{}/{}", m.ns, m.name),
            source,
        })
}

/// Publishes an Event about `obj` (failures to publish are logged, never fatal).
pub(super) async fn event(
    ctx: &Context,
    obj: &ImageMirror,
    warning: bool,
    reason: &str,
    note: String,
) {
    publish_event(ctx, &obj.object_ref(&()), warning, reason, note).await
}

async fn publish_event(
    ctx: &Context,
    reference: &ObjectReference,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        // Events cap notes at 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action: "Sync".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, reference).await {
        tracing::warn!(error = %e, "publishing an Event failed");
    }
}

/// `spec.suspend`: Reconciling=False/Suspended, written once per generation.
pub(super) async fn suspended(m: &mut Mirror<'_>) -> Result<Action, ReconcileError> {
    let already = m.prev.observed_generation == m.generation
        && condition(&m.prev, types::RECONCILING).is_some_and(|c| c.reason == reasons::SUSPENDED);
    if !already {
        let mut s = m.prev.clone();
        s.observed_generation = m.generation;
        status::set_condition(
            &mut s.conditions,
            types::RECONCILING,
            "False",
            reasons::SUSPENDED,
            "spec.suspend is true",
            m.generation,
            Timestamp::now(),
        );
        write_status(m, s).await?;
    }
    Ok(Action::await_change())
}

/// A finished sync: schedule the next, Events for what changed, metrics, status.
pub(super) async fn synced(
    m: &mut Mirror<'_>,
    ctx: &Context,
    report: SyncReport,
    pruned: Option<super::prune::Pruned>,
) -> Result<Action, ReconcileError> {
    let now = Timestamp::now();
    let failed = report.failed();
    let next_in = if failed > 0 {
        backoff(ctx.states.bump_failures(&m.uid), m.interval)
    } else {
        ctx.states.reset_failures(&m.uid);
        jittered(m.interval)
    };
    let next_at = add(now, next_in);
    ctx.states.schedule(&m.uid, m.generation, next_at);
    let mut new = status::synced(&m.prev, m.generation, &report, now, next_at);
    super::prune::fold(&mut new, pruned.as_ref());
    // Events only for what changed, so a steady mirror does not fill the event log.
    for item in &report.items {
        if let Err(e) = &item.result {
            let was = m.prev.tags.iter().find(|t| t.name == item.item.name());
            let same = was.is_some_and(|t| {
                t.state == TagState::Failed && t.reason.as_deref() == Some(e.reason())
            });
            if !same {
                let note = format!("{}: {} ({})", item.item.name(), e, e.reason());
                event(ctx, m.obj, true, "TagFailed", note).await;
            }
        }
    }
    let copied = report
        .items
        .iter()
        .filter(|i| matches!(i.result, Ok(ItemOutcome::Copied)))
        .count();
    if copied > 0 {
        let note = format!(
            "synced {copied} of {} tags, {} bytes copied",
            report.items.len(),
            report.progress.bytes_done
        );
        event(ctx, m.obj, false, reasons::SYNCED, note).await;
    }
    let total = i64::try_from(report.items.len()).unwrap_or(i64::MAX);
    let failed = i64::try_from(failed).unwrap_or(i64::MAX);
    ctx.metrics
        .set_mirror_tags(&m.uid, &m.ns, &m.name, total - failed, failed);
    write_status(m, new).await?;
    Ok(Action::requeue(until(now, next_at)))
}

/// Every early end of a reconcile, in one place: the conditions [`outcome::failure`] maps it
/// to, written when they differ from the current status, a Warning Event when the reason
/// changed, and the requeue. Only a failed status write (or a cancelled sync) is returned
/// as an error.
pub(super) async fn failure(
    m: &mut Mirror<'_>,
    ctx: &Context,
    err: ReconcileError,
) -> Result<Action, ReconcileError> {
    let Some(f) = outcome::failure(&err, m.interval) else {
        return match err {
            // The next reconcile (the new spec, or nothing for a deleted object) is queued.
            ReconcileError::Cancelled => Ok(Action::requeue(std::time::Duration::from_millis(100))),
            other => Err(other),
        };
    };
    tracing::info!(mirror = %format!("{}/{}", m.ns, m.name), reason = f.reason, error = %err, "reconcile did not complete");
    let now = Timestamp::now();
    let delay = match f.retry {
        Retry::OnChange => None,
        Retry::After(d) => Some(d),
        Retry::Backoff(cap) => Some(backoff(ctx.states.bump_failures(&m.uid), cap)),
    };
    let next_at = delay.map(|d| add(now, d));
    if let Some(at) = next_at {
        ctx.states.schedule(&m.uid, m.generation, at);
    }
    let g = m.generation;
    let new = match f.shape {
        Shape::Stalled => status::stalled(&m.prev, g, f.reason, &f.message, now),
        Shape::Retrying => status::retrying(
            &m.prev,
            g,
            f.reason,
            &f.message,
            now,
            next_at.unwrap_or(now),
        ),
        Shape::SyncFailed => status::failed(
            &m.prev,
            g,
            f.reason,
            &f.message,
            now,
            next_at.unwrap_or(now),
        ),
    };
    let was = condition(&m.prev, types::READY).map(|c| (c.reason.clone(), c.observed_generation));
    let reason_changed = was != Some((f.reason.to_string(), g));
    if new != m.prev {
        write_status(m, new).await?;
    }
    if reason_changed {
        event(ctx, m.obj, true, f.reason, f.message).await;
    }
    Ok(delay
        .map(Action::requeue)
        .unwrap_or_else(Action::await_change))
}

/// An object that cannot be decoded into an ImageMirror (a value the types cannot hold,
/// admitted by an older CRD): Stalled/InvalidSpec by a raw merge patch of the status, once
/// per generation, and a Warning Event. Every other object keeps syncing.
pub(super) async fn undecodable(
    ctx: &Context,
    invalid: &InvalidObject,
) -> Result<Action, ReconcileError> {
    let meta = &invalid.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let Some(ns) = meta.namespace.clone() else {
        return Err(ReconcileError::NoNamespace(name));
    };
    let uid = meta.uid.clone().unwrap_or_else(|| format!("{ns}/{name}"));
    if !ctx.states.report_invalid(&uid, meta.generation) {
        return Ok(Action::await_change());
    }
    let message = format!("spec cannot be read: {}", invalid.error);
    let s = status::stalled(
        &ImageMirrorStatus::default(),
        meta.generation,
        reasons::INVALID_SPEC,
        &message,
        Timestamp::now(),
    );
    let patch = serde_json::json!({"status": {
        "observedGeneration": meta.generation,
        "conditions": s.conditions,
    }});
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &ns,
        &ApiResource::erase::<ImageMirror>(&()),
    );
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    if let Err(source) = api
        .patch_status(&name, &params, &Patch::Merge(&patch))
        .await
    {
        ctx.states.clear_invalid(&uid);
        return Err(ReconcileError::Status {
            name: format!("{ns}/{name}"),
            source,
        });
    }
    tracing::warn!(mirror = %format!("{ns}/{name}"), error = %invalid.error, "ImageMirror cannot be decoded");
    let reference = ObjectReference {
        api_version: Some(ImageMirror::api_version(&()).into()),
        kind: Some(ImageMirror::kind(&()).into()),
        name: Some(name),
        namespace: Some(ns),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    };
    publish_event(ctx, &reference, true, reasons::INVALID_SPEC, message).await;
    Ok(Action::await_change())
}

/// Forwards blob outcomes to the metrics.
pub(super) fn metrics_sink(ctx: &Context) -> ProgressSink {
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
