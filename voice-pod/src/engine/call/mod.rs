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
//! Replies are `Reply` values: an LLM reply to a caller turn, or a static
//! phrase (greeting, fallback, idle prompt, goodbye) played from the pod's cache when
//! it can. A reply started on [`TurnEvent::Likely`] is *held* (its audio waits in the
//! playout) until the turn is confirmed with the same words, and discarded otherwise.
//!
//! ## Layout
//! - this file: the [`Call`] state, its `select!` loop, caller input and turns.
//! - `reply`: the reply lifecycle, sans-IO (hold, confirm, discard, cancel, what
//!   enters the history), unit-tested.
//! - `speak`: the LLM task per reply, TTS feeding, phrases and the fallback.
//! - `barge_in`: when the caller interrupts, and cutting the reply.
//! - `timers`: idle prompt and goodbye, maximum duration, the bounded goodbye.
//! - `keypad`: DTMF keys as one caller entry.
//! - `links`: the STT and TTS sessions of the call.
//! - `record`: stage timings, the turn-latency histogram, journaled turns.

mod barge_in;
mod keypad;
mod links;
mod record;
mod reply;
mod speak;
mod timers;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use callmeback_api::PersonaSpec;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use self::barge_in::{BargeInRule, BargeTrigger};
use self::keypad::KeyEntry;
use self::links::{SttLink, TtsLink};
use self::reply::Replies;
use self::speak::LlmOut;
use self::timers::CallTimers;
use super::chunker::ChunkerConfig;
use super::greeting_cache::{GreetingCache, GreetingKey, Phrase};
use super::journal::CallJournal;
use super::judge::LlmJudge;
use super::playout::{Playout, PlayoutConfig, PlayoutOut};
use super::prompt::{self, History, RelationshipContext};
use super::turn_taking::{SpeechEvent, TurnConfig, TurnEvent, TurnJudge, TurnTaker};
use super::vad::{Vad, VadConfig, VadEdge};
use crate::metrics::Metrics;
use crate::providers::{Providers, SttError, SttEvent, SttSession, TtsError, TtsEvent, TtsSession};
use crate::session::{CallContext, CallEnd, CallInput, CallOutput};
use crate::store::journal::Journal;

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

    stt: SttLink,
    tts: TtsLink,
    /// Seconds of caller audio given to the STT (its timeline).
    audio_clock: f64,

    turn: TurnTaker,
    judge: Option<Arc<dyn TurnJudge>>,
    barge_rule: BargeInRule,
    vad: Vad,
    playout: Playout,
    history: History,
    system: String,
    /// Memory notes as quoted data (the first user message), never in `system`.
    memory: Option<String>,

    replies: Replies,
    /// Phrases being synthesized live, captured for the cache.
    captures: HashMap<String, (GreetingKey, Vec<u8>)>,

    timers: CallTimers,
    keys: KeyEntry,
    drain_cancelled: bool,
    finished: Option<CallEnd>,
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
        let span = info_span!("call", call_sid = %ctx.call_sid, persona = %ctx.spec.persona);
        let turn = TurnTaker::new(TurnConfig::from_persona(&persona.turn_taking, &persona.stt));
        let judge: Option<Arc<dyn TurnJudge>> = persona.turn_taking.llm_judge.then(|| {
            Arc::new(LlmJudge::new(
                shared.providers.llm.clone(),
                persona.llm.model.clone(),
            )) as Arc<dyn TurnJudge>
        });
        let system = prompt::system_prompt(&persona, ctx.spec.pretext.as_deref(), relationship);
        let memory = prompt::memory_message(relationship);
        // The max duration counts from the stream's start, which may predate this task.
        let elapsed = ctx.started_at.elapsed();
        let max = Duration::from_secs(persona.max_call_duration_seconds.into());
        let idle = Duration::from_secs(persona.idle_timeout_seconds.into());
        Self {
            vad: Vad::new(shared.settings.vad.clone()),
            playout: Playout::new(shared.settings.playout.clone(), "c"),
            history: History::new(persona.llm.max_history_turns),
            timers: CallTimers::new(now, idle, now + max.saturating_sub(elapsed)),
            replies: Replies::new(shared.settings.max_tts_in_flight),
            barge_rule: BargeInRule::from_spec(&persona.turn_taking),
            shared,
            persona,
            output,
            internal_tx,
            internal_rx,
            call_cancel: CancellationToken::new(),
            span,
            stt: SttLink::default(),
            tts: TtsLink::default(),
            audio_clock: 0.0,
            turn,
            judge,
            system,
            memory,
            captures: HashMap::new(),
            keys: KeyEntry::default(),
            drain_cancelled: false,
            finished: None,
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
            self.connect_links();
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
                    ev = recv_opt(&mut self.stt.events) => self.on_stt(ev).await,
                    ev = recv_opt(&mut self.tts.events) => self.on_tts(ev).await,
                    Some(msg) = self.internal_rx.recv() => self.on_internal(msg).await,
                    _ = sleep.as_mut() => self.on_timers(Instant::now()).await,
                }
            };
            self.journal_unfinished_reply(Instant::now());
            self.close_links().await;
            self.journal.finish(
                &end,
                self.audio_clock,
                self.ctx.started_at.elapsed(),
                &self.ctx.spec.persona,
                &self.persona,
                &self.shared.providers.llm,
            );
            info!(end = end.label(), turns = self.turns, "call ended");
            end
        }
        .instrument(span)
        .await
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
        self.check_active_done().await;
        if self.busy(now) {
            self.timers.activity(now);
        }
        true
    }

    fn next_wake(&self, now: Instant) -> Instant {
        [
            self.playout.next_wake(now),
            self.playout.next_mark_expiry(),
            self.turn.next_deadline(),
            self.timers.next(self.busy(now)),
            self.keys.deadline(),
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
                        self.timers.activity(now);
                        if self.barge_rule.on_voice() {
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
                self.timers.activity(now);
                self.keys.press(d, now);
            }
            CallInput::Mark(name) => {
                self.playout.on_mark(&name);
            }
            CallInput::Stop => {}
        }
    }

    async fn on_stt(&mut self, ev: Option<SttEvent>) {
        let now = Instant::now();
        let Some(ev) = ev else {
            warn!("speech-to-text session ended unexpectedly");
            self.stt_gone().await;
            return;
        };
        let speech = match ev {
            SttEvent::Interim { text, words, .. } => {
                self.timers.activity(now);
                self.words_barge_in(&words, now).await;
                SpeechEvent::Interim { text }
            }
            SttEvent::Final {
                text,
                words,
                speech_final,
                ..
            } => {
                if !text.is_empty() {
                    self.timers.activity(now);
                    self.words_barge_in(&words, now).await;
                }
                SpeechEvent::Final { text, speech_final }
            }
            SttEvent::UtteranceEnd { .. } => SpeechEvent::UtteranceEnd,
            SttEvent::SpeechStarted { timestamp } => {
                let start = self.replies.active().map(|r| r.audio_start);
                if self.barge_rule.on_speech_started(timestamp, start) {
                    self.barge_in(now, BargeTrigger::Voice).await;
                }
                SpeechEvent::SpeechStarted
            }
            SttEvent::Reconnected { replayed_ms } => {
                info!(replayed_ms, "speech-to-text reconnected");
                return;
            }
            SttEvent::Error(e) => {
                warn!(error = %e, "speech-to-text session gave up; ending the call");
                self.stt_gone().await;
                return;
            }
        };
        let evs = self.turn.on_speech(speech, now);
        self.on_turn_events(evs, now).await;
    }

    async fn on_tts(&mut self, ev: Option<TtsEvent>) {
        let now = Instant::now();
        match ev {
            Some(TtsEvent::Audio { context_id, mulaw }) => {
                if self
                    .replies
                    .on_tts_audio(&context_id, &mulaw, &mut self.playout, now)
                    && let Some((_, buf)) = self.captures.get_mut(&context_id)
                {
                    buf.extend_from_slice(&mulaw);
                }
            }
            Some(TtsEvent::ContextDone { context_id }) => {
                self.replies.context_done(&context_id, &mut self.playout);
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
                warn!(error = %e, "text-to-speech session gave up; ending the call");
                self.tts_gone().await;
            }
            None => {
                warn!("text-to-speech session ended unexpectedly");
                self.tts_gone().await;
            }
        }
    }

    async fn on_internal(&mut self, msg: Internal) {
        let now = Instant::now();
        match msg {
            Internal::SttReady(res) => self.stt_ready(res).await,
            Internal::TtsReady(res) => self.tts_ready(res).await,
            Internal::Llm { reply, out } => self.on_llm(reply, out).await,
            Internal::Judge { text, finished } => {
                let evs = self.turn.on_judgement(&text, finished, now);
                self.on_turn_events(evs, now).await;
            }
        }
    }

    // ------------------------------------------------------------------ turns

    async fn on_turn_events(&mut self, evs: Vec<TurnEvent>, now: Instant) {
        for ev in evs {
            match ev {
                TurnEvent::Likely(text) => {
                    if self.persona.turn_taking.preemptive_generation
                        && self.timers.ending().is_none()
                    {
                        self.discard_spec().await;
                        debug!(
                            words = text.split_whitespace().count(),
                            "turn likely: generating ahead"
                        );
                        let r = self.start_llm_reply(text, true, now);
                        self.replies.start(r);
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
        self.timers.caller_turn(now);
        let mut user_text = self.keys.take_for_model().unwrap_or_default();
        if !text.is_empty() {
            if !user_text.is_empty() {
                user_text.push(' ');
            }
            user_text.push_str(&text);
        }
        if user_text.is_empty() || self.timers.ending().is_some() {
            return;
        }
        info!(turn = self.turns, chars = user_text.len(), "caller turn");
        // A reply still talking when a new turn is confirmed (barge-in off) ends here.
        if self.replies.active().is_some() {
            self.interrupt_active(now, false).await;
        }
        let speech_end = self.vad.last_voiced();
        self.journal.caller_turn(&user_text, speech_end);
        if self.replies.confirm(
            &user_text,
            speech_end,
            now,
            &mut self.history,
            &mut self.playout,
        ) {
            // The preemptive reply answered exactly these words: let it speak.
            if let Some(r) = self.replies.active() {
                let _s = r.span.enter();
                debug!("preemptive reply confirmed");
            }
            self.feed_tts().await;
            return;
        }
        self.discard_spec().await;
        self.history.push_user(&user_text);
        let mut r = self.start_llm_reply(user_text, false, now);
        r.timing.speech_end = speech_end;
        r.timing.confirmed = Some(now);
        self.replies.start(r);
    }

    /// Answers something that is not a confirmed caller turn (resuming after a sound).
    async fn start_answer(&mut self, note: String, now: Instant) {
        self.history.push_user(&note);
        let r = self.start_llm_reply(note, false, now);
        self.replies.start(r);
        self.feed_tts().await;
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}
