//! A call's clock: the idle prompt and idle goodbye, the maximum duration, the bounded
//! goodbye before the hangup, and picking up after a wordless interruption.
//! [`CallTimers`] is sans-IO (deadlines in, decisions out); the `impl Call` below
//! acts on its decisions.

use tokio::time::{Duration, Instant};
use tracing::info;

use super::Call;
use crate::engine::greeting_cache::Phrase;
use crate::session::{CallEnd, CallOutput};

/// What the idle timer asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IdleStep {
    /// First silence: ask whether the caller is still there.
    Prompt,
    /// Silence after the prompt: say goodbye.
    Goodbye,
}

/// The deadlines of one call.
#[derive(Debug)]
pub(super) struct CallTimers {
    /// Idle countdown starts here (the caller's last activity or the persona's last words).
    idle_from: Instant,
    idle: Duration,
    idle_prompted: bool,
    call_deadline: Instant,
    /// Saying goodbye: the hang-up reason and its deadline.
    ending: Option<(&'static str, Instant)>,
    /// After a wordless barge-in, when to pick the conversation up again.
    resume_deadline: Option<Instant>,
}

impl CallTimers {
    /// Timers from `now`: idle after `idle` without activity, the call cut at
    /// `call_deadline`.
    pub(super) fn new(now: Instant, idle: Duration, call_deadline: Instant) -> Self {
        Self {
            idle_from: now,
            idle,
            idle_prompted: false,
            call_deadline,
            ending: None,
            resume_deadline: None,
        }
    }

    /// The earliest deadline; the idle countdown pauses while the persona is `busy`.
    pub(super) fn next(&self, busy: bool) -> Option<Instant> {
        let ending = self.ending.map(|(_, d)| d);
        [
            (!busy && ending.is_none()).then_some(self.idle_from + self.idle),
            ending.is_none().then_some(self.call_deadline),
            ending,
            self.resume_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The caller or the persona did something: the idle countdown restarts.
    pub(super) fn activity(&mut self, now: Instant) {
        self.idle_from = now;
    }

    /// The caller took a turn: restart idle, re-arm the prompt, no pick-up pending.
    pub(super) fn caller_turn(&mut self, now: Instant) {
        self.idle_from = now;
        self.idle_prompted = false;
        self.resume_deadline = None;
    }

    /// A barge-in without words: pick up again after `after` unless the caller talks.
    pub(super) fn resume_after(&mut self, now: Instant, after: Duration) {
        self.resume_deadline = Some(now + after);
    }

    /// Whether the pick-up after a wordless barge-in is due (reported once).
    pub(super) fn take_resume_due(&mut self, now: Instant) -> bool {
        if self.resume_deadline.is_some_and(|d| now >= d) {
            self.resume_deadline = None;
            return true;
        }
        false
    }

    /// Starts the goodbye; `false` if one is already under way.
    pub(super) fn begin_ending(&mut self, reason: &'static str, deadline: Instant) -> bool {
        if self.ending.is_some() {
            return false;
        }
        self.ending = Some((reason, deadline));
        true
    }

    /// Why the call is ending, once the goodbye has begun.
    pub(super) fn ending(&self) -> Option<&'static str> {
        self.ending.map(|(reason, _)| reason)
    }

    /// The goodbye took too long: hang up anyway.
    pub(super) fn goodbye_overdue(&self, now: Instant) -> bool {
        self.ending.is_some_and(|(_, d)| now >= d)
    }

    /// The call reached its maximum duration (and is not ending already).
    pub(super) fn max_duration_reached(&self, now: Instant) -> bool {
        self.ending.is_none() && now >= self.call_deadline
    }

    /// What the idle countdown asks for at `now`, if anything.
    pub(super) fn idle_step(&mut self, now: Instant, busy: bool) -> Option<IdleStep> {
        if busy || self.ending.is_some() || now < self.idle_from + self.idle {
            return None;
        }
        if self.idle_prompted {
            return Some(IdleStep::Goodbye);
        }
        self.idle_prompted = true;
        self.idle_from = now;
        Some(IdleStep::Prompt)
    }
}

impl Call {
    /// Whether the persona is talking or about to (the idle countdown waits).
    pub(super) fn busy(&self, now: Instant) -> bool {
        self.replies.active().is_some() || self.playout.is_speaking(now)
    }

