//! Twilio Calls REST emulator (what the voice pod calls):
//!
//! - `POST /2010-04-01/Accounts/{AccountSid}/Calls.json` creates a call.
//! - `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` updates one
//!   (`Status=completed` hangs up, `Status=canceled` cancels).
//! - `GET /2010-04-01/Accounts/{AccountSid}/Calls.json` lists calls, newest first,
//!   filtered as Twilio filters (`To`, `From`, `Status`, and `StartTime`,
//!   `StartTime>` / `StartTime<` for `StartTime>=` / `StartTime<=`, by UTC date; a
//!   call that has not started, `queued`, has no start time and matches no
//!   `StartTime` filter) and paged with Twilio's fields (`page`, `page_size`,
//!   `start`, `end`, `uri`, `first_page_uri`, `next_page_uri`, `previous_page_uri`;
//!   `PageSize` 1..=1000, default 50; `Page` with `PageToken`).
//!
//! It checks the request the way Twilio does: HTTP Basic auth (401, code 20003),
//! the account in the path (404, 20404), `To`/`From` present and E.164 (21201,
//! 21211, 21213, 21212), `Twiml` or `Url` present (21205), inline TwiML at most 4000
//! characters (32018) and well-formed with a `<Response>` root (12100),
//! `StatusCallbackEvent` values and `StatusCallbackMethod`, `Timeout` in 1..=600.
//! Answers are Twilio-shaped JSON (call resources with `CA...` sids, error bodies
//! `{code, message, more_info, status}`). Every request is recorded, and the next
//! creations can be told to fail with a given Twilio error.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use callmeback_api::is_e164;
use chrono::{DateTime, NaiveDate, Utc};
use quick_xml::events::Event;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use super::twilio_error;

/// A form as received, repeats kept in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormRecord(pub Vec<(String, String)>);

impl FormRecord {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// Every value of `name`, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A call the emulator created.
#[derive(Clone, Debug)]
pub struct CreatedCall {
    /// `CA...`.
    pub sid: String,
    /// The creation request.
    pub form: FormRecord,
    /// Current status (`queued`, or what an update set).
    pub status: String,
    /// When it was created (`date_created`).
    pub created_at: DateTime<Utc>,
}

impl CreatedCall {
    /// Twilio's `start_time`: none until the call is dialled (`queued`, or canceled
    /// while queued). The emulator dials nothing, so a call starts only when a test
    /// moves it on ([`TwilioRestEmulator::set_status`]) or an update ends it.
    pub fn start_time(&self) -> Option<DateTime<Utc>> {
        match self.status.as_str() {
            "queued" | "canceled" => None,
            _ => Some(self.created_at),
        }
    }
}

/// An update request (`POST .../Calls/{sid}.json`).
#[derive(Clone, Debug)]
pub struct CallUpdateRecord {
    /// The call.
    pub call_sid: String,
    /// The form.
    pub form: FormRecord,
}

/// A failure to inject.
#[derive(Clone, Debug)]
pub struct InjectedError {
    /// HTTP status.
    pub status: u16,
    /// Twilio error code.
    pub code: u32,
    /// Message.
    pub message: String,
}

#[derive(Default)]
struct Inner {
    calls: Vec<CreatedCall>,
    /// Every list request's query string, in order.
    lists: Vec<String>,
    updates: Vec<CallUpdateRecord>,
    rejected: Vec<(u32, FormRecord)>,
    fail_next: VecDeque<InjectedError>,
}

struct Shared {
    account_sid: String,
    auth_token: String,
    inner: Mutex<Inner>,
    next_sid: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running emulator on 127.0.0.1:0; stops when dropped.
pub struct TwilioRestEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for TwilioRestEmulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TwilioRestEmulator {
    /// Starts an emulator for one account.
    pub async fn start(account_sid: &str, auth_token: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            account_sid: account_sid.into(),
            auth_token: auth_token.into(),
            inner: Mutex::new(Inner::default()),
            next_sid: AtomicU64::new(1),
        });
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Calls.json",
                post(create).get(list),
            )
            .route("/2010-04-01/Accounts/{account}/Calls/{file}", post(update))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
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

    /// Calls created so far.
    pub fn calls(&self) -> Vec<CreatedCall> {
        self.shared.lock().calls.clone()
    }

    /// The query strings of the Calls list requests so far, in order.
    pub fn list_requests(&self) -> Vec<String> {
        self.shared.lock().lists.clone()
    }

    /// Moves a call on as Twilio would (`ringing`, `in-progress`, ...).
    pub fn set_status(&self, sid: &str, status: &str) {
        if let Some(c) = self.shared.lock().calls.iter_mut().find(|c| c.sid == sid) {
            c.status = status.to_string();
        }
    }

