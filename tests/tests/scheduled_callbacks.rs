//! Scheduled callbacks end to end: real `voice-pod` processes sharing one real
//! PostgreSQL database, placing calls through the Twilio Calls REST emulator (which
//! counts every call it is asked to create).
//!
//! Run: `cargo test -p callmeback-tests --test scheduled_callbacks -- --nocapture`
//! (the burst test prints the placement delays recorded in docs/benchmarks.md).

use std::collections::HashMap;
use std::time::Duration;

use callmeback_tests::call_harness::{PodProcess, calling_pod_env, persona_json};
use callmeback_tests::emulators::twilio_rest::{CreatedCall, TwilioRestEmulator};
use callmeback_tests::postgres::TestDb;
use callmeback_tests::twilio_sim::{
    TEST_ACCOUNT_SID, TEST_API_TOKEN, TEST_AUTH_TOKEN, TEST_FROM_NUMBER, eventually, metric_value,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// The placement target of the issue: within 2 s of the due time.
const PLACEMENT_TARGET: Duration = Duration::from_secs(2);

struct Cluster {
    db: TestDb,
    pool: PgPool,
    twilio: TwilioRestEmulator,
    http: reqwest::Client,
}

impl Cluster {
    async fn new() -> Cluster {
        let db = TestDb::create().await;
        let pool = PgPool::connect(&db.url).await.expect("connect test db");
        let twilio = TwilioRestEmulator::start(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN)
            .await
            .expect("start Twilio REST emulator");
        Cluster {
            db,
            pool,
            twilio,
            http: reqwest::Client::new(),
        }
    }

    fn env(&self, twilio_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        calling_pod_env(&self.db.url, twilio_url, extra)
    }

    async fn pod(&self, extra: &[(&str, &str)]) -> PodProcess {
        self.pod_with_twilio(&self.twilio.base_url(), extra).await
    }

    async fn pod_with_twilio(&self, twilio_url: &str, extra: &[(&str, &str)]) -> PodProcess {
        PodProcess::start_with_env(
            &[("ada", persona_json(json!({})))],
            &self.env(twilio_url, extra),
        )
        .await
        .expect("start voice-pod")
    }

    async fn post_call(&self, pod: &PodProcess, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/calls", pod.app_url))
            .bearer_auth(TEST_API_TOKEN)
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("POST /v1/calls");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn schedule(&self, pod: &PodProcess, body: Value) -> Uuid {
        let (status, answer) = self.post_call(pod, body).await;
        assert_eq!(status, 201, "scheduling answered {status}: {answer}");
        assert_eq!(answer["status"], "scheduled", "{answer}");
        assert!(answer["call_sid"].is_null(), "{answer}");
        answer["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .expect("a call id")
    }

    async fn delete(&self, pod: &PodProcess, id: &str) -> (u16, Value) {
        let resp = self
            .http
            .delete(format!("{}/v1/calls/{id}", pod.app_url))
            .bearer_auth(TEST_API_TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("DELETE /v1/calls/{id}");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn list(&self, pod: &PodProcess, query: &str) -> Value {
        self.http
            .get(format!("{}/v1/calls?{query}", pod.app_url))
            .bearer_auth(TEST_API_TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("GET /v1/calls")
            .json()
            .await
            .expect("JSON list")
    }

    /// Emulator calls per call id (read from the signed status callback URL).
    fn placed_by_id(&self) -> HashMap<Uuid, Vec<CreatedCall>> {
        let mut by_id: HashMap<Uuid, Vec<CreatedCall>> = HashMap::new();
        for call in self.twilio.calls() {
            let id = call
                .form
                .get("StatusCallback")
                .and_then(|u| url::Url::parse(u).ok())
                .and_then(|u| {
                    u.query_pairs()
                        .find(|(k, _)| k == "call_id")
                        .and_then(|(_, v)| Uuid::parse_str(&v).ok())
                })
                .expect("status callback carries our call id");
            by_id.entry(id).or_default().push(call);
        }
        by_id
    }

    async fn row(&self, id: Uuid) -> Row {
        sqlx::query_as::<_, Row>(
            "SELECT status, call_sid, claimed_by, attempt, outcome, placement_error, \
                    extract(epoch FROM (placed_at - scheduled_for))::double precision AS delay \
             FROM calls WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .expect("call row")
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    status: String,
    call_sid: Option<String>,
    claimed_by: Option<String>,
    attempt: i32,
    outcome: Option<String>,
    placement_error: Option<String>,
    delay: Option<f64>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// Three pods on one database and 200 callbacks due within the same three seconds:
// every callback is placed exactly once (the emulator counts) and within 2 s of its due time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_pods_place_a_burst_of_200_callbacks_exactly_once_within_2s() {
    let cluster = Cluster::new().await;
    let mut pods = Vec::new();
    for _ in 0..3 {
        pods.push(cluster.pod(&[]).await);
    }
    // Due 5 to 7 s from now: time to accept all 200 requests, spread over the pods.
    let base = Utc::now() + chrono::Duration::seconds(5);
    let mut ids = Vec::new();
    for i in 0..200u32 {
        let due = base + chrono::Duration::milliseconds(i64::from(i % 3) * 1000);
        let pod = &pods[i as usize % 3];
        let id = cluster
            .schedule(
                pod,
                json!({
                    "to": format!("+1415555{:04}", i),
                    "persona": "ada",
                    "user": format!("user-{i}"),
                    "pretext": "get me out of this date",
                    "at": rfc3339(due),
                }),
            )
            .await;
        ids.push(id);
    }
    assert!(
        Utc::now() < base,
        "scheduling 200 callbacks took too long for the test's premise"
    );
    let scheduled = cluster.list(&pods[0], "status=scheduled&limit=500").await;
    assert_eq!(scheduled["calls"].as_array().map(Vec::len), Some(200));

    let all_placed = eventually(Duration::from_secs(30), || async {
        cluster.twilio.calls().len() >= 200
    })
    .await;
    // Let any duplicate that would come show up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let by_id = cluster.placed_by_id();
    assert!(
        all_placed,
        "only {} of 200 callbacks placed",
        cluster.twilio.calls().len()
    );
    assert_eq!(cluster.twilio.calls().len(), 200, "duplicate placements");
    for id in &ids {
        assert_eq!(
            by_id.get(id).map(Vec::len),
            Some(1),
            "callback {id} placed {:?} times",
            by_id.get(id).map(Vec::len)
        );
    }

    let mut delays = Vec::new();
    let mut per_pod: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let row = cluster.row(*id).await;
        assert_eq!(row.status, "queued", "{id}: {row:?}");
        assert_eq!(row.attempt, 1, "{id}: {row:?}");
        let sid = row.call_sid.clone().expect("call sid recorded");
        assert_eq!(by_id[id][0].sid, sid);
        let delay = row.delay.expect("placed_at recorded");
        assert!(
            delay <= PLACEMENT_TARGET.as_secs_f64(),
            "{id} placed {delay:.3} s after its due time"
        );
        delays.push(delay.max(0.0));
        *per_pod
            .entry(row.claimed_by.unwrap_or_default())
            .or_default() += 1;
    }
    let mut placed_metric = 0.0;
    for pod in &pods {
        placed_metric += pod
            .metric("voice_scheduled_placements_total", &[])
            .await
            .expect("scrape");
    }
    assert_eq!(placed_metric, 200.0, "pods' placement counters");
    let text = pods[0].scrape().await.expect("scrape");
    assert_eq!(metric_value(&text, "voice_scheduled_overdue", &[]), 0.0);

    delays.sort_by(f64::total_cmp);
    println!(
        "scheduled burst: 200 callbacks, 3 pods, placement delay p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; per pod {:?}",
        percentile(&delays, 50.0) * 1000.0,
        percentile(&delays, 99.0) * 1000.0,
        delays.last().copied().unwrap_or(0.0) * 1000.0,
        per_pod.values().collect::<Vec<_>>()
    );
    for pod in pods {
        pod.stop().await.expect("pod stops");
    }
}

/// A TCP listener that accepts connections and never answers: a Twilio that
/// swallows requests.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        // Bounded: the test makes a handful of connections at most.
        while held.len() < 64 {
            match listener.accept().await {
                Ok((sock, _)) => held.push(sock),
                Err(_) => break,
            }
        }
    });
    (url, task)
}

// A pod SIGKILLed after claiming a due callback (its Twilio request never answered):
// when the claim's lease runs out another pod places the call, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callback_claimed_by_a_killed_pod_is_placed_once_by_another_pod() {
    let cluster = Cluster::new().await;
    let (hole, hole_task) = black_hole().await;
    let lease = [("CALLMEBACK_SCHEDULER_LEASE", "3s")];
    let mut doomed = cluster.pod_with_twilio(&hole, &lease).await;
    let id = cluster
        .schedule(
            &doomed,
            json!({"to": "+14155550100", "persona": "ada", "user": "kim", "in": "1s"}),
        )
        .await;
    let claimed = eventually(Duration::from_secs(10), || async {
        let row = cluster.row(id).await;
        row.status == "placing" && row.claimed_by.is_some()
    })
    .await;
    assert!(claimed, "the first pod never claimed the callback");
    let first_claim = cluster.row(id).await;
    doomed.kill().expect("SIGKILL");

    let rescuer = cluster.pod(&lease).await;
    let placed = eventually(Duration::from_secs(20), || async {
        !cluster.twilio.calls().is_empty()
    })
    .await;
    assert!(
        placed,
        "no pod placed the orphaned callback: {:?}",
        cluster.row(id).await
    );
    // Longer than a lease and several polls: a duplicate would have shown by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let by_id = cluster.placed_by_id();
    assert_eq!(cluster.twilio.calls().len(), 1, "duplicate placement");
    assert_eq!(by_id.get(&id).map(Vec::len), Some(1));

    let row = cluster.row(id).await;
    assert_eq!(row.status, "queued", "{row:?}");
    assert_eq!(row.attempt, 2, "{row:?}");
    assert_eq!(row.call_sid.as_deref(), Some(by_id[&id][0].sid.as_str()));
    assert_ne!(row.claimed_by, first_claim.claimed_by, "{row:?}");
    assert_eq!(
        rescuer
            .metric(
                "voice_scheduled_placement_failures_total",
                &[("reason", "lease_expired")]
            )
            .await
            .expect("scrape"),
        1.0
    );
    rescuer.stop().await.expect("pod stops");
    hole_task.abort();
}

/// A Twilio REST front that passes each request on to `upstream` (so the call really
/// is created there) and then never answers: the REST answer is lost, as when a
/// connection drops after Twilio acted on the request.
async fn answer_losing_front(upstream: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let upstream = upstream.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut forward = reqwest::Client::new()
                .request(parts.method.clone(), format!("{upstream}{path}"))
                .timeout(Duration::from_secs(5));
            for (name, value) in &parts.headers {
                if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
                    forward = forward.header(name, value);
                }
            }
            let _ = forward.body(body).send().await;
            // The pod's request times out; the connection is closed with the test.
            std::future::pending::<axum::http::StatusCode>().await
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

// Twilio created the call but its REST answer was lost: the pod's request times out
// and its claim runs out, yet Twilio's signed `initiated` status callback already put
// the call on the row, so no pod places it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_rest_answer_was_lost_is_not_placed_again_after_twilio_reports_it() {
    let cluster = Cluster::new().await;
    let (front, front_task) = answer_losing_front(cluster.twilio.base_url()).await;
    // A 3 s lease: the pod's Twilio request gives up after 1 s, the claim after 3 s.
    let pod = cluster
        .pod_with_twilio(&front, &[("CALLMEBACK_SCHEDULER_LEASE", "3s")])
        .await;
    let id = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550107", "persona": "ada", "in": "1s"}),
        )
        .await;
    let created = eventually(Duration::from_secs(10), || async {
        !cluster.twilio.calls().is_empty()
    })
    .await;
    assert!(
        created,
        "the call never reached Twilio: {:?}",
        cluster.row(id).await
    );
    let call = cluster.twilio.calls().remove(0);
    let url = call.form.get("StatusCallback").expect("callback url");
    let answer = pod
        .sim()
        .status_callback(url, &call.sid, "initiated", &[])
        .await
        .expect("status callback");
    assert_eq!(answer.status, 200);

    // Longer than the lease and many polls: a second placement would have shown.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(cluster.twilio.calls().len(), 1, "placed twice");
    let row = cluster.row(id).await;
    assert_eq!(row.call_sid.as_deref(), Some(call.sid.as_str()), "{row:?}");
    assert_eq!(row.status, "queued", "{row:?}");
    assert_eq!(row.attempt, 1, "{row:?}");
    assert_eq!(
        pod.metric(
            "voice_scheduled_placement_failures_total",
            &[("reason", "lease_expired")]
        )
        .await
        .expect("scrape"),
        0.0
    );
    pod.stop().await.expect("pod stops");
    front_task.abort();
}

// A callback canceled before it is due is never placed and leaves the scheduled list;
// cancelling again is harmless, and an unknown id is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_canceled_before_due_is_never_placed() {
    let cluster = Cluster::new().await;
    let pod = cluster.pod(&[]).await;
    let id = cluster
        .schedule(
            &pod,
            json!({"to": "+1 (415) 555-0101", "persona": "ada", "in": "2s"}),
        )
        .await;
    let listed = cluster.list(&pod, "status=scheduled").await;
    assert_eq!(listed["calls"][0]["id"], id.to_string());
    assert_eq!(
        listed["calls"][0]["to"], "+14155550101",
        "number stored in E.164"
    );

    let (status, body) = cluster.delete(&pod, &id.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "canceled");
    let (again, _) = cluster.delete(&pod, &id.to_string()).await;
    assert_eq!(again, 200, "cancel is idempotent");
    let (unknown, _) = cluster.delete(&pod, &Uuid::new_v4().to_string()).await;
    assert_eq!(unknown, 404);

    // Past the due time plus several polls.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        cluster.twilio.calls().is_empty(),
        "a canceled call was placed"
    );
    let row = cluster.row(id).await;
    assert_eq!(row.status, "canceled");
    assert_eq!(row.attempt, 0, "never claimed: {row:?}");
    let listed = cluster.list(&pod, "status=scheduled").await;
    assert_eq!(listed["calls"].as_array().map(Vec::len), Some(0));
    pod.stop().await.expect("pod stops");
}

