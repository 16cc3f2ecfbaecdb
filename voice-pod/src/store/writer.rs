//! The bounded asynchronous writer: the only way call records reach PostgreSQL.
//!
//! ```text
//! call side (audio path)        writer task (one per pod)                PostgreSQL
//!  WriterHandle::submit --try_send--> queue (bounded mpsc) --> outage buffer --batch--> tx
//!        never awaits                  drained while writing     (bounded)   retried with backoff
//! ```
//!
//! - The call side only ever calls `try_send`: it never waits for the database, a
//!   full queue drops the record and counts it (`reason="queue_full"`).
//! - The task moves records from the queue into its outage buffer and writes the
//!   buffer's head in batches of up to [`batch::MAX_BATCH`], one transaction each.
//!   It keeps receiving while a batch is in flight or a retry is pending, so the
//!   queue stays empty even when the database hangs.
//! - Transient failures (connection, shutdown, overload) put the batch back and
//!   retry with exponential backoff; when the buffer is full new records are dropped
//!   and counted (`reason="buffer_full"`). A batch the database refuses for good is
//!   written record by record so one bad record cannot block the rest; the refused
//!   one is counted (`reason="rejected"`).
//! - A batch that times out (our deadline or the server's `statement_timeout`) is
//!   split in halves, down to single records. A single record that times out while
//!   the database answers a probe is retried [`POISON_TRIES`] times, then set aside
//!   (`reason="poison"`, a log line naming the call): one stuck statement (a lock
//!   never released) cannot stop the writer. While the probe fails too, the database
//!   is down and nothing is set aside.
//! - A call update that matches no row yet (its creation is still in another pod's
//!   buffer, or further back in this one) is not written: it is held and tried again
//!   every [`WriterConfig::orphan_retry`] for [`WriterConfig::orphan_hold`], then
//!   counted (`reason="orphaned"`). Flushes wait for held updates too.
//! - Every statement is idempotent, so a retry after an unconfirmed commit does not
//!   duplicate anything.
//! - On shutdown the task writes what it can until the deadline and counts the rest
//!   (`reason="shutdown"`; held updates: `reason="orphaned"`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::batch::{self, Written};
use super::error::StoreError;
use super::metrics::{DropReason, StoreMetrics};
use super::pricing::PriceTable;
use super::records::Record;

/// Writer limits and timings.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Records the call side can hand over before the writer picks them up.
    pub queue_capacity: usize,
    /// Records kept while the database is down; beyond this, new records are dropped.
    pub buffer_capacity: usize,
    /// Records per transaction.
    pub max_batch: usize,
    /// First retry delay after a failure.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Deadline for one batch transaction (a hung connection must not stall forever).
    pub write_timeout: Duration,
    /// How long an update whose call row does not exist yet is held and retried.
    pub orphan_hold: Duration,
    /// How often held updates are tried again.
    pub orphan_retry: Duration,
}

/// Times a single record may time out (while the database answers) before it is set
/// aside as poison.
pub const POISON_TRIES: u32 = 3;

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            // ~100 calls x a few records per second leave seconds of slack before the
            // task must run; the task drains continuously anyway.
            queue_capacity: 16_384,
            // At ~300 bytes a record, about 60 MB: minutes of a busy pod's records.
            buffer_capacity: 200_000,
            max_batch: batch::MAX_BATCH,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            // Another pod's buffer can take minutes to flush after an outage.
            orphan_hold: Duration::from_secs(300),
            orphan_retry: Duration::from_secs(1),
        }
    }
}

/// What travels through the queue.
// Records dominate the queue; boxing each would add an allocation per record on the
// call side, which is the path we keep cheapest.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    Record(Record),
    /// Answered once every record submitted before it was written or counted as lost.
    Flush(oneshot::Sender<()>),
}

/// Why a record was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; the record was dropped and counted.
    #[error("the store's queue is full; record dropped")]
    QueueFull,
    /// The writer has shut down; the record was dropped and counted.
    #[error("the store's writer has stopped; record dropped")]
    Closed,
}

/// Seconds between two "dropping records" warnings from the call side.
const DROP_WARN_INTERVAL_SECS: u64 = 10;

/// The call side's end of the writer. Cheap to clone; [`WriterHandle::submit`] never
/// waits.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
    metrics: StoreMetrics,
    /// Unix seconds of the last drop warning (rate-limits logging on the call path).
    last_warn: Arc<AtomicU64>,
}

