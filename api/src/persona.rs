//! `Persona`: who answers the phone, how they sound, think and listen.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// A phone persona: its prompt, greeting, voice, language model, speech
/// recognition and turn-taking behaviour.
///
/// The voice pod reads exactly this struct from `/etc/callmeback/personas/<name>.yaml`.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "callmeback.dev",
    version = "v1alpha1",
    kind = "Persona",
    plural = "personas",
    singular = "persona",
    shortname = "pa",
    category = "voice",
    namespaced,
    status = "PersonaStatus",
    printcolumn = r#"{"name":"Display Name","type":"string","jsonPath":".spec.displayName"}"#,
    printcolumn = r#"{"name":"Voice","type":"string","jsonPath":".spec.voice.voiceId"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.llm.model"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.idleTimeoutSeconds < self.maxCallDurationSeconds").message("idleTimeoutSeconds must be shorter than maxCallDurationSeconds"))]
pub struct PersonaSpec {
    /// The name the persona introduces itself with.
    #[schemars(length(min = 1, max = 100))]
    pub display_name: String,
    /// The system prompt: who the persona is and how it speaks. Call pretext and
    /// the caller's relationship context are appended per call.
    #[schemars(length(min = 1, max = 20000))]
    pub system_prompt: String,
    /// The first sentence spoken when the call connects. Static, so each pod
    /// synthesizes it once and plays it without a TTS round trip.
    #[schemars(length(min = 1, max = 500))]
    pub greeting: String,
    /// Spoken when the language model fails, instead of silence.
    #[serde(default = "default_fallback_phrase")]
    #[schemars(length(min = 1, max = 300))]
    pub fallback_phrase: String,
    /// Spoken before hanging up (max duration reached, idle, draining).
    #[serde(default = "default_goodbye")]
    #[schemars(length(min = 1, max = 300))]
    pub goodbye: String,
    /// Spoken once when the caller has been silent for `idleTimeoutSeconds`.
    #[serde(default = "default_idle_prompt")]
    #[schemars(length(min = 1, max = 300))]
    pub idle_prompt: String,
    /// Text-to-speech voice.
    pub voice: VoiceSpec,
    /// Language model.
    #[serde(default)]
    pub llm: LlmSpec,
    /// Speech-to-text.
    #[serde(default)]
    pub stt: SttSpec,
    /// When the caller is done talking, and what happens when they interrupt.
    #[serde(default)]
    pub turn_taking: TurnTakingSpec,
    /// Hard cap on a call's length; the persona says goodbye and hangs up.
    /// Also sizes the pods' termination grace period.
    #[serde(default = "default_max_call_duration")]
    #[schemars(range(min = 30, max = 14400))]
    pub max_call_duration_seconds: u32,
    /// Silence from the caller after which the persona asks "are you still
    /// there?", and after twice as long says goodbye.
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 5, max = 3600))]
    pub idle_timeout_seconds: u32,
    /// What the persona remembers about a caller between calls.
    #[serde(default)]
    pub memory: MemorySpec,
    /// Scheduled callbacks ("call me back in ten minutes") placed for this persona.
    // Omitted when unset, so personas that do not use it render (and hash) as before
    // and an operator upgrade rolls no pods.
    #[serde(default, skip_serializing_if = "CallbackSpec::is_unset")]
    pub callbacks: CallbackSpec,
    /// Functions the persona may call during a conversation (none by default).
    // Omitted when unset, for the same reason as `callbacks`.
    #[serde(default, skip_serializing_if = "ToolsSpec::is_unset")]
    pub tools: ToolsSpec,
}

