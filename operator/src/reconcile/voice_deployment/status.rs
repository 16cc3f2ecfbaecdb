//! The VoiceDeployment's status, computed from what was observed (pure and
//! deterministic, so an unchanged status is never rewritten), and the Warning Event
//! when `Degraded` changes.

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use crate::reconcile::condition;

use super::observe::PersonaResolution;
use crate::autoscale::poller::LoadFields;
use crate::autoscale::{PolicyError, ScalingPolicy, ScalingView, scaling_conditions};
use crate::context::Context;
use crate::error::Result;
use crate::resources::configmap::PersonaConfig;
use crate::resources::selector_string;
use callmeback_api::{
    Condition, DegradedReason, VoiceDeployment, VoiceDeploymentStatus, find_condition,
};

/// One reason the deployment is Degraded, with what to tell the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The condition's reason.
    pub reason: DegradedReason,
    /// The condition's message.
    pub message: String,
}

impl Problem {
    /// A problem for `reason`.
    pub fn new(reason: DegradedReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The scaling policy and the autoscaler's view, for the status.
pub struct ScalingInput<'a> {
    /// The policy the spec asks for.
    pub policy: Result<&'a ScalingPolicy, &'a PolicyError>,
    /// The poller's and scaler's latest.
    pub view: ScalingView,
}

/// `PersonaInvalid`, naming each invalid persona, why, and what the pods serve of it.
pub fn invalid_problem(personas: &PersonaResolution, config: &PersonaConfig) -> Option<Problem> {
    if personas.invalid.is_empty() {
        return None;
    }
    let list = personas
        .invalid
        .iter()
        .map(|p| {
            let served = config
                .serving
                .iter()
                .find(|s| s.name == p.name)
                .and_then(|s| s.served_generation);
            let kept = match served {
                Some(g) => format!("serving its last valid generation {g}"),
                None => "not served: no valid version yet".to_string(),
            };
            format!("{} ({}; {kept})", p.name, p.problems)
        })
        .collect::<Vec<_>>()
        .join(", ");
    Some(Problem::new(
        DegradedReason::PersonaInvalid,
        format!("Persona invalid: {list}"),
    ))
}

/// `PersonaOutlastsDrain` when a valid persona's calls may last longer than the
/// pods' drain deadline: a rollout or scale-down could cut such a call.
pub fn outlasting_problem(vd: &VoiceDeployment, personas: &PersonaResolution) -> Option<Problem> {
    let drain = vd.spec.drain_timeout_seconds();
    let long: Vec<String> = personas
        .resolved
        .iter()
        .filter(|p| p.spec.max_call_duration_seconds > drain)
        .map(|p| format!("{} ({}s)", p.name, p.spec.max_call_duration_seconds))
        .collect();
    (!long.is_empty()).then(|| {
        Problem::new(
            DegradedReason::PersonaOutlastsDrain,
            format!(
                "calls of {} may last longer than drainTimeoutSeconds ({drain}s), so a \
                 rollout or scale-down could cut them: raise spec.drainTimeoutSeconds or \
                 lower the personas' maxCallDurationSeconds",
                long.join(", ")
            ),
        )
    })
}

/// Builds the status from what was observed. Deterministic: the same observations
/// give an equal value (lastTransitionTime carried over), so it is written once.
pub fn compute_status(
    vd: &VoiceDeployment,
    config: &PersonaConfig,
    deployment: Option<&Deployment>,
    problem: Option<&Problem>,
    blocked: bool,
    scaling: &ScalingInput<'_>,
) -> VoiceDeploymentStatus {
    let previous = vd
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = vd.meta().generation;
    let name = vd.name_any();
    let dstatus = deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let dconds = dstatus.conditions.clone().unwrap_or_default();
    let find = |t: &str| dconds.iter().find(|c| c.type_ == t).cloned();

    let available = match (deployment, find("Available")) {
        (None, _) => condition(
            previous,
            "Available",
            false,
            problem.map_or("DeploymentPending", |p| p.reason.as_str()),
            "no voice pod Deployment yet",
            generation,
        ),
        (Some(_), Some(c)) => condition(
            previous,
            "Available",
            c.status == "True",
            c.reason.as_deref().unwrap_or("Unknown"),
            format!(
                "{} of {} pods ready: {}",
                dstatus.ready_replicas.unwrap_or(0),
                dstatus.replicas.unwrap_or(0),
                c.message.unwrap_or_default()
            ),
            generation,
        ),
        (Some(_), None) => condition(
            previous,
            "Available",
            false,
            "DeploymentPending",
            "the Deployment reports no availability yet",
            generation,
        ),
    };

    let deadline_exceeded = find("Progressing")
        .is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    let progressing = match deployment {
        _ if blocked => condition(
            previous,
            "Progressing",
            false,
            "Blocked",
            problem.map(|p| p.message.clone()).unwrap_or_default(),
            generation,
        ),
        None => condition(
            previous,
            "Progressing",
            true,
            "Creating",
            "creating the Deployment",
            generation,
        ),
        Some(d) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let current_gen =
                dstatus.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
            let updated = dstatus.updated_replicas.unwrap_or(0);
            let ready = dstatus.ready_replicas.unwrap_or(0);
            let total = dstatus.replicas.unwrap_or(0);
            let done = current_gen && updated >= want && ready >= want && total == updated;
            if done {
                condition(
                    previous,
                    "Progressing",
                    false,
                    "RolloutComplete",
                    format!("{want} pods up to date"),
                    generation,
                )
            } else {
                condition(
                    previous,
                    "Progressing",
                    true,
                    "RollingOut",
                    format!("{updated} of {want} pods updated, {ready} ready"),
                    generation,
                )
            }
        }
    };

