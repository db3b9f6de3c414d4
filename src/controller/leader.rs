//! Leader election with a coordination.k8s.io Lease (kube-lease-manager): only the holder
//! reconciles; losing the lease stops work.

use std::future::Future;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use super::ControllerError;

/// Where the Lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease (the release namespace).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Lease duration in seconds. Default 15.
    pub duration_seconds: u64,
    /// Renew this long before expiry, in seconds. Default 5.
    pub grace_seconds: u64,
}

/// Waits for the lease (or `stop`), then runs `work(lost)` where `lost` resolves if the lease
/// is lost. Returns `Ok` when stopped, `Err` when leadership was lost or election failed.
pub async fn run_as_leader<W, F>(
    client: Client,
    le: &LeaderElection,
    stop: impl Future<Output = ()> + Send,
    work: W,
) -> Result<(), ControllerError>
where
    W: FnOnce(futures_util::future::BoxFuture<'static, ()>) -> F,
    F: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, &le.lease_name)
        .with_namespace(&le.namespace)
        .with_identity(&le.identity)
        .with_duration(le.duration_seconds)
        .with_grace(le.grace_seconds)
        .build()
        .await
        .map_err(|e| ControllerError::Leadership(e.to_string()))?;
    let (rx, task) = manager.watch().await;
    tracing::info!(lease = %le.lease_name, identity = %le.identity, "waiting for leadership");
    let mut waiter = rx.clone();
    let acquired = tokio::select! {
        _ = stop => None,
        r = waiter.wait_for(|leader| *leader) => Some(r.is_ok()),
    };
    match acquired {
        None => {
            // Closing the channel ends the manager's task (and releases a held lease).
            drop((rx, waiter));
            let _ = task.await;
            return Ok(());
        }
        Some(false) => {
            return Err(ControllerError::Leadership(
                "the lease manager stopped".into(),
            ));
        }
        Some(true) => {}
    }
    drop(waiter);
    tracing::info!(identity = %le.identity, "became leader");
    let mut lost_rx = rx.clone();
    let lost = Box::pin(async move {
        let _ = lost_rx.wait_for(|leader| !*leader).await;
    });
    work(lost).await;
    let still_leader = *rx.borrow();
    // Closing the channel ends the manager's task, which releases the lease.
    drop(rx);
    let _ = task.await;
    if still_leader {
        Ok(())
    } else {
        Err(ControllerError::Leadership("lost the lease".into()))
    }
}
