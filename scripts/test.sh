#!/usr/bin/env bash
# The one command that runs every test (the README's test command).
# It installs or starts whatever the tests need; nothing is done by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
# Build artifacts live in a cache outside the checkout, so a fresh clone (CI) reuses
# what an earlier run on this machine compiled. Override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/target}"
# Each helper's output is assigned before it is exported: `export X="$(cmd)"` would
# hide a failing cmd from `set -e` (export's own status wins).
# PostgreSQL for the store tests: a running server is reused; on a bare machine
# Debian's package is installed and a throwaway cluster started (tests/src/postgres.rs).
# Started before the run's private TMPDIR below, so emptying that never touches it.
CALLMEBACK_TEST_DATABASE_URL="$(bash scripts/postgres.sh)"
export CALLMEBACK_TEST_DATABASE_URL
# Every temp file and test cache (rendered speech, control-plane dirs) lives in a
# directory this run owns, emptied at start: nothing left by an earlier run or another
# checkout's rendering can make a test pass or fail here.
export TMPDIR="$CARGO_TARGET_DIR/test-tmp"
rm -rf "$TMPDIR"
mkdir -p "$TMPDIR"
# Real caller speech for the provider and call tests (tests/src/speech.rs).
command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
# containerd, runc, CNI plugins and iptables for the real test node (tests/src/controlplane/node.rs).
{ command -v containerd && command -v runc && [ -x /usr/lib/cni/bridge ] && command -v iptables; } >/dev/null ||
  (apt-get update -qq && apt-get install -y -qq containerd runc containernetworking-plugins iptables)
# Real helm and kubectl for the chart tests (cached outside the repo).
CALLMEBACK_TOOLS_DIR="$(bash scripts/helm-tools.sh)"
export CALLMEBACK_TOOLS_DIR
# A real Kubernetes control plane (etcd, kube-apiserver, -controller-manager, -scheduler, kwok)
# built from Go modules into a versioned cache outside the repo; a no-op when warm.
CALLMEBACK_CONTROLPLANE_BIN="$(bash scripts/controlplane-build.sh)"
export CALLMEBACK_CONTROLPLANE_BIN
# promtool and prometheus (alert-rule unit tests, /metrics lint), built the same way.
CALLMEBACK_PROMETHEUS_BIN="$(bash scripts/prometheus-build.sh)"
export CALLMEBACK_PROMETHEUS_BIN
# Twilio's official helper library in a test-only virtualenv, cached outside the
# repo (signature cross-checks in tests/tests/twilio_signature.rs).
bash scripts/twilio-venv.sh >/dev/null
# The end-to-end call tests run the voice-pod binary this same build produces (voice-pod's
# own integration tests make cargo build it with the workspace's features), instead of
# a nested `cargo build -p voice-pod` that would compile the dependencies a second time.
export CALLMEBACK_POD_BIN="$CARGO_TARGET_DIR/debug/voice-pod"
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --all-targets --no-fail-fast "$@"
