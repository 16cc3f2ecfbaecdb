//! The call-history API (`GET /v1/calls/{sid}`, `GET /v1/calls`) of the real
//! `voice-pod serve` binary over a real socket: auth, the record with transcript and
//! costs, the list and its filters, and clear 400s for bad queries. Records are
//! written beforehand through the store, into the database the pod reads.

use std::time::Duration;

use callmeback_api::Price;
use callmeback_tests::call_harness::{PodProcess, persona_json};
use callmeback_tests::postgres::TestDb;
use serde_json::Value;
use voice_pod::metrics::Metrics;
use voice_pod::session::Direction;
use voice_pod::store::pricing::PriceTable;
use voice_pod::store::records::{
    CallRef, CallStatus, CallUpdate, NewCall, Speaker, TurnRecord, UsageRecord, UsageUnit,
};
use voice_pod::store::{PgStore, StoreConfig};

const TOKEN: &str = "store-api-test-token-0123456789";

async fn get(base: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

// With a token and a database, the pod serves a call's record, transcript and costs by CallSid or id, lists calls by user, and refuses bad tokens and bad queries.
#[tokio::test]
async fn call_history_serves_record_transcript_and_costs() {
    let db = TestDb::create().await;
    let metrics = Metrics::new();
    let mut cfg = StoreConfig::new(&db.url);
    cfg.prices = PriceTable::from_prices(&[Price {
        provider: "twilio".into(),
        unit: "telephony_seconds".into(),
        usd_per_unit: "0.00025".into(),
    }])
    .unwrap();
    let store = PgStore::start(cfg, &metrics).await.unwrap();

    let mut call = NewCall::new(Direction::Outbound, "ava", CallStatus::Queued);
    call.call_sid = Some("CAapi1".into());
    call.user_id = Some("user-7".into());
    call.to_number = Some("+14155550142".into());
    let id = call.id;
    store.new_call(call).unwrap();
    store
        .turn(TurnRecord::new(id, 0, Speaker::Persona, "Hi!"))
        .unwrap();
    let mut cut = TurnRecord::new(id, 1, Speaker::Persona, "I was about to");
    cut.interrupted = true;
    store.turn(cut).unwrap();
    store
        .usage(UsageRecord::new(id, UsageUnit::TelephonySeconds, 40.0))
        .unwrap();
    store
        .usage(UsageRecord::new(id, UsageUnit::TtsCharacters, 17.0))
        .unwrap();
    store
        .update_call(
            CallRef::Id(id),
            CallUpdate {
                status: Some(CallStatus::Completed),
                ..Default::default()
            },
        )
        .unwrap();
    let other = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    store.new_call(other).unwrap();
    store.flush(Duration::from_secs(30)).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.yaml");
    std::fs::write(
        &prices,
        "- provider: twilio\n  unit: telephony_seconds\n  usdPerUnit: \"0.00025\"\n",
    )
    .unwrap();
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", db.url.as_str()),
        ("CALLMEBACK_API_TOKEN", TOKEN),
        ("CALLMEBACK_PRICES_FILE", prices.to_str().unwrap()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // A pod is ready once it has a persona to answer with.
    let persona = persona_json(serde_json::json!({}));
    let pod = PodProcess::start_with_env(&[("ava", persona)], &env)
        .await
        .unwrap();
    let addr = pod.app_url.as_str();

    assert_eq!(get(addr, "/v1/calls/CAapi1", None).await.0, 401);
    assert_eq!(get(addr, "/v1/calls/CAapi1", Some("wrong")).await.0, 401);
    assert_eq!(
        get(addr, "/v1/calls", Some(&TOKEN[..TOKEN.len() - 1]))
            .await
            .0,
        401
    );

    let (status, body) = get(addr, "/v1/calls/CAapi1", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["call_sid"], "CAapi1");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["direction"], "outbound");
    assert_eq!(body["user"], "user-7");
    assert_eq!(body["to"], "+14155550142");
    assert_eq!(body["transcript"][0]["text"], "Hi!");
    assert_eq!(body["transcript"][1]["text"], "I was about to");
    assert_eq!(body["transcript"][1]["interrupted"], true);
    assert_eq!(body["transcript"][1]["speaker"], "persona");
    assert_eq!(body["costs"]["currency"], "USD");
    assert_eq!(body["costs"]["total_usd"], "0.01000");
    assert_eq!(body["costs"]["complete"], false, "TTS has no price");
    let items = body["costs"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let tts = items
        .iter()
        .find(|i| i["unit"] == "tts_characters")
        .unwrap();
    assert_eq!(tts["quantity"], "17");
    assert_eq!(tts["cost_usd"], Value::Null);

    let (status, by_id) = get(addr, &format!("/v1/calls/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(by_id, body);

    assert_eq!(get(addr, "/v1/calls/CAnope", Some(TOKEN)).await.0, 404);

    let (status, list) = get(addr, "/v1/calls?user=user-7&limit=10", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let calls = list["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["call_sid"], "CAapi1");
    assert_eq!(calls[0]["total_cost_usd"], "0.01000");

    let (_, all) = get(addr, "/v1/calls?persona=ava", Some(TOKEN)).await;
    assert_eq!(all["calls"].as_array().unwrap().len(), 2);
    let (_, live) = get(addr, "/v1/calls?status=in-progress", Some(TOKEN)).await;
    assert_eq!(live["calls"].as_array().unwrap().len(), 1);

    let (status, err) = get(addr, "/v1/calls?status=exploded", Some(TOKEN)).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"], "invalid_request");
    assert!(
        err["message"].as_str().unwrap().contains("exploded"),
        "{err}"
    );
    assert_eq!(get(addr, "/v1/calls?limit=0", Some(TOKEN)).await.0, 400);
    assert_eq!(get(addr, "/v1/calls?limit=many", Some(TOKEN)).await.0, 400);
    store.shutdown(Duration::from_secs(5)).await;
    pod.stop().await.unwrap();
}
