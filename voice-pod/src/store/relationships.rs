//! A caller's relationship with a persona: their own prompt or voice, and what the
//! persona remembers of past calls.
//!
//! Loaded at call start with a bounded wait ([`super::PgStore::load_relationship`]);
//! counted at call end by the writer; memory notes appended after the call
//! ([`super::memory`]).

use callmeback_api::PersonaSpec;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Longest custom voice id accepted (the CRD's bound); it goes into a provider URL.
const MAX_VOICE_ID_LEN: usize = 64;

/// One (user, persona) relationship.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct Relationship {
    /// The caller (the API's `user`, or the caller's number for inbound calls).
    pub user_id: String,
    /// The persona's name.
    pub persona: String,
    /// Replaces the persona's system prompt for this caller.
    pub custom_system_prompt: Option<String>,
    /// Replaces the persona's voice for this caller.
    pub custom_voice_id: Option<String>,
    /// Notes about past calls, oldest first, one per line.
    pub memory: String,
    /// Finished calls.
    pub call_count: i32,
    /// When the last call ended.
    pub last_call_at: Option<DateTime<Utc>>,
    /// The caller's number, as last seen.
    pub phone_number: Option<String>,
}

impl Relationship {
    /// The persona as this caller gets it: their prompt and voice overrides, and the
    /// memory of past calls appended to the system prompt.
    ///
    /// A custom voice id that is not a plain provider id (it travels in a URL path) is
    /// ignored with a warning rather than trusted.
    pub fn apply_to(&self, spec: &mut PersonaSpec) {
        if let Some(prompt) = self
            .custom_system_prompt
            .as_deref()
            .filter(|p| !p.trim().is_empty())
        {
            spec.system_prompt = prompt.to_owned();
        }
        if let Some(voice) = self.custom_voice_id.as_deref() {
            if is_voice_id(voice) {
                spec.voice.voice_id = voice.to_owned();
            } else {
                tracing::warn!(
                    persona = %self.persona,
                    "ignoring a relationship's custom voice id that is not a plain provider id"
                );
            }
        }
        if spec.memory.enabled && !self.memory.trim().is_empty() {
            spec.system_prompt
                .push_str("\n\nNotes from your earlier calls with this caller (oldest first):\n");
            spec.system_prompt.push_str(self.memory.trim());
        }
    }
}

/// Overrides to set on a relationship; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RelationshipOverrides {
    /// New custom system prompt (`Some("")` clears it).
    pub custom_system_prompt: Option<String>,
    /// New custom voice id (`Some("")` clears it).
    pub custom_voice_id: Option<String>,
    /// The caller's number.
    pub phone_number: Option<String>,
}

fn is_voice_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_VOICE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Appends `note` as a new line of `memory` and trims the oldest lines until the
/// whole fits in `max_chars` characters. A single note longer than the bound is cut.
pub fn append_note(memory: &str, note: &str, max_chars: usize) -> String {
    // One note, one line: a newline inside would split it into two "notes".
    let note: String = note.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut lines: Vec<&str> = memory
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !note.is_empty() {
        lines.push(&note);
    }
    let len = |lines: &[&str]| -> usize {
        lines.iter().map(|l| l.chars().count()).sum::<usize>() + lines.len().saturating_sub(1)
    };
    let mut start = 0;
    while lines.len() - start > 1 && len(&lines[start..]) > max_chars {
        start += 1;
    }
    let kept = lines[start..].join("\n");
    if kept.chars().count() > max_chars {
        kept.chars().take(max_chars).collect()
    } else {
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A note becomes the last line, and the oldest whole notes go first when over the bound.
    #[test]
    fn append_trims_oldest_whole_notes() {
        let m = append_note("", "first call", 100);
        assert_eq!(m, "first call");
        let m = append_note(&m, "second\ncall", 100);
        assert_eq!(m, "first call\nsecond call");
        // 11 + 1 + 11 + 1 + 10 = 34 > 30: the first note goes.
        let m = append_note(&m, "third call", 30);
        assert_eq!(m, "second call\nthird call");
        assert!(m.chars().count() <= 30);
    }

    // A single note over the bound is cut to the bound, counting characters, not bytes.
    #[test]
    fn oversized_note_is_cut_on_a_char_boundary() {
        let m = append_note("old", &"é".repeat(50), 10);
        assert_eq!(m, "é".repeat(10));
    }

    // Overrides replace prompt and voice; memory is appended to the prompt only when enabled; bad voice ids are ignored.
    #[test]
    fn overrides_and_memory_shape_the_persona() {
        let mut spec: PersonaSpec = serde_saphyr::from_str(
            "displayName: Ava\nsystemPrompt: You are Ava.\ngreeting: Hi\nvoice:\n  voiceId: base\n",
        )
        .unwrap();
        let rel = Relationship {
            user_id: "u".into(),
            persona: "ava".into(),
            custom_system_prompt: Some("You are Ava, the caller's old friend.".into()),
            custom_voice_id: Some("friendly_voice-2".into()),
            memory: "Likes jazz.".into(),
            call_count: 3,
            last_call_at: None,
            phone_number: None,
        };
        let mut s = spec.clone();
        rel.apply_to(&mut s);
        assert!(
            s.system_prompt
                .starts_with("You are Ava, the caller's old friend.")
        );
        assert!(s.system_prompt.ends_with("Likes jazz."));
        assert_eq!(s.voice.voice_id, "friendly_voice-2");

        spec.memory.enabled = false;
        let rel = Relationship {
            custom_voice_id: Some("../../v1/evil?x=1".into()),
            ..rel
        };
        let mut s = spec.clone();
        rel.apply_to(&mut s);
        assert!(!s.system_prompt.contains("jazz"));
        assert_eq!(s.voice.voice_id, "base");
    }
}
