//! The shard Leases: each replica contends for `imagemirror-shard-<i>` (kube-lease-manager, as
//! for leader election) and holds at most ⌈N / live replicas⌉ of them.
//!
//! Replicas learn of each other through Leases only: each renews its own
//! `imagemirror-replica-<identity>` Lease every tick (so one holding no shard is seen too), and
//! holders of live shard Leases count as live. Every tick (half the renew grace) a replica
//! lists the Leases of its namespace, then
//! - gives up shards above its share: it stops their work first, then releases the Lease;
//! - contends for free or expired shards below its share, starting at an offset of its own;
//! - fences: a shard whose Lease names another live holder, or whose renewal by us is overdue,
//!   stops work at once, before the Lease expires for the others.
//!
//! Replicas configured with a different shard count (a rollout changing `--shards`) would
//! split the mirrors differently, so while one is live, a replica holds no shard at all.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{oneshot, watch};

use super::shards::{ShardSet, shard_of};

/// Shard Lease `i` is named this plus `i`.
pub const SHARD_LEASE_PREFIX: &str = "imagemirror-shard-";
/// A replica's presence Lease is named this plus its (sanitised) identity.
pub const REPLICA_LEASE_PREFIX: &str = "imagemirror-replica-";
/// Label on presence Leases: the replica's shard count.
const SHARDS_LABEL: &str = "imagemirror.dev/shards";
/// Field manager of presence Leases.
const FIELD_MANAGER: &str = "imagemirror-shards";
/// How long giving up a shard waits for its reconciles to end before releasing anyway.
/// Dropping a reconcile is immediate; this only bounds a stuck drop.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Sharding settings; `main` fills them from flags.
#[derive(Clone, Debug)]
pub struct Sharding {
    /// Number of shards (2..=`MAX_SHARDS`; 1 means unsharded and is not run through here).
    pub shards: u32,
    /// Namespace of the Leases (the release namespace).
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Lease duration in seconds. Default 15.
    pub duration_seconds: u64,
    /// A holder renews this long before expiry, in seconds (less than the duration). Default 5.
    pub grace_seconds: u64,
}

impl Sharding {
    /// How often the Leases are looked at: half the grace, between 0.5 and 5 s.
    fn tick(&self) -> Duration {
        Duration::from_millis(self.grace_seconds.saturating_mul(500).clamp(500, 5000))
    }

    fn replica_lease(&self) -> String {
        let id: String = self
            .identity
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .take(200)
            .collect();
        format!("{REPLICA_LEASE_PREFIX}{}", id.trim_matches(['-', '.']))
    }
}

/// Runs `work` (the controllers, which reconcile only held shards) while contending for shard
/// Leases; when `work` returns (shutdown), releases every shard and the presence Lease.
pub async fn run_sharded(
    client: Client,
    cfg: &Sharding,
    set: Arc<ShardSet>,
    work: impl Future<Output = ()>,
) {
    let (done_tx, done_rx) = watch::channel(false);
    let coordinator = tokio::spawn(coordinate(client, cfg.clone(), set, done_rx));
    work.await;
    let _ = done_tx.send(true);
    if let Err(e) = coordinator.await {
        tracing::error!(error = %e, "shard coordinator failed");
    }
}

/// One shard this replica contends for, holds, or is giving up (`release` taken).
struct ShardTask {
    release: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

impl ShardTask {
    fn release(&mut self) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
    }
}

/// What one list of the Leases says.
#[derive(Default)]
struct View {
    /// Per shard: the holder named, whether its Lease is live, and when it was renewed.
    shards: Vec<(Option<String>, bool, Option<Timestamp>)>,
    /// Identities of live replicas (presence Leases and live shard holders).
    live: BTreeSet<String>,
    /// A live replica runs with another shard count.
    mismatch: bool,
}

