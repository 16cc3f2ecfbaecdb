//! ElevenLabs text-to-speech over the multi-context WebSocket
//! (`/v1/text-to-speech/{voice_id}/multi-stream-input`), one socket per call.
//!
//! Why multi-context: a call speaks many utterances; one socket kept alive across turns
//! avoids a TLS + WebSocket handshake per reply, and barge-in closes just the
//! interrupted utterance's context. The session task:
//! - opens a context per utterance, sends voice settings only on its first message
//!   (later ones are refused with 1008), and closes every ended or interrupted context,
//!   never holding more than the provider's 5 open (the oldest is closed first);
//! - asks for `ulaw_8000`, so audio goes to Twilio untouched, and `sync_alignment`, so it
//!   knows exactly which characters were voiced;
//! - keeps the socket alive inside `inactivity_timeout` with empty-text messages;
//! - when the socket still closes, reconnects with backoff and resends the unspoken
//!   remainder of every open context, restarting at a word boundary.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{Instrument, debug, info_span, warn};
use url::Url;

use super::backoff::Backoff;
use super::session::{self, Redial, SessionError};
use super::socket::{self, Ws, ws_base};
use super::{
    Bytes, ContextId, TextToSpeech, TtsCommand, TtsControl, TtsError, TtsEvent, TtsSession,
    TtsSessionConfig,
};
use crate::metrics::{Metrics, Peer, SocketErrorKind};
use crate::secret::Secret;

/// The provider's limit of open contexts per socket.
pub const MAX_CONTEXTS: usize = 5;
/// Command queue depth.
const COMMAND_QUEUE: usize = 64;
/// Event queue depth (audio chunks are ~100-250 ms each).
const EVENT_QUEUE: usize = 256;
/// Largest message accepted from the provider.
const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Speaking rate used to estimate voiced text when the provider sends no alignment.
const CHARS_PER_SEC_ESTIMATE: f64 = 15.0;
/// Cancelled context ids remembered so their in-flight audio is dropped.
const CANCELLED_MEMORY: usize = 32;

/// ElevenLabs client settings.
#[derive(Clone, Debug)]
pub struct ElevenLabsConfig {
    /// Base URL, e.g. `wss://api.elevenlabs.io` (`http(s)://` is accepted and mapped).
    pub base_url: String,
    /// `ELEVENLABS_API_KEY`, sent as the `xi-api-key` header.
    pub api_key: Secret,
    /// Handshake deadline.
    pub connect_timeout: Duration,
    /// Deadline for writing one frame.
    pub send_timeout: Duration,
    /// `inactivity_timeout` query parameter, seconds (provider max 180).
    pub inactivity_timeout_secs: u32,
    /// Send a keep-alive after this long without any message (below the inactivity timeout).
    pub keepalive_interval: Duration,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// `auto_mode`: generate each message at once (we send whole clauses).
    pub auto_mode: bool,
    /// Text was sent and nothing came back for this long: a dead connection TCP has not
    /// noticed; the client reconnects and resends.
    pub response_timeout: Duration,
}

impl ElevenLabsConfig {
    /// Settings with production defaults.
    pub fn new(base_url: impl Into<String>, api_key: Secret) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            connect_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(5),
            inactivity_timeout_secs: 180,
            keepalive_interval: Duration::from_secs(60),
            backoff: Backoff::default(),
            auto_mode: true,
            response_timeout: Duration::from_secs(8),
        }
    }
}

/// The ElevenLabs client (cheap to clone; one per process).
#[derive(Clone)]
pub struct ElevenLabs {
    cfg: Arc<ElevenLabsConfig>,
    base: Url,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ElevenLabs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElevenLabs")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl ElevenLabs {
    /// Validates the base URL and key.
    pub fn new(cfg: ElevenLabsConfig, metrics: Arc<Metrics>) -> Result<Self, TtsError> {
        let base = ws_base(&cfg.base_url).map_err(TtsError::Config)?;
        HeaderValue::from_str(cfg.api_key.expose())
            .map_err(|_| TtsError::Config("the API key is not a valid header value".into()))?;
        Ok(Self {
            cfg: Arc::new(cfg),
            base,
            metrics,
        })
    }

