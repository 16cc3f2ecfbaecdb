//! Store writer benchmark against a real PostgreSQL (scripts/postgres.sh).
//!
//! `cargo bench -p callmeback-tests --bench store_writer` measures:
//! 1. the call side's cost of handing over a record (`try_send`), alone and while
//!    100 calls write concurrently;
//! 2. the rows per second the writer sustains for 100 concurrent calls' turns and
//!    usage (queue kept full: the writer is the bottleneck).
//!
//! Under `cargo test` (no `--bench` argument) it runs a small smoke version that
//! checks every record lands, so the benchmark's code stays working.

use std::time::{Duration, Instant};

use callmeback_tests::postgres::{TestDb, metric_value};
use uuid::Uuid;
use voice_pod::metrics::Metrics;
use voice_pod::session::Direction;
use voice_pod::store::records::{
    CallStatus, NewCall, Speaker, TurnLatency, TurnRecord, UsageRecord, UsageUnit,
};
use voice_pod::store::writer::SubmitError;
use voice_pod::store::{PgStore, StoreConfig};

struct Scale {
    calls: usize,
    turns_per_call: i32,
    /// A usage report every this many turns.
    usage_every: i32,
    /// Records timed one by one for the isolated submit cost.
    isolated: usize,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let scale = if bench {
        Scale {
            calls: 100,
            turns_per_call: 1000,
            usage_every: 10,
            isolated: 200_000,
        }
    } else {
        Scale {
            calls: 10,
            turns_per_call: 20,
            usage_every: 5,
            isolated: 1_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(scale, bench));
}

fn turn(call: Uuid, seq: i32) -> TurnRecord {
    let speaker = if seq % 2 == 0 {
        Speaker::Caller
    } else {
        Speaker::Persona
    };
    let mut t = TurnRecord::new(
        call,
        seq,
        speaker,
        "Sure, I can call you back in ten minutes and get you out of that date.",
    );
    t.latency = TurnLatency {
        stt_ms: Some(180),
        llm_ms: Some(240),
        tts_ms: Some(150),
        total_ms: Some(600),
    };
    t
}

async fn run(scale: Scale, bench: bool) {
    let db = TestDb::create().await;
    let metrics = Metrics::new();
    let store = PgStore::start(StoreConfig::new(&db.url), &metrics)
        .await
        .expect("store");

    // 1. Isolated submit cost: bursts that fit in the queue, drained between bursts.
    let call = NewCall::new(Direction::Inbound, "bench", CallStatus::InProgress);
    let iso_call = call.id;
    store.new_call(call).unwrap();
    store.flush(Duration::from_secs(60)).await.unwrap();
    let burst = 4_000usize;
    let mut total = Duration::ZERO;
    let mut n = 0usize;
    let mut seq = 0;
    while n < scale.isolated {
        let records: Vec<TurnRecord> = (0..burst.min(scale.isolated - n))
            .map(|_| {
                seq += 1;
                turn(iso_call, seq)
            })
            .collect();
        let k = records.len();
        let t = Instant::now();
        for r in records {
            store.turn(r).expect("queue has room");
        }
        total += t.elapsed();
        n += k;
        store.flush(Duration::from_secs(60)).await.unwrap();
    }
    let isolated_ns = total.as_nanos() as f64 / n as f64;

    // 2. 100 concurrent calls writing as fast as the writer takes them.
    let before = metric_value(metrics.registry(), "voice_store_written_records_total", &[]);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..scale.calls {
        let store = store.clone();
        let turns = scale.turns_per_call;
        let usage_every = scale.usage_every;
        tasks.push(tokio::spawn(async move {
            let mut call = NewCall::new(Direction::Outbound, "bench", CallStatus::InProgress);
            call.user_id = Some(format!("user-{i}"));
            let id = call.id;
            let mut lat = Vec::with_capacity(turns as usize * 2);
            let mut full = 0u64;
            let submit = |rec: &dyn Fn() -> Result<(), SubmitError>, lat: &mut Vec<u64>| {
                let t = Instant::now();
                let r = rec();
                lat.push(t.elapsed().as_nanos() as u64);
                r
            };
            while submit(&|| store.new_call(call.clone()), &mut lat).is_err() {
                full += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            for seq in 0..turns {
                while submit(&|| store.turn(turn(id, seq)), &mut lat).is_err() {
                    // Bench-only back-pressure: a real call drops and counts instead.
                    full += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if seq % usage_every == 0 {
                    let q = f64::from(seq) * 3.2;
                    while submit(
                        &|| store.usage(UsageRecord::new(id, UsageUnit::SttSeconds, q)),
                        &mut lat,
                    )
                    .is_err()
                    {
                        full += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                if seq % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            (lat, full)
        }));
    }
    let mut lat = Vec::new();
    let mut queue_full = 0;
    for t in tasks {
        let (l, f) = t.await.expect("call task");
        lat.extend(l);
        queue_full += f;
    }
    store.flush(Duration::from_secs(600)).await.unwrap();
    let elapsed = started.elapsed();
    let written =
        metric_value(metrics.registry(), "voice_store_written_records_total", &[]) - before;
    let expected = scale.calls as f64
        * (1.0
            + f64::from(scale.turns_per_call)
            + f64::from((scale.turns_per_call + scale.usage_every - 1) / scale.usage_every));
    assert_eq!(written, expected, "every record written");
    let mut conn = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM call_turns WHERE call_id <> $1")
        .bind(iso_call)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, scale.calls as i64 * i64::from(scale.turns_per_call));
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    let batches = metric_value(metrics.registry(), "voice_store_batch_seconds", &[]);
    store.shutdown(Duration::from_secs(10)).await;

    if bench {
        println!(
            "store_writer: isolated submit (try_send) mean {isolated_ns:.0} ns over {n} records"
        );
        println!(
            "store_writer: {} calls, {written} records in {:.2} s = {:.0} records/s ({batches} batches, {:.0} records/batch)",
            scale.calls,
            elapsed.as_secs_f64(),
            written / elapsed.as_secs_f64(),
            written / batches.max(1.0),
        );
        println!(
            "store_writer: submit under load p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns; queue-full retries {queue_full}",
            pct(0.5),
            pct(0.99),
            pct(0.999),
            lat[lat.len() - 1]
        );
    } else {
        println!("store_writer smoke: {written} records written, all accounted for");
    }
}
