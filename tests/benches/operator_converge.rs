//! Operator reconcile throughput and latency against the real control plane:
//! 1,000 Personas and 100 VoiceDeployments (10 personas each) created at once, then
//! the time until every Persona is Ready and every VoiceDeployment's status
//! resolved its personas, and per-reconcile p50/p99 from the operator's own
//! `operator_reconcile_duration_seconds` histogram (interpolated within buckets).
//!
//! `cargo bench -p callmeback-tests --bench operator_converge` (sizes via
//! `OPERATOR_BENCH_PERSONAS`, `OPERATOR_BENCH_DEPLOYMENTS`). Results go in
//! docs/benchmarks.md. Under `cargo test` (no `--bench` argument) it runs a smoke
//! version (20 Personas, 2 VoiceDeployments) so the test suite stays fast.

use std::time::{Duration, Instant};

use callmeback_api::{Persona, VoiceDeployment, find_condition};
use callmeback_tests::exposition;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use voice_operator::context::Config;
use voice_operator::controller;
use voice_operator::metrics::Metrics;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Quantile of `operator_reconcile_duration_seconds{kind}` from the operator's own
/// exposition (Prometheus' bucket interpolation).
fn quantile(metrics: &Metrics, kind: &str, q: f64) -> f64 {
    let samples = exposition::parse(&metrics.render()).expect("the operator's exposition parses");
    exposition::histogram_quantile(
        q,
        &samples,
        "operator_reconcile_duration_seconds",
        &[("kind", kind)],
    )
}

/// `operator_applies_total{outcome}` summed over kinds.
fn applies(metrics: &Metrics, outcome: &str) -> f64 {
    let samples = exposition::parse(&metrics.render()).expect("the operator's exposition parses");
    samples
        .iter()
        .filter(|s| {
            s.labels.get("__name__").map(String::as_str) == Some("operator_applies_total")
                && s.labels.get("outcome").map(String::as_str) == Some(outcome)
        })
        .map(|s| s.value)
        .sum()
}

#[tokio::main]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (personas_default, vds_default) = if bench { (1000, 100) } else { (20, 2) };
    let personas_n = env_usize("OPERATOR_BENCH_PERSONAS", personas_default);
    let vds_n = env_usize("OPERATOR_BENCH_DEPLOYMENTS", vds_default);
    let per_vd = (personas_n / vds_n.max(1)).max(1);
    let cp = callmeback_tests::controlplane::shared().await;
    let client = cp.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["crds/persona.yaml", "crds/voicedeployment.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).expect("crd file");
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("crd yaml");
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("install crd");
    }
    let personas_api: Api<Persona> = Api::all(client.clone());
    while personas_api
        .list(&ListParams::default().limit(1))
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ns = cp.new_namespace("op-bench").await;
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "keys" },
        "stringData": {
            "TWILIO_ACCOUNT_SID": "AC1", "TWILIO_AUTH_TOKEN": "t", "DEEPGRAM_API_KEY": "d",
            "CEREBRAS_API_KEY": "c", "ELEVENLABS_API_KEY": "e"
        }
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");

    // Start the operator first so creation and reconciling overlap, as in real life.
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let config = Config {
        namespace: Some(ns.clone()),
        ..Config::default()
    };
    let operator = tokio::spawn(controller::run(
        client.clone(),
        config,
        metrics.clone(),
        stop.clone(),
    ));

    let started = Instant::now();
    let papi: Api<Persona> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..personas_n)
        .map(|i| {
            let papi = papi.clone();
            async move {
                let p: Persona = serde_json::from_value(serde_json::json!({
                    "apiVersion": "callmeback.dev/v1alpha1", "kind": "Persona",
                    "metadata": { "name": format!("p{i}") },
                    "spec": { "displayName": "Sam", "systemPrompt": format!("You are persona {i}."),
                              "greeting": "Hi!", "voice": { "voiceId": "v1" } }
                }))
                .expect("persona");
                papi.create(&PostParams::default(), &p).await.map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("create personas");
    let vapi: Api<VoiceDeployment> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..vds_n)
        .map(|i| {
            let vapi = vapi.clone();
            let names: Vec<String> = (i * per_vd..(i + 1) * per_vd)
                .map(|j| format!("p{}", j % personas_n))
                .collect();
            async move {
                let vd: VoiceDeployment = serde_json::from_value(serde_json::json!({
                    "apiVersion": "callmeback.dev/v1alpha1", "kind": "VoiceDeployment",
                    "metadata": { "name": format!("vd{i}") },
                    "spec": { "personas": names, "secretRef": { "name": "keys" },
                              "publicUrl": "https://voice.example.com", "replicas": 1 }
                }))
                .expect("vd");
                vapi.create(&PostParams::default(), &vd).await.map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("create voice deployments");
    let created = started.elapsed();

    loop {
        let ready = papi
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, "Ready"))
                    .is_some_and(|c| c.is_true())
            })
            .count();
        let resolved = vapi
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|v| {
                v.status
                    .as_ref()
                    .is_some_and(|s| s.resolved_personas.len() == per_vd)
            })
            .count();
        if ready == personas_n && resolved == vds_n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "did not converge: {ready} personas, {resolved} deployments"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), operator).await;

    let count = |kind: &str| metrics.reconciles.with_label_values(&[kind]).get();
    println!(
        "operator_converge: {personas_n} personas, {vds_n} voice deployments ({per_vd} personas each)"
    );
    println!("  objects created in      {:>8.2} s", created.as_secs_f64());
    println!(
        "  converged after         {:>8.2} s",
        converged.as_secs_f64()
    );
    for kind in ["Persona", "VoiceDeployment"] {
        println!(
            "  {kind:<16} reconciles {:>6}  p50 {:>7.1} ms  p99 {:>7.1} ms",
            count(kind),
            quantile(&metrics, kind, 0.50) * 1000.0,
            quantile(&metrics, kind, 0.99) * 1000.0
        );
    }
    println!(
        "  owned-object applies    {:>6} written, {} skipped as unchanged",
        applies(&metrics, "written"),
        applies(&metrics, "unchanged")
    );
}
