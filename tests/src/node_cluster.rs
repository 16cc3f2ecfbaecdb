//! The product installed on the real test node (`controlplane::shared_with_node`),
//! as a user installs it: `helm install` of the chart (the operator as a real pod
//! holding the leader Lease), then the examples' Secret, Personas and
//! VoiceDeployment. Shared by the real-node tests (`node_e2e`, `node_scaling`).
//!
//! The helpers panic with what they saw: they run inside tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use callmeback_api::VoiceDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::Value;

use crate::call_harness::Caller;
use crate::controlplane::ControlPlane;
use crate::controlplane::node::Node;
use crate::emulators::twilio_numbers::TwilioNumbersEmulator;
use crate::helm::{Helm, chart_dir, kubectl, repo_root};

/// Pod start on the loaded 2-core machine takes seconds (image unpack,
/// sandbox, probes every few seconds); this is a generous upper bound.
pub const WAIT: Duration = Duration::from_secs(180);

/// The tests of every real-node binary share one node of 2 CPUs; each brings up
/// an operator and voice pods, so the tests of one binary take turns (binaries
/// run one after another under `cargo test`).
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A file of `examples/`.
pub fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

/// A YAML file as JSON.
pub fn yaml(path: &PathBuf) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Polls `check` until it passes, panicking with its last reason after `wait`.
pub async fn eventually_within<T, F, Fut>(wait: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + wait;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if Instant::now() > deadline => panic!("{what} (after {wait:?}): {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// [`eventually_within`] [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    eventually_within(WAIT, what, check).await
}

/// The pod ran on the real node, its containers run and the kubelet marked
/// it Ready (only the kubelet sets these fields on a real node).
pub fn ready_on_node(pod: &Pod, node: &str) -> Result<(), String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec_node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    if spec_node != node {
        return Err(format!("pod {name} is on node {spec_node:?}, not {node}"));
    }
    let status = pod
        .status
        .as_ref()
        .ok_or(format!("pod {name}: no status"))?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let containers = status.container_statuses.clone().unwrap_or_default();
    let running = !containers.is_empty()
        && containers
            .iter()
            .all(|c| c.ready && c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
    if ready && running {
        Ok(())
    } else {
        Err(format!(
            "pod {name}: phase {:?}, Ready {ready}, containers {:?}",
            status.phase,
            containers
                .iter()
                .map(|c| (c.name.clone(), c.ready, c.restart_count, c.state.clone()))
                .collect::<Vec<_>>()
        ))
    }
}

/// Pods of `ns` matching a label selector.
pub async fn pods_with(cp: &ControlPlane, ns: &str, selector: &str) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(cp.client(), ns);
    pods.list(&ListParams::default().labels(selector))
        .await
        .map(|list| list.items)
        .map_err(|e| e.to_string())
}

/// What [`install_examples`] brought up.
pub struct Installed {
    /// The namespace (also the Helm release name).
    pub ns: String,
    /// Serves the operator's Twilio numbers API while the test runs.
    pub twilio: TwilioNumbersEmulator,
    /// The example's Twilio numbers.
    pub numbers: Vec<String>,
    /// The VoiceDeployment's name.
    pub vd_name: String,
    /// Its `publicUrl`.
    pub public_url: String,
    /// Label selector of its voice pods (and Deployment and Service).
    pub voice_selector: String,
    /// Label selector of the operator's pod.
    pub operator_selector: String,
}

