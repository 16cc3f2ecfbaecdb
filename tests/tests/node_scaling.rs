//! Scaling, rollouts and persona edits on the real node, under live calls
//! (issue "Scale on live calls, never cut one"). Calls are simulated Twilio
//! calls through the voice Service's ClusterIP (kube-proxy picks the pod, for
//! the webhook and the stream separately), against provider emulators on the
//! host; the operator runs as a real pod and reads every voice pod's `/load`.
//!
//! Scale: the node has 2 CPUs and runs debug builds of the pod, so the ramp
//! keeps the shape (1 -> 5 -> 1 pods) at 16 calls with
//! `callsPerPod: 4, buffer: 2` instead of 40 calls with `callsPerPod: 10`, and
//! the rolling update holds 8 live calls with a new call every 2 s instead of
//! 30 with one every second.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callmeback_api::{Persona, VoiceDeployment};
use callmeback_tests::call_harness::{Caller, Emulators, ProviderProfile, table, table_replies};
use callmeback_tests::controlplane::node::Node;
use callmeback_tests::controlplane::{self, ControlPlane};
use callmeback_tests::helm::kubectl;
use callmeback_tests::node_cluster::{
    Installed, ONE_AT_A_TIME, eventually, eventually_within, install_examples, pod_load, pods_with,
    ready_on_node, say_each, talk, voice_service_url,
};
use callmeback_tests::twilio_sim::TwilioSim;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const FROM: &str = "+14155550123";
/// Annotations the operator keeps on voice pods.
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
const DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
/// The operator's load poll interval (its default).
const POLL: Duration = Duration::from_secs(5);

/// Everything one test brought up.
struct Setup {
    cp: &'static ControlPlane,
    node: &'static Node,
    emulators: Emulators,
    installed: Installed,
    sim: TwilioSim,
    to: String,
}

/// Emulators, then the chart and the examples with `edit_vd` applied; waits for
/// `ready` voice pods. Voice pods request little CPU so that 6 fit beside the
/// other tests' pods on the 2-CPU node.
async fn setup(prefix: &str, edit_vd: impl FnOnce(&mut Value), ready: usize) -> Setup {
    let cp = controlplane::shared_with_node().await;
    let node = cp.node().expect("a control plane started with a real node");
    // Every utterance of every call is heard as this line; the persona answers it.
    let script = vec!["Are you still there?".to_owned(); 64];
    let replies = table_replies(
        table(&[("there", "Yes, I'm right here with you.")]),
        "Sorry?".into(),
        Arc::new(Mutex::new(Vec::new())),
    );
    let emulators = Emulators::start_on(
        node.host_address().into(),
        script,
        replies,
        ProviderProfile::ZERO,
    )
    .await
    .expect("provider emulators on the bridge address");
    let mut secret: BTreeMap<String, String> = emulators.env().into_iter().collect();
    secret.insert(
        "TWILIO_ACCOUNT_SID".into(),
        "AC0123456789abcdef0123456789abcdef".into(),
    );
    secret.insert("TWILIO_AUTH_TOKEN".into(), "node-scaling-auth-token".into());
    let installed = install_examples(
        cp,
        node,
        prefix,
        secret.clone(),
        |vd| {
            vd["spec"]["resources"] = json!({
                "requests": {"cpu": "50m", "memory": "64Mi"},
                "limits": {"memory": "512Mi"}
            });
            edit_vd(vd);
        },
        ready,
    )
    .await;
    let sim = TwilioSim::new(
        &voice_service_url(cp, &installed).await,
        &installed.public_url,
        &secret["TWILIO_ACCOUNT_SID"],
        &secret["TWILIO_AUTH_TOKEN"],
    );
    let to = installed
        .numbers
        .first()
        .expect("the example VoiceDeployment has a number")
        .clone();
    Setup {
        cp,
        node,
        emulators,
        installed,
        sim,
        to,
    }
}

