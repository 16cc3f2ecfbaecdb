//! `local-call`: one whole phone call on this machine, no accounts needed.
//!
//! A LOCAL SIMULATION: it starts the real `voice-pod serve` binary and emulators of
//! Deepgram, Cerebras and ElevenLabs, then a simulated Twilio caller speaks a scripted
//! conversation (real espeak-ng speech, streamed in real time) over real sockets. It
//! prints the transcript as the pod kept it, the latency of every turn by stage, and
//! the metrics the pod exported.
//!
//! `cargo run --release -p callmeback-tests --bin local-call [-- --profile zero|realistic]`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use callmeback_tests::call_harness::{
    Caller, CallerEvent, Emulators, PodProcess, ProviderProfile, persona_json, table_replies,
};
use serde_json::json;

const GREETING: &str = "Hi, this is Ada from Sunny Side Bakery. How can I help?";

/// One step of the caller's script.
enum Step {
    /// Say a sentence, then listen to the answer.
    Say(&'static str),
    /// Say the first part, pause, then the rest (one sentence, two utterances).
    SayWithPause(&'static str, Duration, &'static str),
    /// Wait for the answer to start, then talk over it after this long.
    Interrupt(Duration, &'static str),
}

fn script() -> Vec<Step> {
    vec![
        Step::Say("What time do you open tomorrow?"),
        Step::SayWithPause(
            "I was thinking about",
            Duration::from_millis(600),
            "ordering a birthday cake.",
        ),
        Step::Interrupt(Duration::from_millis(1800), "Chocolate please."),
        Step::Say("My name is Sam Taylor."),
    ]
}

fn replies() -> Vec<(String, String)> {
    [
        ("open", "We open at seven in the morning and close at six in the evening."),
        (
            "birthday cake",
            "Lovely! We make chocolate, vanilla and lemon cakes. A cake for ten people costs forty dollars, and we need two days notice. Which flavour would you like?",
        ),
        ("chocolate", "Great choice, a chocolate cake for ten. What name should I put the order under?"),
        ("sam taylor", "Thank you, Sam. Your chocolate cake will be ready on Friday. Goodbye!"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut profile = ProviderProfile::REALISTIC;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => {
                profile = ProviderProfile::parse(&args.next().context("--profile needs a value")?)?
            }
            "-h" | "--help" => {
                println!("local-call [--profile zero|realistic]  (default: realistic)");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    println!("==================================================================");
    println!(" callmeback LOCAL SIMULATION: no phone, no provider accounts.");
    println!(" The real voice-pod binary talks to emulated Deepgram, Cerebras and");
    println!(" ElevenLabs over real sockets; a simulated Twilio caller speaks");
    println!(
        " espeak-ng audio in real time. Provider latency profile: {}",
        profile.name
    );
    println!("==================================================================\n");

    let steps = script();
    let mut stt_lines = Vec::new();
    for s in &steps {
        match s {
            Step::Say(t) | Step::Interrupt(_, t) => stt_lines.push(t.to_string()),
            Step::SayWithPause(a, _, b) => {
                stt_lines.push(a.to_string());
                stt_lines.push(b.to_string());
            }
        }
    }
    let said = Arc::new(Mutex::new(Vec::new()));
    let reply_fn = table_replies(
        replies(),
        "Sorry, could you say that again?".into(),
        said.clone(),
    );
    let emus = Emulators::start(stt_lines, reply_fn, profile).await?;
    let persona = persona_json(json!({
        "displayName": "Ada",
        "systemPrompt": "You are Ada, who takes orders for Sunny Side Bakery on the phone.",
        "greeting": GREETING,
    }));
    print!("starting the pod ... ");
    let pod = PodProcess::start(&emus, &[("ada", persona)], &[]).await?;
    println!(
        "ready (pid {}, app {}, metrics {})\n",
        pod.pid(),
        pod.app_url,
        pod.metrics_url
    );

    let mut caller = Caller::dial(&pod.sim(), "+14155550123", "+14155550100").await?;
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await?;
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Say(t) => caller.say(t).await?,
            Step::SayWithPause(a, pause, b) => {
                caller.say(a).await?;
                caller.silence(*pause).await?;
                caller.say(b).await?;
            }
            Step::Interrupt(after, t) => {
                caller
                    .interrupt_after(*after, t, Duration::from_secs(10))
                    .await?;
            }
        }
        // Listen to the answer, unless the next step talks over it.
        if !matches!(steps.get(i + 1), Some(Step::Interrupt(..))) {
            caller
                .listen(Duration::from_secs(12), Duration::from_millis(700))
                .await?;
        }
    }
    caller.hang_up().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The transcript as the pod kept it: the last request's history plus its answer.
    println!("--- transcript (as the pod's history has it; \"—\" marks where the caller cut in)");
    let requests = emus.chat_messages();
    if let Some(last) = requests.last() {
        for (role, content) in last {
            println!(
                "{:>8}: {content}",
                if role == "user" { "caller" } else { "Ada" }
            );
        }
        let said = said.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some((_, answer)) = said
            .iter()
            .rev()
            .find(|(u, _)| last.last().is_some_and(|(_, c)| c == u))
        {
            println!("{:>8}: {answer}", "Ada");
        }
    }

    println!(
        "\n--- latency per turn (caller: last voiced frame sent -> first reply frame received)"
    );
    let stages = stage_lines(&pod.log());
    let greeting = caller.greeting_latency();
    println!(
        "greeting: {} ms from `start` to the first audio frame",
        greeting.map_or("-".into(), |d| d.as_millis().to_string())
    );
    let mut stage_iter = stages.iter();
    for (label, v2v) in caller.voice_to_voice() {
        let Some(v) = v2v else {
            println!("{label:<34} no reply (the caller went on: as intended)");
            continue;
        };
        let pod_side = stage_iter
            .next()
            .map(|s| {
                format!(
                    "pod: end of speech->audio {} ms = turn decision {} + llm first token {} + tts first audio {} (preemptive work overlaps)",
                    s.0, s.1, s.2, s.3
                )
            })
            .unwrap_or_default();
        println!("{label:<34} {:>4} ms   {pod_side}", v.as_millis());
    }
    for b in caller.barge_in_latencies() {
        println!(
            "barge-in: caller speech start -> clear: {} ms",
            b.as_millis()
        );
    }
    println!("reply underruns heard by the caller: {}", caller.underruns);
    let events = caller
        .log
        .iter()
        .filter(|t| matches!(t.ev, CallerEvent::Mark(_)))
        .count();
    println!(
        "marks received: {events}, Twilio rule violations: {}",
        caller.violations().len()
    );

    println!("\n--- pod metrics (voice_*, histogram buckets omitted)");
    for line in pod.scrape().await?.lines() {
        if line.starts_with("voice_") && !line.contains("_bucket") {
            println!("{line}");
        }
    }
    let (_, peak) = pod.rss_kib()?;
    println!(
        "\npod process: {:.2} CPU-seconds, peak RSS {:.1} MiB",
        pod.cpu_seconds()?,
        peak as f64 / 1024.0
    );
    let kept = std::env::temp_dir().join("callmeback-local-call.log");
    if std::fs::copy(&pod.log_path, &kept).is_ok() {
        println!("pod log (JSON, one line per event): {}", kept.display());
    }
    pod.stop().await?;
    println!("\nThis was a local simulation. For real calls, see the README: provider keys,");
    println!("CALLMEBACK_PUBLIC_URL and a Twilio number pointed at /twilio/voice.");
    Ok(())
}

/// (total, stt, llm, tts) ms of each `first reply audio` line in the pod's JSON log.
fn stage_lines(log: &str) -> Vec<(String, String, String, String)> {
    let get = |f: &serde_json::Value, k: &str| {
        f.get(k)
            .and_then(|v| v.as_u64())
            .map_or("-".into(), |v| v.to_string())
    };
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "first reply audio")
        .map(|v| {
            let f = &v["fields"];
            (
                get(f, "total_ms"),
                get(f, "stt_ms"),
                get(f, "llm_ms"),
                get(f, "tts_ms"),
            )
        })
        .collect()
}
