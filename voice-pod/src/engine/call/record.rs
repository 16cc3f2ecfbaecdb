//! What a call records of each reply: stage timestamps, the turn-latency histogram and
//! log line at the first reply frame, and the persona turn as the caller heard it.

use tokio::time::{Duration, Instant};
use tracing::info;

use super::Call;
use super::reply::{Reply, Source, Timing};
use crate::engine::journal::TurnTimes;
use crate::metrics::Stage;
use crate::store::records::TurnLatency;

/// A reply's latency by stage, from its `Timing`: what `voice_turn_latency_seconds`
/// observes, the log line says and the transcript keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Stages {
    /// End of speech -> first reply frame written.
    total: Option<Duration>,
    /// End of speech -> end-of-turn decision.
    stt: Option<Duration>,
    /// LLM request -> first token.
    llm: Option<Duration>,
    /// First text to TTS -> first audio.
    tts: Option<Duration>,
}

impl Stages {
    /// The stages of a reply's timestamps.
    pub(super) fn of(t: &Timing) -> Self {
        let between = |from: Option<Instant>, to: Option<Instant>| {
            from.zip(to).map(|(a, b)| b.saturating_duration_since(a))
        };
        Self {
            total: between(t.speech_end, t.first_frame),
            stt: between(t.speech_end, t.confirmed),
            llm: between(t.llm_start, t.first_token),
            tts: between(t.first_tts_text, t.first_tts_audio),
        }
    }

    fn by_stage(&self) -> [(Stage, Option<Duration>); 4] {
        [
            (Stage::Total, self.total),
            (Stage::Stt, self.stt),
            (Stage::Llm, self.llm),
            (Stage::Tts, self.tts),
        ]
    }

    /// Whole milliseconds for the record (saturating: a stage never overflows a row).
    fn latency(&self) -> TurnLatency {
        let ms = |d: Option<Duration>| d.map(|d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
        TurnLatency {
            stt_ms: ms(self.stt),
            llm_ms: ms(self.llm),
            tts_ms: ms(self.tts),
            total_ms: ms(self.total),
        }
    }
}

impl Call {
    /// Reply audio reached Twilio: the first frame of an audible answer closes its
    /// latency (phrases have no caller turn to measure from).
    pub(super) fn on_first_frame(&mut self, now: Instant) {
        let persona = self.ctx.spec.persona.as_str();
        let metrics = &self.shared.metrics;
        let Some(r) = self.replies.active_mut() else {
            return;
        };
        if r.held || r.timing.first_frame.is_some() {
            return;
        }
        r.timing.first_frame = Some(now);
        if let Source::Llm { .. } = r.source {
            let st = Stages::of(&r.timing);
            for (stage, d) in st.by_stage() {
                if let Some(d) = d {
                    metrics.observe_turn(persona, stage, d.as_secs_f64());
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

    /// Records a persona turn as heard, with its timings, and the usage so far.
    pub(super) fn journal_reply(&mut self, r: &Reply, heard: &str, interrupted: bool) {
        let t = &r.timing;
        let latency = match r.source {
            Source::Llm { .. } => Stages::of(t).latency(),
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
    pub(super) fn journal_unfinished_reply(&mut self, now: Instant) {
        if let Some((r, heard)) = self.replies.take_unfinished(now, &mut self.playout) {
            self.journal_reply(&r, &heard.text, heard.truncated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_measured_between_their_own_timestamps_and_missing_ones_stay_empty() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        let t = Timing {
            speech_end: at(0),
            confirmed: at(210),
            llm_start: at(212),
            first_token: at(400),
            first_tts_text: at(450),
            first_tts_audio: None,
            first_frame: at(700),
        };
        let st = Stages::of(&t);
        assert_eq!(st.total, Some(Duration::from_millis(700)));
        assert_eq!(st.stt, Some(Duration::from_millis(210)));
        assert_eq!(st.llm, Some(Duration::from_millis(188)));
        assert_eq!(st.tts, None, "no audio yet: no TTS figure");
        let l = st.latency();
        assert_eq!(
            (l.total_ms, l.stt_ms, l.llm_ms, l.tts_ms),
            (Some(700), Some(210), Some(188), None)
        );
    }

    #[test]
    fn a_stage_longer_than_i32_milliseconds_saturates_in_the_record() {
        let st = Stages {
            total: Some(Duration::from_secs(u64::from(u32::MAX))),
            ..Stages::default()
        };
        assert_eq!(st.latency().total_ms, Some(i32::MAX));
    }
}
