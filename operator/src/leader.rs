//! Leader election on a `coordination.k8s.io` Lease (`kube-lease-manager`): several
//! replicas may run; only the Lease holder runs the controllers, and a replica that
//! loses the Lease stops them before anyone else can start.

use std::future::Future;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Lease duration in seconds.
    pub duration_seconds: u64,
    /// Renew this many seconds before expiry.
    pub grace_seconds: u64,
}

/// Errors of the election itself.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease manager failed.
    #[error("lease: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
}

/// Runs `work` whenever this replica holds the Lease, until `shutdown`. `work` gets
/// a token that is cancelled when leadership is lost or on shutdown, and must
/// return soon after. The Lease is released on the way out.
pub async fn run_when_leader<F, Fut>(
    client: Client,
    config: LeaderConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
    work: F,
) -> Result<(), LeaderError>
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration_seconds)
        .with_grace(config.grace_seconds)
        .build()
        .await?;
    let (mut leading, handle) = manager.watch().await;
    'outer: loop {
        while !*leading.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                changed = leading.changed() => if changed.is_err() { break 'outer },
            }
        }
        tracing::info!(identity = %config.identity, "acquired leadership");
        metrics.leader.set(1);
        let term = shutdown.child_token();
        let job = work(term.clone());
        tokio::pin!(job);
        loop {
            tokio::select! {
                _ = &mut job => break,
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow_and_update() {
                        tracing::warn!(identity = %config.identity, "lost leadership; stopping controllers");
                        term.cancel();
                        (&mut job).await;
                        break;
                    }
                }
            }
        }
        metrics.leader.set(0);
        if shutdown.is_cancelled() {
            break;
        }
    }
    // Dropping the receiver makes the manager release the Lease and exit.
    drop(leading);
    match handle.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "lease task ended abnormally");
            Ok(())
        }
    }
}
