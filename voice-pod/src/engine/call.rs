//! One call = one session task: the conversation loop.
//!
//! ```text
//!  Twilio input ──audio──> VAD ──edges──┐             ┌─> Clear (barge-in)
//!        │                              v             │
//!        └──audio──> STT ──events──> TurnTaker ──Likely/Confirmed/Resumed
//!                                                     │
//!                  history + prompt ──> LLM task ──chunks──> TTS (a context per chunk)
//!                                                     │             │
//!  Twilio output <── media + mark per chunk <── Playout <──audio────┘
//! ```
//!
//! Everything of a call happens in one `select!` loop that owns the state, so there
//! are no locks: Twilio input, STT events, TTS events, LLM chunks (from a task per
//! reply, through a bounded channel), and timers (playout pacing, turn deadlines,
//! idle, max duration). Slow providers never block the Twilio read loop: audio goes
//! to the STT with `try_send`; a full queue drops and counts.
//!
//! Replies are [`Reply`] values: an LLM reply to a caller turn, or a static phrase
//! (greeting, fallback, idle prompt, goodbye) played from the pod's cache when it can.
//! A reply started on [`TurnEvent::Likely`] is *held* (its audio waits in the
//! playout) until the turn is confirmed with the same words, and discarded otherwise.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use callmeback_api::PersonaSpec;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::chunker::{Chunker, ChunkerConfig};
use super::greeting_cache::{GreetingCache, GreetingKey, Phrase};
use super::journal::{CallJournal, Journal, TurnTimes};
use super::judge::LlmJudge;
use super::playout::{Playout, PlayoutConfig, PlayoutOut};
use super::prompt::{self, History, RelationshipContext, Role as PromptRole};
use super::turn_taking::{SpeechEvent, TurnConfig, TurnEvent, TurnJudge, TurnTaker, same_words};
use super::vad::{Vad, VadConfig, VadEdge};
use crate::metrics::{Metrics, Peer, SocketErrorKind, Stage};
use crate::providers::{
    ChatDelta, ChatMessage, ChatModel, ChatRequest, LlmError, Providers, Role, SttError, SttEvent,
    SttSession, SttSessionConfig, TtsControl, TtsError, TtsEvent, TtsSession, TtsSessionConfig,
    Usage,
};
use crate::session::{CallContext, CallEnd, CallInput, CallOutput};
use crate::store::records::TurnLatency;

/// Engine knobs that are not persona settings.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Reply pacing.
    pub playout: PlayoutConfig,
    /// Token chunking.
    pub chunker: ChunkerConfig,
    /// Caller voice-activity detection.
    pub vad: VadConfig,
    /// TTS contexts a call keeps generating at once (the provider allows 5 per
    /// socket; cancelled ones close at once, so 3 leaves room).
    pub max_tts_in_flight: usize,
    /// Caller audio buffered while the STT socket opens (20 ms frames).
    pub pre_connect_frames: usize,
    /// After a barge-in that produced no words (a cough, a door), the persona picks
    /// up again after this long.
    pub wordless_barge_in_resume: Duration,
    /// Upper bound on saying goodbye before the hangup.
    pub goodbye_timeout: Duration,
    /// Reconnect attempts for a provider session that gave up.
    pub session_reconnects: u32,
    /// Replies queued from the LLM task before it waits.
    pub llm_chunk_queue: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            playout: PlayoutConfig::default(),
            chunker: ChunkerConfig::default(),
            vad: VadConfig::default(),
            max_tts_in_flight: 3,
            pre_connect_frames: 150,
            wordless_barge_in_resume: Duration::from_millis(2000),
            goodbye_timeout: Duration::from_secs(15),
            session_reconnects: 5,
            llm_chunk_queue: 32,
        }
    }
}

/// Shared by every call of the pod.
pub(crate) struct Shared {
    pub(crate) providers: Providers,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) phrases: Arc<GreetingCache>,
    pub(crate) settings: EngineSettings,
    /// Where calls are recorded; `None` without persistence.
    pub(crate) journal: Option<Arc<dyn Journal>>,
    /// This pod's name, for the call records.
    pub(crate) pod_name: Option<Arc<str>>,
}

/// Messages into a call's loop from its helper tasks.
enum Internal {
    SttReady(Result<SttSession, SttError>),
    TtsReady(Result<TtsSession, TtsError>),
    Llm {
        reply: u64,
        out: LlmOut,
    },
    Judge {
        text: String,
        finished: Option<bool>,
    },
}

/// What a reply's LLM task reports.
enum LlmOut {
    FirstToken(Instant),
    Chunk(String),
    /// Token accounting of the completion (billed even when the reply was cut).
    Usage(Usage),
    Done,
    Failed(LlmError),
}

/// Where a reply's words come from.
#[derive(Clone, Debug, PartialEq)]
enum Source {
    /// An answer to the caller's words.
    Llm { user_text: String },
    /// A static phrase.
    Phrase(Phrase),
}

/// Per-reply timestamps for `voice_turn_latency_seconds`.
#[derive(Debug, Default)]
struct Timing {
    /// The caller's last voiced frame before the turn (end of speech, as the pod saw it).
    speech_end: Option<Instant>,
    confirmed: Option<Instant>,
    llm_start: Option<Instant>,
    first_token: Option<Instant>,
    first_tts_text: Option<Instant>,
    first_tts_audio: Option<Instant>,
    first_frame: Option<Instant>,
}

/// A reply's latency by stage, from its [`Timing`]: what `voice_turn_latency_seconds`
/// observes, the log line says and the transcript keeps.
#[derive(Clone, Copy, Debug, Default)]
struct Stages {
    /// End of speech -> first reply frame written.
    total: Option<Duration>,
    /// End of speech -> end-of-turn decision.
    stt: Option<Duration>,
    /// LLM request -> first token.
    llm: Option<Duration>,
    /// First text to TTS -> first audio.
    tts: Option<Duration>,
}

impl Timing {
    fn stages(&self) -> Stages {
        let between = |from: Option<Instant>, to: Option<Instant>| {
            from.zip(to).map(|(a, b)| b.saturating_duration_since(a))
        };
        Stages {
            total: between(self.speech_end, self.first_frame),
            stt: between(self.speech_end, self.confirmed),
            llm: between(self.llm_start, self.first_token),
            tts: between(self.first_tts_text, self.first_tts_audio),
        }
    }
}

