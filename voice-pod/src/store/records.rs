//! What the pod writes about a call: the call itself, its status changes, the
//! transcript turns, the usage totals and the memory notes.
//!
//! Every record is idempotent by construction (keyed by call id and sequence, or by
//! call id and unit, or guarded by the call id), so the writer may retry a batch whose
//! commit it could not confirm without duplicating anything.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::session::Direction;

/// A call's lifecycle status.
///
/// The order of the variants is the lifecycle order; every terminal status ranks
/// last. The database (function `call_status_rank`) never moves a call backwards, so
/// late or repeated reports are harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallStatus {
    /// Waiting for its due time.
    Scheduled,
    /// Claimed by a pod that is asking Twilio to place it.
    Placing,
    /// Accepted by Twilio (Twilio's `queued` and `initiated`).
    Queued,
    /// The callee's phone rings.
    Ringing,
    /// Answered.
    InProgress,
    /// Ended normally.
    Completed,
    /// The callee was busy.
    Busy,
    /// Nobody answered.
    NoAnswer,
    /// Could not be placed or broke.
    Failed,
    /// Canceled before it was answered.
    Canceled,
}

impl CallStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [CallStatus; 10] = [
        CallStatus::Scheduled,
        CallStatus::Placing,
        CallStatus::Queued,
        CallStatus::Ringing,
        CallStatus::InProgress,
        CallStatus::Completed,
        CallStatus::Busy,
        CallStatus::NoAnswer,
        CallStatus::Failed,
        CallStatus::Canceled,
    ];

    /// The database and JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Scheduled => "scheduled",
            CallStatus::Placing => "placing",
            CallStatus::Queued => "queued",
            CallStatus::Ringing => "ringing",
            CallStatus::InProgress => "in-progress",
            CallStatus::Completed => "completed",
            CallStatus::Busy => "busy",
            CallStatus::NoAnswer => "no-answer",
            CallStatus::Failed => "failed",
            CallStatus::Canceled => "canceled",
        }
    }

    /// Whether the call is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CallStatus::Completed
                | CallStatus::Busy
                | CallStatus::NoAnswer
                | CallStatus::Failed
                | CallStatus::Canceled
        )
    }

    /// Maps Twilio's `CallStatus` (status callbacks, REST answers) to ours.
    pub fn from_twilio(status: &str) -> Option<CallStatus> {
        match status {
            "initiated" => Some(CallStatus::Queued),
            other => other.parse().ok(),
        }
    }
}

impl fmt::Display for CallStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status string that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("unknown call status `{0}`")]
pub struct UnknownStatus(pub String);

impl TryFrom<String> for CallStatus {
    type Error = UnknownStatus;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for CallStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CallStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A new call row, written when the call is first known to the pod (the answer
/// webhook for inbound calls, `POST /v1/calls` for outbound ones).
#[derive(Clone, Debug, PartialEq)]
pub struct NewCall {
    /// The pod's id for the call; every later record refers to it.
    pub id: Uuid,
    /// Twilio's CallSid, when already known.
    pub call_sid: Option<String>,
    /// Which way.
    pub direction: Direction,
    /// The persona's name.
    pub persona: String,
    /// Who owns the relationship (outbound: the API's `user`; inbound: the caller).
    pub user_id: Option<String>,
    /// Caller number (E.164).
    pub from_number: Option<String>,
    /// Callee number (E.164).
    pub to_number: Option<String>,
    /// Why the persona calls ("get me out of this date").
    pub pretext: Option<String>,
    /// The first status (`scheduled`, `queued`, `ringing`, `in-progress`, ...).
    pub status: CallStatus,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When a scheduled call is due.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The pod handling it.
    pub pod: Option<String>,
}

impl NewCall {
    /// A call created now with a fresh id and nothing optional filled in.
    pub fn new(direction: Direction, persona: impl Into<String>, status: CallStatus) -> Self {
        Self {
            id: Uuid::new_v4(),
            call_sid: None,
            direction,
            persona: persona.into(),
            user_id: None,
            from_number: None,
            to_number: None,
            pretext: None,
            status,
            created_at: Utc::now(),
            scheduled_for: None,
            pod: None,
        }
    }
}

/// How a record names its call: the pod's id, or Twilio's CallSid (status callbacks
/// only know the latter).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CallRef {
    /// [`NewCall::id`].
    Id(Uuid),
    /// Twilio's CallSid.
    Sid(String),
}

/// A change to a call row. `None` fields are left as they are.
///
/// Timestamps and the outcome keep their first value (the pod's own account of why a
/// call ended wins over a later callback); the status only moves forward, and the
/// Twilio status with it; the duration keeps the latest value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallUpdate {
    /// Twilio's CallSid, once the REST call returned it.
    pub call_sid: Option<String>,
    /// New status.
    pub status: Option<CallStatus>,
    /// Twilio's `CallStatus` verbatim.
    pub twilio_status: Option<String>,
    /// The media stream started.
    pub started_at: Option<DateTime<Utc>>,
    /// The callee answered.
    pub answered_at: Option<DateTime<Utc>>,
    /// The call ended. Counts the call in the caller's relationship.
    pub ended_at: Option<DateTime<Utc>>,
    /// Why it ended.
    pub outcome: Option<String>,
    /// Length in seconds.
    pub duration_seconds: Option<i32>,
    /// The pod handling the stream.
    pub pod: Option<String>,
    /// Who owns the relationship, when the stream learns it (inbound calls: the
    /// caller's number); a user already recorded is kept.
    pub user_id: Option<String>,
}

