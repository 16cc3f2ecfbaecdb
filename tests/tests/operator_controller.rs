//! The operator's real `Controller` loop (`voice_operator::controller::run`, the code
//! behind `voice-operator run`) against the real control plane, running under exactly
//! the chart's cluster-wide rules (`charts/callmeback/files/operator-rules.yaml` as a
//! ClusterRole, the Lease rules as a Role) with a ServiceAccount token, never as admin. Each test has its own namespace and its
//! own namespace-scoped operator, so tests run in parallel.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use callmeback_api::{Persona, VoiceDeployment, find_condition};
use callmeback_tests::controlplane::{self, ControlPlane};
use callmeback_tests::emulators::twilio_numbers::TwilioNumbersEmulator;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use voice_operator::context::Config;
use voice_operator::controller;
use voice_operator::metrics::Metrics;
use voice_operator::reconcile::voice_deployment::twilio::{
    TWILIO_FINALIZER, TWILIO_PREVIOUS_ANNOTATION, TWILIO_WIRED_ANNOTATION,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const ACCOUNT_SID: &str = "AC00000000000000000000000000000001";
const AUTH_TOKEN: &str = "test-auth-token";

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn yaml_docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str_multiple(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Installs the generated CRDs once per test binary and waits until they serve.
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
        // Discovery can lag Established by a moment.
        let personas: Api<Persona> = Api::all(cp.client());
        eventually("personas served", || async {
            personas.list(&ListParams::default().limit(1)).await.ok()
        })
        .await;
    })
    .await;
}

/// Polls `f` until it returns `Some` or the timeout passes.
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

/// A running operator; cancelled (and awaited) on drop of the test.
struct Operator {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Metrics,
}

impl Operator {
    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
    }

    fn reconciles(&self, kind: &str) -> u64 {
        self.metrics.reconciles.with_label_values(&[kind]).get()
    }

    /// Applies of owned objects with `outcome` (`written`, `unchanged`), all kinds.
    fn applies(&self, outcome: &str) -> u64 {
        use prometheus::core::Collector;
        self.metrics
            .applies
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "outcome" && l.value() == outcome)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn chart_rules(file: &str) -> Vec<PolicyRule> {
    yaml_docs(&format!("charts/callmeback/files/{file}"))
        .into_iter()
        .flat_map(|doc| serde_json::from_value::<Vec<PolicyRule>>(doc).unwrap())
        .collect()
}

/// A client holding exactly the chart's operator rules in cluster-wide mode
/// (ClusterRole + binding to a ServiceAccount in `ns`, the Lease Role in `ns`), like
/// the chart installs.
async fn operator_client(cp: &ControlPlane, ns: &str) -> Client {
    let admin = cp.client();
    let rules = chart_rules("operator-rules.yaml");
    let lease_role = Role {
        metadata: ObjectMeta {
            name: Some("operator-leader-election".into()),
            ..Default::default()
        },
        rules: Some(chart_rules("operator-leader-election-rules.yaml")),
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &lease_role)
        .await
        .unwrap();
    let lease_binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("operator-leader-election".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "operator-leader-election".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "operator".into(),
            namespace: Some(ns.into()),
            api_group: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &lease_binding)
        .await
        .unwrap();
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("operator".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let name = format!("callmeback-operator-{ns}");
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        rules: Some(rules),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name,
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "operator".into(),
            namespace: Some(ns.into()),
            api_group: None,
        }]),
    };
    Api::<ClusterRoleBinding>::all(admin)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    cp.client_for_service_account(ns, "operator").await
}

/// Where an operator without a Twilio emulator sends Twilio requests: a closed port.
const NO_TWILIO: &str = "http://127.0.0.1:9";

async fn start_operator(
    cp: &ControlPlane,
    ns: &str,
    twilio_api_url: &str,
    tune: impl FnOnce(&mut Config),
) -> Operator {
    let client = operator_client(cp, ns).await;
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let mut config = Config {
        namespace: Some(ns.into()),
        twilio_restore_deadline: Duration::from_secs(5),
        twilio_api_url: twilio_api_url.into(),
        concurrency: 4,
        instance: Some("test".into()),
        ..Config::default()
    };
    tune(&mut config);
    let task = tokio::spawn(controller::run(
        client,
        config,
        metrics.clone(),
        stop.clone(),
    ));
    Operator {
        stop,
        task: Some(task),
        metrics,
    }
}

/// Namespace, admin client, CRDs and a running operator with no Twilio.
async fn setup(prefix: &str) -> (&'static ControlPlane, String, Client, Operator) {
    setup_with_twilio(prefix, NO_TWILIO).await
}

/// The same, with the operator's own Twilio base (the `--twilio-api-url` setting).
async fn setup_with_twilio(
    prefix: &str,
    twilio_api_url: &str,
) -> (&'static ControlPlane, String, Client, Operator) {
    setup_with_config(prefix, twilio_api_url, |_| {}).await
}

/// The same, with other operator settings changed by `tune`.
async fn setup_with_config(
    prefix: &str,
    twilio_api_url: &str,
    tune: impl FnOnce(&mut Config),
) -> (&'static ControlPlane, String, Client, Operator) {
    let cp = controlplane::shared().await;
    install_crds(cp).await;
    let ns = cp.new_namespace(prefix).await;
    let op = start_operator(cp, &ns, twilio_api_url, tune).await;
    (cp, ns, cp.client(), op)
}

async fn apply_json(client: &Client, ns: &str, doc: serde_json::Value) {
    let kind = doc["kind"].as_str().unwrap().to_string();
    let name = doc["metadata"]["name"].as_str().unwrap().to_string();
    let pp = PatchParams::apply("kubectl").force();
    let result = match kind.as_str() {
        "Persona" => Api::<Persona>::namespaced(client.clone(), ns)
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "VoiceDeployment" => Api::<VoiceDeployment>::namespaced(client.clone(), ns)
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        "Secret" => Api::<Secret>::namespaced(client.clone(), ns)
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map(|_| ()),
        other => panic!("unexpected kind {other}"),
    };
    result.unwrap_or_else(|e| panic!("applying {kind}/{name}: {e}"));
}

