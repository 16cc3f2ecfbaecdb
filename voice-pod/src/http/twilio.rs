//! Twilio's endpoints: the answer webhook, status callbacks and the media stream
//! upgrade.
//!
//! Every webhook is checked against `X-Twilio-Signature` before anything else. The
//! signed URL is rebuilt from `CALLMEBACK_PUBLIC_URL` plus the request's path and
//! query, never from the `Host` header: behind an ingress the pod sees its own host,
//! while Twilio signed the public one.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::Refusal;
use crate::phone::mask_number;
use crate::session::{CallSpec, Direction, PreparedCall};
use crate::store::{CallCreated, CallStatusChange};
use crate::twilio::context::{
    CallContextParams, Purpose, SEALED_PARAM, StatusContext, is_call_sid, unix_now,
};
use crate::twilio::media_stream::{self, MAX_TRANSPORT_MESSAGE_BYTES, UpgradeSignature};
use crate::twilio::signature::{self, Algorithm, SIGNATURE_HEADER, SIGNATURE_SETTINGS_HEADER};
use crate::twilio::twiml;

/// Terminal call statuses counted in `voice_calls_total{outcome}`.
const TERMINAL_STATUSES: &[&str] = &["completed", "busy", "failed", "no-answer", "canceled"];

fn xml(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

fn count(state: &AppState, endpoint: &str, result: &str) {
    state
        .metrics
        .webhook_requests
        .with_label_values(&[endpoint, result])
        .inc();
}

/// Form parameters, with repeats, in body order.
fn form_params(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn query_params(uri: &axum::http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Checks `X-Twilio-Signature`. `Err` is the response to send.
// The error is the ready HTTP response, returned at once by the handler; boxing it
// would only add an allocation on the rejection path.
#[allow(clippy::result_large_err)]
fn verify_webhook(
    state: &AppState,
    endpoint: &str,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    params: &[(String, String)],
) -> Result<(), Response> {
    let (Some(public), Some(token)) = (&state.settings.public_url, &state.settings.auth_token)
    else {
        count(state, endpoint, "not_configured");
        tracing::error!(
            "twilio webhook received, but CALLMEBACK_PUBLIC_URL or TWILIO_AUTH_TOKEN is unset"
        );
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "twilio is not configured on this pod\n",
        )
            .into_response());
    };
    let sig = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let settings = headers
        .get(SIGNATURE_SETTINGS_HEADER)
        .and_then(|v| v.to_str().ok());
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let url = public.join(path_and_query);
    let valid = match (sig, Algorithm::from_settings_header(settings)) {
        (Some(sig), Some(alg)) => {
            signature::validate(token.expose().as_bytes(), &url, params, sig, alg)
        }
        _ => false,
    };
    if valid {
        Ok(())
    } else {
        let result = if sig.is_none() {
            "unsigned"
        } else {
            "bad_signature"
        };
        count(state, endpoint, result);
        tracing::warn!(
            endpoint,
            result,
            "twilio webhook refused: signature missing or invalid"
        );
        Err((StatusCode::FORBIDDEN, "invalid twilio signature\n").into_response())
    }
}

/// A webhook's form, once its signature checks out, with its `CallSid` (empty when
/// absent). `Err` is the response to send.
#[allow(clippy::result_large_err)]
fn signed_form(
    state: &AppState,
    endpoint: &str,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    body: &[u8],
) -> Result<(Vec<(String, String)>, String), Response> {
    let params = form_params(body);
    verify_webhook(state, endpoint, headers, uri, &params)?;
    let call_sid = param(&params, "CallSid").unwrap_or("").to_string();
    Ok((params, call_sid))
}

/// `POST /twilio/voice`: the answer webhook.
pub async fn voice(
    State(state): State<Arc<AppState>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (params, call_sid) = match signed_form(&state, "voice", &headers, &uri, &body) {
        Ok(form) => form,
        Err(resp) => return resp,
    };
    let span = tracing::info_span!("twilio_voice", call_sid = %call_sid);
    let _enter = span.enter();

    if state.drain.is_draining() {
        // Served as usual: the TwiML's stream URL is the public one, so Twilio's
        // stream goes through the load balancer to a ready pod (this one left the
        // endpoints when its deletion began). A caller never hears a goodbye
        // because a pod is being replaced.
        tracing::info!("draining: answering the webhook; the stream goes to a ready pod");
    }
    if state.call_slots.is_full() {
        // Rejected, Twilio plays busy: the caller can try again; other pods may be free.
        count(&state, "voice", "at_capacity");
        state.metrics.refused(Refusal::CallLimit);
        tracing::warn!(
            max_calls = state.call_slots.max(),
            "every call slot is taken; rejecting the call"
        );
        return xml(twiml::reject());
    }
    // Both were checked by verify_webhook.
    let (Some(public), Some(signer)) = (&state.settings.public_url, &state.signer) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "twilio is not configured on this pod\n",
        )
            .into_response();
    };
    let now = unix_now();
    let query = query_params(&uri);
    let from = param(&params, "From").map(|s| twiml::xml_safe(s).into_owned());
    let to = param(&params, "To").map(|s| twiml::xml_safe(s).into_owned());

    if !is_call_sid(&call_sid) {
        count(&state, "voice", "bad_call_sid");
        state.metrics.refused(Refusal::BadCallSid);
        tracing::warn!("answer webhook without a valid CallSid; rejecting");
        return xml(twiml::reject());
    }
    let ctx = if let Some(sealed) = query.get(SEALED_PARAM) {
        // An outbound call whose TwiML did not fit inline: the context is in our URL,
        // sealed; the stream context it becomes is bound to this CallSid.
        match signer.open_answer(sealed, now) {
            Ok(mut c) => {
                c.call_sid = Some(call_sid.clone());
                c.expires_at = now + state.settings.limits.inbound_context_ttl.as_secs();
                c
            }
            Err(err) => {
                count(&state, "voice", "bad_context");
                tracing::warn!(error = %err, "answer URL context rejected");
                return xml(twiml::reject());
            }
        }
    } else {
        let inbound = param(&params, "Direction").is_none_or(|d| d == "inbound");
        let snapshot = state.personas.snapshot();
        let routed = to.as_deref().and_then(|t| snapshot.route(t));
        match (inbound, routed) {
            (true, Some((persona, _))) => CallContextParams {
                spec: CallSpec {
                    call_id: uuid::Uuid::new_v4().to_string(),
                    persona,
                    direction: Direction::Inbound,
                    from: from.clone(),
                    to: to.clone(),
                    pretext: None,
                    user: None,
                },
                call_sid: Some(call_sid.clone()),
                // Twilio's values are short words; anything longer is not one of them.
                caller_verstat: param(&params, "StirVerstat")
                    .filter(|v| v.len() <= 64)
                    .map(|v| twiml::xml_safe(v).into_owned()),
                expires_at: now + state.settings.limits.inbound_context_ttl.as_secs(),
            },
            (inbound, _) => {
                count(&state, "voice", "rejected");
                tracing::info!(
                    to = to.as_deref().map(mask_number),
                    inbound,
                    "no persona for this call; rejecting"
                );
                return xml(twiml::reject());
            }
        }
    };
    let Some(persona) = state.personas.snapshot().get(&ctx.spec.persona) else {
        count(&state, "voice", "rejected");
        tracing::warn!(persona = %ctx.spec.persona, "persona not loaded; rejecting");
        return xml(twiml::reject());
    };
    if ctx.spec.direction == Direction::Inbound
        && ctx.spec.from.is_some()
        && crate::engine::journal::caller_identity(
            &persona,
            ctx.spec.from.as_deref(),
            ctx.caller_verstat.as_deref(),
        )
        .is_none()
    {
        // Counted once per call: the call goes on, without the caller's memory.
        state.metrics.refused(Refusal::UnverifiedCaller);
        tracing::info!(
            verstat = ctx.caller_verstat.as_deref(),
            "caller not recognised (number not verified or withheld): no memory this call"
        );
    }
    let stream_params = signer.sign_call(Purpose::Stream, &ctx);
    let doc = match twiml::connect_stream(&public.stream_url(), &stream_params) {
        Ok(d) => d,
        Err(err) => {
            // Inputs were sanitized; reaching this is a bug, not bad input.
            tracing::error!(error = %err, "cannot write TwiML");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot write TwiML\n").into_response();
        }
    };
    state.handler.prepare(&PreparedCall {
        spec: ctx.spec.clone(),
        persona,
    });
    if ctx.spec.direction == Direction::Inbound {
        let records = Arc::clone(&state.records);
        let created = CallCreated {
            spec: ctx.spec.clone(),
            call_sid: Some(call_sid.clone()),
            status: param(&params, "CallStatus")
                .unwrap_or("ringing")
                .to_string(),
        };
        tokio::spawn(async move {
            if let Err(err) = records.call_created(created).await {
                tracing::warn!(error = %err, "call record not written");
            }
        });
    }
    count(&state, "voice", "stream");
    tracing::info!(
        persona = %ctx.spec.persona,
        direction = ctx.spec.direction.as_str(),
        from = from.as_deref().map(mask_number),
        to = to.as_deref().map(mask_number),
        "answering with a media stream"
    );
    xml(doc)
}

