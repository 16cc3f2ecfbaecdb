//! Call-capacity autoscaling against the real control plane with kwok's fake node:
//! the operator (`controller::run`, under the chart's rules as a namespaced Role)
//! reads each pod's `GET /load` from loopback servers standing in for the voice
//! pods. kwok gives pods fake IPs, so the test moves each Running pod's
//! `status.podIP` to its own 127.0.0.x address, where a server on the operator's
//! `--load-port` answers with the calls the test sets: the production path, with
//! only the addresses changed.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use callmeback_api::{Persona, VoiceDeployment, find_condition};
use callmeback_tests::controlplane::{self, ControlPlane};
use callmeback_tests::fake_voice_pods::{self, FakePods};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use voice_operator::autoscale::poller::PollerConfig;
use voice_operator::autoscale::{
    DELETION_COST_ANNOTATION, DO_NOT_DISRUPT_ANNOTATION, SAFE_TO_EVICT_ANNOTATION,
};
use voice_operator::context::Config;
use voice_operator::controller;
use voice_operator::metrics::Metrics;

/// Generous for a loaded 2-core CI: the operator polls every second.
const TIMEOUT: Duration = Duration::from_secs(60);

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn yaml_docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str_multiple(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn install_crds(cp: &ControlPlane) {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(cp.client());
        for file in ["crds/persona.yaml", "crds/voicedeployment.yaml"] {
            for doc in yaml_docs(file) {
                let crd: CustomResourceDefinition = serde_json::from_value(doc).unwrap();
                api.patch(
                    &crd.name_any(),
                    &PatchParams::apply("callmeback-tests").force(),
                    &Patch::Apply(&crd),
                )
                .await
                .unwrap_or_else(|e| panic!("apiserver rejected {file}: {e}"));
                let name = crd.name_any();
                eventually("CRD established", || async {
                    let c = api.get(&name).await.ok()?;
                    c.status?
                        .conditions?
                        .iter()
                        .find(|c| c.type_ == "Established" && c.status == "True")
                        .map(|_| ())
                })
                .await;
            }
        }
        let vds: Api<VoiceDeployment> = Api::all(cp.client());
        eventually("voicedeployments served", || async {
            vds.list(&ListParams::default().limit(1)).await.ok()
        })
        .await;
    })
    .await;
}

/// A client holding exactly the chart's operator rules as a Role in `ns` (the
/// chart's `operator.watchNamespace` mode), pods included.
async fn operator_client(cp: &ControlPlane, ns: &str) -> Client {
    let admin = cp.client();
    let rules: Vec<PolicyRule> = yaml_docs("charts/callmeback/files/operator-rules.yaml")
        .into_iter()
        .flat_map(|doc| serde_json::from_value::<Vec<PolicyRule>>(doc).unwrap())
        .collect();
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("operator"),
                rules: Some(rules),
            },
        )
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta("operator"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin, ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("operator"),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "operator".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "operator".into(),
                    namespace: Some(ns.into()),
                    api_group: None,
                }]),
            },
        )
        .await
        .unwrap();
    cp.client_for_service_account(ns, "operator").await
}

struct Setup {
    admin: Client,
    ns: String,
    stop: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn setup(prefix: &str, load_port: u16) -> Setup {
    let cp = controlplane::shared().await;
    install_crds(cp).await;
    let ns = cp.new_namespace(prefix).await;
    let admin = cp.client();
    let pp = PatchParams::apply("kubectl").force();
    let mut secret = yaml_docs("examples/secret.yaml").remove(0);
    secret["metadata"]["name"] = "keys".into();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &ns)
        .patch("keys", &pp, &Patch::Apply(&secret))
        .await
        .unwrap();
    let persona = serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1", "kind": "Persona",
        "metadata": { "name": "sam" },
        "spec": { "displayName": "Sam", "systemPrompt": "You are Sam.", "greeting": "Hi",
                  "voice": { "voiceId": "voice123" }, "maxCallDurationSeconds": 600 }
    });
    Api::<Persona>::namespaced(admin.clone(), &ns)
        .patch("sam", &pp, &Patch::Apply(&persona))
        .await
        .unwrap();
    let client = operator_client(cp, &ns).await;
    let stop = CancellationToken::new();
    let config = Config {
        namespace: Some(ns.clone()),
        twilio_api_url: "http://127.0.0.1:9".into(),
        concurrency: 4,
        instance: Some("autoscaling-test".into()),
        poller: PollerConfig {
            interval: Duration::from_secs(1),
            port: load_port,
            ..PollerConfig::default()
        },
        ..Config::default()
    };
    tokio::spawn(controller::run(
        client,
        config,
        Metrics::new(),
        stop.clone(),
    ));
    Setup { admin, ns, stop }
}