/// `helm install` of the chart (operator image, Twilio numbers API on the
/// host end of the bridge), then the examples' personas and VoiceDeployment
/// (edited by `edit_vd` first) with a Secret holding `secret`; returns once the
/// VoiceDeployment is Available with `ready` voice pods the kubelet marked Ready.
pub async fn install_examples(
    cp: &ControlPlane,
    node: &Node,
    prefix: &str,
    secret: BTreeMap<String, String>,
    edit_vd: impl FnOnce(&mut Value),
    ready: usize,
) -> Installed {
    let ns = cp.new_namespace(prefix).await;
    let release = ns.clone();
    let twilio = TwilioNumbersEmulator::start_on(
        node.host_address(),
        &secret["TWILIO_ACCOUNT_SID"],
        &secret["TWILIO_AUTH_TOKEN"],
    )
    .await
    .expect("twilio numbers emulator on the bridge address");
    let mut vd_example = yaml(&example("voicedeployment.yaml"));
    edit_vd(&mut vd_example);
    let numbers: Vec<String> = vd_example["spec"]["twilio"]["phoneNumbers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for number in &numbers {
        twilio.add_number(
            number,
            "https://old.example.com/voice",
            "https://old.example.com/status",
        );
    }

    let helm = Helm::with_kubeconfig(cp.kubeconfig_path()).expect("helm");
    helm.run([
        "install".to_owned(),
        release.clone(),
        chart_dir().display().to_string(),
        "--namespace".to_owned(),
        ns.clone(),
        "--take-ownership".to_owned(),
        "--set".to_owned(),
        format!("operator.twilioApiUrl={}", twilio.base_url()),
        "--set".to_owned(),
        format!("operator.watchNamespace={ns}"),
        // helm returns once the operator's Deployment is available, which on
        // this node means the kubelet saw /readyz answer.
        "--wait".to_owned(),
        "--timeout".to_owned(),
        "3m".to_owned(),
    ])
    .unwrap_or_else(|e| panic!("helm install: {e}"));

    let operator_selector =
        format!("app.kubernetes.io/name=callmeback,app.kubernetes.io/instance={release}");
    let operator_pod = eventually("the operator pod Ready on the real node", || async {
        let pods = pods_with(cp, &ns, &operator_selector).await?;
        let [pod] = pods.as_slice() else {
            return Err(format!("{} operator pods", pods.len()));
        };
        ready_on_node(pod, node.name())?;
        Ok(pod.metadata.name.clone().unwrap_or_default())
    })
    .await;

    let leases: Api<Lease> = Api::namespaced(cp.client(), &ns);
    let lease_name = format!("{release}-callmeback-leader");
    eventually("the operator pod holds the leader Lease", || async {
        let lease = leases
            .get_opt(&lease_name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or(format!("no Lease {lease_name}"))?;
        let holder = lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        (holder == operator_pod)
            .then_some(())
            .ok_or(format!("holder {holder:?}, operator pod {operator_pod}"))
    })
    .await;

    let secret_name = yaml(&example("secret.yaml"))["metadata"]["name"]
        .as_str()
        .expect("the example Secret has a name")
        .to_owned();
    let secret_object: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": secret_name },
        "stringData": secret,
    }))
    .expect("a Secret");
    Api::<Secret>::namespaced(cp.client(), &ns)
        .create(&PostParams::default(), &secret_object)
        .await
        .unwrap_or_else(|e| panic!("creating the Secret: {e}"));
    // Unique per writer: tests of several binaries may install at once.
    let vd_file = tempfile::Builder::new()
        .prefix("voicedeployment-")
        .suffix(".json")
        .tempfile()
        .expect("a temp file for the VoiceDeployment");
    std::fs::write(vd_file.path(), vd_example.to_string()).expect("writing the VoiceDeployment");
    let mut apply = vec!["apply".to_owned(), "--namespace".to_owned(), ns.clone()];
    for file in [
        example("persona.yaml"),
        example("persona-night-librarian.yaml"),
        vd_file.path().to_path_buf(),
    ] {
        apply.push("-f".to_owned());
        apply.push(file.display().to_string());
    }
    kubectl(cp.kubeconfig_path(), &apply).unwrap_or_else(|e| panic!("applying examples/: {e}"));

    let vd_name = vd_example["metadata"]["name"]
        .as_str()
        .expect("the example VoiceDeployment has a name")
        .to_owned();
    let public_url = vd_example["spec"]["publicUrl"]
        .as_str()
        .expect("the example VoiceDeployment has a publicUrl")
        .to_owned();
    let voice_selector = format!("callmeback.dev/voice-deployment={vd_name}");
    wait_available_with_ready_pods(cp, node, &ns, &vd_name, &voice_selector, ready).await;
    Installed {
        ns,
        twilio,
        numbers,
        vd_name,
        public_url,
        voice_selector,
        operator_selector,
    }
}

