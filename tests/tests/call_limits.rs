//! Call limits through the real `voice-pod serve` binary: a silent caller is asked
//! whether they are still there, then the persona says goodbye and hangs up; a call
//! reaching the persona's maximum duration ends with a goodbye too.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_tests::call_harness::{
    Caller, Emulators, PodProcess, ProviderProfile, persona_json, table_replies,
};
use callmeback_tests::twilio_sim::eventually;
use serde_json::json;

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";

async fn pod_with(persona: serde_json::Value) -> (Emulators, PodProcess) {
    let said = Arc::new(Mutex::new(Vec::new()));
    let emus = Emulators::start(
        Vec::new(),
        table_replies(Vec::new(), "Okay.".into(), said),
        ProviderProfile::ZERO,
    )
    .await
    .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(persona))], &[])
        .await
        .unwrap();
    (emus, pod)
}

/// Whether the pod logged the call's end with this reason.
async fn ended_with(pod: &PodProcess, reason: &str) -> bool {
    let needle = format!("\"end\":\"{reason}\"");
    eventually(Duration::from_secs(5), || async {
        pod.log().contains(&needle)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_caller_is_prompted_then_told_goodbye_and_hung_up_on() {
    // Proves the idle timeout: "are you still there?" after idleTimeoutSeconds of
    // silence, then goodbye and a hangup after as long again.
    let (_emus, pod) =
        pod_with(json!({"idleTimeoutSeconds": 5, "maxCallDurationSeconds": 60})).await;
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    let greeting = caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap()
        .expect("greeting");
    let prompt = caller
        .listen(Duration::from_secs(9), Duration::from_millis(500))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no idle prompt:\n{}", pod.log_tail(30)));
    let waited = prompt.first_media - greeting.ended;
    assert!(
        waited >= Duration::from_millis(4500) && waited <= Duration::from_millis(6500),
        "idle prompt after {waited:?} of silence"
    );
    let goodbye = caller
        .listen(Duration::from_secs(9), Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no goodbye:\n{}", pod.log_tail(30)));
    assert!(goodbye.first_media - prompt.ended >= Duration::from_millis(4500));
    assert!(
        caller.wait_closed(Duration::from_secs(5)).await,
        "the pod did not hang up"
    );
    assert!(ended_with(&pod, "idle").await, "{}", pod.log_tail(20));
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maximum_call_duration_ends_the_call_with_a_goodbye() {
    // Proves maxCallDurationSeconds: at the limit the persona says goodbye and hangs up.
    let (_emus, pod) =
        pod_with(json!({"idleTimeoutSeconds": 29, "maxCallDurationSeconds": 30})).await;
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    let started = caller.started_at();
    assert!(
        caller.wait_closed(Duration::from_secs(40)).await,
        "the call never ended"
    );
    let ended =
        caller.last_at(|e| matches!(e, callmeback_tests::call_harness::CallerEvent::Closed));
    let lasted = ended.map(|e| e - started).unwrap_or_default();
    assert!(
        lasted >= Duration::from_secs(30) && lasted <= Duration::from_secs(36),
        "the call lasted {lasted:?}"
    );
    // The goodbye was heard before the hangup: audio in the last seconds.
    let goodbye_from = started + Duration::from_secs(30);
    assert!(caller.media_between(goodbye_from, started + Duration::from_secs(40)));
    assert!(
        ended_with(&pod, "max_duration").await,
        "{}",
        pod.log_tail(20)
    );
    pod.stop().await.unwrap();
}