// Cancelling a callback that was already placed answers 409 with a message that says
// so, by our id and by Twilio's CallSid, and the call stays placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_placed_callback_is_a_conflict() {
    let cluster = Cluster::new().await;
    let pod = cluster.pod(&[]).await;
    let id = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550102", "persona": "ada", "in": "1s"}),
        )
        .await;
    let placed = eventually(Duration::from_secs(10), || async {
        cluster.row(id).await.call_sid.is_some()
    })
    .await;
    assert!(placed, "not placed: {:?}", cluster.row(id).await);

    let (status, body) = cluster.delete(&pod, &id.to_string()).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "already_placed");
    assert_eq!(body["status"], "queued");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("already placed"), "{message}");

    let sid = cluster.row(id).await.call_sid.expect("sid");
    let (by_sid, _) = cluster.delete(&pod, &sid).await;
    assert_eq!(by_sid, 409);
    assert_eq!(cluster.row(id).await.status, "queued");
    assert_eq!(cluster.twilio.calls().len(), 1);
    pod.stop().await.expect("pod stops");
}

// A callback due longer ago than its lateness limit is not placed, and the record says
// why; the limit is the request's maxLateness, else the persona's
// callbacks.maxLatenessSeconds, else the pod's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_later_than_its_lateness_limit_is_not_placed_and_says_why() {
    let cluster = Cluster::new().await;
    // "rescue" keeps its callbacks within a minute of their due time.
    let pod = PodProcess::start_with_env(
        &[
            ("ada", persona_json(json!({}))),
            (
                "rescue",
                persona_json(json!({"callbacks": {"maxLatenessSeconds": 60}})),
            ),
        ],
        &cluster.env(&cluster.twilio.base_url(), &[]),
    )
    .await
    .expect("start voice-pod");
    let long_ago = Utc::now() - chrono::Duration::minutes(10);
    // The persona's limit applies when the request sets none...
    let rescue_late = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550105", "persona": "rescue", "at": rfc3339(long_ago)}),
        )
        .await;
    // ...and the request's own limit wins over it.
    let rescue_patient = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550106", "persona": "rescue", "at": rfc3339(long_ago), "maxLateness": "1h"}),
        )
        .await;
    let late = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550103", "persona": "ada", "at": rfc3339(long_ago), "maxLateness": "1m"}),
        )
        .await;
    // Due a little in the past but within its limit: placed at once.
    let recent = Utc::now() - chrono::Duration::seconds(5);
    let in_time = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550104", "persona": "ada", "at": rfc3339(recent), "maxLateness": "1m"}),
        )
        .await;
    let settled = eventually(Duration::from_secs(10), || async {
        cluster.row(late).await.status == "failed"
            && cluster.row(rescue_late).await.status == "failed"
            && cluster.row(in_time).await.call_sid.is_some()
            && cluster.row(rescue_patient).await.call_sid.is_some()
    })
    .await;
    assert!(
        settled,
        "{:?} / {:?} / {:?} / {:?}",
        cluster.row(late).await,
        cluster.row(rescue_late).await,
        cluster.row(in_time).await,
        cluster.row(rescue_patient).await
    );
    for id in [late, rescue_late] {
        let row = cluster.row(id).await;
        assert_eq!(row.outcome.as_deref(), Some("too_late"));
        let why = row.placement_error.unwrap_or_default();
        assert!(why.contains("more than 60 s ago"), "{why}");
    }
    let by_id = cluster.placed_by_id();
    assert!(!by_id.contains_key(&late));
    assert!(!by_id.contains_key(&rescue_late));
    assert_eq!(by_id.get(&in_time).map(Vec::len), Some(1));
    assert_eq!(by_id.get(&rescue_patient).map(Vec::len), Some(1));
    assert_eq!(
        pod.metric(
            "voice_scheduled_placement_failures_total",
            &[("reason", "too_late")]
        )
        .await
        .expect("scrape"),
        2.0
    );
    pod.stop().await.expect("pod stops");
}

