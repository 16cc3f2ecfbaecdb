//! Golden checks of the desired-object builders: each rendered object is compared
//! with `tests/golden/<name>.yaml`. `UPDATE_GOLDEN=1 cargo test -p voice-operator
//! --test golden` rewrites the files; review the diff like code.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use voice_operator::crd::{
    AutoscalingSpec, IngressSpec, Persona, PersonaSpec, SecretRef, TwilioSpec, VoiceDeployment,
    VoiceDeploymentSpec, VoiceSpec,
};
use voice_operator::resources::configmap::{persona_config_map, routes_config_map};
use voice_operator::resources::deployment::{
    GRACE_MARGIN_SECONDS, PRESTOP_SLEEP_SECONDS, deployment, grace_period_seconds,
};
use voice_operator::resources::{
    DeploymentInputs, ENV_HASH_ANNOTATION, ResolvedPersona, desired_objects, hpa, ingress, pdb,
    rbac, service,
};

fn golden(name: &str, value: &impl Serialize) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.yaml"));
    let actual = serde_saphyr::to_string(value).expect("serialize");
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(&path, &actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", path.display()));
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name} differs from {} at line {}:\n  golden: {:?}\n  actual: {:?}\n(UPDATE_GOLDEN=1 to accept)",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

fn persona_spec(max_call: u32) -> PersonaSpec {
    serde_json::from_value(serde_json::json!({
        "displayName": "Sam",
        "systemPrompt": "You are Sam, a warm and witty friend.",
        "greeting": "Hey, it's Sam!",
        "voice": { "voiceId": "voice123" },
        "maxCallDurationSeconds": max_call,
    }))
    .expect("persona spec")
}

fn persona(name: &str, max_call: u32) -> Persona {
    let mut p = Persona::new(name, persona_spec(max_call));
    p.metadata.namespace = Some("calls".into());
    p.metadata.uid = Some(format!("uid-persona-{name}"));
    p
}

fn vd_spec() -> VoiceDeploymentSpec {
    serde_json::from_value(serde_json::json!({
        "personas": ["date-rescuer", "night-librarian"],
        "defaultPersona": "date-rescuer",
        "numberRoutes": { "+14155550100": "date-rescuer", "+14155550101": "night-librarian", "+14155550199": "ghost" },
        "secretRef": { "name": "callmeback-keys" },
        "publicUrl": "https://voice.example.com/",
        "replicas": 2,
    }))
    .expect("vd spec")
}

fn vd(spec: VoiceDeploymentSpec) -> VoiceDeployment {
    VoiceDeployment {
        metadata: ObjectMeta {
            name: Some("front-desk".into()),
            namespace: Some("calls".into()),
            uid: Some("uid-vd-front-desk".into()),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

fn inputs() -> DeploymentInputs {
    DeploymentInputs {
        personas: vec![
            ResolvedPersona {
                name: "date-rescuer".into(),
                spec: persona_spec(600),
            },
            ResolvedPersona {
                name: "night-librarian".into(),
                spec: persona_spec(1800),
            },
        ],
        secret_hash: "0123456789abcdef".into(),
    }
}

#[test]
fn deployment_with_fixed_replicas_matches_golden() {
    // Proves the whole voice pod Deployment (env, volume, probes, security, grace) is as reviewed.
    let d = deployment(&vd(vd_spec()), &inputs()).unwrap();
    golden("deployment-fixed", &d);
}

#[test]
fn deployment_is_restricted_and_sized_for_the_longest_call() {
    // Proves every restricted-PSS field is set and the grace period covers the longest persona's call.
    let d = deployment(&vd(vd_spec()), &inputs()).unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(1800 + PRESTOP_SLEEP_SECONDS + GRACE_MARGIN_SECONDS)
    );
    assert_eq!(grace_period_seconds(&inputs()), 1835);
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
    assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(
        c.lifecycle
            .as_ref()
            .unwrap()
            .pre_stop
            .as_ref()
            .unwrap()
            .sleep
            .as_ref()
            .unwrap()
            .seconds,
        PRESTOP_SLEEP_SECONDS
    );
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.clone()))
        .collect();
    assert_eq!(
        env["CALLMEBACK_PUBLIC_URL"].value.as_deref(),
        Some("https://voice.example.com")
    );
    assert_eq!(
        env["CALLMEBACK_DRAIN_TIMEOUT"].value.as_deref(),
        Some("1800s")
    );
    let key = env["TWILIO_AUTH_TOKEN"]
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (key.name.as_str(), key.key.as_str(), key.optional),
        ("callmeback-keys", "TWILIO_AUTH_TOKEN", None)
    );
    // One projected volume at /etc/callmeback, never subPath (ConfigMap updates must arrive).
    let mounts = c.volume_mounts.clone().unwrap();
    let config = mounts.iter().find(|m| m.name == "config").unwrap();
    assert_eq!(config.mount_path, "/etc/callmeback");
    assert!(
        mounts
            .iter()
            .all(|m| m.sub_path.is_none() && m.sub_path_expr.is_none())
    );
    let readiness = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
}

