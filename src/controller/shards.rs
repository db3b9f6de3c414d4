//! Sharding the ImageMirrors across replicas: which shards this replica holds, and fencing of
//! the work running in each.
//!
//! An object belongs to shard `shard_of(uid, N)`: FNV-1a (64-bit) of its UID, modulo N. The
//! hash is fixed (not `std`'s randomised `DefaultHasher`), so every replica, version and
//! platform agrees on it; UIDs never change, so an object never moves between shards.
//!
//! A reconcile runs only while its shard is held, and is dropped (its sync and transfers
//! cancelled) the moment the shard is given up or lost. The lease side (`shard_leases`) marks
//! a shard not held *first*, waits for its reconciles to end, and only then releases the Lease,
//! so no two replicas ever work on one shard at once.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::Stream;
use kube::Resource;
use kube::runtime::controller::Action;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};

use super::Context;

/// The largest `--shards` accepted: shard Leases are listed and renewed one by one.
pub const MAX_SHARDS: u32 = 256;

/// The shard of an object with `uid` among `shards` (FNV-1a 64 of the UID bytes, modulo).
pub fn shard_of(uid: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The remainder is below `shards`, a u32.
    (h % u64::from(shards.max(1))) as u32
}

/// The shards this replica holds and the reconciles running in each.
pub struct ShardSet {
    shards: u32,
    /// `held[i]`: shard `i` is ours; reconciles of shard `i` watch it to stop at once.
    held: watch::Sender<Vec<bool>>,
    /// Reconciles running per shard. Changed only under this lock, and `held` is flipped
    /// under it too, so a reconcile either sees the shard gone or is counted before the
    /// shard's drain looks.
    inflight: Mutex<Vec<usize>>,
    drained: Notify,
    gauge: Gauge,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ShardSet {
    /// `shards` shards (at least 1), none held; `gauge` shows how many are held.
    pub fn new(shards: u32, gauge: Gauge) -> Self {
        let n = shards.max(1) as usize;
        let (held, _) = watch::channel(vec![false; n]);
        ShardSet {
            shards: shards.max(1),
            held,
            inflight: Mutex::new(vec![0; n]),
            drained: Notify::new(),
            gauge,
        }
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Whether shard `s` is held.
    pub fn is_held(&self, s: u32) -> bool {
        self.held.borrow().get(s as usize).copied().unwrap_or(false)
    }

    /// The shards held, in order.
    pub fn held(&self) -> Vec<u32> {
        let h = self.held.borrow();
        (0..self.shards).filter(|s| h[*s as usize]).collect()
    }

    /// Marks shard `s` held or not; reconciles of a shard no longer held stop at once.
    pub fn set_held(&self, s: u32, held: bool) {
        let _inflight = lock(&self.inflight);
        self.held.send_if_modified(|h| match h.get_mut(s as usize) {
            Some(v) if *v != held => {
                *v = held;
                true
            }
            _ => false,
        });
        let n = self.held.borrow().iter().filter(|h| **h).count();
        self.gauge.set(n as i64);
    }

    /// Runs `work` if the shard of `uid` is held, dropping it (cancelling its transfers) as
    /// soon as the shard is not held any more. `None`: not held, or cancelled.
    pub async fn run<F: Future>(&self, uid: &str, work: F) -> Option<F::Output> {
        let s = shard_of(uid, self.shards) as usize;
        let mut rx = self.held.subscribe();
        {
            let mut inflight = lock(&self.inflight);
            if !rx.borrow()[s] {
                return None;
            }
            inflight[s] += 1;
        }
        let _counted = Inflight {
            set: self,
            shard: s,
        };
        tokio::select! {
            r = work => Some(r),
            _ = rx.wait_for(|h| !h[s]) => None,
        }
    }

    /// Waits until no reconcile of shard `s` runs, at most `limit`; `false` if some still do.
    pub async fn drain(&self, s: u32, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.inflight).get(s as usize).copied().unwrap_or(0) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Yields each time a shard is gained, so the controller looks at every object again
    /// (those of other shards return at once).
    pub fn gained(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.held.subscribe();
        let prev = rx.borrow().clone();
        futures_util::stream::unfold((rx, prev), |(mut rx, mut prev)| async move {
            loop {
                rx.changed().await.ok()?;
                let now = rx.borrow_and_update().clone();
                let gained = now.iter().zip(&prev).any(|(n, p)| *n && !*p);
                prev = now;
                if gained {
                    return Some(((), (rx, prev)));
                }
            }
        })
    }
}

/// Counts one running reconcile of a shard until dropped.
struct Inflight<'a> {
    set: &'a ShardSet,
    shard: usize,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.set.inflight);
        inflight[self.shard] = inflight[self.shard].saturating_sub(1);
        if inflight[self.shard] == 0 {
            self.set.drained.notify_waiters();
        }
    }
}

