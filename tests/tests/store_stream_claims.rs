//! Single use of stream contexts across pods, against a real PostgreSQL: two pods'
//! claim registries sharing one database.

use std::sync::Arc;

use callmeback_tests::postgres::TestDb;
use voice_pod::metrics::Metrics;
use voice_pod::store::{PgStore, StoreConfig};
use voice_pod::twilio::context::unix_now;
use voice_pod::twilio::stream_claims::{AlreadyUsed, StreamClaims};

const SID: &str = "CA0123456789abcdef0123456789abcdef";

async fn pod_claims(db: &TestDb) -> (PgStore, StreamClaims) {
    let metrics = Metrics::new();
    let store = PgStore::start(StoreConfig::new(&db.url), &metrics)
        .await
        .expect("store starts");
    let claims = StreamClaims::new(Some(store.pool().clone()), Arc::new(metrics));
    (store, claims)
}

#[tokio::test]
async fn a_context_claimed_on_one_pod_is_refused_on_another() {
    // Proves the first stream wins cluster-wide: pod B refuses a context pod A
    // claimed (B never saw it in memory), while other contexts still pass on B, and
    // the table keeps only a hash of the signature.
    let db = TestDb::create().await;
    let (_a_store, a) = pod_claims(&db).await;
    let (_b_store, b) = pod_claims(&db).await;
    let now = unix_now();
    assert_eq!(a.claim("sig-one", SID, now + 10, now).await, Ok(()));
    assert_eq!(
        b.claim("sig-one", SID, now + 10, now).await,
        Err(AlreadyUsed)
    );
    assert_eq!(b.claim("sig-two", SID, now + 10, now).await, Ok(()));
    assert_eq!(
        a.claim("sig-two", SID, now + 10, now).await,
        Err(AlreadyUsed)
    );
    let stored: Vec<String> = sqlx::query_scalar("SELECT context_hash FROM stream_claims")
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|h| h.len() == 64 && !h.contains("sig")));
}
