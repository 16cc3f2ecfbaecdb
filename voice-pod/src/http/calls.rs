//! "Call me back": `POST /v1/calls` (now, or scheduled with `at` / `in`),
//! `GET /v1/calls` (`?status=scheduled`, ...), `GET /v1/calls/{sid}` and
//! `DELETE /v1/calls/{id}` (cancel a callback that has not been placed).
//!
//! A call without `at`/`in` is placed at once through Twilio (see
//! [`crate::twilio::outbound`] for the request). With `at` (RFC 3339) or `in`
//! (`"10m"`, `"90s"`) it becomes a `scheduled` row in PostgreSQL, durable when the
//! answer is sent, and a pod's [`crate::scheduler`] places it when due.
//!
//! Numbers (`to`, `from`) are normalised to E.164 (`+1 (415) 555-0100` becomes
//! `+14155550100`) and only ever logged masked. `user` owns the relationship: the
//! call is recorded under it and the `to` number is remembered for them.
//!
//! While the phone rings, [`CallHandler::prepare`](crate::session::CallHandler::prepare)
//! lets providers warm up so the persona speaks within a second of the answer.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::access::{self, Principal};
use callmeback_api::is_e164;

use crate::dial_guard::DialRefusal;
use crate::duration::parse_duration;
use crate::metrics::Refusal;
use crate::phone::{mask_number, mask_numbers_in, normalize_e164};
use crate::scheduler::queries::{self as schedule_sql, CancelOutcome, ScheduledCall};
use crate::store::queries::{CallFilter, MAX_LIST_LIMIT};
use crate::store::records::{CallRef, CallStatus};
use crate::store::{CallCreated, PgStore, RecordError, call_key};
use crate::twilio::outbound::{self, OutboundPlan};
use crate::twilio::rest::RestError;
use crate::twilio::twiml;

/// Bound on the API's own database statements.
const DB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest pretext accepted, in characters.
pub const MAX_PRETEXT_CHARS: usize = 1000;
/// Longest user id accepted, in characters.
pub use crate::access::MAX_USER_CHARS;

/// Body of `POST /v1/calls`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// Who to call (E.164).
    pub to: String,
    /// Which persona calls; the default persona when omitted.
    #[serde(default)]
    pub persona: Option<String>,
    /// Why the persona calls (appended to its prompt).
    #[serde(default)]
    pub pretext: Option<String>,
    /// Opaque id of the user (relationship memory).
    #[serde(default)]
    pub user: Option<String>,
    /// Caller ID; `TWILIO_FROM_NUMBER` when omitted.
    #[serde(default)]
    pub from: Option<String>,
    /// When to call (RFC 3339); at once when neither this nor `in` is given.
    #[serde(default)]
    pub at: Option<String>,
    /// In how long to call (`"10m"`, `"90s"`, `"1h30m"`).
    #[serde(default, rename = "in")]
    pub in_: Option<String>,
    /// Not placed when due longer ago than this (`"30m"`); the pod's default otherwise.
    #[serde(default, rename = "maxLateness")]
    pub max_lateness: Option<String>,
    /// Calls again this many times on busy / no-answer (0..=5, default 0).
    #[serde(default)]
    pub retries: Option<u32>,
    /// Wait before each retry (`"2m"`); the pod's default (60 s) otherwise.
    #[serde(default, rename = "retryDelay")]
    pub retry_delay: Option<String>,
}

/// Most retries a request may ask for.
pub const MAX_RETRIES: u32 = 5;
/// Furthest ahead a callback may be scheduled.
pub const MAX_SCHEDULE_AHEAD: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// When and how a call is placed, from the request.
#[derive(Clone, Debug, PartialEq)]
struct Timing {
    /// `None`: at once.
    due: Option<DateTime<Utc>>,
    max_lateness_seconds: Option<i32>,
    retries: u32,
    retry_delay_seconds: Option<i32>,
    /// A time or duration was outside its range (counted as
    /// `voice_refusals_total{reason="time_out_of_range"}`).
    out_of_range: bool,
}

