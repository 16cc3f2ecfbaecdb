//! When has the caller finished speaking?
//!
//! A sans-IO state machine: the call session feeds it speech events (from the STT,
//! and optionally from the pod's own voice-activity detector on the caller audio),
//! verdicts of an optional LLM judge and the clock; it answers with [`TurnEvent`]s.
//! Time is injected (`tokio::time::Instant`), so tests drive it with a paused clock.
//!
//! Rules, in order of precedence:
//! - A turn is a candidate when the STT marks an endpoint (`speech_final`) or an
//!   utterance end, or when transcripts go stale (a lost endpoint message).
//! - A candidate whose words look finished is confirmed at once; one that looks
//!   unfinished (a trailing "and", "um", an article, a preposition without terminal
//!   punctuation) waits `incomplete_extra_wait` for the caller to go on, then is
//!   confirmed anyway: the caller is never left in silence after they finished.
//! - With the LLM judge on, the judge gets `judge_deadline` to overrule the heuristic;
//!   past the deadline the heuristic decides.
//! - [`TurnEvent::Likely`] is emitted as early as the words look final (a candidate
//!   under extra wait or judgement, or the caller's audio going quiet) so the session
//!   can start generating; [`TurnEvent::Resumed`] withdraws it when more words come.

use std::future::Future;
use std::pin::Pin;

use callmeback_api::{SttSpec, TurnTakingSpec};
use tokio::time::{Duration, Instant};

/// Provider-neutral speech events (Deepgram's live messages map one to one).
#[derive(Clone, Debug, PartialEq)]
pub enum SpeechEvent {
    /// The STT's voice-activity detector heard speech begin (Deepgram `SpeechStarted`).
    SpeechStarted,
    /// An unstable hypothesis of the current segment (`is_final: false`).
    Interim {
        /// The hypothesis text (replaces the previous interim).
        text: String,
    },
    /// A stable segment (`is_final: true`); `speech_final` marks an endpoint (pause).
    Final {
        /// The segment text.
        text: String,
        /// The STT detected the end of an utterance.
        speech_final: bool,
    },
    /// A gap after the last finalized word (Deepgram `UtteranceEnd`).
    UtteranceEnd,
    /// The pod's own voice-activity detector on the caller audio: `true` at speech
    /// onset, `false` once the caller has been quiet for a few frames.
    Voice {
        /// Speech is present.
        active: bool,
    },
}

/// What the session learns about the caller's turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnEvent {
    /// The caller has probably finished with these words: start generating, but
    /// hold the reply until [`TurnEvent::Confirmed`].
    Likely(String),
    /// The caller has finished: answer these words.
    Confirmed(String),
    /// The caller went on after a [`TurnEvent::Likely`]: discard what was generated.
    Resumed,
}

/// Turn-taking thresholds.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    /// Extra wait when the words look unfinished; also the cap on any wait.
    pub incomplete_extra_wait: Duration,
    /// Whether the LLM judge is consulted on every candidate.
    pub llm_judge: bool,
    /// How long the judge may take before the heuristic decides.
    pub judge_deadline: Duration,
    /// Transcripts unchanged this long with words pending: take the turn even though
    /// the STT's endpoint message never came.
    pub stale_after: Duration,
    /// How long voice activity without any word holds a pending candidate (a cough
    /// or line noise must not swallow the turn).
    pub word_grace: Duration,
    /// The STT punctuates (smart format): a missing final `.`/`?`/`!` hints that the
    /// sentence is unfinished.
    pub expect_punctuation: bool,
    /// Emit [`TurnEvent::Likely`] for preemptive generation.
    pub preemptive: bool,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            incomplete_extra_wait: Duration::from_millis(700),
            llm_judge: false,
            judge_deadline: Duration::from_millis(150),
            stale_after: Duration::from_millis(1500),
            word_grace: Duration::from_millis(400),
            expect_punctuation: true,
            preemptive: true,
        }
    }
}

