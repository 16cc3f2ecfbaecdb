//! How the persona speaks: one LLM task per reply (tokens -> chunks), feeding chunks
//! to TTS contexts as slots free up, static phrases from the pod's cache (captured
//! for it when synthesized live), and the fallback phrase when the model says nothing.
//! The bookkeeping is [`Replies`](super::reply::Replies)'; this file does the I/O.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::reply::{Generated, Reply, Source};
use super::{Call, Internal};
use crate::engine::chunker::{Chunker, ChunkerConfig};
use crate::engine::greeting_cache::{GreetingKey, Phrase};
use crate::engine::prompt::Role as PromptRole;
use callmeback_api::PersonaSpec;

use crate::providers::{
    ChatDelta, ChatMessage, ChatModel, ChatRequest, LlmError, Role, ToolCall, ToolDef, Usage,
};

/// The function a persona may call to end the call (`tools.endCall`).
pub(super) const END_CALL: &str = "end_call";

/// The functions the persona may call, as the model sees them.
fn offered_tools(persona: &PersonaSpec) -> Vec<ToolDef> {
    let mut tools = Vec::new();
    if persona.tools.end_call {
        tools.push(ToolDef {
            name: END_CALL.into(),
            description: "End the phone call. Say your goodbye in the same reply, before \
                calling this. Call it only when the caller is done or asks to hang up."
                .into(),
            parameters: serde_json::json!({"type": "object", "properties": {}}),
        });
    }
    tools
}

/// What a reply's LLM task reports.
pub(super) enum LlmOut {
    FirstToken(Instant),
    Chunk(String),
    /// The functions the model called (after its words).
    ToolCalls(Vec<ToolCall>),
    /// Token accounting of the completion (billed even when the reply was cut).
    Usage(Usage),
    Done,
    Failed(LlmError),
}

impl Call {
    pub(super) fn new_reply(&mut self, source: Source, held: bool) -> Reply {
        let id = self.replies.next_id();
        let span = info_span!(
            parent: &self.span,
            "turn",
            call_sid = %self.ctx.call_sid,
            reply = id,
            preemptive = held
        );
        Reply::new(
            id,
            source,
            held,
            self.call_cancel.child_token(),
            self.audio_clock,
            span,
        )
    }

    /// Starts an LLM reply to `user_text`. A held reply's request includes the user
    /// text on top of the history (it is not in the history until confirmed).
    pub(super) fn start_llm_reply(&mut self, user_text: String, held: bool, now: Instant) -> Reply {
        let mut r = self.new_reply(
            Source::Llm {
                user_text: user_text.clone(),
            },
            held,
        );
        let mut messages: Vec<ChatMessage> = self
            .history
            .messages(&self.system, self.memory.as_deref())
            .into_iter()
            .map(|m| ChatMessage::new(role(m.role), m.content))
            .collect();
        if held {
            match messages.last_mut() {
                // History merges consecutive user messages; mirror that here.
                Some(last) if last.role == Role::User => {
                    last.content.push(' ');
                    last.content.push_str(&user_text);
                }
                _ => messages.push(ChatMessage::new(Role::User, user_text)),
            }
        }
        let mut req = ChatRequest::from_spec(&self.persona.llm, messages);
        req.tools = offered_tools(&self.persona);
        r.timing.llm_start = Some(now);
        let llm = self.shared.providers.llm.clone();
        let tx = self.internal_tx.clone();
        let cancel = r.cancel.clone();
        let chunker = self.shared.settings.chunker.clone();
        let id = r.id;
        let span =
            info_span!(parent: &r.span, "llm", call_sid = %self.ctx.call_sid, model = %req.model);
        tokio::spawn(llm_task(llm, req, cancel, chunker, tx, id).instrument(span));
        r
    }

    pub(super) async fn on_llm(&mut self, reply: u64, out: LlmOut) {
        match out {
            // Billed whatever became of the reply.
            LlmOut::Usage(u) => self
                .journal
                .llm_tokens(u.prompt_tokens, u.completion_tokens),
            LlmOut::FirstToken(at) => {
                if let Some(r) = self.replies.get_mut(reply) {
                    r.timing.first_token = Some(at);
                }
            }
            LlmOut::Chunk(text) => {
                if self.replies.on_chunk(reply, text) {
                    self.feed_tts().await;
                }
            }
            LlmOut::ToolCalls(calls) => self.on_tool_calls(reply, calls),
            LlmOut::Done => self.generation_ended(reply, None).await,
            LlmOut::Failed(e) => self.generation_ended(reply, Some(e)).await,
        }
    }

