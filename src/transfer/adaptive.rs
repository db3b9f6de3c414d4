//! Adaptive per-registry transfer concurrency: AIMD on congestion, hill-climbing on goodput.
//!
//! Why not a latency-gradient limiter (Netflix's concurrency-limits `Gradient2`, which compares
//! each request's latency with the best seen): a blob transfer's duration grows with its size,
//! which varies by five orders of magnitude within one sync, so a transfer's latency says little
//! about queueing. What matters for a registry is its goodput, so the limit climbs on that:
//!
//! - **Multiplicative decrease on congestion.** A `502/503/504` without `Retry-After`, a stall
//!   or a connection failure halves the limit (at least 1). Transfers that started before the
//!   last decrease belong to the same episode and do not halve it again (as TCP halves once per
//!   round trip), so a burst of failures from every transfer in flight counts once.
//! - **Throttling is not congestion here.** A `429` (or `503` with `Retry-After`) already
//!   pauses every throttled request to the host until the time the registry named (the shared
//!   pause in `ratelimit.rs`); halving the limit too would punish the same answer twice, and
//!   a registry that refuses a share of requests at random (20% in tests/it/hostile.rs) would
//!   drive it to 1 and keep it there, 10x slower than a fixed limit. So a throttled attempt
//!   only undoes a probe in progress (the step up that met the push-back) and restarts the
//!   goodput window, whose rate the pause would distort.
//! - **Additive increase while goodput rises.** Completions are grouped in windows (at least
//!   twice the limit of transfers and [`MIN_WINDOW`]); a window's goodput counts bytes plus
//!   [`PER_TRANSFER`] per transfer, so many small blobs (bound by round trips) count as well as
//!   a few large ones (bound by bandwidth). If the limit was binding in a window (a transfer
//!   waited for a slot), it grows by one. After a growth step, the next window decides: goodput
//!   up by [`GAIN`] or more keeps climbing; down by [`LOSS`] or more (rising latency: the extra
//!   stream slowed the others more than it added) steps back down and waits [`HOLD`] windows
//!   before probing again; anything between holds for [`HOLD`] windows.
//!
//! The limit stays within `[1, max]` and starts at the configured value. Decreases take effect
//! without cancelling anything: the slots are withheld as running transfers release them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Shortest window of completions judged for growth (shorter ones are mostly noise).
const MIN_WINDOW: Duration = Duration::from_millis(250);
/// Work a transfer counts beyond its bytes: a request round trip is worth this many bytes.
const PER_TRANSFER: f64 = 256.0 * 1024.0;
/// Goodput rise that justifies another step up.
const GAIN: f64 = 1.05;
/// Goodput fall after a step up that undoes it.
const LOSS: f64 = 0.90;
/// Windows to wait after a step back (or a flat step) before probing again.
const HOLD: u32 = 2;

/// How one attempt under the limit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Finished (or found the blob present), having moved `bytes`.
    Done { bytes: u64 },
    /// The path or registry is overloaded: 502/503/504, a stall, a broken connection.
    Congested,
    /// The registry throttled us (429, 503 with `Retry-After`): the host's shared pause
    /// handles it; the limit only drops a probe in progress.
    Throttled,
    /// Failed for a reason that says nothing about load (404, digest mismatch...).
    Neutral,
}

/// One registry's transfer limit, in transfers of `unit` semaphore units each.
pub(crate) struct AdaptiveLimit {
    sem: Arc<Semaphore>,
    unit: usize,
    max: u32,
    adaptive: bool,
    state: Mutex<State>,
}

struct State {
    limit: u32,
    /// Units to withhold from releases (a decrease larger than the idle units).
    debt: usize,
    last_decrease: Option<Instant>,
    window_start: Instant,
    work: f64,
    done: u32,
    /// A transfer waited for a slot during this window.
    binding: bool,
    prev_rate: Option<f64>,
    grew: bool,
    hold: u32,
}

/// A slot of an [`AdaptiveLimit`], released on drop.
pub(crate) struct LimitPermit {
    limit: Arc<AdaptiveLimit>,
    permit: Option<OwnedSemaphorePermit>,
    started: Instant,
}

