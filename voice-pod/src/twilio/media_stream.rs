//! One Twilio media stream, from WebSocket upgrade to close.
//!
//! 1. **Handshake.** Until a valid `start` arrives (within
//!    [`Limits::stream_start_timeout`]), nothing costs money: no handler runs, no
//!    provider socket opens, the stream is not an active call. `start` must carry our
//!    signed, unexpired call context in `customParameters`; a missing, forged or
//!    stale one closes the socket (1008) and counts `bad_signature`.
//! 2. **Call.** The stream counts in `voice_active_calls`; the [`CallHandler`] runs
//!    with bounded channels (see [`crate::session`]). The reader never blocks on the
//!    handler: when its input queue is full the newest audio frame is dropped and
//!    counted. A writer task owns the socket's send half and serialises the handler's
//!    outputs in order.
//! 3. **End.** `stop` from Twilio, the socket closing, the handler hanging up or
//!    returning, or the drain deadline. The handler gets a grace period to finish.
//!
//! Bad input (malformed JSON, unknown events, bad base64, oversized or binary
//! frames, messages out of order) is counted in `voice_socket_errors_total`, logged
//! with the call SID, and skipped: one bad frame does not end a call. Only a frame
//! beyond the transport limit (the socket cannot continue) does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::context::{ContextSigner, Purpose, SIG_PARAM, is_call_sid, unix_now};
use super::rest::TwilioClient;
use super::stream_claims::StreamClaims;
use super::stream_messages::{Inbound, Outbound, StartMeta, StreamEvent, parse_inbound};
use crate::capacity::{CallSlot, CallSlots};
use crate::drain::Drain;
use crate::metrics::{Metrics, Peer, Refusal, SocketErrorKind};
use crate::personas::Personas;
use crate::session::{
    CallContext, CallEnd, CallHandler, CallInput, CallOutput, Direction, FRAME_BYTES,
};
use crate::twilio::Limits;

/// Largest WebSocket message the transport accepts. Beyond it the socket fails.
pub const MAX_TRANSPORT_MESSAGE_BYTES: usize = 1 << 20;
/// Largest text frame we process. Twilio's biggest message, `start`, is a few kB
/// with our parameters; larger frames are counted as `oversized` and skipped.
pub const MAX_TEXT_FRAME_BYTES: usize = 64 * 1024;
/// Caller audio queued for the handler: 50 frames = 1 s.
pub const INPUT_QUEUE_FRAMES: usize = 50;
/// Handler outputs queued before the writer (backpressure beyond this).
pub const OUTPUT_QUEUE: usize = 64;
/// Frames queued for the socket writer.
const WRITER_QUEUE: usize = 64;
/// A socket write that takes longer than this ends the stream.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Per stream and error kind, the first few occurrences are logged, then one in this many.
const LOG_EVERY: u64 = 1000;
const LOG_FIRST: u64 = 5;

/// WebSocket close codes we send.
mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL: u16 = 1002;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// What the upgrade request's `X-Twilio-Signature` said (logged; not decisive, see
/// [`crate::http`]'s stream handler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeSignature {
    /// Valid for one of the URL forms Twilio may sign.
    Valid,
    /// Present but not valid for any form.
    Invalid,
    /// No header.
    Absent,
}

/// What every stream needs.
pub struct StreamDeps {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Persona registry (a call takes a snapshot of its persona at `start`).
    pub personas: Arc<Personas>,
    /// Verifies the signed call context.
    pub signer: ContextSigner,
    /// Talks to the caller.
    pub handler: Arc<dyn CallHandler>,
    /// Ends calls on `Hangup` (absent without Twilio credentials).
    pub twilio: Option<TwilioClient>,
    /// Drain state (the deadline cancels calls).
    pub drain: Drain,
    /// Timings.
    pub limits: Limits,
    /// The per-pod call cap: a call holds a slot from `start` to its end.
    pub call_slots: CallSlots,
    /// Single use of stream contexts.
    pub claims: StreamClaims,
}

