//! Scheduled callbacks: "call me back in ten minutes", placed exactly once by
//! whichever pod gets there first, durable across restarts, rollouts and scale-down.
//!
//! Every pod runs [`run`]: every [`SchedulerConfig::poll_interval`] (200 ms) it
//! claims due rows of `calls` in one statement (`FOR UPDATE SKIP LOCKED`, so pods
//! never wait on each other and never claim the same row) that also sets
//! `status = 'placing'`, `claimed_by` and `lease_until`, then asks Twilio to place
//! each call.
//!
//! ## Exactly once, and what Twilio guarantees
//! Twilio's Calls API has **no idempotency key**: two `POST .../Calls.json` make two
//! phone calls, and a request that timed out may or may not have created one. So
//! the scheduler never retries blindly:
//! - A claim is a lease. Only when it has run out **and** the row still shows no
//!   trace of a Twilio call (no `call_sid`, status still `placing`) may a pod claim it
//!   again. Traces come from the REST answer (written by the placing pod) and
//!   Twilio's `initiated` status callback (any pod behind the Service).
//! - Just before sending a create request the pod records it on the row
//!   (`dial_attempts + 1`), in a statement that succeeds only while this pod still
//!   holds the claim with a Twilio timeout's worth of lease left. A claim that fails
//!   in the pod (even one that committed in the database) sends nothing and costs no
//!   attempt; if that statement fails, nothing is dialled.
//! - The placing pod keeps the CallSid until the row records it: `mark_placed` is
//!   retried until the lease runs out (one last try at shutdown), and only writes
//!   while this pod still holds the claim.
//! - A pod that claims a row with `dial_attempts > 0` (an earlier request's answer
//!   never reached the row: the pod died, the database was down) first asks Twilio's
//!   Calls list for a call to that number from that caller ID created since the first
//!   claim (`first_claimed_at`, minus 5 s of clock skew) that no other row holds, and
//!   adopts it (`voice_scheduled_adopted_total`) instead of dialling. If Twilio cannot
//!   be asked, nothing is dialled until the next claim.
//! - The Twilio request's own timeout is at most a third of the lease, and a pod does
//!   not start a request once less than that is left on its claim.
//! - A definite refusal (Twilio 4xx other than 429) fails the call at once; anything
//!   else (timeout, transport, 429, 5xx) leaves the row `placing` until the lease runs
//!   out; after [`MAX_ATTEMPTS`] create requests that Twilio's list does not show, the
//!   call is `failed` (`attempts_exhausted`).
//!
//! The remaining window is Twilio's list itself: a call created but not yet listed
//! when the next pod asks (Twilio documents no list lag for calls; none was observed).
//!
//! ## Lateness, retries, status
//! Callbacks due longer ago than their limit (request `maxLateness`, else the
//! persona's `callbacks.maxLatenessSeconds`, both fixed into the row when scheduled,
//! else `CALLMEBACK_MAX_LATENESS`, 15 min) are not placed: `failed`, outcome `too_late`,
//! and `placement_error` says when it was due. Twilio's status callbacks move the row
//! through `ringing`, `in-progress`, `completed`/`busy`/`no-answer`/`failed`; a
//! `busy` or `no-answer` call that asked for `retries` gets a new row (`retry_of`)
//! due after the retry delay.
//!
//! ## Layout
//! - [`queries`]: the SQL, one atomic step each.
//! - this module: the loop, placement, metrics.

pub mod queries;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::personas::Personas;
use crate::phone::mask_number;
use crate::session::CallHandler;
use crate::store::records::CallStatus;
use crate::twilio::context::ContextSigner;
use crate::twilio::outbound::{self, OutboundPlan};
use crate::twilio::rest::{RestError, TwilioClient};
use crate::twilio::{Limits, PublicUrl};

