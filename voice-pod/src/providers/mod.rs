//! Provider clients behind small traits: speech-to-text, the chat model, text-to-speech.
//!
//! The conversation engine only sees the traits and event types in this module, so it can
//! run against the real providers, the protocol-faithful emulators of the test crate, or a
//! second provider per role added later.
//!
//! ## Layout
//! - this module: the traits ([`SpeechToText`], [`ChatModel`], [`TextToSpeech`]), their
//!   session handles, event types and error enums.
//! - `deepgram`: Deepgram live (`/v1/listen`) over WebSocket, with KeepAlive, Finalize,
//!   reconnect and audio replay.
//! - `cerebras` + `sse`: Cerebras (any OpenAI-compatible API) chat completions streamed
//!   as server-sent events; `tool_calls`: function-call deltas assembled by index.
//! - `elevenlabs`: ElevenLabs multi-context stream input over one WebSocket per call.
//! - `session`: the one reconnecting-socket loop both streaming sessions use
//!   (backoff, restore, give up once); `backoff`: its bounded, jittered delays;
//!   `socket`: opening a provider WebSocket.
//!
//! ## Conventions every implementation follows
//! - Keys travel in headers, never in URLs, logs or metric labels (a [`Secret`] never prints).
//! - Every channel is bounded; every network await has a timeout; a
//!   [`CancellationToken`] stops a session and all its tasks.
//! - A session reconnects on its own and gives up once (`Error`); callers never dial
//!   again. A transient failure of the first connect starts the session disconnected;
//!   only a refused key fails `connect`.
//! - Socket errors and reconnects are counted in [`Metrics`](crate::metrics::Metrics)
//!   (`voice_socket_errors_total{peer,kind}`, `voice_provider_reconnects_total{peer}`);
//!   each error enum maps to a design socket-error kind with `metric_kind()`.
//! - Audio is G.711 mu-law, 8 kHz, mono, both ways, so Twilio bytes pass untouched.

use std::fmt;
use std::time::Duration;

pub use bytes::Bytes;
use callmeback_api::{LlmSpec, ReasoningEffort, SttSpec, VoiceSpec};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::SocketErrorKind;
use crate::secret::Secret;

pub mod backoff;
pub mod cerebras;
pub mod deepgram;
pub mod elevenlabs;
mod session;
mod socket;
pub mod sse;
pub mod tool_calls;

// ---------------------------------------------------------------------------------------
// Speech-to-text
// ---------------------------------------------------------------------------------------

/// What one call's speech-to-text session needs: the persona's `stt` block plus the call.
#[derive(Clone, Debug, PartialEq)]
pub struct SttSessionConfig {
    /// Twilio call SID, for log spans only (never sent to the provider).
    pub call_sid: String,
    /// Model, e.g. `nova-3`.
    pub model: String,
    /// BCP-47 language tag.
    pub language: String,
    /// Silence (ms) after which the provider marks `speech_final`.
    pub endpointing_ms: u32,
    /// Gap (ms) after the last word before an `UtteranceEnd`.
    pub utterance_end_ms: u32,
    /// Words to boost.
    pub keyterms: Vec<String>,
}

impl SttSessionConfig {
    /// Builds the session config from a persona's `stt` block.
    pub fn from_spec(spec: &SttSpec, call_sid: &str) -> Self {
        Self {
            call_sid: call_sid.to_owned(),
            model: spec.model.clone(),
            language: spec.language.clone(),
            endpointing_ms: spec.endpointing_ms,
            utterance_end_ms: spec.utterance_end_ms,
            keyterms: spec.keyterms.clone(),
        }
    }
}

/// One recognised word. Times are seconds on the session's audio timeline (see [`SttEvent`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Word {
    /// The word as recognised (punctuated when the provider punctuates).
    pub word: String,
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
    /// 0..1.
    pub confidence: f64,
}