    /// The multi-context URL for a voice (no secrets in it).
    pub fn stream_url(&self, s: &TtsSessionConfig) -> Result<Url, TtsError> {
        let mut url = self.base.clone();
        {
            let mut segs = url
                .path_segments_mut()
                .map_err(|_| TtsError::Config("base URL cannot hold a path".into()))?;
            segs.pop_if_empty()
                .extend(["v1", "text-to-speech", &s.voice_id, "multi-stream-input"]);
        }
        url.query_pairs_mut()
            .append_pair("model_id", &s.model_id)
            .append_pair("output_format", "ulaw_8000")
            .append_pair(
                "inactivity_timeout",
                &self.cfg.inactivity_timeout_secs.min(180).to_string(),
            )
            .append_pair("sync_alignment", "true")
            .append_pair(
                "auto_mode",
                if self.cfg.auto_mode { "true" } else { "false" },
            );
        Ok(url)
    }

    async fn open(&self, url: &Url) -> Result<Ws, TtsError> {
        socket::open(
            url,
            (
                HeaderName::from_static("xi-api-key"),
                self.cfg.api_key.expose(),
            ),
            self.cfg.connect_timeout,
            MAX_MESSAGE_BYTES,
        )
        .await
        .map_err(TtsError::from)
    }
}

impl TextToSpeech for ElevenLabs {
    fn connect(
        &self,
        cfg: TtsSessionConfig,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<TtsSession, TtsError>> {
        Box::pin(async move {
            let url = self.stream_url(&cfg)?;
            // A refused key fails the call's connect at once; any other failure starts
            // the session disconnected, and the reconnect loop opens its first socket.
            let first = match self.open(&url).await {
                Ok(ws) => Some(ws),
                Err(e) => {
                    self.metrics.socket_error(Peer::Elevenlabs, e.metric_kind());
                    if e.is_fatal() {
                        return Err(e);
                    }
                    warn!(error = %e, "elevenlabs connect failed; retrying with backoff");
                    None
                }
            };
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
            let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
            let session_cancel = cancel.child_token();
            let voice_settings = voice_settings(&cfg);
            let task = SessionTask {
                client: self.clone(),
                url,
                cmd_rx,
                events: event_tx,
                cancel: session_cancel.clone(),
                voice_settings,
                contexts: Vec::new(),
                cancelled: VecDeque::new(),
                pending_done: Vec::new(),
            };
            let span = info_span!("elevenlabs", call_sid = %cfg.call_sid);
            tokio::spawn(session::run(task, first).instrument(span));
            Ok(TtsSession {
                control: TtsControl::new(cmd_tx, session_cancel),
                events: event_rx,
            })
        })
    }
}

fn voice_settings(cfg: &TtsSessionConfig) -> Option<serde_json::Value> {
    let mut m = serde_json::Map::new();
    for (k, v) in [
        ("stability", cfg.stability),
        ("similarity_boost", cfg.similarity_boost),
        ("style", cfg.style),
        ("speed", cfg.speed),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), serde_json::json!(v));
        }
    }
    (!m.is_empty()).then_some(serde_json::Value::Object(m))
}

/// One utterance's state. The text is authoritative: on a new socket, what was not
/// voiced yet is sent again from here.
#[derive(Debug)]
struct Ctx {
    id: ContextId,
    /// All text the engine gave, in order.
    text: String,
    /// Byte offset in `text` where the current socket's context began.
    socket_start: usize,
    /// Byte offset in `text` up to which text was sent on the current socket.
    sent: usize,
    /// Non-whitespace characters voiced on the current socket (from alignment).
    aligned: usize,
    /// Audio bytes received on the current socket (fallback when no alignment came).
    audio_bytes: usize,
    /// Alignment was seen on the current socket.
    has_alignment: bool,
    /// The first message (with voice settings) went out on the current socket.
    initialized: bool,
    /// The engine asked for a flush after the last text.
    flushed: bool,
    /// The engine ended the utterance (flush + close_context sent or owed).
    ended: bool,
}