// A callback that asked for one retry is called again after Twilio reports busy,
// exactly once; one that did not ask is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_callbacks_are_retried_only_when_asked() {
    let cluster = Cluster::new().await;
    let pod = cluster.pod(&[]).await;
    let sim = pod.sim();
    let with_retry = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550105", "persona": "ada", "in": "1s", "retries": 1, "retryDelay": "1s"}),
        )
        .await;
    let without = cluster
        .schedule(
            &pod,
            json!({"to": "+14155550106", "persona": "ada", "in": "1s"}),
        )
        .await;
    let placed = eventually(Duration::from_secs(10), || async {
        cluster.twilio.calls().len() >= 2
    })
    .await;
    assert!(placed);
    for call in cluster.twilio.calls() {
        let url = call.form.get("StatusCallback").expect("callback url");
        let answer = sim
            .status_callback(url, &call.sid, "busy", &[])
            .await
            .expect("status callback");
        assert_eq!(answer.status, 200);
    }
    let busy = eventually(Duration::from_secs(10), || async {
        cluster.row(with_retry).await.status == "busy"
            && cluster.row(without).await.status == "busy"
    })
    .await;
    assert!(busy, "status callbacks did not reach the rows");
    let retried = eventually(Duration::from_secs(10), || async {
        cluster.twilio.calls().len() >= 3
    })
    .await;
    assert!(retried, "no retry placed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = cluster.twilio.calls();
    assert_eq!(calls.len(), 3, "exactly one retry");
    assert_eq!(calls[2].form.get("To"), Some("+14155550105"));
    let retry_rows: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT id, retries_left FROM calls WHERE retry_of = $1")
            .bind(with_retry)
            .fetch_all(&cluster.pool)
            .await
            .expect("retry rows");
    assert_eq!(retry_rows.len(), 1);
    assert_eq!(retry_rows[0].1, 0, "the retry has no retries left");
    pod.stop().await.expect("pod stops");
}