/// Events of a speech-to-text session.
///
/// Times are seconds on the session's audio timeline: 0 is the first audio byte given to
/// [`SttSession::audio`], and each 8000 bytes of mu-law advance it by one second. The
/// timeline survives reconnects (the client offsets the provider's timestamps), so the
/// engine can compare any two events of one call.
#[derive(Debug)]
pub enum SttEvent {
    /// A not-yet-stable hypothesis for the audio in `start..end` (words revealed as the
    /// caller speaks). Useful for barge-in and preemptive generation; may still change.
    Interim {
        /// Transcript of the segment so far.
        text: String,
        /// Its words.
        words: Vec<Word>,
        /// Segment start, seconds.
        start: f64,
        /// Segment end, seconds.
        end: f64,
    },
    /// A stable segment (`is_final`). A user turn is the concatenation of finals up to one
    /// with `speech_final` (endpoint detected) or an [`SttEvent::UtteranceEnd`].
    Final {
        /// Transcript of the segment (may be empty when the segment held no speech).
        text: String,
        /// Its words.
        words: Vec<Word>,
        /// The provider detected an endpoint (a pause of `endpointing_ms`) after it.
        speech_final: bool,
        /// Produced by [`SttControl::finalize`].
        from_finalize: bool,
        /// Segment start, seconds.
        start: f64,
        /// Segment end, seconds.
        end: f64,
    },
    /// No new word for `utterance_end_ms` after the last finalized word.
    UtteranceEnd {
        /// End of the last word, seconds.
        last_word_end: f64,
    },
    /// Voice activity started (a cheap early barge-in signal).
    SpeechStarted {
        /// Onset, seconds.
        timestamp: f64,
    },
    /// The socket dropped and a new one is up; `replayed_ms` of audio not yet covered by a
    /// final result were sent again, so no words are lost.
    Reconnected {
        /// Milliseconds of audio replayed into the new socket.
        replayed_ms: u32,
    },
    /// The session gave up (reconnects exhausted, auth rejected). The channel closes after.
    Error(SttError),
}

/// Commands to a running STT session (cheap to clone; used from the engine's task).
#[derive(Clone, Debug)]
pub struct SttControl {
    tx: mpsc::Sender<SttCommand>,
    cancel: CancellationToken,
}

/// Internal STT commands (implementations match on them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SttCommand {
    /// Finalize everything buffered now (results carry `from_finalize`).
    Finalize,
    /// Flush final results, close the stream gracefully, end the session.
    Close,
}

impl SttControl {
    /// Creates a handle; for implementations of [`SpeechToText`].
    pub fn new(tx: mpsc::Sender<SttCommand>, cancel: CancellationToken) -> Self {
        Self { tx, cancel }
    }

    /// Asks the provider to finalize what it has heard now (the engine needs the transcript
    /// without waiting for endpointing). Never blocks: a full command queue drops the
    /// request, because a Finalize is already pending then.
    pub fn finalize(&self) -> Result<(), SttError> {
        match self.tx.try_send(SttCommand::Finalize) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SttError::SessionClosed),
        }
    }

    /// Ends the session gracefully: remaining final results still arrive as events, then
    /// the event channel closes. Bounded by the implementation's close timeout.
    pub async fn close(&self) {
        // If the session already ended there is nothing to close.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(SttCommand::Close)).await;
    }

    /// Stops the session at once, without waiting for final results.
    pub fn abort(&self) {
        self.cancel.cancel();
    }
}

/// A live speech-to-text session for one call. The fields are public so the engine can
/// move them to different tasks (audio to the Twilio read loop, events to the engine).
#[derive(Debug)]
pub struct SttSession {
    /// Caller audio: mu-law 8 kHz mono bytes exactly as Twilio sent them (any framing).
    /// Bounded; use `try_send` from the Twilio read loop so a slow provider never blocks
    /// it (a full queue means the provider is far behind; dropping is then the lesser evil).
    pub audio: mpsc::Sender<Bytes>,
    /// Transcription events, in order.
    pub events: mpsc::Receiver<SttEvent>,
    /// Finalize / close.
    pub control: SttControl,
}