impl Setup {
    fn vds(&self) -> Api<VoiceDeployment> {
        Api::namespaced(self.cp.client(), &self.installed.ns)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.cp.client(), &self.installed.ns)
    }

    /// A JSON merge patch of the VoiceDeployment's spec (`null` removes a field).
    async fn patch_vd(&self, spec: Value) {
        self.vds()
            .patch(
                &self.installed.vd_name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap_or_else(|e| panic!("patching the VoiceDeployment: {e}"));
    }

    /// The voice Deployment's `spec.replicas`.
    async fn replicas(&self) -> Result<i32, String> {
        let d = self
            .deployments()
            .get(&self.installed.vd_name)
            .await
            .map_err(|e| e.to_string())?;
        d.spec
            .and_then(|s| s.replicas)
            .ok_or("no spec.replicas".to_owned())
    }

    /// Waits for the Deployment to want `want` pods and have them Ready on the node.
    async fn wait_replicas_ready(&self, want: i32, what: &str) {
        eventually(what, || async {
            let replicas = self.replicas().await?;
            if replicas != want {
                return Err(format!("spec.replicas {replicas}"));
            }
            let pods = pods_with(self.cp, &self.installed.ns, &self.installed.voice_selector)
                .await?
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect::<Vec<_>>();
            if pods.len() != usize::try_from(want).unwrap_or(0) {
                return Err(format!("{} pods not terminating", pods.len()));
            }
            for pod in &pods {
                ready_on_node(pod, self.node.name())?;
            }
            Ok(())
        })
        .await;
    }

    /// Removes the VoiceDeployment so its pods leave the node for the next test.
    fn uninstall(&self) {
        let _ = kubectl(
            self.cp.kubeconfig_path(),
            [
                "delete",
                "voicedeployment",
                "--namespace",
                self.installed.ns.as_str(),
                self.installed.vd_name.as_str(),
                "--wait=false",
            ],
        );
    }
}

/// One voice pod as a sample saw it.
#[derive(Clone, Debug)]
struct PodSample {
    name: String,
    uid: String,
    deleting: bool,
    restarts: i32,
    /// `/load`'s activeCalls (None: unreachable).
    calls: Option<u64>,
    cost: Option<i64>,
    safe_to_evict: Option<String>,
    do_not_disrupt: Option<String>,
}

/// The voice Deployment and pods at one moment.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    replicas: Option<i32>,
    pods: Vec<PodSample>,
}

impl Sample {
    fn live(&self) -> impl Iterator<Item = &PodSample> {
        self.pods.iter().filter(|p| !p.deleting)
    }

    fn calls(&self) -> u64 {
        self.pods.iter().filter_map(|p| p.calls).sum()
    }
}

/// Samples the Deployment's replicas and every voice pod (annotations, `/load`)
/// every `every` until `stop`, and once more after it (so the last sample shows
/// the state the test waited for); returns them all.
fn start_sampler(
    setup: &Setup,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let cp = setup.cp;
    let ns = setup.installed.ns.clone();
    let selector = setup.installed.voice_selector.clone();
    let deployments = setup.deployments();
    let vd_name = setup.installed.vd_name.clone();
    tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            let replicas = deployments
                .get(&vd_name)
                .await
                .ok()
                .and_then(|d| d.spec.and_then(|s| s.replicas));
            let pods = pods_with(cp, &ns, &selector).await.unwrap_or_default();
            let mut sampled = Vec::new();
            for pod in &pods {
                let annotations = pod.metadata.annotations.clone().unwrap_or_default();
                sampled.push(PodSample {
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    uid: pod.metadata.uid.clone().unwrap_or_default(),
                    deleting: pod.metadata.deletion_timestamp.is_some(),
                    restarts: pod
                        .status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .map(|c| c.iter().map(|c| c.restart_count).sum())
                        .unwrap_or(0),
                    calls: pod_load(pod)
                        .await
                        .ok()
                        .and_then(|l| l["activeCalls"].as_u64()),
                    cost: annotations.get(DELETION_COST).and_then(|c| c.parse().ok()),
                    safe_to_evict: annotations.get(SAFE_TO_EVICT).cloned(),
                    do_not_disrupt: annotations.get(DO_NOT_DISRUPT).cloned(),
                });
            }
            out.push(Sample {
                at: Instant::now(),
                replicas,
                pods: sampled,
            });
            if stop.is_cancelled() {
                break;
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(every) => {}
            }
        }
        out
    })
}

