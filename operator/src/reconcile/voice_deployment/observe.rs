//! What a VoiceDeployment's reconcile reads before it decides anything: which
//! personas it selects (from the Persona cache) and whether its Secret has what the
//! pods need.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::resources::deployment::{SECRET_ENV_KEYS, required_secret_keys};
use crate::resources::{InvalidPersona, ResolvedPersona, short_hash};
use callmeback_api::{Persona, VoiceDeployment};

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
