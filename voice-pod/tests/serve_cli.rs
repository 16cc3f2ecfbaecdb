//! The real `voice-pod` binary's start-up: configuration errors, help, and the
//! README's local command with `examples/`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIN, PodProcess};

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run voice-pod")
}

#[test]
fn bad_configuration_exits_64_and_names_the_setting() {
    // Proves each invalid setting stops the start with status 64 and names its variable.
    let cases: &[(&str, &str)] = &[
        ("CALLMEBACK_LISTEN", "not-an-address"),
        ("CALLMEBACK_PUBLIC_URL", "ftp://pod.example.com"),
        ("CALLMEBACK_DRAIN_TIMEOUT", "forever"),
        ("TWILIO_ACCOUNT_SID", "AC-not-a-sid"),
        ("TWILIO_FROM_NUMBER", "555-0100"),
        ("CALLMEBACK_API_TOKEN", "short"),
    ];
    for (var, value) in cases {
        let out = run(&["serve"], &[(var, value)]);
        assert_eq!(out.status.code(), Some(64), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(var),
            "{var}: stderr does not name it: {stderr}"
        );
    }
}

#[test]
fn secrets_are_not_echoed_in_errors() {
    // Proves a rejected API token value never appears in the error output.
    let out = run(&["serve"], &[("CALLMEBACK_API_TOKEN", "s3cr3t")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cr3t"));
}

#[test]
fn help_exits_zero_and_unknown_flags_exit_64() {
    // Proves --help is not an error and a usage error is status 64.
    assert_eq!(run(&["serve", "--help"], &[]).status.code(), Some(0));
    assert_eq!(
        run(&["serve", "--no-such-flag"], &[]).status.code(),
        Some(64)
    );
}

#[test]
fn readme_command_serves_the_example_personas() {
    // Proves `voice-pod serve --persona-dir examples` loads examples/persona.yaml and is ready.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut pod = PodProcess::start(&[
        ("CALLMEBACK_LISTEN", "127.0.0.1:0"),
        ("CALLMEBACK_METRICS_LISTEN", "127.0.0.1:0"),
        ("CALLMEBACK_PERSONA_DIR", examples),
    ]);
    let ready = http_status(&format!("{}/readyz", pod.metrics));
    assert_eq!(ready, 200, "logs: {:?}", pod.logs());
    let logs = pod.logs().join("\n");
    assert!(logs.contains("date-rescuer"), "persona not loaded: {logs}");
    assert!(!logs.contains("persona configuration rejected"), "{logs}");
    pod.signal("TERM");
    let status = pod
        .wait_exit(Duration::from_secs(10))
        .expect("exit after SIGTERM");
    assert!(status.success(), "{status:?}");
}

/// GET `url` and return the status (0 when unreachable).
fn http_status(url: &str) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::get(url)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    })
}
