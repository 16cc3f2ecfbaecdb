//! The operator's load polling at scale (issue "Scale on live calls"): 100
//! VoiceDeployments with call-capacity autoscaling, 10 voice pods each (1,000 pods
//! on kwok's fake node, each answering `/load` from its own loopback address, see
//! `fake_voice_pods`), polled every 5 s by the real operator binary as its own
//! process. It prints:
//! - the operator's CPU (utime + stime from `/proc`) and memory (VmRSS, VmHWM)
//!   while the load is steady and while 5 % of the pods change load every poll;
//! - the annotation patches it sends per second in both windows (writes only on
//!   change; capped by `--pod-patches-per-second`, default 20/s) and the time the
//!   first pass over 1,000 fresh pods takes at that cap;
//! - one poll's duration over every pod (the operator's own histogram);
//! - the time from a load change on one VoiceDeployment's pods to its Deployment's
//!   new `spec.replicas`.
//!
//! `cargo build --release -p voice-operator && cargo bench -p callmeback-tests --bench operator_load_poll`
//! (sizes via `LOAD_BENCH_DEPLOYMENTS`, `LOAD_BENCH_PODS_PER_DEPLOYMENT`). The
//! operator binary is the one next to this benchmark's profile directory
//! (`target/release/voice-operator` for `cargo bench`), or `CALLMEBACK_OPERATOR_BIN`.
//! With `--metrics-listen ADDRESS:PORT` the operator serves its metrics there, so
//! `render_dashboard bench --job operator ... -- <this binary> --bench` draws the
//! dashboard's operator rows from a real Prometheus that scraped the run.
//! Under `cargo test` (no `--bench`) it runs a smoke version (2 x 3 pods, short
//! windows) against the debug binary so the benchmark cannot rot. Results go in
//! docs/benchmarks.md.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use callmeback_tests::exposition::{self, Sample};
use callmeback_tests::fake_voice_pods::{self, FakePods};
use callmeback_tests::operator_harness::{apply_json, install_crds, secret_doc};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use rand::seq::IndexedRandom;

/// Every voice pod the benchmark made carries this label (value: its VoiceDeployment).
const VOICE_PODS: &str = "callmeback.dev/voice-deployment";
/// The operator's default poll interval, which the figures are for.
const POLL: Duration = Duration::from_secs(5);
/// Calls each pod carries in the steady state: below `callsPerPod`, so the
/// minimum replica count holds.
const STEADY_CALLS: u32 = 5;
/// `callsPerPod` of every VoiceDeployment.
const CALLS_PER_POD: u32 = 10;
/// Linux reports `/proc/<pid>/stat` times in USER_HZ, fixed at 100 by the ABI.
const USER_HZ: f64 = 100.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The operator binary built with this benchmark's profile.
fn operator_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CALLMEBACK_OPERATOR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the benchmark's own path");
    // target/<profile>/deps/operator_load_poll-<hash> -> target/<profile>/voice-operator
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the benchmark lives in target/<profile>/deps");
    profile_dir.join("voice-operator")
}

