//! The read side: call records, transcripts and cost breakdowns for the API.
//!
//! Money is read as `numeric::text` and served as decimal strings: exact, and no
//! float ever rounds a cost.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::records::{CallRef, CallStatus, Speaker, TurnLatency, UsageUnit};
use crate::session::Direction;

/// Default and largest page of `GET /v1/calls`.
pub const DEFAULT_LIST_LIMIT: i64 = 50;
/// Largest page of `GET /v1/calls`.
pub const MAX_LIST_LIMIT: i64 = 500;

/// One call row.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct CallRow {
    /// The pod's id.
    pub id: Uuid,
    /// Twilio's CallSid.
    pub call_sid: Option<String>,
    /// Which way.
    #[sqlx(try_from = "String")]
    pub direction: Direction,
    /// The persona.
    pub persona: String,
    /// Who owns the relationship.
    #[serde(rename = "user")]
    pub user_id: Option<String>,
    /// Caller number.
    #[serde(rename = "from")]
    pub from_number: Option<String>,
    /// Callee number.
    #[serde(rename = "to")]
    pub to_number: Option<String>,
    /// Why the persona calls.
    pub pretext: Option<String>,
    /// Lifecycle status.
    #[sqlx(try_from = "String")]
    pub status: CallStatus,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Due time of a scheduled call.
    pub scheduled_for: Option<DateTime<Utc>>,
    /// Stream started.
    pub started_at: Option<DateTime<Utc>>,
    /// Answered.
    pub answered_at: Option<DateTime<Utc>>,
    /// Ended.
    pub ended_at: Option<DateTime<Utc>>,
    /// Why it ended.
    pub outcome: Option<String>,
    /// Twilio's last CallStatus.
    pub twilio_status: Option<String>,
    /// Length in seconds.
    pub duration_seconds: Option<i32>,
    /// The pod.
    pub pod: Option<String>,
    /// Scheduled calls: when Twilio accepted the call.
    pub placed_at: Option<DateTime<Utc>>,
    /// Scheduled calls: placement claims so far.
    pub attempt: i32,
    /// Scheduled calls: why placement failed or was not tried (too late, ...).
    pub placement_error: Option<String>,
    /// Retries on busy / no-answer still allowed (moved to the retry when made).
    pub retries_left: i32,
    /// The call this one retries.
    pub retry_of: Option<Uuid>,
}

/// A call in a list, with its total cost.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct CallSummary {
    /// The call.
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub call: CallRow,
    /// Sum of the priced usage, USD (decimal string); `None` when nothing is priced.
    pub total_cost_usd: Option<String>,
}

/// One turn of a transcript.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct TurnRow {
    /// Order spoken.
    pub sequence: i32,
    /// Who spoke.
    #[sqlx(try_from = "String")]
    pub speaker: Speaker,
    /// The text as heard.
    pub text: String,
    /// Cut short by the caller.
    pub interrupted: bool,
    /// End of the caller speech this turn ends or answers.
    pub end_of_speech_at: Option<DateTime<Utc>>,
    /// First reply audio.
    pub first_audio_at: Option<DateTime<Utc>>,
    /// Stage latencies, milliseconds.
    #[sqlx(flatten)]
    pub latency: TurnLatency,
}

/// One line of a cost breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct UsageRow {
    /// Who bills it.
    pub provider: String,
    /// What is counted.
    #[sqlx(try_from = "String")]
    pub unit: UsageUnit,
    /// How much (decimal string).
    pub quantity: String,
    /// USD per unit at the time (decimal string); `None`: no price configured.
    pub unit_price_usd: Option<String>,
    /// `quantity * unit_price_usd`.
    pub cost_usd: Option<String>,
}

/// A call's costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostBreakdown {
    /// Always `USD`.
    pub currency: &'static str,
    /// Sum of the priced lines; `None` when none is priced.
    pub total_usd: Option<String>,
    /// Whether every line has a price (otherwise `total_usd` is a lower bound).
    pub complete: bool,
    /// Lines by provider and unit.
    pub items: Vec<UsageRow>,
}