/// Text-to-speech settings (ElevenLabs).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VoiceSpec {
    /// TTS provider. Only `elevenlabs` today.
    #[serde(default)]
    pub provider: VoiceProvider,
    /// Provider voice id.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub voice_id: String,
    /// Provider model id.
    #[serde(default = "default_tts_model")]
    #[schemars(length(min = 1, max = 64))]
    pub model_id: String,
    /// 0..1: lower is more expressive, higher more consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub stability: Option<f64>,
    /// 0..1: how closely to match the original voice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub similarity_boost: Option<f64>,
    /// 0..1: style exaggeration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub style: Option<f64>,
    /// 0.7..1.2: speaking rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.7, max = 1.2))]
    pub speed: Option<f64>,
}

/// TTS providers.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VoiceProvider {
    /// ElevenLabs streaming TTS over WebSocket.
    #[default]
    Elevenlabs,
}

/// Language-model settings (Cerebras, OpenAI-compatible).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmSpec {
    /// Model id; checked against the provider's `/v1/models` at pod start.
    #[serde(default = "default_llm_model")]
    #[schemars(length(min = 1, max = 128))]
    pub model: String,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: f64,
    /// Upper bound on a reply's tokens. Small: voice replies are short, and
    /// Cerebras charges rate limits on input + max tokens up front.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 16, max = 4096))]
    pub max_tokens: u32,
    /// For reasoning models: how hard to think. `low` keeps voice latency down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Conversation turns kept in the prompt (older ones are dropped).
    #[serde(default = "default_history_turns")]
    #[schemars(range(min = 2, max = 200))]
    pub max_history_turns: u32,
}

/// Reasoning effort for reasoning models.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    /// Least latency.
    Low,
    /// Balanced.
    Medium,
    /// Most thorough.
    High,
}

/// Speech-to-text settings (Deepgram live).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SttSpec {
    /// Deepgram model, e.g. `nova-3` or `nova-2-phonecall`.
    #[serde(default = "default_stt_model")]
    #[schemars(length(min = 1, max = 64))]
    pub model: String,
    /// BCP-47 language tag.
    #[serde(default = "default_language")]
    #[schemars(length(min = 2, max = 16))]
    pub language: String,
    /// Silence (ms) after which Deepgram marks `speech_final`.
    #[serde(default = "default_endpointing_ms")]
    #[schemars(range(min = 10, max = 5000))]
    pub endpointing_ms: u32,
    /// Gap after the last word before Deepgram sends `UtteranceEnd`.
    #[serde(default = "default_utterance_end_ms")]
    #[schemars(range(min = 1000, max = 5000))]
    pub utterance_end_ms: u32,
    /// Words to boost (names, places).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub keyterms: Vec<String>,
}

/// Turn-taking and barge-in knobs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TurnTakingSpec {
    /// Extra wait (ms) when the caller's words look unfinished (a trailing
    /// "and", "so", "um", an open question) before the turn is taken.
    #[serde(default = "default_incomplete_wait_ms")]
    #[schemars(range(min = 0, max = 5000))]
    pub incomplete_extra_wait_ms: u32,
    /// Ask a fast LLM whether an ambiguous utterance is finished.
    #[serde(default)]
    pub llm_judge: bool,
    /// Hard deadline (ms) for the LLM judgement; on expiry the heuristic decides.
    #[serde(default = "default_judge_deadline_ms")]
    #[schemars(range(min = 50, max = 2000))]
    pub llm_judge_deadline_ms: u32,
    /// Whether caller speech interrupts the persona.
    #[serde(default = "default_true")]
    pub barge_in: bool,
    /// Words of interim transcript needed to count as an interruption
    /// (filters coughs and "mm-hm").
    #[serde(default = "default_barge_in_min_words")]
    #[schemars(range(min = 1, max = 10))]
    pub barge_in_min_words: u32,
    /// Start the LLM when the end of turn is likely but unconfirmed; speak only
    /// once confirmed, discard if the caller goes on.
    #[serde(default = "default_true")]
    pub preemptive_generation: bool,
}

