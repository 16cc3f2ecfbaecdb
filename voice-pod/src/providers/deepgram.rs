//! Deepgram live speech-to-text (`/v1/listen`) over one WebSocket per call.
//!
//! Caller audio goes through untouched (`encoding=mulaw&sample_rate=8000`). The session
//! task owns the socket and:
//! - sends a `KeepAlive` text frame whenever no audio flowed for a few seconds (Deepgram
//!   closes with 1011/NET-0001 after 10 s without audio or a text message);
//! - keeps the audio sent since the end of the last final result in a bounded replay
//!   buffer; when the socket drops it reconnects with jittered backoff, replays that audio
//!   and offsets the new socket's timestamps, so no words are lost and every event stays
//!   on the call's timeline;
//! - sends `Finalize` on request and `CloseStream` at the end, then waits (bounded) for the
//!   last results.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{Instrument, debug, info_span, warn};
use url::Url;

use super::backoff::Backoff;
use super::session::{self, Redial, SessionError};
use super::socket::{self, Ws, ws_base};
use super::{
    Bytes, SpeechToText, SttCommand, SttControl, SttError, SttEvent, SttSession, SttSessionConfig,
    Word,
};
use crate::metrics::{Metrics, Peer, SocketErrorKind};
use crate::secret::Secret;

/// mu-law at 8 kHz mono: bytes per second of audio.
const BYTES_PER_SEC: u64 = 8000;
/// Replayed audio is sent in 1 s frames (fewer frames than Twilio's 20 ms ones).
const REPLAY_FRAME_BYTES: usize = 8000;
/// Caller-audio queue depth (Twilio's 20 ms frames: 5 s of audio).
const AUDIO_QUEUE: usize = 256;
/// Event queue depth.
const EVENT_QUEUE: usize = 128;
/// Audio sent without any answer before the response timeout applies (5 s): Deepgram
/// needs some audio before it says anything.
const RESPONSE_CHECK_AUDIO_BYTES: u64 = 5 * BYTES_PER_SEC;
/// Largest text message accepted from Deepgram.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Deepgram client settings.
#[derive(Clone, Debug)]
pub struct DeepgramConfig {
    /// Base URL, e.g. `wss://api.deepgram.com` (`http(s)://` is accepted and mapped).
    pub base_url: String,
    /// `DEEPGRAM_API_KEY`, sent as `Authorization: Token <key>`.
    pub api_key: Secret,
    /// Handshake deadline.
    pub connect_timeout: Duration,
    /// Send `KeepAlive` after this long without audio (Deepgram's limit is 10 s).
    pub keepalive_interval: Duration,
    /// Deadline for writing one frame (a stuck socket counts as dropped).
    pub send_timeout: Duration,
    /// How long `close` waits for the final results after `CloseStream`.
    pub close_timeout: Duration,
    /// While audio flows, Deepgram answers at least every few seconds (interims, empty
    /// finals); this long without a message means a dead connection that TCP has not
    /// noticed yet, and the client reconnects.
    pub response_timeout: Duration,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// Most audio kept for replay (older audio is dropped if no final result came).
    pub replay_max: Duration,
    /// Ask Deepgram for formatted numbers, punctuation.
    pub smart_format: bool,
}

impl DeepgramConfig {
    /// Settings with production defaults.
    pub fn new(base_url: impl Into<String>, api_key: Secret) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(4),
            send_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(3),
            response_timeout: Duration::from_secs(15),
            backoff: Backoff::default(),
            replay_max: Duration::from_secs(30),
            smart_format: true,
        }
    }
}

/// The Deepgram live client (cheap to clone; one per process).
#[derive(Clone)]
pub struct Deepgram {
    cfg: Arc<DeepgramConfig>,
    base: Url,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Deepgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deepgram")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Deepgram {
    /// Validates the base URL.
    pub fn new(cfg: DeepgramConfig, metrics: Arc<Metrics>) -> Result<Self, SttError> {
        let base = ws_base(&cfg.base_url).map_err(SttError::Config)?;
        HeaderValue::from_str(&format!("Token {}", cfg.api_key.expose()))
            .map_err(|_| SttError::Config("the API key is not a valid header value".into()))?;
        Ok(Self {
            cfg: Arc::new(cfg),
            base,
            metrics,
        })
    }