/// One thing the persona says.
struct Reply {
    id: u64,
    source: Source,
    /// Preemptive: generated before the turn was confirmed, not audible yet.
    held: bool,
    cancel: CancellationToken,
    /// No more chunks will come.
    llm_done: bool,
    got_content: bool,
    /// Chunk texts waiting for a TTS slot.
    queued: VecDeque<String>,
    /// Playout chunk ids.
    chunks: Vec<u64>,
    /// Open TTS contexts.
    contexts: Vec<String>,
    next_context: u32,
    /// Everything this reply says.
    text: String,
    /// Whether `text` is in the history yet.
    in_history: bool,
    /// Seconds of caller audio sent to the STT when the reply started: caller speech
    /// stamped earlier belongs to the turn this reply answers, not to an interruption.
    audio_start: f64,
    timing: Timing,
    span: Span,
}

impl Reply {
    fn finished_generating(&self) -> bool {
        self.llm_done && self.queued.is_empty() && self.contexts.is_empty()
    }
}

/// How a barge-in was detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BargeTrigger {
    /// Voice activity (the pod's or the STT's), no words yet.
    Voice,
    /// Interim or final words.
    Words,
}

/// The state of one call.
pub(crate) struct Call {
    shared: Arc<Shared>,
    ctx: CallContext,
    persona: Arc<PersonaSpec>,
    output: mpsc::Sender<CallOutput>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: mpsc::Receiver<Internal>,
    /// Cancels every helper task of the call.
    call_cancel: CancellationToken,
    span: Span,

    stt_audio: Option<mpsc::Sender<Bytes>>,
    stt_events: Option<mpsc::Receiver<SttEvent>>,
    stt_control: Option<crate::providers::SttControl>,
    stt_connecting: bool,
    stt_failures: u32,
    pre_audio: VecDeque<Bytes>,
    /// Seconds of caller audio given to the STT (its timeline).
    audio_clock: f64,

    tts: Option<TtsControl>,
    tts_events: Option<mpsc::Receiver<TtsEvent>>,
    tts_connecting: bool,
    tts_failures: u32,

    turn: TurnTaker,
    judge: Option<Arc<dyn TurnJudge>>,
    vad: Vad,
    playout: Playout,
    history: History,
    system: String,
    /// Memory notes as quoted data (the first user message), never in `system`.
    memory: Option<String>,

    active: Option<Reply>,
    spec: Option<Reply>,
    next_reply: u64,
    /// TTS context -> (reply id, playout chunk id).
    contexts: HashMap<String, (u64, u64)>,
    /// Phrases being synthesized live, captured for the cache.
    captures: HashMap<String, (GreetingKey, Vec<u8>)>,
    in_flight: usize,

    /// Idle countdown starts here (the caller's last activity or the persona's last words).
    idle_from: Instant,
    idle_prompted: bool,
    call_deadline: Instant,
    /// Saying goodbye: the hang-up reason and its deadline.
    ending: Option<(&'static str, Instant)>,
    drain_cancelled: bool,
    finished: Option<CallEnd>,
    dtmf: String,
    dtmf_deadline: Option<Instant>,
    resume_deadline: Option<Instant>,
    late_reported: u64,
    turns: u64,
    /// What this call records (a no-op handle without persistence).
    journal: CallJournal,
}

impl Call {
    pub(crate) fn new(
        shared: Arc<Shared>,
        ctx: CallContext,
        output: mpsc::Sender<CallOutput>,
        journal: CallJournal,
        relationship: Option<&RelationshipContext>,
    ) -> Self {
        let persona = ctx.persona.clone();
        let now = Instant::now();
        let (internal_tx, internal_rx) = mpsc::channel(shared.settings.llm_chunk_queue.max(8));
        let span = info_span!("call", call_sid = %ctx.call_sid, persona = %ctx.persona_name);
        let turn = TurnTaker::new(TurnConfig::from_persona(&persona.turn_taking, &persona.stt));
        let judge: Option<Arc<dyn TurnJudge>> = persona.turn_taking.llm_judge.then(|| {
            Arc::new(LlmJudge::new(
                shared.providers.llm.clone(),
                persona.llm.model.clone(),
            )) as Arc<dyn TurnJudge>
        });
        let system = prompt::system_prompt(&persona, ctx.pretext.as_deref(), relationship);
        let memory = prompt::memory_message(relationship);
        // The max duration counts from the stream's start, which may predate this task.
        let elapsed = ctx.started_at.elapsed();
        let max = Duration::from_secs(persona.max_call_duration_seconds.into());
        Self {
            vad: Vad::new(shared.settings.vad.clone()),
            playout: Playout::new(shared.settings.playout.clone(), "c"),
            history: History::new(persona.llm.max_history_turns),
            call_deadline: now + max.saturating_sub(elapsed),
            shared,
            persona,
            output,
            internal_tx,
            internal_rx,
            call_cancel: CancellationToken::new(),
            span,
            stt_audio: None,
            stt_events: None,
            stt_control: None,
            stt_connecting: false,
            stt_failures: 0,
            pre_audio: VecDeque::new(),
            audio_clock: 0.0,
            tts: None,
            tts_events: None,
            tts_connecting: false,
            tts_failures: 0,
            turn,
            judge,
            system,
            memory,
            active: None,
            spec: None,
            next_reply: 0,
            contexts: HashMap::new(),
            captures: HashMap::new(),
            in_flight: 0,
            idle_from: now,
            idle_prompted: false,
            ending: None,
            drain_cancelled: false,
            finished: None,
            dtmf: String::new(),
            dtmf_deadline: None,
            resume_deadline: None,
            late_reported: 0,
            turns: 0,
            journal,
            ctx,
        }
    }

