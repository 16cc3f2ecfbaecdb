//! Store errors, and which database failures are worth a retry.

use crate::metrics::SocketErrorKind;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `DATABASE_URL` does not parse.
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    Config(String),
    /// Persistence is off (`DATABASE_URL` unset).
    #[error("persistence is disabled (DATABASE_URL is unset)")]
    Disabled,
    /// A database operation failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A deadline passed.
    #[error("the database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The store's metrics could not be registered.
    #[error("cannot register the store's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A value read back from the database is not one we write.
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether retrying later may succeed (the database is down, restarting,
    /// overloaded) as opposed to a refusal that will repeat forever.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => is_transient(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => is_transient(e),
            StoreError::Timeout(_) => true,
            _ => false,
        }
    }

    /// The write ran out of time: our deadline, or the server's `statement_timeout` /
    /// `lock_timeout` (SQLSTATE 57014, 55P03). A batch that times out is split.
    pub fn is_timeout(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Database(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|c| c == "57014" || c == "55P03")
            }
            _ => false,
        }
    }

    /// The `voice_socket_errors_total{peer="database",kind}` label.
    pub fn metric_kind(&self) -> SocketErrorKind {
        match self {
            StoreError::Timeout(_) => SocketErrorKind::Timeout,
            StoreError::Database(e) => sqlx_kind(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => sqlx_kind(e),
            _ => SocketErrorKind::Protocol,
        }
    }
}

fn sqlx_kind(e: &sqlx::Error) -> SocketErrorKind {
    match e {
        sqlx::Error::PoolTimedOut => SocketErrorKind::Timeout,
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => SocketErrorKind::Connect,
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => SocketErrorKind::Closed,
        _ => SocketErrorKind::Protocol,
    }
}

/// Connection trouble, server shutdown or overload, serialization conflicts: retry.
/// Constraint violations, bad data and SQL errors: do not.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // SQLSTATE classes: 08 connection exception, 53 insufficient resources,
            // 57 operator intervention (admin shutdown, cannot connect now),
            // 40 transaction rollback (serialization failure, deadlock).
            ["08", "53", "57", "40"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}