#[test]
fn autoscaled_deployment_leaves_replicas_to_the_hpa() {
    // Proves an autoscaled Deployment omits replicas (the HPA owns them) and the HPA scales on active calls when asked.
    let mut spec = vd_spec();
    spec.autoscaling = Some(AutoscalingSpec {
        min_replicas: 2,
        max_replicas: 20,
        target_cpu_utilization: 70,
        target_active_calls_per_pod: Some(8),
    });
    let v = vd(spec.clone());
    let d = deployment(&v, &inputs()).unwrap();
    assert_eq!(d.spec.unwrap().replicas, None);
    golden("hpa-active-calls", &hpa::hpa(&v).unwrap().unwrap());
    spec.autoscaling
        .as_mut()
        .unwrap()
        .target_active_calls_per_pod = None;
    golden("hpa-cpu", &hpa::hpa(&vd(spec)).unwrap().unwrap());
    assert!(hpa::hpa(&vd(vd_spec())).unwrap().is_none());
}

#[test]
fn service_pdb_and_rbac_match_golden() {
    // Proves the Service ports/labels, the PDB and the pods' least-privilege RBAC are as reviewed.
    let v = vd(vd_spec());
    golden("service", &service::service(&v).unwrap());
    golden("pdb", &pdb::pdb(&v).unwrap());
    let sa = rbac::service_account(&v).unwrap();
    golden("rbac", &sa);
    // The pods get no Kubernetes API access: no token mounted, by the account or the pod.
    assert_eq!(sa.automount_service_account_token, Some(false));
    let d = deployment(&v, &inputs()).unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn ingress_defaults_its_host_to_the_public_url() {
    // Proves the optional Ingress routes publicUrl's host to the http port, with TLS when named.
    let mut spec = vd_spec();
    spec.ingress = Some(IngressSpec {
        host: None,
        class_name: Some("nginx".into()),
        tls_secret_name: Some("voice-tls".into()),
        annotations: BTreeMap::from([(
            "nginx.ingress.kubernetes.io/proxy-read-timeout".into(),
            "3600".into(),
        )]),
    });
    let ing = ingress::ingress(&vd(spec)).unwrap().unwrap();
    golden("ingress", &ing);
    assert_eq!(
        ing.spec.unwrap().rules.unwrap()[0].host.as_deref(),
        Some("voice.example.com")
    );
    assert!(ingress::ingress(&vd(vd_spec())).unwrap().is_none());
}

#[test]
fn an_ingress_never_carries_a_snippet_annotation() {
    // Proves a VoiceDeployment's snippet annotation is dropped from the built Ingress (and named as rejected) while an allowed timeout passes.
    let mut spec = vd_spec();
    spec.ingress = Some(IngressSpec {
        host: None,
        class_name: Some("nginx".into()),
        tls_secret_name: None,
        annotations: BTreeMap::from([
            (
                "nginx.ingress.kubernetes.io/server-snippet".into(),
                "location /metrics { proxy_pass http://10.0.0.1; }".into(),
            ),
            (
                "nginx.ingress.kubernetes.io/proxy-read-timeout".into(),
                "3600".into(),
            ),
        ]),
    });
    let v = vd(spec);
    let ing = ingress::ingress(&v).unwrap().unwrap();
    let annotations = ing.metadata.annotations.unwrap();
    assert_eq!(
        annotations.keys().collect::<Vec<_>>(),
        ["nginx.ingress.kubernetes.io/proxy-read-timeout"]
    );
    assert_eq!(
        ingress::rejected_annotations(&v),
        ["nginx.ingress.kubernetes.io/server-snippet"]
    );
}

#[test]
fn config_maps_match_golden_and_routes_drop_unknown_personas() {
    // Proves the persona file is the PersonaSpec YAML and routes only name served personas.
    let (cm, hash) = persona_config_map(&persona("date-rescuer", 600)).unwrap();
    golden("persona-configmap", &cm);
    assert_eq!(hash.len(), 16);
    let content = &cm.data.unwrap()["date-rescuer.yaml"];
    let back: PersonaSpec = serde_saphyr::from_str(content).unwrap();
    assert_eq!(back, persona_spec(600));
    let routes = routes_config_map(&vd(vd_spec()), &inputs().personas).unwrap();
    golden("routes-configmap", &routes);
    assert!(!routes.data.unwrap()["routes.yaml"].contains("ghost"));
}

#[test]
fn persona_edits_do_not_touch_the_pod_template_but_secret_changes_do() {
    // Proves persona content hot-reloads (template unchanged) while Secret-derived env rolls the pods.
    let v = vd(vd_spec());
    let base = deployment(&v, &inputs()).unwrap();
    let mut edited = inputs();
    edited.personas[0].spec.system_prompt = "You are someone else entirely.".into();
    edited.personas[0].spec.greeting = "Hello there.".into();
    assert_eq!(deployment(&v, &edited).unwrap(), base);
    let mut rotated = inputs();
    rotated.secret_hash = "fedcba9876543210".into();
    let annotation = |d: &k8s_openapi::api::apps::v1::Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[ENV_HASH_ANNOTATION]
            .clone()
    };
    assert_ne!(
        annotation(&deployment(&v, &rotated).unwrap()),
        annotation(&base)
    );
}