    /// Runs the call to its end.
    pub(crate) async fn run(
        mut self,
        mut input: mpsc::Receiver<CallInput>,
        cancel: CancellationToken,
    ) -> CallEnd {
        let span = self.span.clone();
        async move {
            info!("call started");
            self.connect_stt(Duration::ZERO);
            self.connect_tts(Duration::ZERO);
            self.say_phrase(Phrase::Greeting).await;
            let mut sleep: std::pin::Pin<Box<Sleep>> = Box::pin(sleep_until(far_future()));
            let end = loop {
                let now = Instant::now();
                if !self.pump(now).await {
                    break CallEnd::StreamStopped;
                }
                if let Some(end) = self.finished.take() {
                    break end;
                }
                let wake = self.next_wake(now);
                if sleep.deadline() != wake {
                    sleep.as_mut().reset(wake);
                }
                tokio::select! {
                    _ = cancel.cancelled(), if !self.drain_cancelled => {
                        self.drain_cancelled = true;
                        self.begin_ending("drain", Instant::now()).await;
                    }
                    inp = input.recv() => match inp {
                        None | Some(CallInput::Stop) => break CallEnd::StreamStopped,
                        Some(inp) => self.on_input(inp).await,
                    },
                    ev = recv_opt(&mut self.stt_events) => self.on_stt(ev).await,
                    ev = recv_opt(&mut self.tts_events) => self.on_tts(ev).await,
                    Some(msg) = self.internal_rx.recv() => self.on_internal(msg).await,
                    _ = sleep.as_mut() => self.on_timers(Instant::now()).await,
                }
            };
            self.journal_unfinished_reply(Instant::now());
            self.shutdown().await;
            self.journal.finish(
                &end,
                self.audio_clock,
                self.ctx.started_at.elapsed(),
                &self.ctx.persona_name,
                &self.persona,
                &self.shared.providers.llm,
            );
            info!(end = end.label(), turns = self.turns, "call ended");
            end
        }
        .instrument(span)
        .await
    }

    // ------------------------------------------------------------------ plumbing

    fn connect_stt(&mut self, delay: Duration) {
        if self.stt_connecting {
            return;
        }
        self.stt_connecting = true;
        let stt = self.shared.providers.stt.clone();
        let cfg = SttSessionConfig::from_spec(&self.persona.stt, &self.ctx.call_sid);
        let cancel = self.call_cancel.child_token();
        let tx = self.internal_tx.clone();
        tokio::spawn(
            async move {
                tokio::time::sleep(delay).await;
                let res = stt.connect(cfg, cancel).await;
                let _ = tx.send(Internal::SttReady(res)).await;
            }
            .instrument(info_span!("stt_connect", call_sid = %self.ctx.call_sid)),
        );
    }

    fn connect_tts(&mut self, delay: Duration) {
        if self.tts_connecting {
            return;
        }
        self.tts_connecting = true;
        let tts = self.shared.providers.tts.clone();
        let cfg = TtsSessionConfig::from_spec(&self.persona.voice, &self.ctx.call_sid);
        let cancel = self.call_cancel.child_token();
        let tx = self.internal_tx.clone();
        tokio::spawn(
            async move {
                tokio::time::sleep(delay).await;
                let res = tts.connect(cfg, cancel).await;
                let _ = tx.send(Internal::TtsReady(res)).await;
            }
            .instrument(info_span!("tts_connect", call_sid = %self.ctx.call_sid)),
        );
    }

    fn reconnect_delay(failures: u32) -> Duration {
        Duration::from_millis(200 * u64::from(failures.min(10)))
    }

    /// Sends what the playout allows; `false` once Twilio's side is gone.
    async fn pump(&mut self, now: Instant) -> bool {
        self.playout.expire_marks(now);
        let outs = self.playout.poll(now);
        let mut sent_audio = false;
        for o in outs {
            let msg = match o {
                PlayoutOut::Audio(a) => {
                    sent_audio = true;
                    CallOutput::Audio(Bytes::from(a))
                }
                PlayoutOut::Mark(m) => CallOutput::Mark(m),
            };
            if self.output.send(msg).await.is_err() {
                return false;
            }
        }
        if sent_audio {
            self.on_first_frame(now);
        }
        let late = self.playout.late_frames();
        if late > self.late_reported {
            self.shared
                .metrics
                .late_frames
                .inc_by(late - self.late_reported);
            self.late_reported = late;
        }
        self.check_active_done(now).await;
        if self.active.is_some() || self.playout.is_speaking(now) {
            self.idle_from = now;
        }
        true
    }

    fn on_first_frame(&mut self, now: Instant) {
        let Some(r) = self.active.as_mut() else {
            return;
        };
        if r.held || r.timing.first_frame.is_some() {
            return;
        }
        r.timing.first_frame = Some(now);
        let persona = self.ctx.persona_name.as_str();
        let m = &self.shared.metrics;
        if let Source::Llm { .. } = r.source {
            let st = r.timing.stages();
            for (stage, d) in [
                (Stage::Total, st.total),
                (Stage::Stt, st.stt),
                (Stage::Llm, st.llm),
                (Stage::Tts, st.tts),
            ] {
                if let Some(d) = d {
                    m.observe_turn(persona, stage, d.as_secs_f64());
                }
            }
            let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
            let _s = r.span.enter();
            info!(
                total_ms = ms(st.total),
                stt_ms = ms(st.stt),
                llm_ms = ms(st.llm),
                tts_ms = ms(st.tts),
                "first reply audio"
            );
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let busy = self.active.is_some() || self.playout.is_speaking(now);
        let idle = Duration::from_secs(self.persona.idle_timeout_seconds.into());
        [
            self.playout.next_wake(now),
            self.playout.next_mark_expiry(),
            self.turn.next_deadline(),
            (!busy && self.ending.is_none()).then_some(self.idle_from + idle),
            self.ending.is_none().then_some(self.call_deadline),
            self.ending.map(|(_, d)| d),
            self.dtmf_deadline,
            self.resume_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(far_future)
    }

    // ------------------------------------------------------------------ inputs

    async fn on_input(&mut self, inp: CallInput) {
        let now = Instant::now();
        match inp {
            CallInput::Audio { payload, .. } => {
                let mut edge = None;
                for frame in payload.chunks(crate::session::FRAME_BYTES) {
                    if let Some(e) = self.vad.frame(frame, now) {
                        edge = Some(e);
                    }
                }
                self.audio_clock += payload.len() as f64 / 8000.0;
                self.forward_audio(payload);
                match edge {
                    Some(VadEdge::Speech) => {
                        self.idle_from = now;
                        if self.persona.turn_taking.barge_in_min_words <= 1 {
                            self.barge_in(now, BargeTrigger::Voice).await;
                        }
                        let evs = self
                            .turn
                            .on_speech(SpeechEvent::Voice { active: true }, now);
                        self.on_turn_events(evs, now).await;
                    }
                    Some(VadEdge::Silence) => {
                        let evs = self
                            .turn
                            .on_speech(SpeechEvent::Voice { active: false }, now);
                        self.on_turn_events(evs, now).await;
                    }
                    None => {}
                }
            }
            CallInput::Dtmf(d) => {
                // Keys can be a PIN or a card number: never logged, only counted.
                debug!("dtmf key pressed");
                self.idle_from = now;
                if !self.dtmf.is_empty() {
                    self.dtmf.push(' ');
                }
                self.dtmf.push(d);
                // `#` ends an entry at once; otherwise wait for more digits.
                self.dtmf_deadline = Some(if d == '#' {
                    now
                } else {
                    now + Duration::from_millis(1200)
                });
            }
            CallInput::Mark(name) => {
                self.playout.on_mark(&name);
            }
            CallInput::Stop => {}
        }
    }

    fn forward_audio(&mut self, payload: Bytes) {
        match &self.stt_audio {
            Some(tx) => match tx.try_send(payload) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The STT is far behind; blocking here would stall the whole call.
                    self.shared.metrics.inbound_frames_dropped.inc();
                }
                Err(mpsc::error::TrySendError::Closed(p)) => {
                    self.stt_audio = None;
                    self.buffer_audio(p);
                }
            },
            None => self.buffer_audio(payload),
        }
    }

