//! The optional fast LLM judgement of "has the caller finished?".
//!
//! Asked only when a persona sets `llmJudge`, always under the persona's hard
//! deadline (enforced by the caller and by [`crate::engine::turn_taking`]): past it,
//! the heuristic decides. The model answers one word; anything else is "no idea".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use callmeback_api::ReasoningEffort;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::turn_taking::TurnJudge;
use crate::providers::{ChatDelta, ChatMessage, ChatModel, ChatRequest, Role};

/// The judge's instructions.
const JUDGE_PROMPT: &str = "You decide whether a phone caller has finished speaking. \
You get the transcript of what they said so far. Answer YES if it is a complete \
thought the other side should answer now, NO if they are likely to continue \
(trailing words, an unfinished clause). Answer with exactly one word: YES or NO.";

/// A [`TurnJudge`] backed by the chat model.
pub struct LlmJudge {
    llm: Arc<dyn ChatModel>,
    model: String,
}

impl LlmJudge {
    /// A judge using `model` (the persona's, or a smaller one).
    pub fn new(llm: Arc<dyn ChatModel>, model: impl Into<String>) -> Self {
        Self {
            llm,
            model: model.into(),
        }
    }
}

impl TurnJudge for LlmJudge {
    fn judge(&self, text: &str) -> Pin<Box<dyn Future<Output = Option<bool>> + Send + 'static>> {
        let llm = self.llm.clone();
        let req = ChatRequest {
            model: self.model.clone(),
            messages: vec![
                ChatMessage::new(Role::System, JUDGE_PROMPT),
                ChatMessage::new(Role::User, text),
            ],
            temperature: 0.0,
            max_tokens: 16,
            reasoning_effort: Some(ReasoningEffort::Low),
            tools: Vec::new(),
        };
        Box::pin(async move {
            let cancel = CancellationToken::new();
            // Dropping the stream (or cancelling) aborts the request once we know.
            let _guard = cancel.clone().drop_guard();
            let mut stream = llm.stream(req, cancel).await.ok()?;
            let mut answer = String::new();
            while let Some(item) = stream.next().await {
                match item.ok()? {
                    ChatDelta::Content(t) => {
                        answer.push_str(&t);
                        if let Some(v) = verdict(&answer) {
                            return Some(v);
                        }
                    }
                    ChatDelta::Done { .. } => break,
                    ChatDelta::Reasoning(_) | ChatDelta::Usage(_) | ChatDelta::ToolCalls(_) => {}
                }
            }
            verdict(&answer)
        })
    }
}

/// `Some(true)` for yes, `Some(false)` for no, `None` while undecided.
fn verdict(answer: &str) -> Option<bool> {
    let a = answer.trim_start().to_ascii_lowercase();
    if a.starts_with("yes") {
        Some(true)
    } else if a.starts_with("no") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_reads_one_word_answers() {
        // Proves the judge's answer parsing: yes/no in any case, anything else undecided.
        assert_eq!(verdict(" YES."), Some(true));
        assert_eq!(verdict("no"), Some(false));
        assert_eq!(verdict("Maybe"), None);
        assert_eq!(verdict(""), None);
    }
}
