//! The product on a real Kubernetes node (`controlplane::shared_with_node`):
//! containerd runs the images `scripts/node-images.sh` built from this
//! build's binaries, the kubelet calls the probes, kube-proxy routes the
//! `kubernetes` Service. `helm install` of the chart runs the operator as a
//! real pod; it takes the leader Lease and brings up the example's voice pods.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callmeback_tests::call_harness::{
    Caller, Emulators, ProviderProfile, lines, table, table_replies,
};
use callmeback_tests::controlplane::node::Node;
use callmeback_tests::controlplane::{self, ControlPlane};
use callmeback_tests::emulators::twilio_numbers::TwilioNumbersEmulator;
use callmeback_tests::helm::{Helm, chart_dir, kubectl, repo_root};
use callmeback_tests::twilio_sim::TwilioSim;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::Value;
use voice_operator::crd::VoiceDeployment;

/// The tests of this binary share one node of 2 CPUs; each brings up an
/// operator and 2 voice pods, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Pod start on the loaded 2-core machine takes seconds (image unpack,
/// sandbox, probes every few seconds); this is a generous upper bound.
const WAIT: Duration = Duration::from_secs(180);

fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

fn yaml(path: &PathBuf) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Polls `check` until it passes, panicking with its last reason after `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if Instant::now() > deadline => panic!("{what} (after {WAIT:?}): {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The pod ran on the real node, its containers run and the kubelet marked
/// it Ready (only the kubelet sets these fields on a real node).
fn ready_on_node(pod: &Pod, node: &str) -> Result<(), String> {
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

async fn pods_with(cp: &ControlPlane, ns: &str, selector: &str) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(cp.client(), ns);
    pods.list(&ListParams::default().labels(selector))
        .await
        .map(|list| list.items)
        .map_err(|e| e.to_string())
}

/// What [`install_examples`] brought up.
struct Installed {
    ns: String,
    /// Serves the operator's Twilio numbers API while the test runs.
    _twilio: TwilioNumbersEmulator,
    numbers: Vec<String>,
    vd_name: String,
    public_url: String,
    voice_selector: String,
}

/// `helm install` of the chart (operator image, Twilio numbers API on the
/// host end of the bridge), then the examples' personas and VoiceDeployment
/// with a Secret holding `secret`; returns once the VoiceDeployment is
/// Available with 2 voice pods the kubelet marked Ready.
async fn install_examples(
    cp: &ControlPlane,
    node: &Node,
    prefix: &str,
    secret: BTreeMap<String, String>,
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
    let vd_example = yaml(&example("voicedeployment.yaml"));
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
        // On by default only with 2+ replicas; the Lease is what is proven here.
        "--set".to_owned(),
        "leaderElection.enabled=true".to_owned(),
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
    let mut apply = vec!["apply".to_owned(), "--namespace".to_owned(), ns.clone()];
    for file in [
        "persona.yaml",
        "persona-night-librarian.yaml",
        "voicedeployment.yaml",
    ] {
        apply.push("-f".to_owned());
        apply.push(example(file).display().to_string());
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
    wait_available_with_two_ready_pods(cp, node, &ns, &vd_name, &voice_selector).await;
    Installed {
        ns,
        _twilio: twilio,
        numbers,
        vd_name,
        public_url,
        voice_selector,
    }
}

/// Waits for the VoiceDeployment's `Available` and 2 Ready, running voice
/// pods (none terminating) on the real node; returns their names.
async fn wait_available_with_two_ready_pods(
    cp: &ControlPlane,
    node: &Node,
    ns: &str,
    vd_name: &str,
    voice_selector: &str,
) -> Vec<Pod> {
    let vds: Api<VoiceDeployment> = Api::namespaced(cp.client(), ns);
    let deployments: Api<Deployment> = Api::namespaced(cp.client(), ns);
    eventually(
        "the VoiceDeployment Available with 2 voice pods Ready on the real node",
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
            if ready != 2 {
                return Err(format!("{ready} ready voice replicas"));
            }
            let pods = pods_with(cp, ns, voice_selector).await?;
            if pods.len() != 2 || pods.iter().any(|p| p.metadata.deletion_timestamp.is_some()) {
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
async fn voice_service_url(cp: &ControlPlane, installed: &Installed) -> String {
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
    format!("http://{ip}:{port}")
}

/// `voice_active_calls` summed over one pod's series, scraped at its pod IP.
async fn active_calls(pod: &Pod) -> Result<f64, String> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or("no pod IP")?;
    let body = reqwest::Client::new()
        .get(format!("http://{ip}:9090/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("voice_active_calls"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Hears the greeting, then says each line and hears its answer.
async fn talk(caller: &mut Caller, script: &[String], what: &str) {
    let greeting = caller
        .listen(Duration::from_secs(20), Duration::from_millis(500))
        .await
        .unwrap_or_else(|e| panic!("{what}: listening for the greeting: {e}"));
    assert!(greeting.is_some(), "{what}: no greeting");
    say_each(caller, script, what).await;
}

/// Says each line and hears its answer.
async fn say_each(caller: &mut Caller, script: &[String], what: &str) {
    for line in script {
        caller
            .say(line)
            .await
            .unwrap_or_else(|e| panic!("{what}: saying {line:?}: {e}"));
        let reply = caller
            .listen(Duration::from_secs(20), Duration::from_millis(600))
            .await
            .unwrap_or_else(|e| panic!("{what}: listening after {line:?}: {e}"));
        assert!(reply.is_some(), "{what}: no reply to {line:?}");
    }
}

#[tokio::test]
async fn calls_through_the_voice_service_complete_and_a_deleted_pod_finishes_its_live_call() {
    // Proves on a real node: a simulated Twilio call placed at the voice
    // Service's ClusterIP (kube-proxy) completes a whole conversation with a
    // barge-in; when the pod carrying a live call is deleted (real preStop,
    // SIGTERM, readiness false), that call runs to its end, the next call
    // lands on the other pod, and the Deployment replaces the deleted pod.
    let _turn = ONE_AT_A_TIME.lock().await;
    let cp = controlplane::shared_with_node().await;
    let node = cp.node().expect("a control plane started with a real node");

    let long = "We make chocolate cake, lemon cake and carrot cake every day. \
                The chocolate one is the most popular and sells out by noon. \
                On weekends we also bake a cheesecake with fresh berries on top.";
    let script = lines(&[
        "Hello, who is this?",
        "Tell me about your cakes.",
        "Actually what about cookies?",
        "Do you deliver on Sundays?",
        "Thanks, goodbye.",
    ]);
    let replies = table_replies(
        table(&[
            ("who", "It's Maya, your rescue line."),
            ("cakes", long),
            ("cookies", "We have chocolate chip cookies."),
            ("Sundays", "Yes, every Sunday morning."),
            ("goodbye", "Bye now!"),
        ]),
        "Sorry?".into(),
        Arc::new(Mutex::new(Vec::new())),
    );
    // The Deepgram emulator transcribes each call's utterances as the
    // script's lines, from the first, per call.
    let emulators = Emulators::start_on(
        node.host_address().into(),
        script.clone(),
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .expect("provider emulators on the bridge address");
    let account_sid = "AC0123456789abcdef0123456789abcdef".to_owned();
    let auth_token = "node-e2e-auth-token".to_owned();
    let mut secret: BTreeMap<String, String> = emulators.env().into_iter().collect();
    secret.insert("TWILIO_ACCOUNT_SID".into(), account_sid.clone());
    secret.insert("TWILIO_AUTH_TOKEN".into(), auth_token.clone());
    let installed = install_examples(cp, node, "node-call", secret).await;
    let from = "+14155550123";
    let to = installed
        .numbers
        .first()
        .expect("the example VoiceDeployment has a number")
        .clone();
    let sim = TwilioSim::new(
        &voice_service_url(cp, &installed).await,
        &installed.public_url,
        &account_sid,
        &auth_token,
    );

    // A whole conversation through the ClusterIP: greeting, 4 turns, a barge-in.
    let mut caller = Caller::dial(&sim, from, &to)
        .await
        .expect("dialling through the voice Service");
    talk(&mut caller, &script[..1], "call 1").await;
    caller.say(&script[1]).await.expect("call 1: cakes");
    caller
        .interrupt_after(
            Duration::from_millis(2000),
            &script[2],
            Duration::from_secs(20),
        )
        .await
        .expect("call 1: barge-in");
    assert!(
        caller
            .listen(Duration::from_secs(20), Duration::from_millis(600))
            .await
            .expect("call 1: listening after the barge-in")
            .is_some(),
        "call 1: no answer after the barge-in"
    );
    for line in &script[3..] {
        caller.say(line).await.expect("call 1: saying a line");
        assert!(
            caller
                .listen(Duration::from_secs(20), Duration::from_millis(600))
                .await
                .expect("call 1: listening")
                .is_some(),
            "call 1: no reply to {line:?}"
        );
    }
    caller.hang_up().await.expect("call 1: hang up");
    assert!(
        caller.clears() >= 1,
        "call 1: the barge-in cleared Twilio's audio"
    );

    // Call 2 stays live while its pod is deleted.
    let mut live = Caller::dial(&sim, from, &to)
        .await
        .expect("dialling call 2");
    talk(&mut live, &script[..1], "call 2 before the deletion").await;
    let pods = pods_with(cp, &installed.ns, &installed.voice_selector)
        .await
        .expect("listing voice pods");
    let mut busy = None;
    for pod in &pods {
        if active_calls(pod).await.unwrap_or(0.0) >= 1.0 {
            busy = pod.metadata.name.clone();
        }
    }
    let busy = busy.expect("one voice pod reports the live call");
    kubectl(
        cp.kubeconfig_path(),
        [
            "delete",
            "pod",
            "--namespace",
            installed.ns.as_str(),
            busy.as_str(),
            "--wait=false",
        ],
    )
    .unwrap_or_else(|e| panic!("kubectl delete pod {busy}: {e}"));

    // The deleted pod keeps serving its live call to the end...
    say_each(&mut live, &script[1..], "call 2 after the deletion").await;
    live.hang_up().await.expect("call 2: hang up");
    // ...and a new call lands on the other pod, not on the draining one.
    let mut next = Caller::dial(&sim, from, &to)
        .await
        .expect("dialling call 3");
    talk(&mut next, &script[..1], "call 3").await;
    let pods = pods_with(cp, &installed.ns, &installed.voice_selector)
        .await
        .expect("listing voice pods");
    let mut carriers = Vec::new();
    for pod in &pods {
        if active_calls(pod).await.unwrap_or(0.0) >= 1.0 {
            carriers.push(pod.metadata.name.clone().unwrap_or_default());
        }
    }
    assert!(
        carriers.len() == 1 && carriers[0] != busy,
        "call 3 is carried by {carriers:?}, the deleted pod was {busy}"
    );
    next.hang_up().await.expect("call 3: hang up");

    let after = wait_available_with_two_ready_pods(
        cp,
        node,
        &installed.ns,
        &installed.vd_name,
        &installed.voice_selector,
    )
    .await;
    assert!(
        after
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some(busy.as_str())),
        "the Deployment replaced the deleted pod {busy}"
    );
}