impl TurnConfig {
    /// The thresholds a persona asks for.
    pub fn from_persona(tt: &TurnTakingSpec, stt: &SttSpec) -> Self {
        Self {
            incomplete_extra_wait: Duration::from_millis(tt.incomplete_extra_wait_ms.into()),
            llm_judge: tt.llm_judge,
            judge_deadline: Duration::from_millis(tt.llm_judge_deadline_ms.into()),
            // Past Deepgram's own utterance-end window: only a lost message gets here.
            stale_after: Duration::from_millis(u64::from(stt.utterance_end_ms) + 500),
            preemptive: tt.preemptive_generation,
            ..Self::default()
        }
    }
}

/// Decides whether a short utterance is finished; used under a hard deadline.
pub trait TurnJudge: Send + Sync {
    /// `Some(true)`: finished; `Some(false)`: the caller will go on; `None`: no idea.
    fn judge(&self, text: &str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'static>>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Judge {
    Off,
    Waiting,
    Done,
}

#[derive(Debug)]
struct Pending {
    text: String,
    since: Instant,
    deadline: Instant,
    heuristic_complete: bool,
    judge: Judge,
}

/// The per-call turn-taking state machine.
#[derive(Debug)]
pub struct TurnTaker {
    cfg: TurnConfig,
    /// Finalized segments of the current turn.
    committed: String,
    /// The latest interim hypothesis after `committed`.
    interim: String,
    /// Last time a transcript changed in this turn.
    last_words: Option<Instant>,
    /// The pod's VAD says the caller is quiet (only after it said so once).
    quiet: bool,
    pending: Option<Pending>,
    /// The text of an outstanding `Likely`.
    likely: Option<String>,
    judge_request: Option<String>,
}

impl TurnTaker {
    /// A fresh machine.
    pub fn new(cfg: TurnConfig) -> Self {
        Self {
            cfg,
            committed: String::new(),
            interim: String::new(),
            last_words: None,
            quiet: false,
            pending: None,
            likely: None,
            judge_request: None,
        }
    }

    /// Whether the caller has said anything in the current, unconfirmed turn.
    pub fn has_words(&self) -> bool {
        !self.committed.is_empty() || !self.interim.is_empty()
    }

    /// A judgement the session should request (taken once).
    pub fn take_judge_request(&mut self) -> Option<String> {
        self.judge_request.take()
    }

