//! The HorizontalPodAutoscaler (`autoscaling/v2`) of the CPU policy
//! (`autoscaling.cpu`), the explicit alternative to scaling on calls (which needs no
//! HPA: see [`crate::autoscale`]). Scale-down is slow on purpose: calls last minutes.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};

use super::{BuildError, name_ns, owned_meta};
use callmeback_api::VoiceDeployment;

/// Seconds of lower recommendations before scaling down.
pub const SCALE_DOWN_STABILIZATION_SECONDS: i32 = 300;

/// The HPA, when `spec.autoscaling.cpu` is set.
pub fn hpa(vd: &VoiceDeployment) -> Result<Option<HorizontalPodAutoscaler>, BuildError> {
    let Some(auto) = &vd.spec.autoscaling else {
        return Ok(None);
    };
    let Some(cpu) = &auto.cpu else {
        return Ok(None);
    };
    let (name, _) = name_ns(vd)?;
    let metric = MetricSpec {
        type_: "Resource".into(),
        resource: Some(ResourceMetricSource {
            name: "cpu".into(),
            target: MetricTarget {
                type_: "Utilization".into(),
                average_utilization: Some(cpu.target_utilization),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    };
    Ok(Some(HorizontalPodAutoscaler {
        metadata: owned_meta(vd, name.clone())?,
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name,
            },
            min_replicas: Some(auto.min_replicas),
            max_replicas: auto.max_replicas,
            metrics: Some(vec![metric]),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(SCALE_DOWN_STABILIZATION_SECONDS),
                    select_policy: Some("Max".into()),
                    policies: Some(vec![HPAScalingPolicy {
                        type_: "Pods".into(),
                        value: 1,
                        period_seconds: 60,
                    }]),
                    tolerance: None,
                }),
                scale_up: None,
            }),
        }),
        status: None,
    }))
}
