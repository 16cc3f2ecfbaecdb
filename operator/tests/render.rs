//! `voice-operator render`: offline rendering of the examples into the objects the
//! operator would apply.

use std::path::PathBuf;

use voice_operator::render::render;

fn example(name: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let content =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (name.to_string(), content)
}

#[test]
fn rendering_the_examples_prints_every_object_once() {
    // Proves render turns the example personas and VoiceDeployment into the full object set, offline.
    let mut files = vec![example("voicedeployment.yaml"), example("secret.yaml")];
    for f in ["persona.yaml", "persona-night-librarian.yaml"] {
        if PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(f)
            .exists()
        {
            files.push(example(f));
        }
    }
    let out = render(&files).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&out).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Ingress",
    ] {
        assert_eq!(
            kinds.iter().filter(|k| **k == kind).count(),
            1,
            "{kind} in {kinds:?}"
        );
    }
    // The example scales on calls: the operator sets replicas itself, no HPA.
    assert!(!kinds.contains(&"HorizontalPodAutoscaler"), "{kinds:?}");
    // The pods get no Kubernetes API access, so no Role or RoleBinding is made.
    assert!(!kinds.contains(&"Role") && !kinds.contains(&"RoleBinding"));
    // One ConfigMap holds every persona, the routes and the prices.
    assert_eq!(kinds.iter().filter(|k| **k == "ConfigMap").count(), 1);
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert!(config["data"]["_routes.yaml"].is_string());
    assert_eq!(
        config["data"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !k.starts_with('_'))
            .count(),
        files.len() - 2,
        "one key per example persona"
    );
    assert!(docs.iter().all(|d| d["metadata"]["namespace"] == "default"));
}

#[test]
fn rendering_rejects_a_document_that_breaks_the_schema() {
    // Proves a malformed VoiceDeployment is reported with its file name instead of rendering garbage.
    let bad = "apiVersion: callmeback.dev/v1alpha1\nkind: VoiceDeployment\nmetadata: {name: x}\nspec: {personas: [a]}\n";
    let err = render(&[("bad.yaml".into(), bad.into())])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.yaml") && err.contains("VoiceDeployment"),
        "{err}"
    );
}