    /// The `/v1/listen` URL for a session (no secrets in it).
    pub fn listen_url(&self, s: &SttSessionConfig) -> Url {
        let mut url = self.base.clone();
        let path = format!("{}/v1/listen", url.path().trim_end_matches('/'));
        url.set_path(&path);
        {
            let mut q = url.query_pairs_mut();
            q.clear();
            q.append_pair("model", &s.model)
                .append_pair("language", &s.language)
                .append_pair("encoding", "mulaw")
                .append_pair("sample_rate", "8000")
                .append_pair("channels", "1")
                .append_pair("interim_results", "true")
                .append_pair("endpointing", &s.endpointing_ms.to_string())
                .append_pair("utterance_end_ms", &s.utterance_end_ms.to_string())
                .append_pair("vad_events", "true")
                .append_pair(
                    "smart_format",
                    if self.cfg.smart_format {
                        "true"
                    } else {
                        "false"
                    },
                );
            for k in &s.keyterms {
                q.append_pair("keyterm", k);
            }
            if !s.call_sid.is_empty() {
                q.append_pair("tag", &s.call_sid);
            }
        }
        url
    }

    async fn open(&self, url: &Url) -> Result<Ws, SttError> {
        let auth = format!("Token {}", self.cfg.api_key.expose());
        socket::open(
            url,
            (AUTHORIZATION, &auth),
            self.cfg.connect_timeout,
            MAX_MESSAGE_BYTES,
        )
        .await
        .map_err(SttError::from)
    }
}

impl SpeechToText for Deepgram {
    fn connect(
        &self,
        cfg: SttSessionConfig,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<SttSession, SttError>> {
        Box::pin(async move {
            let url = self.listen_url(&cfg);
            // A refused key fails the call's connect at once; any other failure starts
            // the session disconnected, and the reconnect loop opens its first socket.
            let first = match self.open(&url).await {
                Ok(ws) => Some(ws),
                Err(e) => {
                    self.metrics.socket_error(Peer::Deepgram, e.metric_kind());
                    if e.is_fatal() {
                        return Err(e);
                    }
                    warn!(error = %e, "deepgram connect failed; retrying with backoff");
                    None
                }
            };
            let (audio_tx, audio_rx) = mpsc::channel(AUDIO_QUEUE);
            let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let session_cancel = cancel.child_token();
            let task = SessionTask {
                client: self.clone(),
                url,
                audio_rx,
                cmd_rx,
                events: event_tx,
                cancel: session_cancel.clone(),
                replay: Replay::new(
                    (self.cfg.replay_max.as_secs_f64() * BYTES_PER_SEC as f64) as usize,
                ),
                socket_base: 0,
                pending_finalize: false,
            };
            let span = info_span!("deepgram", call_sid = %cfg.call_sid);
            tokio::spawn(session::run(task, first).instrument(span));
            Ok(SttSession {
                audio: audio_tx,
                events: event_rx,
                control: SttControl::new(cmd_tx, session_cancel),
            })
        })
    }
}

/// Audio sent since the end of the last final result, positioned on the call's timeline.
#[derive(Debug)]
struct Replay {
    chunks: VecDeque<Bytes>,
    /// Timeline position (bytes) of the first byte held.
    start: u64,
    len: usize,
    max: usize,
}

impl Replay {
    fn new(max: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            start: 0,
            len: 0,
            max: max.max(BYTES_PER_SEC as usize),
        }
    }

    /// Timeline position just after the newest byte.
    fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    fn push(&mut self, b: Bytes) {
        self.len += b.len();
        self.chunks.push_back(b);
        while self.len > self.max {
            match self.chunks.pop_front() {
                Some(old) => {
                    self.len -= old.len();
                    self.start += old.len() as u64;
                }
                None => break,
            }
        }
    }

