//! Call history over HTTP: `GET /v1/calls/{sid}` (record, transcript, cost
//! breakdown) and `GET /v1/calls?user=&persona=&status=&limit=` (newest first).
//!
//! Bearer-token auth (constant-time compare) comes first, then persistence: with
//! `DATABASE_URL` unset the history answers 503. Mount [`routes`] on the app, or the
//! handlers themselves next to `POST /v1/calls` (they take [`CallHistoryApi`] as
//! state through `FromRef`).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::call_records::call_key;
use super::postgres::PgStore;
use super::queries::{CallFilter, CallSummary, MAX_LIST_LIMIT};
use super::records::CallStatus;

/// State of the call-history handlers.
#[derive(Clone)]
pub struct CallHistoryApi {
    store: Option<PgStore>,
    token: Option<Arc<str>>,
}

impl CallHistoryApi {
    /// `store`: `None` when persistence is off (503). `api_token`: `None` disables
    /// the API (404), as for every `/v1/*` route.
    pub fn new(store: Option<PgStore>, api_token: Option<String>) -> Self {
        Self {
            store,
            token: api_token.filter(|t| !t.is_empty()).map(Arc::from),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = self.token.as_deref() else {
            return Err(ApiError::ApiDisabled);
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    fn store(&self) -> Result<&PgStore, ApiError> {
        self.store.as_ref().ok_or(ApiError::PersistenceDisabled)
    }
}

/// The two routes, ready to merge into the app.
pub fn routes<S>(api: CallHistoryApi) -> Router<S> {
    Router::new()
        .route("/v1/calls", get(list_calls))
        .route("/v1/calls/{sid}", get(get_call))
        .with_state(api)
}

/// `GET /v1/calls/{sid}`: `sid` is Twilio's CallSid or our call id.
pub async fn get_call(
    State(api): State<CallHistoryApi>,
    headers: HeaderMap,
    Path(sid): Path<String>,
) -> Response {
    let result = async {
        api.authorize(&headers)?;
        let store = api.store()?;
        if sid.is_empty() || sid.len() > 64 {
            return Err(ApiError::NotFound);
        }
        match store.call_detail(&call_key(&sid)).await {
            Ok(Some(detail)) => Ok(Json(detail).into_response()),
            Ok(None) => Err(ApiError::NotFound),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
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

/// `GET /v1/calls` answer.
#[derive(Debug, Serialize)]
pub struct CallList {
    /// Newest first.
    pub calls: Vec<CallSummary>,
}

/// `GET /v1/calls?user=&persona=&status=&limit=`.
pub async fn list_calls(
    State(api): State<CallHistoryApi>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        api.authorize(&headers)?;
        let store = api.store()?;
        let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let status = p
            .status
            .as_deref()
            .map(str::parse::<CallStatus>)
            .transpose()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if let Some(limit) = p.limit
            && !(1..=MAX_LIST_LIMIT).contains(&limit)
        {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIST_LIMIT}"
            )));
        }
        let filter = CallFilter {
            user: p.user,
            persona: p.persona,
            status,
            limit: p.limit,
        };
        match store.list_calls(&filter).await {
            Ok(calls) => Ok(Json(CallList { calls }).into_response()),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Errors of the call-history API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// `CALLMEBACK_API_TOKEN` is unset.
    #[error("the API is disabled (CALLMEBACK_API_TOKEN is unset)")]
    ApiDisabled,
    /// `DATABASE_URL` is unset.
    #[error("call history is unavailable: persistence is disabled (DATABASE_URL is unset)")]
    PersistenceDisabled,
    /// No such call.
    #[error("no such call")]
    NotFound,
    /// Bad query.
    #[error("{0}")]
    BadRequest(String),
    /// The database failed (details logged, not returned).
    #[error("the call history is temporarily unavailable")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ApiDisabled | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::PersistenceDisabled | ApiError::Internal(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        };
        if let ApiError::Internal(details) = &self {
            tracing::warn!(error = %details, "call history query failed");
        }
        let mut resp = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
