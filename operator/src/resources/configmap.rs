//! ConfigMaps the voice pods mount: one per `Persona` (`<persona>.yaml`, the
//! `PersonaSpec` as YAML) and one per `VoiceDeployment` (`routes.yaml`, and
//! `prices.yaml` when prices are set). The Deployment projects them into one volume
//! at `/etc/callmeback`, so edits reach running pods without a restart.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::{
    BuildError, MANAGED_BY, PERSONA_LABEL, ResolvedPersona, name_ns, owned_meta, owner_ref,
    short_hash,
};
use crate::crd::{Persona, PersonaSpec, Price, VoiceDeployment};

/// Key of the routes file in the routes ConfigMap.
pub const ROUTES_KEY: &str = "routes.yaml";
/// Key of the prices file in the routes ConfigMap.
pub const PRICES_KEY: &str = "prices.yaml";

/// Name of the ConfigMap rendering persona `name`.
pub fn persona_config_map_name(persona: &str) -> String {
    format!("persona-{persona}")
}

/// Name of a deployment's routes ConfigMap.
pub fn routes_config_map_name(vd: &str) -> String {
    format!("{vd}-routes")
}

/// The file name (and ConfigMap key) of persona `name`.
pub fn persona_file_name(persona: &str) -> String {
    format!("{persona}.yaml")
}

/// A persona file exactly as the pod reads it.
pub fn render_persona_file(persona: &str, spec: &PersonaSpec) -> Result<String, BuildError> {
    serde_saphyr::to_string(spec).map_err(|source| BuildError::Serialize {
        what: format!("persona {persona}"),
        source,
    })
}

/// The persona's ConfigMap and the hash of its content (the Persona's `configHash`).
pub fn persona_config_map(persona: &Persona) -> Result<(ConfigMap, String), BuildError> {
    let (name, ns) = name_ns(persona)?;
    let content = render_persona_file(&name, &persona.spec)?;
    let hash = short_hash(&[content.as_bytes()]);
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "persona".to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "callmeback".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (PERSONA_LABEL.to_string(), name.clone()),
    ]);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(persona_config_map_name(&name)),
            namespace: Some(ns),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                "callmeback.dev/config-hash".to_string(),
                hash.clone(),
            )])),
            owner_references: owner_ref(persona).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(persona_file_name(&name), content)])),
        ..ConfigMap::default()
    };
    Ok((cm, hash))
}

/// The pod's `routes.yaml`: default persona and inbound number routes.
#[derive(Serialize, Debug, PartialEq)]
pub struct RoutesFile {
    /// Persona for numbers without a route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// E.164 number -> persona.
    pub numbers: BTreeMap<String, String>,
}

/// Routes limited to resolved personas: a route to a missing persona is dropped
/// (and reported in the VoiceDeployment's status) rather than shipped to the pods.
pub fn routes_file(vd: &VoiceDeployment, personas: &[ResolvedPersona]) -> RoutesFile {
    let known = |p: &str| personas.iter().any(|r| r.name == p);
    let default = vd.spec.default_persona.clone().filter(|p| known(p));
    let numbers = vd
        .spec
        .number_routes
        .iter()
        .flatten()
        .filter(|(_, p)| known(p))
        .map(|(n, p)| (n.clone(), p.clone()))
        .collect();
    RoutesFile { default, numbers }
}

/// The deployment's routes (and prices) ConfigMap.
pub fn routes_config_map(
    vd: &VoiceDeployment,
    personas: &[ResolvedPersona],
) -> Result<ConfigMap, BuildError> {
    let (name, _) = name_ns(vd)?;
    let routes = routes_file(vd, personas);
    let mut data = BTreeMap::from([(
        ROUTES_KEY.to_string(),
        serde_saphyr::to_string(&routes).map_err(|source| BuildError::Serialize {
            what: "routes".into(),
            source,
        })?,
    )]);
    if !vd.spec.prices.is_empty() {
        data.insert(PRICES_KEY.to_string(), render_prices(&vd.spec.prices)?);
    }
    Ok(ConfigMap {
        metadata: owned_meta(vd, routes_config_map_name(&name))?,
        data: Some(data),
        ..ConfigMap::default()
    })
}

fn render_prices(prices: &[Price]) -> Result<String, BuildError> {
    serde_saphyr::to_string(&prices).map_err(|source| BuildError::Serialize {
        what: "prices".into(),
        source,
    })
}
