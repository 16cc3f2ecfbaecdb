//! The voice pod Deployment.
//!
//! Choices that matter for calls:
//! - The deployment's one ConfigMap (personas, routes, prices) mounted whole at
//!   `/etc/callmeback`: no `items` (they would put persona names in the template),
//!   never `subPath` (those never receive updates). The pod template depends on no
//!   persona, so adding, removing or editing one never rolls the pods; the kubelet
//!   syncs the volume and the pods hot-reload it.
//! - Env from the Secret per key (`secretKeyRef`, optional keys marked optional), so
//!   only the keys the pod reads reach it; a hash of their values sits in a
//!   pod-template annotation because env is read only at container start.
//! - `terminationGracePeriodSeconds` = the VoiceDeployment's `drainTimeoutSeconds` +
//!   preStop sleep + margin, and `CALLMEBACK_DRAIN_TIMEOUT` = `drainTimeoutSeconds`:
//!   a pod being replaced finishes its calls. Deliberately not derived from the
//!   personas' `maxCallDurationSeconds`: both fields sit in the pod template, so a
//!   persona edit would roll every pod (and an "only ever raise" rule would still roll
//!   them on a raise, and make the template depend on history). A persona that
//!   outlasts the deadline is reported in the VoiceDeployment's `Degraded` instead.
//! - preStop is a short `sleep` (the kubelet's built-in sleep action, no shell in the
//!   image needed): SIGTERM comes after endpoints stop routing new webhooks to the
//!   pod. The pod itself starts draining on SIGTERM.
//! - `maxUnavailable: 0` rollouts: capacity never drops while calls move over.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::configmap::config_map_name;
use super::{
    BuildError, CONFIG_DIR, DeploymentInputs, ENV_HASH_ANNOTATION, HTTP_PORT, METRICS_PORT,
    PERSONA_DIR, PRICES_FILE, ROUTES_FILE, common_labels, name_ns, owned_meta, selector_labels,
    short_hash,
};
use crate::autoscale::ScalingPolicy;
use callmeback_api::VoiceDeployment;

/// Seconds the preStop hook sleeps so endpoint removal propagates before SIGTERM.
pub const PRESTOP_SLEEP_SECONDS: i64 = 5;
/// Extra grace beyond the longest call and the preStop sleep: the pod's own
/// after-drain shutdown budget (ending calls, final writes) plus 5 s of slack.
pub const GRACE_MARGIN_SECONDS: i64 = callmeback_api::POD_SHUTDOWN_AFTER_DRAIN_SECONDS as i64 + 5;
/// UID/GID the voice pod runs as (the distroless `nonroot` user).
pub const RUN_AS_USER: i64 = 65532;

/// Secret keys mapped into the pod's environment, and whether the pod needs them.
/// Names match the pod's variables, so one Secret serves `--from-env-file` too.
pub const SECRET_ENV_KEYS: &[(&str, bool)] = &[
    ("TWILIO_ACCOUNT_SID", true),
    ("TWILIO_AUTH_TOKEN", true),
    ("TWILIO_API_URL", false),
    ("TWILIO_FROM_NUMBER", false),
    ("DEEPGRAM_API_KEY", true),
    ("DEEPGRAM_URL", false),
    ("CEREBRAS_API_KEY", true),
    ("CEREBRAS_URL", false),
    ("ELEVENLABS_API_KEY", true),
    ("ELEVENLABS_URL", false),
    ("DATABASE_URL", false),
    ("CALLMEBACK_API_TOKEN", false),
];

/// The required Secret keys.
pub fn required_secret_keys() -> impl Iterator<Item = &'static str> {
    SECRET_ENV_KEYS
        .iter()
        .filter(|(_, req)| *req)
        .map(|(k, _)| *k)
}

/// `terminationGracePeriodSeconds` for the voice pods: the drain deadline, the
/// preStop sleep before it and the pod's shutdown phases after it.
pub fn grace_period_seconds(vd: &VoiceDeployment) -> i64 {
    i64::from(vd.spec.drain_timeout_seconds()) + PRESTOP_SLEEP_SECONDS + GRACE_MARGIN_SECONDS
}

