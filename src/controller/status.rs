//! Building status: pure functions from the previous status and a sync's outcome to the next
//! status. Unit-tested; no IO.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::api::condition_reasons as reasons;
use crate::api::condition_types as types;
use crate::api::{ImageMirrorStatus, Progress, Summary, TagState, TagStatus};
use crate::mirror::{ItemOutcome, SyncReport};

/// At most this many entries in `status.tags`: status is not a database.
pub const MAX_TAG_ENTRIES: usize = 100;

/// Sets (or adds) a condition, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let transition = conditions
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    let new = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        // The API caps messages at 32 KiB; ours stay far below, but never send more.
        message: message.chars().take(4096).collect(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => *c = new,
        None => conditions.push(new),
    }
    conditions.sort_by_key(|c| condition_order(&c.type_));
}

fn condition_order(type_: &str) -> usize {
    [types::READY, types::RECONCILING, types::STALLED]
        .iter()
        .position(|t| *t == type_)
        .unwrap_or(usize::MAX)
}

/// Stalled=False: nothing keeps the mirror from progressing.
fn clear_stalled(conditions: &mut Vec<Condition>, generation: Option<i64>, now: Timestamp) {
    set_condition(
        conditions,
        types::STALLED,
        "False",
        reasons::NONE,
        "",
        generation,
        now,
    );
}

/// The value of a condition, if present.
pub fn condition<'a>(status: &'a ImageMirrorStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// First visit of a generation: conditions written even before anything is known.
pub fn progressing(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    now: Timestamp,
) -> ImageMirrorStatus {
    let mut s = prev.clone();
    s.observed_generation = generation;
    let ready_known = condition(prev, types::READY).is_some();
    if !ready_known {
        set_condition(
            &mut s.conditions,
            types::READY,
            "Unknown",
            reasons::PROGRESSING,
            "first sync pending",
            generation,
            now,
        );
    }
    set_condition(
        &mut s.conditions,
        types::RECONCILING,
        "True",
        reasons::PROGRESSING,
        "syncing",
        generation,
        now,
    );
    clear_stalled(&mut s.conditions, generation, now);
    s
}

/// The mirror cannot progress until something changes (missing Secret, invalid spec, refused
/// credentials): Ready=False, Stalled=True.
pub fn stalled(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> ImageMirrorStatus {
    let mut s = prev.clone();
    s.observed_generation = generation;
    let not_ready = NotReady {
        reason,
        message,
        reconciling: false,
        stalled: true,
    };
    not_ready.set(&mut s.conditions, generation, now);
    s
}

/// A transient failure that is being retried (an unreadable Secret, an internal error):
/// Ready=False and Reconciling=True with `reason`, Stalled=False, next attempt at `next`.
pub fn retrying(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: Timestamp,
    next: Timestamp,
) -> ImageMirrorStatus {
    let mut s = prev.clone();
    s.observed_generation = generation;
    s.next_sync_time = Some(Time(next));
    let not_ready = NotReady {
        reason,
        message,
        reconciling: true,
        stalled: false,
    };
    not_ready.set(&mut s.conditions, generation, now);
    s
}

/// A sync in progress: Reconciling=True with the current counts.
pub fn syncing(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    progress: Progress,
    now: Timestamp,
) -> ImageMirrorStatus {
    let mut s = prev.clone();
    s.observed_generation = generation;
    set_condition(
        &mut s.conditions,
        types::RECONCILING,
        "True",
        reasons::SYNCING,
        "copying",
        generation,
        now,
    );
    s.progress = Some(progress);
    s
}

/// The status after a finished sync.
pub fn synced(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    report: &SyncReport,
    now: Timestamp,
    next: Timestamp,
) -> ImageMirrorStatus {
    let mut s = prev.clone();
    s.observed_generation = generation;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let selected = count(report.items.len());
    let failed = count(report.failed());
    let synced = selected.saturating_sub(failed);
    s.summary = Some(Summary {
        tags_selected: selected,
        tags_synced: synced,
        tags_failed: failed,
        ratio: format!("{synced}/{selected}"),
    });
    s.tags = tag_entries(report);
    s.progress = Some(report.progress.clone());
    s.last_sync_time = Some(Time(now));
    s.next_sync_time = Some(Time(next));

    let failure_reasons: BTreeMap<&str, usize> = report
        .items
        .iter()
        .filter_map(|i| i.result.as_ref().err())
        .fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e.reason()).or_default() += 1;
            m
        });
    if failed == 0 {
        let msg = format!("{synced}/{selected} tags synced");
        set_condition(
            &mut s.conditions,
            types::READY,
            "True",
            reasons::SYNCED,
            &msg,
            generation,
            now,
        );
        set_condition(
            &mut s.conditions,
            types::RECONCILING,
            "False",
            reasons::SYNCED,
            "",
            generation,
            now,
        );
        clear_stalled(&mut s.conditions, generation, now);
        return s;
    }
    let first = report
        .items
        .iter()
        .find_map(|i| i.result.as_ref().err().map(|e| (i, e)));
    let detail = first
        .map(|(i, e)| format!("; {}: {e}", i.item.name()))
        .unwrap_or_default();
    let msg = format!("{synced}/{selected} tags synced, {failed} failed{detail}");
    // One reason for all failures is a better condition reason than "partially".
    let reason = if failure_reasons.len() == 1 && synced == 0 {
        failure_reasons
            .keys()
            .next()
            .copied()
            .unwrap_or(reasons::PARTIALLY_SYNCED)
    } else {
        reasons::PARTIALLY_SYNCED
    };
    set_not_ready(&mut s, generation, reason, &msg, now);
    s
}

