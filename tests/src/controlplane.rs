//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager, built from Go modules by
//! `scripts/controlplane-build.sh` and started here on free loopback ports.
//!
//! One control plane serves a whole test binary ([`shared`]); each test takes
//! its own namespace ([`ControlPlane::new_namespace`]) so tests run in
//! parallel. Setting `CALLMEBACK_E2E_KUBECONFIG` points the same tests at an
//! existing cluster instead.
//!
//! A test binary that needs containers to really run asks for
//! [`shared_with_node`] instead: the same control plane plus a real node
//! (containerd, kubelet, kube-proxy; see [`node`]) in place of kwok's fake one.
//!
//! Teardown without `Drop`: statics are never dropped, and a crashed or killed
//! test binary runs no destructor at all. So the servers run in their own
//! process group, watched by a tiny `bash` watchdog that holds the read end of
//! a pipe whose only writer is this process. When this process goes away for
//! any reason the kernel closes the pipe, the watchdog reads EOF, kills the
//! group (only the processes started here), runs the `cleanup.sh` a real
//! node leaves in the temp dir (containers, mounts, bridge, iptables chains,
//! cgroups) and removes the temp dir.

pub mod node;

use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use secrecy::SecretString;
use tokio::sync::OnceCell;

/// Use an existing cluster (path to its kubeconfig) instead of starting one.
pub const E2E_KUBECONFIG_ENV: &str = "CALLMEBACK_E2E_KUBECONFIG";
/// Use the binaries in this directory instead of running the build script.
pub const BIN_DIR_ENV: &str = "CALLMEBACK_CONTROLPLANE_BIN";
/// Keep the temp dir (logs, etcd data) after teardown, for debugging.
pub const KEEP_ENV: &str = "CALLMEBACK_CONTROLPLANE_KEEP";

/// Label put on every namespace [`ControlPlane::new_namespace`] creates, so
/// leftovers on a long-lived e2e cluster can be found and deleted.
pub const TEST_NAMESPACE_LABEL: &str = "callmeback.dev/test-namespace";

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const START_ATTEMPTS: usize = 3;
const SERVICE_ACCOUNT_TOKEN_SECONDS: i64 = 3600;
/// The shortest lifetime the certificates API accepts is 10 minutes.
const CLIENT_CERTIFICATE_SECONDS: i32 = 3600;
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The first address of [`SERVICE_CIDR`], which the apiserver gives its own Service.
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// Pod IPs kwok hands out; disjoint from [`SERVICE_CIDR`].
const POD_CIDR: &str = "10.244.0.0/16";
/// The one fake node kwok manages.
pub const FAKE_NODE_NAME: &str = "kwok-node-0";