/// A duration field, range-checked before any arithmetic uses it: `min..=max`.
fn duration_field(
    field: &'static str,
    raw: &str,
    min: std::time::Duration,
    max: std::time::Duration,
    problems: &mut Vec<Problem>,
    out_of_range: &mut bool,
) -> Option<std::time::Duration> {
    match parse_duration(raw) {
        Ok(d) if d < min => {
            *out_of_range = true;
            problems.push(Problem {
                field,
                problem: format!("must be at least {}", humantime::format_duration(min)),
            });
            None
        }
        Ok(d) if d > max => {
            *out_of_range = true;
            problems.push(Problem {
                field,
                problem: format!("must be at most {}", humantime::format_duration(max)),
            });
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(Problem { field, problem: e });
            None
        }
    }
}

/// Whole seconds of a duration already bounded by [`MAX_SCHEDULE_AHEAD`] (fits an `i32`).
fn seconds_i32(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// Reads `at` / `in` / `maxLateness` / `retries` / `retryDelay`. Every time and
/// duration is range-checked before it meets a clock: `in` and `at` within
/// [`MAX_SCHEDULE_AHEAD`] of `now` (either way for `at`), `maxLateness` and
/// `retryDelay` from one second to the same bound.
fn timing(req: &CallRequest, now: DateTime<Utc>, problems: &mut Vec<Problem>) -> Timing {
    let mut out_of_range = false;
    let ahead = chrono::Duration::seconds(MAX_SCHEDULE_AHEAD.as_secs() as i64);
    let one_second = std::time::Duration::from_secs(1);
    let due = match (&req.at, &req.in_) {
        (Some(_), Some(_)) => {
            problems.push(Problem {
                field: "at",
                problem: "give either `at` or `in`, not both".into(),
            });
            None
        }
        (Some(at), None) => match DateTime::parse_from_rfc3339(at) {
            Ok(t) => {
                let t = t.with_timezone(&Utc);
                let (earliest, latest) =
                    (now.checked_sub_signed(ahead), now.checked_add_signed(ahead));
                if latest.is_none_or(|l| t > l) {
                    out_of_range = true;
                    problems.push(Problem {
                        field: "at",
                        problem: "more than 90 days ahead".into(),
                    });
                    None
                } else if earliest.is_none_or(|e| t < e) {
                    out_of_range = true;
                    problems.push(Problem {
                        field: "at",
                        problem: "more than 90 days in the past".into(),
                    });
                    None
                } else {
                    Some(t)
                }
            }
            Err(e) => {
                problems.push(Problem {
                    field: "at",
                    problem: format!("not an RFC 3339 time such as 2026-05-01T18:30:00Z ({e})"),
                });
                None
            }
        },
        (None, Some(after)) => duration_field(
            "in",
            after,
            std::time::Duration::ZERO,
            MAX_SCHEDULE_AHEAD,
            problems,
            &mut out_of_range,
        )
        .and_then(|d| {
            let due = chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_add_signed(d));
            if due.is_none() {
                out_of_range = true;
                problems.push(Problem {
                    field: "in",
                    problem: "is past the end of the calendar".into(),
                });
            }
            due
        }),
        (None, None) => None,
    };
    let max_lateness_seconds = req
        .max_lateness
        .as_deref()
        .and_then(|m| {
            duration_field(
                "maxLateness",
                m,
                one_second,
                MAX_SCHEDULE_AHEAD,
                problems,
                &mut out_of_range,
            )
        })
        .map(seconds_i32);
    let retries = req.retries.unwrap_or(0);
    if retries > MAX_RETRIES {
        problems.push(Problem {
            field: "retries",
            problem: format!("at most {MAX_RETRIES}"),
        });
    }
    let retry_delay_seconds = req
        .retry_delay
        .as_deref()
        .and_then(|r| {
            duration_field(
                "retryDelay",
                r,
                std::time::Duration::ZERO,
                MAX_SCHEDULE_AHEAD,
                problems,
                &mut out_of_range,
            )
        })
        .map(seconds_i32);
    Timing {
        due,
        max_lateness_seconds,
        retries,
        retry_delay_seconds,
        out_of_range,
    }
}