    /// Forgets audio before timeline position `pos` (covered by a final result).
    fn trim_to(&mut self, pos: u64) {
        let pos = pos.min(self.end());
        while self.start < pos {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let drop = (pos - self.start) as usize;
            if drop >= front.len() {
                let n = front.len();
                self.chunks.pop_front();
                self.len -= n;
                self.start += n as u64;
            } else {
                *front = front.slice(drop..);
                self.len -= drop;
                self.start += drop as u64;
            }
        }
    }

    /// The held audio in frames of at most `REPLAY_FRAME_BYTES`.
    fn frames(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut cur: Vec<u8> = Vec::with_capacity(REPLAY_FRAME_BYTES);
        for c in &self.chunks {
            let mut rest = &c[..];
            while !rest.is_empty() {
                let take = (REPLAY_FRAME_BYTES - cur.len()).min(rest.len());
                cur.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if cur.len() == REPLAY_FRAME_BYTES {
                    out.push(Bytes::from(std::mem::replace(
                        &mut cur,
                        Vec::with_capacity(REPLAY_FRAME_BYTES),
                    )));
                }
            }
        }
        if !cur.is_empty() {
            out.push(Bytes::from(cur));
        }
        out
    }
}

type Phase = session::Phase<SttError>;

struct SessionTask {
    client: Deepgram,
    url: Url,
    audio_rx: mpsc::Receiver<Bytes>,
    cmd_rx: mpsc::Receiver<SttCommand>,
    events: mpsc::Sender<SttEvent>,
    cancel: CancellationToken,
    replay: Replay,
    /// Timeline position (bytes) of the current socket's time zero.
    socket_base: u64,
    /// A Finalize asked for while reconnecting, to send once connected.
    pending_finalize: bool,
}

impl SessionTask {
    async fn send(&self, ws: &mut Ws, msg: Message) -> bool {
        matches!(
            timeout(self.client.cfg.send_timeout, ws.send(msg)).await,
            Ok(Ok(()))
        )
    }

