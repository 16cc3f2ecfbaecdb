//! Persistence of calls: the seam the Twilio edge writes through.
//!
//! The edge reports what it learns about a call through [`CallRecords`]: a call was
//! created (`POST /v1/calls`, or an inbound webhook) and its status changed (Twilio's
//! status callbacks). [`NoPersistence`] runs when `DATABASE_URL` is unset: it keeps
//! nothing and says so (`GET /v1/calls/{sid}` answers 503). The PostgreSQL store
//! implements the same trait.
//!
//! Writes are never on the audio path: the edge spawns them and logs failures.

// PostgreSQL persistence: the writer, the schema's records, the queries behind
// `GET /v1/calls` (served by http::calls).
mod batch;
mod call_records;
pub mod error;
pub mod journal;
pub mod memory;
pub mod metrics;
pub mod postgres;
pub mod pricing;
pub mod queries;
pub mod records;
pub mod relationships;
pub mod writer;

pub use call_records::call_key;
pub use postgres::{PgStore, StoreConfig, StoreHealth};

use futures::future::BoxFuture;

use crate::session::CallSpec;

/// A call the pod created or answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallCreated {
    /// Who and why.
    pub spec: CallSpec,
    /// Twilio call SID, when known (always for inbound; after the REST call for outbound).
    pub call_sid: Option<String>,
    /// Twilio's status at creation (`queued`, `ringing`, `in-progress`).
    pub status: String,
}

/// A Twilio status callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallStatusChange {
    /// Twilio call SID.
    pub call_sid: String,
    /// Our call id, when the callback URL carried it (outbound calls).
    pub call_id: Option<String>,
    /// Twilio's `CallStatus` (`initiated`, `ringing`, `in-progress`, `completed`,
    /// `busy`, `failed`, `no-answer`, `canceled`).
    pub status: String,
    /// Twilio's `CallDuration` in seconds, on completion.
    pub duration_seconds: Option<u32>,
    /// Twilio's `AnsweredBy`, with machine detection.
    pub answered_by: Option<String>,
}

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Persistence is off (`DATABASE_URL` unset).
    #[error("persistence is disabled (DATABASE_URL is unset)")]
    Disabled,
    /// The store failed.
    #[error("store error: {0}")]
    Store(String),
}

/// Where the edge reports calls.
pub trait CallRecords: Send + Sync + 'static {
    /// True when records are kept (`GET /v1/calls/{sid}` can answer).
    fn enabled(&self) -> bool;
    /// What `/readyz` says about persistence.
    fn health(&self) -> StoreHealth {
        if self.enabled() {
            StoreHealth::Up
        } else {
            StoreHealth::Disabled
        }
    }
    /// A call was created or answered.
    fn call_created(&self, call: CallCreated) -> BoxFuture<'static, Result<(), RecordError>>;
    /// Twilio reported a status.
    fn call_status(&self, change: CallStatusChange) -> BoxFuture<'static, Result<(), RecordError>>;
    /// The stored call (record, transcript) as JSON; `Ok(None)` when unknown.
    fn get_call(
        &self,
        call_sid: &str,
    ) -> BoxFuture<'static, Result<Option<serde_json::Value>, RecordError>>;
}

/// What runs without a database: keeps nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPersistence;

impl CallRecords for NoPersistence {
    fn enabled(&self) -> bool {
        false
    }
    fn call_created(&self, _call: CallCreated) -> BoxFuture<'static, Result<(), RecordError>> {
        Box::pin(async { Ok(()) })
    }
    fn call_status(
        &self,
        _change: CallStatusChange,
    ) -> BoxFuture<'static, Result<(), RecordError>> {
        Box::pin(async { Ok(()) })
    }
    fn get_call(
        &self,
        _call_sid: &str,
    ) -> BoxFuture<'static, Result<Option<serde_json::Value>, RecordError>> {
        Box::pin(async { Err(RecordError::Disabled) })
    }
}