/// The value of [`ENV_HASH_ANNOTATION`]: Secret-derived env plus image, plain env
/// and the prices, all read only at start. Persona content is not in it.
pub fn env_hash(vd: &VoiceDeployment, inputs: &DeploymentInputs) -> String {
    // Prices are read once at start (they price call records); a change must reach
    // the pods, so it rolls them. Serializing a list of strings cannot fail.
    let prices = serde_json::to_vec(&vd.spec.prices).unwrap_or_default();
    short_hash(&[
        inputs.secret_hash.as_bytes(),
        vd.spec.image.as_bytes(),
        vd.spec.public_url.as_bytes(),
        &prices,
    ])
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn container_env(vd: &VoiceDeployment) -> Vec<EnvVar> {
    let mut out = vec![
        env("CALLMEBACK_PUBLIC_URL", vd.spec.public_base()),
        env("CALLMEBACK_LISTEN", format!("0.0.0.0:{HTTP_PORT}")),
        env(
            "CALLMEBACK_METRICS_LISTEN",
            format!("0.0.0.0:{METRICS_PORT}"),
        ),
        env("CALLMEBACK_PERSONA_DIR", PERSONA_DIR),
        env("CALLMEBACK_ROUTES_FILE", ROUTES_FILE),
        env("CALLMEBACK_PRICES_FILE", PRICES_FILE),
        env(
            "CALLMEBACK_DRAIN_TIMEOUT",
            format!("{}s", vd.spec.drain_timeout_seconds()),
        ),
        // The pod names itself on call records and scheduler claims.
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    // The dial guard and rate limits: only what the spec sets, so the pods' own
    // defaults (the caller ID's country, 5/1h, 20/1h) apply otherwise.
    if let Some(d) = &vd.spec.dialing {
        if !d.countries.is_empty() {
            out.push(env("CALLMEBACK_DIAL_COUNTRIES", d.countries.join(",")));
        }
        if !d.prefixes.is_empty() {
            out.push(env("CALLMEBACK_DIAL_PREFIXES", d.prefixes.join(",")));
        }
        for (name, value) in [
            ("CALLMEBACK_DIAL_DEFAULT_REGION", &d.default_region),
            ("CALLMEBACK_DIAL_LIMIT_PER_NUMBER", &d.limit_per_number),
            ("CALLMEBACK_DIAL_LIMIT_PER_USER", &d.limit_per_user),
        ] {
            if let Some(v) = value {
                out.push(env(name, v.as_str()));
            }
        }
    }
    for (key, required) in SECRET_ENV_KEYS {
        out.push(EnvVar {
            name: (*key).into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: vd.spec.secret_ref.name.clone(),
                    key: (*key).into(),
                    optional: if *required { None } else { Some(true) },
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    out
}

fn config_volume(vd_name: &str) -> Volume {
    Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(vd_name),
            // Mounted whole: `items` would name personas in the template.
            items: None,
            default_mode: Some(0o444),
            optional: Some(false),
        }),
        ..Volume::default()
    }
}

fn default_resources() -> ResourceRequirements {
    // Requests make CPU autoscaling meaningful; the memory limit bounds audio buffers.
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("250m".into())),
            ("memory".to_string(), Quantity("256Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("512Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// `spec.replicas` of the Deployment: the fixed count; under the calls policy
/// `minReplicas` here (the reconciler puts the autoscaler's decision in its place, so
/// the operator's one field manager always writes replicas); under the CPU policy
/// none (the HorizontalPodAutoscaler owns the field; leaving it out of the apply
/// keeps the two from fighting).
pub fn replicas(vd: &VoiceDeployment) -> Option<i32> {
    match ScalingPolicy::from_spec(vd.spec.replicas, vd.spec.autoscaling.as_ref()) {
        Ok(ScalingPolicy::Fixed(n)) => Some(n),
        Ok(ScalingPolicy::Calls(p)) => i32::try_from(p.min).ok(),
        Ok(ScalingPolicy::Cpu) | Err(_) => None,
    }
}

/// The voice pod Deployment for `vd`.
pub fn deployment(
    vd: &VoiceDeployment,
    inputs: &DeploymentInputs,
) -> Result<Deployment, BuildError> {
    let (name, _) = name_ns(vd)?;
    let spec = &vd.spec;
    let pod_labels = common_labels(&name);
    let annotations = BTreeMap::from([
        (ENV_HASH_ANNOTATION.to_string(), env_hash(vd, inputs)),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    let container = Container {
        name: "voice-pod".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        args: Some(vec!["serve".into()]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        env: Some(container_env(vd)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        readiness_probe: Some(http_probe("/readyz", 2, 1)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        startup_probe: Some(http_probe("/healthz", 2, 30)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRESTOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(super::rbac::service_account_name(&name)),
        // No code in the pod talks to Kubernetes: no token to steal.
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(grace_period_seconds(vd)),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            run_as_group: Some(RUN_AS_USER),
            fs_group: Some(RUN_AS_USER),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(vec![
            config_volume(&name),
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("64Mi".into())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    Ok(Deployment {
        metadata: owned_meta(vd, name.clone())?,
        spec: Some(DeploymentSpec {
            replicas: replicas(vd),
            revision_history_limit: Some(5),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}
