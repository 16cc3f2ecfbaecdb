//! Graceful shutdown: calls last minutes, and a pod must not cut them.
//!
//! On SIGTERM (or SIGINT) the pod:
//! 1. reports not-ready at once (`/readyz` 503) so Kubernetes stops routing to it,
//!    before anything else (the scheduler stops beside the drain, not before it),
//! 2. still serves what reaches it late (endpoint removal takes a moment to reach
//!    every proxy and load balancer): an answer webhook gets its usual TwiML, whose
//!    stream URL is the public one, so the stream lands on a ready pod; a stream
//!    that does reach this pod is taken and tracked like any other (it has until
//!    the drain deadline). Only `/v1/calls` answers 503 (the client retries through
//!    the Service and another pod places the call),
//! 3. waits for active calls to end, up to the drain deadline,
//! 4. cancels what is left (handlers say goodbye and hang up), stops its servers,
//!    gives memory summaries and the store's writer their last chance, closes the
//!    database pool, then exits.
//!
//! Every phase after the drain deadline has its own deadline ([`ShutdownBudget`]);
//! they add up to [`POD_SHUTDOWN_AFTER_DRAIN_SECONDS`], which the operator adds to the
//! drain deadline for `terminationGracePeriodSeconds`, so a pod never outlives its
//! grace period, whatever hangs (a database that accepts connections and never
//! answers included). Records still unwritten at the writer's deadline are counted
//! (`voice_store_dropped_records_total{reason}`).
//!
//! The metrics port stays up until the process exits. Call tasks are tracked by a
//! [`TaskTracker`] (the `run(listener, shutdown)` pattern of mini-redis: each call
//! holds a token, the server waits for all of them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TrackedFuture;

pub use callmeback_api::POD_SHUTDOWN_AFTER_DRAIN_SECONDS;

use crate::metrics::Metrics;

/// Deadlines of the shutdown phases after the drain deadline. Their sum
/// ([`ShutdownBudget::total`]) is [`POD_SHUTDOWN_AFTER_DRAIN_SECONDS`] at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownBudget {
    /// Calls cancelled at the drain deadline get this long to say goodbye. The
    /// scheduler's stop (placements in flight) runs beside the drain and is bounded
    /// by this too.
    pub cancel_grace: Duration,
    /// The app server and the persona watcher stop (together).
    pub servers: Duration,
    /// After-call memory summaries still running.
    pub memory: Duration,
    /// The store's writer writes what it holds (its deadline, then it is stopped).
    pub writer: Duration,
    /// The database pool closes.
    pub pool_close: Duration,
    /// The metrics server stops, last: the final counts stay scrapable until then.
    pub metrics: Duration,
}

/// The pod's split of [`POD_SHUTDOWN_AFTER_DRAIN_SECONDS`].
pub const SHUTDOWN_BUDGET: ShutdownBudget = ShutdownBudget {
    cancel_grace: Duration::from_secs(7),
    servers: Duration::from_secs(2),
    memory: Duration::from_secs(5),
    writer: Duration::from_secs(8),
    pool_close: Duration::from_secs(2),
    metrics: Duration::from_secs(1),
};

impl ShutdownBudget {
    /// The longest the pod takes after its drain deadline.
    pub fn total(&self) -> Duration {
        self.cancel_grace
            + self.servers
            + self.memory
            + self.writer
            + self.pool_close
            + self.metrics
    }
}

/// Time handlers get to wrap up after the drain deadline cancelled them.
pub const CANCEL_GRACE: Duration = SHUTDOWN_BUDGET.cancel_grace;

/// Shared drain state: one per pod, cloned into every handler.
#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    /// Set once, on the shutdown signal; read by every webhook and probe.
    draining: AtomicBool,
    /// Every media stream task (from upgrade to close).
    calls: TaskTracker,
    /// Cancelled at the drain deadline; each call gets a child token.
    cancel_calls: CancellationToken,
    metrics: Arc<Metrics>,
}

/// How the drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every call ended on its own.
    Finished,
    /// The deadline passed; remaining calls were cancelled.
    DeadlineCancelled,
}

impl Drain {
    /// A pod that is not draining.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                calls: TaskTracker::new(),
                cancel_calls: CancellationToken::new(),
                metrics,
            }),
        }
    }

    /// True once draining began.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: readiness off, the scheduler and `/v1/calls` stop taking work.
    pub fn begin(&self) {
        if !self.inner.draining.swap(true, Ordering::SeqCst) {
            self.inner.metrics.draining.set(1);
            self.inner.calls.close();
            tracing::info!(
                active_streams = self.inner.calls.len(),
                "draining: not ready; live calls go on"
            );
        }
    }

    /// Wraps a stream task so the drain waits for it.
    pub fn track<F: Future>(&self, fut: F) -> TrackedFuture<F> {
        self.inner.calls.track_future(fut)
    }

    /// A token that fires when the pod must end this call (drain deadline).
    pub fn call_token(&self) -> CancellationToken {
        self.inner.cancel_calls.child_token()
    }

    /// Streams in progress.
    pub fn active_streams(&self) -> usize {
        self.inner.calls.len()
    }

    /// Waits for calls up to `deadline`, then cancels the rest and gives them
    /// [`CANCEL_GRACE`]. Call after [`Drain::begin`].
    pub async fn wait_for_calls(&self, deadline: Duration) -> DrainOutcome {
        self.begin();
        if tokio::time::timeout(deadline, self.inner.calls.wait())
            .await
            .is_ok()
        {
            return DrainOutcome::Finished;
        }
        tracing::warn!(
            remaining = self.inner.calls.len(),
            deadline_seconds = deadline.as_secs(),
            "drain deadline passed; ending the remaining calls"
        );
        self.inner.cancel_calls.cancel();
        if tokio::time::timeout(CANCEL_GRACE, self.inner.calls.wait())
            .await
            .is_err()
        {
            tracing::error!(
                remaining = self.inner.calls.len(),
                "calls did not end after cancellation"
            );
        }
        DrainOutcome::DeadlineCancelled
    }
}

/// Which signal asked the pod to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM (Kubernetes).
    Term,
    /// SIGINT (Ctrl-C).
    Int,
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => Signal::Term,
                    _ = int.recv() => Signal::Int,
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                Signal::Int
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Int
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The pod's shutdown phases fit in the time the operator grants after the drain
    // deadline (terminationGracePeriodSeconds = drain + preStop + this + slack).
    #[test]
    fn shutdown_phases_fit_the_operators_grace_period() {
        assert!(
            SHUTDOWN_BUDGET.total() <= Duration::from_secs(POD_SHUTDOWN_AFTER_DRAIN_SECONDS),
            "{:?} > {POD_SHUTDOWN_AFTER_DRAIN_SECONDS} s",
            SHUTDOWN_BUDGET.total()
        );
    }
}