/// The operator as its own process; killed on drop.
struct OperatorProcess {
    child: std::sync::Mutex<Child>,
    pid: u32,
    metrics_url: String,
    log_path: PathBuf,
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl OperatorProcess {
    /// `listen`: the operator's metrics address (a free loopback port if `None`).
    fn start(
        kubeconfig: &std::path::Path,
        ns: &str,
        load_port: u16,
        listen: Option<std::net::SocketAddr>,
    ) -> Self {
        let bin = operator_bin();
        assert!(
            bin.is_file(),
            "no operator binary at {} (cargo build --release -p voice-operator, or set CALLMEBACK_OPERATOR_BIN)",
            bin.display()
        );
        let listen = listen.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port for the operator's metrics")
        });
        let log_path = std::env::temp_dir().join(format!("operator-load-poll-{ns}.log"));
        let log = std::fs::File::create(&log_path).expect("the operator's log file");
        let child = Command::new(&bin)
            .args([
                "run",
                "--leader-election",
                "false",
                "--listen",
                &listen.to_string(),
                "--watch-namespace",
                ns,
                "--twilio-api-url",
                "http://127.0.0.1:9",
                "--load-port",
                &load_port.to_string(),
                "--load-poll-interval",
                &POLL.as_secs().to_string(),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        println!("  operator log: {}", log_path.display());
        OperatorProcess {
            pid: child.id(),
            child: std::sync::Mutex::new(child),
            metrics_url: format!("http://{listen}/metrics"),
            log_path,
        }
    }

    /// Panics with the end of its log if the operator exited.
    fn assert_alive(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "the operator exited ({status}); its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// CPU seconds the process used so far (all threads, user + system).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .expect("the operator's /proc/<pid>/stat");
        // Fields after the command name (which may contain spaces) in ")".
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; 12 and 13 after ")".
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / USER_HZ
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("the operator's /proc/<pid>/status");
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
    }

    async fn scrape(&self, http: &reqwest::Client) -> Vec<Sample> {
        for _ in 0..50 {
            self.assert_alive();
            if let Ok(resp) = http.get(&self.metrics_url).send().await
                && let Ok(text) = resp.text().await
            {
                return exposition::parse(&text).expect("the operator's exposition parses");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "the operator's /metrics at {} never answered",
            self.metrics_url
        );
    }
}

/// Sum of every series of `name`.
fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.labels.get("__name__").map(String::as_str) == Some(name))
        .map(|s| s.value)
        .sum()
}

/// What one measuring window saw.
struct Window {
    seconds: f64,
    cpu: f64,
    patches: f64,
    reads: f64,
    poll_p50: f64,
    poll_p99: f64,
    rss: f64,
}

impl Window {
    fn print(&self, name: &str, load_changes_per_second: f64) {
        println!(
            "  {name:<7} {:>5.0} s: operator CPU {:>5.1} % of a core, RSS {:>5.1} MiB; \
             /load reads {:>6.1}/s; pod load changes {:>5.1}/s, annotation patches {:>5.1}/s; \
             one poll p50 {:>4.0} ms, p99 {:>4.0} ms",
            self.seconds,
            100.0 * self.cpu / self.seconds,
            self.rss,
            self.reads / self.seconds,
            load_changes_per_second,
            self.patches / self.seconds,
            self.poll_p50 * 1000.0,
            self.poll_p99 * 1000.0,
        );
    }
}