impl WriterHandle {
    /// Hands a record to the writer without waiting. A full queue or a stopped
    /// writer drops the record and counts it in `voice_store_dropped_records_total`.
    pub fn submit(&self, record: Record) -> Result<(), SubmitError> {
        self.metrics.submitted.inc();
        self.metrics.pending.inc();
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.pending.dec();
                let (reason, err) = match e {
                    mpsc::error::TrySendError::Full(_) => {
                        (DropReason::QueueFull, SubmitError::QueueFull)
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        (DropReason::Shutdown, SubmitError::Closed)
                    }
                };
                self.metrics.drop_records(reason, 1);
                self.warn_drop(err);
                Err(err)
            }
        }
    }

    /// Waits until every record submitted before this call is written (or counted as
    /// lost). Not for the audio path: it waits for the database.
    pub async fn flush(&self) -> Result<(), SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)
    }

    fn warn_drop(&self, err: SubmitError) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_warn.load(Ordering::Relaxed);
        if now >= last + DROP_WARN_INTERVAL_SECS
            && self
                .last_warn
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %err, "call records are being dropped (see voice_store_dropped_records_total)");
        }
    }
}

/// Database reachability as the writer and the lookups see it.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// The last database operation succeeded.
    pub up: AtomicBool,
    /// Migrations have run.
    pub migrated: AtomicBool,
}

/// The pod's price table, swappable at run time (the writer reads a snapshot per batch).
pub(crate) type SharedPrices = Arc<RwLock<Arc<PriceTable>>>;

/// Controls a running writer.
pub(crate) struct WriterControl {
    /// `Some(deadline)`: stop accepting, write until the deadline, then stop.
    shutdown: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl WriterControl {
    /// Stops the writer within `grace` all told: it writes what it can until its
    /// deadline (`grace` less a margin for counting and stopping), and counts the
    /// rest. A task that still has not stopped at `grace` is aborted and its pending
    /// records counted (`reason="shutdown"`).
    pub async fn shutdown(self, grace: Duration, metrics: &StoreMetrics) {
        let margin = (grace / 8).min(Duration::from_secs(1));
        let _ = self
            .shutdown
            .send(Some(Instant::now() + grace.saturating_sub(margin)));
        let abort = self.task.abort_handle();
        if tokio::time::timeout(grace, self.task).await.is_err() {
            abort.abort();
            let left = metrics.pending.get().max(0);
            metrics.pending.set(0);
            metrics.drop_records(DropReason::Shutdown, left as usize);
            tracing::error!(
                records = left,
                "store writer did not stop within its grace period; aborted, its records counted as lost"
            );
        }
    }
}

/// Everything the writing side needs; shared by reference with in-flight writes.
struct Io {
    pool: PgPool,
    migrator: &'static Migrator,
    prices: SharedPrices,
    metrics: StoreMetrics,
    health: Arc<Health>,
    cfg: WriterConfig,
}

/// A call update waiting for its call row.
struct Held {
    record: Record,
    /// First found without a row.
    since: Instant,
    next_try: Instant,
}

/// Batch sizing after timeouts, and the head record's timeouts alone.
struct Pacing {
    limit: usize,
    head_timeouts: u32,
}

/// The receiving side: queue, outage buffer and flush waiters.
struct Queue {
    rx: mpsc::Receiver<Msg>,
    pending: VecDeque<Record>,
    /// Updates whose call row did not exist yet, oldest retry first.
    held: VecDeque<Held>,
    /// Records ever accepted into `pending`; with `pending.len()` it tells how many
    /// left it (written or dropped), which is what flushes wait for.
    accepted: u64,
    flushes: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Every handle is gone, or shutdown closed the queue.
    closed: bool,
    buffer_capacity: usize,
    metrics: StoreMetrics,
    /// Warned about the current overflow episode already.
    overflow_warned: bool,
}

impl Queue {
    fn accept(&mut self, msg: Msg) {
        match msg {
            Msg::Record(r) => {
                if let Err(why) = batch::validate(&r) {
                    self.metrics.pending.dec();
                    self.metrics.drop_records(DropReason::Rejected, 1);
                    tracing::warn!(kind = r.kind(), why, "call record rejected");
                    return;
                }
                if self.pending.len() >= self.buffer_capacity {
                    self.metrics.pending.dec();
                    self.metrics.drop_records(DropReason::BufferFull, 1);
                    if !self.overflow_warned {
                        self.overflow_warned = true;
                        tracing::error!(
                            capacity = self.buffer_capacity,
                            "the database is unavailable and the store's buffer is full: \
                             new call records are dropped (voice_store_dropped_records_total)"
                        );
                    }
                    return;
                }
                self.pending.push_back(r);
                self.accepted += 1;
            }
            Msg::Flush(tx) => self.flushes.push_back((self.accepted, tx)),
        }
    }