fn lease_view(cfg: &Sharding, leases: Vec<Lease>, now: Timestamp) -> (View, Vec<String>) {
    let n = cfg.shards as usize;
    let mut view = View {
        shards: vec![(None, false, None); n],
        ..View::default()
    };
    let mut stale = Vec::new();
    view.live.insert(cfg.identity.clone());
    for lease in leases {
        let name = lease.name_any();
        let labels = lease.labels().clone();
        let spec = lease.spec.unwrap_or_default();
        let renewed = spec.renew_time.map(|t| t.0);
        let duration = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .unwrap_or(0);
        let until = renewed.and_then(|r| r.checked_add(Duration::from_secs(duration)).ok());
        let live = spec.holder_identity.is_some() && until.is_some_and(|u| u > now);
        if let Some(i) = name
            .strip_prefix(SHARD_LEASE_PREFIX)
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < n)
        {
            if live && let Some(h) = &spec.holder_identity {
                view.live.insert(h.clone());
            }
            view.shards[i] = (spec.holder_identity, live, renewed);
        } else if name.starts_with(REPLICA_LEASE_PREFIX) {
            if live && let Some(h) = spec.holder_identity {
                let theirs = labels.get(SHARDS_LABEL).map(String::as_str);
                if h != cfg.identity && theirs.is_some_and(|t| t != cfg.shards.to_string()) {
                    view.mismatch = true;
                }
                view.live.insert(h);
            } else {
                // Gone for ten lease durations: a replica that died without deleting it.
                let long_gone = Duration::from_secs(duration.max(cfg.duration_seconds) * 10);
                let dead = until
                    .and_then(|u| u.checked_add(long_gone).ok())
                    .is_none_or(|t| t < now);
                if dead {
                    stale.push(name);
                }
            }
        }
    }
    (view, stale)
}

async fn heartbeat(leases: &Api<Lease>, cfg: &Sharding) -> Result<(), kube::Error> {
    let name = cfg.replica_lease();
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": name, "labels": { SHARDS_LABEL: cfg.shards.to_string() } },
        "spec": {
            "holderIdentity": cfg.identity,
            "leaseDurationSeconds": cfg.duration_seconds,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    leases
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .map(|_| ())
}

async fn coordinate(
    client: Client,
    cfg: Sharding,
    set: Arc<ShardSet>,
    mut done: watch::Receiver<bool>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut tasks: BTreeMap<u32, ShardTask> = BTreeMap::new();
    tracing::info!(shards = cfg.shards, identity = %cfg.identity, "sharding with Leases");
    loop {
        step(&client, &leases, &cfg, &set, &mut tasks).await;
        tokio::select! {
            _ = tokio::time::sleep(cfg.tick()) => {}
            _ = done.wait_for(|d| *d) => break,
        }
    }
    // The controllers have stopped: give every shard up, then say we are gone.
    for t in tasks.values_mut() {
        t.release();
    }
    for (_, t) in tasks {
        let _ = t.handle.await;
    }
    if let Err(e) = leases
        .delete(&cfg.replica_lease(), &DeleteParams::default())
        .await
    {
        tracing::debug!(error = %e, "deleting the presence Lease");
    }
}

async fn step(
    client: &Client,
    leases: &Api<Lease>,
    cfg: &Sharding,
    set: &Arc<ShardSet>,
    tasks: &mut BTreeMap<u32, ShardTask>,
) {
    tasks.retain(|_, t| !t.handle.is_finished());
    if let Err(e) = heartbeat(leases, cfg).await {
        tracing::warn!(error = %e, "renewing the presence Lease failed");
    }
    let list = match leases.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => {
            tracing::warn!(error = %e, "listing Leases failed");
            return;
        }
    };
    let now = Timestamp::now();
    let (view, stale) = lease_view(cfg, list, now);
    for name in stale {
        let _ = leases.delete(&name, &DeleteParams::default()).await;
    }

    // Fence first: work must stop before anyone else may take the shard.
    let overdue = Duration::from_millis(
        cfg.duration_seconds
            .saturating_mul(1000)
            .saturating_sub(cfg.grace_seconds.saturating_mul(500)),
    );
    for (&i, t) in tasks.iter_mut() {
        let (holder, live, renewed) = &view.shards[i as usize];
        let ours = holder.as_deref() == Some(cfg.identity.as_str());
        let taken = *live && !ours && holder.is_some();
        let late = ours
            && renewed
                .and_then(|r| r.checked_add(overdue).ok())
                .is_some_and(|due| due < now);
        if set.is_held(i) && (taken || late) {
            tracing::warn!(shard = i, taken, late, "shard lost; stopping its work");
            set.set_held(i, false);
            t.release();
        } else if !set.is_held(i) && taken {
            // Someone else won it: stop contending, free the slot for another shard.
            t.release();
        }
    }

    let n = cfg.shards;
    let target = if view.mismatch {
        tracing::warn!(
            "a live replica runs with another --shards; holding no shard until it is gone"
        );
        0
    } else {
        n.div_ceil(view.live.len().max(1) as u32)
    };
    // Tasks told to release stay listed until they finish, so a shard being given up is not
    // contended for again meanwhile; they do not count towards the share.
    let active: Vec<u32> = tasks
        .iter()
        .filter(|(_, t)| t.release.is_some())
        .map(|(i, _)| *i)
        .collect();
    let mine = active.len() as u32;
    if mine > target {
        // Give up contended shards first, then held ones from the highest.
        let mut order = active;
        order.sort_by_key(|i| (set.is_held(*i), std::cmp::Reverse(*i)));
        for i in order.into_iter().take((mine - target) as usize) {
            if let Some(t) = tasks.get_mut(&i) {
                tracing::info!(shard = i, target, "giving up a shard to another replica");
                t.release();
            }
        }
    } else if mine < target {
        let offset = shard_of(&cfg.identity, n);
        let free = (0..n)
            .map(|k| (offset + k) % n)
            .filter(|i| !tasks.contains_key(i) && !view.shards[*i as usize].1);
        for i in free.take((target - mine) as usize).collect::<Vec<_>>() {
            let (tx, rx) = oneshot::channel();
            let handle = tokio::spawn(hold_shard(client.clone(), cfg.clone(), set.clone(), i, rx));
            tasks.insert(
                i,
                ShardTask {
                    release: Some(tx),
                    handle,
                },
            );
        }
    }
}

