//! The media stream endpoint against a simulated Twilio over a real WebSocket: the
//! signed `start` handshake, the happy path, every kind of bad input, and the
//! handler seam in both directions.

use std::collections::BTreeMap;
use std::time::Duration;

use callmeback_tests::emulators::twilio_rest::TwilioRestEmulator;
use callmeback_tests::twilio_sim::{
    Pace, ProbeHandler, SimEvent, SimStream, TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, TestPod,
    TestPodOptions, eventually, new_call_sid,
};
use voice_pod::secret::Secret;
use voice_pod::session::{Bytes, CallInput, CallOutput, CallSpec, Direction};
use voice_pod::twilio::context::{CallContextParams, ContextSigner, Purpose, unix_now};

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";
const T: Duration = Duration::from_secs(5);

async fn pod_with(handler: std::sync::Arc<ProbeHandler>) -> TestPod {
    TestPod::start(TestPodOptions {
        handler: Some(handler),
        ..TestPodOptions::default()
    })
    .await
    .unwrap()
}

async fn socket_errors(pod: &TestPod, kind: &str) -> f64 {
    pod.metric(
        "voice_socket_errors_total",
        &[("peer", "twilio"), ("kind", kind)],
    )
    .await
    .unwrap()
}

/// Opens a stream (signed upgrade) without sending anything.
async fn raw_stream(pod: &TestPod) -> SimStream {
    let url = format!(
        "{}/twilio/stream",
        pod.app_url.replacen("http://", "ws://", 1)
    );
    SimStream::connect(&url, None).await.unwrap()
}

fn signed_context(call_sid: Option<&str>, expires_at: u64) -> BTreeMap<String, String> {
    let signer = ContextSigner::new(&Secret::new(TEST_AUTH_TOKEN));
    let ctx = CallContextParams {
        spec: CallSpec {
            call_id: "c-1".into(),
            persona: "ada".into(),
            direction: Direction::Inbound,
            from: Some(FROM.into()),
            to: Some(TO.into()),
            pretext: None,
            user: None,
        },
        call_sid: call_sid.map(str::to_string),
        caller_verstat: None,
        expires_at,
    };
    signer
        .sign_call(Purpose::Stream, &ctx)
        .into_iter()
        .collect()
}

