//! Personas change without restarts: against the real control plane (kwok runs the
//! pods), editing, adding, invalidating, deleting or deselecting a Persona changes
//! only the VoiceDeployment's one ConfigMap, never the Deployment or its pods; an
//! invalid persona keeps serving its last valid generation (across an operator
//! restart) and the status says which generation is served. Also: the schema
//! refuses a disruption budget of `maxUnavailable: 0` with a reason.

use std::collections::BTreeMap;
use std::time::Duration;

use callmeback_api::{Persona, PersonaServing, VoiceDeployment, find_condition};
use callmeback_tests::operator_harness::{
    apply_json, eventually, get, restart_operator, secret_doc, setup, try_apply_json,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};

/// A valid persona labelled for the deployment's selector.
fn persona(name: &str, greeting: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "Persona",
        "metadata": { "name": name, "labels": { "desk": "front" } },
        "spec": {
            "displayName": "Sam",
            "systemPrompt": "You are Sam, warm and brief.",
            "greeting": greeting,
            "voice": { "voiceId": "voice123" },
            "maxCallDurationSeconds": 600,
        }
    })
}

fn desk() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "callmeback.dev/v1alpha1",
        "kind": "VoiceDeployment",
        "metadata": { "name": "desk" },
        "spec": {
            "personaSelector": { "matchLabels": { "desk": "front" } },
            "secretRef": { "name": "callmeback-keys" },
            "publicUrl": "https://voice.example.com",
            "replicas": 2,
        }
    })
}

