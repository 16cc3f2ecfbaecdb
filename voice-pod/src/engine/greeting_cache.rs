//! Each persona's greeting, synthesized once per pod and replayed from memory.
//!
//! The greeting is static text, so the first words of every call need no TTS round
//! trip: the cache holds its mu-law audio (padded to whole 20 ms frames) keyed by
//! everything that changes the sound. Concurrent first calls share one synthesis;
//! a failed synthesis is not cached (the next call retries). A persona edited by
//! hot reload gets a new key, and its old entry is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use callmeback_api::{PersonaSpec, VoiceSpec};
use tokio::sync::OnceCell;

use super::playout::{FRAME_BYTES, MULAW_SILENCE};

/// Which static phrase of a persona.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phrase {
    /// The first words of every call.
    Greeting,
    /// Spoken when the language model fails.
    Fallback,
    /// Spoken before hanging up.
    Goodbye,
    /// Spoken when the caller has gone quiet.
    IdlePrompt,
}

impl Phrase {
    /// Every phrase.
    pub const ALL: [Phrase; 4] = [
        Phrase::Greeting,
        Phrase::Fallback,
        Phrase::Goodbye,
        Phrase::IdlePrompt,
    ];

    /// The persona's text for this phrase.
    pub fn text(self, spec: &PersonaSpec) -> &str {
        match self {
            Phrase::Greeting => &spec.greeting,
            Phrase::Fallback => &spec.fallback_phrase,
            Phrase::Goodbye => &spec.goodbye,
            Phrase::IdlePrompt => &spec.idle_prompt,
        }
    }
}

/// Everything that changes how a static phrase sounds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GreetingKey {
    /// The persona's name (one live entry per persona and phrase).
    pub persona: String,
    /// Which phrase.
    pub phrase: Phrase,
    /// The greeting text.
    pub text: String,
    /// The voice, model and settings, rendered canonically.
    pub voice: String,
}

impl GreetingKey {
    /// The key for a persona's current greeting.
    pub fn for_persona(name: &str, spec: &PersonaSpec) -> Self {
        Self::for_phrase(name, spec, Phrase::Greeting)
    }

    /// The key for one of a persona's static phrases.
    pub fn for_phrase(name: &str, spec: &PersonaSpec, phrase: Phrase) -> Self {
        Self {
            persona: name.to_string(),
            phrase,
            text: phrase.text(spec).to_string(),
            voice: voice_fingerprint(&spec.voice),
        }
    }
}

fn voice_fingerprint(v: &VoiceSpec) -> String {
    format!(
        "{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}",
        v.provider, v.voice_id, v.model_id, v.stability, v.similarity_boost, v.style, v.speed
    )
}

/// Greeting audio shared by all calls of a persona.
pub type GreetingAudio = Arc<[u8]>;

type Slot = Arc<OnceCell<GreetingAudio>>;

/// The pod-wide greeting cache.
#[derive(Default)]
pub struct GreetingCache {
    slots: Mutex<HashMap<GreetingKey, Slot>>,
}

impl GreetingCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached audio, if synthesized already.
    pub fn get(&self, key: &GreetingKey) -> Option<GreetingAudio> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(key).and_then(|s| s.get().cloned())
    }

    /// The audio for `key`, synthesizing it with `synth` if no call has yet.
    /// Concurrent callers wait for one synthesis.
    pub async fn get_or_synthesize<F, Fut, E>(
        &self,
        key: &GreetingKey,
        synth: F,
    ) -> Result<GreetingAudio, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            // A new text or voice for this persona's phrase replaces its old entry.
            slots.retain(|k, _| k.persona != key.persona || k.phrase != key.phrase || k == key);
            slots.entry(key.clone()).or_default().clone()
        };
        let audio = slot
            .get_or_try_init(|| async {
                let mut audio = synth().await?;
                let rem = audio.len() % FRAME_BYTES;
                if rem != 0 {
                    audio.resize(audio.len() + FRAME_BYTES - rem, MULAW_SILENCE);
                }
                Ok::<GreetingAudio, E>(audio.into())
            })
            .await?;
        Ok(audio.clone())
    }

    /// Caches audio synthesized elsewhere (a call that streamed the phrase live
    /// because it was not cached yet). Keeps an existing entry.
    pub fn put(&self, key: &GreetingKey, mut audio: Vec<u8>) {
        let rem = audio.len() % FRAME_BYTES;
        if rem != 0 {
            audio.resize(audio.len() + FRAME_BYTES - rem, MULAW_SILENCE);
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|k, _| k.persona != key.persona || k.phrase != key.phrase || k == key);
        let slot = slots.entry(key.clone()).or_default();
        let _ = slot.set(audio.into());
    }

    /// Number of cached greetings.
    pub fn len(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.values().filter(|s| s.initialized()).count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn persona(greeting: &str) -> PersonaSpec {
        serde_json::from_value(serde_json::json!({
            "displayName": "Ava",
            "systemPrompt": "x",
            "greeting": greeting,
            "voice": {"voiceId": "v1"}
        }))
        .expect("static persona")
    }

    #[tokio::test]
    async fn concurrent_first_calls_share_one_synthesis_and_audio_is_whole_frames() {
        // Proves one TTS round trip per greeting per pod, however many calls race.
        let cache = Arc::new(GreetingCache::new());
        let key = GreetingKey::for_persona("ava", &persona("Hi!"));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, key, calls) = (cache.clone(), key.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_synthesize(&key, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok::<_, std::io::Error>(vec![0x42; 1000])
                    })
                    .await
            }));
        }
        for t in tasks {
            let audio = t.await.expect("task").expect("synth");
            assert_eq!(audio.len(), 1120);
            assert_eq!(audio[1119], MULAW_SILENCE);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.get(&key).is_some());
    }

    #[tokio::test]
    async fn a_failed_synthesis_is_retried_and_an_edited_greeting_replaces_the_old() {
        // Proves errors are not cached and hot-reloaded greetings get fresh audio.
        let cache = GreetingCache::new();
        let k1 = GreetingKey::for_persona("ava", &persona("Hi!"));
        let err = cache
            .get_or_synthesize(&k1, || async { Err::<Vec<u8>, _>("tts down") })
            .await;
        assert_eq!(err.err(), Some("tts down"));
        assert!(cache.is_empty());
        let a = cache
            .get_or_synthesize(&k1, || async { Ok::<_, &str>(vec![1; 160]) })
            .await
            .expect("retry");
        assert_eq!(&a[..], &[1; 160][..]);
        let k2 = GreetingKey::for_persona("ava", &persona("Hello again!"));
        assert_ne!(k1, k2);
        cache
            .get_or_synthesize(&k2, || async { Ok::<_, &str>(vec![2; 160]) })
            .await
            .expect("new greeting");
        assert!(cache.get(&k1).is_none(), "old greeting dropped");
        assert_eq!(cache.len(), 1);
    }
}
