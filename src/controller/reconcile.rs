//! Reconcile one ImageMirror as named steps: validate → decide (due or not) → dereference
//! Secrets → sync on the shared engine → publish (status, Events, metrics). Every early end
//! is a [`ReconcileError`] that `publish::failure` turns into status in one place.
//!
//! Validation comes before dereferencing because the credentials are picked by the parsed
//! registry name, and deciding comes before it so that a mirror that is not due reads no
//! Secret data at all (changed Secrets are noticed from their metadata).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use k8s_openapi::jiff::Timestamp;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use rand::Rng;

use super::Context;
use super::outcome::{MAX_BACKOFF, ReconcileError};
use super::publish;
use super::secrets::read_side;
use super::status::{self, condition};
use crate::api::condition_types as types;
use crate::api::{ImageMirror, ImageMirrorStatus};
use crate::mirror::{self, Counters, Endpoint, EndpointAccess, SyncReport, ValidSpec, snapshot};

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "imagemirror";
/// How often a long sync patches its progress, at most.
pub const PROGRESS_PERIOD: Duration = Duration::from_secs(5);
/// Longest interval acted on: the CRD allows at most 8760h; anything longer (an object
/// admitted by an older CRD) is treated as this, so time arithmetic cannot overflow.
pub const MAX_INTERVAL: Duration = Duration::from_secs(8760 * 3600);

/// One ImageMirror being reconciled, and what every step needs to know about it.
pub(super) struct Mirror<'a> {
    pub obj: &'a ImageMirror,
    pub api: Api<ImageMirror>,
    pub ns: String,
    pub name: String,
    /// The UID (per-object state is keyed by it); `ns/name` if the object has none.
    pub uid: String,
    pub generation: Option<i64>,
    /// The status as the last write left it (updated by the steps that write).
    pub prev: ImageMirrorStatus,
    /// The interval in force, once validated (caps backoff).
    pub interval: Duration,
}

/// The requeue after a successful sync: the interval with ±10% jitter, so a thousand
/// mirrors created together do not resync together. Never panics, whatever the interval.
pub fn jittered(interval: Duration) -> Duration {
    let factor = rand::rng().random_range(0.9..=1.1);
    Duration::try_from_secs_f64(interval.as_secs_f64() * factor)
        .unwrap_or(interval)
        .min(MAX_INTERVAL)
}

/// `now + d`, rounded up to a whole second: status times are serialised with second
/// precision, and a `nextSyncTime` that reads earlier than the requeue would make the next
/// wake-up look early and sync twice. Saturates far in the future instead of overflowing.
pub(super) fn add(now: Timestamp, d: Duration) -> Timestamp {
    let t = now
        .checked_add(d.min(MAX_INTERVAL))
        .unwrap_or(Timestamp::MAX);
    let whole = Timestamp::from_second(t.as_second()).unwrap_or(t);
    if whole < t {
        whole.checked_add(Duration::from_secs(1)).unwrap_or(t)
    } else {
        whole
    }
}

/// The requeue that wakes us exactly at `at`.
pub(super) fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or_default()
}

/// Backoff for the `n`th consecutive failure (from 0): 5 s doubling, capped at `cap` and at
/// 5 min, with jitter.
pub(super) fn backoff(n: u32, cap: Duration) -> Duration {
    let d = Duration::from_secs(5).saturating_mul(1 << n.min(6));
    jittered(d.min(cap).min(MAX_BACKOFF))
}

