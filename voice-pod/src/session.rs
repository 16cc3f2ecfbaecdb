//! One call's life on the pod: the seam between the Twilio media stream and whatever
//! talks to the caller (the conversation engine).
//!
//! The Twilio side ([`crate::twilio::media_stream`]) owns the socket. Once a stream
//! has presented a valid, signed `start`, it builds a [`CallContext`] and calls
//! [`CallHandler::run`] with two bounded channels:
//!
//! ```text
//!  Twilio WS reader --CallInput-->  [ handler ]  --CallOutput--> writer --> Twilio WS
//!    (never blocks: a full input       run(ctx, input, output, cancel) -> CallEnd
//!     queue drops the newest audio
//!     frame and counts it)
//! ```
//!
//! Contract for handlers:
//! - `input` yields caller audio (mu-law 8 kHz, normally 160 B = 20 ms per frame),
//!   DTMF digits, returned marks, and finally [`CallInput::Stop`]. It closes (`None`)
//!   when the stream is gone; the handler should then return promptly.
//! - `output` takes audio (mu-law 8 kHz; send multiples of 160 B: 20 ms frames),
//!   marks, `Clear` (barge-in) and `Hangup`. Sending awaits when Twilio's socket is
//!   slow: that backpressure is the pacing signal. Audio is sent in order.
//! - `Hangup` ends the call: the pod asks Twilio's REST API to complete the call and
//!   closes the stream. Returning from `run` also ends the call (the stream closes and
//!   `<Connect>` has nothing after it).
//! - `cancel` fires at the drain deadline or when the pod must end the call; the
//!   handler says goodbye if it can and returns.
//! - After `Stop`, the handler has [`crate::twilio::Limits::handler_finish_grace`] to
//!   return (write records, close provider sockets) before it is cancelled.
//!
//! [`RecordingHandler`] is the default until the engine lands: it records the
//! stream (counts frames, logs DTMF and marks) and returns at `Stop`.

use std::sync::Arc;
use std::time::Instant;

pub use bytes::Bytes;
use callmeback_api::PersonaSpec;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Which way the call goes: in the signed call context, on the call row, in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Someone called a persona's number.
    Inbound,
    /// The persona calls someone back (`POST /v1/calls`).
    Outbound,
}

impl Direction {
    /// `inbound` or `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    /// The inverse of [`Direction::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inbound" => Some(Direction::Inbound),
            "outbound" => Some(Direction::Outbound),
            _ => None,
        }
    }
}

/// Reads the database value.
impl TryFrom<String> for Direction {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Direction::parse(&s).ok_or_else(|| format!("unknown call direction `{s}`"))
    }
}

/// Size of a 20 ms mu-law frame at 8 kHz.
pub const FRAME_BYTES: usize = 160;

/// A call's parties and purpose: what the signed context, the stream's context, the
/// warm-up and the call record all carry, under one set of names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallSpec {
    /// Our id of the call (the `id` from `POST /v1/calls`, or a UUID for inbound calls).
    pub call_id: String,
    /// Persona name (a key of the persona registry).
    pub persona: String,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Caller number (E.164), if known. Personal data: never log it unmasked.
    pub from: Option<String>,
    /// Called number (E.164), if known. Personal data: never log it unmasked.
    pub to: Option<String>,
    /// Why the persona calls (outbound calls), appended to the system prompt.
    pub pretext: Option<String>,
    /// Opaque id of the user this call is for (relationship memory).
    pub user: Option<String>,
}

/// Everything known about a call when its stream starts (all of it verified: it
/// comes from our signed `<Parameter>`s and Twilio's `start`).
#[derive(Clone, Debug)]
pub struct CallContext {
    /// Twilio call SID (`CA...`).
    pub call_sid: String,
    /// Twilio stream SID (`MZ...`), needed on every outbound message.
    pub stream_sid: String,
    /// Twilio account SID.
    pub account_sid: String,
    /// Who and why.
    pub spec: CallSpec,
    /// The persona as it was when the stream started; later edits do not affect it.
    pub persona: Arc<PersonaSpec>,
    /// Twilio's STIR/SHAKEN verdict on the caller's number (inbound), signed into
    /// the stream context by the answer webhook.
    pub caller_verstat: Option<String>,
    /// When the valid `start` arrived.
    pub started_at: Instant,
}