    /// Takes whatever is already queued, without waiting.
    fn drain_ready(&mut self, limit: usize) {
        for _ in 0..limit {
            match self.rx.try_recv() {
                Ok(m) => self.accept(m),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
    }

    /// Receives one message (or notes the queue closed).
    async fn recv_one(&mut self) {
        match self.rx.recv().await {
            Some(m) => self.accept(m),
            None => self.closed = true,
        }
    }

    fn ack_flushes(&mut self) {
        let left = self.accepted - (self.pending.len() + self.held.len()) as u64;
        while let Some((mark, _)) = self.flushes.front() {
            if *mark > left {
                break;
            }
            if let Some((_, tx)) = self.flushes.pop_front() {
                let _ = tx.send(());
            }
        }
    }

    /// Puts records that could not be written back at the head, in order.
    fn requeue(&mut self, records: Vec<Record>) {
        for r in records.into_iter().rev() {
            self.pending.push_front(r);
        }
    }

    /// Holds an update whose row does not exist yet (still counted as pending).
    fn hold(&mut self, record: Record, since: Instant, retry: Duration) {
        self.held.push_back(Held {
            record,
            since,
            next_try: Instant::now() + retry,
        });
    }

    /// Counts every held update as orphaned (shutdown).
    fn orphan_all(&mut self) {
        let n = self.held.len();
        if n > 0 {
            for h in self.held.drain(..) {
                tracing::warn!(call = %h.record.call(), "call update never found its call row before shutdown; counted as orphaned");
            }
            self.metrics.pending.sub(n as i64);
            self.metrics.drop_records(DropReason::Orphaned, n);
        }
    }

    fn drop_all(&mut self, reason: DropReason) {
        let n = self.pending.len();
        if n > 0 {
            self.pending.clear();
            self.metrics.pending.sub(n as i64);
            self.metrics.drop_records(reason, n);
            tracing::error!(
                records = n,
                reason = reason.as_str(),
                "call records lost: the database did not take them in time"
            );
        }
    }
}

/// Starts the writer task on the current runtime.
pub(crate) fn spawn(
    pool: PgPool,
    migrator: &'static Migrator,
    prices: SharedPrices,
    metrics: StoreMetrics,
    health: Arc<Health>,
    cfg: WriterConfig,
) -> (WriterHandle, WriterControl) {
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    let (shutdown_tx, shutdown_rx) = watch::channel(None);
    let queue = Queue {
        rx,
        pending: VecDeque::new(),
        held: VecDeque::new(),
        accepted: 0,
        flushes: VecDeque::new(),
        closed: false,
        buffer_capacity: cfg.buffer_capacity,
        metrics: metrics.clone(),
        overflow_warned: false,
    };
    let io = Io {
        pool,
        migrator,
        prices,
        metrics: metrics.clone(),
        health,
        cfg,
    };
    let task = tokio::spawn(run(io, queue, shutdown_rx));
    (
        WriterHandle {
            tx,
            metrics,
            last_warn: Arc::new(AtomicU64::new(0)),
        },
        WriterControl {
            shutdown: shutdown_tx,
            task,
        },
    )
}

/// Outcome of one write attempt.
enum Attempt {
    Done,
    /// Retry after a backoff.
    Retry,
}

async fn run(io: Io, mut q: Queue, mut shutdown: watch::Receiver<Option<Instant>>) {
    let mut backoff = io.cfg.backoff_min;
    let mut retry_at: Option<Instant> = None;
    let mut deadline: Option<Instant> = None;
    let mut pacing = Pacing {
        limit: io.cfg.max_batch.max(1),
        head_timeouts: 0,
    };
    loop {
        q.ack_flushes();
        if deadline.is_none() {
            deadline = *shutdown.borrow_and_update();
            if deadline.is_some() {
                // Stop taking records; the ones already queued still get written.
                q.rx.close();
            }
        }
        if let Some(d) = deadline
            && Instant::now() >= d
        {
            q.drain_ready(usize::MAX);
            q.drop_all(DropReason::Shutdown);
            q.orphan_all();
            break;
        }
        let backed_off = retry_at.is_some_and(|at| Instant::now() < at);
        if !backed_off && q.held.front().is_some_and(|h| h.next_try <= Instant::now()) {
            match retry_held(&io, &mut q, false, deadline).await {
                Attempt::Done => {}
                Attempt::Retry => {
                    retry_at = Some(Instant::now() + jitter(backoff));
                    backoff = (backoff * 2).min(io.cfg.backoff_max);
                }
            }
            continue;
        }
        if q.pending.is_empty() {
            q.drain_ready(usize::MAX);
            if !q.pending.is_empty() {
                continue;
            }
            if q.closed || deadline.is_some() {
                // Held updates get one last try, bounded by the deadline.
                if !q.held.is_empty() {
                    let _ = retry_held(&io, &mut q, true, deadline).await;
                    q.orphan_all();
                }
                q.ack_flushes();
                break;
            }
            let next_held = q.held.front().map(|h| h.next_try);
            tokio::select! {
                () = q.recv_one() => {}
                () = shutdown_requested(&mut shutdown) => {}
                () = sleep_until_opt(next_held) => {}
            }
            continue;
        }
        q.drain_ready(io.cfg.max_batch * 4);
        if let Some(at) = retry_at {
            let at = deadline.map_or(at, |d| at.min(d));
            if Instant::now() < at {
                wait_until(&mut q, &mut shutdown, at).await;
                continue;
            }
        }
        match attempt(&io, &mut q, &mut shutdown, &mut pacing).await {
            Attempt::Done => {
                backoff = io.cfg.backoff_min;
                retry_at = None;
            }
            Attempt::Retry => {
                retry_at = Some(Instant::now() + jitter(backoff));
                backoff = (backoff * 2).min(io.cfg.backoff_max);
            }
        }
    }
    q.ack_flushes();
    // Anyone still waiting is told by the dropped sender.
    q.flushes.clear();
}

/// Sleeps until `at` while still taking records off the queue; returns early when
/// shutdown is requested.
async fn wait_until(q: &mut Queue, shutdown: &mut watch::Receiver<Option<Instant>>, at: Instant) {
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(at) => return,
            () = q.recv_one(), if !q.closed => {}
            () = shutdown_requested(shutdown) => return,
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves when a shutdown deadline is set. A dropped sender never resolves: the
/// writer then ends when the last handle is gone and the queue is empty.
async fn shutdown_requested(shutdown: &mut watch::Receiver<Option<Instant>>) {
    if shutdown.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One write attempt: migrations if still due, then the head batch.
async fn attempt(
    io: &Io,
    q: &mut Queue,
    shutdown: &mut watch::Receiver<Option<Instant>>,
    pacing: &mut Pacing,
) -> Attempt {
    if !io.health.migrated.load(Ordering::Relaxed) {
        let run = tokio::time::timeout(io.cfg.write_timeout, io.migrator.run(&io.pool)).await;
        match run {
            Ok(Ok(())) => {
                io.health.migrated.store(true, Ordering::Relaxed);
                tracing::info!("database migrations applied");
            }
            Ok(Err(e)) => {
                io.failed(&StoreError::Migrate(e));
                return Attempt::Retry;
            }
            Err(_) => {
                io.failed(&StoreError::Timeout(io.cfg.write_timeout));
                return Attempt::Retry;
            }
        }
    }
    let n = q
        .pending
        .len()
        .min(io.cfg.max_batch)
        .min(pacing.limit.max(1));
    let batch: Vec<Record> = q.pending.drain(..n).collect();
    let prices = io.prices_snapshot();
    let started = std::time::Instant::now();
    let result = {
        let write = io.write_batch(&batch, &prices);
        tokio::pin!(write);
        // Keep emptying the queue while the transaction runs: a slow database must
        // not fill it up behind the call side's back. A shutdown deadline that passes
        // mid-write abandons the write (its records are then counted as lost).
        loop {
            let deadline = *shutdown.borrow_and_update();
            tokio::select! {
                biased;
                r = &mut write => break Some(r),
                () = q.recv_one(), if !q.closed => {}
                () = sleep_until_opt(deadline) => break None,
                () = shutdown_requested(shutdown), if deadline.is_none() => {}
            }
        }
    };
    let Some(result) = result else {
        q.requeue(batch);
        return Attempt::Retry;
    };
    match result {
        Ok(written) => {
            io.metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            io.metrics.batches.with_label_values(&["ok"]).inc();
            io.succeeded(&written);
            q.metrics.pending.sub((n - written.orphans.len()) as i64);
            hold_orphans(io, q, batch, &written.orphans);
            q.overflow_warned = false;
            pacing.limit = pacing.limit.saturating_mul(2).min(io.cfg.max_batch.max(1));
            pacing.head_timeouts = 0;
            Attempt::Done
        }
        Err(e) if e.is_timeout() => {
            io.metrics.batches.with_label_values(&["retry"]).inc();
            io.metrics.database_error(e.metric_kind());
            if n > 1 {
                // Smaller batches until the slow record is alone.
                pacing.limit = n / 2;
                tracing::warn!(error = %e, records = n, next = pacing.limit, "batch timed out; splitting it");
                q.requeue(batch);
                return Attempt::Done;
            }
            if !io.probe().await {
                // The database itself does not answer: an outage, not this record.
                io.failed(&e);
                q.requeue(batch);
                return Attempt::Retry;
            }
            pacing.head_timeouts += 1;
            if pacing.head_timeouts < POISON_TRIES {
                tracing::warn!(error = %e, call = %batch[0].call(), kind = batch[0].kind(), tries = pacing.head_timeouts, "a call record timed out alone while the database answers; retrying");
                q.requeue(batch);
                return Attempt::Retry;
            }
            pacing.head_timeouts = 0;
            pacing.limit = io.cfg.max_batch.max(1);
            q.metrics.pending.sub(n as i64);
            io.metrics.drop_records(DropReason::Poison, n);
            for r in &batch {
                tracing::error!(error = %e, call = %r.call(), kind = r.kind(), tries = POISON_TRIES, "a call record timed out alone every time while the database answers; set aside (voice_store_dropped_records_total, reason poison)");
            }
            Attempt::Done
        }
        Err(e) if e.is_transient() => {
            io.metrics.batches.with_label_values(&["retry"]).inc();
            io.failed(&e);
            q.requeue(batch);
            Attempt::Retry
        }
        Err(e) => {
            tracing::warn!(error = %e, records = n, "batch refused; writing its records one by one");
            write_each(io, q, batch, &prices).await
        }
    }
}

/// Writes a refused batch record by record, dropping (and counting) the ones the
/// database refuses for good.
async fn write_each(io: &Io, q: &mut Queue, batch: Vec<Record>, prices: &PriceTable) -> Attempt {
    let mut rest = batch.into_iter();
    while let Some(record) = rest.next() {
        match io.write_batch(std::slice::from_ref(&record), prices).await {
            Ok(written) => {
                io.succeeded(&written);
                if written.orphans.is_empty() {
                    q.metrics.pending.dec();
                } else {
                    q.hold(record, Instant::now(), io.cfg.orphan_retry);
                }
            }
            Err(e) if e.is_transient() => {
                io.failed(&e);
                let mut back = vec![record];
                back.extend(rest);
                q.requeue(back);
                return Attempt::Retry;
            }
            Err(e) => {
                q.metrics.pending.dec();
                io.metrics.drop_records(DropReason::Rejected, 1);
                io.metrics.database_error(e.metric_kind());
                tracing::error!(error = %e, kind = record.kind(), "the database refused a call record; dropped");
            }
        }
    }
    Attempt::Done
}

/// Moves the batch's updates that found no row (`orphans`, indices) into the hold.
fn hold_orphans(io: &Io, q: &mut Queue, batch: Vec<Record>, orphans: &[usize]) {
    if orphans.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut next = orphans.iter().copied().peekable();
    for (i, r) in batch.into_iter().enumerate() {
        if next.peek() == Some(&i) {
            next.next();
            tracing::debug!(call = %r.call(), "call update found no call row yet; holding it");
            q.hold(r, now, io.cfg.orphan_retry);
        }
    }
}

/// Tries the held updates that are due (all of them when `last`) in one batch. Those
/// still without a row go back, or are counted as orphaned once held long enough
/// (or when `last`).
/// `deadline` (shutdown) bounds the write as well as the write timeout.
async fn retry_held(io: &Io, q: &mut Queue, last: bool, deadline: Option<Instant>) -> Attempt {
    let now = Instant::now();
    let mut due = Vec::new();
    while due.len() < io.cfg.max_batch.max(1)
        && q.held.front().is_some_and(|h| last || h.next_try <= now)
    {
        if let Some(h) = q.held.pop_front() {
            due.push(h);
        }
    }
    if due.is_empty() {
        return Attempt::Done;
    }
    let (records, since): (Vec<Record>, Vec<Instant>) =
        due.into_iter().map(|h| (h.record, h.since)).unzip();
    let prices = io.prices_snapshot();
    let until = deadline.unwrap_or_else(|| Instant::now() + io.cfg.write_timeout);
    let result = tokio::time::timeout_at(until, io.write_batch(&records, &prices))
        .await
        .unwrap_or(Err(StoreError::Timeout(io.cfg.write_timeout)));
    match result {
        Ok(written) => {
            io.succeeded(&written);
            let mut next = written.orphans.iter().copied().peekable();
            for (i, (r, since)) in records.into_iter().zip(since).enumerate() {
                if next.peek() != Some(&i) {
                    q.metrics.pending.dec();
                    continue;
                }
                next.next();
                if last || since.elapsed() >= io.cfg.orphan_hold {
                    q.metrics.pending.dec();
                    q.metrics.drop_records(DropReason::Orphaned, 1);
                    tracing::warn!(call = %r.call(), held_s = since.elapsed().as_secs(), "call update never found its call row; counted as orphaned (voice_store_dropped_records_total, reason orphaned)");
                } else {
                    q.held.push_back(Held {
                        record: r,
                        since,
                        next_try: Instant::now() + io.cfg.orphan_retry,
                    });
                }
            }
            Attempt::Done
        }
        Err(e) => {
            io.failed(&e);
            let permanent = !e.is_transient() && !e.is_timeout();
            for (r, since) in records.into_iter().zip(since) {
                if last || (permanent && since.elapsed() >= io.cfg.orphan_hold) {
                    let reason = if last {
                        DropReason::Orphaned
                    } else {
                        DropReason::Rejected
                    };
                    q.metrics.pending.dec();
                    q.metrics.drop_records(reason, 1);
                    tracing::warn!(error = %e, call = %r.call(), reason = reason.as_str(), "held call update not written; counted");
                    continue;
                }
                q.held.push_back(Held {
                    record: r,
                    since,
                    next_try: Instant::now() + io.cfg.orphan_retry,
                });
            }
            Attempt::Retry
        }
    }
}

impl Io {
    /// Whether the database answers at all right now (`SELECT 1` within the write
    /// timeout): tells a stuck record from a database that is down.
    async fn probe(&self) -> bool {
        let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
        matches!(
            tokio::time::timeout(self.cfg.write_timeout, ping).await,
            Ok(Ok(1))
        )
    }

    fn prices_snapshot(&self) -> Arc<PriceTable> {
        match self.prices.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn write_batch(
        &self,
        records: &[Record],
        prices: &PriceTable,
    ) -> Result<Written, StoreError> {
        let work = async {
            let mut tx = self.pool.begin().await?;
            let written = batch::write(&mut tx, records, prices).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(written)
        };
        match tokio::time::timeout(self.cfg.write_timeout, work).await {
            Ok(r) => r.map_err(StoreError::Database),
            Err(_) => Err(StoreError::Timeout(self.cfg.write_timeout)),
        }
    }

    fn succeeded(&self, w: &Written) {
        if !self.health.up.swap(true, Ordering::Relaxed) {
            tracing::info!("database reachable; writing call records");
        }
        self.metrics.up.set(1);
        for (kind, n) in [
            ("call", w.calls),
            ("call_update", w.updates),
            ("turn", w.turns),
            ("usage", w.usage),
            ("memory", w.memory),
        ] {
            if n > 0 {
                self.metrics
                    .written
                    .with_label_values(&[kind])
                    .inc_by(n as u64);
            }
        }
    }

    fn failed(&self, e: &StoreError) {
        self.metrics.database_error(e.metric_kind());
        self.metrics.up.set(0);
        if self.health.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %e, "database unavailable; call records are buffered and retried");
        } else {
            tracing::debug!(error = %e, "database still unavailable");
        }
    }
}

/// ±20 % so that many pods do not retry in lockstep after an outage.
fn jitter(d: Duration) -> Duration {
    let f = rand::random_range(0.8..1.2);
    d.mul_f64(f)
}