/// A call that stays up, taking a turn every few seconds (so no idle timeout
/// ends it), until `release`; then a last turn and a hang-up. Errors when a
/// turn goes unanswered or the pod closes the call: a cut.
async fn held_call(
    sim: TwilioSim,
    to: String,
    release: CancellationToken,
    what: String,
) -> Result<u32, String> {
    let mut caller = Caller::dial(&sim, FROM, &to)
        .await
        .map_err(|e| format!("{what}: dialling: {e}"))?;
    let line = vec!["Are you still there?".to_owned()];
    talk(&mut caller, &line, &what).await?;
    let mut turns = 1;
    loop {
        tokio::select! {
            () = release.cancelled() => break,
            res = caller.silence(Duration::from_secs(8)) => {
                res.map_err(|e| format!("{what}: holding: {e}"))?;
            }
        }
        if caller.closed {
            return Err(format!(
                "{what}: the pod closed the call after {turns} turns"
            ));
        }
        say_each(&mut caller, &line, &what).await?;
        turns += 1;
    }
    say_each(&mut caller, &line, &what).await?;
    turns += 1;
    if caller.closed {
        return Err(format!("{what}: closed before the hang-up"));
    }
    caller
        .hang_up()
        .await
        .map_err(|e| format!("{what}: hang up: {e}"))?;
    Ok(turns)
}

/// A short call: greeting, one turn, hang up.
async fn short_call(sim: &TwilioSim, to: &str, what: &str) -> Result<(), String> {
    let mut caller = Caller::dial(sim, FROM, to)
        .await
        .map_err(|e| format!("{what}: dialling: {e}"))?;
    talk(&mut caller, &["Are you still there?".to_owned()], what).await?;
    caller
        .hang_up()
        .await
        .map_err(|e| format!("{what}: hang up: {e}"))
}

/// The autoscaling spec of these tests: 4 calls per pod, 2 slots warm, 1..=6
/// pods, a short scale-down window so the test sees it.
fn calls_autoscaling() -> Value {
    json!({
        "minReplicas": 1,
        "maxReplicas": 6,
        "callsPerPod": 4,
        "buffer": 2,
        "scaleDownStabilizationSeconds": 20,
        "maxScaleDownStep": 2
    })
}

/// clamp(ceil((calls + 2) / 4), 1, 6): what `calls_autoscaling` asks for.
fn wanted_for(calls: u64) -> i32 {
    i32::try_from((calls + 2).div_ceil(4).clamp(1, 6)).unwrap_or(6)
}

