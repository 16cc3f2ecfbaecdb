//! `VoiceDeployment` -> personas resolved, Secret checked, the desired set applied
//! (ServiceAccount, the personas+routes ConfigMap, Deployment, Service, HPA, PDB,
//! Ingress), Twilio numbers wired, status and Events.
//!
//! Replicas: a fixed count, the calls autoscaler's decision ([`crate::autoscale`];
//! this apply is the one writer of the Deployment's replicas, the poller only asks
//! for a reconcile), or, under the CPU policy, none (the HPA owns them, after a
//! hand-over that keeps the current count).
//!
//! Rules that keep it calm and safe:
//! - Desired objects come from [`crate::resources`] and are applied with server-side
//!   apply; objects the owned-object cache shows unchanged are not even sent.
//!
//! Rooms: `observe` (personas, Secret), `apply` (the desired set), `status` (the
//! status and its Events), `twilio` (numbers); this file is the reconcile's order.
//! - Same-named objects the deployment does not own are never taken over: with any
//!   of them present nothing is applied, `Degraded` says `NotOwned` with their names,
//!   and an Event tells the user ([`super::foreign`]).
//! - With the Secret missing/incomplete or no persona served, the Deployment and
//!   HPA are not touched: new pods could not start, and running ones keep going.
//! - Personas reach the pods only through `<vd>-config`: a persona edit rewrites
//!   that ConfigMap and nothing else. An invalid persona keeps the entry it has there
//!   (its last valid generation, [`crate::resources::configmap`]); `status.personas`
//!   says which generation of each persona is served.
//! - Status is written only when it differs; Events only when the Degraded reason or
//!   message changes, so a steady state makes no API writes.
//! - Twilio numbers: wired, verified, handed over and restored by [`twilio`], which
//!   calls Twilio only when the spec, the Secret or its record says so.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::{Api, Resource};

use super::{apply_status, may_write};
use crate::autoscale::ScalingPolicy;
use crate::context::Context;
use crate::error::Result;
use crate::resources::configmap::config_map_name;
use crate::resources::{DeploymentInputs, desired_objects, name_ns, owned_meta};
use callmeback_api::{DegradedReason, VoiceDeployment};

mod apply;
mod observe;
mod status;
pub mod twilio;

use apply::Apis;
pub use apply::owns_replicas;
pub use observe::{PersonaResolution, SecretCheck, check_secret, resolve_personas};
use status::publish_degraded_change;
pub use status::{Problem, ScalingInput, compute_status, invalid_problem, outlasting_problem};

/// Metric and log label of this kind.
pub const KIND: &str = "VoiceDeployment";