/// Create requests per callback, none of which Twilio's list shows, before it is given up.
pub const MAX_ATTEMPTS: i32 = 3;
/// Shortest lease accepted: the Twilio request must fit in a third of it.
pub const MIN_LEASE: Duration = Duration::from_secs(3);
/// Rows claimed per statement.
const CLAIM_BATCH: i64 = 50;
/// Placements in flight per pod (bounded: Twilio and the pool are shared).
const MAX_IN_FLIGHT: usize = 32;
/// Housekeeping (lateness, exhausted claims, retries, backlog gauge) runs this often.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on every scheduler statement.
const DB_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the last attempt to record a placement at shutdown.
const FINAL_RECORD_TIMEOUT: Duration = Duration::from_secs(1);
/// Retries scheduled per round.
const RETRY_BATCH: i64 = 50;
/// Longest lateness limit honoured (keeps interval arithmetic in range).
const MAX_LATENESS_SECS: i64 = 366 * 24 * 3600;

/// Scheduler settings (`CALLMEBACK_SCHEDULER_*`, `CALLMEBACK_MAX_LATENESS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How often due rows are looked for; well under the 2 s placement target.
    pub poll_interval: Duration,
    /// How long a claim holds before another pod may take the call over.
    pub lease: Duration,
    /// Default lateness limit.
    pub max_lateness: Duration,
    /// Default wait before a retry on busy / no-answer.
    pub retry_delay: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(200),
            lease: Duration::from_secs(30),
            max_lateness: Duration::from_secs(15 * 60),
            retry_delay: Duration::from_secs(60),
        }
    }
}

impl SchedulerConfig {
    /// The Twilio request timeout the scheduler uses: a third of the lease at most.
    pub fn rest_timeout(&self, limits: &Limits) -> Duration {
        limits.rest_timeout.min(self.lease / 3)
    }

    /// The default lateness limit, in whole seconds for SQL interval arithmetic.
    fn late_limit_secs(&self) -> i64 {
        clamped_secs(self.max_lateness)
    }
}

/// `d` in whole seconds, at most [`MAX_LATENESS_SECS`] (keeps SQL intervals in range).
fn clamped_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs())
        .unwrap_or(i64::MAX)
        .min(MAX_LATENESS_SECS)
}

/// Asking Twilio's Calls list (and the database, for sids other rows hold) failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Twilio's list did not answer usefully.
    #[error("listing calls: {0}")]
    Twilio(#[from] RestError),
    /// The database failed.
    #[error("checking a CallSid: {0}")]
    Database(#[from] sqlx::Error),
    /// The database did not answer in time.
    #[error("checking a CallSid timed out")]
    DatabaseTimeout,
}

/// Why a scheduled callback was not placed (`reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// Twilio refused it (4xx): final.
    TwilioRejected,
    /// Timeout, transport error, 429 or 5xx: retried when the lease runs out.
    TwilioUnavailable,
    /// A claim ran out without a Twilio answer (the pod died or stalled).
    LeaseExpired,
    /// Every attempt ran out: final.
    AttemptsExhausted,
    /// Due longer ago than its lateness limit: final.
    TooLate,
    /// Its persona is not loaded any more: final.
    PersonaMissing,
    /// The request could not be built (TwiML): final.
    BadRequest,
    /// The database failed while claiming or recording.
    Database,
}

impl FailureReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::TwilioRejected => "twilio_rejected",
            FailureReason::TwilioUnavailable => "twilio_unavailable",
            FailureReason::LeaseExpired => "lease_expired",
            FailureReason::AttemptsExhausted => "attempts_exhausted",
            FailureReason::TooLate => "too_late",
            FailureReason::PersonaMissing => "persona_missing",
            FailureReason::BadRequest => "bad_request",
            FailureReason::Database => "database",
        }
    }
}

/// What the scheduler needs from the pod.
pub struct SchedulerDeps {
    /// The database.
    pub pool: PgPool,
    /// Twilio REST, with [`SchedulerConfig::rest_timeout`].
    pub twilio: TwilioClient,
    /// Signs call contexts.
    pub signer: ContextSigner,
    /// Public base URL.
    pub public: PublicUrl,
    /// Limits (ring timeout, context grace).
    pub limits: Limits,
    /// Personas.
    pub personas: Arc<Personas>,
    /// Warms up providers while the phone rings.
    pub handler: Arc<dyn CallHandler>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub config: SchedulerConfig,
    /// This pod's name in `claimed_by`.
    pub pod: String,
}