    /// When [`TurnTaker::on_deadline`] must next be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.pending {
            Some(p) => Some(p.deadline),
            None if self.has_words() => self.last_words.map(|t| t + self.cfg.stale_after),
            None => None,
        }
    }

    /// Feeds one speech event.
    pub fn on_speech(&mut self, ev: SpeechEvent, now: Instant) -> Vec<TurnEvent> {
        let mut out = Vec::new();
        match ev {
            SpeechEvent::SpeechStarted => self.voice_without_words(now),
            SpeechEvent::Voice { active: true } => {
                self.quiet = false;
                self.voice_without_words(now);
            }
            SpeechEvent::Voice { active: false } => {
                self.quiet = true;
                self.maybe_likely(&mut out);
            }
            SpeechEvent::Interim { text } => {
                let text = text.trim();
                if text.is_empty() || text == self.interim {
                    return out;
                }
                self.interim = text.to_string();
                self.words_changed(now, &mut out);
                if self.quiet {
                    self.maybe_likely(&mut out);
                }
            }
            SpeechEvent::Final { text, speech_final } => {
                let text = text.trim();
                if !text.is_empty() {
                    if !self.committed.is_empty() {
                        self.committed.push(' ');
                    }
                    self.committed.push_str(text);
                    self.interim.clear();
                    self.words_changed(now, &mut out);
                } else if !self.interim.is_empty() && speech_final {
                    // An endpoint with an empty final: the interim was the last word.
                    self.promote_interim();
                }
                if speech_final {
                    self.candidate(now, &mut out);
                } else if self.quiet {
                    self.maybe_likely(&mut out);
                }
            }
            SpeechEvent::UtteranceEnd => {
                self.promote_interim();
                // A full utterance-end gap has passed: finished words confirm now;
                // unfinished ones keep their extra wait (it runs from the endpoint).
                let confirm_now = self.pending.as_ref().map(|p| {
                    p.judge != Judge::Waiting
                        && (p.heuristic_complete || now >= p.since + self.cfg.incomplete_extra_wait)
                });
                match confirm_now {
                    Some(true) => self.confirm(&mut out),
                    Some(false) => {}
                    None => self.candidate(now, &mut out),
                }
            }
        }
        out
    }

    /// The judge's verdict on `text` (ignored if the turn moved on).
    pub fn on_judgement(
        &mut self,
        text: &str,
        finished: Option<bool>,
        now: Instant,
    ) -> Vec<TurnEvent> {
        let mut out = Vec::new();
        let Some(p) = &mut self.pending else {
            return out;
        };
        if p.text != text || p.judge != Judge::Waiting {
            return out;
        }
        p.judge = Judge::Done;
        let finished = finished.unwrap_or(p.heuristic_complete);
        if finished {
            self.confirm(&mut out);
        } else {
            p.deadline = (p.since + self.cfg.incomplete_extra_wait).max(now);
        }
        out
    }

    /// Advances the clock; call at [`TurnTaker::next_deadline`].
    pub fn on_deadline(&mut self, now: Instant) -> Vec<TurnEvent> {
        let mut out = Vec::new();
        if let Some(p) = &mut self.pending {
            if now < p.deadline {
                return out;
            }
            if p.judge == Judge::Waiting {
                // The judge missed its deadline: the heuristic decides.
                p.judge = Judge::Done;
                let cap = p.since + self.cfg.incomplete_extra_wait;
                if !p.heuristic_complete && now < cap {
                    p.deadline = cap;
                    return out;
                }
            }
            self.confirm(&mut out);
            return out;
        }
        if self.has_words()
            && self
                .last_words
                .is_some_and(|t| now >= t + self.cfg.stale_after)
        {
            self.promote_interim();
            self.candidate(now, &mut out);
        }
        out
    }

    fn promote_interim(&mut self) {
        if !self.interim.is_empty() {
            if !self.committed.is_empty() {
                self.committed.push(' ');
            }
            let interim = std::mem::take(&mut self.interim);
            self.committed.push_str(&interim);
        }
    }

    fn full_text(&self) -> String {
        match (self.committed.is_empty(), self.interim.is_empty()) {
            (_, true) => self.committed.clone(),
            (true, false) => self.interim.clone(),
            (false, false) => format!("{} {}", self.committed, self.interim),
        }
    }

    /// Voice activity without words: hold a pending candidate a little, in case words follow.
    fn voice_without_words(&mut self, now: Instant) {
        if let Some(p) = &mut self.pending {
            p.deadline = p.deadline.max(now + self.cfg.word_grace);
        }
    }

    /// New words: the caller is still talking.
    fn words_changed(&mut self, now: Instant, out: &mut Vec<TurnEvent>) {
        self.last_words = Some(now);
        self.pending = None;
        self.judge_request = None;
        if let Some(l) = &self.likely
            && !same_words(l, &self.full_text())
        {
            self.likely = None;
            out.push(TurnEvent::Resumed);
        }
    }

    fn maybe_likely(&mut self, out: &mut Vec<TurnEvent>) {
        if !self.cfg.preemptive || self.likely.is_some() || self.pending.is_some() {
            return;
        }
        let text = self.full_text();
        if !text.is_empty() && looks_complete(&text, self.cfg.expect_punctuation) {
            self.likely = Some(text.clone());
            out.push(TurnEvent::Likely(text));
        }
    }

    fn candidate(&mut self, now: Instant, out: &mut Vec<TurnEvent>) {
        let text = self.committed.trim().to_string();
        if text.is_empty() {
            return;
        }
        if let Some(l) = &self.likely
            && !same_words(l, &text)
        {
            self.likely = None;
            out.push(TurnEvent::Resumed);
        }
        let complete = looks_complete(&text, self.cfg.expect_punctuation);
        let (judge, deadline) = if self.cfg.llm_judge {
            self.judge_request = Some(text.clone());
            (Judge::Waiting, now + self.cfg.judge_deadline)
        } else {
            (Judge::Off, now + self.cfg.incomplete_extra_wait)
        };
        self.pending = Some(Pending {
            text: text.clone(),
            since: now,
            deadline,
            heuristic_complete: complete,
            judge,
        });
        if judge == Judge::Off && complete {
            self.confirm(out);
            return;
        }
        if self.cfg.preemptive && self.likely.is_none() {
            self.likely = Some(text.clone());
            out.push(TurnEvent::Likely(text));
        }
    }

    fn confirm(&mut self, out: &mut Vec<TurnEvent>) {
        let text = match self.pending.take() {
            Some(p) => p.text,
            None => self.committed.trim().to_string(),
        };
        self.committed.clear();
        self.interim.clear();
        self.last_words = None;
        self.likely = None;
        self.judge_request = None;
        if !text.is_empty() {
            out.push(TurnEvent::Confirmed(text));
        }
    }
}

