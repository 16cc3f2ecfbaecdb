//! Loopback stand-ins for voice pods on kwok's fake node, for the operator's load
//! polling: kwok gives pods fake IPs, so [`assign_loopback_ips`] moves each
//! Running pod's `status.podIP` to its own 127.x.y.z address, where
//! [`FakePods`] answers `GET /load` on the operator's `--load-port` with the calls
//! the test or benchmark set. The operator runs its production path; only the
//! addresses changed. Used by `tests/operator_autoscaling.rs` and
//! `benches/operator_load_poll.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::routing::get;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

/// The capacity every stand-in reports.
pub const CAPACITY: u32 = 100;

/// Stand-ins for voice pods: one listener per address on one port, each
/// answering `/load` with the calls set for that address (0 until set).
#[derive(Clone, Default)]
pub struct FakePods {
    calls: Arc<Mutex<HashMap<Ipv4Addr, u32>>>,
}

impl FakePods {
    /// Listens on every address of `ips` on one port (free on the first address,
    /// then the same on the others); returns the port.
    pub async fn start(&self, ips: &[Ipv4Addr]) -> std::io::Result<u16> {
        let mut port = 0;
        for &ip in ips {
            let listener = tokio::net::TcpListener::bind(SocketAddr::from((ip, port))).await?;
            port = listener.local_addr()?.port();
            let app = axum::Router::new()
                .route(
                    "/load",
                    get(
                        |State((pods, ip)): State<(FakePods, Ipv4Addr)>| async move {
                            let active = pods.get(ip);
                            axum::Json(serde_json::json!({
                                "activeCalls": active, "capacity": CAPACITY,
                                "accepting": active < CAPACITY, "draining": false,
                            }))
                        },
                    ),
                )
                .with_state((self.clone(), ip));
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        Ok(port)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Ipv4Addr, u32>> {
        // A panicking test thread cannot leave the map half-written (one insert).
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The calls `ip` reports.
    pub fn get(&self, ip: Ipv4Addr) -> u32 {
        self.lock().get(&ip).copied().unwrap_or(0)
    }

    /// Makes `ip` report `calls`.
    pub fn set(&self, ip: Ipv4Addr, calls: u32) {
        self.lock().insert(ip, calls);
    }
}

/// `count` addresses from 127.`block`.0.1 on (the last octet skips 0 and 255).
pub fn loopback_ips(block: u8, count: usize) -> Vec<Ipv4Addr> {
    (0u16..=255)
        .flat_map(|third| (1u8..=254).map(move |fourth| (third, fourth)))
        .filter_map(|(third, fourth)| {
            Some(Ipv4Addr::new(127, block, u8::try_from(third).ok()?, fourth))
        })
        .take(count)
        .collect()
}

/// Running, not terminating pods of `api` matching `selector`.
pub async fn running_pods(api: &Api<Pod>, selector: &str) -> kube::Result<Vec<Pod>> {
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect())
}

/// Moves every Running pod of `api` matching `selector` that has no address of
/// `ips` onto a free one; returns every such pod's address by name. Pods beyond
/// the free addresses keep their fake IP (their load reads fail, as for a pod
/// the operator cannot reach).
pub async fn assign_loopback_ips(
    api: &Api<Pod>,
    selector: &str,
    ips: &[Ipv4Addr],
) -> kube::Result<BTreeMap<String, Ipv4Addr>> {
    let pods = running_pods(api, selector).await?;
    let ours: HashSet<Ipv4Addr> = ips.iter().copied().collect();
    let mut taken: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    for p in &pods {
        if let Some(ip) = p
            .status
            .as_ref()
            .and_then(|st| st.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter(|ip| ours.contains(ip))
        {
            taken.insert(p.name_any(), ip);
        }
    }
    let used: HashSet<Ipv4Addr> = taken.values().copied().collect();
    let mut free = ips.iter().filter(|ip| !used.contains(ip));
    for p in pods {
        if taken.contains_key(&p.name_any()) {
            continue;
        }
        let Some(&ip) = free.next() else {
            break;
        };
        let patch = serde_json::json!({ "status": {
            "podIP": ip.to_string(), "podIPs": [{ "ip": ip.to_string() }] } });
        api.patch_status(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        taken.insert(p.name_any(), ip);
    }
    Ok(taken)
}