    fn buffer_audio(&mut self, payload: Bytes) {
        if self.pre_audio.len() >= self.shared.settings.pre_connect_frames {
            self.pre_audio.pop_front();
            self.shared.metrics.inbound_frames_dropped.inc();
        }
        self.pre_audio.push_back(payload);
    }

    async fn on_stt(&mut self, ev: Option<SttEvent>) {
        let now = Instant::now();
        let Some(ev) = ev else {
            warn!("speech-to-text session ended; reconnecting");
            self.stt_lost();
            return;
        };
        let min_words = self.persona.turn_taking.barge_in_min_words as usize;
        let speech = match ev {
            SttEvent::Interim { text, words, .. } => {
                self.idle_from = now;
                self.words_barge_in(&words, min_words, now).await;
                SpeechEvent::Interim { text }
            }
            SttEvent::Final {
                text,
                words,
                speech_final,
                ..
            } => {
                if !text.is_empty() {
                    self.idle_from = now;
                    self.words_barge_in(&words, min_words, now).await;
                }
                SpeechEvent::Final { text, speech_final }
            }
            SttEvent::UtteranceEnd { .. } => SpeechEvent::UtteranceEnd,
            SttEvent::SpeechStarted { timestamp } => {
                let fresh = self
                    .active
                    .as_ref()
                    .is_some_and(|r| timestamp + 0.05 >= r.audio_start);
                if min_words <= 1 && fresh {
                    self.barge_in(now, BargeTrigger::Voice).await;
                }
                SpeechEvent::SpeechStarted
            }
            SttEvent::Reconnected { replayed_ms } => {
                info!(replayed_ms, "speech-to-text reconnected");
                return;
            }
            SttEvent::Error(e) => {
                warn!(error = %e, "speech-to-text session gave up; reconnecting");
                self.stt_lost();
                return;
            }
        };
        let evs = self.turn.on_speech(speech, now);
        self.on_turn_events(evs, now).await;
    }

    async fn words_barge_in(&mut self, words: &[crate::providers::Word], min: usize, now: Instant) {
        let Some(start) = self.active.as_ref().map(|r| r.audio_start) else {
            return;
        };
        let fresh = words.iter().filter(|w| w.end > start + 0.02).count();
        if fresh >= min.max(1) {
            self.barge_in(now, BargeTrigger::Words).await;
        }
    }

    fn stt_lost(&mut self) {
        self.stt_audio = None;
        self.stt_events = None;
        if let Some(c) = self.stt_control.take() {
            c.abort();
        }
        self.shared
            .metrics
            .socket_error(Peer::Deepgram, SocketErrorKind::Closed);
        self.stt_failures += 1;
        if self.stt_failures <= self.shared.settings.session_reconnects {
            self.shared
                .metrics
                .provider_reconnects
                .with_label_values(&[Peer::Deepgram.as_str()])
                .inc();
            self.connect_stt(Self::reconnect_delay(self.stt_failures));
        }
    }

    async fn on_tts(&mut self, ev: Option<TtsEvent>) {
        let now = Instant::now();
        match ev {
            Some(TtsEvent::Audio { context_id, mulaw }) => {
                let Some(&(reply, chunk)) = self.contexts.get(&context_id) else {
                    return;
                };
                self.playout.push_audio(chunk, &mulaw);
                if let Some((_, buf)) = self.captures.get_mut(&context_id) {
                    buf.extend_from_slice(&mulaw);
                }
                if let Some(r) = self.reply_mut(reply)
                    && r.timing.first_tts_audio.is_none()
                {
                    r.timing.first_tts_audio = Some(now);
                }
            }
            Some(TtsEvent::ContextDone { context_id }) => {
                self.context_finished(&context_id);
                if let Some((key, audio)) = self.captures.remove(&context_id)
                    && !audio.is_empty()
                {
                    self.shared.phrases.put(&key, audio);
                }
                self.feed_tts().await;
            }
            Some(TtsEvent::Reconnected { resent }) => {
                info!(resent, "text-to-speech reconnected");
            }
            Some(TtsEvent::Error(e)) => {
                warn!(error = %e, "text-to-speech session gave up; reconnecting");
                self.tts_lost();
            }
            None => {
                warn!("text-to-speech session ended; reconnecting");
                self.tts_lost();
            }
        }
    }

