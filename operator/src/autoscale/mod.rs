//! Call-capacity autoscaling, the way Agones scales fleets: no HPA, no metrics
//! adapter. The operator reads every voice pod's load (`GET /load` on its metrics
//! port), decides the replicas, and writes them with the rest of the Deployment (one
//! field manager). It also keeps each pod's deletion cost equal to its live calls and
//! marks busy pods as not evictable, so scale-down and node consolidation take idle
//! pods first.
//!
//! ## Layout
//! - [`decision`]: the pure scaler (clamp, up at once, down after a window, step cap,
//!   unknown load never idle).
//! - [`poller`]: the pod reflector and the poll loop (bounded concurrency, timeouts),
//!   the pod annotations, the load fields of the status, reconcile triggers.
//! - this module: the policy read from the spec, the per-deployment state the poller
//!   and the reconciler share ([`Autoscaler`]), the annotation and condition rules.

pub mod decision;
pub mod poller;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use callmeback_api::AutoscalingSpec;
use decision::{Buffer, Decision, Limit, LoadSummary, Policy, Scaler};

/// Pod annotation the ReplicaSet controller reads to pick pods to remove (lower first).
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// cluster-autoscaler: do not evict this pod to remove its node.
pub const SAFE_TO_EVICT_ANNOTATION: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
/// Karpenter: do not disrupt (consolidate) this pod's node.
pub const DO_NOT_DISRUPT_ANNOTATION: &str = "karpenter.sh/do-not-disrupt";
/// Field manager of the one-time hand-over of `spec.replicas` to a CPU HPA.
pub const HANDOVER_FIELD_MANAGER: &str = "callmeback-operator-handover";
/// Field manager of the load fields of the status written between reconciles.
pub const LOAD_FIELD_MANAGER: &str = "callmeback-operator-load";

/// How a VoiceDeployment's replica count is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalingPolicy {
    /// `spec.replicas` (default 1).
    Fixed(i32),
    /// The operator scales on live calls.
    Calls(Policy),
    /// A CPU HorizontalPodAutoscaler owns the count.
    Cpu,
}

/// Why `spec.autoscaling` cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// `buffer` is neither a non-negative integer nor `"N%"`.
    #[error(
        "autoscaling.buffer {0:?} is neither a non-negative integer nor a percentage such as \"20%\""
    )]
    Buffer(String),
    /// A removed field is still set (objects written before the schema rejected it).
    #[error("autoscaling.{0} was removed: {1}")]
    Removed(&'static str, &'static str),
}

impl ScalingPolicy {
    /// The policy `autoscaling` and `replicas` ask for.
    pub fn from_spec(
        replicas: Option<i32>,
        autoscaling: Option<&AutoscalingSpec>,
    ) -> Result<Self, PolicyError> {
        let Some(a) = autoscaling else {
            return Ok(Self::Fixed(replicas.unwrap_or(1)));
        };
        if a.target_active_calls_per_pod.is_some() {
            return Err(PolicyError::Removed(
                "targetActiveCallsPerPod",
                "set callsPerPod (and buffer)",
            ));
        }
        if a.target_cpu_utilization.is_some() {
            return Err(PolicyError::Removed(
                "targetCpuUtilization",
                "set cpu.targetUtilization",
            ));
        }
        if a.cpu.is_some() {
            return Ok(Self::Cpu);
        }
        let buffer = match &a.buffer {
            None => Buffer::Slots(0),
            Some(IntOrString::Int(n)) => {
                Buffer::Slots(u64::try_from(*n).map_err(|_| PolicyError::Buffer(n.to_string()))?)
            }
            Some(IntOrString::String(s)) => Buffer::Percent(
                s.strip_suffix('%')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| PolicyError::Buffer(s.chars().take(20).collect()))?,
            ),
        };
        let pos = |n: i32| u32::try_from(n).unwrap_or(0).max(1);
        let min = pos(a.min_replicas);
        Ok(Self::Calls(Policy {
            min,
            max: pos(a.max_replicas).max(min),
            calls_per_pod: pos(a.calls_per_pod),
            buffer,
            stabilization: Duration::from_secs(
                u64::try_from(a.scale_down_stabilization_seconds).unwrap_or(0),
            ),
            max_step: pos(a.max_scale_down_step),
        }))
    }
}

/// What the status says about scaling (filled by the reconciler from [`Autoscaler`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScalingView {
    /// The replicas decided (calls policy).
    pub desired: Option<u32>,
    /// The last poll's load, if a poll ran since the policy was set.
    pub load: Option<LoadSummary>,
    /// Where the recommendation hit a bound.
    pub limited: Option<Limit>,
    /// When the decision last changed the count (RFC 3339).
    pub last_scale_time: Option<String>,
}