/// Why the control plane could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("building the control plane ({script}) failed: {reason}")]
    Build { script: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("generating certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("loading kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("{name} exited during startup ({status}); end of {log}:\n{tail}")]
    Exited {
        name: &'static str,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{what} not ready after {after:?}; end of {log}:\n{tail}")]
    NotReady {
        what: &'static str,
        after: Duration,
        log: PathBuf,
        tail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// A running (or borrowed, see [`E2E_KUBECONFIG_ENV`]) Kubernetes control plane.
pub struct ControlPlane {
    /// Admin connection settings; clients are built per call because a
    /// `kube::Client` is bound to the tokio runtime that created it, and every
    /// `#[tokio::test]` has its own runtime.
    config: Config,
    kubeconfig_path: PathBuf,
    server_url: String,
    pods_run: bool,
    /// The real node, when started with [`NodeKind::Real`].
    node: Option<node::Node>,
    /// `None` when wrapping an existing cluster.
    processes: Option<Processes>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_url", &self.server_url)
            .field("kubeconfig_path", &self.kubeconfig_path)
            .field("owns_processes", &self.processes.is_some())
            .finish()
    }
}

static SHARED: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();
static SHARED_WITH_NODE: OnceCell<Result<ControlPlane, String>> = OnceCell::const_new();

/// Which node the pods of a started control plane land on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// kwok's fake node: pods report Running and Ready, no container runs.
    Fake,
    /// A real kubelet with containerd and kube-proxy ([`node`]).
    Real,
}

/// The control plane of this test binary, started on first use (or the
/// cluster named by `CALLMEBACK_E2E_KUBECONFIG`). Panics with the reason if it
/// cannot be started, in every test that asks, not just the first.
pub async fn shared() -> &'static ControlPlane {
    let result = SHARED
        .get_or_init(|| async {
            ControlPlane::from_env_or_start()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    match result {
        Ok(control_plane) => control_plane,
        Err(reason) => panic!("the test control plane is unavailable: {reason}"),
    }
}

/// Like [`shared`], with a real node ([`node::Node`]) instead of kwok's fake
/// one: pods run as containers, probes are called, Services route packets.
/// A test binary uses either this or [`shared`], never both. With
/// `CALLMEBACK_E2E_KUBECONFIG` set the existing cluster is used as is.
pub async fn shared_with_node() -> &'static ControlPlane {
    let result = SHARED_WITH_NODE
        .get_or_init(|| async {
            match std::env::var_os(E2E_KUBECONFIG_ENV) {
                Some(path) if !path.is_empty() => ControlPlane::existing(PathBuf::from(path)).await,
                _ => ControlPlane::start_with(NodeKind::Real).await,
            }
            .map_err(|e| e.to_string())
        })
        .await;
    match result {
        Ok(control_plane) => control_plane,
        Err(reason) => panic!("the test control plane with a real node is unavailable: {reason}"),
    }
}

impl ControlPlane {
    /// Wraps `CALLMEBACK_E2E_KUBECONFIG` when set, else starts a fresh control plane.
    pub async fn from_env_or_start() -> Result<Self, ControlPlaneError> {
        match std::env::var_os(E2E_KUBECONFIG_ENV) {
            Some(path) if !path.is_empty() => Self::existing(PathBuf::from(path)).await,
            _ => Self::start().await,
        }
    }

    /// Wraps an existing cluster; nothing is started or torn down.
    pub async fn existing(kubeconfig_path: PathBuf) -> Result<Self, ControlPlaneError> {
        let kubeconfig = Kubeconfig::read_from(&kubeconfig_path)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Self {
            server_url: config
                .cluster_url
                .to_string()
                .trim_end_matches('/')
                .to_owned(),
            config,
            kubeconfig_path,
            pods_run: true,
            node: None,
            processes: None,
        })
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager in a fresh temp
    /// dir and waits until the apiserver reports ready. Building the binaries
    /// first if the cache is cold.
    pub async fn start() -> Result<Self, ControlPlaneError> {
        Self::start_with(NodeKind::Fake).await
    }

    /// [`Self::start`] with the given kind of node.
    pub async fn start_with(kind: NodeKind) -> Result<Self, ControlPlaneError> {
        let bin = binaries_dir().await?;
        // One real node per machine at a time: kube-proxy's iptables chains
        // have fixed names. The lock is shared with the watchdog, so the next
        // node waits until this one's cleanup has finished too.
        let machine_lock = match kind {
            NodeKind::Fake => None,
            NodeKind::Real => Some(node::machine_lock().await?),
        };
        let mut last_error = None;
        // Free ports are found by binding port 0 and releasing it; another
        // process can grab one before the server binds it, so retry on a
        // startup failure with fresh ports.
        for _ in 0..START_ATTEMPTS {
            let lock = match &machine_lock {
                Some(lock) => Some(lock.try_clone().map_err(io("sharing the node lock"))?),
                None => None,
            };
            match Self::start_once(&bin, kind, lock).await {
                Ok(control_plane) => return Ok(control_plane),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    async fn start_once(
        bin: &Path,
        kind: NodeKind,
        machine_lock: Option<File>,
    ) -> Result<Self, ControlPlaneError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("callmeback-controlplane-")
            .tempdir()
            .map_err(io("creating the control plane temp dir"))?
            // The watchdog removes it, also when this process dies.
            .keep();
        let mut processes = Processes::new(dir.clone(), machine_lock)?;

        // A real node's pods reach the apiserver (through the `kubernetes`
        // Service) at the host end of the node's bridge; kwok needs loopback only.
        let network = match kind {
            NodeKind::Fake => None,
            NodeKind::Real => Some(node::Network::create(&dir).await?),
        };
        let api_address = network
            .as_ref()
            .map_or(Ipv4Addr::LOCALHOST, |network| network.gateway);
        let pki = Pki::generate(api_address)?;
        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        let server_url = format!("https://{api_address}:{api_port}");
        let files = pki.write(&dir, &server_url)?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut etcd = Command::new(bin.join("etcd"));
        etcd.args([
            "--name=default".to_owned(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={etcd_peer_url}"),
            format!("--initial-advertise-peer-urls={etcd_peer_url}"),
            format!("--initial-cluster=default={etcd_peer_url}"),
            // Test data is thrown away; fsync would only cost time.
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ]);
        processes.spawn("etcd", etcd)?;
        processes
            .wait_for_port("etcd", etcd_port, Duration::from_secs(30))
            .await?;

        let mut apiserver = Command::new(bin.join("kube-apiserver"));
        apiserver.args([
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={api_address}"),
            format!("--advertise-address={api_address}"),
            // `kubectl logs` goes apiserver -> kubelet, which authenticates it
            // by this certificate (the admin one; a test cluster).
            format!(
                "--kubelet-client-certificate={}",
                files.admin_cert.display()
            ),
            format!("--kubelet-client-key={}", files.admin_key.display()),
            // The node's name resolves nowhere; its InternalIP is the bridge's host end.
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", files.serving_cert.display()),
            format!("--tls-private-key-file={}", files.serving_key.display()),
            format!("--client-ca-file={}", files.ca_cert.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!(
                "--service-account-key-file={}",
                files.sa_public_key.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                files.sa_private_key.display()
            ),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=RBAC".to_owned(),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
        ]);
        processes.spawn("kube-apiserver", apiserver)?;

        let kubeconfig = Kubeconfig::read_from(&files.kubeconfig)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config.clone())?;
        processes
            .wait_for_apiserver_ready(&client, READY_TIMEOUT)
            .await?;

        // Started only now: it gives up if the apiserver is not healthy
        // within seconds of its own start.
        let mut controller_manager = Command::new(bin.join("kube-controller-manager"));
        controller_manager.args([
            format!("--kubeconfig={}", files.kubeconfig.display()),
            // No serving port: nothing probes it, and it cannot collide.
            "--secure-port=0".to_owned(),
            "--leader-elect=false".to_owned(),
            "--controllers=*".to_owned(),
            format!(
                "--service-account-private-key-file={}",
                files.sa_private_key.display()
            ),
            format!("--root-ca-file={}", files.ca_cert.display()),
            // The csrsigning controller issues certificates for approved
            // CertificateSigningRequests with the cluster CA, as on a real cluster.
            format!("--cluster-signing-cert-file={}", files.ca_cert.display()),
            format!("--cluster-signing-key-file={}", files.ca_key.display()),
        ]);
        processes.spawn("kube-controller-manager", controller_manager)?;

        // Optional: a scheduler and kwok with one fake node make Deployments
        // get Running, Ready pods (no containers run). Skipped when the
        // binaries directory has no kwok.
        let kwok_stages = bin.join("kwok-stages.yaml");
        let fake_node = kind == NodeKind::Fake
            && bin.join("kube-scheduler").is_file()
            && bin.join("kwok").is_file()
            && kwok_stages.is_file();
        let mut real_node = None;
        if let Some(network) = network {
            let mut scheduler = Command::new(bin.join("kube-scheduler"));
            scheduler.args([
                format!("--kubeconfig={}", files.kubeconfig.display()),
                "--secure-port=0".to_owned(),
                "--leader-elect=false".to_owned(),
            ]);
            processes.spawn("kube-scheduler", scheduler)?;
            real_node =
                Some(node::Node::start(&mut processes, bin, network, &files, &client).await?);
        }
        let pods_run = fake_node || real_node.is_some();
        if fake_node {
            let mut scheduler = Command::new(bin.join("kube-scheduler"));
            scheduler.args([
                format!("--kubeconfig={}", files.kubeconfig.display()),
                "--secure-port=0".to_owned(),
                "--leader-elect=false".to_owned(),
            ]);
            processes.spawn("kube-scheduler", scheduler)?;

            let mut kwok = Command::new(bin.join("kwok"));
            kwok.args([
                format!("--kubeconfig={}", files.kubeconfig.display()),
                // Only these stages; never the user's ~/.kwok/kwok.yaml.
                format!("--config={}", kwok_stages.display()),
                "--manage-all-nodes=true".to_owned(),
                format!("--cidr={POD_CIDR}"),
                "--node-ip=127.0.0.1".to_owned(),
                format!("--server-address=127.0.0.1:{}", free_port()?),
            ]);
            processes.spawn("kwok", kwok)?;
            create_fake_node(&client).await?;
        }
        // The serviceaccount controller creating `default/default` proves the
        // controller-manager is up and its informers synced.
        processes
            .wait_for_default_service_account(&client, "default", READY_TIMEOUT)
            .await?;

        eprintln!(
            "callmeback control plane{} ready at {server_url} in {:.1}s (dir {})",
            if real_node.is_some() {
                " with a real node"
            } else {
                ""
            },
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(Self {
            config,
            kubeconfig_path: files.kubeconfig,
            server_url,
            pods_run,
            node: real_node,
            processes: Some(processes),
        })
    }

    /// An admin (`system:masters`) client.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("admin kube client from a valid config")
    }

    /// Creates a fresh namespace named `<prefix>-<random>` and returns its
    /// name, once its `default` ServiceAccount exists (pods need it).
    pub async fn new_namespace(&self, prefix: &str) -> String {
        let client = self.client();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", namespace_prefix(prefix))),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create test namespace");
        let name = created
            .metadata
            .name
            .expect("apiserver names the namespace");
        wait_for_service_account(&client, &name, "default", READY_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        name
    }

    /// A client authenticated as ServiceAccount `ns/sa` with a bound token
    /// from the TokenRequest API. The ServiceAccount must exist.
    pub async fn client_for_service_account(&self, ns: &str, sa: &str) -> Client {
        Client::try_from(self.config_for_service_account(ns, sa).await)
            .expect("service account kube client")
    }

    /// The client configuration of [`Self::client_for_service_account`] (to
    /// route it elsewhere, e.g. through a proxy a test can cut).
    pub async fn config_for_service_account(&self, ns: &str, sa: &str) -> kube::Config {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client(), ns);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                // Empty: the apiserver's own audience, which it accepts.
                audiences: Vec::new(),
                expiration_seconds: Some(SERVICE_ACCOUNT_TOKEN_SECONDS),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let response = accounts
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("token request for serviceaccount {ns}/{sa}: {e}"));
        let token = response
            .status
            .expect("token request answered with a status")
            .token;
        let mut config = self.config.clone();
        config.auth_info = AuthInfo::default();
        config.auth_info.token = Some(SecretString::from(token));
        config
    }

    /// A client acting as `user` in `groups`, by impersonation through the
    /// admin credentials (works the same on an existing cluster; a client
    /// certificate could not carry several groups with our cert generator).
    /// Authorization sees exactly that user and those groups.
    pub fn client_for_user(&self, user: &str, groups: &[&str]) -> Client {
        let mut config = self.config.clone();
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups =
            Some(groups.iter().map(|g| (*g).to_owned()).collect());
        Client::try_from(config).expect("impersonating kube client")
    }

    /// A client authenticated by its own X.509 client certificate as `user`
    /// (the certificate's CN), in `group` when given (its O), issued the way
    /// a cluster admin issues one: a CertificateSigningRequest for the
    /// `kubernetes.io/kube-apiserver-client` signer, approved by the admin and
    /// signed by the controller-manager. The key never leaves this process.
    pub async fn client_for_user_certificate(&self, user: &str, group: Option<&str>) -> Client {
        use base64::Engine as _;
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.distinguished_name.push(DnType::CommonName, user);
        if let Some(group) = group {
            params
                .distinguished_name
                .push(DnType::OrganizationName, group);
        }
        let request_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .expect("PKCS#10 request");

        let requests: Api<CertificateSigningRequest> = Api::all(self.client());
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", namespace_prefix(user))),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(request_pem.into_bytes()),
                signer_name: "kubernetes.io/kube-apiserver-client".to_owned(),
                usages: Some(vec!["client auth".to_owned()]),
                expiration_seconds: Some(CLIENT_CERTIFICATE_SECONDS),
                ..CertificateSigningRequestSpec::default()
            },
            status: None,
        };
        let created = requests
            .create(&PostParams::default(), &csr)
            .await
            .unwrap_or_else(|e| panic!("certificate signing request for user {user}: {e}"));
        let name = created.metadata.name.expect("apiserver names the CSR");
        let approval = serde_json::json!({
            "status": { "conditions": [{
                "type": "Approved",
                "status": "True",
                "reason": "CallmebackTest",
                "message": "approved by the callmeback test harness",
            }]}
        });
        requests
            .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&approval))
            .await
            .unwrap_or_else(|e| panic!("approving CSR {name}: {e}"));

        let deadline = Instant::now() + READY_TIMEOUT;
        let certificate = loop {
            let current = requests
                .get(&name)
                .await
                .unwrap_or_else(|e| panic!("reading CSR {name}: {e}"));
            if let Some(certificate) = current
                .status
                .and_then(|status| status.certificate)
                .filter(|certificate| !certificate.0.is_empty())
            {
                break certificate;
            }
            assert!(
                Instant::now() < deadline,
                "the controller-manager did not sign CSR {name} within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let certificate_pem =
            String::from_utf8(certificate.0).expect("the signed certificate is PEM text");

        let mut config = self.config.clone();
        config.auth_info = AuthInfo {
            client_certificate_data: Some(b64(&certificate_pem)),
            client_key_data: Some(SecretString::from(b64(&key.serialize_pem()))),
            ..AuthInfo::default()
        };
        Client::try_from(config).expect("client-certificate kube client")
    }

    /// The admin kubeconfig (for helm and kubectl).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The apiserver's base URL, e.g. `https://127.0.0.1:41234`.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// Whether scheduled pods become Running and Ready: true with kwok's fake
    /// node ([`FAKE_NODE_NAME`]) and on an existing cluster; false when the
    /// binaries directory lacks kube-scheduler or kwok (pods then stay Pending).
    pub fn pods_run(&self) -> bool {
        self.pods_run
    }

    /// The real node, when this control plane was started with one
    /// ([`shared_with_node`]).
    pub fn node(&self) -> Option<&node::Node> {
        self.node.as_ref()
    }

    /// The directory holding the servers' logs, when this control plane owns them.
    pub fn log_dir(&self) -> Option<&Path> {
        self.processes.as_ref().map(|p| p.dir.as_path())
    }
}

