//! The conversation engine: one call's dialogue between the caller and the persona.
//!
//! [`Engine`] is the pod's [`CallHandler`]: each call runs as one session task
//! ([`call`]) that listens (STT + the pod's own voice-activity detector), decides when
//! the caller is done ([`turn_taking`]), streams the model's reply through a chunker
//! into TTS and paces the audio to Twilio ([`playout`]), and stops within a frame or
//! two when the caller interrupts, keeping in the history only what was heard.
//!
//! ## Layout
//! - [`call`]: the per-call session loop (replies, barge-in, preemption, timers).
//! - [`turn_taking`]: when the caller has finished (endpoints, completeness, judge).
//! - [`judge`]: the optional fast LLM judgement of an ambiguous end of turn.
//! - [`vad`]: the pod's energy voice-activity detector on the caller audio.
//! - [`chunker`]: LLM tokens -> speakable sentence and clause chunks for TTS.
//! - [`playout`]: pacing reply audio to real time and knowing what the caller heard.
//! - [`prompt`]: system prompt composition and the bounded dialogue history.
//! - [`greeting_cache`]: each persona's static phrases, synthesized once per pod.
//! - [`journal`]: the seam to persistence (relationship at start, turns, usage, end).

pub mod call;
pub mod chunker;
pub mod greeting_cache;
pub mod journal;
pub mod judge;
pub mod playout;
pub mod prompt;
pub mod turn_taking;
pub mod vad;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_api::PersonaSpec;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::store::journal::Journal;
pub use call::EngineSettings;
use call::{Call, Shared};
use greeting_cache::{GreetingCache, GreetingKey, Phrase};

use crate::metrics::Metrics;
use crate::personas::Personas;
use crate::providers::{
    LlmError, ProviderInitError, ProviderSettings, Providers, TtsError, TtsEvent, TtsSession,
    TtsSessionConfig,
};
use crate::session::{CallContext, CallEnd, CallHandler, CallInput, CallOutput, PreparedCall};

/// How long warming one persona's phrases may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one phrase's synthesis may take.
const PHRASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the model check may take.
const MODEL_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The conversation engine: the pod's call handler when providers are configured.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    warming: Arc<Mutex<HashSet<String>>>,
    /// LLM models already checked against the provider's model list.
    checked_models: Arc<Mutex<HashSet<String>>>,
}

impl Engine {
    /// An engine with default settings.
    pub fn new(providers: Providers, metrics: Arc<Metrics>) -> Self {
        Self::with_settings(providers, metrics, EngineSettings::default())
    }

    /// An engine with explicit settings (tests shorten timers).
    pub fn with_settings(
        providers: Providers,
        metrics: Arc<Metrics>,
        settings: EngineSettings,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                providers,
                metrics,
                phrases: Arc::new(GreetingCache::new()),
                settings,
                journal: None,
                pod_name: None,
            }),
            warming: Arc::new(Mutex::new(HashSet::new())),
            checked_models: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Journals every call (relationship at start, transcript, usage, end, memory)
    /// into `journal`; `pod_name` goes on the call records.
    pub fn with_journal(mut self, journal: Arc<dyn Journal>, pod_name: Option<String>) -> Self {
        let s = &self.shared;
        self.shared = Arc::new(Shared {
            providers: s.providers.clone(),
            metrics: s.metrics.clone(),
            phrases: s.phrases.clone(),
            settings: s.settings.clone(),
            journal: Some(journal),
            pod_name: pod_name.map(Arc::from),
        });
        self
    }

    /// Checks once per model that the provider serves it, and says so clearly in the
    /// log if not (every reply of such a persona would be the fallback phrase).
    fn check_model_once(&self, model: &str) {
        let first = self
            .checked_models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string());
        if !first {
            return;
        }
        let llm = self.shared.providers.llm.clone();
        let checked = self.checked_models.clone();
        let model = model.to_string();
        tokio::spawn(async move {
            match tokio::time::timeout(MODEL_CHECK_TIMEOUT, llm.check_model(&model)).await {
                Ok(Ok(())) => info!(%model, "LLM model is available"),
                Ok(Err(e @ LlmError::UnknownModel { .. })) => {
                    error!(error = %e, "LLM model does not exist: this persona can only speak its fallback phrase")
                }
                Ok(Err(e)) => {
                    warn!(%model, error = %e, "could not check the LLM model; will retry");
                    checked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&model);
                }
                Err(_) => {
                    warn!(%model, "checking the LLM model timed out; will retry");
                    checked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&model);
                }
            }
        });
    }

    /// The pod-wide cache of synthesized phrases.
    pub fn phrases(&self) -> &Arc<GreetingCache> {
        &self.shared.phrases
    }

    /// Synthesizes a persona's static phrases (greeting, fallback, goodbye, idle
    /// prompt) that are not cached yet, over one TTS session. Returns how many.
    pub async fn warm_phrases(&self, name: &str, spec: &PersonaSpec) -> Result<usize, TtsError> {
        let cache = &self.shared.phrases;
        let missing: Vec<Phrase> = Phrase::ALL
            .into_iter()
            .filter(|p| {
                cache
                    .get(&GreetingKey::for_phrase(name, spec, *p))
                    .is_none()
            })
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let mut session = self
            .shared
            .providers
            .tts
            .connect(TtsSessionConfig::from_spec(&spec.voice, "warmup"), cancel)
            .await?;
        let mut n = 0;
        for (i, p) in missing.iter().enumerate() {
            let key = GreetingKey::for_phrase(name, spec, *p);
            let ctx = format!("warm{i}");
            let text = p.text(spec).to_string();
            cache
                .get_or_synthesize(&key, || synthesize(&mut session, ctx, text))
                .await?;
            n += 1;
        }
        session.control.close().await;
        Ok(n)
    }
}

