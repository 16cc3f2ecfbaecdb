//! A protocol-faithful emulator of Deepgram live speech-to-text (`/v1/listen`).
//!
//! A real WebSocket server on 127.0.0.1:0 that checks what Deepgram checks (the
//! `Authorization: Token <key>` header, `encoding=mulaw&sample_rate=8000`), closes with
//! 1011 / NET-0001 when neither audio nor a text message arrived for the idle timeout,
//! and answers like Deepgram: it detects utterances in the mu-law stream by energy and,
//! for each, sends the next line of its script as the transcript:
//! - `SpeechStarted` at the onset (with `vad_events=true`);
//! - interim `Results` while the caller speaks, revealing words progressively;
//! - a final `Results` (`is_final` + `speech_final`) after `endpointing` ms of silence;
//! - `UtteranceEnd` once `utterance_end_ms` passed after the last word;
//! - empty finals every few seconds of silence, as Deepgram does;
//! - `Finalize` answered with a final carrying `from_finalize: true`;
//! - `CloseStream` answered with the last final, `Metadata`, then a normal close.
//!
//! Times are audio time (bytes received / 8000), so replayed audio after a reconnect is
//! transcribed exactly like live audio. The script cursor is shared by every connection
//! with the same `tag` query parameter (the client tags with the call SID), so a reconnect
//! mid-utterance still yields the utterance's line and no line is skipped or repeated.
//!
//! One script line per *energy segment*: a caller pausing longer than `endpointing` ms
//! mid-sentence produces two segments, so the script needs two lines there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// Audio bytes per second (mu-law, 8 kHz, mono).
const BYTES_PER_SEC: f64 = 8000.0;
/// Analysis frame: 20 ms.
const FRAME: usize = 160;
const FRAME_SEC: f64 = 0.02;

/// Emulator settings. `Default` gives Deepgram's behaviour with no added latency.
#[derive(Clone, Debug)]
pub struct DeepgramEmulatorConfig {
    /// The address it listens on (a free port): loopback, or the test node's
    /// host address when pods on the real node call it.
    pub bind: std::net::IpAddr,
    /// The key clients must send as `Authorization: Token <key>`.
    pub api_key: String,
    /// Transcript of each utterance, in order.
    pub script: Vec<String>,
    /// Processing delay added to every message (results, VAD, utterance end).
    pub extra_latency: Duration,
    /// Close with 1011 / NET-0001 after this long without audio or a text message.
    pub idle_timeout: Duration,
    /// RMS (of 32768) above which a 20 ms frame counts as speech.
    pub energy_threshold: f64,
    /// Interim results cadence during speech (audio time).
    pub interim_interval: Duration,
    /// Words revealed per second of speech in interims.
    pub words_per_sec: f64,
    /// Characters of a script line spoken per second of voiced audio: at an endpoint
    /// inside a line (a pause at a comma), only about this much of the line has been
    /// heard, so only that much is finalized (espeak-ng speaks ~15 characters/s).
    pub chars_per_sec: f64,
    /// An empty final is sent after this much silence (audio time) since the last final.
    pub silence_final_interval: Duration,
}

impl Default for DeepgramEmulatorConfig {
    fn default() -> Self {
        Self {
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            api_key: "test-deepgram-key".into(),
            script: Vec::new(),
            extra_latency: Duration::ZERO,
            idle_timeout: Duration::from_secs(10),
            energy_threshold: 400.0,
            interim_interval: Duration::from_millis(300),
            words_per_sec: 2.5,
            chars_per_sec: 15.0,
            silence_final_interval: Duration::from_secs(3),
        }
    }
}

/// What one connection sent and how it ended (for assertions).
#[derive(Clone, Debug, Default)]
pub struct ConnectionRecord {
    /// The query parameters of the upgrade request, in order.
    pub query: Vec<(String, String)>,
    /// The `Authorization` header matched.
    pub authorized: bool,
    /// HTTP status the upgrade was refused with, if refused.
    pub refused: Option<u16>,
    /// Audio bytes received.
    pub audio_bytes: u64,
    /// Binary frames received.
    pub audio_frames: u64,
    /// `KeepAlive` messages.
    pub keepalives: u32,
    /// `Finalize` messages.
    pub finalizes: u32,
    /// `CloseStream` messages.
    pub close_streams: u32,
    /// Other text messages.
    pub unknown_messages: Vec<String>,
    /// How it ended: `client`, `close_stream`, `idle_timeout`, `fault`, `shutdown`.
    pub ended: Option<String>,
}

