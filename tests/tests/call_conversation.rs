//! Whole conversations through the real `voice-pod serve` binary: a simulated Twilio
//! caller speaking real (espeak-ng) audio, the pod's conversation engine, and the
//! Deepgram, Cerebras and ElevenLabs emulators, all over real sockets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_tests::call_harness::{
    Caller, Emulators, PodProcess, ProviderProfile, converse, lines, persona_json, table,
    table_replies,
};
use callmeback_tests::emulators::cerebras::{ChatCall, Reply};
use serde_json::json;

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_turn_call_answers_every_turn_with_the_whole_history() {
    // Proves greeting + three turns: each caller sentence reaches the model once, with
    // everything said before, and each answer is heard by the caller.
    let script = lines(&[
        "What time does the bakery open?",
        "Do you have croissants today?",
        "Great, thank you very much.",
    ]);
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[
            ("bakery", "The bakery opens at seven in the morning."),
            ("croissants", "Yes, we baked fresh croissants this morning."),
            ("thank", "You are welcome. Have a lovely day!"),
        ]),
        "Sorry, could you repeat that?".into(),
        said.clone(),
    );
    let emus = Emulators::start(script.clone(), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let caller = converse(&pod, FROM, TO, &script).await;

    assert_eq!(emus.deepgram.transcripts(), script);
    let v2v = caller.voice_to_voice();
    assert_eq!(v2v.len(), 3);
    assert!(v2v.iter().all(|(_, d)| d.is_some()), "{v2v:?}");
    // The last spoken request carries the whole conversation, in order.
    let requests = emus.chat_messages();
    let last = requests
        .iter()
        .rev()
        .find(|m| m.last().is_some_and(|(_, c)| c.contains("thank you")))
        .expect("a request for the last turn");
    let roles: Vec<&str> = last.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        [
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant",
            "user"
        ]
    );
    assert_eq!(last[0].1, "Hi, this is Ada. How can I help?");
    assert_eq!(last[1].1, script[0]);
    assert_eq!(last[2].1, "The bakery opens at seven in the morning.");
    assert_eq!(last[3].1, script[1]);
    assert_eq!(last[4].1, "Yes, we baked fresh croissants this morning.");
    assert!(caller.violations().is_empty(), "{:?}", caller.violations());
    // Every stage of every turn was measured.
    for stage in ["total", "stt", "llm", "tts"] {
        let n = pod
            .metric(
                "voice_turn_latency_seconds_count",
                &[("persona", "ada"), ("stage", stage)],
            )
            .await
            .unwrap();
        assert!(n >= 3.0, "stage {stage}: {n} observations");
    }
    assert!(
        callmeback_tests::twilio_sim::eventually(Duration::from_secs(5), || async {
            pod.metric("voice_active_calls", &[]).await.unwrap_or(1.0) == 0.0
        })
        .await
    );
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_who_pauses_mid_sentence_gets_one_answer_to_the_whole_sentence() {
    // Proves no reply to half a sentence: "I was thinking about" + a pause + the rest
    // is one turn, answered once, and nothing was heard during the pause.
    let script = lines(&["I was thinking about", "going to the gym tomorrow."]);
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[("gym", "That sounds like a great plan.")]),
        "Hmm?".into(),
        said.clone(),
    );
    let emus = Emulators::start(script.clone(), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap()
        .expect("greeting");
    caller.say(&script[0]).await.unwrap();
    caller.silence(Duration::from_millis(600)).await.unwrap();
    caller.say(&script[1]).await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(10), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(reply.is_some(), "no reply:\n{}", pod.log_tail(30));
    caller.hang_up().await.unwrap();

    // Deepgram saw two utterances; the persona answered one turn.
    assert_eq!(emus.deepgram.transcripts(), script);
    let v2v = caller.voice_to_voice();
    assert_eq!(
        v2v[0].1, None,
        "something was said during the pause: {v2v:?}"
    );
    assert!(v2v[1].1.is_some());
    let full = "I was thinking about going to the gym tomorrow.";
    let requests = emus.chat_messages();
    let answered = requests
        .iter()
        .find(|m| m.last().is_some_and(|(r, c)| r == "user" && c == full))
        .unwrap_or_else(|| panic!("no request with the whole sentence: {requests:?}"));
    assert_eq!(
        answered.len(),
        2,
        "greeting + the one caller turn: {answered:?}"
    );
    assert!(caller.violations().is_empty());
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_clears_twilio_and_the_history_keeps_only_what_was_heard() {
    // Proves the caller talking over a long answer gets a `clear` quickly, and the
    // next model request holds the interrupted answer cut where the caller cut in.
    let long = "We make chocolate cake, lemon cake and carrot cake every day. \
                The chocolate one is the most popular and sells out by noon. \
                On weekends we also bake a cheesecake with fresh berries on top.";
    let script = lines(&["Tell me about your cakes.", "Actually what about cookies?"]);
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[
            ("cakes", long),
            ("cookies", "We have chocolate chip cookies."),
        ]),
        "Sorry?".into(),
        said.clone(),
    );
    let emus = Emulators::start(script.clone(), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap()
        .expect("greeting");
    caller.say(&script[0]).await.unwrap();
    caller
        .interrupt_after(
            Duration::from_millis(2000),
            &script[1],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let reply = caller
        .listen(Duration::from_secs(10), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(
        reply.is_some(),
        "no answer after the barge-in:\n{}",
        pod.log_tail(30)
    );
    caller.hang_up().await.unwrap();

    assert!(caller.clears() >= 1, "no clear");
    let barge = caller.barge_in_latencies();
    assert!(!barge.is_empty());
    // About 0.5 s here unloaded (two words of interims); 1.5 s keeps 3x headroom on a
    // loaded CI and still proves the reply was cut, not played out. The benchmark
    // measures it properly.
    assert!(
        barge[0] < Duration::from_millis(1500),
        "clear after {:?}",
        barge[0]
    );
    assert!(
        pod.metric("voice_barge_ins_total", &[("persona", "ada")])
            .await
            .unwrap()
            >= 1.0
    );
    let requests = emus.chat_messages();
    let next = requests
        .iter()
        .find(|m| m.last().is_some_and(|(_, c)| c == &script[1]))
        .unwrap_or_else(|| panic!("no request for the interruption: {requests:?}"));
    let (role, heard) = &next[next.len() - 2];
    assert_eq!(role, "assistant");
    assert!(heard.ends_with('—'), "not marked as cut: {heard:?}");
    let prefix = heard.trim_end_matches('—');
    assert!(
        long.starts_with(prefix) && prefix.len() < long.len() / 2,
        "history should hold the heard part only (about 2 s of {} s): {heard:?}",
        long.len() / 15
    );
    assert!(caller.violations().is_empty());
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_presses_reach_the_model_as_a_caller_turn() {
    // Proves DTMF is surfaced: digits become "[caller pressed ...]" for the model.
    let said = Arc::new(Mutex::new(Vec::new()));
    let replies = table_replies(
        table(&[("pressed 1 2", "You chose option twelve.")]),
        "Sorry?".into(),
        said.clone(),
    );
    let emus = Emulators::start(Vec::new(), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let pod = PodProcess::start(&emus, &[("ada", persona_json(json!({})))], &[])
        .await
        .unwrap();
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap()
        .expect("greeting");
    caller.dtmf('1').await.unwrap();
    caller.silence(Duration::from_millis(200)).await.unwrap();
    caller.dtmf('2').await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(10), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(
        reply.is_some(),
        "no answer to the keys:\n{}",
        pod.log_tail(30)
    );
    caller.hang_up().await.unwrap();
    let requests = emus.chat_messages();
    assert!(
        requests
            .iter()
            .any(|m| m.last().is_some_and(|(_, c)| c == "[caller pressed 1 2]")),
        "{requests:?}"
    );
    // Keys can be a PIN or a card number: the log never holds them.
    let log = pod.log();
    assert!(
        !log.contains("\"digit\"") && !log.contains("pressed 1 2"),
        "DTMF digits in the log"
    );
    pod.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persona_that_may_end_the_call_says_goodbye_then_hangs_up() {
    // Proves the end_call tool (issue 19): a persona with `tools.endCall` offers the
    // model `end_call`; when the model says goodbye and calls it, the caller hears the
    // whole goodbye, then the pod ends the call (`ended_by_persona`).
    let bye = "It was lovely talking to you. Goodbye!";
    let replies = Arc::new(move |call: &ChatCall| {
        let offered = call.tools.iter().any(|t| t == "end_call");
        if offered && call.last_user().is_some_and(|u| u.contains("bye")) {
            Reply {
                reasoning: None,
                content: bye.into(),
                tool_calls: vec![("end_call".into(), "{}".into())],
            }
        } else {
            Reply::text("Happy to help with anything else.")
        }
    });
    let emus = Emulators::start(
        lines(&["That is all for today, bye."]),
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .unwrap();
    let pod = PodProcess::start(
        &emus,
        &[("ada", persona_json(json!({"tools": {"endCall": true}})))],
        &[],
    )
    .await
    .unwrap();
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap()
        .expect("greeting");
    caller.say("That is all for today, bye.").await.unwrap();
    let goodbye = caller
        .listen(Duration::from_secs(10), Duration::from_millis(400))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no goodbye:\n{}", pod.log_tail(40)));
    let heard = goodbye.bytes as f64 / 8000.0;
    let expected = bye.chars().count() as f64 / 15.0;
    assert!(
        heard >= 0.9 * expected,
        "heard {heard:.1} s of {expected:.1} s"
    );
    assert!(
        caller.wait_closed(Duration::from_secs(10)).await,
        "the persona did not hang up:\n{}",
        pod.log_tail(40)
    );
    assert!(
        pod.log().contains("ended_by_persona"),
        "{}",
        pod.log_tail(20)
    );
    let offered = emus.cerebras.chat_requests();
    assert!(
        offered
            .iter()
            .all(|r| r.body["tools"][0]["function"]["name"] == "end_call"),
        "every request of ada offers end_call"
    );
    pod.stop().await.unwrap();
}
