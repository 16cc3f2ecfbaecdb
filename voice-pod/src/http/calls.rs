//! "Call me back": `POST /v1/calls` and `GET /v1/calls/{sid}`.
//!
//! The new call gets its `<Connect><Stream>` TwiML **inline** (`Twiml` parameter):
//! when the callee answers, Twilio opens the stream at once instead of first
//! fetching TwiML from a webhook, which saves a round trip before the greeting.
//! Inline TwiML is capped at 4000 characters (Twilio error 32018); a context that
//! does not fit (a long pretext) falls back to `Url` = our answer webhook with the
//! call context signed and expiring in its query string.
//!
//! While the phone rings, [`CallHandler::prepare`](crate::session::CallHandler::prepare)
//! lets providers warm up so the persona speaks within a second of the answer.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::config::is_e164;
use crate::session::PreparedCall;
use crate::store::{CallCreated, RecordError};
use crate::twilio::context::{CallContextParams, Direction, Purpose, StatusContext, unix_now};
use crate::twilio::rest::{Instructions, NewCall, RestError};
use crate::twilio::{mask_number, twiml};

/// Longest pretext accepted, in characters.
pub const MAX_PRETEXT_CHARS: usize = 1000;
/// Longest user id accepted, in characters.
pub const MAX_USER_CHARS: usize = 128;

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
}

fn count(state: &AppState, result: &str) {
    state
        .metrics
        .outbound_calls
        .with_label_values(&[result])
        .inc();
}

/// Checks `Authorization: Bearer <token>` in constant time. The API is off (503)
/// without a configured token.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.api_token else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_disabled",
            "the call-me-back API is disabled on this pod (CALLMEBACK_API_TOKEN is unset)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Comparing digests keeps the comparison constant-time regardless of length.
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.expose().as_bytes());
    if bool::from(a.ct_eq(&b)) && !given.is_empty() {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
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
                _ => "twilio_error",
            };
            count(&state, result);
            err.into_response()
        }
    }
}

async fn create_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    authorize(state, headers)?;
    if state.drain.is_draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this pod is shutting down; retry (another pod will take the call)",
        ));
    }
    let req: CallRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(vec![Problem {
            field: "body",
            problem: format!("not a valid call request: {e}"),
        }])
    })?;
    let (Some(public), Some(signer), Some(client)) =
        (&state.config.public_url, &state.signer, &state.twilio)
    else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "twilio_not_configured",
            "outbound calls need CALLMEBACK_PUBLIC_URL, TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN",
        ));
    };

    let mut problems = Vec::new();
    if !is_e164(&req.to) {
        problems.push(Problem {
            field: "to",
            problem: "must be an E.164 number such as +14155550100".into(),
        });
    }
    let from = req
        .from
        .clone()
        .or_else(|| state.config.twilio.from_number.clone());
    match &from {
        Some(f) if !is_e164(f) => problems.push(Problem {
            field: "from",
            problem: "must be an E.164 number such as +14155550100".into(),
        }),
        None => problems.push(Problem {
            field: "from",
            problem: "required: no TWILIO_FROM_NUMBER is configured".into(),
        }),
        _ => {}
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
    let (Some(persona), Some(persona_name), Some(from), true) =
        (persona, persona_name, from, problems.is_empty())
    else {
        return Err(ApiError::invalid(problems));
    };

    let call_id = uuid::Uuid::new_v4().to_string();
    let limits = &state.config.limits;
    let now = unix_now();
    let ctx = CallContextParams {
        persona: persona_name.clone(),
        direction: Direction::Outbound,
        from: Some(from.clone()),
        to: Some(req.to.clone()),
        pretext: req.pretext.clone().filter(|p| !p.is_empty()),
        user: req.user.clone().filter(|u| !u.is_empty()),
        call_id: call_id.clone(),
        call_sid: None,
        expires_at: now + limits.ring_timeout.as_secs() + limits.outbound_context_grace.as_secs(),
    };
    let stream_params = signer.sign_call(Purpose::Stream, &ctx);
    let inline = twiml::connect_stream(&public.stream_url(), &stream_params).map_err(|e| {
        ApiError::invalid(vec![Problem {
            field: "pretext",
            problem: e.to_string(),
        }])
    })?;
    let instructions = if inline.chars().count() <= twiml::INLINE_TWIML_MAX_CHARS {
        Instructions::Twiml(inline)
    } else {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(signer.sign_call(Purpose::Answer, &ctx))
            .finish();
        Instructions::Url(public.join(&format!("/twilio/voice?{query}")))
    };
    let status_query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(signer.sign_status(&StatusContext {
            persona: persona_name.clone(),
            call_id: call_id.clone(),
        }))
        .finish();

    // Warm up while Twilio places the call and the phone rings.
    state.handler.prepare(&PreparedCall {
        call_id: call_id.clone(),
        persona_name: persona_name.clone(),
        persona,
        direction: Direction::Outbound,
        pretext: ctx.pretext.clone(),
        user: ctx.user.clone(),
    });
    let inline_twiml = matches!(instructions, Instructions::Twiml(_));
    let new_call = NewCall {
        to: req.to.clone(),
        from: from.clone(),
        instructions,
        status_callback: public.join(&format!("/twilio/status?{status_query}")),
        timeout: limits.ring_timeout,
    };
    let created = client
        .create_call(&new_call)
        .await
        .map_err(|err| twilio_error(&err))?;

    tracing::info!(
        call_sid = %created.sid,
        call_id = %call_id,
        persona = %persona_name,
        to = %mask_number(&req.to),
        inline_twiml,
        "outbound call created"
    );
    count(state, "created");
    let records = Arc::clone(&state.records);
    let record = CallCreated {
        call_id: call_id.clone(),
        call_sid: Some(created.sid.clone()),
        persona: persona_name,
        direction: Direction::Outbound,
        from: Some(from),
        to: Some(req.to),
        pretext: ctx.pretext,
        user: ctx.user,
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
            tracing::warn!(code = ?e.code, http_status = e.status, message = %e.message, "twilio refused the call");
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
    if let Err(err) = authorize(&state, &headers) {
        return err.into_response();
    }
    match state.records.get_call(&sid).await {
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
        Err(err) => {
            tracing::error!(error = %err, "call record lookup failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the call store is unavailable",
            )
            .into_response()
        }
    }
}