    /// Functions the model called for reply `reply`. Only offered ones act; anything
    /// else is logged and ignored (a model's invention must not act for a caller).
    fn on_tool_calls(&mut self, reply: u64, calls: Vec<ToolCall>) {
        let end_call_offered = self.persona.tools.end_call;
        let Some(r) = self.replies.get_mut(reply) else {
            return; // a discarded or interrupted reply
        };
        let _s = r.span.enter();
        for call in calls {
            if call.name == END_CALL && end_call_offered {
                info!("the persona ends the call after this reply");
                r.ends_call = true;
            } else {
                let name: String = call.name.chars().take(40).collect();
                warn!(
                    function = %crate::phone::mask_numbers_in(&name),
                    "the model called a function it was not offered; ignored"
                );
            }
        }
    }

    /// The model finished or failed; what was said stays (the sentence in flight ends
    /// there), and a reply without words gets the fallback phrase instead of silence.
    async fn generation_ended(&mut self, reply: u64, error: Option<LlmError>) {
        let Some(r) = self.replies.get(reply) else {
            return; // a discarded or interrupted reply
        };
        let span = r.span.clone();
        if let Some(e) = &error {
            let _s = span.enter();
            warn!(error = %e, kind = e.metric_kind().as_str(), "the model failed");
        }
        if self.replies.generation_ended(reply, &mut self.history) == Some(Generated::Nothing) {
            let ends_call = self.replies.get(reply).is_some_and(|r| r.ends_call);
            if ends_call && error.is_none() {
                // Ending without a word: the persona's own goodbye, not the fallback.
                self.append_phrase(reply, Phrase::Goodbye).await;
                self.replies.commit(reply, &mut self.history);
                return;
            }
            if error.is_none() {
                let _s = span.enter();
                warn!("the model returned no words");
            }
            self.add_fallback(reply).await;
        }
    }

    /// The LLM failed before saying anything: the persona's fallback phrase instead
    /// of silence.
    async fn add_fallback(&mut self, reply: u64) {
        let Some(r) = self.replies.get(reply) else {
            return;
        };
        if r.held {
            // Not worth holding a fallback: if the turn is confirmed, it is asked again.
            self.discard_spec().await;
            return;
        }
        {
            let _s = r.span.enter();
            info!("speaking the fallback phrase");
        }
        self.append_phrase(reply, Phrase::Fallback).await;
        self.replies.commit(reply, &mut self.history);
    }

    /// Speaks a static phrase as a new reply (cutting nothing: callers make room first).
    pub(super) async fn say_phrase(&mut self, phrase: Phrase) {
        let mut r = self.new_reply(Source::Phrase(phrase), false);
        r.llm_done = true;
        let id = r.id;
        self.replies.start(r);
        self.append_phrase(id, phrase).await;
        self.replies.commit(id, &mut self.history);
    }

    /// Adds a phrase to a reply: from the cache at once, or through TTS (then cached).
    async fn append_phrase(&mut self, reply: u64, phrase: Phrase) {
        let text = phrase.text(&self.persona).to_string();
        let key = GreetingKey::for_phrase(&self.ctx.spec.persona, &self.persona, phrase);
        let cached = self.shared.phrases.get(&key);
        let Some(r) = self.replies.get_mut(reply) else {
            return;
        };
        r.add_text(&text);
        match cached {
            Some(audio) => {
                let chunk = self.playout.begin_chunk(text);
                self.playout.push_audio(chunk, &audio);
                self.playout.end_chunk(chunk);
                r.chunks.push(chunk);
            }
            None => {
                r.queued.push_back(text);
                self.feed_tts_capturing(reply, key).await;
            }
        }
    }

    async fn feed_tts_capturing(&mut self, reply: u64, key: GreetingKey) {
        let before: Vec<String> = self
            .replies
            .get(reply)
            .map(|r| r.contexts.clone())
            .unwrap_or_default();
        self.feed_tts().await;
        if let Some(r) = self.replies.get(reply)
            && let Some(ctx) = r.contexts.iter().find(|c| !before.contains(c))
        {
            self.captures.insert(ctx.clone(), (key, Vec::new()));
        }
        // If no TTS slot was free, the phrase is synthesized later, uncached: fine.
    }

