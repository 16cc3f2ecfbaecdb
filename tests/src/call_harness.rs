//! Whole calls through the real `voice-pod serve` binary, for the end-to-end tests,
//! the local demo (`local-call`) and the benchmark (`call-bench`).
//!
//! - [`Emulators`]: the three provider emulators with a latency [`ProviderProfile`].
//! - [`PodProcess`]: the real pod binary as a child process, configured through the
//!   environment exactly like in production (keys, provider URLs, persona directory),
//!   with its `/metrics`, CPU time and peak RSS readable from the outside.
//! - [`Caller`]: a simulated phone caller on a Twilio media stream: real espeak-ng
//!   speech streamed at 20 ms per frame, silence in between (Twilio never stops
//!   sending), and a timestamped log of what came back (media, marks, clear), with a
//!   playback model that counts underruns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde_json::json;
use tokio::time::Instant;

use crate::emulators::cerebras::{
    CerebrasEmulator, CerebrasEmulatorConfig, ChatCall, Reply, ReplyFn,
};
use crate::emulators::deepgram::{DeepgramEmulator, DeepgramEmulatorConfig};
use crate::emulators::elevenlabs::{ElevenLabsEmulator, ElevenLabsEmulatorConfig};
use crate::speech;
use crate::twilio_sim::{
    SimEvent, SimStream, TEST_ACCOUNT_SID, TEST_AUTH_TOKEN, TwilioSim, metric_value, new_call_sid,
};

/// RMS above which a caller frame is speech (the Deepgram emulator's threshold).
pub const SPEECH_RMS: f64 = 400.0;
/// One frame.
pub const FRAME: Duration = Duration::from_millis(20);

/// Owned lines of a caller's script.
pub fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Owned (keyword, reply) pairs for [`table_replies`].
pub fn table(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

// ---------------------------------------------------------------------- providers

/// Latency injected by the emulators.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProviderProfile {
    /// Name for reports.
    pub name: &'static str,
    /// Added to every Deepgram message.
    pub stt_delay: Duration,
    /// Cerebras request -> first token.
    pub llm_first_token: Duration,
    /// Cerebras delay between tokens.
    pub llm_inter_token: Duration,
    /// ElevenLabs first text -> first audio, per context.
    pub tts_first_audio: Duration,
}

impl ProviderProfile {
    /// No added latency.
    pub const ZERO: Self = Self {
        name: "zero",
        stt_delay: Duration::ZERO,
        llm_first_token: Duration::ZERO,
        llm_inter_token: Duration::ZERO,
        tts_first_audio: Duration::ZERO,
    };
    /// Typical production latency: STT +100 ms, LLM first token 200 ms, TTS first
    /// audio 150 ms.
    pub const REALISTIC: Self = Self {
        name: "realistic",
        stt_delay: Duration::from_millis(100),
        llm_first_token: Duration::from_millis(200),
        llm_inter_token: Duration::from_millis(2),
        tts_first_audio: Duration::from_millis(150),
    };

    /// `zero` or `realistic`.
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "zero" => Ok(Self::ZERO),
            "realistic" => Ok(Self::REALISTIC),
            other => bail!("unknown profile {other:?} (zero, realistic)"),
        }
    }
}

/// A reply function over a table: the reply to the first entry whose key the caller's
/// last message contains (case-insensitive), else `default`. Every reply given is
/// appended to `said`, so a demo can print what the persona answered.
pub fn table_replies(
    table: Vec<(String, String)>,
    default: String,
    said: Arc<Mutex<Vec<(String, String)>>>,
) -> ReplyFn {
    Arc::new(move |call: &ChatCall| {
        let user = call.last_user().unwrap_or("").to_string();
        let lower = user.to_lowercase();
        let reply = table
            .iter()
            .find(|(k, _)| lower.contains(&k.to_lowercase()))
            .map_or_else(|| default.clone(), |(_, r)| r.clone());
        said.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((user, reply.clone()));
        Reply::text(reply)
    })
}