/// `POST /twilio/status`: call progress callbacks.
pub async fn status(
    State(state): State<Arc<AppState>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (params, call_sid) = match signed_form(&state, "status", &headers, &uri, &body) {
        Ok(form) => form,
        Err(resp) => return resp,
    };
    let status = param(&params, "CallStatus").unwrap_or("").to_string();
    let span = tracing::info_span!("twilio_status", call_sid = %call_sid);
    let _enter = span.enter();

    let query = query_params(&uri);
    let signed = match &state.signer {
        Some(signer) if query.contains_key("sig") => match signer.verify_status(&query) {
            Ok(c) => Some(c),
            Err(err) => {
                tracing::warn!(error = %err, "status callback context rejected; persona unknown");
                None
            }
        },
        _ => None,
    };
    // Only names we signed or loaded become label values (bounded cardinality).
    let persona = match &signed {
        Some(StatusContext { persona, .. }) => persona.clone(),
        None => {
            let inbound = param(&params, "Direction") == Some("inbound");
            param(&params, "To")
                .filter(|_| inbound)
                .and_then(|to| state.personas.snapshot().route(to))
                .map_or_else(|| "unknown".to_string(), |(name, _)| name)
        }
    };
    if TERMINAL_STATUSES.contains(&status.as_str()) {
        state
            .metrics
            .calls
            .with_label_values(&[persona.as_str(), status.as_str()])
            .inc();
    }
    count(&state, "status", "ok");
    tracing::info!(status = %status, persona = %persona, "call status");
    let change = CallStatusChange {
        call_sid,
        call_id: signed.map(|c| c.call_id),
        status,
        duration_seconds: param(&params, "CallDuration").and_then(|d| d.parse().ok()),
        answered_by: param(&params, "AnsweredBy").map(str::to_string),
    };
    let records = Arc::clone(&state.records);
    tokio::spawn(async move {
        if let Err(err) = records.call_status(change).await {
            tracing::warn!(error = %err, "call status not recorded");
        }
    });
    xml(twiml::empty())
}