impl Ctx {
    fn new(id: ContextId) -> Self {
        Self {
            id,
            text: String::new(),
            socket_start: 0,
            sent: 0,
            aligned: 0,
            audio_bytes: 0,
            has_alignment: false,
            initialized: false,
            flushed: false,
            ended: false,
        }
    }

    /// Byte offset in `text` from which a new socket must resume: just after the voiced
    /// text, moved back to the start of a word cut in half.
    fn resume_offset(&self) -> usize {
        let seg = &self.text[self.socket_start..];
        let voiced_nonspace = if self.has_alignment {
            self.aligned
        } else {
            // ulaw_8000: 8000 bytes per second.
            (self.audio_bytes as f64 / 8000.0 * CHARS_PER_SEC_ESTIMATE) as usize
        };
        let mut count = 0;
        let mut pos = seg.len();
        for (i, c) in seg.char_indices() {
            if count == voiced_nonspace {
                pos = i;
                break;
            }
            if !c.is_whitespace() {
                count += 1;
            }
        }
        if count < voiced_nonspace {
            pos = seg.len();
        }
        // Mid-word? Restart at the word's beginning: a repeated syllable beats a lost one.
        let before = &seg[..pos];
        let mid_word = pos < seg.len()
            && !seg[pos..].starts_with(char::is_whitespace)
            && !before.is_empty()
            && !before.ends_with(char::is_whitespace);
        if mid_word {
            pos = before
                .rfind(char::is_whitespace)
                .map(|i| i + before[i..].chars().next().map_or(1, char::len_utf8))
                .unwrap_or(0);
        }
        self.socket_start + pos
    }
}

type Phase = session::Phase<TtsError>;

struct SessionTask {
    client: ElevenLabs,
    url: Url,
    cmd_rx: mpsc::Receiver<TtsCommand>,
    events: mpsc::Sender<TtsEvent>,
    cancel: CancellationToken,
    voice_settings: Option<serde_json::Value>,
    /// Open contexts, oldest first (at most [`MAX_CONTEXTS`] not yet ended).
    contexts: Vec<Ctx>,
    /// Recently cancelled ids: their late audio is dropped.
    cancelled: VecDeque<ContextId>,
    /// Contexts finished locally (during a reconnect) whose `ContextDone` is owed.
    pending_done: Vec<ContextId>,
}