#[tokio::test]
async fn happy_path_delivers_audio_dtmf_marks_and_stop_to_the_handler() {
    // Proves a signed call streams: active only after start, every frame counted and
    // delivered in order with its timestamp, DTMF and marks too, and stop ends it cleanly.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let sim = pod.sim();
    let call_sid = new_call_sid();
    let answer = sim.inbound_call(&call_sid, FROM, TO).await.unwrap();
    let twiml = answer.stream().unwrap();
    let mut stream = sim.open_stream(&twiml).await.unwrap();
    stream.send_connected().await.unwrap();
    assert_eq!(
        pod.metric("voice_active_calls", &[]).await.unwrap(),
        0.0,
        "not active before start"
    );
    stream
        .send_start(&call_sid, TEST_ACCOUNT_SID, &twiml.custom_parameters())
        .await
        .unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 1.0
        })
        .await
    );

    let audio: Vec<u8> = (0..50 * 160).map(|i| (i % 251) as u8).collect();
    stream.send_audio(&audio, Pace::RealTime).await.unwrap();
    stream.send_dtmf("7").await.unwrap();
    stream.send_mark("m-1").await.unwrap();
    stream.send_stop().await.unwrap();

    assert!(
        eventually(T, || async {
            probe.calls().first().is_some_and(|c| c.ended)
        })
        .await
    );
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 0.0
        })
        .await
    );
    let call = &probe.calls()[0];
    assert_eq!(call.ctx.call_sid, call_sid);
    assert_eq!(call.ctx.stream_sid, stream.stream_sid);
    assert_eq!(call.ctx.spec.persona, "ada");
    assert_eq!(call.ctx.persona.greeting, "Hello, this is Ada!");
    assert_eq!(call.ctx.spec.direction, Direction::Inbound);
    assert_eq!(call.ctx.spec.from.as_deref(), Some(FROM));
    let mut received = Vec::new();
    let mut timestamps = Vec::new();
    for i in &call.inputs {
        if let CallInput::Audio {
            payload,
            timestamp_ms,
        } = i
        {
            received.extend_from_slice(payload);
            timestamps.push(*timestamp_ms);
        }
    }
    assert_eq!(received, audio, "audio arrives complete and in order");
    assert_eq!(timestamps, (0..50).map(|i| i * 20).collect::<Vec<u64>>());
    let tail: Vec<&CallInput> = call
        .inputs
        .iter()
        .filter(|i| !matches!(i, CallInput::Audio { .. }))
        .collect();
    assert_eq!(
        tail,
        [
            &CallInput::Dtmf('7'),
            &CallInput::Mark("m-1".into()),
            &CallInput::Stop
        ]
    );
    assert_eq!(
        pod.metric("voice_frames_total", &[("direction", "inbound")])
            .await
            .unwrap(),
        50.0
    );
    assert_eq!(
        pod.metric("voice_socket_errors_total", &[]).await.unwrap(),
        0.0
    );
    assert_eq!(
        pod.metric("voice_call_duration_seconds_count", &[("persona", "ada")])
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn stream_without_start_is_closed_at_the_deadline() {
    // Proves a stream that never sends start is closed with 1008 and a clear reason, counted as timeout.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let mut stream = raw_stream(&pod).await;
    stream.send_connected().await.unwrap();
    let (code, reason) = stream.wait_closed(T).await.expect("closed");
    assert_eq!(code, Some(1008));
    assert!(reason.contains("no valid start"), "{reason}");
    assert_eq!(socket_errors(&pod, "timeout").await, 1.0);
    assert!(probe.calls().is_empty(), "no handler ran");
}

#[tokio::test]
async fn forged_missing_stale_or_replayed_contexts_are_refused_before_any_call() {
    // Proves each bad call context closes the stream (1008), counts bad_signature and never starts a call.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let call_sid = new_call_sid();
    let mut forged = signed_context(None, unix_now() + 60);
    forged.insert("persona".into(), "someone-else".into());
    let mut missing = signed_context(None, unix_now() + 60);
    missing.remove("sig");
    let stale = signed_context(None, unix_now() - 1);
    let other_call = signed_context(Some("CA0000000000000000000000000000dead"), unix_now() + 60);
    let cases = [forged, missing, stale, other_call, BTreeMap::new()];
    for (i, params) in cases.iter().enumerate() {
        let mut stream = raw_stream(&pod).await;
        stream.send_connected().await.unwrap();
        stream
            .send_start(&call_sid, TEST_ACCOUNT_SID, params)
            .await
            .unwrap();
        let (code, reason) = stream.wait_closed(T).await.expect("closed");
        assert_eq!(code, Some(1008), "case {i}");
        assert!(!reason.is_empty(), "case {i}: a close reason");
        assert_eq!(
            socket_errors(&pod, "bad_signature").await,
            (i + 1) as f64,
            "case {i}"
        );
    }
    assert!(probe.calls().is_empty());
    assert_eq!(pod.metric("voice_active_calls", &[]).await.unwrap(), 0.0);
}

#[tokio::test]
async fn bad_frames_are_counted_and_the_call_survives_them() {
    // Proves malformed JSON, unknown events, bad base64, oversized and binary frames,
    // a second start and a bad DTMF digit are each counted by kind, and the call goes on.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let sim = pod.sim();
    let (mut stream, twiml) = sim.start_inbound_call(FROM, TO).await.unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 1.0
        })
        .await
    );
    let sid = stream.stream_sid.clone();

    stream.send_text("{not json").await.unwrap();
    stream
        .send_text(r#"{"event":"party","streamSid":"x"}"#)
        .await
        .unwrap();
    stream
        .send_text(format!(r#"{{"event":"media","sequenceNumber":"9","streamSid":"{sid}","media":{{"track":"inbound","chunk":"9","timestamp":"160","payload":"%%%not-base64%%%"}}}}"#))
        .await
        .unwrap();
    stream
        .send_text(format!(
            r#"{{"event":"media","streamSid":"{sid}","pad":"{}"}}"#,
            "x".repeat(70_000)
        ))
        .await
        .unwrap();
    stream.send_binary(vec![0xFF; 160]).await.unwrap();
    let call_sid = probe
        .calls()
        .first()
        .map(|c| c.ctx.call_sid.clone())
        .unwrap();
    stream
        .send_start(&call_sid, TEST_ACCOUNT_SID, &twiml.custom_parameters())
        .await
        .unwrap();
    stream
        .send_text(format!(r#"{{"event":"media","streamSid":"{sid}"}}"#))
        .await
        .unwrap();
    stream.send_dtmf("12").await.unwrap();
    // The call is still alive: real audio still flows.
    stream.send_silence(3, Pace::Burst).await.unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_frames_total", &[("direction", "inbound")])
                .await
                .unwrap()
                == 3.0
        })
        .await
    );
    for (kind, n) in [
        ("malformed_json", 1.0),
        ("unknown_event", 1.0),
        ("bad_payload", 2.0),
        ("oversized", 1.0),
        ("protocol", 2.0),
        ("out_of_order", 1.0),
    ] {
        assert_eq!(socket_errors(&pod, kind).await, n, "{kind}");
    }
    stream.send_stop().await.unwrap();
    assert!(eventually(T, || async { probe.calls()[0].ended }).await);
    assert_eq!(pod.metric("voice_active_calls", &[]).await.unwrap(), 0.0);
}

#[tokio::test]
async fn media_before_start_is_out_of_order_and_ignored() {
    // Proves audio before a valid start is counted out_of_order, not delivered, and start still works after it.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let sim = pod.sim();
    let call_sid = new_call_sid();
    let twiml = sim
        .inbound_call(&call_sid, FROM, TO)
        .await
        .unwrap()
        .stream()
        .unwrap();
    let mut stream = sim.open_stream(&twiml).await.unwrap();
    stream.send_connected().await.unwrap();
    stream.send_silence(2, Pace::Burst).await.unwrap();
    stream
        .send_start(&call_sid, TEST_ACCOUNT_SID, &twiml.custom_parameters())
        .await
        .unwrap();
    stream.send_silence(1, Pace::Burst).await.unwrap();
    stream.send_stop().await.unwrap();
    assert!(
        eventually(T, || async {
            probe.calls().first().is_some_and(|c| c.ended)
        })
        .await
    );
    assert_eq!(socket_errors(&pod, "out_of_order").await, 2.0);
    let audio = probe.calls()[0]
        .inputs
        .iter()
        .filter(|i| matches!(i, CallInput::Audio { .. }))
        .count();
    assert_eq!(audio, 1);
}

#[tokio::test]
async fn a_frame_beyond_the_transport_limit_closes_the_stream_with_1009() {
    // Proves a frame the socket cannot carry is counted oversized and ends the stream, the pod survives.
    let pod = pod_with(ProbeHandler::new()).await;
    let sim = pod.sim();
    let (stream, _) = sim.start_inbound_call(FROM, TO).await.unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 1.0
        })
        .await
    );
    let mut stream = stream;
    stream.send_text("x".repeat(2 << 20)).await.unwrap();
    let closed = stream.wait_closed(T).await;
    assert!(closed.is_some());
    assert!(
        eventually(T, || async {
            socket_errors(&pod, "oversized").await == 1.0
        })
        .await
    );
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 0.0
        })
        .await
    );
    // The pod still takes calls.
    let (mut again, _) = sim.start_inbound_call(FROM, TO).await.unwrap();
    again.send_stop().await.unwrap();
}

