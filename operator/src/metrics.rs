//! Operator metrics (names are the dashboard's contract):
//! `operator_reconcile_duration_seconds{kind}` and
//! `operator_reconcile_errors_total{kind,reason}`, a leader gauge, and per
//! VoiceDeployment the scaling picture the autoscaler works from
//! (`operator_voicedeployment_{desired_replicas,replicas,ready_replicas,active_calls,
//! call_capacity,unknown_load_pods}{voicedeployment="<namespace>/<name>"}`): one
//! label set per VoiceDeployment, removed when it goes. One label, not `namespace`
//! plus `name`: a scrape would rename a `namespace` label to `exported_namespace`
//! (the operator pod's own namespace is a target label). The load poller counts
//! `operator_pod_load_reads_total{result}`,
//! `operator_pod_annotation_patches_total`, `operator_autoscale_changes_total` and
//! `operator_load_poll_duration_seconds`.

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    /// Failed renewals of the leader Lease (the holder stops at the renew deadline).
    pub leader_renew_failures: IntCounter,
    /// Pod `/load` reads by result (`ok` or why the load is unknown).
    pub load_reads: IntCounterVec,
    /// Pod annotation patches (deletion cost, eviction guards) written.
    pub pod_patches: IntCounter,
    /// Replica changes decided by the calls autoscaler.
    pub scale_changes: IntCounter,
    /// Wall time of one load poll over every pod.
    pub poll_duration: Histogram,
    /// Per VoiceDeployment: what the autoscaler saw and decided.
    pub scaling: ScalingGauges,
    /// Server-side applies of owned objects by kind and outcome (`written`, or
    /// `unchanged` when the owned-object cache showed it as last applied).
    pub applies: IntCounterVec,
}

/// One VoiceDeployment's scaling picture, as [`Metrics::observe_scaling`] takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScalingObservation {
    /// Replicas the operator wants.
    pub desired_replicas: i64,
    /// Replicas the Deployment has.
    pub replicas: i64,
    /// Ready replicas.
    pub ready_replicas: i64,
    /// Calls in progress over the pods whose load is known.
    pub active_calls: i64,
    /// Call capacity over those pods.
    pub call_capacity: i64,
    /// Pods whose load could not be read.
    pub unknown_load_pods: i64,
}

/// The per-VoiceDeployment gauges (label `voicedeployment`: `<namespace>/<name>`).
#[derive(Clone)]
pub struct ScalingGauges {
    desired_replicas: IntGaugeVec,
    replicas: IntGaugeVec,
    ready_replicas: IntGaugeVec,
    active_calls: IntGaugeVec,
    call_capacity: IntGaugeVec,
    unknown_load_pods: IntGaugeVec,
}

