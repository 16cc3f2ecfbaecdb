//! Leader election (`voice_operator::leader`) against the real control plane, under
//! the chart's RBAC: two replicas campaign for one Lease; each one's "work" writes
//! a ConfigMap every 200 ms while it leads and records, by the test's monotonic
//! clock, when it started and stopped acting (a drop guard, so an aborted work
//! records its end too). One replica reaches the apiserver through a TCP proxy the
//! test turns into a black hole (connections stay open, no byte passes: the way a
//! partition looks, no reset to notice).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callmeback_tests::controlplane;
use callmeback_tests::operator_harness::operator_config;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use voice_operator::leader::{LeaderConfig, LeaderError, Timings, run_when_leader};
use voice_operator::metrics::Metrics;

/// Short but with the production ratios' safety margin: a holder stops by
/// 4 s + 1 s after its last renewal began, a candidate waits 6 s unchanged.
const TIMINGS: Timings = Timings {
    lease_duration: Duration::from_secs(6),
    renew_deadline: Duration::from_secs(4),
    retry_period: Duration::from_secs(1),
    stop_bound: Duration::from_secs(1),
};
const LEASE: &str = "callmeback-operator";

/// When each replica acted: (identity, start, end).
type ActingLog = Arc<Mutex<Vec<(String, Instant, Option<Instant>)>>>;

/// Records the end of an acting interval when dropped (returned or aborted).
struct Acting {
    log: ActingLog,
    index: usize,
}

impl Acting {
    fn start(log: &ActingLog, identity: &str) -> Self {
        let mut entries = log.lock().unwrap();
        entries.push((identity.to_owned(), Instant::now(), None));
        Acting {
            log: log.clone(),
            index: entries.len() - 1,
        }
    }
}

impl Drop for Acting {
    fn drop(&mut self) {
        if let Ok(mut entries) = self.log.lock()
            && let Some(entry) = entries.get_mut(self.index)
        {
            entry.2 = Some(Instant::now());
        }
    }
}

/// The leader's work: write the ConfigMap `acting` with our identity every 200 ms
/// until told to stop.
async fn act(
    client: Client,
    ns: String,
    identity: String,
    log: ActingLog,
    term: CancellationToken,
) {
    let _acting = Acting::start(&log, &identity);
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    loop {
        tokio::select! {
            () = term.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "acting" },
            "data": { "holder": identity },
        });
        let _ = cms
            .patch(
                "acting",
                &PatchParams::apply(&identity).force(),
                &Patch::Apply(&doc),
            )
            .await;
    }
}

/// One replica: its election task and metrics.
struct Replica {
    metrics: Metrics,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), LeaderError>>,
}

fn replica(client: Client, ns: &str, identity: &str, log: &ActingLog) -> Replica {
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let config = LeaderConfig {
        lease_name: LEASE.into(),
        namespace: ns.into(),
        identity: identity.into(),
        timings: TIMINGS,
    };
    let (c, n, id, l) = (
        client.clone(),
        ns.to_owned(),
        identity.to_owned(),
        log.clone(),
    );
    let task = tokio::spawn(run_when_leader(
        client,
        config,
        metrics.clone(),
        shutdown.clone(),
        move |term| act(c, n, id, l, term),
    ));
    Replica {
        metrics,
        shutdown,
        task,
    }
}

/// A TCP proxy to the apiserver that the test can turn into a black hole.
struct Proxy {
    port: u16,
    cut: CancellationToken,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = CancellationToken::new();
        let cut_accept = cut.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let cut = cut_accept.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let forward = async {
                        tokio::join!(pump(&mut ri, &mut wo, &cut), pump(&mut ro, &mut wi, &cut));
                    };
                    forward.await;
                    // Black hole: keep both sockets open, pass nothing, until the
                    // test ends (the runtime drops this task then).
                    std::future::pending::<()>().await;
                    drop((ri, wi, ro, wo));
                });
            }
        });
        Proxy { port, cut }
    }
}

/// Copies until EOF, an error or the cut.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    cut: &CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            () = cut.cancelled() => return,
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        let Some(chunk) = buf.get(..n) else { return };
        tokio::select! {
            () = cut.cancelled() => return,
            r = to.write_all(chunk) => if r.is_err() { return },
        }
    }
}

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (identity, start, end) of every acting interval, in start order.
fn intervals(log: &ActingLog) -> Vec<(String, Instant, Option<Instant>)> {
    let mut all = log.lock().unwrap().clone();
    all.sort_by_key(|e| e.1);
    all
}