/// The example Secret with the emulators' Twilio credentials. Where the operator
/// sends Twilio requests is the operator's setting ([`setup_with_twilio`]), not this.
fn secret_doc() -> serde_json::Value {
    let mut doc = yaml_docs("examples/secret.yaml").remove(0);
    doc["stringData"]["TWILIO_ACCOUNT_SID"] = ACCOUNT_SID.into();
    doc["stringData"]["TWILIO_AUTH_TOKEN"] = AUTH_TOKEN.into();
    doc
}

fn example_personas() -> Vec<serde_json::Value> {
    let mut docs = Vec::new();
    for file in [
        "examples/persona.yaml",
        "examples/persona-night-librarian.yaml",
    ] {
        docs.extend(
            yaml_docs(file)
                .into_iter()
                .filter(|d| d["kind"] == "Persona"),
        );
    }
    docs
}

/// A minimal valid persona document.
fn persona_doc(name: &str, greeting: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "Persona",
        "metadata": { "name": name },
        "spec": {
            "displayName": "Sam",
            "systemPrompt": "You are Sam, warm and brief.",
            "greeting": greeting,
            "voice": { "voiceId": "voice123" },
            "maxCallDurationSeconds": 600,
        }
    })
}

fn vd_doc(name: &str, personas: &[&str], secret: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "VoiceDeployment",
        "metadata": { "name": name },
        "spec": {
            "personas": personas,
            "secretRef": { "name": secret },
            "publicUrl": "https://voice.example.com",
            "replicas": 1,
        }
    })
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Option<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

async fn vd_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let vd: VoiceDeployment = get(client, ns, name).await?;
    let status = vd.status?;
    if status.observed_generation != vd.metadata.generation {
        return None;
    }
    find_condition(&status.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Event {
    eventually(&format!("Event {reason} on {name}"), || async {
        events_for(client, ns, name)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
    })
    .await
}

/// Resource versions of everything the operator manages for `vd` plus the CRs.
async fn resource_versions(
    client: &Client,
    ns: &str,
    vd: &str,
    personas: &[&str],
) -> BTreeMap<String, String> {
    async fn rv<K>(client: &Client, ns: &str, name: &str, out: &mut BTreeMap<String, String>)
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let obj: Option<K> = get(client, ns, name).await;
        out.insert(
            format!("{}/{name}", K::kind(&())),
            obj.and_then(|o| o.meta().resource_version.clone())
                .unwrap_or_default(),
        );
    }
    let mut out = BTreeMap::new();
    let sa = format!("{vd}-voice-pod");
    rv::<VoiceDeployment>(client, ns, vd, &mut out).await;
    rv::<Deployment>(client, ns, vd, &mut out).await;
    rv::<Service>(client, ns, vd, &mut out).await;
    rv::<PodDisruptionBudget>(client, ns, vd, &mut out).await;
    rv::<ServiceAccount>(client, ns, &sa, &mut out).await;
    rv::<ConfigMap>(client, ns, &format!("{vd}-config"), &mut out).await;
    for p in personas {
        rv::<Persona>(client, ns, p, &mut out).await;
    }
    out
}

