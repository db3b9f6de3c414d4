//! The Kubernetes controller: keeps every ImageMirror true using the shared transfer engine.
//! Knows nothing of HTTP to registries; that is the engine's.

mod leader;
pub mod metrics;
mod reconcile;
mod secrets;
pub mod status;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

pub use leader::LeaderElection;
pub use metrics::Metrics;
pub use reconcile::{FIELD_MANAGER, ReconcileError, error_policy, reconcile};
pub use secrets::SecretError;

use crate::api::ImageMirror;
use crate::mirror::ClientPool;
use crate::transfer::{Engine, EngineConfig};

/// Controller settings; `main` fills them from flags.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespaces to watch; empty means all. Default: all.
    pub namespaces: Vec<String>,
    /// Limits of the shared engine. Default: `EngineConfig::default()`.
    pub engine: EngineConfig,
    /// Items (tags) copied at once per ImageMirror. Default 4.
    pub item_concurrency: usize,
    /// Admin server address (`/metrics`, `/healthz`, `/readyz`); `None` serves none.
    /// Default `0.0.0.0:8080` from the CLI.
    pub metrics_addr: Option<SocketAddr>,
    /// Leader election; `None` reconciles without it. Default none.
    pub leader_election: Option<LeaderElection>,
    /// PEM bundle trusted for every registry in addition to the system roots. Default none.
    pub ca_file: Option<PathBuf>,
    /// How long running syncs may take to finish after shutdown is asked. Default 20 s.
    pub shutdown_grace: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            namespaces: Vec::new(),
            engine: EngineConfig::default(),
            item_concurrency: 4,
            metrics_addr: None,
            leader_election: None,
            ca_file: None,
            shutdown_grace: Duration::from_secs(20),
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

/// What every reconcile shares: the API client, the one engine, clients, metrics.
pub struct Context {
    client: Client,
    engine: Engine,
    pool: ClientPool,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    extra_ca: Option<Vec<u8>>,
    item_concurrency: usize,
    /// Per `ns/name`: the Secret versions the last sync used, to resync when they change.
    secret_versions: Mutex<HashMap<String, Vec<String>>>,
    /// Per `ns/name`: consecutive failed reconciles, for backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    fn secret_versions(&self, key: &str) -> Option<Vec<String>> {
        self.secret_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn set_secret_versions(&self, key: &str, v: Vec<String>) {
        self.secret_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), v);
    }

    fn bump_backoff(&self, key: &str) -> u32 {
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.to_string()).or_default();
        *n += 1;
        *n - 1
    }

    fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
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
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
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
        .leader_election
        .as_ref()
        .map(|l| l.identity.clone())
        .unwrap_or_else(|| "imagemirror".into());
    let ctx = Arc::new(Context {
        client: client.clone(),
        engine,
        pool: ClientPool::new(),
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
        secret_versions: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    // Ready means "up and able to serve": a replica waiting for the lease is ready too, so
    // rolling updates can proceed.
    ready.store(true, std::sync::atomic::Ordering::Relaxed);

    match &config.leader_election {
        None => {
            run_controllers(ctx, &config, stopped(stop_rx.clone())).await;
            Ok(())
        }
        Some(le) => {
            leader::run_as_leader(client, le, stopped(stop_rx.clone()), |lost| {
                run_controllers(ctx.clone(), &config, async move {
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

/// One kube-runtime Controller per watched namespace (or one for all), sharing `ctx`. Returns
/// when `stop` resolves and running syncs finished, or after the grace period.
async fn run_controllers(
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
    let runs = scopes.into_iter().map(|ns| {
        let (mirrors, secrets): (Api<ImageMirror>, Api<Secret>) = match &ns {
            Some(ns) => (
                Api::namespaced(ctx.client.clone(), ns),
                Api::namespaced(ctx.client.clone(), ns),
            ),
            None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
        };
        let controller = Controller::new(mirrors, watcher::Config::default().any_semantic());
        let store = controller.store();
        let stop = stop.clone();
        let ctx = ctx.clone();
        async move {
            controller
                .watches(
                    secrets,
                    watcher::Config::default().any_semantic(),
                    move |secret: Secret| {
                        // A Secret (re)appearing or changing wakes the mirrors that name it.
                        let ns = secret.namespace();
                        let name = secret.name_any();
                        store
                            .state()
                            .into_iter()
                            .filter(|m| m.namespace() == ns && references(m, &name))
                            .map(|m| ObjectRef::from_obj(&*m))
                            .collect::<Vec<_>>()
                    },
                )
                .graceful_shutdown_on(stop)
                .run(reconcile, error_policy, ctx)
                .for_each(|r| async move {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "controller event");
                    }
                })
                .await
        }
    });
    let all = join_all(runs);
    let grace = config.shutdown_grace;
    tokio::select! {
        _ = all => {}
        _ = async { stop.clone().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "syncs still running after the grace period; cancelling them");
        }
    }
}

fn references(m: &ImageMirror, secret: &str) -> bool {
    let s = &m.spec;
    [&s.source, &s.destination].iter().any(|side| {
        side.credentials_secret.as_deref() == Some(secret)
            || side.ca_secret.as_deref() == Some(secret)
    })
}