impl SessionTask {
    async fn send(&self, ws: &mut Ws, v: serde_json::Value) -> Result<(), TtsError> {
        match timeout(
            self.client.cfg.send_timeout,
            ws.send(Message::Text(v.to_string().into())),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TtsError::Connect(e.to_string())),
            Err(_) => Err(TtsError::Timeout("send")),
        }
    }

    fn ctx_index(&self, id: &str) -> Option<usize> {
        self.contexts.iter().position(|c| c.id == id)
    }

    fn remember_cancelled(&mut self, id: ContextId) {
        if self.cancelled.len() >= CANCELLED_MEMORY {
            self.cancelled.pop_front();
        }
        self.cancelled.push_back(id);
    }

    /// Applies a command to the local state and, when `ws` is given, to the socket.
    /// `Ok(false)`: the session should close.
    async fn apply(&mut self, cmd: TtsCommand, ws: Option<&mut Ws>) -> Result<bool, TtsError> {
        match cmd {
            TtsCommand::Close => Ok(false),
            TtsCommand::Speak { context_id, text } => {
                if text.is_empty() || self.cancelled.contains(&context_id) {
                    return Ok(true);
                }
                let idx = match self.ctx_index(&context_id) {
                    Some(i) => i,
                    None => {
                        // Respect the cap: close the oldest open context first.
                        let open = self.contexts.iter().filter(|c| !c.ended).count();
                        let mut ws = ws;
                        if open >= MAX_CONTEXTS
                            && let Some(oldest) = self.contexts.iter().position(|c| !c.ended)
                        {
                            let old = self.contexts.remove(oldest);
                            debug!(context = %old.id, "closing the oldest context to stay within the cap");
                            if let Some(w) = ws.as_deref_mut()
                                && old.initialized
                            {
                                self.send(w, close_context(&old.id)).await?;
                            }
                            self.remember_cancelled(old.id);
                        }
                        self.contexts.push(Ctx::new(context_id.clone()));
                        let i = self.contexts.len() - 1;
                        return self.speak_at(i, text, ws).await;
                    }
                };
                if self.contexts[idx].ended {
                    // Text after `end` is a caller bug; ignore it rather than reopen.
                    warn!(context = %context_id, "text for an ended context ignored");
                    return Ok(true);
                }
                self.speak_at(idx, text, ws).await
            }
            TtsCommand::Flush { context_id } => {
                if let Some(i) = self.ctx_index(&context_id) {
                    self.contexts[i].flushed = true;
                    if let Some(w) = ws
                        && self.contexts[i].initialized
                    {
                        self.send(w, flush(&context_id)).await?;
                    }
                }
                Ok(true)
            }
            TtsCommand::End { context_id } => {
                if let Some(i) = self.ctx_index(&context_id) {
                    if self.contexts[i].ended {
                        return Ok(true);
                    }
                    self.contexts[i].ended = true;
                    self.contexts[i].flushed = true;
                    if !self.contexts[i].initialized && self.contexts[i].text.trim().is_empty() {
                        // Nothing was ever said: done at once.
                        self.contexts.remove(i);
                        self.emit(TtsEvent::ContextDone { context_id }).await;
                        return Ok(true);
                    }
                    if let Some(w) = ws
                        && self.contexts[i].initialized
                    {
                        self.send(w, flush(&context_id)).await?;
                        self.send(w, close_context(&context_id)).await?;
                    }
                } else if !self.cancelled.contains(&context_id) {
                    // Ending a context that never spoke: done.
                    self.emit(TtsEvent::ContextDone { context_id }).await;
                }
                Ok(true)
            }
            TtsCommand::Cancel { context_id } => {
                if let Some(i) = self.ctx_index(&context_id) {
                    let c = self.contexts.remove(i);
                    if let Some(w) = ws {
                        // An ended context was already closed on the socket.
                        if c.initialized && !c.ended {
                            self.send(w, close_context(&c.id)).await?;
                        }
                    }
                }
                self.remember_cancelled(context_id);
                Ok(true)
            }
        }
    }

    async fn speak_at(
        &mut self,
        idx: usize,
        text: String,
        ws: Option<&mut Ws>,
    ) -> Result<bool, TtsError> {
        let c = &mut self.contexts[idx];
        c.text.push_str(&text);
        // The provider wants chunks to end with a space so words are not glued together.
        if !c.text.ends_with(char::is_whitespace) {
            c.text.push(' ');
        }
        c.flushed = false;
        if let Some(w) = ws {
            self.send_unsent(idx, w).await?;
        }
        Ok(true)
    }

    /// Sends the context's text not yet sent on this socket (the first message carries
    /// the voice settings).
    async fn send_unsent(&mut self, idx: usize, ws: &mut Ws) -> Result<(), TtsError> {
        let c = &self.contexts[idx];
        if c.sent >= c.text.len() {
            return Ok(());
        }
        let chunk = c.text[c.sent..].to_owned();
        let mut msg = serde_json::json!({"text": chunk, "context_id": c.id});
        if !c.initialized
            && let Some(vs) = &self.voice_settings
        {
            msg["voice_settings"] = vs.clone();
        }
        self.send(ws, msg).await?;
        let c = &mut self.contexts[idx];
        c.initialized = true;
        c.sent = c.text.len();
        Ok(())
    }

    async fn emit(&self, ev: TtsEvent) -> bool {
        self.events.send(ev).await.is_ok()
    }

    /// Runs the session on one socket until it ends or breaks.
    async fn on_socket(&mut self, ws: &mut Ws) -> Phase {
        for id in std::mem::take(&mut self.pending_done) {
            if !self.emit(TtsEvent::ContextDone { context_id: id }).await {
                return Phase::Finished;
            }
        }
        let keepalive = self.client.cfg.keepalive_interval;
        let mut last_sent = Instant::now();
        // When text went out that has had no answer yet (a resume right after a
        // reconnect counts).
        let mut awaiting: Option<Instant> = self
            .contexts
            .iter()
            .any(|c| c.initialized)
            .then(Instant::now);
        let mut tick = tokio::time::interval(keepalive.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    let _ = timeout(Duration::from_millis(200), ws.close(None)).await;
                    return Phase::Finished;
                }
                cmd = self.cmd_rx.recv() => {
                    let Some(cmd) = cmd else {
                        let _ = self.close_socket(ws).await;
                        return Phase::Finished;
                    };
                    // Text, a flush or an end must bring audio or a final back.
                    let expects_answer = match &cmd {
                        TtsCommand::Speak { .. } => self.client.cfg.auto_mode,
                        TtsCommand::Flush { .. } | TtsCommand::End { .. } => true,
                        TtsCommand::Cancel { .. } | TtsCommand::Close => false,
                    };
                    match self.apply(cmd, Some(ws)).await {
                        Ok(true) => {
                            last_sent = Instant::now();
                            if expects_answer && awaiting.is_none() && !self.contexts.is_empty() {
                                awaiting = Some(last_sent);
                            }
                        }
                        Ok(false) => {
                            let _ = self.close_socket(ws).await;
                            return Phase::Finished;
                        }
                        Err(e) => return Phase::Dropped(e),
                    }
                }
                _ = tick.tick() => {
                    if awaiting.is_some_and(|t| t.elapsed() >= self.client.cfg.response_timeout) {
                        return Phase::Dropped(TtsError::Timeout("no answer to text"));
                    }
                    if last_sent.elapsed() >= keepalive {
                        // Keep the newest open context (or the connection) alive.
                        let msg = match self.contexts.iter().rev().find(|c| c.initialized && !c.ended) {
                            Some(c) => serde_json::json!({"text": "", "context_id": c.id}),
                            None => serde_json::json!({"text": ""}),
                        };
                        if let Err(e) = self.send(ws, msg).await {
                            return Phase::Dropped(e);
                        }
                        last_sent = Instant::now();
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        awaiting = None;
                        match self.handle_text(&t).await {
                            Ok(true) => {}
                            Ok(false) => return Phase::Finished,
                            Err(e) => return e,
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                        return Phase::Dropped(TtsError::Protocol(format!("elevenlabs closed the socket: {reason}")));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Phase::Dropped(TtsError::Connect(e.to_string())),
                    None => return Phase::Dropped(TtsError::Protocol("elevenlabs socket ended".into())),
                },
            }
        }
    }

    async fn close_socket(&mut self, ws: &mut Ws) -> Result<(), TtsError> {
        self.send(ws, serde_json::json!({"close_socket": true}))
            .await?;
        // Let the provider finish its side (finals, then its close frame), bounded.
        let _ = timeout(Duration::from_secs(1), async {
            while let Some(Ok(msg)) = ws.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        let _ = timeout(Duration::from_millis(200), ws.close(None)).await;
        Ok(())
    }

    /// Handles one provider message. `Ok(false)`: the engine went away.
    async fn handle_text(&mut self, text: &str) -> Result<bool, Phase> {
        let msg: ServerMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                self.client
                    .metrics
                    .socket_error(Peer::Elevenlabs, SocketErrorKind::MalformedJson);
                warn!(error = %e, "undecodable elevenlabs message");
                return Ok(true);
            }
        };
        if let Some(code) = msg.error {
            let message = msg.message.unwrap_or_default();
            let fatal = is_fatal_code(&code);
            let err = TtsError::Provider { code, message };
            if fatal {
                return Err(Phase::Fatal(err));
            }
            // The provider closes after an error; reconnecting resumes open contexts.
            return Err(Phase::Dropped(err));
        }
        let Some(id) = msg.context_id.or(msg.context_id_snake) else {
            if msg.audio.is_some() {
                self.client
                    .metrics
                    .socket_error(Peer::Elevenlabs, SocketErrorKind::Protocol);
            }
            return Ok(true);
        };
        if self.cancelled.contains(&id) {
            return Ok(true);
        }
        let Some(idx) = self.ctx_index(&id) else {
            return Ok(true);
        };
        if let Some(audio) = msg.audio.filter(|a| !a.is_empty()) {
            let bytes = match base64::engine::general_purpose::STANDARD.decode(audio.as_bytes()) {
                Ok(b) => b,
                Err(_) => {
                    self.client
                        .metrics
                        .socket_error(Peer::Elevenlabs, SocketErrorKind::BadPayload);
                    return Ok(true);
                }
            };
            let c = &mut self.contexts[idx];
            c.audio_bytes += bytes.len();
            if let Some(al) = msg.alignment.or(msg.normalized_alignment) {
                c.has_alignment = true;
                c.aligned += al
                    .chars
                    .iter()
                    .flat_map(|s| s.chars())
                    .filter(|ch| !ch.is_whitespace())
                    .count();
            }
            if !bytes.is_empty()
                && !self
                    .emit(TtsEvent::Audio {
                        context_id: id.clone(),
                        mulaw: Bytes::from(bytes),
                    })
                    .await
            {
                return Ok(false);
            }
        }
        if msg.is_final == Some(true) {
            self.contexts.remove(idx);
            if !self.emit(TtsEvent::ContextDone { context_id: id }).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Re-opens every open context on a fresh socket from its first unvoiced word.
    async fn resume(&mut self, ws: &mut Ws) -> Result<usize, TtsError> {
        let mut resent = 0;
        let mut i = 0;
        while i < self.contexts.len() {
            let c = &mut self.contexts[i];
            let resume = c.resume_offset();
            c.socket_start = resume;
            c.sent = resume;
            c.aligned = 0;
            c.audio_bytes = 0;
            c.has_alignment = false;
            c.initialized = false;
            let rest_empty = c.text[resume..].trim().is_empty();
            if rest_empty {
                if c.ended {
                    // Everything was voiced; only `isFinal` was lost.
                    let c = self.contexts.remove(i);
                    self.pending_done.push(c.id);
                    continue;
                }
                // Nothing to say yet; the next `speak` initializes it on this socket.
                c.sent = c.text.len();
                i += 1;
                continue;
            }
            let (ended, flushed, id) = (c.ended, c.flushed, c.id.clone());
            self.send_unsent(i, ws).await?;
            if flushed || ended {
                self.send(ws, flush(&id)).await?;
            }
            if ended {
                self.send(ws, close_context(&id)).await?;
            }
            resent += 1;
            i += 1;
        }
        Ok(resent)
    }
}

impl Redial for SessionTask {
    type Input = TtsCommand;
    type Error = TtsError;

    fn peer(&self) -> Peer {
        Peer::Elevenlabs
    }

    fn backoff(&self) -> Backoff {
        self.client.cfg.backoff
    }

    fn metrics(&self) -> &Metrics {
        &self.client.metrics
    }

    fn cancelled(&self) -> WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }

    async fn connected(&mut self, mut ws: Ws) -> Phase {
        self.on_socket(&mut ws).await
    }

    async fn gave_up(&mut self, e: TtsError) {
        let _ = self.events.send(TtsEvent::Error(e)).await;
    }

    async fn next_input(&mut self) -> Option<TtsCommand> {
        self.cmd_rx.recv().await
    }

    /// Commands change local state while down; the text goes out on restore.
    async fn while_down(&mut self, cmd: TtsCommand) -> Result<bool, TtsError> {
        self.apply(cmd, None).await
    }

    fn open(&self) -> impl Future<Output = Result<Ws, TtsError>> + Send + 'static {
        let (client, url) = (self.client.clone(), self.url.clone());
        async move { client.open(&url).await }
    }

    async fn restore(&mut self, ws: &mut Ws) -> Result<bool, TtsError> {
        let resent = self.resume(ws).await?;
        debug!(resent, "elevenlabs reconnected");
        Ok(self.emit(TtsEvent::Reconnected { resent }).await)
    }
}

