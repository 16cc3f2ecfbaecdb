//! Who may dial, and how often: per-user tokens issued by the real `voice-pod
//! user-token` command, and the dial rate limits shared by two real pods through one
//! real PostgreSQL database (README "Security").
//!
//! Run: `cargo test -p callmeback-tests --test api_access`

use std::process::Command;
use std::time::Duration;

use callmeback_tests::call_harness::{PodProcess, calling_pod_env, persona_json, pod_binary};
use callmeback_tests::emulators::twilio_rest::TwilioRestEmulator;
use callmeback_tests::postgres::TestDb;
use callmeback_tests::twilio_sim::{TEST_ACCOUNT_SID, TEST_API_TOKEN, TEST_AUTH_TOKEN};
use serde_json::{Value, json};

struct Deployment {
    db: TestDb,
    twilio: TwilioRestEmulator,
    http: reqwest::Client,
}

/// What a request got back.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl Deployment {
    async fn new() -> Deployment {
        Deployment {
            db: TestDb::create().await,
            twilio: TwilioRestEmulator::start(TEST_ACCOUNT_SID, TEST_AUTH_TOKEN)
                .await
                .expect("start Twilio REST emulator"),
            http: reqwest::Client::new(),
        }
    }

    async fn pod(&self, extra: &[(&str, &str)]) -> PodProcess {
        let env = calling_pod_env(&self.db.url, &self.twilio.base_url(), extra);
        PodProcess::start_with_env(&[("ada", persona_json(json!({})))], &env)
            .await
            .expect("start voice-pod")
    }

    /// `voice-pod user-token <args>` against this deployment's database.
    fn user_token(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(pod_binary().expect("voice-pod binary"))
            .arg("user-token")
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .output()
            .expect("run voice-pod user-token");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn issue(&self, user: &str, numbers: &[&str]) -> String {
        let mut args = vec!["issue", "--user", user];
        for n in numbers {
            args.extend(["--number", n]);
        }
        let (ok, token, stderr) = self.user_token(&args);
        assert!(ok, "user-token issue failed: {stderr}");
        assert!(token.starts_with("cmbu_"), "{token}");
        token
    }

    async fn send(&self, req: reqwest::RequestBuilder, token: &str) -> Answer {
        let resp = req
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("API request");
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = resp.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            retry_after,
            body,
        }
    }

    async fn post(&self, pod: &PodProcess, token: &str, body: Value) -> Answer {
        self.send(
            self.http
                .post(format!("{}/v1/calls", pod.app_url))
                .json(&body),
            token,
        )
        .await
    }

    async fn get(&self, pod: &PodProcess, token: &str, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", pod.app_url)), token)
            .await
    }

    async fn delete(&self, pod: &PodProcess, token: &str, path: &str) -> Answer {
        self.send(self.http.delete(format!("{}{path}", pod.app_url)), token)
            .await
    }
}

fn ids(list: &Answer) -> Vec<String> {
    list.body["calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .filter_map(|c| c["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// A user token dials only its user's registered numbers, always as that user and
// from the deployment's caller ID, and sees only that user's calls; the admin token
// sees everything; a revoked token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_calls_only_its_own_numbers_and_sees_only_its_own_calls() {
    let d = Deployment::new().await;
    let pod = d.pod(&[]).await;
    let kim = d.issue("kim", &["+1 (415) 555-0101"]);
    let lee = d.issue("lee", &["+14155550102"]);

    // At once (through Twilio) and scheduled, to the registered number: recorded as kim.
    let placed = d
        .post(&pod, &kim, json!({"to": "+14155550101", "persona": "ada"}))
        .await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    let scheduled = d
        .post(
            &pod,
            &kim,
            json!({"to": "+14155550101", "persona": "ada", "in": "1h", "user": "kim"}),
        )
        .await;
    assert_eq!(scheduled.status, 201, "{}", scheduled.body);
    let kims_call = scheduled.body["id"].as_str().expect("an id").to_string();
    assert_eq!(
        d.twilio.calls().len(),
        1,
        "only the immediate call reached Twilio"
    );

    // Everything outside the grant is a 403 naming the scope, and dials nothing.
    for (body, why) in [
        (
            json!({"to": "+14155550102", "persona": "ada"}),
            "another user's number",
        ),
        (
            json!({"to": "+14155550199", "persona": "ada"}),
            "an unregistered number",
        ),
        (
            json!({"to": "+14155550101", "persona": "ada", "user": "lee"}),
            "another user",
        ),
        (
            json!({"to": "+14155550101", "persona": "ada", "from": "+15005550007"}),
            "its own caller ID",
        ),
    ] {
        let refused = d.post(&pod, &kim, body).await;
        assert_eq!(refused.status, 403, "{why}: {}", refused.body);
        assert_eq!(refused.body["error"], "token_scope", "{why}");
    }
    assert_eq!(d.twilio.calls().len(), 1, "no refused request dialled");
    assert_eq!(
        pod.metric("voice_refusals_total", &[("reason", "token_scope")])
            .await
            .unwrap(),
        4.0
    );

    // Reading: kim sees her call, lee gets "no such call" for it, the admin sees it.
    let path = format!("/v1/calls/{kims_call}");
    let own = d.get(&pod, &kim, &path).await;
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.body["user"], "kim");
    assert_eq!(d.get(&pod, &lee, &path).await.status, 404);
    assert_eq!(d.get(&pod, TEST_API_TOKEN, &path).await.status, 200);

    // Listing: a user token lists its own calls only, and may not ask for another's.
    let lees_call = d
        .post(
            &pod,
            &lee,
            json!({"to": "+14155550102", "persona": "ada", "in": "2h"}),
        )
        .await;
    assert_eq!(lees_call.status, 201, "{}", lees_call.body);
    let lees_call = lees_call.body["id"].as_str().expect("an id").to_string();
    let listed = d.get(&pod, &lee, "/v1/calls").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(ids(&listed), std::slice::from_ref(&lees_call));
    assert_eq!(d.get(&pod, &lee, "/v1/calls?user=kim").await.status, 403);
    let all = ids(&d.get(&pod, TEST_API_TOKEN, "/v1/calls").await);
    assert!(
        all.contains(&kims_call) && all.contains(&lees_call),
        "{all:?}"
    );

    // Cancelling: lee cannot cancel kim's callback (404), kim can.
    assert_eq!(d.delete(&pod, &lee, &path).await.status, 404);
    let canceled = d.delete(&pod, &kim, &path).await;
    assert_eq!(canceled.status, 200, "{}", canceled.body);

    // Revoked: every token of kim is refused at once; lee is untouched.
    let (ok, _, stderr) = d.user_token(&["revoke", "--user", "kim"]);
    assert!(ok && stderr.contains("revoked 1 token"), "{stderr}");
    assert_eq!(d.get(&pod, &kim, "/v1/calls").await.status, 401);
    assert_eq!(d.get(&pod, &lee, "/v1/calls").await.status, 200);
    // A token-shaped guess is simply unauthorized.
    let guess = format!("cmbu_{}", "A".repeat(43));
    assert_eq!(d.get(&pod, &guess, "/v1/calls").await.status, 401);
}

