//! [`Journal`]: where the conversation engine hands what a call produces (records,
//! the after-call summary) and asks what it remembers; [`StoreJournal`] is that
//! journal over [`PgStore`]. The trait lives here, with the record types it carries,
//! so the engine depends on the store's vocabulary and the store never on the engine.
//!
//! Relationship lookups use the store's bounded wait; records go through the
//! bounded writer (`try_send`); after-call memory summaries run as tracked tasks so
//! that shutdown can give them a grace period before the writer's final flush.

use std::sync::Arc;
use std::time::Duration;

use callmeback_api::PersonaSpec;
use futures::future::BoxFuture;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::memory;
use super::postgres::PgStore;
use super::records::{Record, TurnRecord, UsageRecord, UsageUnit};
use super::relationships::Relationship;
use crate::providers::ChatModel;

/// Where calls are journaled (the PostgreSQL store, or a test double).
pub trait Journal: Send + Sync + 'static {
    /// The caller's relationship with a persona. Must be bounded: a slow or down
    /// database answers `None` (and says so in a metric), and the call starts without.
    fn load_relationship(
        &self,
        user_id: String,
        persona: String,
    ) -> BoxFuture<'static, Option<Relationship>>;
    /// Hands a record over without waiting (a full queue drops and counts it).
    fn submit(&self, record: Record);
    /// A call ended whose persona keeps memory: summarise it, off the call's path.
    /// Must return at once (spawn).
    fn after_call(&self, call: FinishedCall);
}

/// What the after-call summary needs.
pub struct FinishedCall {
    /// The call.
    pub call_id: Uuid,
    /// Whose relationship the note goes to.
    pub user_id: String,
    /// The persona's name.
    pub persona_name: String,
    /// The persona as the call ran it.
    pub persona: Arc<PersonaSpec>,
    /// The transcript (the end of it, for long calls).
    pub turns: Vec<TurnRecord>,
    /// The model that writes the note.
    pub llm: Arc<dyn ChatModel>,
    /// The call's LLM tokens (input, output) as last reported: the summary's are
    /// added to these, because usage rows hold a call's running totals.
    pub llm_tokens: (u64, u64),
}

/// The engine's journal backed by PostgreSQL. Cheap to clone.
#[derive(Clone)]
pub struct StoreJournal {
    store: PgStore,
    /// After-call summaries still running.
    tasks: TaskTracker,
}

impl StoreJournal {
    /// A journal over `store`.
    pub fn new(store: PgStore) -> Self {
        Self {
            store,
            tasks: TaskTracker::new(),
        }
    }

    /// The store.
    pub fn store(&self) -> &PgStore {
        &self.store
    }

    /// At shutdown: lets running memory summaries finish (at most `memory`), then
    /// gives the writer `writer` to write what it holds and the pool `pool_close` to
    /// close. Whatever is left is counted.
    pub async fn close(&self, memory: Duration, writer: Duration, pool_close: Duration) {
        self.tasks.close();
        if tokio::time::timeout(memory, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.tasks.len(),
                "memory summaries still running at shutdown; their notes are lost"
            );
        }
        self.store.shutdown_within(writer, pool_close).await;
    }
}

impl Journal for StoreJournal {
    fn load_relationship(
        &self,
        user_id: String,
        persona: String,
    ) -> BoxFuture<'static, Option<Relationship>> {
        let store = self.store.clone();
        Box::pin(async move { store.load_relationship(&user_id, &persona).await })
    }

    fn submit(&self, record: Record) {
        // A refused record is counted (and warned about) by the writer itself.
        let _ = self.store.record(record);
    }

    fn after_call(&self, call: FinishedCall) {
        let store = self.store.clone();
        self.tasks.spawn(async move {
            let result = memory::remember_call(
                &store,
                call.llm.as_ref(),
                &call.persona_name,
                &call.persona,
                &call.user_id,
                call.call_id,
                &call.turns,
            )
            .await;
            match result {
                Ok(summary) => {
                    if let Some(usage) = summary.usage {
                        // The summary's tokens are the call's cost too.
                        let (input, output) = call.llm_tokens;
                        for (unit, total) in [
                            (UsageUnit::LlmInputTokens, input + u64::from(usage.prompt_tokens)),
                            (UsageUnit::LlmOutputTokens, output + u64::from(usage.completion_tokens)),
                        ] {
                            let _ = store.usage(UsageRecord::new(call.call_id, unit, total as f64));
                        }
                    }
                    if summary.note.is_some() {
                        tracing::info!(call_id = %call.call_id, persona = %call.persona_name, "memory note added");
                    } else {
                        tracing::debug!(call_id = %call.call_id, "nothing to remember");
                    }
                }
                Err(e) => tracing::warn!(call_id = %call.call_id, error = %e, "memory summary failed"),
            }
        });
    }
}