/// A name for `claimed_by`: the pod's name ([`crate::config::pod_name`]) plus a
/// random suffix, so a restarted container never mistakes an old claim for its own.
pub fn pod_identity(pod_name: Option<&str>) -> String {
    let host = pod_name.filter(|h| !h.is_empty()).unwrap_or("voice-pod");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

fn fail(metrics: &Metrics, reason: FailureReason, n: u64) {
    if n > 0 {
        metrics
            .placement_failures
            .with_label_values(&[reason.as_str()])
            .inc_by(n);
    }
}

/// Runs until `stop` is cancelled, then waits (bounded by the REST timeout) for the
/// placements in flight. Claims it did not finish are picked up by other pods when
/// their lease runs out.
pub async fn run(deps: SchedulerDeps, stop: CancellationToken) {
    let deps = Arc::new(deps);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let lease_ms = i64::try_from(deps.config.lease.as_millis()).unwrap_or(i64::MAX);
    let late_limit = deps.config.late_limit_secs();
    let mut last_housekeeping: Option<Instant> = None;
    tracing::info!(
        pod = %deps.pod,
        poll_ms = deps.config.poll_interval.as_millis() as u64,
        lease_s = deps.config.lease.as_secs(),
        "scheduler running"
    );
    loop {
        if last_housekeeping.is_none_or(|t| t.elapsed() >= HOUSEKEEPING_INTERVAL) {
            housekeeping(&deps).await;
            last_housekeeping = Some(Instant::now());
        }
        // Claim only what can be placed now; the rest stays for other pods.
        let free = i64::try_from(in_flight.available_permits()).unwrap_or(0);
        let limit = free.min(CLAIM_BATCH);
        let mut claimed_full_batch = false;
        if limit > 0 {
            let claimed = tokio::time::timeout(
                DB_TIMEOUT,
                queries::claim(&deps.pool, &deps.pod, limit, lease_ms, late_limit),
            )
            .await;
            match claimed {
                Ok(Ok(rows)) => {
                    claimed_full_batch = rows.len() as i64 == limit;
                    for row in rows {
                        if row.attempt > 1 {
                            fail(&deps.metrics, FailureReason::LeaseExpired, 1);
                            tracing::warn!(call_id = %row.id, attempt = row.attempt, "taking over a callback whose claim ran out");
                        }
                        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                            break;
                        };
                        let claimed_at = Instant::now();
                        let deps = Arc::clone(&deps);
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            place(&deps, row, claimed_at, &stop).await;
                            drop(permit);
                        });
                    }
                }
                Ok(Err(err)) => {
                    fail(&deps.metrics, FailureReason::Database, 1);
                    tracing::warn!(error = %err, "claiming due callbacks failed");
                }
                Err(_) => {
                    fail(&deps.metrics, FailureReason::Database, 1);
                    tracing::warn!("claiming due callbacks timed out");
                }
            }
        }
        // A full batch means more may be due: claim again at once.
        let pause = if claimed_full_batch {
            Duration::ZERO
        } else {
            deps.config.poll_interval
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    // Let placements in flight finish: their REST requests are bounded, and their
    // recording makes one last bounded attempt once `stop` is cancelled.
    let grace = stop_grace(&deps.config, &deps.limits);
    let all = u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, in_flight.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("scheduler stopped with placements in flight; their leases will run out");
    }
    tracing::info!("scheduler stopped");
}

/// How long [`run`] waits for placements in flight after it is stopped.
pub fn stop_grace(config: &SchedulerConfig, limits: &Limits) -> Duration {
    config.rest_timeout(limits) + DB_TIMEOUT.min(config.lease / 3) + FINAL_RECORD_TIMEOUT
}

async fn housekeeping(deps: &SchedulerDeps) {
    let m = &deps.metrics;
    let pool = &deps.pool;
    sweep(
        m,
        FailureReason::TooLate,
        "expiring late callbacks",
        "callbacks not placed: due longer ago than their lateness limit",
        queries::expire_late(pool, deps.config.late_limit_secs()),
    )
    .await;
    let delay = clamped_secs(deps.config.retry_delay);
    match tokio::time::timeout(
        DB_TIMEOUT,
        queries::schedule_retries(pool, delay, RETRY_BATCH),
    )
    .await
    {
        Ok(Ok(ids)) => {
            for id in ids {
                tracing::info!(call_id = %id, "retry scheduled after busy / no-answer");
            }
        }
        Ok(Err(err)) => tracing::warn!(error = %err, "scheduling retries failed"),
        Err(_) => tracing::warn!("scheduling retries timed out"),
    }
    if let Ok(Ok((backlog, overdue))) =
        tokio::time::timeout(DB_TIMEOUT, queries::backlog(pool)).await
    {
        m.scheduled_backlog.set(backlog);
        m.scheduled_overdue.set(overdue);
    }
}