    /// Runs the session on one socket until it ends or breaks.
    async fn on_socket(&mut self, mut ws: Ws) -> Phase {
        let keepalive = self.client.cfg.keepalive_interval;
        let mut last_sent = Instant::now();
        let mut tick = tokio::time::interval(keepalive.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing: Option<Instant> = None;
        let mut last_recv = Instant::now();
        let mut audio_since_recv: u64 = 0;
        if std::mem::take(&mut self.pending_finalize)
            && !self.send(&mut ws, control_msg("Finalize")).await
        {
            return Phase::Dropped(SttError::Protocol("send failed".into()));
        }
        loop {
            let close_deadline =
                closing.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    let _ = timeout(Duration::from_millis(200), ws.close(None)).await;
                    return Phase::Finished;
                }
                _ = tokio::time::sleep_until(close_deadline), if closing.is_some() => {
                    debug!("deepgram did not close in time after CloseStream");
                    let _ = timeout(Duration::from_millis(200), ws.close(None)).await;
                    return Phase::Finished;
                }
                cmd = self.cmd_rx.recv(), if closing.is_none() => match cmd {
                    Some(SttCommand::Finalize) => {
                        if !self.send(&mut ws, control_msg("Finalize")).await {
                            self.pending_finalize = true;
                            return Phase::Dropped(SttError::Protocol("send failed".into()));
                        }
                        last_sent = Instant::now();
                    }
                    Some(SttCommand::Close) | None => {
                        if !self.send(&mut ws, control_msg("CloseStream")).await {
                            return Phase::Finished;
                        }
                        closing = Some(Instant::now() + self.client.cfg.close_timeout);
                    }
                },
                audio = self.audio_rx.recv(), if closing.is_none() => match audio {
                    Some(b) => {
                        if b.is_empty() {
                            // An empty binary frame means "close" to Deepgram; never send one.
                            continue;
                        }
                        self.replay.push(b.clone());
                        audio_since_recv += b.len() as u64;
                        if !self.send(&mut ws, Message::Binary(b)).await {
                            return Phase::Dropped(SttError::Timeout("send audio"));
                        }
                        last_sent = Instant::now();
                    }
                    None => {
                        // The engine dropped the audio sender: the call is over.
                        if !self.send(&mut ws, control_msg("CloseStream")).await {
                            return Phase::Finished;
                        }
                        closing = Some(Instant::now() + self.client.cfg.close_timeout);
                    }
                },
                _ = tick.tick(), if closing.is_none() => {
                    if audio_since_recv >= RESPONSE_CHECK_AUDIO_BYTES
                        && last_recv.elapsed() >= self.client.cfg.response_timeout
                    {
                        return Phase::Dropped(SttError::Timeout("no results while audio flowed"));
                    }
                    if last_sent.elapsed() >= keepalive {
                        if !self.send(&mut ws, control_msg("KeepAlive")).await {
                            return Phase::Dropped(SttError::Timeout("send keepalive"));
                        }
                        last_sent = Instant::now();
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        last_recv = Instant::now();
                        audio_since_recv = 0;
                        if let Err(phase) = self.handle_text(&t).await {
                            return phase;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        if closing.is_some() {
                            return Phase::Finished;
                        }
                        let (code, reason) = frame
                            .map(|f| (f.code, f.reason.to_string()))
                            .unwrap_or((CloseCode::Status, String::new()));
                        if code == CloseCode::Policy || code == CloseCode::Invalid {
                            // 1008 DATA-000x: Deepgram cannot decode our audio; a
                            // reconnect would fail the same way.
                            return Phase::Fatal(SttError::Protocol(format!(
                                "deepgram closed the stream: {} {reason}",
                                u16::from(code)
                            )));
                        }
                        return Phase::Dropped(SttError::Protocol(format!(
                            "deepgram closed the stream: {} {reason}",
                            u16::from(code)
                        )));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if closing.is_some() {
                            return Phase::Finished;
                        }
                        return Phase::Dropped(SttError::Connect(e.to_string()));
                    }
                    None => {
                        if closing.is_some() {
                            return Phase::Finished;
                        }
                        return Phase::Dropped(SttError::Protocol("deepgram socket ended".into()));
                    }
                },
            }
        }
    }

    /// Decodes one Deepgram message into events. `Err` ends the phase (the engine left).
    async fn handle_text(&mut self, text: &str) -> Result<(), Phase> {
        let msg: ServerMsg = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                self.client
                    .metrics
                    .socket_error(Peer::Deepgram, SocketErrorKind::MalformedJson);
                warn!(error = %e, "undecodable deepgram message");
                return Ok(());
            }
        };
        let base = self.socket_base as f64 / BYTES_PER_SEC as f64;
        let event = match msg {
            ServerMsg::Results(r) => {
                let alt = r
                    .channel
                    .alternatives
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                let words: Vec<Word> = alt
                    .words
                    .into_iter()
                    .map(|w| Word {
                        word: w.punctuated_word.unwrap_or(w.word),
                        start: base + w.start,
                        end: base + w.end,
                        confidence: w.confidence,
                    })
                    .collect();
                let start = base + r.start;
                let end = base + r.start + r.duration;
                if r.is_final {
                    // This audio is transcribed for good: no need to replay it.
                    self.replay
                        .trim_to(final_audio_end(self.socket_base, r.start, r.duration));
                    SttEvent::Final {
                        text: alt.transcript,
                        words,
                        speech_final: r.speech_final,
                        from_finalize: r.from_finalize,
                        start,
                        end,
                    }
                } else {
                    SttEvent::Interim {
                        text: alt.transcript,
                        words,
                        start,
                        end,
                    }
                }
            }
            ServerMsg::UtteranceEnd(u) => SttEvent::UtteranceEnd {
                last_word_end: base + u.last_word_end,
            },
            ServerMsg::SpeechStarted(s) => SttEvent::SpeechStarted {
                timestamp: base + s.timestamp,
            },
            ServerMsg::Metadata {} => return Ok(()),
            ServerMsg::Unknown => {
                self.client
                    .metrics
                    .socket_error(Peer::Deepgram, SocketErrorKind::UnknownEvent);
                return Ok(());
            }
        };
        self.events.send(event).await.map_err(|_| Phase::Finished)
    }
}

