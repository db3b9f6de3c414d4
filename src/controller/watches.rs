//! What the controller watches, and how watch events reach per-object state:
//! - ImageMirrors through `DeserializeGuard`, so one object the types cannot hold is reported
//!   on itself instead of breaking the list for its whole scope;
//! - deletes (and objects missing after a relist) drop the object's state and cancel its sync;
//!   a new generation cancels a sync of the old one;
//! - Secrets as metadata only (`PartialObjectMeta`): a change wakes the mirrors that name the
//!   Secret; its data is read with `get` only when a sync needs it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::join_all;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Config as RunConfig;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};

use super::{Context, ControllerConfig, error_policy, reconcile};
use crate::api::ImageMirror;

type Guarded = DeserializeGuard<ImageMirror>;

/// The caches of one run of the controllers, per scope (`None`: all namespaces).
#[derive(Default)]
pub struct Caches {
    mirrors: Vec<Store<Guarded>>,
    secrets: Vec<(Option<String>, Store<PartialObjectMeta<Secret>>)>,
}

impl Caches {
    /// The Secret metadata cache that covers `ns`.
    pub fn secrets_for(&self, ns: &str) -> Option<&Store<PartialObjectMeta<Secret>>> {
        self.secrets
            .iter()
            .find(|(scope, _)| scope.as_deref().is_none_or(|s| s == ns))
            .map(|(_, store)| store)
    }

    /// The generation the caches hold of `obj` (same UID), if any holds it.
    pub fn generation_of(&self, obj: &ImageMirror) -> Option<Option<i64>> {
        let key = ObjectRef::<Guarded>::new(&obj.name_any())
            .within(obj.namespace().as_deref().unwrap_or_default());
        self.mirrors
            .iter()
            .find_map(|s| s.get(&key))
            .filter(|m| m.uid() == obj.uid())
            .map(|m| m.meta().generation)
    }

    /// UIDs of every ImageMirror in every cache.
    fn live(&self) -> HashSet<String> {
        self.mirrors
            .iter()
            .flat_map(|s| s.state())
            .filter_map(|m| m.uid())
            .collect()
    }
}

fn uid_of(m: &Guarded) -> String {
    m.uid()
        .unwrap_or_else(|| format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()))
}

/// Keeps per-object state in step with the watch: drops it for deleted objects (and, after a
/// relist, for objects no cache holds any more) and cancels syncs of outdated generations.
fn observe(ctx: &Context, event: &watcher::Event<Guarded>) {
    match event {
        watcher::Event::Apply(m) | watcher::Event::InitApply(m) => {
            ctx.states.spec_seen(&uid_of(m), m.meta().generation)
        }
        watcher::Event::Delete(m) => ctx.forget(&uid_of(m)),
        watcher::Event::InitDone => {
            let live = ctx.caches.lock().unwrap_or_else(|p| p.into_inner()).live();
            for uid in ctx.states.retain(&live) {
                ctx.metrics.forget_mirror(&uid);
            }
        }
        watcher::Event::Init => {}
    }
}

fn references(m: &ImageMirror, secret: &str) -> bool {
    super::secrets::referenced(&m.spec).contains(&secret)
}

/// One kube-runtime Controller per watched namespace (or one for all), sharing `ctx`. Returns
/// when `stop` resolves and running syncs finished, or after the grace period.
pub async fn run_controllers(
    ctx: Arc<Context>,
    config: &ControllerConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let stop = futures_util::FutureExt::shared(Box::pin(stop));
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let mut caches = Caches::default();
    let mut runs = Vec::new();
    for ns in scopes {
        let (mirrors, secrets): (Api<Guarded>, Api<PartialObjectMeta<Secret>>) = match &ns {
            Some(ns) => (
                Api::namespaced(ctx.client.clone(), ns),
                Api::namespaced(ctx.client.clone(), ns),
            ),
            None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
        };
        let (mirror_cache, mirror_writer) = reflector::store::<Guarded>();
        let (secret_cache, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
        caches.mirrors.push(mirror_cache.clone());
        caches.secrets.push((ns.clone(), secret_cache));
        let cfg = watcher::Config::default().any_semantic();
        let observer = ctx.clone();
        // managedFields are never read here; dropping them before the caches keeps a
        // thousand objects' field-ownership records out of memory.
        let mirror_events = watcher(mirrors, super::shards::mirror_watch(cfg.clone(), config))
            .default_backoff()
            .modify(|m| m.managed_fields_mut().clear())
            .reflect(mirror_writer)
            .inspect_ok(move |ev| observe(&observer, ev))
            .applied_objects();
        let secret_events = watcher(secrets, cfg)
            .default_backoff()
            .modify(|s| s.managed_fields_mut().clear())
            .reflect(secret_writer)
            .touched_objects();
        let store = mirror_cache.clone();
        let mut controller = Controller::for_stream(mirror_events, mirror_cache).watches_stream(
            secret_events,
            move |secret: PartialObjectMeta<Secret>| {
                // A Secret (re)appearing, changing or going wakes the mirrors that name it.
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|m| m.namespace() == ns)
                    .filter(|m| m.0.as_ref().is_ok_and(|m| references(m, &name)))
                    .map(|m| ObjectRef::from_obj(&*m))
                    .collect::<Vec<_>>()
            },
        );
        // At most `reconcile_concurrency` reconciles of this scope are spawned at once: the
        // others wait in kube-runtime's queue as object references, not as spawned futures
        // (a reconcile future is sized for a whole sync). The process-wide bound across
        // scopes is the turn a reconcile takes once a sync is due (`reconcile::Turn`).
        let limit = u16::try_from(config.reconcile_concurrency.max(1)).unwrap_or(u16::MAX);
        controller = controller.with_config(RunConfig::default().concurrency(limit));
        if let Some(set) = &ctx.shards {
            controller = controller.reconcile_all_on(set.gained());
        }
        let stop = stop.clone();
        let ctx = ctx.clone();
        runs.push(async move {
            controller
                .graceful_shutdown_on(stop)
                .run(
                    |obj, ctx| super::shards::reconcile_in_shard(obj, ctx, reconcile),
                    error_policy,
                    ctx,
                )
                .for_each(|r| async move {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "controller event");
                    }
                })
                .await
        });
    }
    *ctx.caches.lock().unwrap_or_else(|p| p.into_inner()) = caches;
    let all = join_all(runs);
    let grace = config.shutdown_grace;
    tokio::select! {
        _ = all => {}
        _ = async { stop.clone().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "syncs still running after the grace period; cancelling them");
        }
    }
}