impl ScalingGauges {
    fn new() -> Self {
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["voicedeployment"]).expect("valid gauge")
        };
        Self {
            desired_replicas: gauge(
                "operator_voicedeployment_desired_replicas",
                "Voice pods the operator wants for a VoiceDeployment",
            ),
            replicas: gauge(
                "operator_voicedeployment_replicas",
                "Voice pods the Deployment has",
            ),
            ready_replicas: gauge(
                "operator_voicedeployment_ready_replicas",
                "Voice pods ready to take calls",
            ),
            active_calls: gauge(
                "operator_voicedeployment_active_calls",
                "Calls in progress on the voice pods whose load is known",
            ),
            call_capacity: gauge(
                "operator_voicedeployment_call_capacity",
                "Calls the voice pods whose load is known take at once",
            ),
            unknown_load_pods: gauge(
                "operator_voicedeployment_unknown_load_pods",
                "Voice pods whose /load could not be read (counted as full)",
            ),
        }
    }

    fn all(&self) -> [&IntGaugeVec; 6] {
        [
            &self.desired_replicas,
            &self.replicas,
            &self.ready_replicas,
            &self.active_calls,
            &self.call_capacity,
            &self.unknown_load_pods,
        ]
    }
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
        let leader_renew_failures = IntCounter::new(
            "operator_leader_renew_failures_total",
            "Failed renewals of the leader Lease",
        )
        .expect("valid counter");
        let scaling = ScalingGauges::new();
        for g in scaling.all() {
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric names");
        }
        let load_reads = IntCounterVec::new(
            Opts::new(
                "operator_pod_load_reads_total",
                "Voice pod /load reads, by result",
            ),
            &["result"],
        )
        .expect("valid counter");
        let pod_patches = IntCounter::new(
            "operator_pod_annotation_patches_total",
            "Voice pod annotation patches (deletion cost, eviction guards)",
        )
        .expect("valid counter");
        let scale_changes = IntCounter::new(
            "operator_autoscale_changes_total",
            "Replica changes decided by the calls autoscaler",
        )
        .expect("valid counter");
        let poll_duration = Histogram::with_opts(
            HistogramOpts::new(
                "operator_load_poll_duration_seconds",
                "Time one load poll over every voice pod takes",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid histogram");
        let applies = IntCounterVec::new(
            Opts::new(
                "operator_applies_total",
                "Server-side applies of owned objects, by kind and outcome (written, unchanged)",
            ),
            &["kind", "outcome"],
        )
        .expect("valid counter");
        for c in [
            Box::new(reconcile_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(applies.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(reconciles.clone()),
            Box::new(leader.clone()),
            Box::new(leader_renew_failures.clone()),
            Box::new(load_reads.clone()),
            Box::new(pod_patches.clone()),
            Box::new(scale_changes.clone()),
            Box::new(poll_duration.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            reconciles,
            leader,
            leader_renew_failures,
            load_reads,
            pod_patches,
            scale_changes,
            poll_duration,
            scaling,
            applies,
        }
    }

    /// Counts one apply decision for an owned object of `kind`.
    pub fn applied(&self, kind: &str, written: bool) {
        let outcome = if written { "written" } else { "unchanged" };
        self.applies.with_label_values(&[kind, outcome]).inc();
    }

    /// Sets one VoiceDeployment's scaling gauges.
    pub fn observe_scaling(&self, namespace: &str, name: &str, o: &ScalingObservation) {
        let g = &self.scaling;
        let key = format!("{namespace}/{name}");
        let labels = [key.as_str()];
        g.desired_replicas
            .with_label_values(&labels)
            .set(o.desired_replicas);
        g.replicas.with_label_values(&labels).set(o.replicas);
        g.ready_replicas
            .with_label_values(&labels)
            .set(o.ready_replicas);
        g.active_calls
            .with_label_values(&labels)
            .set(o.active_calls);
        g.call_capacity
            .with_label_values(&labels)
            .set(o.call_capacity);
        g.unknown_load_pods
            .with_label_values(&labels)
            .set(o.unknown_load_pods);
    }

    /// Drops the scaling gauges of every VoiceDeployment not in `live`
    /// (`<namespace>/<name>` keys): deleted ones leave no stale series.
    pub fn retain_scaling(&self, live: &std::collections::HashSet<String>) {
        use prometheus::core::Collector;
        let stale: Vec<String> = self
            .scaling
            .desired_replicas
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .flat_map(|m| m.get_label())
            .filter(|l| l.name() == "voicedeployment" && !live.contains(l.value()))
            .map(|l| l.value().to_owned())
            .collect();
        for key in stale {
            if let Some((ns, name)) = key.split_once('/') {
                self.forget_scaling(ns, name);
            }
        }
    }

    /// Drops a deleted VoiceDeployment's scaling gauges (no stale series).
    pub fn forget_scaling(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        for g in self.scaling.all() {
            // Absent label sets are fine: nothing to remove.
            let _ = g.remove_label_values(&[key.as_str()]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_gauges_are_exported_per_voice_deployment_and_forgotten_on_delete() {
        // Proves observe_scaling exports every gauge with the VoiceDeployment's
        // labels and forget_scaling leaves no stale series behind.
        let m = Metrics::new();
        let o = ScalingObservation {
            desired_replicas: 5,
            replicas: 4,
            ready_replicas: 3,
            active_calls: 16,
            call_capacity: 400,
            unknown_load_pods: 1,
        };
        m.observe_scaling("voice", "front-desk", &o);
        let text = m.render();
        for line in [
            r#"operator_voicedeployment_desired_replicas{voicedeployment="voice/front-desk"} 5"#,
            r#"operator_voicedeployment_replicas{voicedeployment="voice/front-desk"} 4"#,
            r#"operator_voicedeployment_ready_replicas{voicedeployment="voice/front-desk"} 3"#,
            r#"operator_voicedeployment_active_calls{voicedeployment="voice/front-desk"} 16"#,
            r#"operator_voicedeployment_call_capacity{voicedeployment="voice/front-desk"} 400"#,
            r#"operator_voicedeployment_unknown_load_pods{voicedeployment="voice/front-desk"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        m.forget_scaling("voice", "front-desk");
        assert!(!m.render().contains("front-desk"));
        // A poll keeps the live VoiceDeployments' series and drops the rest.
        m.observe_scaling("voice", "front-desk", &o);
        m.observe_scaling("voice", "gone", &o);
        m.retain_scaling(&std::iter::once("voice/front-desk".to_owned()).collect());
        let text = m.render();
        assert!(text.contains("voice/front-desk") && !text.contains("voice/gone"));
    }
}