    /// Update requests so far (hangups).
    pub fn updates(&self) -> Vec<CallUpdateRecord> {
        self.shared.lock().updates.clone()
    }

    /// Creation requests refused by validation: (Twilio code, form).
    pub fn rejected(&self) -> Vec<(u32, FormRecord)> {
        self.shared.lock().rejected.clone()
    }

    /// The next call creation fails with this Twilio error (queued; one per call).
    pub fn fail_next(&self, status: u16, code: u32, message: &str) {
        self.shared.lock().fail_next.push_back(InjectedError {
            status,
            code,
            message: message.into(),
        });
    }
}

// The error is the ready HTTP response, returned at once by the handler.
#[allow(clippy::result_large_err)]
fn gate(shared: &Shared, headers: &HeaderMap, account: &str) -> Result<(), Response> {
    super::twilio_basic_auth(&shared.account_sid, &shared.auth_token, headers, account)
}

/// Checks TwiML the way Twilio's parser would: well-formed XML, `<Response>` root.
pub fn check_twiml(xml: &str) -> Result<(), String> {
    if xml.starts_with(char::is_whitespace) {
        return Err("whitespace before the XML declaration".into());
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    let mut root: Option<String> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                if depth == 0 {
                    root = Some(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                }
                for a in e.attributes() {
                    let a = a.map_err(|e| e.to_string())?;
                    a.unescape_value().map_err(|e| e.to_string())?;
                }
                depth += 1;
            }
            Ok(Event::Empty(e)) => {
                if depth == 0 {
                    root = Some(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                }
                for a in e.attributes() {
                    let a = a.map_err(|e| e.to_string())?;
                    a.unescape_value().map_err(|e| e.to_string())?;
                }
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Text(t)) => {
                t.decode().map_err(|e| e.to_string())?;
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if depth != 0 {
        return Err("unclosed element".into());
    }
    match root.as_deref() {
        Some("Response") => Ok(()),
        other => Err(format!("root element is {other:?}, not Response")),
    }
}

fn validate(form: &FormRecord) -> Result<(), (u32, String)> {
    match form.get("To") {
        None | Some("") => return Err((21201, "No 'To' number is specified".into())),
        Some(to) if !is_e164(to) => {
            return Err((21211, format!("Invalid 'To' Phone Number: {to}")));
        }
        _ => {}
    }
    match form.get("From") {
        None | Some("") => return Err((21213, "No 'From' number is specified".into())),
        Some(from) if !is_e164(from) => {
            return Err((21212, format!("Invalid 'From' Phone Number: {from}")));
        }
        _ => {}
    }
    match (form.get("Twiml"), form.get("Url")) {
        (None, None) => return Err((21205, "Url parameter is required.".into())),
        (Some(twiml), _) => {
            if twiml.chars().count() > 4000 {
                return Err((32018, "Twiml parameter exceeds 4000 characters".into()));
            }
            check_twiml(twiml).map_err(|e| (12100, format!("Document parse failure: {e}")))?;
        }
        (None, Some(url)) => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err((21205, "Url is not a valid URL".into()));
            }
        }
    }
    for event in form.all("StatusCallbackEvent") {
        if !["initiated", "ringing", "answered", "completed"].contains(&event) {
            return Err((21626, format!("Invalid StatusCallbackEvent: {event}")));
        }
    }
    if let Some(m) = form.get("StatusCallbackMethod")
        && !["GET", "POST"].contains(&m)
    {
        return Err((21609, "Invalid StatusCallbackMethod".into()));
    }
    if let Some(t) = form.get("Timeout")
        && !t.parse::<u32>().is_ok_and(|t| (1..=600).contains(&t))
    {
        return Err((21216, "Timeout must be between 1 and 600".into()));
    }
    Ok(())
}

fn call_json(account: &str, call: &CreatedCall) -> serde_json::Value {
    let (sid, form) = (&call.sid, &call.form);
    json!({
        "sid": sid,
        "account_sid": account,
        "to": form.get("To"),
        "from": form.get("From"),
        "status": call.status,
        "date_created": call.created_at.to_rfc2822(),
        "start_time": call.start_time().map(|t| t.to_rfc2822()),
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "uri": format!("/2010-04-01/Accounts/{account}/Calls/{sid}.json"),
    })
}

async fn create(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&shared, &headers, &account) {
        return r;
    }
    let form = FormRecord(url::form_urlencoded::parse(&body).into_owned().collect());
    if let Some(e) = shared.lock().fail_next.pop_front() {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        return twilio_error(status, e.code, &e.message);
    }
    if let Err((code, message)) = validate(&form) {
        shared.lock().rejected.push((code, form));
        return twilio_error(StatusCode::BAD_REQUEST, code, &message);
    }
    let n = shared.next_sid.fetch_add(1, Ordering::Relaxed);
    let call = CreatedCall {
        sid: format!("CA{n:032x}"),
        form,
        status: "queued".into(),
        created_at: Utc::now(),
    };
    let body = call_json(&account, &call);
    shared.lock().calls.push(call);
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Path((account, file)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = gate(&shared, &headers, &account) {
        return r;
    }
    let form = FormRecord(url::form_urlencoded::parse(&body).into_owned().collect());
    let Some(call_sid) = file.strip_suffix(".json").map(str::to_string) else {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    let mut inner = shared.lock();
    inner.updates.push(CallUpdateRecord {
        call_sid: call_sid.clone(),
        form: form.clone(),
    });
    let Some(call) = inner.calls.iter_mut().find(|c| c.sid == call_sid) else {
        return twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        );
    };
    match form.get("Status") {
        Some(s @ ("completed" | "canceled")) => call.status = s.to_string(),
        Some(other) => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                21218,
                &format!("Invalid Status: {other}"),
            );
        }
        None => {}
    }
    let body = call_json(&account, call);
    (StatusCode::OK, Json(body)).into_response()
}