#[tokio::test]
async fn handler_outputs_reach_twilio_as_exact_frames_and_marks_come_back() {
    // Proves audio, mark and clear from the handler arrive as Twilio-exact JSON, in
    // order, counted as outbound frames, and the played mark is echoed back to the handler.
    let audio = Bytes::from(vec![0x55u8; 320]);
    let probe = ProbeHandler::with_outputs(vec![
        CallOutput::Audio(audio.clone()),
        CallOutput::Mark("greeting-1".into()),
        CallOutput::Clear,
        CallOutput::Audio(Bytes::from(vec![0x11u8; 160])),
    ]);
    let pod = pod_with(probe.clone()).await;
    let sim = pod.sim();
    let (mut stream, _) = sim.start_inbound_call(FROM, TO).await.unwrap();
    let mut events = Vec::new();
    while events.len() < 4 {
        events.push(stream.next_event(T).await.expect("an outbound frame"));
    }
    assert_eq!(
        events,
        [
            SimEvent::Media(audio.to_vec()),
            SimEvent::Mark("greeting-1".into()),
            SimEvent::Clear,
            SimEvent::Media(vec![0x11; 160]),
        ]
    );
    assert!(stream.violations().is_empty(), "{:?}", stream.violations());
    assert!(
        eventually(T, || async {
            probe.calls()[0]
                .inputs
                .contains(&CallInput::Mark("greeting-1".into()))
        })
        .await
    );
    assert_eq!(
        pod.metric("voice_frames_total", &[("direction", "outbound")])
            .await
            .unwrap(),
        3.0
    );
    stream.send_stop().await.unwrap();
}