fn count(state: &AppState, result: &str) {
    state
        .metrics
        .outbound_calls
        .with_label_values(&[result])
        .inc();
}

/// The principal of `Authorization: Bearer <token>`: the admin token (compared in
/// constant time) or a live user token (looked up by its digest in PostgreSQL).
/// The API is off (503) with neither an admin token nor a database of user tokens.
async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    if state.settings.api_token.is_none() && state.store.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_disabled",
            "the call-me-back API is disabled on this pod (CALLMEBACK_API_TOKEN is unset \
             and no DATABASE_URL holds user tokens)",
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if let Some(expected) = &state.settings.api_token {
        // Comparing digests keeps the comparison constant-time regardless of length.
        let a = Sha256::digest(given.as_bytes());
        let b = Sha256::digest(expected.expose().as_bytes());
        if bool::from(a.ct_eq(&b)) && !given.is_empty() {
            return Ok(Principal::Admin);
        }
    }
    if let Some(store) = &state.store
        && access::is_user_token(given)
        && let Some(grant) = db("token lookup", access::user_grant(store.pool(), given)).await?
    {
        return Ok(Principal::User(grant));
    }
    Err(ApiError::unauthorized())
}

/// 403 for a user token asking for more than its grant; counted and logged.
fn out_of_scope(state: &AppState, message: &'static str) -> ApiError {
    state.metrics.refused(Refusal::TokenScope);
    tracing::warn!(
        reason = message,
        "request refused: outside the user token's grant"
    );
    ApiError::new(StatusCode::FORBIDDEN, "token_scope", message)
}

fn check_text(field: &'static str, value: &str, max: usize, problems: &mut Vec<Problem>) {
    if value.chars().count() > max {
        problems.push(Problem {
            field,
            problem: format!("longer than {max} characters"),
        });
    }
    if value.chars().any(|c| !twiml::is_xml_char(c)) {
        problems.push(Problem {
            field,
            problem: "contains control characters".into(),
        });
    }
}

/// `POST /v1/calls`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match create_inner(&state, &headers, &body).await {
        Ok(resp) => resp,
        Err(err) => {
            let result = match err.status {
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::BAD_REQUEST if err.code == "invalid_request" => "invalid",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                // The dial guard, a rate limit or a token's scope said no.
                StatusCode::FORBIDDEN => "refused",
                StatusCode::TOO_MANY_REQUESTS if err.code != "twilio_error" => "refused",
                _ => "twilio_error",
            };
            count(&state, result);
            err.into_response()
        }
    }
}

/// The destination through the deployment's dial guard: E.164, a problem on `to`
/// (not a number), or a 403 (a number this deployment may not dial). Each
/// refusal is counted and logged with the number masked.
fn dial_destination(
    state: &AppState,
    caller_id: &str,
    raw: &str,
    problems: &mut Vec<Problem>,
) -> Result<Option<String>, ApiError> {
    let guard = state.settings.dial.guard(caller_id).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "dialling_not_configured",
            e.to_string(),
        )
    })?;
    match guard.check(raw) {
        Ok(e164) => Ok(Some(e164)),
        Err(refusal) => {
            state.metrics.refused(Refusal::Dial(refusal.metric_label()));
            tracing::warn!(
                to = %mask_number(raw),
                reason = refusal.metric_label(),
                "call refused: destination not dialled"
            );
            match refusal {
                DialRefusal::Unparseable | DialRefusal::Invalid => {
                    problems.push(Problem {
                        field: "to",
                        problem: format!(
                            "{refusal}: give an international number such as +14155550100"
                        ),
                    });
                    Ok(None)
                }
                DialRefusal::PremiumRate | DialRefusal::SharedCost | DialRefusal::NotAllowed(_) => {
                    Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        refusal.metric_label(),
                        refusal.to_string(),
                    ))
                }
            }
        }
    }
}