impl ConnectionRecord {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One result the emulator sent (for assertions).
#[derive(Clone, Debug, PartialEq)]
pub struct SentFinal {
    /// Connection index.
    pub connection: usize,
    /// Transcript.
    pub transcript: String,
    /// `speech_final`.
    pub speech_final: bool,
    /// `from_finalize`.
    pub from_finalize: bool,
}

#[derive(Default)]
struct State {
    connections: Vec<ConnectionRecord>,
    /// Next script line per `tag` (connections without a tag share "").
    cursors: HashMap<String, usize>,
    finals: Vec<SentFinal>,
    unscripted: usize,
    /// One-shot fault: drop the connection once it has received this much audio.
    drop_after_audio_bytes: Option<u64>,
    /// Added latency (can change while running).
    extra_latency: Duration,
    /// Refuse upgrades with this status (e.g. 503) while set.
    refuse_with: Option<u16>,
}

struct Shared {
    cfg: DeepgramEmulatorConfig,
    state: Mutex<State>,
    drop_epoch: watch::Sender<u64>,
    stall_epoch: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread must not hide later assertions behind poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running Deepgram emulator. Stops when dropped.
pub struct DeepgramEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl DeepgramEmulator {
    /// Starts the server on `cfg.bind` (127.0.0.1 by default), a free port.
    pub async fn start(cfg: DeepgramEmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind((cfg.bind, 0)).await?;
        let addr = listener.local_addr()?;
        let (drop_epoch, _) = watch::channel(0u64);
        let (stall_epoch, _) = watch::channel(0u64);
        let state = State {
            extra_latency: cfg.extra_latency,
            ..State::default()
        };
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(state),
            drop_epoch,
            stall_epoch,
        });
        let cancel = CancellationToken::new();
        let (s, c) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    accepted = listener.accept() => {
                        if let Ok((tcp, _)) = accepted {
                            let _ = tcp.set_nodelay(true);
                            tokio::spawn(handle_connection(tcp, s.clone(), c.clone()));
                        }
                    }
                }
            }
        });
        Ok(Self {
            addr,
            shared,
            cancel,
        })
    }

    /// The base URL to give the client (`DEEPGRAM_URL`).
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The key the emulator accepts.
    pub fn api_key(&self) -> &str {
        &self.shared.cfg.api_key
    }

    /// Every connection so far.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        self.shared.lock().connections.clone()
    }

    /// Every final result sent (empty silence finals included).
    pub fn finals(&self) -> Vec<SentFinal> {
        self.shared.lock().finals.clone()
    }

    /// Non-empty final transcripts, in order.
    pub fn transcripts(&self) -> Vec<String> {
        self.finals()
            .into_iter()
            .filter(|f| !f.transcript.is_empty())
            .map(|f| f.transcript)
            .collect()
    }

    /// Utterances detected after the script ran out (a test script/audio mismatch).
    pub fn unscripted(&self) -> usize {
        self.shared.lock().unscripted
    }

    /// Fault: drops every live socket now, without a close frame.
    pub fn drop_connections(&self) {
        self.shared.drop_epoch.send_modify(|e| *e += 1);
    }

    /// Fault: every live socket goes silent (keeps reading, never answers), like a
    /// connection that died without TCP noticing. New connections answer normally.
    pub fn stall_connections(&self) {
        self.shared.stall_epoch.send_modify(|e| *e += 1);
    }

    /// Fault (one-shot): the first connection to have received `audio` of audio is
    /// dropped without a close frame.
    pub fn drop_after_audio(&self, audio: Duration) {
        self.shared.lock().drop_after_audio_bytes =
            Some((audio.as_secs_f64() * BYTES_PER_SEC) as u64);
    }

    /// Changes the processing delay added to every message.
    pub fn set_extra_latency(&self, latency: Duration) {
        self.shared.lock().extra_latency = latency;
    }

    /// Fault: refuse new upgrades with this HTTP status (`None` to accept again).
    pub fn refuse_connections(&self, status: Option<u16>) {
        self.shared.lock().refuse_with = status;
    }

    /// Stops the server and every connection.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for DeepgramEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// G.711 mu-law to linear PCM (the standard formula, independent of the pod's codec).
