//! Twilio IncomingPhoneNumbers REST emulator (the part the operator calls):
//!
//! - `GET  /2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers.json?PhoneNumber=+1...`
//!   answers `{"incoming_phone_numbers": [...]}` (filtered by exact number).
//! - `POST /2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers/{PNsid}.json` with a
//!   form (`VoiceUrl`, `VoiceMethod`, `StatusCallback`, `StatusCallbackMethod`,
//!   `FriendlyName`) updates the number and answers it.
//!
//! Like Twilio it checks HTTP Basic auth (account SID and auth token; 401 with code
//! 20003 otherwise), scopes numbers to the account in the path (404 code 20404),
//! gives new numbers Twilio's default label (`(415) 555-0100`), refuses labels over
//! 64 characters, and can be switched down (503 on every request) or throttled (429
//! code 20429, as Twilio answers over its concurrency limit) to test an outage.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::twilio_error;

/// One phone number as Twilio stores it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct NumberRecord {
    /// `PN...`.
    pub sid: String,
    /// Owning account.
    pub account_sid: String,
    /// E.164.
    pub phone_number: String,
    /// Voice webhook.
    pub voice_url: String,
    /// Its method.
    pub voice_method: String,
    /// Status callback.
    pub status_callback: String,
    /// Its method.
    pub status_callback_method: String,
    /// The label.
    pub friendly_name: String,
}

#[derive(Default)]
struct Inner {
    numbers: BTreeMap<String, NumberRecord>,
}

struct Shared {
    account_sid: String,
    auth_token: String,
    inner: Mutex<Inner>,
    down: AtomicBool,
    throttled: AtomicBool,
    refused: AtomicU64,
    lookups: AtomicU64,
    updates: AtomicU64,
    next_sid: AtomicU64,
}