impl Engine {
    /// Synthesizes the phrases of every persona in `dir` (at pod start), so even the
    /// first call of each persona hears its greeting without a TTS round trip.
    /// Personas added later are warmed by their first call's `prepare`.
    pub async fn warm_persona_dir(self, dir: PathBuf, routes_file: PathBuf) {
        // A private registry: this load must not move the pod's persona gauges.
        let loaded = tokio::task::spawn_blocking(move || {
            Personas::load(dir, routes_file, Arc::new(Metrics::new())).snapshot()
        })
        .await;
        let Ok(set) = loaded else {
            return;
        };
        for name in set.names() {
            let Some(spec) = set.get(name) else {
                continue;
            };
            self.prepare_phrases(name.to_string(), spec).await;
        }
    }

    /// Warms one persona unless another task is warming it already.
    async fn prepare_phrases(&self, name: String, spec: Arc<PersonaSpec>) {
        let first = self
            .warming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
        if !first {
            return;
        }
        let span = info_span!("warm_phrases", persona = %name);
        async {
            match tokio::time::timeout(WARM_TIMEOUT, self.warm_phrases(&name, &spec)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => info!(phrases = n, "persona phrases synthesized"),
                Ok(Err(e)) => warn!(error = %e, "could not synthesize persona phrases"),
                Err(_) => warn!("synthesizing persona phrases timed out"),
            }
        }
        .instrument(span)
        .await;
        self.warming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
    }
}

/// Synthesizes one phrase on a session: all audio of one context.
async fn synthesize(
    session: &mut TtsSession,
    ctx: String,
    text: String,
) -> Result<Vec<u8>, TtsError> {
    session.control.speak(&ctx, &format!("{text} ")).await?;
    session.control.end(&ctx).await?;
    let mut audio = Vec::new();
    let collect = async {
        while let Some(ev) = session.events.recv().await {
            match ev {
                TtsEvent::Audio { context_id, mulaw } if context_id == ctx => {
                    audio.extend_from_slice(&mulaw);
                }
                TtsEvent::ContextDone { context_id } if context_id == ctx => return Ok(()),
                TtsEvent::Error(e) => return Err(e),
                _ => {}
            }
        }
        Err(TtsError::SessionClosed)
    };
    tokio::time::timeout(PHRASE_TIMEOUT, collect)
        .await
        .map_err(|_| TtsError::Timeout("phrase synthesis"))??;
    Ok(audio)
}

impl CallHandler for Engine {
    fn prepare(&self, call: &PreparedCall) {
        self.check_model_once(&call.persona.llm.model);
        let engine = self.clone();
        let (name, spec) = (call.spec.persona.clone(), call.persona.clone());
        tokio::spawn(async move { engine.prepare_phrases(name, spec).await });
    }

    fn run(
        &self,
        ctx: CallContext,
        input: mpsc::Receiver<CallInput>,
        output: mpsc::Sender<CallOutput>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, CallEnd> {
        self.check_model_once(&ctx.persona.llm.model);
        let shared = self.shared.clone();
        Box::pin(async move {
            // Bounded by the journal: a slow database delays the greeting by at most
            // the relationship wait, then the call goes on without it.
            let (ctx, relationship, journal) =
                journal::open(shared.journal.clone(), shared.pod_name.clone(), ctx).await;
            let call = Call::new(shared, ctx, output, journal, relationship.as_ref());
            call.run(input, cancel).await
        })
    }
}

/// The provider keys; with none set the pod runs without the engine.
const PROVIDER_KEYS: [&str; 3] = ["DEEPGRAM_API_KEY", "CEREBRAS_API_KEY", "ELEVENLABS_API_KEY"];

impl Engine {
    /// The engine over the real providers configured through `lookup` (the
    /// environment): `Ok(None)` when no provider key is set at all, an error naming the
    /// setting when some are set but the configuration cannot work.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Self>, ProviderInitError> {
        if PROVIDER_KEYS
            .iter()
            .all(|k| lookup(k).is_none_or(|v| v.trim().is_empty()))
        {
            return Ok(None);
        }
        let settings = ProviderSettings::from_lookup(lookup)?;
        let providers = Providers::real(&settings, metrics.clone())?;
        Ok(Some(Self::new(providers, metrics)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_settings_are_all_or_nothing() {
        // Proves no keys means "no engine", and a half-configured engine fails naming the gap.
        let metrics = Arc::new(Metrics::new());
        assert!(matches!(
            Engine::from_lookup(|_| None, metrics.clone()),
            Ok(None)
        ));
        let err = Engine::from_lookup(
            |k| (k == "CEREBRAS_API_KEY").then(|| "k".to_string()),
            metrics.clone(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("DEEPGRAM_API_KEY is not set"), "{err}");
        let all = Engine::from_lookup(
            |k| k.ends_with("_API_KEY").then(|| "k".to_string()),
            metrics,
        );
        assert!(matches!(all, Ok(Some(_))));
    }
}