/// One housekeeping step that ends callbacks for `reason`: counts and logs what it
/// ended (`ended`); a failed or slow step (`what`) is logged and retried next round.
async fn sweep(
    m: &Metrics,
    reason: FailureReason,
    what: &str,
    ended: &str,
    step: impl std::future::Future<Output = Result<u64, sqlx::Error>>,
) {
    match tokio::time::timeout(DB_TIMEOUT, step).await {
        Ok(Ok(n)) => {
            if n > 0 {
                tracing::warn!(count = n, "{ended}");
            }
            fail(m, reason, n);
        }
        Ok(Err(err)) => tracing::warn!(error = %err, "{what} failed"),
        Err(_) => tracing::warn!("{what} timed out"),
    }
}

/// Places one claimed callback.
async fn place(
    deps: &SchedulerDeps,
    row: queries::Claimed,
    claimed_at: Instant,
    stop: &CancellationToken,
) {
    let m = &deps.metrics;
    let id = row.id;
    let (Some(to), Some(from)) = (row.to_number.clone(), row.from_number.clone()) else {
        record_failure(
            deps,
            id,
            FailureReason::BadRequest,
            "missing to/from number",
        )
        .await;
        return;
    };
    // An earlier claim sent a create request whose answer never reached the row:
    // Twilio may hold the call. Ask its Calls list before anything else.
    if row.dial_attempts > 0 {
        match find_earlier_call(deps, &to, &from, row.first_claimed_at).await {
            Ok(Some(call)) => {
                m.scheduled_adopted.inc();
                tracing::warn!(call_id = %id, call_sid = %call.sid, attempt = row.attempt, "found the call an earlier claim placed in Twilio's Calls list; adopting it instead of dialling");
                let status = row_status(&call.status);
                record_placed(
                    deps,
                    &row,
                    &call.sid,
                    status,
                    &call.status,
                    claimed_at,
                    stop,
                )
                .await;
                return;
            }
            Ok(None) => {}
            Err(err) => {
                fail(m, FailureReason::TwilioUnavailable, 1);
                tracing::warn!(call_id = %id, error = %err, "asking Twilio whether an earlier claim placed the call failed; trying again when the claim runs out");
                return;
            }
        }
        if row.dial_attempts >= MAX_ATTEMPTS {
            let msg = format!(
                "no call in Twilio after {} create requests",
                row.dial_attempts
            );
            record_failure(deps, id, FailureReason::AttemptsExhausted, &msg).await;
            return;
        }
    }
    if row.too_late {
        record_failure(
            deps,
            id,
            FailureReason::TooLate,
            "due longer ago than its lateness limit",
        )
        .await;
        return;
    }
    let Some(persona) = deps.personas.snapshot().get(&row.persona) else {
        let msg = format!("persona `{}` is not loaded", row.persona);
        record_failure(deps, id, FailureReason::PersonaMissing, &msg).await;
        return;
    };
    let plan = OutboundPlan {
        call_id: id.to_string(),
        persona: row.persona.clone(),
        from,
        to: to.clone(),
        pretext: row.pretext.clone(),
        user: row.user_id.clone(),
    };
    let request = match outbound::build(&deps.public, &deps.signer, &deps.limits, &plan) {
        Ok(r) => r,
        Err(err) => {
            record_failure(deps, id, FailureReason::BadRequest, &err.to_string()).await;
            return;
        }
    };
    // Never start a Twilio request that could outlive the claim: another pod may
    // take the call over once the lease runs out.
    let rest_timeout = deps.config.rest_timeout(&deps.limits);
    let lease_left = |now: Instant| {
        deps.config
            .lease
            .saturating_sub(now.duration_since(claimed_at))
    };
    if lease_left(Instant::now()) <= rest_timeout {
        tracing::warn!(call_id = %id, "claim too old to place safely; leaving it to the lease");
        return;
    }
    // The row records the request before it is sent, and only while this pod still
    // holds the claim: whoever claims next knows to ask Twilio first, and a claim
    // that failed here never counts as an attempt.
    let min_left_ms = i64::try_from(rest_timeout.as_millis()).unwrap_or(i64::MAX);
    let budget = DB_TIMEOUT.min(lease_left(Instant::now()).saturating_sub(rest_timeout));
    match tokio::time::timeout(
        budget,
        queries::mark_dialing(&deps.pool, id, &deps.pod, min_left_ms),
    )
    .await
    {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            tracing::warn!(call_id = %id, "claim lost before dialling (taken over or canceled); not dialling");
            return;
        }
        Ok(Err(err)) => {
            fail(m, FailureReason::Database, 1);
            tracing::warn!(call_id = %id, error = %err, "recording the create request failed; not dialling, the claim will run out");
            return;
        }
        Err(_) => {
            fail(m, FailureReason::Database, 1);
            tracing::warn!(call_id = %id, "recording the create request timed out; not dialling, the claim will run out");
            return;
        }
    }
    if lease_left(Instant::now()) <= rest_timeout {
        tracing::warn!(call_id = %id, "claim too old after recording the request; not dialling, the next claim asks Twilio first");
        return;
    }
    deps.handler.prepare(&request.prepared(persona));
    match deps.twilio.create_call(&request.call).await {
        Ok(created) => {
            m.scheduled_placed.inc();
            let status = row_status(&created.status);
            tracing::info!(
                call_id = %id,
                call_sid = %created.sid,
                persona = %plan.persona,
                to = %mask_number(&to),
                attempt = row.attempt,
                inline_twiml = request.inline_twiml,
                "scheduled callback placed"
            );
            record_placed(
                deps,
                &row,
                &created.sid,
                status,
                &created.status,
                claimed_at,
                stop,
            )
            .await;
        }
        Err(RestError::Api(e)) if (400..500).contains(&e.status) && e.status != 429 => {
            let msg = format!("Twilio refused the call: {} (code {:?})", e.message, e.code);
            record_failure(deps, id, FailureReason::TwilioRejected, &msg).await;
        }
        Err(err) => {
            fail(m, FailureReason::TwilioUnavailable, 1);
            tracing::warn!(call_id = %id, error = %err, attempt = row.attempt, "placing a callback failed; another attempt follows when the claim runs out");
            let note = format!("attempt {}: {err}", row.attempt);
            let _ =
                tokio::time::timeout(DB_TIMEOUT, queries::note_transient(&deps.pool, id, &note))
                    .await;
        }
    }
}

