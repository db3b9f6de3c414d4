//! Pruning decisions: which destination tags this mirror wrote and no longer selects, and
//! which of them may go. Pure: the record, the sync report and the destination's answers in,
//! decisions out; unit-tested. The IO is in `prune_run.rs`.
//!
//! Safety rules, in the order they apply:
//! - Only tags in the record (tags this mirror copied, with the digest it wrote) are ever
//!   candidates; a tag someone else pushed, or that was already there, never is.
//! - A sync with any failed item, or one selecting no tag, prunes nothing (an empty selection
//!   is far more likely a broken source than an intent). A sync that failed as a whole (the
//!   source's tag list unreadable) produces no report and never reaches here.
//! - A candidate whose destination tag now points at another digest is no longer ours: kept,
//!   and forgotten.
//! - Deleting by digest (registries that refuse tag deletes) only when no other tag of the
//!   destination repository, no index such a tag points at, no pinned digest and no selected
//!   item uses that digest.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::plan::Item;
use super::{ItemOutcome, SyncReport};
use crate::registry::reference::{is_valid_digest, is_valid_tag};

/// The record is kept at most this large, serialised (JSON). About 700 tags of typical
/// length; tags written beyond it are not recorded and therefore never pruned.
pub const RECORD_MAX_BYTES: usize = 64 * 1024;

/// What one mirror wrote to its destination: the tags it copied and the digest each got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneRecord {
    /// The destination repository the tags were written to, as `host/path`. A record for
    /// another repository than the spec's current destination is discarded, never pruned.
    pub destination: String,
    /// Tag → the digest this mirror wrote under it.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Why a record does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Over twice the bound: not ours, or corrupted.
    #[error("the prune record is {0} bytes, over the {RECORD_MAX_BYTES} byte bound")]
    TooLarge(usize),
    /// Not the JSON we write.
    #[error("the prune record is not valid: {0}")]
    Invalid(String),
}

impl PruneRecord {
    /// An empty record for `destination`.
    pub fn new(destination: &str) -> Self {
        PruneRecord {
            destination: destination.to_string(),
            tags: BTreeMap::new(),
        }
    }

    /// Parses a record written by [`PruneRecord::to_json`]. Entries that are not a valid tag
    /// and digest are dropped (they could only be deleted wrongly).
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        if text.len() > 2 * RECORD_MAX_BYTES {
            return Err(RecordError::TooLarge(text.len()));
        }
        let mut r: PruneRecord =
            serde_json::from_str(text).map_err(|e| RecordError::Invalid(e.to_string()))?;
        r.tags.retain(|t, d| is_valid_tag(t) && is_valid_digest(d));
        Ok(r)
    }

    /// Compact JSON, at most [`RECORD_MAX_BYTES`] when built by [`PruneRecord::record`].
    pub fn to_json(&self) -> String {
        // A map of strings always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Adds what `report` wrote to `destination`: every tag it copied, and the current digest
    /// of recorded tags it found up to date. A record for another destination is replaced by
    /// an empty one first. Returns how many copied tags did not fit the bound (they will not be
    /// pruned).
    pub fn record(&mut self, destination: &str, report: &SyncReport) -> usize {
        if self.destination != destination {
            *self = PruneRecord::new(destination);
        }
        let mut size = self.to_json().len();
        let mut overflow = 0;
        for item in &report.items {
            let (Item::Tag(tag), Ok(outcome), Some(digest)) =
                (&item.item, &item.result, &item.destination_digest)
            else {
                continue;
            };
            if !is_valid_digest(digest) {
                continue;
            }
            match (self.tags.get_mut(tag), outcome) {
                (Some(d), _) => {
                    // Same length: a sha256 digest replaces a sha256 digest.
                    *d = digest.clone();
                }
                (None, ItemOutcome::Copied) => {
                    // `"tag":"digest",`
                    let entry = tag.len() + digest.len() + 6;
                    if size + entry > RECORD_MAX_BYTES {
                        overflow += 1;
                        continue;
                    }
                    size += entry;
                    self.tags.insert(tag.clone(), digest.clone());
                }
                (None, ItemOutcome::UpToDate) => {}
            }
        }
        overflow
    }

    /// Drops `tags` from the record.
    pub fn forget<'a>(&mut self, tags: impl IntoIterator<Item = &'a String>) {
        for t in tags {
            self.tags.remove(t);
        }
    }
}

