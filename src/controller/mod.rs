//! The Kubernetes controller: keeps every ImageMirror true using the shared transfer engine.
//! Knows nothing of HTTP to registries; that is the engine's.

mod leader;
pub mod metrics;
mod outcome;
pub mod prune;
mod publish;
mod reconcile;
mod secrets;
mod shard_leases;
pub mod shards;
mod state;
pub mod status;
mod watches;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;

pub use leader::LeaderElection;
pub use metrics::Metrics;
pub use outcome::ReconcileError;
pub use reconcile::{FIELD_MANAGER, error_policy, reconcile};
pub use secrets::SecretError;
pub use shard_leases::Sharding;

use crate::api::ImageMirrorSpec;
use crate::mirror::ClientPool;
use crate::transfer::{Engine, EngineConfig};

/// Default of `--reconcile-concurrency`: enough to keep the engine's transfers and the API
/// server busy (a no-op resync is two round trips), few enough that a burst of due mirrors
/// holds a bounded number of connections and syncs in memory.
pub const DEFAULT_RECONCILE_CONCURRENCY: u16 = 32;

/// Controller settings; `main` fills them from flags.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespaces to watch; empty means all. Default: all.
    pub namespaces: Vec<String>,
    /// Limits of the shared engine. Default: `EngineConfig::default()`.
    pub engine: EngineConfig,
    /// Items (tags) copied at once per ImageMirror. Default 4.
    pub item_concurrency: usize,
    /// ImageMirrors reconciled at once past the "is a sync due" step (reading Secrets,
    /// syncing, writing status), across every watched namespace; the others wait for a turn.
    /// Bounds the memory and connections a burst (a restart, a rotated Secret every mirror
    /// names) takes. Default [`DEFAULT_RECONCILE_CONCURRENCY`].
    pub reconcile_concurrency: usize,
    /// Admin server address (`/metrics`, `/healthz`, `/readyz`); `None` serves none.
    /// Default `0.0.0.0:8080` from the CLI.
    pub metrics_addr: Option<SocketAddr>,
    /// Leader election; `None` reconciles without it. Default none.
    pub leader_election: Option<LeaderElection>,
    /// PEM bundle trusted for every registry in addition to the system roots. Default none.
    pub ca_file: Option<PathBuf>,
    /// How long running syncs may take to finish after shutdown is asked. Default 20 s.
    pub shutdown_grace: Duration,
    /// After a restart or failover, mirrors whose next sync is overdue (or that are not
    /// Ready) sync at a random point within this window instead of all at once; Ready ones
    /// keep their `status.nextSyncTime`. Default 5 min.
    pub resync_spread: Duration,
    /// Sharding across replicas with shard Leases; `None` (one shard) runs as before.
    /// Replaces leader election when set. Default none.
    pub sharding: Option<Sharding>,
    /// Label selector: only ImageMirrors matching it are watched (static sharding). Default none.
    pub selector: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            namespaces: Vec::new(),
            engine: EngineConfig::default(),
            item_concurrency: 4,
            reconcile_concurrency: usize::from(DEFAULT_RECONCILE_CONCURRENCY),
            metrics_addr: None,
            leader_election: None,
            ca_file: None,
            shutdown_grace: Duration::from_secs(20),
            resync_spread: Duration::from_secs(300),
            sharding: None,
            selector: None,
        }
    }
}

/// Why the controller stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// `--ca-file` could not be read.
    #[error("reading --ca-file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The admin server could not start.
    #[error("admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Leader election failed or the lease was lost; the process should exit and restart.
    #[error("leader election: {0}")]
    Leadership(String),
}

/// What every reconcile shares: the API client, the one engine, clients, metrics, and the
/// per-object state.
pub struct Context {
    client: Client,
    engine: Engine,
    pool: ClientPool,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    extra_ca: Option<Vec<u8>>,
    item_concurrency: usize,
    /// Permits of `reconcile_concurrency`: a reconcile that must read Secrets, sync or write
    /// status holds one.
    reconciling: Arc<tokio::sync::Semaphore>,
    resync_spread: Duration,
    /// Per UID: schedule, backoff, Secret versions, the running sync's cancel switch.
    states: state::States,
    /// The caches of the running watches (replaced when leadership is re-acquired).
    caches: Mutex<watches::Caches>,
    /// The shards held, when sharded.
    shards: Option<Arc<shards::ShardSet>>,
}