async fn create_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let principal = authorize(state, headers).await?;
    let grant = match &principal {
        Principal::User(grant) => Some(grant),
        Principal::Admin => None,
    };
    if state.drain.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this pod is shutting down; retry (another pod will take the call)",
        ));
    }
    if state.call_slots.is_full() {
        state.metrics.refused(Refusal::CallLimit);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "at_capacity",
            format!(
                "this pod is at its call capacity ({} calls, CALLMEBACK_MAX_CALLS); retry",
                state.call_slots.max()
            ),
        ));
    }
    let req: CallRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(vec![Problem {
            field: "body",
            problem: format!("not a valid call request: {e}"),
        }])
    })?;
    if let Some(grant) = grant {
        if req.from.is_some() {
            return Err(out_of_scope(
                state,
                "a user token calls from the deployment's caller ID; `from` needs the admin token",
            ));
        }
        if req.user.as_deref().is_some_and(|u| u != grant.user) {
            return Err(out_of_scope(
                state,
                "a user token places calls only for its own user",
            ));
        }
    }
    let (Some(public), Some(signer), Some(client)) =
        (&state.settings.public_url, &state.signer, &state.twilio)
    else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "twilio_not_configured",
            "outbound calls need CALLMEBACK_PUBLIC_URL, TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN",
        ));
    };

    let mut problems = Vec::new();
    let from = match &req.from {
        Some(f) => normalize_e164(f).or(Some(String::new())),
        None => state.settings.from_number.clone(),
    };
    match &from {
        Some(f) if !is_e164(f) => problems.push(Problem {
            field: "from",
            problem: "must be an international number such as +14155550100 (E.164)".into(),
        }),
        None => problems.push(Problem {
            field: "from",
            problem: "required: no TWILIO_FROM_NUMBER is configured".into(),
        }),
        _ => {}
    }
    let to = match from.as_deref().filter(|f| is_e164(f)) {
        Some(caller_id) => dial_destination(state, caller_id, &req.to, &mut problems)?,
        None => normalize_e164(&req.to),
    };
    if to.is_none() && !problems.iter().any(|p| p.field == "to") {
        problems.push(Problem {
            field: "to",
            problem: "must be an international number such as +14155550100 (E.164)".into(),
        });
    }
    let snapshot = state.personas.snapshot();
    let persona_name = req
        .persona
        .clone()
        .or_else(|| snapshot.default_persona().map(str::to_string));
    let persona = match &persona_name {
        None => {
            problems.push(Problem {
                field: "persona",
                problem: "required: there is no default persona".into(),
            });
            None
        }
        Some(name) => {
            let p = snapshot.get(name);
            if p.is_none() {
                let known: Vec<&str> = snapshot.names().collect();
                problems.push(Problem {
                    field: "persona",
                    problem: format!("unknown persona; loaded: {}", known.join(", ")),
                });
            }
            p
        }
    };
    if let Some(p) = &req.pretext {
        check_text("pretext", p, MAX_PRETEXT_CHARS, &mut problems);
    }
    if let Some(u) = &req.user {
        check_text("user", u, MAX_USER_CHARS, &mut problems);
    }
    let mut timing = timing(&req, Utc::now(), &mut problems);
    if timing.out_of_range {
        state.metrics.refused(Refusal::TimeOutOfRange);
    }
    let (Some(persona), Some(persona_name), Some(from), Some(to), true) =
        (persona, persona_name, from, to, problems.is_empty())
    else {
        return Err(ApiError::invalid(problems));
    };
    if let Some(grant) = grant
        && !grant.numbers.contains(&to)
    {
        return Err(out_of_scope(
            state,
            "this number is not registered for the token's user (voice-pod user-token issue --number)",
        ));
    }
    let user = match grant {
        Some(grant) => Some(grant.user.clone()),
        None => req.user.clone().filter(|u| !u.is_empty()),
    };
    if let Err(limited) = state.dial_rate.admit(&to, user.as_deref()).await {
        state
            .metrics
            .refused(Refusal::RateLimited(limited.metric_label()));
        tracing::warn!(
            to = %mask_number(&to),
            reason = limited.metric_label(),
            "call refused: dial rate limit"
        );
        let retry_after = limited.retry_after.as_secs().max(1);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            limited.metric_label(),
            limited.to_string(),
        )
        .with("retry_after_seconds", json!(retry_after))
        .retry_after(retry_after));
    }
    // The request's limit wins, then the persona's; the row keeps the one that applied,
    // so a persona edited later does not change a promise already made.
    timing.max_lateness_seconds = timing.max_lateness_seconds.or_else(|| {
        persona
            .callbacks
            .max_lateness_seconds
            .and_then(|s| i32::try_from(s).ok())
    });

    let call_id = uuid::Uuid::new_v4();
    let plan = OutboundPlan {
        call_id: call_id.to_string(),
        persona: persona_name.clone(),
        from: from.clone(),
        to: to.clone(),
        pretext: req.pretext.clone().filter(|p| !p.is_empty()),
        user,
    };
    // Retries need the durable row the scheduler watches, so a call that asks for
    // them goes through the scheduler even when it is due now (placed within one
    // poll interval).
    if timing.due.is_some() || timing.retries > 0 {
        return schedule(state, call_id, plan, &timing).await;
    }
    let request = outbound::build(public, signer, &state.settings.limits, &plan).map_err(|e| {
        ApiError::invalid(vec![Problem {
            field: "pretext",
            problem: e.to_string(),
        }])
    })?;
    let call_id = plan.call_id.clone();
    let ctx = request.context.clone();

    // Warm up while Twilio places the call and the phone rings.
    state.handler.prepare(&request.prepared(persona));
    let inline_twiml = request.inline_twiml;
    let created = client
        .create_call(&request.call)
        .await
        .map_err(|err| twilio_error(&err))?;

    tracing::info!(
        call_sid = %created.sid,
        call_id = %call_id,
        persona = %persona_name,
        to = %mask_number(&to),
        inline_twiml,
        "outbound call created"
    );
    count(state, "created");
    let records = Arc::clone(&state.records);
    let record = CallCreated {
        spec: ctx.spec,
        call_sid: Some(created.sid.clone()),
        status: created.status.clone(),
    };
    tokio::spawn(async move {
        if let Err(err) = records.call_created(record).await {
            tracing::warn!(error = %err, "call record not written");
        }
    });
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": call_id, "call_sid": created.sid, "status": created.status })),
    )
        .into_response())
}

