//! The scheduler's SQL. Each statement is one atomic step of a callback's life;
//! PostgreSQL's row locks decide every race between pods and the API:
//!
//! - claim: `FOR UPDATE SKIP LOCKED` picks due rows no other pod is claiming right
//!   now, and the same statement flips them to `placing` with this pod's lease;
//! - cancel: `UPDATE ... WHERE status = 'scheduled'` waits for a concurrent claim's
//!   lock and then sees `placing`, so a call is either canceled or placed, never both.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A callback to schedule (`POST /v1/calls` with `at` or `in`).
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledCall {
    /// Our call id.
    pub id: Uuid,
    /// Persona name.
    pub persona: String,
    /// Who owns the relationship.
    pub user_id: Option<String>,
    /// Caller ID (E.164).
    pub from: String,
    /// Callee (E.164).
    pub to: String,
    /// Why the persona calls.
    pub pretext: Option<String>,
    /// When it is due.
    pub due: DateTime<Utc>,
    /// Not placed when due longer ago than this (`None`: the pod's default).
    pub max_lateness_seconds: Option<i32>,
    /// Retries on busy / no-answer.
    pub retries: i32,
    /// Wait before each retry (`None`: the pod's default).
    pub retry_delay_seconds: Option<i32>,
}

/// Stores a scheduled callback; it is durable when this returns.
pub async fn insert(pool: &PgPool, c: &ScheduledCall) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO calls (id, direction, persona, user_id, from_number, to_number, pretext, \
                            status, scheduled_for, max_lateness_seconds, retries_left, \
                            retry_delay_seconds) \
         VALUES ($1, 'outbound', $2, $3, $4, $5, $6, 'scheduled', $7, $8, $9, $10)",
    )
    .bind(c.id)
    .bind(&c.persona)
    .bind(c.user_id.as_deref())
    .bind(&c.from)
    .bind(&c.to)
    .bind(c.pretext.as_deref())
    .bind(c.due)
    .bind(c.max_lateness_seconds)
    .bind(c.retries)
    .bind(c.retry_delay_seconds)
    .execute(pool)
    .await?;
    Ok(())
}

/// Our id of the call Twilio knows as `call_sid`, if it is ours.
pub async fn id_of_call_sid(pool: &PgPool, call_sid: &str) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM calls WHERE call_sid = $1")
        .bind(call_sid)
        .fetch_optional(pool)
        .await
}

/// The user a call is recorded under: `None` when there is no such call,
/// `Some(None)` for a call of no user.
pub async fn owner_of(pool: &PgPool, id: Uuid) -> Result<Option<Option<String>>, sqlx::Error> {
    sqlx::query_scalar("SELECT user_id FROM calls WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// What `DELETE /v1/calls/{id}` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was scheduled; now it is canceled and will never be placed.
    Canceled,
    /// It had been canceled before (cancel is idempotent).
    AlreadyCanceled,
    /// Too late: it is being placed or was placed; its status.
    AlreadyPlaced(String),
    /// No such call.
    NotFound,
}

/// Cancels a callback that has not been placed yet.
pub async fn cancel(pool: &PgPool, id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
    let canceled = sqlx::query(
        "UPDATE calls SET status = 'canceled', outcome = 'canceled_by_api', ended_at = now(), \
                          claimed_by = NULL, lease_until = NULL, updated_at = now() \
         WHERE id = $1 AND status = 'scheduled'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    if canceled.rows_affected() == 1 {
        return Ok(CancelOutcome::Canceled);
    }
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, outcome FROM calls WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(match row {
        None => CancelOutcome::NotFound,
        Some((status, outcome))
            if status == "canceled" && outcome.as_deref() == Some("canceled_by_api") =>
        {
            CancelOutcome::AlreadyCanceled
        }
        Some((status, _)) => CancelOutcome::AlreadyPlaced(status),
    })
}

/// A callback this pod claimed and must place now.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct Claimed {
    /// Our call id.
    pub id: Uuid,
    /// Persona name.
    pub persona: String,
    /// Who owns the relationship.
    pub user_id: Option<String>,
    /// Caller ID.
    pub from_number: Option<String>,
    /// Callee.
    pub to_number: Option<String>,
    /// Why the persona calls.
    pub pretext: Option<String>,
    /// When it was due.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// 1 for the first claim; more when a pod's claim ran out before.
    pub attempt: i32,
    /// Twilio create requests sent by earlier claims: when more than 0, Twilio may
    /// hold a call for this row that the row does not know about.
    pub dial_attempts: i32,
    /// When the first claim was made (the earliest a call for this row can exist).
    pub first_claimed_at: DateTime<Utc>,
    /// Due longer ago than its lateness limit: not dialled again.
    pub too_late: bool,
}

