//! The ElevenLabs multi-context client against the ElevenLabs emulator over real sockets.

use std::sync::Arc;
use std::time::Duration;

use callmeback_tests::emulators::elevenlabs::{ElevenLabsEmulator, ElevenLabsEmulatorConfig};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use voice_pod::metrics::Metrics;
use voice_pod::providers::elevenlabs::{ElevenLabs, ElevenLabsConfig};
use voice_pod::providers::{TextToSpeech, TtsError, TtsEvent, TtsSession, TtsSessionConfig};
use voice_pod::secret::Secret;

fn session_cfg() -> TtsSessionConfig {
    TtsSessionConfig {
        call_sid: "CAtest0002".into(),
        voice_id: "voice123".into(),
        model_id: "eleven_flash_v2_5".into(),
        stability: Some(0.5),
        similarity_boost: Some(0.8),
        style: None,
        speed: Some(1.0),
    }
}

async fn emulator(tweak: impl FnOnce(&mut ElevenLabsEmulatorConfig)) -> ElevenLabsEmulator {
    let mut cfg = ElevenLabsEmulatorConfig {
        // Fast generation keeps the tests short; pacing is the playout's business.
        generation_speed: 20.0,
        ..ElevenLabsEmulatorConfig::default()
    };
    tweak(&mut cfg);
    ElevenLabsEmulator::start(cfg)
        .await
        .expect("emulator starts")
}

async fn connect(
    emu: &ElevenLabsEmulator,
    metrics: Arc<Metrics>,
    tweak: impl FnOnce(&mut ElevenLabsConfig),
) -> TtsSession {
    let mut cfg = ElevenLabsConfig::new(emu.base_url(), Secret::new(emu.api_key()));
    tweak(&mut cfg);
    let el = ElevenLabs::new(cfg, metrics).expect("valid config");
    el.connect(session_cfg(), CancellationToken::new())
        .await
        .expect("connects")
}

/// Audio bytes per context and the events, until `done` or the deadline.
async fn collect(
    rx: &mut mpsc::Receiver<TtsEvent>,
    within: Duration,
    mut done: impl FnMut(&[TtsEvent]) -> bool,
) -> Vec<TtsEvent> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    while !done(&events) {
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            rx.recv(),
        )
        .await
        {
            Ok(Some(ev)) => events.push(ev),
            Ok(None) | Err(_) => break,
        }
    }
    events
}

fn audio_of(events: &[TtsEvent], ctx: &str) -> usize {
    events
        .iter()
        .map(|e| match e {
            TtsEvent::Audio { context_id, mulaw } if context_id == ctx => mulaw.len(),
            _ => 0,
        })
        .sum()
}

fn done(events: &[TtsEvent], ctx: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, TtsEvent::ContextDone { context_id } if context_id == ctx))
}

/// Audio the emulator makes for a text: 1/15 s per character, 8000 bytes per second.
fn expected_bytes(text: &str) -> usize {
    text.chars().count() * (8000.0_f64 / 15.0).round() as usize
}

#[tokio::test]
async fn two_turns_are_spoken_on_one_socket() {
    // Proves one socket serves two utterances as separate contexts, mu-law audio for all of each text, settings only on first messages.
    let emu = emulator(|_| {}).await;
    let mut s = connect(&emu, Arc::new(Metrics::new()), |_| {}).await;
    let turn1 = [
        "Hello, this is Ada from the bistro. ",
        "How can I help you today? ",
    ];
    for chunk in turn1 {
        s.control.speak("t1", chunk).await.unwrap();
    }
    s.control.end("t1").await.unwrap();
    let ev1 = collect(&mut s.events, Duration::from_secs(10), |e| done(e, "t1")).await;
    sleep(Duration::from_millis(300)).await;
    s.control
        .speak("t2", "A table for two at seven, perfect. ")
        .await
        .unwrap();
    s.control.end("t2").await.unwrap();
    let ev2 = collect(&mut s.events, Duration::from_secs(10), |e| done(e, "t2")).await;

    assert!(done(&ev1, "t1") && done(&ev2, "t2"));
    assert_eq!(audio_of(&ev1, "t1"), expected_bytes(&turn1.concat()));
    assert_eq!(
        audio_of(&ev2, "t2"),
        expected_bytes("A table for two at seven, perfect. ")
    );
    let conns = emu.connections();
    assert_eq!(conns.len(), 1, "one socket for the call");
    let c = &conns[0];
    assert!(c.authorized);
    assert_eq!(c.param("output_format"), Some("ulaw_8000"));
    assert_eq!(c.param("model_id"), Some("eleven_flash_v2_5"));
    assert_eq!(c.param("auto_mode"), Some("true"));
    assert!(c.query.iter().all(|(_, v)| !v.contains(emu.api_key())));
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    // Voice settings ride only on each context's first message.
    for ctx in ["t1", "t2"] {
        let with_settings: Vec<bool> = c
            .messages
            .iter()
            .filter(|m| m["context_id"] == ctx && m.get("text").is_some())
            .map(|m| m.get("voice_settings").is_some())
            .collect();
        assert!(with_settings[0]);
        assert!(
            with_settings[1..].iter().all(|b| !b),
            "{ctx}: {with_settings:?}"
        );
    }
    assert_eq!(c.text_of("t1"), turn1.concat());
}