/// A sync that failed as a whole (the tag list could not be read): not Ready, times set.
pub fn failed(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: Timestamp,
    next: Timestamp,
) -> ImageMirrorStatus {
    let mut s = prev.clone();
    s.observed_generation = generation;
    s.last_sync_time = Some(Time(now));
    s.next_sync_time = Some(Time(next));
    set_not_ready(&mut s, generation, reason, message, now);
    s
}

/// Ready=False and Reconciling=False with `reason`; Stalled only for refused credentials,
/// which will be refused again until a Secret or the spec changes.
fn set_not_ready(
    s: &mut ImageMirrorStatus,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let not_ready = NotReady {
        reason,
        message,
        reconciling: false,
        stalled: reason == reasons::AUTH_FAILED,
    };
    not_ready.set(&mut s.conditions, generation, now);
}

/// The three conditions of a mirror that is not Ready, in one place.
struct NotReady<'a> {
    reason: &'a str,
    message: &'a str,
    /// Reconciling=True (still being retried; its message says why) or False.
    reconciling: bool,
    /// Stalled=True with `reason` and `message`, or Stalled=False.
    stalled: bool,
}

impl NotReady<'_> {
    fn set(&self, c: &mut Vec<Condition>, generation: Option<i64>, now: Timestamp) {
        let (reason, message) = (self.reason, self.message);
        set_condition(c, types::READY, "False", reason, message, generation, now);
        let (reconciling, note) = if self.reconciling {
            ("True", message)
        } else {
            ("False", "")
        };
        set_condition(
            c,
            types::RECONCILING,
            reconciling,
            reason,
            note,
            generation,
            now,
        );
        if self.stalled {
            set_condition(c, types::STALLED, "True", reason, message, generation, now);
        } else {
            clear_stalled(c, generation, now);
        }
    }
}

/// Per-tag entries: failures first, then by name; at most [`MAX_TAG_ENTRIES`].
fn tag_entries(report: &SyncReport) -> Vec<TagStatus> {
    let mut entries: Vec<TagStatus> = report
        .items
        .iter()
        .map(|i| {
            let (state, reason, message) = match &i.result {
                Ok(ItemOutcome::Copied) | Ok(ItemOutcome::UpToDate) => (
                    TagState::Synced,
                    None,
                    i.referrers.as_ref().and_then(|r| r.note.clone()),
                ),
                Err(e) => (
                    TagState::Failed,
                    Some(e.reason().to_string()),
                    Some(e.to_string()),
                ),
            };
            TagStatus {
                name: i.item.name().to_string(),
                source_digest: i.source_digest.clone(),
                destination_digest: i.destination_digest.clone(),
                state,
                reason,
                message,
                referrers: i.referrers.as_ref().map(|r| r.count),
            }
        })
        .collect();
    entries.sort_by(|a, b| {
        (a.state != TagState::Failed, &a.name).cmp(&(b.state != TagState::Failed, &b.name))
    });
    entries.truncate(MAX_TAG_ENTRIES);
    entries
}

