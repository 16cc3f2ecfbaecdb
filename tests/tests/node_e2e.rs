//! The product on a real Kubernetes node (`controlplane::shared_with_node`):
//! containerd runs the images `scripts/node-images.sh` built from this
//! build's binaries, the kubelet calls the probes, kube-proxy routes the
//! `kubernetes` Service. `helm install` of the chart runs the operator as a
//! real pod; it takes the leader Lease and brings up the example's voice pods;
//! `helm upgrade` hands that Lease to the new operator pod without a moment of two.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_tests::call_harness::{
    Caller, Emulators, ProviderProfile, lines, table, table_replies,
};
use callmeback_tests::controlplane;
use callmeback_tests::controlplane::node::Node;
use callmeback_tests::helm::{Helm, chart_dir, kubectl};
use callmeback_tests::node_cluster::{
    Installed, ONE_AT_A_TIME, active_calls, eventually, example, install_examples, pods_with,
    say_each, talk, voice_service_url, wait_available_with_ready_pods, yaml,
};
use callmeback_tests::twilio_sim::TwilioSim;

/// The example Secret's Twilio account (the numbers emulator checks it).
const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
const AUTH_TOKEN: &str = "node-e2e-auth-token";

/// Provider emulators on the node's bridge (the Deepgram one transcribes each
/// call's utterances as `script`, from the first; the model answers by `answers`'
/// keywords), and the Secret the example VoiceDeployment reads: their URLs plus the
/// Twilio account. Keep the emulators for as long as the pods call them.
async fn emulators_and_secret(
    node: &Node,
    script: &[String],
    answers: &[(&str, &str)],
) -> (Emulators, BTreeMap<String, String>) {
    let replies = table_replies(
        table(answers),
        "Sorry?".into(),
        Arc::new(Mutex::new(Vec::new())),
    );
    let emulators = Emulators::start_on(
        node.host_address().into(),
        script.to_vec(),
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .expect("provider emulators on the bridge address");
    let mut secret: BTreeMap<String, String> = emulators.env().into_iter().collect();
    secret.insert("TWILIO_ACCOUNT_SID".into(), ACCOUNT_SID.into());
    secret.insert("TWILIO_AUTH_TOKEN".into(), AUTH_TOKEN.into());
    (emulators, secret)
}

/// Simulated Twilio placing calls to the example's first number through the voice
/// Service's ClusterIP (kube-proxy), and that number.
async fn twilio_toward(
    cp: &callmeback_tests::controlplane::ControlPlane,
    installed: &Installed,
) -> (TwilioSim, String) {
    let to = installed
        .numbers
        .first()
        .expect("the example VoiceDeployment has a number")
        .clone();
    let sim = TwilioSim::new(
        &voice_service_url(cp, installed).await,
        &installed.public_url,
        ACCOUNT_SID,
        AUTH_TOKEN,
    );
    (sim, to)
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
    let (_emulators, secret) = emulators_and_secret(
        node,
        &script,
        &[
            ("who", "It's Maya, your rescue line."),
            ("cakes", long),
            ("cookies", "We have chocolate chip cookies."),
            ("Sundays", "Yes, every Sunday morning."),
            ("goodbye", "Bye now!"),
        ],
    )
    .await;
    let installed = install_examples(cp, node, "node-call", secret, |_| {}, 2).await;
    let from = "+14155550123";
    let (sim, to) = twilio_toward(cp, &installed).await;

    // A whole conversation through the ClusterIP: greeting, 4 turns, a barge-in.
    let mut caller = Caller::dial(&sim, from, &to)
        .await
        .expect("dialling through the voice Service");
    talk(&mut caller, &script[..1], "call 1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
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
    talk(&mut live, &script[..1], "call 2 before the deletion")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = pods_with(cp, &installed.ns, &installed.voice_selector)
        .await
        .expect("listing voice pods");
    let mut busy = None;
    for pod in &pods {
        if active_calls(pod).await.unwrap_or(0) >= 1 {
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
    say_each(&mut live, &script[1..], "call 2 after the deletion")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    live.hang_up().await.expect("call 2: hang up");
    // ...and a new call lands on the other pod, not on the draining one.
    let mut next = Caller::dial(&sim, from, &to)
        .await
        .expect("dialling call 3");
    talk(&mut next, &script[..1], "call 3")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = pods_with(cp, &installed.ns, &installed.voice_selector)
        .await
        .expect("listing voice pods");
    let mut carriers = Vec::new();
    for pod in &pods {
        if active_calls(pod).await.unwrap_or(0) >= 1 {
            carriers.push(pod.metadata.name.clone().unwrap_or_default());
        }
    }
    assert!(
        carriers.len() == 1 && carriers[0] != busy,
        "call 3 is carried by {carriers:?}, the deleted pod was {busy}"
    );
    next.hang_up().await.expect("call 3: hang up");

    let after = wait_available_with_ready_pods(
        cp,
        node,
        &installed.ns,
        &installed.vd_name,
        &installed.voice_selector,
        2,
    )
    .await;
    assert!(
        after
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some(busy.as_str())),
        "the Deployment replaced the deleted pod {busy}"
    );
}

/// Whether an operator pod says it leads (`operator_leader` on its :8080/metrics);
/// `None` when it does not answer (starting, or gone).
async fn leads(pod: &k8s_openapi::api::core::v1::Pod) -> Option<bool> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let text = reqwest::Client::new()
        .get(format!("http://{ip}:8080/metrics"))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("operator_leader "))
        .map(|v| v.trim() == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helm_upgrade_hands_the_lease_over_without_two_acting_operators_or_a_cut_call() {
    // Proves on a real node: `helm upgrade` to a new operator image tag rolls the
    // operator Deployment (the default rolling update starts the new pod before
    // the old one stops), yet
    // at no moment do two operator pods lead: the new pod waits, Ready and idle,
    // until the old one stops acting and hands the Lease over on SIGTERM. A call
    // through the voice pods stays up across it, and the new operator then acts
    // (a persona edit reaches the pods' ConfigMap).
    let _turn = ONE_AT_A_TIME.lock().await;
    let cp = controlplane::shared_with_node().await;
    let node = cp.node().expect("a control plane started with a real node");
    let script = lines(&[
        "Hello, who is this?",
        "Tell me about your cakes.",
        "Thanks, goodbye.",
    ]);
    let (_emulators, secret) = emulators_and_secret(
        node,
        &script,
        &[
            ("who", "It's Maya, your rescue line."),
            ("cakes", "Chocolate, lemon and carrot, every day."),
            ("goodbye", "Bye now!"),
        ],
    )
    .await;
    let installed = install_examples(cp, node, "node-upgrade", secret, |_| {}, 2).await;
    let ns = installed.ns.clone();
    let operator_pods = || async {
        pods_with(cp, &ns, &installed.operator_selector)
            .await
            .unwrap_or_default()
    };
    let old = operator_pods().await;
    let [old] = old.as_slice() else {
        panic!("{} operator pods before the upgrade", old.len());
    };
    let old_name = old.metadata.name.clone().unwrap_or_default();

    // A call is live while the operator is upgraded.
    let (sim, to) = twilio_toward(cp, &installed).await;
    let mut live = Caller::dial(&sim, "+14155550124", &to)
        .await
        .expect("dialling the live call");
    talk(&mut live, &script[..1], "the live call before the upgrade")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Every 100 ms: which operator pods exist and which of them say they lead.
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = stop.clone();
        let ns = ns.clone();
        let selector = installed.operator_selector.clone();
        tokio::spawn(async move {
            let mut samples: Vec<Vec<(String, Option<bool>)>> = Vec::new();
            while !stop.is_cancelled() {
                let pods = pods_with(cp, &ns, &selector).await.unwrap_or_default();
                let answers = futures::future::join_all(pods.iter().map(leads)).await;
                samples.push(
                    pods.iter()
                        .map(|p| p.metadata.name.clone().unwrap_or_default())
                        .zip(answers)
                        .collect(),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };

    let app_version = yaml(&chart_dir().join("Chart.yaml"))["appVersion"]
        .as_str()
        .expect("the chart has an appVersion")
        .to_owned();
    let next_tag = format!("{app_version}-next");
    // helm blocks: off the runtime, so the sampler keeps sampling meanwhile.
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    let started = std::time::Instant::now();
    let upgrade = vec![
        "upgrade".to_owned(),
        ns.clone(),
        chart_dir().display().to_string(),
        "--namespace".to_owned(),
        ns.clone(),
        "--reuse-values".to_owned(),
        // A new release's operator image (scripts/node-images.sh imports the same
        // binary under this tag): the Deployment rolls.
        "--set".to_owned(),
        format!("image.tag={next_tag}"),
        "--wait".to_owned(),
        "--timeout".to_owned(),
        "3m".to_owned(),
    ];
    tokio::task::spawn_blocking(move || Helm::with_kubeconfig(kubeconfig)?.run(upgrade))
        .await
        .expect("the helm task")
        .unwrap_or_else(|e| panic!("helm upgrade: {e}"));
    let new_name = eventually(
        "one new operator pod leads, the old one is gone",
        || async {
            let pods = operator_pods().await;
            let [pod] = pods.as_slice() else {
                return Err(format!("{} operator pods", pods.len()));
            };
            let name = pod.metadata.name.clone().unwrap_or_default();
            if name == old_name {
                return Err("still the old pod".into());
            }
            match leads(pod).await {
                Some(true) => Ok(name),
                other => Err(format!("{name} leads: {other:?}")),
            }
        },
    )
    .await;
    let handover = started.elapsed();
    stop.cancel();
    let samples = sampler.await.expect("the sampler");

    let leaders = |s: &Vec<(String, Option<bool>)>| {
        s.iter()
            .filter(|(_, l)| *l == Some(true))
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
    };
    // Two leaders in one sample could be the few ms between two scrapes; in two
    // samples in a row (100 ms apart) it is two operators acting.
    for pair in samples.windows(2) {
        assert!(
            leaders(&pair[0]).len() <= 1 || leaders(&pair[1]).len() <= 1,
            "two operator pods led at once: {pair:?}"
        );
    }
    // The old pod led until it stopped; the new one was up and idle (answering,
    // not leading) in between, and led only after the old one's last sample as leader.
    let led_by = |name: &str| {
        samples
            .iter()
            .enumerate()
            .filter(|(_, s)| s.iter().any(|(n, l)| n == name && *l == Some(true)))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    let old_last = led_by(&old_name).last().copied();
    let new_first = led_by(&new_name).first().copied();
    let (Some(old_last), Some(new_first)) = (old_last, new_first) else {
        panic!("both pods should have been seen leading: {samples:?}");
    };
    assert!(
        old_last < new_first,
        "the new operator led (sample {new_first}) before the old one stopped (sample {old_last}): {samples:?}"
    );
    let waited = samples[old_last..new_first]
        .iter()
        .any(|s| s.iter().any(|(n, l)| *n == new_name && *l == Some(false)));
    assert!(
        waited,
        "the new operator pod was never seen up and idle before it led: {samples:?}"
    );
    eprintln!(
        "helm upgrade: lease handed from {old_name} to {new_name} {handover:?} after the upgrade began ({} samples)",
        samples.len()
    );

    // The call lived through it...
    say_each(&mut live, &script[1..], "the live call after the upgrade")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    live.hang_up().await.expect("hang up the live call");
    // ...and the new operator acts: a persona edit reaches the pods' ConfigMap.
    let persona = yaml(&example("persona.yaml"));
    let persona_name = persona["metadata"]["name"]
        .as_str()
        .expect("the example persona has a name")
        .to_owned();
    let marker = "upgraded-operator-edit";
    kubectl(
        cp.kubeconfig_path(),
        [
            "patch",
            "persona",
            persona_name.as_str(),
            "--namespace",
            ns.as_str(),
            "--type=merge",
            "-p",
            &format!("{{\"spec\":{{\"greeting\":\"Hello from the {marker}.\"}}}}"),
        ],
    )
    .unwrap_or_else(|e| panic!("kubectl patch persona: {e}"));
    let config = format!("{}-config", installed.vd_name);
    eventually(
        "the new operator writes the edit into the ConfigMap",
        || async {
            let cm = kubectl(
                cp.kubeconfig_path(),
                [
                    "get",
                    "configmap",
                    config.as_str(),
                    "--namespace",
                    ns.as_str(),
                    "-o",
                    "json",
                ],
            )
            .map_err(|e| e.to_string())?;
            cm.contains(marker)
                .then_some(())
                .ok_or("not yet".to_string())
        },
    )
    .await;
}