/// Every callback in `ids` has exactly one call in the emulator's request log and its
/// row holds that call's sid, with no row failed: counted against what the test scheduled.
async fn assert_each_placed_once(cluster: &Cluster, ids: &[Uuid]) {
    let by_id = cluster.placed_by_id();
    assert_eq!(
        by_id.len(),
        ids.len(),
        "calls for {} of {} callbacks",
        by_id.len(),
        ids.len()
    );
    let total: usize = by_id.values().map(Vec::len).sum();
    assert_eq!(total, ids.len(), "duplicate placements in Twilio's log");
    for id in ids {
        let calls = by_id.get(id).map_or(&[][..], Vec::as_slice);
        assert_eq!(calls.len(), 1, "{id} placed {} times", calls.len());
        let row = cluster.row(*id).await;
        assert_eq!(
            row.call_sid.as_deref(),
            Some(calls[0].sid.as_str()),
            "{id}: {row:?}"
        );
        assert_ne!(row.status, "failed", "{id}: {row:?}");
    }
}

/// Waits (up to `within`) until every row in `ids` holds a CallSid.
async fn all_recorded(cluster: &Cluster, ids: &[Uuid], within: Duration) -> bool {
    eventually(within, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM calls WHERE id = ANY($1) AND call_sid IS NOT NULL",
        )
        .bind(ids)
        .fetch_one(&cluster.pool)
        .await
        .expect("count placed rows");
        n as usize == ids.len()
    })
    .await
}

