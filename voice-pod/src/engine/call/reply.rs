//! The reply lifecycle, sans-IO: which replies exist (the audible one and at most one
//! preemptive one), which TTS contexts and playout chunks belong to each, when a held
//! reply is released or discarded, and what of a reply enters the history (only what
//! the caller heard).
//!
//! Nothing here awaits: the call loop turns the answers into LLM tasks, TTS commands
//! and Twilio messages (`speak.rs`), so every rule below is unit-tested with a real
//! [`Playout`] and [`History`] and no sockets.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::engine::greeting_cache::Phrase;
use crate::engine::playout::{Heard, Playout};
use crate::engine::prompt::History;
use crate::engine::turn_taking::same_words;

/// Where a reply's words come from.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Source {
    /// An answer to the caller's words.
    Llm { user_text: String },
    /// A static phrase.
    Phrase(Phrase),
}

/// Per-reply timestamps for `voice_turn_latency_seconds`.
#[derive(Debug, Default)]
pub(super) struct Timing {
    /// The caller's last voiced frame before the turn (end of speech, as the pod saw it).
    pub(super) speech_end: Option<Instant>,
    pub(super) confirmed: Option<Instant>,
    pub(super) llm_start: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    pub(super) first_tts_text: Option<Instant>,
    pub(super) first_tts_audio: Option<Instant>,
    pub(super) first_frame: Option<Instant>,
}

/// One thing the persona says.
pub(super) struct Reply {
    pub(super) id: u64,
    pub(super) source: Source,
    /// Preemptive: generated before the turn was confirmed, not audible yet.
    pub(super) held: bool,
    /// Stops this reply's LLM task.
    pub(super) cancel: CancellationToken,
    /// No more chunks will come.
    pub(super) llm_done: bool,
    pub(super) got_content: bool,
    /// Chunk texts waiting for a TTS slot.
    pub(super) queued: VecDeque<String>,
    /// Playout chunk ids.
    pub(super) chunks: Vec<u64>,
    /// Open TTS contexts.
    pub(super) contexts: Vec<String>,
    next_context: u32,
    /// Everything this reply says.
    pub(super) text: String,
    /// Whether `text` is in the history yet.
    pub(super) in_history: bool,
    /// The model called `end_call`: once this reply has played, the call ends.
    pub(super) ends_call: bool,
    /// Seconds of caller audio sent to the STT when the reply started: caller speech
    /// stamped earlier belongs to the turn this reply answers, not to an interruption.
    pub(super) audio_start: f64,
    pub(super) timing: Timing,
    pub(super) span: Span,
}

impl Reply {
    pub(super) fn new(
        id: u64,
        source: Source,
        held: bool,
        cancel: CancellationToken,
        audio_start: f64,
        span: Span,
    ) -> Self {
        Self {
            id,
            source,
            held,
            cancel,
            llm_done: false,
            got_content: false,
            queued: VecDeque::new(),
            chunks: Vec::new(),
            contexts: Vec::new(),
            next_context: 0,
            text: String::new(),
            in_history: false,
            ends_call: false,
            audio_start,
            timing: Timing::default(),
            span,
        }
    }

    fn finished_generating(&self) -> bool {
        self.llm_done && self.queued.is_empty() && self.contexts.is_empty()
    }

    /// Adds words to what this reply says.
    pub(super) fn add_text(&mut self, text: &str) {
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        self.text.push_str(text);
        self.got_content = true;
    }

    /// Puts what this reply says into the history, once.
    fn commit(&mut self, history: &mut History) {
        if !self.in_history {
            self.in_history = true;
            history.push_assistant(&self.text);
        }
    }
}

/// A chunk of reply text that got a TTS context and a playout chunk: send it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TtsJob {
    pub(super) reply: u64,
    pub(super) context: String,
    pub(super) text: String,
    chunk: u64,
}

/// How a reply's generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Generated {
    /// It said something (now in the history unless held).
    Words,
    /// The model gave no words: say the fallback phrase (or drop a held reply).
    Nothing,
}

