//! Single use of stream contexts across pods, against a real PostgreSQL: two pods'
//! claim registries sharing one database.

use std::sync::Arc;
use std::time::Duration;

use callmeback_tests::emulators::twilio_rest::TwilioRestEmulator;
use callmeback_tests::postgres::TestDb;
use callmeback_tests::twilio_sim::{
    ProbeHandler, TEST_ACCOUNT_SID, TEST_API_TOKEN, TEST_AUTH_TOKEN, TestPod, TestPodOptions, Verb,
    eventually, parse_twiml,
};
use serde_json::json;
use voice_pod::metrics::Metrics;
use voice_pod::store::{PgStore, StoreConfig};
use voice_pod::twilio::context::unix_now;
use voice_pod::twilio::stream_claims::{AlreadyUsed, StreamClaims};

const SID: &str = "CA0123456789abcdef0123456789abcdef";

async fn pod_claims(db: &TestDb) -> (PgStore, StreamClaims) {
    let metrics = Metrics::new();
    let store = PgStore::start(StoreConfig::new(&db.url), &metrics)
        .await
        .expect("store starts");
    let claims = StreamClaims::new(Some(store.pool().clone()), Arc::new(metrics));
    (store, claims)
}

#[tokio::test]
async fn a_context_claimed_on_one_pod_is_refused_on_another() {
    // Proves the first stream wins cluster-wide: pod B refuses a context pod A
    // claimed (B never saw it in memory), while other contexts still pass on B, and
    // the table keeps only a hash of the signature.
    let db = TestDb::create().await;
    let (_a_store, a) = pod_claims(&db).await;
    let (_b_store, b) = pod_claims(&db).await;
    let now = unix_now();
    assert_eq!(a.claim("sig-one", SID, now + 10, now).await, Ok(()));
    assert_eq!(
        b.claim("sig-one", SID, now + 10, now).await,
        Err(AlreadyUsed)
    );
    assert_eq!(b.claim("sig-two", SID, now + 10, now).await, Ok(()));
    assert_eq!(
        a.claim("sig-two", SID, now + 10, now).await,
        Err(AlreadyUsed)
    );
    let stored: Vec<String> = sqlx::query_scalar("SELECT context_hash FROM stream_claims")
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|h| h.len() == 64 && !h.contains("sig")));
}

#[tokio::test]
async fn an_outbound_context_opens_only_the_stream_of_the_call_it_was_placed_as() {
    // Proves the outbound binding (issue 15): an outbound call's inline-TwiML context
    // carries no CallSid, but once the call row holds the CallSid Twilio answered
    // with, a stream of any other CallSid presenting that context is refused (before
    // single use would have let it win and locked the real call out), and the real
    // call's stream is served.
    const T: Duration = Duration::from_secs(5);
    let db = TestDb::create().await;
    let metrics = Metrics::new();
    let store = PgStore::start(StoreConfig::new(&db.url), &metrics)
        .await
        .expect("store starts");
    let rest = TwilioRestEmulator::start(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN)
        .await
        .unwrap();
    let probe = ProbeHandler::new();
    let pod = TestPod::start(TestPodOptions {
        twilio_api_url: Some(rest.base_url()),
        handler: Some(probe.clone()),
        store: Some(store.clone()),
        ..TestPodOptions::default()
    })
    .await
    .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/calls", pod.app_url))
        .bearer_auth(TEST_API_TOKEN)
        .json(&json!({"to": "+14155550199", "persona": "ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let body: serde_json::Value = resp.json().await.unwrap();
    let id = uuid::Uuid::parse_str(body["id"].as_str().unwrap()).unwrap();
    let placed = rest.calls()[0].clone();
    let recorded = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT call_sid FROM calls WHERE id = $1")
            .bind(id)
            .fetch_optional(store.pool())
            .await
            .ok()
            .flatten()
            .flatten()
            .is_some_and(|sid| sid == placed.sid)
    };
    assert!(
        eventually(T, recorded).await,
        "the call row got its CallSid"
    );
    let verbs = parse_twiml(placed.form.get("Twiml").unwrap()).unwrap();
    let [Verb::ConnectStream(stream)] = verbs.as_slice() else {
        panic!("{verbs:?}")
    };
    let sim = pod.sim();

    let mut other = sim.open_stream(stream).await.unwrap();
    other.send_connected().await.unwrap();
    other
        .send_start(
            "CAffffffffffffffffffffffffffffffff",
            TEST_ACCOUNT_SID,
            &stream.custom_parameters(),
        )
        .await
        .unwrap();
    let closed = other.wait_closed(T).await;
    assert_eq!(
        closed.as_ref().and_then(|(code, _)| *code),
        Some(1008),
        "{closed:?}"
    );
    assert!(
        probe.calls().is_empty(),
        "no handler ran for the other call"
    );

    let mut real = sim.open_stream(stream).await.unwrap();
    real.send_connected().await.unwrap();
    real.send_start(&placed.sid, TEST_ACCOUNT_SID, &stream.custom_parameters())
        .await
        .unwrap();
    real.send_stop().await.unwrap();
    assert!(
        eventually(T, || async {
            probe.calls().first().is_some_and(|c| c.ended)
        })
        .await,
        "the real call was served"
    );
}
