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
