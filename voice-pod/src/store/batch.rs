//! The SQL behind the writer: one batch of records in one transaction.
//!
//! Turns and usage go in as multi-row `INSERT ... SELECT FROM UNNEST(arrays)`, one
//! statement per kind whatever the batch size. Every statement is idempotent
//! (`ON CONFLICT` on natural keys, guard flags for the relationship counters), so a
//! batch whose commit was not confirmed can simply be written again.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::pricing::PriceTable;
use super::records::{CallRef, CallUpdate, MemoryNote, NewCall, Record, TurnRecord, UsageRecord};
use super::relationships::append_note;

/// Records per batch transaction: large enough to amortise the commit, small enough
/// that one statement's arrays stay a few hundred kilobytes.
pub const MAX_BATCH: usize = 512;

/// Records committed, by kind (for `voice_store_written_records_total`), and the
/// updates that found no row (not written: the writer holds them and tries again).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Written {
    pub calls: usize,
    pub updates: usize,
    pub turns: usize,
    pub usage: usize,
    pub memory: usize,
    /// Indices (into the batch) of call updates that matched no call row.
    pub orphans: Vec<usize>,
}

/// A record the database would refuse for sure; checked before it joins a batch so it
/// cannot poison the others.
pub(crate) fn validate(record: &Record) -> Result<(), &'static str> {
    match record {
        Record::Turn(t) if t.sequence < 0 => Err("negative turn sequence"),
        Record::Usage(u) if !u.quantity.is_finite() || u.quantity < 0.0 => {
            Err("usage quantity is not a finite non-negative number")
        }
        Record::Usage(u) if u.provider.is_empty() => Err("usage without provider"),
        Record::CallUpdated(_, u) if u.duration_seconds.is_some_and(|d| d < 0) => {
            Err("negative call duration")
        }
        _ => Ok(()),
    }
}

/// Writes `records` on `conn` (inside the caller's transaction), calls first so the
/// rows turns and usage refer to exist.
pub(crate) async fn write(
    conn: &mut PgConnection,
    records: &[Record],
    prices: &PriceTable,
) -> Result<Written, sqlx::Error> {
    let mut written = Written::default();
    let mut turns = Vec::new();
    let mut usage = Vec::new();
    let mut memory = Vec::new();
    for r in records {
        match r {
            Record::CallCreated(c) => {
                insert_call(conn, c).await?;
                written.calls += 1;
            }
            Record::CallUpdated(..) | Record::Turn(_) | Record::Usage(_) | Record::Memory(_) => {}
        }
    }
    // Updates in submission order: a status report can only move forward, timestamps
    // keep their first value, so order matters only between updates of one call.
    for (i, r) in records.iter().enumerate() {
        match r {
            Record::CallUpdated(key, upd) => {
                if update_call(conn, key, upd).await? {
                    written.updates += 1;
                } else {
                    written.orphans.push(i);
                }
            }
            Record::Turn(t) => turns.push(t),
            Record::Usage(u) => usage.push(u),
            Record::Memory(m) => memory.push(m),
            Record::CallCreated(_) => {}
        }
    }
    written.turns = turns.len();
    insert_turns(conn, &turns).await?;
    written.usage = usage.len();
    upsert_usage(conn, &usage, prices).await?;
    for m in memory {
        append_memory(conn, m).await?;
        written.memory += 1;
    }
    Ok(written)
}

