//! The metrics port (9090): `/metrics`, `/healthz`, `/readyz`, `/load`.
//!
//! `/load` is what the operator's autoscaler reads from every pod on an interval
//! (no metrics adapter in between): `{"activeCalls", "capacity", "accepting",
//! "draining"}`. `activeCalls` is the `voice_active_calls` gauge, so the scaler and
//! the dashboards count the same thing.
//!
//! `/readyz` is 503 while draining (Kubernetes stops routing new calls to the pod)
//! or while no persona is loaded (the pod could only refuse calls). Its body also
//! says how persistence is (`persistence: up|unavailable|disabled`); a database that
//! is down does not make the pod unready: calls go on and their records are buffered.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use serde::Serialize;

use crate::capacity::CallSlots;
use crate::drain::Drain;
use crate::metrics::Metrics;
use crate::personas::Personas;
use crate::store::CallRecords;

/// What the probes look at.
#[derive(Clone)]
pub struct ProbeState {
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Draining flag.
    pub drain: Drain,
    /// Loaded personas.
    pub personas: Arc<Personas>,
    /// Call records (persistence health).
    pub records: Arc<dyn CallRecords>,
    /// The pod's call slots (its capacity).
    pub call_slots: CallSlots,
}

/// The body of `GET /load`: one pod's load, as the operator's autoscaler reads it.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Load {
    /// Calls in progress (`voice_active_calls`).
    pub active_calls: u64,
    /// Calls this pod takes at once (`CALLMEBACK_MAX_CALLS`).
    pub capacity: u64,
    /// Whether a new call would be taken now: not draining, a persona loaded, a
    /// free call slot.
    pub accepting: bool,
    /// Draining after SIGTERM: its calls are ending, it takes no new ones.
    pub draining: bool,
}

/// The metrics and probes router.
pub fn router(state: ProbeState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/load", get(load))
        .with_state(state)
}

async fn metrics(State(s): State<ProbeState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<ProbeState>) -> impl IntoResponse {
    let (status, word) = if s.drain.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if s.personas.snapshot().is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no persona loaded")
    } else {
        (StatusCode::OK, "ready")
    };
    let persistence = s.records.health().as_str();
    (status, format!("{word}\npersistence: {persistence}\n"))
}

/// The pod's load now.
pub fn current_load(s: &ProbeState) -> Load {
    let draining = s.drain.is_draining();
    let capacity = u64::try_from(s.call_slots.max()).unwrap_or(u64::MAX);
    Load {
        // A gauge decremented on every end never goes below zero; clamp anyway.
        active_calls: u64::try_from(s.metrics.active_calls.get()).unwrap_or(0),
        capacity,
        accepting: !draining && !s.personas.snapshot().is_empty() && !s.call_slots.is_full(),
        draining,
    }
}

async fn load(State(s): State<ProbeState>) -> impl IntoResponse {
    axum::Json(current_load(&s))
}
