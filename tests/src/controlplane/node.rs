//! A real Kubernetes node for the end-to-end tests: containerd (Debian's
//! package) runs the containers, the kubelet (cgroup v1, cgroupfs driver)
//! runs the pods, kube-proxy (iptables mode) routes Service ClusterIPs, and
//! the CNI bridge plugin puts every pod on a private bridge whose host end is
//! also where the apiserver listens, so the `kubernetes` Service works from a
//! pod and the host's test servers are reachable at [`Node::host_address`].
//!
//! Everything lives in the control plane's temp dir (containerd's root,
//! state and socket, the kubelet's root, CNI and IPAM state, pod logs) or is
//! named after it (the bridge, the cgroup root). Processes join the control
//! plane's process group; what the kernel keeps beyond them (container
//! processes under their shims, mounts, the bridge, iptables chains,
//! cgroups, the kernel tunables the kubelet sets) is undone by the
//! `cleanup.sh` this module writes before it creates any of them, which the
//! watchdog runs. Pre-existing interfaces and rules are never touched: the
//! node refuses to start while any `KUBE-*` chain exists, and one machine-wide
//! lock keeps two real nodes apart.
//!
//! Images: `scripts/node-images.sh` builds the voice-pod, voice-operator and
//! sandbox (pause) images from the binaries next to `CALLMEBACK_POD_BIN`, and
//! the node imports them before it registers, under the names the chart and a
//! VoiceDeployment use.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Client;
use kube::api::Api;

use super::{
    ControlPlaneError, KUBERNETES_SERVICE_IP, PkiFiles, Processes, free_port, io, log_tail,
};

/// The machine-wide lock file ([`machine_lock`]).
const LOCK_PATH: &str = "/run/lock/callmeback-node.lock";
/// The directory of built images; else `scripts/node-images.sh` builds them
/// from the binaries beside [`POD_BIN_ENV`].
pub const IMAGES_DIR_ENV: &str = "CALLMEBACK_NODE_IMAGES";
/// The voice-pod binary the test suite runs (scripts/test.sh sets it); its
/// directory also holds voice-operator.
pub const POD_BIN_ENV: &str = "CALLMEBACK_POD_BIN";
/// The name the node registers under.
pub const NODE_NAME: &str = "callmeback-node";
/// The sandbox image `scripts/node-images.sh` builds (no registry to pull from).
const SANDBOX_IMAGE: &str = "callmeback.test/pause:3.10";
/// Debian's CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Kernel tunables the kubelet sets on start (`protectKernelDefaults: false`);
/// cleanup puts the old values back.
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Takes the machine-wide real-node lock, waiting (bounded) while another
/// test binary's node runs or is being cleaned up.
pub(super) async fn machine_lock() -> Result<File, ControlPlaneError> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .map_err(io(format!("opening {LOCK_PATH}")))?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ControlPlaneError::Io {
                    what: format!("another real test node held {LOCK_PATH} for {LOCK_TIMEOUT:?}"),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io(format!("locking {LOCK_PATH}"))(e));
            }
        }
    }
}

/// The node's bridge network: a private /24 whose first address is the host
/// end (gateway), where the apiserver and the host's test servers listen.
#[derive(Debug, Clone)]
pub struct Network {
    /// The host's address on the bridge.
    pub gateway: Ipv4Addr,
    subnet: String,
    bridge: String,
    dir: PathBuf,
    cgroup_root: String,
}

