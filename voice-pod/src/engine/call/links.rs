//! A call's links to its speech providers: the STT and TTS sessions, opened in the
//! background (caller audio waits in a bounded buffer meanwhile), and what happens
//! when a session gives up.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Duration;
use tracing::{Instrument, debug, info_span, warn};

use super::{Call, Internal};
use crate::metrics::{Peer, SocketErrorKind};
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
    connecting: bool,
    failures: u32,
    /// Caller audio while no session takes it (20 ms frames, bounded).
    pre_audio: VecDeque<Bytes>,
}

/// The call's text-to-speech session, or the wait for one.
#[derive(Default)]
pub(super) struct TtsLink {
    pub(super) control: Option<TtsControl>,
    pub(super) events: Option<mpsc::Receiver<TtsEvent>>,
    connecting: bool,
    failures: u32,
}

fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(200 * u64::from(failures.min(10)))
}

impl Call {
    pub(super) fn connect_stt(&mut self, delay: Duration) {
        if self.stt.connecting {
            return;
        }
        self.stt.connecting = true;
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

    pub(super) fn connect_tts(&mut self, delay: Duration) {
        if self.tts.connecting {
            return;
        }
        self.tts.connecting = true;
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

    pub(super) fn stt_ready(&mut self, res: Result<SttSession, SttError>) {
        self.stt.connecting = false;
        let session = match res {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "speech-to-text connect failed");
                self.stt_lost();
                return;
            }
        };
        self.stt.failures = 0;
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
        self.tts.connecting = false;
        let session = match res {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "text-to-speech connect failed");
                self.tts_lost();
                return;
            }
        };
        self.tts.failures = 0;
        self.tts.control = Some(session.control);
        self.tts.events = Some(session.events);
        debug!("text-to-speech connected");
        self.feed_tts().await;
    }

    pub(super) fn stt_lost(&mut self) {
        self.stt.audio = None;
        self.stt.events = None;
        if let Some(c) = self.stt.control.take() {
            c.abort();
        }
        self.shared
            .metrics
            .socket_error(Peer::Deepgram, SocketErrorKind::Closed);
        self.stt.failures += 1;
        if self.stt.failures <= self.shared.settings.session_reconnects {
            self.shared
                .metrics
                .provider_reconnects
                .with_label_values(&[Peer::Deepgram.as_str()])
                .inc();
            self.connect_stt(reconnect_delay(self.stt.failures));
        }
    }

    pub(super) fn tts_lost(&mut self) {
        self.tts.control = None;
        self.tts.events = None;
        // Whatever audio arrived for open contexts plays; the rest of their text is gone
        // with the session (the client already resent it on its own reconnects).
        for c in self.replies.close_open_contexts(&mut self.playout) {
            self.captures.remove(&c);
        }
        self.shared
            .metrics
            .socket_error(Peer::Elevenlabs, SocketErrorKind::Closed);
        self.tts.failures += 1;
        if self.tts.failures <= self.shared.settings.session_reconnects {
            self.shared
                .metrics
                .provider_reconnects
                .with_label_values(&[Peer::Elevenlabs.as_str()])
                .inc();
            self.connect_tts(reconnect_delay(self.tts.failures));
        } else {
            // No voice left: end replies that wait for one, so the call does not hang.
            self.replies.drop_queued_text();
        }
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
