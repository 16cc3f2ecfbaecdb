//! The engine's one seam to persistence: what a call remembers and what it reports.
//!
//! ```text
//!  Engine::run ──open()──> Journal::load_relationship (bounded wait; None when slow/down/off)
//!       │                       └─> persona with the caller's prompt/voice, memory notes
//!       v
//!  Call loop ──CallJournal::{caller_turn, persona_turn, usage}──> Journal::submit (try_send)
//!       │
//!       └─ end ──CallJournal::finish──> call update + usage totals ──> Journal::after_call
//!                                                                   (memory summary, spawned)
//! ```
//!
//! [`Journal`] is pod-wide (defined and implemented over PostgreSQL in
//! [`crate::store::journal`]); [`CallJournal`] is one call's handle. With persistence
//! off the call gets a handle without a journal and every method returns at once.
//! Nothing here ever waits for the database on the audio path: `submit` hands the
//! record to the store's bounded writer and returns.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use callmeback_api::{CallerRecognition, PersonaSpec};
use chrono::{DateTime, Utc};

use tokio::time::Instant;
use uuid::Uuid;

use super::prompt::RelationshipContext;
use crate::phone::normalize_e164;
use crate::providers::ChatModel;
use crate::session::{CallContext, CallEnd, Direction};
use crate::store::journal::{FinishedCall, Journal};
use crate::store::records::{
    CallRef, CallStatus, CallUpdate, NewCall, Record, Speaker, TurnLatency, TurnRecord,
    UsageRecord, UsageUnit,
};

/// Transcript characters a call keeps in memory for its after-call summary (the
/// summariser reads at most [`crate::store::memory::MAX_TRANSCRIPT_CHARS`] anyway).
const MAX_KEPT_TRANSCRIPT_CHARS: usize = 2 * crate::store::memory::MAX_TRANSCRIPT_CHARS;

/// Who a call's relationship belongs to: the outbound call's `user` (the API caller
/// vouched for it), or the inbound caller's number in E.164 when the persona
/// recognises this caller ([`caller_identity`]). `None`: nobody to remember; the
/// call runs without memory and writes none.
pub fn relationship_user(ctx: &CallContext) -> Option<String> {
    match ctx.spec.direction {
        Direction::Outbound => ctx
            .spec
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned),
        Direction::Inbound => caller_identity(
            &ctx.persona,
            ctx.spec.from.as_deref(),
            ctx.caller_verstat.as_deref(),
        ),
    }
}

/// What Twilio puts in `From` when the caller withheld their number: the words and
/// their keypad spellings (ANONYMOUS, RESTRICTED, UNKNOWN, UNAVAILABLE). Every such
/// caller would otherwise share one memory.
const WITHHELD_NUMBERS: &[&str] = &[
    "anonymous",
    "restricted",
    "unknown",
    "unavailable",
    "private",
    "+266696687",
    "+7378742833",
    "+8656696",
    "+86282452253",
];

/// The inbound caller's number as a relationship key, when the persona recognises
/// callers this way: never for a withheld number; with `callerRecognition:
/// verified` only when Twilio's `StirVerstat` is one of the persona's accepted
/// attestations; with `off` never.
pub fn caller_identity(
    persona: &PersonaSpec,
    from: Option<&str>,
    verstat: Option<&str>,
) -> Option<String> {
    let from = from?.trim();
    if WITHHELD_NUMBERS
        .iter()
        .any(|w| from.eq_ignore_ascii_case(w))
    {
        return None;
    }
    let number = normalize_e164(from)?;
    if WITHHELD_NUMBERS.contains(&number.as_str()) {
        return None;
    }
    match persona.memory.caller_recognition {
        CallerRecognition::Off => None,
        CallerRecognition::CallerId => Some(number),
        CallerRecognition::Verified => verstat
            .filter(|v| persona.memory.accepted_attestations.iter().any(|a| a == v))
            .map(|_| number),
    }
}