/// `(status, reason, message)` of `ScalingActive` and `ScalingLimited`.
pub fn scaling_conditions(
    policy: Result<&ScalingPolicy, &PolicyError>,
    view: &ScalingView,
) -> [(bool, &'static str, String); 2] {
    let not = |reason: &'static str, msg: &str| {
        [
            (false, reason, msg.to_string()),
            (false, "NotAutoscaling", String::new()),
        ]
    };
    match policy {
        Err(e) => not("InvalidPolicy", &e.to_string()),
        Ok(ScalingPolicy::Fixed(_)) => not("FixedReplicas", "spec.replicas sets the count"),
        Ok(ScalingPolicy::Cpu) => not(
            "CpuPolicy",
            "a HorizontalPodAutoscaler scales on CPU (autoscaling.cpu)",
        ),
        Ok(ScalingPolicy::Calls(p)) => {
            let active = match &view.load {
                None => (
                    false,
                    "WaitingForLoad",
                    "no load read from the pods yet".to_string(),
                ),
                Some(l) if l.unknown_pods > 0 => (
                    false,
                    "LoadUnknown",
                    "the load of some running pods could not be read (status.unknownLoadPods); \
                     they count as full, so no scale-down removes them"
                        .to_string(),
                ),
                Some(_) => (
                    true,
                    "LoadRead",
                    "scaling on live calls of every running pod".to_string(),
                ),
            };
            let limited = match view.limited {
                Some(Limit::AtMax) => (
                    true,
                    "AtMaxReplicas",
                    format!("the calls want more than maxReplicas ({})", p.max),
                ),
                Some(Limit::AtMin) => (
                    true,
                    "AtMinReplicas",
                    format!("held at minReplicas ({})", p.min),
                ),
                None => (false, "WithinBounds", String::new()),
            };
            [active, limited]
        }
    }
}