    /// Sends queued chunks to TTS while slots are free: the audible reply first, then
    /// the preemptive one.
    pub(super) async fn feed_tts(&mut self) {
        loop {
            let Some(tts) = self.tts.control.clone() else {
                return;
            };
            let Some(job) = self.replies.next_tts_job(&mut self.playout, Instant::now()) else {
                return;
            };
            let spoken = format!("{} ", job.text);
            let res = match tts.speak(&job.context, &spoken).await {
                Ok(()) => tts.end(&job.context).await,
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                // The session task is gone (its queue closed): the voice with it.
                warn!(error = %e, "text-to-speech command failed");
                self.replies.tts_job_failed(job, &mut self.playout);
                self.tts_gone().await;
                return;
            }
            self.journal.tts_characters(spoken.chars().count());
        }
    }

    /// Whether the audible reply is done (said and heard); then it leaves.
    pub(super) async fn check_active_done(&mut self) {
        let Some((r, heard)) = self.replies.take_played(&mut self.playout) else {
            return;
        };
        self.journal_reply(&r, &heard, false);
        {
            let _s = r.span.enter();
            debug!("reply played");
        }
        if r.ends_call {
            self.timers.begin_ending("ended_by_persona", Instant::now());
        }
        if self.timers.ending().is_some() {
            self.hang_up().await;
        }
    }

    /// Cancels a reply taken out of the book, here and at the TTS.
    pub(super) async fn cancel_reply(&mut self, r: &Reply) {
        let contexts = self.replies.cancel(r, &mut self.playout);
        self.cancel_tts(&contexts).await;
    }

    /// Cancels TTS contexts at the provider; their audio is no longer wanted.
    pub(super) async fn cancel_tts(&mut self, contexts: &[String]) {
        for ctx in contexts {
            self.captures.remove(ctx);
            if let Some(tts) = &self.tts.control
                && let Err(e) = tts.cancel(ctx).await
            {
                debug!(error = %e, "cancelling a TTS context failed");
            }
        }
    }

    pub(super) async fn discard_spec(&mut self) {
        if let Some(r) = self.replies.take_spec() {
            self.cancel_reply(&r).await;
            self.feed_tts().await;
        }
    }
}

/// One reply's LLM stream: tokens -> chunks -> the call loop.
async fn llm_task(
    llm: Arc<dyn ChatModel>,
    req: ChatRequest,
    cancel: CancellationToken,
    chunker_cfg: ChunkerConfig,
    tx: mpsc::Sender<Internal>,
    reply: u64,
) {
    let send = |out: LlmOut| {
        let tx = tx.clone();
        async move { tx.send(Internal::Llm { reply, out }).await.is_ok() }
    };
    let stream = tokio::select! {
        _ = cancel.cancelled() => return,
        s = llm.stream(req, cancel.clone()) => s,
    };
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            send(LlmOut::Failed(e)).await;
            return;
        }
    };
    send(LlmOut::FirstToken(Instant::now())).await;
    let mut chunker = Chunker::new(chunker_cfg);
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        match item {
            Some(Ok(ChatDelta::Content(t))) => {
                for c in chunker.push(&t) {
                    if !send(LlmOut::Chunk(c)).await {
                        return;
                    }
                }
            }
            Some(Ok(ChatDelta::Usage(u))) => {
                send(LlmOut::Usage(u)).await;
            }
            // Reasoning never reaches the caller's ears.
            Some(Ok(ChatDelta::Reasoning(_))) => {}
            // Acted on by the call loop (only what the persona was offered).
            Some(Ok(ChatDelta::ToolCalls(calls))) => {
                if !send(LlmOut::ToolCalls(calls)).await {
                    return;
                }
            }
            Some(Ok(ChatDelta::Done { .. })) | None => {
                if let Some(c) = chunker.finish() {
                    send(LlmOut::Chunk(c)).await;
                }
                send(LlmOut::Done).await;
                return;
            }
            Some(Err(e)) => {
                if let Some(c) = chunker.finish() {
                    send(LlmOut::Chunk(c)).await;
                }
                send(LlmOut::Failed(e)).await;
                return;
            }
        }
    }
}

fn role(r: PromptRole) -> Role {
    match r {
        PromptRole::System => Role::System,
        PromptRole::User => Role::User,
        PromptRole::Assistant => Role::Assistant,
    }
}