/// Maps a REST failure to our answer: Twilio's own 400 and 429 keep their status
/// (the request or the rate is the caller's to fix); anything else is 502 (504 on
/// timeout). Twilio's code always travels in the body.
fn twilio_error(err: &RestError) -> ApiError {
    match err {
        RestError::Api(e) => {
            let status = match e.status {
                400 => StatusCode::BAD_REQUEST,
                429 => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::BAD_GATEWAY,
            };
            tracing::warn!(code = ?e.code, http_status = e.status, message = %mask_numbers_in(&e.message), "twilio refused the call");
            ApiError::new(
                status,
                "twilio_error",
                format!("Twilio refused the call: {}", e.message),
            )
            .with("twilio", json!(e))
        }
        RestError::Timeout => {
            tracing::warn!("twilio did not answer in time");
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "twilio_timeout",
                "Twilio did not answer in time",
            )
        }
        other => {
            tracing::error!(error = %other, "twilio request failed");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "twilio_unreachable",
                "could not reach Twilio",
            )
        }
    }
}

/// `GET /v1/calls/{sid}`: the call record (503 while persistence is off).
pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(sid): Path<String>,
) -> Response {
    let principal = match authorize(&state, &headers).await {
        Ok(p) => p,
        Err(err) => return err.into_response(),
    };
    if sid.is_empty() || sid.len() > 64 {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such call").into_response();
    }
    let Ok(found) = tokio::time::timeout(DB_TIMEOUT, state.records.get_call(&sid)).await else {
        return store_failed("call record lookup", &"timed out").into_response();
    };
    match found {
        // Another user's call is "no such call" to a user token: not even its existence leaks.
        Ok(Some(call)) if !principal.may_see(call.get("user").and_then(|u| u.as_str())) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such call").into_response()
        }
        Ok(Some(call)) => Json(call).into_response(),
        Ok(None) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such call").into_response()
        }
        Err(RecordError::Disabled) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "persistence_disabled",
            "call records are not kept on this pod (DATABASE_URL is unset)",
        )
        .into_response(),
        Err(err) => store_failed("call record lookup", &err).into_response(),
    }
}

