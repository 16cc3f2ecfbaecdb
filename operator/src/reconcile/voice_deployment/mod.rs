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
//!   apply; unchanged objects are not rewritten.
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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};

use super::{apply, apply_status, condition, delete_if_exists, foreign, may_write};
use crate::autoscale::poller::LoadFields;
use crate::autoscale::{
    HANDOVER_FIELD_MANAGER, PolicyError, ScalingPolicy, ScalingView, scaling_conditions,
};
use crate::controller::Context;
use crate::error::Result;
use crate::resources::configmap::{PersonaConfig, config_map_name, legacy_routes_config_map_name};
use crate::resources::deployment::{SECRET_ENV_KEYS, required_secret_keys};
use crate::resources::{
    DeploymentInputs, DesiredObjects, FIELD_MANAGER, InvalidPersona, ResolvedPersona,
    desired_objects, name_ns, owned_meta, selector_string, short_hash,
};
use callmeback_api::{Condition, Persona, VoiceDeployment, VoiceDeploymentStatus, find_condition};

pub mod twilio;

/// Metric and log label of this kind.
pub const KIND: &str = "VoiceDeployment";

/// Outcome of looking up the deployment's personas.
#[derive(Debug, Default, PartialEq)]
pub struct PersonaResolution {
    /// Found and valid, sorted by name.
    pub resolved: Vec<ResolvedPersona>,
    /// Named but absent.
    pub missing: Vec<String>,
    /// Present but failing validation.
    pub invalid: Vec<InvalidPersona>,
}

/// Finds the personas `vd` selects in `store` (names plus label selector).
pub fn resolve_personas(
    vd: &VoiceDeployment,
    ns: &str,
    store: &Store<Persona>,
) -> PersonaResolution {
    let mut names: BTreeSet<String> = vd.spec.personas.iter().flatten().cloned().collect();
    if let Some(sel) = &vd.spec.persona_selector
        && let Ok(selector) = Selector::try_from(sel.clone())
    {
        for p in store
            .state_filter(|p| p.namespace().as_deref() == Some(ns) && selector.matches(p.labels()))
        {
            names.insert(p.name_any());
        }
    }
    let mut out = PersonaResolution::default();
    for name in names {
        match store.get(&ObjectRef::new(&name).within(ns)) {
            None => out.missing.push(name),
            Some(p) => {
                let problems = p.spec.problems();
                let generation = p.meta().generation;
                if problems.is_empty() {
                    out.resolved.push(ResolvedPersona {
                        name,
                        spec: p.spec.clone(),
                        generation,
                    });
                } else {
                    out.invalid.push(InvalidPersona {
                        name,
                        generation,
                        problems: problems.join("; "),
                    });
                }
            }
        }
    }
    out
}

/// What the referenced Secret offers.
#[derive(Debug)]
pub enum SecretCheck {
    /// No such Secret.
    Missing,
    /// Present without these required keys.
    MissingKeys {
        /// The absent keys.
        keys: Vec<&'static str>,
        /// What is there (Twilio credentials may still be usable for cleanup).
        data: BTreeMap<String, String>,
    },
    /// Usable: the hash of the pod-facing values, and the values themselves.
    Ok {
        /// Hash over the keys the pods read.
        hash: String,
        /// Decoded values (kept in memory only for Twilio credentials).
        data: BTreeMap<String, String>,
    },
}

