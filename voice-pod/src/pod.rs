//! The pod's composition root: builds every part from the configuration (personas,
//! Twilio clients, the stream dependencies, the scheduler, the HTTP apps), serves
//! until shutdown, then drains (see [`crate::drain`]): the app keeps answering
//! webhooks and streams that still reach it while active calls finish, and the
//! metrics port stays up until the very end. `main.rs` parses flags and calls
//! [`serve_until`].

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::capacity::CallSlots;
use crate::config::Config;
use crate::drain::{Drain, DrainOutcome};
use crate::http::{AppState, HttpSettings, app, probes, server};
use crate::metrics::Metrics;
use crate::personas::{Personas, watch};
use crate::scheduler::{self, SchedulerDeps};
use crate::session::{CallHandler, RecordingHandler};
use crate::store::{CallRecords, NoPersistence, PgStore};
use crate::twilio::context::ContextSigner;
use crate::twilio::media_stream::StreamDeps;
use crate::twilio::rest::{RestError, TwilioClient};
use crate::twilio::stream_claims::StreamClaims;

/// Drain deadline when neither the flag nor any persona sets one (the CRD default).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// A pod to run: configuration plus the pluggable parts.
pub struct Pod {
    /// Validated configuration.
    pub config: Config,
    /// Metrics (tests keep a clone to read counters).
    pub metrics: Arc<Metrics>,
    /// Talks to callers ([`RecordingHandler`] by default).
    pub handler: Arc<dyn CallHandler>,
    /// Call records ([`NoPersistence`] by default).
    pub records: Arc<dyn CallRecords>,
    /// PostgreSQL; the scheduler runs when it is set.
    pub store: Option<PgStore>,
}

impl Pod {
    /// A pod with the default handler and no persistence.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            metrics: Arc::new(Metrics::new()),
            handler: Arc::new(RecordingHandler),
            records: Arc::new(NoPersistence),
            store: None,
        }
    }

    /// Uses PostgreSQL: call records, scheduled callbacks and the scheduler.
    pub fn with_store(mut self, store: PgStore) -> Self {
        self.records = Arc::new(store.clone());
        self.store = Some(store);
        self
    }

    /// Replaces the call handler (the conversation engine, or a test double).
    pub fn with_handler(mut self, handler: Arc<dyn CallHandler>) -> Self {
        self.handler = handler;
        self
    }

    /// Replaces the call records.
    pub fn with_records(mut self, records: Arc<dyn CallRecords>) -> Self {
        self.records = records;
        self
    }

    /// Uses these metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

