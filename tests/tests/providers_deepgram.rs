//! The Deepgram live client against the Deepgram emulator over real sockets, with real
//! caller speech rendered by espeak-ng.

use std::sync::Arc;
use std::time::Duration;

use callmeback_tests::emulators::deepgram::{
    DeepgramEmulator, DeepgramEmulatorConfig, longest_inner_pause,
};
use callmeback_tests::speech;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use voice_pod::metrics::Metrics;
use voice_pod::providers::deepgram::{Deepgram, DeepgramConfig};
use voice_pod::providers::{Bytes, SpeechToText, SttError, SttEvent, SttSessionConfig};
use voice_pod::secret::Secret;

const LINE_1: &str = "Hi, I would like to book a table for two.";
const LINE_2: &str = "Tomorrow at seven in the evening, please.";
/// Endpointing for the tests that expect each line as one utterance. Margin: espeak-ng
/// 1.51 pauses at most 200 ms inside these lines (at the commas), so 600 ms is 3x that,
/// and the 1.5 s between lines is 2.5x it; [`call_audio`] checks both on the actual
/// render, so a voice that pauses longer fails with the margin, not a flipped outcome.
/// Times are audio time in the emulator, so machine load cannot move them.
const ENDPOINTING_MS: u32 = 600;
/// Gap between lines in [`call_audio`] when lines must stay separate utterances.
const LINE_GAP: Duration = Duration::from_millis(1500);

fn session_cfg(endpointing_ms: u32) -> SttSessionConfig {
    SttSessionConfig {
        call_sid: "CAtest0001".into(),
        model: "nova-3".into(),
        language: "en-US".into(),
        endpointing_ms,
        utterance_end_ms: 1000,
        keyterms: vec!["table".into()],
    }
}

