#!/usr/bin/env bash
# The one command that runs every test (the README's test command).
# It installs or starts whatever the tests need; nothing is done by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
# Real caller speech for the provider and call tests (tests/src/speech.rs).
command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
# Real helm and kubectl for the chart tests (cached outside the repo).
export CALLMEBACK_TOOLS_DIR="$(bash scripts/helm-tools.sh)"
# A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)
# built from Go modules into a versioned cache outside the repo; a no-op when warm.
export CALLMEBACK_CONTROLPLANE_BIN="$(bash scripts/controlplane-build.sh)"
cargo test --workspace --all-targets