fn mulaw_to_linear(code: u8) -> i16 {
    let u = !code;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = u & 0x0F;
    let magnitude = ((i32::from(mantissa) << 3) + 0x84) << exponent;
    let sample = magnitude - 0x84;
    (if sign != 0 { -sample } else { sample }) as i16
}

/// RMS level of a mu-law frame (of 32768): the emulator's only notion of speech.
fn frame_energy(frame: &[u8]) -> f64 {
    if frame.is_empty() {
        return 0.0;
    }
    (frame
        .iter()
        .map(|&c| {
            let s = f64::from(mulaw_to_linear(c));
            s * s
        })
        .sum::<f64>()
        / frame.len() as f64)
        .sqrt()
}

/// The longest silence *inside* `audio` (between its first and last voiced 20 ms
/// frames), as the emulator hears it at `energy_threshold`. A test whose line must stay
/// one utterance asserts that endpointing leaves headroom over this.
pub fn longest_inner_pause(audio: &[u8], energy_threshold: f64) -> Duration {
    let voiced: Vec<bool> = audio
        .chunks(FRAME)
        .map(|f| frame_energy(f) > energy_threshold)
        .collect();
    let (Some(first), Some(last)) = (
        voiced.iter().position(|&v| v),
        voiced.iter().rposition(|&v| v),
    ) else {
        return Duration::ZERO;
    };
    let mut longest = 0u32;
    let mut run = 0u32;
    for &v in voiced.get(first..=last).unwrap_or_default() {
        run = if v { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    Duration::from_millis(u64::from(longest) * 20)
}

fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn refuse(status: StatusCode, code: &str, msg: &str) -> ErrorResponse {
    let body = json!({"err_code": code, "err_msg": msg, "request_id": uuid_like()}).to_string();
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = status;
    resp
}

fn uuid_like() -> String {
    let r: u128 = rand::random();
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// What the connection loop schedules for the writer.
enum Out {
    /// A text message due at an instant.
    Text(Instant, String),
    /// A close frame (after everything queued before it).
    Close(Instant, CloseCode, String),
}

async fn handle_connection(tcp: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut record = ConnectionRecord::default();
    let key = shared.cfg.api_key.clone();
    let refuse_with = shared.lock().refuse_with;
    // The error type is tungstenite's handshake response; its size is not ours to pick.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        record.query = parse_query(req.uri().query());
        if req.uri().path() != "/v1/listen" {
            record.refused = Some(404);
            return Err(refuse(StatusCode::NOT_FOUND, "NOT_FOUND", "Unknown path"));
        }
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        record.authorized = auth == format!("Token {key}");
        if !record.authorized {
            record.refused = Some(401);
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "INVALID_AUTH",
                "Invalid credentials.",
            ));
        }
        if let Some(status) = refuse_with {
            record.refused = Some(status);
            return Err(refuse(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "UNAVAILABLE",
                "Service unavailable (emulated fault).",
            ));
        }
        let get = |k: &str| {
            record
                .query
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        if get("encoding").as_deref() != Some("mulaw")
            || get("sample_rate").as_deref() != Some("8000")
        {
            record.refused = Some(400);
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "encoding=mulaw and sample_rate=8000 are required for raw telephone audio.",
            ));
        }
        Ok(resp)
    };
    let accepted = tokio_tungstenite::accept_hdr_async(tcp, callback).await;
    let index = {
        let mut st = shared.lock();
        st.connections.push(record.clone());
        st.connections.len() - 1
    };
    let Ok(ws) = accepted else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(1024);
    // Writer: sends each message at its due time, in order.
    let writer = tokio::spawn(async move {
        while let Some(out) = out_rx.recv().await {
            match out {
                Out::Text(due, text) => {
                    sleep_until(due).await;
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Out::Close(due, code, reason) => {
                    sleep_until(due).await;
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    return;
                }
            }
        }
    });

    let q = &record.query;
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let ms_param = |k: &str, default: f64| {
        param(k)
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(default, |ms| ms / 1000.0)
    };
    let mut rec = Recognizer {
        endpointing: ms_param("endpointing", 10.0),
        utterance_end: param("utterance_end_ms")
            .and_then(|v| v.parse::<f64>().ok())
            .map(|ms| ms / 1000.0),
        interim: param("interim_results") == Some("true"),
        vad_events: param("vad_events") == Some("true"),
        smart_format: param("smart_format") == Some("true") || param("punctuate") == Some("true"),
        tag: param("tag").unwrap_or("").to_owned(),
        connection: index,
        shared: shared.clone(),
        out: out_tx.clone(),
        request_id: uuid_like(),
        samples: 0,
        pending: Vec::new(),
        seg_start: 0.0,
        voiced_run: 0,
        candidate_onset: 0.0,
        utt: None,
        line_rest: None,
        pending_ue: None,
        stalled: false,
    };
    let idle = shared.cfg.idle_timeout;
    let mut idle_deadline = Instant::now() + idle;
    let mut drops = shared.drop_epoch.subscribe();
    let mut stalls = shared.stall_epoch.subscribe();
    let ended: &str = loop {
        tokio::select! {
            _ = cancel.cancelled() => break "shutdown",
            _ = drops.changed() => break "fault",
            _ = stalls.changed() => rec.stalled = true,
            _ = sleep_until(idle_deadline) => {
                let due = rec.due();
                let _ = out_tx.send(Out::Close(due, CloseCode::Error,
                    "Deepgram did not receive audio data or a text message within the timeout window. See https://dpgr.am/net0001".into())).await;
                break "idle_timeout";
            }
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    idle_deadline = Instant::now() + idle;
                    if b.is_empty() {
                        // Deepgram's legacy close signal.
                        rec.close_stream().await;
                        break "close_stream";
                    }
                    let drop_now = {
                        let mut st = shared.lock();
                        let c = &mut st.connections[index];
                        c.audio_bytes += b.len() as u64;
                        c.audio_frames += 1;
                        let total = c.audio_bytes;
                        match st.drop_after_audio_bytes {
                            Some(limit) if total >= limit => {
                                st.drop_after_audio_bytes = None;
                                true
                            }
                            _ => false,
                        }
                    };
                    rec.audio(&b).await;
                    if drop_now {
                        break "fault";
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    idle_deadline = Instant::now() + idle;
                    let kind = serde_json::from_str::<serde_json::Value>(&t)
                        .ok()
                        .and_then(|v| v.get("type").and_then(|k| k.as_str()).map(str::to_owned));
                    match kind.as_deref() {
                        Some("KeepAlive") => shared.lock().connections[index].keepalives += 1,
                        Some("Finalize") => {
                            shared.lock().connections[index].finalizes += 1;
                            rec.finalize().await;
                        }
                        Some("CloseStream") => {
                            shared.lock().connections[index].close_streams += 1;
                            rec.close_stream().await;
                            break "close_stream";
                        }
                        _ => shared.lock().connections[index].unknown_messages.push(t.to_string()),
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break "client",
                Some(Ok(_)) => {}
            },
        }
    };
    shared.lock().connections[index].ended = Some(ended.to_owned());
    drop(out_tx);
    drop(rec);
    if ended == "fault" || ended == "shutdown" {
        // Abrupt: no close frame; dropping both halves closes the TCP connection.
        writer.abort();
        drop(stream);
    } else {
        let _ = writer.await;
        // Give the client a moment to read the close frame before the socket goes.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
}

/// Where a pause cut a line: `Some(n)` when `heard_chars` of speech cannot have
/// covered `rest` (under 60% of its characters) and a clause break (a word ending in
/// `,` `;` `:`) before its last word lies near what was heard: the first `n` words were
/// spoken. `None`: the line is finished (or the pause fell mid-clause, where the
/// emulator cannot tell which word came last, so it keeps the whole line together).
fn pause_cut(rest: &[String], heard_chars: f64) -> Option<usize> {
    let total: usize = rest.iter().map(|w| w.len() + 1).sum();
    if rest.len() < 2 || heard_chars >= 0.6 * total as f64 {
        return None;
    }
    let mut chars = 0usize;
    rest[..rest.len() - 1]
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            chars += w.len() + 1;
            w.ends_with([',', ';', ':']).then_some((i + 1, chars))
        })
        .min_by(|(_, a), (_, b)| {
            let da = (*a as f64 - heard_chars).abs();
            let db = (*b as f64 - heard_chars).abs();
            da.total_cmp(&db)
        })
        .map(|(n, _)| n)
}

