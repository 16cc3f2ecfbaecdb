//! The PostgreSQL store against a real server: schema, a whole call's records,
//! idempotent retries, concurrency, relationships.

use std::time::Duration;

use callmeback_api::{PersonaSpec, Price};
use callmeback_tests::postgres::{TestDb, metric_value};
use chrono::{TimeZone, Utc};
use sqlx::Row;
use uuid::Uuid;
use voice_pod::metrics::Metrics;
use voice_pod::session::{CallSpec, Direction};
use voice_pod::store::postgres::MIGRATOR;
use voice_pod::store::pricing::PriceTable;
use voice_pod::store::queries::CallFilter;
use voice_pod::store::records::{
    CallRef, CallStatus, CallUpdate, NewCall, Speaker, TurnLatency, TurnRecord, UsageRecord,
    UsageUnit,
};
use voice_pod::store::relationships::RelationshipOverrides;
use voice_pod::store::{
    CallCreated, CallRecords, CallStatusChange, PgStore, StoreConfig, StoreHealth,
};

const FLUSH: Duration = Duration::from_secs(30);

fn prices() -> PriceTable {
    let p = |provider: &str, unit: &str, usd: &str| Price {
        provider: provider.into(),
        unit: unit.into(),
        usd_per_unit: usd.into(),
    };
    PriceTable::from_prices(&[
        p("deepgram", "stt_seconds", "0.0000716"),
        p("cerebras", "llm_input_tokens", "0.00000025"),
        p("cerebras", "llm_output_tokens", "0.00000069"),
        p("elevenlabs", "tts_characters", "0.00005"),
        p("twilio", "telephony_seconds", "0.00023"),
    ])
    .unwrap()
}

async fn start(db: &TestDb) -> (PgStore, Metrics) {
    let metrics = Metrics::new();
    let mut cfg = StoreConfig::new(&db.url);
    cfg.prices = prices();
    let store = PgStore::start(cfg, &metrics).await.expect("store starts");
    (store, metrics)
}

fn persona_spec() -> PersonaSpec {
    serde_saphyr::from_str(
        "displayName: Ava\nsystemPrompt: You are Ava, a cheerful assistant.\ngreeting: Hi, it's Ava!\nvoice:\n  voiceId: ava_default\n",
    )
    .unwrap()
}

// Migrations build the whole schema on an empty database, and running them again changes nothing.
#[tokio::test]
async fn migrations_build_the_schema_from_empty_and_rerun_cleanly() {
    let db = TestDb::create().await;
    let (store, _m) = start(&db).await;
    assert_eq!(store.health(), StoreHealth::Up);
    let mut conn = db.connect().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "call_turns",
            "call_usage",
            "calls",
            "dial_rate_windows",
            "relationships",
            "stream_claims",
            "user_numbers",
            "user_tokens"
        ]
    );
    let fk: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.referential_constraints rc \
         JOIN information_schema.table_constraints tc USING (constraint_name) \
         WHERE tc.table_name IN ('call_turns', 'call_usage')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(fk, 2, "turns and usage reference calls");
    MIGRATOR
        .run(store.pool())
        .await
        .expect("migrations are idempotent");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied as usize, MIGRATOR.iter().count());
    store.shutdown(Duration::from_secs(5)).await;
}

