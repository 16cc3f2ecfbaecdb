//! Real Prometheus for the tests: `promtool` (rule checks, rule unit tests, the
//! `/metrics` lint) and the `prometheus` server (the dashboard preview queries one
//! that scraped a benchmark, as Grafana would).
//!
//! Both are built from the Go module pinned in `tests/prometheus/` by
//! `scripts/prometheus-build.sh` into a versioned cache outside the repository;
//! `$CALLMEBACK_PROMETHEUS_BIN` names the directory (`scripts/test.sh` sets it).
//! When it is unset or empty, [`bin_dir`] runs the script once per process (a no-op
//! when the cache is warm), so `cargo test` alone works too.
//!
//! ## Layout
//! - [`bin_dir`], [`Promtool`]: the binaries and the promtool subcommands the tests use.
//! - [`PrometheusServer`]: a server on a free loopback port scraping given targets,
//!   killed on drop; [`QueryApi`]: the HTTP query API of it (or of any Prometheus).

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helm::repo_root;

/// Use the binaries in this directory (and build into it when they are missing).
pub const BIN_DIR_ENV: &str = "CALLMEBACK_PROMETHEUS_BIN";

/// How long a started server may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of one query API request (a range query over a benchmark is small).
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a Prometheus binary could not be built, run or queried.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    /// `scripts/prometheus-build.sh` failed.
    #[error("building Prometheus ({script}) failed: {reason}")]
    Build {
        /// The script.
        script: PathBuf,
        /// Its stderr or exit status.
        reason: String,
    },
    /// A process could not be started, or a file written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not become ready, or exited.
    #[error("prometheus did not start: {0}")]
    Start(String),
    /// A query API request failed or was answered with an error.
    #[error("query {query:?}: {reason}")]
    Query {
        /// The PromQL.
        query: String,
        /// The HTTP or Prometheus error.
        reason: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PrometheusError {
    let what = what.into();
    move |source| PrometheusError::Io { what, source }
}

/// The directory holding `promtool` and `prometheus`: `$CALLMEBACK_PROMETHEUS_BIN`
/// when it has them, else what `scripts/prometheus-build.sh` prints (it builds into
/// that same variable's directory when set). The script runs at most once per process.
pub fn bin_dir() -> Result<PathBuf, PrometheusError> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let script = repo_root().join("scripts").join("prometheus-build.sh");
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
            let dir = PathBuf::from(dir);
            if dir.join("promtool").is_file() && dir.join("prometheus").is_file() {
                return Ok(dir);
            }
        }
        // stderr is inherited: a cold build takes minutes and says what it is doing.
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running it: {e}"))?;
        if !out.status.success() {
            return Err(format!("exit status {}", out.status));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("promtool").is_file() {
            Ok(dir)
        } else {
            Err(format!("no promtool in {}", dir.display()))
        }
    })
    .clone()
    .map_err(|reason| PrometheusError::Build { script, reason })
}

/// What a promtool run printed, and whether it succeeded.
#[derive(Debug, Clone)]
pub struct PromtoolRun {
    /// Exit status 0.
    pub success: bool,
    /// stdout then stderr, as promtool printed them (its findings go to either).
    pub output: String,
}

impl PromtoolRun {
    fn from_output(out: Output) -> Self {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Self {
            success: out.status.success(),
            output,
        }
    }
}

/// The real `promtool`.
#[derive(Debug, Clone)]
pub struct Promtool {
    path: PathBuf,
}

impl Promtool {
    /// The built `promtool` (see [`bin_dir`]).
    pub fn get() -> Result<Self, PrometheusError> {
        Ok(Self {
            path: bin_dir()?.join("promtool"),
        })
    }

    /// `promtool <args>` in `dir`, with `stdin` fed to it.
    pub fn run(
        &self,
        dir: &Path,
        args: &[&str],
        stdin: &str,
    ) -> Result<PromtoolRun, PrometheusError> {
        let mut child = Command::new(&self.path)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("running {}", self.path.display())))?;
        if let Some(mut input) = child.stdin.take() {
            // A promtool that exits early (bad flag) closes stdin: its output says why.
            let _ = input.write_all(stdin.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(io(format!("waiting for {}", self.path.display())))?;
        Ok(PromtoolRun::from_output(out))
    }

    /// `promtool check rules --lint-fatal FILE...`: syntax, PromQL and templates of
    /// rule files; lint findings (duplicate rules) fail too.
    pub fn check_rules(&self, files: &[&Path]) -> Result<PromtoolRun, PrometheusError> {
        let dir = common_dir(files);
        let mut args = vec!["check", "rules", "--lint-fatal"];
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        self.run(&dir, &args, "")
    }

    /// `promtool test rules FILE...`: rule unit tests (paths in them are relative to
    /// each test file).
    pub fn test_rules(&self, files: &[&Path]) -> Result<PromtoolRun, PrometheusError> {
        let dir = common_dir(files);
        let mut args = vec!["test", "rules"];
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        self.run(&dir, &args, "")
    }

    /// `promtool check metrics` on a `/metrics` body: the naming and help-text lint
    /// (client_golang's promlint). Returns the run; its output lists the findings.
    pub fn check_metrics(&self, exposition: &str) -> Result<PromtoolRun, PrometheusError> {
        self.run(&std::env::temp_dir(), &["check", "metrics"], exposition)
    }
}