fn store_of(state: &AppState) -> Result<&PgStore, ApiError> {
    state.store.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "persistence_disabled",
            "scheduled calls and call lists need PostgreSQL (DATABASE_URL is unset on this pod)",
        )
    })
}

fn store_failed(what: &str, err: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %err, "{what} failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the call store is unavailable; retry",
    )
}

/// Runs one database step under [`DB_TIMEOUT`]; a failure or a timeout is a 503,
/// logged with `what`.
async fn db<T, E: std::fmt::Display>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(DB_TIMEOUT, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(store_failed(what, &err)),
        Err(_) => Err(store_failed(what, &"timed out")),
    }
}

/// Stores a callback for the scheduler; durable when the 201 is sent.
async fn schedule(
    state: &AppState,
    id: uuid::Uuid,
    plan: OutboundPlan,
    timing: &Timing,
) -> Result<Response, ApiError> {
    let store = store_of(state)?;
    let due = timing.due.unwrap_or_else(Utc::now);
    let row = ScheduledCall {
        id,
        persona: plan.persona.clone(),
        user_id: plan.user.clone(),
        from: plan.from.clone(),
        to: plan.to.clone(),
        pretext: plan.pretext.clone(),
        due,
        max_lateness_seconds: timing.max_lateness_seconds,
        retries: i32::try_from(timing.retries).unwrap_or(0),
        retry_delay_seconds: timing.retry_delay_seconds,
    };
    db(
        "scheduling a callback",
        schedule_sql::insert(store.pool(), &row),
    )
    .await?;
    count(state, "scheduled");
    tracing::info!(
        call_id = %id,
        persona = %plan.persona,
        to = %mask_number(&plan.to),
        due = %due.to_rfc3339(),
        retries = timing.retries,
        "callback scheduled"
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": plan.call_id,
            "call_sid": null,
            "status": CallStatus::Scheduled.as_str(),
            "scheduled_for": due.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        })),
    )
        .into_response())
}

/// Query string of `GET /v1/calls`.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    /// Only this user's calls.
    pub user: Option<String>,
    /// Only this persona's calls.
    pub persona: Option<String>,
    /// Only calls in this status (`scheduled`, `completed`, ...).
    pub status: Option<String>,
    /// Page size, 1..=500 (default 50).
    pub limit: Option<i64>,
}

