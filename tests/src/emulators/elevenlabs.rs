//! A protocol-faithful emulator of ElevenLabs multi-context text-to-speech
//! (`/v1/text-to-speech/{voice_id}/multi-stream-input`).
//!
//! A real WebSocket server on 127.0.0.1:0 that checks what ElevenLabs checks and answers
//! like it:
//! - the `xi-api-key` header (401 otherwise), `output_format=ulaw_8000` (the only format
//!   it synthesizes; 400 otherwise), a `model_id`;
//! - at most 5 open contexts per socket: a 6th gets `max_active_conversations` and the
//!   socket closes with 1008;
//! - voice settings only on a context's first message (1008 otherwise);
//! - no client message for `inactivity_timeout` seconds (default 20) ->
//!   `input_timeout_exceeded` and close 1008;
//! - `flush`, `close_context` (after a flush: finish the audio, then `isFinal`; without
//!   one, as on barge-in: stop and send `isFinal`), `close_socket`, empty-text keep-alives;
//! - `auto_mode=true` generates each message at once; otherwise text is buffered until
//!   120 characters or a flush, like the default chunk schedule.
//!
//! Audio is mu-law 8 kHz: a deterministic tone per character, `1 / chars_per_sec` seconds
//! each (a speaking rate of ~15 characters per second), sent base64 in chunks of about
//! `chunk_ms` with the character alignment of each chunk. First-audio latency and
//! generation speed are configurable; faults drop the socket mid-utterance. Everything
//! received is recorded for assertions.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// The provider's limit.
pub const MAX_CONTEXTS: usize = 5;
/// Characters buffered before generation without `auto_mode` (first schedule entry).
const SCHEDULE_FIRST: usize = 120;

/// Emulator settings.
#[derive(Clone, Debug)]
pub struct ElevenLabsEmulatorConfig {
    /// The address it listens on (a free port): loopback, or the test node's
    /// host address when pods on the real node call it.
    pub bind: std::net::IpAddr,
    /// The key clients must send as `xi-api-key`.
    pub api_key: String,
    /// Delay from a context's first text to its first audio.
    pub first_audio_latency: Duration,
    /// Speaking rate: audio seconds per character = 1 / this.
    pub chars_per_sec: f64,
    /// Target audio per chunk.
    pub chunk_ms: u64,
    /// Generation speed relative to real time (4.0 = a second of audio every 250 ms).
    pub generation_speed: f64,
    /// Overrides the `inactivity_timeout` query parameter (to test it quickly).
    pub inactivity_override: Option<Duration>,
}

impl Default for ElevenLabsEmulatorConfig {
    fn default() -> Self {
        Self {
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            api_key: "test-elevenlabs-key".into(),
            first_audio_latency: Duration::ZERO,
            chars_per_sec: 15.0,
            chunk_ms: 200,
            generation_speed: 4.0,
            inactivity_override: None,
        }
    }
}

/// What one connection did (for assertions).
#[derive(Clone, Debug, Default)]
pub struct TtsConnectionRecord {
    /// Upgrade path.
    pub path: String,
    /// Query parameters, in order.
    pub query: Vec<(String, String)>,
    /// `xi-api-key` matched.
    pub authorized: bool,
    /// Status the upgrade was refused with.
    pub refused: Option<u16>,
    /// Every JSON message received, in order.
    pub messages: Vec<serde_json::Value>,
    /// Most contexts open at once.
    pub max_open_contexts: usize,
    /// Error codes sent (`max_active_conversations`, `input_timeout_exceeded`, ...).
    pub errors: Vec<String>,
    /// Audio chunks sent.
    pub audio_chunks: usize,
    /// `isFinal` messages sent, by context.
    pub finals: Vec<String>,
    /// How it ended: `client`, `close_socket`, `error`, `inactivity`, `fault`, `shutdown`.
    pub ended: Option<String>,
}

impl TtsConnectionRecord {
    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All text received for a context on this connection.
    pub fn text_of(&self, context_id: &str) -> String {
        self.messages
            .iter()
            .filter(|m| m.get("context_id").and_then(|c| c.as_str()) == Some(context_id))
            .filter_map(|m| m.get("text").and_then(|t| t.as_str()))
            .collect()
    }
}

