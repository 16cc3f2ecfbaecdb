//! The store when PostgreSQL goes away, hangs or refuses: the call side never waits,
//! records arrive when the database returns, and every loss is counted.

use std::time::{Duration, Instant};

use callmeback_tests::postgres::{CuttableProxy, TestDb, metric_value};
use uuid::Uuid;
use voice_pod::metrics::Metrics;
use voice_pod::session::Direction;
use voice_pod::store::records::{CallStatus, NewCall, Speaker, TurnRecord, UsageRecord, UsageUnit};
use voice_pod::store::writer::{SubmitError, WriterConfig};
use voice_pod::store::{PgStore, StoreConfig, StoreHealth};

const FLUSH: Duration = Duration::from_secs(30);

async fn start_via(
    db: &TestDb,
    proxy: &CuttableProxy,
    tune: impl FnOnce(&mut StoreConfig),
) -> (PgStore, Metrics) {
    let metrics = Metrics::new();
    let mut cfg = StoreConfig::new(db.url_via(proxy.addr()));
    cfg.writer.backoff_min = Duration::from_millis(20);
    cfg.writer.backoff_max = Duration::from_millis(200);
    cfg.acquire_timeout = Duration::from_millis(500);
    tune(&mut cfg);
    let store = PgStore::start(cfg, &metrics).await.expect("store starts");
    (store, metrics)
}

