//! JSON errors of the pod's HTTP API: `{"error": "<code>", "message": "...", ...}`.
//!
//! Client errors (4xx) are not logged here (the caller sees them); server-side
//! failures are logged once where they happen, and the client gets no internals.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One field that failed validation.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The JSON field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Extra top-level fields (`problems`, `twilio`).
    pub extra: Option<(&'static str, Value)>,
    /// `Retry-After` in seconds (429s of the dial rate limits).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error without extra fields.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
            retry_after: None,
        }
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Adds an extra top-level field.
    pub fn with(mut self, key: &'static str, value: Value) -> Self {
        self.extra = Some((key, value));
        self
    }

    /// 400 listing every invalid field.
    pub fn invalid(problems: Vec<Problem>) -> Self {
        let message = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.problem))
            .collect::<Vec<_>>()
            .join("; ");
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
            .with("problems", json!(problems))
    }

    /// 401 for a missing or wrong bearer token.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token (Authorization: Bearer <CALLMEBACK_API_TOKEN>)",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Some((k, v)), Some(obj)) = (self.extra, body.as_object_mut()) {
            obj.insert(k.to_string(), v);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