/// Words that leave a sentence hanging whatever the punctuation says (a filler, a
/// coordinating conjunction, an article or possessive determiner).
const ALWAYS_UNFINISHED: &[&str] = &[
    "um", "umm", "uh", "uhh", "uhm", "er", "erm", "hmm", "mm", "and", "but", "or", "nor",
    "because", "cause", "cuz", "although", "unless", "whereas", "a", "an", "the", "my", "your",
    "our", "their", "its", "every", "of",
];

/// Fillers and articles stay unfinished even before a question mark ("the?").
const UNFINISHED_EVEN_AS_QUESTION: &[&str] = &[
    "um", "umm", "uh", "uhh", "uhm", "er", "erm", "hmm", "mm", "a", "an", "the", "my", "your",
    "our", "their", "its", "every", "of",
];

/// Words that usually continue unless the STT punctuated an end ("What's it about?").
const UNFINISHED_UNLESS_PUNCTUATED: &[&str] = &[
    "so",
    "if",
    "when",
    "while",
    "though",
    "until",
    "than",
    "that",
    "about",
    "to",
    "for",
    "with",
    "in",
    "on",
    "at",
    "from",
    "by",
    "into",
    "like",
    "without",
    "between",
    "through",
    "over",
    "under",
    "after",
    "before",
    "during",
    "onto",
    "toward",
    "towards",
    "regarding",
    "around",
    "against",
    "across",
    "behind",
    "beyond",
    "near",
    "upon",
    "within",
    "i",
    "we",
    "they",
    "think",
    "was",
    "is",
    "are",
];

/// Short replies that are whole turns with or without punctuation.
const ACKNOWLEDGEMENTS: &[&str] = &[
    "yes", "yeah", "yep", "no", "nope", "okay", "ok", "sure", "right", "thanks", "hello", "hi",
    "hey", "bye", "goodbye", "fine", "great", "cool", "alright", "correct", "exactly",
];

