//! Relationship memory after a call: an LLM summary (the Cerebras client against the
//! Cerebras emulator over real HTTP) appended to PostgreSQL, bounded, once per call.

use std::sync::Arc;
use std::time::Duration;

use callmeback_api::PersonaSpec;
use callmeback_tests::emulators::cerebras::{CerebrasEmulator, CerebrasEmulatorConfig, Reply};
use callmeback_tests::postgres::TestDb;
use chrono::Utc;
use uuid::Uuid;
use voice_pod::metrics::Metrics;
use voice_pod::providers::cerebras::{Cerebras, CerebrasConfig};
use voice_pod::secret::Secret;
use voice_pod::session::Direction;
use voice_pod::store::memory::{Summary, remember_call};
use voice_pod::store::records::{CallRef, CallStatus, CallUpdate, NewCall, Speaker, TurnRecord};
use voice_pod::store::{PgStore, StoreConfig};

const FLUSH: Duration = Duration::from_secs(30);

/// The emulated model writes a note from what the caller said, so the test proves the
/// transcript reached it.
async fn summariser() -> CerebrasEmulator {
    CerebrasEmulator::start(CerebrasEmulatorConfig {
        reply: Arc::new(|call| {
            let user = call.last_user().unwrap_or_default();
            let system = &call.messages[0].1;
            let note = if !system.contains("memory notes") {
                "wrong prompt"
            } else if user.contains("Caller: I'm planning a trip to Lisbon") {
                "Sam is planning a trip to Lisbon in May."
            } else if user.contains("Caller: I booked the flights") {
                "Sam booked the Lisbon flights and wants restaurant tips."
            } else if user.contains("Caller: call") {
                "Sam called again about the same old thing, nothing new at all."
            } else {
                "NOTHING"
            };
            Reply::text(note)
        }),
        ..CerebrasEmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

fn model(emu: &CerebrasEmulator) -> Cerebras {
    Cerebras::new(
        CerebrasConfig::new(emu.base_url(), Secret::new(emu.api_key())),
        Arc::new(Metrics::new()),
    )
    .expect("client")
}

fn persona(max_chars: u32, enabled: bool) -> PersonaSpec {
    let mut p: PersonaSpec = serde_saphyr::from_str(
        "displayName: Ava\nsystemPrompt: You are Ava.\ngreeting: Hi!\nvoice:\n  voiceId: ava\n",
    )
    .unwrap();
    p.memory.max_chars = max_chars;
    p.memory.enabled = enabled;
    p
}

/// Records a short finished call by `user` and returns its id and transcript.
fn call(store: &PgStore, user: &str, caller_says: &str) -> (Uuid, Vec<TurnRecord>) {
    let mut c = NewCall::new(Direction::Outbound, "ava", CallStatus::InProgress);
    c.user_id = Some(user.into());
    let id = c.id;
    store.new_call(c).unwrap();
    let turns = vec![
        TurnRecord::new(id, 0, Speaker::Persona, "Hi, it's Ava!"),
        TurnRecord::new(id, 1, Speaker::Caller, caller_says),
        TurnRecord::new(id, 2, Speaker::Persona, "How lovely!"),
    ];
    for t in &turns {
        store.turn(t.clone()).unwrap();
    }
    store
        .update_call(
            CallRef::Id(id),
            CallUpdate {
                status: Some(CallStatus::Completed),
                ended_at: Some(Utc::now()),
                ..Default::default()
            },
        )
        .unwrap();
    (id, turns)
}

// Each call's summary becomes a dated memory line, the next call's persona prompt carries them, and a repeated summary of the same call is not appended twice.
#[tokio::test]
async fn memory_grows_after_each_call_and_reaches_the_next_prompt() {
    let db = TestDb::create().await;
    let store = PgStore::start(StoreConfig::new(&db.url), &Metrics::new())
        .await
        .unwrap();
    let emu = summariser().await;
    let llm = model(&emu);
    let spec = persona(4000, true);
    let today = Utc::now().format("%Y-%m-%d").to_string();

    let (first, turns) = call(&store, "sam", "I'm planning a trip to Lisbon in May");
    assert!(
        remember_call(&store, &llm, "ava", &spec, "sam", first, &turns)
            .await
            .unwrap()
            .note
            .is_some()
    );
    store.flush(FLUSH).await.unwrap();
    let rel = store.relationship("sam", "ava").await.unwrap().unwrap();
    assert_eq!(
        rel.memory,
        format!("{today}: Sam is planning a trip to Lisbon in May.")
    );
    assert_eq!(rel.call_count, 1);

    let (second, turns) = call(&store, "sam", "I booked the flights yesterday");
    assert!(
        remember_call(&store, &llm, "ava", &spec, "sam", second, &turns)
            .await
            .unwrap()
            .note
            .is_some()
    );
    // The same call summarised again (a retry after a crash) adds nothing.
    assert!(
        remember_call(&store, &llm, "ava", &spec, "sam", second, &turns)
            .await
            .unwrap()
            .note
            .is_some()
    );
    store.flush(FLUSH).await.unwrap();
    let rel = store.load_relationship("sam", "ava").await.unwrap();
    assert_eq!(
        rel.memory,
        format!(
            "{today}: Sam is planning a trip to Lisbon in May.\n\
             {today}: Sam booked the Lisbon flights and wants restaurant tips."
        )
    );
    assert_eq!(rel.call_count, 2);

    let mut next = spec.clone();
    rel.apply_to(&mut next);
    assert!(next.system_prompt.starts_with("You are Ava."));
    assert!(next.system_prompt.contains("trip to Lisbon"));
    assert!(next.system_prompt.ends_with("wants restaurant tips."));

    // What the model saw: the persona's model, the summariser prompt, the transcript.
    let reqs = emu.chat_requests();
    assert_eq!(reqs.len(), 3);
    store.shutdown(Duration::from_secs(5)).await;
}

// Memory stays within the persona's bound by dropping the oldest notes; a persona without memory makes no LLM call and stores nothing.
#[tokio::test]
async fn memory_is_bounded_and_skipped_when_the_persona_disables_it() {
    let db = TestDb::create().await;
    let store = PgStore::start(StoreConfig::new(&db.url), &Metrics::new())
        .await
        .unwrap();
    let emu = summariser().await;
    let llm = model(&emu);
    let bounded = persona(120, true);
    for i in 0..4 {
        let (id, turns) = call(&store, "sam", &format!("call number {i}"));
        assert!(
            remember_call(&store, &llm, "ava", &bounded, "sam", id, &turns)
                .await
                .unwrap()
                .note
                .is_some()
        );
    }
    store.flush(FLUSH).await.unwrap();
    let rel = store.relationship("sam", "ava").await.unwrap().unwrap();
    // Each dated note is 74 characters: two with their newline (149) exceed 120.
    assert!(rel.memory.chars().count() <= 120, "{}", rel.memory);
    assert_eq!(rel.memory.lines().count(), 1);
    assert!(rel.memory.ends_with("nothing new at all."));
    assert_eq!(rel.call_count, 4);

    let off = persona(4000, false);
    let before = emu.chat_requests().len();
    let (id, turns) = call(&store, "kim", "I'm planning a trip to Lisbon in May");
    assert_eq!(
        remember_call(&store, &llm, "ava", &off, "kim", id, &turns)
            .await
            .unwrap(),
        Summary::default(),
        "no note and no LLM call"
    );
    // A call where the caller said nothing has nothing to remember either.
    let (id, _) = call(&store, "kim", "");
    let silent = vec![TurnRecord::new(id, 0, Speaker::Persona, "Hello? Anyone?")];
    assert_eq!(
        remember_call(&store, &llm, "ava", &bounded, "kim", id, &silent)
            .await
            .unwrap(),
        Summary::default(),
        "no note and no LLM call"
    );
    assert_eq!(emu.chat_requests().len(), before, "no LLM call");
    store.flush(FLUSH).await.unwrap();
    let rel = store.relationship("kim", "ava").await.unwrap().unwrap();
    assert_eq!(rel.memory, "");
    assert_eq!(rel.call_count, 2);
    store.shutdown(Duration::from_secs(5)).await;
}