/// A destination tag to delete, with the digest this mirror wrote under it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    /// The tag.
    pub tag: String,
    /// The digest recorded for it.
    pub digest: String,
}

/// Why a sync prunes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// This many items failed: a partial sync never prunes.
    Failed(usize),
    /// The selection is empty: more likely a broken source than an intent.
    NothingSelected,
}

impl Skip {
    /// For status and the CLI.
    pub fn message(&self) -> String {
        match self {
            Skip::Failed(n) => format!("not pruned: {n} item(s) failed in this sync"),
            Skip::NothingSelected => "not pruned: the selection is empty".into(),
        }
    }
}

/// What to prune after one sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Recorded tags the selection no longer selects, by tag.
    pub candidates: Vec<Candidate>,
    /// Set when nothing may be pruned this time; `candidates` is then empty.
    pub skipped: Option<Skip>,
}

/// The tags of `record` that `report`'s selection no longer selects, unless the sync was
/// partial or selected nothing.
pub fn decide(record: &PruneRecord, report: &SyncReport) -> Decision {
    let selected: BTreeSet<&str> = report
        .items
        .iter()
        .filter_map(|i| match &i.item {
            Item::Tag(t) => Some(t.as_str()),
            Item::Digest(_) => None,
        })
        .collect();
    let skipped = match report.failed() {
        0 if selected.is_empty() => Some(Skip::NothingSelected),
        0 => None,
        n => Some(Skip::Failed(n)),
    };
    let candidates = if skipped.is_some() {
        Vec::new()
    } else {
        record
            .tags
            .iter()
            .filter(|(t, _)| !selected.contains(t.as_str()))
            .map(|(tag, digest)| Candidate {
                tag: tag.clone(),
                digest: digest.clone(),
            })
            .collect()
    };
    Decision {
        candidates,
        skipped,
    }
}

/// Digests the report's items point at (source and destination): a digest a selected item
/// uses is never deleted.
pub fn selected_digests(report: &SyncReport) -> BTreeSet<String> {
    report
        .items
        .iter()
        .flat_map(|i| [&i.source_digest, &i.destination_digest])
        .flatten()
        .cloned()
        .collect()
}

/// Why a candidate was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetainReason {
    /// Another tag (or an index, a pinned digest, a selected item) uses the digest, and the
    /// registry deletes only by digest.
    DigestShared,
    /// The tag now points at other content than this mirror wrote: no longer ours.
    ChangedElsewhere,
    /// The registry refuses deletes (405 / UNSUPPORTED) or the credentials may not delete.
    DeleteRefused,
    /// The destination could not be asked (the tag, the other tags or their indexes).
    CheckFailed,
    /// The destination has more tags than are checked before a digest delete.
    TooManyTags,
    /// The DELETE itself failed.
    DeleteFailed,
}

impl RetainReason {
    /// A short CamelCase reason for status entries.
    pub fn reason(&self) -> &'static str {
        match self {
            RetainReason::DigestShared => "DigestShared",
            RetainReason::ChangedElsewhere => "ChangedElsewhere",
            RetainReason::DeleteRefused => "DeleteRefused",
            RetainReason::CheckFailed => "CheckFailed",
            RetainReason::TooManyTags => "TooManyTags",
            RetainReason::DeleteFailed => "DeleteFailed",
        }
    }

    /// Whether the tag leaves the record: only when it is no longer ours.
    pub fn forgets(&self) -> bool {
        matches!(self, RetainReason::ChangedElsewhere)
    }
}

/// A candidate that was kept, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retained {
    /// The tag.
    pub tag: String,
    /// Why.
    pub reason: RetainReason,
    /// A readable explanation.
    pub message: String,
}

