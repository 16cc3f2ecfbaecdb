//! Operator metrics (names are the dashboard's contract):
//! `operator_reconcile_duration_seconds{kind}` and
//! `operator_reconcile_errors_total{kind,reason}`, plus a leader gauge.

use std::time::Instant;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The operator's metrics, in their own registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// Reconcile wall time per kind (`Persona`, `VoiceDeployment`).
    pub reconcile_duration: HistogramVec,
    /// Failed reconciles per kind and [`crate::error::Error::metric_label`].
    pub reconcile_errors: IntCounterVec,
    /// Reconciles run per kind.
    pub reconciles: IntCounterVec,
    /// 1 while this replica holds the leader Lease (or runs without election).
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        // Static definitions: these only fail on programming errors (bad names).
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "operator_reconcile_duration_seconds",
                "Time spent in one reconcile, by kind",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )
        .expect("valid histogram");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "operator_reconcile_errors_total",
                "Failed reconciles, by kind and reason",
            ),
            &["kind", "reason"],
        )
        .expect("valid counter");
        let reconciles = IntCounterVec::new(
            Opts::new("operator_reconciles_total", "Reconciles run, by kind"),
            &["kind"],
        )
        .expect("valid counter");
        let leader = IntGauge::new("operator_leader", "1 while this replica is the leader")
            .expect("valid gauge");
        for c in [
            Box::new(reconcile_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconciles.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            reconciles,
            leader,
        }
    }

    /// Starts timing one reconcile of `kind`; the duration is observed on drop.
    pub fn start(&self, kind: &'static str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[kind]).inc();
        ReconcileTimer {
            histogram: self.reconcile_duration.clone(),
            kind,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn error(&self, kind: &str, reason: &str) {
        self.reconcile_errors
            .with_label_values(&[kind, reason])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Observes the reconcile duration when dropped.
pub struct ReconcileTimer {
    histogram: HistogramVec,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram
            .with_label_values(&[self.kind])
            .observe(self.start.elapsed().as_secs_f64());
    }
}
