//! The product on a real Kubernetes node (`controlplane::shared_with_node`):
//! containerd runs the images `scripts/node-images.sh` built from this
//! build's binaries, the kubelet calls the probes, kube-proxy routes the
//! `kubernetes` Service. `helm install` of the chart runs the operator as a
//! real pod; it takes the leader Lease and brings up the example's voice pods.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_tests::call_harness::{
    Caller, Emulators, ProviderProfile, lines, table, table_replies,
};
use callmeback_tests::controlplane;
use callmeback_tests::helm::kubectl;
use callmeback_tests::node_cluster::{
    ONE_AT_A_TIME, active_calls, install_examples, pods_with, say_each, talk, voice_service_url,
    wait_available_with_ready_pods,
};
use callmeback_tests::twilio_sim::TwilioSim;

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
    let installed = install_examples(cp, node, "node-call", secret, |_| {}, 2).await;
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