    pub(super) async fn on_timers(&mut self, now: Instant) {
        let evs = self.turn.on_deadline(now);
        self.on_turn_events(evs, now).await;
        self.playout.expire_marks(now);
        if self.timers.goodbye_overdue(now) {
            self.hang_up().await;
            return;
        }
        if self.timers.max_duration_reached(now) {
            info!("maximum call duration reached");
            self.begin_ending("max_duration", now).await;
            return;
        }
        if self.keys.take_due(now) && !self.turn.has_words() && !self.keys.is_empty() {
            self.user_turn(String::new(), now).await;
        }
        if self.timers.take_resume_due(now)
            && !self.turn.has_words()
            && self.replies.active().is_none()
            && self.timers.ending().is_none()
        {
            // Interrupted by a sound, not words: pick the conversation up again.
            self.start_answer("[the caller made a sound but said nothing]".into(), now)
                .await;
        }
        match self.timers.idle_step(now, self.busy(now)) {
            Some(IdleStep::Goodbye) => {
                info!("caller idle after the prompt; saying goodbye");
                self.begin_ending("idle", now).await;
            }
            Some(IdleStep::Prompt) => {
                info!("caller idle; prompting");
                self.say_phrase(Phrase::IdlePrompt).await;
            }
            None => {}
        }
    }

    /// Cuts whatever is in progress and says goodbye; the hangup follows when the
    /// goodbye has played or its deadline passes.
    pub(super) async fn begin_ending(&mut self, reason: &'static str, now: Instant) {
        if self.timers.ending().is_some() {
            return;
        }
        self.discard_spec().await;
        if self.replies.active().is_some() {
            self.interrupt_active(now, true).await;
        }
        self.timers
            .begin_ending(reason, now + self.shared.settings.goodbye_timeout);
        self.say_phrase(Phrase::Goodbye).await;
    }

    pub(super) async fn hang_up(&mut self) {
        let Some(reason) = self.timers.ending() else {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn silence_prompts_once_then_says_goodbye_and_activity_restarts_the_count() {
        let t0 = Instant::now();
        let mut t = CallTimers::new(t0, s(10), t0 + s(600));
        assert_eq!(t.next(false), Some(t0 + s(10)));
        assert_eq!(t.idle_step(t0 + s(9), false), None);
        assert_eq!(t.idle_step(t0 + s(10), false), Some(IdleStep::Prompt));
        assert_eq!(
            t.next(false),
            Some(t0 + s(20)),
            "counts again from the prompt"
        );
        t.activity(t0 + s(15));
        assert_eq!(t.idle_step(t0 + s(20), false), None);
        assert_eq!(t.idle_step(t0 + s(25), false), Some(IdleStep::Goodbye));
        t.caller_turn(t0 + s(26));
        assert_eq!(
            t.idle_step(t0 + s(36), false),
            Some(IdleStep::Prompt),
            "a caller turn re-arms the prompt"
        );
    }

    #[test]
    fn the_idle_count_waits_while_the_persona_talks() {
        let t0 = Instant::now();
        let mut t = CallTimers::new(t0, s(10), t0 + s(600));
        assert_eq!(t.next(true), Some(t0 + s(600)));
        assert_eq!(t.idle_step(t0 + s(30), true), None);
    }

    #[test]
    fn the_maximum_duration_starts_one_bounded_goodbye() {
        let t0 = Instant::now();
        let mut t = CallTimers::new(t0, s(10), t0 + s(60));
        assert!(!t.max_duration_reached(t0 + s(59)));
        assert!(t.max_duration_reached(t0 + s(60)));
        assert!(t.begin_ending("max_duration", t0 + s(75)));
        assert!(!t.begin_ending("idle", t0 + s(80)), "one goodbye");
        assert_eq!(t.ending(), Some("max_duration"));
        assert!(!t.max_duration_reached(t0 + s(61)), "already ending");
        assert_eq!(t.next(false), Some(t0 + s(75)), "only the goodbye deadline");
        assert_eq!(t.idle_step(t0 + s(200), false), None);
        assert!(!t.goodbye_overdue(t0 + s(74)));
        assert!(t.goodbye_overdue(t0 + s(75)));
    }

    #[test]
    fn a_wordless_interruption_is_picked_up_once_unless_the_caller_takes_a_turn() {
        let t0 = Instant::now();
        let mut t = CallTimers::new(t0, s(10), t0 + s(600));
        t.resume_after(t0, s(2));
        assert_eq!(t.next(true), Some(t0 + s(2)));
        assert!(!t.take_resume_due(t0 + s(1)));
        assert!(t.take_resume_due(t0 + s(2)));
        assert!(!t.take_resume_due(t0 + s(3)));
        t.resume_after(t0 + s(3), s(2));
        t.caller_turn(t0 + s(4));
        assert!(!t.take_resume_due(t0 + s(9)), "the caller spoke instead");
    }
}
