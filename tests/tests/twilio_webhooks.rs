//! Twilio's webhooks against a running pod: signatures, persona routing, the TwiML
//! answer, status callbacks, `/load`, and what a draining pod still serves.

use std::time::Duration;

use callmeback_tests::twilio_sim::{
    Pace, TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, TestPod, TestPodOptions, TwilioSim, Verb, eventually,
    new_call_sid, persona_yaml, sign,
};

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";
const T: Duration = Duration::from_secs(5);

fn two_personas(routes: Option<&str>) -> (tempfile::TempDir, TestPodOptions) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("personas");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ada.yaml"), persona_yaml("Ada", "Hi, Ada here.")).unwrap();
    std::fs::write(dir.join("bob.yaml"), persona_yaml("Bob", "Bob speaking.")).unwrap();
    let routes_file = tmp.path().join("routes.yaml");
    if let Some(r) = routes {
        std::fs::write(&routes_file, r).unwrap();
    }
    let opts = TestPodOptions {
        persona_dir: Some(dir),
        routes_file: Some(routes_file),
        ..TestPodOptions::default()
    };
    (tmp, opts)
}

#[tokio::test]
async fn inbound_call_is_answered_with_a_signed_stream_and_no_query_string() {
    // Proves the answer TwiML is <Connect><Stream> to the public wss URL without a
    // query string, carrying the call context and its sig in <Parameter>s.
    let (_tmp, opts) = two_personas(Some("default: ada\nnumbers:\n  \"+14155550100\": bob\n"));
    let pod = TestPod::start(opts).await.unwrap();
    let sim = pod.sim();
    let call_sid = new_call_sid();
    let answer = sim.inbound_call(&call_sid, FROM, TO).await.unwrap();
    assert_eq!(answer.status, 200);
    let verbs = answer.verbs().unwrap();
    assert_eq!(verbs.len(), 1, "{verbs:?}");
    let stream = answer.stream().unwrap();
    assert_eq!(
        stream.url,
        format!(
            "{}/twilio/stream",
            pod.app_url.replacen("http://", "ws://", 1)
        )
    );
    assert!(!stream.url.contains('?'));
    assert_eq!(
        stream.param("persona"),
        Some("bob"),
        "routed by the To number"
    );
    assert_eq!(stream.param("direction"), Some("inbound"));
    assert_eq!(stream.param("call_sid"), Some(call_sid.as_str()));
    assert_eq!(stream.param("from"), Some(FROM));
    assert_eq!(stream.param("to"), Some(TO));
    assert!(stream.param("sig").is_some_and(|s| s.len() >= 40));
    assert!(stream.param("exp").is_some());

    // Another number takes the default persona.
    let other = sim
        .inbound_call(&new_call_sid(), FROM, "+14155550111")
        .await
        .unwrap();
    assert_eq!(other.stream().unwrap().param("persona"), Some("ada"));
    assert_eq!(
        pod.metric(
            "voice_webhook_requests_total",
            &[("endpoint", "voice"), ("result", "stream")]
        )
        .await
        .unwrap(),
        2.0
    );
}

