//! The chart in a real Kubernetes control plane (`callmeback_tests::controlplane`):
//! `helm install` and `helm upgrade` with every toggle, every rendered object
//! validated server-side with strict field validation (the prometheus-operator
//! kinds against their published CRDs, fetched from the Go module proxy at test
//! time), CRDs kept on uninstall, and the operator running as the chart's own
//! ServiceAccount reconciling `examples/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use callmeback_api::{Persona, VoiceDeployment};
use callmeback_tests::controlplane::{self, ControlPlane};
use callmeback_tests::emulators::twilio_numbers::TwilioNumbersEmulator;
use callmeback_tests::helm::{Helm, chart_dir, kubectl, parse_manifests, repo_root};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// The prometheus-operator release whose CRDs validate our monitoring objects.
const PROMETHEUS_OPERATOR: &str = "github.com/prometheus-operator/prometheus-operator@v0.85.0";
const WAIT: Duration = Duration::from_secs(90);

/// Every monitoring toggle on.
const ALL_TOGGLES: &[&str] = &[
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
    "podDisruptionBudget.enabled=true",
    "networkPolicy.enabled=true",
];

/// Installs the ServiceMonitor, PodMonitor and PrometheusRule CRDs from the
/// prometheus-operator module source (`go mod download`), once per control plane.
async fn prometheus_operator_crds(cp: &ControlPlane) {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async {
        let dir = tokio::task::spawn_blocking(download_prometheus_operator)
            .await
            .unwrap();
        let crds = dir.join("example/prometheus-operator-crd");
        let mut args: Vec<String> = vec!["apply".into(), "--server-side".into()];
        for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
            args.push("-f".into());
            args.push(
                crds.join(format!("monitoring.coreos.com_{kind}.yaml"))
                    .display()
                    .to_string(),
            );
        }
        kubectl(cp.kubeconfig_path(), &args).unwrap();
        kubectl(
            cp.kubeconfig_path(),
            [
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/servicemonitors.monitoring.coreos.com",
                "crd/podmonitors.monitoring.coreos.com",
                "crd/prometheusrules.monitoring.coreos.com",
            ],
        )
        .unwrap();
    })
    .await;
}

fn download_prometheus_operator() -> PathBuf {
    // Outside any module, so tests/controlplane/go.mod plays no part.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new("go")
        .args(["mod", "download", "-json", PROMETHEUS_OPERATOR])
        .current_dir(tmp.path())
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go (the control plane is built with it) is on PATH");
    assert!(
        out.status.success(),
        "go mod download {PROMETHEUS_OPERATOR}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(
        info["Dir"]
            .as_str()
            .expect("go mod download -json gives Dir"),
    )
}

