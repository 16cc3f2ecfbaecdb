//! Graceful drain of the real `voice-pod` binary on SIGTERM, with a call in
//! progress over a real WebSocket.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{PodProcess, metric_value, persona_dir};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use voice_pod::twilio::signature::{Algorithm, compute_signature};

const PUBLIC: &str = "https://pod.drain.test";
const TOKEN: &str = "drain-test-auth-token";
const ACCOUNT: &str = "AC00000000000000000000000000000001";
const API_TOKEN: &str = "drain-test-api-token-0123456789";

fn signed_post(
    client: &reqwest::Client,
    app: &str,
    path: &str,
    params: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sig = compute_signature(
        TOKEN.as_bytes(),
        &format!("{PUBLIC}{path}"),
        &owned,
        Algorithm::HmacSha1,
    );
    client
        .post(format!("{app}{path}"))
        .header("X-Twilio-Signature", sig)
        .form(&owned)
}

/// Parses `<Parameter name value>`s out of TwiML (a real XML parser).
fn stream_params(twiml: &str) -> BTreeMap<String, String> {
    let mut r = quick_xml::Reader::from_str(twiml);
    let mut out = BTreeMap::new();
    loop {
        match r.read_event().expect("well-formed TwiML") {
            quick_xml::events::Event::Empty(e) if e.name().as_ref() == b"Parameter" => {
                let get = |k: &[u8]| {
                    e.attributes()
                        .map(Result::unwrap)
                        .find(|a| a.key.as_ref() == k)
                        .map(|a| a.unescape_value().unwrap().into_owned())
                        .unwrap()
                };
                out.insert(get(b"name"), get(b"value"));
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
    }
    out
}

fn media(stream_sid: &str, chunk: u64) -> Message {
    let payload = base64::engine::general_purpose::STANDARD.encode([0xFFu8; 160]);
    Message::Text(
        json!({"event":"media","sequenceNumber":(chunk + 2).to_string(),"streamSid":stream_sid,
               "media":{"track":"inbound","chunk":chunk.to_string(),"timestamp":(chunk*20).to_string(),"payload":payload}})
        .to_string()
        .into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_active_call_finish_still_answers_late_webhooks_and_exits_zero() {
    // Proves: after SIGTERM /readyz fails within 1 s, a late webhook still gets stream TwiML (no goodbye)
    // while the API answers 503; the call in progress keeps streaming until it
    // stops, metrics stay up meanwhile, and the process then exits 0.
    let tmp = tempfile::tempdir().unwrap();
    let personas = persona_dir(tmp.path());
    let mut pod = PodProcess::start(&[
        ("CALLMEBACK_LISTEN", "127.0.0.1:0"),
        ("CALLMEBACK_METRICS_LISTEN", "127.0.0.1:0"),
        ("CALLMEBACK_PUBLIC_URL", PUBLIC),
        ("CALLMEBACK_PERSONA_DIR", personas.to_str().unwrap()),
        (
            "CALLMEBACK_ROUTES_FILE",
            tmp.path().join("routes.yaml").to_str().unwrap(),
        ),
        ("CALLMEBACK_API_TOKEN", API_TOKEN),
        ("CALLMEBACK_DRAIN_TIMEOUT", "30s"),
        ("TWILIO_ACCOUNT_SID", ACCOUNT),
        ("TWILIO_AUTH_TOKEN", TOKEN),
        ("TWILIO_API_URL", "http://127.0.0.1:9"),
        ("TWILIO_FROM_NUMBER", "+15005550006"),
    ]);
    let http = reqwest::Client::new();
    let get = |url: String| {
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(get(format!("{}/readyz", pod.metrics)).await, 200);

    // A call comes in and streams.
    let call_sid = "CA00000000000000000000000000000042";
    let inbound = [
        ("CallSid", call_sid),
        ("AccountSid", ACCOUNT),
        ("From", "+14155550123"),
        ("To", "+14155550100"),
        ("Direction", "inbound"),
        ("CallStatus", "ringing"),
    ];
    let answer = signed_post(&http, &pod.app, "/twilio/voice", &inbound)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let twiml = answer.text().await.unwrap();
    assert!(
        twiml.contains("<Connect><Stream url=\"wss://pod.drain.test/twilio/stream\">"),
        "{twiml}"
    );
    let params = stream_params(&twiml);
    let ws_url = format!("{}/twilio/stream", pod.app.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let stream_sid = "MZ00000000000000000000000000000042";
    ws.send(Message::Text(
        json!({"event":"connected","protocol":"Call","version":"1.0.0"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text(
        json!({"event":"start","sequenceNumber":"1","streamSid":stream_sid,
               "start":{"streamSid":stream_sid,"accountSid":ACCOUNT,"callSid":call_sid,"tracks":["inbound"],
                        "customParameters":params,
                        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    for chunk in 1..=10 {
        ws.send(media(stream_sid, chunk)).await.unwrap();
    }
    let metrics_url = format!("{}/metrics", pod.metrics);
    let readyz_url = format!("{}/readyz", pod.metrics);
    let scrape = || get(metrics_url.clone());
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics_text = || {
        let http = http.clone();
        let url = metrics_url.clone();
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    while metric_value(&metrics_text().await, "voice_active_calls", &[]) != 1.0 {
        assert!(Instant::now() < deadline, "call never became active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM: readiness flips within a second.
    let sent = Instant::now();
    pod.signal("TERM");
    loop {
        if get(readyz_url.clone()).await == 503 {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "/readyz still 200 after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A webhook that still reaches the draining pod is served as usual: its stream
    // URL is the public one, so the stream lands on a ready pod. No goodbye.
    let mut second = inbound;
    second[0] = ("CallSid", "CA00000000000000000000000000000043");
    let refused = signed_post(&http, &pod.app, "/twilio/voice", &second)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 200);
    let body = refused.text().await.unwrap();
    assert!(
        body.contains("<Stream") && !body.contains("<Say>") && !body.contains("<Hangup/>"),
        "{body}"
    );
    let api = http
        .post(format!("{}/v1/calls", pod.app))
        .bearer_auth(API_TOKEN)
        .json(&json!({"to": "+14155550199", "persona": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 503);
    assert_eq!(
        api.json::<serde_json::Value>().await.unwrap()["error"],
        "draining"
    );

    // The call in progress goes on for a while; the pod stays up for it.
    for chunk in 11..=60 {
        ws.send(media(stream_sid, chunk)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        pod.wait_exit(Duration::from_millis(100)).is_none(),
        "exited with a call in progress"
    );
    assert_eq!(
        scrape().await,
        200,
        "metrics port must stay up while draining"
    );
    let text = metrics_text().await;
    assert_eq!(
        metric_value(&text, "voice_frames_total", &[("direction", "inbound")]),
        60.0
    );
    assert_eq!(metric_value(&text, "voice_draining", &[]), 1.0);

    // The caller hangs up: the pod finishes and exits 0.
    ws.send(Message::Text(
        json!({"event":"stop","sequenceNumber":"99","streamSid":stream_sid,"stop":{"accountSid":ACCOUNT,"callSid":call_sid}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
    let status = pod
        .wait_exit(Duration::from_secs(15))
        .expect("pod did not exit after the last call ended");
    assert!(
        status.success(),
        "exit status {status:?}; logs: {:?}",
        pod.logs()
    );
    let logs = pod.logs().join("\n");
    assert!(logs.contains("all calls finished"), "{logs}");
    assert!(
        !logs.contains("+14155550123"),
        "a full phone number reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_ends_calls_that_outlast_it() {
    // Proves a call still running at CALLMEBACK_DRAIN_TIMEOUT is ended and the pod exits 0.
    let tmp = tempfile::tempdir().unwrap();
    let personas = persona_dir(tmp.path());
    let mut pod = PodProcess::start(&[
        ("CALLMEBACK_LISTEN", "127.0.0.1:0"),
        ("CALLMEBACK_METRICS_LISTEN", "127.0.0.1:0"),
        ("CALLMEBACK_PUBLIC_URL", PUBLIC),
        ("CALLMEBACK_PERSONA_DIR", personas.to_str().unwrap()),
        ("CALLMEBACK_DRAIN_TIMEOUT", "1"),
        ("TWILIO_AUTH_TOKEN", TOKEN),
    ]);
    let http = reqwest::Client::new();
    let call_sid = "CA00000000000000000000000000000044";
    let answer = signed_post(
        &http,
        &pod.app,
        "/twilio/voice",
        &[
            ("CallSid", call_sid),
            ("From", "+14155550123"),
            ("To", "+14155550100"),
            ("Direction", "inbound"),
        ],
    )
    .send()
    .await
    .unwrap();
    let params = stream_params(&answer.text().await.unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/twilio/stream",
        pod.app.replacen("http://", "ws://", 1)
    ))
    .await
    .unwrap();
    let stream_sid = "MZ00000000000000000000000000000044";
    ws.send(Message::Text(
        json!({"event":"start","sequenceNumber":"1","streamSid":stream_sid,
               "start":{"streamSid":stream_sid,"accountSid":ACCOUNT,"callSid":call_sid,"tracks":["inbound"],
                        "customParameters":params,
                        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    ws.send(media(stream_sid, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    pod.signal("TERM");
    // The pod ends the call from its side: a close frame arrives.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Close(frame)) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("no close frame after the drain deadline");
    assert_eq!(closed, Some(1000));
    let status = pod
        .wait_exit(Duration::from_secs(15))
        .expect("pod did not exit");
    assert!(status.success());
    assert!(
        sent.elapsed() >= Duration::from_secs(1),
        "the call was cut before the deadline"
    );
    assert!(pod.logs().join("\n").contains("drain deadline passed"));
}
