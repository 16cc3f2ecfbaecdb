#!/usr/bin/env bash
# The main job (README). For now: the real voice pod serving the example personas on
# loopback (app on 127.0.0.1:8080, metrics and probes on 127.0.0.1:9090). Without
# Twilio credentials it answers no real calls; Ctrl-C drains and exits.
# The conversation engine's full local call simulation will replace this.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/target}"
export CALLMEBACK_LISTEN="${CALLMEBACK_LISTEN:-127.0.0.1:8080}"
export CALLMEBACK_METRICS_LISTEN="${CALLMEBACK_METRICS_LISTEN:-127.0.0.1:9090}"
export CALLMEBACK_PERSONA_DIR="${CALLMEBACK_PERSONA_DIR:-$PWD/examples}"
echo "voice-pod serving $CALLMEBACK_PERSONA_DIR; try: curl -s http://$CALLMEBACK_METRICS_LISTEN/readyz; curl -s http://$CALLMEBACK_METRICS_LISTEN/metrics" >&2
exec cargo run -q -p voice-pod -- serve
