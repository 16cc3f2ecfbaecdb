#!/usr/bin/env bash
# docs/dashboard.png from real data: a real Prometheus (scripts/prometheus-build.sh)
# scrapes the voice pod's /metrics every second while call-bench runs (the real voice
# pod, emulated providers, simulated callers); then render_dashboard sends every
# panel's PromQL to that Prometheus' query_range API, as Grafana would, and draws it.
#
#   bash scripts/dashboard.sh [call-bench args, e.g. --calls 40 --profile realistic]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/target}"
command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null)
export CALLMEBACK_PROMETHEUS_BIN="$(bash scripts/prometheus-build.sh)"
cargo build -p voice-pod -p callmeback-tests --bin voice-pod --bin call-bench --bin render_dashboard
bin="$CARGO_TARGET_DIR/debug"
export CALLMEBACK_POD_BIN="$bin/voice-pod"
# The title shows the arguments, minus any password in a URL (--database-url).
title="callmeback: call-bench $(printf '%s' "$*" | sed -E 's#(://)[^@/ ]*@#\1#g')"
"$bin/render_dashboard" bench --out docs/dashboard.png --title "$title" -- "$bin/call-bench" "$@"