/// Provider errors a reconnect cannot fix (bad key, unknown voice, no quota).
fn is_fatal_code(code: &str) -> bool {
    [
        "auth",
        "api_key",
        "quota",
        "not_found",
        "invalid",
        "unauthorized",
        "payment",
    ]
    .iter()
    .any(|k| code.contains(k))
}

fn flush(id: &str) -> serde_json::Value {
    serde_json::json!({"context_id": id, "flush": true})
}

fn close_context(id: &str) -> serde_json::Value {
    serde_json::json!({"context_id": id, "close_context": true})
}

/// Messages from ElevenLabs (audio, final, error). Both id spellings are accepted.
#[derive(Deserialize)]
struct ServerMsg {
    #[serde(default)]
    audio: Option<String>,
    #[serde(default, rename = "isFinal")]
    is_final: Option<bool>,
    #[serde(default, rename = "contextId")]
    context_id: Option<String>,
    #[serde(default, rename = "context_id")]
    context_id_snake: Option<String>,
    #[serde(default)]
    alignment: Option<Alignment>,
    #[serde(default, rename = "normalizedAlignment")]
    normalized_alignment: Option<Alignment>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Alignment {
    #[serde(default)]
    chars: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Any text as an ElevenLabs message: decoded or refused, never a panic.
        #[test]
        fn arbitrary_elevenlabs_messages_never_panic(text in ".{0,400}", audio in ".{0,64}") {
            let _ = serde_json::from_str::<ServerMsg>(&text);
            let shaped = format!(
                "{{\"contextId\":{text:?},\"audio\":{audio:?},\"isFinal\":true,\"alignment\":{{\"chars\":[{text:?}]}}}}"
            );
            let _ = serde_json::from_str::<ServerMsg>(&shaped);
        }
    }