/// A running emulator on 127.0.0.1:0 (or [`TwilioNumbersEmulator::start_on`]
/// an address of choice); stops when dropped.
pub struct TwilioNumbersEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for TwilioNumbersEmulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TwilioNumbersEmulator {
    /// Starts an emulator for one account.
    pub async fn start(account_sid: &str, auth_token: &str) -> std::io::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, account_sid, auth_token).await
    }

    /// Starts an emulator for one account on `ip` (a free port), for callers
    /// outside this host's loopback: pods on the test node reach it at the
    /// node's host address.
    pub async fn start_on(
        ip: std::net::Ipv4Addr,
        account_sid: &str,
        auth_token: &str,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            account_sid: account_sid.into(),
            auth_token: auth_token.into(),
            inner: Mutex::new(Inner::default()),
            down: AtomicBool::new(false),
            throttled: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            next_sid: AtomicU64::new(1),
        });
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/IncomingPhoneNumbers.json",
                get(list),
            )
            .route(
                "/2010-04-01/Accounts/{account}/IncomingPhoneNumbers/{file}",
                post(update),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Ok(Self { addr, shared, stop })
    }

    /// The REST base (what `TWILIO_API_URL` holds).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a number to the account with its current wiring; returns its `PN` sid.
    pub fn add_number(&self, phone_number: &str, voice_url: &str, status_callback: &str) -> String {
        let n = self.shared.next_sid.fetch_add(1, Ordering::Relaxed);
        let sid = format!("PN{n:032x}");
        let record = NumberRecord {
            sid: sid.clone(),
            account_sid: self.shared.account_sid.clone(),
            phone_number: phone_number.into(),
            voice_url: voice_url.into(),
            voice_method: "POST".into(),
            status_callback: status_callback.into(),
            status_callback_method: "POST".into(),
            friendly_name: default_label(phone_number),
        };
        self.lock().numbers.insert(sid.clone(), record);
        sid
    }

    /// The number's current record.
    pub fn number(&self, phone_number: &str) -> Option<NumberRecord> {
        self.lock()
            .numbers
            .values()
            .find(|n| n.phone_number == phone_number)
            .cloned()
    }

    /// Changes a number's voice webhook as a person in the Twilio console would.
    pub fn set_voice_url(&self, phone_number: &str, voice_url: &str) {
        if let Some(n) = self
            .lock()
            .numbers
            .values_mut()
            .find(|n| n.phone_number == phone_number)
        {
            n.voice_url = voice_url.into();
        }
    }

    /// Throttles every request (429, code 20429) or stops throttling.
    pub fn set_throttled(&self, throttled: bool) {
        self.shared.throttled.store(throttled, Ordering::Relaxed);
    }

    /// Requests refused while down or throttled.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Switches the emulator down (503 on everything) or back up.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Relaxed);
    }

    /// Successful `POST` updates so far.
    pub fn updates(&self) -> u64 {
        self.shared.updates.load(Ordering::Relaxed)
    }

    /// Successful `GET` lookups so far.
    pub fn lookups(&self) -> u64 {
        self.shared.lookups.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks availability, Basic auth and the account in the path.
// `Err` is the ready response the handler returns at once.
#[allow(clippy::result_large_err)]
fn gate(shared: &Shared, headers: &HeaderMap, account: &str) -> Result<(), Response> {
    if shared.throttled.load(Ordering::Relaxed) {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        return Err(twilio_error(
            StatusCode::TOO_MANY_REQUESTS,
            20429,
            "Too Many Requests",
        ));
    }
    if shared.down.load(Ordering::Relaxed) {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        return Err(twilio_error(
            StatusCode::SERVICE_UNAVAILABLE,
            20503,
            "Service Unavailable",
        ));
    }
    super::twilio_basic_auth(&shared.account_sid, &shared.auth_token, headers, account)
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = gate(&shared, &headers, &account) {
        return r;
    }
    shared.lookups.fetch_add(1, Ordering::Relaxed);
    let inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let numbers: Vec<NumberRecord> = inner
        .numbers
        .values()
        .filter(|n| {
            query
                .get("PhoneNumber")
                .is_none_or(|p| *p == n.phone_number)
        })
        .cloned()
        .collect();
    Json(serde_json::json!({
        "incoming_phone_numbers": numbers,
        "page": 0,
        "page_size": 50,
    }))
    .into_response()
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(r) = gate(&shared, &headers, &account) {
        return r;
    }
    let Some(sid) = file.strip_suffix(".json") else {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    let mut inner = shared.inner.lock().unwrap_or_else(|p| p.into_inner());
    let Some(record) = inner.numbers.get_mut(sid) else {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    // Like Twilio, a request with one bad field changes nothing.
    let method_ok = |v: &str| v.is_empty() || v == "GET" || v == "POST";
    for (field, value) in &form {
        match field.as_str() {
            "VoiceMethod" | "StatusCallbackMethod" if !method_ok(value) => {
                return twilio_error(StatusCode::BAD_REQUEST, 21200, "Invalid HTTP method");
            }
            "FriendlyName" if value.chars().count() > 64 => {
                return twilio_error(
                    StatusCode::BAD_REQUEST,
                    21200,
                    "FriendlyName must be 64 characters or less",
                );
            }
            _ => {}
        }
    }
    for (field, value) in form {
        match field.as_str() {
            "VoiceUrl" => record.voice_url = value,
            "StatusCallback" => record.status_callback = value,
            "VoiceMethod" => record.voice_method = value,
            "StatusCallbackMethod" => record.status_callback_method = value,
            "FriendlyName" => record.friendly_name = value,
            _ => {}
        }
    }
    shared.updates.fetch_add(1, Ordering::Relaxed);
    Json(record.clone()).into_response()
}

/// Twilio's default label for a new number: `(415) 555-0100` for a North American
/// number, the E.164 form otherwise.
fn default_label(phone_number: &str) -> String {
    match phone_number.strip_prefix("+1") {
        Some(d) if d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit()) => {
            format!("({}) {}-{}", &d[..3], &d[3..6], &d[6..])
        }
        _ => phone_number.to_string(),
    }
}
