#!/usr/bin/env bash
# docs/dashboard.png from real data: runs call-bench (the real voice pod, emulated
# providers, simulated callers) while render_dashboard scrapes the pod's /metrics
# every second, then evaluates every panel's PromQL over those scrapes and draws it.
#
#   bash scripts/dashboard.sh [call-bench args, e.g. --calls 40 --profile realistic]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/target}"
command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null)
cargo build -q -p voice-pod -p callmeback-tests --bin voice-pod --bin call-bench --bin render_dashboard
bin="$CARGO_TARGET_DIR/debug"
export CALLMEBACK_POD_BIN="$bin/voice-pod"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
scrapes="$(mktemp -d)"
trap 'rm -rf "$scrapes"' EXIT
"$bin/render_dashboard" scrape --out "$scrapes" --interval 1s --duration 30m \
  "voice-pod=http://127.0.0.1:$port/metrics" 2>/dev/null &
scraper=$!
"$bin/call-bench" --metrics-listen "127.0.0.1:$port" "$@"
kill -INT "$scraper"; wait "$scraper" || true
# The title shows the arguments, minus any password in a URL (--database-url).
title="callmeback: call-bench $(printf '%s' "$*" | sed -E 's#(://)[^@/ ]*@#\1#g')"
"$bin/render_dashboard" render --scrapes "$scrapes" --out docs/dashboard.png \
  --title "$title"
echo "wrote docs/dashboard.png" >&2