/// Memory of past calls with a caller.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySpec {
    /// Summarize each call into the caller's relationship memory.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Bound on the stored memory (characters); the oldest notes go first.
    #[serde(default = "default_memory_chars")]
    #[schemars(range(min = 100, max = 20000))]
    pub max_chars: u32,
    /// Which inbound callers are recognised by their number (their memory read
    /// and written). Caller ID is not identity: `verified` (default) recognises a
    /// caller only when Twilio vouches for the number (its `StirVerstat` is one of
    /// `acceptedAttestations`); `callerId` trusts the number as presented (opting out
    /// of the check); `off` recognises no inbound caller. Withheld numbers are never
    /// recognised. An unrecognised caller's call runs without memory and writes none.
    #[serde(default)]
    pub caller_recognition: CallerRecognition,
    /// Twilio `StirVerstat` values that count as verified for `callerRecognition:
    /// verified` (default: full attestation only).
    #[serde(default = "default_accepted_attestations")]
    #[schemars(length(max = 8))]
    pub accepted_attestations: Vec<String>,
}

/// How inbound callers are recognised (see [`MemorySpec::caller_recognition`]).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CallerRecognition {
    /// Only numbers Twilio vouches for (STIR/SHAKEN attestation).
    #[default]
    Verified,
    /// Any number as presented (spoofable: for trusted lines only).
    CallerId,
    /// No inbound caller is recognised.
    Off,
}

/// STIR/SHAKEN full attestation as Twilio reports it.
pub const FULL_ATTESTATION: &str = "TN-Validation-Passed-A";

fn default_accepted_attestations() -> Vec<String> {
    vec![FULL_ATTESTATION.to_string()]
}

/// Scheduled callbacks of a persona.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallbackSpec {
    /// How late a callback may still be placed after its due time (the cluster was
    /// down or every pod was gone); later ones are not placed and end `too_late`. A
    /// date-rescue call ten minutes late is worse than none, a reminder is not. A
    /// request's own `maxLateness` wins; unset, the voice pods' `CALLMEBACK_MAX_LATENESS`
    /// (15 minutes by default) applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 7776000))]
    pub max_lateness_seconds: Option<u32>,
}

impl CallbackSpec {
    /// Nothing set: the pods' defaults apply.
    pub fn is_unset(&self) -> bool {
        self.max_lateness_seconds.is_none()
    }
}

/// The functions a persona may call during a conversation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolsSpec {
    /// The persona may end the call itself, after saying goodbye in the same reply
    /// (the caller is done, or asked to hang up). The call record's outcome is then
    /// `ended_by_persona`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end_call: bool,
}

impl ToolsSpec {
    /// No tool enabled.
    pub fn is_unset(&self) -> bool {
        !self.end_call
    }
}

/// Observed state of a `Persona`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersonaStatus {
    /// `Ready` with reason `Valid` or `Invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// SHA-256 (hex, first 16 chars) of the rendered persona file the pods load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_fallback_phrase() -> String {
    "Sorry, I lost my train of thought for a second. Could you say that again?".into()
}
fn default_goodbye() -> String {
    "It was lovely talking to you. Goodbye!".into()
}
fn default_idle_prompt() -> String {
    "Are you still there?".into()
}
fn default_max_call_duration() -> u32 {
    900
}
fn default_idle_timeout() -> u32 {
    30
}
fn default_tts_model() -> String {
    "eleven_flash_v2_5".into()
}
fn default_llm_model() -> String {
    "gpt-oss-120b".into()
}
fn default_temperature() -> f64 {
    0.7
}
fn default_max_tokens() -> u32 {
    256
}
fn default_history_turns() -> u32 {
    40
}
fn default_stt_model() -> String {
    "nova-3".into()
}
fn default_language() -> String {
    "en".into()
}
fn default_endpointing_ms() -> u32 {
    300
}
fn default_utterance_end_ms() -> u32 {
    1000
}
fn default_incomplete_wait_ms() -> u32 {
    700
}
fn default_judge_deadline_ms() -> u32 {
    150
}
fn default_barge_in_min_words() -> u32 {
    1
}
fn default_memory_chars() -> u32 {
    4000
}