#[tokio::test]
async fn calls_ramp_scales_pods_up_at_once_and_down_idle_first_through_an_operator_restart_without_cutting_a_call()
 {
    // Proves on the real node, with 16 calls ramping up and down through the
    // voice Service: the operator scales the Deployment to
    // ceil((calls + buffer) / callsPerPod) within a poll interval or two of the
    // load change (no metrics adapter exists on this cluster); an operator
    // restart at the peak scales nothing down; each pod's deletion cost equals
    // its live calls and busy pods carry safe-to-evict "false" and
    // do-not-disrupt "true"; on the way down the pods removed are the cheapest;
    // every turn of every call is answered and no call is cut.
    let _turn = ONE_AT_A_TIME.lock().await;
    let setup = setup(
        "node-ramp",
        |vd| {
            vd["spec"].as_object_mut().expect("spec").remove("replicas");
            vd["spec"]["autoscaling"] = calls_autoscaling();
        },
        1,
    )
    .await;
    let stop = CancellationToken::new();
    let sampler = start_sampler(&setup, Duration::from_secs(1), stop.clone());

    // Up: 16 calls, one every 3 s.
    let (releases, calls) = hold_calls(&setup, 16, "call", Duration::from_secs(3)).await;
    setup
        .wait_replicas_ready(wanted_for(16), "5 voice pods for 16 calls")
        .await;

    // The operator restarts at the peak: nothing scales down, annotations stay.
    let peak_from = Instant::now();
    let operator_pods = pods_with(
        setup.cp,
        &setup.installed.ns,
        &setup.installed.operator_selector,
    )
    .await
    .expect("listing operator pods");
    let old_operator = operator_pods
        .first()
        .and_then(|p| p.metadata.name.clone())
        .expect("an operator pod");
    kubectl(
        setup.cp.kubeconfig_path(),
        [
            "delete",
            "pod",
            "--namespace",
            setup.installed.ns.as_str(),
            old_operator.as_str(),
            "--wait=false",
        ],
    )
    .unwrap_or_else(|e| panic!("deleting the operator pod: {e}"));
    let leases: Api<Lease> = Api::namespaced(setup.cp.client(), &setup.installed.ns);
    let lease_name = format!("{}-callmeback-leader", setup.installed.ns);
    eventually("a new operator pod holds the Lease", || async {
        let holder = leases
            .get(&lease_name)
            .await
            .map_err(|e| e.to_string())?
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        (!holder.is_empty() && holder != old_operator)
            .then_some(())
            .ok_or(format!("holder {holder:?}"))
    })
    .await;
    tokio::time::sleep(POLL * 3).await;
    let peak_until = Instant::now();
    eventually_within(
        POLL * 6,
        "every pod's deletion cost equals its calls; busy pods protected",
        || async {
            let pods = pods_with(
                setup.cp,
                &setup.installed.ns,
                &setup.installed.voice_selector,
            )
            .await?;
            for pod in pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                let calls = pod_load(pod).await?["activeCalls"].as_u64().unwrap_or(0);
                let a = pod.metadata.annotations.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                let cost = a.get(DELETION_COST).cloned().unwrap_or_default();
                if cost != calls.to_string() {
                    return Err(format!("{name}: cost {cost:?}, {calls} calls"));
                }
                let busy = calls > 0;
                let evict = a.get(SAFE_TO_EVICT).map(String::as_str);
                let disrupt = a.get(DO_NOT_DISRUPT).map(String::as_str);
                if busy && (evict != Some("false") || disrupt != Some("true")) {
                    return Err(format!("{name}: busy but {evict:?} / {disrupt:?}"));
                }
                if !busy && (evict.is_some() || disrupt.is_some()) {
                    return Err(format!("{name}: idle but {evict:?} / {disrupt:?}"));
                }
            }
            Ok(())
        },
    )
    .await;

    // Down: 12 calls end (4 stay), then the last 4.
    for release in &releases[..12] {
        release.cancel();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    setup
        .wait_replicas_ready(wanted_for(4), "2 voice pods for 4 calls")
        .await;
    for release in &releases[12..] {
        release.cancel();
    }
    setup.wait_replicas_ready(1, "back to 1 voice pod").await;
    let (answered, failures) = release_all(&releases, calls).await;
    stop.cancel();
    let samples = sampler.await.expect("the sampler");
    setup.uninstall();
    print_timeline(&samples);
    assert!(failures.is_empty(), "calls cut or unanswered: {failures:?}");
    println!("{answered} turns answered in 16 calls");

    // Replicas followed the load: whenever the pods counted more calls than the
    // Deployment was sized for, it caught up within two poll intervals.
    let mut behind_since: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    for s in &samples {
        let (Some(replicas), calls) = (s.replicas, s.calls()) else {
            continue;
        };
        if replicas < wanted_for(calls) {
            let since = *behind_since.get_or_insert(s.at);
            worst = worst.max(s.at.saturating_duration_since(since));
        } else {
            behind_since = None;
        }
    }
    println!("scale-up lag, worst: {worst:?}");
    assert!(
        worst <= POLL * 2 + Duration::from_secs(5),
        "the Deployment lagged the load by {worst:?}"
    );

    // The operator restart scaled nothing down.
    let restart_window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= peak_from && s.at <= peak_until)
        .collect();
    assert!(
        restart_window
            .iter()
            .all(|s| s.replicas.is_none_or(|r| r >= wanted_for(16))),
        "replicas dropped while 16 calls were live and the operator restarted: {:?}",
        restart_window
            .iter()
            .map(|s| s.replicas)
            .collect::<Vec<_>>()
    );

    // Busy pods stayed protected through the restart (the new operator neither
    // dropped nor flapped the annotations), and no voice container restarted.
    for s in &restart_window {
        for p in s.live().filter(|p| p.calls.unwrap_or(0) > 0) {
            assert!(
                p.safe_to_evict.as_deref() == Some("false")
                    && p.do_not_disrupt.as_deref() == Some("true"),
                "busy pod {} unprotected during the operator restart: {:?} / {:?}",
                p.name,
                p.safe_to_evict,
                p.do_not_disrupt
            );
        }
    }
    let restarted: Vec<&str> = samples
        .iter()
        .flat_map(|s| s.pods.iter())
        .filter(|p| p.restarts > 0)
        .map(|p| p.name.as_str())
        .collect();
    assert!(
        restarted.is_empty(),
        "voice containers restarted: {restarted:?}"
    );

    // Idle first: the pods picked for removal in one step were, in the sample
    // before, the cheapest by the deletion cost the ReplicaSet controller reads
    // (every removed pod costs no more than every pod kept).
    let mut seen_deleting = BTreeSet::new();
    for pair in samples.windows(2) {
        let [before, after] = pair else { continue };
        let removed: Vec<&PodSample> = after
            .pods
            .iter()
            .filter(|p| p.deleting && seen_deleting.insert(p.uid.clone()))
            .filter_map(|p| before.pods.iter().find(|b| b.uid == p.uid && !b.deleting))
            .collect();
        if removed.is_empty() {
            continue;
        }
        let kept_cheapest = before
            .live()
            .filter(|b| removed.iter().all(|r| r.uid != b.uid))
            .filter_map(|b| b.cost)
            .min();
        for r in &removed {
            assert!(
                kept_cheapest.is_none_or(|k| r.cost.unwrap_or(0) <= k),
                "{} was removed at cost {:?} while a kept pod cost {kept_cheapest:?}",
                r.name,
                r.cost
            );
        }
    }
    // Every pod that ever ran but one is gone (a pod that drained between two
    // samples is never seen terminating, so count the UIDs, not the sightings).
    let all_uids: BTreeSet<&str> = samples
        .iter()
        .flat_map(|s| s.pods.iter().map(|p| p.uid.as_str()))
        .collect();
    let last_live = samples.last().map_or(0, |s| s.live().count());
    assert!(
        all_uids.len() >= 5 && last_live <= 1,
        "{} pods ran, {last_live} left (5 -> 1); {} seen terminating",
        all_uids.len(),
        seen_deleting.len()
    );
}