/// The completeness heuristic: do these words look like a finished turn?
pub fn looks_complete(text: &str, expect_punctuation: bool) -> bool {
    let t = text.trim();
    if t.is_empty() {
        return false;
    }
    if t.ends_with("...")
        || t.ends_with('…')
        || t.ends_with(',')
        || t.ends_with(';')
        || t.ends_with(':')
        || t.ends_with('-')
        || t.ends_with('—')
    {
        return false;
    }
    let last_char = t.chars().next_back().unwrap_or(' ');
    let question = last_char == '?';
    let terminal = matches!(last_char, '.' | '!' | '?');
    let words: Vec<String> = t
        .split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let Some(last) = words.last() else {
        return false;
    };
    let last = last.as_str();
    if question {
        return !UNFINISHED_EVEN_AS_QUESTION.contains(&last);
    }
    if ALWAYS_UNFINISHED.contains(&last) {
        return false;
    }
    if terminal {
        return true;
    }
    if UNFINISHED_UNLESS_PUNCTUATED.contains(&last) {
        return false;
    }
    if expect_punctuation {
        // The STT punctuates finished sentences; only short acknowledgements pass bare.
        return words.len() <= 3 && words.iter().any(|w| ACKNOWLEDGEMENTS.contains(&w.as_str()));
    }
    true
}