// The number limit is one budget for the whole deployment: two pods share it through
// PostgreSQL. Over it: 429 with Retry-After, counted, nothing dialled or scheduled;
// a request refused by the user limit leaves the number's budget untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_rate_limits_hold_across_pods_and_a_refusal_consumes_nothing() {
    let d = Deployment::new().await;
    let limits = [
        ("CALLMEBACK_DIAL_LIMIT_PER_NUMBER", "3/1h"),
        ("CALLMEBACK_DIAL_LIMIT_PER_USER", "2/1h"),
    ];
    let (a, b) = (d.pod(&limits).await, d.pod(&limits).await);
    let call = |to: &str, user: Option<&str>| {
        let mut body = json!({"to": to, "persona": "ada", "in": "1h"});
        if let Some(u) = user {
            body["user"] = json!(u);
        }
        body
    };

    // Three calls to one number through two pods, then the fourth on either is refused.
    for pod in [&a, &b, &a] {
        let ok = d
            .post(pod, TEST_API_TOKEN, call("+14155550110", None))
            .await;
        assert_eq!(ok.status, 201, "{}", ok.body);
    }
    for pod in [&b, &a] {
        let limited = d
            .post(pod, TEST_API_TOKEN, call("+14155550110", None))
            .await;
        assert_eq!(limited.status, 429, "{}", limited.body);
        assert_eq!(limited.body["error"], "rate_limited_number");
        let retry = limited.retry_after.expect("Retry-After header");
        // Three calls within seconds of each other, limit 3 per hour: a slot frees
        // only once a third of them has slid out of the window, 20 min at the
        // earliest (however the calls fall across the fixed windows).
        assert!(
            (1200..=2 * 3600).contains(&retry),
            "Retry-After {retry} s: {}",
            limited.body
        );
        assert_eq!(limited.body["retry_after_seconds"], json!(retry));
    }
    // Another number has its own budget.
    let other = d.post(&b, TEST_API_TOKEN, call("+14155550111", None)).await;
    assert_eq!(other.status, 201, "{}", other.body);

    // The user limit: two calls for kim, then the third (to a fresh number) is refused...
    for to in ["+14155550120", "+14155550121"] {
        let ok = d.post(&a, TEST_API_TOKEN, call(to, Some("kim"))).await;
        assert_eq!(ok.status, 201, "{}", ok.body);
    }
    let limited = d
        .post(&b, TEST_API_TOKEN, call("+14155550122", Some("kim")))
        .await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.body["error"], "rate_limited_user");
    // ...and did not use up that number's budget: three calls still go to it.
    for _ in 0..3 {
        let ok = d.post(&a, TEST_API_TOKEN, call("+14155550122", None)).await;
        assert_eq!(ok.status, 201, "{}", ok.body);
    }

    let scheduled: i64 = sqlx::query_scalar("SELECT count(*) FROM calls")
        .fetch_one(&sqlx::PgPool::connect(&d.db.url).await.expect("connect"))
        .await
        .expect("count calls");
    assert_eq!(
        scheduled,
        3 + 1 + 2 + 3,
        "refused requests scheduled nothing"
    );
    let refused = a
        .metric("voice_refusals_total", &[("reason", "rate_limited_number")])
        .await
        .unwrap()
        + b.metric("voice_refusals_total", &[("reason", "rate_limited_number")])
            .await
            .unwrap();
    assert_eq!(refused, 2.0);
    assert_eq!(
        b.metric("voice_refusals_total", &[("reason", "rate_limited_user")])
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        a.metric("voice_outbound_calls_total", &[("result", "refused")])
            .await
            .unwrap()
            + b.metric("voice_outbound_calls_total", &[("result", "refused")])
                .await
                .unwrap(),
        3.0
    );
}
