//! The metrics port (9090): `/metrics`, `/healthz`, `/readyz`.
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
}

/// The metrics and probes router.
pub fn router(state: ProbeState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