#[tokio::test]
async fn hangup_ends_the_call_through_rest_and_closes_the_stream() {
    // Proves CallOutput::Hangup asks Twilio's REST API to complete the call and closes the stream normally.
    let rest = TwilioRestEmulator::start(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN)
        .await
        .unwrap();
    let probe = ProbeHandler::with_outputs(vec![CallOutput::Hangup]);
    let pod = TestPod::start(TestPodOptions {
        handler: Some(probe.clone()),
        twilio_api_url: Some(rest.base_url()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    let (mut stream, twiml) = pod.sim().start_inbound_call(FROM, TO).await.unwrap();
    let (code, reason) = stream.wait_closed(T).await.expect("closed");
    assert_eq!((code, reason.as_str()), (Some(1000), "hangup"));
    let call_sid = twiml.param("call_sid").unwrap().to_string();
    assert!(
        eventually(T, || async {
            rest.updates().iter().any(|u| u.call_sid == call_sid)
        })
        .await
    );
    let update = rest
        .updates()
        .into_iter()
        .find(|u| u.call_sid == call_sid)
        .unwrap();
    assert_eq!(update.form.get("Status"), Some("completed"));
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 0.0
        })
        .await
    );
}

#[tokio::test]
async fn a_stalled_handler_never_blocks_the_reader() {
    // Proves a handler that stops reading makes the pod drop (and count) audio
    // instead of blocking: the stream keeps being read and stop still ends the call.
    let probe = ProbeHandler::stalled();
    let pod = pod_with(probe.clone()).await;
    let (mut stream, _) = pod.sim().start_inbound_call(FROM, TO).await.unwrap();
    stream.send_silence(300, Pace::Burst).await.unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_frames_total", &[("direction", "inbound")])
                .await
                .unwrap()
                == 300.0
        })
        .await,
        "every frame was read"
    );
    let dropped = pod
        .metric("voice_inbound_frames_dropped_total", &[])
        .await
        .unwrap();
    assert_eq!(
        dropped,
        300.0 - 50.0,
        "frames beyond the 1 s queue are dropped"
    );
    stream.send_stop().await.unwrap();
    // The handler ignores the stop; the pod cancels it after the grace period.
    assert!(eventually(Duration::from_secs(8), || async { probe.calls()[0].ended }).await);
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 0.0
        })
        .await
    );
}