/// The audible reply, cut: what the caller heard and the TTS contexts to cancel.
pub(super) struct Interrupted {
    pub(super) reply: Reply,
    pub(super) heard: Heard,
    pub(super) contexts: Vec<String>,
}

/// The call's replies: the audible one, the preemptive one, and their TTS contexts.
pub(super) struct Replies {
    active: Option<Reply>,
    spec: Option<Reply>,
    next_id: u64,
    /// TTS context -> (reply id, playout chunk id).
    contexts: HashMap<String, (u64, u64)>,
    max_in_flight: usize,
}

impl Replies {
    /// No replies; at most `max_in_flight` TTS contexts open at once.
    pub(super) fn new(max_in_flight: usize) -> Self {
        Self {
            active: None,
            spec: None,
            next_id: 0,
            contexts: HashMap::new(),
            max_in_flight,
        }
    }

    pub(super) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The reply the caller hears (or is about to).
    pub(super) fn active(&self) -> Option<&Reply> {
        self.active.as_ref()
    }

    pub(super) fn active_mut(&mut self) -> Option<&mut Reply> {
        self.active.as_mut()
    }

    pub(super) fn get(&self, id: u64) -> Option<&Reply> {
        [self.active.as_ref(), self.spec.as_ref()]
            .into_iter()
            .flatten()
            .find(|r| r.id == id)
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut Reply> {
        [self.active.as_mut(), self.spec.as_mut()]
            .into_iter()
            .flatten()
            .find(|r| r.id == id)
    }

    /// A new reply: held ones wait as the preemptive reply, others are audible. The
    /// caller makes room first (discard the preemptive one, interrupt the audible one).
    pub(super) fn start(&mut self, r: Reply) {
        if r.held {
            self.spec = Some(r);
        } else {
            self.active = Some(r);
        }
    }

    pub(super) fn take_spec(&mut self) -> Option<Reply> {
        self.spec.take()
    }

    /// The caller's turn is confirmed with `user_text`: a held reply to the same words
    /// becomes audible at once (`true`). Otherwise nothing changes (`false`): the
    /// caller discards the preemptive reply and asks again.
    pub(super) fn confirm(
        &mut self,
        user_text: &str,
        speech_end: Option<Instant>,
        now: Instant,
        history: &mut History,
        playout: &mut Playout,
    ) -> bool {
        let matching = self.spec.as_ref().is_some_and(|s| match &s.source {
            Source::Llm { user_text: t } => same_words(t, user_text),
            Source::Phrase(_) => false,
        });
        if !matching {
            return false;
        }
        let Some(mut r) = self.spec.take() else {
            return false;
        };
        history.push_user(user_text);
        r.held = false;
        r.timing.speech_end = speech_end;
        r.timing.confirmed = Some(now);
        if r.llm_done && !r.text.is_empty() {
            r.commit(history);
        }
        playout.release_held();
        self.active = Some(r);
        true
    }

    /// A chunk of model text for reply `id`; `false` if the reply is gone.
    pub(super) fn on_chunk(&mut self, id: u64, text: String) -> bool {
        let Some(r) = self.get_mut(id) else {
            return false;
        };
        r.add_text(&text);
        r.queued.push_back(text);
        true
    }

    /// The model finished (or failed) reply `id`; `None` if the reply is gone. What an
    /// audible reply said enters the history now; a held one's waits for confirmation.
    pub(super) fn generation_ended(&mut self, id: u64, history: &mut History) -> Option<Generated> {
        let r = self.get_mut(id)?;
        r.llm_done = true;
        if !r.got_content {
            return Some(Generated::Nothing);
        }
        if !r.held {
            r.commit(history);
        }
        Some(Generated::Words)
    }

    /// Puts reply `id`'s words into the history (a phrase, a fallback), once.
    pub(super) fn commit(&mut self, id: u64, history: &mut History) {
        if let Some(r) = self.get_mut(id) {
            r.commit(history);
        }
    }

    /// Gives the next queued text a TTS context and a playout chunk while slots are
    /// free: the audible reply first, then the preemptive one.
    pub(super) fn next_tts_job(&mut self, playout: &mut Playout, now: Instant) -> Option<TtsJob> {
        if self.contexts.len() >= self.max_in_flight {
            return None;
        }
        let r = [self.active.as_mut(), self.spec.as_mut()]
            .into_iter()
            .flatten()
            .find(|r| !r.queued.is_empty())?;
        let text = r.queued.pop_front()?;
        let context = format!("r{}c{}", r.id, r.next_context);
        r.next_context += 1;
        let chunk = if r.held {
            playout.begin_held_chunk(text.clone())
        } else {
            playout.begin_chunk(text.clone())
        };
        r.chunks.push(chunk);
        r.contexts.push(context.clone());
        r.timing.first_tts_text.get_or_insert(now);
        let reply = r.id;
        self.contexts.insert(context.clone(), (reply, chunk));
        Some(TtsJob {
            reply,
            context,
            text,
            chunk,
        })
    }

    /// The TTS refused a job: its text goes back first in line for the next session.
    pub(super) fn tts_job_failed(&mut self, job: TtsJob, playout: &mut Playout) {
        self.context_done(&job.context, playout);
        if let Some(r) = self.get_mut(job.reply) {
            r.queued.push_front(job.text);
        }
        playout.discard(&[job.chunk]);
    }

    /// Audio for a TTS context; `false` if the context is no longer wanted.
    pub(super) fn on_tts_audio(
        &mut self,
        context: &str,
        mulaw: &[u8],
        playout: &mut Playout,
        now: Instant,
    ) -> bool {
        let Some(&(reply, chunk)) = self.contexts.get(context) else {
            return false;
        };
        playout.push_audio(chunk, mulaw);
        if let Some(r) = self.get_mut(reply) {
            r.timing.first_tts_audio.get_or_insert(now);
        }
        true
    }

    /// A TTS context delivered all its audio: its slot is free.
    pub(super) fn context_done(&mut self, context: &str, playout: &mut Playout) {
        if let Some((reply, chunk)) = self.contexts.remove(context) {
            playout.end_chunk(chunk);
            if let Some(r) = self.get_mut(reply) {
                r.contexts.retain(|c| c != context);
            }
        }
    }

    /// The TTS session is gone: what arrived of open contexts plays, the rest of their
    /// text is lost with the session. Returns the closed contexts.
    pub(super) fn close_open_contexts(&mut self, playout: &mut Playout) -> Vec<String> {
        let open: Vec<String> = self.contexts.keys().cloned().collect();
        for c in &open {
            self.context_done(c, playout);
        }
        open
    }

    /// No voice will come back: replies stop waiting for one, so the call cannot hang.
    pub(super) fn drop_queued_text(&mut self) {
        for r in [self.active.as_mut(), self.spec.as_mut()]
            .into_iter()
            .flatten()
        {
            r.queued.clear();
        }
    }

    /// Cancels a reply taken out of the book: its LLM task, TTS slots and unsent
    /// audio. Returns its TTS contexts, to cancel at the provider.
    pub(super) fn cancel(&mut self, r: &Reply, playout: &mut Playout) -> Vec<String> {
        r.cancel.cancel();
        for c in &r.contexts {
            self.contexts.remove(c);
        }
        playout.discard(&r.chunks);
        r.contexts.clone()
    }

    /// The audible reply, if it is fully generated and the caller heard all of it,
    /// leaves with the text the caller heard.
    pub(super) fn take_played(&mut self, playout: &mut Playout) -> Option<(Reply, String)> {
        let done = self.active.as_ref().is_some_and(|r| {
            r.finished_generating() && r.chunks.iter().all(|c| playout.chunk_played(*c))
        });
        if !done {
            return None;
        }
        let r = self.active.take()?;
        let heard = playout.take_heard();
        let text = if heard.is_empty() {
            r.text.clone()
        } else {
            heard
        };
        Some((r, text))
    }

    /// Cuts the audible reply: the history keeps only what the caller heard of it.
    pub(super) fn interrupt(
        &mut self,
        now: Instant,
        playout: &mut Playout,
        history: &mut History,
    ) -> Option<Interrupted> {
        let heard = playout.interrupt(now);
        let reply = self.active.take()?;
        let contexts = self.cancel(&reply, playout);
        if reply.in_history {
            history.amend_last_assistant(&heard.text);
        } else if !heard.text.is_empty() {
            history.push_assistant(&heard.text);
        }
        Some(Interrupted {
            reply,
            heard,
            contexts,
        })
    }

    /// The call ends while the persona talks: the audible reply and what was heard of
    /// it (nothing of a held one, which the caller never heard).
    pub(super) fn take_unfinished(
        &mut self,
        now: Instant,
        playout: &mut Playout,
    ) -> Option<(Reply, Heard)> {
        let r = self.active.take()?;
        if r.held {
            return None;
        }
        let heard = playout.interrupt(now);
        Some((r, heard))
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Duration;

    use super::*;
    use crate::engine::playout::{PlayoutConfig, PlayoutOut};
    use crate::engine::prompt::Role;
    use crate::session::FRAME_BYTES;

    struct World {
        replies: Replies,
        playout: Playout,
        history: History,
        now: Instant,
    }

    impl World {
        fn new() -> Self {
            Self {
                replies: Replies::new(3),
                playout: Playout::new(PlayoutConfig::default(), "c"),
                history: History::new(20),
                now: Instant::now(),
            }
        }

        fn reply(&mut self, user_text: &str, held: bool) -> u64 {
            let id = self.replies.next_id();
            let source = Source::Llm {
                user_text: user_text.into(),
            };
            let r = Reply::new(
                id,
                source,
                held,
                CancellationToken::new(),
                0.0,
                Span::none(),
            );
            self.replies.start(r);
            id
        }

        /// The model says `chunks` and finishes; each chunk's TTS context delivers
        /// one frame of audio and closes.
        fn generate(&mut self, id: u64, chunks: &[&str]) -> Option<Generated> {
            for c in chunks {
                assert!(self.replies.on_chunk(id, (*c).into()));
            }
            let out = self.replies.generation_ended(id, &mut self.history);
            while let Some(job) = self.replies.next_tts_job(&mut self.playout, self.now) {
                let audio = vec![0x55; FRAME_BYTES];
                assert!(self.replies.on_tts_audio(
                    &job.context,
                    &audio,
                    &mut self.playout,
                    self.now
                ));
                self.replies.context_done(&job.context, &mut self.playout);
            }
            out
        }

        /// Sends what the playout releases and echoes every mark (the caller heard it).
        fn play_all(&mut self) -> usize {
            let mut frames = 0;
            for _ in 0..50 {
                self.now += Duration::from_millis(20);
                for o in self.playout.poll(self.now) {
                    match o {
                        PlayoutOut::Audio(a) => frames += a.len() / FRAME_BYTES,
                        PlayoutOut::Mark(m) => {
                            self.playout.on_mark(&m);
                        }
                    }
                }
            }
            frames
        }

        fn history(&self) -> Vec<(Role, String)> {
            self.history
                .entries()
                .map(|m| (m.role, m.content.clone()))
                .collect()
        }
    }

    #[test]
    fn a_held_reply_is_silent_until_the_same_words_confirm_it() {
        let mut w = World::new();
        let id = w.reply("book a table for two", true);
        assert_eq!(w.generate(id, &["Sure, for when?"]), Some(Generated::Words));
        assert_eq!(w.play_all(), 0, "held audio waits");
        assert!(w.history().is_empty(), "nothing said yet");

        let (now, end) = (w.now, Some(w.now));
        assert!(w.replies.confirm(
            "Book a table for two.",
            end,
            now,
            &mut w.history,
            &mut w.playout
        ));
        assert_eq!(w.play_all(), 1, "released at confirmation");
        assert_eq!(
            w.history(),
            vec![
                (Role::User, "Book a table for two.".into()),
                (Role::Assistant, "Sure, for when?".into())
            ]
        );
        let (r, heard) = w.replies.take_played(&mut w.playout).expect("played out");
        assert_eq!((r.id, heard.as_str()), (id, "Sure, for when?"));
        assert_eq!(r.timing.confirmed, Some(now));
    }

    #[test]
    fn a_held_reply_to_other_words_is_not_confirmed_and_cancelling_it_frees_its_slots() {
        let mut w = World::new();
        let id = w.reply("book a table", true);
        assert!(w.replies.on_chunk(id, "Sure.".into()));
        let job = w
            .replies
            .next_tts_job(&mut w.playout, w.now)
            .expect("a slot");
        assert_eq!(job.context, "r0c0");
        let (now, end) = (w.now, None);
        assert!(!w.replies.confirm(
            "book a table for two",
            end,
            now,
            &mut w.history,
            &mut w.playout
        ));
        assert!(
            w.history().is_empty(),
            "the caller's words are the loop's to add"
        );

        let spec = w.replies.take_spec().expect("still there");
        let token = spec.cancel.clone();
        assert_eq!(w.replies.cancel(&spec, &mut w.playout), vec!["r0c0"]);
        assert!(token.is_cancelled(), "its LLM task stops");
        assert!(
            !w.replies
                .on_tts_audio("r0c0", &[0x55; FRAME_BYTES], &mut w.playout, w.now),
            "late audio of a cancelled context is dropped"
        );
        assert_eq!(w.replies.contexts.len(), 0, "the TTS slot is free");
        assert_eq!(w.play_all(), 0);
    }

    #[test]
    fn an_interrupted_reply_leaves_only_what_was_heard_in_the_history() {
        let mut w = World::new();
        w.history.push_user("Tell me a story.");
        let id = w.reply("Tell me a story.", false);
        // Two chunks: the first fully played, the second never sent.
        assert!(w.replies.on_chunk(id, "Once upon a time.".into()));
        assert!(w.replies.on_chunk(id, "There was a dragon.".into()));
        let first = w.replies.next_tts_job(&mut w.playout, w.now).expect("slot");
        let second = w.replies.next_tts_job(&mut w.playout, w.now).expect("slot");
        w.replies
            .on_tts_audio(&first.context, &[0x55; FRAME_BYTES], &mut w.playout, w.now);
        w.replies.context_done(&first.context, &mut w.playout);
        assert_eq!(w.play_all(), 1);

        let now = w.now;
        let cut = w
            .replies
            .interrupt(now, &mut w.playout, &mut w.history)
            .expect("an audible reply");
        assert_eq!(cut.reply.id, id);
        assert_eq!(cut.heard.text, "Once upon a time.—", "marked as cut");
        assert_eq!(
            cut.contexts,
            vec![second.context],
            "the open context is cancelled"
        );
        assert!(cut.reply.cancel.is_cancelled());
        assert_eq!(
            w.history().last(),
            Some(&(Role::Assistant, "Once upon a time.—".into()))
        );
        assert!(w.replies.active().is_none());
    }

    #[test]
    fn a_reply_already_in_the_history_is_amended_to_what_was_heard() {
        let mut w = World::new();
        w.history.push_user("Hi.");
        let id = w.reply("Hi.", false);
        // Generation finished (text in the history), nothing played yet.
        assert!(w.replies.on_chunk(id, "Hello there, how are you?".into()));
        assert_eq!(
            w.replies.generation_ended(id, &mut w.history),
            Some(Generated::Words)
        );
        assert_eq!(
            w.history().last(),
            Some(&(Role::Assistant, "Hello there, how are you?".into()))
        );
        let now = w.now;
        let cut = w.replies.interrupt(now, &mut w.playout, &mut w.history);
        assert_eq!(cut.map(|c| c.heard.text), Some(String::new()));
        assert_eq!(
            w.history(),
            vec![(Role::User, "Hi.".into())],
            "an unheard reply leaves the history"
        );
    }

    #[test]
    fn a_model_that_says_nothing_asks_for_the_fallback() {
        let mut w = World::new();
        let id = w.reply("Hi.", false);
        assert_eq!(w.generate(id, &[]), Some(Generated::Nothing));
        assert!(w.history().is_empty());
        // The loop appends the fallback phrase, then commits it once.
        w.replies
            .get_mut(id)
            .expect("still active")
            .add_text("Sorry?");
        w.replies.commit(id, &mut w.history);
        w.replies.commit(id, &mut w.history);
        assert_eq!(w.history(), vec![(Role::Assistant, "Sorry?".into())]);
        assert_eq!(w.replies.generation_ended(99, &mut w.history), None);
    }

    #[test]
    fn the_audible_reply_gets_tts_slots_before_the_preemptive_one_and_at_most_three() {
        let mut w = World::new();
        let audible = w.reply("a", false);
        let held = w.reply("b", true);
        for t in ["1.", "2."] {
            assert!(w.replies.on_chunk(held, t.into()));
        }
        for t in ["x.", "y.", "z."] {
            assert!(w.replies.on_chunk(audible, t.into()));
        }
        let jobs: Vec<String> = std::iter::from_fn(|| {
            w.replies
                .next_tts_job(&mut w.playout, w.now)
                .map(|j| j.context)
        })
        .collect();
        assert_eq!(jobs, vec!["r0c0", "r0c1", "r0c2"]);
        w.replies.context_done("r0c0", &mut w.playout);
        let next = w.replies.next_tts_job(&mut w.playout, w.now);
        assert_eq!(next.map(|j| j.context), Some("r1c0".into()));
    }

    #[test]
    fn text_the_tts_refused_is_sent_first_on_the_next_session() {
        let mut w = World::new();
        let id = w.reply("a", false);
        assert!(w.replies.on_chunk(id, "One.".into()));
        assert!(w.replies.on_chunk(id, "Two.".into()));
        let job = w.replies.next_tts_job(&mut w.playout, w.now).expect("slot");
        w.replies.tts_job_failed(job, &mut w.playout);
        let retry = w.replies.next_tts_job(&mut w.playout, w.now).expect("slot");
        assert_eq!(
            (retry.context.as_str(), retry.text.as_str()),
            ("r0c1", "One.")
        );
    }

    #[test]
    fn a_lost_tts_session_closes_open_contexts_and_keeps_what_arrived() {
        let mut w = World::new();
        let id = w.reply("a", false);
        assert!(w.replies.on_chunk(id, "One.".into()));
        let job = w.replies.next_tts_job(&mut w.playout, w.now).expect("slot");
        w.replies
            .on_tts_audio(&job.context, &[0x55; FRAME_BYTES], &mut w.playout, w.now);
        assert_eq!(w.replies.close_open_contexts(&mut w.playout), vec!["r0c0"]);
        assert!(w.replies.on_chunk(id, "Two.".into()));
        w.replies.drop_queued_text();
        assert_eq!(
            w.replies.generation_ended(id, &mut w.history),
            Some(Generated::Words)
        );
        assert_eq!(w.play_all(), 1, "the audio that arrived plays");
        let (_, heard) = w.replies.take_played(&mut w.playout).expect("done");
        assert_eq!(heard, "One.");
    }

    #[test]
    fn a_reply_is_not_done_until_generated_and_heard() {
        let mut w = World::new();
        let id = w.reply("a", false);
        assert!(w.replies.on_chunk(id, "One.".into()));
        assert!(
            w.replies.take_played(&mut w.playout).is_none(),
            "generating"
        );
        w.generate(id, &[]);
        assert!(w.replies.take_played(&mut w.playout).is_none(), "not heard");
        w.play_all();
        assert!(w.replies.take_played(&mut w.playout).is_some());
    }

    #[test]
    fn a_reply_unfinished_at_the_end_of_the_call_is_taken_as_cut() {
        let mut w = World::new();
        let id = w.reply("a", false);
        w.generate(id, &["Hello."]);
        let now = w.now;
        let (r, heard) = w
            .replies
            .take_unfinished(now, &mut w.playout)
            .expect("audible");
        assert_eq!((r.id, heard.truncated), (id, true));
        assert!(w.replies.take_unfinished(now, &mut w.playout).is_none());
    }
}
