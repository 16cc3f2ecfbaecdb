//! The pod's two HTTP servers' routes and handlers.
//!
//! - App (8080, [`app`]): Twilio's webhooks and media stream, the call-me-back API.
//! - Metrics (9090, [`probes::router`]): `/metrics`, `/healthz`, `/readyz`, `/load`.
//!
//! The pod's composition root ([`crate::pod`]) builds [`AppState`] and runs both
//! servers through the drain.
//!
//! ## Layout
//! - [`twilio`] - `/twilio/voice`, `/twilio/status`, `/twilio/stream`.
//! - [`calls`] - `/v1/calls`: place now, schedule, list, cancel.
//! - [`probes`] - the metrics port.
//! - [`error`] - JSON errors.
//! - [`server`] - the app port's connections: limits and timeouts against abuse.

pub mod calls;
pub mod error;
pub mod probes;
pub mod server;
pub mod twilio;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::capacity::CallSlots;
use crate::dial_guard::DialSettings;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::personas::Personas;
use crate::secret::Secret;
use crate::session::CallHandler;
use crate::store::{CallRecords, PgStore};
use crate::twilio::context::ContextSigner;
use crate::twilio::media_stream::StreamDeps;
use crate::twilio::rest::TwilioClient;
use crate::twilio::{Limits, PublicUrl};

/// Largest webhook or API body accepted (Twilio's forms are a few kB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The settings the handlers read (built from the pod's configuration).
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// Public base URL; Twilio endpoints answer 503 without it.
    pub public_url: Option<PublicUrl>,
    /// Admin bearer token of `/v1/*`; `None` disables the API (unless user tokens
    /// are in the store).
    pub api_token: Option<Secret>,
    /// Twilio auth token: webhook signatures.
    pub auth_token: Option<Secret>,
    /// Default caller ID for outbound calls.
    pub from_number: Option<String>,
    /// Which destinations `POST /v1/calls` may dial.
    pub dial: DialSettings,
    /// Twilio-side timings (context validity, ringing).
    pub limits: Limits,
    /// Deadline for a request body.
    pub body_timeout: Duration,
}

/// Everything the handlers share.
pub struct AppState {
    /// The settings the handlers read.
    pub settings: HttpSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Personas and routes.
    pub personas: Arc<Personas>,
    /// Talks to callers.
    pub handler: Arc<dyn CallHandler>,
    /// Call records.
    pub records: Arc<dyn CallRecords>,
    /// PostgreSQL, when `DATABASE_URL` is set (scheduling, listing, cancelling).
    pub store: Option<PgStore>,
    /// Twilio REST (needs account SID and auth token).
    pub twilio: Option<TwilioClient>,
    /// Call context signer (needs the auth token).
    pub signer: Option<ContextSigner>,
    /// Drain state.
    pub drain: Drain,
    /// What media streams need (needs the auth token).
    pub stream: Option<Arc<StreamDeps>>,
    /// The per-pod call cap.
    pub call_slots: CallSlots,
    /// Dial rate limits of `POST /v1/calls` (in PostgreSQL when configured).
    pub dial_rate: crate::dial_rate::DialRate,
}

/// The app router (port 8080). Every body is read under the configured deadline
/// before a handler runs (see [`server`]).
pub fn app(state: Arc<AppState>) -> Router {
    let body_deadline = server::BodyDeadline {
        timeout: state.settings.body_timeout,
        max_bytes: MAX_BODY_BYTES,
        metrics: Arc::clone(&state.metrics),
    };
    Router::new()
        .route("/twilio/voice", post(twilio::voice))
        .route("/twilio/status", post(twilio::status))
        .route("/twilio/stream", get(twilio::stream))
        .route("/v1/calls", post(calls::create).get(calls::list))
        .route("/v1/calls/{sid}", get(calls::get).delete(calls::cancel))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            body_deadline,
            server::read_body_in_time,
        ))
        .with_state(state)
}
