//! The voice pod's `/metrics` as Prometheus reads it: scraped from the real
//! `voice-pod serve` binary in the middle of a call (real espeak-ng caller speech,
//! the provider emulators, PostgreSQL for the store's and the scheduler's metrics)
//! and checked by Prometheus' own lint, `promtool check metrics` (built by
//! `scripts/prometheus-build.sh`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_tests::call_harness::{
    Caller, Emulators, PodProcess, ProviderProfile, lines, persona_json, table, table_replies,
};
use callmeback_tests::postgres::TestDb;
use callmeback_tests::prometheus_tools::{Promtool, PromtoolRun};
use callmeback_tests::twilio_sim::metric_value;
use serde_json::json;

const FROM: &str = "+14155550123";
const TO: &str = "+14155550100";

async fn lint(body: String) -> PromtoolRun {
    tokio::task::spawn_blocking(move || Promtool::get().unwrap().check_metrics(&body).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_metrics_mid_call_and_after_it_pass_promtool_check_metrics() {
    // Proves every metric family the pod exports while a call is live (one finished
    // turn measured, frames flowing, webhooks counted, the store and the scheduler
    // running) and once it has ended passes promtool's naming and help-text lint.
    let script = lines(&["What time does the bakery open?"]);
    let replies = table_replies(
        table(&[("bakery", "The bakery opens at seven in the morning.")]),
        "Sorry, could you repeat that?".into(),
        Arc::new(Mutex::new(Vec::new())),
    );
    let emus = Emulators::start(script.clone(), replies, ProviderProfile::ZERO)
        .await
        .unwrap();
    let db = TestDb::create().await;
    let pod = PodProcess::start(
        &emus,
        &[("ada", persona_json(json!({})))],
        &[("DATABASE_URL", db.url.as_str())],
    )
    .await
    .unwrap();
    let mut caller = Caller::dial(&pod.sim(), FROM, TO).await.unwrap();
    let greeting = caller
        .listen(Duration::from_secs(10), Duration::from_millis(500))
        .await
        .unwrap();
    assert!(greeting.is_some(), "no greeting:\n{}", pod.log_tail(30));
    caller.say(&script[0]).await.unwrap();
    let reply = caller
        .listen(Duration::from_secs(10), Duration::from_millis(600))
        .await
        .unwrap();
    assert!(reply.is_some(), "no reply:\n{}", pod.log_tail(30));

    let mid_call = pod.scrape().await.unwrap();
    assert_eq!(metric_value(&mid_call, "voice_active_calls", &[]), 1.0);
    assert!(mid_call.contains("voice_store_up 1"), "{mid_call}");
    assert!(
        metric_value(
            &mid_call,
            "voice_turn_latency_seconds_count",
            &[("stage", "total")]
        ) >= 1.0,
        "a measured turn:\n{mid_call}"
    );
    let run = lint(mid_call).await;
    assert!(
        run.success,
        "promtool check metrics (mid-call):\n{}",
        run.output
    );

    caller.hang_up().await.unwrap();
    let mut after = String::new();
    for _ in 0..100 {
        after = pod.scrape().await.unwrap();
        if metric_value(&after, "voice_active_calls", &[]) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric_value(&after, "voice_active_calls", &[]), 0.0);
    let run = lint(after).await;
    assert!(
        run.success,
        "promtool check metrics (after the call):\n{}",
        run.output
    );
}
