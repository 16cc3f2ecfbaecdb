//! Reading one persona file or the routes file: format detection, parsing, and the
//! checks the Kubernetes API server would have made (files on disk skip them).

use std::collections::BTreeMap;
use std::path::Path;

use callmeback_api::PersonaSpec;
use serde::Deserialize;

use callmeback_api::is_e164;

/// Why a file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Could not read it.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// Not valid YAML/JSON.
    #[error("syntax: {0}")]
    Syntax(String),
    /// Valid syntax, wrong shape (missing or mistyped fields).
    #[error("schema: {0}")]
    Schema(String),
    /// Parsed, but a value breaks a rule of the CRD.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// What a file in the persona directory turned out to be.
// A persona spec is large and routes are small; these values are built once per
// file load, never stored in bulk, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PersonaFile {
    /// A persona: its name and spec.
    Persona(String, PersonaSpec),
    /// A Kubernetes object of another kind (a `VoiceDeployment` in `examples/`, say):
    /// skipped, not an error.
    OtherKind(String),
}

/// File extensions read from the persona directory.
pub const PERSONA_EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// Parses a YAML or JSON document into a generic value.
fn parse_value(path: &Path, text: &str) -> Result<serde_json::Value, LoadError> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        serde_json::from_str(text).map_err(|e| LoadError::Syntax(e.to_string()))
    } else {
        serde_saphyr::from_str(text).map_err(|e| LoadError::Syntax(e.to_string()))
    }
}

/// Parses a persona file: either a bare `PersonaSpec` (the operator's ConfigMap
/// format; the name is the file stem) or a full `Persona` object (`apiVersion`,
/// `kind`, `metadata.name`, `spec`), as in `examples/persona.yaml`.
pub fn parse_persona(path: &Path, text: &str) -> Result<PersonaFile, LoadError> {
    let value = parse_value(path, text)?;
    let (name, spec_value) = match value.get("kind").and_then(|k| k.as_str()) {
        Some("Persona") => {
            let api = value
                .get("apiVersion")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if !api.starts_with("callmeback.dev/") {
                return Err(LoadError::Schema(format!(
                    "kind Persona with apiVersion {api:?}; expected callmeback.dev/v1alpha1"
                )));
            }
            let name = value
                .pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .ok_or_else(|| LoadError::Schema("Persona without metadata.name".into()))?
                .to_string();
            let spec = value
                .get("spec")
                .cloned()
                .ok_or_else(|| LoadError::Schema("Persona without spec".into()))?;
            (name, spec)
        }
        Some(other) if value.get("apiVersion").is_some() => {
            return Ok(PersonaFile::OtherKind(other.to_string()));
        }
        _ => {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| LoadError::Invalid("file name is not UTF-8".into()))?;
            (stem.to_string(), value)
        }
    };
    validate_name(&name)?;
    let spec: PersonaSpec =
        serde_json::from_value(spec_value).map_err(|e| LoadError::Schema(e.to_string()))?;
    validate_spec(&spec)?;
    Ok(PersonaFile::Persona(name, spec))
}

/// Persona names are Kubernetes object names (DNS subdomain): they become file
/// names, metric labels and `<Parameter>` values, so nothing else is accepted.
pub fn validate_name(name: &str) -> Result<(), LoadError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(LoadError::Invalid(format!(
            "persona name {name:?} must be lower-case letters, digits, '-' or '.' (a Kubernetes name)"
        )))
    }
}

/// The CRD's validation rules that matter to a call.
pub fn validate_spec(spec: &PersonaSpec) -> Result<(), LoadError> {
    let mut problems = Vec::new();
    let len = |s: &str| s.chars().count();
    if !(1..=100).contains(&len(&spec.display_name)) {
        problems.push("displayName must be 1-100 characters".to_string());
    }
    if !(1..=20000).contains(&len(&spec.system_prompt)) {
        problems.push("systemPrompt must be 1-20000 characters".to_string());
    }
    if !(1..=500).contains(&len(&spec.greeting)) {
        problems.push("greeting must be 1-500 characters".to_string());
    }
    let vid = &spec.voice.voice_id;
    if vid.is_empty()
        || vid.len() > 64
        || !vid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        problems.push("voice.voiceId must be 1-64 characters of A-Z, a-z, 0-9, _ or -".to_string());
    }
    if !(30..=14400).contains(&spec.max_call_duration_seconds) {
        problems.push("maxCallDurationSeconds must be 30-14400".to_string());
    }
    if spec.idle_timeout_seconds >= spec.max_call_duration_seconds {
        problems.push("idleTimeoutSeconds must be shorter than maxCallDurationSeconds".to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LoadError::Invalid(problems.join("; ")))
    }
}

/// `routes.yaml`: inbound number -> persona.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    /// Persona for numbers without a route.
    #[serde(default)]
    pub default: Option<String>,
    /// E.164 number -> persona name.
    #[serde(default)]
    pub numbers: BTreeMap<String, String>,
}