#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_stops_acting_before_the_other_takes_over() {
    // Proves the holder acts only while its renewal is provably fresh by its own
    // clock: black-holed, it stops (work cancelled, then aborted) by the renew
    // deadline plus the stop bound and reports the loss; the other replica takes
    // over within the lease duration plus two retry periods of the cut, and the
    // two acting intervals never overlap.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("op-leader-cut").await;
    let config = operator_config(cp, &ns).await;
    let upstream = {
        let uri = &config.cluster_url;
        format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap_or(443))
    };
    let proxy = Proxy::start(upstream).await;
    let mut via_proxy = config.clone();
    via_proxy.cluster_url = format!("https://127.0.0.1:{}", proxy.port).parse().unwrap();
    let log: ActingLog = Arc::default();

    let a = replica(Client::try_from(via_proxy).unwrap(), &ns, "replica-a", &log);
    wait_for("replica-a leads", Duration::from_secs(30), || {
        a.metrics.leader.get() == 1
    })
    .await;
    let b = replica(Client::try_from(config).unwrap(), &ns, "replica-b", &log);
    // b waits while a renews (several lease durations would pass otherwise).
    tokio::time::sleep(TIMINGS.lease_duration + TIMINGS.retry_period).await;
    assert_eq!(b.metrics.leader.get(), 0, "b took a Lease a was renewing");
    assert_eq!(a.metrics.leader.get(), 1);

    let cut = Instant::now();
    proxy.cut.cancel();
    let a_result = tokio::time::timeout(
        TIMINGS.renew_deadline + TIMINGS.stop_bound + Duration::from_secs(2),
        a.task,
    )
    .await
    .expect("a gave up within its renew deadline and stop bound")
    .unwrap();
    let a_stopped = cut.elapsed();
    assert!(
        matches!(a_result, Err(LeaderError::Lost { .. })),
        "a reports the loss: {a_result:?}"
    );
    let b_leads = wait_for(
        "replica-b takes over",
        TIMINGS.lease_duration + TIMINGS.retry_period * 2 + Duration::from_secs(2),
        || b.metrics.leader.get() == 1,
    )
    .await;
    println!(
        "cut at 0; a stopped after {a_stopped:?}; b leads after {:?}",
        b_leads.duration_since(cut)
    );

    let acted = intervals(&log);
    let [(first, a_start, a_end), (second, b_start, _)] = &acted[..] else {
        panic!("two acting intervals expected: {acted:?}");
    };
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("replica-a", "replica-b")
    );
    let a_end = a_end.expect("a's work ended");
    assert!(
        *a_start < cut && a_end < *b_start,
        "intervals overlap: {acted:?}"
    );
    // (Its last renewal began before the cut; 250 ms for the scheduler.)
    assert!(
        a_end.duration_since(cut)
            <= TIMINGS.renew_deadline + TIMINGS.stop_bound + Duration::from_millis(250),
        "a acted {:?} past the cut",
        a_end.duration_since(cut)
    );

    // The ConfigMap's last writer is b, and a never wrote after b began.
    let cms: Api<ConfigMap> = Api::namespaced(cp.client(), &ns);
    let holder = |cm: Option<ConfigMap>| {
        cm.and_then(|c| c.data)
            .and_then(|d| d.get("holder").cloned())
            .unwrap_or_default()
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(holder(cms.get_opt("acting").await.unwrap()), "replica-b");

    b.shutdown.cancel();
    b.task.await.unwrap().expect("b stops cleanly on shutdown");
    let lease = Api::<Lease>::namespaced(cp.client(), &ns)
        .get(LEASE)
        .await
        .unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "b released the Lease on shutdown"
    );
}

#[tokio::test]
async fn a_leader_shutting_down_releases_the_lease_and_the_other_takes_over_within_a_retry_period()
{
    // Proves graceful handover (what a `helm upgrade` does to the old operator pod):
    // on shutdown the holder stops its work first, then releases the Lease, so the
    // standby starts at its next attempt instead of waiting out the lease duration,
    // and the two never act at once.
    let cp = controlplane::shared().await;
    let ns = cp.new_namespace("op-leader-handover").await;
    let config = operator_config(cp, &ns).await;
    let log: ActingLog = Arc::default();
    let a = replica(Client::try_from(config.clone()).unwrap(), &ns, "old", &log);
    wait_for("old leads", Duration::from_secs(30), || {
        a.metrics.leader.get() == 1
    })
    .await;
    let b = replica(Client::try_from(config).unwrap(), &ns, "new", &log);
    tokio::time::sleep(TIMINGS.retry_period * 3).await;
    assert_eq!(
        b.metrics.leader.get(),
        0,
        "the new replica waits on the Lease"
    );

    let stop = Instant::now();
    a.shutdown.cancel();
    a.task
        .await
        .unwrap()
        .expect("the old replica stops cleanly");
    let b_leads = wait_for(
        "the new replica takes over",
        TIMINGS.retry_period * 2 + Duration::from_secs(1),
        || b.metrics.leader.get() == 1,
    )
    .await;
    println!("handover took {:?}", b_leads.duration_since(stop));
    assert!(
        b_leads.duration_since(stop) < TIMINGS.lease_duration,
        "the new replica waited out the lease instead of seeing it released"
    );
    let acted = intervals(&log);
    let [(first, _, a_end), (second, b_start, _)] = &acted[..] else {
        panic!("two acting intervals expected: {acted:?}");
    };
    assert_eq!((first.as_str(), second.as_str()), ("old", "new"));
    assert!(
        a_end.is_some_and(|end| end < *b_start),
        "overlap: {acted:?}"
    );
    b.shutdown.cancel();
    b.task.await.unwrap().unwrap();
}