#[derive(Default)]
struct State {
    connections: Vec<TtsConnectionRecord>,
    /// One-shot: drop the connection after it sent this many audio chunks.
    drop_after_chunks: Option<usize>,
    first_audio_latency: Option<Duration>,
}

struct Shared {
    cfg: ElevenLabsEmulatorConfig,
    state: Mutex<State>,
    drop_epoch: watch::Sender<u64>,
    stall_epoch: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running ElevenLabs emulator. Stops when dropped.
pub struct ElevenLabsEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl ElevenLabsEmulator {
    /// Starts the server on `cfg.bind` (127.0.0.1 by default), a free port.
    pub async fn start(cfg: ElevenLabsEmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind((cfg.bind, 0)).await?;
        let addr = listener.local_addr()?;
        let (drop_epoch, _) = watch::channel(0u64);
        let (stall_epoch, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(State::default()),
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

    /// The base URL to give the client (`ELEVENLABS_URL`).
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The key the emulator accepts.
    pub fn api_key(&self) -> &str {
        &self.shared.cfg.api_key
    }

    /// Every connection so far.
    pub fn connections(&self) -> Vec<TtsConnectionRecord> {
        self.shared.lock().connections.clone()
    }

    /// Fault: drops every live socket now, without a close frame.
    pub fn drop_connections(&self) {
        self.shared.drop_epoch.send_modify(|e| *e += 1);
    }

    /// Fault: every live socket goes silent (reads, never answers, never times out),
    /// like a connection that died without TCP noticing. New connections work.
    pub fn stall_connections(&self) {
        self.shared.stall_epoch.send_modify(|e| *e += 1);
    }

    /// Fault (one-shot): the first connection to send `chunks` audio chunks drops right
    /// after, mid-utterance, without a close frame.
    pub fn drop_after_audio_chunks(&self, chunks: usize) {
        self.shared.lock().drop_after_chunks = Some(chunks);
    }

    /// Changes the first-audio latency while running.
    pub fn set_first_audio_latency(&self, latency: Duration) {
        self.shared.lock().first_audio_latency = Some(latency);
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for ElevenLabsEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn refuse(status: StatusCode, detail: &str) -> ErrorResponse {
    let body = json!({"detail": {"status": "error", "message": detail}}).to_string();
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = status;
    resp
}

/// G.711 mu-law encoder (the reference segment algorithm, independent of the pod's).
fn linear_to_mulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32635;
    let mut s = i32::from(sample);
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    let mut exponent = 7;
    let mut mask = 0x4000;
    while exponent > 0 && s & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !(sign | (exponent << 4) | mantissa) as u8
}

/// One context's synthesis state.
struct Ctx {
    id: String,
    /// Characters to voice next.
    pending: VecDeque<char>,
    /// Text held back (no `auto_mode`) until a flush or the schedule.
    buffer: String,
    /// When the next chunk may go.
    next_due: Instant,
    /// Audio time already produced, ms (for alignment).
    audio_ms: f64,
    /// Tone phase (continuous across chunks).
    phase: f64,
    /// A flush came after the last text.
    flushed: bool,
    /// `close_context` received: `Some(true)` finish then final, `Some(false)` stop now.
    closing: Option<bool>,
}

async fn handle_connection(tcp: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut record = TtsConnectionRecord::default();
    let key = shared.cfg.api_key.clone();
    // The error type is tungstenite's handshake response; its size is not ours to pick.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        record.path = req.uri().path().to_owned();
        record.query = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let segs: Vec<&str> = record.path.split('/').collect();
        // ["", "v1", "text-to-speech", voice, "multi-stream-input"]
        if segs.len() != 5
            || segs[1] != "v1"
            || segs[2] != "text-to-speech"
            || segs[3].is_empty()
            || segs[4] != "multi-stream-input"
        {
            record.refused = Some(404);
            return Err(refuse(StatusCode::NOT_FOUND, "Not found"));
        }
        record.authorized = req
            .headers()
            .get("xi-api-key")
            .and_then(|v| v.to_str().ok())
            == Some(key.as_str());
        if !record.authorized {
            record.refused = Some(401);
            return Err(refuse(StatusCode::UNAUTHORIZED, "Invalid API key"));
        }
        let p = |k: &str| {
            record
                .query
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        if p("output_format").as_deref() != Some("ulaw_8000") {
            record.refused = Some(400);
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "this emulator synthesizes output_format=ulaw_8000 only",
            ));
        }
        if p("model_id").is_none_or(|m| m.is_empty()) {
            record.refused = Some(400);
            return Err(refuse(StatusCode::BAD_REQUEST, "model_id is required"));
        }
        if let Some(t) = p("inactivity_timeout")
            && t.parse::<u64>().map_or(true, |t| t == 0 || t > 180)
        {
            record.refused = Some(422);
            return Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "inactivity_timeout must be between 1 and 180",
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
    let auto_mode = record.param("auto_mode") == Some("true");
    let inactivity = shared.cfg.inactivity_override.unwrap_or_else(|| {
        Duration::from_secs(
            record
                .param("inactivity_timeout")
                .and_then(|t| t.parse().ok())
                .unwrap_or(20),
        )
    });
    let mut conn = Conn {
        ws,
        shared: shared.clone(),
        index,
        auto_mode,
        contexts: Vec::new(),
        chunks_sent: 0,
    };
    let mut drops = shared.drop_epoch.subscribe();
    let mut stalls = shared.stall_epoch.subscribe();
    let mut stalled = false;
    let mut deadline = Instant::now() + inactivity;
    let ended = loop {
        let next_synth = conn.next_due();
        tokio::select! {
            _ = cancel.cancelled() => break "shutdown",
            _ = drops.changed() => break "fault",
            _ = stalls.changed() => stalled = true,
            _ = sleep_until(deadline), if !stalled => {
                let msg = format!("Have not received a new text input within the timeout of {} seconds. Streaming input connections are closed after {} seconds of no new input text.", inactivity.as_secs(), inactivity.as_secs());
                conn.error_close("input_timeout_exceeded", &msg).await;
                break "inactivity";
            }
            _ = sleep_until(next_synth.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if next_synth.is_some() && !stalled => {
                match conn.synthesize().await {
                    Ok(true) => {}
                    Ok(false) => break "fault",
                    Err(()) => break "client",
                }
            }
            msg = conn.ws.next() => match msg {
                Some(Ok(Message::Text(t))) if stalled => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                        conn.with_record(|r| r.messages.push(v));
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    deadline = Instant::now() + inactivity;
                    match conn.handle(&t).await {
                        Flow::Continue => {}
                        Flow::End(why) => break why,
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    conn.error_close("invalid_message", "binary frames are not accepted").await;
                    break "error";
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break "client",
                Some(Ok(_)) => {}
            },
        }
    };
    shared.lock().connections[index].ended = Some(ended.to_owned());
    if ended != "fault" && ended != "shutdown" {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(_)) = conn.ws.next().await {}
        })
        .await;
    }
    // Dropping the socket without a close frame is the abrupt drop of a fault.
}

enum Flow {
    Continue,
    End(&'static str),
}

struct Conn {
    ws: WebSocketStream<TcpStream>,
    shared: Arc<Shared>,
    index: usize,
    auto_mode: bool,
    contexts: Vec<Ctx>,
    chunks_sent: usize,
}

impl Conn {
    fn with_record<R>(&self, f: impl FnOnce(&mut TtsConnectionRecord) -> R) -> R {
        let mut st = self.shared.lock();
        f(&mut st.connections[self.index])
    }

    fn open_contexts(&self) -> usize {
        self.contexts.iter().filter(|c| c.closing.is_none()).count()
    }

    fn next_due(&self) -> Option<Instant> {
        self.contexts
            .iter()
            .filter(|c| !c.pending.is_empty() || c.closing.is_some())
            .map(|c| c.next_due)
            .min()
    }

    async fn send(&mut self, v: serde_json::Value) -> bool {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .is_ok()
    }

    async fn error_close(&mut self, code: &str, message: &str) {
        self.with_record(|r| r.errors.push(code.to_owned()));
        let _ = self
            .send(json!({"message": message, "error": code, "code": 1008}))
            .await;
        let _ = self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: truncate_reason(message).into(),
            })))
            .await;
    }