#[tokio::test]
async fn never_more_than_five_contexts_are_open() {
    // Proves the client closes the oldest context before opening a sixth, so the provider never refuses with max_active_conversations.
    let emu = emulator(|c| c.generation_speed = 1.0).await;
    let mut s = connect(&emu, Arc::new(Metrics::new()), |_| {}).await;
    for i in 1..=7 {
        s.control
            .speak(
                &format!("c{i}"),
                "A rather long sentence that takes a while to say. ",
            )
            .await
            .unwrap();
    }
    s.control.end("c7").await.unwrap();
    let events = collect(&mut s.events, Duration::from_secs(10), |e| done(e, "c7")).await;

    let c = &emu.connections()[0];
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert_eq!(c.max_open_contexts, 5);
    let closed: Vec<&str> = c
        .messages
        .iter()
        .filter(|m| m.get("close_context").is_some())
        .filter_map(|m| m["context_id"].as_str())
        .collect();
    assert_eq!(&closed[..2], ["c1", "c2"], "oldest closed first");
    assert_eq!(emu.connections().len(), 1);
    // Nothing more is delivered for the contexts the client closed for the cap.
    let last_c1 = events
        .iter()
        .rposition(|e| matches!(e, TtsEvent::Audio { context_id, .. } if context_id == "c1"));
    let first_c6 = events
        .iter()
        .position(|e| matches!(e, TtsEvent::Audio { context_id, .. } if context_id == "c6"));
    if let (Some(a), Some(b)) = (last_c1, first_c6) {
        assert!(a < b, "c1 audio after it was closed");
    }
}

#[tokio::test]
async fn cancel_stops_the_utterance_at_once() {
    // Proves barge-in: after cancel no more audio and no ContextDone for that context, and the socket stays usable.
    let emu = emulator(|c| c.generation_speed = 1.0).await;
    let mut s = connect(&emu, Arc::new(Metrics::new()), |_| {}).await;
    s.control
        .speak(
            "t1",
            "This is a long answer that the caller will interrupt halfway through. ",
        )
        .await
        .unwrap();
    s.control.end("t1").await.unwrap();
    let first = collect(&mut s.events, Duration::from_secs(5), |e| {
        audio_of(e, "t1") > 0
    })
    .await;
    assert!(audio_of(&first, "t1") > 0);
    s.control.cancel("t1").await.unwrap();
    s.control.speak("t2", "Sorry, go ahead. ").await.unwrap();
    s.control.end("t2").await.unwrap();
    let after = collect(&mut s.events, Duration::from_secs(10), |e| done(e, "t2")).await;

    assert!(done(&after, "t2"));
    // The cancel may race a chunk already on the wire, but never the rest of the utterance.
    let total_t1 = audio_of(&first, "t1") + audio_of(&after, "t1");
    assert!(
        total_t1
            < expected_bytes(
                "This is a long answer that the caller will interrupt halfway through. "
            ) / 2,
        "{total_t1}"
    );
    assert!(!done(&after, "t1"));
    assert_eq!(emu.connections().len(), 1);
}

#[tokio::test]
async fn dropped_socket_mid_utterance_resends_only_the_unspoken_text() {
    // Proves a drop mid-utterance reconnects, resends from the first unvoiced word, and the caller hears the whole text about once.
    let emu = emulator(|_| {}).await;
    emu.drop_after_audio_chunks(4);
    let metrics = Arc::new(Metrics::new());
    let mut s = connect(&emu, metrics.clone(), |_| {}).await;
    let text = "Your table for two is booked for seven tonight, see you then. ";
    s.control.speak("t1", text).await.unwrap();
    s.control.end("t1").await.unwrap();
    let events = collect(&mut s.events, Duration::from_secs(10), |e| done(e, "t1")).await;

    assert!(done(&events, "t1"), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TtsEvent::Reconnected { resent: 1 }))
    );
    let conns = emu.connections();
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[0].ended.as_deref(), Some("fault"));
    let resent = conns[1].text_of("t1");
    assert!(
        !resent.is_empty() && resent.len() < text.len(),
        "resent {resent:?}"
    );
    assert!(text.ends_with(&resent), "a suffix of the text: {resent:?}");
    let cut = text.len() - resent.len();
    assert!(
        cut == 0 || text[..cut].ends_with(' '),
        "restarts at a word boundary: {resent:?}"
    );
    // Heard at least all of it, and at most one repeated word more.
    let heard = audio_of(&events, "t1");
    assert!(
        heard >= expected_bytes(text),
        "{heard} < {}",
        expected_bytes(text)
    );
    assert!(
        heard <= expected_bytes(text) + expected_bytes("tonight, "),
        "{heard}"
    );
    assert_eq!(
        metrics
            .provider_reconnects
            .with_label_values(&["elevenlabs"])
            .get(),
        1
    );
}