// A pod SIGKILLed right after its create requests reached Twilio, with no status
// callback ever arriving: the pods that take its claims over find those calls in
// Twilio's Calls list and adopt them, so each of 20 callbacks is dialled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_killed_after_its_creates_reached_twilio_without_callbacks_dials_each_callback_once()
{
    let cluster = Cluster::new().await;
    let (front, front_task) = answer_losing_front(cluster.twilio.base_url()).await;
    let lease = [("CALLMEBACK_SCHEDULER_LEASE", "3s")];
    let mut doomed = cluster.pod_with_twilio(&front, &lease).await;
    // Due in 2 s; the doomed pod is the only one placing until it dies.
    let due = Utc::now() + chrono::Duration::seconds(2);
    let mut ids = Vec::new();
    for i in 0..20u32 {
        let id = cluster
            .schedule(
                &doomed,
                json!({"to": format!("+1415556{i:04}"), "persona": "ada", "at": rfc3339(due)}),
            )
            .await;
        ids.push(id);
    }
    let reached = eventually(Duration::from_secs(15), || async {
        !cluster.twilio.calls().is_empty()
    })
    .await;
    assert!(reached, "no create reached Twilio");
    tokio::time::sleep(Duration::from_millis(50)).await;
    doomed.kill().expect("SIGKILL");
    let mut rescuers = Vec::new();
    for _ in 0..2 {
        rescuers.push(cluster.pod(&lease).await);
    }

    assert!(
        all_recorded(&cluster, &ids, Duration::from_secs(30)).await,
        "not every callback was recorded as placed"
    );
    // Longer than a lease and many polls: a second dial would have shown by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_each_placed_once(&cluster, &ids).await;
    let mut adopted = 0.0;
    for pod in &rescuers {
        adopted += pod
            .metric("voice_scheduled_adopted_total", &[])
            .await
            .expect("scrape");
    }
    assert!(adopted >= 1.0, "no call was adopted from Twilio's list");
    assert!(
        !cluster.twilio.list_requests().is_empty(),
        "nobody asked Twilio's Calls list"
    );
    for pod in rescuers {
        pod.stop().await.expect("pod stops");
    }
    front_task.abort();
}