/// The utterance in progress.
struct Utterance {
    onset: f64,
    last_voiced_end: f64,
    /// Script words (punctuated), and whether the script had a line.
    words: Vec<String>,
    /// Words already finalized by `Finalize`.
    consumed: usize,
    revealed: usize,
    last_interim: f64,
}

/// Energy-based utterance detection and Deepgram-shaped answers for one connection.
struct Recognizer {
    endpointing: f64,
    utterance_end: Option<f64>,
    interim: bool,
    vad_events: bool,
    smart_format: bool,
    tag: String,
    connection: usize,
    shared: Arc<Shared>,
    out: mpsc::Sender<Out>,
    request_id: String,
    /// Audio samples (bytes) analysed so far.
    samples: u64,
    /// Bytes not yet making a whole 20 ms frame.
    pending: Vec<u8>,
    /// Start of the current result segment (end of the last final), seconds.
    seg_start: f64,
    voiced_run: u32,
    candidate_onset: f64,
    utt: Option<Utterance>,
    /// The rest of a script line whose first part ended at a pause (an endpoint
    /// inside the line): the next utterance goes on with it.
    line_rest: Option<Vec<String>>,
    /// Last word end awaiting an `UtteranceEnd`.
    pending_ue: Option<f64>,
    /// A stall fault: nothing is sent any more.
    stalled: bool,
}

