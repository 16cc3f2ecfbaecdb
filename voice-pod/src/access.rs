//! Who is calling the API, and what they may touch.
//!
//! Two kinds of bearer token:
//! - the **admin token** (`CALLMEBACK_API_TOKEN`): places calls to any number the
//!   dial guard allows and reads every call;
//! - **user tokens** (`cmbu_…`, issued by `voice-pod user-token issue`, kept in
//!   PostgreSQL as SHA-256 digests): place calls only to their user's registered
//!   numbers, always as that user, and read or cancel only that user's calls.
//!
//! The digest needs no salt or slow hash: a token is 256 bits from the operating
//! system's random source, so it cannot be guessed from its digest (the same
//! reasoning as GitHub's and Stripe's token storage).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// Longest user id, in characters (a request's `user` and a token's user alike).
pub const MAX_USER_CHARS: usize = 128;

/// Prefix of user tokens (tells a leaked one apart in logs and secret scanners).
pub const USER_TOKEN_PREFIX: &str = "cmbu_";
/// Longest user token accepted (prefix + 43 base64url characters).
const USER_TOKEN_LEN: usize = 5 + 43;

/// Who a request acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The admin token.
    Admin,
    /// A user token.
    User(UserGrant),
}

/// What a user token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserGrant {
    /// The user every call of this token is recorded under.
    pub user: String,
    /// The numbers (E.164) it may place calls to.
    pub numbers: Vec<String>,
}

impl Principal {
    /// The user this principal is confined to (`None` for the admin).
    pub fn confined_to(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::User(grant) => Some(&grant.user),
        }
    }

    /// Whether this principal may see a call recorded under `owner`.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        match self.confined_to() {
            None => true,
            Some(user) => owner == Some(user),
        }
    }
}

/// A token could not be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The operating system's random source failed.
    #[error("no randomness for a token")]
    Random,
    /// A number that is not E.164.
    #[error("{0:?} is not an international number such as +14155550100")]
    BadNumber(String),
    /// A user id that is empty or too long.
    #[error("user ids are 1 to 128 characters")]
    BadUser,
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A new user token: the prefix and 32 random bytes, base64url.
pub fn new_user_token() -> Result<String, AccessError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AccessError::Random)?;
    Ok(format!(
        "{USER_TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Whether `token` is shaped like a user token (checked before any database work).
pub fn is_user_token(token: &str) -> bool {
    token.len() == USER_TOKEN_LEN
        && token.starts_with(USER_TOKEN_PREFIX)
        && token
            .bytes()
            .skip(USER_TOKEN_PREFIX.len())
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// What the database keeps of a token.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Registers `numbers` for `user` and issues a token for them; the token is
/// returned once and never stored.
pub async fn issue_user_token(
    pool: &PgPool,
    user: &str,
    numbers: &[String],
) -> Result<String, AccessError> {
    if user.is_empty() || user.chars().count() > MAX_USER_CHARS {
        return Err(AccessError::BadUser);
    }
    for n in numbers {
        if !callmeback_api::is_e164(n) {
            return Err(AccessError::BadNumber(n.clone()));
        }
    }
    let token = new_user_token()?;
    let mut tx = pool.begin().await?;
    for n in numbers {
        sqlx::query(
            "INSERT INTO user_numbers (user_id, number) VALUES ($1, $2) \
             ON CONFLICT (user_id, number) DO NOTHING",
        )
        .bind(user)
        .bind(n)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("INSERT INTO user_tokens (id, user_id, token_sha256) VALUES ($1, $2, $3)")
        .bind(uuid::Uuid::new_v4())
        .bind(user)
        .bind(token_digest(&token).as_slice())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(token)
}

/// Revokes every token of `user`; returns how many were live.
pub async fn revoke_user_tokens(pool: &PgPool, user: &str) -> Result<u64, AccessError> {
    let done = sqlx::query(
        "UPDATE user_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Removes `number` from `user`'s registered numbers; returns whether it was there.
pub async fn remove_user_number(
    pool: &PgPool,
    user: &str,
    number: &str,
) -> Result<bool, AccessError> {
    let done = sqlx::query("DELETE FROM user_numbers WHERE user_id = $1 AND number = $2")
        .bind(user)
        .bind(number)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The grant of a live user token, or `None` (unknown or revoked).
pub async fn user_grant(pool: &PgPool, token: &str) -> Result<Option<UserGrant>, AccessError> {
    let user: Option<String> = sqlx::query_scalar(
        "SELECT user_id FROM user_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
    )
    .bind(token_digest(token).as_slice())
    .fetch_optional(pool)
    .await?;
    let Some(user) = user else {
        return Ok(None);
    };
    let numbers: Vec<String> =
        sqlx::query_scalar("SELECT number FROM user_numbers WHERE user_id = $1 ORDER BY number")
            .bind(&user)
            .fetch_all(pool)
            .await?;
    Ok(Some(UserGrant { user, numbers }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_tokens_are_prefixed_random_and_recognised_by_shape() {
        let a = new_user_token().unwrap();
        let b = new_user_token().unwrap();
        assert_ne!(a, b);
        assert!(is_user_token(&a), "{a}");
        assert_eq!(a.len(), USER_TOKEN_LEN);
        for bad in [
            "",
            "cmbu_",
            "super-secret-token-123",
            &a[..a.len() - 1],
            &format!("{a}x"),
            &a.replace('_', "!"),
        ] {
            assert!(!is_user_token(bad), "{bad}");
        }
        assert_ne!(token_digest(&a), token_digest(&b));
    }

    #[test]
    fn a_user_sees_only_its_own_calls_and_the_admin_sees_all() {
        let kim = Principal::User(UserGrant {
            user: "kim".into(),
            numbers: vec![],
        });
        assert!(kim.may_see(Some("kim")));
        assert!(!kim.may_see(Some("lee")));
        assert!(!kim.may_see(None));
        assert!(Principal::Admin.may_see(None));
        assert!(Principal::Admin.may_see(Some("lee")));
    }
}
