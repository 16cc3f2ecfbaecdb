//! Cost of mapping one Persona event to the VoiceDeployments to reconcile, with 10
//! and with 1,000 VoiceDeployments in the namespace (each naming its own persona,
//! plus 5 that select by label): the index keeps it flat, where the scan it
//! replaced grew with every VoiceDeployment.
//!
//! Run: `cargo bench -p voice-operator --bench persona_event`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kube::runtime::watcher;
use voice_operator::references::References;

use callmeback_api::{Persona, VoiceDeployment};

fn vd(name: &str, personas: &[String], select: bool) -> VoiceDeployment {
    let mut spec = serde_json::json!({
        "personas": personas,
        "secretRef": { "name": "keys" },
        "publicUrl": "https://voice.example.com",
    });
    if select {
        spec["personaSelector"] = serde_json::json!({ "matchLabels": { "team": "night" } });
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "VoiceDeployment",
        "metadata": { "name": name, "namespace": "prod" },
        "spec": spec,
    }))
    .expect("a valid VoiceDeployment")
}

fn persona(name: &str) -> Persona {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "Persona",
        "metadata": { "name": name, "namespace": "prod", "labels": { "team": "day" } },
        "spec": { "displayName": "Sam", "systemPrompt": "You are Sam.", "greeting": "Hi!", "voice": { "voiceId": "v" } },
    }))
    .expect("a valid Persona")
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("persona_event");
    for count in [10usize, 1_000] {
        let refs = References::default();
        for i in 0..count {
            refs.observe(&watcher::Event::Apply(vd(
                &format!("vd-{i}"),
                &[format!("persona-{i}")],
                false,
            )));
        }
        for i in 0..5 {
            refs.observe(&watcher::Event::Apply(vd(
                &format!("selecting-{i}"),
                &[],
                true,
            )));
        }
        let edited = persona("persona-7");
        assert_eq!(refs.using_persona(&edited).len(), 1);
        group.bench_with_input(
            BenchmarkId::new("map_one_persona_event", count),
            &edited,
            |b, p| b.iter(|| std::hint::black_box(refs.using_persona(p))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
