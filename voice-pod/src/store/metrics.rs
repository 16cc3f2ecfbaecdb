//! The store's Prometheus metrics, registered into the pod's one registry
//! ([`crate::metrics::Metrics::registry`]).
//!
//! Nothing the store loses goes uncounted: every record that does not reach the
//! database ends in `voice_store_dropped_records_total{reason}`. Database errors also
//! count in the pod-wide `voice_socket_errors_total{peer="database"}`.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::{Metrics, Peer, SocketErrorKind};

/// Why a record never reached the database (`reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The call side found the writer's queue full (`try_send` failed).
    QueueFull,
    /// The database stayed down and the writer's outage buffer overflowed.
    BufferFull,
    /// The database refused the record for good (a constraint, bad data).
    Rejected,
    /// The pod shut down before the database took the record.
    Shutdown,
    /// A call update whose call row never appeared within the hold time (or by
    /// shutdown): its creation was lost, or the call is not this deployment's.
    Orphaned,
    /// A record that failed alone, again and again (a statement that always times
    /// out, a lock never released): set aside so the writer goes on.
    Poison,
}

impl DropReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::BufferFull => "buffer_full",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
            DropReason::Orphaned => "orphaned",
            DropReason::Poison => "poison",
        }
    }
}

/// Outcome of a relationship lookup at call start (`result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupResult {
    /// Found.
    Hit,
    /// No relationship yet.
    Miss,
    /// The bounded wait ran out: the call started without it.
    Timeout,
    /// The database failed: the call started without it.
    Error,
}

impl LookupResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LookupResult::Hit => "hit",
            LookupResult::Miss => "miss",
            LookupResult::Timeout => "timeout",
            LookupResult::Error => "error",
        }
    }
}

/// The store's metrics plus a handle on the pod's socket-error counter.
#[derive(Clone)]
pub struct StoreMetrics {
    pod: Metrics,
    /// `voice_store_submitted_records_total`: every record handed to the writer; each
    /// ends written, dropped (with a reason) or pending, so the three always add up.
    pub submitted: IntCounter,
    /// `voice_store_written_records_total{kind}`.
    pub written: IntCounterVec,
    /// `voice_store_dropped_records_total{reason}`.
    pub dropped: IntCounterVec,
    /// `voice_store_pending_records`: records in the writer's queue or outage buffer.
    pub pending: IntGauge,
    /// `voice_store_write_batches_total{result}` (`ok`, `retry`).
    pub batches: IntCounterVec,
    /// `voice_store_batch_seconds`: one batch transaction.
    pub batch_seconds: Histogram,
    /// `voice_store_relationship_lookups_total{result}`.
    pub lookups: IntCounterVec,
    /// `voice_store_up`: 1 while the last database operation succeeded.
    pub up: IntGauge,
}

impl StoreMetrics {
    /// Creates the store's metrics in the pod's registry.
    pub fn register(pod: &Metrics) -> Result<Self, prometheus::Error> {
        let m = Self {
            pod: pod.clone(),
            submitted: IntCounter::new(
                "voice_store_submitted_records_total",
                "Records handed to the writer (each ends written, dropped or pending)",
            )?,
            written: IntCounterVec::new(
                Opts::new(
                    "voice_store_written_records_total",
                    "Records committed to PostgreSQL by kind",
                ),
                &["kind"],
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "voice_store_dropped_records_total",
                    "Records that never reached PostgreSQL, by reason",
                ),
                &["reason"],
            )?,
            pending: IntGauge::new(
                "voice_store_pending_records",
                "Records waiting in the writer's queue or outage buffer",
            )?,
            batches: IntCounterVec::new(
                Opts::new(
                    "voice_store_write_batches_total",
                    "Writer batch transactions by result",
                ),
                &["result"],
            )?,
            batch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "voice_store_batch_seconds",
                    "Duration of one writer batch transaction",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            lookups: IntCounterVec::new(
                Opts::new(
                    "voice_store_relationship_lookups_total",
                    "Relationship lookups at call start by result (timeout/error: the call started without it)",
                ),
                &["result"],
            )?,
            up: IntGauge::new(
                "voice_store_up",
                "1 while the last PostgreSQL operation succeeded",
            )?,
        };
        let reg = pod.registry();
        reg.register(Box::new(m.submitted.clone()))?;
        reg.register(Box::new(m.written.clone()))?;
        reg.register(Box::new(m.dropped.clone()))?;
        reg.register(Box::new(m.pending.clone()))?;
        reg.register(Box::new(m.batches.clone()))?;
        reg.register(Box::new(m.batch_seconds.clone()))?;
        reg.register(Box::new(m.lookups.clone()))?;
        reg.register(Box::new(m.up.clone()))?;
        // Zero series exist from the start, so "no loss" is visible as 0, not absence.
        for r in [
            DropReason::QueueFull,
            DropReason::BufferFull,
            DropReason::Rejected,
            DropReason::Shutdown,
            DropReason::Orphaned,
            DropReason::Poison,
        ] {
            m.dropped.with_label_values(&[r.as_str()]);
        }
        Ok(m)
    }

    /// Counts lost records.
    pub fn drop_records(&self, reason: DropReason, n: usize) {
        self.dropped
            .with_label_values(&[reason.as_str()])
            .inc_by(n as u64);
    }

    /// Counts a relationship lookup.
    pub fn lookup(&self, result: LookupResult) {
        self.lookups.with_label_values(&[result.as_str()]).inc();
    }

    /// Counts a database error in `voice_socket_errors_total{peer="database"}`.
    pub fn database_error(&self, kind: SocketErrorKind) {
        self.pod.socket_error(Peer::Database, kind);
    }
}
