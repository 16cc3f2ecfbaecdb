//! Single use of a signed stream context: the first stream wins.
//!
//! A stream context (the `<Parameter>`s of one answered call) is a bearer credential
//! until it expires: whoever holds it could open a second stream and be served like
//! the real call. So each context is claimed once, keyed by SHA-256 of its signature
//! (unique per signing), before any provider socket opens:
//! - always in this pod's memory (entries live until the context expires);
//! - with PostgreSQL configured, also in `stream_claims`, so the check holds across
//!   pods. A database that does not answer within [`DB_CLAIM_TIMEOUT`] leaves the
//!   per-pod check in force (logged and counted as a database socket error): a call
//!   is not dropped because the database is slow, and a replay would then have to
//!   reach another pod within the context's few seconds of validity.
//!
//! An outbound call's context is signed before Twilio names the call (it travels
//! inline in the Calls API request), so it cannot carry the CallSid the way an
//! inbound one does. [`StreamClaims::placed_call_sid`] closes that gap where the
//! call row exists: once the REST answer is recorded, only the stream of that
//! CallSid may present the context.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::metrics::{Metrics, Peer, SocketErrorKind};

/// Longest wait for the database's answer to a claim.
pub const DB_CLAIM_TIMEOUT: Duration = Duration::from_secs(1);
/// Entries kept in memory at most; expired ones are pruned first. Only contexts
/// with a valid signature get here, so this bounds a flood of legitimate calls.
const MAX_LOCAL_ENTRIES: usize = 100_000;

/// A context presented a second time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("this call context was already used by another stream")]
pub struct AlreadyUsed;

/// The claims of one pod (clones share them).
#[derive(Clone)]
pub struct StreamClaims {
    local: Arc<Mutex<HashMap<[u8; 32], u64>>>,
    pool: Option<PgPool>,
    metrics: Arc<Metrics>,
}

impl StreamClaims {
    /// Claims kept in memory, and in PostgreSQL when `pool` is given.
    pub fn new(pool: Option<PgPool>, metrics: Arc<Metrics>) -> Self {
        Self {
            local: Arc::new(Mutex::new(HashMap::new())),
            pool,
            metrics,
        }
    }

    /// Claims the context signed with `sig` (valid until `expires_at`, Unix seconds)
    /// for the stream of `call_sid`. `Err` when any stream claimed it before.
    pub async fn claim(
        &self,
        sig: &str,
        call_sid: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<(), AlreadyUsed> {
        let key: [u8; 32] = Sha256::digest(sig.as_bytes()).into();
        {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            if local.len() >= MAX_LOCAL_ENTRIES {
                local.retain(|_, exp| *exp >= now);
            }
            if local.contains_key(&key) {
                return Err(AlreadyUsed);
            }
            if local.len() < MAX_LOCAL_ENTRIES {
                local.insert(key, expires_at);
            }
        }
        let Some(pool) = &self.pool else {
            return Ok(());
        };
        let mut hash = String::with_capacity(64);
        for b in key {
            let _ = write!(hash, "{b:02x}");
        }
        let expires = i64::try_from(expires_at).unwrap_or(i64::MAX);
        let insert = sqlx::query(
            "INSERT INTO stream_claims (context_hash, call_sid, expires_at) \
             VALUES ($1, $2, to_timestamp($3)) ON CONFLICT (context_hash) DO NOTHING",
        )
        .bind(&hash)
        .bind(call_sid)
        .bind(expires as f64)
        .execute(pool);
        match tokio::time::timeout(DB_CLAIM_TIMEOUT, insert).await {
            Ok(Ok(done)) if done.rows_affected() == 1 => {
                // Housekeeping, off the call's path: claims are useless once expired.
                let pool = pool.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        DB_CLAIM_TIMEOUT,
                        sqlx::query(
                            "DELETE FROM stream_claims WHERE expires_at < now() - interval '1 hour'",
                        )
                        .execute(&pool),
                    )
                    .await;
                });
                Ok(())
            }
            Ok(Ok(_)) => Err(AlreadyUsed),
            Ok(Err(err)) => {
                self.metrics
                    .socket_error(Peer::Database, SocketErrorKind::Protocol);
                tracing::warn!(error = %err, "stream claim not recorded in PostgreSQL; the per-pod check holds");
                Ok(())
            }
            Err(_) => {
                self.metrics
                    .socket_error(Peer::Database, SocketErrorKind::Timeout);
                tracing::warn!("stream claim timed out in PostgreSQL; the per-pod check holds");
                Ok(())
            }
        }
    }
}

impl StreamClaims {
    /// The CallSid Twilio gave the outbound call `call_id`, as its call row holds it.
    /// `None` without a database, for a call with no row or no CallSid yet, and when
    /// the database does not answer within [`DB_CLAIM_TIMEOUT`] (counted): the
    /// stream is then judged by its signature and single use alone.
    pub async fn placed_call_sid(&self, call_id: &str) -> Option<String> {
        let pool = self.pool.as_ref()?;
        let id = uuid::Uuid::parse_str(call_id).ok()?;
        let lookup =
            sqlx::query_scalar::<_, Option<String>>("SELECT call_sid FROM calls WHERE id = $1")
                .bind(id)
                .fetch_optional(pool);
        match tokio::time::timeout(DB_CLAIM_TIMEOUT, lookup).await {
            Ok(Ok(sid)) => sid.flatten(),
            Ok(Err(err)) => {
                self.metrics
                    .socket_error(Peer::Database, SocketErrorKind::Protocol);
                tracing::warn!(error = %err, "outbound call lookup failed; the stream's signature decides");
                None
            }
            Err(_) => {
                self.metrics
                    .socket_error(Peer::Database, SocketErrorKind::Timeout);
                tracing::warn!("outbound call lookup timed out; the stream's signature decides");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_stream_wins_and_a_second_with_the_same_context_is_refused() {
        // Proves per-pod single use: the same signature twice is refused, another is not.
        let claims = StreamClaims::new(None, Arc::new(Metrics::new()));
        let sid = "CA00000000000000000000000000000001";
        assert_eq!(claims.claim("sig-a", sid, 100, 10).await, Ok(()));
        assert_eq!(claims.claim("sig-a", sid, 100, 10).await, Err(AlreadyUsed));
        assert_eq!(claims.claim("sig-b", sid, 100, 10).await, Ok(()));
    }
}
