#!/usr/bin/env bash
# The main job (README): one whole phone call, simulated on this machine.
#
# A LOCAL SIMULATION: the real voice-pod binary answers a simulated Twilio caller
# (espeak-ng speech streamed in real time) and talks to protocol-faithful emulators
# of Deepgram, Cerebras and ElevenLabs over real loopback sockets. It prints the
# transcript, each turn's latency by stage, and the metrics the pod exported.
# No provider account is needed and no phone rings.
#
#   bash scripts/demo.sh                     # realistic provider latency
#   bash scripts/demo.sh --profile zero      # emulators answer instantly
#   bash scripts/demo.sh serve               # just the pod, serving examples/ on loopback
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/callmeback/target}"

if [[ "${1:-}" == "serve" ]]; then
  # The pod alone, as a container runs it: without provider keys it answers no calls.
  export CALLMEBACK_LISTEN="${CALLMEBACK_LISTEN:-127.0.0.1:8080}"
  export CALLMEBACK_METRICS_LISTEN="${CALLMEBACK_METRICS_LISTEN:-127.0.0.1:9090}"
  export CALLMEBACK_PERSONA_DIR="${CALLMEBACK_PERSONA_DIR:-$PWD/examples}"
  echo "voice-pod serving $CALLMEBACK_PERSONA_DIR; try: curl -s http://$CALLMEBACK_METRICS_LISTEN/readyz" >&2
  echo "demo: building voice-pod (a first build compiles every dependency: minutes)" >&2
  exec cargo run -p voice-pod -- serve
fi

# The caller's voice.
command -v espeak-ng >/dev/null || {
  echo "demo: installing espeak-ng (the simulated caller's voice)" >&2
  apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
}
# One build of both binaries, so the pod the simulation starts is this checkout's.
# cargo's own progress is shown: a first build compiles every dependency (minutes).
echo "demo: building voice-pod and the local-call simulator" >&2
cargo build -p voice-pod -p callmeback-tests --bin voice-pod --bin local-call
export CALLMEBACK_POD_BIN="$CARGO_TARGET_DIR/debug/voice-pod"
exec "$CARGO_TARGET_DIR/debug/local-call" "$@"