/// The reconciler kube-runtime calls. Objects that could not be decoded are reported on the
/// object; a panic anywhere below is contained and reported as InternalError.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<ImageMirror>>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let obj = match &guard.0 {
        Ok(obj) => obj,
        Err(invalid) => return publish::undecodable(&ctx, invalid).await,
    };
    let name = obj.name_any();
    let ns = obj
        .namespace()
        .ok_or_else(|| ReconcileError::NoNamespace(name.clone()))?;
    let mut m = Mirror {
        api: Api::namespaced(ctx.client.clone(), &ns),
        uid: obj.uid().unwrap_or_else(|| format!("{ns}/{name}")),
        generation: obj.metadata.generation,
        prev: obj.status.clone().unwrap_or_default(),
        interval: MAX_INTERVAL,
        obj,
        ns,
        name,
    };
    let mut turn = None;
    let steps = AssertUnwindSafe(steps(&mut m, &ctx, &mut turn))
        .catch_unwind()
        .await;
    let result = match steps.unwrap_or_else(|p| Err(ReconcileError::Panicked(panic_text(&p)))) {
        Ok(action) => Ok(action),
        Err(e) => {
            // Publishing the failure writes status: that takes a turn too.
            if turn.is_none() {
                turn = Turn::take(&ctx).await;
            }
            publish::failure(&mut m, &ctx, e).await
        }
    };
    drop(turn);
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

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// One reconcile's turn among `--reconcile-concurrency`, counted on
/// `imagemirror_reconciles_in_flight` until dropped.
pub(super) struct Turn {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Turn {
    /// Waits for a turn (`None` only if the semaphore were closed, which it never is).
    async fn take(ctx: &Context) -> Option<Turn> {
        let permit = ctx.reconciling.clone().acquire_owned().await.ok()?;
        let gauge = ctx.metrics.reconciles_in_flight.clone();
        gauge.inc();
        Some(Turn {
            _permit: permit,
            gauge,
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The steps; everything past deciding that a sync is due (Secrets, the sync, status) runs
/// with a turn held in `turn`, so a burst of due mirrors works through a bounded number at a
/// time instead of holding all their connections and syncs in memory at once.
async fn steps(
    m: &mut Mirror<'_>,
    ctx: &Context,
    turn: &mut Option<Turn>,
) -> Result<Action, ReconcileError> {
    if m.obj.spec.suspend {
        *turn = Turn::take(ctx).await;
        return publish::suspended(m).await;
    }
    let valid = validate(m)?;
    m.interval = valid.interval;
    if let Some(wait) = decide(m, ctx) {
        return Ok(Action::requeue(wait));
    }
    *turn = Turn::take(ctx).await;
    if ctx.is_outdated(m.obj) {
        // A newer generation arrived while waiting: it is reconciled next (its watch event
        // is queued behind this reconcile; the requeue only makes sure).
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let (source, destination) = dereference(m, ctx, &valid).await?;
    let (report, source, destination) = sync(m, ctx, &valid, source, destination).await?;
    let pruned = super::prune::run(ctx, m, &source, &destination, &report).await;
    publish::synced(m, ctx, report, pruned).await
}

/// Step 1: everything that can be checked without IO. A validator that panics on some input
/// is a bug, but the input is the user's: it is reported as InvalidSpec, not a crash.
fn validate(m: &Mirror<'_>) -> Result<ValidSpec, ReconcileError> {
    let spec = &m.obj.spec;
    // OCI layouts are local files: a CLI feature, refused here before anything is read.
    crate::layout::refuse_in_cluster(spec).map_err(ReconcileError::InClusterUnsupported)?;
    let checked = std::panic::catch_unwind(AssertUnwindSafe(|| mirror::validate(spec)));
    match checked {
        Ok(Ok(mut v)) => {
            v.interval = v.interval.min(MAX_INTERVAL);
            Ok(v)
        }
        Ok(Err(e)) => Err(ReconcileError::InvalidSpec(e.to_string())),
        Err(p) => Err(ReconcileError::InvalidSpec(format!(
            "spec cannot be validated ({}); check spec.interval and the other fields",
            panic_text(&p)
        ))),
    }
}

/// Step 2: is a sync due? `None` when it is, else how long to wait. What this process
/// scheduled wins over status (the object a reconcile is handed can lag behind our own last
/// write); a generation not scheduled yet takes its time from status (see [`first_due`]).
fn decide(m: &Mirror<'_>, ctx: &Context) -> Option<Duration> {
    let now = Timestamp::now();
    let current = ctx.secret_versions(&m.ns, &m.obj.spec);
    let recorded = ctx.states.secrets(&m.uid);
    let secrets_changed = matches!((&recorded, &current), (Some(a), Some(b)) if a != b);
    if let Some(v) = current {
        ctx.states.set_secrets(&m.uid, v);
    }
    let due_at = match ctx.states.scheduled(&m.uid, m.generation) {
        Some(t) => t,
        None => {
            let t = first_due(&m.prev, m.generation, ctx.resync_spread, now);
            ctx.states.schedule(&m.uid, m.generation, t);
            t
        }
    };
    if secrets_changed || due_at <= now {
        None
    } else {
        Some(until(now, due_at).max(Duration::from_millis(100)))
    }
}

/// When a generation this process has not scheduled yet is first due: a new generation now;
/// one whose status is Ready for it at its `nextSyncTime` (a restart or failover keeps the
/// schedule); an overdue or not-Ready one at a random point within `spread`, so a restart
/// does not resync everything at once.
pub(super) fn first_due(
    prev: &ImageMirrorStatus,
    generation: Option<i64>,
    spread: Duration,
    now: Timestamp,
) -> Timestamp {
    // Reconciling=True: a sync of this generation started and never finished (its replica
    // stopped or lost the shard); the work is still wanted, now.
    let interrupted = condition(prev, types::RECONCILING).is_some_and(|c| c.status == "True");
    if prev.observed_generation != generation || prev.conditions.is_empty() || interrupted {
        return now;
    }
    let ready = condition(prev, types::READY).is_some_and(|c| c.status == "True");
    if ready
        && let Some(next) = &prev.next_sync_time
        && next.0 > now
    {
        return next.0;
    }
    let ms = u64::try_from(spread.as_millis()).unwrap_or(u64::MAX);
    let delay = if ms == 0 {
        0
    } else {
        rand::rng().random_range(0..ms)
    };
    add(now, Duration::from_millis(delay))
}

/// Step 3: read the referenced Secrets (`get`, only now that a sync needs them).
async fn dereference(
    m: &Mirror<'_>,
    ctx: &Context,
    valid: &ValidSpec,
) -> Result<(EndpointAccess, EndpointAccess), ReconcileError> {
    let secrets = Api::namespaced(ctx.client.clone(), &m.ns);
    let extra = ctx.extra_ca.as_deref();
    let spec = &m.obj.spec;
    let mut read = BTreeMap::new();
    let source = read_side(
        &secrets,
        &m.ns,
        "source",
        &spec.source,
        &valid.source,
        extra,
        &mut read,
    )
    .await?;
    let destination = read_side(
        &secrets,
        &m.ns,
        "destination",
        &spec.destination,
        &valid.destination,
        extra,
        &mut read,
    )
    .await?;
    // Later changes are compared with what this sync read, not with what `decide` saw: just
    // after a start the metadata cache may not have been loaded then, and with nothing
    // recorded a change right after this sync would wait for the next interval.
    if !read.is_empty() {
        ctx.states.set_secrets(&m.uid, read.into_values().collect());
    }
    Ok((source, destination))
}

/// Step 4: the sync (returning the destination endpoint, for pruning), with progress patched
/// at most every [`PROGRESS_PERIOD`]; cancelled
/// (dropping it lets go of every transfer it watched) when the spec changes or the object goes.
async fn sync(
    m: &mut Mirror<'_>,
    ctx: &Context,
    valid: &ValidSpec,
    source: EndpointAccess,
    destination: EndpointAccess,
) -> Result<(SyncReport, Endpoint, Endpoint), ReconcileError> {
    if m.prev.observed_generation != m.generation || m.prev.conditions.is_empty() {
        let s = status::progressing(&m.prev, m.generation, Timestamp::now());
        publish::write_status(m, s).await?;
        let note = format!("syncing {} to {}", valid.source, valid.destination);
        publish::event(ctx, m.obj, false, "SyncStarted", note).await;
    }
    let spec = &m.obj.spec;
    let source = ctx.pool.endpoint("source", &spec.source, source);
    let destination = ctx
        .pool
        .endpoint("destination", &spec.destination, destination);
    let (source, destination) = match (source, destination) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => return Err(ReconcileError::InvalidSpec(e.to_string())),
    };
    let counters = Arc::new(Counters::default());
    let started = std::time::Instant::now();
    let run = mirror::sync(
        &ctx.engine,
        spec,
        source.clone(),
        destination.clone(),
        ctx.item_concurrency,
        publish::metrics_sink(ctx),
        counters.clone(),
    );
    let base = m.prev.clone();
    let m_ref = &*m;
    let ticker = async {
        let mut last = None;
        loop {
            tokio::time::sleep(PROGRESS_PERIOD).await;
            let p = snapshot(&counters);
            if last.as_ref() != Some(&p) {
                let s = status::syncing(&base, m_ref.generation, p.clone(), Timestamp::now());
                if let Err(e) = publish::write_status_only(m_ref, &s).await {
                    tracing::warn!(mirror = %m_ref.uid, error = %e, "progress write failed");
                }
                last = Some(p);
            }
        }
    };
    let mut cancel = ctx.states.start(&m.uid, m.generation);
    let result = tokio::select! {
        r = run => Ok(r),
        _ = ticker => unreachable!("the progress ticker never ends"),
        _ = cancel.wait_for(|c| *c) => Err(ReconcileError::Cancelled),
    };
    ctx.states.finish(&m.uid);
    ctx.metrics
        .sync_duration
        .observe(started.elapsed().as_secs_f64());
    Ok((result??, source, destination))
}

/// The error policy kube-runtime calls (only when status itself could not be written):
/// per-object exponential backoff.
pub fn error_policy(
    guard: Arc<DeserializeGuard<ImageMirror>>,
    err: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let uid = guard.uid().unwrap_or_else(|| guard.name_any());
    let delay = backoff(ctx.states.bump_failures(&uid), MAX_BACKOFF);
    tracing::warn!(mirror = %guard.name_any(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn time_arithmetic_never_panics_on_huge_intervals() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(u64::MAX));
            assert!(d <= MAX_INTERVAL);
            assert!(jittered(Duration::from_secs(5_000_000_000_000_000 * 3600)) <= MAX_INTERVAL);
        }
        let far = add(t(0), Duration::MAX);
        assert!(far > t(0));
        assert!(backoff(u32::MAX, Duration::MAX) <= MAX_BACKOFF.mul_f64(1.1));
    }

    #[test]
    fn a_ready_status_keeps_its_schedule_and_overdue_ones_spread() {
        let spread = Duration::from_secs(60);
        let mut ready = status::progressing(&ImageMirrorStatus::default(), Some(3), t(0));
        status::set_condition(
            &mut ready.conditions,
            "Ready",
            "True",
            "Synced",
            "",
            Some(3),
            t(0),
        );
        status::set_condition(
            &mut ready.conditions,
            "Reconciling",
            "False",
            "Synced",
            "",
            Some(3),
            t(0),
        );
        ready.next_sync_time = Some(Time(t(3000)));
        assert_eq!(first_due(&ready, Some(3), spread, t(10)), t(3000));
        // A sync of generation 4 started elsewhere and never finished: due now.
        let interrupted = status::progressing(&ready, Some(4), t(20));
        assert_eq!(first_due(&interrupted, Some(4), spread, t(30)), t(30));
        // A new generation is due now.
        assert_eq!(first_due(&ready, Some(4), spread, t(10)), t(10));
        // Overdue: somewhere in the next minute, not all at once.
        let due: Vec<Timestamp> = (0..50)
            .map(|_| first_due(&ready, Some(3), spread, t(4000)))
            .collect();
        assert!(due.iter().all(|d| *d >= t(4000) && *d <= t(4061)));
        assert!(
            due.iter().any(|d| *d != due[0]),
            "overdue mirrors are spread"
        );
        // Never synced: now.
        assert_eq!(
            first_due(&ImageMirrorStatus::default(), Some(1), spread, t(5)),
            t(5)
        );
    }
}
