//! Golden checks of the desired-object builders: each rendered object is compared
//! with `tests/golden/<name>.yaml`. `UPDATE_GOLDEN=1 cargo test -p voice-operator
//! --test golden` rewrites the files; review the diff like code.

use std::collections::BTreeMap;
use std::path::PathBuf;

use callmeback_api::PersonaServing;
use callmeback_api::{
    AutoscalingSpec, CpuAutoscaling, IngressSpec, PersonaSpec, SecretRef, TwilioSpec,
    VoiceDeployment, VoiceDeploymentSpec, VoiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use voice_operator::resources::configmap::{
    PRICES_KEY, ROUTES_KEY, persona_config, served_generations,
};
use voice_operator::resources::deployment::{
    GRACE_MARGIN_SECONDS, PRESTOP_SLEEP_SECONDS, deployment, grace_period_seconds,
};
use voice_operator::resources::{
    DeploymentInputs, ENV_HASH_ANNOTATION, InvalidPersona, ResolvedPersona, desired_objects, hpa,
    ingress, pdb, rbac, service,
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
            resolved("date-rescuer", 600, 1),
            resolved("night-librarian", 1800, 4),
        ],
        secret_hash: "0123456789abcdef".into(),
        ..DeploymentInputs::default()
    }
}

fn resolved(name: &str, max_call: u32, generation: i64) -> ResolvedPersona {
    ResolvedPersona {
        name: name.into(),
        spec: persona_spec(max_call),
        generation: Some(generation),
    }
}

#[test]
fn deployment_with_fixed_replicas_matches_golden() {
    // Proves the whole voice pod Deployment (env, volume, probes, security, grace) is as reviewed.
    let d = deployment(&vd(vd_spec()), &inputs()).unwrap();
    golden("deployment-fixed", &d);
}