fn vd_doc(spec_extra: serde_json::Value) -> serde_json::Value {
    let mut doc = serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1", "kind": "VoiceDeployment",
        "metadata": { "name": "desk" },
        "spec": { "personas": ["sam"], "secretRef": { "name": "keys" },
                  "publicUrl": "https://voice.example.com" }
    });
    for (k, v) in spec_extra.as_object().unwrap() {
        doc["spec"][k] = v.clone();
    }
    doc
}

async fn apply_vd(s: &Setup, doc: &serde_json::Value) -> Result<VoiceDeployment, kube::Error> {
    Api::<VoiceDeployment>::namespaced(s.admin.clone(), &s.ns)
        .patch(
            "desk",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(doc),
        )
        .await
}

async fn deployment_replicas(s: &Setup) -> Option<i32> {
    Api::<Deployment>::namespaced(s.admin.clone(), &s.ns)
        .get_opt("desk")
        .await
        .unwrap()
        .and_then(|d| d.spec?.replicas)
}

async fn wait_replicas(s: &Setup, want: i32) {
    eventually(&format!("Deployment at {want} replicas"), || async {
        (deployment_replicas(s).await == Some(want)).then_some(())
    })
    .await;
}

const DESK_PODS: &str = "callmeback.dev/voice-deployment=desk";

async fn running_pods(s: &Setup) -> Vec<Pod> {
    fake_voice_pods::running_pods(&Api::namespaced(s.admin.clone(), &s.ns), DESK_PODS)
        .await
        .unwrap()
}

async fn assign_loopback_ips(s: &Setup, ips: &[Ipv4Addr]) -> BTreeMap<String, Ipv4Addr> {
    fake_voice_pods::assign_loopback_ips(&Api::namespaced(s.admin.clone(), &s.ns), DESK_PODS, ips)
        .await
        .unwrap_or_else(|e| panic!("moving pods onto loopback: {e}"))
}