/// Contends for shard `i`, holds it (kube-lease-manager renews it) until told to release or
/// it is lost; work on the shard stops before the Lease is released.
async fn hold_shard(
    client: Client,
    cfg: Sharding,
    set: Arc<ShardSet>,
    i: u32,
    mut release: oneshot::Receiver<()>,
) {
    let name = format!("{SHARD_LEASE_PREFIX}{i}");
    let manager = match LeaseManagerBuilder::new(client, &name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_duration(cfg.duration_seconds)
        .with_grace(cfg.grace_seconds)
        .build()
        .await
    {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(lease = %name, error = %e, "shard Lease unavailable");
            return;
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = &mut release => break,
            r = manager.changed() => match r {
                Ok(true) => {
                    tracing::info!(shard = i, "shard acquired");
                    set.set_held(i, true);
                }
                Ok(false) => {
                    tracing::warn!(shard = i, "shard Lease lost");
                    set.set_held(i, false);
                    set.drain(i, DRAIN_LIMIT).await;
                    return;
                }
                Err(e) => {
                    // Renewal failed: stop now, while the Lease still has its grace left.
                    tracing::warn!(shard = i, error = %e, "shard Lease error; giving the shard up");
                    break;
                }
            }
        }
    }
    set.set_held(i, false);
    if !set.drain(i, DRAIN_LIMIT).await {
        tracing::warn!(shard = i, "reconciles still running after the drain limit");
    }
    if let Err(e) = manager.release().await {
        tracing::debug!(shard = i, error = %e, "releasing the shard Lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    fn cfg() -> Sharding {
        Sharding {
            shards: 3,
            namespace: "ns".into(),
            identity: "me".into(),
            duration_seconds: 10,
            grace_seconds: 2,
        }
    }

    fn lease(name: &str, holder: &str, age_s: i64, shards: Option<&str>) -> Lease {
        let renewed = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age_s);
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: shards.map(|s| [(SHARDS_LABEL.to_string(), s.to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(10),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn the_view_counts_live_replicas_and_finds_stale_ones() {
        let leases = vec![
            lease("imagemirror-shard-0", "a", 1, None),
            lease("imagemirror-shard-1", "b", 11, None),
            lease("imagemirror-shard-7", "c", 1, None),
            lease("imagemirror-replica-d", "d", 1, Some("3")),
            lease("imagemirror-replica-e", "e", 500, Some("3")),
            lease("imagemirror-replica-f", "f", 20, Some("3")),
        ];
        let (view, stale) = lease_view(&cfg(), leases, Timestamp::now());
        let live: Vec<&str> = view.live.iter().map(String::as_str).collect();
        assert_eq!(live, ["a", "d", "me"], "b expired, c out of range");
        assert!(view.shards[0].1 && !view.shards[1].1 && !view.shards[2].1);
        assert_eq!(stale, ["imagemirror-replica-e"]);
        assert!(!view.mismatch);
        let (view, _) = lease_view(
            &cfg(),
            vec![lease("imagemirror-replica-x", "x", 1, Some("9"))],
            Timestamp::now(),
        );
        assert!(view.mismatch, "another shard count");
    }

    #[test]
    fn presence_lease_names_are_valid() {
        let mut c = cfg();
        c.identity = "Pod_Name/1".into();
        assert_eq!(c.replica_lease(), "imagemirror-replica-pod-name-1");
        assert_eq!(c.tick(), Duration::from_secs(1));
    }
}
