//! The store's writer under write faults: updates that arrive before their call row,
//! a record stuck on a lock, and what it counts when it gives up. Every check counts
//! rows in a real PostgreSQL against what the test submitted.

use std::time::Duration;

use callmeback_tests::postgres::{CuttableProxy, TestDb, metric_value};
use chrono::Utc;
use uuid::Uuid;
use voice_pod::metrics::Metrics;
use voice_pod::session::Direction;
use voice_pod::store::records::{CallRef, CallStatus, CallUpdate, NewCall, Speaker, TurnRecord};
use voice_pod::store::{PgStore, StoreConfig};

const FLUSH: Duration = Duration::from_secs(30);

async fn start(url: String, tune: impl FnOnce(&mut StoreConfig)) -> (PgStore, Metrics) {
    let metrics = Metrics::new();
    let mut cfg = StoreConfig::new(url);
    cfg.writer.backoff_min = Duration::from_millis(20);
    cfg.writer.backoff_max = Duration::from_millis(200);
    cfg.writer.orphan_retry = Duration::from_millis(100);
    cfg.acquire_timeout = Duration::from_millis(500);
    tune(&mut cfg);
    let store = PgStore::start(cfg, &metrics).await.expect("store starts");
    (store, metrics)
}

fn dropped(m: &Metrics, reason: &str) -> f64 {
    metric_value(
        m.registry(),
        "voice_store_dropped_records_total",
        &[("reason", reason)],
    )
}

fn written(m: &Metrics, kind: &str) -> f64 {
    metric_value(
        m.registry(),
        "voice_store_written_records_total",
        &[("kind", kind)],
    )
}

#[derive(Debug, sqlx::FromRow)]
struct CallRow {
    status: String,
    duration_seconds: Option<i32>,
    ended_at: Option<chrono::DateTime<Utc>>,
}