/// Classifies a Secret's content.
pub fn check_secret(secret: Option<&Secret>) -> SecretCheck {
    let Some(secret) = secret else {
        return SecretCheck::Missing;
    };
    let mut data: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        data.insert(k.clone(), String::from_utf8_lossy(&v.0).into_owned());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone());
    }
    let missing: Vec<&'static str> = required_secret_keys()
        .filter(|k| data.get(*k).is_none_or(|v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        return SecretCheck::MissingKeys {
            keys: missing,
            data,
        };
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for (key, _) in SECRET_ENV_KEYS {
        parts.push(key.as_bytes());
        parts.push(data.get(*key).map(|v| v.as_bytes()).unwrap_or_default());
    }
    SecretCheck::Ok {
        hash: short_hash(&parts),
        data,
    }
}

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
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    let secret_name = &vd.spec.secret_ref.name;
    let secret_hash = match &secret_check {
        SecretCheck::Missing => {
            problems.push(("SecretMissing", format!("Secret {secret_name} not found")));
            None
        }
        SecretCheck::MissingKeys { keys, .. } => {
            problems.push((
                "SecretKeyMissing",
                format!("Secret {secret_name} lacks {}", keys.join(", ")),
            ));
            None
        }
        SecretCheck::Ok { hash, .. } => Some(hash.clone()),
    };
    if !personas.missing.is_empty() {
        problems.push((
            "PersonaNotFound",
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
        problems.push((
            "InvalidNumberRoute",
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
        problems.push((
            "IngressAnnotationRejected",
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
        problems.push((
            "NoPersonas",
            "no Persona matches personas or personaSelector".into(),
        ));
    }

    let apis = Apis::new(&client, &ns);
    // The last valid version of an invalid persona comes from the ConfigMap as it is
    // (only ours: someone else's same-named object is never read as our state).
    let config_meta = owned_meta(&vd, config_map_name(&name))?;
    let current_config = apis
        .config_map
        .get_opt(&config_map_name(&name))
        .await?
        .filter(|c| may_write(c.meta(), &config_meta));
    let policy = ScalingPolicy::from_spec(vd.spec.replicas, vd.spec.autoscaling.as_ref());
    if let Err(e) = &policy {
        problems.push(("InvalidAutoscaling", e.to_string()));
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
                apis.deployment
                    .get_opt(&name)
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
            (
                "NotOwned",
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
        apis.deployment
            .get_opt(&name)
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

/// The namespaced APIs of everything a VoiceDeployment makes.
struct Apis {
    service_account: Api<ServiceAccount>,
    config_map: Api<ConfigMap>,
    service: Api<Service>,
    pdb: Api<PodDisruptionBudget>,
    ingress: Api<Ingress>,
    hpa: Api<HorizontalPodAutoscaler>,
    deployment: Api<Deployment>,
}

impl Apis {
    fn new(client: &kube::Client, ns: &str) -> Self {
        Self {
            service_account: Api::namespaced(client.clone(), ns),
            config_map: Api::namespaced(client.clone(), ns),
            service: Api::namespaced(client.clone(), ns),
            pdb: Api::namespaced(client.clone(), ns),
            ingress: Api::namespaced(client.clone(), ns),
            hpa: Api::namespaced(client.clone(), ns),
            deployment: Api::namespaced(client.clone(), ns),
        }
    }

    /// The desired objects that exist under someone else's ownership ("Kind name").
    async fn foreign(&self, desired: &DesiredObjects) -> Result<Vec<String>> {
        let mut out = Vec::new();
        out.extend(foreign(&self.service_account, &desired.service_account).await?);
        out.extend(foreign(&self.config_map, &desired.config.config_map).await?);
        out.extend(foreign(&self.service, &desired.service).await?);
        out.extend(foreign(&self.pdb, &desired.pdb).await?);
        if let Some(ing) = &desired.ingress {
            out.extend(foreign(&self.ingress, ing).await?);
        }
        if let Some(hpa) = &desired.hpa {
            out.extend(foreign(&self.hpa, hpa).await?);
        }
        out.extend(foreign(&self.deployment, &desired.deployment).await?);
        Ok(out)
    }

    /// Applies the desired set (checked by [`Apis::foreign`] first). With `blocked`
    /// the Deployment and HPA are left as they are. Returns the Deployment.
    async fn apply_all(
        &self,
        desired: &DesiredObjects,
        vd: &VoiceDeployment,
        blocked: bool,
    ) -> Result<Option<Deployment>> {
        let name = vd.name_any();
        apply(&self.service_account, &desired.service_account).await?;
        apply(&self.config_map, &desired.config.config_map).await?;
        apply(&self.service, &desired.service).await?;
        apply(&self.pdb, &desired.pdb).await?;
        match &desired.ingress {
            Some(ing) => drop(apply(&self.ingress, ing).await?),
            None => delete_owned(&self.ingress, &name, vd).await?,
        }
        if blocked {
            return Ok(self.deployment.get_opt(&name).await?);
        }
        match &desired.hpa {
            Some(hpa) => drop(apply(&self.hpa, hpa).await?),
            None => delete_owned(&self.hpa, &name, vd).await?,
        }
        let replicas_sent = desired
            .deployment
            .spec
            .as_ref()
            .is_some_and(|s| s.replicas.is_some());
        if !replicas_sent {
            self.hand_over_replicas(&name).await?;
        }
        let deployment = apply(&self.deployment, &desired.deployment).await?;
        if rollout_complete(&deployment) {
            // Pods of older operator versions mounted `<vd>-routes`; once none is left,
            // it is garbage (deleting it earlier would break those pods' volume).
            delete_owned(&self.config_map, &legacy_routes_config_map_name(&name), vd).await?;
        }
        Ok(Some(deployment))
    }

    /// Before the operator's apply stops sending `spec.replicas` (the CPU policy's
    /// HPA takes the field over), the current count is applied once under a second
    /// field manager: server-side apply then keeps the field (it still has an owner)
    /// instead of removing it, which would reset the Deployment to 1 replica.
    async fn hand_over_replicas(&self, name: &str) -> Result<()> {
        let Some(existing) = self.deployment.get_opt(name).await? else {
            return Ok(());
        };
        let Some(current) = existing.spec.as_ref().and_then(|s| s.replicas) else {
            return Ok(());
        };
        if !owns_replicas(&existing, FIELD_MANAGER) {
            return Ok(());
        }
        let body = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": name },
            "spec": { "replicas": current },
        });
        let params = PatchParams::apply(HANDOVER_FIELD_MANAGER).force();
        self.deployment
            .patch(name, &params, &Patch::Apply(&body))
            .await?;
        tracing::info!(deployment = %name, replicas = current, "handed spec.replicas over before the HPA takes it");
        Ok(())
    }
}

/// Whether `manager`'s server-side apply owns the Deployment's `spec.replicas`.
pub fn owns_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(manager) && m.operation.as_deref() == Some("Apply")
        })
        .any(|m| {
            m.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
        })
}

/// The scaling policy and the autoscaler's view, for the status.
pub struct ScalingInput<'a> {
    /// The policy the spec asks for.
    pub policy: Result<&'a ScalingPolicy, &'a PolicyError>,
    /// The poller's and scaler's latest.
    pub view: ScalingView,
}

/// Whether every pod of `d` runs its current template (no old ReplicaSet's pods left).
fn rollout_complete(d: &Deployment) -> bool {
    let Some(status) = &d.status else {
        return false;
    };
    status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) == status.replicas.unwrap_or(0)
}

/// `PersonaInvalid`, naming each invalid persona, why, and what the pods serve of it.
pub fn invalid_problem(
    personas: &PersonaResolution,
    config: &PersonaConfig,
) -> Option<(&'static str, String)> {
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
    Some(("PersonaInvalid", format!("Persona invalid: {list}")))
}

/// `PersonaOutlastsDrain` when a valid persona's calls may last longer than the
/// pods' drain deadline: a rollout or scale-down could cut such a call.
pub fn outlasting_problem(
    vd: &VoiceDeployment,
    personas: &PersonaResolution,
) -> Option<(&'static str, String)> {
    let drain = vd.spec.drain_timeout_seconds();
    let long: Vec<String> = personas
        .resolved
        .iter()
        .filter(|p| p.spec.max_call_duration_seconds > drain)
        .map(|p| format!("{} ({}s)", p.name, p.spec.max_call_duration_seconds))
        .collect();
    (!long.is_empty()).then(|| {
        (
            "PersonaOutlastsDrain",
            format!(
                "calls of {} may last longer than drainTimeoutSeconds ({drain}s), so a \
                 rollout or scale-down could cut them: raise spec.drainTimeoutSeconds or \
                 lower the personas' maxCallDurationSeconds",
                long.join(", ")
            ),
        )
    })
}

/// Deletes an object only when this deployment controls it (never someone else's).
async fn delete_owned<K>(api: &Api<K>, name: &str, vd: &VoiceDeployment) -> Result<()>
where
    K: Resource + serde::de::DeserializeOwned + Clone + std::fmt::Debug,
{
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let uid = vd.meta().uid.as_deref();
    let ours = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid);
    if ours {
        delete_if_exists(api, name).await
    } else {
        Ok(())
    }
}

/// Builds the status from what was observed. Deterministic: the same observations
/// give an equal value (lastTransitionTime carried over), so it is written once.
pub fn compute_status(
    vd: &VoiceDeployment,
    config: &PersonaConfig,
    deployment: Option<&Deployment>,
    problem: Option<&(&'static str, String)>,
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
            problem.map(|p| p.0).unwrap_or("DeploymentPending"),
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
            problem.map(|p| p.1.clone()).unwrap_or_default(),
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
        Some((reason, message)) => condition(
            previous,
            "Degraded",
            true,
            reason,
            message.clone(),
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

async fn publish_degraded_change(
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
                note: Some(super::persona::truncate(&c.message, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            },
        )
        .await;
    }
}
