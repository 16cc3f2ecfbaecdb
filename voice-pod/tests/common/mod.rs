//! Support for tests that run the real `voice-pod` binary: start it with a given
//! environment, learn its ports from its JSON logs, send it signals.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_voice-pod");

/// A running `voice-pod serve`.
pub struct PodProcess {
    pub child: Child,
    pub app: String,
    pub metrics: String,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl PodProcess {
    /// Starts `voice-pod serve` with exactly `env` (nothing inherited but PATH) and
    /// waits for its "voice pod serving" log line.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn voice-pod");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("voice pod serving") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("voice-pod did not start; logs: {:?}", logs.lock().unwrap())
            });
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        let addr = |k: &str| {
            let s = v["fields"][k].as_str().expect("address field").to_string();
            // Debug of Option<SocketAddr>: Some(127.0.0.1:1234)
            let s = s.trim_start_matches("Some(").trim_end_matches(')');
            format!("http://{s}")
        };
        Self {
            app: addr("app"),
            metrics: addr("metrics"),
            child,
            logs,
        }
    }

    /// Sends a signal (`TERM`, `INT`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// All log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A persona directory with one persona, `ada`.
pub fn persona_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("personas");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ada.yaml"),
        "displayName: Ada\nsystemPrompt: You are Ada.\ngreeting: Hello!\nvoice:\n  voiceId: v1\nmaxCallDurationSeconds: 60\nidleTimeoutSeconds: 10\n",
    )
    .unwrap();
    dir
}

/// Value of a metric (sum over series whose labels include `labels`) in Prometheus text.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (m, ls) = series.split_once('{').unwrap_or((series, ""));
            m == name
                && labels.iter().all(|(k, v)| {
                    ls.trim_end_matches('}')
                        .split(',')
                        .any(|p| p == format!("{k}=\"{v}\""))
                })
        })
        .map(|(_, v)| v.parse::<f64>().unwrap_or(0.0))
        .sum()
}