#[test]
fn deployment_is_restricted_and_its_grace_covers_the_drain_timeout() {
    // Proves every restricted-PSS field is set and the grace period is the deployment's drain timeout plus preStop and shutdown phases.
    let d = deployment(&vd(vd_spec()), &inputs()).unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(3600 + PRESTOP_SLEEP_SECONDS + GRACE_MARGIN_SECONDS)
    );
    let mut longer = vd_spec();
    longer.drain_timeout_seconds = Some(7200);
    assert_eq!(grace_period_seconds(&vd(longer)), 7235);
    // The ConfigMap is mounted whole: no items naming personas in the template.
    let config = pod.volumes.as_ref().unwrap()[0].config_map.clone().unwrap();
    assert_eq!(
        (config.name.as_str(), config.items),
        ("front-desk-config", None)
    );
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
        Some("3600s")
    );
    assert_eq!(
        env["CALLMEBACK_ROUTES_FILE"].value.as_deref(),
        Some("/etc/callmeback/_routes.yaml")
    );
    assert_eq!(
        env["CALLMEBACK_PRICES_FILE"].value.as_deref(),
        Some("/etc/callmeback/_prices.yaml")
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
    // One ConfigMap volume at /etc/callmeback, never subPath (ConfigMap updates must arrive).
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
fn calls_autoscaling_needs_no_hpa_and_cpu_policy_leaves_replicas_to_one() {
    // Proves the calls policy writes replicas itself with no HPA, and the CPU policy omits replicas and gets a CPU HPA.
    let mut spec = vd_spec();
    spec.autoscaling = Some(AutoscalingSpec::calls(2, 20, 8));
    let v = vd(spec.clone());
    let d = deployment(&v, &inputs()).unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(2));
    assert!(hpa::hpa(&v).unwrap().is_none());
    spec.autoscaling.as_mut().unwrap().cpu = Some(CpuAutoscaling {
        target_utilization: 70,
    });
    let v = vd(spec);
    assert_eq!(
        deployment(&v, &inputs()).unwrap().spec.unwrap().replicas,
        None
    );
    golden("hpa-cpu", &hpa::hpa(&v).unwrap().unwrap());
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
fn config_map_matches_golden_and_routes_drop_unknown_personas() {
    // Proves the one ConfigMap holds each persona file (the PersonaSpec YAML), routes naming only served personas, prices and the served generations.
    let v = vd(vd_spec());
    let config = persona_config(&v, &inputs().personas, &[], None).unwrap();
    golden("config-configmap", &config.config_map);
    let data = config.config_map.data.clone().unwrap();
    let back: PersonaSpec = serde_saphyr::from_str(&data["date-rescuer.yaml"]).unwrap();
    assert_eq!(back, persona_spec(600));
    assert!(data[ROUTES_KEY].contains("night-librarian"));
    assert!(!data[ROUTES_KEY].contains("ghost"));
    assert_eq!(data[PRICES_KEY], "[]\n");
    assert_eq!(
        served_generations(&config.config_map),
        BTreeMap::from([
            ("date-rescuer".to_string(), 1),
            ("night-librarian".to_string(), 4)
        ])
    );
}

fn invalid(name: &str, generation: i64) -> InvalidPersona {
    InvalidPersona {
        name: name.into(),
        generation: Some(generation),
        problems: "llm.maxTokens leaves no room for the prompt".into(),
    }
}

#[test]
fn an_invalid_persona_keeps_its_last_valid_entry_and_only_removal_drops_it() {
    // Proves an invalid generation keeps serving the content and generation already in the ConfigMap (routes included), and that a persona leaves only when it is no longer selected.
    let v = vd(vd_spec());
    let before = persona_config(&v, &inputs().personas, &[], None).unwrap();
    let old_content = before.config_map.data.as_ref().unwrap()["night-librarian.yaml"].clone();

    // night-librarian turns invalid at generation 5: the entry of generation 4 stays.
    let during = persona_config(
        &v,
        &[resolved("date-rescuer", 600, 1)],
        &[invalid("night-librarian", 5)],
        Some(&before.config_map),
    )
    .unwrap();
    let data = during.config_map.data.clone().unwrap();
    assert_eq!(data["night-librarian.yaml"], old_content);
    assert!(
        data[ROUTES_KEY].contains("+14155550101"),
        "its number stays routed to it"
    );
    assert_eq!(
        during.serving,
        vec![
            PersonaServing {
                name: "date-rescuer".into(),
                served_generation: Some(1),
                current_generation: Some(1),
                valid: true
            },
            PersonaServing {
                name: "night-librarian".into(),
                served_generation: Some(4),
                current_generation: Some(5),
                valid: false
            },
        ]
    );
    // The kept generation survives a restart: it is read back from the ConfigMap itself.
    assert_eq!(served_generations(&during.config_map)["night-librarian"], 4);
    let again = persona_config(
        &v,
        &[resolved("date-rescuer", 600, 1)],
        &[invalid("night-librarian", 6)],
        Some(&during.config_map),
    )
    .unwrap();
    assert_eq!(again.config_map.data, during.config_map.data);
    assert_eq!(again.serving[1].served_generation, Some(4));

    // Deleted (or no longer selected): the entry and its route go.
    let after = persona_config(
        &v,
        &[resolved("date-rescuer", 600, 1)],
        &[],
        Some(&during.config_map),
    )
    .unwrap();
    let data = after.config_map.data.clone().unwrap();
    assert!(!data.contains_key("night-librarian.yaml"));
    assert!(!data[ROUTES_KEY].contains("+14155550101"));
    assert_eq!(after.serving.len(), 1);

    // Invalid from its first generation: nothing to keep, nothing served.
    let never = persona_config(
        &v,
        &[resolved("date-rescuer", 600, 1)],
        &[invalid("night-librarian", 1)],
        Some(&after.config_map),
    )
    .unwrap();
    assert!(
        !never
            .config_map
            .data
            .as_ref()
            .unwrap()
            .contains_key("night-librarian.yaml")
    );
    assert_eq!(never.serving[1].served_generation, None);
    assert_eq!(never.served_names(), ["date-rescuer"]);
}

#[test]
fn the_deployment_is_identical_across_persona_edits_adds_removes_and_invalidations() {
    // Proves the whole rendered Deployment (template and hash annotations) ignores the persona set and content, while the ConfigMap carries every change.
    let v = vd(vd_spec());
    let base = desired_objects(&v, &inputs()).unwrap();
    let mut edited = inputs();
    edited.personas[0].spec.system_prompt = "You are someone else entirely.".into();
    edited.personas[0].spec.max_call_duration_seconds = 14400;
    edited.personas[0].generation = Some(2);
    let mut added = inputs();
    added.personas.push(resolved("zebra", 300, 1));
    let mut removed = inputs();
    removed.personas.truncate(1);
    let mut invalidated = inputs();
    invalidated.personas.truncate(1);
    invalidated.invalid = vec![invalid("night-librarian", 5)];
    invalidated.current_config = Some(base.config.config_map.clone());
    for variant in [edited, added, removed, invalidated] {
        let other = desired_objects(&v, &variant).unwrap();
        assert_eq!(other.deployment, base.deployment);
        assert_eq!(
            serde_json::to_value(&other.deployment).unwrap(),
            serde_json::to_value(&base.deployment).unwrap()
        );
        if variant.invalid.is_empty() {
            assert_ne!(other.config.config_map, base.config.config_map);
        }
    }
}

#[test]
fn secret_and_price_changes_roll_the_pods() {
    // Proves start-time inputs (Secret-derived env, prices) change the template hash, so they reach the pods by a rollout.
    let v = vd(vd_spec());
    let base = deployment(&v, &inputs()).unwrap();
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
    let mut priced = vd_spec();
    priced.prices = vec![callmeback_api::Price {
        provider: "deepgram".into(),
        unit: "stt_seconds".into(),
        usd_per_unit: "0.0001".into(),
    }];
    assert_ne!(
        annotation(&deployment(&vd(priced), &inputs()).unwrap()),
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
    let mut auto = AutoscalingSpec::calls(1, 3, 10);
    auto.cpu = Some(CpuAutoscaling {
        target_utilization: 70,
    });
    spec.autoscaling = Some(auto);
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

#[test]
fn a_persona_outlasting_the_drain_deadline_is_reported() {
    // Proves a served persona whose calls may outlast drainTimeoutSeconds is named in a PersonaOutlastsDrain problem, and none is raised when the deadline covers it.
    use voice_operator::reconcile::voice_deployment::{
        PersonaResolution, Problem, outlasting_problem,
    };
    let resolution = PersonaResolution {
        resolved: vec![
            resolved("date-rescuer", 600, 1),
            resolved("marathon", 7200, 1),
        ],
        ..PersonaResolution::default()
    };
    let Problem { reason, message } = outlasting_problem(&vd(vd_spec()), &resolution).unwrap();
    assert_eq!(reason.as_str(), "PersonaOutlastsDrain");
    assert!(
        message.contains("marathon (7200s)") && !message.contains("date-rescuer"),
        "{message}"
    );
    let mut longer = vd_spec();
    longer.drain_timeout_seconds = Some(7200);
    assert!(outlasting_problem(&vd(longer), &resolution).is_none());
}

// spec.dialing reaches the pods as their CALLMEBACK_DIAL_* settings, and only what
// is set (the pods' defaults apply otherwise).
#[test]
fn dialing_settings_become_the_pods_dial_environment() {
    let env_of = |spec: VoiceDeploymentSpec| -> BTreeMap<String, String> {
        let d = deployment(&vd(spec), &inputs()).expect("deployment");
        d.spec
            .and_then(|s| s.template.spec)
            .map(|p| p.containers)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|c| c.env.unwrap_or_default())
            .filter(|e| e.name.starts_with("CALLMEBACK_DIAL_"))
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    };
    assert!(
        env_of(vd_spec()).is_empty(),
        "nothing set: the pods' defaults"
    );
    let mut spec = vd_spec();
    spec.dialing = serde_json::from_value(serde_json::json!({
        "countries": ["US", "CA"],
        "prefixes": ["+882"],
        "defaultRegion": "US",
        "limitPerNumber": "3/10m",
        "limitPerUser": "off",
    }))
    .expect("dialing");
    assert_eq!(
        env_of(spec),
        BTreeMap::from(
            [
                ("CALLMEBACK_DIAL_COUNTRIES", "US,CA"),
                ("CALLMEBACK_DIAL_PREFIXES", "+882"),
                ("CALLMEBACK_DIAL_DEFAULT_REGION", "US"),
                ("CALLMEBACK_DIAL_LIMIT_PER_NUMBER", "3/10m"),
                ("CALLMEBACK_DIAL_LIMIT_PER_USER", "off"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        )
    );
}