#[tokio::test]
async fn unknown_number_without_default_is_rejected() {
    // Proves an unrouted number with no default persona gets <Reject/>.
    let (_tmp, opts) = two_personas(Some("numbers:\n  \"+14155550100\": bob\n"));
    let pod = TestPod::start(opts).await.unwrap();
    let answer = pod
        .sim()
        .inbound_call(&new_call_sid(), FROM, "+14155550111")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.verbs().unwrap(), [Verb::Reject]);
    // Without a routes file, two personas mean no default either.
    let (_tmp2, opts) = two_personas(None);
    let pod = TestPod::start(opts).await.unwrap();
    let answer = pod
        .sim()
        .inbound_call(&new_call_sid(), FROM, TO)
        .await
        .unwrap();
    assert_eq!(answer.verbs().unwrap(), [Verb::Reject]);
    assert_eq!(
        pod.metric(
            "voice_webhook_requests_total",
            &[("endpoint", "voice"), ("result", "rejected")]
        )
        .await
        .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn unsigned_forged_and_tampered_webhooks_get_403_and_are_counted() {
    // Proves no signature, a wrong token, a tampered field and a wrong URL are all 403 and counted.
    let pod = TestPod::start(TestPodOptions::default()).await.unwrap();
    let sim = pod.sim();
    let params = sim.inbound_call_params(&new_call_sid(), FROM, TO);

    let unsigned = sim.post_form("/twilio/voice", &params, None).await.unwrap();
    assert_eq!(unsigned.status, 403);

    let wrong_token = sign(
        "not-the-token",
        &format!("{}/twilio/voice", pod.app_url),
        &params,
    );
    assert_eq!(
        sim.post_form("/twilio/voice", &params, Some(&wrong_token))
            .await
            .unwrap()
            .status,
        403
    );

    let good = sim.signature("/twilio/voice", &params);
    let mut tampered = params.clone();
    tampered.iter_mut().find(|(k, _)| k == "To").unwrap().1 = "+14155550999".into();
    assert_eq!(
        sim.post_form("/twilio/voice", &tampered, Some(&good))
            .await
            .unwrap()
            .status,
        403
    );

    let status_sig = sim.signature("/twilio/status", &params);
    assert_eq!(
        sim.post_form("/twilio/voice", &params, Some(&status_sig))
            .await
            .unwrap()
            .status,
        403
    );

    assert_eq!(
        sim.post_form("/twilio/voice", &params, Some(&good))
            .await
            .unwrap()
            .status,
        200
    );
    let count = |result: &'static str| {
        let pod = &pod;
        async move {
            pod.metric(
                "voice_webhook_requests_total",
                &[("endpoint", "voice"), ("result", result)],
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(count("unsigned").await, 1.0);
    assert_eq!(count("bad_signature").await, 3.0);
}

#[tokio::test]
async fn signatures_use_the_public_url_never_the_host_header() {
    // Proves the signed URL is CALLMEBACK_PUBLIC_URL + path: a request signed for the
    // Host header's URL fails, one signed for the public URL passes whatever Host says.
    let pod = TestPod::start(TestPodOptions::default()).await.unwrap();
    let params = TwilioSim::new(
        &pod.app_url,
        &pod.app_url,
        TEST_ACCOUNT_SID,
        TEST_AUTH_TOKEN,
    )
    .inbound_call_params(&new_call_sid(), FROM, TO);
    let http = reqwest::Client::new();
    let evil_sig = sign(
        TEST_AUTH_TOKEN,
        "http://evil.example.com/twilio/voice",
        &params,
    );
    let resp = http
        .post(format!("{}/twilio/voice", pod.app_url))
        .header("Host", "evil.example.com")
        .header("X-Twilio-Signature", evil_sig)
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let public_sig = sign(
        TEST_AUTH_TOKEN,
        &format!("{}/twilio/voice", pod.app_url),
        &params,
    );
    let resp = http
        .post(format!("{}/twilio/voice", pod.app_url))
        .header("Host", "internal-pod-ip:8080")
        .header("X-Twilio-Signature", public_sig)
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn status_callbacks_count_finished_calls_by_outcome() {
    // Proves signed status callbacks count terminal outcomes (persona from the route for
    // inbound calls), ignore progress states, and unsigned ones are refused.
    let pod = TestPod::start(TestPodOptions::default()).await.unwrap();
    let sim = pod.sim();
    let url = format!("{}/twilio/status", pod.app_url);
    let inbound = [("Direction", "inbound"), ("To", TO), ("From", FROM)];
    for status in ["ringing", "in-progress", "completed"] {
        let r = sim
            .status_callback(&url, "CA01", status, &inbound)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    sim.status_callback(&url, "CA02", "busy", &[("Direction", "outbound-api")])
        .await
        .unwrap();
    let unsigned = sim
        .post_form(
            "/twilio/status",
            &[
                ("CallSid".into(), "CA03".into()),
                ("CallStatus".into(), "failed".into()),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(unsigned.status, 403);
    assert_eq!(
        pod.metric(
            "voice_calls_total",
            &[("persona", "ada"), ("outcome", "completed")]
        )
        .await
        .unwrap(),
        1.0
    );
    assert_eq!(
        pod.metric(
            "voice_calls_total",
            &[("persona", "unknown"), ("outcome", "busy")]
        )
        .await
        .unwrap(),
        1.0
    );
    assert_eq!(pod.metric("voice_calls_total", &[]).await.unwrap(), 2.0);
}

#[tokio::test]
async fn draining_pod_still_serves_late_webhooks_and_streams_and_finishes_every_call() {
    // Proves that during drain /readyz is 503 and /load says draining, yet a webhook
    // that still reaches the pod (endpoint removal lags) gets the usual
    // <Connect><Stream> TwiML, never a goodbye; a stream that then lands on this pod
    // is carried; the call that was live before carries on; the drain ends once
    // both calls end.
    let mut pod = TestPod::start(TestPodOptions::default()).await.unwrap();
    let sim = pod.sim();
    let metrics_url = pod.metrics_url.clone();
    let ready = || async {
        reqwest::get(format!("{metrics_url}/readyz"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);
    let (mut before, _) = sim.start_inbound_call(FROM, TO).await.unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 1.0
        })
        .await
    );

    pod.begin_shutdown();
    assert!(
        eventually(Duration::from_secs(1), || async { ready().await == 503 }).await,
        "readiness off at once"
    );
    let load: serde_json::Value = reqwest::get(format!("{metrics_url}/load"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(load["draining"], true, "{load}");
    assert_eq!(load["accepting"], false, "{load}");
    assert_eq!(load["activeCalls"], 1, "{load}");

    let (mut late, twiml) = sim.start_inbound_call(FROM, TO).await.unwrap();
    assert!(
        twiml.url.starts_with("ws"),
        "the late webhook got stream TwiML: {}",
        twiml.url
    );
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 2.0
        })
        .await,
        "the late stream is carried beside the earlier call"
    );
    for stream in [&mut before, &mut late] {
        stream.send_silence(10, Pace::RealTime).await.unwrap();
    }
    assert!(
        eventually(T, || async {
            pod.metric("voice_frames_total", &[("direction", "inbound")])
                .await
                .unwrap()
                == 20.0
        })
        .await
    );
    before.send_stop().await.unwrap();
    late.send_stop().await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), pod.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, voice_pod::drain::DrainOutcome::Finished);
}

#[tokio::test]
async fn load_endpoint_reports_active_calls_capacity_and_acceptance() {
    // Proves GET /load on the metrics port counts the live call like
    // voice_active_calls, gives the configured capacity, and says the pod accepts.
    let pod = TestPod::start(TestPodOptions::default()).await.unwrap();
    let sim = pod.sim();
    let load = || async {
        reqwest::get(format!("{}/load", pod.metrics_url))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let idle = load().await;
    assert_eq!(
        idle,
        serde_json::json!({"activeCalls": 0, "capacity": voice_pod::config::DEFAULT_MAX_CALLS, "accepting": true, "draining": false})
    );
    let (mut stream, _) = sim.start_inbound_call(FROM, TO).await.unwrap();
    assert!(
        eventually(T, || async { load().await["activeCalls"] == 1 }).await,
        "one live call"
    );
    stream.send_stop().await.unwrap();
    assert!(
        eventually(T, || async { load().await["activeCalls"] == 0 }).await,
        "the ended call is no longer counted"
    );
}
