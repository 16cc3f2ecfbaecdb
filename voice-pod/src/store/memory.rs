//! After a call: an LLM summary of what was said, appended to the caller's memory
//! with the persona.
//!
//! Runs after the call, never on the audio path; the note travels through the writer
//! like every other record (buffered and retried, appended once per call, the oldest
//! notes trimmed to the persona's `memory.maxChars`). Works with any
//! [`ChatModel`] (Cerebras, an emulator, another OpenAI-compatible provider).

use std::time::Duration;

use callmeback_api::{LlmSpec, PersonaSpec};
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::postgres::PgStore;
use super::records::{MemoryNote, Speaker, TurnRecord};
use super::writer::SubmitError;
use crate::providers::{ChatDelta, ChatMessage, ChatModel, ChatRequest, LlmError, Role, Usage};

/// Longest transcript sent for summarising (characters, the end of the call kept):
/// bounds the prompt whatever the call's length.
pub const MAX_TRANSCRIPT_CHARS: usize = 12_000;
/// Longest note kept from the model's reply (characters).
pub const MAX_NOTE_CHARS: usize = 400;
/// Deadline for the whole summary.
pub const SUMMARY_TIMEOUT: Duration = Duration::from_secs(30);
/// What the model answers when nothing is worth remembering.
const NOTHING: &str = "NOTHING";

/// Why no note was written.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// The model failed.
    #[error("summary model failed: {0}")]
    Llm(#[from] LlmError),
    /// The model took too long.
    #[error("summary model did not finish within {0:?}")]
    Timeout(Duration),
    /// The writer did not take the note (counted in the store's drop metric).
    #[error("memory note not stored: {0}")]
    Store(#[from] SubmitError),
}

/// What the summariser produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// The note; `None` when the caller said nothing, or nothing worth remembering.
    pub note: Option<String>,
    /// Tokens the summary cost, as the provider reported them (billed to the call).
    pub usage: Option<Usage>,
}

/// Asks the model for a one-line note about the call.
pub async fn summarize_call(
    model: &dyn ChatModel,
    llm: &LlmSpec,
    persona_display_name: &str,
    turns: &[TurnRecord],
) -> Result<Summary, SummaryError> {
    if !turns
        .iter()
        .any(|t| t.speaker == Speaker::Caller && !t.text.trim().is_empty())
    {
        return Ok(Summary::default());
    }
    let system = format!(
        "You keep memory notes for {persona_display_name}, a persona who talks with people \
         on the phone. From the call transcript below, write ONE short note (at most two \
         sentences, under 300 characters) about what the caller said that is worth \
         remembering for the next call: names, plans, preferences, promises, feelings. \
         Write about the caller in the third person. Reply with the note only, no preface. \
         If nothing is worth remembering, reply {NOTHING}."
    );
    let mut req = ChatRequest::from_spec(
        llm,
        vec![
            ChatMessage::new(Role::System, system),
            ChatMessage::new(Role::User, transcript_text(turns)),
        ],
    );
    req.temperature = 0.2;
    req.max_tokens = req.max_tokens.max(256);

    let cancel = CancellationToken::new();
    let work = async {
        let mut stream = model.stream(req, cancel.clone()).await?;
        let mut text = String::new();
        let mut usage = None;
        while let Some(item) = stream.next().await {
            match item? {
                ChatDelta::Content(c) => {
                    text.push_str(&c);
                    // A model that rambles is cut; no need to read the rest.
                    if text.chars().count() > MAX_NOTE_CHARS * 2 {
                        break;
                    }
                }
                ChatDelta::Usage(u) => usage = Some(u),
                ChatDelta::Done { .. } => break,
                ChatDelta::Reasoning(_) | ChatDelta::ToolCalls(_) => {}
            }
        }
        Ok::<_, SummaryError>((text, usage))
    };
    let (text, usage) = match tokio::time::timeout(SUMMARY_TIMEOUT, work).await {
        Ok(r) => r?,
        Err(_) => {
            cancel.cancel();
            return Err(SummaryError::Timeout(SUMMARY_TIMEOUT));
        }
    };
    cancel.cancel();
    let note: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let note = note.trim_matches(|c: char| c == '"' || c.is_whitespace());
    let note = if note.is_empty() || note.trim_end_matches('.').eq_ignore_ascii_case(NOTHING) {
        None
    } else {
        Some(note.chars().take(MAX_NOTE_CHARS).collect())
    };
    Ok(Summary { note, usage })
}

/// The transcript as the summariser reads it, the end kept when too long.
fn transcript_text(turns: &[TurnRecord]) -> String {
    let mut ordered: Vec<&TurnRecord> = turns.iter().collect();
    ordered.sort_by_key(|t| t.sequence);
    let mut lines: Vec<String> = Vec::new();
    let mut total = 0;
    for t in ordered.iter().rev() {
        let who = match t.speaker {
            Speaker::Caller => "Caller",
            Speaker::Persona => "You",
        };
        let cut = if t.interrupted { " [interrupted]" } else { "" };
        let line = format!("{who}: {}{cut}", t.text.trim());
        total += line.chars().count() + 1;
        if total > MAX_TRANSCRIPT_CHARS && !lines.is_empty() {
            break;
        }
        lines.push(line);
    }
    lines.reverse();
    format!("Transcript:\n{}", lines.join("\n"))
}

/// After a call: when the persona keeps memory, summarise the call and hand the note
/// (dated) to the writer. Returns the summary (its note is what was submitted; its
/// usage is for the caller to bill, as it knows the call's running totals).
pub async fn remember_call(
    store: &PgStore,
    model: &dyn ChatModel,
    persona_name: &str,
    persona: &PersonaSpec,
    user_id: &str,
    call_id: Uuid,
    turns: &[TurnRecord],
) -> Result<Summary, SummaryError> {
    if !persona.memory.enabled {
        return Ok(Summary::default());
    }
    let summary = summarize_call(model, &persona.llm, &persona.display_name, turns).await?;
    if let Some(note) = &summary.note {
        store.memory_note(MemoryNote {
            user_id: user_id.to_owned(),
            persona: persona_name.to_owned(),
            call_id,
            note: format!("{}: {note}", Utc::now().format("%Y-%m-%d")),
            max_chars: persona.memory.max_chars as usize,
        })?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The transcript keeps speaking order, marks cut replies, and keeps the end when too long.
    #[test]
    fn transcript_is_ordered_and_bounded() {
        let id = Uuid::new_v4();
        let mut cut = TurnRecord::new(id, 1, Speaker::Persona, "Sure, I can");
        cut.interrupted = true;
        let turns = vec![
            TurnRecord::new(id, 2, Speaker::Caller, "My name is Sam"),
            TurnRecord::new(id, 0, Speaker::Caller, "Hello"),
            cut,
        ];
        let t = transcript_text(&turns);
        assert_eq!(
            t,
            "Transcript:\nCaller: Hello\nYou: Sure, I can [interrupted]\nCaller: My name is Sam"
        );

        let long: Vec<TurnRecord> = (0..1000)
            .map(|i| {
                TurnRecord::new(
                    id,
                    i,
                    Speaker::Caller,
                    format!("line {i} {}", "x".repeat(50)),
                )
            })
            .collect();
        let t = transcript_text(&long);
        assert!(t.chars().count() <= MAX_TRANSCRIPT_CHARS + 20);
        assert!(t.ends_with(&format!("line 999 {}", "x".repeat(50))));
        assert!(!t.contains("line 0 "));
    }
}
