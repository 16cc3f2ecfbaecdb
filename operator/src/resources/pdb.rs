//! The PodDisruptionBudget: voluntary disruptions (node drains) take at most
//! `maxUnavailable` pods (default 1) at a time, so calls move gradually.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{BuildError, name_ns, owned_meta, selector_labels};
use callmeback_api::VoiceDeployment;

/// The voice pods' PodDisruptionBudget.
pub fn pdb(vd: &VoiceDeployment) -> Result<PodDisruptionBudget, BuildError> {
    let (name, _) = name_ns(vd)?;
    Ok(PodDisruptionBudget {
        metadata: owned_meta(vd, name.clone())?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(vd.spec.max_unavailable.unwrap_or(1))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}