/// Measures the operator over `length` while `during` runs (it returns the
/// number of pod load changes it made).
async fn measure<F, Fut>(
    operator: &OperatorProcess,
    http: &reqwest::Client,
    length: Duration,
    during: F,
) -> (Window, usize)
where
    F: FnOnce(Instant) -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let before = operator.scrape(http).await;
    let cpu_before = operator.cpu_seconds();
    let started = Instant::now();
    let deadline = started + length;
    let changes = during(deadline).await;
    tokio::time::sleep_until(deadline.into()).await;
    let after = operator.scrape(http).await;
    let cpu = operator.cpu_seconds() - cpu_before;
    let seconds = started.elapsed().as_secs_f64();
    let family = "operator_load_poll_duration_seconds";
    let (b0, b1) = (
        exposition::histogram_buckets(&before, family, &[]),
        exposition::histogram_buckets(&after, family, &[]),
    );
    let window_buckets: Vec<(f64, f64)> = b1
        .iter()
        .map(|(le, n)| {
            let was = b0.iter().find(|(l, _)| l == le).map_or(0.0, |b| b.1);
            (*le, n - was)
        })
        .collect();
    let delta = |name: &str| total(&after, name) - total(&before, name);
    let window = Window {
        seconds,
        cpu,
        patches: delta("operator_pod_annotation_patches_total"),
        reads: delta("operator_pod_load_reads_total"),
        poll_p50: exposition::bucket_quantile(0.5, window_buckets.clone()),
        poll_p99: exposition::bucket_quantile(0.99, window_buckets),
        rss: operator.memory_mib().0,
    };
    (window, changes)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    // `render_dashboard bench` scrapes the operator here (docs/dashboard-operator.png).
    let metrics_listen = args
        .iter()
        .position(|a| a == "--metrics-listen")
        .and_then(|i| args.get(i + 1))
        .map(|a| a.parse().expect("--metrics-listen takes ADDRESS:PORT"));
    let vds = env_usize("LOAD_BENCH_DEPLOYMENTS", if bench { 100 } else { 2 });
    let per_vd = env_usize("LOAD_BENCH_PODS_PER_DEPLOYMENT", if bench { 10 } else { 3 });
    let window = if bench {
        Duration::from_secs(60)
    } else {
        POLL * 2
    };
    let trials = if bench { 10 } else { 1 };
    let pods_total = vds * per_vd;

    let cp = callmeback_tests::controlplane::shared().await;
    if !cp.pods_run() {
        println!("operator_load_poll: skipped, this control plane runs no pods (no kwok)");
        return;
    }
    install_crds(cp).await;
    let client = cp.client();
    let ns = cp.new_namespace("load-bench").await;
    let mut secret = secret_doc();
    secret["metadata"]["name"] = "keys".into();
    apply_json(&client, &ns, secret).await;
    apply_json(
        &client,
        &ns,
        serde_json::json!({
            "apiVersion": "callmeback.dev/v1alpha1", "kind": "Persona",
            "metadata": { "name": "sam" },
            "spec": { "displayName": "Sam", "systemPrompt": "You are Sam.", "greeting": "Hi",
                      "voice": { "voiceId": "voice123" } }
        }),
    )
    .await;

    // Addresses for every pod, the ones a scale-up adds, and spare.
    let ips = fake_voice_pods::loopback_ips(1, pods_total * 2 + 16);
    let fake = FakePods::default();
    let load_port = fake.start(&ips).await.expect("loopback /load listeners");
    let operator = OperatorProcess::start(cp.kubeconfig_path(), &ns, load_port, metrics_listen);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");

    let per_vd_i32 = i32::try_from(per_vd).expect("pods per deployment fit an i32");
    let started = Instant::now();
    futures::stream::iter(0..vds)
        .map(|i| {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                apply_json(
                    &client,
                    &ns,
                    serde_json::json!({
                        "apiVersion": "callmeback.dev/v1alpha1", "kind": "VoiceDeployment",
                        "metadata": { "name": format!("vd{i}") },
                        "spec": { "personas": ["sam"], "secretRef": { "name": "keys" },
                                  "publicUrl": "https://voice.example.com",
                                  "autoscaling": {
                                      "minReplicas": per_vd_i32, "maxReplicas": per_vd_i32 * 2,
                                      "callsPerPod": CALLS_PER_POD, "buffer": 0,
                                      "scaleDownStabilizationSeconds": 10 } }
                    }),
                )
                .await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;

    // kwok runs the pods; the benchmark moves each onto its loopback address
    // (and keeps doing so for pods a scale-up adds).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mapping = loop {
        let m = fake_voice_pods::assign_loopback_ips(&pods, VOICE_PODS, &ips)
            .await
            .expect("moving pods onto loopback");
        if m.len() >= pods_total {
            break m;
        }
        operator.assert_alive();
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "only {} of {pods_total} pods running after 15 minutes",
            m.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!(
        "operator_load_poll: {vds} voice deployments x {per_vd} pods = {pods_total} pods, poll every {POLL:?}"
    );
    println!(
        "  {pods_total} pods running on loopback after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let assigner = {
        let pods = pods.clone();
        let ips = ips.clone();
        tokio::spawn(async move {
            loop {
                let _ = fake_voice_pods::assign_loopback_ips(&pods, VOICE_PODS, &ips).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Every pod takes calls: the operator's first pass annotates all of them
    // (patches counted from here: the idle pods' deletion cost of 0 came before).
    let patches_before = total(
        &operator.scrape(&http).await,
        "operator_pod_annotation_patches_total",
    );
    let loaded = Instant::now();
    for ip in mapping.values() {
        fake.set(*ip, STEADY_CALLS);
    }
    let expected_calls = f64::from(STEADY_CALLS) * pods_total as f64;
    let mut last_patches = -1.0;
    let mut still_since = Instant::now();
    loop {
        let m = operator.scrape(&http).await;
        let calls = total(&m, "operator_voicedeployment_active_calls");
        let patches = total(&m, "operator_pod_annotation_patches_total") - patches_before;
        if patches != last_patches {
            last_patches = patches;
            still_since = Instant::now();
        }
        // Done when every call is seen and the patches stopped for two polls.
        if calls >= expected_calls
            && patches >= pods_total as f64
            && still_since.elapsed() > POLL * 2
        {
            break;
        }
        assert!(
            loaded.elapsed() < Duration::from_secs(900),
            "the operator did not settle: {calls} calls seen, {patches} patches"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settle = loaded.elapsed().saturating_sub(POLL * 2);
    println!(
        "  first pass: {last_patches:.0} annotation patches for {pods_total} newly busy pods in {:.1} s ({:.1}/s)",
        settle.as_secs_f64(),
        last_patches / settle.as_secs_f64().max(0.001)
    );

    // Steady: nothing changes, so nothing should be written.
    let (steady, _) = measure(&operator, &http, window, |_| async { 0 }).await;
    steady.print("steady", 0.0);

    // Churn: every poll interval 5 % of the pods get a new call count below
    // callsPerPod (no replica change; annotations change).
    let addresses: Vec<Ipv4Addr> = mapping.values().copied().collect();
    let per_round = (pods_total / 20).max(1);
    let (churn, changes) = measure(&operator, &http, window, |deadline| {
        let fake = fake.clone();
        let addresses = addresses.clone();
        async move {
            let mut changes = 0;
            let mut rng = rand::rng();
            while Instant::now() + POLL < deadline {
                for ip in addresses.choose_multiple(&mut rng, per_round) {
                    let now = fake.get(*ip);
                    // 0..=9 calls, never the current count: a real change.
                    fake.set(*ip, (now + 1 + rand::random_range(0..9)) % CALLS_PER_POD);
                    changes += 1;
                }
                tokio::time::sleep(POLL).await;
            }
            changes
        }
    })
    .await;
    churn.print("churn", changes as f64 / churn.seconds);
    for ip in mapping.values() {
        fake.set(*ip, STEADY_CALLS);
    }

    // A load change on one VoiceDeployment: every pod at 15 calls asks for
    // ceil(15 * per_vd / 10) pods. Each trial uses another VoiceDeployment and
    // starts at a random point of the poll cycle.
    let by_vd: BTreeMap<String, Vec<Ipv4Addr>> = {
        let list = pods
            .list(&kube::api::ListParams::default().labels(VOICE_PODS))
            .await
            .expect("listing voice pods");
        let mut by_vd: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for p in list.items {
            let vd = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(VOICE_PODS))
                .cloned()
                .unwrap_or_default();
            let Some(name) = p.metadata.name.as_ref() else {
                continue;
            };
            if let Some(ip) = mapping.get(name) {
                by_vd.entry(vd).or_default().push(*ip);
            }
        }
        by_vd
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let want = i32::try_from((15 * per_vd).div_ceil(CALLS_PER_POD as usize)).unwrap_or(i32::MAX);
    let mut lags = Vec::new();
    for (vd, ips) in by_vd.iter().take(trials) {
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..5000))).await;
        let changed = Instant::now();
        for ip in ips {
            fake.set(*ip, 15);
        }
        loop {
            let replicas = deployments
                .get(vd)
                .await
                .ok()
                .and_then(|d| d.spec?.replicas);
            if replicas == Some(want) {
                break;
            }
            assert!(
                changed.elapsed() < Duration::from_secs(120),
                "{vd} never reached {want} replicas (at {replicas:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lags.push(changed.elapsed());
    }
    lags.sort();
    let at = |q: f64| {
        let i = ((lags.len() as f64 - 1.0) * q).round() as usize;
        lags.get(i).copied().unwrap_or_default().as_secs_f64()
    };
    println!(
        "  load change -> Deployment replicas {per_vd_i32} -> {want}: {} trials, p50 {:.2} s, max {:.2} s",
        lags.len(),
        at(0.5),
        at(1.0)
    );
    let (rss, hwm) = operator.memory_mib();
    println!("  operator memory at the end: RSS {rss:.1} MiB, peak {hwm:.1} MiB");
    assigner.abort();
    drop(operator);
}