    async fn handle(&mut self, text: &str) -> Flow {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(text) else {
            self.error_close("invalid_message", "message is not valid JSON")
                .await;
            return Flow::End("error");
        };
        self.with_record(|r| r.messages.push(msg.clone()));
        if msg.get("close_socket").and_then(|v| v.as_bool()) == Some(true) {
            let ids: Vec<String> = self.contexts.drain(..).map(|c| c.id).collect();
            for id in ids {
                self.with_record(|r| r.finals.push(id.clone()));
                let _ = self.send(json!({"isFinal": true, "contextId": id})).await;
            }
            let _ = self
                .ws
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })))
                .await;
            return Flow::End("close_socket");
        }
        let id = msg
            .get("context_id")
            .and_then(|c| c.as_str())
            .map(str::to_owned);
        let text = msg.get("text").and_then(|t| t.as_str());
        let Some(id) = id else {
            // No context: a connection keep-alive ({"text":""}) or a bare initializer.
            return Flow::Continue;
        };
        let close = msg.get("close_context").and_then(|v| v.as_bool()) == Some(true);
        let flush = msg.get("flush").and_then(|v| v.as_bool()) == Some(true);
        let has_settings =
            msg.get("voice_settings").is_some() || msg.get("generation_config").is_some();
        let latency = self
            .shared
            .lock()
            .first_audio_latency
            .unwrap_or(self.shared.cfg.first_audio_latency);
        let pos = self
            .contexts
            .iter()
            .position(|c| c.id == id && c.closing.is_none());
        let idx = match pos {
            Some(i) => {
                if has_settings {
                    self.error_close(
                        "invalid_message",
                        "voice_settings and generation_config are only accepted in the first message of a context",
                    )
                    .await;
                    return Flow::End("error");
                }
                Some(i)
            }
            None if close || text.is_none_or(|t| t.is_empty()) => None,
            None => {
                if self.open_contexts() >= MAX_CONTEXTS {
                    self.error_close(
                        "max_active_conversations",
                        "Maximum simultaneous contexts per WebSocket connection exceeded (5). Please close an existing context before opening a new one.",
                    )
                    .await;
                    return Flow::End("error");
                }
                self.contexts.push(Ctx {
                    id: id.clone(),
                    pending: VecDeque::new(),
                    buffer: String::new(),
                    next_due: Instant::now() + latency,
                    audio_ms: 0.0,
                    phase: 0.0,
                    flushed: false,
                    closing: None,
                });
                let open = self.open_contexts();
                self.with_record(|r| r.max_open_contexts = r.max_open_contexts.max(open));
                Some(self.contexts.len() - 1)
            }
        };
        let Some(i) = idx else {
            return Flow::Continue;
        };
        let auto = self.auto_mode;
        let c = &mut self.contexts[i];
        if let Some(t) = text.filter(|t| !t.trim().is_empty()) {
            if c.pending.is_empty() && c.buffer.is_empty() {
                // Generation starts now; the first audio of a context pays the latency.
                let start = Instant::now()
                    + if c.audio_ms == 0.0 {
                        latency
                    } else {
                        Duration::ZERO
                    };
                c.next_due = c.next_due.max(start);
            }
            c.buffer.push_str(t);
            c.flushed = false;
            if auto || c.buffer.chars().count() >= SCHEDULE_FIRST {
                let b = std::mem::take(&mut c.buffer);
                c.pending.extend(b.chars());
            }
        }
        if flush {
            c.flushed = true;
            let b = std::mem::take(&mut c.buffer);
            c.pending.extend(b.chars());
        }
        if close {
            let graceful = c.flushed || (c.pending.is_empty() && c.buffer.is_empty());
            if !graceful {
                // Barge-in: what was not generated yet is dropped.
                c.pending.clear();
                c.buffer.clear();
            }
            c.closing = Some(graceful);
            if !graceful {
                // Stop now; a graceful close keeps the audio's schedule (and its
                // first-audio latency).
                c.next_due = c.next_due.min(Instant::now());
            }
        }
        Flow::Continue
    }

    /// Produces the due chunks. `Ok(false)`: a fault dropped the socket.
    async fn synthesize(&mut self) -> Result<bool, ()> {
        let now = Instant::now();
        let cfg = self.shared.cfg.clone();
        let chars_per_chunk = ((cfg.chunk_ms as f64 / 1000.0) * cfg.chars_per_sec)
            .round()
            .max(1.0) as usize;
        let char_ms = 1000.0 / cfg.chars_per_sec;
        let samples_per_char = (8000.0 / cfg.chars_per_sec).round() as usize;
        let mut i = 0;
        while i < self.contexts.len() {
            if self.contexts[i].next_due > now {
                i += 1;
                continue;
            }
            let c = &mut self.contexts[i];
            if c.pending.is_empty() {
                if c.closing.is_some() {
                    let id = c.id.clone();
                    self.contexts.remove(i);
                    self.with_record(|r| r.finals.push(id.clone()));
                    if !self.send(json!({"isFinal": true, "contextId": id})).await {
                        return Err(());
                    }
                    continue;
                }
                i += 1;
                continue;
            }
            let n = chars_per_chunk.min(c.pending.len());
            let chars: Vec<char> = c.pending.drain(..n).collect();
            let mut audio = Vec::with_capacity(n * samples_per_char);
            for ch in &chars {
                let silent = ch.is_whitespace();
                let freq = 180.0 + f64::from(*ch as u32 % 24) * 15.0;
                for k in 0..samples_per_char {
                    c.phase += 2.0 * std::f64::consts::PI * freq / 8000.0;
                    // A soft envelope per character so consecutive characters do not click.
                    let env = (std::f64::consts::PI * k as f64 / samples_per_char as f64).sin();
                    let amp = if silent { 0.0 } else { 6000.0 * env };
                    audio.push(linear_to_mulaw((amp * c.phase.sin()) as i16));
                }
            }
            let starts: Vec<f64> = (0..n)
                .map(|k| (c.audio_ms + k as f64 * char_ms).round())
                .collect();
            let durs: Vec<f64> = vec![char_ms.round(); n];
            let char_strs: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
            let alignment =
                json!({"chars": char_strs, "charStartTimesMs": starts, "charDurationsMs": durs});
            c.audio_ms += n as f64 * char_ms;
            let chunk_secs = n as f64 / cfg.chars_per_sec;
            c.next_due = now + Duration::from_secs_f64(chunk_secs / cfg.generation_speed.max(0.01));
            let id = c.id.clone();
            let msg = json!({
                "audio": base64::engine::general_purpose::STANDARD.encode(&audio),
                "isFinal": null,
                "normalizedAlignment": alignment,
                "alignment": alignment,
                "contextId": id,
            });
            if !self.send(msg).await {
                return Err(());
            }
            self.chunks_sent += 1;
            let sent = self.chunks_sent;
            let drop_now = {
                let mut st = self.shared.lock();
                st.connections[self.index].audio_chunks += 1;
                match st.drop_after_chunks {
                    Some(limit) if sent >= limit => {
                        st.drop_after_chunks = None;
                        true
                    }
                    _ => false,
                }
            };
            if drop_now {
                return Ok(false);
            }
            i += 1;
        }
        Ok(true)
    }
}

fn truncate_reason(s: &str) -> String {
    // Close reasons must fit a control frame (123 bytes).
    let mut end = s.len().min(120);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mulaw_encoder_matches_g711_reference_points() {
        // Proves the emulator's encoder matches G.711: silence is 0xFF, full scale is 0x80/0x00.
        assert_eq!(linear_to_mulaw(0), 0xFF);
        assert_eq!(linear_to_mulaw(32767), 0x80);
        assert_eq!(linear_to_mulaw(-32768), 0x00);
    }
}
