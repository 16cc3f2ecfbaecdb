//! [`PgStore`]: the pod's PostgreSQL persistence, put together.
//!
//! - Start: parse `DATABASE_URL`, open a lazy pool, run the embedded migrations with
//!   a deadline (a database that is down at start does not stop the pod: the writer
//!   runs them when it answers), spawn the writer.
//! - Call side: `record`/`new_call`/`update_call`/`turn`/... hand records to the bounded writer
//!   and return at once ([`super::writer`]).
//! - Call start: [`PgStore::load_relationship`] waits at most `relationship_wait`.
//! - API: [`PgStore::call_detail`], [`PgStore::list_calls`].

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::error::StoreError;
use super::metrics::{DropReason, LookupResult, StoreMetrics};
use super::pricing::PriceTable;
use super::queries::{self, CallDetail, CallFilter, CallSummary};
use super::records::{CallRef, CallUpdate, MemoryNote, NewCall, Record, TurnRecord, UsageRecord};
use super::relationships::{Relationship, RelationshipOverrides};
use super::writer::{self, Health, SubmitError, WriterConfig, WriterControl, WriterHandle};
use crate::metrics::{Metrics, SocketErrorKind};

/// The schema, embedded at compile time from `voice-pod/migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long [`PgStore::shutdown`] waits for the pool to close.
pub const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a call waits for its relationship before starting without it.
pub const DEFAULT_RELATIONSHIP_WAIT: Duration = Duration::from_millis(150);

/// Store settings.
#[derive(Clone)]
pub struct StoreConfig {
    /// `DATABASE_URL` (a secret: never logged).
    pub database_url: String,
    /// USD per unit.
    pub prices: PriceTable,
    /// Bounded wait for the relationship at call start.
    pub relationship_wait: Duration,
    /// How long start-up waits for the migrations before going on without them.
    pub startup_timeout: Duration,
    /// Pool size (the writer uses one connection at a time; the rest serve lookups
    /// and the API).
    pub max_connections: u32,
    /// How long a pool checkout may wait (lookups are bounded tighter by their own
    /// deadline).
    pub acquire_timeout: Duration,
    /// Server-side bound on any statement.
    pub statement_timeout: Duration,
    /// The writer's limits.
    pub writer: WriterConfig,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("database_url", &"<redacted>")
            .field("prices", &self.prices.len())
            .field("relationship_wait", &self.relationship_wait)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    /// Defaults around a database URL.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            prices: PriceTable::default(),
            relationship_wait: DEFAULT_RELATIONSHIP_WAIT,
            startup_timeout: Duration::from_secs(10),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            writer: WriterConfig::default(),
        }
    }
}

/// What `/readyz` details say about persistence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreHealth {
    /// `DATABASE_URL` is unset.
    Disabled,
    /// Records are being written.
    Up,
    /// The database does not answer; records are buffered.
    Unavailable,
}

impl StoreHealth {
    /// A short word for probes.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreHealth::Disabled => "disabled",
            StoreHealth::Up => "up",
            StoreHealth::Unavailable => "unavailable",
        }
    }
}

struct Inner {
    pool: PgPool,
    writer: WriterHandle,
    control: Mutex<Option<WriterControl>>,
    prices: writer::SharedPrices,
    metrics: StoreMetrics,
    health: Arc<Health>,
    relationship_wait: Duration,
}

/// PostgreSQL persistence of calls, transcripts, costs and relationships. Cheap to
/// clone; every clone shares one pool and one writer.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

/// Opens the store when `DATABASE_URL` is set; otherwise says once that the pod runs
/// without persistence and returns `None`.
pub async fn open(
    database_url: Option<&str>,
    configure: impl FnOnce(&mut StoreConfig),
    metrics: &Metrics,
) -> Result<Option<PgStore>, StoreError> {
    match database_url.map(str::trim).filter(|u| !u.is_empty()) {
        None => {
            tracing::info!(
                "persistence disabled: DATABASE_URL is unset; calls are not recorded and \
                 call history answers 503"
            );
            Ok(None)
        }
        Some(url) => {
            let mut cfg = StoreConfig::new(url);
            configure(&mut cfg);
            PgStore::start(cfg, metrics).await.map(Some)
        }
    }
}