#[tokio::test]
async fn kubectl_scale_is_refused_under_autoscaling_and_switching_keeps_the_replica_count() {
    // Proves the scale subresource goes through the CRD's validation (refused with a
    // message under autoscaling, accepted with a fixed count), and that switching a
    // fixed count to calls autoscaling keeps the Deployment's replicas while the
    // pods' load is unknown (never taken for idle), and back to fixed keeps the user's count.
    let cp = controlplane::shared().await;
    if !cp.pods_run() {
        eprintln!("skipped: this control plane runs no pods (no kwok)");
        return;
    }
    // No load servers: every kwok pod's load is unknown (its fake IP answers nothing).
    let s = setup("as-scale", 9).await;
    apply_vd(&s, &vd_doc(serde_json::json!({ "replicas": 3 })))
        .await
        .unwrap();
    wait_replicas(&s, 3).await;

    let vds = Api::<VoiceDeployment>::namespaced(s.admin.clone(), &s.ns);
    let scale = serde_json::json!({ "spec": { "replicas": 4 } });
    vds.patch_scale("desk", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("kubectl scale under a fixed count");
    wait_replicas(&s, 4).await;

    // Switch to autoscaling, stabilisation 0 s. `kubectl scale` wrote replicas under
    // its own field manager, so an apply that merely omits it keeps it and the schema
    // refuses replicas beside autoscaling (a message, not a silent no-op); the switch
    // removes it explicitly, as the README says.
    let auto = serde_json::json!({ "autoscaling": {
        "minReplicas": 1, "maxReplicas": 6, "callsPerPod": 10,
        "scaleDownStabilizationSeconds": 0 } });
    let refused = apply_vd(&s, &vd_doc(auto.clone()))
        .await
        .expect_err("replicas left by kubectl scale beside autoscaling");
    assert!(
        refused
            .to_string()
            .contains("autoscaling.minReplicas/maxReplicas"),
        "{refused}"
    );
    let mut switch = auto.clone();
    switch["replicas"] = serde_json::Value::Null;
    vds.patch(
        "desk",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": switch })),
    )
    .await
    .expect("switching to autoscaling, replicas removed");
    eventually("ScalingActive reports unknown load", || async {
        let vd = vds.get("desk").await.ok()?;
        let c = find_condition(&vd.status?.conditions, "ScalingActive")?.clone();
        (c.reason == "LoadUnknown").then_some(())
    })
    .await;
    // Several poll intervals (1 s each) with a zero window: unknown pods hold the count.
    for _ in 0..10 {
        assert_eq!(
            deployment_replicas(&s).await,
            Some(4),
            "dipped under autoscaling"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let vd = vds.get("desk").await.unwrap();
    assert_eq!(vd.status.as_ref().and_then(|s| s.desired_replicas), Some(4));

    let err = vds
        .patch_scale("desk", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect_err("kubectl scale must be refused under autoscaling");
    let msg = err.to_string();
    assert!(
        msg.contains("autoscaling.minReplicas/maxReplicas"),
        "unhelpful refusal: {msg}"
    );

    // And back to a fixed count: the user's number.
    vds.patch(
        "desk",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": { "replicas": 2, "autoscaling": null } })),
    )
    .await
    .expect("back to a fixed count");
    wait_replicas(&s, 2).await;
}

#[tokio::test]
async fn replicas_follow_live_calls_up_at_once_down_after_the_window_idle_pods_cheapest() {
    // Proves the ramp: calls + buffer scale up in one poll, a drop waits for the
    // stabilisation window (4 s; polls every 1 s, so a step before 3 s would be a
    // bug with 1 s of margin checked) and then removes at most maxScaleDownStep pods,
    // and each pod's deletion cost and eviction guards follow its own calls.
    let cp = controlplane::shared().await;
    if !cp.pods_run() {
        eprintln!("skipped: this control plane runs no pods (no kwok)");
        return;
    }
    let fake = FakePods::default();
    let ips: Vec<Ipv4Addr> = (40..48).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let port = fake.start(&ips).await.expect("loopback listeners");
    let s = setup("as-ramp", port).await;
    let auto = serde_json::json!({ "autoscaling": {
        "minReplicas": 1, "maxReplicas": 6, "callsPerPod": 10, "buffer": 5,
        "scaleDownStabilizationSeconds": 4, "maxScaleDownStep": 2 } });
    apply_vd(&s, &vd_doc(auto)).await.unwrap();
    wait_replicas(&s, 1).await;
    let first = eventually("the first pod on loopback", || async {
        let m = assign_loopback_ips(&s, &ips).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    let first_ip = *first.values().next().unwrap();

    // 38 calls on the one pod: ceil((38 + 5) / 10) = 5 pods, at once.
    fake.set(first_ip, 38);
    wait_replicas(&s, 5).await;
    let mapping = eventually("5 pods on loopback", || async {
        let m = assign_loopback_ips(&s, &ips).await;
        (m.len() >= 5).then_some(m)
    })
    .await;
    // Spread: the first pod keeps 8 calls, one other has 4, the rest are idle.
    let busy_other = *mapping.values().find(|ip| **ip != first_ip).unwrap();
    fake.set(first_ip, 8);
    fake.set(busy_other, 4);
    let pods = Api::<Pod>::namespaced(s.admin.clone(), &s.ns);
    let dropped = Instant::now();
    eventually("annotations equal each pod's calls", || async {
        for (name, ip) in &mapping {
            let p = pods.get(name).await.ok()?;
            let a = p.metadata.annotations.unwrap_or_default();
            let calls = fake.get(*ip);
            if a.get(DELETION_COST_ANNOTATION) != Some(&calls.to_string()) {
                return None;
            }
            let guarded = a.get(SAFE_TO_EVICT_ANNOTATION).map(String::as_str) == Some("false")
                && a.get(DO_NOT_DISRUPT_ANNOTATION).map(String::as_str) == Some("true");
            let unguarded = !a.contains_key(SAFE_TO_EVICT_ANNOTATION)
                && !a.contains_key(DO_NOT_DISRUPT_ANNOTATION);
            if (calls > 0 && !guarded) || (calls == 0 && !unguarded) {
                return None;
            }
        }
        Some(())
    })
    .await;
    // 12 calls + 5 = 2 pods wanted; first the window, then at most 2 pods per step.
    let seen = std::sync::Mutex::new(Vec::new());
    eventually("scale-down to 2", || async {
        let r = deployment_replicas(&s).await?;
        let mut seen = seen.lock().unwrap();
        if seen.last() != Some(&r) {
            seen.push(r);
            if r < 5 {
                assert!(
                    dropped.elapsed() >= Duration::from_secs(3),
                    "scaled down {:?} after the load fell, inside the 4 s window",
                    dropped.elapsed()
                );
            }
        }
        (r == 2).then_some(())
    })
    .await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![5, 3, 2],
        "steps of at most 2 pods"
    );
    // The busy pods survive: the ReplicaSet removed the idle ones (lowest cost).
    let left: Vec<String> = running_pods(&s)
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    for (name, ip) in &mapping {
        if fake.get(*ip) > 0 {
            assert!(left.contains(name), "busy pod {name} was removed: {left:?}");
        }
    }
    let vd = Api::<VoiceDeployment>::namespaced(s.admin.clone(), &s.ns)
        .get("desk")
        .await
        .unwrap();
    let st = vd.status.unwrap();
    assert_eq!(st.desired_replicas, Some(2));
    assert!(st.last_scale_time.is_some());
}
