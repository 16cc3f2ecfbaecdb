//! The operator's HTTP surface on 8080: `/healthz` (process alive), `/readyz`
//! (initialised; standby replicas are ready too, they just do not lead) and
//! `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared state of the HTTP surface.
#[derive(Clone)]
pub struct WebState {
    /// Metrics to expose.
    pub metrics: Metrics,
    /// Set once the operator has initialised.
    pub ready: Arc<AtomicBool>,
}

/// The router.
pub fn app(state: WebState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<WebState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(state): State<WebState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