/// Parses and checks a routes file (YAML; JSON is valid YAML).
pub fn parse_routes(text: &str) -> Result<Routes, LoadError> {
    if text.trim().is_empty() {
        return Ok(Routes::default());
    }
    let routes: Routes =
        serde_saphyr::from_str(text).map_err(|e| LoadError::Syntax(e.to_string()))?;
    let bad: Vec<&str> = routes
        .numbers
        .keys()
        .filter(|n| !is_e164(n))
        .map(String::as_str)
        .collect();
    if !bad.is_empty() {
        return Err(LoadError::Invalid(format!(
            "{} route number(s) are not E.164 (+ and 7-15 digits)",
            bad.len()
        )));
    }
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Any text as a persona or routes file (YAML or JSON): a persona, a skip or a
        // clear error, never a panic.
        #[test]
        fn arbitrary_persona_and_routes_files_never_panic(
            text in "(?s).{0,400}",
            value in "(?s).{0,40}",
            n in proptest::prelude::any::<i64>(),
        ) {
            let _ = parse_persona(Path::new("/p/x.yaml"), &text);
            let _ = parse_persona(Path::new("/p/x.json"), &text);
            let _ = parse_routes(&text);
            let shaped = format!(
                "displayName: {value:?}\nsystemPrompt: {value:?}\ngreeting: {value:?}\nvoice:\n  voiceId: {value:?}\nmaxCallDurationSeconds: {n}\nidleTimeoutSeconds: {n}\nllm:\n  maxTokens: {n}\n"
            );
            if let Ok(PersonaFile::Persona(_, spec)) = parse_persona(Path::new("/p/x.yaml"), &shaped) {
                let _ = validate_spec(&spec);
            }
            let _ = parse_routes(&format!("default: {value:?}\nnumbers:\n  {value:?}: {value:?}\n"));
        }
    }

    const SPEC: &str =
        "displayName: Ada\nsystemPrompt: You are Ada.\ngreeting: Hi!\nvoice:\n  voiceId: abc123\n";

    #[test]
    fn bare_spec_takes_the_file_name() {
        // Proves the operator's format (a bare PersonaSpec) is named after its file.
        match parse_persona(Path::new("/p/ada.yaml"), SPEC).unwrap() {
            PersonaFile::Persona(name, spec) => {
                assert_eq!(name, "ada");
                assert_eq!(spec.greeting, "Hi!");
                assert_eq!(spec.max_call_duration_seconds, 900);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn full_persona_object_uses_metadata_name() {
        // Proves a full Persona CR is accepted and named by metadata.name.
        let text = format!(
            "apiVersion: callmeback.dev/v1alpha1\nkind: Persona\nmetadata:\n  name: ada-lovelace\nspec:\n{}",
            SPEC.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        match parse_persona(Path::new("/p/persona.yaml"), &text).unwrap() {
            PersonaFile::Persona(name, _) => assert_eq!(name, "ada-lovelace"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_kinds_are_skipped_and_bad_files_explained() {
        // Proves non-Persona manifests are skipped and broken files give clear errors.
        let vd = "apiVersion: callmeback.dev/v1alpha1\nkind: VoiceDeployment\nmetadata: {name: x}\nspec: {}\n";
        assert!(
            matches!(parse_persona(Path::new("vd.yaml"), vd).unwrap(), PersonaFile::OtherKind(k) if k == "VoiceDeployment")
        );
        assert!(matches!(
            parse_persona(Path::new("a.yaml"), "a: [unclosed"),
            Err(LoadError::Syntax(_))
        ));
        assert!(matches!(
            parse_persona(Path::new("a.yaml"), "displayName: x"),
            Err(LoadError::Schema(_))
        ));
        let long = SPEC.replace("Hi!", &"x".repeat(501));
        assert!(matches!(
            parse_persona(Path::new("a.yaml"), &long),
            Err(LoadError::Invalid(_))
        ));
        assert!(matches!(
            parse_persona(Path::new("Bad_Name.yaml"), SPEC),
            Err(LoadError::Invalid(_))
        ));
        let json =
            r#"{"displayName":"A","systemPrompt":"p","greeting":"g","voice":{"voiceId":"v"}}"#;
        assert!(
            matches!(parse_persona(Path::new("j.json"), json).unwrap(), PersonaFile::Persona(n, _) if n == "j")
        );
    }

    #[test]
    fn routes_parse_and_reject_bad_numbers() {
        // Proves routes.yaml parses and non-E.164 keys are refused.
        let r = parse_routes("default: ada\nnumbers:\n  \"+14155550100\": bob\n").unwrap();
        assert_eq!(r.default.as_deref(), Some("ada"));
        assert_eq!(r.numbers["+14155550100"], "bob");
        assert!(parse_routes("numbers:\n  \"555\": bob\n").is_err());
        assert!(parse_routes("defualt: ada\n").is_err());
        assert_eq!(parse_routes("").unwrap(), Routes::default());
    }
}