    fn context_finished(&mut self, context_id: &str) {
        if let Some((reply, chunk)) = self.contexts.remove(context_id) {
            self.playout.end_chunk(chunk);
            self.in_flight = self.in_flight.saturating_sub(1);
            if let Some(r) = self.reply_mut(reply) {
                r.contexts.retain(|c| c != context_id);
            }
        }
    }

    fn tts_lost(&mut self) {
        self.tts = None;
        self.tts_events = None;
        // Whatever audio arrived for open contexts plays; the rest of their text is gone
        // with the session (the client already resent it on its own reconnects).
        let open: Vec<String> = self.contexts.keys().cloned().collect();
        for c in open {
            self.captures.remove(&c);
            self.context_finished(&c);
        }
        self.shared
            .metrics
            .socket_error(Peer::Elevenlabs, SocketErrorKind::Closed);
        self.tts_failures += 1;
        if self.tts_failures <= self.shared.settings.session_reconnects {
            self.shared
                .metrics
                .provider_reconnects
                .with_label_values(&[Peer::Elevenlabs.as_str()])
                .inc();
            self.connect_tts(Self::reconnect_delay(self.tts_failures));
        } else {
            // No voice left: end replies that wait for one, so the call does not hang.
            for r in [self.active.as_mut(), self.spec.as_mut()]
                .into_iter()
                .flatten()
            {
                r.queued.clear();
            }
        }
    }

    async fn on_internal(&mut self, msg: Internal) {
        let now = Instant::now();
        match msg {
            Internal::SttReady(Ok(session)) => {
                self.stt_connecting = false;
                self.stt_failures = 0;
                let SttSession {
                    audio,
                    events,
                    control,
                } = session;
                for p in self.pre_audio.drain(..) {
                    if audio.try_send(p).is_err() {
                        self.shared.metrics.inbound_frames_dropped.inc();
                    }
                }
                self.stt_audio = Some(audio);
                self.stt_events = Some(events);
                self.stt_control = Some(control);
                debug!("speech-to-text connected");
            }
            Internal::SttReady(Err(e)) => {
                self.stt_connecting = false;
                warn!(error = %e, "speech-to-text connect failed");
                self.stt_lost();
            }
            Internal::TtsReady(Ok(session)) => {
                self.tts_connecting = false;
                self.tts_failures = 0;
                self.tts = Some(session.control);
                self.tts_events = Some(session.events);
                debug!("text-to-speech connected");
                self.feed_tts().await;
            }
            Internal::TtsReady(Err(e)) => {
                self.tts_connecting = false;
                warn!(error = %e, "text-to-speech connect failed");
                self.tts_lost();
            }
            Internal::Llm { reply, out } => self.on_llm(reply, out, now).await,
            Internal::Judge { text, finished } => {
                let evs = self.turn.on_judgement(&text, finished, now);
                self.on_turn_events(evs, now).await;
            }
        }
    }

    async fn on_timers(&mut self, now: Instant) {
        let evs = self.turn.on_deadline(now);
        self.on_turn_events(evs, now).await;
        self.playout.expire_marks(now);
        if let Some((_, deadline)) = self.ending
            && now >= deadline
        {
            self.hang_up(now).await;
            return;
        }
        if self.ending.is_none() && now >= self.call_deadline {
            info!("maximum call duration reached");
            self.begin_ending("max_duration", now).await;
            return;
        }
        if self.dtmf_deadline.is_some_and(|d| now >= d) {
            self.dtmf_deadline = None;
            if !self.turn.has_words() && !self.dtmf.is_empty() {
                self.user_turn(String::new(), now).await;
            }
        }
        if self.resume_deadline.is_some_and(|d| now >= d) {
            self.resume_deadline = None;
            if !self.turn.has_words() && self.active.is_none() && self.ending.is_none() {
                // Interrupted by a sound, not words: pick the conversation up again.
                self.start_answer("[the caller made a sound but said nothing]".into(), now)
                    .await;
            }
        }
        let busy = self.active.is_some() || self.playout.is_speaking(now);
        let idle = Duration::from_secs(self.persona.idle_timeout_seconds.into());
        if !busy && self.ending.is_none() && now >= self.idle_from + idle {
            if self.idle_prompted {
                info!("caller idle after the prompt; saying goodbye");
                self.begin_ending("idle", now).await;
            } else {
                info!("caller idle; prompting");
                self.idle_prompted = true;
                self.idle_from = now;
                self.say_phrase(Phrase::IdlePrompt).await;
            }
        }
    }

    // ------------------------------------------------------------------ turns

    async fn on_turn_events(&mut self, evs: Vec<TurnEvent>, now: Instant) {
        for ev in evs {
            match ev {
                TurnEvent::Likely(text) => {
                    if self.persona.turn_taking.preemptive_generation && self.ending.is_none() {
                        self.discard_spec().await;
                        debug!(
                            words = text.split_whitespace().count(),
                            "turn likely: generating ahead"
                        );
                        let r = self.start_llm_reply(text, true, now);
                        self.spec = Some(r);
                    }
                }
                TurnEvent::Resumed => {
                    debug!("caller went on: discarding the preemptive reply");
                    self.discard_spec().await;
                }
                TurnEvent::Confirmed(text) => self.user_turn(text, now).await,
            }
        }
        if let Some(text) = self.turn.take_judge_request()
            && let Some(judge) = self.judge.clone()
        {
            let tx = self.internal_tx.clone();
            let deadline =
                Duration::from_millis(self.persona.turn_taking.llm_judge_deadline_ms.into());
            tokio::spawn(
                async move {
                    let finished = tokio::time::timeout(deadline, judge.judge(&text))
                        .await
                        .ok()
                        .flatten();
                    let _ = tx.send(Internal::Judge { text, finished }).await;
                }
                .instrument(info_span!("judge", call_sid = %self.ctx.call_sid)),
            );
        }
    }

