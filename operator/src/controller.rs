//! The controllers: wiring of watches, the shared [`Context`], per-object backoff,
//! and [`run`], the `voice-operator run` code path (tests spawn it too).
//!
//! Two `kube::runtime::Controller`s run side by side:
//! - `Persona`: validation and status only (it owns no object; the deployments that
//!   select it write it into their ConfigMaps).
//! - `VoiceDeployment`, owning everything it applies, and triggered by `Persona`
//!   changes (through a reflector store the reconciler also reads personas from, so
//!   resolving personas costs no API call) and by its Secret (a metadata-only watch:
//!   the operator never caches Secret contents).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, ObjectReference, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::autoscale::Autoscaler;
use crate::autoscale::poller::{Poller, PollerConfig};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::observed::Observed;
use crate::reconcile::{persona, voice_deployment};
use crate::references::References;
use crate::resources::MANAGED_SELECTOR;
use crate::twilio_numbers::{AccountBackoff, DEFAULT_TWILIO_API_URL, TwilioNumbers};
use callmeback_api::{Persona, VoiceDeployment};

/// First retry delay after a failed reconcile; doubles per failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How long a reconcile waits for the persona cache's first list.
pub const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// The Events reporter name.
pub const REPORTER: &str = "callmeback-operator";

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
    /// Publishes an Event; a failure to publish is logged, never fails the reconcile.
    pub async fn publish(&self, regarding: &ObjectReference, event: Event) {
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(error = %e, reason = %event.reason, "could not publish Event");
        }
    }

    fn failed(&self, key: String) -> Duration {
        self.failures.failed(key)
    }

    fn succeeded(&self, key: &str) {
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

fn key_of<K: Resource>(kind: &str, obj: &K) -> String {
    format!(
        "{kind}/{}/{}",
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

async fn reconcile_persona(obj: Arc<Persona>, ctx: Arc<Context>) -> Result<Action> {
    let key = key_of(persona::KIND, obj.as_ref());
    let out = persona::reconcile(obj, ctx.clone()).await;
    if out.is_ok() {
        ctx.succeeded(&key);
    }
    out
}

async fn reconcile_voice_deployment(
    obj: Arc<VoiceDeployment>,
    ctx: Arc<Context>,
) -> Result<Action> {
    // Resolving personas against a cache that has not listed yet would report
    // PersonaNotFound for personas that exist.
    if tokio::time::timeout(CACHE_SYNC_TIMEOUT, ctx.personas.wait_until_ready())
        .await
        .is_err()
    {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let key = key_of(voice_deployment::KIND, obj.as_ref());
    let out = voice_deployment::reconcile(obj, ctx.clone()).await;
    if out.is_ok() {
        ctx.succeeded(&key);
    }
    out
}

fn error_policy<K: Resource>(
    kind: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, err, ctx| {
        ctx.metrics.error(kind, err.metric_label());
        let key = key_of(kind, obj.as_ref());
        let delay = ctx.failed(key.clone());
        tracing::warn!(object = %key, error = %err, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A bounded channel's receiver as the `Result` stream a controller takes.
fn receiver_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = std::result::Result<T, watcher::Error>> + Send + 'static {
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|t| (Ok(t), rx)) },
    )
}

/// Forwards the one Persona watch: applied personas to `changed` (the Persona
/// controller), applied and deleted ones to `touched` (the VoiceDeployment mapper).
/// Bounded channels pass backpressure on to the watch; shutdown ends it even when
/// a controller has stopped reading.
async fn fan_out_personas(
    watch: impl futures::Stream<Item = std::result::Result<watcher::Event<Persona>, watcher::Error>>,
    changed: tokio::sync::mpsc::Sender<Persona>,
    touched: tokio::sync::mpsc::Sender<Persona>,
    shutdown: CancellationToken,
) {
    let forward = async {
        let mut watch = std::pin::pin!(watch);
        while let Some(event) = watch.next().await {
            let (persona, applied) = match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, true),
                Ok(watcher::Event::Delete(p)) => (p, false),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
                Err(e) => {
                    // The backoff retries the watch; the controllers need not hear of it.
                    tracing::debug!(error = %e, "persona watch error");
                    continue;
                }
            };
            if applied {
                // A closed receiver is a controller that stopped: nothing to tell it.
                let _ = changed.send(persona.clone()).await;
            }
            let _ = touched.send(persona).await;
        }
    };
    shutdown.run_until_cancelled(forward).await;
}

/// A metadata-only watch of one owned kind, feeding the owned-object cache.
fn owned_metadata<K>(
    api: Api<PartialObjectMeta<K>>,
    config: &watcher::Config,
    ctx: &Arc<Context>,
) -> impl futures::Stream<Item = std::result::Result<PartialObjectMeta<K>, watcher::Error>>
+ Send
+ 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let ctx = ctx.clone();
    watcher(api, config.clone())
        .default_backoff()
        .inspect_ok(move |event| ctx.observed.observe(event))
        .touched_objects()
}