/// Registers the node kwok plays the kubelet for. No taints, so any pod
/// (the operator's included) schedules onto it without tolerations.
async fn create_fake_node(client: &Client) -> Result<(), ControlPlaneError> {
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": FAKE_NODE_NAME,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": FAKE_NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
            "annotations": { "kwok.x-k8s.io/node": "fake" },
        },
    }))
    .expect("static node definition");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

/// Lowercase DNS-label-safe prefix, leaving room for the generated suffix.
fn namespace_prefix(prefix: &str) -> String {
    let cleaned: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .take(50)
        .collect();
    let cleaned = cleaned.trim_matches('-');
    if cleaned.is_empty() {
        "test".to_owned()
    } else {
        cleaned.to_owned()
    }
}

async fn wait_for_service_account(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        match accounts.get_opt(name).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(None) => {
                return Err(format!(
                    "serviceaccount {name} not created within {timeout:?} (is kube-controller-manager running?)"
                ));
            }
            Err(e) => return Err(format!("reading serviceaccount {name}: {e}")),
        }
    }
}

/// Runs the build script (a no-op when the cache is warm) and returns the
/// directory it printed, unless `CALLMEBACK_CONTROLPLANE_BIN` names one.
async fn binaries_dir() -> Result<PathBuf, ControlPlaneError> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if dir.join("kube-apiserver").is_file() {
            return Ok(dir);
        }
        // Otherwise the script builds into it (it honours the same variable).
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/controlplane-build.sh");
    let build_error = |reason: String| ControlPlaneError::Build {
        script: script.clone(),
        reason,
    };
    // stderr is inherited: a cold build runs for a long time and says so.
    let output = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| build_error(format!("cannot run it: {e}")))?;
    if !output.status.success() {
        return Err(build_error(format!(
            "{}; run it by hand to see why",
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    if dir.is_empty() {
        return Err(build_error("it printed no binary directory".to_owned()));
    }
    Ok(PathBuf::from(dir))
}

fn free_port() -> Result<u16, ControlPlaneError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("finding a free port"))?
        .port();
    Ok(port)
}

/// The processes of one control plane, their process group, and the watchdog
/// that kills that group when this process dies or drops this.
struct Processes {
    dir: PathBuf,
    children: Vec<(&'static str, Child, PathBuf)>,
    group: Option<u32>,
    watchdog: Child,
    /// The watchdog's stdin. Closing it (drop, exit, crash) is the signal.
    lifeline: Option<ChildStdin>,
}

/// `$1` temp dir, `$2` non-empty to keep it. First line read: the process
/// group to kill; then it waits for EOF. Read failing early (no group yet)
/// still cleans the dir. bash, because dash's `kill` cannot signal a group.
/// `cleanup.sh`, when a real node wrote one, undoes what lives outside the
/// group (containers, mounts, network, cgroups); it runs even when the dir is
/// kept. stdout may be the machine-wide node lock (see
/// [`ControlPlane::start_with`]), held until this script ends.
const WATCHDOG_SCRIPT: &str = r#"
if read -r group; then
  read -r _
  kill -KILL -- "-$group" 2>/dev/null
fi
[ -f "$1/cleanup.sh" ] && bash "$1/cleanup.sh" >"$1/cleanup.log" 2>&1
[ -n "$2" ] || rm -rf -- "$1"
"#;

impl Processes {
    /// `lock`: the machine-wide node lock, which the watchdog then holds too.
    fn new(dir: PathBuf, lock: Option<File>) -> Result<Self, ControlPlaneError> {
        let keep = std::env::var_os(KEEP_ENV)
            .filter(|v| !v.is_empty())
            .map(|_| "keep")
            .unwrap_or_default();
        let mut watchdog = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("callmeback-controlplane-watchdog")
            .arg(&dir)
            .arg(keep)
            .stdin(Stdio::piped())
            // An flock belongs to the open file, which the child shares.
            .stdout(lock.map_or_else(Stdio::null, Stdio::from))
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C aimed at the test run must not kill it
            // before it has cleaned up.
            .process_group(0)
            .spawn()
            .map_err(io("starting the control plane watchdog (bash)"))?;
        let lifeline = watchdog.stdin.take();
        Ok(Self {
            dir,
            children: Vec::new(),
            group: None,
            watchdog,
            lifeline,
        })
    }

    /// Spawns a server into the control plane's process group (the first one
    /// spawned leads it), logging to `<dir>/<name>.log`.
    fn spawn(&mut self, name: &'static str, mut command: Command) -> Result<(), ControlPlaneError> {
        let log = self.dir.join(format!("{name}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        command
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(self.group.map_or(0, |g| g as i32));
        let child = command
            .spawn()
            .map_err(io(format!("starting {name} ({:?})", command.get_program())))?;
        if self.group.is_none() {
            self.group = Some(child.id());
            if let Some(lifeline) = self.lifeline.as_mut() {
                writeln!(lifeline, "{}", child.id()).map_err(io("arming the watchdog"))?;
                lifeline.flush().map_err(io("arming the watchdog"))?;
            }
        }
        self.children.push((name, child, log));
        Ok(())
    }

    /// Fails fast with the log tail if any server has already exited.
    fn check_alive(&mut self) -> Result<(), ControlPlaneError> {
        for (name, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ControlPlaneError::Exited {
                    name,
                    status,
                    log: log.clone(),
                    tail: log_tail(log),
                });
            }
        }
        Ok(())
    }

    /// `what` is named after the process whose log explains the failure.
    fn not_ready(&self, what: &'static str, after: Duration) -> ControlPlaneError {
        let log = self
            .children
            .iter()
            .find(|(name, _, _)| what.starts_with(name))
            .map(|(_, _, log)| log.clone())
            .unwrap_or_else(|| self.dir.clone());
        ControlPlaneError::NotReady {
            what,
            after,
            tail: log_tail(&log),
            log,
        }
    }

    async fn wait_for_port(
        &mut self,
        what: &'static str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), ControlPlaneError> {
        let started = Instant::now();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(self.not_ready(what, timeout));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_apiserver_ready(
        &mut self,
        client: &Client,
        timeout: Duration,
    ) -> Result<(), ControlPlaneError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("static request");
            let probe = tokio::time::timeout(Duration::from_secs(5), client.request_text(request));
            if let Ok(Ok(body)) = probe.await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(self.not_ready("kube-apiserver /readyz", timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_default_service_account(
        &mut self,
        client: &Client,
        ns: &str,
        timeout: Duration,
    ) -> Result<(), ControlPlaneError> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let started = Instant::now();
        loop {
            self.check_alive()?;
            if let Ok(Some(_)) = accounts.get_opt("default").await {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(self.not_ready("kube-controller-manager", timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Closing the lifeline makes the watchdog kill the group and clean up.
        drop(self.lifeline.take());
        let _ = self.watchdog.wait();
        for (_, child, _) in &mut self.children {
            // Already killed by the watchdog; this reaps them (and covers a
            // watchdog that died early).
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    const LINES: usize = 30;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Certificates and keys of one control plane: a CA that signs the apiserver's
/// serving certificate and the admin client certificate, plus the
/// ServiceAccount token signing key.
struct Pki {
    ca_pem: String,
    ca_key_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    admin_cert_pem: String,
    admin_key_pem: String,
    sa_private_pem: String,
    sa_public_pem: String,
}

struct PkiFiles {
    ca_cert: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    ca_key: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_private_key: PathBuf,
    sa_public_key: PathBuf,
    kubeconfig: PathBuf,
}

impl Pki {
    /// `api_address`: the apiserver's address, named in its certificate.
    fn generate(api_address: Ipv4Addr) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "callmeback-test-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            // The in-cluster names and the `kubernetes` Service IP.
            KUBERNETES_SERVICE_IP.to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ])?;
        if !api_address.is_loopback() {
            serving
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(api_address.into()));
        }
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        // The apiserver maps CN to the user name and O to a group.
        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "callmeback-test-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            ca_key_pem,
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
            sa_private_pem: sa_key.serialize_pem(),
            sa_public_pem: sa_key.public_key_pem(),
        })
    }

    fn write(&self, dir: &Path, server_url: &str) -> Result<PkiFiles, ControlPlaneError> {
        use base64::Engine as _;
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(io(format!("creating {}", pki.display())))?;
        let write = |name: &str, content: &str| -> Result<PathBuf, ControlPlaneError> {
            let path = pki.join(name);
            std::fs::write(&path, content).map_err(io(format!("writing {}", path.display())))?;
            Ok(path)
        };
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        // JSON is YAML, so kubectl and helm read this as they read any kubeconfig.
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "callmeback-test",
                "cluster": {
                    "server": server_url,
                    "certificate-authority-data": b64(&self.ca_pem),
                },
            }],
            "users": [{
                "name": "callmeback-test-admin",
                "user": {
                    "client-certificate-data": b64(&self.admin_cert_pem),
                    "client-key-data": b64(&self.admin_key_pem),
                },
            }],
            "contexts": [{
                "name": "callmeback-test",
                "context": {
                    "cluster": "callmeback-test",
                    "user": "callmeback-test-admin",
                    "namespace": "default",
                },
            }],
            "current-context": "callmeback-test",
        });
        let kubeconfig_path = dir.join("admin.kubeconfig");
        std::fs::write(&kubeconfig_path, kubeconfig.to_string())
            .map_err(io(format!("writing {}", kubeconfig_path.display())))?;
        Ok(PkiFiles {
            ca_cert: write("ca.crt", &self.ca_pem)?,
            admin_cert: write("admin.crt", &self.admin_cert_pem)?,
            admin_key: write("admin.key", &self.admin_key_pem)?,
            ca_key: write("ca.key", &self.ca_key_pem)?,
            serving_cert: write("apiserver.crt", &self.serving_cert_pem)?,
            serving_key: write("apiserver.key", &self.serving_key_pem)?,
            sa_private_key: write("service-account.key", &self.sa_private_pem)?,
            sa_public_key: write("service-account.pub", &self.sa_public_pem)?,
            kubeconfig: kubeconfig_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::namespace_prefix;

    #[test]
    fn namespace_prefix_is_a_dns_label_prefix() {
        // Proves arbitrary test names become valid namespace name prefixes.
        assert_eq!(namespace_prefix("SSA Conflict_test"), "ssa-conflict-test");
        assert_eq!(namespace_prefix("--"), "test");
        assert_eq!(namespace_prefix(&"a".repeat(80)).len(), 50);
    }
}