async fn call_row(db: &TestDb, id: Uuid) -> Option<CallRow> {
    let mut conn = db.connect().await;
    sqlx::query_as("SELECT status, duration_seconds, ended_at FROM calls WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut conn)
        .await
        .expect("read call row")
}

// Two pods after an outage: the one holding the terminal status flushes before the one
// holding the call's creation. The update is held until the row exists, the row ends
// `completed` with the right duration, the call counts once in its relationship, and a
// late `ringing` does not move it back.
#[tokio::test]
async fn a_terminal_status_flushed_before_its_creation_record_ends_completed_with_its_duration() {
    let db = TestDb::create().await;
    let held_back = CuttableProxy::start(db.server_addr()).await;
    let (creator, creator_metrics) = start(db.url_via(held_back.addr()), |_| {}).await;
    let (reporter, reporter_metrics) = start(db.url.clone(), |_| {}).await;
    held_back.cut();

    let mut call = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    call.user_id = Some("user-7".into());
    let id = call.id;
    creator.new_call(call).expect("creation taken");
    let ended = Utc::now();
    reporter
        .update_call(
            CallRef::Id(id),
            CallUpdate {
                status: Some(CallStatus::Completed),
                twilio_status: Some("completed".into()),
                ended_at: Some(ended),
                duration_seconds: Some(42),
                ..CallUpdate::default()
            },
        )
        .expect("update taken");
    reporter
        .update_call(
            CallRef::Id(id),
            CallUpdate {
                status: Some(CallStatus::Ringing),
                twilio_status: Some("ringing".into()),
                ..CallUpdate::default()
            },
        )
        .expect("late update taken");
    // The reporter's writer has tried (and found no row) several times over.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(call_row(&db, id).await.is_none(), "no row yet");
    assert_eq!(written(&reporter_metrics, "call_update"), 0.0);

    held_back.restore();
    creator.flush(FLUSH).await.expect("creation flushed");
    reporter.flush(FLUSH).await.expect("held updates flushed");

    let row = call_row(&db, id).await.expect("the call row");
    assert_eq!(row.status, "completed", "{row:?}");
    assert_eq!(row.duration_seconds, Some(42), "{row:?}");
    assert!(row.ended_at.is_some(), "{row:?}");
    let mut conn = db.connect().await;
    let count: i32 = sqlx::query_scalar(
        "SELECT call_count FROM relationships WHERE user_id = 'user-7' AND persona = 'ava'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("relationship row");
    assert_eq!(count, 1);
    assert_eq!(written(&reporter_metrics, "call_update"), 2.0);
    assert_eq!(written(&creator_metrics, "call"), 1.0);
    for m in [&creator_metrics, &reporter_metrics] {
        for reason in ["orphaned", "poison", "rejected", "shutdown"] {
            assert_eq!(dropped(m, reason), 0.0, "{reason}");
        }
    }
    creator.shutdown(Duration::from_secs(5)).await;
    reporter.shutdown(Duration::from_secs(5)).await;
}

// An update whose call row never appears is held for the hold time, then counted as
// orphaned, never as written; a flush waits for that verdict.
#[tokio::test]
async fn an_update_whose_call_never_appears_is_counted_as_orphaned_not_written() {
    let db = TestDb::create().await;
    let (store, metrics) = start(db.url.clone(), |cfg| {
        cfg.writer.orphan_hold = Duration::from_millis(500);
    })
    .await;
    store
        .update_call(
            CallRef::Sid("CA00000000000000000000000000000001".into()),
            CallUpdate {
                status: Some(CallStatus::Completed),
                ..CallUpdate::default()
            },
        )
        .expect("taken");
    let t = std::time::Instant::now();
    store.flush(FLUSH).await.expect("flushed");
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "flush returned before the hold ended: {:?}",
        t.elapsed()
    );
    assert_eq!(dropped(&metrics, "orphaned"), 1.0);
    assert_eq!(written(&metrics, "call_update"), 0.0);
    assert_eq!(
        metric_value(metrics.registry(), "voice_store_pending_records", &[]),
        0.0
    );
    store.shutdown(Duration::from_secs(5)).await;
}

// A batch whose one update waits on a row lock the test holds: the writer splits the
// batch down to that record, sets only it aside (poison, counted), and writes all 100
// turns and the other update around it.
#[tokio::test]
async fn a_record_stuck_on_a_lock_is_set_aside_and_the_rest_of_its_batch_is_written() {
    let db = TestDb::create().await;
    let (store, metrics) = start(db.url.clone(), |cfg| {
        // The server cancels the stuck statement (and its transaction) after 300 ms.
        cfg.statement_timeout = Duration::from_millis(300);
        cfg.writer.write_timeout = Duration::from_secs(5);
    })
    .await;
    let stuck = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    let free = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    let (stuck_id, free_id) = (stuck.id, free.id);
    store.new_call(stuck).unwrap();
    store.new_call(free).unwrap();
    store.flush(FLUSH).await.unwrap();

    // The lock an UPDATE of the row needs, held until the test ends it (turns' foreign
    // key checks take a weaker lock and pass).
    let mut locker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("SELECT 1 FROM calls WHERE id = $1 FOR NO KEY UPDATE")
        .bind(stuck_id)
        .execute(&mut locker)
        .await
        .unwrap();

    let completed = || CallUpdate {
        status: Some(CallStatus::Completed),
        duration_seconds: Some(7),
        ..CallUpdate::default()
    };
    for seq in 0..50 {
        store
            .turn(TurnRecord::new(
                free_id,
                seq,
                Speaker::Caller,
                format!("t{seq}"),
            ))
            .unwrap();
    }
    store
        .update_call(CallRef::Id(stuck_id), completed())
        .unwrap();
    for seq in 50..100 {
        store
            .turn(TurnRecord::new(
                free_id,
                seq,
                Speaker::Persona,
                format!("t{seq}"),
            ))
            .unwrap();
    }
    store
        .update_call(CallRef::Id(free_id), completed())
        .unwrap();
    store.flush(FLUSH).await.expect("the writer went on");

    let mut conn = db.connect().await;
    let turns: i64 = sqlx::query_scalar("SELECT count(*) FROM call_turns WHERE call_id = $1")
        .bind(free_id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(turns, 100);
    assert_eq!(call_row(&db, free_id).await.unwrap().status, "completed");
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let stuck_row = call_row(&db, stuck_id).await.unwrap();
    assert_eq!(stuck_row.status, "in-progress", "{stuck_row:?}");
    assert_eq!(dropped(&metrics, "poison"), 1.0);
    assert_eq!(written(&metrics, "turn"), 100.0);
    assert_eq!(written(&metrics, "call_update"), 1.0);
    for reason in [
        "orphaned",
        "rejected",
        "shutdown",
        "queue_full",
        "buffer_full",
    ] {
        assert_eq!(dropped(&metrics, reason), 0.0, "{reason}");
    }
    store.shutdown(Duration::from_secs(5)).await;
}