async fn emulator(script: &[&str]) -> DeepgramEmulator {
    DeepgramEmulator::start(DeepgramEmulatorConfig {
        script: script.iter().map(|s| s.to_string()).collect(),
        ..DeepgramEmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

fn client(
    emu: &DeepgramEmulator,
    metrics: Arc<Metrics>,
    tweak: impl FnOnce(&mut DeepgramConfig),
) -> Deepgram {
    let mut cfg = DeepgramConfig::new(emu.base_url(), Secret::new(emu.api_key()));
    tweak(&mut cfg);
    Deepgram::new(cfg, metrics).expect("valid config")
}

/// Caller audio: lead-in silence, each line followed by a pause, as one buffer.
///
/// Checks the timing margins on the actual render against `endpointing_ms`: a pause
/// inside a line is at most half of it (the line stays one utterance), and the pause
/// after each line is at least twice it (endpointing fires) or at most half of it (it
/// cannot fire), so no outcome depends on a few milliseconds of espeak-ng's rendering.
fn call_audio(
    lines: &[&str],
    lead: Duration,
    pause: Duration,
    endpointing_ms: u32,
) -> (Vec<u8>, Vec<(f64, f64)>) {
    let endpointing = Duration::from_millis(u64::from(endpointing_ms));
    assert!(
        pause >= endpointing * 2 || pause * 2 <= endpointing,
        "timing margin lost: a {pause:?} pause after a line is within 2x of endpointing {endpointing:?}"
    );
    let mut audio = speech::silence(lead);
    let mut spans = Vec::new();
    for line in lines {
        let s = speech::render_mulaw(line).expect("espeak-ng renders");
        let inner = longest_inner_pause(&s, DeepgramEmulatorConfig::default().energy_threshold);
        assert!(
            inner * 2 <= endpointing,
            "timing margin lost: {line:?} pauses {inner:?} inside, endpointing {endpointing:?} needs 2x headroom"
        );
        let start = audio.len() as f64 / 8000.0;
        audio.extend_from_slice(&s);
        spans.push((start, audio.len() as f64 / 8000.0));
        audio.extend(speech::silence(pause));
    }
    (audio, spans)
}

/// Streams audio in 20 ms frames, `speedup` times faster than real time.
fn spawn_streamer(
    tx: mpsc::Sender<Bytes>,
    audio: Vec<u8>,
    speedup: u32,
) -> tokio::task::JoinHandle<mpsc::Sender<Bytes>> {
    tokio::spawn(async move {
        let frame_time = Duration::from_millis(20) / speedup;
        let start = Instant::now();
        for (i, f) in speech::frames(&audio).into_iter().enumerate() {
            tokio::time::sleep_until(start + frame_time * i as u32).await;
            if tx.send(Bytes::from(f)).await.is_err() {
                break;
            }
        }
        tx
    })
}

/// Collects events until `done` says so or the deadline passes.
async fn collect(
    rx: &mut mpsc::Receiver<SttEvent>,
    within: Duration,
    mut done: impl FnMut(&[SttEvent]) -> bool,
) -> Vec<SttEvent> {
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

fn finals(events: &[SttEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            SttEvent::Final { text, .. } if !text.is_empty() => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn count_speech_finals(events: &[SttEvent]) -> usize {
    events
        .iter()
        .filter(
            |e| matches!(e, SttEvent::Final { speech_final: true, text, .. } if !text.is_empty()),
        )
        .count()
}

#[tokio::test]
async fn real_speech_is_transcribed_with_interims_endpoints_and_utterance_end() {
    // Proves two spoken lines come back as interim words, speech_final finals with the script text, VAD and UtteranceEnd events, on the call's timeline.
    let emu = emulator(&[LINE_1, LINE_2]).await;
    let metrics = Arc::new(Metrics::new());
    let dg = client(&emu, metrics.clone(), |_| {});
    let mut s = dg
        .connect(session_cfg(ENDPOINTING_MS), CancellationToken::new())
        .await
        .expect("connects");
    let (audio, spans) = call_audio(
        &[LINE_1, LINE_2],
        Duration::from_millis(500),
        LINE_GAP,
        ENDPOINTING_MS,
    );
    let streamer = spawn_streamer(s.audio.clone(), audio, 4);
    let events = collect(&mut s.events, Duration::from_secs(20), |ev| {
        ev.iter()
            .filter(|e| matches!(e, SttEvent::UtteranceEnd { .. }))
            .count()
            >= 2
    })
    .await;
    let _ = streamer.await;

    assert_eq!(
        finals(&events),
        vec![LINE_1.to_string(), LINE_2.to_string()]
    );
    assert_eq!(count_speech_finals(&events), 2);
    let starts: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            SttEvent::SpeechStarted { timestamp } => Some(*timestamp),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 2, "{events:?}");
    for (onset, (span_start, _)) in starts.iter().zip(&spans) {
        assert!(
            (onset - span_start).abs() < 0.25,
            "onset {onset} vs speech at {span_start}"
        );
    }
    // Interim results reveal a prefix of the line before its final.
    let first_interim = events
        .iter()
        .find_map(|e| match e {
            SttEvent::Interim { text, .. } => Some(text.clone()),
            _ => None,
        })
        .expect("an interim result");
    assert!(
        LINE_1.starts_with(&first_interim) && first_interim.len() < LINE_1.len(),
        "{first_interim}"
    );
    // Word times lie inside the spoken span.
    let words_1 = events
        .iter()
        .find_map(|e| match e {
            SttEvent::Final {
                words,
                speech_final: true,
                ..
            } if !words.is_empty() => Some(words.clone()),
            _ => None,
        })
        .expect("final words");
    assert!(
        words_1[0].start >= spans[0].0 - 0.25
            && words_1.last().map(|w| w.end).unwrap_or(0.0) <= spans[0].1 + 0.25
    );

    let conn = &emu.connections()[0];
    assert!(conn.authorized);
    assert_eq!(conn.param("encoding"), Some("mulaw"));
    assert_eq!(conn.param("sample_rate"), Some("8000"));
    assert_eq!(
        conn.param("endpointing"),
        Some(ENDPOINTING_MS.to_string().as_str())
    );
    assert_eq!(conn.param("tag"), Some("CAtest0001"));
    assert!(
        conn.query.iter().all(|(_, v)| !v.contains(emu.api_key())),
        "key must never be in the URL"
    );
    assert_eq!(
        emu.unscripted(),
        0,
        "every detected utterance had a script line"
    );
    assert_eq!(emu.connections().len(), 1);
}

#[tokio::test]
async fn keepalive_holds_the_socket_open_through_silence_without_audio() {
    // Proves KeepAlive text frames stop Deepgram's idle close (NET-0001) while no audio flows.
    let emu = DeepgramEmulator::start(DeepgramEmulatorConfig {
        script: vec![LINE_1.into()],
        idle_timeout: Duration::from_millis(800),
        ..DeepgramEmulatorConfig::default()
    })
    .await
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let dg = client(&emu, metrics.clone(), |c| {
        c.keepalive_interval = Duration::from_millis(250)
    });
    let mut s = dg
        .connect(session_cfg(ENDPOINTING_MS), CancellationToken::new())
        .await
        .unwrap();
    sleep(Duration::from_millis(2500)).await;
    let (audio, _) = call_audio(
        &[LINE_1],
        Duration::from_millis(200),
        Duration::from_millis(1200),
        ENDPOINTING_MS,
    );
    let streamer = spawn_streamer(s.audio.clone(), audio, 4);
    let events = collect(&mut s.events, Duration::from_secs(10), |ev| {
        count_speech_finals(ev) >= 1
    })
    .await;
    let _ = streamer.await;

    assert_eq!(finals(&events), vec![LINE_1.to_string()]);
    let conns = emu.connections();
    assert_eq!(conns.len(), 1, "no reconnect was needed");
    assert!(
        conns[0].keepalives >= 4,
        "keepalives: {}",
        conns[0].keepalives
    );
    assert_eq!(conns[0].ended, None, "still open");
    assert_eq!(
        metrics
            .provider_reconnects
            .with_label_values(&["deepgram"])
            .get(),
        0
    );
}

#[tokio::test]
async fn idle_close_without_keepalive_is_survived_by_reconnecting() {
    // Proves the emulator closes an idle socket with 1011 like Deepgram, and the client reconnects, counts it, and still transcribes.
    let emu = DeepgramEmulator::start(DeepgramEmulatorConfig {
        script: vec![LINE_1.into()],
        idle_timeout: Duration::from_millis(500),
        ..DeepgramEmulatorConfig::default()
    })
    .await
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let dg = client(&emu, metrics.clone(), |c| {
        c.keepalive_interval = Duration::from_secs(30)
    });
    let mut s = dg
        .connect(session_cfg(ENDPOINTING_MS), CancellationToken::new())
        .await
        .unwrap();
    sleep(Duration::from_millis(900)).await;
    let (audio, _) = call_audio(
        &[LINE_1],
        Duration::from_millis(200),
        Duration::from_millis(1200),
        ENDPOINTING_MS,
    );
    let streamer = spawn_streamer(s.audio.clone(), audio, 4);
    let events = collect(&mut s.events, Duration::from_secs(10), |ev| {
        count_speech_finals(ev) >= 1
    })
    .await;
    let _ = streamer.await;

    assert_eq!(emu.connections()[0].ended.as_deref(), Some("idle_timeout"));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SttEvent::Reconnected { .. }))
    );
    assert_eq!(finals(&events), vec![LINE_1.to_string()]);
    assert!(
        metrics
            .provider_reconnects
            .with_label_values(&["deepgram"])
            .get()
            >= 1
    );
    assert!(
        metrics
            .socket_errors
            .with_label_values(&["deepgram", "protocol"])
            .get()
            >= 1
    );
}

#[tokio::test]
async fn dropped_socket_mid_utterance_replays_audio_and_loses_no_words() {
    // Proves a drop in the middle of the first line is healed: both lines arrive exactly once, timestamps stay on the call timeline.
    let emu = emulator(&[LINE_1, LINE_2]).await;
    let (audio, spans) = call_audio(
        &[LINE_1, LINE_2],
        Duration::from_millis(500),
        LINE_GAP,
        ENDPOINTING_MS,
    );
    // Drop once the socket has heard half of the first line.
    emu.drop_after_audio(Duration::from_secs_f64((spans[0].0 + spans[0].1) / 2.0));
    let metrics = Arc::new(Metrics::new());
    let dg = client(&emu, metrics.clone(), |_| {});
    let mut s = dg
        .connect(session_cfg(ENDPOINTING_MS), CancellationToken::new())
        .await
        .unwrap();
    let streamer = spawn_streamer(s.audio.clone(), audio, 4);
    let events = collect(&mut s.events, Duration::from_secs(20), |ev| {
        count_speech_finals(ev) >= 2
    })
    .await;
    let _ = streamer.await;

    assert_eq!(
        finals(&events),
        vec![LINE_1.to_string(), LINE_2.to_string()],
        "{events:?}"
    );
    let replayed = events
        .iter()
        .find_map(|e| match e {
            SttEvent::Reconnected { replayed_ms } => Some(*replayed_ms),
            _ => None,
        })
        .expect("a reconnect");
    assert!(
        replayed as f64 >= spans[0].1 * 1000.0 / 2.0 - 100.0,
        "replayed {replayed} ms"
    );
    // The second line's final lies where it was spoken in the call, not on the new socket's clock.
    let (start, end) = events
        .iter()
        .filter_map(|e| match e {
            SttEvent::Final {
                words,
                speech_final: true,
                ..
            } if !words.is_empty() => {
                Some((words[0].start, words.last().map(|w| w.end).unwrap_or(0.0)))
            }
            _ => None,
        })
        .nth(1)
        .unwrap();
    // (espeak ends its render with a short silence, so words end a little before the span.)
    assert!(
        (start - spans[1].0).abs() < 0.3 && end <= spans[1].1 + 0.3 && end >= spans[1].1 - 0.6,
        "{start}..{end} vs {:?}",
        spans[1]
    );
    assert_eq!(emu.connections().len(), 2);
    assert_eq!(emu.connections()[0].ended.as_deref(), Some("fault"));
    assert_eq!(
        metrics
            .provider_reconnects
            .with_label_values(&["deepgram"])
            .get(),
        1
    );
    let errors: u64 = ["connect", "closed", "protocol", "timeout"]
        .iter()
        .map(|k| {
            metrics
                .socket_errors
                .with_label_values(&["deepgram", k])
                .get()
        })
        .sum();
    assert!(errors >= 1);
}

#[tokio::test]
async fn finalize_returns_the_pending_words_without_waiting_for_endpointing() {
    // Proves Finalize yields a from_finalize final with the whole line while a long endpointing would still be waiting.
    let emu = emulator(&[LINE_1]).await;
    let dg = client(&emu, Arc::new(Metrics::new()), |_| {});
    let mut s = dg
        .connect(session_cfg(5000), CancellationToken::new())
        .await
        .unwrap();
    let (audio, _) = call_audio(
        &[LINE_1],
        Duration::from_millis(300),
        Duration::from_millis(400),
        5000,
    );
    let tx = spawn_streamer(s.audio.clone(), audio, 4).await.unwrap();
    // Let the emulator see the trailing silence, then ask for the transcript now.
    sleep(Duration::from_millis(200)).await;
    s.control.finalize().unwrap();
    let events = collect(&mut s.events, Duration::from_secs(3), |ev| {
        !finals(ev).is_empty()
    })
    .await;
    drop(tx);

    let fin = events
        .iter()
        .find(|e| matches!(e, SttEvent::Final { text, .. } if !text.is_empty()))
        .expect("a final");
    assert!(
        matches!(fin, SttEvent::Final { text, from_finalize: true, speech_final: false, .. } if text == LINE_1),
        "{fin:?}"
    );
    assert_eq!(emu.connections()[0].finalizes, 1);
}

#[tokio::test]
async fn close_flushes_the_last_words_then_ends_the_session() {
    // Proves close() sends CloseStream, the last utterance still arrives, and the event channel then closes.
    let emu = emulator(&[LINE_1]).await;
    let dg = client(&emu, Arc::new(Metrics::new()), |_| {});
    let mut s = dg
        .connect(session_cfg(2000), CancellationToken::new())
        .await
        .unwrap();
    let (audio, _) = call_audio(
        &[LINE_1],
        Duration::from_millis(300),
        Duration::from_millis(100),
        2000,
    );
    let _tx = spawn_streamer(s.audio.clone(), audio, 4).await.unwrap();
    s.control.close().await;
    let events = collect(&mut s.events, Duration::from_secs(5), |_| false).await;

    assert_eq!(finals(&events), vec![LINE_1.to_string()]);
    let conn = &emu.connections()[0];
    assert_eq!(conn.close_streams, 1);
    assert_eq!(conn.ended.as_deref(), Some("close_stream"));
    assert!(s.events.recv().await.is_none(), "the session ended");
}

#[tokio::test]
async fn wrong_key_is_refused_before_any_audio() {
    // Proves the emulator checks the Token header like Deepgram and the client reports Unauthorized with a metric.
    let emu = emulator(&[LINE_1]).await;
    let metrics = Arc::new(Metrics::new());
    let dg = Deepgram::new(
        DeepgramConfig::new(emu.base_url(), Secret::new("wrong")),
        metrics.clone(),
    )
    .unwrap();
    let err = dg
        .connect(session_cfg(ENDPOINTING_MS), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, SttError::Unauthorized(401)), "{err:?}");
    assert_eq!(emu.connections()[0].refused, Some(401));
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["deepgram", "connect"])
            .get(),
        1
    );
}

