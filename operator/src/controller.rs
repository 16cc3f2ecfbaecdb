//! The controllers: wiring of watches to reconcilers, and [`run`], the
//! `voice-operator run` code path (tests spawn it too). What a reconcile gets is
//! [`Context`] (in `context.rs`, with the settings and per-object backoff).
//!
//! Two `kube::runtime::Controller`s run side by side:
//! - `Persona`: validation and status only (it owns no object; the deployments that
//!   select it write it into their ConfigMaps).
//! - `VoiceDeployment`, owning everything it applies, and triggered by `Persona`
//!   changes (through a reflector store the reconciler also reads personas from, so
//!   resolving personas costs no API call) and by its Secret (a metadata-only watch:
//!   the operator never caches Secret contents).

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::autoscale::Autoscaler;
use crate::autoscale::poller::Poller;
use crate::context::{Config, Context, Stores};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::reconcile::{persona, voice_deployment};
use crate::references::References;
use crate::resources::MANAGED_SELECTOR;
use crate::twilio_numbers::TwilioNumbers;
use callmeback_api::{Persona, VoiceDeployment};

/// How long a reconcile waits for the persona cache's first list.
pub const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// The Events reporter name.
pub const REPORTER: &str = "callmeback-operator";

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
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        config.clone(),
        metrics.clone(),
        Stores {
            personas: persona_store,
            deployments: deployment_store,
        },
        autoscaler.clone(),
        http.clone(),
    ));
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
                    ctx.failures().forget(&key_of(persona::KIND, p));
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
                .failures()
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