/// Who spoke a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    /// The person on the phone.
    Caller,
    /// The AI persona.
    Persona,
}

impl Speaker {
    /// The database and JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Speaker::Caller => "caller",
            Speaker::Persona => "persona",
        }
    }
}

impl TryFrom<String> for Speaker {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for Speaker {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "caller" => Ok(Speaker::Caller),
            "persona" => Ok(Speaker::Persona),
            other => Err(format!("unknown speaker `{other}`")),
        }
    }
}

/// Per-stage latency of a persona turn, in milliseconds (the stages of
/// `voice_turn_latency_seconds`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TurnLatency {
    /// End of speech -> end-of-turn decision.
    pub stt_ms: Option<i32>,
    /// LLM request -> first token.
    pub llm_ms: Option<i32>,
    /// First text sent to TTS -> first audio.
    pub tts_ms: Option<i32>,
    /// End of speech -> first reply audio written to Twilio.
    pub total_ms: Option<i32>,
}

/// One turn of the transcript.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnRecord {
    /// The call.
    pub call_id: Uuid,
    /// 0, 1, 2, ... in the order spoken; unique per call (a rewrite of the same
    /// sequence replaces the turn).
    pub sequence: i32,
    /// Who spoke.
    pub speaker: Speaker,
    /// The text as heard: a persona reply cut by barge-in keeps only what was played.
    pub text: String,
    /// The caller cut this reply short.
    pub interrupted: bool,
    /// See the `call_turns` table.
    pub end_of_speech_at: Option<DateTime<Utc>>,
    /// First reply audio frame written to Twilio.
    pub first_audio_at: Option<DateTime<Utc>>,
    /// Stage latencies.
    pub latency: TurnLatency,
}

impl TurnRecord {
    /// A turn with no timings.
    pub fn new(call_id: Uuid, sequence: i32, speaker: Speaker, text: impl Into<String>) -> Self {
        Self {
            call_id,
            sequence,
            speaker,
            text: text.into(),
            interrupted: false,
            end_of_speech_at: None,
            first_audio_at: None,
            latency: TurnLatency::default(),
        }
    }
}

/// A billable unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageUnit {
    /// Seconds of audio streamed to speech-to-text.
    SttSeconds,
    /// Prompt tokens.
    LlmInputTokens,
    /// Completion tokens.
    LlmOutputTokens,
    /// Characters synthesized.
    TtsCharacters,
    /// Seconds of phone call.
    TelephonySeconds,
}

impl UsageUnit {
    /// Every unit.
    pub const ALL: [UsageUnit; 5] = [
        UsageUnit::SttSeconds,
        UsageUnit::LlmInputTokens,
        UsageUnit::LlmOutputTokens,
        UsageUnit::TtsCharacters,
        UsageUnit::TelephonySeconds,
    ];

