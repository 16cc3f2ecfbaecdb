//! The app server's connection handling: hyper's HTTP/1 with the limits that
//! `axum::serve` does not set.
//!
//! The app port faces the internet, so a client is never allowed to hold the pod's
//! memory hostage:
//! - **Connections** beyond [`ServerLimits::max_connections`] are closed as soon as
//!   they are accepted (`voice_refusals_total{reason="connection_limit"}`); media
//!   streams of live calls already hold theirs.
//! - **Headers** must arrive within [`ServerLimits::header_timeout`], on a new
//!   connection and between keep-alive requests alike (hyper's header-read timer,
//!   which only runs with a timer installed); otherwise the connection is closed
//!   (`reason="header_timeout"`).
//! - **Bodies** must arrive within [`ServerLimits::body_timeout`]: [`read_body_in_time`]
//!   buffers each body (bounded by the body-size limit) under that deadline before a
//!   handler runs, and answers 408 with `Connection: close` otherwise
//!   (`reason="body_timeout"`).
//! - hyper's read buffer is capped at [`MAX_READ_BUFFER`], so a connection costs a
//!   bounded amount of memory while it lasts.
//!
//! Shutdown is graceful: accepting stops, idle connections close, requests in flight
//! finish; upgraded WebSockets (calls) are the drain's business, not the server's.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::metrics::{Metrics, Refusal};

/// hyper's per-connection read buffer cap (its minimum is 8 KiB): request heads
/// beyond it are refused (431), and a slow client costs at most this much buffer.
pub const MAX_READ_BUFFER: usize = 64 * 1024;

/// Limits of the app server (`CALLMEBACK_MAX_CONNECTIONS`, `CALLMEBACK_HEADER_TIMEOUT`,
/// `CALLMEBACK_BODY_TIMEOUT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open connections at most (media streams included).
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also the keep-alive idle time).
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers arrived.
    pub body_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// What [`read_body_in_time`] needs.
#[derive(Clone)]
pub struct BodyDeadline {
    /// The deadline.
    pub timeout: Duration,
    /// Largest body.
    pub max_bytes: usize,
    /// Counts refusals.
    pub metrics: Arc<Metrics>,
}

/// Middleware: reads the whole request body under the deadline before the handler
/// runs. Slow bodies get 408 and the connection closed; oversized ones 413.
pub async fn read_body_in_time(
    State(deadline): State<BodyDeadline>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(
        deadline.timeout,
        axum::body::to_bytes(body, deadline.max_bytes),
    )
    .await
    {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(err)) => {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    [(header::CONNECTION, "close")],
                    "request body too large\n",
                )
                    .into_response()
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    [(header::CONNECTION, "close")],
                    "request body could not be read\n",
                )
                    .into_response()
            }
        }
        Err(_) => {
            deadline.metrics.refused(Refusal::BodyTimeout);
            tracing::info!(
                timeout_ms = deadline.timeout.as_millis() as u64,
                "request body not received in time; closing the connection"
            );
            (
                StatusCode::REQUEST_TIMEOUT,
                [(header::CONNECTION, "close")],
                "request body not received in time\n",
            )
                .into_response()
        }
    }
}

/// Serves `router` on `listener` until `stop` fires, then stops accepting, lets
/// requests in flight finish and returns once every connection has closed (the
/// caller bounds that wait).
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            () = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::error!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics.refused(Refusal::ConnectionLimit);
            // Closed at once: the client learns now and the pod spends nothing on it.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|req: axum::http::Request<Incoming>| req.map(Body::new)),
        );
        let metrics = Arc::clone(&metrics);
        let stop = stop.clone();
        let header_timeout = limits.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_READ_BUFFER);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                res = conn.as_mut() => res,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                if err.is_timeout() {
                    metrics.refused(Refusal::HeaderTimeout);
                }
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection that say nothing about the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