/// Loads the caller's relationship (bounded by the journal) and returns the call as
/// this caller gets it: the persona with their prompt and voice, the memory notes for
/// the prompt, and the call's journal handle (which records the call's start).
pub(crate) async fn open(
    journal: Option<Arc<dyn Journal>>,
    pod: Option<Arc<str>>,
    mut ctx: CallContext,
) -> (CallContext, Option<RelationshipContext>, CallJournal) {
    let user_id = relationship_user(&ctx);
    let Some(journal) = journal else {
        return (ctx, None, CallJournal::disabled());
    };
    let relationship = match &user_id {
        Some(u) => {
            journal
                .load_relationship(u.clone(), ctx.spec.persona.clone())
                .await
        }
        None => None,
    };
    let mut memory_notes = Vec::new();
    if let Some(mut rel) = relationship {
        // Overrides go into the persona; memory into the prompt's own section.
        let memory = std::mem::take(&mut rel.memory);
        let mut spec = (*ctx.persona).clone();
        rel.apply_to(&mut spec);
        if spec.memory.enabled {
            memory_notes = memory
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
        }
        tracing::debug!(
            calls_before = rel.call_count,
            custom_prompt = rel.custom_system_prompt.is_some(),
            custom_voice = rel.custom_voice_id.is_some(),
            notes = memory_notes.len(),
            "relationship loaded"
        );
        ctx.persona = Arc::new(spec);
    }
    let rel_ctx = (!memory_notes.is_empty()).then(|| RelationshipContext {
        memory_notes,
        ..RelationshipContext::default()
    });
    let call_id = match Uuid::parse_str(&ctx.spec.call_id) {
        Ok(id) => id,
        Err(_) => {
            // Our webhooks always mint UUIDs; anything else gets a record of its own.
            tracing::warn!("call id is not a UUID; recording the call under a new id");
            Uuid::new_v4()
        }
    };
    let started = wall_std(ctx.started_at);
    let direction = ctx.spec.direction;
    // The webhook or the API created the row already (on this pod or another); the
    // insert is a no-op then, and makes the call's records stand on their own if not.
    journal.submit(Record::CallCreated(NewCall {
        id: call_id,
        call_sid: Some(ctx.call_sid.clone()),
        direction,
        persona: ctx.spec.persona.clone(),
        user_id: user_id.clone(),
        from_number: ctx.spec.from.clone(),
        to_number: ctx.spec.to.clone(),
        pretext: ctx.spec.pretext.clone(),
        status: CallStatus::InProgress,
        created_at: started,
        scheduled_for: None,
        pod: pod.as_deref().map(str::to_owned),
    }));
    journal.submit(Record::CallUpdated(
        CallRef::Id(call_id),
        CallUpdate {
            call_sid: Some(ctx.call_sid.clone()),
            status: Some(CallStatus::InProgress),
            started_at: Some(started),
            answered_at: Some(started),
            pod: pod.as_deref().map(str::to_owned),
            user_id: user_id.clone(),
            ..CallUpdate::default()
        },
    ));
    let keep_transcript = user_id.is_some() && ctx.persona.memory.enabled;
    let handle = CallJournal {
        sink: Some(journal),
        call_id,
        user_id,
        keep_transcript,
        next_sequence: 0,
        transcript: VecDeque::new(),
        transcript_chars: 0,
        totals: UsageTotals::default(),
        reported: UsageTotals::default(),
    };
    (ctx, rel_ctx, handle)
}

/// When a persona turn happened and how long its stages took.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TurnTimes {
    /// End of the caller speech this turn answers.
    pub end_of_speech: Option<Instant>,
    /// First reply audio written to Twilio.
    pub first_audio: Option<Instant>,
    /// Stage latencies.
    pub latency: TurnLatency,
}

/// Running totals of a call's billable units.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct UsageTotals {
    stt_seconds: f64,
    llm_input_tokens: u64,
    llm_output_tokens: u64,
    tts_characters: u64,
    telephony_seconds: f64,
}