async fn turns_of(db: &TestDb, call: Uuid) -> Vec<(i32, String)> {
    let mut conn = db.connect().await;
    sqlx::query_as("SELECT sequence, text FROM call_turns WHERE call_id = $1 ORDER BY sequence")
        .bind(call)
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

fn dropped(m: &Metrics, reason: &str) -> f64 {
    metric_value(
        m.registry(),
        "voice_store_dropped_records_total",
        &[("reason", reason)],
    )
}

// The database goes away mid-call: every submit returns at once, nothing is lost, and the buffered turns land in order when it returns.
#[tokio::test]
async fn a_database_outage_mid_call_does_not_block_the_call_and_records_arrive_later() {
    let db = TestDb::create().await;
    let proxy = CuttableProxy::start(db.server_addr()).await;
    let (store, metrics) = start_via(&db, &proxy, |_| {}).await;

    let call = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    let id = call.id;
    store.new_call(call).unwrap();
    for seq in 0..10 {
        store
            .turn(TurnRecord::new(
                id,
                seq,
                Speaker::Caller,
                format!("before {seq}"),
            ))
            .unwrap();
    }
    store.flush(FLUSH).await.unwrap();
    assert_eq!(turns_of(&db, id).await.len(), 10);

    proxy.cut();
    // The call goes on: 300 more turns and usage reports while the database is gone.
    let mut slowest = Duration::ZERO;
    for seq in 10..310 {
        let t = Instant::now();
        let r = store.turn(TurnRecord::new(
            id,
            seq,
            Speaker::Persona,
            format!("during {seq}"),
        ));
        slowest = slowest.max(t.elapsed());
        assert_eq!(r, Ok(()), "turn {seq} taken");
        store
            .usage(UsageRecord::new(id, UsageUnit::SttSeconds, seq as f64))
            .unwrap();
    }
    // try_send never waits for the database (which would take the pool's 500 ms
    // acquire timeout at least); the bound is generous for a loaded CI machine.
    assert!(
        slowest < Duration::from_millis(250),
        "slowest submit {slowest:?}"
    );

    // While it is down nothing new arrives, the writer notices, and records wait.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(turns_of(&db, id).await.len(), 10);
    assert_eq!(store.health(), StoreHealth::Unavailable);
    assert!(metric_value(metrics.registry(), "voice_store_pending_records", &[]) > 0.0);
    assert!(
        metric_value(
            metrics.registry(),
            "voice_socket_errors_total",
            &[("peer", "database")]
        ) > 0.0
    );
    assert_eq!(metric_value(metrics.registry(), "voice_store_up", &[]), 0.0);

    proxy.restore();
    store.flush(FLUSH).await.unwrap();
    let turns = turns_of(&db, id).await;
    assert_eq!(turns.len(), 310);
    assert_eq!(turns[10], (10, "during 10".to_owned()));
    assert_eq!(turns[309], (309, "during 309".to_owned()));
    let mut conn = db.connect().await;
    let stt: String =
        sqlx::query_scalar("SELECT quantity::text FROM call_usage WHERE call_id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(stt, "309", "the last usage total wins");
    for reason in ["queue_full", "buffer_full", "rejected", "shutdown"] {
        assert_eq!(dropped(&metrics, reason), 0.0, "{reason}");
    }
    assert_eq!(store.health(), StoreHealth::Up);
    assert_eq!(
        metric_value(metrics.registry(), "voice_store_pending_records", &[]),
        0.0
    );
    store.shutdown(Duration::from_secs(5)).await;
}

// When the outage outlasts the buffer, the overflow is dropped and counted: written + dropped = submitted, exactly.
#[tokio::test]
async fn buffer_overflow_during_an_outage_is_counted_not_silent() {
    let db = TestDb::create().await;
    let proxy = CuttableProxy::start(db.server_addr()).await;
    let (store, metrics) = start_via(&db, &proxy, |cfg| {
        cfg.writer = WriterConfig {
            queue_capacity: 16,
            buffer_capacity: 100,
            ..cfg.writer.clone()
        };
    })
    .await;
    let call = NewCall::new(Direction::Outbound, "ava", CallStatus::InProgress);
    let id = call.id;
    store.new_call(call).unwrap();
    store.flush(FLUSH).await.unwrap();

    proxy.cut();
    const SUBMITTED: i32 = 500;
    let mut refused = 0;
    for seq in 0..SUBMITTED {
        match store.turn(TurnRecord::new(id, seq, Speaker::Caller, format!("t{seq}"))) {
            Ok(()) => {}
            Err(SubmitError::QueueFull) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
        if seq % 8 == 0 {
            // Let the writer move the queue into its buffer now and then.
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    store.flush(FLUSH).await.unwrap();

    let written = turns_of(&db, id).await.len() as f64;
    let lost = dropped(&metrics, "queue_full") + dropped(&metrics, "buffer_full");
    assert_eq!(dropped(&metrics, "queue_full"), refused as f64);
    assert!(lost > 0.0, "the buffer of 100 overflowed");
    assert!(written >= 100.0, "the buffer's worth arrived: {written}");
    assert_eq!(written + lost, SUBMITTED as f64);
    store.shutdown(Duration::from_secs(5)).await;
}

// A database that hangs cannot hold a call's start: the relationship lookup gives up after its bound and says so.
#[tokio::test]
async fn a_hanging_database_does_not_delay_call_start_past_the_bound() {
    let db = TestDb::create().await;
    let proxy = CuttableProxy::start(db.server_addr()).await;
    let (store, metrics) = start_via(&db, &proxy, |_| {}).await;
    proxy.stall();
    let t = Instant::now();
    let rel = store.load_relationship("sam", "ava").await;
    let took = t.elapsed();
    assert!(rel.is_none());
    assert!(
        took >= Duration::from_millis(140) && took < Duration::from_millis(1000),
        "lookup took {took:?}"
    );
    let registry = metrics.registry();
    assert_eq!(
        metric_value(
            registry,
            "voice_store_relationship_lookups_total",
            &[("result", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            registry,
            "voice_socket_errors_total",
            &[("peer", "database"), ("kind", "timeout")]
        ),
        1.0
    );
    proxy.restore();
    store.shutdown(Duration::from_secs(2)).await;
}

// The pod starts while the database is down; the schema and the buffered records arrive once it answers.
#[tokio::test]
async fn a_pod_started_while_the_database_is_down_catches_up() {
    let db = TestDb::create().await;
    let proxy = CuttableProxy::start(db.server_addr()).await;
    proxy.cut();
    let (store, _metrics) = start_via(&db, &proxy, |cfg| {
        cfg.startup_timeout = Duration::from_millis(300);
    })
    .await;
    assert_eq!(store.health(), StoreHealth::Unavailable);
    let call = NewCall::new(Direction::Inbound, "ava", CallStatus::Ringing);
    let id = call.id;
    store.new_call(call).unwrap();
    store
        .turn(TurnRecord::new(id, 0, Speaker::Persona, "Hello"))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    store.flush(FLUSH).await.unwrap();
    assert_eq!(turns_of(&db, id).await, [(0, "Hello".to_owned())]);
    store.shutdown(Duration::from_secs(5)).await;
}

// A record the database refuses (a turn for a call it never saw) is dropped and counted; the rest of its batch is written.
#[tokio::test]
async fn a_refused_record_does_not_block_the_rest_of_its_batch() {
    let db = TestDb::create().await;
    let metrics = Metrics::new();
    let store = PgStore::start(StoreConfig::new(&db.url), &metrics)
        .await
        .unwrap();
    let call = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    let id = call.id;
    store.new_call(call).unwrap();
    store
        .turn(TurnRecord::new(id, 0, Speaker::Caller, "kept"))
        .unwrap();
    store
        .turn(TurnRecord::new(
            Uuid::new_v4(),
            0,
            Speaker::Caller,
            "orphan",
        ))
        .unwrap();
    store
        .turn(TurnRecord::new(id, 1, Speaker::Persona, "kept too"))
        .unwrap();
    store
        .usage(UsageRecord::new(id, UsageUnit::SttSeconds, f64::NAN))
        .unwrap();
    store.flush(FLUSH).await.unwrap();
    assert_eq!(
        turns_of(&db, id).await,
        [(0, "kept".to_owned()), (1, "kept too".to_owned())]
    );
    assert_eq!(dropped(&metrics, "rejected"), 2.0);
    store.shutdown(Duration::from_secs(5)).await;
}

// Shutdown while the database is down waits only its grace, counts what it could not write, and refuses later records.
#[tokio::test]
async fn shutdown_during_an_outage_counts_the_unwritten_records() {
    let db = TestDb::create().await;
    let proxy = CuttableProxy::start(db.server_addr()).await;
    let (store, metrics) = start_via(&db, &proxy, |_| {}).await;
    let call = NewCall::new(Direction::Inbound, "ava", CallStatus::InProgress);
    let id = call.id;
    store.new_call(call).unwrap();
    store.flush(FLUSH).await.unwrap();
    proxy.cut();
    for seq in 0..25 {
        store
            .turn(TurnRecord::new(id, seq, Speaker::Caller, "lost"))
            .unwrap();
    }
    let t = Instant::now();
    store.shutdown(Duration::from_millis(400)).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert_eq!(dropped(&metrics, "shutdown"), 25.0);
    assert_eq!(
        store.turn(TurnRecord::new(id, 99, Speaker::Caller, "late")),
        Err(SubmitError::Closed)
    );
    assert_eq!(dropped(&metrics, "shutdown"), 26.0);
}