impl PgStore {
    /// Connects (lazily), runs migrations with a deadline and starts the writer.
    ///
    /// Only a malformed URL or duplicate metrics fail; an unreachable database is
    /// logged and retried in the background.
    pub async fn start(cfg: StoreConfig, metrics: &Metrics) -> Result<Self, StoreError> {
        let metrics = StoreMetrics::register(metrics)?;
        // The parser's message names the problem, never the URL (which holds the password).
        let options = PgConnectOptions::from_str(&cfg.database_url)
            .map_err(|e| StoreError::Config(e.to_string()))?
            .application_name("voice-pod")
            .options([(
                "statement_timeout",
                format!("{}", cfg.statement_timeout.as_millis()),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections.max(2))
            .acquire_timeout(cfg.acquire_timeout)
            .connect_lazy_with(options);
        let health = Arc::new(Health::default());
        match tokio::time::timeout(cfg.startup_timeout, MIGRATOR.run(&pool)).await {
            Ok(Ok(())) => {
                health.migrated.store(true, Ordering::Relaxed);
                health.up.store(true, Ordering::Relaxed);
                metrics.up.set(1);
                tracing::info!(
                    prices = cfg.prices.len(),
                    "persistence enabled: PostgreSQL schema is current"
                );
            }
            Ok(Err(e)) => {
                let e = StoreError::Migrate(e);
                metrics.database_error(e.metric_kind());
                tracing::warn!(error = %e, "PostgreSQL unavailable at start; calls go on and their records are buffered until it answers");
            }
            Err(_) => {
                metrics.database_error(SocketErrorKind::Timeout);
                tracing::warn!(timeout = ?cfg.startup_timeout, "PostgreSQL did not answer at start; calls go on and their records are buffered until it answers");
            }
        }
        let prices = Arc::new(RwLock::new(Arc::new(cfg.prices)));
        let (writer, control) = writer::spawn(
            pool.clone(),
            &MIGRATOR,
            prices.clone(),
            metrics.clone(),
            health.clone(),
            cfg.writer,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                writer,
                control: Mutex::new(Some(control)),
                prices,
                metrics,
                health,
                relationship_wait: cfg.relationship_wait,
            }),
        })
    }

    /// The pool, for other parts of the pod that own their tables (the scheduler).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The writer's call-side handle.
    pub fn writer(&self) -> &WriterHandle {
        &self.inner.writer
    }

    /// Up, or unavailable (records buffered).
    pub fn health(&self) -> StoreHealth {
        if self.inner.health.up.load(Ordering::Relaxed) {
            StoreHealth::Up
        } else {
            StoreHealth::Unavailable
        }
    }

    /// Replaces the price table (applies to records written from now on).
    pub fn set_prices(&self, prices: PriceTable) {
        let mut guard = match self.inner.prices.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(prices);
    }

    // ---- call side: never waits ------------------------------------------------------

    /// Hands any record to the writer; never waits (see [`WriterHandle::submit`]).
    pub fn record(&self, record: Record) -> Result<(), SubmitError> {
        self.inner.writer.submit(record)
    }

    /// A new call.
    pub fn new_call(&self, call: NewCall) -> Result<(), SubmitError> {
        self.record(Record::CallCreated(call))
    }

    /// A change to a call.
    pub fn update_call(&self, key: CallRef, update: CallUpdate) -> Result<(), SubmitError> {
        self.record(Record::CallUpdated(key, update))
    }

    /// A transcript turn.
    pub fn turn(&self, turn: TurnRecord) -> Result<(), SubmitError> {
        self.record(Record::Turn(turn))
    }

    /// A usage total.
    pub fn usage(&self, usage: UsageRecord) -> Result<(), SubmitError> {
        self.record(Record::Usage(usage))
    }

    /// A memory note.
    pub fn memory_note(&self, note: MemoryNote) -> Result<(), SubmitError> {
        self.record(Record::Memory(note))
    }

    // ---- off the audio path ----------------------------------------------------------

    /// Waits (at most `timeout`) until every record submitted so far is written or
    /// counted as lost.
    pub async fn flush(&self, timeout: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(timeout, self.inner.writer.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Disabled),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    /// Stops the writer: records still pending get until `grace` to reach the
    /// database, the rest are counted as lost. Later submissions are dropped. The pool
    /// then gets [`POOL_CLOSE_TIMEOUT`] to close.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown_within(grace, POOL_CLOSE_TIMEOUT).await;
    }

    /// [`PgStore::shutdown`] with its own bound on closing the pool (a hung database
    /// would hold `close` forever).
    pub async fn shutdown_within(&self, grace: Duration, pool_close: Duration) {
        let control = match self.inner.control.lock() {
            Ok(mut c) => c.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(control) = control {
            control.shutdown(grace, &self.inner.metrics).await;
            let m = &self.inner.metrics;
            let dropped = |r: DropReason| m.dropped.with_label_values(&[r.as_str()]).get();
            let written: u64 = ["call", "call_update", "turn", "usage", "memory"]
                .iter()
                .map(|k| m.written.with_label_values(&[k]).get())
                .sum();
            // The pod's last word on its records: the metrics server stops right after.
            // submitted = written + every dropped_* + pending, exactly.
            tracing::info!(
                submitted = m.submitted.get(),
                pending = m.pending.get(),
                written,
                dropped_shutdown = dropped(DropReason::Shutdown),
                dropped_orphaned = dropped(DropReason::Orphaned),
                dropped_poison = dropped(DropReason::Poison),
                dropped_rejected = dropped(DropReason::Rejected),
                dropped_queue_full = dropped(DropReason::QueueFull),
                dropped_buffer_full = dropped(DropReason::BufferFull),
                "store writer stopped"
            );
        }
        if tokio::time::timeout(pool_close, self.inner.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                limit_ms = pool_close.as_millis() as u64,
                "database pool did not close in time; leaving its connections"
            );
        }
    }

    /// The caller's relationship with a persona, for a call that is starting: waits at
    /// most the configured bound (150 ms by default). Slow, down or failing database:
    /// `None`, the call starts without it, and metrics say so.
    pub async fn load_relationship(&self, user_id: &str, persona: &str) -> Option<Relationship> {
        let m = &self.inner.metrics;
        let wait = self.inner.relationship_wait;
        match tokio::time::timeout(wait, self.relationship(user_id, persona)).await {
            Ok(Ok(Some(r))) => {
                m.lookup(LookupResult::Hit);
                Some(r)
            }
            Ok(Ok(None)) => {
                m.lookup(LookupResult::Miss);
                None
            }
            Ok(Err(e)) => {
                m.lookup(LookupResult::Error);
                m.database_error(e.metric_kind());
                tracing::warn!(error = %e, "relationship lookup failed; the call starts without it");
                None
            }
            Err(_) => {
                m.lookup(LookupResult::Timeout);
                m.database_error(SocketErrorKind::Timeout);
                tracing::warn!(
                    ?wait,
                    "relationship lookup timed out; the call starts without it"
                );
                None
            }
        }
    }

    /// The relationship, without a deadline (API and tests).
    pub async fn relationship(
        &self,
        user_id: &str,
        persona: &str,
    ) -> Result<Option<Relationship>, StoreError> {
        let r = sqlx::query_as::<_, Relationship>(
            "SELECT user_id, persona, custom_system_prompt, custom_voice_id, memory, call_count, \
                    last_call_at, phone_number \
             FROM relationships WHERE user_id = $1 AND persona = $2",
        )
        .bind(user_id)
        .bind(persona)
        .fetch_optional(&self.inner.pool)
        .await?;
        Ok(r)
    }

    /// Sets a caller's prompt or voice override with a persona (creating the
    /// relationship if needed). `Some("")` clears a field. Written directly, not
    /// through the writer: whoever sets it wants to know it worked.
    pub async fn set_relationship_overrides(
        &self,
        user_id: &str,
        persona: &str,
        o: &RelationshipOverrides,
    ) -> Result<Relationship, StoreError> {
        let r = sqlx::query_as::<_, Relationship>(
            "INSERT INTO relationships AS r (user_id, persona, custom_system_prompt, custom_voice_id, phone_number) \
             VALUES ($1, $2, NULLIF($3, ''), NULLIF($4, ''), $5) \
             ON CONFLICT (user_id, persona) DO UPDATE SET \
                 custom_system_prompt = CASE WHEN $3::text IS NULL THEN r.custom_system_prompt \
                                             ELSE NULLIF($3, '') END, \
                 custom_voice_id = CASE WHEN $4::text IS NULL THEN r.custom_voice_id \
                                        ELSE NULLIF($4, '') END, \
                 phone_number = COALESCE($5, r.phone_number), \
                 updated_at = now() \
             RETURNING user_id, persona, custom_system_prompt, custom_voice_id, memory, \
                       call_count, last_call_at, phone_number",
        )
        .bind(user_id)
        .bind(persona)
        .bind(o.custom_system_prompt.as_deref())
        .bind(o.custom_voice_id.as_deref())
        .bind(o.phone_number.as_deref())
        .fetch_one(&self.inner.pool)
        .await?;
        Ok(r)
    }

    /// A call with its transcript and cost breakdown.
    pub async fn call_detail(&self, key: &CallRef) -> Result<Option<CallDetail>, StoreError> {
        Ok(queries::call_detail(&self.inner.pool, key).await?)
    }

    /// Calls, newest first.
    pub async fn list_calls(&self, filter: &CallFilter) -> Result<Vec<CallSummary>, StoreError> {
        Ok(queries::list_calls(&self.inner.pool, filter).await?)
    }
}
