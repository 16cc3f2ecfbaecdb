//! Provider failures in the middle of a call, through the real `voice-pod serve`
//! binary: each provider drops or fails and the call goes on, no words are lost, and
//! the metrics count it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_tests::call_harness::{
    Caller, Emulators, PodProcess, ProviderProfile, lines, persona_json, table, table_replies,
};
use callmeback_tests::emulators::cerebras::CerebrasFault;
use serde_json::json;

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";
const FALLBACK: &str = "Sorry, I lost my train of thought. Could you say that again?";

async fn greeted(pod: &PodProcess) -> Caller {
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap()
        .expect("greeting");
    caller
}

/// Seconds of emulated TTS audio for `text` (the emulator speaks 15 characters a second).
fn tts_seconds(text: &str) -> f64 {
    text.chars().count() as f64 / 15.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deepgram_dropping_mid_sentence_loses_no_words() {
    // Proves the STT socket dropping while the caller speaks: the client reconnects
    // and replays, the model gets the whole sentence, the reconnect is counted.
    let sentence = "Please book a table for four people at eight tonight.";
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[("table for four", "Done, a table for four at eight.")]),
        "Sorry?".into(),
        said,
    );
    let emus = Emulators::start(lines(&[sentence]), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    // Exactly 3 s of line audio before the sentence, so the drop lands 1.5 s into it.
    caller.silence(Duration::from_secs(3)).await.unwrap();
    emus.deepgram.drop_after_audio(Duration::from_millis(4500));
    caller.say(sentence).await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(12), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(reply.is_some(), "no reply:\n{}", pod.log_tail(40));
    caller.hang_up().await.unwrap();
    assert!(
        emus.deepgram.connections().len() >= 2,
        "the socket never dropped"
    );
    let requests = emus.chat_messages();
    assert!(
        requests
            .iter()
            .any(|m| m.last().is_some_and(|(_, c)| c == sentence)),
        "words lost: {requests:?}"
    );
    assert!(
        pod.metric("voice_provider_reconnects_total", &[("peer", "deepgram")])
            .await
            .unwrap()
            >= 1.0
    );
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elevenlabs_dropping_mid_reply_still_delivers_the_whole_answer() {
    // Proves the TTS socket dropping mid-answer: the client reconnects and resends the
    // unspoken text, the caller hears the whole answer, the reconnect is counted.
    let answer = "Our opening hours are seven to six on weekdays. On Saturdays we open at eight. On Sundays we are closed all day.";
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(table(&[("hours", answer)]), "Sorry?".into(), said);
    let emus = Emulators::start(
        lines(&["What are your opening hours?"]),
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = greeted(&pod).await;
    emus.elevenlabs.drop_after_audio_chunks(4);
    caller.say("What are your opening hours?").await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(15), Duration::from_millis(800))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no reply:\n{}", pod.log_tail(40)));
    caller.hang_up().await.unwrap();
    let heard = reply.bytes as f64 / 8000.0;
    assert!(
        heard >= 0.85 * tts_seconds(answer),
        "heard {heard:.1} s of a {:.1} s answer:\n{}",
        tts_seconds(answer),
        pod.log_tail(40)
    );
    assert!(
        pod.metric("voice_provider_reconnects_total", &[("peer", "elevenlabs")])
            .await
            .unwrap()
            >= 1.0
    );
    pod.stop().await.unwrap();
}

/// A greeted call whose caller says nothing (the model is never asked).
async fn greeted_quiet_call() -> (Emulators, PodProcess, Caller) {
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(table(&[]), "Sorry?".into(), said);
    let emus = Emulators::start(lines(&[]), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let caller = greeted(&pod).await;
    (emus, pod, caller)
}

/// `peer`'s socket errors and reconnects as the pod counted them.
async fn outage_counts(pod: &PodProcess, peer: &str) -> (f64, f64) {
    let errors = pod
        .metric("voice_socket_errors_total", &[("peer", peer)])
        .await
        .unwrap();
    let reconnects = pod
        .metric("voice_provider_reconnects_total", &[("peer", peer)])
        .await
        .unwrap();
    (errors, reconnects)
}

/// Waits until `pred` holds for the emulator's connection records, polling.
async fn until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pred() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_to_text_outage_beyond_its_reconnects_ends_the_call_with_a_goodbye_counted_once() {
    // Proves one reconnect layer: the Deepgram session retries (5 attempts), gives up
    // once, and the call ends politely (goodbye, then the pod closes the stream) with
    // the end reason `stt_unavailable`. The engine does not dial again: 1 drop + 5
    // refused attempts are 6 socket errors and 6 connections, and nothing counts as
    // reconnected.
    let (emus, pod, mut caller) = greeted_quiet_call().await;
    until("deepgram connected", || {
        emus.deepgram.connections().len() == 1
    })
    .await;
    emus.deepgram.refuse_connections(Some(503));
    emus.deepgram.drop_connections();
    let goodbye = caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap();
    assert!(goodbye.is_some(), "no goodbye:\n{}", pod.log_tail(40));
    assert!(
        caller.wait_closed(Duration::from_secs(10)).await,
        "the call did not end:\n{}",
        pod.log_tail(40)
    );
    let connections = emus.deepgram.connections();
    assert_eq!(connections.len(), 6, "{connections:?}");
    assert_eq!(
        connections
            .iter()
            .filter(|c| c.refused == Some(503))
            .count(),
        5
    );
    assert_eq!(
        outage_counts(&pod, "deepgram").await,
        (6.0, 0.0),
        "one drop and five refused attempts, no reconnect"
    );
    assert!(
        pod.log().contains("stt_unavailable"),
        "end reason missing:\n{}",
        pod.log_tail(20)
    );
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_to_speech_outage_beyond_its_reconnects_hangs_up_counted_once() {
    // Proves the TTS side of one reconnect layer: with ElevenLabs gone for good the
    // session gives up after its 5 attempts and the pod hangs up (the persona has no
    // voice to say goodbye with); the engine dials nothing more.
    let (emus, pod, mut caller) = greeted_quiet_call().await;
    let before = emus.elevenlabs.connections().len();
    emus.elevenlabs.shutdown();
    assert!(
        caller.wait_closed(Duration::from_secs(15)).await,
        "the call did not end:\n{}",
        pod.log_tail(40)
    );
    assert_eq!(
        emus.elevenlabs.connections().len(),
        before,
        "nothing reached a stopped server"
    );
    assert_eq!(
        outage_counts(&pod, "elevenlabs").await,
        (6.0, 0.0),
        "one drop and five failed attempts, no reconnect"
    );
    assert!(
        pod.log().contains("tts_unavailable"),
        "{}",
        pod.log_tail(20)
    );
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_speech_to_text_refusing_the_first_connect_recovers_and_loses_no_words() {
    // Proves the first socket goes through the same reconnect loop: Deepgram answers
    // the call's first upgrade with 503, accepts the next, and the caller's sentence
    // (spoken from the start, buffered meanwhile) reaches the model whole.
    let sentence = "Please book a table for four people at eight tonight.";
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[("table for four", "Done, a table for four at eight.")]),
        "Sorry?".into(),
        said,
    );
    let emus = Emulators::start(lines(&[sentence]), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    emus.deepgram.refuse_connections(Some(503));
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    until("a refused upgrade", || {
        emus.deepgram
            .connections()
            .iter()
            .any(|c| c.refused.is_some())
    })
    .await;
    emus.deepgram.refuse_connections(None);
    caller.say(sentence).await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(12), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(reply.is_some(), "no reply:\n{}", pod.log_tail(40));
    caller.hang_up().await.unwrap();
    let requests = emus.chat_messages();
    assert!(
        requests
            .iter()
            .any(|m| m.last().is_some_and(|(_, c)| c == sentence)),
        "words lost: {requests:?}"
    );
    let reconnects = pod
        .metric("voice_provider_reconnects_total", &[("peer", "deepgram")])
        .await
        .unwrap();
    assert_eq!(reconnects, 1.0, "the first socket came through the loop");
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_llm_gets_the_fallback_phrase_not_silence() {
    // Proves every model request failing (500s, retried once each) yields the persona's
    // fallback phrase instead of silence, and the failures are counted.
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(Vec::new(), "Never spoken.".into(), said);
    let emus = Emulators::start(
        lines(&["Hello, is anybody there?"]),
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = greeted(&pod).await;
    for _ in 0..8 {
        emus.cerebras.push_fault(CerebrasFault::Status(500));
    }
    caller.say("Hello, is anybody there?").await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(12), Duration::from_millis(600))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("silence after a dead model:\n{}", pod.log_tail(40)));
    let heard = reply.bytes as f64 / 8000.0;
    assert!(
        (heard - tts_seconds(FALLBACK)).abs() < 0.5,
        "heard {heard:.2} s, the fallback phrase is {:.2} s",
        tts_seconds(FALLBACK)
    );
    assert!(
        pod.log().contains("fallback phrase"),
        "{}",
        pod.log_tail(40)
    );
    assert!(
        pod.metric("voice_socket_errors_total", &[("peer", "cerebras")])
            .await
            .unwrap()
            >= 1.0
    );
    caller.hang_up().await.unwrap();
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_stream_cut_mid_answer_keeps_what_was_said_and_the_call_goes_on() {
    // Proves a model stream dropping after some tokens: the words so far are spoken,
    // the failure is counted, and the next turn is answered normally.
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[
            (
                "weather",
                "It is sunny and warm today, with a light breeze from the sea in the afternoon.",
            ),
            ("tomorrow", "Tomorrow looks rainy."),
        ]),
        "Sorry?".into(),
        said,
    );
    let emus = Emulators::start(
        lines(&["How is the weather?", "And tomorrow?"]),
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = greeted(&pod).await;
    let before = emus.cerebras.chat_requests().len();
    assert_eq!(before, 0);
    emus.cerebras
        .push_fault(CerebrasFault::Drop { after_tokens: 6 });
    caller.say("How is the weather?").await.unwrap();
    let first = caller
        .listen(Duration::from_secs(12), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(
        first.is_some(),
        "silence after a cut stream:\n{}",
        pod.log_tail(40)
    );
    caller.say("And tomorrow?").await.unwrap();
    let second = caller
        .listen(Duration::from_secs(12), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(
        second.is_some(),
        "the call did not go on:\n{}",
        pod.log_tail(40)
    );
    caller.hang_up().await.unwrap();
    assert!(
        pod.metric("voice_socket_errors_total", &[("peer", "cerebras")])
            .await
            .unwrap()
            >= 1.0,
        "{}",
        pod.scrape().await.unwrap()
    );
    pod.stop().await.unwrap();
}
