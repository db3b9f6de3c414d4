//! Per-object state of the controller, keyed by the object's UID so that a re-created object
//! (same name, new UID) starts afresh, and dropped when the object goes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;

/// What the controller remembers about one ImageMirror between reconciles.
#[derive(Debug, Default)]
struct ObjectState {
    /// The generation `next_at` was computed for.
    generation: Option<i64>,
    /// When the next sync of `generation` is due.
    next_at: Option<Timestamp>,
    /// Consecutive failed attempts, for backoff.
    failures: u32,
    /// `name@resourceVersion` of the referenced Secrets when they were last read.
    secrets: Option<Vec<String>>,
    /// The sync running now: its generation and the switch that cancels it.
    running: Option<(Option<i64>, watch::Sender<bool>)>,
    /// The generation whose undecodable spec was already reported.
    invalid_reported: Option<Option<i64>>,
}

/// All per-object state, behind one lock (it is held for map operations only).
#[derive(Default)]
pub struct States {
    map: Mutex<HashMap<String, ObjectState>>,
}

/// Cancels a running sync when the spec changed or the object went; see [`States::start`].
pub type CancelRx = watch::Receiver<bool>;

impl States {
    fn with<R>(&self, uid: &str, f: impl FnOnce(&mut ObjectState) -> R) -> R {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(uid.to_string()).or_default())
    }

    /// When the next sync of `generation` is due, if this process scheduled one.
    pub fn scheduled(&self, uid: &str, generation: Option<i64>) -> Option<Timestamp> {
        self.with(uid, |s| s.next_at.filter(|_| s.generation == generation))
    }

    /// Schedules the next sync of `generation` at `at`.
    pub fn schedule(&self, uid: &str, generation: Option<i64>, at: Timestamp) {
        self.with(uid, |s| {
            s.generation = generation;
            s.next_at = Some(at);
        })
    }

    /// Counts a failed attempt; returns how many failed before it (0 for the first).
    pub fn bump_failures(&self, uid: &str) -> u32 {
        self.with(uid, |s| {
            s.failures = s.failures.saturating_add(1);
            s.failures - 1
        })
    }

    /// A success resets the backoff.
    pub fn reset_failures(&self, uid: &str) {
        self.with(uid, |s| s.failures = 0)
    }

    /// Secret versions recorded at the last read, if any.
    pub fn secrets(&self, uid: &str) -> Option<Vec<String>> {
        self.with(uid, |s| s.secrets.clone())
    }

    /// Records the Secret versions a sync reads.
    pub fn set_secrets(&self, uid: &str, versions: Vec<String>) {
        self.with(uid, |s| s.secrets = Some(versions))
    }

    /// Registers the sync of `generation` as running; the receiver turns true when it must stop.
    pub fn start(&self, uid: &str, generation: Option<i64>) -> CancelRx {
        let (tx, rx) = watch::channel(false);
        self.with(uid, |s| s.running = Some((generation, tx)));
        rx
    }

    /// The sync finished (or was cancelled).
    pub fn finish(&self, uid: &str) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(uid) {
            s.running = None;
        }
    }

    /// The object now has `generation`: a sync of another generation is cancelled (the
    /// transfers only it watched stop; shared ones go on) and the new spec is synced next.
    pub fn spec_seen(&self, uid: &str, generation: Option<i64>) {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, tx)) = m.get(uid).and_then(|s| s.running.as_ref())
            && *g != generation
        {
            let _ = tx.send(true);
        }
    }

    /// Whether the undecodable spec of `generation` still has to be reported; marks it reported.
    pub fn report_invalid(&self, uid: &str, generation: Option<i64>) -> bool {
        self.with(uid, |s| {
            let first = s.invalid_reported != Some(generation);
            s.invalid_reported = Some(generation);
            first
        })
    }

    /// Forgets the undecodable-spec mark (the report failed and must be retried).
    pub fn clear_invalid(&self, uid: &str) {
        self.with(uid, |s| s.invalid_reported = None)
    }

    /// The object is gone: cancel its sync and forget it. Returns whether it was known.
    pub fn forget(&self, uid: &str) -> bool {
        let removed = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        if let Some((_, tx)) = removed.as_ref().and_then(|s| s.running.as_ref()) {
            let _ = tx.send(true);
        }
        removed.is_some()
    }

    /// Forgets every object whose UID is not in `live` (after a relist: deletes that happened
    /// while the watch was down). Returns the UIDs forgotten.
    pub fn retain(&self, live: &HashSet<String>) -> Vec<String> {
        let gone: Vec<String> = {
            let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            m.keys().filter(|k| !live.contains(*k)).cloned().collect()
        };
        for uid in &gone {
            self.forget(uid);
        }
        gone
    }

    /// How many objects are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_cancels_the_running_sync_and_forget_drops_everything() {
        let s = States::default();
        let rx = s.start("u1", Some(1));
        s.spec_seen("u1", Some(1));
        assert!(!*rx.borrow(), "the same generation does not cancel");
        s.spec_seen("u1", Some(2));
        assert!(*rx.borrow(), "a new generation cancels");
        let rx2 = s.start("u2", Some(1));
        s.schedule("u2", Some(1), Timestamp::now());
        assert!(s.scheduled("u2", Some(1)).is_some());
        assert!(s.scheduled("u2", Some(2)).is_none());
        let gone = s.retain(&HashSet::from(["u1".to_string()]));
        assert_eq!(gone, ["u2"]);
        assert!(*rx2.borrow(), "forgetting an object cancels its sync");
        assert!(s.forget("u1"));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn failures_count_up_and_reset() {
        let s = States::default();
        assert_eq!(s.bump_failures("u"), 0);
        assert_eq!(s.bump_failures("u"), 1);
        s.reset_failures("u");
        assert_eq!(s.bump_failures("u"), 0);
        assert!(s.report_invalid("u", Some(1)));
        assert!(!s.report_invalid("u", Some(1)));
        assert!(s.report_invalid("u", Some(2)));
    }
}
