//! The load poller: a reflector of the voice pods (label-selected, namespaced when
//! the operator watches one namespace) and a loop that, every interval, reads
//! `GET /load` from every Running pod (`podIP:<load port>`) with bounded
//! concurrency and a per-request timeout, then per VoiceDeployment:
//! - feeds the [`super::Autoscaler`] (which decides under the calls policy);
//! - writes the load fields of the status (only when they changed);
//! - triggers a reconcile when the decided replicas or the scaling conditions differ
//!   from the status (the reconcile applies the Deployment: one field manager writes
//!   replicas). Re-checked every poll, so a dropped trigger is retried;
//! - keeps the pods' deletion cost and eviction guards equal to their calls (patched
//!   only on change, at most `max_patches_per_second` on average).
//!
//! An unreachable pod, an error status, a timeout or a malformed body is "unknown"
//! for that poll, never "idle".

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::decision::{LoadSummary, PodLoad};
use super::{
    Autoscaler, LOAD_FIELD_MANAGER, ScalingPolicy, VdKey, annotation_patch, scaling_conditions,
};
use crate::metrics::{Metrics, ScalingObservation};
use crate::resources::{MANAGED_SELECTOR, METRICS_PORT, VOICE_DEPLOYMENT_LABEL};
use callmeback_api::{VoiceDeployment, find_condition};

/// Default poll interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Concurrent `/load` requests.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Deadline of one `/load` request (connect, answer, body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);
/// A `/load` body is a few dozen bytes; more is not a voice pod.
pub const MAX_BODY_BYTES: usize = 4096;
/// Average pod annotation patches per second, over all pods.
pub const DEFAULT_MAX_PATCHES_PER_SECOND: u32 = 20;
/// Concurrent pod annotation patches.
const PATCH_CONCURRENCY: usize = 8;

/// Poller settings (flags of `voice-operator run`).
#[derive(Clone, Debug)]
pub struct PollerConfig {
    /// Time between polls.
    pub interval: Duration,
    /// The pods' port serving `/load` (their metrics port).
    pub port: u16,
    /// Concurrent `/load` requests.
    pub concurrency: usize,
    /// Deadline of one request.
    pub request_timeout: Duration,
    /// Average annotation patches per second (each poll may use `interval` x this).
    pub max_patches_per_second: u32,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            port: u16::try_from(METRICS_PORT).unwrap_or(9090),
            concurrency: DEFAULT_CONCURRENCY,
            request_timeout: REQUEST_TIMEOUT,
            max_patches_per_second: DEFAULT_MAX_PATCHES_PER_SECOND,
        }
    }
}