/// What the call sends a Deepgram session while its socket is down.
enum DownInput {
    Audio(Bytes),
    Command(SttCommand),
}

impl Redial for SessionTask {
    type Input = DownInput;
    type Error = SttError;

    fn peer(&self) -> Peer {
        Peer::Deepgram
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

    async fn connected(&mut self, ws: Ws) -> Phase {
        self.on_socket(ws).await
    }

    async fn gave_up(&mut self, e: SttError) {
        let _ = self.events.send(SttEvent::Error(e)).await;
    }

    async fn next_input(&mut self) -> Option<DownInput> {
        tokio::select! {
            a = self.audio_rx.recv() => a.map(DownInput::Audio),
            c = self.cmd_rx.recv() => c.map(DownInput::Command),
        }
    }

    async fn while_down(&mut self, input: DownInput) -> Result<bool, SttError> {
        match input {
            // Kept for the replay: no word is lost to the outage.
            DownInput::Audio(b) => self.replay.push(b),
            DownInput::Command(SttCommand::Finalize) => self.pending_finalize = true,
            // Closing while disconnected: nothing more can be transcribed.
            DownInput::Command(SttCommand::Close) => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self) -> impl Future<Output = Result<Ws, SttError>> + Send + 'static {
        let (client, url) = (self.client.clone(), self.url.clone());
        async move { client.open(&url).await }
    }

    /// Replays the audio since the last final result and moves the timeline's zero.
    async fn restore(&mut self, ws: &mut Ws) -> Result<bool, SttError> {
        self.socket_base = self.replay.start;
        let replayed_ms = (self.replay.len as u64 * 1000 / BYTES_PER_SEC) as u32;
        for frame in self.replay.frames() {
            if !self.send(ws, Message::Binary(frame)).await {
                return Err(SttError::Connect("replaying buffered audio failed".into()));
            }
        }
        debug!(replayed_ms, "deepgram reconnected");
        Ok(self
            .events
            .send(SttEvent::Reconnected { replayed_ms })
            .await
            .is_ok())
    }
}

/// Byte position in the socket's audio where a final result ends. The times come
/// from the peer: negative, absurd or non-finite ones saturate instead of
/// overflowing (`trim_to` clamps to the audio actually buffered).
fn final_audio_end(socket_base: u64, start: f64, duration: f64) -> u64 {
    let end_seconds = start + duration;
    let bytes = if end_seconds.is_finite() && end_seconds > 0.0 {
        // `as` saturates for floats beyond u64.
        (end_seconds * BYTES_PER_SEC as f64) as u64
    } else {
        0
    };
    socket_base.saturating_add(bytes)
}

fn control_msg(kind: &str) -> Message {
    Message::Text(format!("{{\"type\":\"{kind}\"}}").into())
}

/// Messages from Deepgram (field names as in Deepgram's API).
#[derive(Deserialize)]
#[serde(tag = "type")]
enum ServerMsg {
    Results(ResultsMsg),
    UtteranceEnd(UtteranceEndMsg),
    SpeechStarted(SpeechStartedMsg),
    Metadata {},
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct ResultsMsg {
    #[serde(default)]
    start: f64,
    #[serde(default)]
    duration: f64,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    speech_final: bool,
    #[serde(default)]
    from_finalize: bool,
    channel: ChannelMsg,
}

#[derive(Deserialize)]
struct ChannelMsg {
    #[serde(default)]
    alternatives: Vec<AlternativeMsg>,
}

#[derive(Deserialize, Default)]
struct AlternativeMsg {
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    words: Vec<WordMsg>,
}

#[derive(Deserialize)]
struct WordMsg {
    word: String,
    #[serde(default)]
    start: f64,
    #[serde(default)]
    end: f64,
    #[serde(default)]
    confidence: f64,
    #[serde(default)]
    punctuated_word: Option<String>,
}

#[derive(Deserialize)]
struct UtteranceEndMsg {
    #[serde(default)]
    last_word_end: f64,
}

#[derive(Deserialize)]
struct SpeechStartedMsg {
    #[serde(default)]
    timestamp: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_result_times_saturate_instead_of_overflowing() {
        // Proves a final result with start/duration of 1e300, negative or huge values
        // (the peer's numbers) cannot overflow the replay position.
        assert_eq!(final_audio_end(u64::MAX - 5, 1e300, 1e300), u64::MAX);
        assert_eq!(final_audio_end(100, -5.0, 1.0), 100);
        assert_eq!(final_audio_end(100, f64::NAN, 1.0), 100);
        assert_eq!(final_audio_end(0, 1.0, 0.0), BYTES_PER_SEC);
    }

