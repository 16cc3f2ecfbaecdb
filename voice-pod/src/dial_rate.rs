//! Dial rate limits: how often `POST /v1/calls` may ring one number, and how many
//! calls one user may ask for, over a sliding window.
//!
//! The dial guard ([`crate::dial_guard`]) decides *which* numbers may be rung; this
//! decides *how often*. A dialler without it is a harassment tool even when every
//! number it rings is allowed. Two limits, each `N/duration`:
//! `CALLMEBACK_DIAL_LIMIT_PER_NUMBER` (default [`DEFAULT_PER_NUMBER`]) for every
//! destination, `CALLMEBACK_DIAL_LIMIT_PER_USER` (default [`DEFAULT_PER_USER`]) for
//! calls that name a user or come with a user token; `off` disables one.
//!
//! Counting is the sliding-window estimate over two fixed windows (the one nginx
//! and Cloudflare use): the previous window's count weighs by the share of it the
//! sliding window still covers. With PostgreSQL configured the counters live in
//! `dial_rate_windows` and hold across pods, and a request's number and user
//! counters move in one transaction, so a refused request consumes neither. Without
//! PostgreSQL, or while it does not answer, each pod counts in memory: a limit per
//! pod, looser by the number of pods, never off.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Default limit per destination number: a callback service rings one person a few
/// times an hour at most.
pub const DEFAULT_PER_NUMBER: RateLimit = RateLimit {
    max: 5,
    per: Duration::from_secs(3600),
};
/// Default limit per user.
pub const DEFAULT_PER_USER: RateLimit = RateLimit {
    max: 20,
    per: Duration::from_secs(3600),
};

/// Bound on the limiter's database transaction; past it the pod counts in memory.
const DB_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys the in-memory counters hold before stale ones are swept.
const MEMORY_SWEEP_AT: usize = 10_000;
/// Every this many admissions, windows no limit can still read are deleted.
const PRUNE_EVERY: u64 = 256;

/// At most `max` calls in any `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls allowed in one window (at least 1).
    pub max: u32,
    /// The sliding window (1 s to 31 days).
    pub per: Duration,
}

impl RateLimit {
    /// Parses `N/duration` (`5/1h`, `20/1d`, `3/10m`) or `off` (`None`).
    pub fn parse(raw: &str) -> Result<Option<RateLimit>, String> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let (max, per) = raw
            .split_once('/')
            .ok_or_else(|| format!("{raw:?} is not N/duration such as 5/1h, or off"))?;
        let max: u32 = max
            .trim()
            .parse()
            .map_err(|_| format!("{max:?} is not a whole number of calls"))?;
        if max == 0 {
            return Err("the number of calls must be at least 1 (or the limit `off`)".into());
        }
        let per = crate::duration::parse_duration(per.trim())?;
        if per < Duration::from_secs(1) || per > Duration::from_secs(31 * 24 * 3600) {
            return Err("the window must be between 1s and 31d".into());
        }
        Ok(Some(RateLimit { max, per }))
    }

    fn per_ms(&self) -> i64 {
        // Bounded by `parse` (31 days), so the cast cannot truncate.
        i64::try_from(self.per.as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    }
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.max, humantime::format_duration(self.per))
    }
}

/// Both limits of a deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DialLimits {
    /// Calls to one destination number.
    pub per_number: Option<RateLimit>,
    /// Calls for one user.
    pub per_user: Option<RateLimit>,
}

impl Default for DialLimits {
    fn default() -> Self {
        Self {
            per_number: Some(DEFAULT_PER_NUMBER),
            per_user: Some(DEFAULT_PER_USER),
        }
    }
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// One destination number.
    Number,
    /// One user.
    User,
}