impl Recognizer {
    fn now(&self) -> f64 {
        self.samples as f64 / BYTES_PER_SEC
    }

    fn due(&self) -> Instant {
        Instant::now() + self.shared.lock().extra_latency
    }

    async fn send(&self, v: serde_json::Value) {
        if self.stalled {
            return;
        }
        let due = self.due();
        let _ = self.out.send(Out::Text(due, v.to_string())).await;
    }

    /// Takes the tag's next script line without advancing (advanced when finalized).
    fn peek_line(&self) -> Option<Vec<String>> {
        let st = self.shared.lock();
        let cursor = st.cursors.get(&self.tag).copied().unwrap_or(0);
        self.shared
            .cfg
            .script
            .get(cursor)
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
    }

    fn advance_line(&self, scripted: bool) {
        if self.stalled {
            // Nothing reached the client: the line is still owed.
            return;
        }
        let mut st = self.shared.lock();
        if scripted {
            *st.cursors.entry(self.tag.clone()).or_insert(0) += 1;
        } else {
            st.unscripted += 1;
        }
    }

    async fn audio(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut off = 0;
        while self.pending.len() - off >= FRAME {
            let frame: Vec<u8> = self.pending[off..off + FRAME].to_vec();
            off += FRAME;
            self.frame(&frame).await;
        }
        self.pending.drain(..off);
    }

    async fn frame(&mut self, frame: &[u8]) {
        let t = self.now();
        self.samples += frame.len() as u64;
        let end = self.now();
        let voiced = frame_energy(frame) > self.shared.cfg.energy_threshold;
        match self.utt.as_mut() {
            None => {
                if voiced {
                    if self.voiced_run == 0 {
                        self.candidate_onset = t;
                    }
                    self.voiced_run += 1;
                    if self.voiced_run >= 2 {
                        self.onset(end).await;
                    }
                } else {
                    self.voiced_run = 0;
                    if let (Some(lwe), Some(ue)) = (self.pending_ue, self.utterance_end)
                        && end - lwe >= ue
                    {
                        self.pending_ue = None;
                        self.send(json!({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round3(lwe)})).await;
                    }
                    if end - self.seg_start >= self.shared.cfg.silence_final_interval.as_secs_f64()
                    {
                        self.final_result(Vec::new(), false, false, end).await;
                    }
                }
            }
            Some(u) => {
                if voiced {
                    u.last_voiced_end = end;
                }
                let silent_for = end - u.last_voiced_end;
                // Tolerance: times are sums of 20 ms steps in f64, and a pause of exactly
                // `endpointing` must end the utterance in every call, not in some.
                if silent_for + 1e-6 >= self.endpointing.max(FRAME_SEC) {
                    self.endpoint(end).await;
                } else if self.interim
                    && end - u.last_interim >= self.shared.cfg.interim_interval.as_secs_f64()
                {
                    u.last_interim = end;
                    let remaining = u.words.len() - u.consumed;
                    let spoken = u.last_voiced_end - u.onset;
                    if remaining == 0 {
                        return;
                    }
                    let n = ((spoken * self.shared.cfg.words_per_sec).ceil() as usize)
                        .clamp(1, remaining);
                    u.revealed = u.revealed.max(n);
                    let words = u.words[u.consumed..u.consumed + u.revealed].to_vec();
                    let (onset, lve) = (u.onset, u.last_voiced_end);
                    let msg = self.results(&words, onset, lve, false, false, false, end);
                    self.send(msg).await;
                }
            }
        }
    }