/// The annotations a pod should carry for `active_calls`: the deletion cost always,
/// the eviction guards only while it has calls (`None` = remove).
pub fn wanted_annotations(active_calls: u32) -> [(&'static str, Option<String>); 3] {
    let busy = active_calls > 0;
    [
        (DELETION_COST_ANNOTATION, Some(active_calls.to_string())),
        (SAFE_TO_EVICT_ANNOTATION, busy.then(|| "false".to_string())),
        (DO_NOT_DISRUPT_ANNOTATION, busy.then(|| "true".to_string())),
    ]
}

/// The merge patch taking `current` to [`wanted_annotations`], or `None` when they
/// already match (no write).
pub fn annotation_patch(
    current: Option<&BTreeMap<String, String>>,
    active_calls: u32,
) -> Option<serde_json::Value> {
    let mut changes = serde_json::Map::new();
    for (key, want) in wanted_annotations(active_calls) {
        let have = current.and_then(|a| a.get(key));
        if have != want.as_ref() {
            changes.insert(
                key.to_string(),
                want.map(serde_json::Value::String)
                    .unwrap_or(serde_json::Value::Null),
            );
        }
    }
    (!changes.is_empty()).then(|| serde_json::json!({ "metadata": { "annotations": changes } }))
}

/// Key of one VoiceDeployment: namespace and name.
pub type VdKey = (String, String);

struct ScaleState {
    policy: Policy,
    scaler: Scaler,
    limited: Option<Limit>,
    last_scale_time: Option<String>,
}

#[derive(Default)]
struct VdState {
    /// The last poll's load (every policy: the status and the annotations use it).
    load: Option<LoadSummary>,
    /// Present under the calls policy only.
    scale: Option<ScaleState>,
}

/// Load and scaler state per VoiceDeployment, shared by the poller (which reads the
/// pods and decides) and the reconciler (which applies the decision and reports it).
#[derive(Default)]
pub struct Autoscaler {
    state: Mutex<HashMap<VdKey, VdState>>,
}

impl Autoscaler {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VdKey, VdState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replicas to apply for `key` under the calls `policy`: the last decision,
    /// or, before the first one, `current` (the Deployment's replicas; `None` when it
    /// does not exist yet) clamped into the bounds, so taking over never dips.
    pub fn replicas(&self, key: &VdKey, policy: &Policy, current: Option<i32>) -> u32 {
        let mut map = self.lock();
        let entry = map.entry(key.clone()).or_default();
        let state = entry.scale.get_or_insert_with(|| {
            let start = current.and_then(|c| u32::try_from(c).ok()).unwrap_or(0);
            ScaleState {
                policy: *policy,
                scaler: Scaler::new(start, policy),
                limited: None,
                last_scale_time: None,
            }
        });
        if state.policy != *policy {
            // New bounds apply at once; the window memory restarts.
            state.scaler = Scaler::new(state.scaler.replicas(), policy);
            state.policy = *policy;
        }
        state.scaler.replicas()
    }

    /// Whether `key` has scaler state (the reconciler creates it).
    pub fn scales(&self, key: &VdKey) -> bool {
        self.lock().get(key).is_some_and(|s| s.scale.is_some())
    }

    /// Drops the scaler of `key` (no longer under the calls policy): a later switch
    /// back starts again from the Deployment's replicas.
    pub fn stop_scaling(&self, key: &VdKey) {
        if let Some(s) = self.lock().get_mut(key) {
            s.scale = None;
        }
    }

    /// Keeps only the keys `keep` says yes to (deleted deployments go).
    pub fn retain(&self, mut keep: impl FnMut(&VdKey) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }

    /// Records one poll of `key` and, under the calls policy, decides.
    pub fn observe(
        &self,
        key: &VdKey,
        load: LoadSummary,
        now: Instant,
        wall_clock: impl FnOnce() -> String,
    ) -> Option<Decision> {
        let mut map = self.lock();
        let entry = map.entry(key.clone()).or_default();
        let decision = entry.scale.as_mut().map(|s| {
            let policy = s.policy;
            let d = s.scaler.decide(&policy, &load, now);
            s.limited = d.limited;
            if d.changed {
                s.last_scale_time = Some(wall_clock());
            }
            d
        });
        entry.load = Some(load);
        decision
    }

    /// What the status should say for `key`.
    pub fn view(&self, key: &VdKey) -> ScalingView {
        let map = self.lock();
        let Some(s) = map.get(key) else {
            return ScalingView::default();
        };
        ScalingView {
            desired: s.scale.as_ref().map(|s| s.scaler.replicas()),
            load: s.load.clone(),
            limited: s.scale.as_ref().and_then(|s| s.limited),
            last_scale_time: s.scale.as_ref().and_then(|s| s.last_scale_time.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_follow_calls_and_are_patched_only_on_change() {
        // Proves a busy pod gets cost = calls plus both eviction guards, an idle one loses the guards, and equal annotations make no patch.
        let busy = annotation_patch(None, 3).unwrap();
        assert_eq!(
            busy["metadata"]["annotations"],
            serde_json::json!({
                DELETION_COST_ANNOTATION: "3",
                SAFE_TO_EVICT_ANNOTATION: "false",
                DO_NOT_DISRUPT_ANNOTATION: "true",
            })
        );
        let now: BTreeMap<String, String> = wanted_annotations(3)
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect();
        assert_eq!(annotation_patch(Some(&now), 3), None);
        let idle = annotation_patch(Some(&now), 0).unwrap();
        assert_eq!(
            idle["metadata"]["annotations"],
            serde_json::json!({
                DELETION_COST_ANNOTATION: "0",
                SAFE_TO_EVICT_ANNOTATION: null,
                DO_NOT_DISRUPT_ANNOTATION: null,
            })
        );
    }

    #[test]
    fn policy_comes_from_the_spec() {
        // Proves fixed, calls and CPU policies and the buffer forms are read as documented.
        assert_eq!(
            ScalingPolicy::from_spec(Some(3), None),
            Ok(ScalingPolicy::Fixed(3))
        );
        assert_eq!(
            ScalingPolicy::from_spec(None, None),
            Ok(ScalingPolicy::Fixed(1))
        );
        let mut a = AutoscalingSpec::calls(1, 6, 10);
        a.buffer = Some(IntOrString::String("20%".into()));
        let Ok(ScalingPolicy::Calls(p)) = ScalingPolicy::from_spec(None, Some(&a)) else {
            panic!("calls policy expected");
        };
        assert_eq!(p.buffer, Buffer::Percent(20));
        assert_eq!(p.stabilization, Duration::from_secs(120));
        a.buffer = Some(IntOrString::String("lots".into()));
        assert!(matches!(
            ScalingPolicy::from_spec(None, Some(&a)),
            Err(PolicyError::Buffer(_))
        ));
        a.buffer = Some(IntOrString::Int(5));
        a.cpu = Some(callmeback_api::CpuAutoscaling {
            target_utilization: 70,
        });
        assert_eq!(
            ScalingPolicy::from_spec(None, Some(&a)),
            Ok(ScalingPolicy::Cpu)
        );
        a.target_active_calls_per_pod = Some(8);
        assert!(matches!(
            ScalingPolicy::from_spec(None, Some(&a)),
            Err(PolicyError::Removed("targetActiveCallsPerPod", _))
        ));
    }
}