impl AdaptiveLimit {
    /// A limit of `start` transfers (clamped to `[1, max]`), adapting when `adaptive`, fixed at
    /// `max` otherwise; each transfer holds up to `unit` units.
    pub(crate) fn new(start: usize, max: usize, unit: u32, adaptive: bool) -> Self {
        let max = max.clamp(
            1,
            (Semaphore::MAX_PERMITS / unit.max(1) as usize) as u32 as usize,
        ) as u32;
        let limit = if adaptive {
            (start as u32).clamp(1, max)
        } else {
            max
        };
        let unit = unit.max(1) as usize;
        AdaptiveLimit {
            sem: Arc::new(Semaphore::new(limit as usize * unit)),
            unit,
            max,
            adaptive,
            state: Mutex::new(State {
                limit,
                debt: 0,
                last_decrease: None,
                window_start: Instant::now(),
                work: 0.0,
                done: 0,
                binding: false,
                prev_rate: None,
                grew: false,
                hold: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limit, in transfers.
    pub(crate) fn current(&self) -> u32 {
        self.state().limit
    }

    /// The cap, in transfers.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// Waits for `units` units (at most `unit`).
    pub(crate) async fn acquire(self: &Arc<Self>, units: u32) -> Option<LimitPermit> {
        let units = (units as usize).min(self.unit);
        if self.sem.available_permits() < units {
            self.state().binding = true;
        }
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .ok()?;
        Some(LimitPermit {
            limit: self.clone(),
            permit: Some(permit),
            started: Instant::now(),
        })
    }

    fn set_limit(&self, st: &mut State, new: u32) {
        let new = new.clamp(1, self.max);
        if new < st.limit {
            let cut = (st.limit - new) as usize * self.unit;
            let idle = self.sem.forget_permits(cut);
            st.debt += cut - idle;
        } else if new > st.limit {
            let mut add = (new - st.limit) as usize * self.unit;
            let paid = add.min(st.debt);
            st.debt -= paid;
            add -= paid;
            self.sem.add_permits(add);
        }
        st.limit = new;
    }

    /// Feeds back how an attempt that started at `started` ended.
    pub(crate) fn record(&self, started: Instant, signal: Signal) {
        if !self.adaptive {
            return;
        }
        let now = Instant::now();
        let mut st = self.state();
        match signal {
            Signal::Neutral => {}
            Signal::Throttled => {
                if st.grew {
                    let back = st.limit - 1;
                    self.set_limit(&mut st, back);
                    st.grew = false;
                    st.hold = HOLD;
                }
                st.prev_rate = None;
                self.new_window(&mut st, now);
            }
            Signal::Congested => {
                if st.last_decrease.is_some_and(|t| started < t) {
                    return;
                }
                let half = st.limit.div_ceil(2).min(st.limit.saturating_sub(1)).max(1);
                self.set_limit(&mut st, half);
                st.last_decrease = Some(now);
                st.prev_rate = None;
                st.grew = false;
                st.hold = HOLD;
                self.new_window(&mut st, now);
            }
            Signal::Done { bytes } => {
                st.work += bytes as f64 + PER_TRANSFER;
                st.done += 1;
                let elapsed = now.saturating_duration_since(st.window_start);
                if st.done < (2 * st.limit).max(4) || elapsed < MIN_WINDOW {
                    return;
                }
                let rate = st.work / elapsed.as_secs_f64();
                let limit = st.limit;
                match (st.grew, st.prev_rate) {
                    (true, Some(prev)) if rate >= prev * GAIN && st.binding => {
                        self.set_limit(&mut st, limit + 1);
                    }
                    (true, Some(prev)) if rate < prev * LOSS => {
                        self.set_limit(&mut st, limit - 1);
                        st.grew = false;
                        st.hold = HOLD;
                    }
                    (true, _) => {
                        st.grew = false;
                        st.hold = HOLD;
                    }
                    (false, _) if st.hold > 0 => st.hold -= 1,
                    (false, _) => {
                        if st.binding && limit < self.max {
                            self.set_limit(&mut st, limit + 1);
                            st.grew = true;
                        }
                    }
                }
                st.prev_rate = Some(rate);
                self.new_window(&mut st, now);
            }
        }
    }

    fn new_window(&self, st: &mut State, now: Instant) {
        st.window_start = now;
        st.work = 0.0;
        st.done = 0;
        st.binding = false;
    }

    /// Returns units to the semaphore, withholding what a decrease still owes.
    fn release(&self, mut permit: OwnedSemaphorePermit) {
        let mut st = self.state();
        if st.debt > 0 {
            let owed = st.debt.min(permit.num_permits());
            if let Some(p) = permit.split(owed) {
                p.forget();
                st.debt -= owed;
            }
        }
        drop(st);
        drop(permit);
    }
}

impl LimitPermit {
    /// Releases the slot, feeding back how the attempt ended.
    pub(crate) fn finish(mut self, signal: Signal) {
        self.limit.record(self.started, signal);
        if let Some(p) = self.permit.take() {
            self.limit.release(p);
        }
    }
}

impl Drop for LimitPermit {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.limit.release(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(l: &Arc<AdaptiveLimit>, n: u32, bytes: u64, at: Instant) {
        for _ in 0..n {
            l.record(at, Signal::Done { bytes });
        }
    }

    #[tokio::test]
    async fn congestion_halves_once_per_episode_and_never_below_one() {
        let l = Arc::new(AdaptiveLimit::new(8, 8, 2, true));
        let before = Instant::now();
        l.record(before, Signal::Congested);
        assert_eq!(l.current(), 4);
        // The other transfers of the same burst started before the decrease: no new halving.
        l.record(before, Signal::Congested);
        assert_eq!(l.current(), 4);
        for want in [2, 1, 1] {
            l.record(Instant::now(), Signal::Congested);
            assert_eq!(l.current(), want);
        }
        // Neutral failures say nothing about load.
        l.record(Instant::now(), Signal::Neutral);
        assert_eq!(l.current(), 1);
    }

    #[tokio::test]
    async fn throttling_never_halves_and_only_undoes_a_probe() {
        let l = Arc::new(AdaptiveLimit::new(4, 8, 2, true));
        for _ in 0..20 {
            l.record(Instant::now(), Signal::Throttled);
        }
        assert_eq!(l.current(), 4, "429s are the shared pause's business");
        // A probe that meets a 429 steps back to where it was, and holds.
        let t = Instant::now();
        l.state().binding = true;
        l.state().window_start = Instant::now() - Duration::from_secs(1);
        done(&l, 8, 1 << 20, t);
        assert_eq!(l.current(), 5, "a binding window probes upward");
        l.record(Instant::now(), Signal::Throttled);
        assert_eq!(l.current(), 4);
        l.record(Instant::now(), Signal::Throttled);
        assert_eq!(l.current(), 4, "undone once, not halved");
    }

    #[tokio::test]
    async fn a_decrease_withholds_slots_until_running_transfers_release_them() {
        let l = Arc::new(AdaptiveLimit::new(4, 4, 2, true));
        let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| l.acquire(2)))
            .await
            .into_iter()
            .map(Option::unwrap)
            .collect();
        l.record(Instant::now(), Signal::Congested);
        assert_eq!(l.current(), 2);
        // Releasing two transfers pays the debt: still no slot free.
        let mut held = held.into_iter();
        held.next().unwrap().finish(Signal::Done { bytes: 1 });
        held.next().unwrap().finish(Signal::Done { bytes: 1 });
        assert_eq!(l.sem.available_permits(), 0);
        drop(held);
        assert_eq!(l.sem.available_permits(), 4, "two transfers of two units");
    }

    #[tokio::test]
    async fn grows_while_goodput_rises_and_steps_back_when_it_falls() {
        let l = Arc::new(AdaptiveLimit::new(2, 6, 2, true));
        let t = Instant::now();
        let window = |l: &Arc<AdaptiveLimit>, bytes: u64| {
            // Binding: a transfer waited for a slot.
            l.state().binding = true;
            l.state().window_start = Instant::now() - Duration::from_secs(1);
            done(l, 2 * l.current(), bytes, t);
        };
        window(&l, 1 << 20);
        assert_eq!(l.current(), 3, "first binding window probes upward");
        window(&l, 2 << 20);
        assert_eq!(l.current(), 4, "goodput rose: keep climbing");
        // The same number of transfers per second with fewer bytes: goodput fell.
        window(&l, 1 << 10);
        assert_eq!(l.current(), 3, "goodput fell after a step up: step back");
        window(&l, 1 << 10);
        window(&l, 1 << 10);
        assert_eq!(l.current(), 3, "holds before probing again");
        window(&l, 1 << 10);
        assert_eq!(l.current(), 4, "probes again");
    }

    #[tokio::test]
    async fn does_not_grow_when_the_limit_is_not_binding_or_at_the_cap() {
        let l = Arc::new(AdaptiveLimit::new(2, 3, 2, true));
        let t = Instant::now();
        l.state().window_start = Instant::now() - Duration::from_secs(1);
        done(&l, 4, 1 << 20, t);
        assert_eq!(l.current(), 2, "nobody waited: no growth");
        for _ in 0..10 {
            l.state().binding = true;
            l.state().window_start = Instant::now() - Duration::from_secs(1);
            let n = 2 * l.current();
            done(&l, n, 1 << 20, t);
        }
        assert!(l.current() <= 3);
    }

    #[tokio::test]
    async fn fixed_when_adaptation_is_off() {
        let l = Arc::new(AdaptiveLimit::new(1, 5, 2, false));
        assert_eq!(l.current(), 5);
        l.record(Instant::now(), Signal::Congested);
        assert_eq!(l.current(), 5);
        assert_eq!(l.sem.available_permits(), 10);
    }
}