fn common_dir(files: &[&Path]) -> PathBuf {
    files
        .first()
        .and_then(|f| f.parent())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

/// One scrape target of a [`PrometheusServer`].
#[derive(Debug, Clone)]
pub struct Target {
    /// `job` label.
    pub job: String,
    /// `host:port` serving `/metrics`.
    pub address: String,
    /// Extra target labels, as a PodMonitor's relabeling would add (`namespace`, `pod`).
    pub labels: Vec<(String, String)>,
}

/// The `prometheus.yml` scraping `targets` every `interval`.
fn scrape_config(targets: &[Target], interval: Duration) -> String {
    // JSON is YAML: serde_json escapes every value.
    let jobs: Vec<Value> = targets
        .iter()
        .map(|t| {
            let labels: serde_json::Map<String, Value> = t
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            serde_json::json!({
                "job_name": t.job,
                "static_configs": [{ "targets": [t.address], "labels": labels }],
            })
        })
        .collect();
    let interval = format!("{}ms", interval.as_millis().max(1));
    serde_json::json!({
        "global": { "scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval },
        "scrape_configs": jobs,
    })
    .to_string()
}

/// One series of a range query: its labels and `(unix seconds, value)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Labels (`__name__` included when the query keeps it).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Points in time order; values as Prometheus computed them (NaN and ±Inf included).
    pub points: Vec<(f64, f64)>,
}

/// A real `prometheus` server on a free loopback port, scraping [`Target`]s into a
/// TSDB in a temp dir. Killed (and the dir removed) on drop.
pub struct PrometheusServer {
    child: Child,
    /// Its query API.
    pub api: QueryApi,
    dir: tempfile::TempDir,
}

/// The HTTP query API of a Prometheus server (the one Grafana's data source uses).
#[derive(Debug, Clone)]
pub struct QueryApi {
    /// `http://host:port`.
    pub url: String,
    client: reqwest::Client,
}

impl PrometheusServer {
    /// Starts a server scraping `targets` every `scrape_interval` and waits until it
    /// is ready.
    pub async fn start(
        targets: &[Target],
        scrape_interval: Duration,
    ) -> Result<Self, PrometheusError> {
        let bin = bin_dir()?.join("prometheus");
        let dir = tempfile::tempdir().map_err(io("temp dir"))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("free port"))?
            .port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, scrape_config(targets, scrape_interval))
            .map_err(io(format!("writing {}", config.display())))?;
        let log =
            std::fs::File::create(dir.path().join("prometheus.log")).map_err(io("log file"))?;
        let api = QueryApi::new(&format!("http://127.0.0.1:{port}"))?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(format!("running {}", bin.display())))?;
        let mut server = Self { child, api, dir };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<(), PrometheusError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(PrometheusError::Start(format!(
                    "exited with {status}:\n{}",
                    self.log()
                )));
            }
            let ready = self
                .api
                .client
                .get(format!("{}/-/ready", self.api.url))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PrometheusError::Start(format!(
                    "not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's log (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl QueryApi {
    /// The API of the server at `url` (`http://host:port`).
    pub fn new(url: &str) -> Result<Self, PrometheusError> {
        let client = reqwest::Client::builder()
            .timeout(QUERY_TIMEOUT)
            .build()
            .map_err(|e| PrometheusError::Start(e.to_string()))?;
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            client,
        })
    }

    /// `GET /api/v1/<path>` with `params`; the `data` of a successful answer.
    async fn api(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PrometheusError> {
        let query = params
            .iter()
            .find(|(k, _)| *k == "query")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let err = |reason: String| PrometheusError::Query {
            query: query.clone(),
            reason,
        };
        let body: Value = self
            .client
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await
            .map_err(|e| err(e.to_string()))?
            .json()
            .await
            .map_err(|e| err(e.to_string()))?;
        if body["status"] != "success" {
            return Err(err(format!("{}: {}", body["errorType"], body["error"])));
        }
        Ok(body["data"].clone())
    }

    /// `query_range` from `start` to `end` (unix seconds) every `step`, as Grafana
    /// asks for a time series panel.
    pub async fn query_range(
        &self,
        query: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<Series>, PrometheusError> {
        let data = self
            .api(
                "query_range",
                &[
                    ("query", query.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", format!("{:.3}", step.as_secs_f64())),
                ],
            )
            .await?;
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| Series {
                labels: labels_of(&s["metric"]),
                points: s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(point)
                    .collect(),
            })
            .collect())
    }

    /// An instant query at `time` (unix seconds; now when `None`): each series'
    /// labels and value.
    pub async fn query(
        &self,
        query: &str,
        time: Option<f64>,
    ) -> Result<Vec<(std::collections::BTreeMap<String, String>, f64)>, PrometheusError> {
        let mut params = vec![("query", query.to_string())];
        if let Some(t) = time {
            params.push(("time", format!("{t:.3}")));
        }
        let data = self.api("query", &params).await?;
        if data["resultType"] != "vector" {
            return Err(PrometheusError::Query {
                query: query.to_string(),
                reason: format!("a {} result, not a vector", data["resultType"]),
            });
        }
        Ok(data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((labels_of(&s["metric"]), point(&s["value"])?.1)))
            .collect())
    }

    /// Every metric name in the TSDB.
    pub async fn metric_names(&self) -> Result<Vec<String>, PrometheusError> {
        let data = self.api("label/__name__/values", &[]).await?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn labels_of(metric: &Value) -> std::collections::BTreeMap<String, String> {
    metric
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// `[unix_seconds, "value"]` as the query API encodes a sample.
fn point(v: &Value) -> Option<(f64, f64)> {
    let t = v.get(0)?.as_f64()?;
    // Rust parses "NaN", "+Inf" and "-Inf" as Prometheus writes them.
    let x = v.get(1)?.as_str()?.parse().ok()?;
    Some((t, x))
}