    async fn onset(&mut self, _now: f64) {
        let onset = self.candidate_onset;
        self.voiced_run = 0;
        self.pending_ue = None;
        let (words, scripted) = match self.line_rest.take().or_else(|| self.peek_line()) {
            Some(w) => (w, true),
            None => (Vec::new(), false),
        };
        if !scripted {
            self.advance_line(false);
        }
        self.utt = Some(Utterance {
            onset,
            last_voiced_end: onset + 2.0 * FRAME_SEC,
            words,
            consumed: 0,
            revealed: 0,
            last_interim: onset,
        });
        if self.vad_events {
            self.send(json!({"type": "SpeechStarted", "channel": [0], "timestamp": round3(onset)}))
                .await;
        }
    }

    /// Silence for `endpointing` ended the utterance. A scripted line whose voiced
    /// audio so far is too short for all its words paused inside (at a comma): like the
    /// real service, finalize what was heard, up to that clause break, with
    /// `speech_final`; the next utterance goes on with the rest of the line.
    async fn endpoint(&mut self, now: f64) {
        if let Some(u) = self.utt.as_mut() {
            let rest = &u.words[u.consumed..];
            let heard_chars = (u.last_voiced_end - u.onset) * self.shared.cfg.chars_per_sec;
            if let Some(cut) = pause_cut(rest, heard_chars) {
                let spoken = rest[..cut].to_vec();
                let unspoken = rest[cut..].to_vec();
                let (onset, lve) = (u.onset, u.last_voiced_end);
                self.utt = None;
                let msg = self.results(&spoken, onset, lve, true, true, false, now);
                self.record_final(&spoken, true, false);
                self.send(msg).await;
                self.seg_start = now;
                self.line_rest = Some(unspoken);
                self.pending_ue = Some(lve);
                return;
            }
        }
        self.end_utterance(true, false, now).await;
    }

    /// Finalizes the rest of the utterance and ends it.
    async fn end_utterance(&mut self, speech_final: bool, from_finalize: bool, now: f64) {
        let Some(u) = self.utt.take() else {
            return;
        };
        let scripted = !u.words.is_empty();
        let words = u.words[u.consumed..].to_vec();
        let msg = self.results(
            &words,
            u.onset,
            u.last_voiced_end,
            true,
            speech_final,
            from_finalize,
            now,
        );
        self.record_final(&words, speech_final, from_finalize);
        self.send(msg).await;
        self.seg_start = now;
        if scripted {
            self.advance_line(true);
        }
        self.pending_ue = Some(u.last_voiced_end);
    }

    async fn final_result(
        &mut self,
        words: Vec<String>,
        speech_final: bool,
        from_finalize: bool,
        now: f64,
    ) {
        let start = self.seg_start;
        let msg = self.results(&words, start, now, true, speech_final, from_finalize, now);
        self.record_final(&words, speech_final, from_finalize);
        self.send(msg).await;
        self.seg_start = now;
    }

    fn record_final(&self, words: &[String], speech_final: bool, from_finalize: bool) {
        if self.stalled {
            return;
        }
        let transcript = self.transcript(words);
        self.shared.lock().finals.push(SentFinal {
            connection: self.connection,
            transcript,
            speech_final,
            from_finalize,
        });
    }

    fn transcript(&self, words: &[String]) -> String {
        if self.smart_format {
            words.join(" ")
        } else {
            words.iter().map(|w| bare(w)).collect::<Vec<_>>().join(" ")
        }
    }