#[tokio::test]
async fn keepalive_keeps_the_socket_through_a_long_silence() {
    // Proves empty-text keep-alives beat the inactivity timeout, so the next turn needs no new socket.
    let emu = emulator(|c| c.inactivity_override = Some(Duration::from_millis(700))).await;
    let mut s = connect(&emu, Arc::new(Metrics::new()), |c| {
        c.keepalive_interval = Duration::from_millis(250)
    })
    .await;
    s.control.speak("t1", "Hello. ").await.unwrap();
    s.control.end("t1").await.unwrap();
    collect(&mut s.events, Duration::from_secs(5), |e| done(e, "t1")).await;
    sleep(Duration::from_millis(2000)).await;
    s.control.speak("t2", "Still here. ").await.unwrap();
    s.control.end("t2").await.unwrap();
    let events = collect(&mut s.events, Duration::from_secs(5), |e| done(e, "t2")).await;

    assert!(done(&events, "t2"));
    let conns = emu.connections();
    assert_eq!(
        conns.len(),
        1,
        "{:?}",
        conns.iter().map(|c| &c.errors).collect::<Vec<_>>()
    );
    let keepalives = conns[0].messages.iter().filter(|m| m["text"] == "").count();
    assert!(keepalives >= 4, "{keepalives}");
}

#[tokio::test]
async fn inactivity_close_is_survived_by_reconnecting() {
    // Proves the emulator closes an idle socket with input_timeout_exceeded like ElevenLabs, and the client reconnects for the next turn.
    let emu = emulator(|c| c.inactivity_override = Some(Duration::from_millis(400))).await;
    let metrics = Arc::new(Metrics::new());
    let mut s = connect(&emu, metrics.clone(), |c| {
        c.keepalive_interval = Duration::from_secs(60)
    })
    .await;
    sleep(Duration::from_millis(900)).await;
    s.control
        .speak("t1", "Are you still there? ")
        .await
        .unwrap();
    s.control.end("t1").await.unwrap();
    let events = collect(&mut s.events, Duration::from_secs(5), |e| done(e, "t1")).await;

    assert!(done(&events, "t1"), "{events:?}");
    let conns = emu.connections();
    assert_eq!(conns[0].errors, vec!["input_timeout_exceeded".to_string()]);
    assert_eq!(conns[0].ended.as_deref(), Some("inactivity"));
    assert_eq!(
        audio_of(&events, "t1"),
        expected_bytes("Are you still there? ")
    );
    assert!(
        metrics
            .provider_reconnects
            .with_label_values(&["elevenlabs"])
            .get()
            >= 1
    );
    assert!(
        metrics
            .socket_errors
            .with_label_values(&["elevenlabs", "protocol"])
            .get()
            >= 1
    );
}

#[tokio::test]
async fn wrong_key_is_refused() {
    // Proves the emulator checks xi-api-key and the client reports Unauthorized with a metric.
    let emu = emulator(|_| {}).await;
    let metrics = Arc::new(Metrics::new());
    let el = ElevenLabs::new(
        ElevenLabsConfig::new(emu.base_url(), Secret::new("nope")),
        metrics.clone(),
    )
    .unwrap();
    let err = el
        .connect(session_cfg(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, TtsError::Unauthorized(401)), "{err:?}");
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["elevenlabs", "connect"])
            .get(),
        1
    );
}

#[tokio::test]
async fn close_sends_close_socket_and_ends_the_session() {
    // Proves close() ends the call's socket with close_socket and the event channel closes.
    let emu = emulator(|_| {}).await;
    let mut s = connect(&emu, Arc::new(Metrics::new()), |_| {}).await;
    s.control.close().await;
    let rest = collect(&mut s.events, Duration::from_secs(3), |_| false).await;
    assert!(rest.iter().all(|e| !matches!(e, TtsEvent::Error(_))));
    let c = &emu.connections()[0];
    assert!(c.messages.iter().any(|m| m["close_socket"] == true));
    assert_eq!(c.ended.as_deref(), Some("close_socket"));
}

#[tokio::test]
async fn silent_dead_connection_is_replaced_and_the_text_resent() {
    // Proves a socket that stops answering after text was sent is replaced and the utterance still plays in full.
    let emu = emulator(|_| {}).await;
    let metrics = Arc::new(Metrics::new());
    let mut s = connect(&emu, metrics.clone(), |c| {
        c.response_timeout = Duration::from_millis(600)
    })
    .await;
    emu.stall_connections();
    let text = "Sorry, I did not catch that. ";
    s.control.speak("t1", text).await.unwrap();
    s.control.end("t1").await.unwrap();
    let events = collect(&mut s.events, Duration::from_secs(10), |e| done(e, "t1")).await;

    assert!(done(&events, "t1"), "{events:?}");
    assert_eq!(audio_of(&events, "t1"), expected_bytes(text));
    assert_eq!(emu.connections().len(), 2);
    assert_eq!(emu.connections()[1].text_of("t1"), text);
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["elevenlabs", "timeout"])
            .get(),
        1
    );
}
