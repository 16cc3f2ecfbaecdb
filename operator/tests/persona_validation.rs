//! `PersonaSpec::problems`: the checks beyond the CRD schema that turn a persona
//! `Ready=False/Invalid` (and a VoiceDeployment `Degraded/PersonaInvalid`).

use callmeback_api::PersonaSpec;

fn spec() -> PersonaSpec {
    serde_json::from_value(serde_json::json!({
        "displayName": "Sam",
        "systemPrompt": "You are Sam.",
        "greeting": "Hi, it's Sam.",
        "voice": { "voiceId": "v1" },
    }))
    .unwrap()
}

#[test]
fn a_sensible_persona_has_no_problems() {
    // Proves the defaults plus minimal fields form a valid persona.
    assert!(spec().problems().is_empty(), "{:?}", spec().problems());
}

#[test]
fn blank_and_control_character_text_is_reported_by_field() {
    // Proves whitespace-only prompts and control characters are caught and name the field.
    let mut s = spec();
    s.system_prompt = "  \n ".into();
    s.greeting = "Hi\u{0007}".into();
    let p = s.problems();
    assert!(p.contains(&"systemPrompt is blank".to_string()), "{p:?}");
    assert!(
        p.contains(&"greeting contains control characters".to_string()),
        "{p:?}"
    );
}

#[test]
fn long_greetings_and_oversized_prompts_are_reported() {
    // Proves a greeting too long to start a call promptly and a prompt leaving no room for replies are rejected.
    let mut s = spec();
    s.greeting = "word ".repeat(120);
    s.system_prompt = "x".repeat(19_990);
    s.llm.max_tokens = 4096;
    let p = s.problems();
    assert!(
        p.iter().any(|m| m.starts_with("greeting has 120 words")),
        "{p:?}"
    );
    assert!(p.iter().any(|m| m.contains("exceeds 8192 tokens")), "{p:?}");
}

#[test]
fn duplicate_keyterms_are_reported() {
    // Proves keyterms that differ only by case are flagged once.
    let mut s = spec();
    s.stt.keyterms = vec!["Marian".into(), "marian".into()];
    assert_eq!(
        s.problems(),
        vec!["stt.keyterms lists \"marian\" twice".to_string()]
    );
}