/// `GET /twilio/stream`: the Media Streams WebSocket.
///
/// Twilio signs the upgrade request, but which URL form it signs (`wss://` or
/// `https://`, with or without port) is not documented precisely, so a valid
/// signature for any of them is accepted and logged, and a missing or invalid one
/// is counted (`voice_webhook_requests_total{endpoint="stream"}`) but not fatal.
/// The decisive check is the HMAC over the call context in `start`, which only
/// TwiML from this deployment can carry.
pub async fn stream(
    State(state): State<Arc<AppState>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(deps) = state.stream.clone() else {
        count(&state, "stream", "not_configured");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "twilio is not configured on this pod\n",
        )
            .into_response();
    };
    let upgrade = upgrade_signature(&state, &headers, &uri);
    let result = match upgrade {
        UpgradeSignature::Valid => "signed",
        UpgradeSignature::Invalid => "bad_upgrade_signature",
        UpgradeSignature::Absent => "unsigned_upgrade",
    };
    count(&state, "stream", result);
    let drain = state.drain.clone();
    ws.max_message_size(MAX_TRANSPORT_MESSAGE_BYTES)
        .max_frame_size(MAX_TRANSPORT_MESSAGE_BYTES)
        .on_upgrade(move |socket| drain.track(media_stream::serve(socket, deps, upgrade)))
}

fn upgrade_signature(
    state: &AppState,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> UpgradeSignature {
    let Some(sig) = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()) else {
        return UpgradeSignature::Absent;
    };
    let (Some(public), Some(token)) = (&state.settings.public_url, &state.settings.auth_token)
    else {
        return UpgradeSignature::Invalid;
    };
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let https = public.join(path_and_query);
    let wss = https
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| https.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| https.clone());
    let key = token.expose().as_bytes();
    let ok = [https, wss]
        .iter()
        .any(|u| signature::validate(key, u, &[], sig, Algorithm::HmacSha1));
    if ok {
        UpgradeSignature::Valid
    } else {
        UpgradeSignature::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Any bytes as a webhook form body, any query string: parameters or nothing,
        // never a panic (the signature check then refuses what is not Twilio's).
        #[test]
        fn arbitrary_webhook_forms_never_panic(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..500),
            query in "[ -~]{0,200}",
        ) {
            let params = form_params(&body);
            let _ = param(&params, "CallSid");
            if let Ok(uri) = format!("/twilio/voice?{query}").parse::<axum::http::Uri>() {
                let _ = query_params(&uri);
            }
        }
    }
}
