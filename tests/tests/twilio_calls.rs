//! "Call me back" (`POST /v1/calls`) against the Twilio Calls REST emulator: the
//! request Twilio receives, validation, auth, error passthrough, and the created
//! call's TwiML carrying hostile values intact all the way to the stream.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use callmeback_tests::emulators::twilio_rest::TwilioRestEmulator;
use callmeback_tests::twilio_sim::{
    ProbeHandler, TEST_ACCOUNT_SID, TEST_API_TOKEN, TEST_AUTH_TOKEN, TEST_FROM_NUMBER, TestPod,
    TestPodOptions, Verb, eventually, parse_twiml, twilio_helper_python,
};
use serde_json::{Value, json};
use voice_pod::session::{CallInput, Direction};

const T: Duration = Duration::from_secs(5);
const CALLEE: &str = "+14155550199";

struct Setup {
    pod: TestPod,
    rest: TwilioRestEmulator,
    probe: std::sync::Arc<ProbeHandler>,
    http: reqwest::Client,
}

async fn setup() -> Setup {
    let rest = TwilioRestEmulator::start(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN)
        .await
        .unwrap();
    let probe = ProbeHandler::new();
    let pod = TestPod::start(TestPodOptions {
        twilio_api_url: Some(rest.base_url()),
        handler: Some(probe.clone()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    Setup {
        pod,
        rest,
        probe,
        http: reqwest::Client::new(),
    }
}

impl Setup {
    async fn call(&self, body: Value) -> (u16, Value) {
        self.call_with_token(body, Some(TEST_API_TOKEN)).await
    }
    async fn call_with_token(&self, body: Value, token: Option<&str>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/calls", self.pod.app_url))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// Values that break naive TwiML: every XML special character, quotes, emoji,
/// non-Latin scripts and line breaks, 500 characters long.
fn hostile_pretext() -> String {
    let seed = "Tom & Jerry <3 \"quoted\" 'single' é日本🙂\nnext line\ttab > end; ";
    seed.chars().cycle().take(500).collect()
}

#[tokio::test]
async fn call_me_back_creates_the_call_with_inline_twiml_and_every_status_event() {
    // Proves a valid request becomes exactly the Calls API request Twilio expects
    // (Basic auth, To/From, inline TwiML, StatusCallback with 4 events, POST, Timeout),
    // answers 201 {id, call_sid, status}, and warms the handler up while it rings.
    let s = setup().await;
    let pretext = hostile_pretext();
    let (status, body) = s
        .call(json!({"to": CALLEE, "persona": "ada", "pretext": pretext, "user": "user-42"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let calls = s.rest.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(body["call_sid"], call.sid.as_str());
    assert_eq!(body["status"], "queued");
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID");

    let form = &call.form;
    assert_eq!(form.get("To"), Some(CALLEE));
    assert_eq!(form.get("From"), Some(TEST_FROM_NUMBER));
    assert_eq!(
        form.all("StatusCallbackEvent"),
        ["initiated", "ringing", "answered", "completed"]
    );
    assert_eq!(form.get("StatusCallbackMethod"), Some("POST"));
    assert_eq!(form.get("Timeout"), Some("30"));
    assert!(form.get("Url").is_none());
    let status_cb = form.get("StatusCallback").unwrap();
    assert!(
        status_cb.starts_with(&format!("{}/twilio/status?", s.pod.app_url)),
        "{status_cb}"
    );

    // The inline TwiML parses and every parameter survived exactly.
    let twiml = form.get("Twiml").unwrap();
    assert!(twiml.chars().count() <= 4000);
    let verbs = parse_twiml(twiml).unwrap();
    let [Verb::ConnectStream(stream)] = verbs.as_slice() else {
        panic!("{verbs:?}")
    };
    assert!(!stream.url.contains('?'));
    assert_eq!(stream.param("pretext"), Some(pretext.as_str()));
    assert_eq!(stream.param("user"), Some("user-42"));
    assert_eq!(stream.param("persona"), Some("ada"));
    assert_eq!(stream.param("direction"), Some("outbound"));
    assert_eq!(stream.param("call_id"), Some(id.as_str()));

    let prepared = s.probe.prepared();
    assert_eq!(prepared.len(), 1);
    assert_eq!(prepared[0].spec.call_id, id);
    assert_eq!(prepared[0].spec.pretext.as_deref(), Some(pretext.as_str()));
    assert_eq!(
        s.pod
            .metric("voice_outbound_calls_total", &[("result", "created")])
            .await
            .unwrap(),
        1.0
    );

    // The callee answers: Twilio runs the TwiML, the stream starts with the context intact.
    let sim = s.pod.sim();
    let mut media = sim.open_stream(stream).await.unwrap();
    media.send_connected().await.unwrap();
    media
        .send_start(&call.sid, TEST_ACCOUNT_SID, &stream.custom_parameters())
        .await
        .unwrap();
    media.send_stop().await.unwrap();
    assert!(
        eventually(T, || async {
            s.probe.calls().first().is_some_and(|c| c.ended)
        })
        .await
    );
    let ctx = &s.probe.calls()[0].ctx;
    assert_eq!(ctx.spec.direction, Direction::Outbound);
    assert_eq!(ctx.spec.pretext.as_deref(), Some(pretext.as_str()));
    assert_eq!(ctx.spec.user.as_deref(), Some("user-42"));
    assert_eq!(ctx.spec.call_id, id);
    assert_eq!(ctx.spec.to.as_deref(), Some(CALLEE));
    assert_eq!(s.probe.calls()[0].inputs, [CallInput::Stop]);

    // Twilio reports the end: the signed status URL attributes it to the persona.
    let done = sim
        .status_callback(
            status_cb,
            &call.sid,
            "completed",
            &[("Direction", "outbound-api"), ("CallDuration", "12")],
        )
        .await
        .unwrap();
    assert_eq!(done.status, 200);
    assert_eq!(
        s.pod
            .metric(
                "voice_calls_total",
                &[("persona", "ada"), ("outcome", "completed")]
            )
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn twiml_parameters_survive_a_standards_xml_parser() {
    // Proves the inline TwiML, parsed by Python's expat (attribute-value
    // normalization included), yields the pretext byte for byte.
    let s = setup().await;
    let pretext = hostile_pretext();
    let (status, _) = s
        .call(json!({"to": CALLEE, "persona": "ada", "pretext": pretext}))
        .await;
    assert_eq!(status, 201);
    let twiml = s.rest.calls()[0].form.get("Twiml").unwrap().to_string();
    let script = r#"
import sys, json, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.buffer.read())
assert root.tag == "Response", root.tag
print(json.dumps({p.get("name"): p.get("value") for p in root.iter("Parameter")}))
"#;
    let mut child = Command::new(twilio_helper_python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(twiml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let params: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(params["pretext"], pretext.as_str());
}

#[tokio::test]
async fn context_too_long_for_inline_twiml_falls_back_to_a_sealed_answer_url() {
    // Proves a pretext whose TwiML exceeds 4000 characters goes as Url with a sealed
    // context that shows no personal data; Twilio fetching it gets the stream TwiML
    // with the pretext intact, bound to the CallSid it answered.
    let s = setup().await;
    let pretext: String = "&<>\"'".chars().cycle().take(1000).collect();
    let (status, body) = s
        .call(json!({"to": CALLEE, "persona": "ada", "pretext": pretext}))
        .await;
    assert_eq!(status, 201, "{body}");
    let call = &s.rest.calls()[0];
    assert!(call.form.get("Twiml").is_none());
    let url = call.form.get("Url").unwrap();
    assert!(
        url.starts_with(&format!("{}/twilio/voice?", s.pod.app_url)),
        "{url}"
    );
    assert!(!url.contains(TEST_AUTH_TOKEN));
    // No personal data in the URL proxies and Twilio's logs keep: the context is
    // sealed, so neither numbers nor the pretext nor even the field names show.
    let query: Vec<(String, String)> = url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(query.len(), 1, "{query:?}");
    assert_eq!(query[0].0, "ctx");
    for personal in [
        &CALLEE[2..],
        &TEST_FROM_NUMBER[2..],
        "&<>",
        "pretext",
        "persona",
    ] {
        assert!(!query[0].1.contains(personal), "{personal} in {url}");
    }

    let sim = s.pod.sim();
    let answer = sim
        .answer_outbound(url, &call.sid, TEST_FROM_NUMBER, CALLEE)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let stream = answer.stream().unwrap();
    assert_eq!(stream.param("pretext"), Some(pretext.as_str()));
    assert_eq!(stream.param("call_sid"), Some(call.sid.as_str()));
    let mut media = sim.open_stream(&stream).await.unwrap();
    media
        .send_start(&call.sid, TEST_ACCOUNT_SID, &stream.custom_parameters())
        .await
        .unwrap();
    media.send_stop().await.unwrap();
    assert!(
        eventually(T, || async {
            s.probe.calls().first().is_some_and(|c| c.ended)
        })
        .await
    );
    assert_eq!(
        s.probe.calls()[0].ctx.spec.pretext.as_deref(),
        Some(pretext.as_str())
    );

    // A tampered answer URL is rejected (one character of the sealed context changed).
    let last = url.chars().last().unwrap();
    let tampered = format!(
        "{}{}",
        &url[..url.len() - last.len_utf8()],
        if last == 'A' { 'B' } else { 'A' }
    );
    let answer = sim
        .answer_outbound(
            &tampered,
            &callmeback_tests::twilio_sim::new_call_sid(),
            TEST_FROM_NUMBER,
            CALLEE,
        )
        .await
        .unwrap();
    assert_eq!(answer.verbs().unwrap(), [Verb::Reject]);
}

#[tokio::test]
async fn invalid_requests_get_400_naming_the_field() {
    // Proves each invalid request is refused with 400 and a JSON body naming what is wrong, without calling Twilio.
    let s = setup().await;
    let cases = [
        (json!({"to": "+1 123 456 7890", "persona": "ada"}), "to"),
        (json!({"to": "call me maybe", "persona": "ada"}), "to"),
        (json!({"to": CALLEE, "persona": "nobody"}), "persona"),
        (
            json!({"to": CALLEE, "persona": "ada", "pretext": "x".repeat(1001)}),
            "pretext",
        ),
        (
            json!({"to": CALLEE, "persona": "ada", "pretext": "bell \u{7}"}),
            "pretext",
        ),
        (
            json!({"to": CALLEE, "persona": "ada", "user": "u".repeat(129)}),
            "user",
        ),
        (
            json!({"to": CALLEE, "persona": "ada", "from": "+0123"}),
            "from",
        ),
        (
            json!({"to": CALLEE, "persona": "ada", "colour": "blue"}),
            "body",
        ),
        (json!({"persona": "ada"}), "body"),
    ];
    for (body, field) in cases {
        let (status, answer) = s.call(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"], "invalid_request");
        let fields: Vec<&str> = answer["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{body} -> {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }
    let raw = s
        .http
        .post(format!("{}/v1/calls", s.pod.app_url))
        .bearer_auth(TEST_API_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    assert!(
        s.rest.calls().is_empty() && s.rest.rejected().is_empty(),
        "Twilio was never called"
    );
    assert_eq!(
        s.pod
            .metric("voice_outbound_calls_total", &[("result", "invalid")])
            .await
            .unwrap(),
        10.0
    );
}

#[tokio::test]
async fn the_dialler_refuses_premium_foreign_and_network_numbers_and_reads_national_ones_locally() {
    // Proves POST /v1/calls dials only what the deployment allows: with a US caller
    // ID (and no CALLMEBACK_DIAL_* settings) a premium-rate +1 900 number, a UK
    // number and an international-network +882 number are refused with 403 and
    // their reason, each counted in voice_refusals_total; a national number is
    // read as a US number and placed in E.164; Twilio sees only that one.
    let s = setup().await;
    for (to, reason) in [
        ("+19002345678", "dial_premium_rate"),
        ("+442079460958", "dial_not_allowed"),
        ("+882 39 0123 456789", "dial_not_allowed"),
    ] {
        let (status, answer) = s.call(json!({"to": to, "persona": "ada"})).await;
        assert_eq!(status, 403, "{to} -> {answer}");
        assert_eq!(answer["error"], reason, "{to} -> {answer}");
        assert!(!answer["message"].as_str().unwrap_or("").is_empty());
    }
    assert!(
        s.rest.calls().is_empty(),
        "Twilio was never asked to dial them"
    );
    for (reason, n) in [("dial_premium_rate", 1.0), ("dial_not_allowed", 2.0)] {
        assert_eq!(
            s.pod
                .metric("voice_refusals_total", &[("reason", reason)])
                .await
                .unwrap(),
            n,
            "{reason}"
        );
    }

    let (status, answer) = s
        .call(json!({"to": "(415) 555-0199", "persona": "ada"}))
        .await;
    assert_eq!(status, 201, "{answer}");
    let calls = s.rest.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].form.get("To"), Some(CALLEE));
}

#[tokio::test]
async fn out_of_range_times_get_400_with_a_reason_and_are_counted() {
    // Proves times and durations far outside their range (the `"in": "9000000000000"`
    // that overflowed the clock and dropped the connection) are refused with 400 naming
    // the field and the bound, counted in voice_refusals_total, and never reach Twilio.
    let s = setup().await;
    let cases = [
        (json!({"in": "9000000000000"}), "in", "at most"),
        (json!({"in": "18446744073709551615"}), "in", "at most"),
        (json!({"in": "100000000000000y"}), "in", ""),
        (json!({"at": "9999-12-31T23:59:59Z"}), "at", "ahead"),
        (json!({"at": "0001-01-01T00:00:00Z"}), "at", "past"),
        (
            json!({"in": "5m", "maxLateness": "9000000000000"}),
            "maxLateness",
            "at most",
        ),
        (
            json!({"in": "5m", "retries": 1, "retryDelay": "9000000000000s"}),
            "retryDelay",
            "at most",
        ),
    ];
    for (extra, field, reason) in &cases {
        let mut body = json!({"to": CALLEE, "persona": "ada"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, answer) = s.call(body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        let problem = answer["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["field"] == *field)
            .unwrap_or_else(|| panic!("{body} -> {answer}"));
        assert!(
            problem["problem"].as_str().unwrap().contains(reason),
            "{body} -> {answer}"
        );
    }
    assert!(s.rest.calls().is_empty(), "Twilio was never called");
    // Six range refusals; "100000000000000y" does not parse at all (a plain 400).
    assert_eq!(
        s.pod
            .metric("voice_refusals_total", &[("reason", "time_out_of_range")])
            .await
            .unwrap(),
        6.0
    );
    // The pod is still serving.
    let (status, _) = s
        .call(json!({"to": CALLEE, "persona": "ada", "in": "bogus"}))
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_api_requires_the_bearer_token_and_is_off_without_one() {
    // Proves missing or wrong tokens get 401, and a pod without CALLMEBACK_API_TOKEN answers 503.
    let s = setup().await;
    let body = json!({"to": CALLEE, "persona": "ada"});
    let (status, answer) = s.call_with_token(body.clone(), None).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = s
        .call_with_token(body.clone(), Some("wrong-token-wrong-token"))
        .await;
    assert_eq!(status, 401);
    let (status, _) = s
        .call_with_token(
            body.clone(),
            Some(&TEST_API_TOKEN[..TEST_API_TOKEN.len() - 1]),
        )
        .await;
    assert_eq!(status, 401, "a prefix of the token is not the token");
    assert!(s.rest.calls().is_empty());

    let off = TestPod::start(TestPodOptions {
        api_token: None,
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    let resp = s
        .http
        .post(format!("{}/v1/calls", off.app_url))
        .bearer_auth(TEST_API_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "api_disabled");
}

#[tokio::test]
async fn twilio_errors_pass_through_with_their_code() {
    // Proves Twilio's error code reaches the API caller: its 400s stay 400, other failures are 502.
    let s = setup().await;
    let body = json!({"to": CALLEE, "persona": "ada"});
    s.rest.fail_next(
        400,
        21215,
        "Geo Permission configuration is not permitting call",
    );
    let (status, answer) = s.call(body.clone()).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "twilio_error");
    assert_eq!(answer["twilio"]["code"], 21215);
    assert_eq!(answer["twilio"]["status"], 400);
    assert!(
        answer["twilio"]["more_info"]
            .as_str()
            .unwrap()
            .contains("21215")
    );

    s.rest.fail_next(401, 20003, "Authenticate");
    let (status, answer) = s.call(body.clone()).await;
    assert_eq!(status, 502);
    assert_eq!(answer["twilio"]["code"], 20003);

    let (status, _) = s.call(body).await;
    assert_eq!(status, 201, "the next request goes through");
    assert_eq!(
        s.pod
            .metric("voice_outbound_calls_total", &[("result", "twilio_error")])
            .await
            .unwrap(),
        2.0
    );
}

#[tokio::test]
async fn call_records_are_unavailable_without_persistence() {
    // Proves GET /v1/calls/{sid} answers 503 with a clear reason when DATABASE_URL is unset.
    let s = setup().await;
    let resp = s
        .http
        .get(format!("{}/v1/calls/CA123", s.pod.app_url))
        .bearer_auth(TEST_API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "persistence_disabled"
    );
}