/// How the database fails in [`callbacks_survive_a_database_outage`].
#[derive(Clone, Copy)]
enum Outage {
    /// Connections are refused and closed.
    Refusing,
    /// Connections are accepted and never answered.
    Hanging,
}

// 50 callbacks fall due just as the database goes away for twice the lease (refusing
// or hanging), with two pods placing them and no status callbacks from Twilio: each is
// placed exactly once (the emulator's request log says so) and none is failed without a call.
async fn callbacks_survive_a_database_outage(outage: Outage) {
    let cluster = Cluster::new().await;
    let proxy = callmeback_tests::postgres::CuttableProxy::start(cluster.db.server_addr()).await;
    let via = cluster.db.url_via(proxy.addr());
    let lease = Duration::from_secs(3);
    let env = [
        ("CALLMEBACK_SCHEDULER_LEASE", "3s"),
        ("DATABASE_URL", via.as_str()),
    ];
    let mut pods = Vec::new();
    for _ in 0..2 {
        pods.push(cluster.pod(&env).await);
    }
    let due = Utc::now() + chrono::Duration::seconds(3);
    let mut ids = Vec::new();
    for i in 0..50u32 {
        let id = cluster
            .schedule(
                &pods[i as usize % 2],
                json!({"to": format!("+1415557{i:04}"), "persona": "ada", "at": rfc3339(due)}),
            )
            .await;
        ids.push(id);
    }
    // The database goes the moment the first call reaches Twilio: claims, requests
    // and recordings are all in flight.
    let reached = eventually(Duration::from_secs(15), || async {
        !cluster.twilio.calls().is_empty()
    })
    .await;
    assert!(reached, "no create reached Twilio");
    match outage {
        Outage::Refusing => proxy.cut(),
        Outage::Hanging => proxy.stall(),
    }
    tokio::time::sleep(lease * 2).await;
    proxy.restore();

    assert!(
        all_recorded(&cluster, &ids, Duration::from_secs(40)).await,
        "not every callback was recorded as placed: {} calls in Twilio",
        cluster.twilio.calls().len()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_each_placed_once(&cluster, &ids).await;
    for pod in pods {
        pod.stop().await.expect("pod stops");
    }
}

// The database refuses connections for twice the lease as 50 callbacks fall due: each is placed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_callbacks_due_while_the_database_refuses_for_twice_the_lease_are_each_placed_once() {
    callbacks_survive_a_database_outage(Outage::Refusing).await;
}