impl UsageTotals {
    fn get(&self, unit: UsageUnit) -> f64 {
        match unit {
            UsageUnit::SttSeconds => self.stt_seconds,
            UsageUnit::LlmInputTokens => self.llm_input_tokens as f64,
            UsageUnit::LlmOutputTokens => self.llm_output_tokens as f64,
            UsageUnit::TtsCharacters => self.tts_characters as f64,
            UsageUnit::TelephonySeconds => self.telephony_seconds,
        }
    }
}

/// One call's journal handle, owned by the call loop. Every method returns at once.
pub(crate) struct CallJournal {
    /// `None`: persistence is off, nothing is recorded.
    sink: Option<Arc<dyn Journal>>,
    call_id: Uuid,
    user_id: Option<String>,
    /// Keep the transcript for the after-call summary.
    keep_transcript: bool,
    next_sequence: i32,
    transcript: VecDeque<TurnRecord>,
    transcript_chars: usize,
    totals: UsageTotals,
    /// Totals as last submitted (unchanged ones are not sent again).
    reported: UsageTotals,
}

impl CallJournal {
    /// The handle of a call without persistence.
    pub(crate) fn disabled() -> Self {
        Self {
            sink: None,
            call_id: Uuid::nil(),
            user_id: None,
            keep_transcript: false,
            next_sequence: 0,
            transcript: VecDeque::new(),
            transcript_chars: 0,
            totals: UsageTotals::default(),
            reported: UsageTotals::default(),
        }
    }

    /// The caller finished a turn (the words as the engine understood them).
    pub(crate) fn caller_turn(&mut self, text: &str, end_of_speech: Option<Instant>) {
        if self.sink.is_none() {
            return;
        }
        let mut t = TurnRecord::new(self.call_id, self.next_sequence, Speaker::Caller, text);
        t.end_of_speech_at = end_of_speech.map(wall);
        self.push(t);
    }

    /// The persona said something; `text` is what the caller heard (cut at a barge-in).
    pub(crate) fn persona_turn(&mut self, text: &str, interrupted: bool, times: TurnTimes) {
        if self.sink.is_none() {
            return;
        }
        // The playout marks a cut reply with a dash; the transcript says it with a flag.
        let text = text.trim().trim_end_matches('—').trim_end();
        if text.is_empty() {
            return;
        }
        let mut t = TurnRecord::new(self.call_id, self.next_sequence, Speaker::Persona, text);
        t.interrupted = interrupted;
        t.end_of_speech_at = times.end_of_speech.map(wall);
        t.first_audio_at = times.first_audio.map(wall);
        t.latency = times.latency;
        self.push(t);
    }

    fn push(&mut self, t: TurnRecord) {
        self.next_sequence += 1;
        if self.keep_transcript {
            self.transcript_chars += t.text.len();
            self.transcript.push_back(t.clone());
            while self.transcript_chars > MAX_KEPT_TRANSCRIPT_CHARS && self.transcript.len() > 1 {
                if let Some(old) = self.transcript.pop_front() {
                    self.transcript_chars -= old.text.len();
                }
            }
        }
        if let Some(sink) = &self.sink {
            sink.submit(Record::Turn(t));
        }
    }

    /// Tokens of one completion.
    pub(crate) fn llm_tokens(&mut self, input: u32, output: u32) {
        self.totals.llm_input_tokens += u64::from(input);
        self.totals.llm_output_tokens += u64::from(output);
    }

    /// Characters sent to text-to-speech.
    pub(crate) fn tts_characters(&mut self, n: usize) {
        self.totals.tts_characters += n as u64;
    }