/// The three provider emulators.
pub struct Emulators {
    /// Deepgram live.
    pub deepgram: DeepgramEmulator,
    /// Cerebras chat.
    pub cerebras: CerebrasEmulator,
    /// ElevenLabs multi-context.
    pub elevenlabs: ElevenLabsEmulator,
    /// The profile they run with.
    pub profile: ProviderProfile,
}

impl Emulators {
    /// Starts all three: the Deepgram emulator transcribes each detected utterance as
    /// the next line of `script` (per call), the Cerebras emulator answers with `reply`.
    pub async fn start(
        script: Vec<String>,
        reply: ReplyFn,
        profile: ProviderProfile,
    ) -> anyhow::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), script, reply, profile).await
    }

    /// [`Emulators::start`] listening on `bind`, e.g. the real test node's host
    /// address, where its pods reach them.
    pub async fn start_on(
        bind: std::net::IpAddr,
        script: Vec<String>,
        reply: ReplyFn,
        profile: ProviderProfile,
    ) -> anyhow::Result<Self> {
        let deepgram = DeepgramEmulator::start(DeepgramEmulatorConfig {
            bind,
            script,
            extra_latency: profile.stt_delay,
            ..DeepgramEmulatorConfig::default()
        })
        .await?;
        let cerebras = CerebrasEmulator::start(CerebrasEmulatorConfig {
            bind,
            reply,
            first_token_latency: profile.llm_first_token,
            inter_token_delay: profile.llm_inter_token,
            ..CerebrasEmulatorConfig::default()
        })
        .await?;
        let elevenlabs = ElevenLabsEmulator::start(ElevenLabsEmulatorConfig {
            bind,
            first_audio_latency: profile.tts_first_audio,
            ..ElevenLabsEmulatorConfig::default()
        })
        .await?;
        Ok(Self {
            deepgram,
            cerebras,
            elevenlabs,
            profile,
        })
    }

    /// The pod's provider settings pointing at these emulators.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DEEPGRAM_URL".into(), self.deepgram.base_url()),
            ("DEEPGRAM_API_KEY".into(), self.deepgram.api_key().into()),
            ("CEREBRAS_URL".into(), self.cerebras.base_url()),
            ("CEREBRAS_API_KEY".into(), self.cerebras.api_key().into()),
            ("ELEVENLABS_URL".into(), self.elevenlabs.base_url()),
            (
                "ELEVENLABS_API_KEY".into(),
                self.elevenlabs.api_key().into(),
            ),
        ]
    }

    /// The caller messages of every chat request (system prompt dropped), in order.
    pub fn chat_messages(&self) -> Vec<Vec<(String, String)>> {
        self.cerebras
            .chat_requests()
            .into_iter()
            .map(|r| {
                r.body["messages"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter(|m| m["role"] != "system")
                            .map(|m| {
                                (
                                    m["role"].as_str().unwrap_or("").to_string(),
                                    m["content"].as_str().unwrap_or("").to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// The environment of a pod that places calls through `POST /v1/calls`: its
/// database, the Twilio REST base, the test API token and caller ID, then `extra`
/// (later entries win).
pub fn calling_pod_env(
    database_url: &str,
    twilio_api_url: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database_url),
        ("TWILIO_API_URL", twilio_api_url),
        ("CALLMEBACK_API_TOKEN", crate::twilio_sim::TEST_API_TOKEN),
        ("TWILIO_FROM_NUMBER", crate::twilio_sim::TEST_FROM_NUMBER),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

// ---------------------------------------------------------------------- personas

/// A persona for test calls, as the operator would write it (JSON is YAML).
pub fn persona_json(overrides: serde_json::Value) -> String {
    let mut base = json!({
        "displayName": "Ada",
        "systemPrompt": "You are Ada, a friendly assistant on the phone.",
        "greeting": "Hi, this is Ada. How can I help?",
        "fallbackPhrase": "Sorry, I lost my train of thought. Could you say that again?",
        "goodbye": "Thanks for calling. Goodbye!",
        "idlePrompt": "Are you still there?",
        "voice": {"voiceId": "testvoice1"},
        "llm": {"model": "gpt-oss-120b", "maxTokens": 200},
        "stt": {"model": "nova-3", "endpointingMs": 300},
        "maxCallDurationSeconds": 120,
        "idleTimeoutSeconds": 30
    });
    merge(&mut base, overrides);
    base.to_string()
}

fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

// ---------------------------------------------------------------------- the pod

static POD_BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `voice-pod` binary of this build profile, built if needed.
///
/// `CALLMEBACK_POD_BIN` overrides. Otherwise `cargo build -p voice-pod --bin
/// voice-pod` runs once per process (a no-op when fresh), in the profile this
/// executable was built with, so a test never runs a stale pod.
pub fn pod_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CALLMEBACK_POD_BIN") {
        return Ok(PathBuf::from(p));
    }
    POD_BINARY
        .get_or_init(|| build_pod().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_pod() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow!("executable has no directory"))?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("cannot tell the build profile from {}", dir.display()))?
        .to_string();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("tests crate has no parent"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "voice-pod", "--bin", "voice-pod"]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    // Build into the same target directory this executable lives in.
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().context("running cargo build for voice-pod")?;
    let bin = dir.join("voice-pod");
    if !status.success() && !bin.exists() {
        bail!("cargo build -p voice-pod failed ({status})");
    }
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The real pod binary, running.
pub struct PodProcess {
    child: Child,
    /// `http://127.0.0.1:port` of the app (also its public URL).
    pub app_url: String,
    /// `http://127.0.0.1:port` of metrics and probes.
    pub metrics_url: String,
    /// Its JSON log (stderr).
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl PodProcess {
    /// Starts `voice-pod serve` with `personas` (name, JSON/YAML body), the providers
    /// of `emulators` and `extra_env`; waits until `/readyz` answers 200.
    pub async fn start(
        emulators: &Emulators,
        personas: &[(&str, String)],
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut env = emulators.env();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        Self::start_with_env(personas, &env).await
    }

    /// Starts `voice-pod serve` without provider keys (calls are answered in
    /// silence): for tests of the API, the scheduler and persistence. `env` may set
    /// `DATABASE_URL`, `TWILIO_API_URL` (a REST emulator), `CALLMEBACK_API_TOKEN`,
    /// `TWILIO_FROM_NUMBER` and the scheduler's settings; later entries win.
    pub async fn start_with_env(
        personas: &[(&str, String)],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let persona_dir = dir.path().join("personas");
        std::fs::create_dir_all(&persona_dir)?;
        for (name, body) in personas {
            std::fs::write(persona_dir.join(format!("{name}.json")), body)?;
        }
        let (app, metrics) = (free_port()?, free_port()?);
        let app_url = format!("http://127.0.0.1:{app}");
        // A fixed metrics address (for a scraper started beside a benchmark) wins.
        let metrics_listen = env
            .iter()
            .rev()
            .find(|(k, _)| k == "CALLMEBACK_METRICS_LISTEN")
            .map_or_else(|| format!("127.0.0.1:{metrics}"), |(_, v)| v.clone());
        let metrics_url = format!("http://{metrics_listen}");
        let log_path = dir.path().join("pod.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(pod_binary()?);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CALLMEBACK_LISTEN", format!("127.0.0.1:{app}"))
            .env("CALLMEBACK_METRICS_LISTEN", &metrics_listen)
            .env("CALLMEBACK_PUBLIC_URL", &app_url)
            .env("CALLMEBACK_PERSONA_DIR", &persona_dir)
            .env("CALLMEBACK_ROUTES_FILE", dir.path().join("routes.yaml"))
            .env("TWILIO_ACCOUNT_SID", TEST_ACCOUNT_SID)
            .env("TWILIO_AUTH_TOKEN", TEST_AUTH_TOKEN)
            .env("TWILIO_API_URL", "http://127.0.0.1:9")
            .env(
                "RUST_LOG",
                std::env::var("CALLMEBACK_POD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().context("spawning voice-pod")?;
        let mut pod = Self {
            child,
            app_url,
            metrics_url,
            log_path,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = pod.child.try_wait()? {
                bail!("voice-pod exited with {status}:\n{}", pod.log_tail(40));
            }
            let ready = client
                .get(format!("{}/readyz", pod.metrics_url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(pod);
            }
            if Instant::now() >= deadline {
                bail!("voice-pod not ready after 30 s:\n{}", pod.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A Twilio simulator for this pod.
    pub fn sim(&self) -> TwilioSim {
        TwilioSim::new(
            &self.app_url,
            &self.app_url,
            TEST_ACCOUNT_SID,
            TEST_AUTH_TOKEN,
        )
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `/metrics` text.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.metrics_url))
            .await?
            .text()
            .await?)
    }

    /// Sum of a metric's samples whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_value(&self.scrape().await?, name, labels))
    }

    /// User + system CPU seconds the pod has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("odd /proc stat"))?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        // USER_HZ is 100 on every Linux that reports /proc in ticks.
        Ok(ticks / 100.0)
    }

    /// (current, peak) resident set size in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// The last `n` lines of the pod's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL: the process dies at once, mid-work, like an OOM-killed pod.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM and returns at once.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed: {status}");
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if it is
    /// still running.
    pub async fn wait_exit(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait (bounded) for the exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        bail!("voice-pod did not exit within 20 s of SIGTERM")
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------- the caller

/// What happened on the line, from the caller's side.
#[derive(Clone, Debug, PartialEq)]
pub enum CallerEvent {
    /// `start` sent.
    Started,
    /// The first voiced frame of an utterance was sent.
    SpeechStart(String),
    /// The last voiced frame of an utterance was sent.
    SpeechEnd(String),
    /// Reply audio arrived (bytes).
    Media(usize),
    /// A mark arrived.
    Mark(String),
    /// `clear` arrived.
    Clear,
    /// A key was pressed.
    Dtmf(char),
    /// The pod closed the stream.
    Closed,
}

/// A timestamped [`CallerEvent`].
#[derive(Clone, Debug)]
pub struct Timed {
    /// When.
    pub at: Instant,
    /// What.
    pub ev: CallerEvent,
}

/// One reply as the caller heard it.
#[derive(Clone, Copy, Debug)]
pub struct HeardReply {
    /// First media frame.
    pub first_media: Instant,
    /// When its playback ended (or it was cleared).
    pub ended: Instant,
    /// Audio bytes.
    pub bytes: usize,
}

/// A whole ordinary call: dial `pod` from `from` to `to`, hear the greeting, say each
/// line and hear its answer, hang up. Panics (with the pod's log tail) when the
/// greeting or an answer does not come; returns the caller for its timings and log.
pub async fn converse(pod: &PodProcess, from: &str, to: &str, lines: &[impl AsRef<str>]) -> Caller {
    let mut caller = Caller::dial(&pod.sim(), from, to).await.unwrap();
    let greeting = caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap();
    assert!(greeting.is_some(), "no greeting:\n{}", pod.log_tail(30));
    for line in lines {
        let line = line.as_ref();
        caller.say(line).await.unwrap();
        let reply = caller
            .listen(Duration::from_secs(10), Duration::from_millis(600))
            .await
            .unwrap();
        assert!(
            reply.is_some(),
            "no reply to {line:?}:\n{}",
            pod.log_tail(30)
        );
    }
    caller.hang_up().await.unwrap();
    caller
}

/// A simulated caller on one media stream.
pub struct Caller {
    stream: SimStream,
    /// The call SID.
    pub call_sid: String,
    next_due: Instant,
    /// Everything that happened, in order.
    pub log: Vec<Timed>,
    playback_end: Instant,
    reply: Option<(Instant, usize)>,
    /// Gaps in a reply's audio (the playback buffer ran dry mid-reply).
    pub underruns: u32,
    /// The pod closed the stream.
    pub closed: bool,
    speaking: bool,
}

impl Caller {
    /// An inbound call: the signed webhook, the media stream, `connected`, `start`.
    /// Twilio has verified the caller's number (full STIR/SHAKEN attestation).
    pub async fn dial(sim: &TwilioSim, from: &str, to: &str) -> anyhow::Result<Self> {
        Self::dial_attested(sim, from, to, Some("TN-Validation-Passed-A")).await
    }

    /// An inbound call whose number Twilio attested as `verstat` (`None`: Twilio
    /// sent no `StirVerstat`, as for a spoofed or unsigned caller ID).
    pub async fn dial_attested(
        sim: &TwilioSim,
        from: &str,
        to: &str,
        verstat: Option<&str>,
    ) -> anyhow::Result<Self> {
        let call_sid = new_call_sid();
        let mut params = sim.inbound_call_params(&call_sid, from, to);
        params.retain(|(k, _)| k != "StirVerstat");
        if let Some(v) = verstat {
            params.push(("StirVerstat".into(), v.into()));
        }
        let answer = sim.post_signed("/twilio/voice", &params).await?;
        if answer.status != 200 {
            bail!("webhook answered {}: {}", answer.status, answer.body);
        }
        let twiml = answer.stream()?;
        let mut stream = sim.open_stream(&twiml).await?;
        stream.send_connected().await?;
        stream
            .send_start(&call_sid, TEST_ACCOUNT_SID, &twiml.custom_parameters())
            .await?;
        let now = Instant::now();
        Ok(Self {
            stream,
            call_sid,
            next_due: now,
            log: vec![Timed {
                at: now,
                ev: CallerEvent::Started,
            }],
            playback_end: now,
            reply: None,
            underruns: 0,
            closed: false,
            speaking: false,
        })
    }

    fn record(&mut self, ev: SimEvent, at: Instant) {
        let ev = match ev {
            SimEvent::Media(a) => {
                match &mut self.reply {
                    None => self.reply = Some((at, a.len())),
                    Some((_, bytes)) => {
                        if at > self.playback_end + FRAME && !self.speaking {
                            self.underruns += 1;
                        }
                        *bytes += a.len();
                    }
                }
                self.playback_end =
                    self.playback_end.max(at) + Duration::from_micros(a.len() as u64 * 125);
                CallerEvent::Media(a.len())
            }
            SimEvent::Mark(m) => CallerEvent::Mark(m),
            SimEvent::Clear => {
                // Cleared audio is not an answer to wait for.
                self.playback_end = at;
                self.reply = None;
                CallerEvent::Clear
            }
            SimEvent::Closed { .. } => {
                self.closed = true;
                CallerEvent::Closed
            }
        };
        self.log.push(Timed { at, ev });
    }

    /// Collects events until `until`.
    async fn collect_until(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            if self.closed {
                tokio::time::sleep_until(until).await;
                return;
            }
            if let Some(ev) = self.stream.next_event(until - now).await {
                self.record(ev, Instant::now());
            }
        }
    }

    /// Sends one frame at its 20 ms slot, collecting events while waiting for it.
    async fn frame(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        let now = Instant::now();
        if self.next_due + Duration::from_millis(100) < now {
            // Far behind (a stalled scheduler): resynchronise instead of bursting.
            self.next_due = now;
        }
        self.collect_until(self.next_due).await;
        self.next_due += FRAME;
        if self.closed {
            return Ok(());
        }
        self.stream.send_media(frame).await
    }

    /// Says `text` (rendered by espeak-ng), in real time.
    pub async fn say(&mut self, text: &str) -> anyhow::Result<()> {
        let audio = speech::render_mulaw_async(text).await?;
        self.play(&audio, text).await
    }

    /// Plays caller audio, logging the first and last voiced frames.
    pub async fn play(&mut self, audio: &[u8], label: &str) -> anyhow::Result<()> {
        let frames = speech::frames(audio);
        let voiced: Vec<bool> = frames
            .iter()
            .map(|f| voice_pod::engine::vad::rms(f) > SPEECH_RMS)
            .collect();
        let first = voiced.iter().position(|v| *v);
        let last = voiced.iter().rposition(|v| *v);
        for (i, f) in frames.iter().enumerate() {
            self.frame(f).await?;
            if Some(i) == first {
                self.speaking = true;
                // A new turn: whatever the persona was saying is over for the log.
                self.reply = None;
                self.log.push(Timed {
                    at: Instant::now(),
                    ev: CallerEvent::SpeechStart(label.to_string()),
                });
            }
            if Some(i) == last {
                self.speaking = false;
                self.log.push(Timed {
                    at: Instant::now(),
                    ev: CallerEvent::SpeechEnd(label.to_string()),
                });
            }
        }
        Ok(())
    }

    /// Silence for `d`.
    pub async fn silence(&mut self, d: Duration) -> anyhow::Result<()> {
        let frame = [speech::MULAW_SILENCE; speech::FRAME_BYTES];
        let until = Instant::now() + d;
        while Instant::now() < until && !self.closed {
            self.frame(&frame).await?;
        }
        Ok(())
    }

    /// Presses a key.
    pub async fn dtmf(&mut self, digit: char) -> anyhow::Result<()> {
        self.stream.send_dtmf(&digit.to_string()).await?;
        self.log.push(Timed {
            at: Instant::now(),
            ev: CallerEvent::Dtmf(digit),
        });
        Ok(())
    }

    /// Silence until a reply has started and finished playing (`quiet` after its
    /// playback end), or `timeout`. `None` when no reply started.
    pub async fn listen(
        &mut self,
        timeout: Duration,
        quiet: Duration,
    ) -> anyhow::Result<Option<HeardReply>> {
        let frame = [speech::MULAW_SILENCE; speech::FRAME_BYTES];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !self.closed {
            self.frame(&frame).await?;
            if let Some((first, bytes)) = self.reply
                && Instant::now() > self.playback_end + quiet
            {
                self.reply = None;
                return Ok(Some(HeardReply {
                    first_media: first,
                    ended: self.playback_end,
                    bytes,
                }));
            }
        }
        Ok(self.reply.take().map(|(first, bytes)| HeardReply {
            first_media: first,
            ended: self.playback_end,
            bytes,
        }))
    }

    /// Silence until reply audio has been playing for `after`, then says `text` over
    /// it (a barge-in). Fails if no reply starts within `timeout`.
    pub async fn interrupt_after(
        &mut self,
        after: Duration,
        text: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let audio = speech::render_mulaw_async(text).await?;
        let frame = [speech::MULAW_SILENCE; speech::FRAME_BYTES];
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((first, _)) = self.reply
                && Instant::now() >= first + after
            {
                break;
            }
            if Instant::now() >= deadline || self.closed {
                bail!("no reply to interrupt within {timeout:?}");
            }
            self.frame(&frame).await?;
        }
        self.play(&audio, text).await
    }

    /// Hangs up (`stop`) and closes the socket.
    pub async fn hang_up(&mut self) -> anyhow::Result<()> {
        if !self.closed {
            self.stream.send_stop().await?;
            self.collect_until(Instant::now() + Duration::from_millis(200))
                .await;
            self.stream.close().await;
        }
        Ok(())
    }

    /// Waits (collecting events) for the pod to close the stream.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        let frame = [speech::MULAW_SILENCE; speech::FRAME_BYTES];
        let deadline = Instant::now() + timeout;
        while !self.closed && Instant::now() < deadline {
            if self.frame(&frame).await.is_err() {
                break;
            }
        }
        self.closed
    }

    /// The call as one line per event, in ms since its first event, with reply
    /// audio merged into runs (frames under 100 ms apart) and played-out time per run:
    /// for reading what went wrong in a call a benchmark counted as unhealthy.
    pub fn timeline(&self) -> String {
        use std::fmt::Write as _;
        let Some(t0) = self.log.first().map(|t| t.at) else {
            return String::new();
        };
        let ms = |at: Instant| (at - t0).as_millis();
        let mut out = String::new();
        // (first media, last media, bytes) of the run being merged.
        let mut run: Option<(Instant, Instant, usize)> = None;
        let flush = |run: &mut Option<(Instant, Instant, usize)>, out: &mut String| {
            if let Some((first, last, bytes)) = run.take() {
                let _ = writeln!(
                    out,
                    "{:>7} reply audio until {} ms: {} ms of audio",
                    ms(first),
                    ms(last),
                    bytes / 8
                );
            }
        };
        for t in &self.log {
            if let CallerEvent::Media(bytes) = t.ev {
                match &mut run {
                    Some((_, last, total)) if t.at - *last < Duration::from_millis(100) => {
                        *last = t.at;
                        *total += bytes;
                    }
                    _ => {
                        flush(&mut run, &mut out);
                        run = Some((t.at, t.at, bytes));
                    }
                }
                continue;
            }
            if matches!(t.ev, CallerEvent::Mark(_)) {
                continue;
            }
            flush(&mut run, &mut out);
            let _ = writeln!(out, "{:>7} {:?}", ms(t.at), t.ev);
        }
        flush(&mut run, &mut out);
        out
    }

    /// Twilio-rule violations seen on the stream.
    pub fn violations(&self) -> Vec<String> {
        self.stream.violations()
    }

    /// When `start` was sent.
    pub fn started_at(&self) -> Instant {
        self.log[0].at
    }

    /// Time from `start` to the first reply audio (the greeting).
    pub fn greeting_latency(&self) -> Option<Duration> {
        self.log
            .iter()
            .find(|t| matches!(t.ev, CallerEvent::Media(_)))
            .map(|t| t.at - self.started_at())
    }

    /// For each utterance: the time from its last voiced frame to the first reply
    /// audio after it (`None` when no audio came before the next utterance).
    pub fn voice_to_voice(&self) -> Vec<(String, Option<Duration>)> {
        let mut out = Vec::new();
        for (i, t) in self.log.iter().enumerate() {
            let CallerEvent::SpeechEnd(label) = &t.ev else {
                continue;
            };
            let reply = self.log[i + 1..]
                .iter()
                .take_while(|n| !matches!(n.ev, CallerEvent::SpeechStart(_)))
                .find(|n| matches!(n.ev, CallerEvent::Media(_)))
                .map(|n| n.at - t.at);
            out.push((label.clone(), reply));
        }
        out
    }

    /// For each `clear`: the time since the start of the caller speech it answers.
    pub fn barge_in_latencies(&self) -> Vec<Duration> {
        let mut out = Vec::new();
        let mut speech_start = None;
        for t in &self.log {
            match &t.ev {
                CallerEvent::SpeechStart(_) => speech_start = Some(t.at),
                CallerEvent::Clear => {
                    if let Some(s) = speech_start.take() {
                        out.push(t.at - s);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Whether any reply audio arrived between `from` and `to`.
    pub fn media_between(&self, from: Instant, to: Instant) -> bool {
        self.log
            .iter()
            .any(|t| matches!(t.ev, CallerEvent::Media(_)) && t.at > from && t.at < to)
    }

    /// Number of `clear`s received.
    pub fn clears(&self) -> usize {
        self.log
            .iter()
            .filter(|t| t.ev == CallerEvent::Clear)
            .count()
    }

    /// The time of the last event matching `pred`.
    pub fn last_at(&self, pred: impl Fn(&CallerEvent) -> bool) -> Option<Instant> {
        self.log.iter().rev().find(|t| pred(&t.ev)).map(|t| t.at)
    }
}

/// Percentile (nearest rank) of durations, in milliseconds.
pub fn percentile_ms(samples: &[Duration], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}
