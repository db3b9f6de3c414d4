//! Pruning in the controller (`spec.prune`). The record of what an ImageMirror wrote lives in
//! its own annotation [`RECORD_ANNOTATION`]: it survives restarts, is not limited by the 100
//! status entries, goes away with the object (which deletes no image), and needs no other
//! resource. It is bounded to [`crate::mirror::prune::RECORD_MAX_BYTES`] (64 KiB, about 700
//! tags); tags copied beyond that are not recorded and never pruned. Status and Events say
//! what was pruned.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::Context;
use super::publish;
use super::reconcile::Mirror;
use super::status::MAX_TAG_ENTRIES;
use crate::api::condition_types as types;
use crate::api::{ImageMirror, ImageMirrorStatus, PruneStatus, TagState, TagStatus};
use crate::mirror::{self, Endpoint, PruneRecord, PruneReport, SyncReport};

/// The annotation holding the record (JSON: the destination repository and tag → digest).
pub const RECORD_ANNOTATION: &str = "imagemirror.dev/prune-record";
/// Event reason naming the tags a sync deleted.
pub const EVENT_PRUNED: &str = "Pruned";
/// Event reason for tags that could not be pruned (the registry refuses deletes, ...).
pub const EVENT_PRUNE_WARNING: &str = "PruneWarning";

/// What pruning after one sync did, for status.
pub struct Pruned {
    report: PruneReport,
    recorded: usize,
    notes: Vec<String>,
}

/// After a sync that did not fail as a whole, when `spec.prune`: records what it wrote,
/// prunes what is no longer selected, writes the record back when it changed, and publishes
/// the Events; `None` when pruning is off. Never fails the sync: trouble becomes the status
/// message.
pub(super) async fn run(
    ctx: &Context,
    m: &Mirror<'_>,
    source: &Endpoint,
    destination: &Endpoint,
    report: &SyncReport,
) -> Option<Pruned> {
    let obj = m.obj;
    if !obj.spec.prune {
        return None;
    }
    // The object we were handed may predate our own last annotation write.
    let fresh = match m.api.get(&m.name).await {
        Ok(o) => o,
        Err(e) => {
            return Some(Pruned {
                report: PruneReport::default(),
                recorded: 0,
                notes: vec![format!("not pruned: reading the record failed: {e}")],
            });
        }
    };
    let mut notes = Vec::new();
    let mut record = match fresh.annotations().get(RECORD_ANNOTATION) {
        None => PruneRecord::default(),
        Some(text) => PruneRecord::from_json(text).unwrap_or_else(|e| {
            // Starting over forgets tags, which is the safe direction.
            notes.push(format!("{e}; it starts over"));
            PruneRecord::default()
        }),
    };
    let before = record.clone();
    let report = mirror::prune_after_sync(
        &ctx.engine,
        &obj.spec,
        source,
        destination,
        &mut record,
        report,
        false,
    )
    .await;
    if record != before
        && let Err(e) = write_record(&m.api, &m.name, &record).await
    {
        tracing::warn!(mirror = %m.uid, error = %e, "writing the prune record failed");
        notes.push(format!("writing the record failed: {e}"));
    }
    let pruned = Pruned {
        report,
        recorded: record.tags.len(),
        notes,
    };
    let out = &pruned.report.outcome;
    if !out.pruned.is_empty() {
        let mut note = format!(
            "pruned {} tag(s) from {}: {}",
            out.pruned.len(),
            destination.repo,
            out.pruned.join(", ")
        );
        if !out.referrers_pruned.is_empty() {
            note.push_str(&format!(
                "; and {} of their referrers",
                out.referrers_pruned.len()
            ));
        }
        publish::event(ctx, obj, false, EVENT_PRUNED, note).await;
    }
    let message = pruned.message();
    let previous = m.prev.prune.as_ref().and_then(|p| p.message.clone());
    let troubled = out.warning.is_some() || !out.retained.is_empty();
    if (troubled || !out.referrers_kept.is_empty()) && message != previous {
        let note = message.unwrap_or_default();
        publish::event(ctx, obj, true, EVENT_PRUNE_WARNING, note).await;
    }
    Some(pruned)
}

impl Pruned {
    fn message(&self) -> Option<String> {
        let mut message: Vec<String> = self.report.message().into_iter().collect();
        message.extend(self.notes.iter().cloned());
        (!message.is_empty()).then(|| message.join("; "))
    }
}

/// Folds pruning into the status of a finished sync; `None` (pruning off) clears
/// `status.prune`.
pub fn fold(status: &mut ImageMirrorStatus, pruned: Option<&Pruned>) {
    match pruned {
        None => status.prune = None,
        Some(p) => apply(status, &p.report, p.recorded, &p.notes),
    }
}

