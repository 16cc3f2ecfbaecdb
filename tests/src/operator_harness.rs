//! The operator's real controller loop against the shared test control plane, for
//! controller tests: the generated CRDs installed once per test binary, a namespace
//! per test, and an operator that holds exactly the chart's rules (a ServiceAccount
//! token, never admin). `tests/tests/operator_controller.rs` carries its own copy of
//! these helpers from before this module; new controller test files use this one.

use std::future::Future;
use std::time::{Duration, Instant};

use callmeback_api::{Persona, VoiceDeployment};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use voice_operator::context::Config;
use voice_operator::controller;
use voice_operator::metrics::Metrics;

use crate::controlplane::{self, ControlPlane};

/// How long [`eventually`] waits: the operator reacts within a second or two on an
/// idle machine; 60 s leaves far more than 2x headroom on a loaded 2-core CI box.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Where an operator without a Twilio emulator sends Twilio requests: a closed port.
pub const NO_TWILIO: &str = "http://127.0.0.1:9";

/// A path in the repository.
pub fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The YAML documents of a repository file.
pub fn yaml_docs(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str_multiple(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Polls `f` every 200 ms until it returns `Some`; panics after [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
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

/// Installs the generated CRDs once per test binary and waits until they serve.
pub async fn install_crds(cp: &ControlPlane) {
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

/// A running operator; cancelled on drop, awaited by [`Operator::stop`].
pub struct Operator {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Its metrics (reconcile counters).
    pub metrics: Metrics,
}

impl Operator {
    /// Stops the controllers and waits (bounded) for them to finish.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
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

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    }
}

fn operator_subject(ns: &str) -> Vec<Subject> {
    vec![Subject {
        kind: "ServiceAccount".into(),
        name: "operator".into(),
        namespace: Some(ns.into()),
        api_group: None,
    }]
}

/// A client holding exactly the chart's operator rules in cluster-wide mode
/// (ClusterRole + binding to a ServiceAccount in `ns`, the Lease Role in `ns`).
pub async fn operator_client(cp: &ControlPlane, ns: &str) -> Client {
    Client::try_from(operator_config(cp, ns).await).expect("operator kube client")
}

/// The client configuration of [`operator_client`].
pub async fn operator_config(cp: &ControlPlane, ns: &str) -> kube::Config {
    let admin = cp.client();
    let lease = "operator-leader-election";
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta(lease),
                rules: Some(chart_rules("operator-leader-election-rules.yaml")),
            },
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta(lease),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: lease.into(),
                },
                subjects: Some(operator_subject(ns)),
            },
        )
        .await
        .unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta("operator"),
                ..ServiceAccount::default()
            },
        )
        .await
        .unwrap();
    let name = format!("callmeback-operator-{ns}");
    Api::<ClusterRole>::all(admin.clone())
        .create(
            &PostParams::default(),
            &ClusterRole {
                metadata: meta(&name),
                rules: Some(chart_rules("operator-rules.yaml")),
                ..ClusterRole::default()
            },
        )
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(admin)
        .create(
            &PostParams::default(),
            &ClusterRoleBinding {
                metadata: meta(&name),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: name.clone(),
                },
                subjects: Some(operator_subject(ns)),
            },
        )
        .await
        .unwrap();
    cp.config_for_service_account(ns, "operator").await
}

/// Starts a namespace-scoped operator in `ns` with the chart's rules.
pub async fn start_operator(cp: &ControlPlane, ns: &str) -> Operator {
    let client = operator_client(cp, ns).await;
    run_operator(client, ns)
}

/// Starts another operator in `ns` under the identity [`start_operator`] set up
/// (an operator restart: nothing but the cluster's objects carries over).
pub async fn restart_operator(cp: &ControlPlane, ns: &str) -> Operator {
    run_operator(cp.client_for_service_account(ns, "operator").await, ns)
}

fn run_operator(client: Client, ns: &str) -> Operator {
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let config = Config {
        namespace: Some(ns.into()),
        twilio_restore_deadline: Duration::from_secs(5),
        twilio_api_url: NO_TWILIO.into(),
        concurrency: 4,
        instance: Some("test".into()),
        // kwok pods have no /load: their load stays unknown, which scales nothing.
        poller: voice_operator::autoscale::poller::PollerConfig::default(),
        ..Config::default()
    };
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

/// The shared control plane with the CRDs, a fresh namespace, the admin client and
/// a running operator.
pub async fn setup(prefix: &str) -> (&'static ControlPlane, String, Client, Operator) {
    let cp = controlplane::shared().await;
    install_crds(cp).await;
    let ns = cp.new_namespace(prefix).await;
    let op = start_operator(cp, &ns).await;
    (cp, ns, cp.client(), op)
}

/// Server-side applies a Persona, VoiceDeployment or Secret document (as `kubectl`).
pub async fn apply_json(client: &Client, ns: &str, doc: serde_json::Value) {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    try_apply_json(client, ns, doc)
        .await
        .unwrap_or_else(|e| panic!("applying {kind}/{name}: {e}"));
}

/// [`apply_json`], returning the apiserver's refusal instead of panicking.
pub async fn try_apply_json(
    client: &Client,
    ns: &str,
    doc: serde_json::Value,
) -> Result<(), kube::Error> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pp = PatchParams::apply("kubectl").force();
    match kind.as_str() {
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
    }
}

/// The example Secret (placeholder values: the operator only checks the keys exist).
pub fn secret_doc() -> serde_json::Value {
    yaml_docs("examples/secret.yaml").remove(0)
}

/// `name` in `ns`, or `None` when absent.
pub async fn get<K>(client: &Client, ns: &str, name: &str) -> Option<K>
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
