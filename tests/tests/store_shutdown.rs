//! Shutdown of the real `voice-pod` binary with live calls and a database that hangs
//! (accepts connections, never answers): readiness goes first, every phase keeps its
//! deadline, and every record the pod could not write is counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use callmeback_tests::call_harness::{
    Caller, Emulators, PodProcess, ProviderProfile, persona_json,
};
use callmeback_tests::emulators::cerebras::{ChatCall, Reply};
use callmeback_tests::postgres::{CuttableProxy, TestDb};
use callmeback_tests::twilio_sim::eventually;
use serde_json::{Value, json};
use voice_pod::drain::POD_SHUTDOWN_AFTER_DRAIN_SECONDS;

const TO: &str = "+14155550100";
/// The pod's drain deadline in this test: the calls are still live when it passes.
const DRAIN: Duration = Duration::from_secs(2);

/// The pod's last log line about its records ("store writer stopped"), as JSON.
fn final_store_report(log: &str) -> Option<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v["fields"]["message"] == "store writer stopped")
}

// With the database hung and 5 calls live, SIGTERM turns readiness off within 1 s, the
// pod exits before the grace period the operator gives it (drain deadline + its
// after-drain budget + 5 s), nothing is written after the hang, and every record the
// pod still held is counted as lost rather than vanishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_a_hung_database_and_five_live_calls_exits_within_grace_and_counts_what_it_held()
 {
    let db = TestDb::create().await;
    let proxy = CuttableProxy::start(db.server_addr()).await;
    let lines: Vec<String> = vec!["tell me a story".into(), "and another one".into()];
    let emus = Emulators::start(
        lines,
        Arc::new(|_: &ChatCall| Reply::text("Once upon a time there was a pod.")),
        ProviderProfile::ZERO,
    )
    .await
    .expect("emulators");
    let url = db.url_via(proxy.addr());
    let drain = format!("{}s", DRAIN.as_secs());
    let mut pod = PodProcess::start(
        &emus,
        &[("ada", persona_json(json!({})))],
        &[
            ("DATABASE_URL", url.as_str()),
            ("CALLMEBACK_DRAIN_TIMEOUT", drain.as_str()),
        ],
    )
    .await
    .expect("pod starts");

    let mut callers = Vec::new();
    for i in 0..5 {
        let mut caller = Caller::dial(&pod.sim(), &format!("+1415555{i:04}"), TO)
            .await
            .expect("dial");
        let greeting = caller
            .listen(Duration::from_secs(10), Duration::from_millis(500))
            .await
            .expect("listen");
        assert!(greeting.is_some(), "no greeting:\n{}", pod.log_tail(30));
        callers.push(caller);
    }
    let mut conn = db.connect().await;
    let created = eventually(Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
            .fetch_one(&mut db.connect().await)
            .await
            .expect("count calls");
        n == 5
    })
    .await;
    assert!(
        created,
        "the 5 calls never reached the database:\n{}",
        pod.log_tail(40)
    );
    // Let the writer go idle, then hang the database.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.stall();
    let written_before = pod
        .metric("voice_store_written_records_total", &[])
        .await
        .expect("scrape");
    for caller in &mut callers {
        caller.say("tell me a story").await.expect("say");
        let reply = caller
            .listen(Duration::from_secs(10), Duration::from_millis(600))
            .await
            .expect("listen");
        assert!(reply.is_some(), "no reply:\n{}", pod.log_tail(30));
    }
    let withheld = pod
        .metric("voice_store_pending_records", &[])
        .await
        .expect("scrape");
    assert!(withheld >= 10.0, "turns of 5 calls are held: {withheld}");

    let http = reqwest::Client::new();
    let sent = Instant::now();
    pod.terminate().expect("SIGTERM");
    let mut not_ready_after = None;
    while sent.elapsed() < Duration::from_secs(3) {
        let status = http
            .get(format!("{}/readyz", pod.metrics_url))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if status.is_ok_and(|s| s == 503) {
            not_ready_after = Some(sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_ready_after = not_ready_after.expect("readiness never went false");
    assert!(
        not_ready_after < Duration::from_secs(1),
        "not ready only after {not_ready_after:?}"
    );

    // What the pod has after SIGTERM: its drain deadline plus its after-drain budget,
    // and the operator's 5 s of slack beyond that.
    let grace = DRAIN + Duration::from_secs(POD_SHUTDOWN_AFTER_DRAIN_SECONDS + 5);
    let status = pod
        .wait_exit(grace + Duration::from_secs(10))
        .await
        .expect("wait");
    let took = sent.elapsed();
    assert!(status.is_some(), "still running:\n{}", pod.log_tail(30));
    assert!(
        took < grace,
        "exited {took:?} after SIGTERM (grace {grace:?})"
    );
    eprintln!("SIGTERM -> not ready {not_ready_after:?}, exit {took:?} (grace {grace:?})");

    let report = final_store_report(&pod.log()).expect("the pod reported its records");
    let fields = &report["fields"];
    let written_after = fields["written"].as_f64().expect("written");
    let field = |k: &str| {
        fields[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {report}"))
    };
    let lost = field("dropped_shutdown") + field("dropped_orphaned");
    let dropped_otherwise = field("dropped_poison")
        + field("dropped_rejected")
        + field("dropped_queue_full")
        + field("dropped_buffer_full");
    assert_eq!(
        written_after, written_before,
        "nothing is written to a hung database"
    );
    // Every record the pod took is accounted for, exactly: written before the hang,
    // or counted lost at shutdown; none silently vanished and none is left pending.
    assert_eq!(field("pending"), 0.0, "{report}");
    assert_eq!(dropped_otherwise, 0.0, "{report}");
    assert_eq!(
        field("submitted"),
        written_after + lost,
        "submitted = written + lost: {report}"
    );
    // What was held when SIGTERM came is part of the loss (the ended calls add their
    // final records to it during the drain).
    assert!(
        lost >= withheld,
        "{withheld} records were held at SIGTERM but only {lost} counted: {report}"
    );
    // The rows agree: no turn reached the database after the hang.
    proxy.restore();
    let turns: i64 = sqlx::query_scalar("SELECT count(*) FROM call_turns")
        .fetch_one(&mut conn)
        .await
        .expect("count turns");
    let written_turns_before_hang: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM call_turns t JOIN calls c ON c.id = t.call_id \
         WHERE t.text NOT ILIKE '%story%' AND t.text NOT ILIKE '%once upon%'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("count turns");
    assert_eq!(
        turns, written_turns_before_hang,
        "a held turn was written after all"
    );
}