/// The row status for a Twilio call status (`queued` for anything unknown).
fn row_status(twilio: &str) -> CallStatus {
    CallStatus::from_twilio(twilio)
        .filter(|s| *s != CallStatus::Scheduled && *s != CallStatus::Placing)
        .unwrap_or(CallStatus::Queued)
}

/// How far Twilio's `date_created` may lag our first-claim clock and still match.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(5);

/// A call in Twilio's Calls list to `to` from `from`, created since the row's first
/// claim, that no other row holds: the call an earlier claim placed. Two queries,
/// because Twilio's `StartTime` filters skip calls that have not started (`queued`).
async fn find_earlier_call(
    deps: &SchedulerDeps,
    to: &str,
    from: &str,
    first_claimed_at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<crate::twilio::rest::ListedCall>, LookupError> {
    let since = first_claimed_at - CLOCK_SKEW;
    let day = since.format("%Y-%m-%d").to_string();
    let mut calls = deps
        .twilio
        .list_calls(to, from, &[("StartTime>", day.as_str())])
        .await?;
    calls.extend(
        deps.twilio
            .list_calls(to, from, &[("Status", "queued")])
            .await?,
    );
    // Oldest first: the earliest call since the first claim is the one it made.
    let mut calls: Vec<_> = calls
        .into_iter()
        .filter_map(|c| c.created().filter(|t| *t >= since).map(|t| (t, c)))
        .collect();
    calls.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.sid.cmp(&b.1.sid)));
    calls.dedup_by(|a, b| a.1.sid == b.1.sid);
    for (_, call) in calls {
        let owner =
            tokio::time::timeout(DB_TIMEOUT, queries::id_of_call_sid(&deps.pool, &call.sid))
                .await
                .map_err(|_| LookupError::DatabaseTimeout)??;
        if owner.is_none() {
            return Ok(Some(call));
        }
    }
    Ok(None)
}

