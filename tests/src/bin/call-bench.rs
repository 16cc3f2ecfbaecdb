//! `call-bench`: N concurrent simulated calls against one real `voice-pod serve`.
//!
//! Each call: the greeting, then four caller turns spoken in real time (espeak-ng
//! audio, 20 ms frames, silence in between), one of which talks over the persona's
//! answer (a barge-in); about 40 s per call. The providers are the emulators, with
//! the `zero` or `realistic` latency profile. Reported, measured at the simulated
//! caller: voice-to-voice latency (last voiced frame sent -> first reply frame
//! received), barge-in time (caller speech start -> `clear`), greeting time (`start`
//! -> first frame), reply underruns; from `/proc`: the pod's CPU seconds per call and
//! its peak RSS growth per call.
//!
//! With `--database-url URL` the pod keeps call records, transcripts and costs in that
//! PostgreSQL database (run it with and without to see what persistence adds to a
//! turn); the store's written and dropped record counts are reported.
//!
//! `cargo run --release -p callmeback-tests --bin call-bench -- --calls 100 --profile realistic`

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use callmeback_tests::call_harness::{
    Caller, Emulators, PodProcess, ProviderProfile, percentile_ms, persona_json, table_replies,
};
use serde_json::json;
use tokio::time::Instant;

struct Args {
    calls: usize,
    profile: ProviderProfile,
    ramp: Duration,
    preemptive: bool,
    endpointing_ms: u32,
    /// Fixed metrics address of the pod, for a scraper (render_dashboard) beside the run.
    metrics_listen: Option<String>,
    /// `DATABASE_URL` for the pod; persistence off when `None`.
    database_url: Option<String>,
    /// Write the timeline of every unhealthy call to this file.
    timelines: Option<std::path::PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        calls: 10,
        profile: ProviderProfile::ZERO,
        ramp: Duration::from_millis(100),
        preemptive: true,
        endpointing_ms: 200,
        metrics_listen: None,
        database_url: None,
        timelines: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--calls" => a.calls = val()?.parse()?,
            "--profile" => a.profile = ProviderProfile::parse(&val()?)?,
            "--ramp-ms" => a.ramp = Duration::from_millis(val()?.parse()?),
            "--no-preempt" => a.preemptive = false,
            "--endpointing-ms" => a.endpointing_ms = val()?.parse()?,
            "--metrics-listen" => a.metrics_listen = Some(val()?),
            "--database-url" => a.database_url = Some(val()?),
            "--timelines" => a.timelines = Some(val()?.into()),
            "-h" | "--help" => {
                println!(
                    "call-bench [--calls N] [--profile zero|realistic] [--ramp-ms MS] [--endpointing-ms MS] [--no-preempt] [--metrics-listen 127.0.0.1:PORT] [--database-url URL] [--timelines FILE]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

/// What the caller says: (line, whether it talks over the previous answer).
const TURNS: [(&str, bool); 4] = [
    ("Hi there, what time do you open tomorrow?", false),
    ("Can you tell me about your birthday cakes?", false),
    ("Sorry to interrupt, do you have a chocolate one?", true),
    ("Perfect, please put one aside for me.", false),
];

fn replies() -> Vec<(String, String)> {
    [
        ("open tomorrow", "We open at seven in the morning and close at six in the evening."),
        (
            "birthday cakes",
            "We make chocolate, vanilla and lemon birthday cakes. A cake for ten people costs forty dollars. We need two days notice for every order.",
        ),
        ("chocolate one", "Yes, the chocolate cake is our most popular one, with dark chocolate icing."),
        ("put one aside", "Done, one chocolate cake is set aside for you. See you soon."),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect()
}

#[derive(Default)]
struct CallResult {
    ok: bool,
    greeting: Option<Duration>,
    v2v: Vec<Duration>,
    barge: Vec<Duration>,
    underruns: u32,
    violations: usize,
    error: Option<String>,
    /// What the caller saw and did ([`Caller::timeline`]).
    timeline: String,
}

async fn one_call(pod: Arc<PodProcess>) -> CallResult {
    let mut r = CallResult::default();
    if let Err(e) = run_call(&pod, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    r
}

async fn run_call(pod: &PodProcess, r: &mut CallResult) -> anyhow::Result<()> {
    let mut caller = Caller::dial(&pod.sim(), "+14155550123", "+14155550100").await?;
    let scripted = script(&mut caller).await;
    r.timeline = caller.timeline();
    scripted?;
    caller.hang_up().await?;
    r.timeline = caller.timeline();
    r.greeting = caller.greeting_latency();
    r.v2v = caller
        .voice_to_voice()
        .into_iter()
        .filter_map(|(_, d)| d)
        .collect();
    r.barge = caller.barge_in_latencies();
    r.underruns = caller.underruns;
    r.violations = caller.violations().len();
    r.ok = r.v2v.len() == TURNS.len() && r.barge.len() == 1 && r.violations == 0;
    Ok(())
}

/// The caller's part: greeting, four turns (the third a barge-in).
async fn script(caller: &mut Caller) -> anyhow::Result<()> {
    caller
        .listen(Duration::from_secs(10), Duration::from_millis(600))
        .await?
        .context("no greeting")?;
    for (i, (line, _)) in TURNS.iter().enumerate() {
        let interrupts_next = TURNS.get(i + 1).is_some_and(|(_, b)| *b);
        if TURNS[i].1 {
            caller
                .interrupt_after(Duration::from_millis(1500), line, Duration::from_secs(10))
                .await?;
        } else {
            caller.say(line).await?;
        }
        if !interrupts_next {
            caller
                .listen(Duration::from_secs(15), Duration::from_millis(800))
                .await?
                .with_context(|| format!("no answer to {line:?}"))?;
            caller.silence(Duration::from_millis(700)).await?;
        }
    }
    Ok(())
}

/// p50/p95/p99 of `voice_turn_latency_seconds{stage}` in one scrape, with
/// Prometheus' `histogram_quantile` bucket interpolation (what the dashboard shows).
fn pod_turn_quantiles(metrics_text: &str, stage: &str) -> String {
    use callmeback_tests::exposition::{histogram_quantile, parse};
    let samples = match parse(metrics_text) {
        Ok(s) => s,
        Err(e) => return format!("unreadable scrape: {e}"),
    };
    [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]
        .iter()
        .map(|(name, q)| {
            let x = histogram_quantile(
                *q,
                &samples,
                "voice_turn_latency_seconds",
                &[("stage", stage)],
            );
            if x.is_finite() {
                format!("{name} {:.0} ms", x * 1000.0)
            } else {
                format!("{name} -")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn stats(name: &str, v: &[Duration]) -> String {
    let p = |q| percentile_ms(v, q).map_or("-".into(), |x| format!("{x:.0}"));
    format!(
        "{name:<34} n={:<5} p50={:>5} ms  p95={:>5} ms  p99={:>5} ms  max={:>5} ms",
        v.len(),
        p(50.0),
        p(95.0),
        p(99.0),
        p(100.0)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut stt_lines: Vec<String> = TURNS.iter().map(|(l, _)| l.to_string()).collect();
    stt_lines.dedup();
    let said = Arc::new(Mutex::new(Vec::new()));
    let emus = Emulators::start(
        stt_lines,
        table_replies(replies(), "Sorry, could you say that again?".into(), said),
        args.profile,
    )
    .await?;
    let persona = persona_json(json!({
        "displayName": "Ada",
        "systemPrompt": "You are Ada, who takes orders for Sunny Side Bakery on the phone.",
        "greeting": "Hi, this is Ada from Sunny Side Bakery. How can I help?",
        "stt": {"endpointingMs": args.endpointing_ms},
        "turnTaking": {"preemptiveGeneration": args.preemptive},
        "maxCallDurationSeconds": 300,
        "idleTimeoutSeconds": 60,
    }));
    let mut env = vec![("RUST_LOG", "warn")];
    if let Some(addr) = &args.metrics_listen {
        env.push(("CALLMEBACK_METRICS_LISTEN", addr.as_str()));
    }
    if let Some(url) = &args.database_url {
        env.push(("DATABASE_URL", url.as_str()));
    }
    let pod = Arc::new(PodProcess::start(&emus, &[("ada", persona)], &env).await?);
    // Render every line once before the clock starts.
    for (l, _) in TURNS {
        callmeback_tests::speech::render_mulaw_async(l).await?;
    }
    // Warm-up call: the pod synthesizes and caches the persona's phrases.
    {
        let mut c = Caller::dial(&pod.sim(), "+14155550123", "+14155550100").await?;
        c.listen(Duration::from_secs(10), Duration::from_millis(300))
            .await?;
        c.hang_up().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu0 = pod.cpu_seconds()?;
    let (rss0, _) = pod.rss_kib()?;
    eprintln!(
        "running {} calls (profile {}, endpointing {} ms, preemptive {}), pod pid {}",
        args.calls,
        args.profile.name,
        args.endpointing_ms,
        args.preemptive,
        pod.pid()
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.calls {
        let pod = pod.clone();
        let delay = args.ramp * i as u32;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            one_call(pod).await
        }));
    }
    // Sample the pod while calls run.
    let stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (pod, stop) = (pod.clone(), stop.clone());
        tokio::spawn(async move {
            let mut peak_active = 0.0f64;
            let mut peak_rss = 0u64;
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let active = pod.metric("voice_active_calls", &[]).await.unwrap_or(0.0);
                peak_active = peak_active.max(active);
                if let Ok((rss, _)) = pod.rss_kib() {
                    peak_rss = peak_rss.max(rss);
                }
            }
            (peak_active, peak_rss)
        })
    };
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await?);
    }
    let wall = started.elapsed();
    let cpu = pod.cpu_seconds()? - cpu0;
    let (_, hwm) = pod.rss_kib()?;
    stop.cancel();
    let (peak_active, peak_rss) = sampler.await?;
    let metrics_text = pod.scrape().await?;

    let ok = results.iter().filter(|r| r.ok).count();
    let all = |f: fn(&CallResult) -> Vec<Duration>| -> Vec<Duration> {
        results.iter().flat_map(f).collect()
    };
    let v2v = all(|r| r.v2v.clone());
    let barge = all(|r| r.barge.clone());
    let greeting = all(|r| r.greeting.into_iter().collect());
    let underruns: u32 = results.iter().map(|r| r.underruns).sum();
    let p = args.profile;
    let floor = Duration::from_millis(args.endpointing_ms.into()) + p.stt_delay;
    let sequential = floor + p.llm_first_token + p.tts_first_audio;
    let added: Vec<Duration> = v2v.iter().map(|d| d.saturating_sub(floor)).collect();

    println!(
        "\n== call-bench: {} calls, profile {}, endpointing {} ms, preemptive generation {}, persistence {}",
        args.calls,
        p.name,
        args.endpointing_ms,
        if args.preemptive { "on" } else { "off" },
        if args.database_url.is_some() {
            "on"
        } else {
            "off"
        }
    );
    println!(
        "healthy calls (every turn answered, barge-in cleared, no protocol violation): {ok}/{}",
        args.calls
    );
    if let Some(path) = &args.timelines {
        let text: String = results
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.ok)
            .map(|(i, r)| {
                format!(
                    "== call {i}: {}\n{}\n",
                    r.error.as_deref().unwrap_or("missing turns or violations"),
                    r.timeline
                )
            })
            .collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("timelines of unhealthy calls: {}", path.display());
    }
    for r in results.iter().filter(|r| !r.ok).take(5) {
        println!(
            "  unhealthy: {}",
            r.error.as_deref().unwrap_or("missing turns or violations")
        );
    }
    println!("{}", stats("voice-to-voice", &v2v));
    println!("{}", stats("  minus endpointing+STT delay", &added));
    println!(
        "  injected: endpointing {} ms + STT {} ms; LLM first token {} ms + TTS first audio {} ms (sequential sum {} ms)",
        args.endpointing_ms,
        p.stt_delay.as_millis(),
        p.llm_first_token.as_millis(),
        p.tts_first_audio.as_millis(),
        sequential.as_millis()
    );
    println!("{}", stats("barge-in (speech start -> clear)", &barge));
    println!("{}", stats("greeting (start -> first audio)", &greeting));
    println!(
        "reply underruns at the caller: {underruns} ({:.2} per call)",
        underruns as f64 / args.calls.max(1) as f64
    );
    println!(
        "pod CPU: {cpu:.2} s for {} calls = {:.3} CPU-s per call ({:.0}% of one core over {:.1} s)",
        args.calls,
        cpu / args.calls.max(1) as f64,
        100.0 * cpu / wall.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!(
        "pod RSS: {:.1} MiB before, peak {:.1} MiB sampled / {:.1} MiB high-water -> {:.2} MiB per call; peak active calls {peak_active}",
        rss0 as f64 / 1024.0,
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        (hwm.saturating_sub(rss0)) as f64 / 1024.0 / args.calls.max(1) as f64
    );
    let sum = |name: &str, labels: &[(&str, &str)]| {
        callmeback_tests::twilio_sim::metric_value(&metrics_text, name, labels)
    };
    println!(
        "pod metrics: turns observed {} (total stage), barge-ins {}, late frames {}, inbound frames dropped {}, socket errors {}",
        sum("voice_turn_latency_seconds_count", &[("stage", "total")]),
        sum("voice_barge_ins_total", &[]),
        sum("voice_late_frames_total", &[]),
        sum("voice_inbound_frames_dropped_total", &[]),
        sum("voice_socket_errors_total", &[]),
    );
    // The pod's own view of a turn (its VAD's end of speech -> first reply frame sent):
    // set beside the caller's voice-to-voice, it tells the pod's delay from the load
    // generator's own scheduling delay on this shared machine.
    println!(
        "pod-measured turn (its end of speech -> first frame sent), from its histogram: {}",
        pod_turn_quantiles(&metrics_text, "total")
    );
    for stage in ["stt", "llm", "tts"] {
        println!(
            "  stage {stage:<3}: {}",
            pod_turn_quantiles(&metrics_text, stage)
        );
    }
    if args.database_url.is_some() {
        println!(
            "store: records written {}, dropped {}, pending at the end {}, relationship lookups timed out {}",
            sum("voice_store_written_records_total", &[]),
            sum("voice_store_dropped_records_total", &[]),
            sum("voice_store_pending_records", &[]),
            sum(
                "voice_store_relationship_lookups_total",
                &[("result", "timeout")]
            ),
        );
    }
    println!(
        "JSON {}",
        json!({
            "calls": args.calls, "profile": p.name, "endpointing_ms": args.endpointing_ms,
            "preemptive": args.preemptive, "healthy": ok, "persistence": args.database_url.is_some(),
            "v2v_p50_ms": percentile_ms(&v2v, 50.0), "v2v_p95_ms": percentile_ms(&v2v, 95.0), "v2v_p99_ms": percentile_ms(&v2v, 99.0),
            "barge_p50_ms": percentile_ms(&barge, 50.0), "barge_p95_ms": percentile_ms(&barge, 95.0),
            "greeting_p50_ms": percentile_ms(&greeting, 50.0), "greeting_p95_ms": percentile_ms(&greeting, 95.0),
            "underruns": underruns, "cpu_s_per_call": cpu / args.calls.max(1) as f64,
            "rss_mib_per_call": (hwm.saturating_sub(rss0)) as f64 / 1024.0 / args.calls.max(1) as f64,
        })
    );
    match Arc::try_unwrap(pod) {
        Ok(pod) => pod.stop().await?,
        Err(_) => bail!("pod still shared"),
    }
    Ok(())
}