    proptest::proptest! {
        // Any text as a Deepgram message: decoded or refused, no panic; any times in
        // a result give a position without overflow.
        #[test]
        fn arbitrary_deepgram_messages_never_panic(
            text in ".{0,400}",
            start in proptest::prelude::any::<f64>(),
            duration in proptest::prelude::any::<f64>(),
            base in proptest::prelude::any::<u64>(),
        ) {
            let _ = serde_json::from_str::<ServerMsg>(&text);
            let shaped = format!(
                "{{\"type\":\"Results\",\"start\":{},\"duration\":{},\"channel\":{{\"alternatives\":[{{\"transcript\":{:?},\"words\":[{{\"word\":\"a\",\"start\":{}}}]}}]}}}}",
                if start.is_finite() { start } else { 0.0 },
                if duration.is_finite() { duration } else { 0.0 },
                text,
                start,
            );
            let _ = serde_json::from_str::<ServerMsg>(&shaped);
            let _ = final_audio_end(base, start, duration);
        }
    }

    #[test]
    fn replay_trims_to_final_end_and_splits_chunks() {
        // Proves the replay buffer forgets exactly the audio a final result covered.
        let mut r = Replay::new(80_000);
        r.push(Bytes::from(vec![1u8; 160]));
        r.push(Bytes::from(vec![2u8; 160]));
        r.trim_to(200);
        assert_eq!(r.start, 200);
        assert_eq!(r.len, 120);
        assert_eq!(r.frames().concat(), vec![2u8; 120]);
        r.trim_to(10_000);
        assert_eq!(r.len, 0);
        assert_eq!(r.start, 320);
    }

    #[test]
    fn replay_buffer_is_bounded() {
        // Proves the buffer never holds more than its maximum, dropping the oldest audio.
        let mut r = Replay::new(8000);
        for _ in 0..100 {
            r.push(Bytes::from(vec![0u8; 160]));
        }
        assert!(r.len <= 8000);
        assert_eq!(r.end(), 16_000);
    }

    #[test]
    fn listen_url_carries_params_and_no_key() {
        // Proves the URL has the protocol params Deepgram needs and never the API key.
        let m = Arc::new(Metrics::new());
        let dg = Deepgram::new(
            DeepgramConfig::new("https://dg.example/base/", Secret::new("sekrit")),
            m,
        )
        .unwrap();
        let url = dg.listen_url(&SttSessionConfig {
            call_sid: "CA1".into(),
            model: "nova-3".into(),
            language: "en-US".into(),
            endpointing_ms: 300,
            utterance_end_ms: 1000,
            keyterms: vec!["Acme Corp".into()],
        });
        let s = url.as_str();
        assert!(s.starts_with("wss://dg.example/base/v1/listen?"), "{s}");
        assert!(s.contains("encoding=mulaw&sample_rate=8000"));
        assert!(s.contains("keyterm=Acme+Corp"));
        assert!(!s.contains("sekrit"));
    }
}