/// Why one pod's load is unknown.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No usable pod IP.
    #[error("pod has no usable IP")]
    NoAddress,
    /// Connecting or reading failed, or the status was not 2xx.
    #[error("request: {0}")]
    Http(#[from] reqwest::Error),
    /// The deadline passed.
    #[error("timed out")]
    Timeout,
    /// The body exceeded [`MAX_BODY_BYTES`].
    #[error("body too large")]
    TooLarge,
    /// The body is not the `/load` JSON.
    #[error("malformed body: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl LoadError {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoAddress => "no_address",
            Self::Http(e) if e.is_status() => "status",
            Self::Http(_) => "connect",
            Self::Timeout => "timeout",
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Reads one pod's `/load`.
pub async fn read_load(
    http: &reqwest::Client,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<PodLoad, LoadError> {
    let url = format!("http://{addr}/load");
    let fetch = async {
        let mut resp = http.get(url).send().await?.error_for_status()?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len().saturating_add(chunk.len()) > MAX_BODY_BYTES {
                return Err(LoadError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(serde_json::from_slice(&body)?)
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .unwrap_or(Err(LoadError::Timeout))
}

/// Label selector of the voice pods the poller watches.
pub fn pod_selector() -> String {
    format!("{MANAGED_SELECTOR},{VOICE_DEPLOYMENT_LABEL}")
}

/// The address `/load` is read from: a Running pod's IP and `port`.
pub fn load_address(pod: &Pod, port: u16) -> Option<SocketAddr> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

/// Everything the poll loop uses.
pub struct Poller {
    /// The operator's client.
    pub client: Client,
    /// The VoiceDeployment controller's cache.
    pub vds: Store<VoiceDeployment>,
    /// Shared scaler state.
    pub autoscaler: Arc<Autoscaler>,
    /// The operator's HTTP client.
    pub http: reqwest::Client,
    /// Settings.
    pub config: PollerConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// Reconcile requests for the VoiceDeployment controller.
    pub trigger: mpsc::Sender<ObjectRef<VoiceDeployment>>,
}

impl Poller {
    /// Watches pods through `pods` and polls until `shutdown`.
    pub async fn run(self, pods: Api<Pod>, shutdown: CancellationToken) {
        let (store, writer) = reflector::store::<Pod>();
        let watch = watcher(pods, watcher::Config::default().labels(&pod_selector()))
            .default_backoff()
            .modify(|p| {
                // Only labels, annotations, phase and IP are read: keep the cache small.
                p.managed_fields_mut().clear();
                p.spec = None;
            })
            .reflect(writer)
            .for_each(|_| async {});
        let this = Arc::new(self);
        let polls = {
            let this = this.clone();
            let store = store.clone();
            async move {
                let _ = store.wait_until_ready().await;
                let _ = this.vds.wait_until_ready().await;
                let mut tick = tokio::time::interval(this.config.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    this.poll_once(&store).await;
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = watch => {}
            _ = polls => {}
        }
    }

    /// One poll of every pod of every VoiceDeployment.
    pub async fn poll_once(&self, pods: &Store<Pod>) {
        let started = Instant::now();
        let vds: HashMap<VdKey, Arc<VoiceDeployment>> = self
            .vds
            .state()
            .into_iter()
            .filter_map(|vd| Some(((vd.namespace()?, vd.name_any()), vd)))
            .collect();
        self.autoscaler.retain(|k| vds.contains_key(k));
        self.metrics.retain_scaling(
            &vds.keys()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect(),
        );
        let mut targets = Vec::new();
        for pod in pods.state() {
            let Some(vd_name) = pod.labels().get(VOICE_DEPLOYMENT_LABEL) else {
                continue;
            };
            let key = (pod.namespace().unwrap_or_default(), vd_name.clone());
            if !vds.contains_key(&key) {
                continue;
            }
            if pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running") {
                continue;
            }
            targets.push((key, pod));
        }
        let http = &self.http;
        let (port, timeout) = (self.config.port, self.config.request_timeout);
        let metrics = &self.metrics;
        let results: Vec<(VdKey, Arc<Pod>, Option<PodLoad>)> = futures::stream::iter(targets)
            .map(|(key, pod)| async move {
                let load = match load_address(&pod, port) {
                    Some(addr) => read_load(http, addr, timeout).await,
                    None => Err(LoadError::NoAddress),
                };
                let label = match &load {
                    Ok(_) => "ok",
                    Err(e) => e.metric_label(),
                };
                metrics.load_reads.with_label_values(&[label]).inc();
                if let Err(e) = &load {
                    tracing::debug!(pod = %pod.name_any(), error = %e, "pod load unknown");
                }
                (key, pod, load.ok())
            })
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;

        let mut by_vd: HashMap<&VdKey, Vec<Option<PodLoad>>> = HashMap::new();
        for (key, _, load) in &results {
            by_vd.entry(key).or_default().push(*load);
        }
        let now = Instant::now();
        let mut status_writes = Vec::new();
        for (key, vd) in &vds {
            let summary = LoadSummary::from_pods(by_vd.get(key).into_iter().flatten());
            let decision =
                self.autoscaler
                    .observe(key, summary.clone(), now, crate::reconcile::now_rfc3339);
            if decision.as_ref().is_some_and(|d| d.changed) {
                self.metrics.scale_changes.inc();
                tracing::info!(namespace = %key.0, name = %key.1, replicas = decision.as_ref().map(|d| d.replicas), active_calls = summary.active_calls, unknown = summary.unknown_pods, "scaling on live calls");
            }
            let status = vd.status.clone().unwrap_or_default();
            let desired = decision
                .as_ref()
                .map(|d| i64::from(d.replicas))
                .or(vd.spec.replicas.map(i64::from))
                .or(status.desired_replicas.map(i64::from))
                .unwrap_or(i64::from(status.replicas));
            self.metrics.observe_scaling(
                &key.0,
                &key.1,
                &ScalingObservation {
                    desired_replicas: desired,
                    replicas: i64::from(status.replicas),
                    ready_replicas: i64::from(status.ready_replicas),
                    active_calls: i64::try_from(summary.active_calls).unwrap_or(i64::MAX),
                    call_capacity: i64::try_from(summary.capacity).unwrap_or(i64::MAX),
                    unknown_load_pods: i64::from(summary.unknown_pods),
                },
            );
            if let Some(patch) = load_status_patch(vd, &summary) {
                status_writes.push((key.clone(), patch));
            }
            if self.needs_reconcile(key, vd) {
                // Full: a reconcile is already queued; the next poll checks again.
                let _ = self.trigger.try_send(ObjectRef::from_obj(vd.as_ref()));
            }
        }
        futures::stream::iter(status_writes)
            .for_each_concurrent(PATCH_CONCURRENCY, |(key, patch)| async move {
                let api = Api::<VoiceDeployment>::namespaced(self.client.clone(), &key.0);
                let params = PatchParams {
                    field_manager: Some(LOAD_FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                if let Err(e) = api.patch_status(&key.1, &params, &Patch::Merge(&patch)).await {
                    tracing::debug!(namespace = %key.0, name = %key.1, error = %e, "load status write failed");
                }
            })
            .await;
        self.annotate(&results).await;
        self.metrics
            .poll_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Whether the status differs from what a reconcile would write for scaling.
    fn needs_reconcile(&self, key: &VdKey, vd: &VoiceDeployment) -> bool {
        let policy = ScalingPolicy::from_spec(vd.spec.replicas, vd.spec.autoscaling.as_ref());
        let view = self.autoscaler.view(key);
        let status = vd.status.clone().unwrap_or_default();
        if matches!(policy, Ok(ScalingPolicy::Calls(_)))
            && view.desired.is_some()
            && view.desired.and_then(|d| i32::try_from(d).ok()) != status.desired_replicas
        {
            return true;
        }
        let [active, limited] = scaling_conditions(policy.as_ref(), &view);
        [("ScalingActive", active), ("ScalingLimited", limited)]
            .iter()
            .any(|(t, (ok, reason, _))| {
                find_condition(&status.conditions, t)
                    .is_none_or(|c| c.is_true() != *ok || c.reason != *reason)
            })
    }

    /// Patches the pods whose annotations differ from their calls, busy ones first,
    /// within the per-poll budget; the rest wait for the next poll.
    async fn annotate(&self, results: &[(VdKey, Arc<Pod>, Option<PodLoad>)]) {
        let mut patches: Vec<(u32, &Arc<Pod>, serde_json::Value)> = results
            .iter()
            .filter(|(_, pod, _)| pod.meta().deletion_timestamp.is_none())
            .filter_map(|(_, pod, load)| {
                // Unknown load: leave the pod as it is (never marked idle).
                let calls = load.as_ref()?.active_calls;
                Some((
                    calls,
                    pod,
                    annotation_patch(pod.meta().annotations.as_ref(), calls)?,
                ))
            })
            .collect();
        patches.sort_by_key(|p| std::cmp::Reverse(p.0));
        let budget = (u64::from(self.config.max_patches_per_second)
            .saturating_mul(self.config.interval.as_secs().max(1)))
        .max(1);
        patches.truncate(usize::try_from(budget).unwrap_or(usize::MAX));
        futures::stream::iter(patches)
            .for_each_concurrent(PATCH_CONCURRENCY, |(_, pod, patch)| async move {
                let ns = pod.namespace().unwrap_or_default();
                let api = Api::<Pod>::namespaced(self.client.clone(), &ns);
                let params = PatchParams {
                    field_manager: Some(crate::resources::FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                match api.patch(&pod.name_any(), &params, &Patch::Merge(&patch)).await {
                    Ok(_) => self.metrics.pod_patches.inc(),
                    Err(e) => {
                        tracing::debug!(pod = %pod.name_any(), error = %e, "pod annotation patch failed")
                    }
                }
            })
            .await;
    }
}

/// The merge patch of the status' load fields, or `None` when they are current.
pub fn load_status_patch(vd: &VoiceDeployment, load: &LoadSummary) -> Option<serde_json::Value> {
    let status = vd.status.clone().unwrap_or_default();
    let want = LoadFields::from(load);
    let have = LoadFields {
        active_calls: status.active_calls,
        capacity: status.capacity,
        unknown_load_pods: status.unknown_load_pods,
        draining_replicas: status.draining_replicas,
    };
    (want != have).then(|| {
        serde_json::json!({ "status": {
            "activeCalls": want.active_calls,
            "capacity": want.capacity,
            "unknownLoadPods": want.unknown_load_pods,
            "drainingReplicas": want.draining_replicas,
        }})
    })
}

/// The status fields a poll sets.
#[derive(Debug, PartialEq, Eq)]
pub struct LoadFields {
    /// `status.activeCalls`.
    pub active_calls: Option<i64>,
    /// `status.capacity`.
    pub capacity: Option<i64>,
    /// `status.unknownLoadPods`.
    pub unknown_load_pods: Option<i32>,
    /// `status.drainingReplicas`.
    pub draining_replicas: Option<i32>,
}

impl From<&LoadSummary> for LoadFields {
    fn from(l: &LoadSummary) -> Self {
        Self {
            active_calls: Some(i64::try_from(l.active_calls).unwrap_or(i64::MAX)),
            capacity: Some(i64::try_from(l.capacity).unwrap_or(i64::MAX)),
            unknown_load_pods: Some(i32::try_from(l.unknown_pods).unwrap_or(i32::MAX)),
            draining_replicas: Some(i32::try_from(l.draining_pods).unwrap_or(i32::MAX)),
        }
    }
}