// The database accepts connections and never answers for twice the lease as 50 callbacks fall due: each is placed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_callbacks_due_while_the_database_hangs_for_twice_the_lease_are_each_placed_once() {
    callbacks_survive_a_database_outage(Outage::Hanging).await;
}

// The pod's Calls-list client against the emulator: 120 calls to one number come back
// over three pages (`next_page_uri` followed), filters by `To`/`From`/`Status` and by
// `StartTime>=` hold as Twilio documents them (a queued call has no start time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_list_filters_and_pages_like_twilio() {
    use voice_pod::secret::Secret;
    use voice_pod::twilio::rest::{CreateCall, Instructions, TwilioClient};
    let twilio = TwilioRestEmulator::start(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN)
        .await
        .expect("emulator");
    let client = TwilioClient::new(
        &twilio.base_url(),
        TEST_ACCOUNT_SID,
        Secret::new(TEST_AUTH_TOKEN),
        Duration::from_secs(5),
    )
    .expect("client");
    let call = |to: &str| CreateCall {
        to: to.into(),
        from: TEST_FROM_NUMBER.into(),
        instructions: Instructions::Twiml("<Response><Hangup/></Response>".into()),
        status_callback: "https://example.com/twilio/status".into(),
        timeout: Duration::from_secs(30),
    };
    let mut sids = Vec::new();
    for _ in 0..120 {
        sids.push(
            client
                .create_call(&call("+14155550150"))
                .await
                .expect("create")
                .sid,
        );
    }
    client
        .create_call(&call("+14155550151"))
        .await
        .expect("create");
    let queued = client
        .list_calls("+14155550150", TEST_FROM_NUMBER, &[("Status", "queued")])
        .await
        .expect("list");
    assert_eq!(queued.len(), 120);
    let mut listed: Vec<String> = queued.iter().map(|c| c.sid.clone()).collect();
    listed.sort();
    sids.sort();
    assert_eq!(listed, sids, "every call once, none of the other number's");
    assert!(
        queued.iter().all(|c| c.created().is_some()),
        "date_created parses"
    );
    let pages = twilio.list_requests();
    assert_eq!(pages.len(), 3, "{pages:?}");
    assert!(
        pages[1].contains("Page=1") && pages[1].contains("PageToken="),
        "{pages:?}"
    );

    let today = Utc::now().format("%Y-%m-%d").to_string();
    let started = client
        .list_calls("+14155550150", TEST_FROM_NUMBER, &[("StartTime>", &today)])
        .await
        .expect("list");
    assert!(started.is_empty(), "queued calls have not started");
    twilio.set_status(&sids[0], "in-progress");
    let started = client
        .list_calls("+14155550150", TEST_FROM_NUMBER, &[("StartTime>", &today)])
        .await
        .expect("list");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].sid, sids[0]);
    assert_eq!(started[0].status, "in-progress");
}