/// Puts the CallSid on the row, retrying while the claim's lease lasts: until the row
/// holds it, a pod that takes the claim over must find the call in Twilio's list.
/// On shutdown, one last attempt.
async fn record_placed(
    deps: &SchedulerDeps,
    row: &queries::Claimed,
    sid: &str,
    status: CallStatus,
    twilio_status: &str,
    claimed_at: Instant,
    stop: &CancellationToken,
) {
    let m = &deps.metrics;
    let id = row.id;
    let deadline = claimed_at + deps.config.lease;
    let mut pause = Duration::from_millis(200);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let budget = if stop.is_cancelled() {
            FINAL_RECORD_TIMEOUT
        } else {
            DB_TIMEOUT.min(left.max(FINAL_RECORD_TIMEOUT))
        };
        let written = tokio::time::timeout(
            budget,
            queries::mark_placed(
                &deps.pool,
                id,
                &deps.pod,
                sid,
                status.as_str(),
                twilio_status,
            ),
        )
        .await;
        match written {
            Ok(Ok(queries::Placed::Recorded(delay))) => {
                if let Some(d) = delay {
                    m.placement_delay.observe(d.max(0.0));
                }
                tracing::info!(call_id = %id, call_sid = %sid, tries, delay_ms = delay.map(|d| (d * 1000.0).round() as i64), "placement recorded");
                return;
            }
            Ok(Ok(queries::Placed::NotOurs)) => {
                tracing::warn!(call_id = %id, call_sid = %sid, "the claim moved on before the placement was recorded; its next holder finds the call in Twilio's list");
                return;
            }
            Ok(Err(err)) => {
                tracing::warn!(call_id = %id, call_sid = %sid, error = %err, tries, "recording the placement failed; retrying while the claim lasts");
            }
            Err(_) => {
                tracing::warn!(call_id = %id, call_sid = %sid, tries, "recording the placement timed out; retrying while the claim lasts");
            }
        }
        if stop.is_cancelled() || Instant::now() + pause >= deadline {
            fail(m, FailureReason::Database, 1);
            tracing::error!(call_id = %id, call_sid = %sid, tries, "callback placed but not recorded; the next claim finds it in Twilio's list");
            return;
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

async fn record_failure(deps: &SchedulerDeps, id: uuid::Uuid, reason: FailureReason, msg: &str) {
    fail(&deps.metrics, reason, 1);
    tracing::warn!(call_id = %id, reason = reason.as_str(), error = %msg, "scheduled callback failed");
    match tokio::time::timeout(
        DB_TIMEOUT,
        queries::mark_failed(&deps.pool, id, &deps.pod, reason.as_str(), msg),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(call_id = %id, error = %err, "recording the failure failed"),
        Err(_) => tracing::warn!(call_id = %id, "recording the failure timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Twilio request always fits well inside the claim, however the lease is set.
    #[test]
    fn rest_timeout_is_a_third_of_the_lease_at_most() {
        let limits = Limits::default();
        let short = SchedulerConfig {
            lease: Duration::from_secs(3),
            ..SchedulerConfig::default()
        };
        assert_eq!(short.rest_timeout(&limits), Duration::from_secs(1));
        assert_eq!(
            SchedulerConfig::default().rest_timeout(&limits),
            limits.rest_timeout
        );
    }

    // Pod identities carry the host name and differ between restarts.
    #[test]
    fn pod_identities_are_unique_per_start() {
        let a = pod_identity(Some("voice-7d9f"));
        let b = pod_identity(Some("voice-7d9f"));
        assert!(a.starts_with("voice-7d9f-") && a != b);
        assert!(pod_identity(None).starts_with("voice-pod-"));
    }
}
