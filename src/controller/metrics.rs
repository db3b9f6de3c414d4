//! Prometheus metrics and the admin server (`/metrics`, `/healthz`, `/readyz`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::transfer::Engine;

/// `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or the error reason.
    pub result: String,
}

/// `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `synced` or `failed`.
    pub state: String,
}

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `copied`, `skipped`, `mounted` or `failed`.
    pub outcome: String,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabel, Counter>,
    /// Selected tags by state, over all ImageMirrors.
    pub tags: Family<StateLabel, Gauge>,
    /// Bytes sent to destinations.
    pub bytes_copied: Counter,
    /// Blobs by outcome.
    pub blobs: Family<OutcomeLabel, Counter>,
    /// Duration of whole syncs.
    pub sync_duration: Histogram,
    /// Blob transfers in flight in the shared engine.
    pub in_flight: Gauge,
    per_mirror: Mutex<HashMap<String, (i64, i64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ResultLabel, Counter>::default();
        let tags = Family::<StateLabel, Gauge>::default();
        let bytes_copied = Counter::default();
        let blobs = Family::<OutcomeLabel, Counter>::default();
        let sync_duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        let in_flight = Gauge::default();
        registry.register(
            "imagemirror_reconcile",
            "Reconciles by result",
            reconciles.clone(),
        );
        registry.register(
            "imagemirror_tags",
            "Selected tags by state, over all ImageMirrors",
            tags.clone(),
        );
        registry.register(
            "imagemirror_bytes_copied",
            "Bytes sent to destination registries",
            bytes_copied.clone(),
        );
        registry.register("imagemirror_blobs", "Blobs by outcome", blobs.clone());
        registry.register(
            "imagemirror_sync_duration_seconds",
            "Duration of one ImageMirror sync",
            sync_duration.clone(),
        );
        registry.register(
            "imagemirror_transfers_in_flight",
            "Blob transfers running in the shared engine",
            in_flight.clone(),
        );
        Metrics {
            registry,
            reconciles,
            tags,
            bytes_copied,
            blobs,
            sync_duration,
            in_flight,
            per_mirror: Mutex::new(HashMap::new()),
        }
    }

    /// Records one mirror's tag counts (replacing its previous ones); `None` forgets it.
    pub fn set_mirror_tags(&self, key: &str, counts: Option<(i64, i64)>) {
        let mut map = self.per_mirror.lock().unwrap_or_else(|p| p.into_inner());
        match counts {
            Some(c) => map.insert(key.to_string(), c),
            None => map.remove(key),
        };
        let (synced, failed) = map.values().fold((0, 0), |(s, f), (a, b)| (s + a, f + b));
        self.tags
            .get_or_create(&StateLabel {
                state: "synced".into(),
            })
            .set(synced);
        self.tags
            .get_or_create(&StateLabel {
                state: "failed".into(),
            })
            .set(failed);
    }

    /// Counts a blob outcome.
    pub fn blob(&self, outcome: &str) {
        self.blobs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    engine: Engine,
    ready: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves. `/readyz` answers
/// 200 once `ready` is set — also on replicas that are not the leader, so rollouts proceed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    engine: Engine,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_handler))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(ready_handler))
        .with_state(AdminState {
            metrics,
            engine,
            ready,
        });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin server listening");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    s.metrics.in_flight.set(s.engine.in_flight() as i64);
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn ready_handler(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}