#[test]
fn every_object_is_owned_by_the_voice_deployment() {
    // Proves GC will remove everything: each object carries a controller owner reference to the VoiceDeployment.
    let mut spec = vd_spec();
    spec.twilio = Some(TwilioSpec {
        phone_numbers: vec!["+14155550100".into()],
    });
    spec.ingress = Some(IngressSpec {
        host: None,
        class_name: None,
        tls_secret_name: None,
        annotations: BTreeMap::new(),
    });
    spec.autoscaling = Some(AutoscalingSpec {
        min_replicas: 1,
        max_replicas: 3,
        target_cpu_utilization: 70,
        target_active_calls_per_pod: None,
    });
    let objects = desired_objects(&vd(spec), &inputs())
        .unwrap()
        .to_json_values()
        .unwrap();
    assert_eq!(objects.len(), 7);
    for o in objects {
        let owners = &o["metadata"]["ownerReferences"];
        assert_eq!(owners[0]["uid"], "uid-vd-front-desk", "{}", o["kind"]);
        assert_eq!(owners[0]["controller"], true);
    }
}

#[test]
fn spec_defaults_fill_in_from_a_minimal_persona() {
    // Proves a minimal persona gets the documented defaults (what the CRD defaults too).
    let spec = persona_spec(900);
    assert_eq!(spec.llm.model, "gpt-oss-120b");
    assert_eq!(spec.stt.model, "nova-3");
    assert_eq!(spec.idle_timeout_seconds, 30);
    assert_eq!(
        spec.voice,
        VoiceSpec {
            provider: Default::default(),
            voice_id: "voice123".into(),
            model_id: "eleven_flash_v2_5".into(),
            stability: None,
            similarity_boost: None,
            style: None,
            speed: None
        }
    );
    let _ = SecretRef {
        name: String::new(),
    };
}