/// Waits for the VoiceDeployment's `Available` and exactly `want` Ready,
/// running voice pods (none terminating) on the real node; returns them.
pub async fn wait_available_with_ready_pods(
    cp: &ControlPlane,
    node: &Node,
    ns: &str,
    vd_name: &str,
    voice_selector: &str,
    want: usize,
) -> Vec<Pod> {
    let vds: Api<VoiceDeployment> = Api::namespaced(cp.client(), ns);
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), ns);
    eventually(
        &format!("the VoiceDeployment Available with {want} voice pods Ready on the real node"),
        || async {
            let vd = vds.get(vd_name).await.map_err(|e| e.to_string())?;
            let available = vd.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Available" && c.status == "True")
            });
            if !available {
                return Err(format!("VoiceDeployment status {:?}", vd.status));
            }
            let deps = deployments
                .list(&ListParams::default().labels(voice_selector))
                .await
                .map_err(|e| e.to_string())?;
            let [deployment] = deps.items.as_slice() else {
                return Err(format!("{} voice Deployments", deps.items.len()));
            };
            let ready = deployment
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            if usize::try_from(ready).ok() != Some(want) {
                return Err(format!("{ready} ready voice replicas"));
            }
            let pods = pods_with(cp, ns, voice_selector).await?;
            if pods.len() != want || pods.iter().any(|p| p.metadata.deletion_timestamp.is_some()) {
                return Err(format!("{} voice pods, some terminating", pods.len()));
            }
            for pod in &pods {
                ready_on_node(pod, node.name())?;
            }
            Ok(pods)
        },
    )
    .await
}

/// The voice Service's ClusterIP URL (port `http`), routed by kube-proxy.
pub async fn voice_service_url(cp: &ControlPlane, installed: &Installed) -> String {
    let services: Api<Service> = Api::namespaced(cp.client(), &installed.ns);
    let list = services
        .list(&ListParams::default().labels(&installed.voice_selector))
        .await
        .unwrap_or_else(|e| panic!("listing voice Services: {e}"));
    let [service] = list.items.as_slice() else {
        panic!("{} voice Services", list.items.len());
    };
    let spec = service.spec.clone().unwrap_or_default();
    let ip = spec
        .cluster_ip
        .clone()
        .expect("the voice Service has a ClusterIP");
    let port = spec
        .ports
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some("http"))
        .map(|p| p.port)
        .expect("the voice Service has an http port");
    let url = format!("http://{ip}:{port}");
    // Pods Ready is not yet the Service routing: kube-proxy programs the
    // ClusterIP's endpoints after it sees them. A first call placed before that
    // failed its webhook POST (seen in CI); any HTTP answer proves the route.
    let http = reqwest::Client::new();
    eventually("the voice Service's ClusterIP routes to a pod", || async {
        http.get(format!("{url}/"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    url
}

/// One pod's `GET /load` (metrics port, at its pod IP).
pub async fn pod_load(pod: &Pod) -> Result<Value, String> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or("no pod IP")?;
    reqwest::Client::new()
        .get(format!("http://{ip}:9090/load"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json::<Value>()
        .await
        .map_err(|e| e.to_string())
}

/// The calls a pod is carrying, from its `/load`.
pub async fn active_calls(pod: &Pod) -> Result<u64, String> {
    let load = pod_load(pod).await?;
    load["activeCalls"]
        .as_u64()
        .ok_or(format!("no activeCalls in {load}"))
}

/// Hears the greeting, then says each line and hears its answer.
pub async fn talk(caller: &mut Caller, script: &[String], what: &str) -> Result<(), String> {
    let greeting = caller
        .listen(Duration::from_secs(20), Duration::from_millis(500))
        .await
        .map_err(|e| format!("{what}: listening for the greeting: {e}"))?;
    if greeting.is_none() {
        return Err(format!("{what}: no greeting"));
    }
    say_each(caller, script, what).await
}

/// Says each line and hears its answer.
pub async fn say_each(caller: &mut Caller, script: &[String], what: &str) -> Result<(), String> {
    for line in script {
        caller
            .say(line)
            .await
            .map_err(|e| format!("{what}: saying {line:?}: {e}"))?;
        let reply = caller
            .listen(Duration::from_secs(20), Duration::from_millis(600))
            .await
            .map_err(|e| format!("{what}: listening after {line:?}: {e}"))?;
        if reply.is_none() {
            return Err(format!("{what}: no reply to {line:?}"));
        }
    }
    Ok(())
}