impl Context {
    /// Versions of the Secrets `spec` references, from the metadata cache of `ns`; `None`
    /// while that cache is not loaded yet.
    fn secret_versions(&self, ns: &str, spec: &ImageMirrorSpec) -> Option<Vec<String>> {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let cache: &Store<PartialObjectMeta<Secret>> = caches.secrets_for(ns)?;
        cache
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|r| r.is_ok())
            .then(|| secrets::versions(cache, ns, spec))
    }

    /// Whether the watch cache holds a newer generation of `obj` than the one being reconciled
    /// (which kube-runtime will hand to a reconcile of its own once this one returns).
    fn is_outdated(&self, obj: &crate::api::ImageMirror) -> bool {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        caches
            .generation_of(obj)
            .is_some_and(|g| g != obj.metadata.generation)
    }

    /// The object with `uid` is gone: cancel its sync, drop its state and metric series.
    fn forget(&self, uid: &str) {
        self.states.forget(uid);
        self.metrics.forget_mirror(uid);
    }
}

/// Runs the controller until `shutdown` resolves (then returns `Ok`) or leadership is lost.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let extra_ca = match &config.ca_file {
        Some(p) => Some(std::fs::read(p).map_err(|source| ControllerError::CaFile {
            path: p.display().to_string(),
            source,
        })?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let engine = Engine::new(config.engine.clone());
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ControllerError::Admin { addr, source })?;
        let (m, e, r, stop) = (
            metrics.clone(),
            engine.clone(),
            ready.clone(),
            stopped(stop_rx.clone()),
        );
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(listener, m, e, r, stop).await {
                tracing::error!(%addr, error = %err, "admin server stopped");
            }
        });
    }
    let identity = config
        .sharding
        .as_ref()
        .map(|s| s.identity.clone())
        .or_else(|| config.leader_election.as_ref().map(|l| l.identity.clone()))
        .unwrap_or_else(|| "imagemirror".into());
    let shard_set = config
        .sharding
        .as_ref()
        .map(|s| Arc::new(shards::ShardSet::new(s.shards, metrics.shards_held.clone())));
    let ctx = Arc::new(Context {
        client: client.clone(),
        engine,
        pool: ClientPool::with_http_mode(config.engine.http),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "imagemirror".into(),
                instance: Some(identity),
            },
        ),
        metrics,
        extra_ca,
        item_concurrency: config.item_concurrency.max(1),
        reconciling: Arc::new(tokio::sync::Semaphore::new(
            config
                .reconcile_concurrency
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        )),
        resync_spread: config.resync_spread,
        states: state::States::default(),
        caches: Mutex::new(watches::Caches::default()),
        shards: shard_set.clone(),
    });
    // Ready means "up and able to serve": a replica waiting for the lease is ready too, so
    // rolling updates can proceed.
    ready.store(true, std::sync::atomic::Ordering::Relaxed);

    if let (Some(sharding), Some(set)) = (&config.sharding, shard_set) {
        let work = watches::run_controllers(ctx, &config, stopped(stop_rx.clone()));
        shard_leases::run_sharded(client, sharding, set, work).await;
        return Ok(());
    }
    match &config.leader_election {
        None => {
            watches::run_controllers(ctx, &config, stopped(stop_rx.clone())).await;
            Ok(())
        }
        Some(le) => {
            leader::run_as_leader(client, le, stopped(stop_rx.clone()), |lost| {
                watches::run_controllers(ctx.clone(), &config, async move {
                    tokio::select! {
                        _ = stopped(stop_rx.clone()) => {}
                        _ = lost => {}
                    }
                })
            })
            .await
        }
    }
}