#[tokio::test]
async fn examples_reconcile_into_owned_objects_and_wire_twilio() {
    // Proves examples/ apply cleanly and the operator builds every object, status and the Twilio wiring from them.
    let twilio = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    let (_cp, ns, client, op) = setup_with_twilio("op-examples", &twilio.base_url()).await;
    twilio.add_number(
        "+14155550100",
        "https://old.example.com/voice",
        "https://old.example.com/status",
    );
    twilio.add_number("+14155550101", "", "");
    apply_json(&client, &ns, secret_doc()).await;
    let personas = example_personas();
    let names: Vec<String> = personas
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for p in personas {
        apply_json(&client, &ns, p).await;
    }
    for doc in yaml_docs("examples/voicedeployment.yaml") {
        apply_json(&client, &ns, doc).await;
    }

    let vd: VoiceDeployment = eventually("VoiceDeployment status", || async {
        let vd: VoiceDeployment = get(&client, &ns, "front-desk").await?;
        let s = vd.status.as_ref()?;
        (s.resolved_personas.len() == names.len()
            && s.observed_generation == vd.metadata.generation)
            .then_some(vd)
    })
    .await;
    let status = vd.status.clone().unwrap();
    assert_eq!(
        status.webhook_url.as_deref(),
        Some("https://voice.example.com/twilio/voice")
    );
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=front-desk,app.kubernetes.io/name=voice-pod")
    );
    let degraded = find_condition(&status.conditions, "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "AsExpected"),
        "{degraded:?}"
    );

    let config: ConfigMap = get(&client, &ns, "front-desk-config")
        .await
        .expect("the deployment's ConfigMap");
    for name in &names {
        let p: Persona = eventually("persona Ready", || async {
            let p: Persona = get(&client, &ns, name).await?;
            find_condition(&p.status.as_ref()?.conditions, "Ready").filter(|c| c.is_true())?;
            Some(p)
        })
        .await;
        let file = &config.data.as_ref().unwrap()[&format!("{name}.yaml")];
        let spec: callmeback_api::PersonaSpec = serde_saphyr::from_str(file).unwrap();
        assert_eq!(spec, p.spec, "the ConfigMap holds the persona's spec");
        // No per-Persona ConfigMap any more: nothing would read it.
        assert!(
            get::<ConfigMap>(&client, &ns, &format!("persona-{name}"))
                .await
                .is_none()
        );
    }

    let uid = vd.metadata.uid.clone().unwrap();
    let owned = |meta: &ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true))
    };
    let d: Deployment = eventually("Deployment", || get(&client, &ns, "front-desk")).await;
    assert!(owned(&d.metadata));
    let pod = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
    // The default drain timeout (3600 s) + preStop sleep (5 s) + margin (30 s).
    assert_eq!(pod.termination_grace_period_seconds, Some(3600 + 35));
    assert!(owned(&config.metadata));
    assert!(owned(
        &get::<Service>(&client, &ns, "front-desk")
            .await
            .unwrap()
            .metadata
    ));
    // The example scales on live calls: replicas from the operator, no HPA.
    assert!(
        get::<HorizontalPodAutoscaler>(&client, &ns, "front-desk")
            .await
            .is_none()
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    assert!(owned(
        &get::<PodDisruptionBudget>(&client, &ns, "front-desk")
            .await
            .unwrap()
            .metadata
    ));
    assert!(owned(
        &get::<Ingress>(&client, &ns, "front-desk")
            .await
            .unwrap()
            .metadata
    ));
    assert!(owned(
        &get::<ServiceAccount>(&client, &ns, "front-desk-voice-pod")
            .await
            .unwrap()
            .metadata
    ));
    // The voice pods get no Kubernetes API access: no Role, no RoleBinding, no token.
    assert!(
        get::<Role>(&client, &ns, "front-desk-voice-pod")
            .await
            .is_none()
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert!(config.data.as_ref().unwrap()["_routes.yaml"].contains("+14155550101"));

    // kwok's fake node runs the pods, so the Deployment becomes Available and the
    // status reports the Deployment's own condition.
    let (available, reason, _) = eventually("Available condition", || async {
        vd_condition(&client, &ns, "front-desk", "Available")
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(available, "True");
    assert_eq!(reason, "MinimumReplicasAvailable");

    for number in ["+14155550100", "+14155550101"] {
        let n = eventually("number wired", || async {
            twilio
                .number(number)
                .filter(|n| n.voice_url == "https://voice.example.com/twilio/voice")
        })
        .await;
        assert_eq!(n.status_callback, "https://voice.example.com/twilio/status");
    }
    let vd: VoiceDeployment = get(&client, &ns, "front-desk").await.unwrap();
    assert!(vd.finalizers().iter().any(|f| f == TWILIO_FINALIZER));
    assert!(vd.annotations()[TWILIO_PREVIOUS_ANNOTATION].contains("https://old.example.com/voice"));
    op.stop().await;
}

#[tokio::test]
async fn missing_secret_degrades_with_an_event_and_recovers_when_created() {
    // Proves SecretMissing is reported in status and as an Event, no Deployment is made, and creating the Secret heals it.
    let (_cp, ns, client, op) = setup("op-secret").await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, vd_doc("desk", &["sam"], "callmeback-keys")).await;
    let (status, reason, message) = eventually("Degraded", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SecretMissing")
    );
    assert!(message.contains("callmeback-keys"), "{message}");
    let event = wait_event(&client, &ns, "desk", "SecretMissing").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(get::<Deployment>(&client, &ns, "desk").await.is_none());

    // A Secret without the required keys: SecretKeyMissing names them.
    let mut partial = secret_doc();
    partial["stringData"]
        .as_object_mut()
        .unwrap()
        .remove("DEEPGRAM_API_KEY");
    apply_json(&client, &ns, partial).await;
    let (_, reason, message) = eventually("SecretKeyMissing", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.1 == "SecretKeyMissing")
    })
    .await;
    assert_eq!(reason, "SecretKeyMissing");
    assert!(message.contains("DEEPGRAM_API_KEY"), "{message}");
    wait_event(&client, &ns, "desk", "SecretKeyMissing").await;

    apply_json(&client, &ns, secret_doc()).await;
    eventually("healed", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    eventually("Deployment", || get::<Deployment>(&client, &ns, "desk")).await;
    op.stop().await;
}

#[tokio::test]
async fn missing_and_invalid_personas_are_reported() {
    // Proves PersonaNotFound and PersonaInvalid (a blank prompt the schema allows) reach status and Events.
    let (_cp, ns, client, op) = setup("op-personas").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, vd_doc("desk", &["ghost"], "callmeback-keys")).await;
    eventually("PersonaNotFound", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.1 == "PersonaNotFound")
    })
    .await;
    wait_event(&client, &ns, "desk", "PersonaNotFound").await;

    let mut blank = persona_doc("ghost", "Boo.");
    blank["spec"]["systemPrompt"] = "   ".into();
    apply_json(&client, &ns, blank).await;
    let (_, _, message) = eventually("PersonaInvalid", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.1 == "PersonaInvalid")
    })
    .await;
    assert!(message.contains("systemPrompt is blank"), "{message}");
    let ready = eventually("persona Ready=False", || async {
        let p: Persona = get(&client, &ns, "ghost").await?;
        find_condition(&p.status?.conditions, "Ready")
            .cloned()
            .filter(|c| !c.is_true())
    })
    .await;
    assert_eq!(ready.reason, "Invalid");
    wait_event(&client, &ns, "ghost", "PersonaInvalid").await;

    // Fixing the persona is picked up through the Persona watch.
    apply_json(&client, &ns, persona_doc("ghost", "Boo.")).await;
    eventually("healed", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn a_second_reconcile_writes_nothing() {
    // Proves idempotency: after convergence a triggered reconcile changes no
    // resourceVersion anywhere, and sends no apply at all (the owned-object cache
    // shows every object as last applied).
    let (_cp, ns, client, op) = setup("op-idempotent").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, vd_doc("desk", &["sam"], "callmeback-keys")).await;
    eventually("converged", || async {
        vd_condition(&client, &ns, "desk", "Progressing")
            .await
            .filter(|c| c.1 != "Creating")
    })
    .await;
    // The load poller's first pass (every 5 s) writes the load fields once; a
    // window that closes before it would blame the reconcile for that write.
    eventually("the load poller's first write", || async {
        get::<VoiceDeployment>(&client, &ns, "desk")
            .await?
            .status?
            .unknown_load_pods
    })
    .await;
    // Let the Deployment controller's status updates settle, then compare.
    let settled = eventually("stable resourceVersions", || async {
        let a = resource_versions(&client, &ns, "desk", &["sam"]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = resource_versions(&client, &ns, "desk", &["sam"]).await;
        (a == b).then_some(b)
    })
    .await;
    let before = op.reconciles("VoiceDeployment");
    let (written, unchanged) = (op.applies("written"), op.applies("unchanged"));
    // Touch the Secret's labels: the Secret watch requeues the VoiceDeployment.
    let patch = serde_json::json!({ "metadata": { "labels": { "touched": "yes" } } });
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch(
            "callmeback-keys",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    eventually("a new reconcile", || async {
        (op.reconciles("VoiceDeployment") > before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resource_versions(&client, &ns, "desk", &["sam"]).await;
    if settled != after {
        // Say who wrote what, so a failure points at the writer.
        let vd: Option<VoiceDeployment> = get(&client, &ns, "desk").await;
        eprintln!(
            "VoiceDeployment after the reconcile: {}",
            serde_json::to_string_pretty(&vd).unwrap_or_default()
        );
    }
    assert_eq!(
        settled, after,
        "a reconcile with nothing to do must write nothing"
    );
    assert_eq!(
        op.applies("written"),
        written,
        "no apply request for unchanged objects"
    );
    assert!(
        op.applies("unchanged") >= unchanged + 5,
        "the reconcile skipped its applies: {} -> {}",
        unchanged,
        op.applies("unchanged")
    );
    op.stop().await;
}

#[tokio::test]
async fn drifted_objects_are_put_back() {
    // Proves owned objects edited or deleted behind the operator's back are restored.
    let (_cp, ns, client, op) = setup("op-drift").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, vd_doc("desk", &["sam"], "callmeback-keys")).await;
    let d: Deployment = eventually("Deployment", || get(&client, &ns, "desk")).await;
    let grace = d
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .termination_grace_period_seconds;

    // Longer than the preStop sleep, or the apiserver itself refuses the drift.
    let patch = serde_json::json!({ "spec": { "template": { "spec": { "terminationGracePeriodSeconds": 17 } } } });
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("desk", &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
    eventually("grace period restored", || async {
        let d: Deployment = get(&client, &ns, "desk").await?;
        (d.spec?.template.spec?.termination_grace_period_seconds == grace).then_some(())
    })
    .await;

    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("desk", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Service recreated", || get::<Service>(&client, &ns, "desk")).await;
    let patch = serde_json::json!({ "data": { "_routes.yaml": "hacked: true" } });
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(
            "desk-config",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
    eventually("ConfigMap restored", || async {
        let cm: ConfigMap = get(&client, &ns, "desk-config").await?;
        (!cm.data?["_routes.yaml"].contains("hacked")).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn deleting_a_voice_deployment_garbage_collects_what_it_made() {
    // Proves owner references let the garbage collector remove the Deployment, Service and the rest.
    let (_cp, ns, client, op) = setup("op-gc").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, vd_doc("desk", &["sam"], "callmeback-keys")).await;
    eventually("Deployment", || get::<Deployment>(&client, &ns, "desk")).await;
    eventually("PDB", || get::<PodDisruptionBudget>(&client, &ns, "desk")).await;
    Api::<VoiceDeployment>::namespaced(client.clone(), &ns)
        .delete("desk", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually("all owned objects gone", || async {
        let gone = get::<Deployment>(&client, &ns, "desk").await.is_none()
            && get::<Service>(&client, &ns, "desk").await.is_none()
            && get::<PodDisruptionBudget>(&client, &ns, "desk")
                .await
                .is_none()
            && get::<ServiceAccount>(&client, &ns, "desk-voice-pod")
                .await
                .is_none()
            && get::<ConfigMap>(&client, &ns, "desk-config")
                .await
                .is_none()
            && get::<VoiceDeployment>(&client, &ns, "desk").await.is_none();
        gone.then_some(())
    })
    .await;
    // The Persona itself is not the deployment's.
    assert!(get::<Persona>(&client, &ns, "sam").await.is_some());
    op.stop().await;
}

/// Someone else's object, created by the admin before the operator sees a name clash.
async fn create_unrelated<K>(client: &Client, ns: &str, doc: serde_json::Value) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(doc).unwrap();
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

#[tokio::test]
async fn same_named_objects_of_others_are_never_adopted_nor_garbage_collected() {
    // Proves a VoiceDeployment named like existing unrelated objects leaves them untouched (Degraded NotOwned plus an Event), and deleting it deletes none of them.
    let (_cp, ns, client, op) = setup("op-not-owned").await;
    let service: Service = create_unrelated(
        &client,
        &ns,
        serde_json::json!({
            "metadata": { "name": "desk", "labels": { "team": "db" } },
            "spec": { "selector": { "app": "db" }, "ports": [{ "port": 5432 }] },
        }),
    )
    .await;
    let routes: ConfigMap = create_unrelated(
        &client,
        &ns,
        serde_json::json!({ "metadata": { "name": "desk-config" }, "data": { "owner": "db team" } }),
    )
    .await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, vd_doc("desk", &["sam"], "callmeback-keys")).await;

    let (_, _, message) = eventually("Degraded NotOwned", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.0 == "True" && c.1 == "NotOwned")
    })
    .await;
    assert!(
        message.contains("Service desk") && message.contains("ConfigMap desk-config"),
        "{message}"
    );
    wait_event(&client, &ns, "desk", "NotOwned").await;
    assert!(get::<Deployment>(&client, &ns, "desk").await.is_none());

    let unchanged = |before: &ObjectMeta, after: &ObjectMeta| {
        assert_eq!(
            before.resource_version,
            after.resource_version,
            "{} was written",
            after.name.as_deref().unwrap_or_default()
        );
        assert!(after.owner_references.is_none(), "{after:?}");
    };
    let deleted = |what: &str| format!("{what} was deleted");
    unchanged(
        &service.metadata,
        &get::<Service>(&client, &ns, "desk")
            .await
            .unwrap_or_else(|| panic!("{}", deleted("Service")))
            .metadata,
    );
    unchanged(
        &routes.metadata,
        &get::<ConfigMap>(&client, &ns, "desk-config")
            .await
            .unwrap_or_else(|| panic!("{}", deleted("ConfigMap")))
            .metadata,
    );

    Api::<VoiceDeployment>::namespaced(client.clone(), &ns)
        .delete("desk", &DeleteParams::foreground())
        .await
        .unwrap();
    Api::<Persona>::namespaced(client.clone(), &ns)
        .delete("sam", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually("VoiceDeployment and Persona gone", || async {
        (get::<VoiceDeployment>(&client, &ns, "desk").await.is_none()
            && get::<Persona>(&client, &ns, "sam").await.is_none())
        .then_some(())
    })
    .await;
    // The garbage collector had nothing of theirs to collect.
    unchanged(
        &service.metadata,
        &get::<Service>(&client, &ns, "desk")
            .await
            .unwrap_or_else(|| panic!("{}", deleted("Service")))
            .metadata,
    );
    unchanged(
        &routes.metadata,
        &get::<ConfigMap>(&client, &ns, "desk-config")
            .await
            .unwrap_or_else(|| panic!("{}", deleted("ConfigMap")))
            .metadata,
    );
    op.stop().await;
}

#[tokio::test]
async fn an_update_asking_for_an_existing_unrelated_object_does_not_take_it_over() {
    // Proves the update path: a running VoiceDeployment that newly asks for an Ingress named like someone else's leaves that Ingress alone and says NotOwned.
    let (_cp, ns, client, op) = setup("op-not-owned-update").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, vd_doc("desk", &["sam"], "callmeback-keys")).await;
    eventually("Deployment", || get::<Deployment>(&client, &ns, "desk")).await;
    let theirs: Ingress = create_unrelated(
        &client,
        &ns,
        serde_json::json!({
            "metadata": { "name": "desk" },
            "spec": { "defaultBackend": { "service": { "name": "web", "port": { "number": 80 } } } },
        }),
    )
    .await;
    let mut doc = vd_doc("desk", &["sam"], "callmeback-keys");
    doc["spec"]["ingress"] = serde_json::json!({ "className": "nginx" });
    apply_json(&client, &ns, doc).await;
    let (_, _, message) = eventually("Degraded NotOwned", || async {
        vd_condition(&client, &ns, "desk", "Degraded")
            .await
            .filter(|c| c.1 == "NotOwned")
    })
    .await;
    assert!(message.contains("Ingress desk"), "{message}");
    wait_event(&client, &ns, "desk", "NotOwned").await;
    let after: Ingress = get(&client, &ns, "desk").await.unwrap();
    assert_eq!(
        theirs.metadata.resource_version,
        after.metadata.resource_version
    );
    assert!(after.metadata.owner_references.is_none());
    // The deployment's own objects stay as they were.
    assert!(get::<Deployment>(&client, &ns, "desk").await.is_some());
    op.stop().await;
}

fn twilio_vd(name: &str, number: &str) -> serde_json::Value {
    let mut doc = vd_doc(name, &["sam"], "callmeback-keys");
    doc["spec"]["twilio"] = serde_json::json!({ "phoneNumbers": [number] });
    doc
}

#[tokio::test]
async fn deletion_restores_twilio_numbers_then_releases_the_finalizer() {
    // Proves the finalizer restores each number's previous webhook on delete, with an Event.
    let twilio = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    let (_cp, ns, client, op) = setup_with_twilio("op-twilio", &twilio.base_url()).await;
    twilio.add_number(
        "+14155550123",
        "https://old.example.com/voice",
        "https://old.example.com/status",
    );
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, twilio_vd("desk", "+14155550123")).await;
    eventually("wired", || async {
        twilio
            .number("+14155550123")
            .filter(|n| n.voice_url == "https://voice.example.com/twilio/voice")
    })
    .await;
    Api::<VoiceDeployment>::namespaced(client.clone(), &ns)
        .delete("desk", &DeleteParams::default())
        .await
        .unwrap();
    eventually("VoiceDeployment gone", || async {
        get::<VoiceDeployment>(&client, &ns, "desk")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let n = twilio.number("+14155550123").unwrap();
    assert_eq!(n.voice_url, "https://old.example.com/voice");
    assert_eq!(n.status_callback, "https://old.example.com/status");
    wait_event(&client, &ns, "desk", "TwilioNumbersRestored").await;
    op.stop().await;
}

#[tokio::test]
async fn a_tenant_secret_cannot_redirect_the_operators_twilio_requests() {
    // Proves the operator sends Twilio requests (with the tenant's credentials) only to its own configured base: a Secret's TWILIO_API_URL, plain or ending in `?`/`#`, receives nothing.
    let twilio = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    // A server the tenant controls, holding the same number so a request to it would succeed.
    let trap = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    trap.add_number("+14155550125", "https://old.example.com/voice", "");
    twilio.add_number("+14155550125", "https://old.example.com/voice", "");
    let (_cp, ns, client, op) = setup_with_twilio("op-twilio-base", &twilio.base_url()).await;
    let mut secret = secret_doc();
    secret["stringData"]["TWILIO_API_URL"] = format!("{}/?", trap.base_url()).into();
    apply_json(&client, &ns, secret).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, twilio_vd("desk", "+14155550125")).await;
    eventually("wired through the operator's own base", || async {
        twilio
            .number("+14155550125")
            .filter(|n| n.voice_url == "https://voice.example.com/twilio/voice")
    })
    .await;
    // Point it at a plain base too and make the operator wire again.
    let mut secret = secret_doc();
    secret["stringData"]["TWILIO_API_URL"] = trap.base_url().into();
    apply_json(&client, &ns, secret).await;
    let looked = twilio.lookups();
    eventually("a Twilio lookup after the Secret change", || async {
        (twilio.lookups() > looked).then_some(())
    })
    .await;
    assert_eq!(
        (trap.lookups(), trap.updates()),
        (0, 0),
        "the tenant's base received requests"
    );
    assert_eq!(
        trap.number("+14155550125").unwrap().voice_url,
        "https://old.example.com/voice"
    );
    op.stop().await;
}

#[tokio::test]
async fn deletion_with_twilio_down_gives_up_after_the_deadline() {
    // Proves an unreachable Twilio never wedges deletion: bounded retries, a Warning Event, then release.
    let twilio = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    let (_cp, ns, client, op) = setup_with_twilio("op-twilio-down", &twilio.base_url()).await;
    twilio.add_number("+14155550124", "https://old.example.com/voice", "");
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, twilio_vd("desk", "+14155550124")).await;
    eventually("wired", || async {
        twilio
            .number("+14155550124")
            .filter(|n| n.voice_url == "https://voice.example.com/twilio/voice")
    })
    .await;
    twilio.set_down(true);
    let started = Instant::now();
    Api::<VoiceDeployment>::namespaced(client.clone(), &ns)
        .delete("desk", &DeleteParams::default())
        .await
        .unwrap();
    // Still held while the deadline (5 s in these tests) runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        get::<VoiceDeployment>(&client, &ns, "desk").await.is_some(),
        "released before the deadline"
    );
    eventually("VoiceDeployment released", || async {
        get::<VoiceDeployment>(&client, &ns, "desk")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    // deletionTimestamp has second precision, so allow up to a second less than the deadline.
    assert!(started.elapsed() >= Duration::from_secs(4));
    let event = wait_event(&client, &ns, "desk", "TwilioRestoreFailed").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.unwrap_or_default().contains("+14155550124"));
    op.stop().await;
}

/// A VoiceDeployment on `number` served at `https://{host}`.
fn twilio_vd_at(name: &str, number: &str, host: &str) -> serde_json::Value {
    let mut doc = twilio_vd(name, number);
    doc["spec"]["publicUrl"] = format!("https://{host}").into();
    doc
}

/// The parsed `callmeback.dev/twilio-wired` record of `name`, once written.
async fn wired_record(client: &Client, ns: &str, name: &str) -> Option<serde_json::Value> {
    let vd: VoiceDeployment = get(client, ns, name).await?;
    let raw = vd.annotations().get(TWILIO_WIRED_ANNOTATION)?.clone();
    serde_json::from_str(&raw).ok()
}

/// A Twilio emulator and an operator using it, verifying every `verify_interval`
/// and resyncing every second, with the Secret and the persona `sam` applied.
async fn twilio_setup(
    prefix: &str,
    verify_interval: Duration,
) -> (TwilioNumbersEmulator, String, Client, Operator) {
    let twilio = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    let (_cp, ns, client, op) = setup_with_config(prefix, &twilio.base_url(), |c| {
        c.twilio_verify_interval = verify_interval;
        c.resync = Duration::from_secs(1);
    })
    .await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    (twilio, ns, client, op)
}

#[tokio::test]
async fn idle_voice_deployments_make_no_twilio_requests_for_ten_resync_periods() {
    // Proves the wiring record: 100 wired VoiceDeployments reconciled every 2 s for 10 periods send Twilio nothing (the old code sent one lookup per number per reconcile).
    const COUNT: usize = 100;
    const RESYNC: Duration = Duration::from_secs(2);
    let twilio = TwilioNumbersEmulator::start(ACCOUNT_SID, AUTH_TOKEN)
        .await
        .unwrap();
    let (_cp, ns, client, op) = setup_with_config("op-twilio-idle", &twilio.base_url(), |c| {
        c.resync = RESYNC;
        c.concurrency = 8;
    })
    .await;
    let numbers: Vec<String> = (0..COUNT).map(|i| format!("+1415556{i:04}")).collect();
    for n in &numbers {
        twilio.add_number(n, "https://old.example.com/voice", "");
    }
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    for (i, n) in numbers.iter().enumerate() {
        apply_json(&client, &ns, twilio_vd(&format!("desk-{i}"), n)).await;
    }
    let started = Instant::now();
    loop {
        let mut recorded = 0;
        for i in 0..COUNT {
            if wired_record(&client, &ns, &format!("desk-{i}"))
                .await
                .is_some()
            {
                recorded += 1;
            }
        }
        let wired = numbers
            .iter()
            .filter(|n| {
                twilio
                    .number(n)
                    .is_some_and(|r| r.voice_url == "https://voice.example.com/twilio/voice")
            })
            .count();
        if recorded == COUNT && wired == COUNT {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{wired}/{COUNT} numbers wired, {recorded}/{COUNT} records written"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wired_in = started.elapsed();
    let (lookups, updates) = (twilio.lookups(), twilio.updates());
    let reconciles = op.reconciles("VoiceDeployment");
    tokio::time::sleep(RESYNC * 10).await;
    let resynced = op.reconciles("VoiceDeployment") - reconciles;
    let (more_lookups, more_updates) = (twilio.lookups() - lookups, twilio.updates() - updates);
    eprintln!(
        "{COUNT} VoiceDeployments wired in {wired_in:?} ({lookups} lookups, {updates} updates); \
         then {resynced} reconciles in 10 resync periods made {more_lookups} lookups, \
         {more_updates} updates"
    );
    // Each deployment was reconciled again and again (not merely left alone) ...
    assert!(
        resynced >= (COUNT * 5) as u64,
        "only {resynced} reconciles in 10 resync periods of {COUNT} deployments"
    );
    // ... and none of those reconciles asked Twilio anything.
    assert_eq!((more_lookups, more_updates), (0, 0));
    op.stop().await;
}

#[tokio::test]
async fn a_number_changed_in_the_twilio_console_is_put_back_at_the_next_verification() {
    // Proves the slow periodic verification: drift outside Kubernetes is repaired within one (stretched) verify interval, at about one lookup per interval.
    let (twilio, ns, client, op) = twilio_setup("op-twilio-verify", Duration::from_secs(4)).await;
    twilio.add_number("+14155550140", "https://old.example.com/voice", "");
    apply_json(&client, &ns, twilio_vd("desk", "+14155550140")).await;
    eventually("wired and recorded", || async {
        wired_record(&client, &ns, "desk").await?;
        twilio
            .number("+14155550140")
            .filter(|n| n.voice_url == "https://voice.example.com/twilio/voice")
    })
    .await;
    let lookups = twilio.lookups();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let in_window = twilio.lookups() - lookups;
    // 12 s at one lookup per 3..5 s (the 4 s interval stretched per deployment),
    // with 1 s resyncs in between that must not add any.
    assert!(
        (2..=5).contains(&in_window),
        "{in_window} lookups in {:?}",
        window.elapsed()
    );
    twilio.set_voice_url("+14155550140", "https://someone-else.example.com/voice");
    let changed = Instant::now();
    eventually("the console change put back", || async {
        twilio
            .number("+14155550140")
            .filter(|n| n.voice_url == "https://voice.example.com/twilio/voice")
    })
    .await;
    assert!(
        changed.elapsed() < Duration::from_secs(7),
        "repaired after {:?}",
        changed.elapsed()
    );
    op.stop().await;
}

#[tokio::test]
async fn a_blue_green_move_never_leaves_the_number_on_a_deleted_deployment() {
    // Proves number ownership: green claims blue's number and takes it over explicitly (Event on green, Degraded on blue); deleting blue leaves the number on green at every sample; deleting green restores the pre-callmeback settings.
    let (twilio, ns, client, op) =
        twilio_setup("op-twilio-bluegreen", Duration::from_secs(2)).await;
    const NUMBER: &str = "+14155550150";
    twilio.add_number(
        NUMBER,
        "https://old.example.com/voice",
        "https://old.example.com/status",
    );
    let original = twilio.number(NUMBER).unwrap();
    apply_json(
        &client,
        &ns,
        twilio_vd_at("blue", NUMBER, "blue.example.com"),
    )
    .await;
    let blue_uid = eventually("blue's uid", || async {
        get::<VoiceDeployment>(&client, &ns, "blue").await?.uid()
    })
    .await;
    eventually("the number on blue, marked as blue's", || async {
        twilio.number(NUMBER).filter(|n| {
            n.voice_url == "https://blue.example.com/twilio/voice"
                && n.friendly_name == format!("callmeback:{blue_uid}")
        })
    })
    .await;

    apply_json(
        &client,
        &ns,
        twilio_vd_at("green", NUMBER, "green.example.com"),
    )
    .await;
    let green_url = "https://green.example.com/twilio/voice";
    eventually("the number on green", || async {
        twilio.number(NUMBER).filter(|n| n.voice_url == green_url)
    })
    .await;
    let event = wait_event(&client, &ns, "green", "TwilioNumberTakenOver").await;
    assert!(
        event.note.unwrap_or_default().contains("blue"),
        "the Event names the deployment it took the number from"
    );
    let (status, _, message) = eventually("blue says it lost the number", || async {
        vd_condition(&client, &ns, "blue", "Degraded")
            .await
            .filter(|(_, reason, _)| reason == "TwilioNumberTakenOver")
    })
    .await;
    assert_eq!(status, "True");
    assert!(
        message.contains(&format!("{NUMBER} by VoiceDeployment {ns}/green")),
        "{message}"
    );

    // From here on, sample the number: it must never leave green, while blue keeps
    // verifying (every 1.5..2.5 s) and then is deleted.
    let sampling = CancellationToken::new();
    let mut strays: Vec<String> = Vec::new();
    let samples_until = async {
        let mut samples = 0u32;
        while !sampling.is_cancelled() {
            let url = twilio.number(NUMBER).unwrap().voice_url;
            if url != green_url {
                strays.push(url);
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples
    };
    let scenario = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Api::<VoiceDeployment>::namespaced(client.clone(), &ns)
            .delete("blue", &DeleteParams::default())
            .await
            .unwrap();
        eventually("blue gone", || async {
            get::<VoiceDeployment>(&client, &ns, "blue")
                .await
                .is_none()
                .then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        sampling.cancel();
    };
    let (samples, ()) = tokio::join!(samples_until, scenario);
    assert!(samples > 100, "only {samples} samples");
    assert!(strays.is_empty(), "the number left green: {strays:?}");
    // Blue yielded the number, so it had nothing of its own left to restore.
    let restores: Vec<String> = events_for(&client, &ns, "blue")
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("TwilioNumbersRestored"))
        .filter_map(|e| e.note)
        .filter(|note| note.contains(NUMBER))
        .collect();
    assert!(
        restores.is_empty(),
        "blue restored green's number: {restores:?}"
    );

    Api::<VoiceDeployment>::namespaced(client.clone(), &ns)
        .delete("green", &DeleteParams::default())
        .await
        .unwrap();
    eventually("green gone", || async {
        get::<VoiceDeployment>(&client, &ns, "green")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    let after = twilio.number(NUMBER).unwrap();
    assert_eq!(
        (after.voice_url, after.status_callback, after.friendly_name),
        (
            original.voice_url,
            original.status_callback,
            original.friendly_name
        ),
        "green hands back what was there before callmeback (saved by blue)"
    );
    op.stop().await;
}

#[tokio::test]
async fn throttling_backs_off_per_account_without_degrading_wired_deployments() {
    // Proves 429s back off for the whole account (bounded attempts, not one per deployment per check) and do not flip Degraded on deployments whose numbers are wired; verification resumes when Twilio recovers.
    let (twilio, ns, client, op) = twilio_setup("op-twilio-429", Duration::from_secs(2)).await;
    for i in 0..3 {
        let number = format!("+1415555016{i}");
        twilio.add_number(&number, "https://old.example.com/voice", "");
        apply_json(&client, &ns, twilio_vd(&format!("desk-{i}"), &number)).await;
    }
    for i in 0..3 {
        let name = format!("desk-{i}");
        eventually("wired and Available", || async {
            wired_record(&client, &ns, &name).await?;
            vd_condition(&client, &ns, &name, "Degraded")
                .await
                .filter(|(status, _, _)| status == "False")
        })
        .await;
    }
    twilio.set_throttled(true);
    let throttled = Instant::now();
    while throttled.elapsed() < Duration::from_secs(20) {
        for i in 0..3 {
            let degraded = vd_condition(&client, &ns, &format!("desk-{i}"), "Degraded").await;
            assert!(
                degraded
                    .as_ref()
                    .is_none_or(|(status, _, _)| status == "False"),
                "desk-{i} degraded by throttling: {degraded:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let refused = twilio.refused();
    // Three deployments verifying every ~2 s would try ~30 times in 20 s; the
    // account's backoff (2, 4, 8 s ...) allows a handful, plus the few checks that
    // were already past the gate when the first 429 came back.
    eprintln!("{refused} requests refused in 20 s of throttling");
    assert!(
        (1..=10).contains(&refused),
        "{refused} requests while throttled"
    );
    twilio.set_throttled(false);
    let lookups = twilio.lookups();
    eventually("verification resumes", || async {
        (twilio.lookups() > lookups).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn invalid_custom_resources_are_rejected_with_readable_messages() {
    // Proves the CRD schema and CEL rules reject bad personas and deployments before the operator sees them.
    let cp = controlplane::shared().await;
    install_crds(cp).await;
    let ns = cp.new_namespace("op-schema").await;
    let client = cp.client();
    let personas: Api<Persona> = Api::namespaced(client.clone(), &ns);
    let vds: Api<VoiceDeployment> = Api::namespaced(client.clone(), &ns);
    let reject = |e: kube::Error| match e {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            s.message
        }
        other => panic!("unexpected error {other}"),
    };
    let pp = PatchParams::apply("kubectl");

    let mut idle = persona_doc("idle", "Hi!");
    idle["spec"]["idleTimeoutSeconds"] = 900.into();
    let msg = reject(
        personas
            .patch("idle", &pp, &Patch::Apply(&idle))
            .await
            .unwrap_err(),
    );
    assert!(
        msg.contains("idleTimeoutSeconds must be shorter than maxCallDurationSeconds"),
        "{msg}"
    );

    let mut hot = persona_doc("hot", "Hi!");
    hot["spec"]["llm"] = serde_json::json!({ "temperature": 3.5 });
    let msg = reject(
        personas
            .patch("hot", &pp, &Patch::Apply(&hot))
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("spec.llm.temperature"), "{msg}");

    let mut no_voice = persona_doc("mute", "Hi!");
    no_voice["spec"].as_object_mut().unwrap().remove("voice");
    let msg = reject(
        personas
            .patch("mute", &pp, &Patch::Apply(&no_voice))
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("spec.voice: Required value"), "{msg}");

    let mut bad_default = vd_doc("desk", &["sam"], "keys");
    bad_default["spec"]["defaultPersona"] = "other".into();
    let msg = reject(
        vds.patch("desk", &pp, &Patch::Apply(&bad_default))
            .await
            .unwrap_err(),
    );
    assert!(
        msg.contains("defaultPersona must be one of personas"),
        "{msg}"
    );

    // The dialing settings the pods would refuse at start are refused here instead.
    for (dialing, field) in [
        (
            serde_json::json!({ "countries": ["usa"] }),
            "spec.dialing.countries[0]",
        ),
        (
            serde_json::json!({ "prefixes": ["882"] }),
            "spec.dialing.prefixes[0]",
        ),
        (
            serde_json::json!({ "limitPerNumber": "5 per hour" }),
            "spec.dialing.limitPerNumber",
        ),
        (
            serde_json::json!({ "limitPerUser": "0/1h" }),
            "spec.dialing.limitPerUser",
        ),
    ] {
        let mut bad_dialing = vd_doc("desk", &["sam"], "keys");
        bad_dialing["spec"]["dialing"] = dialing.clone();
        let msg = reject(
            vds.patch("desk", &pp, &Patch::Apply(&bad_dialing))
                .await
                .unwrap_err(),
        );
        assert!(msg.contains(field), "{dialing}: {msg}");
    }
    let mut dialing = vd_doc("desk-dialing", &["sam"], "keys");
    dialing["spec"]["dialing"] = serde_json::json!({
        "countries": ["US", "CA"], "prefixes": ["+882"], "defaultRegion": "US",
        "limitPerNumber": "3/10m", "limitPerUser": "off",
    });
    vds.patch("desk-dialing", &pp, &Patch::Apply(&dialing))
        .await
        .expect("valid dialing settings are accepted");

    let mut bad_number = vd_doc("desk", &["sam"], "keys");
    bad_number["spec"]["twilio"] = serde_json::json!({ "phoneNumbers": ["555-0100"] });
    let msg = reject(
        vds.patch("desk", &pp, &Patch::Apply(&bad_number))
            .await
            .unwrap_err(),
    );
    // The schema's pattern (not CEL: see the CRD) names the field and the value.
    assert!(
        msg.contains("spec.twilio.phoneNumbers[0]") && msg.contains("555-0100"),
        "{msg}"
    );

    let mut bad_scale = vd_doc("desk", &["sam"], "keys");
    bad_scale["spec"]["autoscaling"] = serde_json::json!({ "minReplicas": 5, "maxReplicas": 2 });
    let msg = reject(
        vds.patch("desk", &pp, &Patch::Apply(&bad_scale))
            .await
            .unwrap_err(),
    );
    assert!(msg.contains("minReplicas must not exceed"), "{msg}");

    // And the examples pass the same checks.
    for doc in example_personas() {
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        personas
            .patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .unwrap();
    }
    let vd = yaml_docs("examples/voicedeployment.yaml").remove(0);
    vds.patch("front-desk", &pp, &Patch::Apply(&vd))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_operator_identity_is_not_admin() {
    // Proves the operator's ServiceAccount holds the chart's narrow rules: it can patch Deployments but not delete Secrets or touch nodes.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("op-rbac").await;
    let client = operator_client(cp, &ns).await;
    let can = |verb: &str, group: &str, resource: &str| {
        let client = client.clone();
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.clone()),
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        async move {
            let api: Api<SelfSubjectAccessReview> = Api::all(client);
            api.create(&PostParams::default(), &review)
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed
        }
    };
    assert!(can("patch", "apps", "deployments").await);
    assert!(can("get", "", "secrets").await);
    assert!(!can("delete", "", "secrets").await);
    assert!(!can("create", "", "pods").await);
    assert!(!can("delete", "", "pods").await);
    assert!(!can("escalate", "rbac.authorization.k8s.io", "roles").await);
    // The voice pods get no API access, so the operator grants none and holds none.
    assert!(!can("create", "rbac.authorization.k8s.io", "roles").await);
    assert!(!can("create", "rbac.authorization.k8s.io", "rolebindings").await);
    // Pods: read (load poller) and patched (deletion cost, eviction guards) only.
    assert!(can("patch", "", "pods").await);
}

#[tokio::test]
async fn operator_metrics_endpoint_passes_promtool_check_metrics() {
    // Proves the operator's `/metrics` (its real web app, scraped over HTTP after
    // reconciles that succeeded and one that failed on an unreachable Twilio, so every
    // family has samples) passes Prometheus' naming and help-text lint.
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use voice_operator::web::{WebState, app};

    let (_cp, ns, client, op) = setup("op-metrics").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona_doc("sam", "Hi!")).await;
    apply_json(&client, &ns, twilio_vd("desk", "+14155550123")).await;
    let errors = op
        .metrics
        .reconcile_errors
        .with_label_values(&["VoiceDeployment", "twilio"]);
    eventually("a reconcile failed on Twilio", || async {
        (errors.get() > 0).then_some(())
    })
    .await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let web = app(WebState {
        metrics: op.metrics.clone(),
        ready: Arc::new(AtomicBool::new(true)),
    });
    let server = tokio::spawn(async move { axum::serve(listener, web).await });
    let body = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    server.abort();
    for family in [
        "operator_reconcile_duration_seconds_bucket{",
        "operator_reconcile_errors_total{",
        "operator_reconciles_total{",
        "operator_leader ",
    ] {
        assert!(body.contains(family), "{family} missing from:\n{body}");
    }
    let run = tokio::task::spawn_blocking(move || {
        callmeback_tests::prometheus_tools::Promtool::get()
            .unwrap()
            .check_metrics(&body)
            .unwrap()
    })
    .await
    .unwrap();
    assert!(run.success, "promtool check metrics:\n{}", run.output);
    op.stop().await;
}