/// Runs `reconcile` unless the controller is sharded and the object's shard is not held here;
/// such objects wait (`await_change`) until a shard is gained and every object is looked at.
pub async fn reconcile_in_shard<K, E, F, Fut>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    reconcile: F,
) -> Result<Action, E>
where
    K: Resource,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, E>>,
{
    let Some(set) = ctx.shards.clone() else {
        return reconcile(obj, ctx).await;
    };
    let uid = obj.meta().uid.clone().unwrap_or_default();
    set.run(&uid, reconcile(obj, ctx))
        .await
        .unwrap_or(Ok(Action::await_change()))
}

/// The ImageMirror watch, narrowed to `--selector` when one is given.
pub(super) fn mirror_watch(
    cfg: kube::runtime::watcher::Config,
    config: &super::ControllerConfig,
) -> kube::runtime::watcher::Config {
    match &config.selector {
        Some(selector) => cfg.labels(selector),
        None => cfg,
    }
}

/// Checks a label selector's shape before it reaches the API server (which validates it
/// fully): not empty, only the characters selectors use, parentheses balanced.
pub fn check_selector(s: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_./=!(), ".contains(c);
    if s.trim().is_empty() {
        return Err("--selector is empty".into());
    }
    if let Some(c) = s.chars().find(|c| !ok_char(*c)) {
        return Err(format!(
            "--selector {s:?}: {c:?} cannot appear in a label selector"
        ));
    }
    let mut depth = 0i32;
    for c in s.chars() {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        if !(0..=1).contains(&depth) {
            return Err(format!("--selector {s:?}: unbalanced parentheses"));
        }
    }
    if depth != 0 {
        return Err(format!("--selector {s:?}: unbalanced parentheses"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_stable_and_spreads() {
        // Fixed values: changing the hash would move every object to another shard.
        assert_eq!(shard_of("", 9), (0xcbf2_9ce4_8422_2325u64 % 9) as u32);
        assert_eq!(
            shard_of("0d6f5a3e-7c1b-4d2a-9f00-1b2c3d4e5f60", 1),
            0,
            "one shard holds everything"
        );
        let mut counts = [0usize; 9];
        for i in 0..9000 {
            counts[shard_of(&format!("uid-{i:08}-x"), 9) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (700..1300).contains(c)),
            "uneven: {counts:?}"
        );
    }

    #[tokio::test]
    async fn losing_a_shard_cancels_its_work_and_drain_waits_for_it() {
        let set = Arc::new(ShardSet::new(4, Gauge::default()));
        let uid = "abc";
        let s = shard_of(uid, 4);
        assert!(set.run(uid, async { 1 }).await.is_none(), "not held");
        set.set_held(s, true);
        assert_eq!(set.gauge.get(), 1);
        assert_eq!(set.run(uid, async { 1 }).await, Some(1));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = {
            let set = set.clone();
            tokio::spawn(async move {
                set.run(uid, async {
                    let _ = started_tx.send(());
                    std::future::pending::<()>().await
                })
                .await
            })
        };
        started_rx.await.unwrap();
        assert!(
            !set.drain(s, Duration::from_millis(50)).await,
            "still running"
        );
        set.set_held(s, false);
        assert!(set.drain(s, Duration::from_secs(5)).await);
        assert_eq!(task.await.unwrap(), None, "cancelled");
        assert_eq!(set.gauge.get(), 0);
    }

    #[test]
    fn selectors_are_checked_for_shape() {
        assert!(check_selector("shard=a").is_ok());
        assert!(check_selector("team in (a, b),!legacy").is_ok());
        assert!(check_selector("").is_err());
        assert!(check_selector("a=b;c").is_err());
        assert!(check_selector("x in (a").is_err());
    }
}