/// A speech-to-text provider (Deepgram live, an emulator, a second provider later).
pub trait SpeechToText: Send + Sync {
    /// Opens a session (the socket is connected when this resolves). `cancel` stops it and
    /// every task it spawned.
    fn connect(
        &self,
        cfg: SttSessionConfig,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<SttSession, SttError>>;
}

/// Speech-to-text errors.
#[derive(Debug, thiserror::Error)]
pub enum SttError {
    /// TCP/TLS/WebSocket handshake failed.
    #[error("could not connect to the STT provider: {0}")]
    Connect(String),
    /// The provider refused the key (HTTP 401/403 on the upgrade).
    #[error("the STT provider rejected the API key (HTTP {0})")]
    Unauthorized(u16),
    /// The provider refused the request (bad parameters), HTTP status on the upgrade.
    #[error("the STT provider rejected the request (HTTP {status}): {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Response body, truncated.
        body: String,
    },
    /// A deadline passed.
    #[error("STT provider timed out: {0}")]
    Timeout(&'static str),
    /// The socket closed and reconnecting failed `attempts` times.
    #[error("STT socket closed and {attempts} reconnect attempts failed: {last}")]
    ReconnectsExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The provider sent something we cannot parse.
    #[error("STT provider protocol error: {0}")]
    Protocol(String),
    /// The session is over.
    #[error("the STT session is closed")]
    SessionClosed,
    /// Invalid configuration (bad base URL).
    #[error("invalid STT configuration: {0}")]
    Config(String),
}

impl SttError {
    /// The design's socket-error kind for `voice_socket_errors_total{kind}`.
    pub fn metric_kind(&self) -> SocketErrorKind {
        match self {
            SttError::Connect(_) | SttError::Unauthorized(_) | SttError::Config(_) => {
                SocketErrorKind::Connect
            }
            SttError::Rejected { .. } | SttError::Protocol(_) => SocketErrorKind::Protocol,
            SttError::Timeout(_) => SocketErrorKind::Timeout,
            SttError::ReconnectsExhausted { .. } | SttError::SessionClosed => {
                SocketErrorKind::Closed
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Chat model (LLM)
// ---------------------------------------------------------------------------------------

/// Who said a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions.
    System,
    /// The caller.
    User,
    /// The persona.
    Assistant,
    /// The result of a function the persona called.
    Tool,
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said (a tool result's text for [`Role::Tool`]).
    pub content: String,
    /// The functions an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a [`Role::Tool`] message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with a role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The persona's turn that called functions (with what it said before them).
    pub fn assistant_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::new(Role::Assistant, content)
        }
    }

    /// The result of call `call_id`, for the model's next step.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// A function the model may call: what the request offers (OpenAI `tools`).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolDef {
    /// The function's name.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// Its arguments as a JSON Schema object.
    pub parameters: serde_json::Value,
}

/// A function call the model made, assembled from the stream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "WireToolCall", into = "WireToolCall")]
pub struct ToolCall {
    /// The provider's id of the call (a tool result names it).
    pub id: String,
    /// Which function.
    pub name: String,
    /// Its arguments: JSON text as the model wrote it (not yet validated).
    pub arguments: String,
}

/// [`ToolCall`] as OpenAI-compatible APIs write it in a message.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct WireToolCall {
    id: String,
    #[serde(rename = "type", default = "function_type")]
    kind: String,
    function: WireFunction,
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

fn function_type() -> String {
    "function".into()
}

impl From<WireToolCall> for ToolCall {
    fn from(w: WireToolCall) -> Self {
        Self {
            id: w.id,
            name: w.function.name,
            arguments: w.function.arguments,
        }
    }
}

impl From<ToolCall> for WireToolCall {
    fn from(c: ToolCall) -> Self {
        Self {
            id: c.id,
            kind: function_type(),
            function: WireFunction {
                name: c.name,
                arguments: c.arguments,
            },
        }
    }
}

/// One streamed completion request.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// The conversation, system prompt first.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature.
    pub temperature: f64,
    /// Upper bound on the reply's tokens (`max_completion_tokens`).
    pub max_tokens: u32,
    /// For reasoning models.
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Functions the model may call (none: a plain completion).
    pub tools: Vec<ToolDef>,
}

impl ChatRequest {
    /// A request with the persona's `llm` settings.
    pub fn from_spec(spec: &LlmSpec, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: spec.model.clone(),
            messages,
            temperature: spec.temperature,
            max_tokens: spec.max_tokens,
            reasoning_effort: spec.reasoning_effort,
            tools: Vec::new(),
        }
    }
}

/// Token accounting of one completion (from the last chunk).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens (reasoning included).
    pub completion_tokens: u32,
    /// Server-side time to first token when the provider reports it
    /// (Cerebras `time_info.queue_time + prompt_time`), seconds.
    pub server_ttft: Option<f64>,
}