impl Network {
    /// Writes `cleanup.sh`, then creates the bridge with a free private /24.
    pub(super) async fn create(dir: &Path) -> Result<Self, ControlPlaneError> {
        for program in ["containerd", "runc", "iptables", "ip", "ctr"] {
            which(program).ok_or_else(|| ControlPlaneError::Build {
                script: PathBuf::from(program),
                reason: format!(
                    "{program} is not installed (apt-get install containerd runc containernetworking-plugins iptables iproute2)"
                ),
            })?;
        }
        if !Path::new(CNI_BIN_DIR).join("bridge").is_file() {
            return Err(ControlPlaneError::Build {
                script: PathBuf::from(CNI_BIN_DIR),
                reason: "the CNI plugins are not installed (apt-get install containernetworking-plugins)".to_owned(),
            });
        }
        for program in ["iptables", "ip6tables"] {
            let rules = run_output(program, &["-w", "-t", "nat", "-S"])?;
            if rules.lines().any(|line| line.starts_with("-N KUBE-")) {
                return Err(ControlPlaneError::Build {
                    script: PathBuf::from(program),
                    reason: "KUBE-* chains already exist in the nat table (another Kubernetes node, or a leftover); the test node would clobber them".to_owned(),
                });
            }
        }
        let tag: String = dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .rev()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect::<String>()
            .to_ascii_lowercase();
        let used = run_output("ip", &["-4", "-o", "addr"])? + &run_output("ip", &["-4", "route"])?;
        let (second, third) = free_subnet(&used, &tag).ok_or_else(|| ControlPlaneError::Build {
            script: PathBuf::from("ip"),
            reason: "no free 10.x.y.0/24 for the node's bridge".to_owned(),
        })?;
        let network = Self {
            gateway: Ipv4Addr::new(10, second, third, 1),
            subnet: format!("10.{second}.{third}.0/24"),
            // Interface names are at most 15 bytes.
            bridge: format!("cmb-{tag}"),
            dir: dir.to_owned(),
            cgroup_root: format!("callmeback-{tag}"),
        };
        network.write_cleanup()?;
        let bridge = network.bridge.as_str();
        run("ip", &["link", "add", bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", network.gateway),
                "dev",
                bridge,
            ],
        )?;
        run("ip", &["link", "set", bridge, "up"])?;
        Ok(network)
    }

