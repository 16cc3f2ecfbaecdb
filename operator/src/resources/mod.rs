//! Desired-object builders: pure functions from custom resources to the Kubernetes
//! objects the operator applies. No I/O here, so `voice-operator render`, the
//! reconcilers and the golden tests all share exactly the same output.
//!
//! ## Layout
//! - [`configmap`]: a deployment's one ConfigMap: its personas (`<persona>.yaml`),
//!   routes (`_routes.yaml`) and prices (`_prices.yaml`), last valid versions kept.
//! - [`deployment`]: the voice pod Deployment (the ConfigMap mounted whole, env
//!   from the Secret, probes, restricted security, grace period, preStop). Its pod
//!   template never depends on the personas.
//! - [`service`], [`hpa`], [`pdb`], [`ingress`]: the rest of the set; [`rbac`]: the
//!   pods' ServiceAccount (no Role: the pods get no API access).

pub mod configmap;
pub mod deployment;
pub mod hpa;
pub mod ingress;
pub mod pdb;
pub mod rbac;
pub mod service;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use sha2::{Digest, Sha256};

use callmeback_api::{PersonaSpec, VoiceDeployment};

/// The one field manager every server-side apply of the operator uses.
pub const FIELD_MANAGER: &str = "callmeback-operator";
/// `app.kubernetes.io/managed-by` value on everything the operator creates; owned-object
/// watches select on it so the operator caches only its own objects.
pub const MANAGED_BY: &str = "callmeback-operator";
/// Label selector matching every object the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=callmeback-operator";
/// Pod-template annotation: hash of the Secret-derived env and image. A change rolls
/// the pods out; persona content is deliberately not part of it (hot reload).
pub const ENV_HASH_ANNOTATION: &str = "callmeback.dev/env-hash";
/// Label naming the `VoiceDeployment` an object belongs to.
pub const VOICE_DEPLOYMENT_LABEL: &str = "callmeback.dev/voice-deployment";
/// Label naming the `Persona` a ConfigMap renders (per-Persona ConfigMaps of older
/// operator versions; kept for the ownership check of their leftovers).
pub const PERSONA_LABEL: &str = "callmeback.dev/persona";

/// Directory the deployment's ConfigMap is mounted at (whole, so edits arrive).
pub const CONFIG_DIR: &str = "/etc/callmeback";
/// Persona files inside the pod: the ConfigMap's directory itself.
pub const PERSONA_DIR: &str = CONFIG_DIR;
/// Routes file inside the pod.
pub const ROUTES_FILE: &str = "/etc/callmeback/_routes.yaml";
/// Prices file inside the pod.
pub const PRICES_FILE: &str = "/etc/callmeback/_prices.yaml";

/// App port (Twilio webhooks, media streams, `/v1`).
pub const HTTP_PORT: i32 = 8080;
/// Metrics and probes port.
pub const METRICS_PORT: i32 = 9090;

/// Errors building desired objects.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The custom resource has no namespace (never true for objects from the API).
    #[error("{0} has no namespace")]
    MissingNamespace(String),
    /// The custom resource has no name.
    #[error("object has no name")]
    MissingName,
    /// The personas, routes and prices exceed what one ConfigMap can hold.
    #[error(
        "ConfigMap {name} would hold {bytes} bytes, over the {max} the operator writes \
         (the apiserver's limit is 1 MiB): serve fewer or shorter personas per VoiceDeployment",
        max = configmap::MAX_CONFIG_BYTES
    )]
    ConfigTooLarge {
        /// The ConfigMap.
        name: String,
        /// Its data size.
        bytes: usize,
    },
    /// Encoding an annotation failed.
    #[error("encoding JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Serializing a persona or routes file failed.
    #[error("serializing {what}: {source}")]
    Serialize {
        /// What was being serialized.
        what: String,
        /// The serializer's error.
        #[source]
        source: serde_saphyr::ser_error::Error,
    },
}

/// Name and namespace of a custom resource, or a [`BuildError`].
pub fn name_ns<K: Resource>(obj: &K) -> Result<(String, String), BuildError> {
    let name = obj.meta().name.clone().ok_or(BuildError::MissingName)?;
    let ns = obj
        .meta()
        .namespace
        .clone()
        .ok_or_else(|| BuildError::MissingNamespace(name.clone()))?;
    Ok((name, ns))
}

/// Labels selecting a deployment's voice pods (immutable once the Deployment exists).
pub fn selector_labels(vd_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "voice-pod".to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            vd_name.to_string(),
        ),
    ])
}