/// Why the pod could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The Twilio client could not be built.
    #[error("cannot build the Twilio client: {0}")]
    Twilio(#[from] RestError),
    /// A server failed.
    #[error("{server} server failed: {source}")]
    Server {
        /// `app` or `metrics`.
        server: &'static str,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the pod until `shutdown` resolves, then drains and returns.
pub async fn serve(
    pod: Pod,
    app_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DrainOutcome, ServeError> {
    serve_until(pod, app_listener, metrics_listener, shutdown, async {}).await
}

/// [`serve`], running `finish` (the store's last writes, bounded by the caller)
/// after the calls and the app server are done but before the metrics server stops,
/// so the final counts can still be scraped. A failed server runs it too.
pub async fn serve_until(
    pod: Pod,
    app_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    finish: impl Future<Output = ()> + Send,
) -> Result<DrainOutcome, ServeError> {
    let Pod {
        config,
        metrics,
        handler,
        records,
        store,
    } = pod;
    let config = Arc::new(config);
    let personas = {
        let (dir, routes, m) = (
            config.persona_dir.clone(),
            config.routes_file.clone(),
            Arc::clone(&metrics),
        );
        match tokio::task::spawn_blocking(move || Personas::load(dir, routes, m)).await {
            Ok(p) => Arc::new(p),
            Err(err) => {
                tracing::error!(error = %err, "persona loading panicked; starting empty");
                Arc::new(Personas::load(
                    std::path::PathBuf::new(),
                    std::path::PathBuf::new(),
                    Arc::clone(&metrics),
                ))
            }
        }
    };
    let drain = Drain::new(Arc::clone(&metrics));
    let signer = config.twilio.auth_token.as_ref().map(ContextSigner::new);
    let twilio = match (&config.twilio.account_sid, &config.twilio.auth_token) {
        (Some(sid), Some(token)) => Some(TwilioClient::new(
            &config.twilio.api_url,
            sid,
            token.clone(),
            config.limits.rest_timeout,
        )?),
        _ => None,
    };
    let missing = config.missing_for_twilio();
    if !missing.is_empty() {
        tracing::warn!(missing = ?missing, "Twilio endpoints answer 503 until these are set");
    }
    let call_slots = CallSlots::new(config.max_calls);
    let stream = signer.clone().map(|signer| {
        Arc::new(StreamDeps {
            call_slots: call_slots.clone(),
            claims: StreamClaims::new(
                store.as_ref().map(|s| s.pool().clone()),
                Arc::clone(&metrics),
            ),
            metrics: Arc::clone(&metrics),
            personas: Arc::clone(&personas),
            signer,
            handler: Arc::clone(&handler),
            twilio: twilio.clone(),
            drain: drain.clone(),
            limits: config.limits.clone(),
        })
    });
    let stop_scheduler = CancellationToken::new();
    let scheduler_task = match (
        &store,
        &signer,
        &config.public_url,
        &config.twilio.account_sid,
        &config.twilio.auth_token,
    ) {
        (Some(store), Some(signer), Some(public), Some(sid), Some(token)) => {
            // Its own client: the request timeout must fit well inside the claim's lease.
            let client = TwilioClient::new(
                &config.twilio.api_url,
                sid,
                token.clone(),
                config.scheduler.rest_timeout(&config.limits),
            )?;
            let deps = SchedulerDeps {
                pool: store.pool().clone(),
                twilio: client,
                signer: signer.clone(),
                public: public.clone(),
                limits: config.limits.clone(),
                personas: Arc::clone(&personas),
                handler: Arc::clone(&handler),
                metrics: Arc::clone(&metrics),
                config: config.scheduler.clone(),
                pod: scheduler::pod_identity(crate::config::pod_name().as_deref()),
            };
            Some(tokio::spawn(scheduler::run(deps, stop_scheduler.clone())))
        }
        (Some(_), ..) => {
            tracing::warn!(
                "scheduled callbacks are not placed by this pod: Twilio is not configured"
            );
            None
        }
        (None, ..) => None,
    };
    let dial_rate = crate::dial_rate::DialRate::new(
        config.dial_limits,
        store.as_ref().map(|s| s.pool().clone()),
    );
    let settings = HttpSettings {
        public_url: config.public_url.clone(),
        api_token: config.api_token.clone(),
        auth_token: config.twilio.auth_token.clone(),
        from_number: config.twilio.from_number.clone(),
        dial: config.dial.clone(),
        limits: config.limits.clone(),
        body_timeout: config.server.body_timeout,
    };
    let state = Arc::new(AppState {
        settings,
        metrics: Arc::clone(&metrics),
        personas: Arc::clone(&personas),
        handler,
        records: Arc::clone(&records),
        store,
        twilio,
        signer,
        drain: drain.clone(),
        dial_rate,
        stream,
        call_slots: call_slots.clone(),
    });

    let stop_watch = CancellationToken::new();
    let watcher = tokio::spawn(watch::run(
        Arc::clone(&personas),
        config.limits.persona_rescan_interval,
        stop_watch.clone(),
    ));

    let stop_metrics = CancellationToken::new();
    let probe_router = probes::router(probes::ProbeState {
        metrics: Arc::clone(&metrics),
        drain: drain.clone(),
        personas: Arc::clone(&personas),
        records,
        call_slots,
    });
    let metrics_addr = metrics_listener.local_addr().ok();
    let mut metrics_server = tokio::spawn(
        axum::serve(metrics_listener, probe_router)
            .with_graceful_shutdown(stop_metrics.clone().cancelled_owned())
            .into_future(),
    );
    let stop_app = CancellationToken::new();
    let app_addr = app_listener.local_addr().ok();
    let mut app_server = tokio::spawn(server::run(
        app_listener,
        app(state),
        config.server.clone(),
        Arc::clone(&metrics),
        stop_app.clone(),
    ));
    tracing::info!(app = ?app_addr, metrics = ?metrics_addr, personas = personas.snapshot().len(), "voice pod serving");

    let failure = tokio::select! {
        () = shutdown => None,
        res = &mut app_server => Some(("app", res)),
        res = &mut metrics_server => Some(("metrics", res)),
    };
    // Not ready first (within the signal's own handling): Kubernetes stops routing
    // to this pod while everything else winds down.
    drain.begin();
    // A draining pod claims nothing new; other pods take the due callbacks. Its stop
    // (placements in flight) runs beside the drain, bounded by the cancel grace.
    stop_scheduler.cancel();
    let budget = crate::drain::SHUTDOWN_BUDGET;
    if let Some((server, res)) = failure {
        stop_watch.cancel();
        stop_app.cancel();
        stop_metrics.cancel();
        if let Some(task) = scheduler_task {
            stop_bounded("scheduler", budget.cancel_grace, task).await;
        }
        finish.await;
        let source = match res {
            Ok(Ok(())) => std::io::Error::other("stopped unexpectedly"),
            Ok(Err(e)) => e,
            Err(join) => std::io::Error::other(join.to_string()),
        };
        return Err(ServeError::Server { server, source });
    }

    let deadline = config
        .drain_timeout
        .or_else(|| personas.snapshot().longest_max_call_duration())
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    tracing::info!(
        deadline_seconds = deadline.as_secs(),
        active_streams = drain.active_streams(),
        "shutdown requested; draining"
    );
    let scheduler_stopped = async {
        if let Some(task) = scheduler_task {
            stop_bounded("scheduler", budget.cancel_grace, task).await;
        }
    };
    let (outcome, ()) = tokio::join!(drain.wait_for_calls(deadline), scheduler_stopped);
    tracing::info!(?outcome, "drain finished");

    // The app server and the watcher stop together, within one phase deadline.
    stop_app.cancel();
    stop_watch.cancel();
    tokio::join!(
        stop_bounded("app server", budget.servers, app_server),
        stop_bounded("persona watcher", budget.servers, watcher),
    );
    finish.await;
    stop_metrics.cancel();
    stop_bounded("metrics server", budget.metrics, metrics_server).await;
    Ok(outcome)
}

/// Waits at most `limit` for `task` to end, then aborts it.
async fn stop_bounded<T>(what: &str, limit: Duration, task: tokio::task::JoinHandle<T>) {
    let abort = task.abort_handle();
    if tokio::time::timeout(limit, task).await.is_err() {
        abort.abort();
        tracing::warn!(
            what,
            limit_ms = limit.as_millis() as u64,
            "did not stop in time; aborted"
        );
    }
}
