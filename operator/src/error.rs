//! The operator's error type. `metric_label()` gives each variant a low-cardinality
//! label for `operator_reconcile_errors_total{kind,reason}`.

use crate::resources::BuildError;
use crate::twilio_numbers::TwilioError;

/// Anything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Building desired objects failed.
    #[error("building objects: {0}")]
    Build(#[from] BuildError),
    /// Serializing an object for apply failed.
    #[error("serializing: {0}")]
    Json(#[from] serde_json::Error),
    /// The Twilio REST API failed.
    #[error("twilio: {0}")]
    Twilio(#[from] TwilioError),
    /// The finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// A low-cardinality reason for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(s)) if s.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(s)) if s.code == 422 => "invalid",
            Error::Kube(_) => "kube",
            Error::Build(_) => "build",
            Error::Json(_) => "serialize",
            Error::Twilio(_) => "twilio",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Result alias for reconcilers.
pub type Result<T, E = Error> = std::result::Result<T, E>;
