//! What every reconcile gets: [`Context`] (the API client, the caches, the Events
//! recorder, settings, metrics), the operator's settings ([`Config`]) and per-object
//! retry backoff ([`FailureCounts`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callmeback_api::Persona;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};

use crate::autoscale::Autoscaler;
use crate::autoscale::poller::PollerConfig;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::observed::Observed;
use crate::twilio_numbers::{AccountBackoff, DEFAULT_TWILIO_API_URL};

/// First retry delay after a failed reconcile; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Operator settings (from flags in `voice-operator run`).
#[derive(Clone, Debug)]
pub struct Config {
    /// The Twilio REST base for every number wiring. Only the operator sets it; a
    /// tenant Secret's `TWILIO_API_URL` reaches the pods, never the operator's requests.
    pub twilio_api_url: String,
    /// How long deletion keeps trying to restore Twilio numbers before releasing.
    pub twilio_restore_deadline: Duration,
    /// How often wired numbers are checked against Twilio (stretched per deployment,
    /// see `reconcile::voice_deployment::twilio`); changes are wired at once.
    pub twilio_verify_interval: Duration,
    /// Periodic reconcile of every VoiceDeployment (drift of what it owns).
    pub resync: Duration,
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Concurrent reconciles per controller.
    pub concurrency: u16,
    /// This replica's name in Events (the pod name).
    pub instance: Option<String>,
    /// The pod load poller (calls autoscaling, pod annotations).
    pub poller: PollerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            twilio_api_url: DEFAULT_TWILIO_API_URL.into(),
            twilio_restore_deadline: Duration::from_secs(120),
            twilio_verify_interval: Duration::from_secs(3600),
            resync: Duration::from_secs(300),
            namespace: None,
            concurrency: 8,
            instance: None,
            poller: PollerConfig::default(),
        }
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// The API client (the operator's own identity).
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Reconcile metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: Config,
    /// Cached Personas (the VoiceDeployment controller's persona watch fills it).
    pub personas: Store<Persona>,
    /// HTTP client for Twilio and the pods' `/load`, with timeouts.
    pub http: reqwest::Client,
    /// Pod load and calls-autoscaler state, shared with the load poller.
    pub autoscaler: Arc<Autoscaler>,
    /// Per-account backoff of Twilio requests.
    pub twilio_backoff: AccountBackoff,
    /// What the watches show of owned objects and what was last applied to them.
    pub observed: Observed,
    /// Owned Deployments in full (their status feeds the VoiceDeployment's).
    pub deployments: Store<Deployment>,
    /// Consecutive failures per object, for per-object backoff.
    failures: FailureCounts,
}

/// The caches a [`Context`] reads, filled by the controller's watches (or by a test
/// through the stores' writers).
pub struct Stores {
    /// Personas.
    pub personas: Store<Persona>,
    /// Owned Deployments.
    pub deployments: Store<Deployment>,
}

/// Consecutive reconcile failures per object (`Kind/namespace/name`). An entry
/// lives from an object's first failure to its next success or its deletion, so
/// the map holds only objects that exist and are failing.
#[derive(Default)]
pub struct FailureCounts {
    counts: Mutex<HashMap<String, u32>>,
}

impl FailureCounts {
    /// Records a failure; returns the delay before the retry (doubling from
    /// [`BACKOFF_BASE`] to [`BACKOFF_MAX`]).
    pub fn failed(&self, key: String) -> Duration {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        let delay = BACKOFF_BASE.saturating_mul(1u32 << n.saturating_sub(1).min(16));
        delay.min(BACKOFF_MAX)
    }

    /// Forgets `key`: it succeeded, or its object is gone.
    pub fn forget(&self, key: &str) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(key);
    }

    /// Objects currently failing.
    pub fn len(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no object is failing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Context {
    /// A context over `client`: what `controller::run` builds, and what a test builds
    /// to call a reconciler directly (with stores it fills through their writers).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        recorder: Recorder,
        config: Config,
        metrics: Metrics,
        stores: Stores,
        autoscaler: Arc<Autoscaler>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            client,
            recorder,
            metrics,
            config,
            personas: stores.personas,
            http,
            autoscaler,
            twilio_backoff: AccountBackoff::default(),
            observed: Observed::default(),
            deployments: stores.deployments,
            failures: FailureCounts::default(),
        }
    }

    /// Per-object failure counts (the watches forget deleted objects).
    pub fn failures(&self) -> &FailureCounts {
        &self.failures
    }

    /// Publishes an Event; a failure to publish is logged, never fails the reconcile.
    pub async fn publish(&self, regarding: &ObjectReference, event: Event) {
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(error = %e, reason = %event.reason, "could not publish Event");
        }
    }

    pub(crate) fn failed(&self, key: String) -> Duration {
        self.failures.failed(key)
    }

    pub(crate) fn succeeded(&self, key: &str) {
        self.failures.forget(key);
    }

    /// An owned Deployment: from the watch cache, or read when the cache does not
    /// have it (yet).
    pub async fn deployment(&self, namespace: &str, name: &str) -> Result<Option<Deployment>> {
        if let Some(d) = self
            .deployments
            .get(&ObjectRef::new(name).within(namespace))
        {
            return Ok(Some(d.as_ref().clone()));
        }
        Ok(
            Api::<Deployment>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_backoff_doubles_caps_and_an_entry_ends_at_success_or_deletion() {
        let f = FailureCounts::default();
        assert_eq!(f.failed("VoiceDeployment/a/desk".into()), BACKOFF_BASE);
        assert_eq!(f.failed("VoiceDeployment/a/desk".into()), BACKOFF_BASE * 2);
        assert_eq!(f.failed("Persona/a/sam".into()), BACKOFF_BASE);
        for _ in 0..40 {
            f.failed("VoiceDeployment/a/desk".into());
        }
        assert_eq!(f.failed("VoiceDeployment/a/desk".into()), BACKOFF_MAX);
        assert_eq!(f.len(), 2);
        f.forget("VoiceDeployment/a/desk");
        f.forget("Persona/a/sam");
        assert!(
            f.is_empty(),
            "deleted or recovered objects leave no entry behind"
        );
        assert_eq!(f.failed("VoiceDeployment/a/desk".into()), BACKOFF_BASE);
    }
}