    /// The script the watchdog runs after killing the process group.
    fn write_cleanup(&self) -> Result<(), ControlPlaneError> {
        let mut restore = String::new();
        for name in KUBELET_SYSCTLS {
            let path = Path::new("/proc/sys").join(name);
            if let Ok(value) = std::fs::read_to_string(&path) {
                restore.push_str(&format!("echo {} > {}\n", value.trim(), path.display()));
            }
        }
        // Fixed paths the kubelet and containerd create whatever they are
        // told (device plugin sockets; shim sockets); removed when this node
        // created them.
        let remove_fixed_dirs: String = ["/var/lib/kubelet", "/run/containerd"]
            .iter()
            .filter(|dir| !Path::new(dir).exists())
            .map(|dir| format!("rm -rf -- {dir}\n"))
            .collect();
        let script = format!(
            r#"# Written by tests/src/controlplane/node.rs; run by the control plane watchdog.
d='{dir}'
cg='{cgroup_root}'
# Containers run under shims that leave the process group: the shims are
# the processes started with this node's containerd socket (a path unique to
# this dir), the containers are the processes in the node's cgroups.
# (grep -z: one NUL-separated argument per record, -x: the whole argument.)
for f in $(grep -lzxF -- "$d/containerd/containerd.sock" /proc/[0-9]*/cmdline 2>/dev/null); do
  p=${{f#/proc/}}
  kill -KILL "${{p%/cmdline}}" 2>/dev/null
done
for _ in 1 2 3 4 5; do
  for procs in $(find /sys/fs/cgroup/*/"$cg" -name cgroup.procs 2>/dev/null); do
    for pid in $(cat "$procs"); do kill -KILL "$pid" 2>/dev/null; done
  done
  sleep 0.2
done
# The shims' sockets live in containerd's fixed /run/containerd/s.
for a in "$d"/containerd/state/io.containerd.runtime.v2.task/*/*/address; do
  [ -f "$a" ] && rm -f -- "$(sed 's|^unix://||' "$a")"
done
# The kubelet links container logs from a fixed directory.
find /var/log/containers -maxdepth 1 -lname "$d/*" -delete 2>/dev/null
{remove_fixed_dirs}
# Mounts under the dir (rootfs, volumes, network namespaces), deepest first.
awk -v d="$d/" 'index($5, d) == 1 {{ print $5 }}' /proc/self/mountinfo | sort -r | while read -r m; do
  umount -l "$m"
done
for h in /sys/fs/cgroup/*/; do
  [ -d "$h$cg" ] && find "$h$cg" -depth -type d -exec rmdir {{}} \; 2>/dev/null
done
ip link del '{bridge}' 2>/dev/null
# The node started only with no KUBE-* chain present, so all are its own
# (kube-proxy's and the kubelet's): unhook them from the built-in chains,
# then flush and delete them.
for ipt in iptables ip6tables; do
  for t in filter nat mangle; do
    $ipt -w -t $t -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -vE '^-A KUBE-' | sed 's/^-A /-D /' |
      while read -r rule; do eval "$ipt -w -t $t $rule"; done
    chains=$($ipt -w -t $t -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {{ print $2 }}')
    for c in $chains; do $ipt -w -t $t -F "$c"; done
    for c in $chains; do $ipt -w -t $t -X "$c"; done
  done
done
{restore}"#,
            dir = self.dir.display(),
            cgroup_root = self.cgroup_root,
            bridge = self.bridge,
            remove_fixed_dirs = remove_fixed_dirs,
        );
        let path = self.dir.join("cleanup.sh");
        let temp = self.dir.join("cleanup.sh.tmp");
        std::fs::write(&temp, script).map_err(io(format!("writing {}", temp.display())))?;
        std::fs::rename(&temp, &path).map_err(io(format!("writing {}", path.display())))
    }
}

/// A /24 in 10.64.0.0/10 that no address or route on this machine touches,
/// chosen from the temp dir's random tag so parallel runs rarely collide.
fn free_subnet(used: &str, tag: &str) -> Option<(u8, u8)> {
    let seed = tag.bytes().fold(0u32, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u32::from(b))
    });
    (0..4096u32).find_map(|i| {
        let n = seed.wrapping_add(i) % 4096;
        let second = u8::try_from(64 + n / 64).ok()?;
        let third = u8::try_from(n % 64 * 4).ok()?;
        let prefix = format!("10.{second}.");
        (!used.contains(&prefix)).then_some((second, third))
    })
}

/// A running real node.
#[derive(Debug)]
pub struct Node {
    network: Network,
    containerd_socket: PathBuf,
}

impl Node {
    /// Starts containerd, imports the images, starts the kubelet and
    /// kube-proxy, and waits until the node is Ready and kube-proxy has
    /// programmed the `kubernetes` Service.
    pub(super) async fn start(
        processes: &mut Processes,
        bin: &Path,
        network: Network,
        files: &PkiFiles,
        client: &Client,
    ) -> Result<Self, ControlPlaneError> {
        let started = Instant::now();
        let images = images_dir().await?;
        let dir = network.dir.clone();
        let containerd_dir = dir.join("containerd");
        let cni_conf_dir = dir.join("cni-conf");
        for d in [&containerd_dir, &cni_conf_dir] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let socket = containerd_dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  netns_mounts_under_state_dir = true
  # The sandbox asks for oom_score_adj -998; lowering it needs
  # CAP_SYS_RESOURCE, which root lacks on this machine (a container). Keep scores
  # at or above containerd's own, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
"#,
            root = containerd_dir.join("root").display(),
            state = containerd_dir.join("state").display(),
            socket = socket.display(),
            opt = containerd_dir.join("opt").display(),
            runc_root = containerd_dir.join("runc").display(),
            cni_conf = cni_conf_dir.display(),
        );
        let config_path = containerd_dir.join("config.toml");
        std::fs::write(&config_path, config)
            .map_err(io(format!("writing {}", config_path.display())))?;
        // The bridge plugin with the host end as gateway; no masquerade (the
        // pods only talk to the host and to each other), so no CNI chains.
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("callmeback-{}", network.bridge),
            "plugins": [{
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("cni-ipam"),
                    "ranges": [[{ "subnet": network.subnet, "gateway": network.gateway.to_string() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                },
            }],
        });
        let cni_path = cni_conf_dir.join("10-callmeback.conflist");
        std::fs::write(&cni_path, cni.to_string())
            .map_err(io(format!("writing {}", cni_path.display())))?;

        let mut containerd = Command::new("containerd");
        containerd.arg(format!("--config={}", config_path.display()));
        processes.spawn("containerd", containerd)?;
        wait_for_path(processes, "containerd", &socket, Duration::from_secs(30)).await?;
        import_images(&socket, &images).await?;

        // The cgroup root the kubelet puts every pod under; it must exist.
        make_cgroup_root(&network.cgroup_root)?;

        let kubelet_port = free_port()?;
        let kubelet_config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // The machine has the cgroup v1 hierarchy; 1.35 refuses it unless told.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", network.cgroup_root),
            "failSwapOn": false,
            "containerRuntimeEndpoint": format!("unix://{}", socket.display()),
            "address": network.gateway.to_string(),
            "port": kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port()?,
            // The apiserver's certificate names the gateway address too.
            "tlsCertFile": files.serving_cert,
            "tlsPrivateKeyFile": files.serving_key,
            "authentication": {
                "anonymous": { "enabled": false },
                "webhook": { "enabled": true },
                "x509": { "clientCAFile": files.ca_cert },
            },
            "authorization": { "mode": "Webhook" },
            "podLogsDir": dir.join("pod-logs"),
            "resolvConf": "/etc/resolv.conf",
            // A shared test machine: never evict for its disk or memory.
            "evictionHard": { "memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%" },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
        });
        let kubelet_dir = dir.join("kubelet");
        std::fs::create_dir_all(&kubelet_dir)
            .map_err(io(format!("creating {}", kubelet_dir.display())))?;
        let kubelet_config_path = dir.join("kubelet-config.json");
        std::fs::write(&kubelet_config_path, kubelet_config.to_string())
            .map_err(io(format!("writing {}", kubelet_config_path.display())))?;
        let mut kubelet = Command::new(bin.join("kubelet"));
        kubelet.args([
            format!("--config={}", kubelet_config_path.display()),
            // The admin credentials (system:masters): a test cluster has no
            // node bootstrap; the apiserver runs RBAC only (no Node authorizer).
            format!("--kubeconfig={}", files.kubeconfig.display()),
            format!("--root-dir={}", kubelet_dir.display()),
            // Not /var/lib/kubelet/pki, its default whatever the root dir.
            format!("--cert-dir={}", kubelet_dir.join("pki").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={}", network.gateway),
        ]);
        processes.spawn("kubelet", kubelet)?;

        let mut kube_proxy = Command::new(bin.join("kube-proxy"));
        kube_proxy.args([
            format!("--kubeconfig={}", files.kubeconfig.display()),
            format!("--hostname-override={NODE_NAME}"),
            "--proxy-mode=iptables".to_owned(),
            format!("--cluster-cidr={}", network.subnet),
            format!("--healthz-bind-address=127.0.0.1:{}", free_port()?),
            format!("--metrics-bind-address=127.0.0.1:{}", free_port()?),
            // Leave the host's conntrack and localnet sysctls alone.
            "--conntrack-max-per-core=0".to_owned(),
            "--conntrack-tcp-timeout-established=0".to_owned(),
            "--conntrack-tcp-timeout-close-wait=0".to_owned(),
            "--iptables-localhost-nodeports=false".to_owned(),
        ]);
        processes.spawn("kube-proxy", kube_proxy)?;

        wait_for_node_ready(processes, client, NODE_READY_TIMEOUT).await?;
        wait_for_kubernetes_service_rule(processes, Duration::from_secs(60)).await?;
        eprintln!(
            "callmeback real node {NODE_NAME} ready in {:.1}s (bridge {}, {})",
            started.elapsed().as_secs_f64(),
            network.bridge,
            network.subnet
        );
        Ok(Self {
            network,
            containerd_socket: socket,
        })
    }

    /// The name the node registered under.
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The host's address on the node's bridge: pods reach servers the test
    /// process binds here (emulators, for instance), and so the apiserver.
    pub fn host_address(&self) -> Ipv4Addr {
        self.network.gateway
    }

    /// The pods' address range (CIDR).
    pub fn pod_cidr(&self) -> &str {
        &self.network.subnet
    }

    /// The node's containerd socket (for `ctr --address`).
    pub fn containerd_socket(&self) -> &Path {
        &self.containerd_socket
    }

    /// Imports an OCI image archive into the node's image store (as
    /// `scripts/node-images.sh` writes them), e.g. an image built by a test.
    pub async fn import_image(&self, archive: &Path) -> Result<(), ControlPlaneError> {
        import_archive(&self.containerd_socket, archive).await
    }
}

/// `CALLMEBACK_NODE_IMAGES`, or what `scripts/node-images.sh` prints for the
/// binaries beside `CALLMEBACK_POD_BIN`.
async fn images_dir() -> Result<PathBuf, ControlPlaneError> {
    if let Some(dir) = std::env::var_os(IMAGES_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/node-images.sh");
    let build_error = |reason: String| ControlPlaneError::Build {
        script: script.clone(),
        reason,
    };
    let pod_bin = std::env::var_os(POD_BIN_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            build_error(format!(
                "{POD_BIN_ENV} is not set (scripts/test.sh sets it; or set {IMAGES_DIR_ENV})"
            ))
        })?;
    let bin_dir = pod_bin
        .parent()
        .ok_or_else(|| build_error(format!("{} has no directory", pod_bin.display())))?;
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(bin_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| build_error(format!("cannot run it: {e}")))?;
    if !output.status.success() {
        return Err(build_error(format!("{}", output.status)));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    if dir.is_empty() {
        return Err(build_error("it printed no directory".to_owned()));
    }
    Ok(PathBuf::from(dir))
}

async fn import_images(socket: &Path, dir: &Path) -> Result<(), ControlPlaneError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?;
    let mut archives: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.to_string_lossy().ends_with(".oci.tar"))
        .collect();
    archives.sort();
    if archives.is_empty() {
        return Err(ControlPlaneError::Build {
            script: dir.to_owned(),
            reason: "no *.oci.tar image archives".to_owned(),
        });
    }
    for archive in archives {
        import_archive(socket, &archive).await?;
    }
    Ok(())
}

async fn import_archive(socket: &Path, archive: &Path) -> Result<(), ControlPlaneError> {
    // The CRI plugin sees only the k8s.io namespace.
    let output = tokio::process::Command::new("ctr")
        .arg(format!("--address={}", socket.display()))
        .args(["--namespace=k8s.io", "images", "import"])
        .arg(archive)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io("running ctr images import"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ControlPlaneError::Build {
            script: archive.to_owned(),
            reason: format!(
                "ctr images import: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// Creates `/<name>` in every cgroup v1 hierarchy (cpuset's needs its CPUs
/// and memory nodes copied from the parent before anything can join it).
fn make_cgroup_root(name: &str) -> Result<(), ControlPlaneError> {
    let hierarchies = std::fs::read_dir("/sys/fs/cgroup").map_err(io("reading /sys/fs/cgroup"))?;
    for hierarchy in hierarchies.filter_map(Result::ok) {
        let base = hierarchy.path();
        if !base.join("cgroup.procs").is_file() || base.ends_with("unified") {
            continue;
        }
        let path = base.join(name);
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(base.join(file)) {
                std::fs::write(path.join(file), value.trim())
                    .map_err(io(format!("writing {}", path.join(file).display())))?;
            }
        }
    }
    Ok(())
}

async fn wait_for_path(
    processes: &mut Processes,
    what: &'static str,
    path: &Path,
    timeout: Duration,
) -> Result<(), ControlPlaneError> {
    let started = Instant::now();
    loop {
        processes.check_alive()?;
        if path.exists() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(processes.not_ready(what, timeout));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_node_ready(
    processes: &mut Processes,
    client: &Client,
    timeout: Duration,
) -> Result<(), ControlPlaneError> {
    let nodes: Api<NodeObject> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        processes.check_alive()?;
        if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await {
            let ready = node
                .status
                .and_then(|status| status.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            return Err(processes.not_ready("kubelet (node Ready)", timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kube-proxy has synced once when the `kubernetes` Service's ClusterIP has
/// its rule.
async fn wait_for_kubernetes_service_rule(
    processes: &mut Processes,
    timeout: Duration,
) -> Result<(), ControlPlaneError> {
    let needle = format!("-d {KUBERNETES_SERVICE_IP}/32");
    let started = Instant::now();
    loop {
        processes.check_alive()?;
        if let Ok(rules) = run_output("iptables", &["-w", "-t", "nat", "-S", "KUBE-SERVICES"])
            && rules.contains(&needle)
        {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(processes.not_ready("kube-proxy (kubernetes Service rule)", timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn run(program: &str, args: &[&str]) -> Result<(), ControlPlaneError> {
    run_output(program, args).map(|_| ())
}

/// Runs a short host command (ip, iptables) and returns its stdout.
fn run_output(program: &str, args: &[&str]) -> Result<String, ControlPlaneError> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {program}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(ControlPlaneError::Build {
            script: PathBuf::from(program),
            reason: format!(
                "{program} {}: {}: {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// The end of a node component's log, for test failure messages.
pub fn log_excerpt(dir: &Path, component: &str) -> String {
    log_tail(&dir.join(format!("{component}.log")))
}

#[cfg(test)]
mod tests {
    use super::free_subnet;

    #[test]
    fn free_subnet_avoids_every_used_ten_dot_prefix() {
        // Proves the bridge subnet never overlaps a 10.x network already on the machine.
        let used = "inet 10.64.0.5/24\n10.65.0.0/16 dev eth0\n";
        let (second, _) = free_subnet(used, "aaaa").expect("a free subnet");
        assert!((64..128).contains(&second));
        assert!(!used.contains(&format!("10.{second}.")));
    }
}