/// The samples as a table, for the test's output.
fn print_timeline(samples: &[Sample]) {
    let Some(first) = samples.first().map(|s| s.at) else {
        return;
    };
    for s in samples {
        let pods: Vec<String> = s
            .pods
            .iter()
            .map(|p| {
                format!(
                    "{}{}:{}/{}",
                    p.name.rsplit('-').next().unwrap_or(""),
                    if p.deleting { "(x)" } else { "" },
                    p.calls.map_or("?".into(), |c| c.to_string()),
                    p.cost.map_or("-".into(), |c| c.to_string())
                )
            })
            .collect();
        println!(
            "{:>6.1}s replicas {:?} calls {} pods [calls/cost] {}",
            s.at.duration_since(first).as_secs_f64(),
            s.replicas,
            s.calls(),
            pods.join(" ")
        );
    }
}

/// Spawns `n` held calls, `spacing` apart, and waits until the pods count them
/// all; panics with the first call's failure if one fails meanwhile.
async fn hold_calls(
    setup: &Setup,
    n: usize,
    prefix: &str,
    spacing: Duration,
) -> (Vec<CancellationToken>, JoinSet<Result<u32, String>>) {
    let releases: Vec<CancellationToken> = (0..n).map(|_| CancellationToken::new()).collect();
    let failed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = JoinSet::new();
    for (i, release) in releases.iter().enumerate() {
        let call = held_call(
            setup.sim.clone(),
            setup.to.clone(),
            release.clone(),
            format!("{prefix} {i}"),
        );
        let failed = failed.clone();
        tasks.spawn(async move {
            let result = call.await;
            if let Err(why) = &result {
                failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(why.clone());
            }
            result
        });
        tokio::time::sleep(spacing).await;
    }
    let want = u64::try_from(n).unwrap_or(u64::MAX);
    eventually(&format!("{n} held calls counted by /load"), || async {
        let already: Vec<String> = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(
            already.is_empty(),
            "held calls failed before all {n} were up: {already:?}"
        );
        let pods = pods_with(
            setup.cp,
            &setup.installed.ns,
            &setup.installed.voice_selector,
        )
        .await?;
        let mut sum = 0;
        let mut per_pod = Vec::new();
        for pod in &pods {
            let calls = pod_load(pod).await?["activeCalls"].as_u64().unwrap_or(0);
            per_pod.push(format!(
                "{}={calls}",
                pod.metadata.name.as_deref().unwrap_or_default()
            ));
            sum += calls;
        }
        (sum == want)
            .then_some(())
            .ok_or(format!("{sum} calls ({})", per_pod.join(" ")))
    })
    .await;
    (releases, tasks)
}

/// Releases held calls; the turns they answered and what went wrong in them.
async fn release_all(
    releases: &[CancellationToken],
    mut tasks: JoinSet<Result<u32, String>>,
) -> (u32, Vec<String>) {
    for release in releases {
        release.cancel();
    }
    let mut answered = 0;
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(turns)) => answered += turns,
            Ok(Err(why)) => failures.push(why),
            Err(e) => failures.push(format!("call task: {e}")),
        }
    }
    (answered, failures)
}