/// Claims up to `limit` due callbacks for `pod`, with a lease of `lease_ms`: rows
/// due and scheduled (and not later than their lateness limit, `late_secs` by
/// default: those are [`expire_late`]'s), and rows whose previous claim ran out while
/// Twilio's answer is still unknown (no CallSid recorded, status still `placing`:
/// neither the REST answer nor Twilio's `initiated` callback arrived). The claimer of
/// a row with `dial_attempts > 0` asks Twilio before dialling again.
pub async fn claim(
    pool: &PgPool,
    pod: &str,
    limit: i64,
    lease_ms: i64,
    late_secs: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as::<_, Claimed>(
        "WITH due AS ( \
             SELECT id FROM calls \
             WHERE (status = 'scheduled' AND scheduled_for <= now() \
                    AND scheduled_for >= now() \
                        - make_interval(secs => COALESCE(max_lateness_seconds, $4))) \
                OR (status = 'placing' AND lease_until < now() AND call_sid IS NULL) \
             ORDER BY scheduled_for \
             LIMIT $2 \
             FOR UPDATE SKIP LOCKED) \
         UPDATE calls c SET status = 'placing', claimed_by = $1, \
                lease_until = now() + make_interval(secs => $3::double precision / 1000), \
                first_claimed_at = COALESCE(c.first_claimed_at, now()), \
                attempt = c.attempt + 1, updated_at = now() \
         FROM due WHERE c.id = due.id \
         RETURNING c.id, c.persona, c.user_id, c.from_number, c.to_number, c.pretext, \
                   c.scheduled_for, c.attempt, c.dial_attempts, c.first_claimed_at, \
                   COALESCE(c.scheduled_for < now() \
                       - make_interval(secs => COALESCE(c.max_lateness_seconds, $4)), false) \
                       AS too_late",
    )
    .bind(pod)
    .bind(limit)
    .bind(lease_ms)
    .bind(late_secs)
    .fetch_all(pool)
    .await
}

/// Gives up on callbacks due longer ago than their lateness limit (the cluster was
/// down, or every pod was busy): `failed`, and the record says why. Returns how many.
/// Rows still `placing` qualify only when no create request was ever sent for them
/// (otherwise a pod must ask Twilio first: see [`claim`]).
pub async fn expire_late(pool: &PgPool, default_limit_secs: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE calls SET status = 'failed', outcome = 'too_late', ended_at = now(), \
                placement_error = format('not placed: due at %s, more than %s s ago (maxLateness)', \
                    to_char(scheduled_for AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                    COALESCE(max_lateness_seconds, $1)), \
                lease_until = NULL, updated_at = now() \
         WHERE (status = 'scheduled' \
                OR (status = 'placing' AND lease_until < now() AND call_sid IS NULL \
                    AND dial_attempts = 0)) \
           AND scheduled_for < now() - make_interval(secs => COALESCE(max_lateness_seconds, $1))",
    )
    .bind(default_limit_secs)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Records, just before it is sent, that this pod sends a Twilio create request for
/// `id`: only while it still holds the claim with at least `min_left_ms` of lease
/// left. `false`: the claim is gone (or too short), and nothing may be sent.
pub async fn mark_dialing(
    pool: &PgPool,
    id: Uuid,
    pod: &str,
    min_left_ms: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE calls SET dial_attempts = dial_attempts + 1, updated_at = now() \
         WHERE id = $1 AND claimed_by = $2 AND status = 'placing' AND call_sid IS NULL \
           AND lease_until > now() + make_interval(secs => $3::double precision / 1000)",
    )
    .bind(id)
    .bind(pod)
    .bind(min_left_ms)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// What [`mark_placed`] found.
#[derive(Clone, Debug, PartialEq)]
pub enum Placed {
    /// The row holds the CallSid now; the placement delay in seconds (due -> placed).
    Recorded(Option<f64>),
    /// The row is no longer this pod's claim (another pod took it over, or it holds
    /// another CallSid): nothing written.
    NotOurs,
}

/// Twilio accepted the call: its CallSid and status go on the row (the status only
/// moves forward: a callback may have been faster), provided `pod` still holds the
/// claim and the row has no other CallSid.
pub async fn mark_placed(
    pool: &PgPool,
    id: Uuid,
    pod: &str,
    call_sid: &str,
    status: &str,
    twilio_status: &str,
) -> Result<Placed, sqlx::Error> {
    let row = sqlx::query_scalar::<_, Option<f64>>(
        "UPDATE calls SET call_sid = $2, \
                status = CASE WHEN call_status_rank($3) > call_status_rank(status) \
                              THEN $3 ELSE status END, \
                twilio_status = COALESCE(twilio_status, $4), \
                placed_at = COALESCE(placed_at, now()), lease_until = NULL, \
                placement_error = NULL, updated_at = now() \
         WHERE id = $1 AND claimed_by = $5 AND (call_sid IS NULL OR call_sid = $2) \
           AND status <> 'canceled' \
         RETURNING extract(epoch FROM (placed_at - scheduled_for))::double precision",
    )
    .bind(id)
    .bind(call_sid)
    .bind(status)
    .bind(twilio_status)
    .bind(pod)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some(delay) => Placed::Recorded(delay),
        None => Placed::NotOurs,
    })
}