/// Runs both controllers until `shutdown` is cancelled (then lets in-flight
/// reconciles finish). This is `voice-operator run` minus flags, HTTP and leader
/// election.
pub async fn run(client: Client, config: Config, metrics: Metrics, shutdown: CancellationToken) {
    let ns = config.namespace.clone();
    let ns = ns.as_deref();
    let reporter = Reporter {
        controller: REPORTER.into(),
        instance: config.instance.clone(),
    };
    let (persona_store, persona_writer) = reflector::store::<Persona>();
    let (deployment_store, deployment_writer) = reflector::store::<Deployment>();
    let autoscaler = Arc::new(Autoscaler::default());
    let http = TwilioNumbers::http_client();
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        config: config.clone(),
        personas: persona_store,
        http: http.clone(),
        autoscaler: autoscaler.clone(),
        twilio_backoff: AccountBackoff::default(),
        observed: Observed::default(),
        deployments: deployment_store,
        failures: FailureCounts::default(),
    });
    let owned = watcher::Config::default().labels(MANAGED_SELECTOR);
    let controller_config = controller::Config::default().concurrency(config.concurrency);

    // One Persona watch and one cache for both controllers: the watch fills the
    // store the VoiceDeployment reconciler resolves personas from, and its events
    // fan out to the Persona controller (changed personas) and to the
    // VoiceDeployment mapper (changed and deleted ones).
    let persona_watch = watcher(api::<Persona>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(persona_writer)
        .inspect_ok({
            let ctx = ctx.clone();
            move |event| {
                if let watcher::Event::Delete(p) = event {
                    ctx.failures.forget(&key_of(persona::KIND, p));
                }
            }
        });
    let (persona_changed, persona_triggers) = tokio::sync::mpsc::channel(256);
    let (persona_touched, persona_events) = tokio::sync::mpsc::channel(256);
    let persona_fanout = fan_out_personas(
        persona_watch,
        persona_changed,
        persona_touched,
        shutdown.clone(),
    );
    let personas = Controller::for_stream(receiver_stream(persona_triggers), ctx.personas.clone())
        .with_config(controller_config.clone())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            reconcile_persona,
            error_policy::<Persona>(persona::KIND),
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "persona controller event");
            }
        });
    let persona_events = receiver_stream(persona_events);
    let secret_events = watcher(
        api::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    // The VoiceDeployment watch feeds the controller's cache and the index the
    // Persona and Secret mappers read ([`References`]), from the same events.
    let (vd_store, vd_writer) = reflector::store::<VoiceDeployment>();
    let references = Arc::new(References::default());
    let indexing = references.clone();
    let forgetting = ctx.clone();
    let vd_events = watcher(
        api::<VoiceDeployment>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(vd_writer)
    .inspect_ok(move |event| {
        indexing.observe(event);
        if let watcher::Event::Delete(vd) = event {
            forgetting
                .failures
                .forget(&key_of(voice_deployment::KIND, vd));
        }
    })
    .applied_objects();
    let vds = Controller::for_stream(vd_events, vd_store);
    let by_persona = references.clone();
    let by_secret = references;
    // The load poller asks for reconciles when the decided replicas or the scaling
    // conditions differ from the status; bounded, and re-checked every poll.
    let (trigger, triggers) = tokio::sync::mpsc::channel::<ObjectRef<VoiceDeployment>>(1024);
    let poller = Poller {
        client: client.clone(),
        vds: vds.store(),
        autoscaler,
        http,
        config: config.poller.clone(),
        metrics,
        trigger,
    }
    .run(api::<Pod>(&client, ns), shutdown.clone());
    let triggers = futures::stream::unfold(triggers, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    // Owned objects trigger their VoiceDeployment and feed the owned-object cache
    // ([`Observed`]); only Deployments are kept whole (their status is reported).
    let observing = ctx.clone();
    let deployments = watcher(api::<Deployment>(&client, ns), owned.clone())
        .default_backoff()
        .reflect(deployment_writer)
        .inspect_ok(move |event| observing.observed.observe(event))
        .touched_objects();
    let vds = vds
        .owns_stream(deployments)
        .owns_stream(owned_metadata(
            api::<PartialObjectMeta<Service>>(&client, ns),
            &owned,
            &ctx,
        ))
        .owns_stream(owned_metadata(
            api::<PartialObjectMeta<ConfigMap>>(&client, ns),
            &owned,
            &ctx,
        ))
        .owns_stream(owned_metadata(
            api::<PartialObjectMeta<ServiceAccount>>(&client, ns),
            &owned,
            &ctx,
        ))
        .owns_stream(owned_metadata(
            api::<PartialObjectMeta<HorizontalPodAutoscaler>>(&client, ns),
            &owned,
            &ctx,
        ))
        .owns_stream(owned_metadata(
            api::<PartialObjectMeta<PodDisruptionBudget>>(&client, ns),
            &owned,
            &ctx,
        ))
        .owns_stream(owned_metadata(
            api::<PartialObjectMeta<Ingress>>(&client, ns),
            &owned,
            &ctx,
        ))
        .watches_stream(persona_events, move |p: Persona| {
            by_persona.using_persona(&p)
        })
        .watches_stream(secret_events, move |s: PartialObjectMeta<Secret>| {
            by_secret.using_secret(&s.namespace().unwrap_or_default(), &s.name_any())
        })
        .reconcile_on(triggers)
        .with_config(controller_config)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            reconcile_voice_deployment,
            error_policy::<VoiceDeployment>(voice_deployment::KIND),
            ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "voice deployment controller event");
            }
        });
    tracing::info!(namespace = ?ns, "controllers started");
    futures::join!(persona_fanout, personas, vds, poller);
    tracing::info!("controllers stopped");
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

    /// `run` is spawned by tests and by the leader loop: it must stay `Send`.
    #[allow(dead_code)]
    fn run_future_is_send(client: Client) {
        fn is_send<T: Send>(_: T) {}
        is_send(run(
            client,
            Config::default(),
            Metrics::new(),
            CancellationToken::new(),
        ));
    }
}