/// One item of a streamed completion.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatDelta {
    /// Reply text, to speak.
    Content(String),
    /// Reasoning text of reasoning models: for logs at most, NEVER to TTS.
    Reasoning(String),
    /// Token usage (usually just before `Done`).
    Usage(Usage),
    /// The functions the model called, whole, in index order (just before `Done`,
    /// whose `finish_reason` is then `tool_calls`).
    ToolCalls(Vec<ToolCall>),
    /// The stream ended normally (`[DONE]`). Nothing follows.
    Done {
        /// `stop`, `length`, `content_filter`, ... when the provider said.
        finish_reason: Option<String>,
    },
}

/// A streamed completion. Ends after `Done` or the first `Err`. Dropping it aborts the
/// HTTP request; cancelling the token given to [`ChatModel::stream`] ends it too.
pub type ChatStream = BoxStream<'static, Result<ChatDelta, LlmError>>;

/// A streaming chat model (Cerebras, an emulator, another OpenAI-compatible provider).
pub trait ChatModel: Send + Sync {
    /// Starts a completion. Resolves once the provider accepted the request and the first
    /// token (`Content` or `Reasoning`) is in, so a failure before any token (429/5xx, an
    /// error inside the 200 stream) can be retried once inside, honouring `retry-after`.
    /// The whole wait is bounded by the client's first-token deadline (counted from this
    /// call): [`LlmError::FirstTokenTimeout`]. For the engine the rule is simple: an `Err`
    /// from this future or from the stream means "speak the persona's fallback".
    fn stream(
        &self,
        req: ChatRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<ChatStream, LlmError>>;

    /// Checks that `model` exists (`GET /v1/models`); the error says which models do.
    fn check_model<'a>(&'a self, model: &'a str) -> BoxFuture<'a, Result<(), LlmError>>;
}

/// Chat model errors.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// Could not reach the provider.
    #[error("could not reach the LLM provider: {0}")]
    Connect(String),
    /// The provider refused the key.
    #[error("the LLM provider rejected the API key (HTTP {0})")]
    Unauthorized(u16),
    /// Rate limited, and the retry (if any) was limited too.
    #[error("the LLM provider is rate limiting us (HTTP 429){}", .retry_after.map(|d| format!(", retry after {:.1}s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited {
        /// The provider's `retry-after`, when given.
        retry_after: Option<Duration>,
    },
    /// Any other non-200 status.
    #[error("the LLM provider answered HTTP {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The provider's error message, truncated.
        message: String,
    },
    /// An `error` object or `event: error` inside a 200 stream.
    #[error("the LLM stream reported an error: {0}")]
    InStream(String),
    /// No first token within the deadline.
    #[error("no first token from the LLM within {0:?}")]
    FirstTokenTimeout(Duration),
    /// The stream stalled between tokens.
    #[error("the LLM stream stalled for {0:?}")]
    Stalled(Duration),
    /// The stream ended without `[DONE]`.
    #[error("the LLM stream ended early")]
    Truncated,
    /// Undecodable SSE data.
    #[error("the LLM stream is malformed: {0}")]
    Malformed(String),
    /// The configured model does not exist.
    #[error("the LLM model `{model}` does not exist at the provider; available: {}", .available.join(", "))]
    UnknownModel {
        /// The configured model.
        model: String,
        /// What `/v1/models` listed.
        available: Vec<String>,
    },
    /// Cancelled by the caller.
    #[error("the LLM request was cancelled")]
    Cancelled,
    /// Invalid configuration.
    #[error("invalid LLM configuration: {0}")]
    Config(String),
}