/// A `StartTime` filter value: a UTC date (`YYYY-MM-DD`), as Twilio documents it.
// The error is the ready HTTP response, returned at once by the handler.
#[allow(clippy::result_large_err)]
fn filter_date(v: &str) -> Result<NaiveDate, Response> {
    NaiveDate::parse_from_str(v, "%Y-%m-%d").map_err(|_| {
        twilio_error(
            StatusCode::BAD_REQUEST,
            20001,
            &format!("Invalid StartTime: {v}"),
        )
    })
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = gate(&shared, &headers, &account) {
        return r;
    }
    let query = query.unwrap_or_default();
    let params = FormRecord(
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
    );
    let page_size = match params.get("PageSize").map(str::parse::<usize>) {
        None => 50,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return twilio_error(StatusCode::BAD_REQUEST, 20001, "Invalid PageSize");
        }
    };
    let page = match params.get("Page").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return twilio_error(StatusCode::BAD_REQUEST, 20001, "Invalid Page"),
    };
    // Twilio requires the token it handed out for any page after the first.
    let expected_token = format!("PA{}", page * page_size);
    if page > 0 && params.get("PageToken") != Some(expected_token.as_str()) {
        return twilio_error(StatusCode::BAD_REQUEST, 20001, "Invalid PageToken");
    }
    let mut dates = Vec::new();
    for key in ["StartTime", "StartTime>", "StartTime<"] {
        if let Some(v) = params.get(key) {
            match filter_date(v) {
                Ok(d) => dates.push((key, d)),
                Err(r) => return r,
            }
        }
    }
    let mut inner = shared.lock();
    inner.lists.push(query.clone());
    let mut matching: Vec<&CreatedCall> = inner
        .calls
        .iter()
        .filter(|c| {
            params
                .get("To")
                .is_none_or(|to| c.form.get("To") == Some(to))
        })
        .filter(|c| {
            params
                .get("From")
                .is_none_or(|f| c.form.get("From") == Some(f))
        })
        .filter(|c| params.get("Status").is_none_or(|s| c.status == s))
        .filter(|c| {
            dates.iter().all(|(key, d)| {
                c.start_time().is_some_and(|t| {
                    let day = t.date_naive();
                    match *key {
                        "StartTime>" => day >= *d,
                        "StartTime<" => day <= *d,
                        _ => day == *d,
                    }
                })
            })
        })
        .collect();
    matching.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.sid.cmp(&a.sid))
    });
    let start = page.saturating_mul(page_size);
    let calls: Vec<_> = matching
        .iter()
        .skip(start)
        .take(page_size)
        .map(|c| call_json(&account, c))
        .collect();
    let more = matching.len() > start.saturating_add(calls.len());
    // The filters again, without the paging parameters, for the page links.
    let filters: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            params
                .0
                .iter()
                .filter(|(k, _)| !["Page", "PageSize", "PageToken"].contains(&k.as_str())),
        )
        .finish();
    let base = format!("/2010-04-01/Accounts/{account}/Calls.json");
    let link = |p: usize| {
        let sep = if filters.is_empty() { "" } else { "&" };
        let token = if p > 0 {
            format!("&PageToken=PA{}", p * page_size)
        } else {
            String::new()
        };
        format!("{base}?{filters}{sep}PageSize={page_size}&Page={p}{token}")
    };
    let body = json!({
        "calls": calls,
        "page": page,
        "page_size": page_size,
        "start": start,
        "end": start + calls.len().saturating_sub(1),
        "uri": format!("{base}?{query}"),
        "first_page_uri": link(0),
        "next_page_uri": if more { Some(link(page + 1)) } else { None },
        "previous_page_uri": if page > 0 { Some(link(page - 1)) } else { None },
    });
    (StatusCode::OK, Json(body)).into_response()
}
