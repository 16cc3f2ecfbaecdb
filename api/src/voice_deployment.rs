//! `VoiceDeployment`: which personas to serve, on how many pods, reachable how.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Calls","type":"integer","jsonPath":".status.activeCalls"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Degraded","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].reason"}"#,
    printcolumn = r#"{"name":"Webhook","type":"string","priority":1,"jsonPath":".status.webhookUrl"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.personas) || has(self.personaSelector)").message("set personas (names) or personaSelector"))]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || self.autoscaling.minReplicas <= self.autoscaling.maxReplicas").message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))]
// `kubectl scale vd` writes spec.replicas through the scale subresource, which runs
// this validation too: under autoscaling it is refused with this message instead of
// being silently ignored.
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("replicas cannot be set while autoscaling is on: change autoscaling.minReplicas/maxReplicas instead (or remove autoscaling to set a fixed count)"))]
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
    /// Fixed replica count (default 1). Not allowed together with `autoscaling`; the
    /// `scale` subresource (`kubectl scale vd`) writes here, so it is refused while
    /// autoscaling is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Autoscaling on live calls (or, with `autoscaling.cpu`, a CPU HorizontalPodAutoscaler).
    /// Switching between a fixed count and autoscaling keeps the current replica count.
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
    /// Which numbers the call-me-back API (`POST /v1/calls`) may dial, and how often.
    /// Premium-rate and shared-cost numbers are refused whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialing: Option<DialingSpec>,
}

/// The dial guard and rate limits of the voice pods' call-me-back API (README
/// "Security"); each field maps to the pods' `CALLMEBACK_DIAL_*` setting.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DialingSpec {
    /// Destination countries (ISO 3166 codes such as `US`, `GB`), or `["*"]` for any;
    /// default: the caller ID's country.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 250))]
    #[schemars(inner(regex(pattern = r"^([A-Z]{2}|\*)$")))]
    pub countries: Vec<String>,
    /// E.164 prefixes dialled besides those countries (`+1415`, `+882`); numbers of no
    /// country (international networks) need one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    #[schemars(inner(regex(pattern = r"^\+[0-9]{1,15}$")))]
    pub prefixes: Vec<String>,
    /// Region national numbers in requests are read in (default: the caller ID's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z]{2}$"))]
    pub default_region: Option<String>,
    /// Calls to one number at most over a sliding window, `N/duration` (`5/1h`,
    /// `3/10m`, `20/1d`) or `off`; default `5/1h`. Shared by the pods through
    /// PostgreSQL when the Secret has `DATABASE_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([1-9][0-9]{0,6}/[1-9][0-9]{0,5}[smhd]|off)$")
    )]
    pub limit_per_number: Option<String>,
    /// Calls for one user at most (a request's `user`, or a user token's), same form;
    /// default `20/1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([1-9][0-9]{0,6}/[1-9][0-9]{0,5}[smhd]|off)$")
    )]
    pub limit_per_user: Option<String>,
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

/// Autoscaling: by default on live calls (the operator reads every pod's load on
/// its metrics port and sets the Deployment's replicas itself; no HPA or metrics
/// adapter), or on CPU through a HorizontalPodAutoscaler when `cpu` is set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.targetActiveCallsPerPod)").message("autoscaling.targetActiveCallsPerPod was removed: set autoscaling.callsPerPod (and buffer); the operator now scales on live calls itself, no metrics adapter needed"))]
#[x_kube(validation = Rule::new("!has(self.targetCpuUtilization)").message("autoscaling.targetCpuUtilization moved to autoscaling.cpu.targetUtilization"))]
pub struct AutoscalingSpec {
    /// Fewest pods, whatever the load.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most pods, whatever the load.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Calls one pod should carry: desired replicas =
    /// ceil((active calls + buffer) / callsPerPod), within min/max. Keep it at or below
    /// the pods' hard limit (`CALLMEBACK_MAX_CALLS`, default 100).
    #[serde(default = "default_calls_per_pod")]
    #[schemars(range(min = 1, max = 10000))]
    pub calls_per_pod: i32,
    /// Free call slots kept warm above the live calls: an absolute number (`5`) or a
    /// percentage of the live calls (`"20%"`, rounded up). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Checked by the operator (Degraded `InvalidAutoscaling`), not by CEL: a CEL
    // rule on an unbounded int-or-string was not verified against the apiserver's
    // cost budget yet.
    pub buffer: Option<IntOrString>,
    /// Seconds a lower replica count must hold before the operator scales down (calls
    /// last minutes; a short dip must not remove pods). Scaling up is immediate.
    #[serde(default = "default_scale_down_stabilization_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// Most pods removed in one scale-down step.
    #[serde(default = "default_max_scale_down_step")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_scale_down_step: i32,
    /// Scale on CPU instead of calls: the operator creates a HorizontalPodAutoscaler
    /// (needs metrics-server) and leaves the replica count to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuAutoscaling>,
    /// Removed (rejected by the schema): use `callsPerPod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_active_calls_per_pod: Option<i32>,
    /// Removed (rejected by the schema): use `cpu.targetUtilization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_cpu_utilization: Option<i32>,
}