async fn insert_call(conn: &mut PgConnection, c: &NewCall) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO calls (id, call_sid, direction, persona, user_id, from_number, to_number, \
                            pretext, status, created_at, scheduled_for, pod) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(c.id)
    .bind(c.call_sid.as_deref())
    .bind(c.direction.as_str())
    .bind(strip_nul(&c.persona))
    .bind(c.user_id.as_deref().map(strip_nul))
    .bind(c.from_number.as_deref())
    .bind(c.to_number.as_deref())
    .bind(c.pretext.as_deref().map(strip_nul))
    .bind(c.status.as_str())
    .bind(c.created_at)
    .bind(c.scheduled_for)
    .bind(c.pod.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The SET list shared by both keys. Status moves only forward (ties allowed before a
/// terminal status) and Twilio's raw status follows it; first timestamps and outcome
/// win; duration and pod keep the latest. (In SQL SET, every right-hand side sees the
/// row as it was, so `status` below is the old status.)
const UPDATE_SET: &str = "\
    call_sid = COALESCE($2, call_sid), \
    status = CASE \
        WHEN $3::text IS NULL THEN status \
        WHEN call_status_rank($3) > call_status_rank(status) \
          OR (call_status_rank($3) = call_status_rank(status) AND call_status_rank($3) < 5) \
        THEN $3 ELSE status END, \
    twilio_status = CASE \
        WHEN $3::text IS NULL OR call_status_rank($3) >= call_status_rank(status) \
        THEN COALESCE($4, twilio_status) ELSE twilio_status END, \
    started_at = COALESCE(started_at, $5), \
    answered_at = COALESCE(answered_at, $6), \
    ended_at = COALESCE(ended_at, $7), \
    outcome = COALESCE(outcome, $8), \
    duration_seconds = COALESCE($9, duration_seconds), \
    pod = COALESCE($10, pod), \
    user_id = COALESCE(user_id, $11), \
    updated_at = now()";

/// Counts an ended call in its relationship, once: the `relationship_counted` flag
/// flips in the same statement that increments the counter.
const COUNT_IN_RELATIONSHIP: &str = "\
    WITH c AS ( \
        UPDATE calls SET relationship_counted = true \
        WHERE {key} AND ended_at IS NOT NULL AND user_id IS NOT NULL \
          AND NOT relationship_counted \
        RETURNING user_id, persona, ended_at, id, \
                  CASE direction WHEN 'outbound' THEN to_number ELSE from_number END AS phone) \
    INSERT INTO relationships (user_id, persona, call_count, last_call_at, last_call_id, phone_number) \
    SELECT user_id, persona, 1, ended_at, id, phone FROM c \
    ON CONFLICT (user_id, persona) DO UPDATE SET \
        call_count = relationships.call_count + 1, \
        last_call_at = GREATEST(relationships.last_call_at, EXCLUDED.last_call_at), \
        last_call_id = EXCLUDED.last_call_id, \
        phone_number = COALESCE(EXCLUDED.phone_number, relationships.phone_number), \
        updated_at = now()";

/// Applies one update; `false` when no call row matched (its creation has not been
/// written yet, perhaps by another pod).
async fn update_call(
    conn: &mut PgConnection,
    key: &CallRef,
    u: &CallUpdate,
) -> Result<bool, sqlx::Error> {
    let (sql, count_sql) = match key {
        CallRef::Id(_) => (
            format!("UPDATE calls SET {UPDATE_SET} WHERE id = $1"),
            COUNT_IN_RELATIONSHIP.replace("{key}", "id = $1"),
        ),
        CallRef::Sid(_) => (
            format!("UPDATE calls SET {UPDATE_SET} WHERE call_sid = $1"),
            COUNT_IN_RELATIONSHIP.replace("{key}", "call_sid = $1"),
        ),
    };
    let q = sqlx::query(&sql);
    let q = match key {
        CallRef::Id(id) => q.bind(*id),
        CallRef::Sid(sid) => q.bind(sid.as_str()),
    };
    let done = q
        .bind(u.call_sid.as_deref())
        .bind(u.status.map(|s| s.as_str()))
        .bind(u.twilio_status.as_deref())
        .bind(u.started_at)
        .bind(u.answered_at)
        .bind(u.ended_at)
        .bind(u.outcome.as_deref().map(strip_nul))
        .bind(u.duration_seconds)
        .bind(u.pod.as_deref())
        .bind(u.user_id.as_deref().map(strip_nul))
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    if u.ended_at.is_some() {
        let q = sqlx::query(&count_sql);
        let q = match key {
            CallRef::Id(id) => q.bind(*id),
            CallRef::Sid(sid) => q.bind(sid.as_str()),
        };
        q.execute(&mut *conn).await?;
    }
    Ok(true)
}

async fn insert_turns(conn: &mut PgConnection, turns: &[&TurnRecord]) -> Result<(), sqlx::Error> {
    if turns.is_empty() {
        return Ok(());
    }
    // ON CONFLICT DO UPDATE may touch a row once per statement: the last report of a
    // (call, sequence) within the batch wins, as it would across batches.
    let mut last: HashMap<(Uuid, i32), usize> = HashMap::with_capacity(turns.len());
    for (i, t) in turns.iter().enumerate() {
        last.insert((t.call_id, t.sequence), i);
    }
    let n = last.len();
    let mut call_ids = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut speakers = Vec::with_capacity(n);
    let mut texts = Vec::with_capacity(n);
    let mut interrupted = Vec::with_capacity(n);
    let mut eos: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut first_audio: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut stt = Vec::with_capacity(n);
    let mut llm = Vec::with_capacity(n);
    let mut tts = Vec::with_capacity(n);
    let mut total = Vec::with_capacity(n);
    for (i, t) in turns.iter().enumerate() {
        if last.get(&(t.call_id, t.sequence)) != Some(&i) {
            continue;
        }
        call_ids.push(t.call_id);
        seqs.push(t.sequence);
        speakers.push(t.speaker.as_str());
        texts.push(strip_nul(&t.text));
        interrupted.push(t.interrupted);
        eos.push(t.end_of_speech_at);
        first_audio.push(t.first_audio_at);
        stt.push(t.latency.stt_ms);
        llm.push(t.latency.llm_ms);
        tts.push(t.latency.tts_ms);
        total.push(t.latency.total_ms);
    }
    sqlx::query(
        "INSERT INTO call_turns (call_id, sequence, speaker, text, interrupted, end_of_speech_at, \
                                 first_audio_at, stt_ms, llm_ms, tts_ms, total_ms) \
         SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::bool[], \
                              $6::timestamptz[], $7::timestamptz[], $8::int4[], $9::int4[], \
                              $10::int4[], $11::int4[]) \
         ON CONFLICT (call_id, sequence) DO UPDATE SET \
             speaker = EXCLUDED.speaker, text = EXCLUDED.text, \
             interrupted = EXCLUDED.interrupted, end_of_speech_at = EXCLUDED.end_of_speech_at, \
             first_audio_at = EXCLUDED.first_audio_at, stt_ms = EXCLUDED.stt_ms, \
             llm_ms = EXCLUDED.llm_ms, tts_ms = EXCLUDED.tts_ms, total_ms = EXCLUDED.total_ms, \
             recorded_at = now()",
    )
    .bind(&call_ids)
    .bind(&seqs)
    .bind(&speakers)
    .bind(&texts)
    .bind(&interrupted)
    .bind(&eos)
    .bind(&first_audio)
    .bind(&stt)
    .bind(&llm)
    .bind(&tts)
    .bind(&total)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn upsert_usage(
    conn: &mut PgConnection,
    usage: &[&UsageRecord],
    prices: &PriceTable,
) -> Result<(), sqlx::Error> {
    if usage.is_empty() {
        return Ok(());
    }
    let mut last: HashMap<(Uuid, &str, &str), usize> = HashMap::with_capacity(usage.len());
    for (i, u) in usage.iter().enumerate() {
        last.insert((u.call_id, u.provider.as_str(), u.unit.as_str()), i);
    }
    let n = last.len();
    let mut call_ids = Vec::with_capacity(n);
    let mut providers = Vec::with_capacity(n);
    let mut units = Vec::with_capacity(n);
    let mut quantities = Vec::with_capacity(n);
    let mut unit_prices: Vec<Option<&str>> = Vec::with_capacity(n);
    for (i, u) in usage.iter().enumerate() {
        if last.get(&(u.call_id, u.provider.as_str(), u.unit.as_str())) != Some(&i) {
            continue;
        }
        call_ids.push(u.call_id);
        providers.push(u.provider.as_str());
        units.push(u.unit.as_str());
        quantities.push(u.quantity);
        unit_prices.push(prices.unit_price(&u.provider, u.unit));
    }
    // Prices travel as decimal text and multiply as numeric: exact, no float money.
    // float8 -> numeric keeps 15 significant digits, plenty for seconds and tokens.
    sqlx::query(
        "INSERT INTO call_usage (call_id, provider, unit, quantity, unit_price, cost) \
         SELECT c, p, u, q::numeric, up::numeric, q::numeric * up::numeric \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::float8[], $5::text[]) \
              AS t(c, p, u, q, up) \
         ON CONFLICT (call_id, provider, unit) DO UPDATE SET \
             quantity = EXCLUDED.quantity, unit_price = EXCLUDED.unit_price, \
             cost = EXCLUDED.cost, updated_at = now()",
    )
    .bind(&call_ids)
    .bind(&providers)
    .bind(&units)
    .bind(&quantities)
    .bind(&unit_prices)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn append_memory(conn: &mut PgConnection, m: &MemoryNote) -> Result<(), sqlx::Error> {
    // The flag on the call makes the append happen once per call, however often the
    // batch is retried.
    let claimed =
        sqlx::query("UPDATE calls SET memory_noted = true WHERE id = $1 AND NOT memory_noted")
            .bind(m.call_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    if claimed == 0 {
        tracing::debug!(call_id = %m.call_id, "memory note already appended or call unknown");
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO relationships (user_id, persona) VALUES ($1, $2) \
         ON CONFLICT (user_id, persona) DO NOTHING",
    )
    .bind(strip_nul(&m.user_id))
    .bind(strip_nul(&m.persona))
    .execute(&mut *conn)
    .await?;
    let memory: String = sqlx::query_scalar(
        "SELECT memory FROM relationships WHERE user_id = $1 AND persona = $2 FOR UPDATE",
    )
    .bind(strip_nul(&m.user_id))
    .bind(strip_nul(&m.persona))
    .fetch_one(&mut *conn)
    .await?;
    let updated = append_note(&memory, &strip_nul(&m.note), m.max_chars);
    sqlx::query(
        "UPDATE relationships SET memory = $3, updated_at = now() \
         WHERE user_id = $1 AND persona = $2",
    )
    .bind(strip_nul(&m.user_id))
    .bind(strip_nul(&m.persona))
    .bind(updated)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// PostgreSQL text cannot hold NUL; a stray one from a transcript must not make the
/// database refuse the whole turn.
fn strip_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_owned()
    }
}