// A whole outbound call (created, Twilio callbacks, turns with a barge-in cut, usage, end) leaves the right record, transcript and exact costs.
#[tokio::test]
async fn a_simulated_call_leaves_its_record_transcript_and_costs() {
    let db = TestDb::create().await;
    let (store, metrics) = start(&db).await;
    let t0 = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);

    // POST /v1/calls: the edge reports through the seam.
    let call_id = Uuid::new_v4();
    CallRecords::call_created(
        &store,
        CallCreated {
            spec: CallSpec {
                call_id: call_id.to_string(),
                persona: "ava".into(),
                direction: Direction::Outbound,
                from: Some("+14155550100".into()),
                to: Some("+14155550199".into()),
                pretext: Some("get me out of this date".into()),
                user: Some("user-42".into()),
            },
            call_sid: None,
            status: "queued".into(),
        },
    )
    .await
    .unwrap();
    // The REST answer gives the CallSid; Twilio then calls back.
    store
        .update_call(
            CallRef::Id(call_id),
            CallUpdate {
                call_sid: Some("CA0001".into()),
                pod: Some("voice-pod-0".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let callback = |status: &str, duration: Option<u32>| CallStatusChange {
        call_sid: "CA0001".into(),
        call_id: None,
        status: status.into(),
        duration_seconds: duration,
        answered_by: None,
    };
    CallRecords::call_status(&store, callback("ringing", None))
        .await
        .unwrap();
    CallRecords::call_status(&store, callback("in-progress", None))
        .await
        .unwrap();
    store
        .update_call(
            CallRef::Id(call_id),
            CallUpdate {
                started_at: Some(at(0)),
                ..Default::default()
            },
        )
        .unwrap();

    // The conversation, with the reply at sequence 3 cut by barge-in.
    let turn = |seq: i32, speaker, text: &str| TurnRecord::new(call_id, seq, speaker, text);
    let mut greeting = turn(0, Speaker::Persona, "Hi, it's Ava!");
    greeting.first_audio_at = Some(at(300));
    let mut ask = turn(1, Speaker::Caller, "Hey Ava, what's the weather tomorrow?");
    ask.end_of_speech_at = Some(at(4000));
    let mut reply = turn(
        2,
        Speaker::Persona,
        "Tomorrow looks sunny with a high of 22.",
    );
    reply.end_of_speech_at = Some(at(4000));
    reply.first_audio_at = Some(at(4650));
    reply.latency = TurnLatency {
        stt_ms: Some(180),
        llm_ms: Some(240),
        tts_ms: Some(150),
        total_ms: Some(650),
    };
    let mut ask2 = turn(3, Speaker::Caller, "And the day after?");
    ask2.end_of_speech_at = Some(at(9000));
    let mut cut = turn(4, Speaker::Persona, "The day after brings");
    cut.interrupted = true;
    cut.first_audio_at = Some(at(9700));
    let bye = turn(5, Speaker::Caller, "Thanks, bye!");
    for t in [greeting, ask, reply.clone(), ask2, cut, bye] {
        store.turn(t).unwrap();
    }
    // A retried report of the same turn must not duplicate it.
    store.turn(reply).unwrap();

    // Usage totals, reported twice (mid-call and final): the final one counts.
    store
        .usage(UsageRecord::new(call_id, UsageUnit::SttSeconds, 30.0))
        .unwrap();
    for (unit, q) in [
        (UsageUnit::SttSeconds, 62.5),
        (UsageUnit::LlmInputTokens, 1200.0),
        (UsageUnit::LlmOutputTokens, 85.0),
        (UsageUnit::TtsCharacters, 140.0),
        (UsageUnit::TelephonySeconds, 64.0),
    ] {
        store.usage(UsageRecord::new(call_id, unit, q)).unwrap();
    }
    // The session ends the call; Twilio's completed callback comes later and must
    // not overwrite the pod's outcome; a late "ringing" must not move it back.
    store
        .update_call(
            CallRef::Id(call_id),
            CallUpdate {
                status: Some(CallStatus::Completed),
                ended_at: Some(at(64_000)),
                outcome: Some("caller_hangup".into()),
                duration_seconds: Some(64),
                ..Default::default()
            },
        )
        .unwrap();
    CallRecords::call_status(&store, callback("completed", Some(64)))
        .await
        .unwrap();
    CallRecords::call_status(&store, callback("ringing", None))
        .await
        .unwrap();
    store.flush(FLUSH).await.unwrap();

    let detail = store
        .call_detail(&CallRef::Sid("CA0001".into()))
        .await
        .unwrap()
        .expect("the call is stored");
    let c = &detail.call;
    assert_eq!(c.id, call_id);
    assert_eq!(c.direction, Direction::Outbound);
    assert_eq!(c.status, CallStatus::Completed);
    assert_eq!(
        c.twilio_status.as_deref(),
        Some("completed"),
        "Twilio's last in-order status, verbatim"
    );
    assert_eq!(c.outcome.as_deref(), Some("caller_hangup"));
    assert_eq!(c.ended_at, Some(at(64_000)));
    assert_eq!(c.started_at, Some(at(0)));
    assert!(c.answered_at.is_some());
    assert_eq!(c.duration_seconds, Some(64));
    assert_eq!(c.user_id.as_deref(), Some("user-42"));
    assert_eq!(c.pretext.as_deref(), Some("get me out of this date"));
    assert_eq!(c.pod.as_deref(), Some("voice-pod-0"));

    let texts: Vec<(i32, Speaker, &str, bool)> = detail
        .transcript
        .iter()
        .map(|t| (t.sequence, t.speaker, t.text.as_str(), t.interrupted))
        .collect();
    assert_eq!(
        texts,
        [
            (0, Speaker::Persona, "Hi, it's Ava!", false),
            (
                1,
                Speaker::Caller,
                "Hey Ava, what's the weather tomorrow?",
                false
            ),
            (
                2,
                Speaker::Persona,
                "Tomorrow looks sunny with a high of 22.",
                false
            ),
            (3, Speaker::Caller, "And the day after?", false),
            (4, Speaker::Persona, "The day after brings", true),
            (5, Speaker::Caller, "Thanks, bye!", false),
        ]
    );
    let reply = &detail.transcript[2];
    assert_eq!(reply.latency.total_ms, Some(650));
    assert_eq!(reply.latency.llm_ms, Some(240));
    assert_eq!(reply.first_audio_at, Some(at(4650)));

    let cost = |unit: UsageUnit| {
        let item = detail.costs.items.iter().find(|i| i.unit == unit).unwrap();
        (
            item.quantity.as_str(),
            item.unit_price_usd.as_deref().unwrap(),
            item.cost_usd.as_deref().unwrap(),
        )
    };
    assert_eq!(
        cost(UsageUnit::SttSeconds),
        ("62.5", "0.0000716", "0.00447500")
    );
    assert_eq!(
        cost(UsageUnit::LlmInputTokens),
        ("1200", "0.00000025", "0.00030000")
    );
    assert_eq!(
        cost(UsageUnit::LlmOutputTokens),
        ("85", "0.00000069", "0.00005865")
    );
    assert_eq!(
        cost(UsageUnit::TtsCharacters),
        ("140", "0.00005", "0.00700")
    );
    assert_eq!(
        cost(UsageUnit::TelephonySeconds),
        ("64", "0.00023", "0.01472")
    );
    assert_eq!(detail.costs.items.len(), 5);
    assert!(detail.costs.complete);
    // 0.004475 + 0.0003 + 0.00005865 + 0.007 + 0.01472
    assert_eq!(detail.costs.total_usd.as_deref(), Some("0.02655365"));

    // The call counts once in the caller's relationship, with the number called.
    let rel = store.relationship("user-42", "ava").await.unwrap().unwrap();
    assert_eq!(rel.call_count, 1);
    assert_eq!(rel.phone_number.as_deref(), Some("+14155550199"));
    assert_eq!(rel.last_call_at, Some(at(64_000)));

    let registry = metrics.registry();
    assert_eq!(
        metric_value(registry, "voice_store_dropped_records_total", &[]),
        0.0
    );
    assert_eq!(
        metric_value(
            registry,
            "voice_store_written_records_total",
            &[("kind", "turn")]
        ),
        7.0
    );
    assert_eq!(
        metric_value(registry, "voice_store_pending_records", &[]),
        0.0
    );

    // The list shows it with its total.
    let list = store
        .list_calls(&CallFilter {
            user: Some("user-42".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].total_cost_usd.as_deref(), Some("0.02655365"));
    store.shutdown(Duration::from_secs(5)).await;
}

// Twenty calls writing at once keep their own turns, in their own order.
#[tokio::test]
async fn concurrent_calls_do_not_interleave_turns() {
    let db = TestDb::create().await;
    let (store, _m) = start(&db).await;
    const CALLS: usize = 20;
    const TURNS: i32 = 40;
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut call = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
            call.call_sid = Some(format!("CAconc{i}"));
            let id = call.id;
            store.new_call(call).unwrap();
            for seq in 0..TURNS {
                let speaker = if seq % 2 == 0 {
                    Speaker::Persona
                } else {
                    Speaker::Caller
                };
                store
                    .turn(TurnRecord::new(
                        id,
                        seq,
                        speaker,
                        format!("call {i} turn {seq}"),
                    ))
                    .unwrap();
                // Interleave the calls' submissions on the runtime.
                tokio::task::yield_now().await;
            }
            (i, id)
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    store.flush(FLUSH).await.unwrap();
    let mut conn = db.connect().await;
    for (i, id) in ids {
        let rows = sqlx::query(
            "SELECT sequence, text FROM call_turns WHERE call_id = $1 ORDER BY sequence",
        )
        .bind(id)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(rows.len(), TURNS as usize, "call {i}");
        for (seq, row) in rows.iter().enumerate() {
            assert_eq!(row.get::<i32, _>("sequence"), seq as i32);
            assert_eq!(row.get::<String, _>("text"), format!("call {i} turn {seq}"));
        }
    }
    store.shutdown(Duration::from_secs(5)).await;
}

// A caller's prompt and voice overrides come back for their next call and reshape the persona; other callers get the defaults.
#[tokio::test]
async fn relationship_overrides_change_the_next_calls_voice_and_prompt() {
    let db = TestDb::create().await;
    let (store, metrics) = start(&db).await;
    assert!(store.load_relationship("sam", "ava").await.is_none());

    store
        .set_relationship_overrides(
            "sam",
            "ava",
            &RelationshipOverrides {
                custom_system_prompt: Some("You are Ava, Sam's oldest friend. Be teasing.".into()),
                custom_voice_id: Some("warm_voice_7".into()),
                phone_number: Some("+14155550123".into()),
            },
        )
        .await
        .unwrap();
    let rel = store.load_relationship("sam", "ava").await.expect("loaded");
    let mut spec = persona_spec();
    rel.apply_to(&mut spec);
    assert_eq!(spec.voice.voice_id, "warm_voice_7");
    assert_eq!(
        spec.system_prompt,
        "You are Ava, Sam's oldest friend. Be teasing."
    );

    // Clearing the voice keeps the prompt.
    store
        .set_relationship_overrides(
            "sam",
            "ava",
            &RelationshipOverrides {
                custom_voice_id: Some(String::new()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rel = store.load_relationship("sam", "ava").await.unwrap();
    assert_eq!(rel.custom_voice_id, None);
    assert!(rel.custom_system_prompt.is_some());
    assert_eq!(rel.phone_number.as_deref(), Some("+14155550123"));

    // Someone else gets the persona unchanged.
    assert!(store.load_relationship("alex", "ava").await.is_none());
    let registry = metrics.registry();
    assert_eq!(
        metric_value(
            registry,
            "voice_store_relationship_lookups_total",
            &[("result", "hit")]
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            registry,
            "voice_store_relationship_lookups_total",
            &[("result", "miss")]
        ),
        2.0
    );
    store.shutdown(Duration::from_secs(5)).await;
}

// The same records written twice (a retry after an unconfirmed commit) leave one row each and count the call once.
#[tokio::test]
async fn replayed_records_are_idempotent() {
    let db = TestDb::create().await;
    let (store, _m) = start(&db).await;
    let mut call = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    call.user_id = Some("+14155550111".into());
    call.from_number = Some("+14155550111".into());
    let id = call.id;
    let end = CallUpdate {
        status: Some(CallStatus::Completed),
        ended_at: Some(Utc::now()),
        outcome: Some("hangup".into()),
        ..Default::default()
    };
    for _ in 0..2 {
        store.new_call(call.clone()).unwrap();
        store
            .turn(TurnRecord::new(id, 0, Speaker::Persona, "Hello"))
            .unwrap();
        store
            .usage(UsageRecord::new(id, UsageUnit::TtsCharacters, 5.0))
            .unwrap();
        store.update_call(CallRef::Id(id), end.clone()).unwrap();
        store.flush(FLUSH).await.unwrap();
    }
    let mut conn = db.connect().await;
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM calls), (SELECT count(*) FROM call_turns), \
                (SELECT count(*) FROM call_usage)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(counts, (1, 1, 1));
    let rel = store
        .relationship("+14155550111", "ava")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rel.call_count, 1);
    assert_eq!(rel.phone_number.as_deref(), Some("+14155550111"));
    store.shutdown(Duration::from_secs(5)).await;
}