impl LlmError {
    /// The design's socket-error kind for `voice_socket_errors_total{kind}`.
    pub fn metric_kind(&self) -> SocketErrorKind {
        match self {
            LlmError::Connect(_) | LlmError::Unauthorized(_) | LlmError::Config(_) => {
                SocketErrorKind::Connect
            }
            LlmError::RateLimited { .. }
            | LlmError::Status { .. }
            | LlmError::InStream(_)
            | LlmError::UnknownModel { .. } => SocketErrorKind::Protocol,
            LlmError::FirstTokenTimeout(_) | LlmError::Stalled(_) => SocketErrorKind::Timeout,
            LlmError::Truncated | LlmError::Cancelled => SocketErrorKind::Closed,
            LlmError::Malformed(_) => SocketErrorKind::MalformedJson,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Text-to-speech
// ---------------------------------------------------------------------------------------

/// What one call's text-to-speech session needs: the persona's `voice` block plus the call.
#[derive(Clone, Debug, PartialEq)]
pub struct TtsSessionConfig {
    /// Twilio call SID, for log spans only.
    pub call_sid: String,
    /// Provider voice id.
    pub voice_id: String,
    /// Provider model id, e.g. `eleven_flash_v2_5`.
    pub model_id: String,
    /// Voice settings (sent only on a context's first message).
    pub stability: Option<f64>,
    /// Voice settings.
    pub similarity_boost: Option<f64>,
    /// Voice settings.
    pub style: Option<f64>,
    /// Voice settings.
    pub speed: Option<f64>,
}

impl TtsSessionConfig {
    /// Builds the session config from a persona's `voice` block.
    pub fn from_spec(spec: &VoiceSpec, call_sid: &str) -> Self {
        Self {
            call_sid: call_sid.to_owned(),
            voice_id: spec.voice_id.clone(),
            model_id: spec.model_id.clone(),
            stability: spec.stability,
            similarity_boost: spec.similarity_boost,
            style: spec.style,
            speed: spec.speed,
        }
    }
}

/// An utterance's id within a TTS session (one per bot reply; pick unique ones per call,
/// e.g. `t3`, and never reuse one).
pub type ContextId = String;

/// Events of a text-to-speech session.
#[derive(Debug)]
pub enum TtsEvent {
    /// Audio for an utterance: mu-law 8 kHz mono, ready for Twilio (any length; the
    /// Twilio side frames it). Never emitted for a context after it was cancelled.
    Audio {
        /// Whose audio.
        context_id: ContextId,
        /// The bytes.
        mulaw: Bytes,
    },
    /// All audio of an ended context was delivered (`isFinal`).
    ContextDone {
        /// Which.
        context_id: ContextId,
    },
    /// The socket dropped and a new one is up; the unspoken text of `resent` open contexts
    /// was sent again (their audio restarts at the first unspoken chunk).
    Reconnected {
        /// Contexts resumed.
        resent: usize,
    },
    /// The session gave up. The channel closes after.
    Error(TtsError),
}

/// Internal TTS commands (implementations match on them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TtsCommand {
    /// Text for a context (opens it on first use).
    Speak {
        /// Context.
        context_id: ContextId,
        /// Text, ending in a space or punctuation (whole clauses work best).
        text: String,
    },
    /// Generate buffered text now.
    Flush {
        /// Context.
        context_id: ContextId,
    },
    /// No more text: remaining audio still comes, then `ContextDone`.
    End {
        /// Context.
        context_id: ContextId,
    },
    /// Barge-in: stop this context now; no more audio for it.
    Cancel {
        /// Context.
        context_id: ContextId,
    },
    /// Close the socket gracefully; the session ends.
    Close,
}

/// Commands to a running TTS session (cheap to clone). Each method waits only for room in
/// a bounded queue (with a short timeout), never for the provider.
#[derive(Clone, Debug)]
pub struct TtsControl {
    tx: mpsc::Sender<TtsCommand>,
    cancel: CancellationToken,
}

/// How long a control method waits for room in the command queue.
const TTS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

impl TtsControl {
    /// Creates a handle; for implementations of [`TextToSpeech`].
    pub fn new(tx: mpsc::Sender<TtsCommand>, cancel: CancellationToken) -> Self {
        Self { tx, cancel }
    }

    async fn send(&self, cmd: TtsCommand) -> Result<(), TtsError> {
        match tokio::time::timeout(TTS_COMMAND_TIMEOUT, self.tx.send(cmd)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TtsError::SessionClosed),
            Err(_) => Err(TtsError::Timeout("command queue full")),
        }
    }

    /// Speaks `text` in `context_id` (the first call opens the context, with the voice
    /// settings). Send whole clauses/sentences; audio starts without a flush.
    pub async fn speak(&self, context_id: &str, text: &str) -> Result<(), TtsError> {
        self.send(TtsCommand::Speak {
            context_id: context_id.to_owned(),
            text: text.to_owned(),
        })
        .await
    }

    /// Forces generation of any text the provider still buffers for the context.
    pub async fn flush(&self, context_id: &str) -> Result<(), TtsError> {
        self.send(TtsCommand::Flush {
            context_id: context_id.to_owned(),
        })
        .await
    }

    /// Ends the utterance: remaining audio still arrives, then [`TtsEvent::ContextDone`].
    /// Every context must be ended or cancelled (the provider allows 5 open per socket;
    /// the client closes the oldest when a 6th opens).
    pub async fn end(&self, context_id: &str) -> Result<(), TtsError> {
        self.send(TtsCommand::End {
            context_id: context_id.to_owned(),
        })
        .await
    }

    /// Barge-in: stops the context at once. No [`TtsEvent::Audio`] for it follows and no
    /// `ContextDone` is emitted.
    pub async fn cancel(&self, context_id: &str) -> Result<(), TtsError> {
        self.send(TtsCommand::Cancel {
            context_id: context_id.to_owned(),
        })
        .await
    }

    /// Closes the socket gracefully at the end of the call.
    pub async fn close(&self) {
        // A session that already ended needs no close.
        let _ = self.send(TtsCommand::Close).await;
    }

    /// Stops the session at once.
    pub fn abort(&self) {
        self.cancel.cancel();
    }
}

/// A live text-to-speech session for one call (one socket kept across turns).
#[derive(Debug)]
pub struct TtsSession {
    /// Speak / end / cancel.
    pub control: TtsControl,
    /// Audio and lifecycle events, in order.
    pub events: mpsc::Receiver<TtsEvent>,
}

/// A text-to-speech provider (ElevenLabs multi-context, an emulator, ...).
pub trait TextToSpeech: Send + Sync {
    /// Opens a session (the socket is connected when this resolves).
    fn connect(
        &self,
        cfg: TtsSessionConfig,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<TtsSession, TtsError>>;
}

/// Text-to-speech errors.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    /// TCP/TLS/WebSocket handshake failed.
    #[error("could not connect to the TTS provider: {0}")]
    Connect(String),
    /// The provider refused the key.
    #[error("the TTS provider rejected the API key (HTTP {0})")]
    Unauthorized(u16),
    /// The provider refused the request, HTTP status on the upgrade.
    #[error("the TTS provider rejected the request (HTTP {status}): {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Response body, truncated.
        body: String,
    },
    /// An error message from the provider (`{"error":..,"message":..}`).
    #[error("the TTS provider reported `{code}`: {message}")]
    Provider {
        /// E.g. `input_timeout_exceeded`, `max_active_conversations`.
        code: String,
        /// Human text.
        message: String,
    },
    /// A deadline passed.
    #[error("TTS provider timed out: {0}")]
    Timeout(&'static str),
    /// The socket closed and reconnecting failed.
    #[error("TTS socket closed and {attempts} reconnect attempts failed: {last}")]
    ReconnectsExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// Unparseable message.
    #[error("TTS provider protocol error: {0}")]
    Protocol(String),
    /// The session is over.
    #[error("the TTS session is closed")]
    SessionClosed,
    /// Invalid configuration.
    #[error("invalid TTS configuration: {0}")]
    Config(String),
}

impl TtsError {
    /// The design's socket-error kind for `voice_socket_errors_total{kind}`.
    pub fn metric_kind(&self) -> SocketErrorKind {
        match self {
            TtsError::Connect(_) | TtsError::Unauthorized(_) | TtsError::Config(_) => {
                SocketErrorKind::Connect
            }
            TtsError::Rejected { .. } | TtsError::Provider { .. } | TtsError::Protocol(_) => {
                SocketErrorKind::Protocol
            }
            TtsError::Timeout(_) => SocketErrorKind::Timeout,
            TtsError::ReconnectsExhausted { .. } | TtsError::SessionClosed => {
                SocketErrorKind::Closed
            }
        }
    }
}

/// The three providers a call needs, as the engine holds them.
#[derive(Clone)]
pub struct Providers {
    /// Speech-to-text.
    pub stt: std::sync::Arc<dyn SpeechToText>,
    /// Chat model.
    pub llm: std::sync::Arc<dyn ChatModel>,
    /// Text-to-speech.
    pub tts: std::sync::Arc<dyn TextToSpeech>,
}

impl fmt::Debug for Providers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Providers { .. }")
    }
}

