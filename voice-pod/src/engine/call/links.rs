//! A call's links to its speech providers: the STT and TTS sessions, opened in the
//! background (caller audio waits in a bounded buffer meanwhile), and what happens
//! when a session gives up.
//!
//! The sessions reconnect on their own (`providers::session`); when one gives up the
//! call cannot go on as a conversation, so it ends: without ears the persona says
//! goodbye, without a voice it hangs up. The engine never dials a provider again, so
//! one outage is counted once.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tracing::{Instrument, debug, info_span, warn};

use super::{Call, Internal};
use crate::providers::{
    SttControl, SttError, SttEvent, SttSession, SttSessionConfig, TtsControl, TtsError, TtsEvent,
    TtsSession, TtsSessionConfig,
};

/// The call's speech-to-text session, or the wait for one.
#[derive(Default)]
pub(super) struct SttLink {
    audio: Option<mpsc::Sender<Bytes>>,
    pub(super) events: Option<mpsc::Receiver<SttEvent>>,
    control: Option<SttControl>,
    /// Caller audio while no session takes it (20 ms frames, bounded).
    pre_audio: VecDeque<Bytes>,
}

/// The call's text-to-speech session, or the wait for one.
#[derive(Default)]
pub(super) struct TtsLink {
    pub(super) control: Option<TtsControl>,
    pub(super) events: Option<mpsc::Receiver<TtsEvent>>,
}

impl Call {
    /// Opens both provider sessions in the background, once per call (the sessions
    /// reconnect on their own; the engine never dials again).
    pub(super) fn connect_links(&mut self) {
        let stt_span = info_span!("stt_connect", call_sid = %self.ctx.call_sid);
        let tts_span = info_span!("tts_connect", call_sid = %self.ctx.call_sid);
        let (stt, tts) = (
            self.shared.providers.stt.clone(),
            self.shared.providers.tts.clone(),
        );
        let stt_cfg = SttSessionConfig::from_spec(&self.persona.stt, &self.ctx.call_sid);
        let tts_cfg = TtsSessionConfig::from_spec(&self.persona.voice, &self.ctx.call_sid);
        let (stt_cancel, tts_cancel) = (
            self.call_cancel.child_token(),
            self.call_cancel.child_token(),
        );
        let (stt_tx, tts_tx) = (self.internal_tx.clone(), self.internal_tx.clone());
        tokio::spawn(
            async move {
                let res = stt.connect(stt_cfg, stt_cancel).await;
                let _ = stt_tx.send(Internal::SttReady(res)).await;
            }
            .instrument(stt_span),
        );
        tokio::spawn(
            async move {
                let res = tts.connect(tts_cfg, tts_cancel).await;
                let _ = tts_tx.send(Internal::TtsReady(res)).await;
            }
            .instrument(tts_span),
        );
    }

    /// Caller audio to the STT; never waits (a slow STT must not stall the call).
    pub(super) fn forward_audio(&mut self, payload: Bytes) {
        match &self.stt.audio {
            Some(tx) => match tx.try_send(payload) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The STT is far behind; blocking here would stall the whole call.
                    self.shared.metrics.inbound_frames_dropped.inc();
                }
                Err(mpsc::error::TrySendError::Closed(p)) => {
                    self.stt.audio = None;
                    self.buffer_audio(p);
                }
            },
            None => self.buffer_audio(payload),
        }
    }

    fn buffer_audio(&mut self, payload: Bytes) {
        if self.stt.pre_audio.len() >= self.shared.settings.pre_connect_frames {
            self.stt.pre_audio.pop_front();
            self.shared.metrics.inbound_frames_dropped.inc();
        }
        self.stt.pre_audio.push_back(payload);
    }

    pub(super) async fn stt_ready(&mut self, res: Result<SttSession, SttError>) {
        let session = match res {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "speech-to-text refused the session");
                self.stt_gone().await;
                return;
            }
        };
        let SttSession {
            audio,
            events,
            control,
        } = session;
        for p in self.stt.pre_audio.drain(..) {
            if audio.try_send(p).is_err() {
                self.shared.metrics.inbound_frames_dropped.inc();
            }
        }
        self.stt.audio = Some(audio);
        self.stt.events = Some(events);
        self.stt.control = Some(control);
        debug!("speech-to-text connected");
    }

    pub(super) async fn tts_ready(&mut self, res: Result<TtsSession, TtsError>) {
        let session = match res {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "text-to-speech refused the session");
                self.tts_gone().await;
                return;
            }
        };
        self.tts.control = Some(session.control);
        self.tts.events = Some(session.events);
        debug!("text-to-speech connected");
        self.feed_tts().await;
    }

    /// The STT gave up (or refused the call): the persona cannot hear, so it says
    /// goodbye and the call ends.
    pub(super) async fn stt_gone(&mut self) {
        self.stt.audio = None;
        self.stt.events = None;
        if let Some(c) = self.stt.control.take() {
            c.abort();
        }
        self.begin_ending("stt_unavailable", Instant::now()).await;
    }

    /// The TTS gave up (or refused the call): the persona has no voice left, so the
    /// call ends at once. What audio arrived for open contexts is dropped with it.
    pub(super) async fn tts_gone(&mut self) {
        self.tts.control = None;
        self.tts.events = None;
        for c in self.replies.close_open_contexts(&mut self.playout) {
            self.captures.remove(&c);
        }
        self.replies.drop_queued_text();
        let now = Instant::now();
        if self.timers.ending().is_none() {
            self.timers.begin_ending("tts_unavailable", now);
        }
        self.hang_up().await;
    }

    /// Closes both sessions at the end of the call (bounded: a dead TTS socket must
    /// not hold the call task).
    pub(super) async fn close_links(&mut self) {
        self.call_cancel.cancel();
        let stt = self.stt.control.take();
        let tts = self.tts.control.take();
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
}