/// `GET /v1/calls?status=&user=&persona=&limit=`: newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let principal = authorize(&state, &headers).await?;
        let store = store_of(&state)?;
        let Query(mut p) = params.map_err(|e| {
            ApiError::invalid(vec![Problem {
                field: "query",
                problem: e.body_text(),
            }])
        })?;
        let mut problems = Vec::new();
        let status = match p.status.as_deref().map(str::parse::<CallStatus>) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                problems.push(Problem {
                    field: "status",
                    problem: e.to_string(),
                });
                None
            }
        };
        if let Some(limit) = p.limit
            && !(1..=MAX_LIST_LIMIT).contains(&limit)
        {
            problems.push(Problem {
                field: "limit",
                problem: format!("must be between 1 and {MAX_LIST_LIMIT}"),
            });
        }
        if !problems.is_empty() {
            return Err(ApiError::invalid(problems));
        }
        if let Some(own) = principal.confined_to() {
            if p.user.as_deref().is_some_and(|u| u != own) {
                return Err(out_of_scope(
                    &state,
                    "a user token lists only its own user's calls",
                ));
            }
            p.user = Some(own.to_string());
        }
        let filter = CallFilter {
            user: p.user,
            persona: p.persona,
            status,
            limit: p.limit,
        };
        let calls = db("listing calls", store.list_calls(&filter)).await?;
        Ok(Json(json!({ "calls": calls })).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /v1/calls/{id}`: cancels a scheduled callback that has not been placed
/// (200); 409 once it is being placed or was placed; 404 when unknown.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(sid): Path<String>,
) -> Response {
    let result = async {
        let principal = authorize(&state, &headers).await?;
        let store = store_of(&state)?;
        let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such call");
        let id = match call_key(&sid) {
            CallRef::Id(id) => id,
            // A CallSid: the call was placed, so it cannot be canceled; say so if it is ours.
            CallRef::Sid(s) => {
                if s.is_empty() || s.len() > 64 {
                    return Err(not_found());
                }
                db(
                    "cancelling a call",
                    schedule_sql::id_of_call_sid(store.pool(), &s),
                )
                .await?
                .ok_or_else(not_found)?
            }
        };
        if principal.confined_to().is_some() {
            let owner = db(
                "cancelling a call",
                schedule_sql::owner_of(store.pool(), id),
            )
            .await?;
            match owner {
                Some(owner) if principal.may_see(owner.as_deref()) => {}
                _ => return Err(not_found()),
            }
        }
        let outcome = db("cancelling a call", schedule_sql::cancel(store.pool(), id)).await?;
        match outcome {
            CancelOutcome::Canceled | CancelOutcome::AlreadyCanceled => {
                if outcome == CancelOutcome::Canceled {
                    count(&state, "canceled");
                    tracing::info!(call_id = %id, "scheduled callback canceled");
                }
                Ok(
                    Json(json!({ "id": id, "status": CallStatus::Canceled.as_str() }))
                        .into_response(),
                )
            }
            CancelOutcome::NotFound => Err(not_found()),
            CancelOutcome::AlreadyPlaced(status) => {
                let message = if status == CallStatus::Placing.as_str() {
                    "the call is being placed right now and can no longer be canceled".to_string()
                } else {
                    format!(
                        "the call was already placed (status `{status}`); only calls still \
                         `scheduled` can be canceled"
                    )
                };
                Err(
                    ApiError::new(StatusCode::CONFLICT, "already_placed", message)
                        .with("status", json!(status)),
                )
            }
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: serde_json::Value) -> CallRequest {
        let mut body = json!({"to": "+14155550100"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        serde_json::from_value(body).unwrap()
    }

    fn fields(problems: &[Problem]) -> Vec<&'static str> {
        problems.iter().map(|p| p.field).collect()
    }

    // `in` and `at` both give a due time; neither means "now"; both at once is refused.
    #[test]
    fn at_and_in_give_the_due_time() {
        let now = DateTime::parse_from_rfc3339("2030-04-15T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut problems = Vec::new();
        let t = timing(&request(json!({"in": "10m"})), now, &mut problems);
        assert_eq!(t.due, Some(now + chrono::Duration::minutes(10)));
        let t = timing(
            &request(json!({"at": "2030-05-01T18:30:00+02:00"})),
            now,
            &mut problems,
        );
        assert_eq!(
            t.due.map(|d| d.to_rfc3339()),
            Some("2030-05-01T16:30:00+00:00".to_string())
        );
        let t = timing(&request(json!({})), now, &mut problems);
        assert_eq!(t.due, None);
        assert!(problems.is_empty(), "{problems:?}");

        let t = timing(
            &request(json!({"in": "90s", "at": "2030-05-01T18:30:00Z"})),
            now,
            &mut problems,
        );
        assert_eq!(t.due, None);
        assert_eq!(fields(&problems), ["at"]);
    }

    // Bad times, durations, and retry counts each name their field.
    #[test]
    fn bad_timing_fields_are_named() {
        let now = Utc::now();
        let mut problems = Vec::new();
        timing(&request(json!({"at": "tomorrow"})), now, &mut problems);
        timing(&request(json!({"in": "soonish"})), now, &mut problems);
        timing(&request(json!({"in": "200d"})), now, &mut problems);
        timing(
            &request(json!({"maxLateness": "0s", "retries": 9, "retryDelay": "x"})),
            now,
            &mut problems,
        );
        assert_eq!(
            fields(&problems),
            ["at", "in", "in", "maxLateness", "retries", "retryDelay"]
        );
        let t = timing(
            &request(json!({"in": "5m", "maxLateness": "30m", "retries": 2, "retryDelay": "2m"})),
            now,
            &mut Vec::new(),
        );
        assert_eq!(
            (t.max_lateness_seconds, t.retries, t.retry_delay_seconds),
            (Some(1800), 2, Some(120))
        );
    }

    // Times and durations at the edges of the calendar are refused, never added to a
    // clock: `now + 9000000000000 s` used to panic the handler.
    #[test]
    fn times_beyond_their_range_are_refused_without_overflow() {
        let now = Utc::now();
        for (body, field) in [
            (json!({"in": "9000000000000"}), "in"),
            (json!({"in": "18446744073709551615"}), "in"),
            (json!({"in": "91d"}), "in"),
            (json!({"at": "9999-12-31T23:59:59Z"}), "at"),
            (json!({"at": "0001-01-01T00:00:00Z"}), "at"),
            (json!({"at": "+262143-12-31T23:59:59Z"}), "at"),
            (json!({"maxLateness": "9000000000000"}), "maxLateness"),
            (json!({"retryDelay": "9000000000000"}), "retryDelay"),
        ] {
            let mut problems = Vec::new();
            let t = timing(&request(body.clone()), now, &mut problems);
            assert_eq!(fields(&problems), [field], "{body}");
            assert_eq!(t.due, None, "{body}");
        }
        let mut problems = Vec::new();
        let t = timing(&request(json!({"in": "90d"})), now, &mut problems);
        assert!(problems.is_empty() && t.due.is_some() && !t.out_of_range);
        // The extremes of the clock itself.
        for now in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
            let mut problems = Vec::new();
            timing(
                &request(json!({"in": "90d", "at": null})),
                now,
                &mut problems,
            );
            timing(
                &request(json!({"at": "2030-01-01T00:00:00Z"})),
                now,
                &mut problems,
            );
            assert!(!problems.is_empty());
        }
    }

    proptest::proptest! {
        // Any strings in every timing field, at any instant: a Timing or problems, no panic.
        #[test]
        fn any_timing_input_never_panics(
            at in proptest::option::of(".{0,40}"),
            in_ in proptest::option::of("[0-9]{0,25}[a-z]{0,3}|.{0,30}"),
            lateness in proptest::option::of(".{0,30}"),
            delay in proptest::option::of("[0-9]{0,25}[smhdy]?"),
            retries in proptest::option::of(proptest::prelude::any::<u32>()),
            secs in proptest::prelude::any::<i64>(),
        ) {
            let now = DateTime::<Utc>::from_timestamp(secs % 8_000_000_000_000, 0).unwrap_or_default();
            let req = CallRequest {
                to: "+14155550100".into(),
                persona: None,
                pretext: None,
                user: None,
                from: None,
                at,
                in_,
                max_lateness: lateness,
                retries,
                retry_delay: delay,
            };
            let mut problems = Vec::new();
            let t = timing(&req, now, &mut problems);
            if let Some(due) = t.due {
                let ahead = chrono::Duration::days(90);
                proptest::prop_assert!(due <= now + ahead && due >= now - ahead);
            }
        }
    }

    // Unknown fields are refused rather than ignored (a typo in `at` must not call now).
    #[test]
    fn unknown_request_fields_are_refused() {
        let err =
            serde_json::from_value::<CallRequest>(json!({"to": "+14155550100", "when": "5m"}));
        assert!(err.is_err());
    }
}
