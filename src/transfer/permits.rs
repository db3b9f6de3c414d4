//! What a running transfer holds: its share of the global limit and of each registry's
//! (adaptive) limit, and the feedback it gives those limits when it ends.

use std::sync::Arc;

use super::TransferError;
use super::adaptive;
use super::{BIG_UNITS, BlobOutcome, Engine, units};
use crate::registry::RegistryError;

impl Engine {
    pub(super) fn transfer_limit(&self, host: &str) -> Arc<adaptive::AdaptiveLimit> {
        let config = &self.inner.config;
        let mut map = self
            .inner
            .transfer_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(host.to_string())
            .or_insert_with(|| {
                let max = config.max_per_registry.max(1);
                Arc::new(adaptive::AdaptiveLimit::new(
                    config.initial_per_registry.unwrap_or(max),
                    max,
                    BIG_UNITS,
                    config.adaptive,
                ))
            })
            .clone()
    }

    /// Each registry's transfer limit now and its cap, by host (in host order): where the
    /// adaptive limits settled.
    pub fn registry_concurrency(&self) -> Vec<(String, u32, u32)> {
        let map = self
            .inner
            .transfer_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = map
            .iter()
            .map(|(h, l)| (h.clone(), l.current(), l.max()))
            .collect();
        out.sort();
        out
    }

    /// Permits for a transfer of `size` bytes between two registries: per registry in name
    /// order first (so two transfers never wait on each other's registry permit), then the
    /// global one, so a queue on one busy registry holds no global slot an idle registry
    /// could use.
    pub(super) async fn permits(&self, a: &str, b: &str, size: u64) -> Permits {
        let n = units(size);
        let mut limits = Vec::new();
        let mut hosts = vec![a.to_string(), b.to_string()];
        hosts.sort();
        hosts.dedup();
        for h in hosts {
            if let Some(p) = self.transfer_limit(&h).acquire(n).await {
                limits.push((h, p));
            }
        }
        let held = self.inner.global.clone().acquire_many_owned(n).await.ok();
        Permits {
            _held: held.into_iter().collect(),
            limits,
        }
    }

    /// Tells the transfer limits of `a` and `b` that an attempt started at `started` failed
    /// with `err` after its permits were dropped (the watchdog abandoned it).
    pub(super) fn note_failure(
        &self,
        a: &str,
        b: &str,
        started: std::time::Instant,
        err: &TransferError,
    ) {
        let signal = signal_of(err);
        if signal == adaptive::Signal::Neutral {
            return;
        }
        let text = err.to_string();
        let named: Vec<&str> = [a, b].into_iter().filter(|h| text.contains(h)).collect();
        let blamed = if named.is_empty() { vec![a, b] } else { named };
        for h in blamed {
            self.transfer_limit(h).record(started, signal);
        }
    }

    /// A permit for one mount into `host`.
    pub(super) async fn mount_permit(&self, host: &str) -> Permits {
        let held = self
            .registry_limit(host, Lane::Mount)
            .acquire_owned()
            .await
            .ok();
        Permits {
            _held: held.into_iter().collect(),
            limits: Vec::new(),
        }
    }
}

/// Which limit of a registry a request counts against (transfers have their adaptive limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Lane {
    /// Cross-repository mounts: one request each, moving no bytes, so they do not queue behind
    /// transfers; bounded all the same (as many as small transfers), so a thousand mirrors
    /// sharing a layer do not send a thousand mounts at once.
    Mount,
}

/// The global permit and per-registry permits of one running transfer; released on drop.
pub(super) struct Permits {
    pub(super) _held: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// The registries' adaptive limits, by host.
    pub(super) limits: Vec<(String, adaptive::LimitPermit)>,
}

impl Permits {
    /// Releases the permits, telling each registry's limit how the attempt ended: push-back
    /// (429/503, a stall, a broken connection) counts against the registry the error names,
    /// or both when it names neither.
    pub(super) fn finish(self, result: &Result<BlobOutcome, TransferError>, bytes: u64) {
        let pushback = match result {
            Err(e) => signal_of(e),
            Ok(_) => adaptive::Signal::Neutral,
        };
        let blamed = match result {
            Err(e) if pushback != adaptive::Signal::Neutral => {
                let text = e.to_string();
                let named: Vec<bool> = self
                    .limits
                    .iter()
                    .map(|(h, _)| text.contains(h.as_str()))
                    .collect();
                let any = named.iter().any(|b| *b);
                named.into_iter().map(|n| n || !any).collect()
            }
            _ => vec![false; self.limits.len()],
        };
        for ((_, permit), blame) in self.limits.into_iter().zip(blamed) {
            let signal = match result {
                Ok(_) => adaptive::Signal::Done { bytes },
                Err(_) if blame => pushback,
                Err(_) => adaptive::Signal::Neutral,
            };
            permit.finish(signal);
        }
    }
}

/// What an error tells a registry's adaptive limit: throttling (429, 503 with `Retry-After`:
/// the shared pause deals with it), overload of the registry or the path to it (the limit
/// backs off), or nothing about load.
pub(super) fn signal_of(e: &TransferError) -> adaptive::Signal {
    match e {
        TransferError::Stalled { .. }
        | TransferError::UploadSessionLost { .. }
        | TransferError::ChunkNotConsumed { .. } => adaptive::Signal::Congested,
        TransferError::Source { source, .. } | TransferError::Destination { source, .. } => {
            registry_signal(source)
        }
        _ => adaptive::Signal::Neutral,
    }
}

fn registry_signal(e: &RegistryError) -> adaptive::Signal {
    match e {
        RegistryError::RateLimited { .. }
        | RegistryError::Status {
            status: 503,
            retry_after: Some(_),
            ..
        } => adaptive::Signal::Throttled,
        RegistryError::Transport { .. }
        | RegistryError::Status {
            status: 502..=504, ..
        } => adaptive::Signal::Congested,
        _ => adaptive::Signal::Neutral,
    }
}