#[tokio::test]
async fn rolling_update_under_traffic_cuts_no_live_call_and_refuses_no_new_one() {
    // Proves on the real node: with 8 live calls and a new call every 2 s, a
    // change that rolls the pods (a Secret value the pods read as env) brings up
    // new pods while the old ones keep their live calls; no live call is cut, no
    // new call is refused or greeted with a goodbye (each hears the persona's
    // greeting and gets an answer), and once the live calls end the old pods
    // are gone and only new pods serve.
    let _turn = ONE_AT_A_TIME.lock().await;
    let setup = setup(
        "node-roll",
        |vd| {
            vd["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("autoscaling");
            vd["spec"]["replicas"] = json!(2);
        },
        2,
    )
    .await;
    let before: BTreeSet<String> = pods_with(
        setup.cp,
        &setup.installed.ns,
        &setup.installed.voice_selector,
    )
    .await
    .expect("voice pods")
    .iter()
    .filter_map(|p| p.metadata.uid.clone())
    .collect();
    let (releases, live) = hold_calls(&setup, 8, "live call", Duration::from_secs(1)).await;

    // The change: a Secret key the pods read at start.
    let secrets: Api<Secret> = Api::namespaced(setup.cp.client(), &setup.installed.ns);
    let secret_name = setup
        .vds()
        .get(&setup.installed.vd_name)
        .await
        .expect("the VoiceDeployment")
        .spec
        .secret_ref
        .name;
    secrets
        .patch(
            &secret_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "stringData": { "TWILIO_FROM_NUMBER": "+14155550199" } })),
        )
        .await
        .expect("changing the Secret");

    // New calls keep coming while the pods roll.
    let rolled = async {
        eventually("2 new voice pods Ready beside the old ones", || async {
            let pods = pods_with(
                setup.cp,
                &setup.installed.ns,
                &setup.installed.voice_selector,
            )
            .await?;
            let fresh: Vec<_> = pods
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && !before.contains(p.metadata.uid.as_deref().unwrap_or(""))
                })
                .collect();
            if fresh.len() != 2 {
                return Err(format!("{} new pods", fresh.len()));
            }
            for pod in fresh {
                ready_on_node(pod, setup.node.name())?;
            }
            Ok(())
        })
        .await
    };
    let mut new_calls = Vec::new();
    let mut n = 0;
    tokio::pin!(rolled);
    loop {
        tokio::select! {
            () = &mut rolled => break,
            () = tokio::time::sleep(Duration::from_secs(2)) => {
                n += 1;
                let (sim, to) = (setup.sim.clone(), setup.to.clone());
                new_calls.push(tokio::spawn(async move {
                    short_call(&sim, &to, &format!("new call {n}")).await
                }));
            }
        }
    }
    // A few more once the new pods serve.
    for _ in 0..3 {
        n += 1;
        let (sim, to) = (setup.sim.clone(), setup.to.clone());
        new_calls.push(tokio::spawn(async move {
            short_call(&sim, &to, &format!("new call {n}")).await
        }));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut failures = Vec::new();
    for call in new_calls {
        match call.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failures.push(why),
            Err(e) => failures.push(format!("call task: {e}")),
        }
    }
    // The old pods still hold their live calls, draining.
    let old_alive = pods_with(
        setup.cp,
        &setup.installed.ns,
        &setup.installed.voice_selector,
    )
    .await
    .expect("voice pods")
    .iter()
    .filter(|p| before.contains(p.metadata.uid.as_deref().unwrap_or("")))
    .count();
    failures.extend(release_all(&releases, live).await.1);
    eventually("the old pods exit once their calls ended", || async {
        let pods = pods_with(
            setup.cp,
            &setup.installed.ns,
            &setup.installed.voice_selector,
        )
        .await?;
        let old: Vec<_> = pods
            .iter()
            .filter(|p| before.contains(p.metadata.uid.as_deref().unwrap_or("")))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        old.is_empty()
            .then_some(())
            .ok_or(format!("old pods left: {old:?}"))
    })
    .await;
    setup.uninstall();
    println!("{n} new calls during the rollout; {old_alive} old pods were draining");
    assert!(
        failures.is_empty(),
        "calls cut or refused during the rollout: {failures:?}"
    );
    assert!(n >= 3, "only {n} new calls were placed during the rollout");
}

