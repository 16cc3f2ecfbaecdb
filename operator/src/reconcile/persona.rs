//! `Persona` -> validated -> ConfigMap `persona-<name>` (key `<name>.yaml`) that the
//! voice pods mount; status `Ready` with reason `Valid`/`Invalid`,
//! `observedGeneration` and `configHash`.
//!
//! An invalid edit leaves the last valid ConfigMap in place: running calls and pods
//! keep a working persona while the user fixes the object. A same-named ConfigMap the
//! Persona does not own is left alone (`Ready=False`, reason `NotOwned`, an Event).

use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::{NOT_OWNED_RECHECK, apply, apply_status, condition, foreign};
use crate::controller::Context;
use crate::crd::{Persona, PersonaStatus, find_condition};
use crate::error::Result;
use crate::resources::configmap::{persona_config_map, persona_config_map_name};
use crate::resources::name_ns;

/// Metric and log label of this kind.
pub const KIND: &str = "Persona";

/// Reconciles one Persona.
pub async fn reconcile(persona: Arc<Persona>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start(KIND);
    let (name, ns) = name_ns(persona.as_ref())?;
    let generation = persona.meta().generation;
    let previous = persona.status.clone().unwrap_or_default();
    let problems = persona.spec.problems();

    let config_maps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns);
    let rendered = if problems.is_empty() {
        Some(persona_config_map(&persona)?)
    } else {
        None
    };
    let taken = match &rendered {
        Some((cm, _)) => foreign(&config_maps, cm).await?,
        None => None,
    };
    // A foreign ConfigMap going away triggers no watch of ours: look again later.
    let action = if taken.is_some() {
        Action::requeue(NOT_OWNED_RECHECK)
    } else {
        Action::await_change()
    };
    let status = if let Some(taken) = taken {
        // Someone else's ConfigMap by that name: never taken over (nor, through the
        // owner reference, deleted with this Persona).
        PersonaStatus {
            conditions: vec![condition(
                &previous.conditions,
                "Ready",
                false,
                "NotOwned",
                format!(
                    "{taken} exists and is not managed by this Persona, so the operator will \
                     not take it over. Rename the Persona or remove the ConfigMap"
                ),
                generation,
            )],
            observed_generation: generation,
            config_hash: previous.config_hash.clone(),
        }
    } else if let Some((cm, hash)) = rendered {
        apply(&config_maps, &cm).await?;
        PersonaStatus {
            conditions: vec![condition(
                &previous.conditions,
                "Ready",
                true,
                "Valid",
                format!("rendered into ConfigMap {}", persona_config_map_name(&name)),
                generation,
            )],
            observed_generation: generation,
            config_hash: Some(hash),
        }
    } else {
        let message = problems.join("; ");
        PersonaStatus {
            conditions: vec![condition(
                &previous.conditions,
                "Ready",
                false,
                "Invalid",
                message,
                generation,
            )],
            observed_generation: generation,
            // The pods keep serving the last valid rendering.
            config_hash: previous.config_hash.clone(),
        }
    };

    if persona.status.as_ref() != Some(&status) {
        let was = find_condition(&previous.conditions, "Ready")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        let now = find_condition(&status.conditions, "Ready")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        if was != now
            && let Some((s, reason, message)) = &now
            && s == "False"
        {
            let reason = if reason == "NotOwned" {
                "NotOwned"
            } else {
                "PersonaInvalid"
            };
            ctx.publish(
                &persona.object_ref(&()),
                Event {
                    type_: EventType::Warning,
                    reason: reason.into(),
                    note: Some(truncate(message, 1000)),
                    action: "Validate".into(),
                    secondary: None,
                },
            )
            .await;
        }
        apply_status(
            &Api::<Persona>::namespaced(ctx.client.clone(), &ns),
            &name,
            &status,
        )
        .await?;
    }
    tracing::debug!(persona = %persona.name_any(), namespace = %ns, "reconciled");
    Ok(action)
}

/// Cuts `s` to at most `max` bytes on a char boundary (Event notes are bounded).
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