    let degraded = match problem {
        Some(p) => condition(
            previous,
            "Degraded",
            true,
            p.reason.as_str(),
            p.message.clone(),
            generation,
        ),
        None if deadline_exceeded => condition(
            previous,
            "Degraded",
            true,
            "ProgressDeadlineExceeded",
            "the Deployment exceeded its progress deadline",
            generation,
        ),
        None => condition(previous, "Degraded", false, "AsExpected", "", generation),
    };

    let [active, limited] = scaling_conditions(scaling.policy, &scaling.view);
    let scaling_active = condition(
        previous,
        "ScalingActive",
        active.0,
        active.1,
        active.2,
        generation,
    );
    let scaling_limited = condition(
        previous,
        "ScalingLimited",
        limited.0,
        limited.1,
        limited.2,
        generation,
    );
    let desired_replicas = match scaling.policy {
        Ok(ScalingPolicy::Fixed(n)) => Some(*n),
        Ok(ScalingPolicy::Calls(_)) => scaling.view.desired.and_then(|d| i32::try_from(d).ok()),
        // The HPA's choice, as it wrote it into the Deployment.
        Ok(ScalingPolicy::Cpu) => deployment.and_then(|d| d.spec.as_ref()?.replicas),
        Err(_) => None,
    };
    let load = scaling.view.load.as_ref().map(LoadFields::from);
    VoiceDeploymentStatus {
        desired_replicas,
        replicas: dstatus.replicas.unwrap_or(0),
        ready_replicas: dstatus.ready_replicas.unwrap_or(0),
        draining_replicas: load.as_ref().and_then(|l| l.draining_replicas),
        active_calls: load.as_ref().and_then(|l| l.active_calls),
        capacity: load.as_ref().and_then(|l| l.capacity),
        unknown_load_pods: load.as_ref().and_then(|l| l.unknown_load_pods),
        last_scale_time: scaling.view.last_scale_time.clone(),
        selector: Some(selector_string(&name)),
        resolved_personas: config.served_names(),
        personas: config.serving.clone(),
        webhook_url: Some(vd.spec.webhook_url()),
        conditions: vec![
            available,
            progressing,
            degraded,
            scaling_active,
            scaling_limited,
        ],
        observed_generation: generation,
    }
}

pub(super) async fn publish_degraded_change(
    vd: &VoiceDeployment,
    ctx: &Context,
    before: &[Condition],
    after: &[Condition],
) {
    let key =
        |c: Option<&Condition>| c.map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
    let was = key(find_condition(before, "Degraded"));
    let now = find_condition(after, "Degraded");
    if was == key(now) {
        return;
    }
    if let Some(c) = now
        && c.is_true()
    {
        ctx.publish(
            &vd.object_ref(&()),
            Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(crate::reconcile::persona::truncate(&c.message, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            },
        )
        .await;
    }
}