fn sets(extra: &[&str]) -> Vec<String> {
    extra
        .iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

fn helm_for(cp: &ControlPlane) -> Helm {
    Helm::with_kubeconfig(cp.kubeconfig_path()).unwrap()
}

/// `helm install`; `--take-ownership` because the CRDs are cluster-wide and other
/// tests of this binary install the chart too.
fn install(helm: &Helm, release: &str, ns: &str, values: &[&str]) -> String {
    let mut args = vec![
        "install".to_string(),
        release.into(),
        chart_dir().display().to_string(),
        "--namespace".into(),
        ns.into(),
        "--take-ownership".into(),
        "--timeout".into(),
        "2m".into(),
    ];
    args.extend(sets(values));
    helm.run(&args)
        .unwrap_or_else(|e| panic!("helm install {release}: {e}"))
}

async fn established(cp: &ControlPlane, name: &str) -> CustomResourceDefinition {
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(crd) = crds.get(name).await
            && crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        {
            return crd;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CRD {name} never became established"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn monitoring_api(cp: &ControlPlane, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind);
    Api::namespaced_with(
        cp.client(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

fn env_value(dep: &Deployment, name: &str) -> Option<String> {
    dep.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

#[tokio::test]
async fn chart_installs_and_upgrades_with_every_object_validated_by_the_apiserver() {
    // Proves every object the chart renders (CRDs, RBAC, Deployment, Service, PDB,
    // ServiceMonitor, PodMonitor, PrometheusRule, dashboard) passes the apiserver's
    // strict server-side validation, that install and upgrade apply values, and that
    // uninstall keeps the CRDs.
    let cp = controlplane::shared().await;
    prometheus_operator_crds(cp).await;
    let ns = cp.new_namespace("chart").await;
    let release = ns.clone();
    let helm = helm_for(cp);

    // Strict server-side dry run of the exact manifests: unknown or misspelt fields
    // are errors here, not silently dropped.
    let mut tpl = vec![
        "template".to_string(),
        release.clone(),
        chart_dir().display().to_string(),
    ];
    tpl.extend(["--namespace".to_string(), ns.clone()]);
    tpl.extend(sets(ALL_TOGGLES));
    let manifests = helm.run(&tpl).unwrap();
    let objects = parse_manifests(&manifests).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &manifests).unwrap();
    // The CRDs must exist before objects of their kinds can be validated; the chart's
    // own CRDs have no objects in the chart, so one pass validates everything.
    let dry = kubectl(
        cp.kubeconfig_path(),
        [
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager=chart-test",
            "-f",
            file.path().to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("server-side validation failed: {e}"));
    assert_eq!(
        dry.lines()
            .filter(|l| l.contains("(server dry run)"))
            .count(),
        objects.len(),
        "every rendered object validated: {dry}"
    );

    install(&helm, &release, &ns, ALL_TOGGLES);
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), &ns);
    let fullname = format!("{release}-callmeback");
    let dep = deployments.get(&fullname).await.unwrap();
    // Leader election is on at one replica too (a rolling update runs two).
    assert_eq!(
        env_value(&dep, "OPERATOR_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(1));
    for crd_name in ["personas.callmeback.dev", "voicedeployments.callmeback.dev"] {
        let crd = established(cp, crd_name).await;
        assert_eq!(
            crd.metadata
                .annotations
                .unwrap_or_default()
                .get("helm.sh/resource-policy")
                .map(String::as_str),
            Some("keep")
        );
    }
    let role: Api<ClusterRole> = Api::all(cp.client());
    let rules = serde_json::to_value(role.get(&fullname).await.unwrap().rules).unwrap();
    let file_rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart_dir().join("files/operator-rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        rules, file_rules,
        "the apiserver stored exactly the rules file"
    );
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PodMonitor", "podmonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let list = monitoring_api(cp, &ns, kind, plural)
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(list.items.len(), 1, "{kind} installed");
    }
    let cms: Api<ConfigMap> = Api::namespaced(cp.client(), &ns);
    let dash = cms.get(&format!("{fullname}-dashboard")).await.unwrap();
    assert!(dash.data.unwrap()["callmeback.json"].contains("\"uid\": \"callmeback\""));

    // Upgrade: more replicas keep leader election on; a new threshold reaches the rule.
    let mut up = vec![
        "upgrade".to_string(),
        release.clone(),
        chart_dir().display().to_string(),
        "--namespace".into(),
        ns.clone(),
    ];
    up.extend(sets(ALL_TOGGLES));
    up.extend(sets(&[
        "replicaCount=2",
        "monitoring.prometheusRule.turnLatency.p95Seconds=0.9",
    ]));
    helm.run(&up)
        .unwrap_or_else(|e| panic!("helm upgrade: {e}"));
    let dep = deployments.get(&fullname).await.unwrap();
    assert_eq!(dep.spec.as_ref().unwrap().replicas, Some(2));
    assert_eq!(
        env_value(&dep, "OPERATOR_LEADER_ELECTION").as_deref(),
        Some("true")
    );
    let rule = monitoring_api(cp, &ns, "PrometheusRule", "prometheusrules")
        .get(&fullname)
        .await
        .unwrap();
    assert!(
        rule.data["spec"]["groups"][0]["rules"][0]["expr"]
            .as_str()
            .unwrap()
            .ends_with("> 0.9")
    );
    let history = helm
        .run([
            "history",
            release.as_str(),
            "--namespace",
            ns.as_str(),
            "-o",
            "json",
        ])
        .unwrap();
    let history: Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 2, "install + upgrade");

    // Uninstall removes the release's objects but keeps the CRDs.
    helm.run([
        "uninstall",
        release.as_str(),
        "--namespace",
        ns.as_str(),
        "--wait",
    ])
    .unwrap();
    assert!(
        role.get_opt(&fullname).await.unwrap().is_none(),
        "ClusterRole removed"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(cp.client());
    assert!(
        crds.get_opt("personas.callmeback.dev")
            .await
            .unwrap()
            .is_some(),
        "CRD kept"
    );
    assert!(
        crds.get_opt("voicedeployments.callmeback.dev")
            .await
            .unwrap()
            .is_some(),
        "CRD kept"
    );
}

fn ready(p: &Persona) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if tokio::time::Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

fn secret_value(path: &Path, key: &str) -> String {
    let secret: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    secret["stringData"][key].as_str().unwrap().to_string()
}

#[tokio::test]
async fn operator_as_the_charts_service_account_reconciles_the_examples() {
    // Proves the chart's RBAC is enough for the real operator (the `voice-operator
    // run` controllers, authenticated as the chart's ServiceAccount, not admin) to
    // take examples/ to ready personas, voice pods' Deployment and wired Twilio numbers.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("chart-op").await;
    let release = ns.clone();
    install(&helm_for(cp), &release, &ns, &[]);
    established(cp, "personas.callmeback.dev").await;
    established(cp, "voicedeployments.callmeback.dev").await;

    // Twilio: the example Secret's credentials, the example's numbers, on loopback.
    let secret = example("secret.yaml");
    let twilio = TwilioNumbersEmulator::start(
        &secret_value(&secret, "TWILIO_ACCOUNT_SID"),
        &secret_value(&secret, "TWILIO_AUTH_TOKEN"),
    )
    .await
    .unwrap();
    let vd_example: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(example("voicedeployment.yaml")).unwrap())
            .unwrap();
    let numbers: Vec<String> = vd_example["spec"]["twilio"]["phoneNumbers"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    for n in &numbers {
        twilio.add_number(
            n,
            "https://old.example.com/voice",
            "https://old.example.com/status",
        );
    }

    let client = cp
        .client_for_service_account(&ns, &format!("{release}-callmeback"))
        .await;
    let shutdown = CancellationToken::new();
    let config = voice_operator::context::Config {
        twilio_api_url: twilio.base_url(),
        namespace: Some(ns.clone()),
        instance: Some("chart-test".into()),
        ..Default::default()
    };
    let operator = tokio::spawn(voice_operator::controller::run(
        client,
        config,
        voice_operator::metrics::Metrics::new(),
        shutdown.clone(),
    ));

    let mut apply = vec!["apply".to_string(), "--namespace".into(), ns.clone()];
    for f in [
        "secret.yaml",
        "persona.yaml",
        "persona-night-librarian.yaml",
        "voicedeployment.yaml",
    ] {
        apply.push("-f".into());
        apply.push(example(f).display().to_string());
    }
    kubectl(cp.kubeconfig_path(), &apply).unwrap_or_else(|e| panic!("examples apply cleanly: {e}"));

    let personas: Api<Persona> = Api::namespaced(cp.client(), &ns);
    let vds: Api<VoiceDeployment> = Api::namespaced(cp.client(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), &ns);
    let vd_name = vd_example["metadata"]["name"].as_str().unwrap().to_string();
    let public = vd_example["spec"]["publicUrl"]
        .as_str()
        .unwrap()
        .trim_end_matches('/')
        .to_string();

    eventually("both example personas Ready", || async {
        let list = personas
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let ready: Vec<_> = list.items.iter().filter(|p| ready(p)).collect();
        (ready.len() == 2).then_some(()).ok_or(format!(
            "{} of {} ready",
            ready.len(),
            list.items.len()
        ))
    })
    .await;
    eventually(
        "the VoiceDeployment's webhook URL and voice pods' Deployment",
        || async {
            let vd = vds.get(&vd_name).await.map_err(|e| e.to_string())?;
            let url = vd
                .status
                .as_ref()
                .and_then(|s| s.webhook_url.clone())
                .ok_or("no webhookUrl")?;
            if !url.starts_with(&public) {
                return Err(format!("webhookUrl {url} not under {public}"));
            }
            let lp =
                ListParams::default().labels(&format!("callmeback.dev/voice-deployment={vd_name}"));
            let deps = deployments.list(&lp).await.map_err(|e| e.to_string())?;
            (deps.items.len() == 1)
                .then_some(())
                .ok_or(format!("{} voice Deployments", deps.items.len()))
        },
    )
    .await;
    let webhook = vds
        .get(&vd_name)
        .await
        .unwrap()
        .status
        .unwrap()
        .webhook_url
        .unwrap();
    eventually(
        "the example's Twilio numbers point at the webhook URL",
        || async {
            for n in &numbers {
                let rec = twilio.number(n).ok_or(format!("{n} unknown"))?;
                if rec.voice_url != webhook {
                    return Err(format!("{n} voice URL is {}", rec.voice_url));
                }
            }
            Ok(())
        },
    )
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await
        .expect("the operator stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn namespace_scoped_chart_rbac_confines_the_operator_to_its_namespace() {
    // Proves operator.watchNamespace: the real operator, authenticated as the chart's
    // ServiceAccount, reconciles a VoiceDeployment in the watched namespace with the
    // chart's Role alone, yet cannot read a Secret in any other namespace (its own
    // included) nor list Secrets cluster-wide.
    let cp = controlplane::shared().await;
    let op_ns = cp.new_namespace("chart-scoped-op").await;
    let calls_ns = cp.new_namespace("chart-scoped-calls").await;
    let other_ns = cp.new_namespace("chart-scoped-other").await;
    let release = op_ns.clone();
    let watch = format!("operator.watchNamespace={calls_ns}");
    install(&helm_for(cp), &release, &op_ns, &[watch.as_str()]);
    established(cp, "personas.callmeback.dev").await;
    established(cp, "voicedeployments.callmeback.dev").await;

    let admin = cp.client();
    let secret = |name: &str| -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name },
            "stringData": { "DATABASE_URL": "postgres://u:hunter2@db/x" },
        }))
        .unwrap()
    };
    for ns in [&op_ns, &other_ns] {
        Api::<Secret>::namespaced(admin.clone(), ns)
            .create(&Default::default(), &secret("elsewhere"))
            .await
            .unwrap();
    }
    kubectl(
        cp.kubeconfig_path(),
        [
            "apply",
            "--namespace",
            calls_ns.as_str(),
            "-f",
            example("secret.yaml").to_str().unwrap(),
            "-f",
            example("persona.yaml").to_str().unwrap(),
        ],
    )
    .unwrap_or_else(|e| panic!("examples apply cleanly: {e}"));
    let persona: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(example("persona.yaml")).unwrap()).unwrap();
    let persona_name = persona["metadata"]["name"].as_str().unwrap().to_string();
    let secret_name = secret_value_name(&example("secret.yaml"));
    let vd: VoiceDeployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "VoiceDeployment",
        "metadata": { "name": "desk" },
        "spec": {
            "personas": [persona_name],
            "secretRef": { "name": secret_name },
            "publicUrl": "https://voice.example.com",
            "replicas": 1,
        }
    }))
    .unwrap();
    Api::<VoiceDeployment>::namespaced(admin.clone(), &calls_ns)
        .create(&Default::default(), &vd)
        .await
        .unwrap();

    let client = cp
        .client_for_service_account(&op_ns, &format!("{release}-callmeback"))
        .await;
    // RBAC takes effect at once for a new binding, but allow the cache a moment.
    eventually(
        "the Role grants Secret read in the watched namespace",
        || async {
            Api::<Secret>::namespaced(client.clone(), &calls_ns)
                .get(&secret_name)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    let forbidden = |r: Result<Secret, kube::Error>| match r {
        Err(kube::Error::Api(s)) => s.code == 403,
        _ => false,
    };
    for ns in [&other_ns, &op_ns] {
        let r = Api::<Secret>::namespaced(client.clone(), ns)
            .get("elsewhere")
            .await;
        assert!(forbidden(r), "the operator read a Secret in {ns}");
    }
    let all = Api::<Secret>::all(client.clone())
        .list(&ListParams::default())
        .await;
    assert!(
        matches!(all, Err(kube::Error::Api(ref s)) if s.code == 403),
        "the operator listed Secrets cluster-wide"
    );

    // And the Role is enough to do the job.
    let shutdown = CancellationToken::new();
    let config = voice_operator::context::Config {
        twilio_api_url: "http://127.0.0.1:9".into(),
        namespace: Some(calls_ns.clone()),
        instance: Some("chart-scoped-test".into()),
        ..Default::default()
    };
    let operator = tokio::spawn(voice_operator::controller::run(
        client,
        config,
        voice_operator::metrics::Metrics::new(),
        shutdown.clone(),
    ));
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &calls_ns);
    eventually(
        "the voice pods' Deployment in the watched namespace",
        || async {
            deployments
                .get("desk")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), operator)
        .await
        .expect("the operator stops on shutdown")
        .unwrap();
}

/// The `metadata.name` of a Secret manifest.
fn secret_value_name(path: &Path) -> String {
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["metadata"]["name"].as_str().unwrap().to_string()
}