/// Default base URLs (the design's defaults for `DEEPGRAM_URL`, `CEREBRAS_URL`, `ELEVENLABS_URL`).
pub const DEFAULT_DEEPGRAM_URL: &str = "wss://api.deepgram.com";
/// See [`DEFAULT_DEEPGRAM_URL`].
pub const DEFAULT_CEREBRAS_URL: &str = "https://api.cerebras.ai";
/// See [`DEFAULT_DEEPGRAM_URL`].
pub const DEFAULT_ELEVENLABS_URL: &str = "wss://api.elevenlabs.io";

/// Base URLs and keys of the three providers.
#[derive(Clone, Debug)]
pub struct ProviderSettings {
    /// `DEEPGRAM_URL`.
    pub deepgram_url: String,
    /// `DEEPGRAM_API_KEY`.
    pub deepgram_key: Secret,
    /// `CEREBRAS_URL`.
    pub cerebras_url: String,
    /// `CEREBRAS_API_KEY`.
    pub cerebras_key: Secret,
    /// `ELEVENLABS_URL`.
    pub elevenlabs_url: String,
    /// `ELEVENLABS_API_KEY`.
    pub elevenlabs_key: Secret,
}

impl ProviderSettings {
    /// Reads the design's variables through `lookup` (the environment in production, a
    /// map in tests). Keys are required; URLs default to the public endpoints.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ProviderInitError> {
        let get = |name: &'static str| lookup(name).filter(|v| !v.trim().is_empty());
        let key = |name: &'static str| {
            get(name)
                .map(Secret::new)
                .ok_or(ProviderInitError::Missing(name))
        };
        Ok(Self {
            deepgram_url: get("DEEPGRAM_URL").unwrap_or_else(|| DEFAULT_DEEPGRAM_URL.into()),
            deepgram_key: key("DEEPGRAM_API_KEY")?,
            cerebras_url: get("CEREBRAS_URL").unwrap_or_else(|| DEFAULT_CEREBRAS_URL.into()),
            cerebras_key: key("CEREBRAS_API_KEY")?,
            elevenlabs_url: get("ELEVENLABS_URL").unwrap_or_else(|| DEFAULT_ELEVENLABS_URL.into()),
            elevenlabs_key: key("ELEVENLABS_API_KEY")?,
        })
    }
}