    async fn finalize(&mut self) {
        let now = self.now();
        match self.utt.as_mut() {
            Some(u) if now - u.last_voiced_end < 0.1 => {
                // Still speaking: finalize the words heard so far; the line continues.
                let remaining = u.words.len() - u.consumed;
                let n = u.revealed.min(remaining);
                let words = u.words[u.consumed..u.consumed + n].to_vec();
                u.consumed += n;
                u.revealed = 0;
                let (onset, lve) = (u.onset, u.last_voiced_end);
                let msg = self.results(&words, onset, lve, true, false, true, now);
                self.record_final(&words, false, true);
                self.send(msg).await;
                self.seg_start = now;
            }
            Some(_) => self.end_utterance(false, true, now).await,
            None => self.final_result(Vec::new(), false, true, now).await,
        }
    }

    async fn close_stream(&mut self) {
        let now = self.now();
        if self.utt.is_some() {
            self.end_utterance(true, false, now).await;
        }
        let meta = json!({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": format!("{:064x}", self.samples),
            "created": "2026-01-01T00:00:00.000Z",
            "duration": round3(now),
            "channels": 1,
            "models": ["emulated-nova-3"],
            "model_info": {"emulated-nova-3": {"name": "general-nova-3", "version": "2026-01-01.0", "arch": "nova-3"}},
        });
        self.send(meta).await;
        let due = self.due();
        let _ = self
            .out
            .send(Out::Close(due, CloseCode::Normal, String::new()))
            .await;
    }

    /// A `Results` message. Words are spread evenly over `[w_start, w_end]`; the segment
    /// spans from the last final's end to `now`, as Deepgram's do.
    #[allow(clippy::too_many_arguments)]
    fn results(
        &self,
        words: &[String],
        w_start: f64,
        w_end: f64,
        is_final: bool,
        speech_final: bool,
        from_finalize: bool,
        now: f64,
    ) -> serde_json::Value {
        let n = words.len().max(1) as f64;
        let span = (w_end - w_start).max(0.0);
        let word_objs: Vec<_> = words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let s = w_start + span * i as f64 / n;
                let e = w_start + span * (i + 1) as f64 / n;
                json!({
                    "word": bare(w),
                    "start": round3(s),
                    "end": round3(e),
                    "confidence": 0.98,
                    "punctuated_word": w,
                })
            })
            .collect();
        json!({
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round3(now - self.seg_start),
            "start": round3(self.seg_start),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{
                "transcript": self.transcript(words),
                "confidence": if words.is_empty() { 0.0 } else { 0.98 },
                "words": word_objs,
            }]},
            "metadata": {
                "request_id": self.request_id,
                "model_info": {"name": "general-nova-3", "version": "2026-01-01.0", "arch": "nova-3"},
                "model_uuid": "00000000-0000-0000-0000-000000000003",
            },
        })
    }
}

/// A word without punctuation, lower-cased (Deepgram's `word` field).
fn bare(w: &str) -> String {
    w.chars()
        .filter(|c| c.is_alphanumeric() || *c == '\'' || *c == '-')
        .collect::<String>()
        .to_lowercase()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_decode_matches_g711_reference_points() {
        // Proves the emulator's decoder matches G.711: 0xFF is silence, 0x80/0x00 are the extremes.
        assert_eq!(mulaw_to_linear(0xFF), 0);
        assert_eq!(mulaw_to_linear(0x7F), 0);
        assert_eq!(mulaw_to_linear(0x80), 32124);
        assert_eq!(mulaw_to_linear(0x00), -32124);
    }

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn a_pause_early_in_a_line_cuts_it_at_the_nearest_comma() {
        // Proves an endpoint after "Perfect," (~0.5 s of speech) finalizes only that word.
        let line = words("Perfect, please put one aside for me.");
        assert_eq!(super::pause_cut(&line, 0.52 * 15.0), Some(1));
        let line = words("Sorry to interrupt, do you have a chocolate one?");
        assert_eq!(super::pause_cut(&line, 1.0 * 15.0), Some(3));
    }

    #[test]
    fn a_pause_after_most_of_a_line_or_without_a_comma_keeps_it_whole() {
        // Proves a finished line (enough speech heard) and a comma-less line are never cut.
        let line = words("Perfect, please put one aside for me.");
        assert_eq!(super::pause_cut(&line, 2.5 * 15.0), None);
        let line = words("Can you tell me about your birthday cakes?");
        assert_eq!(super::pause_cut(&line, 0.5 * 15.0), None);
        assert_eq!(super::pause_cut(&words("Yes."), 0.0), None);
    }
}
