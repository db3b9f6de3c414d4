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

/// Labels of a per-ImageMirror series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabel {
    /// The ImageMirror's namespace.
    pub namespace: String,
    /// The ImageMirror's name.
    pub name: String,
    /// `synced` or `failed`.
    pub state: String,
}

/// One mirror's last counts, by UID.
struct MirrorCounts {
    namespace: String,
    name: String,
    synced: i64,
    failed: i64,
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
    /// Selected tags by state, per ImageMirror; a deleted mirror's series are removed.
    pub mirror_tags: Family<MirrorLabel, Gauge>,
    /// Bytes sent to destinations.
    pub bytes_copied: Counter,
    /// Blobs by outcome.
    pub blobs: Family<OutcomeLabel, Counter>,
    /// Duration of whole syncs.
    pub sync_duration: Histogram,
    /// Blob transfers in flight in the shared engine.
    pub in_flight: Gauge,
    /// Shards whose Lease this replica holds (0 when not sharded).
    pub shards_held: Gauge,
    /// Reconciles past the "is a sync due" step, holding a `--reconcile-concurrency` permit.
    pub reconciles_in_flight: Gauge,
    per_mirror: Mutex<HashMap<String, MirrorCounts>>,
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
        let mirror_tags = Family::<MirrorLabel, Gauge>::default();
        let bytes_copied = Counter::default();
        let blobs = Family::<OutcomeLabel, Counter>::default();
        let sync_duration = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        let in_flight = Gauge::default();
        let shards_held = Gauge::default();
        let reconciles_in_flight = Gauge::default();
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
            "imagemirror_mirror_tags",
            "Selected tags of one ImageMirror by state",
            mirror_tags.clone(),
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
        registry.register(
            "imagemirror_shards_held",
            "Shard Leases this replica holds (sharded controllers only)",
            shards_held.clone(),
        );
        registry.register(
            "imagemirror_reconciles_in_flight",
            "Reconciles reading Secrets, syncing or writing status now (at most --reconcile-concurrency)",
            reconciles_in_flight.clone(),
        );
        Metrics {
            registry,
            reconciles,
            tags,
            mirror_tags,
            bytes_copied,
            blobs,
            sync_duration,
            in_flight,
            shards_held,
            reconciles_in_flight,
            per_mirror: Mutex::new(HashMap::new()),
        }
    }

    /// Records the tag counts of the mirror with `uid` (replacing its previous ones).
    pub fn set_mirror_tags(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        synced: i64,
        failed: i64,
    ) {
        let mut map = self.per_mirror.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            uid.to_string(),
            MirrorCounts {
                namespace: namespace.to_string(),
                name: name.to_string(),
                synced,
                failed,
            },
        );
        for (state, v) in [("synced", synced), ("failed", failed)] {
            self.mirror_tags
                .get_or_create(&mirror_label(namespace, name, state))
                .set(v);
        }
        self.update_totals(&map);
    }

    /// Forgets the mirror with `uid` (it was deleted): its series go from `/metrics`.
    pub fn forget_mirror(&self, uid: &str) {
        let mut map = self.per_mirror.lock().unwrap_or_else(|p| p.into_inner());
        let Some(gone) = map.remove(uid) else {
            return;
        };
        // A mirror re-created under the same name has a new UID and owns the series now.
        let reused = map
            .values()
            .any(|m| m.namespace == gone.namespace && m.name == gone.name);
        if !reused {
            for state in ["synced", "failed"] {
                self.mirror_tags
                    .remove(&mirror_label(&gone.namespace, &gone.name, state));
            }
        }
        self.update_totals(&map);
    }

    fn update_totals(&self, map: &HashMap<String, MirrorCounts>) {
        let (synced, failed) = map.values().fold((0i64, 0i64), |(s, f), m| {
            (s.saturating_add(m.synced), f.saturating_add(m.failed))
        });
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

fn mirror_label(namespace: &str, name: &str, state: &str) -> MirrorLabel {
    MirrorLabel {
        namespace: namespace.to_string(),
        name: name.to_string(),
        state: state.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_mirror_leaves_no_series_but_a_reused_name_keeps_its_own() {
        let m = Metrics::new();
        m.set_mirror_tags("u1", "ns", "app", 2, 1);
        m.set_mirror_tags("u2", "ns", "other", 1, 0);
        let text = m.encode();
        assert!(
            text.contains(r#"imagemirror_mirror_tags{namespace="ns",name="app",state="synced"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"imagemirror_tags{state="synced"} 3"#),
            "{text}"
        );
        m.forget_mirror("u1");
        let text = m.encode();
        assert!(!text.contains(r#"name="app""#), "{text}");
        assert!(
            text.contains(r#"imagemirror_tags{state="synced"} 1"#),
            "{text}"
        );
        m.set_mirror_tags("u3", "ns", "other", 5, 0);
        m.forget_mirror("u2");
        assert!(
            m.encode().contains(
                r#"imagemirror_mirror_tags{namespace="ns",name="other",state="synced"} 5"#
            )
        );
    }
}