/// Whether two statuses differ in anything but the sync times and progress counters, which
/// change on every resync.
pub fn meaningfully_differs(a: &ImageMirrorStatus, b: &ImageMirrorStatus) -> bool {
    let strip = |s: &ImageMirrorStatus| {
        let mut s = s.clone();
        s.last_sync_time = None;
        s.next_sync_time = None;
        s.progress = None;
        s
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::{Item, ItemResult, MirrorError};
    use crate::registry::RegistryError;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn item(name: &str, result: Result<ItemOutcome, MirrorError>) -> ItemResult {
        ItemResult {
            item: Item::Tag(name.into()),
            source_digest: Some(format!("sha256:{name}")),
            destination_digest: result.is_ok().then(|| format!("sha256:{name}")),
            result,
            referrers: None,
        }
    }

    fn report(items: Vec<ItemResult>) -> SyncReport {
        SyncReport {
            items,
            progress: Progress::default(),
        }
    }

    fn cond<'a>(s: &'a ImageMirrorStatus, t: &str) -> &'a Condition {
        condition(s, t).unwrap()
    }

    #[test]
    fn first_visit_writes_all_conditions_even_unknown() {
        let s = progressing(&ImageMirrorStatus::default(), Some(1), t(0));
        assert_eq!(cond(&s, "Ready").status, "Unknown");
        assert_eq!(cond(&s, "Reconciling").status, "True");
        assert_eq!(cond(&s, "Stalled").status, "False");
        assert_eq!(s.observed_generation, Some(1));
        let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Reconciling", "Stalled"]);
    }

    #[test]
    fn all_synced_is_ready_and_keeps_transition_times() {
        let ok = report(vec![
            item("a", Ok(ItemOutcome::Copied)),
            item("b", Ok(ItemOutcome::UpToDate)),
        ]);
        let s1 = synced(
            &progressing(&ImageMirrorStatus::default(), Some(1), t(0)),
            Some(1),
            &ok,
            t(10),
            t(3600),
        );
        assert_eq!(cond(&s1, "Ready").status, "True");
        assert_eq!(cond(&s1, "Ready").reason, "Synced");
        assert_eq!(cond(&s1, "Ready").message, "2/2 tags synced");
        assert_eq!(s1.summary.as_ref().unwrap().ratio, "2/2");
        let s2 = synced(&s1, Some(1), &ok, t(3610), t(7200));
        assert_eq!(cond(&s2, "Ready").last_transition_time, Time(t(10)));
        assert!(
            !meaningfully_differs(&s1, &s2),
            "an uneventful resync changes only times"
        );
        assert_ne!(s1.last_sync_time, s2.last_sync_time);
    }

    #[test]
    fn failures_come_first_with_reasons_and_auth_failure_stalls() {
        let nf = MirrorError::Registry(RegistryError::NotFound {
            what: "r:zz".into(),
        });
        let r = report(vec![
            item("a", Ok(ItemOutcome::Copied)),
            item("zz", Err(nf)),
        ]);
        let s = synced(&ImageMirrorStatus::default(), Some(2), &r, t(0), t(1));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "PartiallySynced");
        assert!(
            cond(&s, "Ready").message.contains("zz"),
            "{}",
            cond(&s, "Ready").message
        );
        assert_eq!(cond(&s, "Stalled").status, "False");
        assert_eq!(s.tags[0].name, "zz");
        assert_eq!(s.tags[0].state, TagState::Failed);
        assert_eq!(s.tags[0].reason.as_deref(), Some("NotFound"));

        let auth = || {
            MirrorError::Registry(RegistryError::AuthFailed {
                what: "r".into(),
                detail: "no".into(),
            })
        };
        let r = report(vec![item("a", Err(auth())), item("b", Err(auth()))]);
        let s = synced(&ImageMirrorStatus::default(), Some(2), &r, t(0), t(1));
        assert_eq!(cond(&s, "Ready").reason, "AuthFailed");
        assert_eq!(cond(&s, "Stalled").status, "True");
    }

    #[test]
    fn tag_list_is_bounded() {
        let items = (0..250)
            .map(|i| item(&format!("t{i:03}"), Ok(ItemOutcome::UpToDate)))
            .collect();
        let s = synced(
            &ImageMirrorStatus::default(),
            Some(1),
            &report(items),
            t(0),
            t(1),
        );
        assert_eq!(s.tags.len(), MAX_TAG_ENTRIES);
        assert_eq!(s.summary.unwrap().tags_selected, 250);
    }

    #[test]
    fn stalled_sets_reason_everywhere_it_matters() {
        let s = stalled(
            &ImageMirrorStatus::default(),
            Some(3),
            "SecretNotFound",
            "Secret hub-creds not found",
            t(0),
        );
        assert_eq!(cond(&s, "Stalled").status, "True");
        assert_eq!(cond(&s, "Ready").reason, "SecretNotFound");
        assert_eq!(cond(&s, "Reconciling").status, "False");
    }

    #[test]
    fn retrying_keeps_reconciling_true() {
        let s = retrying(
            &ImageMirrorStatus::default(),
            Some(2),
            "SecretUnavailable",
            "reading Secret a/b failed",
            t(0),
            t(5),
        );
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "SecretUnavailable");
        assert_eq!(cond(&s, "Reconciling").status, "True");
        assert_eq!(cond(&s, "Stalled").status, "False");
        assert_eq!(s.next_sync_time, Some(Time(t(5))));
    }
}