    /// Submits the usage totals that changed: `stt_seconds` of caller audio streamed
    /// to speech-to-text and `call_seconds` on the phone so far.
    pub(crate) fn report_usage(&mut self, stt_seconds: f64, call_seconds: f64) {
        let Some(sink) = &self.sink else {
            return;
        };
        self.totals.stt_seconds = stt_seconds.max(0.0);
        self.totals.telephony_seconds = call_seconds.max(0.0);
        for unit in UsageUnit::ALL {
            let q = self.totals.get(unit);
            if q > 0.0 && q != self.reported.get(unit) {
                sink.submit(Record::Usage(UsageRecord::new(self.call_id, unit, q)));
            }
        }
        self.reported = self.totals;
    }

    /// The call is over: final usage, the end on the call record, then the memory
    /// summary when the persona keeps memory.
    pub(crate) fn finish(
        &mut self,
        end: &CallEnd,
        stt_seconds: f64,
        duration: Duration,
        persona_name: &str,
        persona: &Arc<PersonaSpec>,
        llm: &Arc<dyn ChatModel>,
    ) {
        self.report_usage(stt_seconds, duration.as_secs_f64());
        let Some(sink) = self.sink.take() else {
            return;
        };
        sink.submit(Record::CallUpdated(
            CallRef::Id(self.call_id),
            CallUpdate {
                status: Some(CallStatus::Completed),
                ended_at: Some(Utc::now()),
                outcome: Some(end.label().to_owned()),
                duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
                ..CallUpdate::default()
            },
        ));
        if let (true, Some(user_id)) = (self.keep_transcript, self.user_id.take()) {
            sink.after_call(FinishedCall {
                call_id: self.call_id,
                user_id,
                persona_name: persona_name.to_owned(),
                persona: persona.clone(),
                turns: std::mem::take(&mut self.transcript).into_iter().collect(),
                llm: llm.clone(),
                llm_tokens: (self.totals.llm_input_tokens, self.totals.llm_output_tokens),
            });
        }
    }
}

/// A tokio instant as wall-clock time.
pub(crate) fn wall(at: Instant) -> DateTime<Utc> {
    let ago = Instant::now().saturating_duration_since(at);
    Utc::now() - chrono::Duration::from_std(ago).unwrap_or_default()
}

