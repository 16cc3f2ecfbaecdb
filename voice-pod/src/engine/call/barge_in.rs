//! Barge-in: the caller talks over the persona. [`BargeInRule`] decides from voice
//! activity or recognised words whether the audible reply is interrupted (sans-IO,
//! unit-tested); `Call::barge_in` clears Twilio's buffer and cuts the reply, keeping
//! in the history only what the caller heard.

use callmeback_api::TurnTakingSpec;
use tokio::time::Instant;
use tracing::info;

use super::Call;
use crate::providers::Word;
use crate::session::CallOutput;

/// Caller speech stamped up to this long before a reply started still counts as an
/// interruption of it (the STT's speech-start stamp trails the audio a little).
const SPEECH_START_SLACK_S: f64 = 0.05;
/// A word must end this long after the reply started to be an interruption, not the
/// tail of the turn the reply answers.
const WORD_SLACK_S: f64 = 0.02;

/// How a barge-in was detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BargeTrigger {
    /// Voice activity (the pod's or the STT's), no words yet.
    Voice,
    /// Interim or final words.
    Words,
}

/// The persona's barge-in settings, as decisions.
#[derive(Clone, Copy, Debug)]
pub(super) struct BargeInRule {
    enabled: bool,
    /// Words the caller must say over the reply; 0 or 1: voice alone is enough.
    min_words: usize,
}

impl BargeInRule {
    pub(super) fn from_spec(tt: &TurnTakingSpec) -> Self {
        Self {
            enabled: tt.barge_in,
            min_words: tt.barge_in_min_words as usize,
        }
    }

    /// Whether voice alone (no words yet) interrupts.
    pub(super) fn on_voice(&self) -> bool {
        self.min_words <= 1
    }

    /// The STT heard speech start at `timestamp` (its audio timeline, seconds) while a
    /// reply that started at `reply_audio_start` is audible.
    pub(super) fn on_speech_started(&self, timestamp: f64, reply_audio_start: Option<f64>) -> bool {
        let fresh =
            reply_audio_start.is_some_and(|start| timestamp + SPEECH_START_SLACK_S >= start);
        self.on_voice() && fresh
    }

    /// Recognised words while a reply that started at `reply_audio_start` is audible:
    /// enough of them spoken after it started interrupt.
    pub(super) fn on_words(&self, words: &[Word], reply_audio_start: Option<f64>) -> bool {
        let Some(start) = reply_audio_start else {
            return false;
        };
        let fresh = words
            .iter()
            .filter(|w| w.end > start + WORD_SLACK_S)
            .count();
        fresh >= self.min_words.max(1)
    }
}

impl Call {
    /// Words from the STT: a barge-in if enough of them talk over the reply.
    pub(super) async fn words_barge_in(&mut self, words: &[Word], now: Instant) {
        let start = self.replies.active().map(|r| r.audio_start);
        if self.barge_rule.on_words(words, start) {
            self.barge_in(now, BargeTrigger::Words).await;
        }
    }

    pub(super) async fn barge_in(&mut self, now: Instant, trigger: BargeTrigger) {
        if !self.barge_rule.enabled || self.timers.ending().is_some() {
            return;
        }
        if self.replies.active().is_none_or(|r| r.held) {
            return;
        }
        let audible = self.playout.is_speaking(now);
        info!(?trigger, audible, "barge-in");
        self.shared
            .metrics
            .barge_ins
            .with_label_values(&[self.ctx.spec.persona.as_str()])
            .inc();
        self.interrupt_active(now, audible).await;
        if trigger == BargeTrigger::Voice {
            self.timers
                .resume_after(now, self.shared.settings.wordless_barge_in_resume);
        }
    }

    /// Stops the audible reply: `clear` at Twilio, cancel its LLM and TTS, and keep in
    /// the history only what the caller heard.
    pub(super) async fn interrupt_active(&mut self, now: Instant, clear: bool) {
        if clear || self.playout.is_speaking(now) {
            let _ = self.output.send(CallOutput::Clear).await;
        }
        let Some(cut) = self
            .replies
            .interrupt(now, &mut self.playout, &mut self.history)
        else {
            return;
        };
        self.cancel_tts(&cut.contexts).await;
        self.journal_reply(&cut.reply, &cut.heard.text, cut.heard.truncated);
        let _s = cut.reply.span.enter();
        info!(
            heard_chars = cut.heard.text.len(),
            truncated = cut.heard.truncated,
            "reply interrupted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(min_words: usize) -> BargeInRule {
        BargeInRule {
            enabled: true,
            min_words,
        }
    }

    fn word(end: f64) -> Word {
        Word {
            word: "stop".into(),
            start: end - 0.3,
            end,
            confidence: 0.9,
        }
    }

    #[test]
    fn voice_alone_interrupts_only_when_at_most_one_word_is_required() {
        assert!(rule(0).on_voice() && rule(1).on_voice());
        assert!(!rule(2).on_voice());
    }

    #[test]
    fn speech_that_started_before_the_reply_is_not_an_interruption() {
        let r = rule(1);
        assert!(r.on_speech_started(10.0, Some(10.0)));
        assert!(r.on_speech_started(9.96, Some(10.0)), "within the slack");
        assert!(
            !r.on_speech_started(9.9, Some(10.0)),
            "the answered turn's tail"
        );
        assert!(!r.on_speech_started(11.0, None), "nothing audible");
        assert!(
            !rule(2).on_speech_started(11.0, Some(10.0)),
            "words required"
        );
    }

    #[test]
    fn only_words_ending_after_the_reply_started_count_towards_the_minimum() {
        let r = rule(2);
        let words = [word(10.01), word(10.05), word(10.4)];
        assert!(
            !r.on_words(&words[..2], Some(10.0)),
            "10.01 s is within the slack: one fresh word"
        );
        assert!(r.on_words(&words, Some(10.0)));
        assert!(!r.on_words(&words, None));
        assert!(
            rule(0).on_words(&[word(10.5)], Some(10.0)),
            "0 means one word"
        );
        assert!(!rule(0).on_words(&[], Some(10.0)));
    }
}