#[tokio::test]
async fn silent_dead_connection_is_detected_and_replaced_without_losing_words() {
    // Proves a socket that stops answering while audio flows is replaced, with the unanswered audio replayed.
    let emu = emulator(&[LINE_1]).await;
    let metrics = Arc::new(Metrics::new());
    let dg = client(&emu, metrics.clone(), |c| {
        c.response_timeout = Duration::from_millis(1000)
    });
    let mut s = dg
        .connect(session_cfg(ENDPOINTING_MS), CancellationToken::new())
        .await
        .unwrap();
    emu.stall_connections();
    let (audio, _) = call_audio(
        &[LINE_1],
        Duration::from_secs(6),
        Duration::from_millis(1500),
        ENDPOINTING_MS,
    );
    let streamer = spawn_streamer(s.audio.clone(), audio, 2);
    let events = collect(&mut s.events, Duration::from_secs(20), |ev| {
        count_speech_finals(ev) >= 1
    })
    .await;
    let _ = streamer.await;

    assert_eq!(finals(&events), vec![LINE_1.to_string()]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SttEvent::Reconnected { replayed_ms } if *replayed_ms >= 5000)),
        "{events:?}"
    );
    assert_eq!(emu.connections().len(), 2);
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["deepgram", "timeout"])
            .get(),
        1
    );
}