/// Reconciles one VoiceDeployment.
pub async fn reconcile(vd: Arc<VoiceDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start(KIND);
    let (name, ns) = name_ns(vd.as_ref())?;
    let client = ctx.client.clone();
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&vd.spec.secret_ref.name)
        .await?;
    let secret_check = check_secret(secret.as_ref());

    if vd.meta().deletion_timestamp.is_some() {
        return twilio::cleanup(&vd, &ctx, &secret_check).await;
    }

    let personas = resolve_personas(&vd, &ns, &ctx.personas);
    let mut problems: Vec<Problem> = Vec::new();
    let secret_name = &vd.spec.secret_ref.name;
    let secret_hash = match &secret_check {
        SecretCheck::Missing => {
            problems.push(Problem::new(
                DegradedReason::SecretMissing,
                format!("Secret {secret_name} not found"),
            ));
            None
        }
        SecretCheck::MissingKeys { keys, .. } => {
            problems.push(Problem::new(
                DegradedReason::SecretKeyMissing,
                format!("Secret {secret_name} lacks {}", keys.join(", ")),
            ));
            None
        }
        SecretCheck::Ok { hash, .. } => Some(hash.clone()),
    };
    if !personas.missing.is_empty() {
        problems.push(Problem::new(
            DegradedReason::PersonaNotFound,
            format!("Persona not found: {}", personas.missing.join(", ")),
        ));
    }

    let bad_routes: Vec<&str> = vd
        .spec
        .number_routes
        .iter()
        .flat_map(|routes| routes.keys())
        .filter(|n| !callmeback_api::is_e164(n))
        .map(String::as_str)
        .collect();
    if !bad_routes.is_empty() {
        // The CRD schema cannot bound map keys cheaply enough for CEL, so this is checked here.
        problems.push(Problem::new(
            DegradedReason::InvalidNumberRoute,
            format!(
                "numberRoutes keys must be E.164 numbers such as +14155550100: {}",
                bad_routes.join(", ")
            ),
        ));
    }
    let rejected = crate::resources::ingress::rejected_annotations(&vd);
    if !rejected.is_empty() {
        let shown: Vec<String> = rejected
            .iter()
            .take(10)
            .map(|k| k.chars().take(100).collect())
            .collect();
        problems.push(Problem::new(
            DegradedReason::IngressAnnotationRejected,
            format!(
                "ingress.annotations outside the allowlist (or with a value of the wrong \
                 shape) are not applied: {}{}",
                shown.join(", "),
                if rejected.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    if personas.resolved.is_empty() && personas.missing.is_empty() && personas.invalid.is_empty() {
        problems.push(Problem::new(
            DegradedReason::NoPersonas,
            "no Persona matches personas or personaSelector",
        ));
    }

    let apis = Apis::new(&ctx, &ns);
    // The last valid version of an invalid persona comes from the ConfigMap as it is
    // (only ours: someone else's same-named object is never read as our state). Only
    // an invalid persona needs it, so a healthy deployment does not read it.
    let config_meta = owned_meta(&vd, config_map_name(&name))?;
    let current_config = if personas.invalid.is_empty() {
        None
    } else {
        apis.config_map
            .get_opt(&config_map_name(&name))
            .await?
            .filter(|c| may_write(c.meta(), &config_meta))
    };
    let policy = ScalingPolicy::from_spec(vd.spec.replicas, vd.spec.autoscaling.as_ref());
    if let Err(e) = &policy {
        problems.push(Problem::new(
            DegradedReason::InvalidAutoscaling,
            e.to_string(),
        ));
    }

    let inputs = DeploymentInputs {
        personas: personas.resolved.clone(),
        invalid: personas.invalid.clone(),
        current_config,
        secret_hash: secret_hash.clone().unwrap_or_default(),
    };
    let mut desired = desired_objects(&vd, &inputs)?;
    if let Some(problem) = invalid_problem(&personas, &desired.config) {
        problems.push(problem);
    }
    if let Some(problem) = outlasting_problem(&vd, &personas) {
        problems.push(problem);
    }
    let served = desired.config.served_names();
    let key = (ns.clone(), name.clone());
    match &policy {
        Ok(ScalingPolicy::Calls(p)) => {
            // Before the first decision: the Deployment's current count (clamped), so
            // taking over from a fixed count or an HPA never dips.
            let current = if ctx.autoscaler.scales(&key) {
                None
            } else {
                ctx.deployment(&ns, &name)
                    .await?
                    .and_then(|d| d.spec.and_then(|s| s.replicas))
            };
            let replicas = ctx.autoscaler.replicas(&key, p, current);
            if let Some(spec) = desired.deployment.spec.as_mut() {
                spec.replicas = Some(i32::try_from(replicas).unwrap_or(i32::MAX));
            }
        }
        _ => ctx.autoscaler.stop_scaling(&key),
    }
    let foreign_objects = apis.foreign(&desired).await?;
    if !foreign_objects.is_empty() {
        problems.insert(
            0,
            Problem::new(
                DegradedReason::NotOwned,
                format!(
                    "not managed by this VoiceDeployment, so the operator will not take them \
                     over: {}. Rename the VoiceDeployment or remove them",
                    foreign_objects.join(", ")
                ),
            ),
        );
    }
    let blocked = secret_hash.is_none()
        || served.is_empty()
        || !foreign_objects.is_empty()
        || policy.is_err();
    let deployment = if !foreign_objects.is_empty() {
        // Nothing is written; the Deployment is reported only when it is ours.
        ctx.deployment(&ns, &name)
            .await?
            .filter(|d| may_write(d.meta(), desired.deployment.meta()))
    } else {
        apis.apply_all(&desired, &vd, blocked).await?
    };

    let mut requeue = if foreign_objects.is_empty() {
        ctx.config.resync
    } else {
        // Their removal triggers no watch of ours (they lack our labels).
        super::NOT_OWNED_RECHECK
    };
    if let SecretCheck::Ok { hash, data } = &secret_check {
        let numbers = twilio::sync_numbers(&vd, &ctx, hash, data).await?;
        if let Some(problem) = numbers.problem {
            problems.push(problem);
        }
        if let Some(next) = numbers.requeue {
            requeue = requeue.min(next);
        }
    }

    let scaling = ScalingInput {
        policy: policy.as_ref(),
        view: ctx.autoscaler.view(&key),
    };
    let status = compute_status(
        &vd,
        &desired.config,
        deployment.as_ref(),
        problems.first(),
        blocked,
        &scaling,
    );
    let previous = vd.status.clone().unwrap_or_default();
    if vd.status.as_ref() != Some(&status) {
        publish_degraded_change(&vd, &ctx, &previous.conditions, &status.conditions).await;
        apply_status(
            &Api::<VoiceDeployment>::namespaced(client, &ns),
            &name,
            &status,
        )
        .await?;
    }
    Ok(Action::requeue(requeue))
}