    fn ctx(text: &str, aligned: usize) -> Ctx {
        let mut c = Ctx::new("c".into());
        c.text = text.into();
        c.aligned = aligned;
        c.has_alignment = true;
        c
    }

    #[test]
    fn resume_restarts_at_the_word_that_was_cut() {
        // Proves a reconnect resends from the first unvoiced word, repeating a half-voiced one.
        // "Hello there friend": 5 + 5 + 6 non-space chars.
        assert_eq!(ctx("Hello there friend ", 5).resume_offset(), 5);
        assert_eq!(ctx("Hello there friend ", 7).resume_offset(), 6);
        assert_eq!(ctx("Hello there friend ", 0).resume_offset(), 0);
        assert_eq!(ctx("Hello there friend ", 16).resume_offset(), 18);
    }

    #[test]
    fn resume_without_alignment_estimates_from_audio() {
        // Proves the audio-length fallback never claims more than was sent.
        let mut c = ctx("Hi there ", 0);
        c.has_alignment = false;
        c.audio_bytes = 8000 * 10;
        assert_eq!(c.resume_offset(), c.text.len());
    }

    #[test]
    fn stream_url_has_format_and_no_key() {
        // Proves the URL asks for mu-law 8 kHz and never carries the key.
        let el = ElevenLabs::new(
            ElevenLabsConfig::new("http://127.0.0.1:1", Secret::new("sekrit")),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let url = el
            .stream_url(&TtsSessionConfig {
                call_sid: "CA1".into(),
                voice_id: "v1".into(),
                model_id: "eleven_flash_v2_5".into(),
                stability: None,
                similarity_boost: None,
                style: None,
                speed: None,
            })
            .unwrap();
        let s = url.as_str();
        assert!(
            s.starts_with("ws://127.0.0.1:1/v1/text-to-speech/v1/multi-stream-input?"),
            "{s}"
        );
        assert!(s.contains("output_format=ulaw_8000"));
        assert!(!s.contains("sekrit"));
    }
}