/// The system prompt of the latest chat request the LLM emulator saw.
fn last_system_prompt(emulators: &Emulators) -> String {
    emulators
        .cerebras
        .chat_requests()
        .last()
        .and_then(|r| {
            r.body["messages"].as_array().and_then(|m| {
                m.iter()
                    .find(|m| m["role"] == "system")
                    .and_then(|m| m["content"].as_str().map(str::to_owned))
            })
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn persona_edits_under_traffic_restart_no_pod_and_an_invalid_edit_keeps_the_last_good_version()
 {
    // Proves on the real node, with 4 live calls: editing a persona's prompt,
    // adding a persona (with a number route) and making a persona invalid
    // restart no pod (same UIDs, no container restarts) and cut no live call;
    // new calls use the edited prompt once the kubelet has synced the volume
    // (the time is printed); the new persona answers its number; the invalid
    // edit is not served: new calls keep the last good prompt while the
    // Persona says Ready=False.
    let _turn = ONE_AT_A_TIME.lock().await;
    let setup = setup(
        "node-persona",
        |vd| {
            vd["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("autoscaling");
            vd["spec"]["replicas"] = json!(2);
        },
        2,
    )
    .await;
    let uids = |pods: &[k8s_openapi::api::core::v1::Pod]| -> BTreeSet<String> {
        pods.iter().filter_map(|p| p.metadata.uid.clone()).collect()
    };
    let before = uids(
        &pods_with(
            setup.cp,
            &setup.installed.ns,
            &setup.installed.voice_selector,
        )
        .await
        .expect("voice pods"),
    );
    let (releases, live) = hold_calls(&setup, 4, "live call", Duration::from_secs(1)).await;
    let personas: Api<Persona> = Api::namespaced(setup.cp.client(), &setup.installed.ns);
    let persona = setup
        .vds()
        .get(&setup.installed.vd_name)
        .await
        .expect("the VoiceDeployment")
        .spec
        .default_persona
        .expect("the example has a default persona");

    // 1. A prompt edit reaches new calls, without a restart.
    let marker = "Edited by the node test.";
    let mut edited = personas.get(&persona).await.expect("the persona").spec;
    edited.system_prompt = format!("{}\n{marker}", edited.system_prompt.trim_end());
    let edited_at = Instant::now();
    personas
        .patch(
            &persona,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "systemPrompt": edited.system_prompt } })),
        )
        .await
        .expect("editing the persona's prompt");
    eventually("a new call uses the edited prompt", || async {
        short_call(&setup.sim, &setup.to, "after the prompt edit").await?;
        let prompt = last_system_prompt(&setup.emulators);
        prompt
            .contains(marker)
            .then_some(())
            .ok_or("the pod still serves the old prompt".to_owned())
    })
    .await;
    println!(
        "a prompt edit reached new calls after {:?}",
        edited_at.elapsed()
    );

    // 2. A new persona with its own number.
    let mut added: Persona = personas.get(&persona).await.expect("the persona");
    added.metadata = kube::api::ObjectMeta {
        name: Some("pop-up".into()),
        ..kube::api::ObjectMeta::default()
    };
    added.status = None;
    added.spec.system_prompt = "You are Pop, a pop-up persona of the node test.".into();
    personas
        .create(&kube::api::PostParams::default(), &added)
        .await
        .expect("adding a persona");
    let pop_number = "+14155550102";
    let mut names = setup
        .vds()
        .get(&setup.installed.vd_name)
        .await
        .expect("the VoiceDeployment")
        .spec
        .personas
        .unwrap_or_default();
    names.push("pop-up".into());
    setup
        .patch_vd(json!({ "personas": names, "numberRoutes": { pop_number: "pop-up" } }))
        .await;
    eventually("the added persona answers its number", || async {
        short_call(&setup.sim, pop_number, "the added persona").await?;
        last_system_prompt(&setup.emulators)
            .contains("You are Pop")
            .then_some(())
            .ok_or("not served by pop-up yet".to_owned())
    })
    .await;

    // 3. An invalid edit: duplicate keyterms (the schema allows them, the
    // operator's validation does not).
    personas
        .patch(
            &persona,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": {
                "systemPrompt": "This prompt must never be served.",
                "stt": { "keyterms": ["Maya", "maya"] }
            } })),
        )
        .await
        .expect("making the persona invalid");
    eventually("the Persona says Ready=False", || async {
        let p = personas.get(&persona).await.map_err(|e| e.to_string())?;
        let ready = p
            .status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False")
            })
            .unwrap_or(false);
        ready.then_some(()).ok_or(format!("status {:?}", p.status))
    })
    .await;
    // Give the kubelet a full sync period to (wrongly) deliver it, then check.
    tokio::time::sleep(Duration::from_secs(70)).await;
    short_call(&setup.sim, &setup.to, "after the invalid edit")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let prompt = last_system_prompt(&setup.emulators);
    assert!(
        prompt.contains(marker) && !prompt.contains("must never be served"),
        "after the invalid edit the pod serves: {prompt:?}"
    );

    let (_, failures) = release_all(&releases, live).await;
    let pods = pods_with(
        setup.cp,
        &setup.installed.ns,
        &setup.installed.voice_selector,
    )
    .await
    .expect("voice pods");
    let restarts: i32 = pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .map(|c| c.restart_count)
        .sum();
    setup.uninstall();
    assert!(failures.is_empty(), "live calls affected: {failures:?}");
    assert_eq!(uids(&pods), before, "the voice pods were replaced");
    assert_eq!(restarts, 0, "voice containers restarted");
}

