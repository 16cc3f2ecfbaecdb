//! `Persona` -> validated -> status `Ready` with reason `Valid`/`Invalid`,
//! `observedGeneration` and `configHash` (the hash of the persona file the pods get).
//!
//! A Persona has no object of its own: each VoiceDeployment that selects it writes
//! it into its `<vd>-config` ConfigMap ([`crate::resources::configmap`]), and an
//! invalid edit leaves the last valid version there, so running pods keep a working
//! persona while the user fixes the object. (Older operator versions made a
//! `persona-<name>` ConfigMap per Persona; nothing reads those any more and nothing
//! makes them. They are not deleted here, because pods started by an older version
//! may still mount them; their owner reference has the garbage collector delete
//! them with the Persona, or `kubectl delete configmap -l callmeback.dev/persona`
//! removes them once those pods are gone.)

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::{apply_status, condition};
use crate::context::Context;
use crate::error::Result;
use crate::resources::configmap::render_persona_file;
use crate::resources::{name_ns, short_hash};
use callmeback_api::{Persona, PersonaStatus, find_condition};

/// Metric and log label of this kind.
pub const KIND: &str = "Persona";

/// Reconciles one Persona.
pub async fn reconcile(persona: Arc<Persona>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start(KIND);
    let (name, ns) = name_ns(persona.as_ref())?;
    let generation = persona.meta().generation;
    let previous = persona.status.clone().unwrap_or_default();
    let problems = persona.spec.problems();

    let status = if problems.is_empty() {
        let content = render_persona_file(&name, &persona.spec)?;
        PersonaStatus {
            conditions: vec![condition(
                &previous.conditions,
                "Ready",
                true,
                "Valid",
                "valid; VoiceDeployments selecting it serve this generation",
                generation,
            )],
            observed_generation: generation,
            config_hash: Some(short_hash(&[content.as_bytes()])),
        }
    } else {
        let message = format!(
            "{}; VoiceDeployments selecting it keep serving its last valid generation",
            problems.join("; ")
        );
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
            && let Some((s, _, message)) = &now
            && s == "False"
        {
            ctx.publish(
                &persona.object_ref(&()),
                Event {
                    type_: EventType::Warning,
                    reason: "PersonaInvalid".into(),
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
    Ok(Action::await_change())
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