/// The Deployment's identity for "nothing changed": resourceVersion, generation,
/// and the UIDs of its pods.
async fn deployment_state(client: &Client, ns: &str) -> (String, i64, Vec<String>) {
    let d: Deployment = get(client, ns, "desk").await.expect("Deployment");
    let mut pods: Vec<String> = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("app.kubernetes.io/instance=desk"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    pods.sort();
    (
        d.metadata.resource_version.unwrap_or_default(),
        d.metadata.generation.unwrap_or_default(),
        pods,
    )
}

async fn config_data(client: &Client, ns: &str) -> Option<BTreeMap<String, String>> {
    get::<ConfigMap>(client, ns, "desk-config").await?.data
}

async fn served(client: &Client, ns: &str) -> Option<Vec<PersonaServing>> {
    let vd: VoiceDeployment = get(client, ns, "desk").await?;
    let status = vd.status?;
    (status.observed_generation == vd.metadata.generation).then_some(status.personas)
}

fn serving(name: &str, served: i64, current: i64, valid: bool) -> PersonaServing {
    PersonaServing {
        name: name.into(),
        served_generation: Some(served),
        current_generation: Some(current),
        valid,
    }
}

#[tokio::test]
async fn persona_changes_reach_only_the_configmap_and_an_invalid_one_keeps_its_last_version() {
    // Proves edits, additions, an invalidation (kept at its last valid generation, also after an operator restart), a deselection and a deletion all change only `desk-config`: the Deployment's resourceVersion, generation and pod UIDs stay the same throughout.
    let (cp, ns, client, op) = setup("op-personas").await;
    apply_json(&client, &ns, secret_doc()).await;
    apply_json(&client, &ns, persona("sam", "Hi, it's Sam!")).await;
    apply_json(&client, &ns, desk()).await;
    eventually("sam served", || async {
        config_data(&client, &ns)
            .await?
            .get("sam.yaml")?
            .contains("Hi, it's Sam!")
            .then_some(())
    })
    .await;
    // kwok starts the pods; wait until the Deployment stops changing (3 s unchanged).
    let before = eventually("a settled Deployment", || async {
        let d: Deployment = get(&client, &ns, "desk").await?;
        let ready = d.status?.ready_replicas.unwrap_or(0) == 2;
        let a = deployment_state(&client, &ns).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let b = deployment_state(&client, &ns).await;
        (ready && a == b && a.2.len() == 2).then_some(b)
    })
    .await;

    // Edit.
    apply_json(&client, &ns, persona("sam", "Hello again, Sam here.")).await;
    eventually("the edit in the ConfigMap", || async {
        config_data(&client, &ns)
            .await?
            .get("sam.yaml")?
            .contains("Hello again")
            .then_some(())
    })
    .await;
    // Add (a new Persona matching the selector).
    apply_json(&client, &ns, persona("ada", "Ada speaking.")).await;
    eventually("ada added", || async {
        let served = served(&client, &ns).await?;
        (served == vec![serving("ada", 1, 1, true), serving("sam", 2, 2, true)]).then_some(())
    })
    .await;
    assert!(config_data(&client, &ns).await.unwrap()["ada.yaml"].contains("Ada speaking."));

    // Invalidate sam (generation 3): generation 2 stays served.
    let mut broken = persona("sam", "Broken on purpose.");
    broken["spec"]["systemPrompt"] = "   ".into();
    apply_json(&client, &ns, broken).await;
    eventually("sam kept at generation 2", || async {
        let served = served(&client, &ns).await?;
        (served == vec![serving("ada", 1, 1, true), serving("sam", 2, 3, false)]).then_some(())
    })
    .await;
    let data = config_data(&client, &ns).await.unwrap();
    assert!(data["sam.yaml"].contains("Hello again, Sam here."));
    assert!(!data["sam.yaml"].contains("Broken on purpose."));
    let vd: VoiceDeployment = get(&client, &ns, "desk").await.unwrap();
    let degraded = find_condition(&vd.status.as_ref().unwrap().conditions, "Degraded").unwrap();
    assert_eq!(degraded.reason, "PersonaInvalid");
    assert!(
        degraded
            .message
            .contains("serving its last valid generation 2"),
        "{degraded:?}"
    );
    assert!(
        vd.status
            .unwrap()
            .resolved_personas
            .contains(&"sam".to_string())
    );
    let sam: Persona = eventually("sam Ready=False", || async {
        let p: Persona = get(&client, &ns, "sam").await?;
        find_condition(&p.status.as_ref()?.conditions, "Ready")
            .filter(|c| !c.is_true())
            .map(|_| p.clone())
    })
    .await;
    assert_eq!(
        find_condition(&sam.status.unwrap().conditions, "Ready")
            .unwrap()
            .reason,
        "Invalid"
    );

    // An operator restart keeps serving generation 2 (read back from the ConfigMap).
    op.stop().await;
    let op = restart_operator(cp, &ns).await;
    apply_json(&client, &ns, persona("ada", "Ada, after the restart.")).await;
    eventually("ada edited after the restart", || async {
        let served = served(&client, &ns).await?;
        (served == vec![serving("ada", 2, 2, true), serving("sam", 2, 3, false)]).then_some(())
    })
    .await;
    assert!(
        config_data(&client, &ns).await.unwrap()["sam.yaml"].contains("Hello again, Sam here.")
    );

    // Deselect ada (relabel): it leaves promptly, not at the next periodic resync.
    let mut relabelled = persona("ada", "Ada, after the restart.");
    relabelled["metadata"]["labels"]["desk"] = "back".into();
    apply_json(&client, &ns, relabelled).await;
    eventually("ada deselected", || async {
        let gone = !config_data(&client, &ns).await?.contains_key("ada.yaml");
        (gone && served(&client, &ns).await? == vec![serving("sam", 2, 3, false)]).then_some(())
    })
    .await;
    // Delete sam: only now does its last valid version go.
    Api::<Persona>::namespaced(client.clone(), &ns)
        .delete("sam", &DeleteParams::default())
        .await
        .unwrap();
    eventually("sam removed", || async {
        (!config_data(&client, &ns).await?.contains_key("sam.yaml")).then_some(())
    })
    .await;

    let after = deployment_state(&client, &ns).await;
    assert_eq!(
        after, before,
        "persona changes must not touch the Deployment or its pods"
    );
    op.stop().await;
}

#[tokio::test]
async fn a_disruption_budget_of_zero_is_refused_with_the_reason() {
    // Proves the CRD schema rejects maxUnavailable: 0 with a message explaining it would block every drain, and accepts 1.
    let (_cp, ns, client, op) = setup("op-pdb-zero").await;
    let mut zero = desk();
    zero["spec"]["maxUnavailable"] = 0.into();
    let err = try_apply_json(&client, &ns, zero)
        .await
        .expect_err("maxUnavailable: 0 must be refused");
    let message = err.to_string();
    assert!(
        message.contains("maxUnavailable must be at least 1")
            && message.contains("block every voluntary disruption"),
        "{message}"
    );
    let mut one = desk();
    one["spec"]["maxUnavailable"] = 1.into();
    try_apply_json(&client, &ns, one)
        .await
        .expect("maxUnavailable: 1 is accepted");
    op.stop().await;
}