#[tokio::test]
async fn switching_between_fixed_replicas_and_autoscaling_never_dips_the_replica_count() {
    // Proves on the real node: fixed 3 -> calls autoscaling keeps 3 until the
    // scale-down window has passed (then steps down, never below minReplicas);
    // autoscaling -> fixed 2 goes straight to 2 (never 1 on the way); fixed ->
    // the CPU policy keeps the count (server-side apply does not reset it to 1);
    // and `kubectl scale` under autoscaling is refused with a message.
    let _turn = ONE_AT_A_TIME.lock().await;
    let setup = setup(
        "node-switch",
        |vd| {
            vd["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("autoscaling");
            vd["spec"]["replicas"] = json!(3);
        },
        3,
    )
    .await;
    // Watches spec.replicas every 200 ms while `change` runs and for `after`.
    async fn watch_replicas(setup: &Setup, change: Value, after: Duration) -> Vec<i32> {
        setup.patch_vd(change).await;
        let until = Instant::now() + after;
        let mut seen = Vec::new();
        while Instant::now() < until {
            if let Ok(r) = setup.replicas().await {
                seen.push(r);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    }

    // Fixed 3 -> calls autoscaling (no calls: wants 1 after the 20 s window).
    let seen = watch_replicas(
        &setup,
        json!({ "replicas": null, "autoscaling": calls_autoscaling() }),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        seen.iter().all(|r| *r == 3),
        "fixed 3 -> autoscaling changed replicas within the window: {seen:?}"
    );
    eventually("autoscaling steps down to minReplicas", || async {
        let r = setup.replicas().await?;
        (r == 1).then_some(()).ok_or(format!("{r} replicas"))
    })
    .await;

    // kubectl scale under autoscaling: refused, with a message.
    let scale = kubectl(
        setup.cp.kubeconfig_path(),
        [
            "scale",
            "voicedeployment",
            "--namespace",
            setup.installed.ns.as_str(),
            setup.installed.vd_name.as_str(),
            "--replicas=4",
        ],
    );
    let refusal = scale.expect_err("kubectl scale under autoscaling must fail");
    assert!(
        refusal.to_string().contains("autoscaling"),
        "the refusal says why: {refusal}"
    );

    // Autoscaling (1) -> fixed 2: straight up to 2.
    let seen = watch_replicas(
        &setup,
        json!({ "replicas": 2, "autoscaling": null }),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        seen.last() == Some(&2) && seen.windows(2).all(|w| w[1] >= w[0]),
        "autoscaling -> fixed 2: {seen:?}"
    );

    // Fixed 2 -> the CPU policy: the HPA takes over at 2, not at 1.
    let mut cpu = calls_autoscaling();
    cpu["cpu"] = json!({ "targetUtilization": 70 });
    cpu["minReplicas"] = json!(1);
    let seen = watch_replicas(
        &setup,
        json!({ "replicas": null, "autoscaling": cpu }),
        Duration::from_secs(10),
    )
    .await;
    setup.uninstall();
    assert!(
        seen.iter().all(|r| *r == 2),
        "fixed 2 -> CPU policy: {seen:?}"
    );
}