/// Why the providers could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProviderInitError {
    /// A required variable is unset.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// Deepgram settings are invalid.
    #[error("DEEPGRAM_URL/DEEPGRAM_API_KEY: {0}")]
    Stt(#[source] SttError),
    /// Cerebras settings are invalid.
    #[error("CEREBRAS_URL/CEREBRAS_API_KEY: {0}")]
    Llm(#[source] LlmError),
    /// ElevenLabs settings are invalid.
    #[error("ELEVENLABS_URL/ELEVENLABS_API_KEY: {0}")]
    Tts(#[source] TtsError),
}

impl Providers {
    /// The real clients (Deepgram, Cerebras, ElevenLabs) with production defaults. One
    /// set per process: the Cerebras client holds the warm connection pool.
    pub fn real(
        settings: &ProviderSettings,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<Self, ProviderInitError> {
        let stt = deepgram::Deepgram::new(
            deepgram::DeepgramConfig::new(&settings.deepgram_url, settings.deepgram_key.clone()),
            metrics.clone(),
        )
        .map_err(ProviderInitError::Stt)?;
        let llm = cerebras::Cerebras::new(
            cerebras::CerebrasConfig::new(&settings.cerebras_url, settings.cerebras_key.clone()),
            metrics.clone(),
        )
        .map_err(ProviderInitError::Llm)?;
        let tts = elevenlabs::ElevenLabs::new(
            elevenlabs::ElevenLabsConfig::new(
                &settings.elevenlabs_url,
                settings.elevenlabs_key.clone(),
            ),
            metrics,
        )
        .map_err(ProviderInitError::Tts)?;
        Ok(Self {
            stt: std::sync::Arc::new(stt),
            llm: std::sync::Arc::new(llm),
            tts: std::sync::Arc::new(tts),
        })
    }
}

impl From<socket::OpenError> for SttError {
    fn from(e: socket::OpenError) -> Self {
        match e {
            socket::OpenError::Config(m) => SttError::Config(m),
            socket::OpenError::Timeout => SttError::Timeout("connect"),
            socket::OpenError::Unauthorized(s) => SttError::Unauthorized(s),
            socket::OpenError::Rejected { status, body } => SttError::Rejected { status, body },
            socket::OpenError::Connect(m) => SttError::Connect(m),
        }
    }
}

impl From<socket::OpenError> for TtsError {
    fn from(e: socket::OpenError) -> Self {
        match e {
            socket::OpenError::Config(m) => TtsError::Config(m),
            socket::OpenError::Timeout => TtsError::Timeout("connect"),
            socket::OpenError::Unauthorized(s) => TtsError::Unauthorized(s),
            socket::OpenError::Rejected { status, body } => TtsError::Rejected { status, body },
            socket::OpenError::Connect(m) => TtsError::Connect(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_need_keys_and_default_the_urls() {
        // Proves a missing key is named, URLs default to the public endpoints, and keys never print.
        let env = |k: &str| match k {
            "DEEPGRAM_API_KEY" | "CEREBRAS_API_KEY" => Some("k1".to_string()),
            "ELEVENLABS_URL" => Some("ws://127.0.0.1:9".to_string()),
            _ => None,
        };
        let err = ProviderSettings::from_lookup(env).unwrap_err();
        assert_eq!(err.to_string(), "ELEVENLABS_API_KEY is not set");
        let s = ProviderSettings::from_lookup(|k| {
            env(k).or_else(|| Some("k2".into()).filter(|_| k == "ELEVENLABS_API_KEY"))
        })
        .unwrap();
        assert_eq!(s.deepgram_url, DEFAULT_DEEPGRAM_URL);
        assert_eq!(s.elevenlabs_url, "ws://127.0.0.1:9");
        assert!(!format!("{s:?}").contains("k1"));
        assert!(Providers::real(&s, std::sync::Arc::new(crate::metrics::Metrics::new())).is_ok());
    }
}