/// The selector as a label-selector string (for the `scale` subresource status).
pub fn selector_string(vd_name: &str) -> String {
    selector_labels(vd_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels on every object made for a `VoiceDeployment`.
pub fn common_labels(vd_name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(vd_name);
    labels.insert("app.kubernetes.io/component".into(), "voice".into());
    labels.insert("app.kubernetes.io/part-of".into(), "callmeback".into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels.insert(VOICE_DEPLOYMENT_LABEL.into(), vd_name.into());
    labels
}

/// Metadata for an object owned by a `VoiceDeployment`.
pub fn owned_meta(vd: &VoiceDeployment, name: String) -> Result<ObjectMeta, BuildError> {
    let (vd_name, ns) = name_ns(vd)?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(ns),
        labels: Some(common_labels(&vd_name)),
        owner_references: owner_ref(vd).map(|o| vec![o]),
        ..ObjectMeta::default()
    })
}

/// The controller owner reference for `obj`; `None` offline (no uid yet), as in
/// `voice-operator render`.
pub fn owner_ref<K: Resource<DynamicType = ()>>(obj: &K) -> Option<OwnerReference> {
    obj.controller_owner_ref(&())
}

/// Short content hash: SHA-256, hex, first 16 characters.
pub fn short_hash(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefix each part so ("ab","c") and ("a","bc") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    digest
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// A selected persona whose current generation is valid.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPersona {
    /// The `Persona`'s name (the file name in the pod).
    pub name: String,
    /// Its spec.
    pub spec: PersonaSpec,
    /// Its `metadata.generation` (`None` offline, in `voice-operator render`).
    pub generation: Option<i64>,
}

/// A selected persona whose current generation fails validation.
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidPersona {
    /// The `Persona`'s name.
    pub name: String,
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// What is wrong, for status and Events.
    pub problems: String,
}

/// Everything a reconcile of one `VoiceDeployment` wants to exist.
#[derive(Clone, Debug)]
pub struct DesiredObjects {
    /// The pods' identity (no API access: no Role, no mounted token).
    pub service_account: ServiceAccount,
    /// The personas, routes and prices the pods mount, and what is served of each persona.
    pub config: configmap::PersonaConfig,
    /// The voice pods.
    pub deployment: Deployment,
    /// App and metrics ports.
    pub service: Service,
    /// Present under the CPU policy (`spec.autoscaling.cpu`) only.
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// Always present: scale-down and node drains never take every pod at once.
    pub pdb: PodDisruptionBudget,
    /// Present when `spec.ingress` is set.
    pub ingress: Option<Ingress>,
}

/// Inputs beyond the `VoiceDeployment` itself.
#[derive(Clone, Debug, Default)]
pub struct DeploymentInputs {
    /// The selected personas found and valid, sorted by name.
    pub personas: Vec<ResolvedPersona>,
    /// The selected personas found and invalid (served at their last valid version
    /// when `current_config` has one).
    pub invalid: Vec<InvalidPersona>,
    /// The deployment's ConfigMap as it is now (`None` before the first reconcile).
    pub current_config: Option<ConfigMap>,
    /// Hash of the Secret's values for the keys the pods read, so a changed key rolls
    /// the pods (secretKeyRef env is only read at container start).
    pub secret_hash: String,
}

/// Build the full desired set for `vd`.
pub fn desired_objects(
    vd: &VoiceDeployment,
    inputs: &DeploymentInputs,
) -> Result<DesiredObjects, BuildError> {
    Ok(DesiredObjects {
        service_account: rbac::service_account(vd)?,
        config: configmap::persona_config(
            vd,
            &inputs.personas,
            &inputs.invalid,
            inputs.current_config.as_ref(),
        )?,
        deployment: deployment::deployment(vd, inputs)?,
        service: service::service(vd)?,
        hpa: hpa::hpa(vd)?,
        pdb: pdb::pdb(vd)?,
        ingress: ingress::ingress(vd)?,
    })
}

impl DesiredObjects {
    /// Every object as JSON, in apply order (identity and config before the pods).
    pub fn to_json_values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = vec![
            serde_json::to_value(&self.service_account)?,
            serde_json::to_value(&self.config.config_map)?,
            serde_json::to_value(&self.deployment)?,
            serde_json::to_value(&self.service)?,
        ];
        if let Some(hpa) = &self.hpa {
            out.push(serde_json::to_value(hpa)?);
        }
        out.push(serde_json::to_value(&self.pdb)?);
        if let Some(ingress) = &self.ingress {
            out.push(serde_json::to_value(ingress)?);
        }
        Ok(out)
    }
}