/// What the stream delivers to the handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallInput {
    /// Caller audio: mu-law 8 kHz mono.
    Audio {
        /// The samples (160 B per 20 ms frame from Twilio).
        payload: Bytes,
        /// Milliseconds since the stream started (Twilio's `media.timestamp`).
        timestamp_ms: u64,
    },
    /// A key press (`0`-`9`, `*`, `#`, `A`-`D`).
    Dtmf(char),
    /// A mark we sent came back: the audio before it has played (or was cleared).
    Mark(String),
    /// Twilio stopped the stream (the caller hung up or the call ended). Last input.
    Stop,
}

/// What the handler sends to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutput {
    /// Audio: mu-law 8 kHz mono, a multiple of [`FRAME_BYTES`].
    Audio(Bytes),
    /// A label Twilio echoes back when the audio sent before it has played.
    Mark(String),
    /// Drop the audio Twilio has buffered (barge-in).
    Clear,
    /// End the call.
    Hangup,
}

/// How a call ended, from the handler's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallEnd {
    /// Twilio stopped the stream (caller hung up, or the call was ended elsewhere).
    StreamStopped,
    /// The handler hung up (goodbye said, max duration, idle).
    HungUp {
        /// Low-cardinality reason, e.g. `goodbye`, `max_duration`, `idle`.
        reason: &'static str,
    },
    /// Cancelled by the pod (drain deadline).
    Cancelled,
    /// The handler failed.
    Failed(String),
}

impl CallEnd {
    /// Low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CallEnd::StreamStopped => "stream_stopped",
            CallEnd::HungUp { reason } => reason,
            CallEnd::Cancelled => "cancelled",
            CallEnd::Failed(_) => "failed",
        }
    }
}

/// A call that is about to start: the webhook answered or an outbound call rings.
/// Providers can warm up (open sockets, synthesize the greeting) so the persona is
/// heard within a second of the answer.
#[derive(Clone, Debug)]
pub struct PreparedCall {
    /// Who and why (its `call_id` matches the stream's when it starts).
    pub spec: CallSpec,
    /// The persona.
    pub persona: Arc<PersonaSpec>,
}

/// Whatever talks to the caller. One instance serves every call of the pod.
pub trait CallHandler: Send + Sync + 'static {
    /// A call is being placed or rings: warm up. Must not block (spawn if needed).
    /// The stream may start on another pod; warm-ups must expire on their own.
    fn prepare(&self, call: &PreparedCall) {
        let _ = call;
    }

    /// Runs one call until it ends. See the module docs for the channel contract.
    fn run(
        &self,
        ctx: CallContext,
        input: mpsc::Receiver<CallInput>,
        output: mpsc::Sender<CallOutput>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, CallEnd>;
}

/// Counts of what a [`RecordingHandler`] saw on one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recording {
    /// Audio frames.
    pub frames: u64,
    /// Audio bytes.
    pub bytes: u64,
    /// Digits pressed.
    pub dtmf: String,
    /// Marks returned.
    pub marks: u64,
}

/// The default handler until the conversation engine lands: listens, says nothing.
#[derive(Clone, Debug, Default)]
pub struct RecordingHandler;

impl CallHandler for RecordingHandler {
    fn run(
        &self,
        ctx: CallContext,
        mut input: mpsc::Receiver<CallInput>,
        _output: mpsc::Sender<CallOutput>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, CallEnd> {
        Box::pin(async move {
            let mut rec = Recording::default();
            let end = loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => break CallEnd::Cancelled,
                    next = input.recv() => next,
                };
                match next {
                    Some(CallInput::Audio { payload, .. }) => {
                        rec.frames += 1;
                        rec.bytes += payload.len() as u64;
                    }
                    Some(CallInput::Dtmf(d)) => {
                        rec.dtmf.push(d);
                        // Keys can be a PIN or a card number: never logged.
                        tracing::debug!("dtmf key pressed");
                    }
                    Some(CallInput::Mark(name)) => {
                        rec.marks += 1;
                        tracing::debug!(mark = %name, "mark returned");
                    }
                    Some(CallInput::Stop) | None => break CallEnd::StreamStopped,
                }
            };
            tracing::info!(
                persona = %ctx.spec.persona,
                frames = rec.frames,
                seconds = rec.bytes as f64 / 8000.0,
                dtmf_digits = rec.dtmf.len(),
                marks = rec.marks,
                "stream recorded"
            );
            end
        })
    }
}