fn wall_std(at: std::time::Instant) -> DateTime<Utc> {
    let ago = std::time::Instant::now().saturating_duration_since(at);
    Utc::now() - chrono::Duration::from_std(ago).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::future::BoxFuture;

    use crate::store::relationships::Relationship;

    use super::*;

    // Numbers in the usual written forms become E.164; anything that is not a full international number is refused.
    #[test]
    fn caller_numbers_normalise_to_e164() {
        assert_eq!(
            normalize_e164("+1 (415) 555-0123").as_deref(),
            Some("+14155550123")
        );
        assert_eq!(
            normalize_e164("0044 20 7946 0958").as_deref(),
            Some("+442079460958")
        );
        for bad in [
            "",
            "anonymous",
            "4155550123",
            "+1",
            "+0123456789",
            "+1415555012345678",
            "sip:a@b",
        ] {
            assert_eq!(normalize_e164(bad), None, "{bad}");
        }
    }

    fn persona_with(recognition: &str) -> PersonaSpec {
        serde_json::from_value(serde_json::json!({
            "displayName": "Ava",
            "systemPrompt": "You are Ava.",
            "greeting": "Hi!",
            "voice": {"voiceId": "v1"},
            "memory": {"callerRecognition": recognition}
        }))
        .expect("static persona")
    }

    // Spoofable caller ID alone never opens a memory: only a number Twilio vouches for
    // (full attestation by default), or a persona that explicitly trusts caller ID;
    // withheld numbers in every form Twilio reports them never share one.
    #[test]
    fn callers_are_recognised_only_when_verified_and_never_when_withheld() {
        let verified = persona_with("verified");
        let full = Some("TN-Validation-Passed-A");
        let n = Some("+14155550123");
        assert_eq!(
            caller_identity(&verified, n, full).as_deref(),
            Some("+14155550123")
        );
        for spoofable in [
            None,
            Some("TN-Validation-Passed-B"),
            Some("TN-Validation-Passed-C"),
            Some("TN-Validation-Failed-A"),
            Some("No-TN-Validation"),
            Some("tn-validation-passed-a"),
        ] {
            assert_eq!(
                caller_identity(&verified, n, spoofable),
                None,
                "{spoofable:?}"
            );
        }
        let mut accepts_b = verified.clone();
        accepts_b
            .memory
            .accepted_attestations
            .push("TN-Validation-Passed-B".into());
        assert!(caller_identity(&accepts_b, n, Some("TN-Validation-Passed-B")).is_some());

        let trusting = persona_with("callerId");
        assert!(caller_identity(&trusting, n, None).is_some());
        let off = persona_with("off");
        assert_eq!(caller_identity(&off, n, full), None);

        for withheld in [
            "anonymous",
            "Anonymous",
            "restricted",
            "unavailable",
            "unknown",
            "+266696687",
            "+7378742833",
            "+8656696",
            "+86282452253",
            "+86 282 452 253",
            "",
        ] {
            for persona in [&verified, &trusting] {
                assert_eq!(
                    caller_identity(persona, Some(withheld), full),
                    None,
                    "{withheld}"
                );
            }
        }
    }

    #[derive(Default)]
    struct Collect(Mutex<Vec<Record>>);

    impl Journal for Collect {
        fn load_relationship(
            &self,
            _user_id: String,
            _persona: String,
        ) -> BoxFuture<'static, Option<Relationship>> {
            Box::pin(async { None })
        }
        fn submit(&self, record: Record) {
            self.0.lock().unwrap().push(record);
        }
        fn after_call(&self, _call: FinishedCall) {}
    }

    // Turns get consecutive sequences in the order reported, cut replies lose the playout's dash, and only changed usage totals are sent again.
    #[test]
    fn turns_are_sequenced_and_usage_is_sent_when_it_changes() {
        let sink = Arc::new(Collect::default());
        let mut j = CallJournal::disabled();
        j.sink = Some(sink.clone());
        j.call_id = Uuid::new_v4();
        j.persona_turn("Hi there.", false, TurnTimes::default());
        j.caller_turn("Hello", None);
        j.persona_turn("I was going to —", true, TurnTimes::default());
        j.persona_turn("   ", false, TurnTimes::default());
        j.tts_characters(10);
        j.report_usage(1.5, 2.0);
        j.report_usage(1.5, 2.0);
        j.llm_tokens(7, 3);
        j.report_usage(1.5, 2.0);
        let got = sink.0.lock().unwrap().clone();
        let turns: Vec<(i32, Speaker, String, bool)> = got
            .iter()
            .filter_map(|r| match r {
                Record::Turn(t) => Some((t.sequence, t.speaker, t.text.clone(), t.interrupted)),
                _ => None,
            })
            .collect();
        assert_eq!(
            turns,
            vec![
                (0, Speaker::Persona, "Hi there.".into(), false),
                (1, Speaker::Caller, "Hello".into(), false),
                (2, Speaker::Persona, "I was going to".into(), true),
            ]
        );
        let usage: Vec<(UsageUnit, f64)> = got
            .iter()
            .filter_map(|r| match r {
                Record::Usage(u) => Some((u.unit, u.quantity)),
                _ => None,
            })
            .collect();
        assert_eq!(
            usage,
            vec![
                (UsageUnit::SttSeconds, 1.5),
                (UsageUnit::TtsCharacters, 10.0),
                (UsageUnit::TelephonySeconds, 2.0),
                (UsageUnit::LlmInputTokens, 7.0),
                (UsageUnit::LlmOutputTokens, 3.0),
            ]
        );
    }

    // Without persistence the handle records nothing and keeps nothing.
    #[test]
    fn a_disabled_journal_keeps_nothing() {
        let mut j = CallJournal::disabled();
        j.caller_turn("Hello", None);
        j.persona_turn("Hi", false, TurnTimes::default());
        assert_eq!(j.next_sequence, 0);
        assert!(j.transcript.is_empty());
    }
}
