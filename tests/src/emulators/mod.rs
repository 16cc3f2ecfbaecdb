//! Protocol-faithful emulators of the pod's peers: real servers on 127.0.0.1:0 that check
//! what the real services check, answer like them, and record what they received.
//!
//! - [`deepgram`]: Deepgram live STT (`/v1/listen`), transcribing real audio by energy
//!   against a script.
//! - [`cerebras`]: Cerebras chat completions (SSE) and `/v1/models`.
//! - [`elevenlabs`]: ElevenLabs multi-context TTS (`multi-stream-input`), mu-law audio.
//! - [`twilio_numbers`]: Twilio IncomingPhoneNumbers REST (the operator's number wiring).
//! - [`twilio_rest`]: Twilio Calls REST (the pod's outbound calls and hangups).

pub mod cerebras;
pub mod deepgram;
pub mod elevenlabs;
pub mod twilio_numbers;
pub mod twilio_rest;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

/// Twilio's REST error body.
pub fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    let body = serde_json::json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, Json(body)).into_response()
}

/// What Twilio's REST API checks first: HTTP Basic auth with the account SID and
/// auth token (401, code 20003), then that the path's account is that account (404).
/// `Err` is the ready response the handler returns at once.
#[allow(clippy::result_large_err)]
pub fn twilio_basic_auth(
    account_sid: &str,
    auth_token: &str,
    headers: &HeaderMap,
    path_account: &str,
) -> Result<(), Response> {
    let expected =
        base64::engine::general_purpose::STANDARD.encode(format!("{account_sid}:{auth_token}"));
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "));
    if given != Some(expected.as_str()) {
        return Err(twilio_error(
            StatusCode::UNAUTHORIZED,
            20003,
            "Authenticate",
        ));
    }
    if path_account != account_sid {
        return Err(twilio_error(
            StatusCode::NOT_FOUND,
            20404,
            "The requested resource was not found",
        ));
    }
    Ok(())
}