async fn write_record(
    api: &Api<ImageMirror>,
    name: &str,
    record: &PruneRecord,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { RECORD_ANNOTATION: record.to_json() } }
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Folds a prune report into status: `status.prune`, tag entries for pruned and kept tags
/// (after the failures, while the 100 entries last), and a warning on the Ready condition when
/// the registry refused or tags had to be kept. Pure.
pub fn apply(
    status: &mut ImageMirrorStatus,
    report: &PruneReport,
    recorded: usize,
    notes: &[String],
) {
    let out = &report.outcome;
    let mut message: Vec<String> = report.message().into_iter().collect();
    message.extend(notes.iter().cloned());
    let message = (!message.is_empty()).then(|| message.join("; "));
    status.prune = Some(PruneStatus {
        pruned: out.pruned.len() as u32,
        retained: out.retained.len() as u32,
        recorded: recorded.min(u32::MAX as usize) as u32,
        message: message.clone(),
    });
    let mut entries: Vec<TagStatus> = out
        .retained
        .iter()
        .map(|r| TagStatus {
            name: r.tag.clone(),
            source_digest: None,
            destination_digest: None,
            state: TagState::Retained,
            reason: Some(r.reason.reason().to_string()),
            message: Some(r.message.clone()),
            referrers: None,
        })
        .chain(out.pruned.iter().map(|t| TagStatus {
            name: t.clone(),
            source_digest: None,
            destination_digest: None,
            state: TagState::Pruned,
            reason: None,
            message: None,
            referrers: None,
        }))
        .filter(|e| !status.tags.iter().any(|t| t.name == e.name))
        .collect();
    let failures = status
        .tags
        .iter()
        .take_while(|t| t.state == TagState::Failed)
        .count();
    let rest = status.tags.split_off(failures);
    status.tags.append(&mut entries);
    status.tags.extend(rest);
    status.tags.truncate(MAX_TAG_ENTRIES);
    let warn = out.warning.is_some() || !out.retained.is_empty();
    if let (true, Some(m)) = (warn, message)
        && let Some(ready) = status
            .conditions
            .iter_mut()
            .find(|c: &&mut Condition| c.type_ == types::READY)
    {
        // The sync succeeded; the warning rides on its message, Ready's status stays.
        ready.message = format!("{}; warning: {m}", ready.message)
            .chars()
            .take(4096)
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::{PruneOutcome, RetainReason, Retained};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn entry(name: &str, state: TagState) -> TagStatus {
        TagStatus {
            name: name.into(),
            source_digest: None,
            destination_digest: None,
            state,
            reason: None,
            message: None,
            referrers: None,
        }
    }

    fn ready(message: &str) -> Condition {
        Condition {
            type_: types::READY.into(),
            status: "True".into(),
            reason: "Synced".into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn pruned_and_kept_tags_go_after_failures_within_the_bound() {
        let mut s = ImageMirrorStatus {
            conditions: vec![ready("3/3 tags synced")],
            tags: std::iter::once(entry("bad", TagState::Failed))
                .chain((0..99).map(|i| entry(&format!("t{i}"), TagState::Synced)))
                .collect(),
            ..Default::default()
        };
        let report = PruneReport {
            outcome: PruneOutcome {
                pruned: vec!["1.2".into(), "1.3".into()],
                retained: vec![Retained {
                    tag: "1.0".into(),
                    reason: RetainReason::DigestShared,
                    message: "tag 1.0.0 uses the same digest".into(),
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        apply(&mut s, &report, 7, &[]);
        let p = s.prune.as_ref().unwrap();
        assert_eq!((p.pruned, p.retained, p.recorded), (2, 1, 7));
        assert!(p.message.as_deref().unwrap().contains("DigestShared"));
        assert_eq!(s.tags.len(), MAX_TAG_ENTRIES);
        let names: Vec<&str> = s.tags.iter().take(4).map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["bad", "1.0", "1.2", "1.3"]);
        assert_eq!(s.tags[1].state, TagState::Retained);
        assert_eq!(s.tags[1].reason.as_deref(), Some("DigestShared"));
        assert_eq!(s.tags[2].state, TagState::Pruned);
        let ready = &s.conditions[0];
        assert_eq!(ready.status, "True");
        assert!(
            ready.message.starts_with("3/3 tags synced; warning: "),
            "{}",
            ready.message
        );
    }

    #[test]
    fn a_clean_prune_leaves_ready_alone() {
        let mut s = ImageMirrorStatus {
            conditions: vec![ready("2/2 tags synced")],
            ..Default::default()
        };
        let report = PruneReport {
            outcome: PruneOutcome {
                pruned: vec!["old".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        apply(&mut s, &report, 2, &[]);
        assert_eq!(s.conditions[0].message, "2/2 tags synced");
        assert_eq!(s.prune.as_ref().unwrap().message, None);
        assert_eq!(s.tags[0].state, TagState::Pruned);
    }

    #[test]
    fn a_refusing_registry_is_a_warning_on_a_ready_mirror() {
        let mut s = ImageMirrorStatus {
            conditions: vec![ready("1/1 tags synced")],
            ..Default::default()
        };
        let report = PruneReport {
            outcome: PruneOutcome {
                retained: vec![Retained {
                    tag: "b".into(),
                    reason: RetainReason::DeleteRefused,
                    message: "HTTP 405".into(),
                }],
                warning: Some("1 tag(s) not pruned: r/app refuses deletes: HTTP 405".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        apply(&mut s, &report, 2, &[]);
        assert_eq!(s.conditions[0].status, "True");
        assert!(s.conditions[0].message.contains("refuses deletes"));
    }
}
