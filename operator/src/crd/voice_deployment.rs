//! `VoiceDeployment`: which personas to serve, on how many pods, reachable how.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// A set of voice pods serving one or more personas.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "callmeback.dev",
    version = "v1alpha1",
    kind = "VoiceDeployment",
    plural = "voicedeployments",
    singular = "voicedeployment",
    shortname = "vd",
    category = "voice",
    namespaced,
    status = "VoiceDeploymentStatus",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Degraded","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].reason"}"#,
    printcolumn = r#"{"name":"Webhook","type":"string","priority":1,"jsonPath":".status.webhookUrl"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.personas) || has(self.personaSelector)").message("set personas (names) or personaSelector"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
#[x_kube(validation = Rule::new("!has(self.defaultPersona) || !has(self.personas) || self.defaultPersona in self.personas").message("defaultPersona must be one of personas"))]
#[x_kube(validation = Rule::new("!has(self.numberRoutes) || !has(self.personas) || self.numberRoutes.all(n, self.numberRoutes[n] in self.personas)").message("every numberRoutes target must be one of personas"))]
pub struct VoiceDeploymentSpec {
    /// Personas served, by name, in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Plain OpenAPI bounds instead of CEL: the apiserver refuses CRDs whose CEL
    // rules' estimated cost (unbounded lists of unbounded strings) exceeds its budget.
    #[schemars(length(min = 1, max = 100))]
    #[schemars(inner(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    ))]
    pub personas: Option<Vec<String>>,
    /// Personas served, by label (in addition to `personas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persona_selector: Option<LabelSelector>,
    /// Persona answering inbound numbers without a route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub default_persona: Option<String>,
    /// Inbound phone number (E.164) -> persona name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Map keys cannot carry a maxLength, so a CEL check of them is over the cost
    // budget; the operator checks them (`InvalidNumberRoute`).
    #[schemars(extend("maxProperties" = 200))]
    #[schemars(inner(length(min = 1, max = 63)))]
    pub number_routes: Option<BTreeMap<String, String>>,
    /// Voice pod image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Fixed replica count (ignored when `autoscaling` is set; the `scale`
    /// subresource writes here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Horizontal autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Pod resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Secret holding provider keys and `DATABASE_URL` (keys named like the pod's
    /// environment variables).
    pub secret_ref: SecretRef,
    /// The https base URL Twilio reaches, e.g. `https://voice.example.com`.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("publicUrl must be an http(s) URL"))]
    #[schemars(length(min = 8, max = 2048))]
    pub public_url: String,
    /// Optional Ingress in front of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// Twilio number wiring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twilio: Option<TwilioSpec>,
    /// Pods that may be voluntarily disrupted at once (the PodDisruptionBudget's
    /// `maxUnavailable`, default 1). Never 0: that blocks every node drain forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    #[x_kube(validation = Rule::new("self >= 1").message("maxUnavailable must be at least 1: 0 would block every voluntary disruption (node drains, cluster upgrades, autoscaler consolidation) forever; calls are protected by the pods' drain deadline (drainTimeoutSeconds), not by the budget"))]
    pub max_unavailable: Option<i32>,
    /// How long a voice pod that is being replaced or scaled down lets its calls run
    /// on (its drain deadline, `CALLMEBACK_DRAIN_TIMEOUT`); the pods'
    /// `terminationGracePeriodSeconds` is this plus the preStop sleep and the pod's
    /// shutdown phases. A deployment-level value, not derived from the personas, so
    /// persona edits never change the pod template (which would roll every pod).
    /// A served persona whose `maxCallDurationSeconds` is longer is reported in
    /// `Degraded` (reason `PersonaOutlastsDrain`). Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30, max = 14400))]
    pub drain_timeout_seconds: Option<u32>,
    /// Provider prices for call cost records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub prices: Vec<Price>,
}