/// `GET /v1/calls/{sid}`: the record, the transcript and the costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CallDetail {
    /// The record.
    #[serde(flatten)]
    pub call: CallRow,
    /// Turns in order.
    pub transcript: Vec<TurnRow>,
    /// Costs.
    pub costs: CostBreakdown,
}

/// Filters of `GET /v1/calls`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallFilter {
    /// Only this user's calls.
    pub user: Option<String>,
    /// Only this persona's calls.
    pub persona: Option<String>,
    /// Only calls in this status.
    pub status: Option<CallStatus>,
    /// Page size (clamped to `1..=MAX_LIST_LIMIT`).
    pub limit: Option<i64>,
}

const CALL_COLUMNS: &str = "c.id, c.call_sid, c.direction, c.persona, c.user_id, c.from_number, \
    c.to_number, c.pretext, c.status, c.created_at, c.scheduled_for, c.started_at, \
    c.answered_at, c.ended_at, c.outcome, c.twilio_status, c.duration_seconds, c.pod, \
    c.placed_at, c.attempt, c.placement_error, c.retries_left, c.retry_of";

/// Loads one call with its transcript and costs.
pub async fn call_detail(pool: &PgPool, key: &CallRef) -> Result<Option<CallDetail>, sqlx::Error> {
    let sql = match key {
        CallRef::Id(_) => format!("SELECT {CALL_COLUMNS} FROM calls c WHERE c.id = $1"),
        CallRef::Sid(_) => format!("SELECT {CALL_COLUMNS} FROM calls c WHERE c.call_sid = $1"),
    };
    let q = sqlx::query_as::<_, CallRow>(&sql);
    let q = match key {
        CallRef::Id(id) => q.bind(*id),
        CallRef::Sid(sid) => q.bind(sid.as_str()),
    };
    let Some(call) = q.fetch_optional(pool).await? else {
        return Ok(None);
    };
    let transcript = sqlx::query_as::<_, TurnRow>(
        "SELECT sequence, speaker, text, interrupted, end_of_speech_at, first_audio_at, \
                stt_ms, llm_ms, tts_ms, total_ms \
         FROM call_turns WHERE call_id = $1 ORDER BY sequence",
    )
    .bind(call.id)
    .fetch_all(pool)
    .await?;
    let items = sqlx::query_as::<_, UsageRow>(
        "SELECT provider, unit, quantity::text AS quantity, unit_price::text AS unit_price_usd, \
                cost::text AS cost_usd \
         FROM call_usage WHERE call_id = $1 ORDER BY provider, unit",
    )
    .bind(call.id)
    .fetch_all(pool)
    .await?;
    let total_usd: Option<String> =
        sqlx::query_scalar("SELECT sum(cost)::text FROM call_usage WHERE call_id = $1")
            .bind(call.id)
            .fetch_one(pool)
            .await?;
    let complete = items.iter().all(|i| i.cost_usd.is_some());
    Ok(Some(CallDetail {
        call,
        transcript,
        costs: CostBreakdown {
            currency: "USD",
            total_usd,
            complete,
            items,
        },
    }))
}

/// Lists calls, newest first.
pub async fn list_calls(pool: &PgPool, f: &CallFilter) -> Result<Vec<CallSummary>, sqlx::Error> {
    let limit = f
        .limit
        .unwrap_or(DEFAULT_LIST_LIMIT)
        .clamp(1, MAX_LIST_LIMIT);
    let sql = format!(
        "SELECT {CALL_COLUMNS}, \
                (SELECT sum(u.cost)::text FROM call_usage u WHERE u.call_id = c.id) AS total_cost_usd \
         FROM calls c \
         WHERE ($1::text IS NULL OR c.user_id = $1) \
           AND ($2::text IS NULL OR c.persona = $2) \
           AND ($3::text IS NULL OR c.status = $3) \
         ORDER BY c.created_at DESC, c.id \
         LIMIT $4"
    );
    sqlx::query_as::<_, CallSummary>(&sql)
        .bind(f.user.as_deref())
        .bind(f.persona.as_deref())
        .bind(f.status.map(|s| s.as_str()))
        .bind(limit)
        .fetch_all(pool)
        .await
}