/// A request over a limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} over its limit of {limit}; retry in {} s", match .counted { Counted::Number => "this number is", Counted::User => "this user is" }, .retry_after.as_secs().max(1))]
pub struct RateRefusal {
    /// Which limit.
    pub counted: Counted,
    /// The limit.
    pub limit: RateLimit,
    /// When one more call would be admitted (an upper bound if others call meanwhile).
    pub retry_after: Duration,
}

impl RateRefusal {
    /// Label of `voice_refusals_total{reason}` and the API's `error` code.
    pub fn metric_label(&self) -> &'static str {
        match self.counted {
            Counted::Number => "rate_limited_number",
            Counted::User => "rate_limited_user",
        }
    }
}

/// Where `now` falls: the fixed window it is in and how far into it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    start_ms: i64,
    /// Share of the current window elapsed, `0.0..1.0`.
    elapsed: f64,
}

fn window(limit: RateLimit, now_ms: i64) -> Window {
    let per = limit.per_ms();
    let start_ms = now_ms.div_euclid(per).saturating_mul(per);
    let into = now_ms.saturating_sub(start_ms);
    Window {
        start_ms,
        elapsed: into as f64 / per as f64,
    }
}

/// One more call is admitted while the current window's count is below this: the
/// limit minus the previous window's still-covered share, rounded down.
fn admit_below(limit: RateLimit, prev: u32, elapsed: f64) -> i64 {
    let room = f64::from(limit.max) - f64::from(prev) * (1.0 - elapsed);
    room.floor() as i64
}

/// How long until one more call would be admitted, if nobody else calls.
fn retry_after(limit: RateLimit, prev: u32, cur: u32, elapsed: f64) -> Duration {
    let per = limit.per.as_secs_f64();
    let max = f64::from(limit.max);
    let (prev, cur) = (f64::from(prev), f64::from(cur));
    // Still in this window: the previous window's weight falls until
    // prev * (1 - e) + cur + 1 <= max.
    if cur + 1.0 <= max && prev > 0.0 {
        let needed = (1.0 - (max - cur - 1.0) / prev).max(elapsed);
        if needed < 1.0 {
            return Duration::from_secs_f64((needed - elapsed) * per + 0.001);
        }
    }
    // In the next window, where this window's count is the previous one.
    let needed_next = if cur > 0.0 {
        (1.0 - (max - 1.0) / cur).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Duration::from_secs_f64(((1.0 - elapsed) + needed_next) * per + 0.001)
}

/// One key's counters in memory.
#[derive(Clone, Copy, Debug, Default)]
struct MemoryCounter {
    start_ms: i64,
    cur: u32,
    prev: u32,
}

impl MemoryCounter {
    /// Moves the counter to the window starting at `start_ms`.
    fn roll(&mut self, start_ms: i64, per_ms: i64) {
        if start_ms == self.start_ms {
            return;
        }
        self.prev = if start_ms == self.start_ms.saturating_add(per_ms) {
            self.cur
        } else {
            0
        };
        self.cur = 0;
        self.start_ms = start_ms;
    }
}

/// The pod's dial rate limiter.
pub struct DialRate {
    limits: DialLimits,
    pool: Option<PgPool>,
    memory: Mutex<HashMap<String, MemoryCounter>>,
    admissions: AtomicU64,
}

/// One limit to check for one request.
struct Check<'a> {
    counted: Counted,
    key: String,
    limit: &'a RateLimit,
}

