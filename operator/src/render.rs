//! `voice-operator render -f persona.yaml -f voicedeployment.yaml`: the objects the
//! operator would apply, offline, as multi-document YAML (like `helm template`).
//!
//! The output is exactly what the reconcilers build, with two offline differences:
//! no owner references (nothing has a uid yet) and an env hash computed without the
//! Secret's values (the operator includes them, so a changed key rolls the pods).

use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::reconcile::voice_deployment::resolve_personas;
use crate::resources::{BuildError, DeploymentInputs, desired_objects};
use callmeback_api::{Persona, VoiceDeployment};

/// Namespace assumed for objects that name none (as `kubectl apply` would).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Render failures.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A file is not YAML.
    #[error("{file}: not valid YAML: {message}")]
    Yaml {
        /// The file.
        file: String,
        /// The parser's message.
        message: String,
    },
    /// A document claims a kind but does not match its schema.
    #[error("{file}: invalid {kind}: {source}")]
    Invalid {
        /// The file.
        file: String,
        /// The kind.
        kind: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Building objects failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Serializing output failed.
    #[error("serializing output: {0}")]
    Output(String),
}

/// Renders the objects for the custom resources in `files` (name, content).
/// Documents of other kinds (a Secret template) are skipped.
pub fn render(files: &[(String, String)]) -> Result<String, RenderError> {
    let mut personas = Vec::new();
    let mut deployments = Vec::new();
    for (file, content) in files {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_str_multiple(content).map_err(|e| RenderError::Yaml {
                file: file.clone(),
                message: e.to_string(),
            })?;
        for doc in docs {
            let kind = doc
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_string();
            let invalid = |source| RenderError::Invalid {
                file: file.clone(),
                kind: kind.clone(),
                source,
            };
            match kind.as_str() {
                "Persona" => {
                    let mut p: Persona = serde_json::from_value(doc.clone()).map_err(invalid)?;
                    p.meta_mut()
                        .namespace
                        .get_or_insert_with(|| DEFAULT_NAMESPACE.into());
                    personas.push(p);
                }
                "VoiceDeployment" => {
                    let mut vd: VoiceDeployment =
                        serde_json::from_value(doc.clone()).map_err(invalid)?;
                    vd.meta_mut()
                        .namespace
                        .get_or_insert_with(|| DEFAULT_NAMESPACE.into());
                    deployments.push(vd);
                }
                _ => {}
            }
        }
    }

    let (store, mut writer) = reflector::store::<Persona>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for p in &personas {
        writer.apply_watcher_event(&watcher::Event::InitApply(p.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);

    let mut out: Vec<serde_json::Value> = Vec::new();
    for vd in &deployments {
        let ns = vd.namespace().unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        let resolution = resolve_personas(vd, &ns, &store);
        for missing in &resolution.missing {
            eprintln!(
                "# {}: persona {missing} not among the inputs",
                vd.name_any()
            );
        }
        for invalid in &resolution.invalid {
            eprintln!(
                "# {}: persona {} is invalid: {}",
                vd.name_any(),
                invalid.name,
                invalid.problems
            );
        }
        let inputs = DeploymentInputs {
            personas: resolution.resolved,
            // Offline there is no last valid version to keep.
            invalid: Vec::new(),
            current_config: None,
            secret_hash: String::new(),
        };
        let desired = desired_objects(vd, &inputs)?;
        out.extend(
            desired
                .to_json_values()
                .map_err(|e| RenderError::Output(e.to_string()))?,
        );
    }
    let mut text = String::new();
    for doc in &out {
        text.push_str("---\n");
        text.push_str(
            &serde_saphyr::to_string(doc).map_err(|e| RenderError::Output(e.to_string()))?,
        );
    }
    Ok(text)
}