    /// The caller finished a turn (words, key presses, or both).
    async fn user_turn(&mut self, text: String, now: Instant) {
        self.turns += 1;
        self.idle_from = now;
        self.idle_prompted = false;
        self.resume_deadline = None;
        let mut user_text = String::new();
        if !self.dtmf.is_empty() {
            user_text = format!("[caller pressed {}]", std::mem::take(&mut self.dtmf));
            self.dtmf_deadline = None;
        }
        if !text.is_empty() {
            if !user_text.is_empty() {
                user_text.push(' ');
            }
            user_text.push_str(&text);
        }
        if user_text.is_empty() || self.ending.is_some() {
            return;
        }
        info!(turn = self.turns, chars = user_text.len(), "caller turn");
        // A reply still talking when a new turn is confirmed (barge-in off) ends here.
        if self.active.is_some() {
            self.interrupt_active(now, false).await;
        }
        let speech_end = self.vad.last_voiced();
        self.journal.caller_turn(&user_text, speech_end);
        let matching = self.spec.as_ref().is_some_and(|s| match &s.source {
            Source::Llm { user_text: t } => same_words(t, &user_text),
            Source::Phrase(_) => false,
        });
        if matching && let Some(mut r) = self.spec.take() {
            // The preemptive reply answered exactly these words: let it speak.
            self.history.push_user(&user_text);
            r.held = false;
            r.timing.speech_end = speech_end;
            r.timing.confirmed = Some(now);
            if r.llm_done && !r.in_history && !r.text.is_empty() {
                self.history.push_assistant(&r.text);
                r.in_history = true;
            }
            self.playout.release_held();
            {
                let _s = r.span.enter();
                debug!("preemptive reply confirmed");
            }
            self.active = Some(r);
            self.feed_tts().await;
            return;
        }
        self.discard_spec().await;
        self.history.push_user(&user_text);
        let mut r = self.start_llm_reply(user_text, false, now);
        r.timing.speech_end = speech_end;
        r.timing.confirmed = Some(now);
        self.active = Some(r);
    }

    /// Answers something that is not a confirmed caller turn (resuming after a sound).
    async fn start_answer(&mut self, note: String, now: Instant) {
        self.history.push_user(&note);
        let r = self.start_llm_reply(note, false, now);
        self.active = Some(r);
        self.feed_tts().await;
    }

    fn new_reply(&mut self, source: Source, held: bool) -> Reply {
        let id = self.next_reply;
        self.next_reply += 1;
        let span = info_span!(
            parent: &self.span,
            "turn",
            call_sid = %self.ctx.call_sid,
            reply = id,
            preemptive = held
        );
        Reply {
            id,
            source,
            held,
            cancel: self.call_cancel.child_token(),
            llm_done: false,
            got_content: false,
            queued: VecDeque::new(),
            chunks: Vec::new(),
            contexts: Vec::new(),
            next_context: 0,
            text: String::new(),
            in_history: false,
            audio_start: self.audio_clock,
            timing: Timing::default(),
            span,
        }
    }

    /// Starts an LLM reply to `user_text`. A held reply's request includes the user
    /// text on top of the history (it is not in the history until confirmed).
    fn start_llm_reply(&mut self, user_text: String, held: bool, now: Instant) -> Reply {
        let mut r = self.new_reply(
            Source::Llm {
                user_text: user_text.clone(),
            },
            held,
        );
        let mut messages: Vec<ChatMessage> = self
            .history
            .messages(&self.system, self.memory.as_deref())
            .into_iter()
            .map(|m| ChatMessage::new(role(m.role), m.content))
            .collect();
        if held {
            match messages.last_mut() {
                // History merges consecutive user messages; mirror that here.
                Some(last) if last.role == Role::User => {
                    last.content.push(' ');
                    last.content.push_str(&user_text);
                }
                _ => messages.push(ChatMessage::new(Role::User, user_text)),
            }
        }
        let req = ChatRequest::from_spec(&self.persona.llm, messages);
        r.timing.llm_start = Some(now);
        let llm = self.shared.providers.llm.clone();
        let tx = self.internal_tx.clone();
        let cancel = r.cancel.clone();
        let chunker = self.shared.settings.chunker.clone();
        let id = r.id;
        let span =
            info_span!(parent: &r.span, "llm", call_sid = %self.ctx.call_sid, model = %req.model);
        tokio::spawn(llm_task(llm, req, cancel, chunker, tx, id).instrument(span));
        r
    }

    async fn on_llm(&mut self, reply: u64, out: LlmOut, now: Instant) {
        if let LlmOut::Usage(u) = &out {
            // Billed whatever became of the reply.
            self.journal
                .llm_tokens(u.prompt_tokens, u.completion_tokens);
            return;
        }
        let Some(r) = self.reply_mut(reply) else {
            return; // a discarded or interrupted reply
        };
        match out {
            LlmOut::FirstToken(at) => {
                r.timing.first_token = Some(at);
            }
            LlmOut::Usage(_) => {}
            LlmOut::Chunk(text) => {
                r.got_content = true;
                if !r.text.is_empty() {
                    r.text.push(' ');
                }
                r.text.push_str(&text);
                r.queued.push_back(text);
                self.feed_tts().await;
            }
            LlmOut::Done => {
                r.llm_done = true;
                if !r.got_content {
                    let _s = r.span.enter();
                    warn!("the model returned no words");
                    drop(_s);
                    self.add_fallback(reply).await;
                } else if !r.held && !r.in_history {
                    let text = r.text.clone();
                    r.in_history = true;
                    self.history.push_assistant(&text);
                }
                let _ = now;
            }
            LlmOut::Failed(e) => {
                {
                    let _s = r.span.enter();
                    warn!(error = %e, kind = e.metric_kind().as_str(), "the model failed");
                }
                r.llm_done = true;
                if r.got_content {
                    // Keep what was said; the sentence in flight ends there.
                    if !r.held && !r.in_history {
                        let text = r.text.clone();
                        r.in_history = true;
                        self.history.push_assistant(&text);
                    }
                } else {
                    self.add_fallback(reply).await;
                }
            }
        }
    }

    /// The LLM failed before saying anything: the persona's fallback phrase instead
    /// of silence.
    async fn add_fallback(&mut self, reply: u64) {
        let held = self.reply_mut(reply).is_some_and(|r| r.held);
        if held {
            // Not worth holding a fallback: if the turn is confirmed, it is asked again.
            self.discard_spec().await;
            return;
        }
        if let Some(r) = self.reply_ref(reply) {
            let _s = r.span.enter();
            info!("speaking the fallback phrase");
        }
        self.append_phrase(reply, Phrase::Fallback).await;
        if let Some(r) = self.reply_mut(reply)
            && !r.in_history
        {
            let text = r.text.clone();
            r.in_history = true;
            self.history.push_assistant(&text);
        }
    }