/// Whether two transcripts say the same words (case, punctuation and spacing aside).
pub fn same_words(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> impl Iterator<Item = String> + '_ {
        s.split_whitespace()
            .map(|w| {
                w.chars()
                    .filter(|c| c.is_alphanumeric())
                    .flat_map(char::to_lowercase)
                    .collect::<String>()
            })
            .filter(|w| !w.is_empty())
    }
    norm(a).eq(norm(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(text: &str, speech_final: bool) -> SpeechEvent {
        SpeechEvent::Final {
            text: text.into(),
            speech_final,
        }
    }
    fn interim(text: &str) -> SpeechEvent {
        SpeechEvent::Interim { text: text.into() }
    }
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives the machine to `until`, firing deadlines as a session's timer would.
    fn advance(tt: &mut TurnTaker, now: &mut Instant, until: Instant) -> Vec<TurnEvent> {
        let mut out = Vec::new();
        while let Some(d) = tt.next_deadline() {
            if d > until {
                break;
            }
            *now = d.max(*now);
            out.extend(tt.on_deadline(*now));
        }
        *now = until;
        out
    }

    #[test]
    fn heuristic_flags_trailing_conjunctions_fillers_articles_and_open_clauses() {
        // Proves the completeness check waits for "and", "um", "the", "about" and commas.
        for unfinished in [
            "I went to the store and",
            "I went to the store and.",
            "So I was thinking, um",
            "Can you tell me about the",
            "What do you think about",
            "I need it because",
            "Well, so,",
            "I was going to...",
            "My number is",
        ] {
            assert!(!looks_complete(unfinished, true), "{unfinished}");
        }
        for finished in [
            "I went to the store.",
            "What do you think about it?",
            "Where are you from?",
            "I think so.",
            "Yes",
            "okay thanks",
            "And?",
            "See you then!",
        ] {
            assert!(looks_complete(finished, true), "{finished}");
        }
        // Without punctuation from the STT, plain words pass unless they trail off.
        assert!(looks_complete("i went to the store", false));
        assert!(!looks_complete("what do you think about", false));
        assert!(!looks_complete("i went to the store and", false));
        // With punctuation expected, a bare clause is suspicious.
        assert!(!looks_complete("i went to the store", true));
    }

    #[test]
    fn a_finished_sentence_is_confirmed_at_the_endpoint() {
        // Proves a complete final with speech_final confirms immediately, no extra wait.
        let mut tt = TurnTaker::new(TurnConfig::default());
        let now = Instant::now();
        assert!(tt.on_speech(SpeechEvent::SpeechStarted, now).is_empty());
        assert!(tt.on_speech(interim("What time"), now).is_empty());
        let ev = tt.on_speech(fin("What time is it?", true), now + ms(10));
        assert_eq!(ev, vec![TurnEvent::Confirmed("What time is it?".into())]);
        assert_eq!(tt.next_deadline(), None);
    }

    #[test]
    fn a_pause_mid_sentence_gets_no_reply_and_the_whole_sentence_is_answered() {
        // Proves "I was thinking about" + pause + "going to the gym." yields one turn.
        let mut tt = TurnTaker::new(TurnConfig::default());
        let mut now = Instant::now();
        let ev = tt.on_speech(fin("I was thinking about", true), now);
        // Likely (for preemptive generation) but not confirmed.
        assert_eq!(ev, vec![TurnEvent::Likely("I was thinking about".into())]);
        let t = now + ms(500);
        assert!(advance(&mut tt, &mut now, t).is_empty());
        // The caller goes on within the extra wait.
        let ev = tt.on_speech(interim("going to"), now);
        assert_eq!(ev, vec![TurnEvent::Resumed]);
        now += ms(400);
        let ev = tt.on_speech(fin("going to the gym tomorrow.", true), now);
        assert_eq!(
            ev,
            vec![TurnEvent::Confirmed(
                "I was thinking about going to the gym tomorrow.".into()
            )]
        );
    }

    #[test]
    fn an_unfinished_turn_is_still_answered_after_the_extra_wait() {
        // Proves the caller is never left in silence: the cap confirms trailing words.
        let mut tt = TurnTaker::new(TurnConfig::default());
        let mut now = Instant::now();
        let start = now;
        let ev = tt.on_speech(fin("I'd like to order a pizza and", true), now);
        assert_eq!(ev.len(), 1);
        let ev = advance(&mut tt, &mut now, start + ms(699));
        assert!(ev.is_empty());
        let ev = advance(&mut tt, &mut now, start + ms(700));
        assert_eq!(
            ev,
            vec![TurnEvent::Confirmed("I'd like to order a pizza and".into())]
        );
    }

    #[test]
    fn a_cough_holds_the_turn_briefly_but_does_not_swallow_it() {
        // Proves voice activity without words delays, then the pending turn confirms.
        let cfg = TurnConfig::default();
        let mut tt = TurnTaker::new(cfg.clone());
        let mut now = Instant::now();
        let start = now;
        tt.on_speech(fin("Tell me about", true), now);
        now += ms(600);
        tt.on_speech(SpeechEvent::SpeechStarted, now);
        let ev = advance(&mut tt, &mut now, start + ms(999));
        assert!(ev.is_empty());
        let ev = advance(&mut tt, &mut now, start + ms(1000));
        assert_eq!(ev, vec![TurnEvent::Confirmed("Tell me about".into())]);
    }

    #[test]
    fn utterance_end_confirms_a_turn_without_an_endpoint() {
        // Proves UtteranceEnd alone ends a turn (Deepgram's noise-robust signal).
        let mut tt = TurnTaker::new(TurnConfig::default());
        let now = Instant::now();
        tt.on_speech(fin("Book a table for two.", false), now);
        let ev = tt.on_speech(SpeechEvent::UtteranceEnd, now + ms(1000));
        assert_eq!(
            ev,
            vec![TurnEvent::Confirmed("Book a table for two.".into())]
        );
    }

    #[test]
    fn lost_endpoint_messages_do_not_leave_the_caller_waiting_forever() {
        // Proves stale transcripts (no speech_final, no UtteranceEnd) still end the turn.
        let cfg = TurnConfig::default();
        let stale = cfg.stale_after;
        let mut tt = TurnTaker::new(cfg);
        let mut now = Instant::now();
        let start = now;
        tt.on_speech(interim("Is anybody there?"), now);
        let ev = advance(&mut tt, &mut now, start + stale);
        assert_eq!(ev, vec![TurnEvent::Confirmed("Is anybody there?".into())]);
    }

    #[test]
    fn local_silence_starts_preemption_and_matching_final_confirms() {
        // Proves quiet audio + complete-looking words emit Likely before the endpoint.
        let mut tt = TurnTaker::new(TurnConfig::default());
        let now = Instant::now();
        tt.on_speech(SpeechEvent::Voice { active: true }, now);
        tt.on_speech(interim("I love pizza."), now + ms(100));
        let ev = tt.on_speech(SpeechEvent::Voice { active: false }, now + ms(200));
        assert_eq!(ev, vec![TurnEvent::Likely("I love pizza.".into())]);
        let ev = tt.on_speech(fin("I love pizza.", true), now + ms(500));
        assert_eq!(ev, vec![TurnEvent::Confirmed("I love pizza.".into())]);
    }

    #[test]
    fn a_late_interim_with_different_words_withdraws_the_likely_turn() {
        // Proves Resumed when the transcript catches up with different words.
        let mut tt = TurnTaker::new(TurnConfig::default());
        let now = Instant::now();
        tt.on_speech(SpeechEvent::Voice { active: true }, now);
        tt.on_speech(interim("I love."), now);
        let ev = tt.on_speech(SpeechEvent::Voice { active: false }, now + ms(100));
        assert_eq!(ev, vec![TurnEvent::Likely("I love.".into())]);
        let ev = tt.on_speech(interim("I love pizza."), now + ms(150));
        assert_eq!(
            ev,
            vec![
                TurnEvent::Resumed,
                TurnEvent::Likely("I love pizza.".into())
            ]
        );
        let ev = tt.on_speech(fin("I love pizza!", true), now + ms(400));
        assert_eq!(ev, vec![TurnEvent::Confirmed("I love pizza!".into())]);
    }

    #[test]
    fn the_judge_can_confirm_an_unfinished_looking_turn_early() {
        // Proves a fast "finished" verdict beats the extra wait.
        let cfg = TurnConfig {
            llm_judge: true,
            ..TurnConfig::default()
        };
        let mut tt = TurnTaker::new(cfg);
        let now = Instant::now();
        let ev = tt.on_speech(fin("It's about", true), now);
        assert_eq!(ev, vec![TurnEvent::Likely("It's about".into())]);
        assert_eq!(tt.take_judge_request().as_deref(), Some("It's about"));
        let ev = tt.on_judgement("It's about", Some(true), now + ms(80));
        assert_eq!(ev, vec![TurnEvent::Confirmed("It's about".into())]);
    }

    #[test]
    fn a_slow_judge_is_ignored_and_the_heuristic_decides_at_the_deadline() {
        // Proves the judge's deadline: a complete sentence confirms at 150 ms without it.
        let cfg = TurnConfig {
            llm_judge: true,
            ..TurnConfig::default()
        };
        let deadline = cfg.judge_deadline;
        let mut tt = TurnTaker::new(cfg);
        let mut now = Instant::now();
        let start = now;
        tt.on_speech(fin("Thanks, that's all.", true), now);
        assert!(tt.take_judge_request().is_some());
        let ev = advance(&mut tt, &mut now, start + deadline);
        assert_eq!(ev, vec![TurnEvent::Confirmed("Thanks, that's all.".into())]);
        // A verdict arriving afterwards changes nothing.
        assert!(
            tt.on_judgement("Thanks, that's all.", Some(false), now + ms(50))
                .is_empty()
        );
    }

    #[test]
    fn the_judge_saying_unfinished_extends_to_the_extra_wait() {
        // Proves an "unfinished" verdict waits the extra time, then still answers.
        let cfg = TurnConfig {
            llm_judge: true,
            ..TurnConfig::default()
        };
        let mut tt = TurnTaker::new(cfg);
        let mut now = Instant::now();
        let start = now;
        tt.on_speech(fin("I want the blue one.", true), now);
        let ev = tt.on_judgement("I want the blue one.", Some(false), now + ms(60));
        assert!(ev.is_empty());
        let ev = advance(&mut tt, &mut now, start + ms(699));
        assert!(ev.is_empty());
        let ev = advance(&mut tt, &mut now, start + ms(700));
        assert_eq!(
            ev,
            vec![TurnEvent::Confirmed("I want the blue one.".into())]
        );
    }

    #[test]
    fn same_words_ignores_case_and_punctuation() {
        // Proves Likely/Confirmed matching tolerates smart-format differences.
        assert!(same_words("I love pizza.", "i love   Pizza!"));
        assert!(!same_words("I love pizza", "I love pizza too"));
    }
}