impl Default for LlmSpec {
    fn default() -> Self {
        Self {
            model: default_llm_model(),
            temperature: default_temperature(),
            max_tokens: default_max_tokens(),
            reasoning_effort: Some(ReasoningEffort::Low),
            max_history_turns: default_history_turns(),
        }
    }
}

impl Default for SttSpec {
    fn default() -> Self {
        Self {
            model: default_stt_model(),
            language: default_language(),
            endpointing_ms: default_endpointing_ms(),
            utterance_end_ms: default_utterance_end_ms(),
            keyterms: Vec::new(),
        }
    }
}

impl Default for TurnTakingSpec {
    fn default() -> Self {
        Self {
            incomplete_extra_wait_ms: default_incomplete_wait_ms(),
            llm_judge: false,
            llm_judge_deadline_ms: default_judge_deadline_ms(),
            barge_in: true,
            barge_in_min_words: default_barge_in_min_words(),
            preemptive_generation: true,
        }
    }
}

impl Default for MemorySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_chars: default_memory_chars(),
            caller_recognition: CallerRecognition::default(),
            accepted_attestations: default_accepted_attestations(),
        }
    }
}

/// Words a greeting may have: it is synthesized once and must start the call quickly.
pub const MAX_GREETING_WORDS: usize = 80;
/// Rough upper bound on prompt tokens (4 characters per token) plus `maxTokens`, so a
/// persona never exhausts a small model's context before the conversation starts.
pub const MAX_PROMPT_BUDGET_TOKENS: u32 = 8_192;

impl PersonaSpec {
    /// Checks beyond the CRD schema (which already enforces ranges and lengths): text
    /// that is blank or carries control characters, a greeting too long to speak
    /// promptly, a prompt that leaves no room for the reply, duplicate key terms.
    /// Empty when the persona is usable. The operator reports these as `PersonaInvalid`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let texts = [
            ("displayName", &self.display_name),
            ("systemPrompt", &self.system_prompt),
            ("greeting", &self.greeting),
            ("fallbackPhrase", &self.fallback_phrase),
            ("goodbye", &self.goodbye),
            ("idlePrompt", &self.idle_prompt),
        ];
        for (field, text) in texts {
            if text.trim().is_empty() {
                out.push(format!("{field} is blank"));
            }
            if text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
            {
                out.push(format!("{field} contains control characters"));
            }
        }
        let greeting_words = self.greeting.split_whitespace().count();
        if greeting_words > MAX_GREETING_WORDS {
            out.push(format!(
                "greeting has {greeting_words} words; keep it under {MAX_GREETING_WORDS} so the call starts promptly"
            ));
        }
        let prompt_tokens =
            u32::try_from(self.system_prompt.chars().count() / 4).unwrap_or(u32::MAX);
        if prompt_tokens.saturating_add(self.llm.max_tokens) > MAX_PROMPT_BUDGET_TOKENS {
            out.push(format!(
                "systemPrompt (~{prompt_tokens} tokens) plus llm.maxTokens ({}) exceeds {MAX_PROMPT_BUDGET_TOKENS} tokens",
                self.llm.max_tokens
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for term in &self.stt.keyterms {
            if term.trim().is_empty() {
                out.push("stt.keyterms contains a blank term".to_string());
            } else if !seen.insert(term.to_lowercase()) {
                out.push(format!("stt.keyterms lists {term:?} twice"));
            }
        }
        if self.turn_taking.llm_judge
            && self.turn_taking.llm_judge_deadline_ms
                > self
                    .turn_taking
                    .incomplete_extra_wait_ms
                    .max(self.stt.endpointing_ms)
                    * 4
        {
            out.push(format!(
                "turnTaking.llmJudgeDeadlineMs ({}) is far above the turn-taking waits; the judge would add audible latency",
                self.turn_taking.llm_judge_deadline_ms
            ));
        }
        out
    }
}