/// What the connection asks of its socket writer.
enum WriterCmd {
    /// The call started: write its handler's outputs from now on, in order.
    Call(CallOutputs),
    /// Close the socket (after the call's queued outputs).
    Close(u16, &'static str),
}

/// A call's output side, owned by the writer task: the one task between the handler
/// and Twilio's socket.
struct CallOutputs {
    rx: mpsc::Receiver<CallOutput>,
    stream_sid: String,
    call_sid: String,
    deps: Arc<StreamDeps>,
    /// Cancelled when the handler hangs up: the reader stops too.
    call_over: CancellationToken,
    warned_frame_size: bool,
}

impl CallOutputs {
    /// The next output; pending forever without a call.
    async fn next(call: &mut Option<CallOutputs>) -> Option<CallOutput> {
        match call {
            Some(c) => c.rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// The Twilio message for `out`, counting audio; `None` when nothing is sent.
    fn message(&mut self, out: &CallOutput) -> Option<Message> {
        if let CallOutput::Audio(audio) = out {
            if audio.len() % FRAME_BYTES != 0 && !self.warned_frame_size {
                self.warned_frame_size = true;
                tracing::warn!(
                    bytes = audio.len(),
                    "outbound audio is not a multiple of 20 ms frames; expect jitter"
                );
            }
            self.deps
                .metrics
                .frames
                .with_label_values(&["outbound"])
                .inc_by(audio.len().div_ceil(FRAME_BYTES) as u64);
        }
        Outbound::for_output(out, &self.stream_sid)
            .map(|m| Message::Text(Utf8Bytes::from(m.to_json())))
    }

    /// The handler hung up: Twilio's REST API ends the call (closing the stream
    /// ends it too, should that request fail), and the reader stops.
    fn hang_up(&self) {
        tracing::info!("handler hung up");
        if let Some(client) = self.deps.twilio.clone() {
            let sid = self.call_sid.clone();
            tokio::spawn(
                async move {
                    if let Err(err) = client.hangup(&sid).await {
                        tracing::warn!(error = %err, "REST hangup failed; closing the stream ends the call anyway");
                    }
                }
                .in_current_span(),
            );
        }
        self.call_over.cancel();
    }
}

/// Per-stream error accounting: count every error, log the first few of each kind.
struct Errors {
    metrics: Arc<Metrics>,
    seen: [u64; 10],
}

impl Errors {
    fn record(&mut self, kind: SocketErrorKind, detail: &dyn std::fmt::Display) {
        self.metrics.socket_error(Peer::Twilio, kind);
        let i = kind as usize;
        self.seen[i] += 1;
        let n = self.seen[i];
        if n <= LOG_FIRST || n.is_multiple_of(LOG_EVERY) {
            tracing::warn!(kind = kind.as_str(), occurrences = n, detail = %detail, "bad frame from twilio");
        }
    }
}

/// Decrements `voice_active_calls` when the call ends, however it ends.
struct ActiveCall(Arc<Metrics>);

impl ActiveCall {
    fn new(m: &Arc<Metrics>) -> Self {
        m.active_calls.inc();
        Self(Arc::clone(m))
    }
}

impl Drop for ActiveCall {
    fn drop(&mut self) {
        self.0.active_calls.dec();
    }
}

/// Serves one upgraded media stream to its end.
pub async fn serve(socket: WebSocket, deps: Arc<StreamDeps>, upgrade: UpgradeSignature) {
    let span = tracing::info_span!(
        "twilio_stream",
        call_sid = tracing::field::Empty,
        stream_sid = tracing::field::Empty,
        persona = tracing::field::Empty,
    );
    async move {
        tracing::debug!(upgrade_signature = ?upgrade, "media stream connected");
        let (sink, stream) = socket.split();
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE);
        let writer = tokio::spawn(write_loop(sink, writer_rx).in_current_span());
        let mut conn = Conn {
            stream,
            writer: writer_tx,
            errors: Errors {
                metrics: Arc::clone(&deps.metrics),
                seen: [0; 10],
            },
            deps: Arc::clone(&deps),
        };
        if let Some((ctx, slot)) = conn.handshake().await {
            conn.run_call(ctx, slot).await;
        }
        drop(conn);
        if tokio::time::timeout(Duration::from_secs(2), writer)
            .await
            .is_err()
        {
            tracing::debug!("writer did not finish in time");
        }
    }
    .instrument(span)
    .await
}

/// The one writer of a stream's socket: close frames from the connection, and once
/// the call starts, the handler's outputs (queued outputs go out before a close).
async fn write_loop(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<WriterCmd>) {
    let mut call: Option<CallOutputs> = None;
    loop {
        let (msg, last) = tokio::select! {
            biased;
            out = CallOutputs::next(&mut call) => match (out, call.as_mut()) {
                (Some(CallOutput::Hangup), Some(c)) => {
                    c.hang_up();
                    (close_frame(close_code::NORMAL, "hangup"), true)
                }
                (Some(out), Some(c)) => match c.message(&out) {
                    Some(msg) => (msg, false),
                    None => continue,
                },
                // The handler is done; what it sent is written.
                _ => {
                    call = None;
                    continue;
                }
            },
            cmd = rx.recv() => match cmd {
                None => break,
                Some(WriterCmd::Call(c)) => {
                    call = Some(c);
                    continue;
                }
                Some(WriterCmd::Close(code, reason)) => (close_frame(code, reason), true),
            },
        };
        match tokio::time::timeout(SEND_TIMEOUT, sink.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "twilio socket write failed");
                break;
            }
            Err(_) => {
                tracing::warn!("twilio socket write timed out");
                break;
            }
        }
        if last {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// A frame as the reader sees it, after transport-level checks.
enum Frame {
    Msg(Inbound),
    /// Counted and skipped.
    Skipped,
    /// The peer closed or the transport failed: the stream is over.
    Closed,
}

struct Conn {
    stream: SplitStream<WebSocket>,
    writer: mpsc::Sender<WriterCmd>,
    errors: Errors,
    deps: Arc<StreamDeps>,
}

impl Conn {
    async fn close(&self, code: u16, reason: &'static str) {
        let _ = self.writer.send(WriterCmd::Close(code, reason)).await;
    }

    /// Reads one frame; counts and skips what cannot be used.
    async fn next_frame(&mut self) -> Frame {
        let msg = match self.stream.next().await {
            None => return Frame::Closed,
            Some(Ok(m)) => m,
            Some(Err(err)) => {
                let oversized = err
                    .into_inner()
                    .downcast::<tokio_tungstenite::tungstenite::Error>()
                    .is_ok_and(|e| {
                        matches!(*e, tokio_tungstenite::tungstenite::Error::Capacity(_))
                    });
                if oversized {
                    self.errors.record(
                        SocketErrorKind::Oversized,
                        &"frame beyond the transport limit",
                    );
                    self.close(close_code::TOO_BIG, "frame too large").await;
                } else {
                    self.errors
                        .record(SocketErrorKind::Protocol, &"websocket transport error");
                }
                return Frame::Closed;
            }
        };
        match msg {
            Message::Text(text) => {
                if text.len() > MAX_TEXT_FRAME_BYTES {
                    self.errors.record(
                        SocketErrorKind::Oversized,
                        &format!("{} byte text frame", text.len()),
                    );
                    return Frame::Skipped;
                }
                match parse_inbound(text.as_str()) {
                    Ok(m) => Frame::Msg(m),
                    Err(err) => {
                        self.errors.record(err.kind(), &err);
                        Frame::Skipped
                    }
                }
            }
            Message::Binary(b) => {
                // Twilio speaks JSON text frames only.
                self.errors.record(
                    SocketErrorKind::Protocol,
                    &format!("{} byte binary frame", b.len()),
                );
                Frame::Skipped
            }
            Message::Close(_) => Frame::Closed,
            // Pongs are answered by the transport.
            Message::Ping(_) | Message::Pong(_) => Frame::Skipped,
        }
    }

    /// Waits for a valid `start`. `None` when the stream closed or was refused.
    async fn handshake(&mut self) -> Option<(CallContext, CallSlot)> {
        let deadline = tokio::time::Instant::now() + self.deps.limits.stream_start_timeout;
        let mut connected = false;
        loop {
            let frame = tokio::select! {
                f = self.next_frame() => f,
                _ = tokio::time::sleep_until(deadline) => {
                    self.errors.record(SocketErrorKind::Timeout, &"no valid start in time");
                    self.close(close_code::POLICY, "no valid start message within the deadline").await;
                    return None;
                }
            };
            match frame {
                Frame::Closed => {
                    tracing::info!("media stream closed before start");
                    return None;
                }
                Frame::Skipped => {}
                Frame::Msg(Inbound::Connected { .. }) if !connected => connected = true,
                Frame::Msg(Inbound::Start {
                    stream_sid, start, ..
                }) => {
                    return self.accept_start(stream_sid, start).await;
                }
                Frame::Msg(Inbound::Stop { .. }) => {
                    self.errors
                        .record(SocketErrorKind::OutOfOrder, &"stop before start");
                    return None;
                }
                Frame::Msg(other) => {
                    self.errors.record(
                        SocketErrorKind::OutOfOrder,
                        &format!("{} before start", other.name()),
                    );
                }
            }
        }
    }

    async fn accept_start(
        &mut self,
        stream_sid: String,
        start: StartMeta,
    ) -> Option<(CallContext, CallSlot)> {
        let span = tracing::Span::current();
        span.record("call_sid", start.call_sid.as_str());
        span.record("stream_sid", stream_sid.as_str());
        if stream_sid.is_empty() || start.call_sid.is_empty() {
            self.errors.record(
                SocketErrorKind::Protocol,
                &"start without streamSid or callSid",
            );
            self.close(close_code::PROTOCOL, "start without streamSid or callSid")
                .await;
            return None;
        }
        if !is_call_sid(&start.call_sid) {
            // It names the call in REST paths (hangup): only Twilio's form gets there.
            self.deps.metrics.refused(Refusal::BadCallSid);
            self.errors.record(
                SocketErrorKind::Protocol,
                &"callSid is not CA + 32 hex digits",
            );
            self.close(close_code::POLICY, "malformed callSid").await;
            return None;
        }
        let now = unix_now();
        let params =
            match self
                .deps
                .signer
                .verify_call(Purpose::Stream, &start.custom_parameters, now)
            {
                Ok(p) => p,
                Err(err) => {
                    self.errors.record(
                        SocketErrorKind::BadSignature,
                        &format!("call context rejected: {err}"),
                    );
                    self.close(
                        close_code::POLICY,
                        "call context signature missing, invalid or expired",
                    )
                    .await;
                    return None;
                }
            };
        if params
            .call_sid
            .as_ref()
            .is_some_and(|sid| *sid != start.call_sid)
        {
            // A context signed for another call, replayed.
            self.errors.record(
                SocketErrorKind::BadSignature,
                &"call context signed for another call",
            );
            self.close(close_code::POLICY, "call context belongs to another call")
                .await;
            return None;
        }
        if params.call_sid.is_none()
            && params.spec.direction == Direction::Outbound
            && let Some(placed) = self.deps.claims.placed_call_sid(&params.spec.call_id).await
            && placed != start.call_sid
        {
            // An outbound context presented by a stream of another call.
            self.errors.record(
                SocketErrorKind::BadSignature,
                &"outbound call context presented by another call",
            );
            self.close(close_code::POLICY, "call context belongs to another call")
                .await;
            return None;
        }
        // The signature verified, so it is present.
        let sig = start
            .custom_parameters
            .get(SIG_PARAM)
            .map_or("", String::as_str);
        if let Err(err) = self
            .deps
            .claims
            .claim(sig, &start.call_sid, params.expires_at, now)
            .await
        {
            self.deps.metrics.refused(Refusal::ContextReused);
            self.errors.record(SocketErrorKind::BadSignature, &err);
            self.close(close_code::POLICY, "call context already used")
                .await;
            return None;
        }
        if !start.media_format.is_mulaw_8k_mono() {
            self.errors.record(
                SocketErrorKind::BadPayload,
                &format!(
                    "unsupported media format {} {} Hz x{}",
                    start.media_format.encoding,
                    start.media_format.sample_rate,
                    start.media_format.channels
                ),
            );
            self.close(close_code::POLICY, "unsupported media format")
                .await;
            return None;
        }
        let Some(persona) = self.deps.personas.snapshot().get(&params.spec.persona) else {
            tracing::error!(persona = %params.spec.persona, "the call's persona is not loaded on this pod");
            self.deps
                .metrics
                .webhook_requests
                .with_label_values(&["stream", "persona_missing"])
                .inc();
            self.close(close_code::INTERNAL, "persona not available")
                .await;
            return None;
        };
        let Some(slot) = self.deps.call_slots.try_take() else {
            self.deps.metrics.refused(Refusal::CallLimit);
            tracing::warn!(
                max_calls = self.deps.call_slots.max(),
                "every call slot is taken; closing the stream"
            );
            self.close(close_code::TRY_AGAIN_LATER, "pod at call capacity")
                .await;
            return None;
        };
        span.record("persona", params.spec.persona.as_str());
        let ctx = CallContext {
            call_sid: start.call_sid,
            stream_sid,
            account_sid: start.account_sid,
            spec: params.spec,
            persona,
            caller_verstat: params.caller_verstat,
            started_at: Instant::now(),
        };
        Some((ctx, slot))
    }

    /// Runs the call: the reader here, the handler as a task, its outputs through
    /// the socket writer.
    async fn run_call(&mut self, ctx: CallContext, _slot: CallSlot) {
        let deps = Arc::clone(&self.deps);
        let _active = ActiveCall::new(&deps.metrics);
        let persona = ctx.spec.persona.clone();
        let call_sid = ctx.call_sid.clone();
        let stream_sid = ctx.stream_sid.clone();
        let started = ctx.started_at;
        tracing::info!(
            direction = ctx.spec.direction.as_str(),
            call_id = %ctx.spec.call_id,
            from = ctx.spec.from.as_deref().map(crate::phone::mask_number),
            to = ctx.spec.to.as_deref().map(crate::phone::mask_number),
            "call started"
        );

        let (in_tx, in_rx) = mpsc::channel(INPUT_QUEUE_FRAMES);
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_QUEUE);
        let cancel = deps.drain.call_token();
        let call_over = CancellationToken::new();
        let mut handler: Option<JoinHandle<CallEnd>> = Some(tokio::spawn(
            deps.handler
                .run(ctx, in_rx, out_tx, cancel.clone())
                .in_current_span(),
        ));
        let outputs = CallOutputs {
            rx: out_rx,
            stream_sid: stream_sid.clone(),
            call_sid: call_sid.clone(),
            deps: Arc::clone(&deps),
            call_over: call_over.clone(),
            warned_frame_size: false,
        };
        if self.writer.send(WriterCmd::Call(outputs)).await.is_err() {
            tracing::debug!("the socket writer is gone before the call started");
        }

        let mut in_tx = Some(in_tx);
        let mut end: Option<CallEnd> = None;
        let mut stopped = false;
        loop {
            let frame = tokio::select! {
                f = self.next_frame() => f,
                _ = call_over.cancelled() => break,
                res = async { handler.as_mut().expect("polled only while present").await }, if handler.is_some() => {
                    handler = None;
                    end = Some(res.unwrap_or_else(|e| CallEnd::Failed(format!("handler task: {e}"))));
                    break;
                }
            };
            let event = match frame {
                Frame::Closed => break,
                Frame::Skipped => continue,
                Frame::Msg(msg) => match msg.into_stream_event(&stream_sid) {
                    Ok(event) => event,
                    Err(unusable) => {
                        self.errors.record(unusable.kind, &unusable.detail);
                        continue;
                    }
                },
            };
            let input = match event {
                StreamEvent::Input(input) => {
                    if matches!(input, CallInput::Audio { .. }) {
                        deps.metrics.frames.with_label_values(&["inbound"]).inc();
                    }
                    input
                }
                StreamEvent::Stop => {
                    stopped = true;
                    if let Some(tx) = in_tx.take() {
                        // Stop is the last input; a full queue must not lose it.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), tx.send(CallInput::Stop))
                                .await;
                    }
                    break;
                }
            };
            if let Some(tx) = &in_tx {
                match tx.try_send(input) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(CallInput::Audio { .. })) => {
                        deps.metrics.inbound_frames_dropped.inc();
                    }
                    Err(mpsc::error::TrySendError::Full(other)) => {
                        // Digits and marks are rare and matter: wait briefly rather than drop.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), tx.send(other)).await;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        let hung_up = call_over.is_cancelled();
        if !stopped && !hung_up && end.is_none() {
            self.errors
                .record(SocketErrorKind::Closed, &"stream closed without stop");
        }
        // Closing the input tells the handler the stream is gone.
        drop(in_tx);

        let end = match (end, handler) {
            (Some(end), _) => end,
            (None, Some(mut task)) => {
                match tokio::time::timeout(deps.limits.handler_finish_grace, &mut task).await {
                    Ok(res) => {
                        res.unwrap_or_else(|e| CallEnd::Failed(format!("handler task: {e}")))
                    }
                    Err(_) => {
                        tracing::warn!(
                            "call handler did not finish after the stream ended; cancelling it"
                        );
                        cancel.cancel();
                        match tokio::time::timeout(Duration::from_secs(2), &mut task).await {
                            Ok(res) => res
                                .unwrap_or_else(|e| CallEnd::Failed(format!("handler task: {e}"))),
                            Err(_) => {
                                task.abort();
                                CallEnd::Failed("handler did not stop".into())
                            }
                        }
                    }
                }
            }
            (None, None) => CallEnd::Failed("handler lost".into()),
        };
        if !stopped {
            // Our side ends the stream; with nothing after <Connect>, Twilio ends the call.
            self.close(close_code::NORMAL, "call ended").await;
        }
        let seconds = started.elapsed().as_secs_f64();
        deps.metrics
            .call_duration
            .with_label_values(&[persona.as_str()])
            .observe(seconds);
        tracing::info!(end = end.label(), detail = ?end, seconds, "call ended");
    }
}