/// The CPU autoscaling policy (a HorizontalPodAutoscaler).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuAutoscaling {
    /// Target average CPU utilisation, percent of the pods' CPU request.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_utilization: i32,
}

impl AutoscalingSpec {
    /// Calls-based autoscaling with these bounds and defaults for the rest.
    pub fn calls(min_replicas: i32, max_replicas: i32, calls_per_pod: i32) -> Self {
        Self {
            min_replicas,
            max_replicas,
            calls_per_pod,
            buffer: None,
            scale_down_stabilization_seconds: default_scale_down_stabilization_seconds(),
            max_scale_down_step: default_max_scale_down_step(),
            cpu: None,
            target_active_calls_per_pod: None,
            target_cpu_utilization: None,
        }
    }
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

/// Why a VoiceDeployment is `Degraded`: the `reason` of that condition. Alerts,
/// dashboards and `kubectl wait` match on these strings, so they are part of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DegradedReason {
    /// Same-named objects exist that this VoiceDeployment does not own; nothing is applied.
    NotOwned,
    /// The Secret named by `secretRef` does not exist.
    SecretMissing,
    /// The Secret lacks keys the pods need.
    SecretKeyMissing,
    /// A named persona does not exist.
    PersonaNotFound,
    /// A `numberRoutes` key is not an E.164 number.
    InvalidNumberRoute,
    /// `ingress.annotations` outside the allowlist were dropped.
    IngressAnnotationRejected,
    /// No persona matches `personas` or `personaSelector`.
    NoPersonas,
    /// The autoscaling settings cannot be used.
    InvalidAutoscaling,
    /// A served persona is invalid (its last valid version is served).
    PersonaInvalid,
    /// A persona's calls may outlast the pods' drain deadline.
    PersonaOutlastsDrain,
    /// Twilio refused a wiring request.
    TwilioError,
    /// Twilio has been failing for a while with a wiring change pending.
    TwilioUnavailable,
    /// Another VoiceDeployment took over one of this one's numbers.
    TwilioNumberTakenOver,
}

impl DegradedReason {
    /// The condition's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotOwned => "NotOwned",
            Self::SecretMissing => "SecretMissing",
            Self::SecretKeyMissing => "SecretKeyMissing",
            Self::PersonaNotFound => "PersonaNotFound",
            Self::InvalidNumberRoute => "InvalidNumberRoute",
            Self::IngressAnnotationRejected => "IngressAnnotationRejected",
            Self::NoPersonas => "NoPersonas",
            Self::InvalidAutoscaling => "InvalidAutoscaling",
            Self::PersonaInvalid => "PersonaInvalid",
            Self::PersonaOutlastsDrain => "PersonaOutlastsDrain",
            Self::TwilioError => "TwilioError",
            Self::TwilioUnavailable => "TwilioUnavailable",
            Self::TwilioNumberTakenOver => "TwilioNumberTakenOver",
        }
    }
}

impl std::fmt::Display for DegradedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Observed state of a `VoiceDeployment`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoiceDeploymentStatus {
    /// Replicas the operator asks the Deployment for (fixed count, the calls
    /// autoscaler's decision, or the HPA's under the CPU policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Pods created by the Deployment.
    #[serde(default)]
    pub replicas: i32,
    /// Pods ready to take calls.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Pods finishing their calls before they exit (they report `draining`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_replicas: Option<i32>,
    /// Live calls over the pods whose load was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_calls: Option<i64>,
    /// Call capacity over the pods whose load was read (sum of their limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<i64>,
    /// Running pods whose load could not be read (counted as full, never as idle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_load_pods: Option<i32>,
    /// When the calls autoscaler last changed the replica count (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
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
    /// `Available`, `Progressing`, `Degraded`, `ScalingActive`, `ScalingLimited`.
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
fn default_calls_per_pod() -> i32 {
    20
}
fn default_scale_down_stabilization_seconds() -> i32 {
    120
}
fn default_max_scale_down_step() -> i32 {
    2
}