    /// Speaks a static phrase as a new reply (cutting nothing: callers make room first).
    async fn say_phrase(&mut self, phrase: Phrase) {
        let mut r = self.new_reply(Source::Phrase(phrase), false);
        r.llm_done = true;
        let id = r.id;
        self.active = Some(r);
        self.append_phrase(id, phrase).await;
        if let Some(r) = self.reply_mut(id) {
            r.in_history = true;
            let text = r.text.clone();
            self.history.push_assistant(&text);
        }
    }

    /// Adds a phrase to a reply: from the cache at once, or through TTS (then cached).
    async fn append_phrase(&mut self, reply: u64, phrase: Phrase) {
        let text = phrase.text(&self.persona).to_string();
        let key = GreetingKey::for_phrase(&self.ctx.persona_name, &self.persona, phrase);
        let cached = self.shared.phrases.get(&key);
        let Some(r) = self.reply_mut(reply) else {
            return;
        };
        if !r.text.is_empty() {
            r.text.push(' ');
        }
        r.text.push_str(&text);
        r.got_content = true;
        match cached {
            Some(audio) => {
                let chunk = self.playout.begin_chunk(text);
                self.playout.push_audio(chunk, &audio);
                self.playout.end_chunk(chunk);
                if let Some(r) = self.reply_mut(reply) {
                    r.chunks.push(chunk);
                }
            }
            None => {
                if let Some(r) = self.reply_mut(reply) {
                    r.queued.push_back(text);
                }
                self.feed_tts_capturing(reply, key).await;
            }
        }
    }

    async fn feed_tts_capturing(&mut self, reply: u64, key: GreetingKey) {
        let before: Vec<String> = self
            .reply_ref(reply)
            .map(|r| r.contexts.clone())
            .unwrap_or_default();
        self.feed_tts().await;
        if let Some(r) = self.reply_ref(reply)
            && let Some(ctx) = r.contexts.iter().find(|c| !before.contains(c))
        {
            self.captures.insert(ctx.clone(), (key, Vec::new()));
        }
        // If no TTS slot was free, the phrase is synthesized later, uncached: fine.
    }

    /// Opens TTS contexts for queued chunks while slots are free: the audible reply
    /// first, then the preemptive one.
    async fn feed_tts(&mut self) {
        let max = self.shared.settings.max_tts_in_flight;
        while self.in_flight < max {
            let Some(tts) = self.tts.clone() else {
                return;
            };
            let pick = [self.active.as_ref(), self.spec.as_ref()]
                .into_iter()
                .flatten()
                .find(|r| !r.queued.is_empty())
                .map(|r| r.id);
            let Some(id) = pick else {
                return;
            };
            let Some(r) = self.reply_mut(id) else {
                return;
            };
            let Some(text) = r.queued.pop_front() else {
                return;
            };
            let ctx = format!("r{}c{}", r.id, r.next_context);
            r.next_context += 1;
            let held = r.held;
            let chunk = if held {
                self.playout.begin_held_chunk(text.clone())
            } else {
                self.playout.begin_chunk(text.clone())
            };
            let Some(r) = self.reply_mut(id) else {
                return;
            };
            r.chunks.push(chunk);
            r.contexts.push(ctx.clone());
            if r.timing.first_tts_text.is_none() {
                r.timing.first_tts_text = Some(Instant::now());
            }
            self.contexts.insert(ctx.clone(), (id, chunk));
            self.in_flight += 1;
            let spoken = format!("{text} ");
            let res = match tts.speak(&ctx, &spoken).await {
                Ok(()) => tts.end(&ctx).await,
                Err(e) => Err(e),
            };
            if res.is_ok() {
                self.journal.tts_characters(spoken.chars().count());
            }
            if let Err(e) = res {
                warn!(error = %e, "text-to-speech command failed");
                // Put the text back for the next session.
                self.context_finished(&ctx);
                if let Some(r) = self.reply_mut(id) {
                    r.queued.push_front(text);
                }
                self.playout.discard(&[chunk]);
                self.tts_lost();
                return;
            }
        }
    }

    /// Whether the audible reply is done (said and heard); then it leaves.
    async fn check_active_done(&mut self, now: Instant) {
        let done = self.active.as_ref().is_some_and(|r| {
            r.finished_generating() && r.chunks.iter().all(|c| self.playout.chunk_played(*c))
        });
        if !done {
            return;
        }
        if let Some(r) = self.active.take() {
            let heard = self.playout.take_heard();
            let text = if heard.is_empty() { &r.text } else { &heard };
            self.journal_reply(&r, text, false);
            let _s = r.span.enter();
            debug!("reply played");
        }
        if self.ending.is_some() {
            self.hang_up(now).await;
        }
    }

    // ------------------------------------------------------------------ barge-in

    async fn barge_in(&mut self, now: Instant, trigger: BargeTrigger) {
        if !self.persona.turn_taking.barge_in || self.ending.is_some() {
            return;
        }
        let Some(r) = self.active.as_ref() else {
            return;
        };
        if r.held {
            return;
        }
        let audible = self.playout.is_speaking(now);
        info!(?trigger, audible, "barge-in");
        self.shared
            .metrics
            .barge_ins
            .with_label_values(&[self.ctx.persona_name.as_str()])
            .inc();
        self.interrupt_active(now, audible).await;
        if trigger == BargeTrigger::Voice {
            self.resume_deadline = Some(now + self.shared.settings.wordless_barge_in_resume);
        }
    }