    /// The database, JSON and price-table value.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageUnit::SttSeconds => "stt_seconds",
            UsageUnit::LlmInputTokens => "llm_input_tokens",
            UsageUnit::LlmOutputTokens => "llm_output_tokens",
            UsageUnit::TtsCharacters => "tts_characters",
            UsageUnit::TelephonySeconds => "telephony_seconds",
        }
    }

    /// The provider that bills this unit in the standard setup.
    pub fn default_provider(self) -> &'static str {
        match self {
            UsageUnit::SttSeconds => "deepgram",
            UsageUnit::LlmInputTokens | UsageUnit::LlmOutputTokens => "cerebras",
            UsageUnit::TtsCharacters => "elevenlabs",
            UsageUnit::TelephonySeconds => "twilio",
        }
    }
}

impl TryFrom<String> for UsageUnit {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl FromStr for UsageUnit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UsageUnit::ALL
            .into_iter()
            .find(|u| u.as_str() == s)
            .ok_or_else(|| format!("unknown usage unit `{s}`"))
    }
}

/// A call's running total of one unit from one provider.
///
/// Totals, not increments: writing the same total twice is harmless, so the session
/// may report as often as it likes (at the end of the call at least).
#[derive(Clone, Debug, PartialEq)]
pub struct UsageRecord {
    /// The call.
    pub call_id: Uuid,
    /// `deepgram`, `cerebras`, `elevenlabs`, `twilio`, ...
    pub provider: String,
    /// What is counted.
    pub unit: UsageUnit,
    /// The total so far (non-negative, finite).
    pub quantity: f64,
}

impl UsageRecord {
    /// A total billed by the unit's default provider.
    pub fn new(call_id: Uuid, unit: UsageUnit, quantity: f64) -> Self {
        Self {
            call_id,
            provider: unit.default_provider().to_owned(),
            unit,
            quantity,
        }
    }
}

/// A note about a finished call, appended to the caller's memory with the persona.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryNote {
    /// The caller.
    pub user_id: String,
    /// The persona.
    pub persona: String,
    /// The call the note is about (a second note for the same call is ignored).
    pub call_id: Uuid,
    /// The note (one line).
    pub note: String,
    /// The persona's bound on the whole memory, in characters.
    pub max_chars: usize,
}

/// Anything the writer persists.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A new call.
    CallCreated(NewCall),
    /// A change to a call.
    CallUpdated(CallRef, CallUpdate),
    /// A transcript turn.
    Turn(TurnRecord),
    /// A usage total.
    Usage(UsageRecord),
    /// A memory note.
    Memory(MemoryNote),
}

impl Record {
    /// Low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::CallCreated(_) => "call",
            Record::CallUpdated(..) => "call_update",
            Record::Turn(_) => "turn",
            Record::Usage(_) => "usage",
            Record::Memory(_) => "memory",
        }
    }

    /// The call the record belongs to, for log lines (our id, or Twilio's CallSid).
    pub fn call(&self) -> String {
        match self {
            Record::CallCreated(c) => c.id.to_string(),
            Record::CallUpdated(CallRef::Id(id), _) => id.to_string(),
            Record::CallUpdated(CallRef::Sid(sid), _) => sid.clone(),
            Record::Turn(t) => t.call_id.to_string(),
            Record::Usage(u) => u.call_id.to_string(),
            Record::Memory(m) => m.call_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every status survives a round trip through its database string.
    #[test]
    fn status_strings_round_trip() {
        for st in CallStatus::ALL {
            assert_eq!(st.as_str().parse::<CallStatus>().unwrap(), st);
            assert_eq!(
                serde_json::to_string(&st).unwrap(),
                format!("\"{}\"", st.as_str())
            );
        }
        assert_eq!(
            CallStatus::from_twilio("initiated"),
            Some(CallStatus::Queued)
        );
        assert_eq!(
            CallStatus::from_twilio("no-answer"),
            Some(CallStatus::NoAnswer)
        );
        assert!(CallStatus::from_twilio("exploded").is_none());
    }

    // Units parse from the strings the price table and the database use.
    #[test]
    fn unit_strings_round_trip() {
        for u in UsageUnit::ALL {
            assert_eq!(u.as_str().parse::<UsageUnit>().unwrap(), u);
        }
        assert!("minutes".parse::<UsageUnit>().is_err());
    }
}
