//! The one ConfigMap a `VoiceDeployment`'s pods mount (`<vd>-config`): every served
//! persona as `<persona>.yaml` (the `PersonaSpec` as YAML), the routes as
//! `_routes.yaml` and the prices as `_prices.yaml`. The Deployment mounts it whole
//! as a directory (no `items`, no `subPath`), so adding, removing or editing a
//! persona changes only this object's data: the kubelet syncs the volume (an atomic
//! `..data` symlink swap) and the pods hot-reload it, with no restart.
//!
//! Key names: ConfigMap keys cannot hold `/`, so personas and the deployment's own
//! files share one directory. The latter start with `_`, which no Kubernetes object
//! name (so no persona name) can, so a persona called `routes` cannot collide.
//!
//! Last valid version: a persona whose current generation is invalid keeps its
//! entry from the current ConfigMap (content and generation, the latter in the
//! [`PERSONA_GENERATIONS_ANNOTATION`], so it survives operator restarts). Only a
//! persona that is no longer selected (deleted, or dropped from the selection)
//! leaves the ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use super::{BuildError, InvalidPersona, ResolvedPersona, name_ns, owned_meta};
use callmeback_api::{PersonaServing, PersonaSpec, Price, VoiceDeployment};

/// Key of the routes file.
pub const ROUTES_KEY: &str = "_routes.yaml";
/// Key of the prices file (always present, `[]` without prices, so the pod's
/// `CALLMEBACK_PRICES_FILE` always names a file).
pub const PRICES_KEY: &str = "_prices.yaml";
/// Annotation on the ConfigMap: JSON object, persona name -> the Persona generation
/// its entry was rendered from.
pub const PERSONA_GENERATIONS_ANNOTATION: &str = "callmeback.dev/persona-generations";
/// The apiserver refuses ConfigMaps over 1 MiB (data plus metadata); stay below
/// with room for metadata so the failure is ours, readable, and not a write error.
pub const MAX_CONFIG_BYTES: usize = 1_000_000;

/// Name of a deployment's ConfigMap.
pub fn config_map_name(vd: &str) -> String {
    format!("{vd}-config")
}

/// Name of the routes-only ConfigMap older operator versions made (its leftovers
/// are removed once no pod mounts it).
pub fn legacy_routes_config_map_name(vd: &str) -> String {
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

/// The pod's routes file: default persona and inbound number routes.
#[derive(Serialize, Debug, PartialEq)]
pub struct RoutesFile {
    /// Persona for numbers without a route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// E.164 number -> persona.
    pub numbers: BTreeMap<String, String>,
}

/// Routes limited to served personas: a route to a persona the pods do not have is
/// dropped (and reported in the VoiceDeployment's status) rather than shipped.
pub fn routes_file(vd: &VoiceDeployment, served: &[&str]) -> RoutesFile {
    let known = |p: &str| served.contains(&p);
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

/// The deployment's ConfigMap and what it serves of each selected persona.
#[derive(Clone, Debug, PartialEq)]
pub struct PersonaConfig {
    /// `<vd>-config`.
    pub config_map: ConfigMap,
    /// One entry per selected persona (valid or not), sorted by name.
    pub serving: Vec<PersonaServing>,
}

impl PersonaConfig {
    /// Names of the personas the pods serve (valid now or kept at a last valid version).
    pub fn served_names(&self) -> Vec<String> {
        let data = self.config_map.data.as_ref();
        self.serving
            .iter()
            .filter(|s| data.is_some_and(|d| d.contains_key(&persona_file_name(&s.name))))
            .map(|s| s.name.clone())
            .collect()
    }
}

/// The generations recorded on `cm` ([`PERSONA_GENERATIONS_ANNOTATION`]); an
/// unreadable annotation counts as empty (entries then report no served generation).
pub fn served_generations(cm: &ConfigMap) -> BTreeMap<String, i64> {
    cm.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PERSONA_GENERATIONS_ANNOTATION))
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// Builds `<vd>-config` from the valid personas, the invalid ones (kept at their
/// entry in `current`, the ConfigMap as it is now, if they have one) and the spec's
/// routes and prices.
pub fn persona_config(
    vd: &VoiceDeployment,
    resolved: &[ResolvedPersona],
    invalid: &[InvalidPersona],
    current: Option<&ConfigMap>,
) -> Result<PersonaConfig, BuildError> {
    let (name, _) = name_ns(vd)?;
    let current_data = current.and_then(|c| c.data.as_ref());
    let current_generations = current.map(served_generations).unwrap_or_default();

    let mut data = BTreeMap::new();
    let mut generations: BTreeMap<String, i64> = BTreeMap::new();
    let mut serving = Vec::new();
    for p in resolved {
        data.insert(
            persona_file_name(&p.name),
            render_persona_file(&p.name, &p.spec)?,
        );
        if let Some(g) = p.generation {
            generations.insert(p.name.clone(), g);
        }
        serving.push(PersonaServing {
            name: p.name.clone(),
            served_generation: p.generation,
            current_generation: p.generation,
            valid: true,
        });
    }
    for p in invalid {
        let key = persona_file_name(&p.name);
        let kept = current_data.and_then(|d| d.get(&key));
        let served_generation = match kept {
            Some(content) => {
                data.insert(key, content.clone());
                let g = current_generations.get(&p.name).copied();
                if let Some(g) = g {
                    generations.insert(p.name.clone(), g);
                }
                g
            }
            None => None,
        };
        serving.push(PersonaServing {
            name: p.name.clone(),
            served_generation,
            current_generation: p.generation,
            valid: false,
        });
    }
    serving.sort_by(|a, b| a.name.cmp(&b.name));

    let served: Vec<&str> = serving
        .iter()
        .filter(|s| data.contains_key(&persona_file_name(&s.name)))
        .map(|s| s.name.as_str())
        .collect();
    let routes = routes_file(vd, &served);
    data.insert(
        ROUTES_KEY.to_string(),
        serde_saphyr::to_string(&routes).map_err(|source| BuildError::Serialize {
            what: "routes".into(),
            source,
        })?,
    );
    data.insert(PRICES_KEY.to_string(), render_prices(&vd.spec.prices)?);
    let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_CONFIG_BYTES {
        return Err(BuildError::ConfigTooLarge {
            name: config_map_name(&name),
            bytes: size,
        });
    }

    let mut metadata = owned_meta(vd, config_map_name(&name))?;
    metadata.annotations = Some(BTreeMap::from([(
        PERSONA_GENERATIONS_ANNOTATION.to_string(),
        serde_json::to_string(&generations).map_err(BuildError::Json)?,
    )]));
    Ok(PersonaConfig {
        config_map: ConfigMap {
            metadata,
            data: Some(data),
            ..ConfigMap::default()
        },
        serving,
    })
}

fn render_prices(prices: &[Price]) -> Result<String, BuildError> {
    if prices.is_empty() {
        // The pod's price file parser takes a YAML list; an empty one is "no prices".
        return Ok("[]\n".into());
    }
    serde_saphyr::to_string(&prices).map_err(|source| BuildError::Serialize {
        what: "prices".into(),
        source,
    })
}