    /// Stops the audible reply: `clear` at Twilio, cancel its LLM and TTS, and keep in
    /// the history only what the caller heard.
    async fn interrupt_active(&mut self, now: Instant, clear: bool) {
        if clear || self.playout.is_speaking(now) {
            let _ = self.output.send(CallOutput::Clear).await;
        }
        let heard = self.playout.interrupt(now);
        let Some(r) = self.active.take() else {
            return;
        };
        self.cancel_reply(&r).await;
        self.journal_reply(&r, &heard.text, heard.truncated);
        if r.in_history {
            self.history.amend_last_assistant(&heard.text);
        } else if !heard.text.is_empty() {
            self.history.push_assistant(&heard.text);
        }
        let _s = r.span.enter();
        info!(
            heard_chars = heard.text.len(),
            truncated = heard.truncated,
            "reply interrupted"
        );
    }

    async fn cancel_reply(&mut self, r: &Reply) {
        r.cancel.cancel();
        for ctx in &r.contexts {
            self.contexts.remove(ctx);
            self.captures.remove(ctx);
            self.in_flight = self.in_flight.saturating_sub(1);
            if let Some(tts) = &self.tts
                && let Err(e) = tts.cancel(ctx).await
            {
                debug!(error = %e, "cancelling a TTS context failed");
            }
        }
        self.playout.discard(&r.chunks);
    }

    async fn discard_spec(&mut self) {
        if let Some(r) = self.spec.take() {
            self.cancel_reply(&r).await;
            self.feed_tts().await;
        }
    }

    // ------------------------------------------------------------------ ending

    async fn begin_ending(&mut self, reason: &'static str, now: Instant) {
        if self.ending.is_some() {
            return;
        }
        self.discard_spec().await;
        if self.active.is_some() {
            self.interrupt_active(now, true).await;
        }
        self.ending = Some((reason, now + self.shared.settings.goodbye_timeout));
        self.say_phrase(Phrase::Goodbye).await;
    }

    async fn hang_up(&mut self, _now: Instant) {
        let Some((reason, _)) = self.ending else {
            return;
        };
        if self.finished.is_some() {
            return;
        }
        let _ = self.output.send(CallOutput::Hangup).await;
        self.finished = Some(if reason == "drain" {
            CallEnd::Cancelled
        } else {
            CallEnd::HungUp { reason }
        });
    }

    async fn shutdown(&mut self) {
        self.call_cancel.cancel();
        let stt = self.stt_control.take();
        let tts = self.tts.take();
        let close_stt = async {
            if let Some(c) = stt {
                c.close().await;
            }
        };
        let close_tts = async {
            if let Some(t) = tts {
                let _ = tokio::time::timeout(Duration::from_secs(1), t.close()).await;
                t.abort();
            }
        };
        tokio::join!(close_stt, close_tts);
    }

    // ------------------------------------------------------------------ journal

    /// Records a persona turn as heard, with its timings, and the usage so far.
    fn journal_reply(&mut self, r: &Reply, heard: &str, interrupted: bool) {
        let t = &r.timing;
        let latency = match r.source {
            Source::Llm { .. } => {
                let st = t.stages();
                let ms = |d: Option<Duration>| {
                    d.map(|d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX))
                };
                TurnLatency {
                    stt_ms: ms(st.stt),
                    llm_ms: ms(st.llm),
                    tts_ms: ms(st.tts),
                    total_ms: ms(st.total),
                }
            }
            Source::Phrase(_) => TurnLatency::default(),
        };
        self.journal.persona_turn(
            heard,
            interrupted,
            TurnTimes {
                end_of_speech: t.speech_end,
                first_audio: t.first_frame,
                latency,
            },
        );
        self.journal.report_usage(
            self.audio_clock,
            self.ctx.started_at.elapsed().as_secs_f64(),
        );
    }

    /// The call ends while the persona talks: record what the caller heard of it.
    fn journal_unfinished_reply(&mut self, now: Instant) {
        let Some(r) = self.active.take() else {
            return;
        };
        if r.held {
            return;
        }
        let heard = self.playout.interrupt(now);
        self.journal_reply(&r, &heard.text, heard.truncated);
    }

    // ------------------------------------------------------------------ helpers

    fn reply_mut(&mut self, id: u64) -> Option<&mut Reply> {
        [self.active.as_mut(), self.spec.as_mut()]
            .into_iter()
            .flatten()
            .find(|r| r.id == id)
    }

    fn reply_ref(&self, id: u64) -> Option<&Reply> {
        [self.active.as_ref(), self.spec.as_ref()]
            .into_iter()
            .flatten()
            .find(|r| r.id == id)
    }
}

/// One reply's LLM stream: tokens -> chunks -> the call loop.
async fn llm_task(
    llm: Arc<dyn ChatModel>,
    req: ChatRequest,
    cancel: CancellationToken,
    chunker_cfg: ChunkerConfig,
    tx: mpsc::Sender<Internal>,
    reply: u64,
) {
    let send = |out: LlmOut| {
        let tx = tx.clone();
        async move { tx.send(Internal::Llm { reply, out }).await.is_ok() }
    };
    let stream = tokio::select! {
        _ = cancel.cancelled() => return,
        s = llm.stream(req, cancel.clone()) => s,
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            send(LlmOut::Failed(e)).await;
            return;
        }
    };
    send(LlmOut::FirstToken(Instant::now())).await;
    let mut chunker = Chunker::new(chunker_cfg);
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        match item {
            Some(Ok(ChatDelta::Content(t))) => {
                for c in chunker.push(&t) {
                    if !send(LlmOut::Chunk(c)).await {
                        return;
                    }
                }
            }
            Some(Ok(ChatDelta::Usage(u))) => {
                send(LlmOut::Usage(u)).await;
            }
            // Reasoning never reaches the caller's ears.
            Some(Ok(ChatDelta::Reasoning(_))) => {}
            Some(Ok(ChatDelta::Done { .. })) | None => {
                if let Some(c) = chunker.finish() {
                    send(LlmOut::Chunk(c)).await;
                }
                send(LlmOut::Done).await;
                return;
            }
            Some(Err(e)) => {
                if let Some(c) = chunker.finish() {
                    send(LlmOut::Chunk(c)).await;
                }
                send(LlmOut::Failed(e)).await;
                return;
            }
        }
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn role(r: PromptRole) -> Role {
    match r {
        PromptRole::System => Role::System,
        PromptRole::User => Role::User,
        PromptRole::Assistant => Role::Assistant,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}