impl DialRate {
    /// A limiter counting in `pool` when given, in memory otherwise.
    pub fn new(limits: DialLimits, pool: Option<PgPool>) -> Self {
        Self {
            limits,
            pool,
            memory: Mutex::new(HashMap::new()),
            admissions: AtomicU64::new(0),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> DialLimits {
        self.limits
    }

    /// Admits one call to `to` (E.164) for `user`, counting it against both limits,
    /// or refuses it without counting it anywhere.
    pub async fn admit(&self, to: &str, user: Option<&str>) -> Result<(), RateRefusal> {
        let checks = self.checks(to, user);
        if checks.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        if let Some(pool) = &self.pool {
            let n = self.admissions.fetch_add(1, Ordering::Relaxed);
            let prune = n.is_multiple_of(PRUNE_EVERY);
            match tokio::time::timeout(DB_TIMEOUT, admit_in_db(pool, &checks, now, prune)).await {
                Ok(Ok(verdict)) => return verdict,
                Ok(Err(err)) => tracing::warn!(
                    error = %err,
                    "dial rate limits counted in this pod's memory: the database failed"
                ),
                Err(_) => tracing::warn!(
                    "dial rate limits counted in this pod's memory: the database did not answer in time"
                ),
            }
        }
        self.admit_in_memory(&checks, now.timestamp_millis())
    }

    /// The limits that apply to a call to `to` for `user`, with their counter keys.
    fn checks(&self, to: &str, user: Option<&str>) -> Vec<Check<'_>> {
        let mut checks = Vec::with_capacity(2);
        if let Some(limit) = &self.limits.per_number {
            checks.push(Check {
                counted: Counted::Number,
                key: format!("to:{to}"),
                limit,
            });
        }
        if let (Some(limit), Some(user)) = (&self.limits.per_user, user) {
            checks.push(Check {
                counted: Counted::User,
                key: format!("user:{user}"),
                limit,
            });
        }
        checks
    }

    fn admit_in_memory(&self, checks: &[Check<'_>], now_ms: i64) -> Result<(), RateRefusal> {
        let mut map = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MEMORY_SWEEP_AT {
            let longest = [self.limits.per_number, self.limits.per_user]
                .iter()
                .flatten()
                .map(RateLimit::per_ms)
                .max()
                .unwrap_or(1);
            let horizon = now_ms.saturating_sub(longest.saturating_mul(2));
            map.retain(|_, c| c.start_ms >= horizon);
        }
        // Check every limit first, then count: a refusal consumes nothing.
        let mut rolled = Vec::with_capacity(checks.len());
        for check in checks {
            let w = window(*check.limit, now_ms);
            let mut counter = map.get(&check.key).copied().unwrap_or(MemoryCounter {
                start_ms: w.start_ms,
                ..MemoryCounter::default()
            });
            counter.roll(w.start_ms, check.limit.per_ms());
            if i64::from(counter.cur) >= admit_below(*check.limit, counter.prev, w.elapsed) {
                return Err(RateRefusal {
                    counted: check.counted,
                    limit: *check.limit,
                    retry_after: retry_after(*check.limit, counter.prev, counter.cur, w.elapsed),
                });
            }
            rolled.push(counter);
        }
        for (check, mut counter) in checks.iter().zip(rolled) {
            counter.cur = counter.cur.saturating_add(1);
            map.insert(check.key.clone(), counter);
        }
        Ok(())
    }
}

fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// The transaction behind [`DialRate::admit`] with PostgreSQL: per limit, read the
/// previous window, then raise the current window's counter only while it is below
/// the bound (an atomic conditional upsert, so concurrent pods cannot both take the
/// last slot). Any refusal rolls back the counters already raised.
async fn admit_in_db(
    pool: &PgPool,
    checks: &[Check<'_>],
    now: DateTime<Utc>,
    prune: bool,
) -> Result<Result<(), RateRefusal>, sqlx::Error> {
    let now_ms = now.timestamp_millis();
    let mut tx = pool.begin().await?;
    for check in checks {
        let w = window(*check.limit, now_ms);
        let prev_start = at_ms(w.start_ms.saturating_sub(check.limit.per_ms()));
        let start = at_ms(w.start_ms);
        let prev: Option<i32> = sqlx::query_scalar(
            "SELECT count FROM dial_rate_windows WHERE key = $1 AND window_start = $2",
        )
        .bind(&check.key)
        .bind(prev_start)
        .fetch_optional(&mut *tx)
        .await?;
        let prev = prev.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        let bound = admit_below(*check.limit, prev, w.elapsed);
        let raised: Option<i32> = if bound <= 0 {
            None
        } else {
            sqlx::query_scalar(
                "INSERT INTO dial_rate_windows (key, window_start, count) VALUES ($1, $2, 1) \
                 ON CONFLICT (key, window_start) DO UPDATE \
                 SET count = dial_rate_windows.count + 1 \
                 WHERE dial_rate_windows.count < $3 \
                 RETURNING count",
            )
            .bind(&check.key)
            .bind(start)
            .bind(i32::try_from(bound).unwrap_or(i32::MAX))
            .fetch_optional(&mut *tx)
            .await?
        };
        if raised.is_none() {
            let cur: Option<i32> = sqlx::query_scalar(
                "SELECT count FROM dial_rate_windows WHERE key = $1 AND window_start = $2",
            )
            .bind(&check.key)
            .bind(start)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            let cur = cur.and_then(|c| u32::try_from(c).ok()).unwrap_or(0);
            return Ok(Err(RateRefusal {
                counted: check.counted,
                limit: *check.limit,
                retry_after: retry_after(*check.limit, prev, cur, w.elapsed),
            }));
        }
        // This key never needs more than its current and previous windows.
        sqlx::query("DELETE FROM dial_rate_windows WHERE key = $1 AND window_start < $2")
            .bind(&check.key)
            .bind(prev_start)
            .execute(&mut *tx)
            .await?;
    }
    if prune {
        // Keys not used again keep their rows until this sweep.
        let longest = checks.iter().map(|c| c.limit.per_ms()).max().unwrap_or(1);
        sqlx::query("DELETE FROM dial_rate_windows WHERE window_start < $1")
            .bind(at_ms(now_ms.saturating_sub(longest.saturating_mul(2))))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn limit(max: u32, per: Duration) -> RateLimit {
        RateLimit { max, per }
    }

    #[test]
    fn limits_parse_counts_windows_and_off() {
        assert_eq!(RateLimit::parse("5/1h"), Ok(Some(limit(5, HOUR))));
        assert_eq!(
            RateLimit::parse(" 20 / 1d "),
            Ok(Some(limit(20, Duration::from_secs(86_400))))
        );
        assert_eq!(RateLimit::parse("OFF"), Ok(None));
        for bad in ["5", "0/1h", "-1/1h", "5/0s", "5/40d", "x/1h", "5/soon", ""] {
            assert!(RateLimit::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(limit(5, HOUR).to_string(), "5/1h");
    }

    // The sliding estimate: a full previous window blocks the start of the next and
    // frees slots as it slides out.
    #[test]
    fn the_previous_window_weighs_by_its_overlap() {
        let l = limit(10, HOUR);
        assert_eq!(admit_below(l, 0, 0.0), 10);
        assert_eq!(admit_below(l, 10, 0.0), 0);
        assert_eq!(admit_below(l, 10, 0.5), 5);
        assert_eq!(admit_below(l, 10, 0.95), 9);
        assert_eq!(admit_below(l, 3, 0.0), 7);
    }

    #[test]
    fn retry_after_is_when_the_estimate_admits_one_more() {
        let l = limit(10, HOUR);
        // 10 in the previous window, none now, at the window's start: one slot frees
        // when 10 % of the previous window has slid out (6 min).
        let r = retry_after(l, 10, 0, 0.0);
        assert!((r.as_secs_f64() - 360.0).abs() < 1.0, "{r:?}");
        // Full current window, half elapsed: the rest of this window, then 10 % of
        // the next.
        let r = retry_after(l, 0, 10, 0.5);
        assert!((r.as_secs_f64() - 1800.0 - 360.0).abs() < 1.0, "{r:?}");
        // A limit of 1: the whole next window must pass the one call.
        let r = retry_after(limit(1, HOUR), 0, 1, 0.25);
        assert!((r.as_secs_f64() - 2700.0 - 3600.0).abs() < 1.0, "{r:?}");
    }

    fn memory(per_number: Option<RateLimit>, per_user: Option<RateLimit>) -> DialRate {
        DialRate::new(
            DialLimits {
                per_number,
                per_user,
            },
            None,
        )
    }

    fn checks<'a>(rate: &'a DialRate, to: &str, user: Option<&str>) -> Vec<Check<'a>> {
        rate.checks(to, user)
    }

    #[test]
    fn memory_counts_per_number_and_refuses_past_the_limit() {
        let rate = memory(Some(limit(3, HOUR)), None);
        let t0 = 1_800_000_000_000; // a window start (multiple of an hour)
        for _ in 0..3 {
            assert!(rate.admit_in_memory(&checks(&rate, "+1", None), t0).is_ok());
        }
        let refusal = rate
            .admit_in_memory(&checks(&rate, "+1", None), t0)
            .unwrap_err();
        assert_eq!(refusal.metric_label(), "rate_limited_number");
        assert!(refusal.retry_after > Duration::from_secs(3600));
        // Another number has its own budget.
        assert!(rate.admit_in_memory(&checks(&rate, "+2", None), t0).is_ok());
        // Two windows later everything has slid out.
        let later = t0 + 2 * 3_600_000;
        assert!(
            rate.admit_in_memory(&checks(&rate, "+1", None), later)
                .is_ok()
        );
    }

    // A refusal by the user limit does not use up the number's budget, and the
    // reverse.
    #[test]
    fn a_refused_request_consumes_neither_counter() {
        let rate = memory(Some(limit(2, HOUR)), Some(limit(1, HOUR)));
        let t0 = 1_800_000_000_000;
        assert!(
            rate.admit_in_memory(&checks(&rate, "+1", Some("kim")), t0)
                .is_ok()
        );
        let refusal = rate
            .admit_in_memory(&checks(&rate, "+1", Some("kim")), t0)
            .unwrap_err();
        assert_eq!(refusal.counted, Counted::User);
        // The number still has exactly one slot left.
        assert!(rate.admit_in_memory(&checks(&rate, "+1", None), t0).is_ok());
        assert_eq!(
            rate.admit_in_memory(&checks(&rate, "+1", None), t0)
                .unwrap_err()
                .counted,
            Counted::Number
        );
    }

    #[test]
    fn memory_sweeps_stale_keys_at_its_bound() {
        let rate = memory(Some(limit(1, Duration::from_secs(1))), None);
        for i in 0..MEMORY_SWEEP_AT {
            let _ = rate.admit_in_memory(&checks(&rate, &format!("+{i}"), None), 0);
        }
        let _ = rate.admit_in_memory(&checks(&rate, "+new", None), 3_600_000);
        let held = rate.memory.lock().map(|m| m.len()).unwrap_or(usize::MAX);
        assert!(held <= 2, "stale keys swept, {held} held");
    }

    proptest::proptest! {
        // Whatever the sequence of requests and clock, no window admits more than the
        // limit: the sliding estimate never exceeds it, so neither does any one window.
        #[test]
        fn no_fixed_window_admits_more_than_the_limit(
            max in 1u32..8,
            steps in proptest::collection::vec(0i64..900_000, 1..200),
        ) {
            let l = limit(max, HOUR);
            let rate = memory(Some(l), None);
            let mut now = 1_800_000_000_000i64;
            let mut per_window: HashMap<i64, u32> = HashMap::new();
            for step in steps {
                now += step;
                if rate.admit_in_memory(&checks(&rate, "+1", None), now).is_ok() {
                    *per_window.entry(window(l, now).start_ms).or_default() += 1;
                }
            }
            proptest::prop_assert!(per_window.values().all(|&n| n <= max));
        }

        #[test]
        fn any_limit_text_parses_or_errs_without_panic(raw in ".{0,30}") {
            let _ = RateLimit::parse(&raw);
        }
    }
}