/// When the kubelet pulls the voice pod image.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull when the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Autoscaling bounds and target.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Lower bound.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Upper bound.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target average CPU utilisation (percent), used when no calls target is set.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
    /// Scale on `voice_active_calls` per pod (a Pods metric, needs a metrics adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_active_calls_per_pod: Option<i32>,
}

/// Reference to a Secret in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Ingress settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Host name (defaults to the host of `publicUrl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// IngressClass name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// TLS secret for the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// Extra annotations (e.g. WebSocket timeouts for the ingress controller). Only an
    /// allowlist passes (no snippets, auth, mirror or redirect annotations; see the
    /// README, "Security"); others are dropped and reported in Degraded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Twilio phone numbers the operator points at this deployment.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TwilioSpec {
    /// E.164 numbers owned by the Twilio account in the Secret.
    #[serde(default)]
    #[schemars(length(max = 100))]
    #[schemars(inner(regex(pattern = r"^\+[1-9][0-9]{6,14}$")))]
    pub phone_numbers: Vec<String>,
}

/// A provider unit price.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Price {
    /// `twilio`, `deepgram`, `cerebras` or `elevenlabs`.
    #[schemars(extend("enum" = ["twilio", "deepgram", "cerebras", "elevenlabs"]))]
    pub provider: String,
    /// `stt_seconds`, `llm_input_tokens`, `llm_output_tokens`, `tts_characters`, `telephony_seconds`.
    #[schemars(extend("enum" = ["stt_seconds", "llm_input_tokens", "llm_output_tokens", "tts_characters", "telephony_seconds"]))]
    pub unit: String,
    /// Price per unit in USD, as a decimal string (e.g. `"0.0000043"`).
    #[schemars(length(max = 32), regex(pattern = r"^[0-9]+(\.[0-9]+)?$"))]
    pub usd_per_unit: String,
}

/// Observed state of a `VoiceDeployment`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoiceDeploymentStatus {
    /// Pods created by the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods ready to take calls.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods (for the `scale` subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Personas served by the pods (valid now, or invalid and kept at their last
    /// valid generation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved_personas: Vec<String>,
    /// Which generation of each selected Persona the pods serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub personas: Vec<PersonaServing>,
    /// The voice webhook URL to configure in Twilio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// `Available`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One selected Persona as the voice pods serve it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersonaServing {
    /// The Persona's name.
    pub name: String,
    /// The Persona generation in the pods' ConfigMap; absent when none is served (it
    /// was invalid from the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_generation: Option<i64>,
    /// The Persona's current `metadata.generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_generation: Option<i64>,
    /// Whether the current generation is valid. When false, the pods keep serving
    /// `servedGeneration`, the last valid one.
    pub valid: bool,
}

/// Drain deadline when `spec.drainTimeoutSeconds` is unset: an hour covers nearly
/// every phone conversation and still bounds how long a stuck pod lingers.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 3600;

impl VoiceDeploymentSpec {
    /// `drainTimeoutSeconds` or its default.
    pub fn drain_timeout_seconds(&self) -> u32 {
        self.drain_timeout_seconds
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECONDS)
    }

    /// `publicUrl` without a trailing slash.
    pub fn public_base(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }

    /// The voice webhook Twilio must call: `<publicUrl>/twilio/voice`.
    pub fn webhook_url(&self) -> String {
        format!("{}/twilio/voice", self.public_base())
    }

    /// The call status callback: `<publicUrl>/twilio/status`.
    pub fn status_callback_url(&self) -> String {
        format!("{}/twilio/status", self.public_base())
    }

    /// The Twilio numbers this deployment wires (empty when none).
    pub fn twilio_numbers(&self) -> &[String] {
        self.twilio
            .as_ref()
            .map(|t| t.phone_numbers.as_slice())
            .unwrap_or_default()
    }
}

fn default_image() -> String {
    "ghcr.io/callmeback/voice-pod:0.1.0".into()
}
fn default_cpu_target() -> i32 {
    70
}