/// The digest deletes that are safe, given `live` candidates (their tag still points at the
/// recorded digest) and `users`: digest → a tag, index or item outside the candidates that
/// uses it. Candidates sharing one digest go together with one delete.
pub fn by_digest(
    live: &[Candidate],
    users: &HashMap<String, String>,
) -> (BTreeMap<String, Vec<String>>, Vec<Retained>) {
    let mut deletes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut kept = Vec::new();
    for c in live {
        match users.get(&c.digest) {
            Some(user) => kept.push(Retained {
                tag: c.tag.clone(),
                reason: RetainReason::DigestShared,
                message: format!(
                    "{user} uses the same digest {}, and the registry deletes only by digest",
                    c.digest
                ),
            }),
            None => deletes
                .entry(c.digest.clone())
                .or_default()
                .push(c.tag.clone()),
        }
    }
    (deletes, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::{ItemResult, MirrorError};
    use crate::registry::RegistryError;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn ok(tag: &str, outcome: ItemOutcome, digest: &str) -> ItemResult {
        ItemResult {
            item: Item::Tag(tag.into()),
            source_digest: Some(digest.into()),
            destination_digest: Some(digest.into()),
            result: Ok(outcome),
            referrers: None,
        }
    }

    fn failed(tag: &str) -> ItemResult {
        ItemResult {
            item: Item::Tag(tag.into()),
            source_digest: None,
            destination_digest: None,
            result: Err(MirrorError::Registry(RegistryError::NotFound {
                what: tag.into(),
            })),
            referrers: None,
        }
    }

    fn report(items: Vec<ItemResult>) -> SyncReport {
        SyncReport {
            items,
            progress: Default::default(),
        }
    }

    fn tags(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.tag.as_str()).collect()
    }

    #[test]
    fn latest_two_moving_on_prunes_the_two_it_wrote_before() {
        let mut rec = PruneRecord::default();
        let first = report(vec![
            ok("1.2", ItemOutcome::Copied, &d(2)),
            ok("1.3", ItemOutcome::Copied, &d(3)),
        ]);
        assert_eq!(rec.record("r/app", &first), 0);
        assert!(decide(&rec, &first).candidates.is_empty());
        let next = report(vec![
            ok("1.4", ItemOutcome::Copied, &d(4)),
            ok("1.5", ItemOutcome::Copied, &d(5)),
        ]);
        rec.record("r/app", &next);
        let decision = decide(&rec, &next);
        assert_eq!(decision.skipped, None);
        assert_eq!(tags(&decision.candidates), ["1.2", "1.3"]);
        assert_eq!(decision.candidates[0].digest, d(2));
        assert_eq!(rec.tags.len(), 4);
    }

    #[test]
    fn only_what_this_mirror_copied_is_recorded() {
        let mut rec = PruneRecord::default();
        // "theirs" was already there with the right content: never ours, never pruned.
        let r = report(vec![
            ok("mine", ItemOutcome::Copied, &d(1)),
            ok("theirs", ItemOutcome::UpToDate, &d(2)),
        ]);
        rec.record("r/app", &r);
        assert_eq!(rec.tags.keys().collect::<Vec<_>>(), ["mine"]);
        let next = report(vec![ok("other", ItemOutcome::Copied, &d(3))]);
        rec.record("r/app", &next);
        assert_eq!(tags(&decide(&rec, &next).candidates), ["mine"]);
    }

    #[test]
    fn up_to_date_recorded_tags_follow_the_destination_digest() {
        let mut rec = PruneRecord::default();
        rec.record("r/app", &report(vec![ok("a", ItemOutcome::Copied, &d(1))]));
        rec.record(
            "r/app",
            &report(vec![ok("a", ItemOutcome::UpToDate, &d(9))]),
        );
        assert_eq!(rec.tags["a"], d(9));
    }

    #[test]
    fn a_partial_sync_prunes_nothing_but_still_records() {
        let mut rec = PruneRecord::default();
        rec.record(
            "r/app",
            &report(vec![ok("old", ItemOutcome::Copied, &d(1))]),
        );
        let r = report(vec![ok("new", ItemOutcome::Copied, &d(2)), failed("bad")]);
        rec.record("r/app", &r);
        let decision = decide(&rec, &r);
        assert_eq!(decision.skipped, Some(Skip::Failed(1)));
        assert!(decision.candidates.is_empty());
        assert!(rec.tags.contains_key("new"));
    }

    #[test]
    fn an_empty_selection_prunes_nothing() {
        let mut rec = PruneRecord::default();
        rec.record("r/app", &report(vec![ok("a", ItemOutcome::Copied, &d(1))]));
        let decision = decide(&rec, &report(vec![]));
        assert_eq!(decision.skipped, Some(Skip::NothingSelected));
        assert!(decision.candidates.is_empty());
        // Pinned digests alone do not count as selecting tags.
        let pinned = report(vec![ItemResult {
            item: Item::Digest(d(5)),
            ..ok("x", ItemOutcome::UpToDate, &d(5))
        }]);
        assert_eq!(decide(&rec, &pinned).skipped, Some(Skip::NothingSelected));
    }

    #[test]
    fn another_destination_discards_the_record() {
        let mut rec = PruneRecord::default();
        rec.record("r/old", &report(vec![ok("a", ItemOutcome::Copied, &d(1))]));
        let r = report(vec![ok("b", ItemOutcome::Copied, &d(2))]);
        rec.record("r/new", &r);
        assert_eq!(rec.destination, "r/new");
        assert!(decide(&rec, &r).candidates.is_empty());
    }

    #[test]
    fn the_record_is_bounded_and_round_trips() {
        let mut rec = PruneRecord::default();
        let items: Vec<ItemResult> = (0..2000)
            .map(|i| {
                ok(
                    &format!("tag-{i:05}"),
                    ItemOutcome::Copied,
                    &d((i % 250) as u8),
                )
            })
            .collect();
        let overflow = rec.record("r/app", &report(items));
        assert!(overflow > 0, "2000 tags cannot fit 64 KiB");
        let json = rec.to_json();
        assert!(json.len() <= RECORD_MAX_BYTES, "{}", json.len());
        assert_eq!(rec.tags.len() + overflow, 2000);
        assert_eq!(PruneRecord::from_json(&json).unwrap(), rec);
        assert!(matches!(
            PruneRecord::from_json(&"x".repeat(3 * RECORD_MAX_BYTES)),
            Err(RecordError::TooLarge(_))
        ));
        assert!(matches!(
            PruneRecord::from_json("{"),
            Err(RecordError::Invalid(_))
        ));
        // Entries that could only be deleted wrongly are dropped on reading.
        let hostile = format!(
            r#"{{"destination":"r/app","tags":{{"ok":"{}","../x":"{}","y":"sha256:zz"}}}}"#,
            d(1),
            d(2)
        );
        let parsed = PruneRecord::from_json(&hostile).unwrap();
        assert_eq!(parsed.tags.keys().collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn digest_deletes_only_for_digests_nobody_else_uses() {
        let live = vec![
            Candidate {
                tag: "1.0".into(),
                digest: d(1),
            },
            Candidate {
                tag: "1.0.0".into(),
                digest: d(1),
            },
            Candidate {
                tag: "old".into(),
                digest: d(2),
            },
        ];
        let users = HashMap::from([(d(2), "tag stable".to_string())]);
        let (deletes, kept) = by_digest(&live, &users);
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[&d(1)], ["1.0", "1.0.0"]);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].tag, "old");
        assert_eq!(kept[0].reason, RetainReason::DigestShared);
        assert!(
            kept[0].message.contains("tag stable"),
            "{}",
            kept[0].message
        );
    }

    #[test]
    fn selected_digests_cover_both_sides() {
        let mut item = ok("a", ItemOutcome::Copied, &d(1));
        item.destination_digest = Some(d(2));
        let s = selected_digests(&report(vec![item, failed("b")]));
        assert_eq!(s, BTreeSet::from([d(1), d(2)]));
    }
}