/// Twilio refused the call for good (or the persona is gone): `failed`, with why.
pub async fn mark_failed(
    pool: &PgPool,
    id: Uuid,
    pod: &str,
    outcome: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE calls SET status = 'failed', outcome = $2, placement_error = $3, \
                ended_at = now(), lease_until = NULL, updated_at = now() \
         WHERE id = $1 AND status = 'placing' AND call_sid IS NULL AND claimed_by = $4",
    )
    .bind(id)
    .bind(outcome)
    .bind(error)
    .bind(pod)
    .execute(pool)
    .await?;
    Ok(())
}

/// Twilio's answer is unknown or transient (timeout, 429, 5xx): the row stays
/// `placing` and the error is noted; when the lease runs out a pod tries again,
/// unless Twilio's `initiated` callback shows the call exists after all.
pub async fn note_transient(pool: &PgPool, id: Uuid, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE calls SET placement_error = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

/// Schedules one retry for each busy / no-answer call that asked for retries, at
/// most `limit` per round. The parent's allowance moves to the child (the parent's
/// `retries_left` drops to 0 in the same statement), so exactly one retry exists per
/// attempt whichever pods race. Returns the new rows' ids.
pub async fn schedule_retries(
    pool: &PgPool,
    default_delay_secs: i64,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar::<_, Uuid>(
        "WITH parent AS ( \
             SELECT id, retries_left FROM calls \
             WHERE status IN ('busy', 'no-answer') AND retries_left > 0 \
             LIMIT $2 \
             FOR UPDATE SKIP LOCKED), \
         spent AS ( \
             UPDATE calls c SET retries_left = 0, updated_at = now() \
             FROM parent p WHERE c.id = p.id \
             RETURNING c.*) \
         INSERT INTO calls (id, direction, persona, user_id, from_number, to_number, pretext, \
                            status, scheduled_for, max_lateness_seconds, retries_left, \
                            retry_delay_seconds, retry_of) \
         SELECT gen_random_uuid(), s.direction, s.persona, s.user_id, s.from_number, \
                s.to_number, s.pretext, 'scheduled', \
                now() + make_interval(secs => COALESCE(s.retry_delay_seconds, $1)), \
                s.max_lateness_seconds, p.retries_left - 1, s.retry_delay_seconds, s.id \
         FROM spent s JOIN parent p ON p.id = s.id \
         ON CONFLICT (retry_of) WHERE retry_of IS NOT NULL DO NOTHING \
         RETURNING id",
    )
    .bind(default_delay_secs)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// (scheduled and not placed, of which already due).
pub async fn backlog(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE scheduled_for <= now()) \
         FROM calls WHERE status = 'scheduled'",
    )
    .fetch_one(pool)
    .await
}