#[tokio::test]
async fn socket_closed_without_stop_is_counted_and_ends_the_call() {
    // Proves a stream that drops without stop counts `closed`, ends the handler and the call.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let (stream, _) = pod.sim().start_inbound_call(FROM, TO).await.unwrap();
    assert!(
        eventually(T, || async {
            pod.metric("voice_active_calls", &[]).await.unwrap() == 1.0
        })
        .await
    );
    stream.close().await;
    assert!(eventually(T, || async { probe.calls()[0].ended }).await);
    assert!(eventually(T, || async { socket_errors(&pod, "closed").await == 1.0 }).await);
    assert_eq!(pod.metric("voice_active_calls", &[]).await.unwrap(), 0.0);
}

#[tokio::test]
async fn a_second_stream_with_an_answered_calls_context_is_closed_while_the_first_lives() {
    // Proves a stream context is single-use: the TwiML parameters of one answered call,
    // presented again (same CallSid) while the first stream is live, close the second
    // stream with 1008 before any handler or provider runs; the first call goes on.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    let sim = pod.sim();
    let call_sid = new_call_sid();
    let answer = sim.inbound_call(&call_sid, FROM, TO).await.unwrap();
    let twiml = answer.stream().unwrap();
    let mut first = sim.open_stream(&twiml).await.unwrap();
    first.send_connected().await.unwrap();
    first
        .send_start(&call_sid, TEST_ACCOUNT_SID, &twiml.custom_parameters())
        .await
        .unwrap();
    assert!(eventually(T, || async { probe.calls().len() == 1 }).await);

    let mut second = sim.open_stream(&twiml).await.unwrap();
    second.send_connected().await.unwrap();
    second
        .send_start(&call_sid, TEST_ACCOUNT_SID, &twiml.custom_parameters())
        .await
        .unwrap();
    let (code, reason) = second.wait_closed(T).await.expect("second stream closed");
    assert_eq!(code, Some(1008));
    assert!(reason.contains("already used"), "{reason}");
    assert_eq!(probe.calls().len(), 1, "no second call ran");
    assert_eq!(
        pod.metric("voice_refusals_total", &[("reason", "context_reused")])
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(pod.metric("voice_active_calls", &[]).await.unwrap(), 1.0);
    let audio: Vec<u8> = vec![0xff; 10 * 160];
    first.send_audio(&audio, Pace::Burst).await.unwrap();
    first.send_stop().await.unwrap();
    assert!(eventually(T, || async { probe.calls()[0].ended }).await);
}

#[tokio::test]
async fn a_malformed_call_sid_in_start_is_refused_before_it_reaches_a_rest_path() {
    // Proves start.callSid must be CA + 32 hex digits: a path-like or short SID closes
    // the stream (1008), is counted, and no call starts.
    let probe = ProbeHandler::new();
    let pod = pod_with(probe.clone()).await;
    for (i, sid) in [
        "CA../../Accounts/AC1/Calls",
        "CA123",
        "XY0123456789abcdef0123456789abcdef",
    ]
    .iter()
    .enumerate()
    {
        let params = signed_context(None, unix_now() + 60);
        let mut stream = raw_stream(&pod).await;
        stream.send_connected().await.unwrap();
        stream
            .send_start(sid, TEST_ACCOUNT_SID, &params)
            .await
            .unwrap();
        let (code, _) = stream.wait_closed(T).await.expect("closed");
        assert_eq!(code, Some(1008), "{sid}");
        assert_eq!(
            pod.metric("voice_refusals_total", &[("reason", "bad_call_sid")])
                .await
                .unwrap(),
            (i + 1) as f64
        );
    }
    assert!(probe.calls().is_empty());
}
